"""Small statement builders whose SQL differs between PostgreSQL and SQLite."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Engine, Table, bindparam, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import ARRAY, BIGINT
from sqlalchemy.sql.expression import ColumnElement


def insert_ignoring_conflicts(engine: Engine, table: Table, key: list[str]):
    """Return `INSERT ... ON CONFLICT (key) DO NOTHING` for the engine's dialect."""
    if engine.dialect.name == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing(index_elements=key)
    return sqlite.insert(table).on_conflict_do_nothing(index_elements=key)


def id_in(engine: Engine, column: ColumnElement[Any], ids: Sequence[int]) -> ColumnElement[bool]:
    """`column IN ids` as one bound parameter, whatever the number of ids.

    PostgreSQL takes an array (`= ANY`), SQLite a JSON array read with
    json_each, so a batch of 100,000 ids does not hit either driver's limit
    on bound parameters.
    """
    if engine.dialect.name == "postgresql":
        return column == func.any(bindparam("ids", list(ids), ARRAY(BIGINT)))
    id_list = func.json_each(bindparam("ids", json.dumps(list(ids)))).table_valued("value")
    return column.in_(select(id_list.c.value))

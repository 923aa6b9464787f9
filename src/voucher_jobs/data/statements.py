"""Small statement builders whose SQL differs between PostgreSQL and SQLite."""

from __future__ import annotations

from sqlalchemy import Engine, Table
from sqlalchemy.dialects import postgresql, sqlite


def insert_ignoring_conflicts(engine: Engine, table: Table, key: list[str]):
    """Return `INSERT ... ON CONFLICT (key) DO NOTHING` for the engine's dialect."""
    if engine.dialect.name == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing(index_elements=key)
    return sqlite.insert(table).on_conflict_do_nothing(index_elements=key)

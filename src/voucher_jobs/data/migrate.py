"""Schema migrations with Alembic, run on an engine the caller owns."""

from __future__ import annotations

import re
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, text

from voucher_jobs.data.engine import mask_url

MIGRATIONS = Path(__file__).parent / "migrations"
VERSION_TABLE = "voucher_jobs_alembic_version"


class SchemaNotReady(Exception):
    """The database lacks voucher-jobs' tables or has an older schema."""


def _config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"version_table": VERSION_TABLE}
        )
        return context.get_current_revision()


# The SQLite form of the instants that voucher-jobs compares: UTC text with
# six fractional digits, whose text order is time order.
_SQLITE_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}")
_SQLITE_TIMESTAMP_GLOB = (
    "[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9] [0-9][0-9]:[0-9][0-9]:[0-9][0-9]"
    ".[0-9][0-9][0-9][0-9][0-9][0-9]"
)
# The columns the jobs compare with < or <=. deleted_at is only tested for
# NULL, so its format does not matter.
_COMPARED_COLUMNS = (("vouchers", "expiry_date"), ("voucher_audit_logs", "created_at"))


def check_sqlite_timestamps(connection: Connection, *, every_row: bool) -> None:
    """Raise SchemaNotReady when a compared SQLite column contains another timestamp format.

    SQLite compares these columns as text, and sorts every number before any
    text, so integer milliseconds or ISO text with a T would make the jobs
    pick the wrong rows. With every_row, each row is read (for `db upgrade`);
    otherwise only the lowest and highest values, from the indexes, which
    catch numbers and a format that sorts above or below the expected one.
    """
    if connection.dialect.name != "sqlite":
        return
    inspector = inspect(connection)
    tables = set(inspector.get_table_names())
    for table, column in _COMPARED_COLUMNS:
        # A missing table or column is reported by the migration itself.
        if table not in tables or column not in {
            found["name"] for found in inspector.get_columns(table)
        }:
            continue
        if every_row:
            found = connection.execute(text(
                f"SELECT {column} FROM {table} WHERE {column} IS NOT NULL AND "
                f"(typeof({column}) != 'text' OR {column} NOT GLOB '{_SQLITE_TIMESTAMP_GLOB}') "
                "LIMIT 1"
            )).first()
            bad = None if found is None else found[0]
        else:
            lowest, highest = connection.execute(
                text(f"SELECT min({column}), max({column}) FROM {table}")
            ).one()
            bad = next((value for value in (lowest, highest) if value is not None and not (
                isinstance(value, str) and _SQLITE_TIMESTAMP.fullmatch(value))), None)
        if bad is not None:
            raise SchemaNotReady(
                f"{table}.{column} contains {bad!r} ({type(bad).__name__}), but voucher-jobs "
                "compares SQLite timestamps as UTC text such as "
                "'2026-12-04 10:00:00.000000', so it would pick the wrong rows. Nothing was "
                f"changed. Convert every {table}.{column} value to that form, then run again."
            )


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str]:
    """Apply migrations up to revision; return the revisions before and after."""
    with engine.connect() as connection:
        check_sqlite_timestamps(connection, every_row=True)
    before = current_revision(engine)
    config = _config()
    # The connection must not be in a transaction yet, so that Alembic owns
    # the transaction. autocommit_block needs that to commit it before
    # CREATE INDEX CONCURRENTLY on an adopted PostgreSQL table.
    with engine.connect() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
        connection.commit()
    return before, current_revision(engine) or ""


def require_current(engine: Engine) -> None:
    """Raise SchemaNotReady unless the database is at the newest revision."""
    current = current_revision(engine)
    head = head_revision()
    if current == head:
        with engine.connect() as connection:
            check_sqlite_timestamps(connection, every_row=False)
        return
    state = "has no voucher-jobs tables" if current is None else f"is at revision {current}"
    raise SchemaNotReady(
        f"the database {mask_url(engine.url)} {state}; this version needs {head}. "
        "Run `voucher-jobs db upgrade` first."
    )

"""Schema migrations with Alembic, run on an engine the caller owns."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

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


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str]:
    """Apply migrations up to revision; return the revisions before and after."""
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
        return
    state = "has no voucher-jobs tables" if current is None else f"is at revision {current}"
    raise SchemaNotReady(
        f"the database {mask_url(engine.url)} {state}; this version needs {head}. "
        "Run `voucher-jobs db upgrade` first."
    )

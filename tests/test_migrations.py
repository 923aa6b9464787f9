"""Migrations: the schema they build, and adopting the voucher backend's own tables."""

from __future__ import annotations

from datetime import timedelta

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, event, inspect, select, text
from sqlalchemy.exc import IntegrityError

from tests.conftest import T0, Database
from voucher_jobs.data import migrate
from voucher_jobs.data.engine import create_db_engine
from voucher_jobs.data.schema import expirations, metadata, voucher_audit_logs, vouchers

AT_T0 = ["--at", "2026-12-04T10:00:00Z"]

# The backend's tables as its own migrations create them: more columns than
# voucher-jobs reads, its own key and constraint names, and none of the
# indexes voucher-jobs adds. On PostgreSQL the timestamps have no time zone
# and action is an enum type, two choices a backend's ORM may make.
BACKEND_COLUMNS = {
    "postgresql": {
        "vouchers": [
            ("id", "BIGSERIAL PRIMARY KEY"),
            ("code", "VARCHAR(64) NOT NULL UNIQUE"),
            ("type", "VARCHAR(32) NOT NULL"),
            ("discount", "NUMERIC(10, 2)"),
            ("expiry_date", "TIMESTAMP(3) NOT NULL"),
            ("deleted_at", "TIMESTAMP(3)"),
            ("created_at", "TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP"),
            ("updated_at", "TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP"),
        ],
        "voucher_audit_logs": [
            ("id", "BIGSERIAL PRIMARY KEY"),
            ("voucher_id", "BIGINT REFERENCES vouchers (id)"),
            ("action", "audit_action NOT NULL"),
            ("actor_type", "VARCHAR(32) NOT NULL"),
            ("actor_id", "BIGINT"),
            ("code", "VARCHAR(64)"),
            ("metadata", "JSONB"),
            ("created_at", "TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP"),
        ],
    },
    "sqlite": {
        "vouchers": [
            ("id", "INTEGER PRIMARY KEY AUTOINCREMENT"),
            ("code", "TEXT NOT NULL UNIQUE"),
            ("type", "TEXT NOT NULL"),
            ("discount", "NUMERIC"),
            ("expiry_date", "TEXT NOT NULL"),
            ("deleted_at", "TEXT"),
            ("created_at", "TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP"),
            ("updated_at", "TEXT"),
        ],
        "voucher_audit_logs": [
            ("id", "INTEGER PRIMARY KEY AUTOINCREMENT"),
            ("voucher_id", "INTEGER REFERENCES vouchers (id)"),
            ("action", "TEXT NOT NULL"),
            ("actor_type", "TEXT NOT NULL"),
            ("actor_id", "INTEGER"),
            ("code", "TEXT"),
            ("metadata", "TEXT"),
            ("created_at", "TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP"),
        ],
    },
}
ADDED_INDEXES = {
    "vouchers": {"ix_vouchers_live_expiry_date"},
    "voucher_audit_logs": {"ix_voucher_audit_logs_created_at_id",
                           "ix_voucher_audit_logs_voucher_id"},
}


def differences(engine: Engine) -> list:
    def include_name(name, type_, _parent_names) -> bool:
        return not (type_ == "table" and name == migrate.VERSION_TABLE)

    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "include_name": include_name}
        )
        return compare_metadata(context, metadata)


def test_schema_matches_metadata(db: Database) -> None:
    assert differences(db.engine) == []


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
def test_comparison_sees_missing_index(db: Database) -> None:
    # This checks that the comparison can fail: it reports a missing index.
    with db.engine.begin() as connection:
        connection.execute(text("DROP INDEX ix_voucher_audit_logs_voucher_id"))
    [difference] = differences(db.engine)
    assert difference[0] == "add_index"
    assert difference[1].name == "ix_voucher_audit_logs_voucher_id"


def create_backend_tables(engine: Engine, omit: str | None = None) -> None:
    """Create vouchers and voucher_audit_logs with plain SQL, leaving out one column."""
    columns = BACKEND_COLUMNS[engine.dialect.name]
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(text(
                "CREATE TYPE audit_action AS ENUM ('CREATED', 'UPDATED', 'REDEEMED', 'EXPIRED')"
            ))
        for table in ("vouchers", "voucher_audit_logs"):
            definitions = ", ".join(
                f"{name} {definition}" for name, definition in columns[table] if name != omit
            )
            connection.execute(text(f"CREATE TABLE {table} ({definitions})"))


def stamp(moment) -> str:
    """Format a UTC instant as text that both SQLite and PostgreSQL accept."""
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f")


def fill_backend_tables(engine: Engine) -> None:
    old = stamp(T0 - timedelta(days=1000))
    with engine.begin() as connection:
        for code, expiry, deleted in [
            ("SPRING", T0 - timedelta(days=2), None),
            ("SUMMER", T0 - timedelta(hours=1), None),
            ("WINTER", T0 + timedelta(days=10), None),
            ("GONE", T0 - timedelta(days=3), T0 - timedelta(days=5)),
        ]:
            connection.execute(
                text("INSERT INTO vouchers (code, type, expiry_date, deleted_at) "
                     "VALUES (:code, 'PERCENTAGE', :expiry, :deleted)"),
                {"code": code, "expiry": stamp(expiry),
                 "deleted": stamp(deleted) if deleted else None},
            )
        audit_rows = [
            *[(voucher_id, "CREATED", old) for voucher_id in (1, 2, 3, 4)],
            # SPRING's expiry was logged by the backend before voucher-jobs.
            (1, "EXPIRED", stamp(T0 - timedelta(days=1))),
            (2, "UPDATED", stamp(T0 - timedelta(days=10))),
        ]
        for voucher_id, action, created_at in audit_rows:
            connection.execute(
                text("INSERT INTO voucher_audit_logs "
                     "(voucher_id, action, actor_type, code, created_at) "
                     "VALUES (:voucher_id, :action, 'ADMIN', 'X', :created_at)"),
                {"voucher_id": voucher_id, "action": action, "created_at": created_at},
            )


def index_names(engine: Engine, table: str) -> set[str]:
    return {index["name"] for index in inspect(engine).get_indexes(table)}


def index_definition(engine: Engine, name: str) -> str:
    if engine.dialect.name == "postgresql":
        query = "SELECT indexdef FROM pg_indexes WHERE indexname = :name"
    else:
        query = "SELECT sql FROM sqlite_master WHERE type = 'index' AND name = :name"
    with engine.connect() as connection:
        return connection.execute(text(query), {"name": name}).scalar_one()


def upgrade_recording_sql(engine: Engine) -> list[str]:
    statements: list[str] = []

    def record(_connection, _cursor, statement, *_args) -> None:
        statements.append(" ".join(statement.split()))

    event.listen(engine, "before_cursor_execute", record)
    try:
        migrate.upgrade(engine)
    finally:
        event.remove(engine, "before_cursor_execute", record)
    return statements


def test_upgrade_adopts_backend_tables(empty_database: str, cli) -> None:
    engine = create_db_engine(empty_database)
    try:
        create_backend_tables(engine)
        fill_backend_tables(engine)
        with engine.connect() as connection:
            vouchers_before = connection.execute(text("SELECT * FROM vouchers ORDER BY id")).all()
            logs_before = connection.execute(
                text("SELECT * FROM voucher_audit_logs ORDER BY id")).all()

        statements = upgrade_recording_sql(engine)

        with engine.connect() as connection:
            assert connection.execute(text("SELECT * FROM vouchers ORDER BY id")).all() \
                == vouchers_before
            assert connection.execute(text("SELECT * FROM voucher_audit_logs ORDER BY id")) \
                .all() == logs_before
        for table, names in ADDED_INDEXES.items():
            assert names <= index_names(engine, table)
        live_index = index_definition(engine, "ix_vouchers_live_expiry_date")
        assert "deleted_at IS NULL" in live_index
        assert migrate.current_revision(engine) == migrate.head_revision()

        if engine.dialect.name == "postgresql":
            for name in ("ix_vouchers_live_expiry_date", "ix_voucher_audit_logs_created_at_id"):
                assert any(
                    statement.startswith(f"CREATE INDEX CONCURRENTLY {name} ")
                    for statement in statements
                ), name
            with engine.connect() as connection:
                invalid = connection.execute(text(
                    "SELECT count(*) FROM pg_index WHERE NOT indisvalid")).scalar_one()
            assert invalid == 0

        env = {"DATABASE_URL": empty_database}
        expired = cli("run", "voucher-expired", *AT_T0, "--json", env=env)
        assert expired.exit_code == 0, expired.stderr
        archived = cli("run", "audit-archival", *AT_T0, "--json", env=env)
        assert archived.exit_code == 0, archived.stderr

        with engine.connect() as connection:
            logged = connection.execute(text(
                "SELECT voucher_id FROM voucher_audit_logs WHERE action = 'EXPIRED' "
                "ORDER BY voucher_id")).scalars().all()
            remaining = connection.execute(text(
                "SELECT action FROM voucher_audit_logs ORDER BY id")).scalars().all()
            claims = connection.execute(select(expirations.c.voucher_id, expirations.c.run_id)
                                        .order_by(expirations.c.voucher_id)).all()
        # SUMMER gets its EXPIRED row. SPRING's row from the backend counts,
        # WINTER has not expired and GONE is deleted.
        assert logged == [1, 2]
        # The four CREATED rows are 1000 days old, past the 730-day retention.
        assert remaining == ["EXPIRED", "UPDATED", "EXPIRED"]
        assert [tuple(claim) for claim in claims] == [(1, 0), (2, 1)]
    finally:
        engine.dispose()


def test_upgrade_twice_keeps_adopted_tables(empty_database: str) -> None:
    engine = create_db_engine(empty_database)
    try:
        create_backend_tables(engine)
        fill_backend_tables(engine)
        migrate.upgrade(engine)
        before, after = migrate.upgrade(engine)
        assert before == after == migrate.head_revision()
        with engine.connect() as connection:
            count = connection.execute(text("SELECT count(*) FROM vouchers")).scalar_one()
        assert count == 4
    finally:
        engine.dispose()


@pytest.mark.parametrize("empty_database", ["postgresql"], indirect=True)
def test_upgrade_rebuilds_invalid_index(empty_database: str) -> None:
    engine = create_db_engine(empty_database)
    try:
        create_backend_tables(engine)
        fill_backend_tables(engine)
        # A concurrent build that fails, here on duplicate values, leaves an
        # invalid index behind under the name the migration uses.
        name = "ix_voucher_audit_logs_created_at_id"
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            with pytest.raises(IntegrityError):
                connection.execute(text(
                    f"CREATE UNIQUE INDEX CONCURRENTLY {name} ON voucher_audit_logs (action)"))
        assert inspect(engine).get_indexes("voucher_audit_logs")[0]["dialect_options"] \
            .get("postgresql_invalid") is True

        migrate.upgrade(engine)

        with engine.connect() as connection:
            valid = connection.execute(text(
                "SELECT indisvalid FROM pg_index WHERE indexrelid = CAST(:name AS regclass)"),
                {"name": name}).scalar_one()
        assert valid is True
        assert "(created_at, id)" in index_definition(engine, name)
    finally:
        engine.dispose()


@pytest.mark.parametrize("omit, table", [
    ("expiry_date", "vouchers"),
    ("deleted_at", "vouchers"),
    ("created_at", "voucher_audit_logs"),
])
def test_missing_column_fails_upgrade(empty_database: str, cli, omit: str, table: str) -> None:
    engine = create_db_engine(empty_database)
    try:
        create_backend_tables(engine, omit=omit)
        result = cli("db", "upgrade", env={"DATABASE_URL": empty_database})
        assert result.exit_code == 4
        assert f"table {table} exists but lacks the columns {omit}" in result.stderr
        assert "Traceback" not in result.stderr
        assert migrate.current_revision(engine) is None
    finally:
        engine.dispose()


@pytest.mark.parametrize("empty_database", ["postgresql"], indirect=True)
def test_schema_parameter_places_tables(empty_database: str, cli) -> None:
    engine = create_db_engine(empty_database)
    try:
        with engine.begin() as connection:
            connection.execute(text("CREATE SCHEMA shop"))
        env = {"DATABASE_URL": f"{empty_database}?schema=shop"}
        upgraded = cli("db", "upgrade", env=env)
        assert upgraded.exit_code == 0, upgraded.stderr
        tables = set(inspect(engine).get_table_names(schema="shop"))
        assert {vouchers.name, voucher_audit_logs.name, "voucher_jobs_runs"} <= tables
        assert inspect(engine).get_table_names(schema="public") == []
        expired = cli("run", "voucher-expired", env=env)
        assert expired.exit_code == 0, expired.stderr
    finally:
        engine.dispose()

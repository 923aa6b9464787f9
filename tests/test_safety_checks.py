"""Inputs that could lose or misplace data are rejected before anything is deleted."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import insert, text

from tests.conftest import T0, Database
from voucher_jobs.config import ArchiveMode
from voucher_jobs.data.engine import DatabaseURLError, normalize_url
from voucher_jobs.data.schema import audit_archive, voucher_audit_logs
from voucher_jobs.jobs import audit_archival, voucher_expired
from voucher_jobs.runner import RunFailed, execute

CUTOFF = T0 - timedelta(days=730)


def archive(db: Database, mode: ArchiveMode, at=T0):
    parameters = audit_archival.ArchivalParameters(
        retention_days=730, mode=mode, reference_time=at, archive_dir=db.workdir / "archive"
    )
    return execute(db.engine, audit_archival.NAME, parameters, trigger="test",
                   handle_signals=False)


def test_archived_id_reused_is_kept(db: Database) -> None:
    db.add_audit_rows([CUTOFF - timedelta(days=1), CUTOFF - timedelta(hours=1)])
    [first_id, second_id] = [row.id for row in db.rows(
        voucher_audit_logs.select().order_by(voucher_audit_logs.c.id))]
    with db.engine.begin() as connection:
        connection.execute(insert(audit_archive).values(
            id=second_id, action="UPDATED", actor_type="ADMIN", created_at=CUTOFF,
            archived_at=T0, run_id=99))
    with pytest.raises(RunFailed) as failure:
        archive(db, ArchiveMode.ARCHIVE_TABLE)
    assert f"already contains audit row ids {second_id}" in failure.value.run.error
    assert db.count(voucher_audit_logs) == 2
    assert db.count(audit_archive) == 1


@pytest.mark.parametrize("mode", [ArchiveMode.ARCHIVE_TABLE, ArchiveMode.ARCHIVE_FILE])
def test_unknown_column_blocks_archiving(db: Database, mode: ArchiveMode) -> None:
    db.add_audit_rows([CUTOFF - timedelta(days=1)])
    with db.engine.begin() as connection:
        connection.execute(text("ALTER TABLE voucher_audit_logs ADD COLUMN actor_id VARCHAR(64)"))
    try:
        with pytest.raises(RunFailed) as failure:
            archive(db, mode)
        assert "would not keep: actor_id" in failure.value.run.error
        assert db.count(voucher_audit_logs) == 1
    finally:
        with db.engine.begin() as connection:
            connection.execute(text("ALTER TABLE voucher_audit_logs DROP COLUMN actor_id"))


def test_future_reference_time_rejected(db: Database) -> None:
    voucher = db.add_voucher(T0 + timedelta(days=3650))
    future = f"{(T0 + timedelta(days=3700)).year}-01-01T00:00:00Z"
    result = db.cli("run", "voucher-expired", "--at", future)
    assert result.returncode == 2
    assert "later than the database clock" in result.stderr
    assert db.count(voucher_audit_logs, voucher_audit_logs.c.voucher_id == voucher) == 0


def test_url_without_database_rejected() -> None:
    with pytest.raises(DatabaseURLError, match="names no database"):
        normalize_url("postgresql://postgres@127.0.0.1:5432/")


def test_lock_is_per_schema(postgres_url: str) -> None:
    # Schemas are a PostgreSQL feature; SQLite locks per database file.
    from voucher_jobs.data.engine import create_db_engine
    from voucher_jobs.data.locks import job_lock

    engine = create_db_engine(postgres_url)
    with engine.begin() as connection:
        connection.execute(text("CREATE SCHEMA IF NOT EXISTS second_shop"))
    other = create_db_engine(f"{postgres_url}?schema=second_shop")
    try:
        with job_lock(engine, "voucher-expired") as first:
            with job_lock(other, "voucher-expired") as second:
                with job_lock(engine, "voucher-expired") as same_schema:
                    assert first
                    assert second
                    assert not same_schema
    finally:
        other.dispose()
        with engine.begin() as connection:
            connection.execute(text("DROP SCHEMA second_shop CASCADE"))
        engine.dispose()

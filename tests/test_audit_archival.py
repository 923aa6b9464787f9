"""audit-archival on real databases: keyset batches, fixed cutoff, the three modes."""

from __future__ import annotations

import gzip
import json
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from tests.conftest import T0, Database
from voucher_jobs.config import ArchiveMode
from voucher_jobs.data.schema import archive_files, audit_archive, voucher_audit_logs
from voucher_jobs.jobs import audit_archival
from voucher_jobs.jobs.base import BatchLimits
from voucher_jobs.runner import execute

RETENTION = 730
CUTOFF = T0 - timedelta(days=RETENTION)


def archive(db: Database, mode=ArchiveMode.DELETE, batch_size=100, at=T0, dry_run=False,
            retention_days=RETENTION, archive_file_rows=100_000, max_batches=None):
    parameters = audit_archival.ArchivalParameters(
        retention_days=retention_days, mode=mode, reference_time=at, dry_run=dry_run,
        limits=BatchLimits(batch_size=batch_size, max_batches=max_batches),
        archive_dir=db.workdir / "archive", archive_file_rows=archive_file_rows,
    )
    return execute(db.engine, audit_archival.NAME, parameters, trigger="test",
                   handle_signals=False)


def fill_300_old_50_new(db: Database) -> None:
    old = [CUTOFF - timedelta(minutes=300 - i) for i in range(300)]
    new = [CUTOFF + timedelta(minutes=i) for i in range(50)]
    db.add_audit_rows(old + new)


def live_times(db: Database):
    return [row.created_at for row in db.rows(select(voucher_audit_logs.c.created_at))]


@pytest.mark.parametrize("batch_size", [1, 7, 100, 1000])
@pytest.mark.parametrize("mode", list(ArchiveMode))
def test_removes_exactly_the_old_rows(db: Database, mode: ArchiveMode, batch_size: int) -> None:
    fill_300_old_50_new(db)
    run, result = archive(db, mode=mode, batch_size=batch_size, archive_file_rows=128)
    assert run.status == "succeeded"
    assert run.rows_affected == 300
    assert db.count(voucher_audit_logs) == 50
    assert min(live_times(db)) == CUTOFF
    assert result.details["cutoff"] == CUTOFF.isoformat()


def test_row_at_cutoff_is_kept(db: Database) -> None:
    db.add_audit_rows([CUTOFF - timedelta(microseconds=1), CUTOFF])
    run, _ = archive(db)
    assert run.rows_affected == 1
    assert live_times(db) == [CUTOFF]


def test_retention_one_day(db: Database) -> None:
    db.add_audit_rows([T0 - timedelta(hours=25), T0 - timedelta(hours=23)])
    run, _ = archive(db, retention_days=1)
    assert run.rows_affected == 1
    assert live_times(db) == [T0 - timedelta(hours=23)]


def test_dry_run_reports_and_keeps(db: Database) -> None:
    fill_300_old_50_new(db)
    run, result = archive(db, dry_run=True)
    assert result.details["eligible_at_start"] == 300
    assert result.details["oldest_eligible"] == (CUTOFF - timedelta(minutes=300)).isoformat()
    assert result.details["newest_eligible"] == (CUTOFF - timedelta(minutes=1)).isoformat()
    assert db.count(voucher_audit_logs) == 350


def test_rows_written_during_run_are_not_eligible(db: Database) -> None:
    # The cutoff is fixed at start: rows the application writes meanwhile are
    # newer than it, so the run stops after the rows eligible at start.
    fill_300_old_50_new(db)
    calls = []

    def writer_sleep(_seconds: float) -> None:
        calls.append(1)
        db.add_audit_rows([T0 + timedelta(seconds=len(calls))])

    parameters = audit_archival.ArchivalParameters(
        retention_days=RETENTION, reference_time=T0,
        limits=BatchLimits(batch_size=50, pause_seconds=0.001),
    )
    from voucher_jobs.jobs.base import JobContext

    result = audit_archival.run(db.engine, parameters, JobContext(run_id=1, sleep=writer_sleep))
    assert result.rows_affected == 300
    assert result.details["batches"] == 6
    assert db.count(voucher_audit_logs) == 50 + len(calls)


def test_archive_table_keeps_every_column(db: Database) -> None:
    fill_300_old_50_new(db)
    before = db.rows(select(voucher_audit_logs).order_by(voucher_audit_logs.c.id).limit(300))
    run, _ = archive(db, mode=ArchiveMode.ARCHIVE_TABLE, batch_size=64)
    archived = db.rows(select(audit_archive).order_by(audit_archive.c.id))
    assert len(archived) == 300
    for original, copy in zip(before, archived):
        assert tuple(original) == tuple(copy)[:7]
        assert copy.run_id == run.id


def test_archive_files_hold_each_row_once(db: Database) -> None:
    fill_300_old_50_new(db)
    before = db.rows(select(voucher_audit_logs.c.id).where(voucher_audit_logs.c.created_at < CUTOFF))
    run, result = archive(db, mode=ArchiveMode.ARCHIVE_FILE, batch_size=40, archive_file_rows=128)
    directory = db.workdir / "archive"
    data_files = sorted(directory.glob("*.jsonl.gz"))
    assert len(data_files) == 3
    ids = []
    for path in data_files:
        manifest = json.loads(path.with_name(path.name.replace(".jsonl.gz", ".manifest.json")).read_text())
        lines = gzip.decompress(path.read_bytes()).splitlines()
        assert manifest["rows"] == len(lines)
        ids += [json.loads(line)["id"] for line in lines]
    assert sorted(ids) == sorted(row.id for row in before)
    statuses = [row.status for row in db.rows(select(archive_files.c.status))]
    assert statuses == ["complete"] * 3
    assert result.details["files"] == [path.name for path in data_files]


def test_archive_file_line_format(db: Database) -> None:
    db.add_audit_rows([CUTOFF - timedelta(days=1)])
    archive(db, mode=ArchiveMode.ARCHIVE_FILE)
    [path] = (db.workdir / "archive").glob("*.jsonl.gz")
    record = json.loads(gzip.decompress(path.read_bytes()))
    assert record["created_at"] == "2024-12-03T10:00:00.000000Z"
    assert record["metadata"] == {"n": 0}
    assert record["action"] == "UPDATED"


def test_max_batches_stops_and_next_run_goes_on(db: Database) -> None:
    fill_300_old_50_new(db)
    run, _ = archive(db, batch_size=100, max_batches=2)
    assert run.rows_affected == 200
    run, _ = archive(db, batch_size=100)
    assert run.rows_affected == 100
    assert db.count(voucher_audit_logs) == 50


def test_unfinished_file_is_completed_by_next_run(db: Database) -> None:
    fill_300_old_50_new(db)
    run, _ = archive(db, mode=ArchiveMode.ARCHIVE_FILE, batch_size=50, max_batches=1,
                     archive_file_rows=300)
    assert run.rows_affected == 50
    assert [r.status for r in db.rows(select(archive_files.c.status))] == ["exported"]
    run, _ = archive(db, mode=ArchiveMode.ARCHIVE_FILE, batch_size=50, archive_file_rows=300)
    assert run.rows_affected == 250
    assert len(list((db.workdir / "archive").glob("*.jsonl.gz"))) == 1
    assert db.count(voucher_audit_logs) == 50

"""audit-archival on real databases: keyset batches, fixed cutoff, the three modes."""

from __future__ import annotations

import gzip
import json
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import insert, select

from tests.conftest import T0, Database
from voucher_jobs.config import ArchiveMode
from voucher_jobs.data.schema import archive_files, audit_archive, voucher_audit_logs
from voucher_jobs.jobs import audit_archival
from voucher_jobs.jobs.base import BatchLimits
from voucher_jobs.runner import RunFailed, execute

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


@pytest.mark.parametrize("page_rows", [10_000, 3])
def test_archive_files_hold_each_row_once(db: Database, page_rows: int,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # With 3, the ids of a file are read 30 at a time, and the pages of
    # Python-encoded lines hold 3 rows.
    from voucher_jobs.jobs import archive_files as archive_files_module

    monkeypatch.setattr(archive_files_module, "EXPORT_PAGE_ROWS", page_rows)
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


def test_stop_between_files_discards_next(db: Database) -> None:
    # On PostgreSQL the next file is written while the rows of the current
    # one are deleted. A run that stops after the current file must not
    # leave the next one behind.
    fill_300_old_50_new(db)
    run, _ = archive(db, mode=ArchiveMode.ARCHIVE_FILE, batch_size=100, max_batches=1,
                     archive_file_rows=100)
    assert run.rows_affected == 100
    folder = db.workdir / "archive"
    assert sorted(path.name for path in folder.iterdir()) == [
        "voucher_audit_logs.run00000001.00001.jsonl.gz",
        "voucher_audit_logs.run00000001.00001.manifest.json",
    ]
    run, _ = archive(db, mode=ArchiveMode.ARCHIVE_FILE, batch_size=100, archive_file_rows=100)
    assert run.rows_affected == 200
    lines = [json.loads(line) for path in sorted(folder.glob("*.jsonl.gz"))
             for line in gzip.open(path)]
    assert len(lines) == 300 and len({line["id"] for line in lines}) == 300
    assert db.count(voucher_audit_logs) == 50


def test_listed_deletion_keeps_unlisted_rows(db: Database) -> None:
    from voucher_jobs.data.audit_batches import delete_listed

    add_rows_with_ids(db, [(row_id, CUTOFF - timedelta(hours=row_id)) for row_id in range(1, 11)])
    # Row 4 lies inside the span 1..6 but is not listed: it must stay.
    assert delete_listed(db.engine, [1, 2, 3, 5, 6], CUTOFF) == 5
    assert delete_listed(db.engine, [7, 8], CUTOFF) == 2
    # Rows 7 and 8 are gone already: of this list only 9 and 10 are left.
    assert delete_listed(db.engine, [7, 8, 9, 10], CUTOFF) == 2
    remaining = [row.id for row in db.rows(select(voucher_audit_logs.c.id))]
    assert remaining == [4]


def test_archive_dir_without_unfinished_file(db: Database) -> None:
    # The first run leaves a registered file whose rows are partly deleted.
    # A run pointed at a folder that does not exist must not export those
    # rows again into a second file.
    fill_300_old_50_new(db)
    run, _ = archive(db, mode=ArchiveMode.ARCHIVE_FILE, batch_size=50, max_batches=1,
                     archive_file_rows=300)
    assert run.rows_affected == 50
    elsewhere = db.workdir / "elsewhere"
    parameters = audit_archival.ArchivalParameters(
        retention_days=RETENTION, mode=ArchiveMode.ARCHIVE_FILE, reference_time=T0,
        limits=BatchLimits(batch_size=50), archive_dir=elsewhere,
    )
    with pytest.raises(RunFailed) as failure:
        execute(db.engine, audit_archival.NAME, parameters, trigger="test",
                handle_signals=False)
    assert "voucher_audit_logs.run00000001.00001.jsonl.gz" in str(failure.value)
    assert "manifest is missing" in str(failure.value)
    assert not list(elsewhere.glob("*.jsonl.gz"))
    assert db.count(voucher_audit_logs) == 300


def add_rows_with_ids(db: Database, rows: list[tuple[int, object]]) -> None:
    with db.engine.begin() as connection:
        connection.execute(insert(voucher_audit_logs), [
            dict(id=row_id, voucher_id=1, action="UPDATED", actor_type="ADMIN", code="X",
                 metadata={"n": row_id}, created_at=moment)
            for row_id, moment in rows
        ])


@pytest.mark.parametrize("mode", list(ArchiveMode))
def test_shuffled_layout_removes_exactly_the_old_rows(db: Database, mode: ArchiveMode) -> None:
    # created_at unrelated to the ids: old and new rows alternate in id order,
    # and the highest and lowest ids are new rows that must stay.
    rows = [(i, CUTOFF - timedelta(minutes=i) if i % 3 else CUTOFF + timedelta(minutes=i))
            for i in range(1, 301)]
    add_rows_with_ids(db, rows)
    old = sorted(i for i, moment in rows if moment < CUTOFF)
    run, result = archive(db, mode=mode, batch_size=17, archive_file_rows=50)
    assert run.rows_affected == len(old) == 200
    live = db.rows(select(voucher_audit_logs.c.id).order_by(voucher_audit_logs.c.id))
    assert [row.id for row in live] == [i for i in range(1, 301) if i % 3 == 0]
    if mode is ArchiveMode.ARCHIVE_TABLE:
        assert [row.id for row in db.rows(select(audit_archive.c.id).order_by(audit_archive.c.id))] == old
    if mode is ArchiveMode.ARCHIVE_FILE:
        ids = [json.loads(line)["id"]
               for path in sorted((db.workdir / "archive").glob("*.jsonl.gz"))
               for line in gzip.decompress(path.read_bytes()).splitlines()]
        assert ids == old


@pytest.mark.parametrize("mode", list(ArchiveMode))
def test_sparse_ids_batch_by_rows(db: Database, mode: ArchiveMode) -> None:
    # Ids far apart, as time-based 64-bit ids are: a batch takes the next
    # rows, however wide their id range.
    add_rows_with_ids(db, [(i * 10**15, CUTOFF - timedelta(minutes=i)) for i in range(1, 101)])
    run, result = archive(db, mode=mode, batch_size=25, archive_file_rows=100)
    assert run.rows_affected == 100
    assert result.details["batches"] == 4
    assert db.count(voucher_audit_logs) == 0


def test_batches_grow_toward_their_time_target(db: Database) -> None:
    db.add_audit_rows([CUTOFF - timedelta(seconds=i + 1) for i in range(2000)])
    parameters = audit_archival.ArchivalParameters(
        retention_days=RETENTION, reference_time=T0,
        # A target far above what a batch of these rows takes: every batch
        # doubles the next one, 10, 20, 40, ... rows.
        limits=BatchLimits(batch_size=10, target_seconds=30.0),
    )
    run, result = execute(db.engine, audit_archival.NAME, parameters, trigger="test",
                          handle_signals=False)
    assert run.rows_affected == 2000
    # 10 + 20 + ... + 640 = 1270 rows in 7 batches, then 730 rows in one.
    assert result.details["batches"] == 8
    assert result.details["largest_batch_rows"] == 730
    assert result.details["batch_target_ms"] == 30_000
    assert result.details["longest_batch_ms"] > 0


def test_fixed_batches_without_a_target(db: Database) -> None:
    db.add_audit_rows([CUTOFF - timedelta(seconds=i + 1) for i in range(200)])
    run, result = archive(db, batch_size=10)
    assert result.details["batches"] == 20
    assert result.details["largest_batch_rows"] == 10
    assert result.details["batch_target_ms"] is None


@pytest.mark.parametrize("db", ["postgresql"], indirect=True)
def test_server_built_lines_match_python_lines(db: Database) -> None:
    # On PostgreSQL the server formats archive lines; they must hold the
    # same values as the lines Python writes on SQLite.
    from voucher_jobs.data.audit_batches import (
        Walk, copy_archive_lines, read_page, server_metadata_kind,
    )
    from voucher_jobs.jobs.archive_files import row_to_line

    tricky = [
        dict(voucher_id=None, action='QUOTE "x"', actor_type="ADMIN", code=None,
             metadata=None),
        dict(voucher_id=7, action="UPDATED", actor_type="USER", code="Zoë\\n\t€\x01\x02",
             metadata={"b": [1, 2.5, None, True], "a": {"nested": "ü\"\\\n"}, "": ""}),
        dict(voucher_id=2**40, action="REDEEMED", actor_type="SYSTEM", code="C-1",
             metadata={"n": 1}),
    ]
    with db.engine.begin() as connection:
        connection.execute(insert(voucher_audit_logs), [
            dict(row, created_at=CUTOFF - timedelta(days=i, microseconds=i * 123457))
            for i, row in enumerate(tricky, start=1)
        ])
        assert server_metadata_kind(connection) == "jsonb"
        walk = Walk(CUTOFF, 10**12)
        chunks: list[bytes] = []
        copy_archive_lines(connection, walk, 0, 10**12, "jsonb", chunks.append)
        server_lines = b"".join(chunks).splitlines()
        server = [json.loads(line) for line in server_lines]
        python = [json.loads(row_to_line(row)) for row in read_page(connection, walk, 0, 10)]
    assert len(server) == 3
    assert server == python


@pytest.mark.parametrize("db", ["postgresql"], indirect=True)
def test_json_column_archive_line(db: Database) -> None:
    # A json (not jsonb) column keeps the line breaks of the document it
    # was given; the archive line must still be a single line.
    from sqlalchemy import text

    from voucher_jobs.data.audit_batches import archive_line_sql

    with db.engine.connect() as connection:
        line = connection.execute(text(
            f"SELECT {archive_line_sql('json')} FROM (VALUES (1, 2, 'UPDATED', 'USER', 'C', "
            "CAST('{\"a\":\r\n  [1,\n 2], \"b\": \"x\\ny\"}' AS json), now())) AS "
            "voucher_audit_logs(id, voucher_id, action, actor_type, code, metadata, created_at)"
        )).scalar_one()
    assert "\n" not in line
    assert "\r" not in line
    assert json.loads(line)["metadata"] == {"a": [1, 2], "b": "x\ny"}


@pytest.mark.parametrize("db", ["postgresql"], indirect=True)
@pytest.mark.parametrize("mode", list(ArchiveMode))
def test_timestamp_without_time_zone_column(db: Database, mode: ArchiveMode) -> None:
    # Many ORMs create `timestamp(3) without time zone`; its values are UTC.
    from sqlalchemy import text

    with db.engine.begin() as connection:
        connection.execute(text(
            "ALTER TABLE voucher_audit_logs ALTER COLUMN created_at "
            "TYPE timestamp(3) without time zone USING created_at AT TIME ZONE 'UTC'"
        ))
    try:
        fill_300_old_50_new(db)
        run, _ = archive(db, mode=mode, batch_size=64, archive_file_rows=128)
    finally:
        # The tests share this database's tables: put the declared type back.
        with db.engine.begin() as connection:
            connection.execute(text(
                "ALTER TABLE voucher_audit_logs ALTER COLUMN created_at "
                "TYPE timestamp with time zone USING created_at AT TIME ZONE 'UTC'"
            ))
    assert run.status == "succeeded", run.error
    assert run.rows_affected == 300
    assert db.count(voucher_audit_logs) == 50
    if mode is ArchiveMode.ARCHIVE_FILE:
        lines = [json.loads(line)
                 for path in sorted((db.workdir / "archive").glob("*.jsonl.gz"))
                 for line in gzip.decompress(path.read_bytes()).splitlines()]
        assert lines[0]["created_at"] == (CUTOFF - timedelta(minutes=300)).strftime(
            "%Y-%m-%dT%H:%M:%S.%fZ")

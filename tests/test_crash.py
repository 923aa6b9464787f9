"""Runs killed with SIGKILL or stopped with SIGTERM in separate OS processes.

Every test starts `python -m voucher_jobs` as a child process, waits until
the run ledger shows its run in progress, then kills or stops it, and checks
what the database and the archive folder hold afterwards and after a rerun.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from tests.conftest import T0, Database
from tests.processes import (
    add_vouchers,
    finish,
    kill_hard,
    kill_leftovers,
    start_cli,
    wait_for_run,
    wait_until,
)
from voucher_jobs.data.schema import (
    archive_files,
    audit_archive,
    expirations,
    runs,
    voucher_audit_logs,
)

pytestmark = pytest.mark.slow

AT = "2026-12-04T10:00:00Z"
RETENTION_DAYS = 730
CUTOFF = T0 - timedelta(days=RETENTION_DAYS)
MODES = ("delete", "archive-table", "archive-file")

VOUCHERS = 500
OLD_ROWS = 1000
NEW_ROWS = 100
# Runs that get killed or stopped use small batches and a pause, so that
# they last a few seconds. Reruns use large batches to finish quickly.
BATCH_SIZE = 10
PAUSE = "0.05"
RERUN_BATCH_SIZE = 100
# A multiple of BATCH_SIZE, so every delete batch of a file is a full batch.
ARCHIVE_FILE_ROWS = 60

# SIGKILLs per archival mode. Each costs about 1.5 s: process start-up, the
# wait for its run to appear in the ledger and a random delay. Every batch of
# BATCH_SIZE rows is followed by a PAUSE, so a run removes at most about 170
# rows before it is killed, and the kills leave OLD_ROWS - 680 or more rows
# for the rerun.
KILLS_PER_MODE = 4
MAX_KILL_DELAY_SECONDS = 0.8
SEED = 20261204

logs = voucher_audit_logs


@pytest.fixture(autouse=True)
def leftover_processes() -> Iterator[None]:
    """Kill the children that a failing test left running."""
    yield
    kill_leftovers()


# --- voucher-expired -------------------------------------------------------


def add_expiry_vouchers(db: Database) -> list[int]:
    """Add VOUCHERS expired live vouchers and return their ids.

    Ten deleted vouchers and ten that expire after T0 are added too; no run
    may log them.
    """
    expired = add_vouchers(db, [T0 - timedelta(minutes=i) for i in range(VOUCHERS)])
    add_vouchers(db, [T0 - timedelta(days=1)] * 10, deleted_at=T0 - timedelta(hours=1),
                 prefix="D")
    add_vouchers(db, [T0 + timedelta(minutes=i + 1) for i in range(10)], prefix="F")
    return expired


def count_expired(db: Database) -> int:
    return db.count(logs, logs.c.action == "EXPIRED")


def expired_counts(db: Database) -> Counter[int]:
    rows = db.rows(select(logs.c.voucher_id).where(logs.c.action == "EXPIRED"))
    return Counter(row.voucher_id for row in rows)


def expiry_arguments(batch_size: int = BATCH_SIZE, pause: str = PAUSE) -> tuple[str, ...]:
    return ("run", "voucher-expired", "--at", AT, "--batch-size", str(batch_size),
            "--batch-target-ms", "0", "--pause", pause)


def expiry_rerun_arguments() -> tuple[str, ...]:
    return expiry_arguments(RERUN_BATCH_SIZE, "0")


def run_row(db: Database, run_id: int) -> Any:
    [row] = db.rows(select(runs).where(runs.c.id == run_id))
    return row


def newest_run(db: Database) -> Any:
    return db.rows(select(runs).order_by(runs.c.id.desc()).limit(1))[0]


def test_killed_expiry_run_is_resumed(db: Database) -> None:
    expired = add_expiry_vouchers(db)
    process = start_cli(db, *expiry_arguments())
    killed = wait_for_run(db, process)
    wait_until(lambda: count_expired(db) >= 100, "100 EXPIRED rows", process)
    kill_hard(process)

    written = count_expired(db)
    assert 100 <= written < VOUCHERS
    # Each batch commits its claims and audit rows together, so a kill
    # leaves whole batches only.
    assert written % BATCH_SIZE == 0
    assert db.count(expirations) == written
    assert run_row(db, killed.id).status == "running"

    result = db.cli(*expiry_rerun_arguments())
    assert result.returncode == 0, result.stderr
    rerun = newest_run(db)
    assert rerun.status == "succeeded"
    assert rerun.rows_affected == VOUCHERS - written
    assert f"run {rerun.id} succeeded" in result.stdout

    interrupted = run_row(db, killed.id)
    assert interrupted.status == "interrupted"
    assert interrupted.finished_at is not None
    assert "stopped without finishing" in interrupted.error
    assert expired_counts(db) == Counter(expired)


# --- audit-archival --------------------------------------------------------


def add_audit_rows(db: Database, old: int = OLD_ROWS, new: int = NEW_ROWS) -> None:
    """Add `old` rows before the cutoff and `new` rows at or after it."""
    before = [CUTOFF - timedelta(seconds=old - i) for i in range(old)]
    after = [CUTOFF + timedelta(seconds=i) for i in range(new)]
    db.add_audit_rows(before + after)


def all_rows(db: Database) -> dict[int, tuple[Any, ...]]:
    return {row.id: tuple(row) for row in db.rows(select(logs))}


def live_old_ids(db: Database) -> set[int]:
    return {row.id for row in db.rows(select(logs.c.id).where(logs.c.created_at < CUTOFF))}


def archival_arguments(db: Database, mode: str, batch_size: int = BATCH_SIZE,
                       pause: str = PAUSE) -> tuple[str, ...]:
    return (
        "run", "audit-archival", "--mode", mode, "--archive-dir", str(archive_dir(db)),
        "--at", AT, "--retention-days", str(RETENTION_DAYS),
        "--batch-size", str(batch_size), "--batch-target-ms", "0", "--pause", pause,
    )


def archival_rerun_arguments(db: Database, mode: str) -> tuple[str, ...]:
    return archival_arguments(db, mode, RERUN_BATCH_SIZE, "0")


def archival_env(db: Database) -> dict[str, str]:
    return db.env(VOUCHER_JOBS_ARCHIVE_FILE_ROWS=str(ARCHIVE_FILE_ROWS))


def archive_dir(db: Database) -> Path:
    return db.workdir / "archive"


def manifest_path(data_file: Path) -> Path:
    return data_file.with_name(data_file.name.removesuffix(".jsonl.gz") + ".manifest.json")


def read_archive_files(db: Database) -> dict[str, list[dict[str, Any]]]:
    """Read every data file that has a manifest, checking it against the manifest."""
    records = {}
    for data_file in sorted(archive_dir(db).glob("*.jsonl.gz")):
        if not manifest_path(data_file).exists():
            continue
        manifest = json.loads(manifest_path(data_file).read_text())
        content = gzip.decompress(data_file.read_bytes())
        lines = content.splitlines()
        assert manifest["file"] == data_file.name
        assert manifest["rows"] == len(lines), data_file.name
        assert manifest["sha256_uncompressed"] == hashlib.sha256(content).hexdigest()
        records[data_file.name] = [json.loads(line) for line in lines]
    return records


def archived_table_ids(db: Database) -> list[int]:
    return [row.id for row in db.rows(select(audit_archive.c.id))]


def check_nothing_lost(db: Database, mode: str, old_ids: set[int]) -> None:
    """Check the state a kill may leave: every old row is still live or archived."""
    live = live_old_ids(db)
    assert live <= old_ids
    if mode == "archive-table":
        archived = archived_table_ids(db)
        # The copy and the delete share a transaction: never both, never neither.
        assert live.isdisjoint(archived)
        assert live | set(archived) == old_ids
    elif mode == "archive-file":
        # A file's rows are deleted only after its manifest is written, so a
        # row may be live and archived at once, but never neither.
        in_files = {
            record["id"] for file in read_archive_files(db).values() for record in file
        }
        assert old_ids - live <= in_files


def check_archival_complete(
    db: Database, mode: str, before: dict[int, tuple[Any, ...]], old_ids: set[int]
) -> None:
    """Check that every old row went exactly once to the archive and new rows stayed."""
    assert live_old_ids(db) == set()
    after = all_rows(db)
    assert after == {row_id: row for row_id, row in before.items() if row_id not in old_ids}
    assert len(after) == len(before) - len(old_ids)
    assert list(archive_dir(db).rglob("*.tmp")) == []

    if mode != "archive-table":
        assert archived_table_ids(db) == []
    if mode != "archive-file":
        assert not archive_dir(db).exists()
    if mode == "archive-table":
        archived = db.rows(select(audit_archive))
        assert len(archived) == len(old_ids)
        assert {row.id for row in archived} == old_ids
        assert [tuple(row)[:7] for row in archived if tuple(row)[:7] != before[row.id]] == []
    if mode == "archive-file":
        check_archive_files(db, before, old_ids)


def check_archive_files(
    db: Database, before: dict[int, tuple[Any, ...]], old_ids: set[int]
) -> None:
    data_files = sorted(path.name for path in archive_dir(db).glob("*.jsonl.gz"))
    manifests = sorted(path.name for path in archive_dir(db).glob("*.manifest.json"))
    assert manifests == [
        name.removesuffix(".jsonl.gz") + ".manifest.json" for name in data_files
    ]
    files = read_archive_files(db)
    assert sorted(files) == data_files

    ids = Counter(record["id"] for records in files.values() for record in records)
    assert set(ids) == old_ids
    assert [row_id for row_id, count in ids.items() if count > 1] == []

    changed = []
    for records in files.values():
        for record in records:
            original = before[record["id"]]
            archived = (
                record["voucher_id"], record["action"], record["actor_type"], record["code"],
                record["metadata"], datetime.fromisoformat(record["created_at"]),
            )
            if archived != original[1:]:
                changed.append(record["id"])
    assert changed == []

    registered = db.rows(select(archive_files))
    assert sorted(row.name for row in registered) == data_files
    assert {row.status for row in registered} == {"complete"}
    assert {row.name: row.row_count for row in registered} == {
        name: len(records) for name, records in files.items()
    }


@pytest.mark.parametrize("mode", MODES)
def test_archival_survives_kills(db: Database, mode: str) -> None:
    add_audit_rows(db)
    before = all_rows(db)
    old_ids = live_old_ids(db)
    assert len(old_ids) == OLD_ROWS
    env = archival_env(db)
    delays = random.Random(SEED + MODES.index(mode))

    killed = []
    for _ in range(KILLS_PER_MODE):
        process = start_cli(db, *archival_arguments(db, mode), env=env)
        killed.append(wait_for_run(db, process).id)
        time.sleep(delays.uniform(0, MAX_KILL_DELAY_SECONDS))
        kill_hard(process)
        check_nothing_lost(db, mode, old_ids)

    remaining = len(live_old_ids(db))
    # The kills stopped every run before it finished.
    assert remaining > 0
    result = db.cli(*archival_rerun_arguments(db, mode), env=env)
    assert result.returncode == 0, result.stderr
    final = newest_run(db)
    assert final.status == "succeeded"
    assert final.rows_affected == remaining
    killed_rows = [run_row(db, run_id) for run_id in killed]
    assert [row.status for row in killed_rows] == ["interrupted"] * KILLS_PER_MODE
    errors = [row.error or "" for row in killed_rows]
    assert [error for error in errors if "stopped without finishing" not in error] == []
    check_archival_complete(db, mode, before, old_ids)


# --- SIGTERM ---------------------------------------------------------------


def test_sigterm_stops_expiry_after_batch(db: Database) -> None:
    expired = add_expiry_vouchers(db)
    process = start_cli(db, *expiry_arguments())
    stopped = wait_for_run(db, process)
    wait_until(lambda: count_expired(db) >= 50, "50 EXPIRED rows", process)
    os.kill(process.pid, signal.SIGTERM)
    code, stdout, stderr = finish(process, timeout=30)
    assert code == 5, stderr

    written = count_expired(db)
    assert 50 <= written < VOUCHERS
    assert written % BATCH_SIZE == 0
    row = run_row(db, stopped.id)
    assert row.status == "interrupted"
    assert row.error == "stopped by SIGTERM"
    assert row.rows_affected == written
    assert f"run {stopped.id} interrupted" in stdout

    result = db.cli(*expiry_rerun_arguments())
    assert result.returncode == 0, result.stderr
    assert newest_run(db).rows_affected == VOUCHERS - written
    assert expired_counts(db) == Counter(expired)


# archive-table mode stops in the same loop as delete mode, so it is left out
# to save time. test_archival_survives_kills covers its batches.
@pytest.mark.parametrize("mode", ["delete", "archive-file"])
def test_sigterm_stops_archival_after_batch(db: Database, mode: str) -> None:
    add_audit_rows(db, old=300, new=50)
    before = all_rows(db)
    old_ids = live_old_ids(db)
    env = archival_env(db)
    process = start_cli(db, *archival_arguments(db, mode), env=env)
    stopped = wait_for_run(db, process)
    wait_until(lambda: len(live_old_ids(db)) <= 250, "50 rows removed", process)
    os.kill(process.pid, signal.SIGTERM)
    code, stdout, stderr = finish(process, timeout=30)
    assert code == 5, stderr

    removed = len(old_ids) - len(live_old_ids(db))
    assert 50 <= removed < len(old_ids)
    assert removed % BATCH_SIZE == 0
    row = run_row(db, stopped.id)
    assert row.status == "interrupted"
    assert row.error == "stopped by SIGTERM"
    assert row.rows_affected == removed
    assert list(archive_dir(db).rglob("*.tmp")) == []
    check_nothing_lost(db, mode, old_ids)

    result = db.cli(*archival_rerun_arguments(db, mode), env=env)
    assert result.returncode == 0, result.stderr
    assert newest_run(db).rows_affected == len(old_ids) - removed
    check_archival_complete(db, mode, before, old_ids)


@pytest.mark.parametrize("job", ["voucher-expired", "audit-archival"])
def test_sigterm_during_pause_exits_promptly(db: Database, job: str) -> None:
    # A long pause: the signal arrives while the run sleeps after its first
    # batch, and must end the run without waiting out the pause.
    if job == "voucher-expired":
        add_expiry_vouchers(db)
        arguments = expiry_arguments(pause="60")

        def done() -> int:
            return count_expired(db)
    else:
        add_audit_rows(db, old=100, new=10)
        arguments = archival_arguments(db, "delete", pause="60")

        def done() -> int:
            return 100 - len(live_old_ids(db))

    process = start_cli(db, *arguments)
    stopped = wait_for_run(db, process)
    wait_until(lambda: done() >= BATCH_SIZE, "the first batch", process)
    signalled = time.monotonic()
    os.kill(process.pid, signal.SIGTERM)
    code, _, stderr = finish(process, timeout=90)
    elapsed = time.monotonic() - signalled

    assert code == 5, stderr
    # The bound is far below the 60 s pause, and its margin covers process
    # exit on a busy host.
    assert elapsed < 10
    # No batch started after the signal.
    assert done() == BATCH_SIZE
    row = run_row(db, stopped.id)
    assert row.status == "interrupted"
    assert row.rows_affected == BATCH_SIZE

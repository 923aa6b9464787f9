"""audit-archival on a voucher_audit_logs partitioned by range of created_at (PostgreSQL).

Every test gets a schema of its own in the suite's PostgreSQL database, and
a DATABASE_URL whose `schema` parameter points the search_path at it, so its
partitioned table does not replace the plain one of the other tests. The
tests fail, not skip, without PostgreSQL when CI=true. The layout
below has partitions wholly before the cutoff (one bounded by MINVALUE),
one that contains the cutoff, one after it, a gap before the cutoff whose
rows go to the DEFAULT partition, and the DEFAULT partition itself.
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.engine import make_url

from reliability.invariants import Tally, check_archival, check_runs_interrupted, snapshot
from tests.conftest import T0, Database
from tests.processes import finish, kill_hard, kill_leftovers, start_cli, wait_for_run, wait_until
from voucher_jobs.config import ArchiveMode
from voucher_jobs.data import migrate, partitions
from voucher_jobs.data.engine import create_db_engine
from voucher_jobs.data.schema import archive_files, audit_archive, runs, voucher_audit_logs
from voucher_jobs.jobs import audit_archival
from voucher_jobs.jobs.base import BatchLimits, JobContext

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "deploy" / "postgresql" / "partition_audit_logs.sql"
ADD_SCRIPT = ROOT / "deploy" / "postgresql" / "add_audit_log_partitions.sql"
AT = "2026-12-04T10:00:00Z"
RETENTION = 730
CUTOFF = T0 - timedelta(days=RETENTION)
assert CUTOFF == datetime(2024, 12, 4, 10, tzinfo=timezone.utc)
logs = voucher_audit_logs


def utc(*fields: int) -> datetime:
    return datetime(*fields, tzinfo=timezone.utc)


PARENT = """
CREATE TABLE voucher_audit_logs (
    id bigserial,
    voucher_id bigint,
    action varchar(32) NOT NULL,
    actor_type varchar(32) NOT NULL,
    code varchar(64),
    metadata jsonb,
    created_at timestamptz NOT NULL DEFAULT statement_timestamp(),
    PRIMARY KEY (id, created_at)
) PARTITION BY RANGE (created_at);
"""

LAYOUT = PARENT + """
CREATE TABLE voucher_audit_logs_before_2024_09 PARTITION OF voucher_audit_logs
    FOR VALUES FROM (MINVALUE) TO ('2024-09-01 00:00:00+00');
CREATE TABLE voucher_audit_logs_p2024_10 PARTITION OF voucher_audit_logs
    FOR VALUES FROM ('2024-10-01 00:00:00+00') TO ('2024-11-01 00:00:00+00');
CREATE TABLE voucher_audit_logs_p2024_11 PARTITION OF voucher_audit_logs
    FOR VALUES FROM ('2024-11-01 00:00:00+00') TO ('2024-12-01 00:00:00+00');
CREATE TABLE voucher_audit_logs_p2024_12 PARTITION OF voucher_audit_logs
    FOR VALUES FROM ('2024-12-01 00:00:00+00') TO ('2025-01-01 00:00:00+00');
CREATE TABLE voucher_audit_logs_p2025 PARTITION OF voucher_audit_logs
    FOR VALUES FROM ('2025-01-01 00:00:00+00') TO ('2026-01-01 00:00:00+00');
CREATE TABLE voucher_audit_logs_default PARTITION OF voucher_audit_logs DEFAULT;
"""

# Rows per partition: (partition, created_at values). The DEFAULT partition
# gets old rows from the September 2024 gap and new rows from 2026.
ROWS = {
    "voucher_audit_logs_before_2024_09": [utc(2024, 6, 1) + timedelta(hours=i) for i in range(30)],
    "voucher_audit_logs_p2024_10": [utc(2024, 10, 2) + timedelta(hours=i) for i in range(40)],
    "voucher_audit_logs_p2024_11": [utc(2024, 11, 2) + timedelta(hours=i) for i in range(50)],
    "voucher_audit_logs_p2024_12": (
        [CUTOFF - timedelta(minutes=20 - i) for i in range(20)]
        + [CUTOFF + timedelta(minutes=i) for i in range(10)]
    ),
    "voucher_audit_logs_p2025": [utc(2025, 3, 1) + timedelta(days=i) for i in range(15)],
    "voucher_audit_logs_default": (
        [utc(2024, 9, 10) + timedelta(hours=i) for i in range(12)]
        + [utc(2026, 6, 1) + timedelta(hours=i) for i in range(8)]
    ),
}
RETIRED = ["voucher_audit_logs_before_2024_09", "voucher_audit_logs_p2024_10",
           "voucher_audit_logs_p2024_11"]
RETIRED_ROWS = 30 + 40 + 50
# The 20 old rows of the partition that contains the cutoff, and the 12 of
# the DEFAULT partition.
BATCHED_ROWS = 20 + 12
KEPT = ["voucher_audit_logs_default", "voucher_audit_logs_p2024_12", "voucher_audit_logs_p2025"]
NEW_ROWS = 10 + 15 + 8


@pytest.fixture(autouse=True)
def leftover_processes() -> Iterator[None]:
    yield
    kill_leftovers()


_schema_numbers = itertools.count(1)


@pytest.fixture
def schema_url(postgres_url: str) -> Iterator[str]:
    """The URL of a new, empty schema in the suite's database, dropped after the test."""
    name = f"partitions_{os.getpid()}_{next(_schema_numbers)}"
    admin = create_db_engine(postgres_url)
    with admin.begin() as connection:
        connection.execute(text(f"DROP SCHEMA IF EXISTS {name} CASCADE"))
        connection.execute(text(f"CREATE SCHEMA {name}"))
    try:
        url = make_url(postgres_url).update_query_dict({"schema": name})
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as connection:
            connection.execute(text(f"DROP SCHEMA {name} CASCADE"))
        admin.dispose()


@pytest.fixture
def db(schema_url: str, tmp_path: Path) -> Iterator[Database]:
    """A schema whose voucher_audit_logs is partitioned as LAYOUT says, migrated and filled.

    The table has none of the indexes voucher-jobs adds, so `db upgrade`
    builds them on the partitioned table, as on a backend's own table.
    """
    engine = create_db_engine(schema_url)
    with engine.begin() as connection:
        connection.execute(text(LAYOUT))
    migrate.upgrade(engine)
    database = Database("postgresql", schema_url, engine, tmp_path)
    moments = [moment for values in ROWS.values() for moment in values]
    # Shuffled, so that ids do not rise with created_at.
    random.Random(20261204).shuffle(moments)
    database.add_audit_rows(moments)
    yield database
    engine.dispose()


def partition_rows(db: Database) -> dict[str, int]:
    """Return the rows of every partition by name."""
    with db.engine.connect() as connection:
        layout = partitions.read_layout(connection)
        assert layout is not None
        return {partition.name: partitions.count_rows(connection, partition)
                for partition in layout.partitions}


def schema_of(db: Database) -> str:
    return make_url(db.url).query["schema"]


def detached_tables(db: Database) -> list[str]:
    """Return the tables that retirement detached and has not dropped."""
    with db.engine.connect() as connection:
        return list(connection.execute(text(
            "SELECT relname FROM pg_class WHERE relname LIKE 'voucher_jobs_detached_%' "
            "AND relkind = 'r' AND relnamespace = current_schema()::regnamespace "
            "ORDER BY relname"
        )).scalars())


def parameters(db: Database, mode: ArchiveMode, *, at: datetime = T0, dry_run: bool = False,
               batch_size: int = 7, archive_file_rows: int = 25,
               partition_lock_timeout_seconds: float = 2.0):
    return audit_archival.ArchivalParameters(
        retention_days=RETENTION, mode=mode, reference_time=at, dry_run=dry_run,
        limits=BatchLimits(batch_size=batch_size), archive_dir=db.workdir / "archive",
        archive_file_rows=archive_file_rows,
        partition_lock_timeout_seconds=partition_lock_timeout_seconds,
    )


class Events:
    """The events a run logs through its JobContext."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))

    def named(self, event: str) -> list[dict[str, Any]]:
        return [fields for name, fields in self.events if name == event]


def run_archival(db: Database, mode: ArchiveMode, run_id: int = 1, **options: Any):
    events = Events()
    result = audit_archival.run(db.engine, parameters(db, mode, **options),
                                JobContext(run_id=run_id, log=events))
    return result, events


def check_invariants(db: Database, mode: ArchiveMode, before: dict[int, tuple[Any, ...]],
                     *, complete: bool) -> None:
    tally = Tally()
    check_archival(db, mode.value, before, db.workdir / "archive", tally, complete=complete)
    assert tally.violations == []


# --- retiring whole partitions ----------------------------------------------


@pytest.mark.parametrize("mode", list(ArchiveMode))
def test_retires_old_partitions_and_batches_rest(db: Database, mode: ArchiveMode) -> None:
    before = snapshot(db)
    new_rows = {row_id: row for row_id, row in before.items() if row[6] >= CUTOFF}

    result, events = run_archival(db, mode)

    assert result.rows_affected == RETIRED_ROWS + BATCHED_ROWS
    assert [entry["name"] for entry in result.details["partitions_retired"]] == RETIRED
    assert [entry["rows"] for entry in result.details["partitions_retired"]] == [30, 40, 50]
    assert result.details["partition_rows_retired"] == RETIRED_ROWS
    assert result.details["partitions_skipped"] == []
    assert sorted(partition_rows(db)) == KEPT
    assert partition_rows(db) == {"voucher_audit_logs_default": 8,
                                  "voucher_audit_logs_p2024_12": 10,
                                  "voucher_audit_logs_p2025": 15}
    assert snapshot(db) == new_rows
    retired_events = events.named("partition_retired")
    assert [fields["partition"] for fields in retired_events] == RETIRED
    assert all(fields["mode"] == mode.value for fields in retired_events)
    assert all(fields["detach_ms"] >= 0 for fields in retired_events)
    assert all(fields["drop_ms"] >= 0 for fields in retired_events)
    assert detached_tables(db) == []
    check_invariants(db, mode, before, complete=True)
    if mode is ArchiveMode.ARCHIVE_TABLE:
        assert db.count(audit_archive) == RETIRED_ROWS + BATCHED_ROWS
    if mode is ArchiveMode.ARCHIVE_FILE:
        statuses = db.rows(select(archive_files.c.status, archive_files.c.row_count))
        assert {row.status for row in statuses} == {"complete"}
        assert sum(row.row_count for row in statuses) == RETIRED_ROWS + BATCHED_ROWS


def test_second_run_finds_nothing(db: Database) -> None:
    run_archival(db, ArchiveMode.ARCHIVE_TABLE)
    result, events = run_archival(db, ArchiveMode.ARCHIVE_TABLE, run_id=2)
    assert result.rows_affected == 0
    assert result.details["partitions_retired"] == []
    assert events.named("partition_retired") == []
    assert sorted(partition_rows(db)) == KEPT


@pytest.mark.parametrize(("at", "retired", "batched"), [
    # Cutoff 2024-12-01T00:00Z: the upper bound of p2024_11 equals it.
    (utc(2026, 12, 1), RETIRED, 12),
    # One microsecond earlier, p2024_11 holds a moment that is not old yet.
    (utc(2026, 12, 1) - timedelta(microseconds=1), RETIRED[:2], 50 + 12),
])
def test_partition_retired_only_when_wholly_old(db: Database, at: datetime, retired: list[str],
                                                 batched: int) -> None:
    result, _ = run_archival(db, ArchiveMode.DELETE, at=at)
    assert [entry["name"] for entry in result.details["partitions_retired"]] == retired
    assert result.rows_affected == sum(len(ROWS[name]) for name in retired) + batched
    assert "voucher_audit_logs_p2024_12" in partition_rows(db)


def test_default_partition_kept_even_when_all_old(db: Database) -> None:
    # Ten years on, every row of every partition is old, those of the
    # DEFAULT partition too. Everything bounded goes whole; the DEFAULT
    # partition stays, emptied by the batches.
    result, _ = run_archival(db, ArchiveMode.DELETE, at=utc(2036, 1, 1))
    retired = [entry["name"] for entry in result.details["partitions_retired"]]
    assert retired == [*RETIRED, "voucher_audit_logs_p2024_12", "voucher_audit_logs_p2025"]
    assert partition_rows(db) == {"voucher_audit_logs_default": 0}
    assert result.rows_affected == sum(len(values) for values in ROWS.values())


def test_detached_table_left_by_crash_is_dropped(db: Database) -> None:
    # A crash between the commit of DETACH and the DROP leaves the detached,
    # marked table; the next run drops it, and only tables so marked.
    with db.engine.connect() as connection:
        layout = partitions.read_layout(connection)
    assert layout is not None
    [oldest] = [p for p in layout.partitions if p.name == RETIRED[0]]
    retired = partitions.retire_partition(
        db.engine, layout.qualified_name, oldest, lambda connection: 0, 1.0,
    )
    assert retired is not None
    assert retired.drop_error is None
    assert retired.detached_as == f"{schema_of(db)}.voucher_jobs_detached_{oldest.oid}"
    # The state a crash before the DROP leaves: the detached, marked table.
    with db.engine.begin() as connection:
        connection.execute(text(
            f"CREATE TABLE {retired.detached_as} (LIKE voucher_audit_logs INCLUDING ALL)"))
        connection.execute(text(
            f"COMMENT ON TABLE {retired.detached_as} IS "
            f"'{partitions.DETACHED_COMMENT}{layout.qualified_name} ({oldest.name})'"))
        connection.execute(text(
            "CREATE TABLE voucher_jobs_detached_1 (id bigint)"))
    assert set(detached_tables(db)) == {f"voucher_jobs_detached_{oldest.oid}",
                                        "voucher_jobs_detached_1"}

    _, events = run_archival(db, ArchiveMode.DELETE)
    dropped = [fields["table"] for fields in events.named("detached_partition_dropped")]
    assert dropped == [retired.detached_as]
    # The unmarked table is not voucher-jobs' to drop.
    assert detached_tables(db) == ["voucher_jobs_detached_1"]


def test_view_keeps_detached_table(db: Database) -> None:
    # A view on a partition does not stop DETACH, but it stops the DROP:
    # the rows leave voucher_audit_logs, and the detached table stays until
    # a run can drop it.
    with db.engine.begin() as connection:
        connection.execute(text(
            "CREATE VIEW october AS SELECT * FROM voucher_audit_logs_p2024_10"))
    result, events = run_archival(db, ArchiveMode.DELETE)
    assert result.rows_affected == RETIRED_ROWS + BATCHED_ROWS
    [failed] = events.named("detached_partition_drop_failed")
    assert "depend" in failed["error"]
    [left] = detached_tables(db)
    assert failed["table"] == f"{schema_of(db)}.{left}"
    assert sorted(partition_rows(db)) == KEPT

    _, events = run_archival(db, ArchiveMode.DELETE, run_id=2)
    assert len(events.named("detached_partition_drop_failed")) == 1
    with db.engine.begin() as connection:
        connection.execute(text("DROP VIEW october"))
    _, events = run_archival(db, ArchiveMode.DELETE, run_id=3)
    assert [fields["table"] for fields in events.named("detached_partition_dropped")] == [
        f"{schema_of(db)}.{left}"]
    assert detached_tables(db) == []


def test_subpartitioned_partition_retired(schema_url: str, tmp_path: Path) -> None:
    # A partition that is partitioned itself: `db upgrade` builds the index
    # tree on both levels, and the whole year goes at once.
    engine = create_db_engine(schema_url)
    with engine.begin() as connection:
        connection.execute(text(PARENT + """
            CREATE TABLE voucher_audit_logs_2024 PARTITION OF voucher_audit_logs
                FOR VALUES FROM ('2024-01-01 00:00:00+00') TO ('2025-01-01 00:00:00+00')
                PARTITION BY RANGE (created_at);
            CREATE TABLE voucher_audit_logs_2024_h1 PARTITION OF voucher_audit_logs_2024
                FOR VALUES FROM ('2024-01-01 00:00:00+00') TO ('2024-07-01 00:00:00+00');
            CREATE TABLE voucher_audit_logs_2024_h2 PARTITION OF voucher_audit_logs_2024
                FOR VALUES FROM ('2024-07-01 00:00:00+00') TO ('2025-01-01 00:00:00+00');
            CREATE TABLE voucher_audit_logs_default PARTITION OF voucher_audit_logs DEFAULT;
        """))
    migrate.upgrade(engine)
    db = Database("postgresql", schema_url, engine, tmp_path)
    with engine.connect() as connection:
        invalid = connection.execute(text(
            "SELECT count(*) FROM pg_index AS x JOIN pg_class AS c ON c.oid = x.indexrelid "
            "WHERE c.relnamespace = current_schema()::regnamespace AND NOT x.indisvalid"
        )).scalar_one()
        indexed = connection.execute(text(
            "SELECT count(*) FROM pg_indexes WHERE schemaname = current_schema() "
            "AND tablename = 'voucher_audit_logs_2024_h2' AND indexdef LIKE '%(created_at, id)'"
        )).scalar_one()
    assert invalid == 0
    assert indexed == 1
    db.add_audit_rows([utc(2024, 3, 1), utc(2024, 9, 1), utc(2024, 12, 31), utc(2025, 6, 1)])
    before = snapshot(db)

    result, _ = run_archival(db, ArchiveMode.ARCHIVE_TABLE, at=utc(2027, 1, 2))
    assert [entry["name"] for entry in result.details["partitions_retired"]] == [
        "voucher_audit_logs_2024"]
    assert result.rows_affected == 3
    assert partition_rows(db) == {"voucher_audit_logs_default": 1}
    assert db.count(audit_archive) == 3
    archived = db.rows(select(audit_archive).order_by(audit_archive.c.id))
    old_rows = [before[row_id] for row_id in sorted(before) if before[row_id][6] < utc(2025, 1, 1)]
    assert [tuple(row)[:7] for row in archived] == old_rows
    engine.dispose()


def test_dry_run_lists_partitions(db: Database) -> None:
    before = snapshot(db)
    result, events = run_archival(db, ArchiveMode.DELETE, dry_run=True)
    planned = result.details["partitions_to_retire"]
    assert [entry["name"] for entry in planned] == RETIRED
    assert [entry["rows"] for entry in planned] == [30, 40, 50]
    assert planned[0]["from"] == "MINVALUE"
    assert planned[0]["to"] == "2024-09-01T00:00:00+00:00"
    assert planned[2]["to"] == "2024-12-01T00:00:00+00:00"
    assert events.named("partitions_to_retire")[0]["rows"] == RETIRED_ROWS
    assert snapshot(db) == before
    assert len(partition_rows(db)) == 6


def test_dry_run_cli_names_partitions(db: Database) -> None:
    completed = db.cli("run", "audit-archival", "--dry-run", "--at", AT)
    assert completed.returncode == 0, completed.stderr
    assert ("3 whole partitions would be retired: voucher_audit_logs_before_2024_09 (30 rows), "
            "voucher_audit_logs_p2024_10 (40 rows), voucher_audit_logs_p2024_11 (50 rows)"
            in completed.stdout)
    assert len(partition_rows(db)) == 6


def test_archive_table_reuses_equal_copies(db: Database) -> None:
    # An earlier copy of some rows in the archive, equal to the live rows,
    # is kept, and the partition is retired anyway.
    with db.engine.begin() as connection:
        connection.execute(text(
            "INSERT INTO voucher_jobs_audit_archive "
            "SELECT *, now(), 99 FROM voucher_audit_logs_p2024_10 ORDER BY id LIMIT 5"))
    before = snapshot(db)
    result, events = run_archival(db, ArchiveMode.ARCHIVE_TABLE)
    assert result.details["partition_rows_retired"] == RETIRED_ROWS
    [p2024_10] = [fields for fields in events.named("partition_retired")
                  if fields["partition"] == "voucher_audit_logs_p2024_10"]
    assert p2024_10["already_archived"] == 5
    assert db.count(audit_archive) == RETIRED_ROWS + BATCHED_ROWS
    check_invariants(db, ArchiveMode.ARCHIVE_TABLE, before, complete=True)


def test_archive_table_rejects_differing_copy(db: Database) -> None:
    with db.engine.begin() as connection:
        connection.execute(text(
            "INSERT INTO voucher_jobs_audit_archive "
            "SELECT id, voucher_id, 'CHANGED', actor_type, code, metadata, created_at, now(), 99 "
            "FROM voucher_audit_logs_p2024_10 ORDER BY id LIMIT 1"))
    rows_before = partition_rows(db)
    with pytest.raises(partitions.PartitionArchiveConflict, match="p2024_10"):
        run_archival(db, ArchiveMode.ARCHIVE_TABLE)
    # The oldest partition went; the conflicting one is untouched, and none
    # of its rows was copied.
    after = partition_rows(db)
    assert "voucher_audit_logs_before_2024_09" not in after
    assert after["voucher_audit_logs_p2024_10"] == rows_before["voucher_audit_logs_p2024_10"]
    assert db.count(audit_archive) == 30 + 1


def test_archive_table_with_enum_columns(db: Database) -> None:
    # Backends often declare action as an enum; the archive column is text.
    with db.engine.begin() as connection:
        actions = connection.execute(text(
            "SELECT DISTINCT action FROM voucher_audit_logs ORDER BY 1")).scalars().all()
        labels = ", ".join("'" + action + "'" for action in actions)
        connection.execute(text(f"CREATE TYPE audit_action AS ENUM ({labels})"))
        connection.execute(text(
            "ALTER TABLE voucher_audit_logs ALTER COLUMN action TYPE audit_action "
            "USING action::audit_action"))
    before = snapshot(db)
    result, _ = run_archival(db, ArchiveMode.ARCHIVE_TABLE)
    assert result.details["partition_rows_retired"] == RETIRED_ROWS
    assert db.count(audit_archive) == RETIRED_ROWS + BATCHED_ROWS
    check_invariants(db, ArchiveMode.ARCHIVE_TABLE, before, complete=True)


# --- lock timeout -------------------------------------------------------------


@pytest.fixture
def parent_locked(db: Database) -> Iterator[Any]:
    """Hold ACCESS SHARE on voucher_audit_logs, as a long query does, until the test ends."""
    engine = create_db_engine(db.url)
    connection = engine.connect()
    connection.execute(text("LOCK TABLE voucher_audit_logs IN ACCESS SHARE MODE"))
    yield connection
    connection.rollback()
    connection.close()
    engine.dispose()


@pytest.mark.parametrize("mode", list(ArchiveMode))
def test_lock_timeout_skips_and_batches(db: Database, mode: ArchiveMode, parent_locked: Any
                                        ) -> None:
    before = snapshot(db)

    started = time.monotonic()
    result, events = run_archival(db, mode, partition_lock_timeout_seconds=0.2)
    seconds = time.monotonic() - started

    # One wait of 0.2 s, then the batches remove every old row.
    assert seconds < 10
    assert result.rows_affected == RETIRED_ROWS + BATCHED_ROWS
    assert result.details["partitions_retired"] == []
    [skipped] = events.named("partition_retire_skipped")
    assert skipped["partition"] == "voucher_audit_logs_before_2024_09"
    assert skipped["reason"] == "lock_timeout"
    assert skipped["lock_timeout_ms"] == 200
    assert "lock timeout" in skipped["error"]
    assert skipped["not_tried"] == "voucher_audit_logs_p2024_10,voucher_audit_logs_p2024_11"
    assert result.details["partitions_skipped"][0]["reason"] == "lock_timeout"
    # Every partition is still attached, the old ones now empty.
    rows = partition_rows(db)
    assert sorted(rows) == sorted([*RETIRED, *KEPT])
    assert [rows[name] for name in RETIRED] == [0, 0, 0]
    check_invariants(db, mode, before, complete=True)

    # Once the lock is gone, the next run drops the empty partitions.
    parent_locked.rollback()
    result, _ = run_archival(db, mode, run_id=2)
    assert [entry["rows"] for entry in result.details["partitions_retired"]] == [0, 0, 0]
    assert sorted(partition_rows(db)) == KEPT
    check_invariants(db, mode, before, complete=True)


# --- crashes ----------------------------------------------------------------


def detach_waiting(db: Database, pid: int) -> bool:
    """Whether a backend of this database waits for a lock in DETACH PARTITION."""
    with db.engine.connect() as connection:
        return bool(connection.execute(text(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() "
            "AND wait_event_type = 'Lock' AND query LIKE '%DETACH PARTITION%'"
        )).scalar_one())


def detach_gone(db: Database) -> bool:
    with db.engine.connect() as connection:
        return not connection.execute(text(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND query LIKE '%DETACH PARTITION%' "
            "AND pid <> pg_backend_pid()"
        )).scalar_one()


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "drop_before_rerun"), [
    (ArchiveMode.DELETE, False),
    (ArchiveMode.ARCHIVE_TABLE, False),
    (ArchiveMode.ARCHIVE_FILE, False),
    (ArchiveMode.ARCHIVE_FILE, True),
])
def test_kill_between_copy_and_drop(db: Database, mode: ArchiveMode, drop_before_rerun: bool,
                                    parent_locked: Any) -> None:
    before = snapshot(db)
    archive = db.workdir / "archive"
    arguments = ("run", "audit-archival", "--mode", mode.value, "--at", AT,
                 "--archive-dir", str(archive), "--batch-size", "7")
    # The test's ACCESS SHARE lock holds the run in DETACH, after its copy.
    process = start_cli(db, *arguments,
                        env=db.env(VOUCHER_JOBS_PARTITION_LOCK_TIMEOUT_SECONDS="60",
                                   VOUCHER_JOBS_ARCHIVE_FILE_ROWS="25"))
    killed = wait_for_run(db, process)
    wait_until(lambda: detach_waiting(db, process.pid), "the run waiting in DETACH", process)
    kill_hard(process)

    # The orphaned backend gets the lock once the test lets go, then finds
    # its client gone and rolls back.
    parent_locked.rollback()
    wait_until(lambda: detach_gone(db), "the killed run's backend to end")
    check_invariants(db, mode, before, complete=False)
    assert partition_rows(db) == {name: len(values) for name, values in ROWS.items()}
    if mode is ArchiveMode.ARCHIVE_TABLE:
        assert db.count(audit_archive) == 0
    if mode is ArchiveMode.ARCHIVE_FILE:
        statuses = db.rows(select(archive_files.c.name, archive_files.c.status))
        assert [row.status for row in statuses] == ["exported", "exported"]
    if drop_before_rerun:
        # The partition is gone before the repair runs, as when an operator
        # dropped it: the repair finds none of the file's rows and completes it.
        with db.engine.begin() as connection:
            connection.execute(text("DROP TABLE voucher_audit_logs_before_2024_09"))

    completed = db.cli(*arguments)
    assert completed.returncode == 0, completed.stderr
    assert "whole partitions retired: " in completed.stdout
    assert "voucher_audit_logs_p2024_10 (40 rows)" in completed.stdout
    check_invariants(db, mode, before, complete=True)
    assert sorted(partition_rows(db)) == KEPT
    tally = Tally()
    check_runs_interrupted(db, [killed.id], tally)
    assert tally.violations == []
    [rerun] = db.rows(select(runs).where(runs.c.id > killed.id))
    assert rerun.status == "succeeded"
    if mode is ArchiveMode.ARCHIVE_TABLE:
        assert db.count(audit_archive) == RETIRED_ROWS + BATCHED_ROWS
    if mode is ArchiveMode.ARCHIVE_FILE:
        statuses = db.rows(select(archive_files.c.status))
        assert {row.status for row in statuses} == {"complete"}
        # The killed run's files hold the oldest partition's 30 rows once.
        files = sorted(path.name for path in archive.glob("*.jsonl.gz"))
        assert files[:2] == [f"voucher_audit_logs.run{killed.id:08d}.00001.jsonl.gz",
                             f"voucher_audit_logs.run{killed.id:08d}.00002.jsonl.gz"]


# --- the conversion script ----------------------------------------------------


def psql(url: str, *variables: str, script: Path = SCRIPT) -> subprocess.CompletedProcess[str]:
    """Run a script with psql in the URL's schema; the test fails when psql is missing."""
    executable = shutil.which("psql")
    assert executable, f"psql is needed to run {script.relative_to(ROOT)}"
    parsed = make_url(url)
    schema = parsed.query["schema"]
    libpq_url = parsed.set(drivername="postgresql", query={}).render_as_string(
        hide_password=False)
    arguments = [executable, libpq_url, "-X", "-q", "-v", "ON_ERROR_STOP=1"]
    for variable in variables:
        arguments += ["-v", variable]
    environment = {**os.environ, "PGOPTIONS": f"-c search_path={schema}"}
    return subprocess.run([*arguments, "-f", str(script)], capture_output=True, text=True,
                          timeout=120, env=environment)


@pytest.fixture
def plain_db(schema_url: str, tmp_path: Path, request: pytest.FixtureRequest
             ) -> Iterator[Database]:
    """A migrated schema with a plain voucher_audit_logs, its id serial or identity."""
    engine = create_db_engine(schema_url)
    if getattr(request, "param", "serial") == "identity":
        with engine.begin() as connection:
            connection.execute(text(
                "CREATE TABLE voucher_audit_logs ("
                " id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,"
                " voucher_id bigint, action varchar(32) NOT NULL,"
                " actor_type varchar(32) NOT NULL, code varchar(64), metadata jsonb,"
                " created_at timestamptz NOT NULL DEFAULT statement_timestamp())"))
    migrate.upgrade(engine)
    database = Database("postgresql", schema_url, engine, tmp_path)
    moments = [moment for values in ROWS.values() for moment in values]
    random.Random(7).shuffle(moments)
    database.add_audit_rows(moments)
    with engine.begin() as connection:
        connection.execute(text("GRANT SELECT ON voucher_audit_logs TO PUBLIC"))
    yield database
    engine.dispose()


class Writer(threading.Thread):
    """Inserts audit rows one per transaction, as the application does, until stopped."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(daemon=True)
        self.engine = engine
        self.stop = threading.Event()
        self.ids: list[int] = []
        self.errors: list[BaseException] = []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                with self.engine.begin() as connection:
                    self.ids.append(connection.execute(text(
                        "INSERT INTO voucher_audit_logs (voucher_id, action, actor_type) "
                        "VALUES (1, 'UPDATED', 'ADMIN') RETURNING id")).scalar_one())
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                self.errors.append(exc)
                return


@pytest.mark.parametrize("plain_db", ["serial", "identity"], indirect=True)
def test_script_converts_filled_table(plain_db: Database) -> None:
    db = plain_db
    before = snapshot(db)
    writer = Writer(create_db_engine(db.url))
    writer.start()
    try:
        completed = psql(db.url, "batch_rows=20")
    finally:
        writer.stop.set()
        writer.join()
        writer.engine.dispose()
    assert completed.returncode == 0, completed.stderr
    assert writer.errors == []
    assert len(writer.ids) > 0
    assert "voucher_audit_logs is partitioned now" in completed.stderr

    with db.engine.connect() as connection:
        layout = partitions.read_layout(connection)
        kept = set(connection.execute(text(
            "SELECT id FROM voucher_audit_logs_unpartitioned")).scalars())
        public_select = connection.execute(text(
            "SELECT has_table_privilege('public', 'voucher_audit_logs', 'SELECT')")).scalar_one()
        next_id = connection.execute(text(
            "INSERT INTO voucher_audit_logs (action, actor_type) VALUES ('X', 'Y') RETURNING id"
        )).scalar_one()
        connection.commit()
    assert layout is not None
    names = [partition.name for partition in layout.partitions]
    assert names[0] == "voucher_audit_logs_default"
    assert names[1] == "voucher_audit_logs_p2024_06"
    assert "voucher_audit_logs_p2025_03" in names
    # Every row, those the writer added during the copy too, is in the new table once.
    now_rows = snapshot(db)
    assert {row_id: now_rows[row_id] for row_id in before} == before
    assert set(writer.ids) <= set(now_rows)
    assert kept <= set(now_rows)
    assert public_select
    assert next_id > max(now_rows.keys() - {next_id})

    assert db.cli("db", "current", "--check").returncode == 0
    upgrade = db.cli("db", "upgrade")
    assert upgrade.returncode == 0, upgrade.stderr
    assert "already at revision" in upgrade.stdout
    # A rerun of the script changes nothing.
    again = psql(db.url)
    assert again.returncode == 0, again.stderr
    assert "partitioned already" in again.stdout

    # The jobs work on the converted table: whole months before the cutoff go.
    completed = db.cli("run", "audit-archival", "--mode", "archive-table", "--at", AT, "--json")
    assert completed.returncode == 0, completed.stderr
    with db.engine.connect() as connection:
        converted = partitions.read_layout(connection)
    assert converted is not None
    remaining = [partition.name for partition in converted.partitions]
    assert "voucher_audit_logs_p2024_11" not in remaining
    assert "voucher_audit_logs_p2024_12" in remaining
    assert db.count(logs, logs.c.created_at < CUTOFF) == 0
    assert db.count(audit_archive) == len(
        [row for row in before.values() if row[6] < CUTOFF])


def test_script_waits_for_running_archival(plain_db: Database) -> None:
    # While audit-archival holds its job lock, the script refuses to start.
    process = start_cli(plain_db, "run", "audit-archival", "--at", AT, "--pause", "5",
                        "--batch-size", "1")
    wait_for_run(plain_db, process)
    completed = psql(plain_db.url)
    process.kill()
    finish(process)
    assert completed.returncode != 0
    assert "audit-archival is running" in completed.stderr
    with plain_db.engine.connect() as connection:
        assert partitions.read_layout(connection) is None


def test_add_script_creates_coming_months(db: Database) -> None:
    with db.engine.connect() as connection:
        months = list(connection.execute(text(
            "SELECT to_char(date_trunc('month', now() AT TIME ZONE 'UTC') + m * interval "
            "'1 month', 'YYYY_MM') FROM generate_series(0, 2) AS m")).scalars())
    completed = psql(db.url, "months_ahead=2", script=ADD_SCRIPT)
    assert completed.returncode == 0, completed.stderr
    expected = {f"voucher_audit_logs_p{month}" for month in months}
    assert expected <= set(partition_rows(db))
    assert completed.stderr.count("created partition") == 3

    again = psql(db.url, "months_ahead=2", script=ADD_SCRIPT)
    assert again.returncode == 0, again.stderr
    assert "created partition" not in again.stderr


def test_add_script_fails_on_rows_in_default(db: Database) -> None:
    # A row of the fourth month from now is in the DEFAULT partition, so
    # that month's partition cannot be created until the row is moved.
    with db.engine.begin() as connection:
        connection.execute(text(
            "INSERT INTO voucher_audit_logs (action, actor_type, created_at) VALUES "
            "('X', 'Y', date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' "
            "+ interval '3 months 1 day')"))
    completed = psql(db.url, "months_ahead=3", script=ADD_SCRIPT)
    assert completed.returncode != 0
    assert "default partition" in completed.stderr

"""A fast subset of the race driver in reliability/races.py, and checks of its checker.

One round of eight triggers per backend and job, and one application-writer
scenario per backend. The driver runs more rounds and every archival mode.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone

import pytest

from reliability.app_writer import writer_scenario
from reliability.invariants import T0, Tally, seed_audit_rows, seed_vouchers
from reliability.trigger_race import Outcome, check_round, race_round
from tests.conftest import Database
from tests.http_support import LogCapture
from tests.processes import kill_leftovers
from voucher_jobs import runner
from voucher_jobs.config import Settings
from voucher_jobs.data import ledger
from voucher_jobs.data.engine import sqlite_path
from voucher_jobs.data.locks import job_lock
from voucher_jobs.job_settings import build_parameters
from voucher_jobs.jobs import audit_archival, voucher_expired
from voucher_jobs.jobs.base import JobContext
from voucher_jobs.scheduler import Scheduler
from voucher_jobs.scheduler.history import run_key

pytestmark = pytest.mark.slow

# The archival mode of each backend's round. The driver runs all three modes.
ROUND_MODES = {"sqlite": "archive-file", "postgresql": "archive-table"}
WRITER_MODES = {"sqlite": "archive-table", "postgresql": "archive-file"}
JOB = "voucher-expired"
NOW = datetime(2026, 12, 4, 10, 20, 30, tzinfo=timezone.utc)
FIRE_TIME = NOW.replace(minute=20, second=0)


@pytest.fixture(autouse=True)
def leftover_processes() -> Iterator[None]:
    yield
    kill_leftovers()


def test_eight_triggers_one_run(db: Database) -> None:
    tally = race_round(db, "voucher-expired")

    assert tally.violations == []
    assert tally.counts["triggers started"] == 8
    assert tally.counts["runs that did work"] == 1
    assert tally.counts["refusals naming the active run"] == 7
    assert tally.rows_checked > 0


def test_scheduler_first_one_run(db: Database) -> None:
    # The other six triggers start once a scheduler has recorded its run,
    # and must name that run.
    tally = race_round(db, "audit-archival", ROUND_MODES[db.backend],
                       schedulers_first=True)

    assert tally.violations == []
    assert tally.counts["triggers started"] == 8
    assert tally.counts["runs that did work"] == 1
    assert tally.counts["won by scheduler"] == 1
    assert tally.counts["refusals naming the active run"] == 7
    assert tally.rows_checked > 0


def test_application_writer_sees_no_errors(db: Database) -> None:
    tally, figures = writer_scenario(db, WRITER_MODES[db.backend], expired_vouchers=800,
                                     old_rows=800)

    assert tally.violations == []
    assert figures.errors == {}
    assert figures.operations > 0
    # The writer wrote while the jobs ran, not only before and after them.
    assert figures.during_jobs > 100


# The jobs' start-up scans read every expired voucher or eligible row. On
# SQLite they must not take the write lock, or the application's writes wait
# for the whole scan and fail once it outlasts their busy timeout.

def _expiry_dry_run(db: Database) -> None:
    parameters = voucher_expired.ExpiryParameters(reference_time=T0, dry_run=True)
    voucher_expired.run(db.engine, parameters, JobContext(run_id=1))


def _archival_dry_run(db: Database) -> None:
    parameters = audit_archival.ArchivalParameters(retention_days=730, reference_time=T0,
                                                   dry_run=True)
    audit_archival.run(db.engine, parameters, JobContext(run_id=1))


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
@pytest.mark.parametrize("dry_run", [_expiry_dry_run, _archival_dry_run],
                         ids=["voucher-expired", "audit-archival"])
def test_start_scan_needs_no_write_lock(db: Database,
                                        dry_run: Callable[[Database], None]) -> None:
    seed_vouchers(db, 50)
    seed_audit_rows(db, old=50, new=5)
    application = sqlite3.connect(sqlite_path(db.engine), timeout=5, isolation_level=None)
    application.execute("BEGIN IMMEDIATE")  # the application holds the write lock
    worker = threading.Thread(target=dry_run, args=(db,))
    try:
        worker.start()
        worker.join(timeout=5)
        finished_beside_writer = not worker.is_alive()
    finally:
        application.execute("ROLLBACK")
        application.close()
        worker.join(timeout=60)

    assert finished_beside_writer


# The round's checker, on ledgers planted in this process

def _record(db: Database, trigger: str, rows: int, blocked_by: int | None = None) -> int:
    status = ledger.SKIPPED if blocked_by else ledger.RUNNING
    row = ledger.start_run(db.engine, job=JOB, trigger=trigger, parameters={}, host="h",
                           pid=1, status=status, blocked_by_run_id=blocked_by)
    if status == ledger.RUNNING:
        ledger.finish_run(db.engine, row.id, status=ledger.SUCCEEDED, rows_affected=rows)
    return row.id


def _outcomes(started: list[int], named: int) -> list[Outcome]:
    outcomes = [Outcome("cli", started_run_id=run_id) for run_id in started]
    outcomes += [Outcome("http", named_run_id=named, refused=True)
                 for _ in range(8 - len(started))]
    return outcomes


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
def test_checker_accepts_one_worker(db: Database) -> None:
    winner = _record(db, "cli", rows=50)
    for _ in range(7):
        _record(db, "http", rows=0, blocked_by=winner)
    tally = Tally()
    check_round(db, JOB, _outcomes([winner], winner), tally, "planted")

    assert tally.violations == []
    assert tally.counts["refusals naming the active run"] == 7


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
def test_checker_finds_two_workers(db: Database) -> None:
    first = _record(db, "cli", rows=50)
    second = _record(db, "scheduler", rows=20)
    tally = Tally()
    check_round(db, JOB, _outcomes([first, second], first), tally, "planted")

    assert tally.counts["runs that did work"] == 2
    assert any("2 runs did work" in violation for violation in tally.violations)
    assert any("2 runs started" in violation for violation in tally.violations)


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
def test_checker_finds_wrong_active_id(db: Database) -> None:
    winner = _record(db, "cli", rows=50)
    tally = Tally()
    check_round(db, JOB, _outcomes([winner], winner + 100), tally, "planted")

    assert tally.counts["refusals naming the active run"] == 0
    assert len([v for v in tally.violations if "was not refused with run" in v]) == 7


# What a scheduler replica records when another trigger has the fire time

def _settings(db: Database) -> Settings:
    return Settings(_env_file=None, database_url=db.url, voucher_expired_schedule="* * * * *",
                    audit_archival_enabled=False, catchup_max_lateness_seconds=600,
                    retry_attempts=0)


def test_claimed_fire_time_names_lock_holder(db: Database) -> None:
    key = run_key(JOB, FIRE_TIME)
    parameters = build_parameters(JOB, _settings(db))
    with job_lock(db.engine, JOB) as acquired:
        assert acquired
        active = ledger.start_run(db.engine, job=JOB, trigger="cli", parameters={},
                                  host="h", pid=1)
        # A replica refused by the lock recorded the fire time as skipped.
        ledger.start_run(db.engine, job=JOB, trigger="scheduler", parameters={}, host="h",
                         pid=2, run_key=key, status=ledger.SKIPPED,
                         blocked_by_run_id=active.id)
        with pytest.raises(runner.FireTimeClaimed) as claimed:
            runner.start(db.engine, JOB, parameters, trigger="scheduler", run_key=key)

    assert claimed.value.active_run_id == active.id


def test_catch_up_claimed_names_active_run(db: Database) -> None:
    # Another replica's catch-up run of the 10:20 fire time is in progress.
    active = ledger.start_run(db.engine, job=JOB, trigger="scheduler", parameters={},
                              host="replica-b", pid=1, run_key=run_key(JOB, FIRE_TIME))
    scheduler = Scheduler(_settings(db), db.engine, clock=lambda: NOW, tick_seconds=0.02)
    with LogCapture("voucher_jobs") as capture:
        scheduler.start()
        try:
            deadline = time.monotonic() + 20
            while not capture.events("fire_time_skipped") and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            scheduler.stop(timeout=30)

    [line] = capture.events("fire_time_skipped")
    assert "reason=claimed" in line
    assert f"active_run_id={active.id}" in line
    assert f"run_key={run_key(JOB, FIRE_TIME)}" in line
    assert capture.events("catch_up_started") == []
    assert ledger.get_run(db.engine, active.id).status == ledger.RUNNING


def test_catch_up_after_finished_run_logs_nothing(db: Database) -> None:
    finished = ledger.start_run(db.engine, job=JOB, trigger="scheduler", parameters={},
                                host="replica-b", pid=1, run_key=run_key(JOB, FIRE_TIME))
    ledger.finish_run(db.engine, finished.id, status=ledger.SUCCEEDED)
    scheduler = Scheduler(_settings(db), db.engine, clock=lambda: NOW, tick_seconds=0.02)
    with LogCapture("voucher_jobs") as capture:
        scheduler.start()
        try:
            deadline = time.monotonic() + 20
            while not capture.events("next_fire_time") and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            scheduler.stop(timeout=30)

    assert capture.events("next_fire_time") != []
    assert capture.events("fire_time_skipped") == []
    assert capture.events("catch_up_started") == []

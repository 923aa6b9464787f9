"""The scheduler on both backends: fire times, catch-up, overlap, stop, CLI and replicas.

In-process tests give the Scheduler a clock they move by hand. The tests
marked slow run `voucher-jobs scheduler` as separate OS processes on the
real clock.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from sqlalchemy import select

from tests.conftest import Database
from voucher_jobs import runner
from voucher_jobs.config import Settings
from voucher_jobs.data import ledger
from voucher_jobs.data.schema import expirations, runs, voucher_audit_logs
from voucher_jobs.job_settings import build_parameters
from voucher_jobs.scheduler import Scheduler, ScheduleError, scheduler_lifespan
from voucher_jobs.scheduler.history import run_key

UTC = timezone.utc
JOB = "voucher-expired"
# A Friday, 20 minutes past the hour.
NOW = datetime(2026, 12, 4, 10, 20, 30, tzinfo=UTC)


def top_of_hour(hours_before: int = 0) -> datetime:
    return NOW.replace(minute=0, second=0) - timedelta(hours=hours_before)


class Clock:
    """A clock that does not move until the test advances it."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


class Events(logging.Handler):
    """Collects the fields of every voucher_jobs log event."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[tuple[str, dict[str, Any]]] = []
        self._lock_records = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock_records:
            fields = dict(getattr(record, "fields", {}))
            self.records.append((record.getMessage(), {**fields, "level": record.levelname}))

    def named(self, event: str) -> list[dict[str, Any]]:
        with self._lock_records:
            return [fields for name, fields in self.records if name == event]


@pytest.fixture
def events() -> Iterator[Events]:
    handler = Events()
    package_logger = logging.getLogger("voucher_jobs")
    level = package_logger.level
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.DEBUG)
    yield handler
    package_logger.removeHandler(handler)
    package_logger.setLevel(level)


@pytest.fixture
def schedulers() -> Iterator[list[Scheduler]]:
    """Schedulers a test starts. Each is stopped at the end, also when the test fails."""
    started: list[Scheduler] = []
    yield started
    for scheduler in started:
        scheduler.stop(timeout=30)


def settings_for(db: Database, **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(
        _env_file=None,
        database_url=db.url,
        voucher_expired_schedule="0 * * * *",
        audit_archival_enabled=False,
        retry_attempts=0,
    )
    values.update(overrides)
    return Settings(**values)


def start_scheduler(db: Database, schedulers: list[Scheduler], settings: Settings,
                    clock: Clock) -> Scheduler:
    scheduler = Scheduler(settings, db.engine, clock=clock, tick_seconds=0.02)
    schedulers.append(scheduler)
    scheduler.start()
    return scheduler


def wait_for(condition: Callable[[], Any], description: str, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {description}")
        time.sleep(0.02)


def record_run(db: Database, fire_time: datetime, status: str = ledger.SUCCEEDED) -> int:
    """Store a run of JOB for fire_time as another replica would have."""
    row = ledger.start_run(db.engine, job=JOB, trigger="scheduler", parameters={},
                           host="replica-b", pid=1, run_key=run_key(JOB, fire_time),
                           status=status)
    return row.id


def run_rows(db: Database) -> list[Any]:
    return db.rows(select(runs).order_by(runs.c.id))


def finished_run(db: Database, key: str) -> Any:
    rows = db.rows(select(runs).where(runs.c.run_key == key))
    return rows[0] if rows and rows[0].status != ledger.RUNNING else None


def add_expired(db: Database, count: int) -> None:
    expiry = datetime.now(UTC) - timedelta(days=1)
    for _ in range(count):
        db.add_voucher(expiry)


def expired_rows(db: Database) -> int:
    return db.count(voucher_audit_logs, voucher_audit_logs.c.action == "EXPIRED")


# Fire times and catch-up, in this process

def test_due_fire_time_starts_run(db: Database, events: Events,
                                  schedulers: list[Scheduler]) -> None:
    add_expired(db, 3)
    record_run(db, top_of_hour())
    clock = Clock(NOW)
    start_scheduler(db, schedulers, settings_for(db), clock)
    wait_for(lambda: events.named("next_fire_time"), "the first fire time to be planned")

    clock.advance(top_of_hour(-1) - NOW)
    key = run_key(JOB, top_of_hour(-1))
    run = wait_for(lambda: finished_run(db, key), f"run {key}")

    assert run.status == ledger.SUCCEEDED
    assert run.trigger == "scheduler"
    assert run.rows_affected == 3
    assert expired_rows(db) == 3
    assert events.named("catch_up_started") == []


def test_catch_up_after_downtime(db: Database, events: Events,
                                 schedulers: list[Scheduler]) -> None:
    # The last scheduled run was at 05:00. The 06:00 to 10:00 fire times
    # were missed while no scheduler ran.
    add_expired(db, 2)
    record_run(db, top_of_hour(5))
    start_scheduler(db, schedulers, settings_for(db), Clock(NOW))
    key = run_key(JOB, top_of_hour())
    run = wait_for(lambda: finished_run(db, key), f"catch-up run {key}")

    [started] = events.named("catch_up_started")
    assert started["missed_fire_times"] == 5
    assert started["level"] == "WARNING"
    assert started["cause"] == "start"
    assert started["fire_time"] == top_of_hour().isoformat()
    assert started["last_scheduled_fire_time"] == top_of_hour(5).isoformat()
    assert run.status == ledger.SUCCEEDED
    assert run.rows_affected == 2
    keys = [row.run_key for row in run_rows(db)]
    assert keys == [run_key(JOB, top_of_hour(5)), key]


def test_catch_up_too_late_skipped(db: Database, events: Events,
                                   schedulers: list[Scheduler]) -> None:
    # 10:00 passed 20 minutes ago, more than the 10-minute limit.
    add_expired(db, 2)
    record_run(db, top_of_hour(5))
    settings = settings_for(db, catchup_max_lateness_seconds=600)
    start_scheduler(db, schedulers, settings, Clock(NOW))
    [skipped] = wait_for(lambda: events.named("catch_up_skipped"), "catch_up_skipped")
    wait_for(lambda: events.named("next_fire_time"), "the next fire time to be planned")

    assert skipped["reason"] == "too_late"
    assert skipped["missed_fire_times"] == 5
    assert skipped["fire_time"] == top_of_hour().isoformat()
    assert events.named("catch_up_started") == []
    assert len(run_rows(db)) == 1
    assert expired_rows(db) == 0


def test_recorded_fire_time_not_repeated(db: Database, events: Events,
                                         schedulers: list[Scheduler]) -> None:
    record_run(db, top_of_hour())
    start_scheduler(db, schedulers, settings_for(db), Clock(NOW))
    wait_for(lambda: events.named("next_fire_time"), "the next fire time to be planned")

    assert events.named("catch_up_started") == []
    assert events.named("catch_up_skipped") == []
    assert len(run_rows(db)) == 1


def test_no_history_catches_up_once(db: Database, events: Events,
                                    schedulers: list[Scheduler]) -> None:
    # With an empty ledger only fire times within the lateness limit count.
    settings = settings_for(db, voucher_expired_schedule="*/5 * * * *",
                            catchup_max_lateness_seconds=3600)
    start_scheduler(db, schedulers, settings, Clock(NOW))
    key = run_key(JOB, NOW.replace(minute=20, second=0))
    wait_for(lambda: finished_run(db, key), f"catch-up run {key}")

    [started] = events.named("catch_up_started")
    # 09:25 to 10:20 inclusive: twelve fire times in the last hour.
    assert started["missed_fire_times"] == 12
    assert started["last_scheduled_fire_time"] is None
    # A first start missed nothing through an outage: no warning.
    assert started["level"] == "INFO"
    assert len(run_rows(db)) == 1


def test_stall_catches_up_latest(db: Database, events: Events,
                                 schedulers: list[Scheduler]) -> None:
    settings = settings_for(db, voucher_expired_schedule="* * * * *")
    record_run(db, NOW.replace(second=0))
    clock = Clock(NOW)
    start_scheduler(db, schedulers, settings, clock)
    wait_for(lambda: events.named("next_fire_time"), "the first fire time to be planned")

    # The host sleeps for three hours: 180 fire times pass unseen.
    clock.advance(timedelta(hours=3))
    latest = (NOW + timedelta(hours=3)).replace(second=0)
    key = run_key(JOB, latest)
    wait_for(lambda: finished_run(db, key), f"catch-up run {key}")

    [started] = events.named("catch_up_started")
    assert started["cause"] == "stall"
    assert started["missed_fire_times"] == 180
    assert [row.run_key for row in run_rows(db)] == [run_key(JOB, NOW.replace(second=0)), key]


def test_claimed_fire_time_logged(db: Database, events: Events,
                                  schedulers: list[Scheduler]) -> None:
    record_run(db, top_of_hour())
    clock = Clock(NOW)
    start_scheduler(db, schedulers, settings_for(db), clock)
    wait_for(lambda: events.named("next_fire_time"), "the first fire time to be planned")
    # Another replica records 11:00 before this one gets there.
    record_run(db, top_of_hour(-1))

    clock.advance(top_of_hour(-1) - NOW)
    [skipped] = wait_for(lambda: events.named("fire_time_skipped"), "fire_time_skipped")

    assert skipped["reason"] == "claimed"
    assert skipped["job"] == JOB
    assert skipped["fire_time"] == top_of_hour(-1).isoformat()
    assert skipped["run_key"] == run_key(JOB, top_of_hour(-1))
    assert len(run_rows(db)) == 2


# Long runs: overlap and stop

def slow_settings(db: Database) -> Settings:
    # 40 batches of one voucher with 0.1 s pauses: about 4 s per run.
    return settings_for(db, voucher_expired_schedule="* * * * *", batch_size=1,
                        batch_pause_seconds=0.1)


def test_overlapping_fire_time_skipped(db: Database, events: Events,
                                       schedulers: list[Scheduler]) -> None:
    add_expired(db, 40)
    clock = Clock(NOW)
    scheduler = start_scheduler(db, schedulers, slow_settings(db), clock)
    first_key = run_key(JOB, NOW.replace(second=0))
    wait_for(lambda: scheduler.active_run_ids(), "the catch-up run to start")
    [first] = db.rows(select(runs).where(runs.c.run_key == first_key))

    # The next fire time passes while the first run is still going.
    clock.advance(timedelta(minutes=1))
    [skipped] = wait_for(lambda: events.named("fire_time_skipped"), "fire_time_skipped")
    next_key = run_key(JOB, NOW.replace(second=0) + timedelta(minutes=1))
    [refused] = db.rows(select(runs).where(runs.c.run_key == next_key))

    assert skipped["reason"] == "job_running"
    assert skipped["active_run_id"] == first.id
    assert refused.status == ledger.SKIPPED
    assert refused.blocked_by_run_id == first.id
    assert scheduler.active_run_ids() == [first.id]


def test_stop_interrupts_after_batch(db: Database, events: Events,
                                     schedulers: list[Scheduler]) -> None:
    add_expired(db, 40)
    scheduler = start_scheduler(db, schedulers, slow_settings(db), Clock(NOW))
    [run_id] = wait_for(lambda: scheduler.active_run_ids(), "the catch-up run to start")
    wait_for(lambda: expired_rows(db) >= 2, "two batches")

    assert scheduler.stop(timeout=30, reason="test stop")

    run = ledger.get_run(db.engine, run_id)
    assert run is not None
    assert run.status == ledger.INTERRUPTED
    assert run.error == "stopped by test stop"
    assert 2 <= run.rows_affected < 40
    assert run.rows_affected == expired_rows(db)
    assert not scheduler.is_alive()
    assert scheduler.active_run_ids() == []


def test_disabled_job_not_scheduled(db: Database, events: Events,
                                    schedulers: list[Scheduler]) -> None:
    settings = settings_for(db, voucher_expired_enabled=False)
    scheduler = start_scheduler(db, schedulers, settings, Clock(NOW))
    [warning] = wait_for(lambda: events.named("no_job_enabled"), "no_job_enabled")

    assert scheduler.enabled == {}
    assert warning["jobs"] == "voucher-expired,audit-archival"
    assert run_rows(db) == []


def test_invalid_schedule_rejected(db: Database) -> None:
    # A disabled job's expression is checked too.
    settings = settings_for(db, audit_archival_schedule="0 0 32 * *")
    with pytest.raises(ScheduleError, match="VOUCHER_JOBS_AUDIT_ARCHIVAL_SCHEDULE"):
        Scheduler(settings, db.engine)


# The runner's side of run keys

def test_lock_holder_takes_over_skipped_row(db: Database) -> None:
    key = run_key(JOB, top_of_hour())
    skipped_id = record_run(db, top_of_hour(), status=ledger.SKIPPED)
    parameters = build_parameters(JOB, settings_for(db))

    active = runner.start(db.engine, JOB, parameters, trigger="scheduler", run_key=key)
    finished, _ = active.run(handle_signals=False)

    assert active.record.id == skipped_id
    assert finished.status == ledger.SUCCEEDED
    assert finished.blocked_by_run_id is None
    assert [row.run_key for row in run_rows(db)] == [key]


def test_finished_run_key_is_claimed(db: Database) -> None:
    key = run_key(JOB, top_of_hour())
    record_run(db, top_of_hour(), status=ledger.SUCCEEDED)
    parameters = build_parameters(JOB, settings_for(db))

    with pytest.raises(runner.FireTimeClaimed):
        runner.start(db.engine, JOB, parameters, trigger="scheduler", run_key=key)
    assert len(run_rows(db)) == 1


# Web app lifespan

def test_lifespan_starts_and_stops(db: Database) -> None:
    settings = settings_for(db, catchup_max_lateness_seconds=0)
    app = FastAPI(lifespan=scheduler_lifespan(settings))
    states: list[bool] = []

    async def serve() -> None:
        async with app.router.lifespan_context(app):
            states.append(app.state.scheduler.is_alive())
        states.append(app.state.scheduler.is_alive())

    asyncio.run(serve())
    assert states == [True, False]


def test_lifespan_rejects_bad_schedule(db: Database) -> None:
    settings = settings_for(db, voucher_expired_schedule="0 2 31 2 *")
    app = FastAPI(lifespan=scheduler_lifespan(settings))

    async def serve() -> None:
        async with app.router.lifespan_context(app):
            pass

    with pytest.raises(ScheduleError, match="never fires"):
        asyncio.run(serve())


# The commands, in separate processes

def test_schedule_command_lists_fire_times(db: Database) -> None:
    environment = db.env(
        VOUCHER_JOBS_SCHEDULE_TIMEZONE="Europe/Berlin",
        # Noon on every Sunday of March and October: the last Sunday of
        # each is a daylight saving time change day in Berlin.
        VOUCHER_JOBS_VOUCHER_EXPIRED_SCHEDULE="0 12 * 3,10 SUN",
        VOUCHER_JOBS_AUDIT_ARCHIVAL_ENABLED="false",
    )
    result = db.cli("schedule", "--count", "10", env=environment)

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "voucher-expired: '0 12 * 3,10 SUN' in Europe/Berlin, enabled"
    assert lines[11] == ("audit-archival: '0 3 * * *' in Europe/Berlin, disabled by "
                         "VOUCHER_JOBS_AUDIT_ARCHIVAL_ENABLED")
    fire_lines = lines[1:11]
    marked = [line for line in fire_lines if line.endswith("DST change day")]
    assert all(" 12:00 CE" in line and " UTC" in line for line in fire_lines)
    assert 1 <= len(marked) <= 3
    for line in marked:
        day = datetime.strptime(line.split()[0], "%Y-%m-%d")
        assert day.isoweekday() == 7
        assert (day + timedelta(days=7)).month != day.month
    assert len(lines) == 22


@pytest.mark.parametrize(("variable", "value", "detail"), [
    ("VOUCHER_JOBS_VOUCHER_EXPIRED_SCHEDULE", "0 24 * * *", "the hour field"),
    ("VOUCHER_JOBS_AUDIT_ARCHIVAL_SCHEDULE", "0 0 * * * *", "it has 6 fields"),
    ("VOUCHER_JOBS_SCHEDULE_TIMEZONE", "Mars/Base", "not an IANA time zone name"),
])
@pytest.mark.parametrize("command", ["schedule", "scheduler"])
def test_commands_reject_bad_schedule(tmp_path: Path, command: str, variable: str,
                                      value: str, detail: str) -> None:
    # The settings are checked before any database is opened, so the URL
    # points at a file that never gets created.
    environment = {key: item for key, item in os.environ.items()
                   if not key.startswith("VOUCHER_") and key != "DATABASE_URL"}
    environment.update({"DATABASE_URL": f"sqlite:///{tmp_path / 'unused.db'}",
                        variable: value})
    result = subprocess.run([sys.executable, "-m", "voucher_jobs", command],
                            env=environment, cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)

    assert result.returncode == 2, result.stderr
    assert not (tmp_path / "unused.db").exists()
    assert f"{variable}={value!r} is invalid" in result.stderr
    assert detail in result.stderr


def start_scheduler_process(db: Database, stderr: Path,
                            **settings: str) -> subprocess.Popen[str]:
    environment = db.env(VOUCHER_JOBS_VOUCHER_EXPIRED_SCHEDULE="* * * * *",
                         VOUCHER_JOBS_AUDIT_ARCHIVAL_ENABLED="false", **settings)
    with stderr.open("w") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "voucher_jobs", "scheduler"],
            env=environment, cwd=db.workdir, stdout=subprocess.DEVNULL, stderr=output,
            text=True,
        )


def stop_process(process: subprocess.Popen[str], stderr: Path, timeout: float = 60) -> str:
    """Send SIGTERM, wait for the exit, and return the process's log."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError(f"process {process.pid} ignored SIGTERM for {timeout} s:\n"
                             f"{stderr.read_text()}") from None
    return stderr.read_text()


@pytest.mark.slow
def test_sigterm_interrupts_run(db: Database) -> None:
    add_expired(db, 500)
    log = db.workdir / "scheduler.log"
    # 50 batches of 10 with 0.05 s pauses: about 2.5 s, started by the
    # catch-up of the previous minute's fire time.
    process = start_scheduler_process(db, log, VOUCHER_JOBS_BATCH_SIZE="10",
                                      VOUCHER_JOBS_BATCH_TARGET_MS="0",
                                      VOUCHER_JOBS_BATCH_PAUSE_SECONDS="0.05")
    try:
        running = wait_for(
            lambda: db.rows(select(runs).where(runs.c.status == ledger.RUNNING)),
            "a running scheduled run", timeout=60)
        wait_for(lambda: expired_rows(db) >= 10, "the first batch", timeout=30)
    finally:
        output = stop_process(process, log)

    assert process.returncode == 0, output
    [run] = db.rows(select(runs).where(runs.c.id == running[0].id))
    assert run.status == ledger.INTERRUPTED
    assert run.error == "stopped by SIGTERM"
    assert run.trigger == "scheduler"
    assert 10 <= run.rows_affected < 500
    assert run.rows_affected == expired_rows(db)
    assert "scheduler_stopped" in output


REPLICAS = 4


@pytest.mark.slow
def test_replicas_run_each_fire_time_once(db: Database) -> None:
    # Four scheduler processes share one database on the real clock. The
    # test waits for two minute boundaries after all four are up: at most
    # about 122 s.
    add_expired(db, 5)
    logs = [db.workdir / f"replica-{index}.log" for index in range(REPLICAS)]
    processes = [start_scheduler_process(db, log) for log in logs]
    outputs: list[str] = []
    try:
        wait_for(lambda: all("scheduler_started" in log.read_text() for log in logs),
                 "all replicas to start", timeout=30)
        ready = datetime.now(UTC)
        first = ready.replace(second=0, microsecond=0) + timedelta(minutes=1)
        second = first + timedelta(minutes=1)
        # The catch-up run at start-up has handled the first five vouchers,
        # so these five are for the scheduled runs.
        wait_for(lambda: db.count(runs, runs.c.status == ledger.RUNNING) == 0 and run_rows(db),
                 "the start-up catch-up run", timeout=30)
        add_expired(db, 5)
        for fire_time in (first, second):
            timeout = (fire_time - datetime.now(UTC)).total_seconds() + 30
            wait_for(lambda: finished_run(db, run_key(JOB, fire_time)),
                     f"the run for {fire_time.isoformat()}", timeout=timeout)
    finally:
        outputs = [stop_process(process, log) for process, log in zip(processes, logs)]

    assert [process.returncode for process in processes] == [0] * REPLICAS, outputs
    rows = run_rows(db)
    keys = [row.run_key for row in rows]
    assert None not in keys
    assert len(keys) == len(set(keys))
    assert {run_key(JOB, first), run_key(JOB, second)} <= set(keys)
    assert {row.status for row in rows} == {ledger.SUCCEEDED}
    assert {row.trigger for row in rows} == {"scheduler"}
    assert expired_rows(db) == 10
    assert db.count(expirations) == 10
    assert sum(row.rows_affected for row in rows) == 10
    for fire_time in (first, second):
        skipped = [line for output in outputs for line in output.splitlines()
                   if " fire_time_skipped " in line
                   and f"run_key={run_key(JOB, fire_time)}" in line]
        assert len(skipped) == REPLICAS - 1, (fire_time, skipped)
    assert {row.pid for row in rows} <= {process.pid for process in processes}

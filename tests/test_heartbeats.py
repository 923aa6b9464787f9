"""Heartbeat pings to a monitor on 127.0.0.1, from real runs on both backends."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest

from tests.conftest import T0, Database
from tests.http_support import HEARTBEAT_SECRET, LogCapture, Monitor, free_port
from voucher_jobs import heartbeats
from voucher_jobs.config import Settings
from voucher_jobs.data import ledger
from voucher_jobs.heartbeats import HeartbeatListener, heartbeat_listeners
from voucher_jobs.job_settings import build_parameters
from voucher_jobs.jobs import JOBS
from voucher_jobs.jobs.base import JobResult
from voucher_jobs.runner import RunFailed, execute

JOB = "voucher-expired"


@pytest.fixture
def monitor() -> Iterator[Monitor]:
    server = Monitor()
    yield server
    server.close()


@pytest.fixture(autouse=True)
def no_retry_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heartbeats, "RETRY_DELAYS_SECONDS", (0.0, 0.0))


def settings_for(db: Database, url: str | None) -> Settings:
    return Settings(_env_file=None, database_url=db.url, voucher_expired_heartbeat_url=url)


def run_job(db: Database, settings: Settings, *, dry_run: bool = False) -> ledger.RunRow:
    parameters = build_parameters(JOB, settings, dry_run=dry_run, reference_time=T0)
    run, _ = execute(db.engine, JOB, parameters, trigger="test", handle_signals=False,
                     listeners=heartbeat_listeners(JOB, settings))
    return run


def test_success_pings_start_then_success(db: Database, monitor: Monitor) -> None:
    db.add_voucher(T0 - timedelta(hours=1))
    run = run_job(db, settings_for(db, monitor.url))

    assert run.status == "succeeded"
    requests = monitor.wait_for(2)
    assert [request.path for request in requests] == [
        f"/ping/{HEARTBEAT_SECRET}/start",
        f"/ping/{HEARTBEAT_SECRET}",
    ]
    assert f"run {run.id} started" in requests[0].body
    assert f"run {run.id} succeeded: 1 row" in requests[1].body


def test_failure_pings_start_then_fail(db: Database, monitor: Monitor,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(engine: Any, parameters: Any, context: Any) -> JobResult:
        raise RuntimeError("disk full")

    monkeypatch.setitem(JOBS, JOB, broken)
    with pytest.raises(RunFailed) as failure:
        run_job(db, settings_for(db, monitor.url))

    requests = monitor.wait_for(2)
    assert [request.path for request in requests] == [
        f"/ping/{HEARTBEAT_SECRET}/start",
        f"/ping/{HEARTBEAT_SECRET}/fail",
    ]
    assert f"run {failure.value.run.id} failed" in requests[1].body
    assert "RuntimeError: disk full" in requests[1].body


def test_dry_run_sends_nothing(db: Database, monitor: Monitor) -> None:
    run = run_job(db, settings_for(db, monitor.url), dry_run=True)

    assert run.status == "succeeded"
    time.sleep(0.2)
    assert monitor.paths == []


def test_interrupted_run_pings_start_only(db: Database, monitor: Monitor,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def stopped(engine: Any, parameters: Any, context: Any) -> JobResult:
        return JobResult(rows_affected=0, interrupted=True)

    monkeypatch.setitem(JOBS, JOB, stopped)
    with LogCapture("voucher_jobs") as logs:
        run = run_job(db, settings_for(db, monitor.url))

    assert run.status == "interrupted"
    assert monitor.paths == [f"/ping/{HEARTBEAT_SECRET}/start"]
    assert len(logs.events("heartbeat_not_sent")) == 1


def test_server_errors_are_retried(db: Database, monitor: Monitor) -> None:
    monitor.statuses.extend([500, 503])
    with LogCapture("voucher_jobs") as logs:
        run = run_job(db, settings_for(db, monitor.url))

    assert run.status == "succeeded"
    assert monitor.paths == [f"/ping/{HEARTBEAT_SECRET}/start"] * 3 + [
        f"/ping/{HEARTBEAT_SECRET}"
    ]
    failures = logs.events("heartbeat_failed")
    assert len(failures) == 2
    assert "HTTP status 500" in failures[0]
    assert "retrying=True" in failures[1]


def test_client_error_is_not_retried(db: Database, monitor: Monitor) -> None:
    monitor.statuses.append(404)
    run = run_job(db, settings_for(db, monitor.url))

    assert run.status == "succeeded"
    assert monitor.paths == [f"/ping/{HEARTBEAT_SECRET}/start", f"/ping/{HEARTBEAT_SECRET}"]


def test_unreachable_monitor_never_fails_run(db: Database) -> None:
    url = f"http://127.0.0.1:{free_port()}/ping/{HEARTBEAT_SECRET}"
    with LogCapture("", "voucher_jobs") as logs:
        run = run_job(db, settings_for(db, url))

    assert run.status == "succeeded"
    failures = logs.events("heartbeat_failed")
    # Three attempts for the start ping and three for the success ping.
    assert len(failures) == 6
    assert "monitor=127.0.0.1" in failures[0]
    assert "ConnectError" in failures[0]
    assert HEARTBEAT_SECRET not in logs.text


def test_slow_monitor_times_out(monitor: Monitor) -> None:
    monitor.delay = 3.0
    listener = HeartbeatListener(JOB, monitor.url, timeout=0.2, retry_delays=(0.0,))
    run = ledger.RunRow(
        id=1, job=JOB, trigger="test", status="running", parameters={"dry_run": False},
        started_at=T0, finished_at=None, heartbeat_at=None, rows_affected=0, result=None,
        error=None, host="test", pid=1, blocked_by_run_id=None, run_key=None,
    )
    with LogCapture("voucher_jobs") as logs:
        started = time.monotonic()
        listener("start", run)
        elapsed = time.monotonic() - started

    # Two attempts of 0.2 s each, far less than one 3 s response.
    assert elapsed < 2.0
    failures = logs.events("heartbeat_failed")
    assert len(failures) == 2
    assert "ReadTimeout" in failures[0]
    assert HEARTBEAT_SECRET not in logs.text


def test_unset_url_adds_no_listener(db: Database) -> None:
    assert heartbeat_listeners(JOB, settings_for(db, None)) == ()
    assert heartbeat_listeners(JOB, settings_for(db, "  ")) == ()


def test_invalid_url_is_logged_not_used(db: Database) -> None:
    with LogCapture("voucher_jobs") as logs:
        listeners = heartbeat_listeners(JOB, settings_for(db, f"ftp://host/{HEARTBEAT_SECRET}"))

    assert listeners == ()
    assert len(logs.events("heartbeat_url_invalid")) == 1
    assert HEARTBEAT_SECRET not in logs.text

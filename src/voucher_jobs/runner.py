"""The one place that starts a run, whatever the trigger.

`execute` takes the job's lock, records the run in the ledger, runs the job
with a stop flag wired to SIGTERM and SIGINT, and records how it ended. A
second run of the same job while one is active is recorded as skipped and
raises RunRefused with the active run's id.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from voucher_jobs.data import ledger
from voucher_jobs.data.locks import job_lock
from voucher_jobs.jobs import JOBS
from voucher_jobs.jobs.base import JobContext, JobResult
from voucher_jobs.logs import log_event

logger = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 5.0
TRIGGERS = ("cli", "scheduler", "http", "test")


class RunRefused(Exception):
    """Another run of the job is active; carries its id and the skipped run's id."""

    def __init__(self, job: str, active_run_id: int | None, skipped_run_id: int) -> None:
        self.job = job
        self.active_run_id = active_run_id
        self.skipped_run_id = skipped_run_id
        active = f"run {active_run_id}" if active_run_id else "another run"
        super().__init__(
            f"{job} is already running ({active}); this attempt was recorded as "
            f"skipped run {skipped_run_id}. Wait for it to finish, or check it "
            "with `voucher-jobs runs`."
        )


class RunFailed(Exception):
    """The job raised; the run is recorded as failed and the cause is chained."""

    def __init__(self, run: ledger.RunRow) -> None:
        self.run = run
        super().__init__(f"run {run.id} of {run.job} failed: {run.error}")


class StopFlag:
    """Set by SIGTERM or SIGINT; jobs stop after the batch in progress."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal_name: str | None = None

    def set(self, signal_name: str = "request") -> None:
        self.signal_name = signal_name
        self._event.set()

    def __call__(self) -> bool:
        return self._event.is_set()


@contextmanager
def _stop_on_signals(flag: StopFlag) -> Iterator[None]:
    """Route SIGTERM and SIGINT to the flag while a run is active (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if flag():
            # A second signal means "now": restore the default and resend it.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        log_event(logger, "stop_requested", logging.WARNING, signal=name)
        flag.set(name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def to_json(value: Any) -> Any:
    """Convert job parameters to plain JSON values for the ledger."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: to_json(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    return value


def execute(
    engine: Engine,
    job: str,
    parameters: Any,
    *,
    trigger: str,
    run_key: str | None = None,
    progress: Callable[[int, int | None], None] | None = None,
    stop: StopFlag | None = None,
    handle_signals: bool = True,
) -> tuple[ledger.RunRow, JobResult]:
    """Run a job under its lock and ledger; return the finished run and the result.

    Raises RunRefused when another run of the job is active and RunFailed
    when the job raises. A run stopped by a signal finishes its current batch
    and is recorded as interrupted.
    """
    if job not in JOBS:
        raise KeyError(f"unknown job {job!r}; known jobs: {', '.join(sorted(JOBS))}")
    host, pid = socket.gethostname(), os.getpid()
    stored_parameters = to_json(parameters)
    with job_lock(engine, job) as acquired:
        if not acquired:
            active = ledger.active_run(engine, job)
            active_id = active.id if active else None
            skipped = ledger.start_run(
                engine, job=job, trigger=trigger, parameters=stored_parameters, host=host,
                pid=pid, run_key=run_key, status=ledger.SKIPPED, blocked_by_run_id=active_id,
            )
            log_event(logger, "run_skipped", logging.WARNING, job=job,
                      run_id=skipped.id, active_run_id=active_id, trigger=trigger)
            raise RunRefused(job, active_id, skipped.id)

        for abandoned in ledger.mark_abandoned_runs(engine, job):
            log_event(logger, "run_marked_interrupted", logging.WARNING, job=job, run_id=abandoned)
        run = ledger.start_run(
            engine, job=job, trigger=trigger, parameters=stored_parameters,
            host=host, pid=pid, run_key=run_key,
        )
        log_event(logger, "run_started", job=job, run_id=run.id, trigger=trigger,
                  host=host, pid=pid)
        return _run_job(engine, run, parameters, progress, stop or StopFlag(), handle_signals)


def _run_job(engine, run, parameters, progress, stop, handle_signals):
    started = time.monotonic()
    last_heartbeat = started

    def on_progress(done: int, total: int | None) -> None:
        nonlocal last_heartbeat
        if progress:
            progress(done, total)
        if time.monotonic() - last_heartbeat >= HEARTBEAT_SECONDS:
            ledger.heartbeat(engine, run.id, done)
            last_heartbeat = time.monotonic()

    job_logger = logging.getLogger(f"voucher_jobs.jobs.{run.job.replace('-', '_')}")

    def log(event: str, **fields: Any) -> None:
        level = logging.DEBUG if event.endswith("_batch") else logging.INFO
        log_event(job_logger, event, level, run_id=run.id, **fields)

    context = JobContext(run_id=run.id, stop_requested=stop, progress=on_progress, log=log)
    signals = _stop_on_signals(stop) if handle_signals else _no_signals()
    try:
        with signals:
            result = JOBS[run.job](engine, parameters, context)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        finished = ledger.finish_run(engine, run.id, status=ledger.FAILED, error=error)
        log_event(logger, "run_failed", logging.ERROR, job=run.job, run_id=run.id,
                  error=error, seconds=round(time.monotonic() - started, 3))
        raise RunFailed(finished) from exc

    status = ledger.INTERRUPTED if result.interrupted else ledger.SUCCEEDED
    details = {**result.details, "dry_run": result.dry_run,
               "seconds": round(time.monotonic() - started, 3)}
    error = f"stopped by {stop.signal_name}" if result.interrupted else None
    finished = ledger.finish_run(
        engine, run.id, status=status, rows_affected=result.rows_affected,
        result=to_json(details), error=error,
    )
    log_event(logger, "run_finished", job=run.job, run_id=run.id, status=status,
              rows=result.rows_affected, dry_run=result.dry_run, seconds=details["seconds"])
    return finished, result


@contextmanager
def _no_signals() -> Iterator[None]:
    yield

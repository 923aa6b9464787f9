"""The one place that starts a run, whatever the trigger.

`start` takes the job's lock and records the run in the ledger. The
returned `ActiveRun` runs the job, in this thread or another, with a stop
flag. It retries transient database errors, enforces the maximum run time
and records how the run ended. `execute` does both in one call.

Two refusals come before any work:

- RunRefused: another run of the job holds the lock. The attempt is recorded
  as a skipped run that names the active run.
- FireTimeClaimed: the run carries a run key (the scheduler's job plus fire
  time) that another replica has already recorded. Nothing is recorded.
  The lock holder instead takes over a row that a replica refused by its
  lock recorded as skipped under the same key.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError

from voucher_jobs.data import ledger
from voucher_jobs.data.errors import is_transient
from voucher_jobs.data.locks import job_lock
from voucher_jobs.jobs import JOBS
from voucher_jobs.jobs.base import JobContext, JobResult
from voucher_jobs.logs import log_event

logger = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 5.0
# How long a refused attempt waits for the lock holder's running row, which
# is written right after the lock is taken.
ACTIVE_RUN_WAIT_SECONDS = 1.0
# How often a pause between batches checks whether a stop was requested.
STOP_POLL_SECONDS = 0.1
TRIGGERS = ("cli", "scheduler", "http", "test")

Listener = Callable[[str, ledger.RunRow], None]


class RunRefused(Exception):
    """Another run of the job is active; carries its id and the skipped run's id."""

    def __init__(self, job: str, active_run_id: int | None, skipped_run_id: int | None) -> None:
        self.job = job
        self.active_run_id = active_run_id
        self.skipped_run_id = skipped_run_id
        active = f"run {active_run_id}" if active_run_id else "another run"
        recorded = (
            f"; this attempt was recorded as skipped run {skipped_run_id}"
            if skipped_run_id
            else ""
        )
        super().__init__(
            f"{job} is already running ({active}){recorded}. Wait for it to finish, "
            "or check it with `voucher-jobs runs`."
        )


class FireTimeClaimed(Exception):
    """Another replica has already recorded a run for this run key.

    `active_run_id` is the lock holder's running run when the job's lock also
    refused this attempt. It is None when this attempt held the lock, or when
    no running run appeared within ACTIVE_RUN_WAIT_SECONDS.
    """

    def __init__(self, job: str, run_key: str, active_run_id: int | None = None) -> None:
        self.job = job
        self.run_key = run_key
        self.active_run_id = active_run_id
        super().__init__(f"{job}: fire time {run_key} was already claimed by another process")


class RunFailed(Exception):
    """The job raised; the run is recorded as failed and the cause is chained."""

    def __init__(self, run: ledger.RunRow) -> None:
        self.run = run
        super().__init__(f"run {run.id} of {run.job} failed: {run.error}")


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How often a run retries transient database errors, with backoff and jitter.

    Attempt n (from 1) waits base_seconds * 2**(n-1), capped at max_seconds,
    times a random factor between 0.5 and 1.
    """

    attempts: int = 0
    base_seconds: float = 1.0
    max_seconds: float = 60.0

    def delay(self, attempt: int) -> float:
        ceiling = min(self.max_seconds, self.base_seconds * 2 ** (attempt - 1))
        return ceiling * random.uniform(0.5, 1.0)


class StopFlag:
    """Set by a signal, a caller or the run-time limit; jobs stop after the current batch."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason: str | None = None

    def set(self, reason: str = "request") -> None:
        if not self._event.is_set():
            self.reason = reason
        self._event.set()

    def sleep(self, seconds: float) -> None:
        """Sleep up to `seconds`, returning within STOP_POLL_SECONDS once the flag is set.

        It polls instead of calling wait(), because the SIGTERM handler sets
        the flag in the main thread. In CPython 3.11, Event guards its state
        with a non-reentrant Lock, so Event.set() in a handler that ran while
        this thread held that lock inside Event.wait() would deadlock.
        """
        deadline = time.monotonic() + seconds
        while not self():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            time.sleep(min(remaining, STOP_POLL_SECONDS))

    def __call__(self) -> bool:
        return self._event.is_set()


@contextmanager
def stop_on_signals(flag: StopFlag) -> Iterator[None]:
    """Route SIGTERM and SIGINT to the flag (main thread only); a second signal kills."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if flag():
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
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
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


def start(
    engine: Engine,
    job: str,
    parameters: Any,
    *,
    trigger: str,
    run_key: str | None = None,
) -> ActiveRun:
    """Take the job's lock and record a running run; the caller must call run()."""
    if job not in JOBS:
        raise KeyError(f"unknown job {job!r}; known jobs: {', '.join(sorted(JOBS))}")
    host, pid = socket.gethostname(), os.getpid()
    stored = to_json(parameters)
    stack = ExitStack()
    try:
        acquired = stack.enter_context(job_lock(engine, job))
        if not acquired:
            _refuse(engine, job, stored, trigger, run_key, host, pid)
        for abandoned in ledger.mark_abandoned_runs(engine, job):
            log_event(logger, "run_marked_interrupted", logging.WARNING, job=job,
                      run_id=abandoned)
        try:
            run = ledger.start_run(engine, job=job, trigger=trigger, parameters=stored,
                                   host=host, pid=pid, run_key=run_key)
        except IntegrityError:
            if run_key is None:
                raise
            # A replica that this lock refused can record its skipped row
            # under the run key before the holder inserts its own. The lock
            # holder still runs the fire time, in that row.
            run = ledger.take_over_skipped_run(engine, job=job, run_key=run_key,
                                               trigger=trigger, parameters=stored,
                                               host=host, pid=pid)
            if run is None:
                raise FireTimeClaimed(job, run_key) from None
    except BaseException:
        stack.close()
        raise
    log_event(logger, "run_started", job=job, run_id=run.id, trigger=trigger,
              run_key=run_key, host=host, pid=pid)
    return ActiveRun(engine, run, parameters, stack)


def _refuse(engine, job, stored, trigger, run_key, host, pid) -> None:
    active = _wait_for_active_run(engine, job)
    active_id = active.id if active else None
    try:
        skipped = ledger.start_run(
            engine, job=job, trigger=trigger, parameters=stored, host=host, pid=pid,
            run_key=run_key, status=ledger.SKIPPED, blocked_by_run_id=active_id,
        )
    except IntegrityError:
        if run_key is None:
            raise
        raise FireTimeClaimed(job, run_key, active_id) from None
    log_event(logger, "run_skipped", logging.WARNING, job=job, run_id=skipped.id,
              active_run_id=active_id, trigger=trigger, run_key=run_key)
    raise RunRefused(job, active_id, skipped.id)


def _wait_for_active_run(engine: Engine, job: str) -> ledger.RunRow | None:
    """Return job's running row, waiting up to ACTIVE_RUN_WAIT_SECONDS for it to appear.

    The lock holder records its run just after taking the lock, so an attempt
    refused in between would otherwise find no active run to name.
    """
    deadline = time.monotonic() + ACTIVE_RUN_WAIT_SECONDS
    while True:
        active = ledger.active_run(engine, job)
        if active is not None or time.monotonic() >= deadline:
            return active
        time.sleep(0.02)


class ActiveRun:
    """A recorded run that holds its job's lock until run() returns."""

    def __init__(self, engine: Engine, run: ledger.RunRow, parameters: Any,
                 lock: ExitStack) -> None:
        self.engine = engine
        self.record = run
        self.parameters = parameters
        self.stop = StopFlag()
        self._lock = lock

    def run(
        self,
        *,
        progress: Callable[[int, int | None], None] | None = None,
        handle_signals: bool = True,
        retry: RetryPolicy = RetryPolicy(),
        max_seconds: float | None = None,
        listeners: tuple[Listener, ...] = (),
    ) -> tuple[ledger.RunRow, JobResult]:
        """Run the job, record the outcome and release the lock.

        Raises RunFailed when the job fails for good. A run stopped by a
        signal is recorded as interrupted; one stopped by max_seconds as failed.
        """
        signals = stop_on_signals(self.stop) if handle_signals else _no_signals()
        # The signal handlers go in first, so that a SIGTERM during the start
        # notification, which may call a heartbeat URL, also stops cleanly.
        with self._lock, signals:
            _notify(listeners, "start", self.record)
            timer = self._start_timer(max_seconds)
            try:
                finished, result = self._run_with_retries(progress, retry, max_seconds)
            except RunFailed as failure:
                _notify(listeners, "fail", failure.run)
                raise
            finally:
                if timer:
                    timer.cancel()
        _notify(listeners, "fail" if finished.status == ledger.FAILED else "success", finished)
        return finished, result

    def _start_timer(self, max_seconds: float | None) -> threading.Timer | None:
        if not max_seconds:
            return None
        timer = threading.Timer(max_seconds, self.stop.set, args=("max run time",))
        timer.daemon = True
        timer.start()
        return timer

    def _run_with_retries(self, progress, retry: RetryPolicy, max_seconds):
        started = time.monotonic()
        attempt = 0
        while True:
            try:
                result = self._call_job(progress)
                break
            except Exception as exc:
                attempt += 1
                if not is_transient(exc) or attempt > retry.attempts or self.stop():
                    self._fail(exc, started)
                delay = retry.delay(attempt)
                log_event(logger, "run_retrying", logging.WARNING, job=self.record.job,
                          run_id=self.record.id, attempt=attempt, delay=round(delay, 2),
                          error=_describe(exc))
                # sleep(), not wait(): see StopFlag.sleep on the signal handler.
                self.stop.sleep(delay)
                if self.stop():
                    self._fail(exc, started)
        return self._finish(result, started, max_seconds)

    def _call_job(self, progress) -> JobResult:
        run = self.record
        last_heartbeat = time.monotonic()

        def on_progress(done: int, total: int | None) -> None:
            nonlocal last_heartbeat
            if progress:
                progress(done, total)
            if time.monotonic() - last_heartbeat >= HEARTBEAT_SECONDS:
                ledger.heartbeat(self.engine, run.id, done)
                last_heartbeat = time.monotonic()

        job_logger = logging.getLogger(f"voucher_jobs.jobs.{run.job.replace('-', '_')}")

        def log(event: str, **fields: Any) -> None:
            level = logging.DEBUG if event.endswith("_batch") else logging.INFO
            log_event(job_logger, event, level, run_id=run.id, **fields)

        context = JobContext(run_id=run.id, stop_requested=self.stop,
                             progress=on_progress, log=log, sleep=self.stop.sleep)
        return JOBS[run.job](self.engine, self.parameters, context)

    def _fail(self, exc: Exception, started: float):
        error = _describe(exc)
        finished = ledger.finish_run(self.engine, self.record.id, status=ledger.FAILED,
                                     error=error)
        log_event(logger, "run_failed", logging.ERROR, job=self.record.job,
                  run_id=self.record.id, error=error,
                  seconds=round(time.monotonic() - started, 3))
        raise RunFailed(finished) from exc

    def _finish(self, result: JobResult, started: float, max_seconds):
        seconds = round(time.monotonic() - started, 3)
        details = {**result.details, "dry_run": result.dry_run, "seconds": seconds}
        status, error = ledger.SUCCEEDED, None
        if result.interrupted and self.stop.reason == "max run time":
            status = ledger.FAILED
            error = f"stopped after exceeding the maximum run time of {max_seconds} s"
        elif result.interrupted:
            status, error = ledger.INTERRUPTED, f"stopped by {self.stop.reason}"
        finished = ledger.finish_run(
            self.engine, self.record.id, status=status, rows_affected=result.rows_affected,
            result=to_json(details), error=error,
        )
        level = logging.INFO if status == ledger.SUCCEEDED else logging.WARNING
        log_event(logger, "run_finished", level, job=finished.job, run_id=finished.id,
                  status=status, rows=result.rows_affected, dry_run=result.dry_run,
                  seconds=seconds)
        return finished, result


def execute(
    engine: Engine,
    job: str,
    parameters: Any,
    *,
    trigger: str,
    run_key: str | None = None,
    progress: Callable[[int, int | None], None] | None = None,
    handle_signals: bool = True,
    retry: RetryPolicy = RetryPolicy(),
    max_seconds: float | None = None,
    listeners: tuple[Listener, ...] = (),
) -> tuple[ledger.RunRow, JobResult]:
    """Start and run a job in this thread; see start() and ActiveRun.run()."""
    active = start(engine, job, parameters, trigger=trigger, run_key=run_key)
    return active.run(progress=progress, handle_signals=handle_signals, retry=retry,
                      max_seconds=max_seconds, listeners=listeners)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _notify(listeners: tuple[Listener, ...], event: str, run: ledger.RunRow) -> None:
    for listener in listeners:
        try:
            listener(event, run)
        except Exception as exc:  # noqa: BLE001 - a listener never fails the run
            log_event(logger, "listener_failed", logging.WARNING, run_id=run.id,
                      event=event, error=_describe(exc))


@contextmanager
def _no_signals() -> Iterator[None]:
    yield

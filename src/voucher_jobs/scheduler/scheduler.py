"""The scheduler: starts each enabled job at its cron fire times, once across replicas.

One background thread computes fire times and starts runs through the
runner. Each run then executes in a thread of its own, so a long run delays
neither the other job nor the attempt at its own next fire time. That
attempt meets the job's lock and is recorded as skipped, so runs of one job
never overlap.

Every fire time carries a run key (see history.py). When several replicas
start the same fire time, the ledger's unique index lets one of them run it.
The others raise FireTimeClaimed or RunRefused, which are logged as
`fire_time_skipped`.

Missed fire times: at start, and whenever the thread finds a fire time more
than STALL_SECONDS late or finds a later fire time already passed, it runs
one catch-up for the latest fire time that has passed. That happens only
when the ledger has no row with that fire time's run key and the fire time
is at most catchup_max_lateness_seconds old. When another replica has
recorded that row and a run of the job is active, the catch-up logs
`fire_time_skipped` with the active run's id.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import datetime, timedelta, timezone
from typing import Any

import anyio.to_thread
from sqlalchemy import Engine

from voucher_jobs import logs, runner
from voucher_jobs.config import Settings, load_settings
from voucher_jobs.data import ledger, migrate
from voucher_jobs.data.engine import engine_from_settings
from voucher_jobs.job_settings import build_parameters, run_options
from voucher_jobs.jobs import JOBS
from voucher_jobs.logs import log_event
from voucher_jobs.scheduler import history
from voucher_jobs.scheduler.cron import FireTime, Schedule, job_enabled, job_schedule

logger = logging.getLogger(__name__)

TRIGGER = "scheduler"
# A fire time handled this late, or with a later one already passed, means
# the scheduler thread stalled (a suspended host, a hung database call), so
# the catch-up rules apply instead of a plain start.
STALL_SECONDS = 60.0
# The maximum sleep between two reads of the clock, so that a wall-clock
# jump is noticed within this many seconds.
TICK_SECONDS = 1.0
# Counting missed fire times stops at this number. A schedule that fires
# every minute reaches it after about 69 days of downtime.
MISSED_COUNT_LIMIT = 100_000

Clock = Callable[[], datetime]


def system_clock() -> datetime:
    return datetime.now(timezone.utc)


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(timezone.utc).isoformat()


class Scheduler:
    """Runs the enabled jobs at their fire times until stop() is called.

    Raises ScheduleError at construction when any job's cron expression or
    the time zone is invalid, including the expressions of disabled jobs.
    `clock` returns the current time as an aware datetime; tests pass their
    own to move time without waiting.
    """

    def __init__(self, settings: Settings, engine: Engine, *, clock: Clock | None = None,
                 tick_seconds: float = TICK_SECONDS) -> None:
        self.settings = settings
        self.engine = engine
        self.clock = clock or system_clock
        self.tick_seconds = tick_seconds
        self.schedules: dict[str, Schedule] = {job: job_schedule(job, settings) for job in JOBS}
        self.enabled = {job: schedule for job, schedule in self.schedules.items()
                        if job_enabled(job, settings)}
        self._stopping = threading.Event()
        self._stop_reason = "scheduler stop"
        self._thread: threading.Thread | None = None
        self._guard = threading.Lock()
        self._runs: dict[int, tuple[runner.ActiveRun, threading.Thread]] = {}

    # Life cycle

    def start(self) -> None:
        """Start the scheduler thread and return at once."""
        if self._thread is not None:
            raise RuntimeError("this Scheduler was already started. Create a new one to "
                               "start again.")
        if not self.enabled:
            log_event(logger, "no_job_enabled", logging.WARNING,
                      jobs=",".join(self.schedules))
        for job, schedule in self.enabled.items():
            log_event(logger, "job_scheduled", job=job, schedule=schedule.expression,
                      timezone=schedule.zone_name)
        self._thread = threading.Thread(target=self._loop, name="voucher-jobs-scheduler",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None, reason: str = "scheduler stop") -> bool:
        """Stop scheduling, let active runs finish their current batch, and wait.

        Each active run is recorded as interrupted with `reason`. Returns
        True when the scheduler thread and every run ended within timeout
        seconds (None waits without a limit).
        """
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        log_event(logger, "scheduler_stopping", reason=reason,
                  active_runs=len(self.active_run_ids()))
        self._stop_reason = reason
        self._stopping.set()
        self._stop_active_runs(reason)
        if self._thread is not None:
            self._thread.join(_remaining(deadline))
        # The thread may have started one more run while stopping. That run
        # got the stop flag at registration, and this call waits for it too.
        self._stop_active_runs(reason)
        with self._guard:
            threads = [thread for _, thread in self._runs.values()]
        for thread in threads:
            thread.join(_remaining(deadline))
        finished = not self.is_alive() and not self.active_run_ids()
        log_event(logger, "scheduler_stopped", logging.INFO if finished else logging.WARNING,
                  reason=reason, finished=finished, active_runs=len(self.active_run_ids()))
        return finished

    def is_alive(self) -> bool:
        """Return whether the scheduler thread is running."""
        return self._thread is not None and self._thread.is_alive()

    def active_run_ids(self) -> list[int]:
        """Return the ledger ids of the runs this scheduler has in progress."""
        with self._guard:
            return sorted(self._runs)

    def _stop_active_runs(self, reason: str) -> None:
        with self._guard:
            active = [run for run, _ in self._runs.values()]
        for run in active:
            run.stop.set(reason)

    # The scheduler thread

    def _loop(self) -> None:
        log_event(logger, "scheduler_started", jobs=",".join(self.enabled) or "none",
                  tick_seconds=self.tick_seconds)
        plans: dict[str, FireTime] = {}
        now = self.clock()
        for job, schedule in self.enabled.items():
            self._guarded(job, self._catch_up, job, schedule, now, "start")
            # Planned after the same instant the catch-up looked at, so a
            # fire time that passes during the catch-up is still handled.
            plans[job] = self._plan(job, schedule, now)
        while not self._stopping.is_set():
            now = self.clock()
            for job, planned in plans.items():
                if now >= planned.utc and not self._stopping.is_set():
                    schedule = self.enabled[job]
                    self._guarded(job, self._handle_due, job, schedule, planned, now)
                    plans[job] = self._plan(job, schedule, now)
            self._stopping.wait(self._sleep_seconds(plans))

    def _sleep_seconds(self, plans: dict[str, FireTime]) -> float:
        if not plans:
            return self.tick_seconds
        earliest = min(planned.utc for planned in plans.values())
        remaining = (earliest - self.clock()).total_seconds()
        return min(self.tick_seconds, max(0.0, remaining))

    def _plan(self, job: str, schedule: Schedule, after: datetime) -> FireTime:
        planned = schedule.next_fire_time(after)
        log_event(logger, "next_fire_time", logging.DEBUG, job=job,
                  fire_time=_iso(planned.utc), local_time=planned.local.isoformat(),
                  dst_change_day=planned.dst_change_day)
        return planned

    def _guarded(self, job: str, action: Callable[..., None], *args: Any) -> None:
        """Call action, logging and swallowing its errors so one failure never ends the thread."""
        try:
            action(*args)
        except Exception as exc:  # noqa: BLE001 - the loop must outlive any one error
            logger.error("scheduler_error", exc_info=True, extra={"fields": {
                "job": job, "error": f"{type(exc).__name__}: {exc}"}})

    def _handle_due(self, job: str, schedule: Schedule, planned: FireTime,
                    now: datetime) -> None:
        latest = schedule.latest_fire_time(now, not_before=planned.utc)
        on_time = now - planned.utc <= timedelta(seconds=STALL_SECONDS)
        if latest is not None and latest.utc == planned.utc and on_time:
            self._fire(job, planned, catch_up=False)
        else:
            self._catch_up(job, schedule, now, "stall")

    def _catch_up(self, job: str, schedule: Schedule, now: datetime, cause: str) -> None:
        """Run the latest passed fire time once if no replica ran it and it is recent enough."""
        max_lateness = timedelta(seconds=self.settings.catchup_max_lateness_seconds)
        last_recorded = history.last_scheduled_fire_time(self.engine, job)
        # With no scheduled run in the ledger, only fire times within the
        # lateness limit count as missed.
        counted_after = last_recorded or now - max_lateness - timedelta(microseconds=1)
        latest = schedule.latest_fire_time(
            now, not_before=counted_after + timedelta(microseconds=1))
        if latest is None:
            # The newest passed fire time has a ledger row already.
            if last_recorded is not None and now - last_recorded <= max_lateness:
                self._report_claimed(job, last_recorded, cause)
            return
        key = history.run_key(job, latest.utc)
        if history.run_key_recorded(self.engine, key):
            self._report_claimed(job, latest.utc, cause)
            return
        missed = schedule.count_fire_times(counted_after, now, MISSED_COUNT_LIMIT)
        lateness = (now - latest.utc).total_seconds()
        fields = dict(job=job, fire_time=_iso(latest.utc), run_key=key, cause=cause,
                      missed_fire_times=missed, last_scheduled_fire_time=_iso(last_recorded),
                      lateness_seconds=round(lateness, 3))
        if lateness > max_lateness.total_seconds():
            log_event(logger, "catch_up_skipped", logging.WARNING, **fields,
                      reason="too_late", max_lateness_seconds=max_lateness.total_seconds())
            return
        # With no scheduled run in the ledger, this is the first start of a
        # scheduler on this database: the fire time was not missed by an
        # outage, so it is not worth a warning.
        level = logging.WARNING if last_recorded is not None else logging.INFO
        log_event(logger, "catch_up_started", level, **fields)
        self._fire(job, latest, catch_up=True)

    def _report_claimed(self, job: str, fire_time: datetime, cause: str) -> None:
        """Log fire_time_skipped for a catch-up whose fire time is claimed while a run is active.

        Replicas that start together race for the same catch-up. The ones
        that find its run key recorded log the active run, as a refused
        start does. With no active run, the fire time was handled earlier,
        and nothing is logged.
        """
        active = ledger.active_run(self.engine, job)
        if active is None:
            return
        log_event(logger, "fire_time_skipped", job=job, fire_time=_iso(fire_time),
                  run_key=history.run_key(job, fire_time), reason="claimed",
                  active_run_id=active.id, cause=cause, catch_up=True)

    def _fire(self, job: str, fire: FireTime, *, catch_up: bool) -> None:
        key = history.run_key(job, fire.utc)
        parameters = build_parameters(job, self.settings)
        try:
            active = runner.start(self.engine, job, parameters, trigger=TRIGGER, run_key=key)
        except runner.FireTimeClaimed as claimed:
            log_event(logger, "fire_time_skipped", job=job, fire_time=_iso(fire.utc),
                      run_key=key, reason="claimed", active_run_id=claimed.active_run_id,
                      catch_up=catch_up)
            return
        except runner.RunRefused as refused:
            log_event(logger, "fire_time_skipped", logging.WARNING, job=job,
                      fire_time=_iso(fire.utc), run_key=key, reason="job_running",
                      active_run_id=refused.active_run_id,
                      skipped_run_id=refused.skipped_run_id, catch_up=catch_up)
            return
        except Exception as exc:  # noqa: BLE001 - a failed start must not end the loop
            log_event(logger, "fire_time_failed", logging.ERROR, job=job,
                      fire_time=_iso(fire.utc), run_key=key,
                      error=f"{type(exc).__name__}: {exc}")
            return
        thread = threading.Thread(target=self._run, args=(job, fire, active),
                                  name=f"voucher-jobs-run-{active.record.id}", daemon=True)
        with self._guard:
            self._runs[active.record.id] = (active, thread)
            if self._stopping.is_set():
                active.stop.set(self._stop_reason)
        thread.start()

    def _run(self, job: str, fire: FireTime, active: runner.ActiveRun) -> None:
        run_id = active.record.id
        try:
            active.run(
                handle_signals=False,
                **run_options(job, self.settings),
            )
        except runner.RunFailed as failure:
            log_event(logger, "scheduled_run_failed", logging.ERROR, job=job, run_id=run_id,
                      fire_time=_iso(fire.utc), error=failure.run.error)
        except Exception as exc:  # noqa: BLE001 - logged here, the thread has no caller
            log_event(logger, "scheduled_run_failed", logging.ERROR, job=job, run_id=run_id,
                      fire_time=_iso(fire.utc), error=f"{type(exc).__name__}: {exc}")
        finally:
            with self._guard:
                self._runs.pop(run_id, None)


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    return max(0.0, deadline - time.monotonic())


def scheduler_lifespan(
    settings: Settings | None = None, *, engine: Engine | None = None
) -> Callable[[Any], AbstractAsyncContextManager[None]]:
    """Return a lifespan that runs a Scheduler for as long as the web app runs.

    Usage: `FastAPI(lifespan=scheduler_lifespan())`. The settings default to
    load_settings() and the engine to one for their DATABASE_URL, created at
    start-up and disposed at shutdown. Start-up fails with ScheduleError or
    SchemaNotReady before the app serves requests. The scheduler is stored
    as `app.state.scheduler`; shutdown stops it and waits for active runs to
    finish their current batch.
    """

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        # A web app that has not set up logging would hide every scheduler
        # event, so voucher-jobs' own handler goes in unless the app has one.
        if not logging.getLogger("voucher_jobs").handlers and not logging.getLogger().handlers:
            logs.configure()
        active_settings = settings or load_settings()
        owned = engine is None
        database = engine_from_settings(active_settings) if engine is None else engine
        try:
            migrate.require_current(database)
            scheduler = Scheduler(active_settings, database)
            scheduler.start()
            state = getattr(app, "state", None)
            if state is not None:
                state.scheduler = scheduler
            try:
                yield
            finally:
                await anyio.to_thread.run_sync(
                    lambda: scheduler.stop(reason="web server shutdown"))
        finally:
            if owned:
                database.dispose()

    return lifespan

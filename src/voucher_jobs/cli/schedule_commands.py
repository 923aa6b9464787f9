"""`voucher-jobs schedule` and `voucher-jobs scheduler`: show the schedules, run them."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Annotated

import typer

from voucher_jobs.cli.errors import CliError, ExitCode
from voucher_jobs.cli.main import _ready_engine, _settings, app, stdout
from voucher_jobs.config import ENV_NAMES, Settings
from voucher_jobs.jobs import JOBS
from voucher_jobs.runner import StopFlag, stop_on_signals
from voucher_jobs.scheduler import Scheduler
from voucher_jobs.scheduler.cron import FireTime, Schedule, job_enabled, job_schedule

# How often the foreground process checks for a stop request and that the
# scheduler thread is alive.
WATCH_SECONDS = 0.2


def _schedules(settings: Settings) -> dict[str, Schedule]:
    """Validate every job's schedule. A ScheduleError ends the command with exit code 2."""
    return {job: job_schedule(job, settings) for job in JOBS}


@app.command("schedule")
def show_schedule(
    count: Annotated[int, typer.Option(
        "--count", min=1, max=1000, help="How many fire times to show for each job.")] = 10,
) -> None:
    """Print each job's cron expression, time zone, state and next fire times.

    Each fire time is shown in the schedule's time zone and in UTC. A fire
    time on a day when the zone's UTC offset changes (a daylight saving time
    start or end) is marked "DST change day". Reads only the settings, not
    the database.
    """
    settings = _settings()
    now = datetime.now(timezone.utc)
    for job, schedule in _schedules(settings).items():
        enabled_name = ENV_NAMES[f"{job.replace('-', '_')}_enabled"]
        state = "enabled" if job_enabled(job, settings) else f"disabled by {enabled_name}"
        stdout.print(f"{job}: {schedule.expression!r} in {schedule.zone_name}, {state}",
                     markup=False)
        for fire in schedule.next_fire_times(now, count):
            stdout.print(f"  {_describe(fire)}", markup=False)


def _describe(fire: FireTime) -> str:
    local = fire.local
    offset = local.isoformat()[-6:]
    line = (f"{local:%Y-%m-%d %H:%M} {local.tzname()} ({offset})  "
            f"{fire.utc:%Y-%m-%d %H:%M} UTC")
    if fire.dst_change_day:
        line += "  DST change day"
    return line


@app.command("scheduler")
def run_scheduler() -> None:
    """Run the scheduler in the foreground until SIGTERM or SIGINT.

    Starts each enabled job at its fire times (`voucher-jobs schedule` lists
    them) on the database at DATABASE_URL. Several scheduler processes may
    share one database, and no fire time runs twice. On SIGTERM or SIGINT the
    active run finishes its current batch and is recorded as interrupted,
    and the process exits with 0. A second signal ends it at once.
    """
    settings = _settings()
    _schedules(settings)
    engine = _ready_engine(settings)
    try:
        scheduler = Scheduler(settings, engine)
        flag = StopFlag()
        with stop_on_signals(flag):
            scheduler.start()
            # Polls with sleep() instead of flag.wait(): the signal handler
            # sets the flag in this thread, and Event.set() deadlocks if the
            # handler runs while Event.wait() holds the event's lock.
            while not flag() and scheduler.is_alive():
                time.sleep(WATCH_SECONDS)
            scheduler.stop(reason=flag.reason or "scheduler thread ended")
        if not flag():
            raise CliError("the scheduler thread ended without a stop request. The log "
                           "above shows why.", ExitCode.RUN_FAILED)
    finally:
        engine.dispose()

"""The state of each job for GET /jobs: schedule, next fire time and last run."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import Engine, select

from voucher_jobs.config import Settings
from voucher_jobs.data import ledger
from voucher_jobs.data.schema import runs
from voucher_jobs.http.schemas import Job, Run
from voucher_jobs.scheduler.cron import ScheduleError, job_enabled, job_schedule


def job_status(engine: Engine, settings: Settings, job: str, prefix: str = "") -> Job:
    """Describe job from the settings, its cron schedule and the run ledger."""
    heartbeat_url: str | None = getattr(settings, f"{job.replace('-', '_')}_heartbeat_url")
    enabled = job_enabled(job, settings)
    expression: str = getattr(settings, f"{job.replace('-', '_')}_schedule")
    fire_time, error = None, None
    try:
        schedule = job_schedule(job, settings)
        if enabled:
            fire_time = schedule.next_fire_time(datetime.now(timezone.utc)).local
    except ScheduleError as exc:
        error = str(exc)
    active = ledger.active_run(engine, job)
    last = _last_run(engine, job)
    return Job(
        name=job,
        schedule=expression,
        timezone=settings.schedule_timezone,
        enabled=enabled,
        next_fire_time=fire_time,
        schedule_error=error,
        heartbeat_configured=bool(heartbeat_url and heartbeat_url.strip()),
        active_run_id=active.id if active else None,
        last_run=Run.from_row(last, prefix) if last else None,
    )


def _last_run(engine: Engine, job: str) -> ledger.RunRow | None:
    query = (
        select(runs)
        .where(runs.c.job == job, runs.c.status != ledger.SKIPPED)
        .order_by(runs.c.id.desc())
        .limit(1)
    )
    with engine.connect() as connection:
        row = connection.execute(query).first()
    return ledger.RunRow(**row._mapping) if row else None

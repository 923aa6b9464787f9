"""Run keys and the scheduler's queries on the run ledger.

A run key is `<job>@<fire time in UTC>`, such as
`voucher-expired@2026-12-04T02:00:00Z`. The ledger's unique index on it is
what makes a fire time run once across replicas. The fixed-width UTC form
sorts in time order, so the newest key of a job is its text maximum.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import Engine, func, select

from voucher_jobs.data.schema import runs

KEY_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def run_key(job: str, fire_time: datetime) -> str:
    """Return the run key of job's fire time."""
    return f"{job}@{fire_time.astimezone(timezone.utc).strftime(KEY_TIME_FORMAT)}"


def fire_time_of(job: str, key: str) -> datetime | None:
    """Return the fire time in job's run key, or None when key is not in that form."""
    prefix = f"{job}@"
    if not key.startswith(prefix):
        return None
    try:
        return datetime.strptime(key[len(prefix):], KEY_TIME_FORMAT).replace(
            tzinfo=timezone.utc)
    except ValueError:
        return None


def run_key_recorded(engine: Engine, key: str) -> bool:
    """Return whether the ledger has a row, of any status, with this run key."""
    with engine.connect() as connection:
        found = connection.execute(
            select(runs.c.id).where(runs.c.run_key == key).limit(1)
        ).first()
    return found is not None


def last_scheduled_fire_time(engine: Engine, job: str) -> datetime | None:
    """Return the newest fire time of job with a ledger row, or None when there is none."""
    with engine.connect() as connection:
        newest = connection.execute(
            select(func.max(runs.c.run_key)).where(
                runs.c.job == job, runs.c.run_key.startswith(f"{job}@", autoescape=True)
            )
        ).scalar_one()
    return None if newest is None else fire_time_of(job, newest)

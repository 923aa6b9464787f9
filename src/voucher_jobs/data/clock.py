"""The one clock that decides "now" for every run: the database server's.

Every job reads the time once, when its run starts, with `database_now`, and
passes that instant to each batch as a bound parameter. Reading it from the
database, not from the host running the job, keeps replicas with drifting
clocks in agreement. On PostgreSQL it is `statement_timestamp()` (microsecond
precision); on SQLite, which runs inside this process, it is the host's
clock read by SQLite (millisecond precision).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Connection, select

from voucher_jobs.data.types import as_utc, current_utc


def database_now(connection: Connection) -> datetime:
    """Return the database clock's current time, timezone-aware UTC."""
    value = connection.execute(select(current_utc())).scalar_one()
    return as_utc(value)


class FutureReferenceTime(ValueError):
    """A reference time later than the database clock."""


def check_reference_time(requested: datetime | None, now: datetime) -> datetime:
    """Return requested (or now when None), rejecting an instant after now.

    A reference time in the future would expire vouchers before their expiry
    and put the archival cutoff closer to now than the retention allows. The
    CLI and the HTTP API call this; the job functions take any instant, so
    that tests can run them at fixed times.
    """
    if requested is None:
        return now
    requested = as_utc(requested)
    if requested > now:
        raise FutureReferenceTime(
            f"reference time {requested.isoformat()} is later than the database clock "
            f"({now.isoformat()}). Use a time in the past, or leave it out to use now."
        )
    return requested

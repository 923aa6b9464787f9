"""The data sets of the benchmark suite and the SQL that generates them.

The database makes every row in INSERT ... SELECT statements over a number
series, as voucher_jobs.data.sample does, so no row passes through Python.
Each row number n gets a position in time. In the append layout the
position rises with n, and so with the id: the table looks like one that an
application appended to over the years. In the shuffled layout the position
is n times a prime modulo the row count, a permutation, so the times are
the same set of values spread over the ids and pages in no order. The two
layouts hold the same values; only their physical order differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, bindparam, text

from voucher_jobs.data.sample import AUDIT_ACTIONS, VOUCHER_TYPES
from voucher_jobs.data.types import UTCDateTime

LAYOUTS = ("append", "shuffled")
# The CLI's default retention; every archival step is given it explicitly.
RETENTION_DAYS = 730
# Voucher expiries spread over this many days, the expired share before the
# reference time and the rest after it.
EXPIRY_SPREAD_DAYS = 800
VOUCHER_VALIDITY_DAYS = 90
# Every DELETED_EVERY-th voucher is soft-deleted and never expires.
DELETED_EVERY = 20
# The newest audit row of a data set is this many seconds older than its
# reference time.
NEWEST_AUDIT_AGE_SECONDS = 60
# Multipliers for the shuffled layout; the first one coprime with the row
# count makes (n * multiplier) mod count a permutation.
_SHUFFLE_PRIMES = (7919, 7927, 7933)

_SERIES = {
    "postgresql": "SELECT generate_series(CAST(:first AS BIGINT), CAST(:last AS BIGINT)) AS n",
    "sqlite": (
        "WITH RECURSIVE series(n) AS (SELECT :first UNION ALL SELECT n + 1 FROM series "
        "WHERE n < :last) SELECT n FROM series"
    ),
}


@dataclass(frozen=True)
class ExpiryCase:
    """A voucher-expired data set: vouchers, the share expired, the share already logged.

    It also contains one audit row per voucher, so that the seed algorithm's
    lookup of an EXPIRED row searches a populated index.
    """

    layout: str
    vouchers: int
    expired_percent: int
    logged_percent: int

    @property
    def template_tag(self) -> str:
        return f"x{_short(self.vouchers)}_e{self.expired_percent}_{self.layout[:3]}"

    @property
    def label(self) -> str:
        return (f"{self.layout}, {self.vouchers:,} vouchers, {self.expired_percent}% expired, "
                f"{self.logged_percent}% logged")


@dataclass(frozen=True)
class ArchivalCase:
    """An audit-archival data set: audit rows and the share older than the retention."""

    layout: str
    audit_rows: int
    eligible_percent: int

    @property
    def template_tag(self) -> str:
        return f"a{_short(self.audit_rows)}_p{self.eligible_percent}_{self.layout[:3]}"

    @property
    def label(self) -> str:
        return (f"{self.layout}, {self.audit_rows:,} audit rows, {self.eligible_percent}% "
                "past retention")


def _short(count: int) -> str:
    for divisor, suffix in ((1_000_000, "m"), (1_000, "k")):
        if count >= divisor and count % divisor == 0:
            return f"{count // divisor}{suffix}"
    return str(count)


def _position(layout: str, count: int) -> str:
    """SQL for row n's position in time, 0 to count - 1."""
    if layout == "append":
        return "(n - 1)"
    multiplier = next(p for p in _SHUFFLE_PRIMES if count % p)
    return f"(((n - 1) * {multiplier}) % {count})"


def _plus_seconds(dialect: str, base: str, seconds: str) -> str:
    """SQL for base + seconds, in the column format of voucher-jobs' UTCDateTime."""
    if dialect == "postgresql":
        return f"({base} + ({seconds}) * interval '1 second')"
    return f"(strftime('%Y-%m-%d %H:%M:%f', {base}, ({seconds}) || ' seconds') || '000')"


def _code(dialect: str, number: str) -> str:
    if dialect == "postgresql":
        return f"('B' || lpad(CAST({number} AS text), 9, '0'))"
    return f"('B' || printf('%09d', {number}))"


def _chunks(count: int, chunk_rows: int) -> list[tuple[int, int]]:
    return [(first, min(first + chunk_rows - 1, count))
            for first in range(1, count + 1, chunk_rows)]


def fill_vouchers(engine: Engine, case: ExpiryCase, now: datetime, chunk_rows: int) -> int:
    """Insert the case's vouchers; those at positions up to the expired share have expired.

    A voucher's expiry is now - expired share of the spread + position *
    spread / count, and it was created VOUCHER_VALIDITY_DAYS before that.
    """
    dialect = engine.dialect.name
    spread = EXPIRY_SPREAD_DAYS * 86_400
    before_now = spread * case.expired_percent // 100
    position = _position(case.layout, case.vouchers)
    offset = f"(({position} * {spread}) / {case.vouchers} - {before_now})"
    deleted_at = _plus_seconds(dialect, ":now", "-86400")
    types = " ".join(f"WHEN {i} THEN '{name}'" for i, name in enumerate(VOUCHER_TYPES))
    statement = text(
        f"""
        INSERT INTO vouchers (code, type, expiry_date, deleted_at, created_at)
        SELECT {_code(dialect, "n")},
               CASE (n % {len(VOUCHER_TYPES)}) {types} END,
               {_plus_seconds(dialect, ":now", offset)},
               CASE WHEN n % {DELETED_EVERY} = 0 THEN {deleted_at} END,
               {_plus_seconds(dialect, ":now", f"{offset} - {VOUCHER_VALIDITY_DAYS * 86_400}")}
        FROM ({_SERIES[dialect]}) AS series
        ORDER BY n
        """
    ).bindparams(bindparam("now", now, UTCDateTime()))
    inserted = 0
    for first, last in _chunks(case.vouchers, chunk_rows):
        with engine.begin() as connection:
            inserted += connection.execute(statement, {"first": first, "last": last}).rowcount
    return inserted


def fill_audit_rows(
    engine: Engine,
    count: int,
    eligible_percent: int,
    layout: str,
    now: datetime,
    chunk_rows: int,
    vouchers: int,
) -> int:
    """Insert count audit rows of which eligible_percent are older than the retention.

    The rows span RETENTION_DAYS / (1 - eligible share) days and end
    NEWEST_AUDIT_AGE_SECONDS before now. Row n belongs to voucher
    (n - 1) mod vouchers + 1.
    """
    if not 0 <= eligible_percent < 100:
        raise ValueError(f"eligible_percent={eligible_percent} must be 0 to 99")
    dialect = engine.dialect.name
    span = RETENTION_DAYS * 86_400 * 100 // (100 - eligible_percent)
    offset = (f"(({_position(layout, count)} * {span}) / {count} - {span} "
              f"- {NEWEST_AUDIT_AGE_SECONDS})")
    voucher_id = f"((n - 1) % {max(vouchers, 1)} + 1)"
    actions = " ".join(f"WHEN {i} THEN '{name}'" for i, name in enumerate(AUDIT_ACTIONS))
    metadata = (
        "jsonb_build_object('source', 'benchmark', 'n', n)"
        if dialect == "postgresql"
        else "json_object('source', 'benchmark', 'n', n)"
    )
    statement = text(
        f"""
        INSERT INTO voucher_audit_logs
            (voucher_id, action, actor_type, code, metadata, created_at)
        SELECT {voucher_id},
               CASE (n % {len(AUDIT_ACTIONS)}) {actions} END,
               CASE WHEN n % 3 = 0 THEN 'USER' ELSE 'ADMIN' END,
               {_code(dialect, voucher_id)},
               {metadata},
               {_plus_seconds(dialect, ":now", offset)}
        FROM ({_SERIES[dialect]}) AS series
        ORDER BY n
        """
    ).bindparams(bindparam("now", now, UTCDateTime()))
    inserted = 0
    for first, last in _chunks(count, chunk_rows):
        with engine.begin() as connection:
            inserted += connection.execute(statement, {"first": first, "last": last}).rowcount
    return inserted

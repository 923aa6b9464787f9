"""Generated sample data for the demo, the tests and the benchmarks.

Rows are made by the database in one INSERT ... SELECT over a number series
(generate_series on PostgreSQL, a recursive CTE on SQLite), so a million
vouchers take seconds and no row passes through Python. Values are spread
by arithmetic on the row number, so the same arguments give the same data.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import Engine, bindparam, func, select, text

from voucher_jobs.data.schema import voucher_audit_logs, vouchers
from voucher_jobs.data.types import UTCDateTime

VOUCHER_TYPES = ("PERCENTAGE", "FIXED_AMOUNT", "FREE_SHIPPING")
AUDIT_ACTIONS = ("CREATED", "UPDATED", "REDEEMED", "VIEWED")

# A row number n maps to an offset of (n * 7919) mod span seconds; 7919 is
# prime, so offsets are spread evenly over the span and rarely repeat.
_SPREAD = 7919

_SERIES = {
    "postgresql": "SELECT generate_series(1, CAST(:count AS BIGINT)) AS n",
    "sqlite": (
        "WITH RECURSIVE series(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM series "
        "WHERE n < :count) SELECT n FROM series"
    ),
}


def _plus_seconds(dialect: str, base: str, seconds: str) -> str:
    """SQL for base + seconds, in the column format of UTCDateTime."""
    if dialect == "postgresql":
        return f"({base} + ({seconds}) * interval '1 second')"
    return f"(strftime('%Y-%m-%d %H:%M:%f', {base}, ({seconds}) || ' seconds') || '000')"


def insert_vouchers(
    engine: Engine,
    count: int,
    now: datetime,
    *,
    past_days: int = 400,
    future_days: int = 400,
    deleted_every: int = 20,
    code_prefix: str = "V",
) -> int:
    """Insert count vouchers whose expiries spread from now-past_days to now+future_days.

    Every deleted_every-th voucher is soft-deleted. Codes are code_prefix
    plus a zero-padded number, continuing after the existing vouchers.
    """
    dialect = engine.dialect.name
    span = (past_days + future_days) * 86_400
    with engine.begin() as connection:
        start = connection.execute(select(func.count()).select_from(vouchers)).scalar_one()
        offset = f"(((n + {start}) * {_SPREAD}) % {span}) - {past_days * 86_400}"
        expiry = _plus_seconds(dialect, ":now", offset)
        created = _plus_seconds(dialect, ":now", f"{offset} - 7776000")
        deleted = _plus_seconds(dialect, ":now", "-86400")
        code = (
            f"'{code_prefix}' || lpad(CAST(n + {start} AS text), 9, '0')"
            if dialect == "postgresql"
            else f"'{code_prefix}' || printf('%09d', n + {start})"
        )
        types = " ".join(
            f"WHEN {i} THEN '{name}'" for i, name in enumerate(VOUCHER_TYPES)
        )
        statement = text(
            f"""
            INSERT INTO vouchers (code, type, expiry_date, deleted_at, created_at)
            SELECT {code},
                   CASE (n % {len(VOUCHER_TYPES)}) {types} END,
                   {expiry},
                   CASE WHEN n % {deleted_every} = 0 THEN {deleted} END,
                   {created}
            FROM ({_SERIES[dialect]}) AS series
            """
        ).bindparams(bindparam("now", now, UTCDateTime()), bindparam("count", count))
        return connection.execute(statement).rowcount


def insert_audit_history(
    engine: Engine, count: int, now: datetime, *, years: float = 4.0, vouchers_count: int = 1
) -> int:
    """Insert count audit rows evenly spread over the past `years`, in time order.

    Ids rise with created_at, as they do in a table that the application
    appends to.
    """
    dialect = engine.dialect.name
    span = int(years * 365 * 86_400)
    step = span / max(count, 1)
    start = now - timedelta(seconds=span)
    created = _plus_seconds(dialect, ":start", f"CAST(n * {step} AS BIGINT)")
    actions = " ".join(f"WHEN {i} THEN '{name}'" for i, name in enumerate(AUDIT_ACTIONS))
    metadata = (
        "jsonb_build_object('source', 'sample', 'n', n)"
        if dialect == "postgresql"
        else "json_object('source', 'sample', 'n', n)"
    )
    statement = text(
        f"""
        INSERT INTO voucher_audit_logs
            (voucher_id, action, actor_type, code, metadata, created_at)
        SELECT (n % {max(vouchers_count, 1)}) + 1,
               CASE (n % {len(AUDIT_ACTIONS)}) {actions} END,
               CASE WHEN n % 3 = 0 THEN 'USER' ELSE 'ADMIN' END,
               NULL,
               {metadata},
               {created}
        FROM ({_SERIES[dialect]}) AS series
        ORDER BY n
        """
    ).bindparams(bindparam("start", start, UTCDateTime()), bindparam("count", count))
    with engine.begin() as connection:
        return connection.execute(statement).rowcount


def table_counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as connection:
        return {
            table.name: connection.execute(select(func.count()).select_from(table)).scalar_one()
            for table in (vouchers, voucher_audit_logs)
        }

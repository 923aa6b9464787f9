"""voucher-expired: one EXPIRED audit row per voucher per expiry instant.

The rule, used everywhere a voucher's state is decided: a voucher has
expired at reference time T when it is not soft-deleted (`deleted_at IS
NULL`) and `expiry_date <= T`, compared to the microsecond. A voucher whose
expiry is exactly T has expired; one microsecond later it has not.

The job is state-based, not window-based: each run looks at every live
voucher whose expiry has passed and that has no row in
`voucher_jobs_expirations` for its current expiry instant. A run that is
late by hours or weeks catches up in full, and a voucher whose expiry is
moved gets one more row once the new instant passes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Engine,
    Select,
    bindparam,
    exists,
    func,
    insert,
    literal,
    select,
)

from voucher_jobs.data.clock import database_now
from voucher_jobs.data.engine import connect_for_reads
from voucher_jobs.data.statements import id_in, insert_ignoring_conflicts
from voucher_jobs.data.schema import expirations, voucher_audit_logs, vouchers
from voucher_jobs.data.types import (
    BigId,
    UTCDateTime,
    as_utc,
    iso_utc,
    json_object,
    string_literal,
)
from voucher_jobs.jobs.base import BatchLimits, JobContext, JobResult

NAME = "voucher-expired"
ACTION = "EXPIRED"
ACTOR_TYPE = "SYSTEM"


@dataclass(frozen=True)
class ExpiryParameters:
    """Parameters of one voucher-expired run.

    `reference_time` None means the database clock at run start.
    """

    reference_time: datetime | None = None
    dry_run: bool = False
    limits: BatchLimits = BatchLimits()


def pending_vouchers(
    reference_time: datetime, after_id: int | None = None, upper_id: int | None = None
) -> Select:
    """Select live vouchers expired at reference_time with no EXPIRED row yet.

    after_id and upper_id limit the voucher ids to after_id < id <= upper_id.
    """
    already_logged = exists().where(
        expirations.c.voucher_id == vouchers.c.id,
        expirations.c.expiry_date == vouchers.c.expiry_date,
    )
    query = select(vouchers.c.id).where(
        vouchers.c.deleted_at.is_(None),
        vouchers.c.expiry_date <= bindparam("reference_time", reference_time, UTCDateTime()),
    )
    # Each bound is given for both tables. PostgreSQL does not derive
    # expirations.voucher_id > after_id from the join condition, so without
    # it a merge anti join reads every claim below after_id in every batch.
    if after_id is not None:
        query = query.where(vouchers.c.id > after_id)
        already_logged = already_logged.where(expirations.c.voucher_id > after_id)
    if upper_id is not None:
        query = query.where(vouchers.c.id <= upper_id)
        already_logged = already_logged.where(expirations.c.voucher_id <= upper_id)
    return query.where(~already_logged)


def run(engine: Engine, parameters: ExpiryParameters, context: JobContext) -> JobResult:
    """Write the missing EXPIRED rows in batches of at most batch_size vouchers."""
    # The count reads every expired voucher, so on SQLite it must not hold
    # the write lock that the application's writes wait for.
    with connect_for_reads(engine) as connection:
        reference_time = (
            as_utc(parameters.reference_time)
            if parameters.reference_time
            else database_now(connection)
        )
        pending_ids = pending_vouchers(reference_time).subquery()
        pending, lowest_id, highest_id = connection.execute(
            select(func.count(), func.min(pending_ids.c.id), func.max(pending_ids.c.id))
        ).one()
        connection.rollback()
    context.log(
        "expiry_started",
        reference_time=reference_time.isoformat(),
        pending=pending,
        dry_run=parameters.dry_run,
    )
    details = {"reference_time": reference_time.isoformat(), "pending_at_start": pending}
    if parameters.dry_run:
        return JobResult(rows_affected=0, dry_run=True, details={**details, "would_write": pending})
    if pending == 0:
        # The count has just compared every expired voucher with its claims.
        # A first batch would repeat that whole scan only to find nothing.
        details.update(batches=0, written=0, last_voucher_id=0)
        return JobResult(rows_affected=0, details=details)

    limits = parameters.limits
    started = time.monotonic()
    batches = 0
    # A retry of this run, after a transient error, goes on after the
    # highest voucher that an earlier attempt claimed. Starting from 0 again
    # would put that attempt's claims inside the first batch's id range, and
    # the batch would write their EXPIRED rows a second time.
    written, claimed_up_to = _claimed_by_run(engine, context.run_id)
    # The walk covers the vouchers that were pending at the start: no voucher
    # below the lowest of them needs a row, and one above the highest is
    # left for the next run.
    after_id = max(claimed_up_to, lowest_id - 1)
    interrupted = False
    sizer = limits.sizer()
    context.progress(0, pending)
    while after_id < highest_id:
        batch_started = time.monotonic()
        upper_id, full, inserted = _expire_batch(
            engine, reference_time, after_id, highest_id, sizer.size, context.run_id
        )
        elapsed = time.monotonic() - batch_started
        sizer.record(elapsed, inserted, full)
        batches += 1
        written += inserted
        after_id = upper_id
        context.progress(written, pending)
        context.log("expiry_batch", batch=batches, written=inserted, last_voucher_id=upper_id,
                    ms=round(elapsed * 1000, 1), next_size=sizer.size)
        if context.stop_requested():
            interrupted = True
            break
        if limits.reached(batches, started):
            break
        if limits.pause_seconds:
            context.sleep(limits.pause_seconds)
            # A stop requested during the pause ends the run before the next batch.
            if context.stop_requested():
                interrupted = True
                break

    details.update(batches=batches, written=written, last_voucher_id=after_id, **sizer.details())
    return JobResult(rows_affected=written, interrupted=interrupted, details=details)


def _claimed_by_run(engine: Engine, run_id: int) -> tuple[int, int]:
    """Return how many vouchers run_id has claimed and the highest voucher id among them."""
    with engine.connect() as connection:
        count, highest = connection.execute(
            select(func.count(), func.max(expirations.c.voucher_id)).where(
                expirations.c.run_id == run_id
            )
        ).one()
    return count, highest or 0


def _expire_batch(
    engine: Engine, reference_time: datetime, after_id: int, end_id: int, batch_size: int,
    run_id: int,
) -> tuple[int, bool, int]:
    """Log the expired vouchers among the next batch_size vouchers above after_id.

    The batch covers the id range (after_id, upper], where upper is the id
    of the batch_size-th voucher above after_id, or end_id when fewer are
    left; a read of the primary key index finds it. Returns upper, whether
    the range held batch_size vouchers, and the number of EXPIRED rows
    written. One transaction.

    Safe under concurrency: the claim in `voucher_jobs_expirations` goes
    first, with ON CONFLICT DO NOTHING on its (voucher_id, expiry_date) key.
    When two runs race for a voucher, the second one's insert waits for the
    first one's transaction and then inserts nothing. The audit rows are
    written only for the claims that this statement's RETURNING lists, so a
    claim made by another run, or by an earlier attempt of this run, never
    gets a second row.
    """
    with engine.begin() as connection:
        upper_id = connection.execute(
            select(vouchers.c.id)
            .where(vouchers.c.id > after_id, vouchers.c.id <= end_id)
            .order_by(vouchers.c.id)
            .offset(batch_size - 1)
            .limit(1)
        ).scalar()
        full = upper_id is not None
        upper_id = upper_id if full else end_id
        claims = pending_vouchers(reference_time, after_id, upper_id).add_columns(
            vouchers.c.expiry_date,
            literal(run_id, BigId),
            bindparam("logged_at", reference_time, UTCDateTime()),
        )
        claim = (
            insert_ignoring_conflicts(engine, expirations, ["voucher_id", "expiry_date"])
            .from_select(["voucher_id", "expiry_date", "run_id", "logged_at"], claims)
        )
        if engine.dialect.name == "postgresql":
            written = _claim_and_log_postgresql(connection, claim, reference_time, run_id)
        else:
            written = _claim_and_log_sqlite(connection, claim, reference_time, run_id)
        return upper_id, full, written


def _audit_rows(claims: Any, reference_time: datetime, run_id: int) -> Select:
    """Select one EXPIRED audit row for each claim in `claims`."""
    return select(
        vouchers.c.id,
        string_literal(ACTION),
        string_literal(ACTOR_TYPE),
        vouchers.c.code,
        json_object(
            string_literal("type"),
            vouchers.c.type,
            string_literal("expiry_date"),
            iso_utc(claims.c.expiry_date),
            string_literal("run_id"),
            literal(run_id, BigId),
        ),
        bindparam("created_at", reference_time, UTCDateTime()),
    ).select_from(claims.join(vouchers, vouchers.c.id == claims.c.voucher_id))


_AUDIT_COLUMNS = ["voucher_id", "action", "actor_type", "code", "metadata", "created_at"]


def _claim_and_log_postgresql(connection, claim, reference_time: datetime, run_id: int) -> int:
    # One statement: the claim insert's RETURNING feeds the audit insert, so
    # the rows go exactly to the claims this statement made, and no id list
    # travels to the client and back.
    claimed = claim.returning(expirations.c.voucher_id, expirations.c.expiry_date).cte("claimed")
    logged = (
        insert(voucher_audit_logs)
        .from_select(_AUDIT_COLUMNS, _audit_rows(claimed, reference_time, run_id))
        .returning(voucher_audit_logs.c.id)
        .cte("logged")
    )
    return connection.execute(select(func.count()).select_from(logged)).scalar_one()


def _claim_and_log_sqlite(connection, claim, reference_time: datetime, run_id: int) -> int:
    # SQLite has no INSERT inside WITH, so the claimed ids come back and the
    # audit insert selects those claims of this run.
    claimed_ids = connection.execute(claim.returning(expirations.c.voucher_id)).scalars().all()
    if not claimed_ids:
        return 0
    mine = select(expirations.c.voucher_id, expirations.c.expiry_date).where(
        expirations.c.run_id == run_id,
        id_in(connection.engine, expirations.c.voucher_id, claimed_ids),
    ).subquery("claimed")
    result = connection.execute(
        insert(voucher_audit_logs)
        .from_select(_AUDIT_COLUMNS, _audit_rows(mine, reference_time, run_id))
        .returning(voucher_audit_logs.c.id)
    )
    # RETURNING, because the driver reports no rowcount for INSERT ... SELECT
    # here. The batch is bounded, so the list is small.
    return len(result.fetchall())

"""voucher-expired on real databases: boundary, idempotence, late runs, re-expiry."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select, update

from tests.conftest import T0, Database
from voucher_jobs.data.schema import expirations, voucher_audit_logs, vouchers
from voucher_jobs.jobs import voucher_expired
from voucher_jobs.jobs.base import BatchLimits
from voucher_jobs.runner import execute


def expire(db: Database, at=T0, batch_size: int = 1000, dry_run: bool = False):
    parameters = voucher_expired.ExpiryParameters(
        reference_time=at, dry_run=dry_run, limits=BatchLimits(batch_size=batch_size)
    )
    run, result = execute(db.engine, voucher_expired.NAME, parameters, trigger="test",
                          handle_signals=False)
    return run, result


def expired_rows(db: Database, voucher_id: int | None = None):
    query = select(voucher_audit_logs).where(voucher_audit_logs.c.action == "EXPIRED")
    if voucher_id is not None:
        query = query.where(voucher_audit_logs.c.voucher_id == voucher_id)
    return db.rows(query.order_by(voucher_audit_logs.c.id))


def test_expiry_exact_instant_is_expired(db: Database) -> None:
    voucher = db.add_voucher(T0)
    run, _ = expire(db, at=T0)
    assert run.rows_affected == 1
    assert len(expired_rows(db, voucher)) == 1


def test_expiry_one_microsecond_later_is_not(db: Database) -> None:
    voucher = db.add_voucher(T0 + timedelta(microseconds=1))
    run, _ = expire(db, at=T0)
    assert run.rows_affected == 0
    assert expired_rows(db, voucher) == []


def test_expired_row_content(db: Database) -> None:
    voucher = db.add_voucher(T0 - timedelta(hours=1), type="FIXED_AMOUNT", code="SPRING-10")
    run, _ = expire(db)
    [row] = expired_rows(db, voucher)
    assert row.actor_type == "SYSTEM"
    assert row.code == "SPRING-10"
    assert row.metadata["type"] == "FIXED_AMOUNT"
    assert row.metadata["expiry_date"] == "2026-12-04T09:00:00.000000Z"
    assert row.metadata["run_id"] == run.id
    assert row.created_at == T0


def test_three_runs_write_once(db: Database) -> None:
    ids = [db.add_voucher(T0 - timedelta(days=d)) for d in range(1, 6)]
    deleted = db.add_voucher(T0 - timedelta(days=2), deleted_at=T0 - timedelta(days=1))
    written = [expire(db)[0].rows_affected for _ in range(3)]
    assert written == [5, 0, 0]
    for voucher in ids:
        assert len(expired_rows(db, voucher)) == 1
    assert expired_rows(db, deleted) == []


def test_late_run_catches_up_everything(db: Database) -> None:
    # Expiries over the past week and one five hours ago: a run after a week
    # of downtime logs all of them, not only the last day's.
    ids = [db.add_voucher(T0 - timedelta(days=d, hours=5)) for d in range(8)]
    run, _ = expire(db)
    assert run.rows_affected == 8
    assert {row.voucher_id for row in expired_rows(db)} == set(ids)


def test_extended_expiry_logs_again(db: Database) -> None:
    first_expiry = T0 - timedelta(days=1)
    voucher = db.add_voucher(first_expiry)
    assert expire(db, at=T0)[0].rows_affected == 1

    second_expiry = first_expiry + timedelta(days=1, hours=1)
    with db.engine.begin() as connection:
        connection.execute(update(vouchers).where(vouchers.c.id == voucher)
                           .values(expiry_date=second_expiry))
    # The new expiry has not passed yet at T0.
    assert expire(db, at=T0)[0].rows_affected == 0
    later = second_expiry
    assert expire(db, at=later)[0].rows_affected == 1
    assert expire(db, at=later + timedelta(days=3))[0].rows_affected == 0

    rows = expired_rows(db, voucher)
    assert [row.metadata["expiry_date"] for row in rows] == [
        "2026-12-03T10:00:00.000000Z",
        "2026-12-04T11:00:00.000000Z",
    ]


@pytest.mark.parametrize("batch_size", [1, 7, 1000])
def test_batch_size_does_not_change_result(db: Database, batch_size: int) -> None:
    for i in range(30):
        db.add_voucher(T0 - timedelta(minutes=i), deleted_at=T0 if i % 10 == 0 else None)
    for i in range(5):
        db.add_voucher(T0 + timedelta(minutes=i + 1))
    run, result = expire(db, batch_size=batch_size)
    assert run.rows_affected == 27
    assert len(expired_rows(db)) == 27
    # A batch covers batch_size vouchers, expired or not, from the lowest
    # pending id (2: voucher 1 is deleted) to the highest (30): 29 vouchers.
    assert result.details["batches"] == -(-29 // batch_size)


def test_batches_cover_ids_not_only_pending_vouchers(db: Database) -> None:
    # Pending vouchers far apart: each batch covers the next vouchers by id,
    # so the walk ends at the highest pending id, and the future vouchers
    # after it are never read.
    ids = [db.add_voucher(T0 - timedelta(days=1) if i % 4 == 0 else T0 + timedelta(days=1))
           for i in range(40)]
    run, result = expire(db, batch_size=5)
    assert run.rows_affected == 10
    assert [row.voucher_id for row in expired_rows(db)] == ids[0:40:4]
    # ids[0] to ids[36]: 37 vouchers in batches of 5.
    assert result.details["batches"] == 8
    assert result.details["last_voucher_id"] == ids[36]


def test_dry_run_writes_nothing(db: Database) -> None:
    db.add_voucher(T0 - timedelta(days=1))
    db.add_voucher(T0 - timedelta(days=2))
    run, result = expire(db, dry_run=True)
    assert result.details["would_write"] == 2
    assert run.rows_affected == 0
    assert expired_rows(db) == []
    assert db.count(expirations) == 0


def test_archived_expired_row_is_not_rewritten(db: Database) -> None:
    voucher = db.add_voucher(T0 - timedelta(days=800))
    expire(db)
    with db.engine.begin() as connection:
        connection.execute(voucher_audit_logs.delete())
    # The audit row is gone (archived), the claim is not: no second row.
    assert expire(db)[0].rows_affected == 0
    assert expired_rows(db, voucher) == []


def test_repeated_batch_writes_no_duplicate(db: Database) -> None:
    # A retried attempt of one run can walk over vouchers that its earlier
    # attempt claimed: only claims made by the batch itself get a row.
    ids = [db.add_voucher(T0 - timedelta(days=1)) for _ in range(5)]
    upper, full, written = voucher_expired._expire_batch(db.engine, T0, 0, 10**6, 3, run_id=7)
    assert (upper, full, written) == (ids[2], True, 3)
    sixth = db.add_voucher(T0 - timedelta(days=1))
    upper, full, written = voucher_expired._expire_batch(db.engine, T0, 0, 10**6, 10, run_id=7)
    assert (upper, full, written) == (10**6, False, 3)
    assert len(expired_rows(db, sixth)) == 1
    assert len(expired_rows(db)) == 6
    for voucher in ids:
        assert len(expired_rows(db, voucher)) == 1

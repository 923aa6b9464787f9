"""BatchSizer: batch sizes that follow a time target."""

from __future__ import annotations

from voucher_jobs.jobs.base import MAX_BATCH_ROWS, BatchLimits, BatchSizer


def test_quick_batches_double_up_to_the_cap() -> None:
    sizer = BatchSizer(1000, target_seconds=0.05)
    sizer.record(0.001, 1000)
    assert sizer.size == 2000
    for _ in range(20):
        sizer.record(0.001, sizer.size)
    assert sizer.size == MAX_BATCH_ROWS


def test_slow_batch_shrinks_in_proportion() -> None:
    sizer = BatchSizer(10_000, target_seconds=0.05)
    sizer.record(0.1, 10_000)
    assert sizer.size == 5000
    # At most a quarter per batch, however slow.
    sizer.record(10.0, 5000)
    assert sizer.size == 1250


def test_size_near_the_target_stays() -> None:
    sizer = BatchSizer(4000, target_seconds=0.05)
    for seconds in (0.045, 0.055, 0.0601, 0.041):
        sizer.record(seconds, 4000)
    assert sizer.size == 4000


def test_short_last_batch_does_not_change_size() -> None:
    sizer = BatchSizer(1000, target_seconds=0.05)
    sizer.record(0.001, 12)
    assert sizer.size == 1000


def test_never_below_the_minimum() -> None:
    sizer = BatchSizer(100, target_seconds=0.001)
    for _ in range(10):
        sizer.record(1.0, sizer.size)
    assert sizer.size == 10
    tiny = BatchSizer(3, target_seconds=0.001)
    tiny.record(1.0, 3)
    assert tiny.size == 3


def test_fixed_size_without_target() -> None:
    sizer = BatchLimits(batch_size=500).sizer()
    sizer.record(0.002, 500)
    sizer.record(0.3, 500)
    sizer.record(0.01, 200)
    assert sizer.size == 500
    assert sizer.details() == {
        "longest_batch_ms": 300.0, "largest_batch_rows": 500, "batch_target_ms": None,
    }

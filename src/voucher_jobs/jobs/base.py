"""The context a job receives from the runner, and the result it returns."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


def _never() -> bool:
    return False


def _ignore_progress(done: int, total: int | None) -> None:
    return None


@dataclass
class JobContext:
    """Run-scoped services a job uses between batches.

    `stop_requested` turns true on SIGTERM or SIGINT; a job checks it after
    each committed batch and after each pause, and returns early, so no batch
    is cut in half. The runner's `sleep` returns early once a stop is
    requested. `progress` receives rows done and, where known, the total.
    """

    run_id: int
    stop_requested: Callable[[], bool] = _never
    progress: Callable[[int, int | None], None] = _ignore_progress
    log: Callable[..., None] = lambda event, **fields: None
    sleep: Callable[[float], None] = time.sleep


@dataclass
class JobResult:
    """The outcome of one job run; `details` is stored in the run ledger."""

    rows_affected: int
    dry_run: bool = False
    interrupted: bool = False
    details: dict[str, Any] = field(default_factory=dict)


# No batch grows beyond this many rows, whatever its time target allows.
MAX_BATCH_ROWS = 100_000
# A batch shrinks to no fewer rows than this, unless it started smaller.
MIN_BATCH_ROWS = 10


@dataclass(frozen=True)
class BatchLimits:
    """Bounds on one run: batch size, how many batches, how long, and pauses.

    `batch_size` is the number of rows of the first batch. With
    `target_seconds` set, later batches grow or shrink so that each one
    takes about that long (see BatchSizer); with None, every batch has
    `batch_size` rows.
    """

    batch_size: int = 1000
    max_batches: int | None = None
    max_seconds: float | None = None
    pause_seconds: float = 0.0
    target_seconds: float | None = None

    def sizer(self) -> BatchSizer:
        return BatchSizer(self.batch_size, self.target_seconds)

    def reached(self, batches: int, started: float) -> bool:
        if self.max_batches is not None and batches >= self.max_batches:
            return True
        if self.max_seconds is not None:
            return time.monotonic() - started >= self.max_seconds
        return False


@dataclass
class BatchSizer:
    """The row count of the next batch, steered by how long batches take.

    A commit costs about the same whatever the batch holds, so batches of a
    few rows spend most of their time committing, while batches of very many
    rows hold their locks for long. After each batch, `record` scales the
    size by target / elapsed: up to twice as many rows when the batch was
    quick, down to a quarter when it was slow. Inside 0.8 to 1.25 times the
    target the size stays, so that noise does not make it swing. A batch
    that found fewer rows than it asked for (the end of the work) does not
    change the size. The sizer also keeps the longest batch time and the
    most rows one batch removed, for the run record.
    """

    size: int
    target_seconds: float | None = None
    longest_seconds: float = 0.0
    largest: int = 0
    minimum: int = field(init=False)

    def __post_init__(self) -> None:
        self.minimum = min(self.size, MIN_BATCH_ROWS)

    def record(self, seconds: float, rows: int, full: bool | None = None) -> None:
        """Account one committed batch of `rows` rows that took `seconds`.

        `full` is true when the batch had as much work as it asked for; by
        default, whether it had `size` rows.
        """
        self.longest_seconds = max(self.longest_seconds, seconds)
        self.largest = max(self.largest, rows)
        if full is None:
            full = rows >= self.size
        if not self.target_seconds or not full:
            return
        ratio = self.target_seconds / max(seconds, 1e-4)
        if 0.8 <= ratio <= 1.25:
            return
        factor = min(2.0, max(0.25, ratio))
        self.size = max(self.minimum, min(MAX_BATCH_ROWS, round(self.size * factor)))

    def details(self) -> dict[str, Any]:
        """Figures for the run record."""
        return {
            "longest_batch_ms": round(self.longest_seconds * 1000, 1),
            "largest_batch_rows": self.largest,
            "batch_target_ms": (
                round(self.target_seconds * 1000) if self.target_seconds else None
            ),
        }

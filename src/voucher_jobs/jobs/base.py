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


@dataclass(frozen=True)
class BatchLimits:
    """Bounds on one run: batch size, how many batches, how long, and pauses."""

    batch_size: int = 1000
    max_batches: int | None = None
    max_seconds: float | None = None
    pause_seconds: float = 0.0

    def reached(self, batches: int, started: float) -> bool:
        if self.max_batches is not None and batches >= self.max_batches:
            return True
        if self.max_seconds is not None:
            return time.monotonic() - started >= self.max_seconds
        return False

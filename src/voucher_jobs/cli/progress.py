"""Progress for long runs: a bar on a terminal, a log line every 10 s otherwise."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from voucher_jobs.logs import log_event

logger = logging.getLogger(__name__)
LOG_INTERVAL_SECONDS = 10.0

Reporter = Callable[[int, "int | None"], None]


@contextmanager
def progress_reporter(job: str, enabled: bool = True) -> Iterator[Reporter]:
    """Yield a callback taking (rows done, total rows or None)."""
    if enabled and sys.stderr.isatty():
        with Progress(
            TextColumn(f"{job}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        ) as bar:
            task = bar.add_task(job, total=None)

            def update(done: int, total: int | None) -> None:
                bar.update(task, completed=done, total=total)

            yield update
        return

    last = time.monotonic()

    def log_progress(done: int, total: int | None) -> None:
        nonlocal last
        if not enabled or time.monotonic() - last < LOG_INTERVAL_SECONDS:
            return
        last = time.monotonic()
        log_event(logger, "progress", job=job, done=done, total=total)

    yield log_progress

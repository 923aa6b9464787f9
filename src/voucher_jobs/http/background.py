"""Runs started over HTTP, each in a thread of its own until it finishes."""

from __future__ import annotations

import logging
import threading
import time

from voucher_jobs.config import Settings
from voucher_jobs.job_settings import run_options
from voucher_jobs.logs import log_event
from voucher_jobs.runner import ActiveRun, RunFailed

logger = logging.getLogger(__name__)

SHUTDOWN_REASON = "web server shutdown"


class BackgroundRuns:
    """The runs this process started over HTTP and has not finished yet."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._runs: dict[int, tuple[threading.Thread, ActiveRun]] = {}
        self._guard = threading.Lock()

    def launch(self, active: ActiveRun) -> None:
        """Run active in a new thread; the thread releases the job's lock when done."""
        run_id = active.record.id
        # A daemon thread does not keep the process alive if a batch hangs
        # after stop_all gave up waiting. The ledger row of such a run stays
        # running until the next start of the job marks it interrupted.
        thread = threading.Thread(
            target=self._run, args=(active,), name=f"run-{run_id}", daemon=True
        )
        with self._guard:
            self._runs[run_id] = (thread, active)
        thread.start()

    def active_ids(self) -> list[int]:
        with self._guard:
            return sorted(self._runs)

    def stop_all(self, timeout: float) -> list[int]:
        """Ask every run to stop after its current batch and wait up to timeout seconds.

        Returns the ids of the runs still going when the timeout passed.
        """
        with self._guard:
            runs = list(self._runs.items())
        for run_id, (_, active) in runs:
            log_event(logger, "run_stop_requested", job=active.record.job, run_id=run_id,
                      reason=SHUTDOWN_REASON)
            active.stop.set(SHUTDOWN_REASON)
        deadline = time.monotonic() + timeout
        for _, (thread, _) in runs:
            thread.join(max(0.0, deadline - time.monotonic()))
        return [run_id for run_id, (thread, _) in runs if thread.is_alive()]

    def _run(self, active: ActiveRun) -> None:
        job = active.record.job
        try:
            active.run(
                handle_signals=False,
                **run_options(job, self._settings),
            )
        except RunFailed:
            pass  # The runner has recorded and logged the failure.
        except Exception as exc:  # noqa: BLE001 - a thread has no caller to raise to
            log_event(logger, "background_run_error", logging.ERROR, job=job,
                      run_id=active.record.id, error=f"{type(exc).__name__}: {exc}")
        finally:
            with self._guard:
                self._runs.pop(active.record.id, None)

"""A FastAPI application that runs the voucher-jobs scheduler in each of its workers.

This stands for your own web app. The line that matters is
`FastAPI(lifespan=scheduler_lifespan())`: each worker process starts a
scheduler at start-up and stops it at shutdown. Run it from the repository
root with the same settings as the CLI (DATABASE_URL, the schedules, a
migrated database):

    DATABASE_URL=postgresql://jobs:secret@db.internal:5432/shop \\
        uvicorn deploy.fastapi.app:app --workers 4

Four workers run four schedulers on one database. The run key of each fire
time and the job lock let one worker run it. The other three log
`fire_time_skipped`, as deploy/VERIFIED.md shows.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request

from voucher_jobs.logs import KeyValueFormatter
from voucher_jobs.scheduler import scheduler_lifespan


class WorkerFormatter(KeyValueFormatter):
    """voucher-jobs' key=value log lines, prefixed with the worker's process id."""

    def format(self, record: logging.LogRecord) -> str:
        return f"[pid {record.process}] {super().format(record)}"


def log_voucher_jobs_events() -> None:
    """Send voucher-jobs' INFO events (runs, fire times, skips) to stderr.

    Without a handler only warnings reach stderr, through Python's last-resort
    handler, and the `fire_time_skipped` lines of the idle workers are lost.
    """
    handler = logging.StreamHandler()
    handler.setFormatter(WorkerFormatter())
    package_logger = logging.getLogger("voucher_jobs")
    package_logger.handlers[:] = [handler]
    package_logger.setLevel(logging.INFO)
    package_logger.propagate = False


log_voucher_jobs_events()

app = FastAPI(title="shop backend", lifespan=scheduler_lifespan())


@app.get("/healthz")
def healthz(request: Request) -> dict[str, object]:
    """Report whether this worker's scheduler thread is alive, and its active runs."""
    scheduler = request.app.state.scheduler
    return {
        "status": "ok" if scheduler.is_alive() else "scheduler stopped",
        "active_run_ids": scheduler.active_run_ids(),
    }

"""`voucher-jobs serve`: the HTTP API under uvicorn, optionally with the scheduler."""

from __future__ import annotations

import json
import os
import signal
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from voucher_jobs import logs
from voucher_jobs.cli.main import State, _ready_engine, _settings, app
from voucher_jobs.config import ENV_NAMES
from voucher_jobs.jobs import JOBS
from voucher_jobs.scheduler.cron import job_schedule

if TYPE_CHECKING:
    from fastapi import FastAPI

# FastAPI and uvicorn are imported inside the functions below: importing
# them takes about half a second, which every other command would pay.

# uvicorn starts each worker in a new process that builds the app with
# worker_app(); this variable carries the serve options to those processes.
SERVE_OPTIONS_ENV = "_VOUCHER_JOBS_SERVE_OPTIONS"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

# Every uvicorn log line, access lines included, goes to stderr in the
# format of voucher-jobs' own logs.
UVICORN_LOG_CONFIG: dict[str, Any] = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"key_value": {"()": "voucher_jobs.logs.KeyValueFormatter"}},
    "handlers": {
        "stderr": {
            "class": "logging.StreamHandler",
            "formatter": "key_value",
            "stream": "ext://sys.stderr",
        },
    },
    "loggers": {
        "uvicorn": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
        "uvicorn.error": {"level": "INFO"},
        "uvicorn.access": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
    },
}


@app.command("serve")
def serve(
    host: Annotated[Optional[str], typer.Option(
        "--host", help="Address to bind.",
        show_default="$VOUCHER_JOBS_API_HOST or 127.0.0.1")] = None,
    port: Annotated[Optional[int], typer.Option(
        "--port", min=1, max=65535, help="TCP port to bind.",
        show_default="$VOUCHER_JOBS_API_PORT or 8080")] = None,
    workers: Annotated[int, typer.Option(
        "--workers", min=1, max=64,
        help="Worker processes. Each one serves requests and, with --with-scheduler, "
        "runs a scheduler.")] = 1,
    with_scheduler: Annotated[bool, typer.Option(
        "--with-scheduler",
        help="Also run the scheduler in each worker process, so the jobs start on "
        "their cron schedules.")] = False,
) -> None:
    """Serve the HTTP API: start runs, list runs and jobs, /healthz and /metrics.

    Needs VOUCHER_JOBS_API_TOKEN, unless VOUCHER_JOBS_API_ALLOW_UNAUTHENTICATED=true
    and the host is a loopback address. The database must be migrated
    (`voucher-jobs db upgrade`). SIGTERM or Ctrl-C stops the server; runs it
    started stop after their current batch and are recorded as interrupted.
    """
    import uvicorn

    from voucher_jobs.http.auth import check_auth_settings

    settings = _settings()
    bind_host = host or settings.api_host
    bind_port = port or settings.api_port
    check_auth_settings(settings, bind_host)
    if with_scheduler:
        # Checked here so that an invalid schedule exits with code 2 and one
        # line, not with uvicorn's start-up failure.
        for job in JOBS:
            job_schedule(job, settings)
    _ready_engine(settings).dispose()

    # Worker processes read their settings from the environment, so the
    # command-line values must reach them there.
    os.environ[ENV_NAMES["api_host"]] = bind_host
    os.environ[ENV_NAMES["api_port"]] = str(bind_port)
    os.environ[SERVE_OPTIONS_ENV] = json.dumps(
        {"verbosity": State.verbose, "with_scheduler": with_scheduler}
    )
    # After a graceful shutdown uvicorn raises the stop signal again, with the
    # handlers it found restored, so that the default action ends the
    # process. A stop on request is the normal end of a server, so these
    # handlers ignore that second delivery and serve exits with code 0.
    previous = {sig: signal.signal(sig, _ignore_signal) for sig in STOP_SIGNALS}
    try:
        uvicorn.run(
            "voucher_jobs.cli.serve:worker_app",
            factory=True,
            host=bind_host,
            port=bind_port,
            workers=workers,
            log_config=UVICORN_LOG_CONFIG,
        )
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _ignore_signal(signum: int, frame: Any) -> None:
    return None


def worker_app() -> FastAPI:
    """Build the app in a uvicorn process, with the options `serve` was given."""
    from voucher_jobs.http.app import create_app

    options = json.loads(os.environ.get(SERVE_OPTIONS_ENV, "{}"))
    logs.configure(int(options.get("verbosity", 0)))
    return create_app(with_scheduler=bool(options.get("with_scheduler", False)))

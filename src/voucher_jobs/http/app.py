"""The FastAPI application: settings, database engine, error responses and lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from voucher_jobs import __version__
from voucher_jobs.config import Settings, load_settings
from voucher_jobs.data.engine import engine_from_settings
from voucher_jobs.http.auth import check_auth_settings
from voucher_jobs.http.background import BackgroundRuns
from voucher_jobs.http.routes import api, open_api
from voucher_jobs.logs import log_event
from voucher_jobs.metrics import ledger_registry
from voucher_jobs.scheduler import scheduler_lifespan

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 1024
# How long shutdown waits for background runs to stop after their current
# batch, which normally takes well under a second.
SHUTDOWN_WAIT_SECONDS = 30.0

DESCRIPTION = """Start runs of the voucher jobs, read the run ledger and scrape metrics.

Every endpoint except /healthz, /docs and /openapi.json needs the header
`Authorization: Bearer <VOUCHER_JOBS_API_TOKEN>`.
"""


def create_app(
    settings: Settings | None = None,
    engine: Engine | None = None,
    *,
    with_scheduler: bool = False,
) -> FastAPI:
    """Build the API on settings (default: the environment) and engine.

    An engine passed in stays the caller's to dispose of; one created here
    is disposed of at shutdown. Raises ConfigError when the settings allow
    no authentication on settings.api_host (see check_auth_settings).
    """
    settings = settings or load_settings()
    check_auth_settings(settings, settings.api_host)
    owns_engine = engine is None
    engine = engine or engine_from_settings(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            if owns_engine:
                stack.callback(engine.dispose)
            stack.push_async_callback(_stop_background_runs, app)
            if with_scheduler:
                # The scheduler shares this engine and leaves disposing of it to us.
                await stack.enter_async_context(scheduler_lifespan(settings, engine=engine)(app))
            log_event(logger, "api_started", authentication=_auth_mode(settings),
                      scheduler=with_scheduler)
            yield

    app = FastAPI(
        title="voucher-jobs",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    secret = settings.api_token.get_secret_value() if settings.api_token else None
    app.state.api_token = secret.encode("utf-8") if secret is not None else None
    app.state.background_runs = BackgroundRuns(settings)
    app.state.metrics_registry = ledger_registry(engine)
    app.include_router(open_api)
    app.include_router(api)
    app.add_exception_handler(RequestValidationError, _validation_failed)
    app.add_exception_handler(OperationalError, _database_unavailable)
    app.add_middleware(BodySizeLimit, max_bytes=MAX_BODY_BYTES)
    return app


class BodySizeLimit:
    """ASGI middleware: respond 413 in JSON to a request body above max_bytes.

    The body is read into memory before the app runs, up to max_bytes plus
    one, then handed to the app. That covers a chunked body, which declares
    no Content-Length, and a client whose Content-Length understates the body.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if "content-length" not in headers and "transfer-encoding" not in headers:
            await self.app(scope, receive, send)
            return
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # The client disconnected before sending the whole body.
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._reject(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = JSONResponse(
            status_code=status.HTTP_413_CONTENT_TOO_LARGE,
            content={"detail": f"The request body is larger than the maximum of "
                     f"{self.max_bytes} bytes."},
        )
        await response(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """Return a receive callable that yields body once, then defers to receive."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _auth_mode(settings: Settings) -> str:
    return "bearer-token" if settings.api_token is not None else "none (loopback only)"


async def _stop_background_runs(app: FastAPI) -> None:
    runs: BackgroundRuns = app.state.background_runs
    if not runs.active_ids():
        return
    log_event(logger, "api_stopping_runs", run_ids=runs.active_ids())
    left = await run_in_threadpool(runs.stop_all, SHUTDOWN_WAIT_SECONDS)
    if left:
        log_event(logger, "api_runs_still_running", logging.WARNING, run_ids=left,
                  waited_seconds=SHUTDOWN_WAIT_SECONDS)


def _describe_location(location: tuple[Any, ...]) -> str:
    if not location:
        return "request"
    kind, rest = location[0], [str(part) for part in location[1:]]
    if kind == "body":
        if not rest:
            return "body"
        if isinstance(location[1], int):
            return f"JSON body at position {location[1]}"
        return f"body field {'.'.join(rest)!r}"
    if kind in ("query", "path", "header", "cookie"):
        return f"{kind} parameter {'.'.join(rest)!r}"
    return ".".join(str(part) for part in location)


def _value_clause(error: Any) -> str:
    """Return " value <repr>" for a short scalar input, so the message names the value."""
    value = error.get("input")
    if error.get("type") == "json_invalid" or not isinstance(value, (str, int, float)):
        return ""
    text = repr(value)
    return f" value {text}" if len(text) <= 80 else ""


async def _validation_failed(request: Request, exc: Exception) -> JSONResponse:
    """Return 422 with FastAPI's error list, without echoed input, and one readable message.

    The message names the first invalid parameter or field and, when it is
    short, the value.
    """
    assert isinstance(exc, RequestValidationError)
    issues = [
        {"loc": list(error.get("loc", ())), "msg": error.get("msg", ""),
         "type": error.get("type", "")}
        for error in exc.errors()
    ]
    first = exc.errors()[0] if exc.errors() else {}
    reason = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    if first.get("type") == "json_invalid":
        reason = f"{reason}: {first.get('ctx', {}).get('error', 'invalid JSON')}"
    location = _describe_location(tuple(first.get("loc", ())))
    message = f"Invalid {location}{_value_clause(first)}: {reason}."
    return JSONResponse(status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
                        content={"message": message, "detail": issues})


async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """Return 503 when the database is unreachable or busy, without its URL or message.

    OperationalError also covers a lock timeout and SQLite's "database is
    locked", which are transient too, so a retry later is the right advice.
    """
    # The driver's message names the host, port and user, but never the password.
    original = getattr(exc, "orig", None) or exc
    lines = str(original).strip().splitlines()
    log_event(logger, "database_unavailable", logging.ERROR, method=request.method,
              path=request.url.path,
              error=f"{type(original).__name__}: {lines[0] if lines else ''}")
    return JSONResponse(
        status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        content={"detail": "The database is unavailable or busy. Try again later. "
                 "The server log names the error."},
    )

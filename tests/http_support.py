"""Helpers for the HTTP API and heartbeat tests.

- Monitor: a cron monitor on 127.0.0.1 that records every request.
- LogCapture: collects the formatted log lines of the loggers a test names.
- running_server: serves an app with uvicorn on 127.0.0.1 in a thread.
- BlockingJob: replaces a job and keeps its run active until released.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import uvicorn

from voucher_jobs.jobs.base import JobContext, JobResult
from voucher_jobs.logs import KeyValueFormatter

# The path part of a heartbeat URL is its secret at a real monitor.
HEARTBEAT_SECRET = "0f6c1c9e-heartbeat-secret-path"


@dataclass(frozen=True)
class MonitorRequest:
    method: str
    path: str
    body: str


class Monitor:
    """A cron monitor on 127.0.0.1 that records requests and responds with queued statuses.

    Each request takes the next status from `statuses` (200 once it is empty)
    after sleeping `delay` seconds.
    """

    def __init__(self) -> None:
        self.requests: list[MonitorRequest] = []
        self.statuses: deque[int] = deque()
        self.delay = 0.0
        self._changed = threading.Condition()
        monitor = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the name http.server calls
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length).decode("utf-8")
                time.sleep(monitor.delay)
                with monitor._changed:
                    status = monitor.statuses.popleft() if monitor.statuses else 200
                    monitor.requests.append(MonitorRequest("POST", self.path, body))
                    monitor._changed.notify_all()
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"OK")
                except (BrokenPipeError, ConnectionResetError):
                    pass  # The client gave up waiting, as a timeout test expects.

            def log_message(self, format: str, *args: Any) -> None:
                pass  # Keep the test output free of one line per request.

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/ping/{HEARTBEAT_SECRET}"

    @property
    def paths(self) -> list[str]:
        with self._changed:
            return [request.path for request in self.requests]

    def wait_for(self, count: int, timeout: float = 10.0) -> list[MonitorRequest]:
        """Wait until count requests have arrived; return them all."""
        with self._changed:
            arrived = self._changed.wait_for(lambda: len(self.requests) >= count, timeout)
            assert arrived, f"expected {count} monitor requests, got {self.requests}"
            return list(self.requests)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


class LogCapture(logging.Handler):
    """Collects formatted records of the named loggers at DEBUG and above."""

    def __init__(self, *names: str) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(KeyValueFormatter())
        self.lines: list[str] = []
        # Records stay referenced in _records, so their ids are not reused.
        self._records: list[logging.LogRecord] = []
        self._seen: set[int] = set()
        self._loggers = [logging.getLogger(name) for name in names]
        self._levels: list[int] = []

    def emit(self, record: logging.LogRecord) -> None:
        # A record reaches this handler once per named logger it propagates
        # through, such as voucher_jobs and then the root logger.
        if id(record) in self._seen:
            return
        self._seen.add(id(record))
        self._records.append(record)
        self.lines.append(self.format(record))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def events(self, event: str) -> list[str]:
        return [line for line in self.lines if f" {event}" in line]

    def __enter__(self) -> LogCapture:
        for logger in self._loggers:
            self._levels.append(logger.level)
            logger.setLevel(logging.DEBUG)
            logger.addHandler(self)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for logger, level in zip(self._loggers, self._levels):
            logger.removeHandler(self)
            logger.setLevel(level)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def running_server(app: Any) -> Iterator[str]:
    """Serve app with uvicorn on a free port of 127.0.0.1; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive(), "uvicorn stopped before it started serving"
            assert time.monotonic() < deadline, "uvicorn did not start within 10 s"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


class BlockingJob:
    """A replacement job whose run stays active until release() or a stop request."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self._released = threading.Event()

    def release(self) -> None:
        self._released.set()

    def __call__(self, engine: Any, parameters: Any, context: JobContext) -> JobResult:
        self.started.set()
        while not self._released.wait(0.01):
            if context.stop_requested():
                return JobResult(rows_affected=0, interrupted=True)
        return JobResult(rows_affected=0, dry_run=parameters.dry_run)

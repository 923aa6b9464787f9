"""A concurrent writer: the application inserting audit rows while a job runs.

Run as `python -m benchmarks.writer BACKEND TARGET RATE BUSY_TIMEOUT`, this
module is a child process that inserts one audit row (created_at now) per
1/RATE seconds on its own connection, each INSERT followed by a commit, as
an application request would. TARGET is a PostgreSQL URL or a SQLite file.
On SQLite the connection waits up to BUSY_TIMEOUT seconds for the write
lock, and then fails with "database is locked".

The child prints `ready` after its first insert (not measured) and inserts
until a line arrives on stdin. It then prints one JSON object with the start
time (Unix time) and latency in milliseconds of each insert, and the start
time, kind and message of each error. The parent keeps those that started
within the step it measures.

Latency runs from the start of the INSERT to the end of its commit, so a
wait for a lock shows as one slow insert. An insert that could not start on
time, because the one before it took longer than the interval, starts at
once, so the writer then runs fewer inserts than its rate. Latency
measured from the scheduled start instead would add the backlog of one
connection, which an application with a connection pool does not have.
"""

from __future__ import annotations

import json
import math
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SQLITE_LOCKED = "database is locked"
MIN_WINDOW_SECONDS = 1.0

_INSERT_POSTGRESQL = (
    "INSERT INTO voucher_audit_logs (voucher_id, action, actor_type, code, metadata, created_at) "
    "VALUES (1, 'UPDATED', 'USER', 'WRITER', '{\"source\": \"writer\"}', statement_timestamp())"
)
# The created_at text format of voucher-jobs' UTCDateTime on SQLite.
_INSERT_SQLITE = (
    "INSERT INTO voucher_audit_logs (voucher_id, action, actor_type, code, metadata, created_at) "
    "VALUES (1, 'UPDATED', 'USER', 'WRITER', '{\"source\": \"writer\"}', "
    "strftime('%Y-%m-%d %H:%M:%f000', 'now'))"
)


@dataclass(frozen=True)
class WriterStats:
    """Latency percentiles in ms of the inserts that one writer ran, and its errors."""

    inserts: int
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    locked: int
    other_errors: int
    first_error: str | None = None

    @property
    def errors(self) -> int:
        return self.locked + self.other_errors


def percentile(values: list[float], fraction: float) -> float | None:
    """Return the nearest-rank percentile of values (fraction 0.5 for p50)."""
    if not values:
        return None
    ordered = sorted(values)
    # round() drops float noise such as 0.99 * 100 = 99.00000000000001.
    rank = max(1, math.ceil(round(fraction * len(ordered), 9)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class WriterLog:
    """The inserts of one writer: (start time, latency ms) each, and its errors.

    An error is (start time, kind, message), where kind is "locked" for
    SQLite's "database is locked" and "other" for any other.
    """

    samples: list[tuple[float, float]]
    errors: list[tuple[float, str, str]]

    def summarize(self, window: tuple[float, float] | None = None) -> WriterStats:
        """Return the figures of the inserts that started within window (Unix times).

        A window shorter than MIN_WINDOW_SECONDS is extended at its end, so
        that a step of a few milliseconds still has inserts to report.
        """
        if window is not None and window[1] - window[0] < MIN_WINDOW_SECONDS:
            window = (window[0], window[0] + MIN_WINDOW_SECONDS)

        def inside(moment: float) -> bool:
            return window is None or window[0] <= moment <= window[1]

        latencies = [latency for moment, latency in self.samples if inside(moment)]
        errors = [(kind, message) for moment, kind, message in self.errors if inside(moment)]
        return WriterStats(
            inserts=len(latencies),
            p50_ms=percentile(latencies, 0.50),
            p99_ms=percentile(latencies, 0.99),
            max_ms=max(latencies) if latencies else None,
            locked=sum(kind == "locked" for kind, _ in errors),
            other_errors=sum(kind != "locked" for kind, _ in errors),
            first_error=errors[0][1] if errors else None,
        )


class Writer:
    """The parent's handle on one writer child process."""

    def __init__(self, backend: str, target: str, rate: float, busy_timeout: float) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.writer", backend, target, str(rate),
             str(busy_timeout)],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert self._process.stdout is not None
        line = self._process.stdout.readline().strip()
        if line != "ready":
            self._process.kill()
            self._process.wait()
            raise RuntimeError(f"the writer process did not start; it printed {line!r}")

    def stop(self) -> WriterLog:
        """Ask the child to stop after its current insert and return its log."""
        output, _ = self._process.communicate("stop\n", timeout=60)
        if self._process.returncode != 0:
            raise RuntimeError(f"the writer process failed with exit code "
                               f"{self._process.returncode}")
        report = json.loads(output)
        return WriterLog([tuple(sample) for sample in report["samples"]],
                         [tuple(error) for error in report["errors"]])

    def kill(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()


class _Connection:
    """One connection that inserts a row and commits, on either backend."""

    def __init__(self, backend: str, target: str, busy_timeout: float) -> None:
        self.backend = backend
        if backend == "postgresql":
            import psycopg

            self.errors: tuple[type[BaseException], ...] = (psycopg.Error,)
            self._connection = psycopg.connect(target, connect_timeout=10)
            self._statement = _INSERT_POSTGRESQL
        else:
            self.errors = (sqlite3.Error,)
            # The default isolation level: the INSERT opens a transaction,
            # and commit() ends it. timeout is the busy timeout in seconds.
            self._connection = sqlite3.connect(target, timeout=busy_timeout)
            self._statement = _INSERT_SQLITE

    def insert(self) -> None:
        try:
            self._connection.execute(self._statement)
            self._connection.commit()
        except self.errors:
            self._connection.rollback()
            raise


def _run(backend: str, target: str, rate: float, busy_timeout: float) -> int:
    connection = _Connection(backend, target, busy_timeout)
    connection.insert()
    stop = threading.Event()

    def wait_for_stop() -> None:
        sys.stdin.readline()
        stop.set()

    threading.Thread(target=wait_for_stop, daemon=True).start()
    print("ready", flush=True)

    interval = 1.0 / rate
    samples: list[tuple[float, float]] = []
    errors: list[tuple[float, str, str]] = []
    next_start = time.perf_counter()
    while not stop.is_set():
        delay = next_start - time.perf_counter()
        if delay > 0 and stop.wait(delay):
            break
        begun = time.perf_counter()
        moment = time.time()
        # Missed turns are skipped, not caught up in a burst.
        next_start = max(next_start + interval, begun)
        try:
            connection.insert()
        except connection.errors as exc:
            kind = "locked" if SQLITE_LOCKED in str(exc) else "other"
            errors.append((moment, kind, f"{type(exc).__name__}: {exc}"))
            continue
        samples.append((moment, (time.perf_counter() - begun) * 1000))
    print(json.dumps({"samples": samples, "errors": errors}), flush=True)
    return 0


if __name__ == "__main__":
    # Ctrl-C reaches the whole process group. The parent stops this process
    # through stdin instead, so that it still receives the figures.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    backend_name, target_name, rate_text, timeout_text = sys.argv[1:5]
    sys.exit(_run(backend_name, target_name, float(rate_text), float(timeout_text)))

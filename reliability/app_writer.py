"""The live application, writing at a steady rate while the jobs run.

Run as `python -m reliability.app_writer DATABASE_URL REPORT_FILE --rate 200`,
this module is the writer process. It opens one connection the way a typical
application does, prints `ready`, and then sends RATE operations per second
until SIGTERM, each in its own transaction:

- insert a voucher (25 %) that expires 1 to 90 days from now,
- change a voucher's expiry_date to an instant up to six hours either side
  of T0, the jobs' reference time (25 %),
- soft-delete a voucher by setting deleted_at to now (10 %),
- insert an audit row created now (40 %).

The application's connection waits at most APP_LOCK_WAIT_SECONDS for a lock:
on SQLite the busy timeout of Python's sqlite3 module (5 s, its default), on
PostgreSQL `lock_timeout`. Any error counts, and the operation is rolled back
and not retried. On SIGTERM it writes the start time, latency and error of
every operation to REPORT_FILE as JSON.

`writer_scenario` is the driver's side: it runs voucher-expired and then
audit-archival in one mode with small batches while the writer writes, then
reruns both jobs and checks the invariants.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.engine import make_url

from reliability.invariants import (
    AT,
    CUTOFF,
    RETENTION_DAYS,
    T0,
    Tally,
    check_archival,
    check_expiry_complete,
    seed_audit_rows,
    seed_vouchers,
    snapshot,
)
from reliability.trigger_race import with_repository_path
from tests.conftest import Database
from voucher_jobs.data.schema import runs, vouchers

APP_LOCK_WAIT_SECONDS = 5.0
RATE = 200
OPERATIONS = (("insert_voucher", 25), ("update_expiry", 25), ("soft_delete", 10),
              ("insert_audit", 40))
EXPIRY_SPREAD = timedelta(hours=6)
# The jobs' batches: small, with a short pause, as a run next to a busy
# application would be configured.
BATCH_SIZE = "20"
BATCH_PAUSE = "0.02"
# On SQLite the application's commits hold the only write lock for much of
# each second at RATE, so a job's batch can wait seconds for it.
JOB_TIMEOUT = 900.0


class Application:
    """One application connection and the four operations, for SQLite or PostgreSQL."""

    def __init__(self, url: str, rng: random.Random) -> None:
        self.rng = rng
        parsed = make_url(url)
        self.sqlite = parsed.get_backend_name() == "sqlite"
        if self.sqlite:
            # The sqlite3 module's default isolation: a DML statement opens
            # a deferred transaction, and the busy timeout applies to it.
            self.connection: Any = sqlite3.connect(parsed.database,
                                                   timeout=APP_LOCK_WAIT_SECONDS)
            self.placeholder = "?"
        else:
            import psycopg

            self.connection = psycopg.connect(
                parsed.set(drivername="postgresql").render_as_string(hide_password=False))
            self.connection.execute(f"SET lock_timeout = '{int(APP_LOCK_WAIT_SECONDS * 1000)}ms'")
            self.connection.commit()
            self.placeholder = "%s"
        cursor = self.connection.cursor()
        cursor.execute("SELECT max(id) FROM vouchers")
        self.max_voucher_id = cursor.fetchone()[0] or 0
        self.connection.commit()
        self.inserted = 0

    def _timestamp(self, moment: datetime) -> Any:
        if self.sqlite:
            return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")
        return moment

    def _now(self) -> Any:
        return self._timestamp(datetime.now(timezone.utc))

    def _expiry_near_t0(self) -> Any:
        offset = self.rng.uniform(-1, 1) * EXPIRY_SPREAD.total_seconds()
        return self._timestamp(T0 + timedelta(seconds=offset))

    def _sql(self, statement: str) -> str:
        return statement.replace("?", self.placeholder)

    def run(self, operation: str) -> None:
        """Run one operation in its own transaction. On an error, roll back and re-raise."""
        cursor = self.connection.cursor()
        try:
            getattr(self, operation)(cursor)
            self.connection.commit()
        except BaseException:
            self.connection.rollback()
            raise

    def insert_voucher(self, cursor: Any) -> None:
        self.inserted += 1
        cursor.execute(self._sql(
            "INSERT INTO vouchers (code, type, expiry_date, deleted_at, created_at) "
            "VALUES (?, ?, ?, NULL, ?) RETURNING id"),
            (f"APP{os.getpid()}-{self.inserted:07d}", self.rng.choice(("PERCENTAGE", "FIXED")),
             self._timestamp(datetime.now(timezone.utc)
                             + timedelta(days=self.rng.uniform(1, 90))),
             self._now()))
        self.max_voucher_id = max(self.max_voucher_id, cursor.fetchone()[0])

    def update_expiry(self, cursor: Any) -> None:
        cursor.execute(self._sql("UPDATE vouchers SET expiry_date = ? WHERE id = ?"),
                       (self._expiry_near_t0(), self.rng.randint(1, self.max_voucher_id)))

    def soft_delete(self, cursor: Any) -> None:
        cursor.execute(self._sql(
            "UPDATE vouchers SET deleted_at = ? WHERE id = ? AND deleted_at IS NULL"),
            (self._now(), self.rng.randint(1, self.max_voucher_id)))

    def insert_audit(self, cursor: Any) -> None:
        voucher_id = self.rng.randint(1, self.max_voucher_id)
        metadata = "?" if self.sqlite else "%s::jsonb"
        cursor.execute(self._sql(
            "INSERT INTO voucher_audit_logs (voucher_id, action, actor_type, code, metadata, "
            f"created_at) VALUES (?, ?, ?, ?, {metadata}, ?)"),
            (voucher_id, self.rng.choice(("UPDATED", "REDEEMED")), "ADMIN", f"C{voucher_id}",
             json.dumps({"source": "app"}), self._now()))


def write(url: str, report: Path, rate: float, seed: int) -> int:
    """Run operations at `rate` per second until SIGTERM, then write the report."""
    stop = False

    def request_stop(_signum: int, _frame: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, request_stop)
    rng = random.Random(seed)
    application = Application(url, rng)
    names = [name for name, _ in OPERATIONS]
    weights = [weight for _, weight in OPERATIONS]
    records: list[tuple[float, float, str, str | None]] = []
    print("ready", flush=True)
    interval = 1.0 / rate
    next_at = time.monotonic()
    while not stop:
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        next_at += interval
        operation = rng.choices(names, weights)[0]
        started_wall = time.time()
        started = time.perf_counter()
        error = None
        try:
            application.run(operation)
        except Exception as exc:  # noqa: BLE001 - every error is counted and reported
            lines = str(exc).strip().splitlines()
            error = f"{type(exc).__name__}: {lines[0] if lines else ''}"
        records.append((started_wall, (time.perf_counter() - started) * 1000, operation, error))
    application.connection.close()
    report.write_text(json.dumps({"rate": rate, "records": records}))
    return 0


@dataclass
class WriterFigures:
    """The writer's operations, errors and latencies, overall and while a job ran."""

    operations: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    during_jobs: int = 0
    seconds: float = 0.0
    longest_job_batch_ms: float = 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def describe(self) -> str:
        text = (f"{self.operations} ops in {self.seconds:.1f} s ({self.during_jobs} while a job "
                f"ran), {self.error_count} errors, p50 {self.p50_ms:.1f} ms, "
                f"p99 {self.p99_ms:.1f} ms, max {self.max_ms:.1f} ms")
        if self.longest_job_batch_ms:
            text += f"; longest job batch {self.longest_job_batch_ms:.1f} ms"
        return text


def summarize(records: list[list[Any]], job_windows: list[tuple[float, float]]) -> WriterFigures:
    """Compute the figures from the writer's per-operation records."""
    figures = WriterFigures(operations=len(records))
    if not records:
        return figures
    latencies = sorted(record[1] for record in records)
    if len(latencies) >= 2:
        percentiles = statistics.quantiles(latencies, n=100, method="inclusive")
        figures.p50_ms, figures.p99_ms = percentiles[49], percentiles[98]
    figures.max_ms = latencies[-1]
    figures.seconds = records[-1][0] - records[0][0]
    for record in records:
        if record[3] is not None:
            figures.errors[record[3]] = figures.errors.get(record[3], 0) + 1
        if any(start <= record[0] <= end for start, end in job_windows):
            figures.during_jobs += 1
    return figures


def start_writer(db: Database, report: Path, rate: float, seed: int) -> subprocess.Popen[str]:
    """Start the writer process on db and wait until it is connected."""
    process = subprocess.Popen(
        [sys.executable, "-m", "reliability.app_writer", db.url, str(report),
         "--rate", str(rate), "--seed", str(seed)],
        env=with_repository_path(db.env()), cwd=db.workdir, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    if line != "ready":
        process.kill()
        _, stderr = process.communicate()
        raise RuntimeError(f"the application writer did not start: {line!r} {stderr[-2000:]}")
    return process


def stop_writer(process: subprocess.Popen[str], report: Path) -> list[list[Any]]:
    """Stop the writer with SIGTERM and return its per-operation records."""
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    if process.returncode != 0:
        raise RuntimeError(f"the application writer exited with {process.returncode}: "
                           f"{stderr[-2000:]}")
    return json.loads(report.read_text())["records"]


def _job_arguments(db: Database, job: str, mode: str, rerun: bool) -> list[str]:
    batches = ["--batch-size", "1000", "--pause", "0"] if rerun else [
        "--batch-size", BATCH_SIZE, "--pause", BATCH_PAUSE]
    if job == "voucher-expired":
        return ["run", job, "--at", AT, *batches]
    return ["run", job, "--mode", mode, "--at", AT, "--retention-days", str(RETENTION_DAYS),
            "--archive-dir", str(db.workdir / "archive"), *batches]


def _last_run(db: Database, job: str) -> Any:
    rows = db.rows(select(runs).where(runs.c.job == job).order_by(runs.c.id.desc()).limit(1))
    return rows[0] if rows and rows[0].finished_at is not None else None


def seed_background(db: Database, rows: int) -> None:
    """Add `rows` vouchers that expire after T0 and `rows` audit rows newer than the cutoff.

    The jobs leave these rows alone. They make the jobs' statements and the
    application's operations work on tables of a realistic size.
    """
    if rows == 0:
        return
    with db.engine.begin() as connection:
        connection.execute(insert(vouchers), [
            dict(code=f"B{i:08d}", type="FIXED", expiry_date=T0 + timedelta(days=1 + i % 300),
                 deleted_at=None, created_at=T0 - timedelta(days=30))
            for i in range(rows)])
    db.add_audit_rows([CUTOFF + timedelta(days=1, seconds=i) for i in range(rows)])


def writer_scenario(db: Database, mode: str, *, expired_vouchers: int, old_rows: int,
                    background: int = 0, rate: float = RATE,
                    seed: int = 1) -> tuple[Tally, WriterFigures]:
    """Run both jobs while the writer writes, rerun them, and check the invariants."""
    tally = Tally()
    label = f"{db.backend}/{mode}"
    seed_vouchers(db, expired_vouchers)
    seed_audit_rows(db, old=old_rows, new=200)
    seed_background(db, background)
    before = snapshot(db)
    env = db.env(VOUCHER_JOBS_BATCH_TARGET_MS="0", VOUCHER_JOBS_RETRY_ATTEMPTS="0",
                 VOUCHER_JOBS_ARCHIVE_FILE_ROWS="500")
    report = db.workdir / "writer-report.json"
    writer = start_writer(db, report, rate, seed)
    windows: list[tuple[float, float]] = []
    longest_batch_ms = 0.0
    try:
        time.sleep(0.5)  # the writer settles at its rate before the first job
        for job in ("voucher-expired", "audit-archival"):
            result = db.cli(*_job_arguments(db, job, mode, rerun=False), env=env,
                            timeout=JOB_TIMEOUT)
            tally.expect(result.returncode == 0, f"{label}: {job} next to the writer exited "
                         f"with {result.returncode}: {result.stderr.strip()[-500:]}")
            run = _last_run(db, job)
            if run is not None:
                windows.append((run.started_at.timestamp(), run.finished_at.timestamp()))
                longest_batch_ms = max(longest_batch_ms,
                                       (run.result or {}).get("longest_batch_ms", 0.0))
        time.sleep(0.5)
    finally:
        records = stop_writer(writer, report)
    figures = summarize(records, windows)
    figures.longest_job_batch_ms = longest_batch_ms
    tally.counts["writer operations"] += figures.operations
    tally.counts["writer operations while a job ran"] += figures.during_jobs
    tally.counts["writer errors"] += figures.error_count
    tally.expect(figures.error_count == 0,
                 f"{label}: the application writer got errors: {figures.errors}")

    for job in ("voucher-expired", "audit-archival"):
        result = db.cli(*_job_arguments(db, job, mode, rerun=True), env=env,
                        timeout=JOB_TIMEOUT)
        tally.expect(result.returncode == 0, f"{label}: {job} rerun exited with "
                     f"{result.returncode}: {result.stderr.strip()[-500:]}")
    check_expiry_complete(db, tally)
    check_archival(db, mode, before, db.workdir / "archive", tally, complete=True)
    return tally, figures


def fill_large_sqlite(db: Database, expired_vouchers: int, old_rows: int) -> None:
    """Append many expired vouchers and old audit rows to a SQLite file, with sqlite3 directly.

    Inserting through the sqlite3 module is several times faster than through
    SQLAlchemy, which matters at millions of rows.
    """
    path = db.engine.url.database
    connection = sqlite3.connect(path)
    try:
        connection.executemany(
            "INSERT INTO vouchers (code, type, expiry_date, deleted_at, created_at) "
            "VALUES (?, 'FIXED', ?, NULL, ?)",
            ((f"L{i:09d}", _sqlite_time(T0 - timedelta(seconds=expired_vouchers - i)),
              _sqlite_time(T0 - timedelta(days=400))) for i in range(expired_vouchers)))
        # 20 s apart, ending well before the cutoff.
        first = CUTOFF - timedelta(days=1, seconds=20 * old_rows)
        connection.executemany(
            "INSERT INTO voucher_audit_logs (voucher_id, action, actor_type, code, metadata, "
            "created_at) VALUES (1, 'UPDATED', 'ADMIN', 'X', '{}', ?)",
            ((_sqlite_time(first + timedelta(seconds=20 * i)),) for i in range(old_rows)))
        connection.commit()
    finally:
        connection.close()


def _sqlite_time(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")


def scan_scenario(db: Database, *, expired_vouchers: int, old_rows: int,
                  rate: float = RATE, seed: int = 1) -> tuple[Tally, WriterFigures]:
    """Run dry runs of both jobs on a large SQLite file while the writer writes.

    A dry run does only a job's start-up scan: voucher-expired counts the
    expired vouchers without an EXPIRED row, audit-archival summarizes the
    rows past the cutoff. The writer's maximum latency is the longest that a
    scan, or anything else, made an application write wait.
    """
    tally = Tally()
    label = f"{db.backend}/scan"
    fill_large_sqlite(db, expired_vouchers, old_rows)
    report = db.workdir / "writer-report.json"
    writer = start_writer(db, report, rate, seed)
    windows: list[tuple[float, float]] = []
    try:
        time.sleep(1.0)
        for job in ("voucher-expired", "audit-archival"):
            result = db.cli("run", job, "--at", AT, "--dry-run", timeout=JOB_TIMEOUT)
            tally.expect(result.returncode == 0, f"{label}: {job} dry run exited with "
                         f"{result.returncode}: {result.stderr.strip()[-500:]}")
            run = _last_run(db, job)
            if run is not None:
                windows.append((run.started_at.timestamp(), run.finished_at.timestamp()))
        time.sleep(1.0)
    finally:
        records = stop_writer(writer, report)
    figures = summarize(records, windows)
    tally.counts["writer operations"] += figures.operations
    tally.counts["writer operations while a job ran"] += figures.during_jobs
    tally.counts["writer errors"] += figures.error_count
    tally.expect(figures.error_count == 0,
                 f"{label}: the application writer got errors: {figures.errors}")
    return tally, figures


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="The application writer process.")
    parser.add_argument("url")
    parser.add_argument("report", type=Path)
    parser.add_argument("--rate", type=float, default=RATE, help="operations per second")
    parser.add_argument("--seed", type=int, default=1)
    options = parser.parse_args()
    sys.exit(write(options.url, options.report, options.rate, options.seed))

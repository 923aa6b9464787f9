"""What voucher-jobs is compared with: the seed algorithm and single statements.

The seed algorithm is the hand-written script that users run today. It
loads the expired vouchers and then, for each one, looks for its EXPIRED
row and inserts one when there is none. Each query runs on its own, and
every insert is committed on its own.

The single statements do each job's whole work in one statement (two in one
transaction where SQLite has no equivalent). They hold their locks for the
whole run, which the jobs avoid, but they show how fast the database can do
the work at all.

Both use the plain drivers (psycopg 3 and sqlite3) on connections of their
own. SQLite connections get the pragmas that voucher-jobs sets
(synchronous=FULL on a WAL database), so every commit costs the same fsync.
"""

from __future__ import annotations

import gzip
import itertools
import json
import os
import sqlite3
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import psycopg
from psycopg.types.json import Jsonb

from benchmarks.backends import Database
from voucher_jobs.data.audit_batches import COPY_LINE_OPTIONS, archive_line_sql
from voucher_jobs.jobs.archive_files import COMPRESS_LEVEL, row_to_line

# The single statement compresses as voucher-jobs' archive files do.
ARCHIVE_GZIP_LEVEL = COMPRESS_LEVEL
# The single statements mark their claims with run ids below zero, which
# the run ledger never hands out, each call with a new one.
_statement_run_ids = itertools.count(-1, -1)
_COPY_BUFFER_BYTES = 1 << 20
_AUDIT_COLUMNS = "id, voucher_id, action, actor_type, code, metadata, created_at"


@dataclass(frozen=True)
class SeedResult:
    """The seed algorithm's figures; the loop stops at a cap and is extrapolated."""

    vouchers: int
    processed: int
    inserted: int
    load_seconds: float
    loop_seconds: float

    @property
    def extrapolated_seconds(self) -> float | None:
        """Load time plus the mean time per voucher times all vouchers."""
        if self.vouchers == 0:
            return self.load_seconds
        if self.processed == 0:
            return None
        return self.load_seconds + self.loop_seconds / self.processed * self.vouchers


@dataclass(frozen=True)
class StatementResult:
    """Rows and seconds of one single-statement run."""

    rows: int
    seconds: float
    archive_bytes: int | None = None


def sqlite_text(moment: datetime) -> str:
    """Format an instant as voucher-jobs stores it on SQLite."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")


def connect_sqlite(database: Database) -> sqlite3.Connection:
    """Open a connection in autocommit mode with voucher-jobs' pragmas."""
    connection = sqlite3.connect(database.target, timeout=30, isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=FULL")
    return connection


# --- the seed algorithm -----------------------------------------------------

_SEED_LOAD = (
    "SELECT id, code, type, expiry_date FROM vouchers "
    "WHERE deleted_at IS NULL AND expiry_date <= {reference} ORDER BY id"
)
_SEED_FIND = (
    "SELECT 1 FROM voucher_audit_logs WHERE voucher_id = {voucher} AND action = 'EXPIRED' "
    "LIMIT 1"
)
_SEED_INSERT = (
    "INSERT INTO voucher_audit_logs (voucher_id, action, actor_type, code, metadata, created_at) "
    "VALUES ({voucher}, 'EXPIRED', 'SYSTEM', {code}, {metadata}, {now})"
)


def run_seed(
    database: Database, reference: datetime, max_vouchers: int, max_seconds: float
) -> SeedResult:
    """Run the seed algorithm until max_vouchers or max_seconds, whichever comes first."""
    if database.backend == "postgresql":
        connection = psycopg.connect(database.target, autocommit=True)
        marks = {"reference": "%s", "voucher": "%s", "code": "%s", "metadata": "%s",
                 "now": "statement_timestamp()"}
        bound_reference: object = reference

        def metadata(kind: str, expiry: datetime) -> object:
            return Jsonb({"type": kind, "expiry_date": _iso(expiry)})
    else:
        connection = connect_sqlite(database)
        marks = {"reference": "?", "voucher": "?", "code": "?", "metadata": "?",
                 "now": "strftime('%Y-%m-%d %H:%M:%f000', 'now')"}
        bound_reference = sqlite_text(reference)

        def metadata(kind: str, expiry: str) -> object:  # type: ignore[misc]
            return json.dumps({"type": kind, "expiry_date": expiry.replace(" ", "T") + "Z"})

    load, find, insert = (query.format(**marks) for query in (_SEED_LOAD, _SEED_FIND, _SEED_INSERT))
    with connection:
        started = time.perf_counter()
        vouchers = connection.execute(load, (bound_reference,)).fetchall()
        load_seconds = time.perf_counter() - started

        processed = inserted = 0
        started = time.perf_counter()
        for voucher_id, code, kind, expiry in vouchers:
            if processed >= max_vouchers or time.perf_counter() - started >= max_seconds:
                break
            if connection.execute(find, (voucher_id,)).fetchone() is None:
                connection.execute(insert, (voucher_id, code, metadata(kind, expiry)))
                inserted += 1
            processed += 1
        loop_seconds = time.perf_counter() - started
    connection.close()
    return SeedResult(len(vouchers), processed, inserted, load_seconds, loop_seconds)


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --- voucher-expired as one statement ---------------------------------------

# The claims and the audit rows in one statement: the INSERT's RETURNING
# feeds the second INSERT, so rows are written for exactly the claims made,
# as the job's batches do. The metadata matches the job's.
_EXPIRY_POSTGRESQL = """
WITH claimed AS (
    INSERT INTO voucher_jobs_expirations (voucher_id, expiry_date, run_id, logged_at)
    SELECT v.id, v.expiry_date, %(run_id)s, %(reference)s
    FROM vouchers AS v
    WHERE v.deleted_at IS NULL
      AND v.expiry_date <= %(reference)s
      AND NOT EXISTS (
          SELECT 1 FROM voucher_jobs_expirations AS e
          WHERE e.voucher_id = v.id AND e.expiry_date = v.expiry_date)
    ON CONFLICT (voucher_id, expiry_date) DO NOTHING
    RETURNING voucher_id, expiry_date
)
INSERT INTO voucher_audit_logs (voucher_id, action, actor_type, code, metadata, created_at)
SELECT v.id, 'EXPIRED', 'SYSTEM', v.code,
       jsonb_build_object(
           'type', v.type,
           'expiry_date', to_char(c.expiry_date AT TIME ZONE 'UTC',
                                  'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
           'run_id', %(run_id)s),
       %(reference)s
FROM claimed AS c
JOIN vouchers AS v ON v.id = c.voucher_id
"""

# SQLite cannot feed one INSERT's RETURNING into another, so the claims go
# first and the audit rows are written for the claims of this run id, in
# one transaction.
_EXPIRY_SQLITE_CLAIMS = """
INSERT INTO voucher_jobs_expirations (voucher_id, expiry_date, run_id, logged_at)
SELECT v.id, v.expiry_date, :run_id, :reference
FROM vouchers AS v
WHERE v.deleted_at IS NULL
  AND v.expiry_date <= :reference
  AND NOT EXISTS (
      SELECT 1 FROM voucher_jobs_expirations AS e
      WHERE e.voucher_id = v.id AND e.expiry_date = v.expiry_date)
ON CONFLICT (voucher_id, expiry_date) DO NOTHING
"""
_EXPIRY_SQLITE_AUDIT_ROWS = """
INSERT INTO voucher_audit_logs (voucher_id, action, actor_type, code, metadata, created_at)
SELECT v.id, 'EXPIRED', 'SYSTEM', v.code,
       json_object('type', v.type,
                   'expiry_date', replace(e.expiry_date, ' ', 'T') || 'Z',
                   'run_id', :run_id),
       :reference
FROM voucher_jobs_expirations AS e
JOIN vouchers AS v ON v.id = e.voucher_id
WHERE e.run_id = :run_id
"""


def run_expiry_statement(database: Database, reference: datetime) -> StatementResult:
    """Log every pending voucher at reference in one statement (two on SQLite)."""
    run_id = next(_statement_run_ids)
    if database.backend == "postgresql":
        with psycopg.connect(database.target, autocommit=True) as connection:
            started = time.perf_counter()
            written = connection.execute(
                _EXPIRY_POSTGRESQL, {"run_id": run_id, "reference": reference}).rowcount
            seconds = time.perf_counter() - started
            claimed = connection.execute(
                "SELECT count(*) FROM voucher_jobs_expirations WHERE run_id = %s", (run_id,)
            ).fetchone()[0]
    else:
        connection = connect_sqlite(database)
        parameters = {"run_id": run_id, "reference": sqlite_text(reference)}
        started = time.perf_counter()
        connection.execute("BEGIN IMMEDIATE")
        claimed = connection.execute(_EXPIRY_SQLITE_CLAIMS, parameters).rowcount
        written = connection.execute(_EXPIRY_SQLITE_AUDIT_ROWS, parameters).rowcount
        connection.execute("COMMIT")
        seconds = time.perf_counter() - started
        connection.close()
    if claimed != written:
        raise RuntimeError(f"the expiry statement claimed {claimed} vouchers but wrote "
                           f"{written} audit rows")
    return StatementResult(written, seconds)


# --- audit-archival as one statement, per mode ------------------------------

_MOVE_POSTGRESQL = f"""
WITH moved AS (
    DELETE FROM voucher_audit_logs WHERE created_at < %(cutoff)s
    RETURNING {_AUDIT_COLUMNS}
)
INSERT INTO voucher_jobs_audit_archive ({_AUDIT_COLUMNS}, archived_at, run_id)
SELECT {_AUDIT_COLUMNS}, %(archived_at)s, 0 FROM moved
"""


def run_archival_statement(
    database: Database, mode: str, cutoff: datetime, archived_at: datetime, archive_dir: Path
) -> StatementResult:
    """Remove every audit row older than cutoff in one statement of the given mode.

    archive-file writes the rows to one gzip file in archive_dir, fsyncs it,
    and then deletes them in a second statement.
    """
    if database.backend == "postgresql":
        return _archival_postgresql(database, mode, cutoff, archived_at, archive_dir)
    return _archival_sqlite(database, mode, cutoff, archived_at, archive_dir)


def _archival_postgresql(database, mode, cutoff, archived_at, archive_dir) -> StatementResult:
    delete = "DELETE FROM voucher_audit_logs WHERE created_at < %(cutoff)s"
    parameters = {"cutoff": cutoff, "archived_at": archived_at}
    archive_bytes = None
    with psycopg.connect(database.target, autocommit=True) as connection:
        started = time.perf_counter()
        if mode == "delete":
            rows = connection.execute(delete, parameters).rowcount
        elif mode == "archive-table":
            rows = connection.execute(_MOVE_POSTGRESQL, parameters).rowcount
        else:
            # The same lines as the job's archive files, built by the server
            # as the job has them built: the limit for writing that format.
            path = archive_dir / "single-statement.jsonl.gz"
            query = (f"COPY (SELECT {archive_line_sql('jsonb')} FROM voucher_audit_logs "
                     f"WHERE created_at < %(cutoff)s) TO STDOUT WITH ({COPY_LINE_OPTIONS})")
            with _durable_gzip(path) as compressed, connection.cursor() as cursor:
                buffer = bytearray()
                with cursor.copy(query, parameters) as copy:
                    for data in copy:
                        buffer += data
                        if len(buffer) >= _COPY_BUFFER_BYTES:
                            compressed.write(buffer)
                            buffer.clear()
                compressed.write(buffer)
                exported = cursor.rowcount
            rows = connection.execute(delete, parameters).rowcount
            _check_exported(exported, rows)
            archive_bytes = path.stat().st_size
        seconds = time.perf_counter() - started
    return StatementResult(rows, seconds, archive_bytes)


def _archival_sqlite(database, mode, cutoff, archived_at, archive_dir) -> StatementResult:
    delete = "DELETE FROM voucher_audit_logs WHERE created_at < :cutoff"
    parameters = {"cutoff": sqlite_text(cutoff), "archived_at": sqlite_text(archived_at)}
    archive_bytes = None
    connection = connect_sqlite(database)
    started = time.perf_counter()
    if mode == "delete":
        rows = connection.execute(delete, parameters).rowcount
    elif mode == "archive-table":
        connection.execute("BEGIN IMMEDIATE")
        copied = connection.execute(
            f"INSERT INTO voucher_jobs_audit_archive ({_AUDIT_COLUMNS}, archived_at, run_id) "
            f"SELECT {_AUDIT_COLUMNS}, :archived_at, 0 FROM voucher_audit_logs "
            "WHERE created_at < :cutoff", parameters).rowcount
        rows = connection.execute(delete, parameters).rowcount
        connection.execute("COMMIT")
        _check_exported(copied, rows)
    else:
        # SQLite has no COPY: one SELECT streamed into the file, in the
        # job's line format, is the nearest.
        path = archive_dir / "single-statement.jsonl.gz"
        exported = 0
        cursor = connection.execute(
            f"SELECT {_AUDIT_COLUMNS} FROM voucher_audit_logs WHERE created_at < :cutoff",
            parameters)
        with _durable_gzip(path) as compressed:
            while batch := cursor.fetchmany(10_000):
                compressed.write(b"".join(_archive_line(row) for row in batch))
                exported += len(batch)
        rows = connection.execute(delete, parameters).rowcount
        _check_exported(exported, rows)
        archive_bytes = path.stat().st_size
    seconds = time.perf_counter() - started
    connection.close()
    return StatementResult(rows, seconds, archive_bytes)


def _archive_line(row: tuple) -> bytes:
    """Format a SQLite row as a line of voucher-jobs' archive files."""
    id_, voucher_id, action, actor_type, code, metadata, created_at = row
    return row_to_line(SimpleNamespace(
        id=id_, voucher_id=voucher_id, action=action, actor_type=actor_type, code=code,
        metadata=None if metadata is None else json.loads(metadata),
        created_at=datetime.fromisoformat(created_at).replace(tzinfo=timezone.utc),
    ))


def _check_exported(exported: int, deleted: int) -> None:
    if exported != deleted:
        raise RuntimeError(f"the archival statement archived {exported} rows but deleted "
                           f"{deleted}")


class _durable_gzip:  # noqa: N801 - used like the open() it wraps
    """A gzip file at ARCHIVE_GZIP_LEVEL that is fsynced, with its folder, on close."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._raw = open(path, "wb")
        self._compressed = gzip.GzipFile(fileobj=self._raw, mode="wb",
                                         compresslevel=ARCHIVE_GZIP_LEVEL, mtime=0)

    def __enter__(self) -> gzip.GzipFile:
        return self._compressed

    def __exit__(self, *exc_info: object) -> None:
        self._compressed.close()
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()
        descriptor = os.open(self._path.parent, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)

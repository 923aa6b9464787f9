"""Job locks: at most one holder per job name across processes and hosts.

PostgreSQL: a session-level advisory lock held on a connection of its own
for the whole run. The server releases it when that connection closes, so a
process killed with SIGKILL frees the job as soon as its socket drops.

SQLite: an exclusive `flock` on a file beside the database file
(`<database>.<job>.lock`). SQLite has no lock that outlives a transaction,
and a run spans many transactions; the kernel releases a `flock` when the
process dies, which gives the same guarantee as the advisory lock for every
process that opens the same database file. An in-memory database gets a lock
local to the process.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError

from voucher_jobs.data.engine import is_sqlite, sqlite_path
from voucher_jobs.logs import log_event

logger = logging.getLogger(__name__)

_process_locks: dict[str, threading.Lock] = {}
_process_locks_guard = threading.Lock()


def advisory_key(job: str) -> int:
    """Return the signed 64-bit advisory lock key for "schema:job"."""
    digest = hashlib.sha256(f"voucher_jobs:{job}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@contextlib.contextmanager
def job_lock(engine: Engine, job: str) -> Iterator[bool]:
    """Try to take the job's lock without waiting; yield whether it was taken."""
    if is_sqlite(engine):
        path = sqlite_path(engine)
        lock = _file_lock(path, job) if path else _process_lock(job)
    else:
        lock = _advisory_lock(engine, job)
    with lock as acquired:
        yield acquired


@contextlib.contextmanager
def _advisory_lock(engine: Engine, job: str) -> Iterator[bool]:
    connection: Connection = engine.connect().execution_options(
        isolation_level="AUTOCOMMIT"
    )
    try:
        # Advisory locks are per database. The schema goes into the key, so
        # that two voucher schemas in one database (DATABASE_URL ?schema=)
        # lock their jobs apart.
        schema = connection.execute(text("SELECT current_schema()")).scalar() or ""
        key = advisory_key(f"{schema}:{job}")
        acquired = bool(
            connection.execute(
                text("SELECT pg_try_advisory_lock(:key)"), {"key": key}
            ).scalar()
        )
        try:
            yield acquired
        finally:
            if acquired:
                _advisory_unlock(connection, job, key)
    finally:
        connection.close()


def _advisory_unlock(connection: Connection, job: str, key: int) -> None:
    """Release the lock, unless its connection was lost, which released it already.

    NOTE: a run whose lock connection drops (a server restart, or
    pg_terminate_backend on it) goes on without the lock until it ends, so
    a second run of the job can start in that time.
    """
    try:
        connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
    except DBAPIError as exc:
        log_event(logger, "job_lock_connection_lost", logging.WARNING, job=job,
                  error=str(exc.orig or exc).strip().splitlines()[0])


@contextlib.contextmanager
def _file_lock(database: Path, job: str) -> Iterator[bool]:
    lock_path = database.with_name(f"{database.name}.{job}.lock")
    descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(descriptor, fcntl.LOCK_UN)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def _process_lock(job: str) -> Iterator[bool]:
    with _process_locks_guard:
        lock = _process_locks.setdefault(job, threading.Lock())
    acquired = lock.acquire(blocking=False)
    try:
        yield acquired
    finally:
        if acquired:
            lock.release()

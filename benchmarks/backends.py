"""Benchmark databases on PostgreSQL and SQLite: create, copy, drop, measure.

Each data set is filled once into a template. Every measurement then runs
on a fresh copy of it, so all of them start from the same rows: on
PostgreSQL a `CREATE DATABASE ... TEMPLATE`, on SQLite a copy of the file.
"""

from __future__ import annotations

import shutil
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql
from sqlalchemy.engine import make_url

# Every database the suite creates starts with this prefix.
DATABASE_PREFIX = "voucher_jobs_bench_"

# Templates from this size up are copied with STRATEGY FILE_COPY.
FILE_COPY_MIN_BYTES = 64 * 2**20
# Server settings that change the figures, printed with every report.
POSTGRESQL_SETTINGS = (
    "shared_buffers", "work_mem", "maintenance_work_mem", "effective_cache_size",
    "max_wal_size", "checkpoint_timeout", "wal_compression", "full_page_writes",
    "synchronous_commit", "fsync", "random_page_cost", "jit",
    "max_parallel_workers_per_gather", "autovacuum",
)


@dataclass(frozen=True)
class Database:
    """One benchmark database: a PostgreSQL database or a SQLite file.

    `url` is the DATABASE_URL for voucher-jobs, `target` what the drivers
    connect to (the same URL for psycopg, the file path for sqlite3).
    """

    backend: str
    name: str
    url: str
    target: str

    @property
    def path(self) -> Path:
        return Path(self.target)


@dataclass
class StorageGrowth:
    """Bytes a step wrote: WAL on PostgreSQL, file growth on SQLite.

    On PostgreSQL the WAL position is server-wide, so it includes anything
    that other sessions wrote meanwhile (the concurrent writer included).
    """

    bytes: int | None = None
    # SQLite only: the largest size the -wal file reached during the step.
    peak_wal_bytes: int | None = None


class PostgresServer:
    """Benchmark databases on one PostgreSQL server, created and dropped here."""

    backend = "postgresql"

    def __init__(self, admin_url: str, run_tag: str) -> None:
        self.admin_url = admin_url
        self.run_tag = run_tag
        self._created: set[str] = set()

    def _admin(self) -> psycopg.Connection:
        return psycopg.connect(self.admin_url, autocommit=True, connect_timeout=10)

    def _database(self, name: str) -> Database:
        url = make_url(self.admin_url).set(database=name).render_as_string(hide_password=False)
        return Database(self.backend, name, url, url)

    def full_name(self, tag: str) -> str:
        name = f"{DATABASE_PREFIX}{self.run_tag}_{tag}"
        if len(name) > 63:
            raise ValueError(f"database name {name!r} is longer than PostgreSQL's 63 bytes")
        return name

    def create(self, tag: str) -> Database:
        name = self.full_name(tag)
        with self._admin() as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        self._created.add(name)
        return self._database(name)

    def copy(self, template: Database, tag: str) -> Database:
        """Create a copy of template; nothing may be connected to template."""
        name = self.full_name(tag)
        with self._admin() as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))
            # FILE_COPY copies the files after a checkpoint. WAL_LOG writes
            # the whole copy to the WAL, and for a large template the
            # checkpoints that follow would slow down the next measurement.
            # For a small one, WAL_LOG is faster than waiting for a checkpoint.
            strategy = "FILE_COPY" if self.size(template) >= FILE_COPY_MIN_BYTES else "WAL_LOG"
            admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {} STRATEGY {}").format(
                sql.Identifier(name), sql.Identifier(template.name), sql.SQL(strategy)))
        self._created.add(name)
        return self._database(name)

    def drop(self, database: Database) -> None:
        with self._admin() as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(database.name)))
        self._created.discard(database.name)

    def drop_all(self) -> None:
        for name in sorted(self._created):
            self.drop(self._database(name))

    def finish_template(self, database: Database) -> None:
        """VACUUM ANALYZE, because autovacuum may be off on the server."""
        with psycopg.connect(database.target, autocommit=True) as connection:
            connection.execute("VACUUM ANALYZE")

    def size(self, database: Database) -> int:
        # Asked on the admin connection: a session on the database itself
        # would keep it from being used as a template for a moment.
        with self._admin() as admin:
            return admin.execute("SELECT pg_database_size(%s)", (database.name,)).fetchone()[0]

    @contextmanager
    def measure_growth(self, database: Database) -> Iterator[StorageGrowth]:
        growth = StorageGrowth()
        with self._admin() as admin:
            before = admin.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
            yield growth
            growth.bytes = int(admin.execute(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)", (before,)
            ).fetchone()[0])

    def describe(self) -> dict[str, str]:
        """Return the server version and the settings that change the figures."""
        with self._admin() as admin:
            described = {"version": admin.execute("SELECT version()").fetchone()[0]}
            for name in POSTGRESQL_SETTINGS:
                described[name] = admin.execute(
                    sql.SQL("SHOW {}").format(sql.Identifier(name))).fetchone()[0]
            directory = admin.execute(
                "SELECT setting FROM pg_settings WHERE name = 'data_directory'").fetchone()
        described["data_directory"] = directory[0] if directory else "unknown"
        return described


class SqliteFolder:
    """Benchmark databases as SQLite files in one folder."""

    backend = "sqlite"

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def _database(self, tag: str) -> Database:
        path = self.folder / f"{tag}.db"
        return Database(self.backend, tag, f"sqlite:///{path}", str(path))

    def create(self, tag: str) -> Database:
        database = self._database(tag)
        self.drop(database)
        return database

    def copy(self, template: Database, tag: str) -> Database:
        """Copy the template file; its WAL must have been checkpointed into it."""
        database = self._database(tag)
        self.drop(database)
        shutil.copyfile(template.path, database.path)
        return database

    def drop(self, database: Database) -> None:
        for path in self.folder.glob(f"{database.path.name}*"):
            path.unlink()

    def drop_all(self) -> None:
        for path in self.folder.glob("*.db*"):
            path.unlink()

    def finish_template(self, database: Database) -> None:
        """Move the WAL into the database file, so that a file copy is complete."""
        with sqlite3.connect(database.target) as connection:
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        connection.close()
        wal = Path(f"{database.target}-wal")
        if wal.exists() and wal.stat().st_size:
            raise RuntimeError(f"{wal} is not empty after a checkpoint: a connection is open")

    def size(self, database: Database) -> int:
        return sum(_file_size(Path(f"{database.target}{suffix}")) for suffix in ("", "-wal"))

    @contextmanager
    def measure_growth(self, database: Database) -> Iterator[StorageGrowth]:
        growth = StorageGrowth(peak_wal_bytes=0)
        wal = Path(f"{database.target}-wal")
        stop = threading.Event()

        def sample_wal() -> None:
            while not stop.is_set():
                growth.peak_wal_bytes = max(growth.peak_wal_bytes or 0, _file_size(wal))
                stop.wait(0.05)

        before = self.size(database)
        sampler = threading.Thread(target=sample_wal, daemon=True)
        sampler.start()
        try:
            yield growth
        finally:
            stop.set()
            sampler.join()
        growth.peak_wal_bytes = max(growth.peak_wal_bytes or 0, _file_size(wal))
        growth.bytes = self.size(database) - before

    @staticmethod
    def describe() -> dict[str, str]:
        return {"version": sqlite3.sqlite_version}


Backend = PostgresServer | SqliteFolder


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


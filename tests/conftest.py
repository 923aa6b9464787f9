"""Fixtures: a migrated database per test, on SQLite and on PostgreSQL.

The PostgreSQL server comes from VOUCHER_JOBS_TEST_POSTGRES_URL (default: the
local server at 127.0.0.1:5432 as user postgres). The suite creates its own
database there, named voucher_jobs_test_<pid>, and drops it at the end. When
the server is unreachable, PostgreSQL tests are skipped, unless CI=true or
VOUCHER_JOBS_REQUIRE_POSTGRES=1, in which case they fail.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, insert, select, text
from sqlalchemy.engine import make_url

from voucher_jobs.data import migrate
from voucher_jobs.data.engine import create_db_engine
from voucher_jobs.data.schema import metadata, voucher_audit_logs, vouchers

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
T0 = datetime(2026, 12, 4, 10, 0, 0, tzinfo=timezone.utc)


def postgres_required() -> bool:
    return os.environ.get("CI", "").lower() == "true" or os.environ.get(
        "VOUCHER_JOBS_REQUIRE_POSTGRES"
    ) == "1"


@dataclass
class Database:
    """A migrated, empty database for one test, with helpers to fill it."""

    backend: str
    url: str
    engine: Engine
    workdir: Path
    _codes: int = field(default=0)

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for a voucher-jobs subprocess that uses this database."""
        environment = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("VOUCHER_") and key != "DATABASE_URL"
        }
        environment.update(DATABASE_URL=self.url, **extra)
        return environment

    def cli(self, *args: str, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run `voucher-jobs ARGS` in a separate process on this database."""
        return subprocess.run(
            [sys.executable, "-m", "voucher_jobs", *args],
            env=env or self.env(),
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def add_voucher(self, expiry: datetime, *, deleted_at: datetime | None = None,
                    type: str = "PERCENTAGE", code: str | None = None) -> int:
        self._codes += 1
        with self.engine.begin() as connection:
            return connection.execute(
                insert(vouchers).values(
                    code=code or f"T{self._codes:06d}", type=type, expiry_date=expiry,
                    deleted_at=deleted_at, created_at=expiry - timedelta(days=30),
                ).returning(vouchers.c.id)
            ).scalar_one()

    def add_audit_rows(self, created_at: list[datetime], action: str = "UPDATED") -> None:
        with self.engine.begin() as connection:
            connection.execute(insert(voucher_audit_logs), [
                dict(voucher_id=1, action=action, actor_type="ADMIN", code="X",
                     metadata={"n": i}, created_at=moment)
                for i, moment in enumerate(created_at)
            ])

    def count(self, table: Any, *where: Any) -> int:
        with self.engine.connect() as connection:
            return connection.execute(
                select(func.count()).select_from(table).where(*where)
            ).scalar_one()

    def rows(self, query: Any) -> list[Any]:
        with self.engine.connect() as connection:
            return list(connection.execute(query))


def _reachable(url: str) -> str | None:
    engine = create_db_engine(url)
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        return None
    except Exception as exc:  # noqa: BLE001 - any failure means unreachable
        return str(exc).splitlines()[0]
    finally:
        engine.dispose()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """Create this session's PostgreSQL database, migrated once."""
    admin_url = os.environ.get("VOUCHER_JOBS_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)
    problem = _reachable(admin_url)
    if problem:
        message = f"PostgreSQL at {make_url(admin_url).render_as_string()} is unreachable: {problem}"
        if postgres_required():
            pytest.fail(message + " (required because CI=true or VOUCHER_JOBS_REQUIRE_POSTGRES=1)")
        pytest.skip(message)
    name = f"voucher_jobs_test_{os.getpid()}"
    admin = create_db_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    engine = create_db_engine(url)
    migrate.upgrade(engine)
    engine.dispose()
    yield url
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file that each test copies."""
    path = tmp_path_factory.mktemp("template") / "template.db"
    engine = create_db_engine(f"sqlite:///{path}")
    migrate.upgrade(engine)
    # Closing the last connection checkpoints the WAL into the file itself.
    engine.dispose()
    return path


def _truncate_all(engine: Engine) -> None:
    names = ", ".join(table.name for table in metadata.sorted_tables)
    with engine.begin() as connection:
        connection.execute(text(f"TRUNCATE {names} RESTART IDENTITY"))


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """An empty, migrated database: SQLite file or PostgreSQL, one per test."""
    if request.param == "sqlite":
        path = tmp_path / "test.db"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        url = f"sqlite:///{path}"
        engine = create_db_engine(url)
    else:
        url = request.getfixturevalue("postgres_url")
        engine = create_db_engine(url)
        _truncate_all(engine)
    database = Database(request.param, url, engine, tmp_path)
    yield database
    engine.dispose()


@dataclass
class CliResult:
    """Exit code and output of one in-process `voucher-jobs` call."""

    exit_code: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        tmp_path: Path) -> Iterator[Any]:
    """Run `voucher-jobs ARGS` in this process: `cli(*args, env={...})`.

    Much faster than Database.cli. The working directory is tmp_path, and the
    only settings are those in env (plus a .env file the test writes there).
    Engines the command creates are disposed after each call.
    """
    import voucher_jobs.data.engine as engine_module
    from voucher_jobs.cli.main import main

    # The suite's own variables stay, because fixtures set up later read them.
    suite_variables = ("VOUCHER_JOBS_TEST_POSTGRES_URL", "VOUCHER_JOBS_REQUIRE_POSTGRES")
    for key in list(os.environ):
        if key in suite_variables:
            continue
        if key.startswith("VOUCHER_") or key == "DATABASE_URL":
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    engines: list[Engine] = []
    original_create_engine = engine_module.create_engine

    def recording_create_engine(*args: Any, **kwargs: Any) -> Engine:
        engine = original_create_engine(*args, **kwargs)
        engines.append(engine)
        return engine

    monkeypatch.setattr(engine_module, "create_engine", recording_create_engine)
    # main() points the voucher_jobs logger at the captured stderr; restore it.
    package_logger = logging.getLogger("voucher_jobs")
    saved = (package_logger.handlers[:], package_logger.level, package_logger.propagate)

    def run(*args: str, env: dict[str, str] | None = None) -> CliResult:
        with monkeypatch.context() as patch:
            for key, value in (env or {}).items():
                patch.setenv(key, value)
            patch.setattr(sys, "argv", ["voucher-jobs", *args])
            try:
                main()
                code = 0
            except SystemExit as exc:
                code = 0 if exc.code is None else int(exc.code)
            finally:
                for engine in engines:
                    engine.dispose()
                engines.clear()
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    yield run
    package_logger.handlers[:], package_logger.level, package_logger.propagate = saved


_empty_database_numbers = itertools.count(1)


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of a database with no tables: a new SQLite file or PostgreSQL database."""
    if request.param == "sqlite":
        # A file of 0 bytes is an empty SQLite database.
        (tmp_path / "empty.db").touch()
        yield f"sqlite:///{tmp_path / 'empty.db'}"
        return
    request.getfixturevalue("postgres_url")  # skips or fails when unreachable
    name = f"voucher_jobs_test_{os.getpid()}_empty_{next(_empty_database_numbers)}"
    admin_url = os.environ.get("VOUCHER_JOBS_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)
    admin = create_db_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

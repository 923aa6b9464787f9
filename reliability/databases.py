"""Fresh, migrated databases for the driver, outside pytest.

SQLite databases are files in a temporary folder. On PostgreSQL the driver
creates its own database, `voucher_jobs_reliability_<pid>`, on the server
at VOUCHER_JOBS_TEST_POSTGRES_URL (default: the local server on
127.0.0.1:5432) and drops it at the end.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import make_url

from tests.conftest import DEFAULT_POSTGRES_URL, Database, _truncate_all
from voucher_jobs.data import migrate
from voucher_jobs.data.engine import create_db_engine

BACKENDS = ("sqlite", "postgresql")


class Workspace:
    """Hands out an empty, migrated database and working folder per scenario."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._postgres_url: str | None = None
        self._sequence = itertools.count(1)
        self._open: list[Database] = []

    def fresh(self, backend: str) -> Database:
        workdir = self.root / f"scenario{next(self._sequence):04d}"
        workdir.mkdir()
        if backend == "sqlite":
            url = f"sqlite:///{workdir / 'jobs.db'}"
            engine = create_db_engine(url)
            migrate.upgrade(engine)
        else:
            url = self._postgres()
            engine = create_db_engine(url)
            _truncate_all(engine)
        database = Database(backend, url, engine, workdir)
        self._open.append(database)
        return database

    def _postgres(self) -> str:
        if self._postgres_url is None:
            admin_url = os.environ.get("VOUCHER_JOBS_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)
            name = f"voucher_jobs_reliability_{os.getpid()}"
            admin = create_db_engine(admin_url, isolation_level="AUTOCOMMIT")
            with admin.connect() as connection:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                connection.execute(text(f'CREATE DATABASE "{name}"'))
            admin.dispose()
            url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
            engine = create_db_engine(url)
            migrate.upgrade(engine)
            engine.dispose()
            self._postgres_url = url
        return self._postgres_url

    def close(self) -> None:
        for database in self._open:
            database.engine.dispose()
        if self._postgres_url is not None:
            url = make_url(self._postgres_url)
            admin_url = os.environ.get("VOUCHER_JOBS_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)
            admin = create_db_engine(admin_url, isolation_level="AUTOCOMMIT")
            with admin.connect() as connection:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)'))
            admin.dispose()


@contextmanager
def workspace() -> Iterator[Workspace]:
    root = Path(tempfile.mkdtemp(prefix="voucher-jobs-reliability-"))
    space = Workspace(root)
    try:
        yield space
    finally:
        space.close()
        shutil.rmtree(root, ignore_errors=True)

"""Database faults mid-run: a terminated backend, a restarted server, a wrong password.

The restart tests use a private cluster (reliability/postgres_cluster.py)
on a free port of 127.0.0.1, never the shared server, and remove it at the
end. The terminate tests use the suite's own database on the shared server.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from reliability.db_faults import restart_scenario, terminate_scenario
from reliability.postgres_cluster import BIN, Cluster
from tests.conftest import Database
from tests.processes import kill_leftovers
from voucher_jobs.data import migrate
from voucher_jobs.data.engine import create_db_engine
from voucher_jobs.data.schema import runs

pytestmark = pytest.mark.slow
postgres_only = pytest.mark.parametrize("db", ["postgresql"], indirect=True)
PASSWORD = "cluster-pw-7c1e2b9d"


@pytest.fixture(autouse=True)
def leftover_processes() -> Iterator[None]:
    yield
    kill_leftovers()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    if not (BIN / "initdb").exists():
        pytest.skip(f"no PostgreSQL binaries in {BIN}")
    server = Cluster(PASSWORD)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def cluster_db(cluster: Cluster, tmp_path: Path) -> Iterator[Database]:
    name = f"jobs_{tmp_path.name.lower().replace('-', '_')}"[:60]
    admin = create_db_engine(cluster.url(), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = cluster.url(name)
    engine = create_db_engine(url)
    migrate.upgrade(engine)
    yield Database("postgresql", url, engine, tmp_path)
    engine.dispose()
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    admin.dispose()


@postgres_only
@pytest.mark.parametrize(("scenario", "attempts"), [
    ("expiry", 2), ("archive-file", 2), ("delete", 0),
])
def test_terminated_backend_mid_batch(db: Database, scenario: str, attempts: int) -> None:
    tally = terminate_scenario(db, scenario, attempts)
    assert tally.violations == []
    assert tally.counts["backends terminated"] >= 1


@pytest.mark.parametrize(("scenario", "attempts"), [("archive-file", 5), ("expiry", 0)])
def test_restart_mid_run(cluster: Cluster, cluster_db: Database, scenario: str,
                         attempts: int) -> None:
    tally = restart_scenario(cluster_db, cluster.restart, scenario, attempts)
    assert tally.violations == []


def test_wrong_password_exits_4(cluster: Cluster, cluster_db: Database) -> None:
    url = cluster_db.url.replace(PASSWORD, "not-the-password")
    result = cluster_db.cli("run", "voucher-expired", env=cluster_db.env() | {"DATABASE_URL": url})
    assert result.returncode == 4, result.stderr
    assert "password authentication failed" in result.stderr
    assert "Check DATABASE_URL" in result.stderr
    assert "not-the-password" not in result.stdout + result.stderr
    assert cluster_db.count(runs) == 0

"""A fast subset of the fault-injection driver in reliability/, and checks of its checker."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
from sqlalchemy import delete, insert, select

from reliability.disk_full import disk_full_scenario, tmpfs_available
from reliability.invariants import (
    Tally,
    check_archival,
    check_expiry_complete,
    seed_audit_rows,
    seed_vouchers,
    snapshot,
)
from reliability.kills import arguments, kill_scenario
from tests.conftest import Database
from tests.processes import kill_leftovers
from voucher_jobs.data.schema import voucher_audit_logs

pytestmark = pytest.mark.slow

# One SIGKILL per scenario: three on each backend, six in all. The driver
# runs the full set; test_crash.py kills each mode several times.
SCENARIOS = {
    "sqlite": ("expiry", "archive-table", "archive-file"),
    "postgresql": ("expiry", "delete", "archive-file"),
}


@pytest.fixture(autouse=True)
def leftover_processes() -> Iterator[None]:
    yield
    kill_leftovers()


def test_kills_keep_invariants(db: Database, tmp_path) -> None:
    rng = random.Random(20261204)
    for scenario in SCENARIOS[db.backend]:
        scenario_dir = tmp_path / scenario
        scenario_dir.mkdir()
        fresh = Database(db.backend, db.url, db.engine, scenario_dir)
        if scenario != SCENARIOS[db.backend][0]:
            _empty(fresh)
        tally = kill_scenario(fresh, scenario, 1, rng)
        assert tally.violations == []
        assert tally.kills == 1
        assert tally.rows_checked > 0


def _empty(db: Database) -> None:
    from tests.conftest import _truncate_all
    from voucher_jobs.data.schema import metadata

    if db.backend == "postgresql":
        _truncate_all(db.engine)
        return
    with db.engine.begin() as connection:
        for table in reversed(metadata.sorted_tables):
            connection.execute(delete(table))


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
def test_checker_finds_double_expiry(db: Database) -> None:
    seed_vouchers(db, 20)
    result = db.cli("run", "voucher-expired", "--at", "2026-12-04T10:00:00Z")
    assert result.returncode == 0, result.stderr
    clean = Tally()
    check_expiry_complete(db, clean)
    assert clean.violations == []
    [row] = db.rows(select(voucher_audit_logs).limit(1))
    with db.engine.begin() as connection:
        values = {column: getattr(row, column) for column in row._fields if column != "id"}
        connection.execute(insert(voucher_audit_logs).values(**values))
    planted = Tally()
    check_expiry_complete(db, planted)
    assert len(planted.violations) == 1
    assert "written twice" in planted.violations[0]


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
def test_checker_finds_lost_row(db: Database) -> None:
    seed_audit_rows(db, old=30, new=5)
    before = snapshot(db)
    result = db.cli(*arguments(db, "archive-table", rerun=True))
    assert result.returncode == 0, result.stderr
    clean = Tally()
    check_archival(db, "archive-table", before, db.workdir / "archive", clean, complete=True)
    assert clean.violations == []
    with db.engine.begin() as connection:
        connection.execute(delete(voucher_audit_logs).where(
            voucher_audit_logs.c.id == max(before)))
    planted = Tally()
    check_archival(db, "archive-table", before, db.workdir / "archive", planted, complete=True)
    assert len(planted.violations) == 1
    assert "newer than the cutoff changed" in planted.violations[0]


# The file sink is the same on both backends; the driver runs both.
@pytest.mark.skipif(not tmpfs_available(), reason="mounting a tmpfs needs root")
@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
def test_full_disk_deletes_nothing(db: Database) -> None:
    tally = disk_full_scenario(db)
    assert tally.violations == []

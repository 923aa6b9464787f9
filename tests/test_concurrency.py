"""Concurrent voucher-expired runs in separate OS processes, on both backends."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import select

from tests.conftest import T0, Database
from tests.processes import (
    add_vouchers,
    finish,
    kill_leftovers,
    start_cli,
    start_direct_expiry,
)
from voucher_jobs.data.schema import expirations, runs, voucher_audit_logs

pytestmark = pytest.mark.slow

VOUCHERS = 500
AT = "2026-12-04T10:00:00Z"


@pytest.fixture(autouse=True)
def leftover_processes() -> Iterator[None]:
    """Kill the children that a failing test left running."""
    yield
    kill_leftovers()


def add_expired_vouchers(db: Database) -> list[int]:
    return add_vouchers(db, [T0 - timedelta(minutes=i + 1) for i in range(VOUCHERS)])


def expired_voucher_ids(db: Database) -> list[int]:
    query = select(voucher_audit_logs.c.voucher_id).where(
        voucher_audit_logs.c.action == "EXPIRED"
    )
    return [row.voucher_id for row in db.rows(query)]


def test_second_cli_run_is_rejected(db: Database) -> None:
    ids = add_expired_vouchers(db)
    # 50 batches with a 0.05 s pause after each take at least 2.4 s, far
    # longer than the gap between the two process starts, so the runs overlap.
    arguments = ("run", "voucher-expired", "--at", AT, "--batch-size", "10",
                 "--batch-target-ms", "0", "--pause", "0.05")
    processes = [start_cli(db, *arguments), start_cli(db, *arguments)]
    outcomes = [finish(process) for process in processes]

    codes = sorted(code for code, _, _ in outcomes)
    assert codes == [0, 3], outcomes
    pids = {code: process.pid for process, (code, _, _) in zip(processes, outcomes)}
    loser_stderr = next(stderr for code, _, stderr in outcomes if code == 3)

    [active] = db.rows(select(runs).where(runs.c.pid == pids[0]))
    assert active.status == "succeeded"
    assert active.rows_affected == VOUCHERS
    [skipped] = db.rows(select(runs).where(runs.c.pid == pids[3]))
    assert skipped.status == "skipped"
    assert skipped.blocked_by_run_id == active.id
    assert skipped.finished_at is not None
    assert f"already running (run {active.id})" in loser_stderr
    assert f"skipped run {skipped.id}" in loser_stderr

    logged = expired_voucher_ids(db)
    assert len(logged) == VOUCHERS
    assert sorted(logged) == sorted(ids)


def test_direct_runs_write_each_voucher_once(db: Database) -> None:
    ids = add_expired_vouchers(db)
    run_ids = (1001, 1002)
    children = [start_direct_expiry(db, run_id, 10, 0.01, T0) for run_id in run_ids]
    for child in children:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready", finish(child)
    # Both children are connected and waiting: release them together so
    # that their batches interleave.
    for child in children:
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
    outcomes = [finish(child) for child in children]
    assert [code for code, _, _ in outcomes] == [0, 0], outcomes
    reports = [json.loads(stdout.splitlines()[-1]) for _, stdout, _ in outcomes]
    written = [report["written"] for report in reports]
    assert sum(written) == VOUCHERS
    # They ran side by side, not one after the other. Both walk the same id
    # ranges, so the one behind finds the vouchers claimed and writes fewer
    # rows, or none.
    first, second = sorted(reports, key=lambda report: report["started"])
    assert second["started"] < first["finished"]

    logged = expired_voucher_ids(db)
    assert len(logged) == VOUCHERS
    assert sorted(logged) == sorted(ids)
    assert [count for count in Counter(logged).values() if count > 1] == []

    claims = db.rows(select(expirations.c.voucher_id, expirations.c.run_id))
    assert len(claims) == VOUCHERS
    claims_by_run = Counter(claim.run_id for claim in claims)
    assert [claims_by_run[run_id] for run_id in run_ids] == written
    # Each audit row was written by the run whose claim row was inserted.
    claimant = {claim.voucher_id: claim.run_id for claim in claims}
    audit_rows = db.rows(
        select(voucher_audit_logs.c.voucher_id, voucher_audit_logs.c.metadata).where(
            voucher_audit_logs.c.action == "EXPIRED"
        )
    )
    mismatched = [
        row.voucher_id for row in audit_rows if row.metadata["run_id"] != claimant[row.voucher_id]
    ]
    assert mismatched == []

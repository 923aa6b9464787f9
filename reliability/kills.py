"""SIGKILL at random moments in every job and mode, then a rerun and the invariant checks."""

from __future__ import annotations

import os
import random
import signal
import time

from reliability.invariants import (
    AT,
    RETENTION_DAYS,
    Tally,
    check_archival,
    check_expiry_at_most_once,
    check_expiry_complete,
    check_runs_interrupted,
    seed_audit_rows,
    seed_vouchers,
    snapshot,
)
from tests.conftest import Database
from tests.processes import finish, start_cli, wait_for_run

SCENARIOS = ("expiry", "delete", "archive-table", "archive-file")
# Killed runs use small batches with a pause, so that each lasts several
# seconds. A run removes at most about 170 rows (MAX_KILL_DELAY_SECONDS /
# PAUSE batches of BATCH_SIZE rows) before its kill, so ROWS_PER_KILL leaves
# every kill a run that is still working.
BATCH_SIZE = 10
PAUSE = "0.05"
MAX_KILL_DELAY_SECONDS = 0.8
ROWS_PER_KILL = 200
ARCHIVE_FILE_ROWS = "60"


def arguments(db: Database, scenario: str, *, rerun: bool = False) -> tuple[str, ...]:
    batch = ("--batch-size", "500", "--pause", "0") if rerun else (
        "--batch-size", str(BATCH_SIZE), "--batch-target-ms", "0", "--pause", PAUSE)
    if scenario == "expiry":
        return ("run", "voucher-expired", "--at", AT, *batch)
    return ("run", "audit-archival", "--mode", scenario, "--at", AT,
            "--retention-days", str(RETENTION_DAYS),
            "--archive-dir", str(db.workdir / "archive"), *batch)


def kill_scenario(db: Database, scenario: str, kills: int, rng: random.Random) -> Tally:
    """Kill `kills` runs of one scenario at random moments, rerun, and check."""
    tally = Tally()
    size = ROWS_PER_KILL * kills + 300
    before = {}
    if scenario == "expiry":
        seed_vouchers(db, size)
    else:
        seed_audit_rows(db, old=size, new=100)
        before = snapshot(db)
    env = db.env(VOUCHER_JOBS_ARCHIVE_FILE_ROWS=ARCHIVE_FILE_ROWS)
    archive_dir = db.workdir / "archive"
    killed: list[int] = []
    label = f"{db.backend}/{scenario}"

    for _ in range(kills):
        process = start_cli(db, *arguments(db, scenario), env=env)
        run = wait_for_run(db, process)
        time.sleep(rng.uniform(0, MAX_KILL_DELAY_SECONDS))
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        code, _, stderr = finish(process, timeout=30)
        if code == -signal.SIGKILL:
            tally.kills += 1
            killed.append(run.id)
        else:
            tally.violations.append(f"{label}: run {run.id} exited with {code} before "
                                    f"its kill: {stderr.strip()[-300:]}")
        if scenario == "expiry":
            check_expiry_at_most_once(db, tally)
        else:
            check_archival(db, scenario, before, archive_dir, tally, complete=False)

    result = db.cli(*arguments(db, scenario, rerun=True), env=env)
    tally.expect(result.returncode == 0,
                 f"{label}: rerun exited with {result.returncode}: {result.stderr[-300:]}")
    if scenario == "expiry":
        check_expiry_complete(db, tally)
    else:
        check_archival(db, scenario, before, archive_dir, tally, complete=True)
    check_runs_interrupted(db, killed, tally)
    return tally


def spread(total: int, slots: int) -> list[int]:
    """Split `total` kills over `slots` scenarios as evenly as possible."""
    return [total // slots + (1 if i < total % slots else 0) for i in range(slots)]

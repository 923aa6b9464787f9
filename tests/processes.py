"""Helpers for tests that run voucher-jobs in separate OS processes.

The parent side starts `python -m voucher_jobs` processes, polls the run
ledger until a process has a run in progress, and kills or stops it.
`add_vouchers` fills the vouchers table for such runs in one transaction.

Run as `python -m tests.processes RUN_ID BATCH_SIZE PAUSE REFERENCE_TIME`,
this module is also a child process that calls `voucher_expired.run`
directly, without the runner and its job lock. It prints `ready` once it is
connected, waits for one line on stdin, runs the job, and prints a JSON
object with the EXPIRED rows written and the batches run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import insert, select, text

from voucher_jobs.data.engine import create_db_engine
from voucher_jobs.data.schema import runs, vouchers
from voucher_jobs.jobs import voucher_expired
from voucher_jobs.jobs.base import BatchLimits, JobContext

if TYPE_CHECKING:
    from tests.conftest import Database

ROOT = Path(__file__).resolve().parents[1]
POLL_SECONDS = 0.02

# Every child started here, so that kill_leftovers can end those that a
# failed test left running.
_children: list[subprocess.Popen[str]] = []


class ProcessFailed(AssertionError):
    """A child process exited, or took too long, while the test waited for it."""


def add_vouchers(db: Database, expiries: list[datetime], deleted_at: datetime | None = None,
                 prefix: str = "V") -> list[int]:
    """Insert one voucher per expiry in one transaction and return their ids in order."""
    rows = [
        dict(code=f"{prefix}{i:06d}", type="PERCENTAGE", expiry_date=expiry,
             deleted_at=deleted_at, created_at=expiry - timedelta(days=30))
        for i, expiry in enumerate(expiries)
    ]
    with db.engine.begin() as connection:
        inserted = connection.execute(
            insert(vouchers).returning(vouchers.c.id, sort_by_parameter_order=True), rows
        )
        return [row.id for row in inserted]


def start_cli(
    db: Database, *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """Start `voucher-jobs ARGS` on db's database without waiting for it."""
    process = subprocess.Popen(
        [sys.executable, "-m", "voucher_jobs", *args],
        env=env or db.env(),
        cwd=db.workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _children.append(process)
    return process


def kill_leftovers() -> None:
    """Kill every child that is still running and close the pipes of all of them."""
    while _children:
        process = _children.pop()
        if process.poll() is None:
            process.kill()
        process.communicate()


def finish(process: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str, str]:
    """Wait for a process to exit and return its exit code, stdout and stderr."""
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        raise ProcessFailed(
            f"process {process.pid} ({' '.join(map(str, process.args))}) did not exit "
            f"within {timeout} s and was killed.\nstdout:\n{stdout}\nstderr:\n{stderr}"
        ) from None
    return process.returncode, stdout, stderr


def wait_until(
    condition: Callable[[], Any],
    description: str,
    process: subprocess.Popen[str] | None = None,
    timeout: float = 30,
) -> Any:
    """Poll condition until it returns a truthy value and return that value.

    Raises ProcessFailed when the timeout passes, or when process exits first,
    with the process's output in the message.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            stdout, stderr = process.communicate()
            raise ProcessFailed(
                f"process {process.pid} exited with code {process.returncode} while waiting "
                f"for {description}.\nstdout:\n{stdout}\nstderr:\n{stderr}"
            )
        if time.monotonic() > deadline:
            raise ProcessFailed(f"timed out after {timeout} s waiting for {description}")
        time.sleep(POLL_SECONDS)


def running_run(db: Database, pid: int) -> Any:
    """Return the ledger row of the run that process pid has in progress, or None."""
    rows = db.rows(
        select(runs).where(runs.c.pid == pid, runs.c.status == "running").order_by(runs.c.id)
    )
    return rows[-1] if rows else None


def wait_for_run(db: Database, process: subprocess.Popen[str], timeout: float = 30) -> Any:
    """Wait until process has a run marked running in the ledger and return that row."""
    return wait_until(
        lambda: running_run(db, process.pid),
        f"a running ledger row of process {process.pid}",
        process,
        timeout,
    )


def kill_hard(process: subprocess.Popen[str]) -> None:
    """Send SIGKILL to a process that must still be running, and reap it."""
    assert process.poll() is None, f"process {process.pid} exited before the kill"
    os.kill(process.pid, signal.SIGKILL)
    returncode, _, _ = finish(process, timeout=30)
    assert returncode == -signal.SIGKILL


def start_direct_expiry(db: Database, run_id: int, batch_size: int, pause_seconds: float,
                        reference_time: datetime) -> subprocess.Popen[str]:
    """Start a child that runs voucher_expired.run without the runner's lock."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.processes", str(run_id), str(batch_size),
         str(pause_seconds), reference_time.isoformat()],
        env=db.env(),
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _children.append(process)
    return process


def _run_direct_expiry(run_id: int, batch_size: int, pause_seconds: float,
                       reference_time: datetime) -> int:
    engine = create_db_engine(os.environ["DATABASE_URL"])
    # Connect before reporting ready, so that both children start the job
    # itself at the same moment instead of paying for the connection then.
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))
    print("ready", flush=True)
    sys.stdin.readline()
    limits = BatchLimits(batch_size=batch_size, pause_seconds=pause_seconds)
    parameters = voucher_expired.ExpiryParameters(reference_time=reference_time, limits=limits)
    started = time.time()
    result = voucher_expired.run(engine, parameters, JobContext(run_id=run_id))
    print(json.dumps({"written": result.rows_affected, "batches": result.details["batches"],
                      "started": started, "finished": time.time()}), flush=True)
    engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(
        _run_direct_expiry(
            int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]),
            datetime.fromisoformat(sys.argv[4]),
        )
    )

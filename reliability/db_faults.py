"""Database faults in the middle of a run: a server restart, a terminated backend.

Each scenario checks that the run retries as VOUCHER_JOBS_RETRY_ATTEMPTS
allows, or fails with a message that names the cause, and that the next run
completes with the same invariants as after a kill.
"""

from __future__ import annotations

import time

from sqlalchemy import select, text

from reliability.invariants import (
    AT,
    Tally,
    check_archival,
    check_expiry_complete,
    seed_audit_rows,
    seed_vouchers,
    snapshot,
)
from reliability.kills import arguments
from tests.conftest import Database
from tests.processes import finish, start_cli, wait_for_run, wait_until
from voucher_jobs.data.schema import runs, voucher_audit_logs, vouchers

SIZE = 400


def _seed(db: Database, scenario: str) -> dict:
    if scenario == "expiry":
        seed_vouchers(db, SIZE)
        return {}
    seed_audit_rows(db, old=SIZE, new=50)
    return snapshot(db)


def _check(db: Database, scenario: str, before: dict, tally: Tally) -> None:
    if scenario == "expiry":
        check_expiry_complete(db, tally)
    else:
        check_archival(db, scenario, before, db.workdir / "archive", tally, complete=True)


def _retry_env(db: Database, attempts: int) -> dict[str, str]:
    return db.env(VOUCHER_JOBS_RETRY_ATTEMPTS=str(attempts),
                  VOUCHER_JOBS_RETRY_BASE_SECONDS="0.3",
                  VOUCHER_JOBS_LOCK_TIMEOUT_SECONDS="30",
                  VOUCHER_JOBS_ARCHIVE_FILE_ROWS="60")


def _outcome(db: Database, run_id: int) -> str:
    [row] = db.rows(select(runs.c.status).where(runs.c.id == run_id))
    return row.status


def _rerun(db: Database, scenario: str, env: dict[str, str], tally: Tally, label: str) -> None:
    result = db.cli(*arguments(db, scenario, rerun=True), env=env)
    tally.expect(result.returncode == 0,
                 f"{label}: rerun exited with {result.returncode}: {result.stderr[-400:]}")


def restart_scenario(db: Database, restart, scenario: str, attempts: int) -> Tally:
    """Restart the server (the `restart` callable) while a run works through its batches."""
    tally = Tally()
    label = f"restart/{scenario}/retries={attempts}"
    before = _seed(db, scenario)
    env = _retry_env(db, attempts)
    process = start_cli(db, *arguments(db, scenario), env=env)
    run = wait_for_run(db, process)
    time.sleep(0.5)
    restart()
    tally.counts["database restarts"] += 1
    code, _, stderr = finish(process, timeout=60)
    if attempts:
        tally.expect(code == 0, f"{label}: run exited with {code}: {stderr[-600:]}")
        tally.expect("run_retrying" in stderr, f"{label}: no retry was logged: {stderr[-600:]}")
        tally.expect(_outcome(db, run.id) == "succeeded",
                     f"{label}: run {run.id} is {_outcome(db, run.id)}")
    else:
        tally.expect(code in (1, 4), f"{label}: run exited with {code}: {stderr[-600:]}")
        tally.expect("terminating connection" in stderr or "cannot reach the database" in stderr,
                     f"{label}: the error does not name the cause: {stderr[-600:]}")
    _rerun(db, scenario, env, tally, label)
    _check(db, scenario, before, tally)
    return tally


def _block_one_row(db: Database, scenario: str):
    """Open a transaction that holds a row lock the run's batch will wait for."""
    connection = db.engine.connect()
    transaction = connection.begin()
    if scenario == "expiry":
        # An uncommitted claim of the 100th voucher: the run's claim insert
        # for it waits on the primary key until this transaction ends.
        voucher = connection.execute(
            select(vouchers.c.id, vouchers.c.expiry_date).order_by(vouchers.c.id).offset(100)
            .limit(1)).one()
        connection.execute(text(
            "INSERT INTO voucher_jobs_expirations (voucher_id, expiry_date, run_id, logged_at) "
            "VALUES (:id, :expiry, 999999, now())"), {"id": voucher.id, "expiry": voucher.expiry_date})
    else:
        row_id = connection.execute(
            select(voucher_audit_logs.c.id).order_by(voucher_audit_logs.c.id).offset(100)
            .limit(1)).scalar_one()
        connection.execute(select(voucher_audit_logs.c.id)
                           .where(voucher_audit_logs.c.id == row_id).with_for_update())
    return connection, transaction


def blocked_backends(db: Database) -> list[int]:
    """Return the pids of sessions on this database that wait for a lock."""
    query = text(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid() AND wait_event_type = 'Lock' "
        "AND query ILIKE '%voucher%'")
    with db.engine.connect() as connection:
        return list(connection.execute(query).scalars())


def terminate_scenario(db: Database, scenario: str, attempts: int) -> Tally:
    """Terminate the run's backend with pg_terminate_backend while its batch waits."""
    tally = Tally()
    label = f"terminate/{scenario}/retries={attempts}"
    before = _seed(db, scenario)
    env = _retry_env(db, attempts)
    blocker, transaction = _block_one_row(db, scenario)
    try:
        process = start_cli(db, *arguments(db, scenario), env=env)
        run = wait_for_run(db, process)
        pids = wait_until(lambda: blocked_backends(db), "the run to wait for the row lock",
                          process)
        with db.engine.connect() as connection:
            for pid in pids:
                connection.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        tally.counts["backends terminated"] += len(pids)
    finally:
        transaction.rollback()
        blocker.close()
    code, _, stderr = finish(process, timeout=60)
    if attempts:
        tally.expect(code == 0, f"{label}: run exited with {code}: {stderr[-600:]}")
        tally.expect("run_retrying" in stderr, f"{label}: no retry was logged: {stderr[-600:]}")
    else:
        tally.expect(code == 1, f"{label}: run exited with {code}: {stderr[-600:]}")
        tally.expect("terminating connection due to administrator command" in stderr,
                     f"{label}: the error does not name the cause: {stderr[-600:]}")
        tally.expect(_outcome(db, run.id) == "failed",
                     f"{label}: run {run.id} is {_outcome(db, run.id)}")
    _rerun(db, scenario, env, tally, label)
    _check(db, scenario, before, tally)
    return tally

"""The run ledger: one row in voucher_jobs_runs per attempt to run a job."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, insert, select, update

from voucher_jobs.data.clock import database_now
from voucher_jobs.data.schema import runs

RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
SKIPPED = "skipped"
INTERRUPTED = "interrupted"
STATUSES = (RUNNING, SUCCEEDED, FAILED, SKIPPED, INTERRUPTED)


@dataclass(frozen=True)
class RunRow:
    id: int
    job: str
    trigger: str
    status: str
    parameters: dict[str, Any]
    started_at: datetime
    finished_at: datetime | None
    heartbeat_at: datetime | None
    rows_affected: int
    result: dict[str, Any] | None
    error: str | None
    host: str
    pid: int
    blocked_by_run_id: int | None
    run_key: str | None


def start_run(
    engine: Engine,
    *,
    job: str,
    trigger: str,
    parameters: dict[str, Any],
    host: str,
    pid: int,
    run_key: str | None = None,
    status: str = RUNNING,
    blocked_by_run_id: int | None = None,
) -> RunRow:
    """Insert a run row and return it; started_at comes from the database clock."""
    with engine.begin() as connection:
        now = database_now(connection)
        values = dict(
            job=job,
            trigger=trigger,
            status=status,
            parameters=parameters,
            started_at=now,
            heartbeat_at=now,
            host=host,
            pid=pid,
            run_key=run_key,
            blocked_by_run_id=blocked_by_run_id,
            finished_at=None if status == RUNNING else now,
        )
        run_id = connection.execute(insert(runs).values(**values).returning(runs.c.id)).scalar_one()
        return _get(connection, run_id)


def take_over_skipped_run(
    engine: Engine,
    *,
    job: str,
    run_key: str,
    trigger: str,
    parameters: dict[str, Any],
    host: str,
    pid: int,
) -> RunRow | None:
    """Turn job's skipped row with run_key into a running run, or return None if there is none.

    Only the holder of the job's lock may call this. The skipped row was
    written by a replica that the lock refused while the holder was still
    inserting its own row for the same run key.
    """
    with engine.begin() as connection:
        now = database_now(connection)
        run_id = connection.execute(
            update(runs)
            .where(runs.c.job == job, runs.c.run_key == run_key, runs.c.status == SKIPPED)
            .values(
                trigger=trigger,
                status=RUNNING,
                parameters=parameters,
                started_at=now,
                heartbeat_at=now,
                finished_at=None,
                host=host,
                pid=pid,
                blocked_by_run_id=None,
                error=None,
            )
            .returning(runs.c.id)
        ).scalar_one_or_none()
        return None if run_id is None else _get(connection, run_id)


def finish_run(
    engine: Engine,
    run_id: int,
    *,
    status: str,
    rows_affected: int = 0,
    result: dict[str, Any] | None = None,
    error: str | None = None,
) -> RunRow:
    """Record how a run ended."""
    with engine.begin() as connection:
        now = database_now(connection)
        connection.execute(
            update(runs)
            .where(runs.c.id == run_id)
            .values(
                status=status,
                finished_at=now,
                heartbeat_at=now,
                rows_affected=rows_affected,
                result=result,
                error=error,
            )
        )
        return _get(connection, run_id)


def heartbeat(engine: Engine, run_id: int, rows_affected: int) -> None:
    """Store that the run is alive, with its progress so far."""
    with engine.begin() as connection:
        connection.execute(
            update(runs)
            .where(runs.c.id == run_id, runs.c.status == RUNNING)
            .values(heartbeat_at=database_now(connection), rows_affected=rows_affected)
        )


def active_run(engine: Engine, job: str) -> RunRow | None:
    """Return the newest run of job that is still marked running."""
    with engine.connect() as connection:
        row = connection.execute(
            select(runs)
            .where(runs.c.job == job, runs.c.status == RUNNING)
            .order_by(runs.c.id.desc())
            .limit(1)
        ).first()
        return RunRow(**row._mapping) if row else None


def mark_abandoned_runs(engine: Engine, job: str) -> list[int]:
    """Mark every running row of job interrupted; call only while holding its lock.

    The job lock is held by the live run, so when the caller holds it, a row
    still marked running belongs to a process that died without finishing.
    """
    with engine.begin() as connection:
        now = database_now(connection)
        abandoned = connection.execute(
            update(runs)
            .where(runs.c.job == job, runs.c.status == RUNNING)
            .values(
                status=INTERRUPTED,
                finished_at=now,
                error="the process running it stopped without finishing "
                "(killed, crashed or its host went away)",
            )
            .returning(runs.c.id)
        ).scalars().all()
    return list(abandoned)


def get_run(engine: Engine, run_id: int) -> RunRow | None:
    with engine.connect() as connection:
        return _get(connection, run_id, missing_ok=True)


def recent_runs(
    engine: Engine,
    *,
    job: str | None = None,
    status: str | None = None,
    limit: int = 20,
    before_id: int | None = None,
) -> list[RunRow]:
    """Return the newest runs first, optionally of one job or status.

    before_id keeps only runs with a smaller id, so a caller pages through
    the ledger by passing the last id of the previous page.
    """
    query = select(runs).order_by(runs.c.id.desc()).limit(limit)
    if job:
        query = query.where(runs.c.job == job)
    if status:
        query = query.where(runs.c.status == status)
    if before_id is not None:
        query = query.where(runs.c.id < before_id)
    with engine.connect() as connection:
        return [RunRow(**row._mapping) for row in connection.execute(query)]


def _get(connection: Connection, run_id: int, missing_ok: bool = False) -> Any:
    row = connection.execute(select(runs).where(runs.c.id == run_id)).first()
    if row is None:
        if missing_ok:
            return None
        raise LookupError(f"run {run_id} not found")
    return RunRow(**row._mapping)

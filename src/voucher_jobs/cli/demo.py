"""`voucher-jobs demo`: a realistic data set on the embedded database, and both jobs."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

import typer
from sqlalchemy import func, select

from voucher_jobs.cli.errors import CliError, ExitCode
from voucher_jobs.cli.main import _engine, _run, _settings, app, stdout
from voucher_jobs.data import migrate, sample
from voucher_jobs.data.clock import database_now
from voucher_jobs.data.engine import mask_url
from voucher_jobs.data.schema import vouchers
from voucher_jobs.jobs import audit_archival, voucher_expired
from voucher_jobs.job_settings import batch_limits
from voucher_jobs.runner import execute


@app.command("demo")
def demo(
    vouchers_count: Annotated[int, typer.Option(
        "--vouchers", min=1, max=10_000_000, help="How many vouchers to create.")] = 10_000,
    audit_rows: Annotated[int, typer.Option(
        "--audit-rows", min=0, max=50_000_000,
        help="How many audit rows of history to create, spread over four years.")] = 50_000,
) -> None:
    """Fill an empty database with sample data and run both jobs on it.

    Uses DATABASE_URL (default: the SQLite file voucher-jobs.db here), creates
    the schema if needed, and refuses to touch a database that already has
    vouchers. Expiries spread from 400 days ago to 400 days ahead, one voucher
    in 20 is soft-deleted, and vouchers that expired more than 30 days ago are
    logged first, as an earlier run would have.
    """
    settings = _settings()
    engine = _engine(settings)
    migrate.upgrade(engine)
    with engine.connect() as connection:
        existing = connection.execute(select(func.count()).select_from(vouchers)).scalar_one()
        now = database_now(connection)
    if existing:
        raise CliError(
            f"{mask_url(engine.url)} already has {existing:,} vouchers; the demo only "
            "fills an empty database. Point DATABASE_URL at a new file, such as "
            "DATABASE_URL=sqlite:///demo.db voucher-jobs demo.",
            ExitCode.INVALID_INPUT,
        )
    stdout.print(f"Filling {mask_url(engine.url)}:", markup=False)
    created = sample.insert_vouchers(engine, vouchers_count, now)
    history = sample.insert_audit_history(engine, audit_rows, now, vouchers_count=created)
    stdout.print(f"  {created:,} vouchers, {history:,} audit rows over four years", markup=False)

    earlier = voucher_expired.ExpiryParameters(
        reference_time=now - timedelta(days=30),
        limits=batch_limits(settings),
    )
    run, _ = execute(engine, voucher_expired.NAME, earlier, trigger="cli")
    stdout.print(
        f"  {run.rows_affected:,} vouchers that expired over 30 days ago logged by "
        f"run {run.id}, as an earlier run would have", markup=False)

    stdout.print("\nRunning voucher-expired:", markup=False)
    _run(settings, voucher_expired.NAME, voucher_expired.ExpiryParameters(
        limits=batch_limits(settings)), as_json=False)
    stdout.print("\nRunning audit-archival:", markup=False)
    _run(settings, audit_archival.NAME, audit_archival.ArchivalParameters(
        retention_days=settings.retention_days,
        mode=settings.archive_mode,
        limits=batch_limits(settings),
        archive_dir=settings.archive_dir,
        archive_file_rows=settings.archive_file_rows,
    ), as_json=False)
    stdout.print("\nRun `voucher-jobs run voucher-expired` again: it finds nothing new "
                 "to write. See every run with `voucher-jobs runs`.", markup=False)

"""Job parameters and run options derived from the settings, for every trigger.

The CLI, the scheduler and the HTTP API all build a run from here, so a job
started by any of them uses the same batch size, retention, mode, retries
and maximum run time.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from voucher_jobs.config import Settings
from voucher_jobs.heartbeats import heartbeat_listeners
from voucher_jobs.jobs import audit_archival, voucher_expired
from voucher_jobs.jobs.base import BatchLimits
from voucher_jobs.runner import RetryPolicy


def build_parameters(
    job: str,
    settings: Settings,
    *,
    dry_run: bool = False,
    reference_time: datetime | None = None,
    limits: BatchLimits | None = None,
) -> Any:
    """Return the parameters of job as the settings define them."""
    limits = limits or batch_limits(settings)
    if job == voucher_expired.NAME:
        return voucher_expired.ExpiryParameters(
            reference_time=reference_time, dry_run=dry_run, limits=limits
        )
    if job == audit_archival.NAME:
        return audit_archival.ArchivalParameters(
            retention_days=settings.retention_days,
            mode=settings.archive_mode,
            reference_time=reference_time,
            dry_run=dry_run,
            limits=limits,
            archive_dir=settings.archive_dir,
            archive_file_rows=settings.archive_file_rows,
            partition_lock_timeout_seconds=settings.partition_lock_timeout_seconds,
        )
    raise KeyError(f"unknown job {job!r}")


def batch_limits(settings: Settings, **overrides: Any) -> BatchLimits:
    """Return the batch limits the settings define; overrides given as None are ignored."""
    values: dict[str, Any] = {
        "batch_size": settings.batch_size,
        "pause_seconds": settings.batch_pause_seconds,
        "target_seconds": settings.batch_target_ms / 1000 or None,
    }
    values.update({name: value for name, value in overrides.items() if value is not None})
    return BatchLimits(**values)


def max_run_seconds(job: str, settings: Settings) -> float:
    return float(getattr(settings, f"{job.replace('-', '_')}_max_run_seconds"))


def retry_policy(settings: Settings) -> RetryPolicy:
    return RetryPolicy(attempts=settings.retry_attempts, base_seconds=settings.retry_base_seconds)


def run_options(job: str, settings: Settings) -> dict[str, Any]:
    """Return the ActiveRun.run() options that the settings define for job.

    Every trigger passes these, so retries, the maximum run time and the
    heartbeat calls are the same however a run starts.
    """
    return {
        "retry": retry_policy(settings),
        "max_seconds": max_run_seconds(job, settings),
        "listeners": heartbeat_listeners(job, settings),
    }

"""audit-archival: remove audit rows older than the retention, in short batches.

A row is eligible when `created_at < cutoff`, where
`cutoff = reference time - retention_days days`. The reference time is read
once from the database clock when the run starts (or given for a backfill),
so the cutoff is fixed for the whole run and rows written while it runs are
never eligible. Retention is at least one day, so the cutoff is never in the
future.

Modes: `delete` removes the rows; `archive-table` moves them to
`voucher_jobs_audit_archive` in the transaction that deletes them;
`archive-file` writes them to verified files first (see archive_files).
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import Engine

from voucher_jobs.config import ArchiveMode
from voucher_jobs.data.audit_batches import (
    BatchOutcome,
    Walk,
    columns_not_archived,
    delete_batch,
    move_batch,
    summarize_eligible,
)
from voucher_jobs.data.clock import database_now
from voucher_jobs.data.engine import connect_for_reads
from voucher_jobs.jobs import archive_files, partition_retirement
from voucher_jobs.jobs.base import BatchLimits, JobContext, JobResult

NAME = "audit-archival"


@dataclass(frozen=True)
class ArchivalParameters:
    """Parameters of one audit-archival run."""

    retention_days: int
    mode: ArchiveMode = ArchiveMode.DELETE
    reference_time: datetime | None = None
    dry_run: bool = False
    limits: BatchLimits = BatchLimits()
    archive_dir: Path = Path("archive")
    archive_file_rows: int = 100_000
    # How long retiring a whole partition waits for its lock on the parent.
    partition_lock_timeout_seconds: float = 2.0


def compute_cutoff(reference_time: datetime, retention_days: int) -> datetime:
    """Return the instant before which audit rows are eligible."""
    if retention_days < 1:
        raise ValueError(f"retention_days={retention_days} is invalid: it must be at least 1")
    try:
        return reference_time - timedelta(days=retention_days)
    except OverflowError:
        raise ValueError(
            f"reference time {reference_time.isoformat()} minus {retention_days} days "
            "is before year 1. Use a later reference time."
        ) from None


def run(engine: Engine, parameters: ArchivalParameters, context: JobContext) -> JobResult:
    """Archive or delete every row older than the cutoff, batch by batch."""
    # The summary reads every eligible row, so on SQLite it must not hold
    # the write lock that the application's writes wait for.
    with connect_for_reads(engine) as connection:
        reference_time = parameters.reference_time or database_now(connection)
        cutoff = compute_cutoff(reference_time, parameters.retention_days)
        if parameters.mode is not ArchiveMode.DELETE:
            extra = columns_not_archived(connection)
            if extra:
                raise ValueError(
                    f"voucher_audit_logs has columns that {parameters.mode.value} mode "
                    f"would not keep: {', '.join(extra)}. Nothing was archived or "
                    "deleted. Use --mode delete, or drop those columns first."
                )
        summary = summarize_eligible(connection, cutoff)
        connection.rollback()
    details = {
        "mode": parameters.mode.value,
        "reference_time": reference_time.isoformat(),
        "cutoff": cutoff.isoformat(),
        "retention_days": parameters.retention_days,
        "eligible_at_start": summary["eligible"],
        "oldest_eligible": summary["oldest"].isoformat() if summary["oldest"] else None,
        "newest_eligible": summary["newest"].isoformat() if summary["newest"] else None,
    }
    context.log("archival_started", **details, dry_run=parameters.dry_run)
    if parameters.dry_run:
        details.update(partition_retirement.describe_retirement(engine, cutoff, context))
        return JobResult(rows_affected=0, dry_run=True, details=details)

    # On a range-partitioned table, whole partitions older than the cutoff
    # are archived and dropped first; the batches remove the rest.
    retirement = partition_retirement.retire_old_partitions(
        engine, parameters, context, cutoff, reference_time
    )
    details.update(retirement.details())

    walk = Walk(cutoff, summary["max_id"] if summary["max_id"] is not None else 0)
    # The walk starts below the lowest eligible id: nothing under it is
    # eligible, so no batch needs to read there.
    start_id = summary["min_id"] - 1 if summary["min_id"] is not None else walk.end_id
    sizer = parameters.limits.sizer()
    if parameters.mode is ArchiveMode.ARCHIVE_FILE:
        outcome = _run_file_mode(engine, parameters, context, walk, start_id, sizer,
                                 summary["eligible"])
    else:
        outcome = _run_table_modes(engine, parameters, context, walk, start_id, sizer,
                                   reference_time, summary["eligible"])
    removed, batches, interrupted, extra = outcome
    removed += retirement.removed
    details.update(removed=removed, batches=batches, **sizer.details(), **extra)
    return JobResult(rows_affected=removed, interrupted=interrupted, details=details)


def _run_table_modes(engine, parameters, context, walk, after_id, sizer, reference_time,
                     eligible):
    limits = parameters.limits
    started = time.monotonic()
    removed = batches = 0
    context.progress(0, eligible)
    while after_id < walk.end_id:
        size = sizer.size
        batch_started = time.monotonic()
        if parameters.mode is ArchiveMode.ARCHIVE_TABLE:
            outcome: BatchOutcome = move_batch(
                engine, walk, after_id, size, context.run_id, reference_time
            )
        else:
            outcome = delete_batch(engine, walk, after_id, size)
        elapsed = time.monotonic() - batch_started
        if outcome.last_id is None:
            break
        sizer.record(elapsed, outcome.rows, outcome.full)
        batches += 1
        removed += outcome.rows
        after_id = outcome.last_id
        context.progress(removed, eligible)
        context.log("archival_batch", batch=batches, rows=outcome.rows, last_id=after_id,
                    ms=round(elapsed * 1000, 1), next_size=sizer.size)
        stop = _should_stop(context, limits, batches, started)
        if stop is not None:
            return removed, batches, stop, {}
    return removed, batches, False, {}


def _should_stop(context: JobContext, limits: BatchLimits, batches: int, started: float):
    """Return True to stop as interrupted, False to stop at a limit, None to go on."""
    if context.stop_requested():
        return True
    if limits.reached(batches, started):
        return False
    if limits.pause_seconds:
        context.sleep(limits.pause_seconds)
        # A stop requested during the pause ends the run before the next batch.
        if context.stop_requested():
            return True
    return None


def _run_file_mode(engine, parameters, context, walk, after_id, sizer, eligible):
    limits = parameters.limits
    directory = parameters.archive_dir
    started = time.monotonic()
    removed = batches = 0
    files: list[str] = []
    context.progress(0, eligible)

    def on_batch(rows: int, seconds: float) -> bool:
        nonlocal removed, batches
        removed += rows
        batches += 1
        sizer.record(seconds, rows)
        context.progress(removed, eligible)
        context.log("archival_batch", batch=batches, rows=rows, ms=round(seconds * 1000, 1),
                    next_size=sizer.size)
        return _should_stop(context, limits, batches, started) is None

    # Finish what a crashed or stopped run left: verified files whose rows
    # are not all deleted yet.
    for manifest in archive_files.unfinished_files(engine, directory, context.log):
        context.log("archive_file_resumed", file=manifest.name, rows=manifest.rows)
        ids = list(archive_files.iter_ids(directory / manifest.name))
        complete = archive_files.delete_archived_rows(engine, manifest, ids, sizer, on_batch)
        if not complete:
            return removed, batches, context.stop_requested(), {"files": files}

    # A retry of this run, after a transient error, numbers its files after
    # those of the earlier attempts, so that no name is used twice.
    sequence = archive_files.files_of_run(engine, context.run_id)

    def write(after: int, number: int) -> archive_files.WrittenFile | None:
        return archive_files.write_file(
            engine,
            directory,
            walk,
            after,
            max_rows=parameters.archive_file_rows,
            page_size=archive_files.EXPORT_PAGE_ROWS,
            run_id=context.run_id,
            sequence=number,
            stop_requested=context.stop_requested,
        )

    # When PostgreSQL builds the lines, a second thread writes the next
    # file while this one verifies the current file and deletes its rows.
    # The writing uses one server process and the compression, the deletes
    # another server process and the disk. On SQLite both would wait for
    # the same lock, so there the steps take turns.
    overlap = archive_files.lines_built_by_server(engine)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="archive-writer") as writer:
        upcoming: Future[archive_files.WrittenFile | None] | None = None
        while after_id < walk.end_id:
            sequence += 1
            written = upcoming.result() if upcoming else write(after_id, sequence)
            upcoming = None
            if written is None:
                break
            after_id = written.manifest.last_key.id
            if overlap and after_id < walk.end_id and not context.stop_requested():
                upcoming = writer.submit(write, after_id, sequence + 1)
            manifest, ids = archive_files.finish_file(written)
            archive_files.register(engine, manifest)
            files.append(manifest.name)
            context.log("archive_file_exported", file=manifest.name, rows=manifest.rows,
                        sha256=manifest.sha256)
            complete = archive_files.delete_archived_rows(engine, manifest, ids, sizer, on_batch)
            if not complete or context.stop_requested() or limits.reached(batches, started):
                break
        if upcoming is not None:
            # The run stops while the next file is being written. None of
            # its rows was deleted, so the next run writes them again.
            leftover = upcoming.result()
            if leftover is not None:
                leftover.discard()
    return removed, batches, context.stop_requested(), {"files": files}

"""audit-archival's first step on a range-partitioned voucher_audit_logs: retire old partitions.

Before the batches start, every partition whose whole range of created_at
is before the cutoff is archived as a whole, detached and dropped, oldest
first (see voucher_jobs.data.partitions). The batches then handle what is
left: the partition that contains the cutoff, the DEFAULT partition, and
any partition this step skipped.

By mode, the archive copy of a partition is made inside the transaction that
detaches it:

- delete: the rows are only counted.
- archive-table: the rows are copied to voucher_jobs_audit_archive and
  compared with the archive.
- archive-file: the rows are written to verified files, which are
  registered as `exported` and marked `complete` in the commit that
  detaches the partition. When that transaction rolls back (a crash, or a
  lock that is not granted), the files stay `exported`. The file repair then
  deletes their rows by id, in this run's batches or in the next run, as
  after any crash of that mode. This step runs that repair first, so that it
  never exports a row a second time.

When a lock is not granted within VOUCHER_JOBS_PARTITION_LOCK_TIMEOUT_SECONDS,
the step logs `partition_retire_skipped` and stops retiring: the other old
partitions need the same lock on the parent table. The batches remove their
rows instead, and the next run tries again.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError

from voucher_jobs.config import ArchiveMode
from voucher_jobs.data import partitions
from voucher_jobs.data.audit_batches import Walk
from voucher_jobs.data.partitions import Partition
from voucher_jobs.jobs import archive_files
from voucher_jobs.jobs.base import JobContext


class PartitionExportMismatch(Exception):
    """A partition whose archive files hold another number of rows than it does."""


class Retirement:
    """The outcome of the retirement step: partitions dropped, rows removed, partition skipped."""

    def __init__(self) -> None:
        self.partitioned = False
        # Rows of the retired partitions.
        self.rows = 0
        # Rows of unfinished archive files that the file repair deleted first.
        self.resumed_rows = 0
        self.retired: list[dict[str, Any]] = []
        self.skipped: list[dict[str, Any]] = []

    def details(self) -> dict[str, Any]:
        """Return the fields for the run record; none when the table is not partitioned."""
        if not self.partitioned:
            return {}
        return {
            "partitions_retired": self.retired,
            "partition_rows_retired": self.rows,
            "partitions_skipped": self.skipped,
        }

    @property
    def removed(self) -> int:
        """Return every row this step removed from the live table."""
        return self.rows + self.resumed_rows


def describe_retirement(engine: Engine, cutoff: datetime, context: JobContext) -> dict[str, Any]:
    """Return, for a dry run's record, the partitions a real run would retire."""
    if engine.dialect.name != "postgresql":
        return {}
    with engine.connect() as connection:
        layout = partitions.read_layout(connection)
        if layout is None:
            return {}
        planned = [
            {**partition.describe(), "rows": partitions.count_rows(connection, partition)}
            for partition in layout.retirable(cutoff)
        ]
        connection.rollback()
    context.log("partitions_to_retire", partitions=",".join(p["name"] for p in planned) or None,
                rows=sum(p["rows"] for p in planned))
    return {"partitions_to_retire": planned}


def retire_old_partitions(
    engine: Engine,
    parameters: Any,
    context: JobContext,
    cutoff: datetime,
    reference_time: datetime,
    *,
    lock_timeout_seconds: float | None = None,
) -> Retirement:
    """Archive and drop every partition whose whole range is before cutoff, oldest first.

    `parameters` are the run's ArchivalParameters. `lock_timeout_seconds`
    defaults to their partition_lock_timeout_seconds. Returns an empty
    Retirement on SQLite and for a table that is not partitioned by range of
    created_at.
    """
    retirement = Retirement()
    if engine.dialect.name != "postgresql":
        return retirement
    with engine.connect() as connection:
        layout = partitions.read_layout(connection)
        connection.rollback()
    if layout is None:
        return retirement
    retirement.partitioned = True
    timeout = lock_timeout_seconds or parameters.partition_lock_timeout_seconds
    for table, error in partitions.drop_detached_tables(engine, layout.qualified_name, timeout):
        context.log("detached_partition_dropped" if error is None
                    else "detached_partition_drop_failed", table=table, error=error)
    candidates = layout.retirable(cutoff)
    if not candidates:
        return retirement
    mode: ArchiveMode = parameters.mode
    if mode is ArchiveMode.ARCHIVE_FILE and not _finish_unfinished_files(
        engine, parameters, context, retirement
    ):
        return retirement

    for position, partition in enumerate(candidates):
        if context.stop_requested():
            break
        step = _ArchiveStep(engine, parameters, context, cutoff, reference_time, partition)
        try:
            retired = partitions.retire_partition(
                engine, layout.qualified_name, partition, step.archive, timeout,
                before_commit=step.before_commit,
            )
        except DBAPIError as exc:
            reason = partitions.skip_reason(exc)
            if reason is None:
                raise
            not_tried = [later.name for later in candidates[position + 1:]]
            _log_skip(context, retirement, partition, reason, exc, timeout, not_tried)
            break
        if retired is None:
            # A stop was requested during the export; nothing was detached.
            break
        entry = {
            "name": partition.name,
            "rows": retired.rows,
            "detach_ms": _milliseconds(retired.detach_seconds),
            "drop_ms": _milliseconds(retired.drop_seconds),
        }
        retirement.retired.append(entry)
        retirement.rows += retired.rows
        context.log("partition_retired", partition=partition.name, rows=retired.rows,
                    mode=mode.value, detach_ms=entry["detach_ms"], drop_ms=entry["drop_ms"],
                    **step.log_fields())
        if retired.drop_error is not None:
            context.log("detached_partition_drop_failed", table=retired.detached_as,
                        error=retired.drop_error)
    return retirement


def _milliseconds(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _log_skip(context: JobContext, retirement: Retirement, partition: Partition, reason: str,
              exc: DBAPIError, timeout: float, not_tried: list[str]) -> None:
    error = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
    retirement.skipped.append({"name": partition.name, "reason": reason, "error": error})
    context.log("partition_retire_skipped", partition=partition.name, reason=reason,
                error=error, lock_timeout_ms=round(timeout * 1000),
                not_tried=",".join(not_tried) or None)


class _ArchiveStep:
    """The archive copy of one partition, by mode, made inside its retiring transaction."""

    def __init__(self, engine: Engine, parameters: Any, context: JobContext, cutoff: datetime,
                 reference_time: datetime, partition: Partition) -> None:
        self.engine = engine
        self.parameters = parameters
        self.context = context
        self.cutoff = cutoff
        self.reference_time = reference_time
        self.partition = partition
        self.files: list[str] = []
        self.already_archived: int | None = None

    def archive(self, connection: Connection) -> int | None:
        mode = self.parameters.mode
        if mode is ArchiveMode.ARCHIVE_TABLE:
            # archived_at is the run's reference time, as in the batches.
            rows, self.already_archived = partitions.copy_to_archive_table(
                connection, self.partition, self.context.run_id, self.reference_time
            )
            return rows
        if mode is ArchiveMode.ARCHIVE_FILE:
            return self._export(connection)
        return partitions.count_rows(connection, self.partition)

    def before_commit(self, connection: Connection) -> None:
        partitions.mark_files_complete(connection, self.files)

    def log_fields(self) -> dict[str, Any]:
        if self.already_archived is not None:
            return {"already_archived": self.already_archived}
        if self.files:
            return {"files": ",".join(self.files)}
        return {}

    def _export(self, connection: Connection) -> int | None:
        """Write the locked partition's rows to registered files.

        Returns the rows written, or None when a stop was requested first.
        """
        rows = partitions.count_rows(connection, self.partition)
        low, high = partitions.id_range(connection, self.partition)
        if low is None or high is None:
            return 0

        walk = Walk(self.cutoff, high)
        after_id = low - 1
        reader = partitions.partition_reader(self.partition)
        exported = 0
        # A run numbers its files on from those it has registered already.
        sequence = archive_files.files_of_run(self.engine, self.context.run_id)
        while after_id < walk.end_id:
            sequence += 1
            written = archive_files.write_file(
                self.engine,
                self.parameters.archive_dir,
                walk,
                after_id,
                max_rows=self.parameters.archive_file_rows,
                page_size=self.parameters.limits.batch_size,
                run_id=self.context.run_id,
                sequence=sequence,
                stop_requested=self.context.stop_requested,
                read_rows=reader,
                table=self.partition.qualified_name,
            )
            if written is None:
                break
            manifest, _ids = archive_files.finish_file(written)
            archive_files.register(self.engine, manifest)
            self.files.append(manifest.name)
            self.context.log("archive_file_exported", file=manifest.name, rows=manifest.rows,
                             sha256=manifest.sha256, partition=self.partition.name)
            exported += manifest.rows
            after_id = manifest.last_key.id

        if exported < rows and self.context.stop_requested():
            return None
        if exported != rows:
            # The SHARE lock keeps the partition's rows as they are, so the
            # files must hold every one of them; dropping it otherwise could
            # lose rows.
            raise PartitionExportMismatch(
                f"the archive files of partition {self.partition.qualified_name} hold "
                f"{exported} rows, but it has {rows}. The partition was not dropped. Its "
                "files stay registered as exported, and the next run deletes their rows by id."
            )
        return rows


def _finish_unfinished_files(engine: Engine, parameters: Any, context: JobContext,
                             retirement: Retirement) -> bool:
    """Delete the live rows of archive files that an earlier run did not finish.

    Without this, a partition whose rows a crashed run had exported would be
    exported again, and those rows would be in two files. Returns False when
    a stop was requested before every file was complete.
    """
    sizer = parameters.limits.sizer()

    def on_batch(rows: int, seconds: float) -> bool:
        retirement.resumed_rows += rows
        sizer.record(seconds, rows)
        return not context.stop_requested()

    directory = parameters.archive_dir
    for manifest in archive_files.unfinished_files(engine, directory, context.log):
        context.log("archive_file_resumed", file=manifest.name, rows=manifest.rows)
        ids = list(archive_files.iter_ids(directory / manifest.name))
        if not archive_files.delete_archived_rows(engine, manifest, ids, sizer, on_batch):
            return False
    return True

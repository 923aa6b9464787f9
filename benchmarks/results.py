"""The figures one benchmark run collects, one Measurement per measured step."""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks.backends import StorageGrowth
from benchmarks.datasets import ArchivalCase, ExpiryCase
from benchmarks.writer import WriterStats

SEED = "seed algorithm"
SINGLE = "single statement"
JOB = "job"
# voucher-expired again on the same copy, right after the first run.
RERUN = "rerun"
# The concurrent writer alone on a fresh copy, for the latency baseline.
IDLE = "idle writer"

MIB = 2**20


@dataclass
class Measurement:
    """One measured step on one fresh copy of a data set.

    `seconds` is the work's own duration: the statement for a single
    statement, the run as its run record gives it for a job, and the
    extrapolated total for the seed algorithm. `wall_seconds` is the child
    process from start to exit, interpreter start included.
    """

    backend: str
    case: ExpiryCase | ArchivalCase
    method: str
    mode: str | None = None
    rows: int | None = None
    seconds: float | None = None
    wall_seconds: float | None = None
    # Seed algorithm: vouchers handled before the cap, of all loaded.
    sampled: int | None = None
    loaded: int | None = None
    batches: int | None = None
    median_batch_ms: float | None = None
    longest_batch_ms: float | None = None
    peak_rss_mib: float | None = None
    growth: StorageGrowth | None = None
    archive_bytes: int | None = None
    writer: WriterStats | None = None
    error: str | None = None

    @property
    def rows_per_second(self) -> float | None:
        if self.rows is None or not self.seconds:
            return None
        return self.rows / self.seconds

    @property
    def scale(self) -> int:
        """Rows of the data set's main table: vouchers or audit rows."""
        if isinstance(self.case, ExpiryCase):
            return self.case.vouchers
        return self.case.audit_rows

    @property
    def where(self) -> str:
        mode = f", {self.mode}" if self.mode else ""
        return f"{self.backend}, {self.case.label}{mode}, {self.method}"


@dataclass
class DatasetInfo:
    """A filled template: what it holds, how long filling took, its size on disk."""

    backend: str
    label: str
    vouchers: int
    audit_rows: int
    fill_seconds: float
    size_bytes: int


@dataclass
class PartitionRun:
    """One retirement of a whole old partition on PostgreSQL.

    `detach_ms` runs from DETACH to the end of its COMMIT: the time the
    parent table is locked exclusively. `drop_ms` is the DROP of the
    detached table that follows. `run_seconds` is the whole audit-archival
    run, with the archive modes' copy or export.
    """

    mode: str
    rows: int
    detach_ms: float | None = None
    drop_ms: float | None = None
    run_seconds: float | None = None
    error: str | None = None

    @property
    def retirement_ms(self) -> float | None:
        if self.detach_ms is None or self.drop_ms is None:
            return None
        return self.detach_ms + self.drop_ms

    @property
    def where(self) -> str:
        return f"postgresql, partition of {self.rows:,} rows, {self.mode}"

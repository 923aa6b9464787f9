"""The performance targets, each evaluated on the worst case the run measured.

The voucher-expired and audit-archival targets are defined for PostgreSQL
with append-ordered data, and only those measurements judge them. The same
figures of the other backends and layouts are evaluated too, but only to be
reported. The peak RSS targets are judged over every case, and the SQLite
"database is locked" target over SQLite.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from benchmarks.datasets import ArchivalCase, ExpiryCase
from benchmarks.results import IDLE, JOB, RERUN, SEED, SINGLE, Measurement, PartitionRun

EXPIRY_VS_SINGLE_MAX = 1.2
EXPIRY_VS_SEED_MIN = 100.0
NOTHING_TO_DO_MAX_SECONDS = 1.0
ARCHIVAL_VS_SINGLE_MIN = 0.9
LONGEST_BATCH_MAX_MS = 200.0
WRITER_P99_VS_IDLE_MAX = 1.2
# 150 MB, in the MiB that the reports use.
PEAK_RSS_MAX_MIB = 150e6 / 2**20
# "Flat": the peak at the largest scale is at most this much above the peak
# at the smallest one.
PEAK_RSS_GROWTH_MAX = 1.10
# Retiring a whole partition: its DETACH transaction plus its DROP.
PARTITION_RETIREMENT_MAX_MS = 50.0

MET = "met"
MISSED = "missed"
NOT_MEASURED = "not measured"

# (backend, layout) of the measurements that judge the job targets, and of
# those whose figures are only reported.
JUDGED_CASE = ("postgresql", "append")
REPORTED_CASES = (("postgresql", "shuffled"), ("sqlite", "append"), ("sqlite", "shuffled"))


@dataclass(frozen=True)
class TargetResult:
    """One target: its limit, the worst figure measured, where, and whether it was met."""

    name: str
    limit: str
    worst: str
    where: str
    status: str


@dataclass(frozen=True)
class Evaluation:
    """The targets of one run, judged and reported.

    `case_targets` are the voucher-expired and audit-archival targets on
    JUDGED_CASE. `reported` contains the same targets evaluated on each of
    REPORTED_CASES. Their status shows whether the figure is within the
    limit, and the report judges nothing by it.
    """

    case_targets: list[TargetResult]
    memory_targets: list[TargetResult]
    sqlite_targets: list[TargetResult]
    reported: dict[tuple[str, str], list[TargetResult]]
    partition_targets: list[TargetResult]

    @property
    def judged(self) -> list[TargetResult]:
        """Every judged target, in the order of the report's table."""
        return [*self.case_targets, *self.partition_targets, *self.memory_targets,
                *self.sqlite_targets]


class _Index:
    """Measurements looked up by backend, data set, method and mode."""

    def __init__(self, measurements: list[Measurement]) -> None:
        self.measurements = measurements
        self._by_key = {(m.backend, m.case, m.method, m.mode): m for m in measurements}

    def get(self, measurement: Measurement, method: str) -> Measurement | None:
        return self._by_key.get((measurement.backend, measurement.case, method, measurement.mode))

    def idle(self, measurement: Measurement) -> Measurement | None:
        return self._by_key.get((measurement.backend, measurement.case, IDLE, None))

    def select(self, predicate: Callable[[Measurement], bool]) -> list[Measurement]:
        return [m for m in self.measurements if predicate(m)]


def evaluate(measurements: list[Measurement],
             partition_runs: Iterable[PartitionRun] = ()) -> Evaluation:
    """Evaluate every target on the measurements and partition retirements of one run."""
    index = _Index(measurements)
    largest_vouchers = max(
        (m.case.vouchers for m in measurements if isinstance(m.case, ExpiryCase)), default=None)
    # With the writer turned off (--writer-rate 0) its targets are not measured.
    writer_ran = any(m.writer is not None for m in measurements)
    all_jobs = index.select(lambda m: m.method in (JOB, RERUN))
    return Evaluation(
        case_targets=_job_targets(_in_case(measurements, *JUDGED_CASE), largest_vouchers,
                                  writer_ran),
        memory_targets=[
            _worst(
                "peak RSS of a job process",
                f"≤ 150 MB ({PEAK_RSS_MAX_MIB:.1f} MiB)",
                [(m, m) for m in all_jobs],
                lambda job, _: job.peak_rss_mib,
                lambda value: value <= PEAK_RSS_MAX_MIB, higher_is_worse=True,
                show=lambda value: f"{value:.1f} MiB",
            ),
            _rss_flat(all_jobs),
        ],
        sqlite_targets=[_sqlite_locked(index.select(
            lambda m: m.backend == "sqlite" and m.method in (JOB, IDLE)
            and isinstance(m.case, ArchivalCase)))],
        reported={case: _job_targets(_in_case(measurements, *case), largest_vouchers,
                                     writer_ran)
                  for case in REPORTED_CASES},
        partition_targets=[_partition_retirement(list(partition_runs))],
    )


def _in_case(measurements: list[Measurement], backend: str, layout: str) -> list[Measurement]:
    return [m for m in measurements if m.backend == backend and m.case.layout == layout]


def _job_targets(measurements: list[Measurement], largest_vouchers: int | None,
                 writer_ran: bool) -> list[TargetResult]:
    """Evaluate the voucher-expired and audit-archival targets on measurements.

    voucher-expired is judged at largest_vouchers, the largest voucher count
    of the whole run, so that every backend and layout is judged at the same
    count and their targets have the same names.
    """
    index = _Index(measurements)
    at_scale = f" at {largest_vouchers:,} vouchers" if largest_vouchers else ""

    def expiry_jobs(logged: int, method: str = JOB) -> list[Measurement]:
        return index.select(lambda m: isinstance(m.case, ExpiryCase) and m.method == method
                            and m.case.vouchers == largest_vouchers
                            and m.case.logged_percent == logged)

    archival_jobs = index.select(lambda m: isinstance(m.case, ArchivalCase) and m.method == JOB)
    return [
        _worst(
            f"voucher-expired time ÷ single statement{at_scale}",
            f"≤ {EXPIRY_VS_SINGLE_MAX}x",
            [(m, index.get(m, SINGLE)) for m in expiry_jobs(0)],
            lambda job, single: job.seconds / single.seconds,
            lambda value: value <= EXPIRY_VS_SINGLE_MAX, higher_is_worse=True,
            show=lambda value: f"{value:.2f}x",
        ),
        _worst(
            f"seed algorithm time ÷ voucher-expired time{at_scale}",
            f"≥ {EXPIRY_VS_SEED_MIN:.0f}x",
            [(m, index.get(m, SEED)) for m in expiry_jobs(0)],
            lambda job, seed: seed.seconds / job.seconds,
            lambda value: value >= EXPIRY_VS_SEED_MIN, higher_is_worse=False,
            show=lambda value: f"{value:,.0f}x",
        ),
        _worst(
            f"voucher-expired with nothing to do{at_scale}, also right after the first run",
            f"< {NOTHING_TO_DO_MAX_SECONDS:.0f} s (the run's own time)",
            [(m, m) for m in expiry_jobs(100) + expiry_jobs(0, RERUN)],
            lambda job, _: job.seconds,
            lambda value: value < NOTHING_TO_DO_MAX_SECONDS, higher_is_worse=True,
            show=lambda value: f"{value:.3f} s",
        ),
        _worst(
            "audit-archival rows/s ÷ single statement rows/s, every mode",
            f"≥ {ARCHIVAL_VS_SINGLE_MIN}x",
            [(m, index.get(m, SINGLE)) for m in archival_jobs],
            lambda job, single: job.rows_per_second / single.rows_per_second,
            lambda value: value >= ARCHIVAL_VS_SINGLE_MIN, higher_is_worse=False,
            show=lambda value: f"{value:.2f}x",
        ),
        _worst(
            "audit-archival longest batch",
            f"≤ {LONGEST_BATCH_MAX_MS:.0f} ms",
            [(m, m) for m in archival_jobs],
            lambda job, _: job.longest_batch_ms,
            lambda value: value <= LONGEST_BATCH_MAX_MS, higher_is_worse=True,
            show=lambda value: f"{value:,.1f} ms",
        ),
        _worst(
            "writer p99 during audit-archival ÷ writer p99 on the idle database",
            f"≤ {WRITER_P99_VS_IDLE_MAX}x",
            [(m, index.idle(m)) for m in archival_jobs if writer_ran],
            lambda job, idle: job.writer.p99_ms / idle.writer.p99_ms,
            lambda value: value <= WRITER_P99_VS_IDLE_MAX, higher_is_worse=True,
            show=lambda value: f"{value:.2f}x",
        ),
    ]


def _worst(
    name: str,
    limit: str,
    pairs: Iterable[tuple[Measurement, Measurement | None]],
    figure: Callable[[Measurement, Measurement], float | None],
    passes: Callable[[float], bool],
    *,
    higher_is_worse: bool,
    show: Callable[[float], str],
) -> TargetResult:
    """Evaluate figure(first, second) on every pair and judge the worst value.

    A pair whose steps failed or lack the figure makes the target missed,
    because the run cannot show that the target is met there.
    """
    values: list[tuple[float, Measurement]] = []
    unmeasured: list[Measurement] = []
    for first, second in pairs:
        value = None
        if second is not None and first.error is None and second.error is None:
            try:
                value = figure(first, second)
            except (TypeError, ZeroDivisionError, AttributeError):
                value = None
        if value is None:
            unmeasured.append(first)
        else:
            values.append((value, first))
    if unmeasured:
        return TargetResult(name, limit, "no figure", unmeasured[0].where, MISSED)
    if not values:
        return TargetResult(name, limit, "-", "-", NOT_MEASURED)
    pick = max if higher_is_worse else min
    worst_value, worst = pick(values, key=lambda pair: pair[0])
    return TargetResult(name, limit, show(worst_value), worst.where,
                        MET if passes(worst_value) else MISSED)


def _rss_flat(jobs: list[Measurement]) -> TargetResult:
    name = "peak RSS flat from the smallest to the largest data set, per backend, job and mode"
    limit = f"largest ≤ {PEAK_RSS_GROWTH_MAX:.2f}x smallest"
    measured = [m for m in jobs if m.peak_rss_mib is not None and m.error is None]
    growths = []
    # Memory must not grow with the data; the jobs and modes differ in what
    # they hold anyway, so each is compared with itself.
    groups = sorted({(m.backend, type(m.case).__name__, m.mode or "") for m in measured})
    for backend, kind, mode in groups:
        own = [m for m in measured
               if (m.backend, type(m.case).__name__, m.mode or "") == (backend, kind, mode)]
        smallest = min(m.scale for m in own)
        largest = max(m.scale for m in own)
        if smallest == largest:
            continue
        low = max(m.peak_rss_mib for m in own if m.scale == smallest)
        high = max(m.peak_rss_mib for m in own if m.scale == largest)
        job = "voucher-expired" if kind == "ExpiryCase" else f"audit-archival {mode}"
        growths.append((high / low, f"{backend} {job}: {low:.1f} MiB at {smallest:,} rows, "
                                    f"{high:.1f} MiB at {largest:,} rows"))
    if not growths:
        return TargetResult(name, limit, "-", "only one data set size", NOT_MEASURED)
    ratio, where = max(growths)
    return TargetResult(name, limit, f"{ratio:.2f}x", where,
                        MET if ratio <= PEAK_RSS_GROWTH_MAX else MISSED)


def _sqlite_locked(steps: list[Measurement]) -> TargetResult:
    name = "SQLite writer errors \"database is locked\" during audit-archival and idle"
    limit = "0"
    measured = [m for m in steps if m.writer is not None]
    if not measured:
        return TargetResult(name, limit, "-", "-", NOT_MEASURED)
    # A step without writer figures while others have them failed early.
    missing = [m for m in steps if m.writer is None]
    if missing:
        return TargetResult(name, limit, "no figure", missing[0].where, MISSED)
    worst = max(measured, key=lambda m: m.writer.locked)
    return TargetResult(name, limit, str(worst.writer.locked), worst.where,
                        MET if worst.writer.locked == 0 else MISSED)


def _partition_retirement(runs: list[PartitionRun]) -> TargetResult:
    name = "retirement of a whole partition (DETACH transaction + DROP), any row count"
    limit = f"≤ {PARTITION_RETIREMENT_MAX_MS:.0f} ms"
    if not runs:
        return TargetResult(name, limit, "-", "-", NOT_MEASURED)
    failed = [run for run in runs if run.retirement_ms is None]
    if failed:
        return TargetResult(name, limit, "no figure", failed[0].where, MISSED)
    worst = max(runs, key=lambda run: run.retirement_ms)
    return TargetResult(name, limit, f"{worst.retirement_ms:.1f} ms", worst.where,
                        MET if worst.retirement_ms <= PARTITION_RETIREMENT_MAX_MS else MISSED)

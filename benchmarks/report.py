"""The benchmark report: one line per measurement while running, Markdown at the end."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from benchmarks.datasets import ArchivalCase, ExpiryCase
from benchmarks.results import (
    IDLE,
    JOB,
    MIB,
    RERUN,
    SEED,
    SINGLE,
    DatasetInfo,
    Measurement,
    PartitionRun,
)
from benchmarks.targets import (
    JUDGED_CASE,
    MET,
    MISSED,
    NOT_MEASURED,
    REPORTED_CASES,
    Evaluation,
    TargetResult,
)
from benchmarks.writer import WriterStats
from voucher_jobs.data.engine import mask_url

BACKEND_TITLES = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}
# Placeholder that the report shows in place of a path on the machine that ran it.
PATH_PLACEHOLDER = "LOCAL_PATH"
_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s'\"]+")
# An absolute or home-relative path, shell-quoted or not. The lookbehind
# leaves the paths inside URLs and relative paths (such as docs/x.md) alone.
_LOCAL_PATH = re.compile(r"'~?/[^']*'|(?<![\w.~:/-])~?/[^\s'\"]*")


@dataclass
class RunInfo:
    """The details of the run in the report's header: command, times, status, versions."""

    command: str
    started: str
    finished: str = ""
    status: str = "running"
    note: str = ""
    commit: str = ""
    load_at_start: str = ""
    load_at_end: str = ""
    options: list[tuple[str, str]] = field(default_factory=list)
    machine: dict[str, str] = field(default_factory=dict)
    drivers: dict[str, str] = field(default_factory=dict)
    postgresql: dict[str, str] = field(default_factory=dict)
    packages: list[tuple[str, str, str]] = field(default_factory=list)


# --- cell formats -----------------------------------------------------------

def seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.3f}" if value < 100 else f"{value:,.1f}"


def count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or not denominator:
        return "-"
    value = numerator / denominator
    return f"{value:,.2f}x" if value < 100 else f"{value:,.0f}x"


def mib(value: float | None) -> str:
    return "-" if value is None else f"{value / MIB:,.1f}"


def milliseconds(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def writer_cell(stats: WriterStats | None) -> str:
    if stats is None:
        return "-"
    errors = f", {stats.errors} errors" if stats.errors else ""
    locked = f" ({stats.locked} locked)" if stats.locked else ""
    return f"{milliseconds(stats.p50_ms)} / {milliseconds(stats.p99_ms)}{errors}{locked}"


def without_local_paths(text: str) -> str:
    """Replace the local paths in text by PATH_PLACEHOLDER and mask URL passwords.

    The report is meant to be committed, so it must not show the folders of
    the machine that ran it, such as --work-dir, --output or the checkout.
    """
    masked = _URL.sub(lambda match: _public_url(match.group()), text)
    return _LOCAL_PATH.sub(PATH_PLACEHOLDER, masked)


def _public_url(url: str) -> str:
    """Mask the password of a URL, and its path when the URL names a file (no host)."""
    masked = mask_url(url)
    scheme, _, rest = masked.partition("://")
    if rest.startswith("/"):
        return f"{scheme}:///{PATH_PLACEHOLDER}"
    return masked


def table(header: Sequence[str], rows: list[Sequence[str]]) -> str:
    """Render a Markdown table, text columns left-aligned and figures right-aligned."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    numeric = [all(_is_figure(row[i]) for row in rows) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(
            str(cell).rjust(widths[i]) if numeric[i] else str(cell).ljust(widths[i])
            for i, cell in enumerate(cells)) + " |"

    separator = "| " + " | ".join(
        "-" * (width - 1) + ":" if numeric[i] else "-" * width
        for i, width in enumerate(widths)) + " |"
    return "\n".join([line(header), separator, *(line(row) for row in rows)])


def _is_figure(cell: str) -> bool:
    text = str(cell).replace(",", "").replace(".", "").rstrip("x%")
    return text.isdigit() or text in ("-", "failed")


# --- one line per measurement -----------------------------------------------

def describe(measurement: Measurement) -> str:
    """Return the figures of one measurement as one line of text."""
    m = measurement
    if m.error:
        return f"{m.where}: FAILED: {m.error}"
    parts = [] if m.method == IDLE else [f"{count(m.rows)} rows"]
    if m.method == SEED:
        parts.append(f"{seconds(m.seconds)} s extrapolated from {count(m.sampled)} of "
                     f"{count(m.loaded)} vouchers")
    elif m.method != IDLE:
        parts.append(f"{seconds(m.seconds)} s")
        if m.rows_per_second:
            parts.append(f"{rate(m.rows_per_second)} rows/s")
    if m.wall_seconds is not None:
        parts.append(f"process {seconds(m.wall_seconds)} s")
    if m.batches is not None:
        parts.append(f"{count(m.batches)} batches, longest {milliseconds(m.longest_batch_ms)} ms")
    if m.peak_rss_mib is not None:
        parts.append(f"peak RSS {m.peak_rss_mib:.1f} MiB")
    if m.growth is not None and m.growth.bytes is not None:
        kind = "WAL" if m.backend == "postgresql" else "file growth"
        parts.append(f"{kind} {mib(m.growth.bytes)} MiB")
        if m.growth.peak_wal_bytes:
            parts.append(f"peak -wal {mib(m.growth.peak_wal_bytes)} MiB")
    if m.archive_bytes is not None:
        parts.append(f"archive {mib(m.archive_bytes)} MiB")
    if m.writer is not None:
        parts.append(f"writer p50/p99 {writer_cell(m.writer)} ms over {m.writer.inserts} inserts")
    return f"{m.where}: " + ", ".join(parts)


def describe_ratios(job: Measurement, measurements: list[Measurement]) -> str:
    """Return a job's ratios against the seed algorithm and its single statement."""
    def counterpart(method: str) -> Measurement | None:
        for m in measurements:
            if (m.backend, m.case, m.method, m.mode) == (job.backend, job.case, method, job.mode):
                return None if m.error or job.error else m
        return None

    single = counterpart(SINGLE)
    if isinstance(job.case, ArchivalCase):
        if single is None:
            return ""
        return ("job rows/s ÷ single statement rows/s "
                f"{ratio(job.rows_per_second, single.rows_per_second)}")
    parts = []
    if single is not None:
        parts.append(f"job time ÷ single statement time {ratio(job.seconds, single.seconds)}")
    seed = counterpart(SEED)
    if seed is not None:
        parts.append(f"seed algorithm time ÷ job time {ratio(seed.seconds, job.seconds)}")
    return ", ".join(parts)


# --- the Markdown report ----------------------------------------------------

class Report:
    """Builds docs/benchmarks.md from the run's measurements and targets."""

    def __init__(self, run: RunInfo, datasets: list[DatasetInfo],
                 measurements: list[Measurement], targets: Evaluation,
                 method: str, partition_runs: Sequence[PartitionRun] = ()) -> None:
        self.run = run
        self.method = method
        self.datasets = datasets
        self.measurements = measurements
        self.partition_runs = list(partition_runs)
        self.targets = targets
        self._by_key = {(m.backend, m.case, m.method, m.mode): m for m in measurements}

    def _find(self, backend: str, case: object, method: str, mode: str | None = None
              ) -> Measurement | None:
        return self._by_key.get((backend, case, method, mode))

    def render(self) -> str:
        sections = [self._header(), self._machine(), self._targets()]
        for backend in self._backends():
            sections.append(self._expiry(backend))
            sections.append(self._archival(backend))
        sections += [self._partitions(), self._datasets(), self._failures(), self.method]
        return "\n\n".join(section for section in sections if section) + "\n"

    def _backends(self) -> list[str]:
        found = {m.backend for m in self.measurements} | {d.backend for d in self.datasets}
        return [name for name in BACKEND_TITLES if name in found]

    def _header(self) -> str:
        run = self.run
        lines = [
            "# Benchmarks",
            "",
            "Generated by the benchmark suite in `benchmarks/`; every figure below comes "
            "from the run described here. Run it again to replace this page, as described "
            "under Method at the end.",
            "",
            *([f"**{without_local_paths(run.note)}**", ""] if run.note else []),
            table(("item", "value"), [
                ("command", f"`{without_local_paths(run.command)}`"),
                ("status", run.status),
                ("started", run.started),
                ("finished", run.finished or "-"),
                ("commit", run.commit),
                ("load average at start", run.load_at_start),
                ("load average at end", run.load_at_end or "-"),
                *((name, without_local_paths(value)) for name, value in run.options),
            ]),
        ]
        return "\n".join(lines)

    def _machine(self) -> str:
        run = self.run
        rows = [(name, value) for name, value in run.machine.items()]
        rows += [(name, value) for name, value in run.drivers.items()]
        if run.postgresql:
            rows.append(("PostgreSQL server", run.postgresql.get("version", "-")))
            # The data directory is a local path, and the disk row describes its disk.
            settings = " ".join(f"{name}={value}" for name, value in run.postgresql.items()
                                if name not in ("version", "data_directory"))
            rows.append(("PostgreSQL settings", settings))
        parts = ["## Machine and versions", "", table(("item", "value"), rows)]
        if run.postgresql.get("autovacuum") == "off":
            parts += ["", "autovacuum is off on this server. The suite runs VACUUM ANALYZE "
                      "on each data set once it is filled, and nothing vacuums or analyzes "
                      "during a measurement. A server with autovacuum on may vacuum in the "
                      "middle of a long run, so its figures can differ."]
        if run.packages:
            parts += ["", "Packages that voucher-jobs requires at run time:", "",
                      table(("package", "requirements.lock", "installed"), run.packages)]
        return "\n".join(parts)

    def _targets(self) -> str:
        evaluation = self.targets
        judged = [(t.name, t.limit, t.worst, t.where, t.status.upper() if t.status == MISSED
                   else t.status) for t in evaluation.judged]
        reported = [
            (target.name, target.limit,
             *(_reported_cell(evaluation.reported[case][row]) for case in REPORTED_CASES))
            for row, target in enumerate(evaluation.case_targets)
        ]
        return "\n".join([
            "## Targets",
            "",
            *_summary(evaluation),
            "",
            f"The voucher-expired and audit-archival targets are defined for "
            f"{_case_title(JUDGED_CASE)}, so only those measurements judge them. The peak "
            "RSS targets are judged over every case, and the \"database is locked\" "
            "target over SQLite. Each target is judged on the worst case that the run "
            "measured there, and the column \"where\" names that case. A step that "
            "failed or gave no figure counts as missed.",
            "",
            table(("target", "limit", "worst measured", "where", "result"), judged),
            "",
            "### Same figures, reported for the other cases",
            "",
            "The worst figure of each voucher-expired and audit-archival target on the "
            "other backends and layouts, and whether it is within the limit or outside "
            "it. These figures are reported and judge nothing.",
            "",
            table(("target", "limit", *(_case_column(case) for case in REPORTED_CASES)),
                  reported),
        ])

    def _expiry(self, backend: str) -> str:
        cases = sorted({m.case for m in self.measurements
                        if m.backend == backend and isinstance(m.case, ExpiryCase)},
                       key=lambda c: (c.vouchers, c.expired_percent, c.logged_percent, c.layout))
        if not cases:
            return ""
        title = BACKEND_TITLES[backend]
        times, resources = [], []
        for case in cases:
            seed = self._find(backend, case, SEED)
            single = self._find(backend, case, SINGLE)
            job = self._find(backend, case, JOB)
            rerun = self._find(backend, case, RERUN)
            key = (case.layout, count(case.vouchers), f"{case.expired_percent}%",
                   f"{case.logged_percent}%")
            times.append((
                *key,
                _figure(job, lambda m: count(m.rows)),
                _figure(seed, lambda m: f"{seconds(m.seconds)} ({count(m.sampled)} of "
                        f"{count(m.loaded)})"),
                _figure(single, lambda m: seconds(m.seconds)),
                _figure(job, lambda m: seconds(m.seconds)),
                _figure(rerun, lambda m: seconds(m.seconds)),
                _pair(job, single, lambda j, s: ratio(j.seconds, s.seconds)),
                _pair(seed, job, lambda s, j: ratio(s.seconds, j.seconds)),
            ))
            resources.append((
                *key,
                _figure(job, lambda m: seconds(m.wall_seconds)),
                _figure(job, lambda m: count(m.batches)),
                _figure(job, lambda m: milliseconds(m.median_batch_ms)),
                _figure(job, lambda m: milliseconds(m.longest_batch_ms)),
                _figure(job, lambda m: f"{m.peak_rss_mib:.1f}"),
                _figure(single, lambda m: _growth(m)),
                _figure(job, lambda m: _growth(m)),
            ))
        growth = "WAL MiB" if backend == "postgresql" else "file growth MiB"
        return "\n".join([
            f"## voucher-expired on {title}",
            "",
            "Seconds of each method on a fresh copy of the same data. The seed "
            "algorithm's time is extrapolated: it ran until its cap, and the column "
            "gives the vouchers it handled of all it loaded. The rerun is voucher-expired "
            "again, on the same copy, right after the first run.",
            "",
            table(("layout", "vouchers", "expired", "logged", "rows written", "seed s (sample)",
                   "single s", "job s", "rerun s", "job ÷ single", "seed ÷ job"), times),
            "",
            table(("layout", "vouchers", "expired", "logged", "job process s", "batches",
                   "median batch ms", "longest batch ms", "peak RSS MiB",
                   f"single {growth}", f"job {growth}"), resources),
        ])

    def _archival(self, backend: str) -> str:
        entries = sorted({(m.case, m.mode) for m in self.measurements
                          if m.backend == backend and isinstance(m.case, ArchivalCase)
                          and m.mode is not None},
                         key=lambda e: (e[0].audit_rows, e[0].layout, MODES.index(e[1])))
        if not entries:
            return ""
        title = BACKEND_TITLES[backend]
        throughput, resources, writer = [], [], []
        for case, mode in entries:
            single = self._find(backend, case, SINGLE, mode)
            job = self._find(backend, case, JOB, mode)
            idle = self._find(backend, case, IDLE)
            key = (case.layout, count(case.audit_rows), mode)
            throughput.append((
                *key,
                _figure(job or single, lambda m: count(m.rows)),
                _figure(single, lambda m: seconds(m.seconds)),
                _figure(single, lambda m: rate(m.rows_per_second)),
                _figure(job, lambda m: seconds(m.seconds)),
                _figure(job, lambda m: rate(m.rows_per_second)),
                _pair(job, single, lambda j, s: ratio(j.rows_per_second, s.rows_per_second)),
                _figure(job, lambda m: count(m.batches)),
                _figure(job, lambda m: milliseconds(m.median_batch_ms)),
                _figure(job, lambda m: milliseconds(m.longest_batch_ms)),
            ))
            resources.append((
                *key,
                _figure(job, lambda m: seconds(m.wall_seconds)),
                _figure(job, lambda m: f"{m.peak_rss_mib:.1f}"),
                _figure(single, lambda m: _growth(m)),
                _figure(job, lambda m: _growth(m)),
                _figure(single, lambda m: mib(m.archive_bytes)),
                _figure(job, lambda m: mib(m.archive_bytes)),
            ))
            writer.append((
                *key,
                _figure(idle, lambda m: writer_cell(m.writer)),
                _figure(single, lambda m: writer_cell(m.writer)),
                _figure(job, lambda m: writer_cell(m.writer)),
                _pair(job, idle, lambda j, i: ratio(j.writer.p99_ms, i.writer.p99_ms)
                      if j.writer and i.writer else "-"),
            ))
        growth = ("WAL MiB" if backend == "postgresql"
                  else "file growth MiB (peak -wal)")
        return "\n".join([
            f"## audit-archival on {title}",
            "",
            "Rows per second of each mode, the job against its own single statement, on "
            "fresh copies of the same data.",
            "",
            table(("layout", "audit rows", "mode", "rows removed", "single s", "single rows/s",
                   "job s", "job rows/s", "job ÷ single", "batches", "median batch ms",
                   "longest batch ms"), throughput),
            "",
            table(("layout", "audit rows", "mode", "job process s", "peak RSS MiB",
                   f"single {growth}", f"job {growth}", "single archive MiB",
                   "job archive MiB"), resources),
            "",
            "The concurrent writer: p50 / p99 latency in ms of one INSERT and commit, "
            "scheduled at a steady rate, alone on the idle database and during each "
            "method. Errors are inserts that failed; \"locked\" counts SQLite's "
            "\"database is locked\".",
            "",
            table(("layout", "audit rows", "mode", "idle", "during single statement",
                   "during job", "job p99 ÷ idle p99"), writer),
        ])

    def _partitions(self) -> str:
        if not self.partition_runs:
            return ""
        rows = [(run.mode, count(run.rows), milliseconds(run.detach_ms),
                 milliseconds(run.drop_ms), milliseconds(run.retirement_ms),
                 seconds(run.run_seconds)) for run in self.partition_runs]
        return "\n".join([
            "## Partition retirement on PostgreSQL",
            "",
            "audit-archival on a voucher_audit_logs range-partitioned by month, with one "
            "old partition of the given size, whose rows are all past the retention. The "
            "detach transaction runs from DETACH to the end of its COMMIT: the time the "
            "parent table is locked exclusively. The DROP of the detached table follows "
            "in a transaction of its own and locks only that table. The run includes the "
            "archive modes' copy or export of the partition, which happens before the "
            "detach, under a SHARE lock on the partition only.",
            "",
            table(("mode", "partition rows", "detach transaction ms", "DROP ms",
                   "detach + DROP ms", "run s"), rows),
        ])

    def _datasets(self) -> str:
        if not self.datasets:
            return ""
        rows = [(BACKEND_TITLES[d.backend], d.label, count(d.vouchers), count(d.audit_rows),
                 seconds(d.fill_seconds), mib(d.size_bytes)) for d in self.datasets]
        return "\n".join([
            "## Data sets",
            "",
            "Each data set was filled once, and each measurement ran on a fresh copy. "
            "Size is on disk after VACUUM ANALYZE (PostgreSQL) or a WAL checkpoint (SQLite).",
            "",
            table(("backend", "data set", "vouchers", "audit rows", "fill s", "size MiB"), rows),
        ])

    def _failures(self) -> str:
        failed = [m for m in self.measurements if m.error]
        if not failed and not any(run.error for run in self.partition_runs):
            return ""
        return "\n".join(["## Failed steps", ""]
                         + [f"- {m.where}: {without_local_paths(m.error)}" for m in failed]
                         + [f"- {run.where}: {without_local_paths(run.error)}"
                            for run in self.partition_runs if run.error])


MODES = ("delete", "archive-table", "archive-file")


def _figure(measurement: Measurement | None, render) -> str:
    if measurement is None:
        return "-"
    if measurement.error:
        return "failed"
    return render(measurement)


def _pair(first: Measurement | None, second: Measurement | None, render) -> str:
    if first is None or second is None:
        return "-"
    if first.error or second.error:
        return "failed"
    return render(first, second)


LAYOUT_TITLES = {"append": "append-ordered data", "shuffled": "shuffled data"}


def _case_title(case: tuple[str, str]) -> str:
    backend, layout = case
    return f"{BACKEND_TITLES[backend]} with {LAYOUT_TITLES[layout]}"


def _case_column(case: tuple[str, str]) -> str:
    backend, layout = case
    return f"{BACKEND_TITLES[backend]}, {layout}"


def _reported_cell(target: TargetResult) -> str:
    """Render a reported target as its worst figure and whether it is within the limit."""
    if target.status == NOT_MEASURED:
        return NOT_MEASURED
    if target.status == MISSED and target.worst == "no figure":
        return target.worst
    return f"{target.worst} ({'within' if target.status == MET else 'outside'})"


def _summary(evaluation: Evaluation) -> list[str]:
    """Return one bullet per group of judged targets, and one on the reported cases."""
    locked = _tally(evaluation.sqlite_targets, '"database is locked"')
    return [
        f"- On {_case_title(JUDGED_CASE)}, {_tally(evaluation.case_targets, 'job')}",
        f"- Over every case, {_tally(evaluation.memory_targets, 'peak RSS')}",
        f"- On SQLite, {locked}",
        f"- On a partitioned audit table, {_tally(evaluation.partition_targets, 'partition')}",
        f"- Reported, not judged: {_tally_reported(evaluation.reported)}",
    ]


def _tally(targets: list[TargetResult], kind: str) -> str:
    """Return sentences on how many targets are met, naming those missed or not measured."""
    if len(targets) == 1:
        target = targets[0]
        worst = f" ({target.worst})" if target.status == MISSED else ""
        return f"the {kind} target is {target.status}{worst}."
    if all(t.status == NOT_MEASURED for t in targets):
        return f"the run measured none of the {len(targets)} {kind} targets."
    met = sum(t.status == MET for t in targets)
    parts = [f"{met} of {len(targets)} {kind} targets {'is' if met == 1 else 'are'} met."]
    missed = [f"{t.name} ({t.worst})" for t in targets if t.status == MISSED]
    if missed:
        parts.append("Missed: " + "; ".join(missed) + ".")
    unmeasured = [t.name for t in targets if t.status == NOT_MEASURED]
    if unmeasured:
        parts.append("Not measured: " + "; ".join(unmeasured) + ".")
    return " ".join(parts)


def _tally_reported(reported: dict[tuple[str, str], list[TargetResult]]) -> str:
    """Return sentences on how many reported figures are within the limits, per case."""
    counts, unmeasured = [], []
    for case in REPORTED_CASES:
        measured = [t for t in reported[case] if t.status != NOT_MEASURED]
        if not measured:
            unmeasured.append(_case_title(case))
            continue
        within = sum(t.status == MET for t in measured)
        verb = "is" if within == 1 else "are"
        noun = f" figures {verb} within the limits" if not counts else ""
        counts.append(f"{within} of {len(measured)}{noun} on {_case_title(case)}")
    sentences = []
    if counts:
        sentences.append(_join(counts) + ".")
    if unmeasured:
        sentences.append(f"The run did not measure {_join(unmeasured)}.")
    return " ".join(sentences)


def _join(items: list[str]) -> str:
    """Join items as a list in a sentence: "a", "a and b", "a, b, and c"."""
    if len(items) < 3:
        return " and ".join(items)
    return ", ".join(items[:-1]) + f", and {items[-1]}"


def _growth(measurement: Measurement) -> str:
    growth = measurement.growth
    if growth is None or growth.bytes is None:
        return "-"
    if growth.peak_wal_bytes is not None:
        return f"{mib(growth.bytes)} ({mib(growth.peak_wal_bytes)})"
    return mib(growth.bytes)


# Formatted with the writer options of the run.
METHOD_TEMPLATE = """## Method

`python3 dev.py bench` runs `benchmarks/suite.py`, and `--help` lists its
options. `--preset smoke` takes seconds and only checks that every step works;
CI runs it in `tests/test_benchmarks.py`. `--preset standard` gives the figures
that this page is meant for, and `--preset large` adds 10,000,000 audit rows.
Run those two on a quiet machine, and compare the load averages at the top.

Data: the suite fills each data set once into a template, with SQL over a
number series, and runs VACUUM ANALYZE on PostgreSQL. Each measurement then
runs on a fresh copy of the template. On PostgreSQL that is
`CREATE DATABASE ... TEMPLATE`, with `STRATEGY FILE_COPY` for templates of
64 MiB and more. On SQLite it is a file copy. Vouchers expire over 800 days
around the reference time, so the expired share is exactly the one named, and
every 20th voucher is soft-deleted. Audit rows span the 730-day retention
divided by the share that is not yet past it, so the share past retention is
exactly the one named. In the append layout ids rise with time (vouchers by
expiry, audit rows by created_at), as in a table that the application appends
to. In the shuffled layout the same times are spread over the ids in no order.
That is the worst case for a job that walks ids. Every method gets the same
reference time (the jobs through `--at`), so all of them handle the same rows.

Methods, each on its own copy:

- seed algorithm: the hand-written script users run today. It loads the expired
  vouchers, then for each one runs a SELECT for its EXPIRED row and an INSERT
  when there is none, each a separate statement in autocommit mode. It stops
  after a cap of vouchers or seconds (see the options at the top), and its
  total is extrapolated: load time plus the mean time per voucher times all
  loaded vouchers.
- single statement: the whole job in one statement. voucher-expired: one
  `INSERT ... SELECT` of the claims whose RETURNING feeds the `INSERT` of the
  audit rows (on SQLite two `INSERT ... SELECT` in one transaction).
  audit-archival delete: one `DELETE`. archive-table: one `DELETE ...
  RETURNING` that feeds an `INSERT` into the archive table (on SQLite
  `INSERT ... SELECT` then `DELETE` in one transaction). archive-file: one
  `COPY (SELECT ...) TO STDOUT` of the rows as the job's JSON lines, built by
  the server as the job has them built, streamed into a gzip file at
  voucher-jobs' compression level, fsynced, then one `DELETE`. The same rows
  as COPY's own tab-separated text would take about a third of the server's
  time, but the comparison is with files of the job's format. SQLite has no
  COPY, so there the nearest equivalent runs: one SELECT streamed into the gzip
  file as the same lines, then one `DELETE`. The single statements hold their locks for the whole run, which the
  jobs are built to avoid.
- job: `voucher-jobs -v run JOB --at REFERENCE ... --json` in a child process.
  Its seconds are the run's own duration from its run record, without the
  interpreter start that the process time includes. Batches and the longest
  batch come from the run record when it has them, otherwise from the `-v`
  batch log lines (with their millisecond resolution, and then including the
  work between two batches).

Figures:

- rows/s: rows divided by seconds. The time ratio compares voucher-expired
  with its single statement and the seed algorithm; the rows/s ratio compares
  each archival mode with its own single statement.
- peak RSS: of the job's child process, its own VmHWM at exit (wait4's
  figure would include the benchmark process's memory from before the exec).
- WAL MiB (PostgreSQL): `pg_wal_lsn_diff` of `pg_current_wal_lsn()` before and
  after the step. The WAL position is server-wide, so anything else that writes
  to the server meanwhile, the concurrent writer included, counts too.
- file growth MiB (SQLite): growth of the database file plus its -wal file
  over the step, and in brackets the largest size that the -wal file reached,
  sampled every 50 ms.
- concurrent writer: a separate process on its own connection inserts one audit
  row (created_at now) and commits, {writer_rate} times a second, during every
  archival step and for a fixed time on an idle copy. On SQLite it waits up to a
  {busy_timeout} s busy timeout, as a typical application would. Latency runs from
  the start of the INSERT to the end of its commit, so a wait for a lock shows
  as one slow insert. An insert whose turn came while the one before it was
  still running starts at once, so a slow database gets fewer inserts than the
  rate. p50 and p99 are nearest-rank percentiles of the inserts that succeeded
  and that started while the step worked: from the start to the end of the
  statement, or of the job's run as its run record gives them, so without the
  job process's start. A step shorter than one second is counted over the
  second from its start.
- targets: the voucher-expired and audit-archival targets are defined for
  PostgreSQL with append-ordered data, and only those measurements judge them.
  The same figures on PostgreSQL with shuffled data and on SQLite are reported
  in a second table, with whether each is within the limit, and judge nothing.
  voucher-expired is evaluated at the largest voucher count of the run, with 0%
  logged for the ratios, and audit-archival over every data set of the case.
  The peak RSS targets are judged over every backend, layout and data set.
  "Flat" peak RSS means that the largest data set's peak is at most 10% above
  the smallest one's, for each backend, job and archival mode. SQLite has one
  judged target: no insert of the concurrent writer fails with "database is
  locked". The partition target is judged on the slowest DETACH transaction
  plus DROP of any partition size and mode. A run without PostgreSQL
  append-ordered measurements, such as the smoke preset, shows those targets
  as not measured.
- paths: local paths in the command, the options and the failed steps, such
  as the work folder and the output file, show as LOCAL_PATH, and passwords in
  URLs as ***.
"""

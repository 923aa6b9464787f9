"""Benchmark voucher-jobs against the seed algorithm and single statements.

For every data set, on SQLite and PostgreSQL, the suite fills a template
once and then measures, each on a fresh copy of the template:

1. the seed algorithm (the hand-written script users run today), capped
   and extrapolated;
2. each job's work as one statement (the single-statement limit);
3. voucher-jobs' own jobs, every archival mode, as the real CLI.

During audit-archival a separate writer process inserts audit rows at a
steady rate, and its latency is compared with the same writer on an idle
copy. The suite prints every figure, evaluates the targets and writes a
Markdown report (docs/benchmarks.md by default).

    python3 dev.py bench --preset smoke
    python3 dev.py bench --preset standard
    python3 dev.py bench --backends postgresql --jobs audit-archival --audit-rows 1m
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import sqlite3
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import psycopg

from benchmarks import baselines, environment, partition_retirement, targets
from benchmarks.backends import Backend, Database, PostgresServer, SqliteFolder, StorageGrowth
from benchmarks.datasets import (
    LAYOUTS,
    RETENTION_DAYS,
    ArchivalCase,
    ExpiryCase,
    fill_audit_rows,
    fill_vouchers,
)
from benchmarks.job_runs import run_job
from benchmarks.report import METHOD_TEMPLATE, Report, RunInfo, describe, describe_ratios
from benchmarks.results import (
    IDLE,
    JOB,
    RERUN,
    SEED,
    SINGLE,
    DatasetInfo,
    Measurement,
    PartitionRun,
)
from benchmarks.writer import Writer, WriterStats
from voucher_jobs.config import ArchiveMode
from voucher_jobs.data import migrate
from voucher_jobs.data.clock import database_now
from voucher_jobs.data.engine import create_db_engine, mask_url

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_OUTPUT = ROOT / "docs" / "benchmarks.md"
BACKENDS = ("sqlite", "postgresql")
JOBS = ("voucher-expired", "audit-archival")
MODES = ("delete", "archive-table", "archive-file")
PARTS = ("seed", "single", "jobs", "partitions")

PRESETS: dict[str, dict[str, object]] = {
    # Checks that every step works, in CI, in well under a minute. It runs the
    # shuffled layout only, the worst case, because each job run starts a
    # process that needs about a second to import voucher-jobs.
    "smoke": dict(layouts=["shuffled"], vouchers=[2_000], expired=[25], logged=[0, 100],
                  audit_rows=[5_000], seed_vouchers=20, seed_seconds=1.0, idle_seconds=0.5,
                  partition_rows=[1_000]),
    "standard": dict(layouts=list(LAYOUTS), vouchers=[100_000, 1_000_000], expired=[10, 25],
                     logged=[0, 100], audit_rows=[1_000_000, 5_000_000],
                     seed_vouchers=2_000, seed_seconds=20.0, idle_seconds=10.0,
                     partition_rows=[10_000, 1_000_000]),
    "large": dict(layouts=list(LAYOUTS), vouchers=[100_000, 1_000_000], expired=[10, 25],
                  logged=[0, 100], audit_rows=[1_000_000, 5_000_000, 10_000_000],
                  seed_vouchers=2_000, seed_seconds=20.0, idle_seconds=10.0,
                  partition_rows=[10_000, 1_000_000, 5_000_000]),
}


def parse_count(text: str) -> int:
    """Parse a row count such as 5000, 100k or 1m."""
    match = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count: use digits, or 100k, 1m")
    value = int(match.group(1)) * {"": 1, "k": 1_000, "m": 1_000_000}[match.group(2).lower()]
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def list_of(parse: Callable[[str], object], choices: tuple[str, ...] | None = None):
    """Return an argparse type for a comma-separated list of parse(item)."""
    def parse_list(text: str) -> list:
        items = [parse(item.strip()) for item in text.split(",") if item.strip()]
        if not items:
            raise argparse.ArgumentTypeError("the list is empty: give at least one value")
        if choices:
            unknown = [item for item in items if item not in choices]
            if unknown:
                raise argparse.ArgumentTypeError(
                    f"{', '.join(map(str, unknown))} is not one of {', '.join(choices)}")
        return items
    return parse_list


def percent(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 99:
        raise argparse.ArgumentTypeError(f"{text} is not a percentage from 0 to 99")
    return value


def logged_percent(text: str) -> int:
    value = int(text)
    if value not in (0, 100):
        raise argparse.ArgumentTypeError(f"{text} is invalid: the logged share is 0 or 100")
    return value


def parse_options(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python3 dev.py bench",
        description=__doc__.split("\n\n")[0],
        epilog="Options left out take the preset's values. smoke: 2k vouchers, 5k "
               "audit rows and a partition of 1k rows, shuffled layout only. standard: "
               "100k and 1m vouchers, each 10%% and 25%% expired and 0%% and 100%% "
               "logged; 1m and 5m audit rows; partitions of 10k and 1m rows. large: "
               "standard plus 10m audit rows and a partition of 5m rows.",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="standard",
                        help="Data set sizes and caps (default: standard).")

    # Which backends, layouts, jobs and parts run.
    parser.add_argument("--backends", type=list_of(str, BACKENDS), default=list(BACKENDS),
                        help="Comma-separated: sqlite, postgresql (default: both).")
    parser.add_argument("--layouts", type=list_of(str, LAYOUTS),
                        help="Comma-separated: append, shuffled (default: both; the "
                        "smoke preset runs shuffled only).")
    parser.add_argument("--jobs", type=list_of(str, JOBS), default=list(JOBS),
                        help="Comma-separated: voucher-expired, audit-archival (default: both).")
    parser.add_argument("--modes", type=list_of(str, MODES), default=list(MODES),
                        help="audit-archival modes, comma-separated (default: all three).")
    parser.add_argument("--parts", type=list_of(str, PARTS), default=list(PARTS),
                        help="What to measure, comma-separated: seed (the seed "
                        "algorithm), single (single statements), jobs, partitions "
                        "(retiring a whole old partition, PostgreSQL only; default: all).")

    # Data set sizes.
    parser.add_argument("--vouchers", type=list_of(parse_count),
                        help="Voucher counts, such as 100k,1m.")
    parser.add_argument("--expired", type=list_of(percent),
                        help="Percentages of vouchers whose expiry has passed, such as 10,25.")
    parser.add_argument("--logged", type=list_of(logged_percent),
                        help="Percentages of the expired vouchers already logged: 0, 100 or both.")
    parser.add_argument("--audit-rows", type=list_of(parse_count),
                        help="Audit row counts for audit-archival, such as 1m,5m.")
    parser.add_argument("--partition-rows", type=list_of(parse_count),
                        help="Rows of the old partition that the partitions part "
                        "retires, such as 10k,1m.")
    parser.add_argument("--eligible", type=percent, default=40,
                        help="Percentage of audit rows past the %d-day retention "
                        "(default: 40)." % RETENTION_DAYS)

    # How each method runs.
    parser.add_argument("--seed-vouchers", type=parse_count,
                        help="Stop the seed algorithm after this many vouchers.")
    parser.add_argument("--seed-seconds", type=float,
                        help="Stop the seed algorithm after this many seconds.")
    parser.add_argument("--writer-rate", type=float, default=100.0,
                        help="Inserts per second of the concurrent writer; 0 turns it "
                        "off (default: 100).")
    parser.add_argument("--writer-busy-timeout", type=float, default=5.0,
                        help="The writer's SQLite busy timeout in seconds (default: 5).")
    parser.add_argument("--idle-seconds", type=float,
                        help="How long the writer runs alone for its idle baseline.")
    parser.add_argument("--job-args", default="",
                        help="Extra arguments for every `voucher-jobs run`, in shell "
                        "syntax, such as \"--batch-size 5000\".")
    parser.add_argument("--chunk-rows", type=parse_count, default=1_000_000,
                        help="Rows per INSERT ... SELECT while filling (default: 1m).")
    parser.add_argument("--step-timeout", type=float, default=3600.0,
                        help="Kill a job process after this many seconds (default: 3600).")

    # Databases, files and the report.
    parser.add_argument("--admin-url", default=os.environ.get(
                        "VOUCHER_JOBS_TEST_POSTGRES_URL", DEFAULT_ADMIN_URL),
                        help="PostgreSQL server to create the benchmark databases on "
                        "(default: $VOUCHER_JOBS_TEST_POSTGRES_URL or %s). The suite "
                        "creates databases named voucher_jobs_bench_* and drops them."
                        % DEFAULT_ADMIN_URL)
    parser.add_argument("--work-dir", type=Path,
                        help="Folder for SQLite files, archive files and job logs. "
                        "Default: a new temporary folder, removed at the end.")
    parser.add_argument("--output",
                        help="Markdown report to write; - writes none (default: "
                        "docs/benchmarks.md, and none for the smoke preset).")

    options = parser.parse_args(argv)
    for name, value in PRESETS[options.preset].items():
        if getattr(options, name) is None:
            setattr(options, name, value)
    if options.output is None:
        # The smoke preset's figures are too small to replace the real ones.
        options.output = "-" if options.preset == "smoke" else str(DEFAULT_OUTPUT)
    options.job_args = shlex.split(options.job_args)
    if options.writer_rate < 0:
        parser.error("--writer-rate must be 0 or more")
    return options


@dataclass
class Observation:
    """The storage growth of one step, and the concurrent writer's figures during it.

    A step sets `window` to the Unix times its work started and ended, so
    that the writer's figures leave out the inserts before and after it,
    such as those during a job process's start. None keeps them all, and a
    window shorter than a second is extended to one.
    """

    growth: StorageGrowth | None = None
    writer: WriterStats | None = None
    window: tuple[float, float] | None = None


class Suite:
    """Runs the measurements of one benchmark run and collects their figures."""

    def __init__(self, options: argparse.Namespace, work_dir: Path) -> None:
        self.options = options
        self.work_dir = work_dir
        self.measurements: list[Measurement] = []
        self.datasets: list[DatasetInfo] = []
        self.partition_runs: list[PartitionRun] = []

    def record(self, measurement: Measurement) -> None:
        self.measurements.append(measurement)
        print(describe(measurement), flush=True)
        if measurement.method == JOB:
            ratios = describe_ratios(measurement, self.measurements)
            if ratios:
                print(f"{measurement.where}: {ratios}", flush=True)

    # --- data sets ------------------------------------------------------------

    def fill_template(self, backend: Backend, tag: str, label: str, vouchers: int, audit_rows: int,
                      fill: Callable) -> tuple[Database, datetime]:
        """Create, migrate and fill one template; return it and its reference time."""
        print(f"{backend.backend}: filling {label} ...", flush=True)
        database = backend.create(tag)
        engine = create_db_engine(database.url)
        try:
            migrate.upgrade(engine)
            with engine.connect() as connection:
                reference = database_now(connection)
            started = time.monotonic()
            fill(engine, reference)
            fill_seconds = time.monotonic() - started
        finally:
            engine.dispose()
        backend.finish_template(database)
        info = DatasetInfo(backend.backend, label, vouchers, audit_rows, fill_seconds,
                           backend.size(database))
        self.datasets.append(info)
        print(f"{backend.backend}: filled {label} in {fill_seconds:.1f} s, "
              f"{info.size_bytes / 2**20:,.1f} MiB", flush=True)
        return database, reference

    @contextmanager
    def fresh_copy(self, backend: Backend, template: Database, tag: str) -> Iterator[Database]:
        database = backend.copy(template, tag)
        try:
            yield database
        finally:
            backend.drop(database)

    @contextmanager
    def observe(self, backend: Backend, database: Database,
                with_writer: bool) -> Iterator[Observation]:
        """Measure storage growth and, if asked, run the concurrent writer meanwhile."""
        observation = Observation()
        writer = None
        if with_writer and self.options.writer_rate > 0:
            writer = Writer(database.backend, database.target, self.options.writer_rate,
                            self.options.writer_busy_timeout)
        try:
            with backend.measure_growth(database) as growth:
                observation.growth = growth
                yield observation
        finally:
            if writer is not None:
                try:
                    observation.writer = writer.stop().summarize(observation.window)
                finally:
                    writer.kill()

    def measure(self, measurement: Measurement, action: Callable[[Measurement], None]) -> None:
        """Run action to fill in measurement's figures; record an error instead of raising."""
        try:
            action(measurement)
        except (psycopg.Error, sqlite3.Error, OSError, RuntimeError, ValueError) as exc:
            measurement.error = f"{type(exc).__name__}: {exc}".strip()
            traceback.print_exc()
        self.record(measurement)

    # --- voucher-expired ------------------------------------------------------

    def run_expiry(self, backend: Backend, layout: str, vouchers: int, expired: int) -> None:
        options = self.options
        base = ExpiryCase(layout, vouchers, expired, 0)

        def fill(engine, reference):
            fill_vouchers(engine, base, reference, options.chunk_rows)
            fill_audit_rows(engine, vouchers, options.eligible, layout, reference,
                            options.chunk_rows, vouchers)

        template, reference = self.fill_template(
            backend, base.template_tag, f"{layout}, {vouchers:,} vouchers, {expired}% expired",
            vouchers, vouchers, fill)
        templates = [template]
        try:
            for logged in sorted(options.logged):
                case = ExpiryCase(layout, vouchers, expired, logged)
                source = template
                if logged:
                    source = self.logged_template(backend, template, case, reference)
                    templates.append(source)
                self.expiry_steps(backend, source, case, reference)
        finally:
            for database in templates:
                backend.drop(database)

    def logged_template(self, backend: Backend, template: Database, case: ExpiryCase,
                        reference: datetime) -> Database:
        """Copy template and log every expired voucher in it with the single statement."""
        database = backend.copy(template, f"{case.template_tag}_l")
        started = time.monotonic()
        result = baselines.run_expiry_statement(database, reference)
        backend.finish_template(database)
        self.datasets.append(DatasetInfo(
            backend.backend, case.label, case.vouchers, case.vouchers + result.rows,
            time.monotonic() - started, backend.size(database)))
        return database

    def expiry_steps(self, backend: Backend, template: Database, case: ExpiryCase,
                     reference: datetime) -> None:
        options = self.options
        tag = f"{case.template_tag}_c"
        name = f"{backend.backend}-{case.template_tag}-l{case.logged_percent}"

        if "seed" in options.parts:
            def seed(m: Measurement) -> None:
                with self.fresh_copy(backend, template, tag) as database:
                    result = baselines.run_seed(database, reference, options.seed_vouchers,
                                                options.seed_seconds)
                m.rows, m.seconds = result.inserted, result.extrapolated_seconds
                m.sampled, m.loaded = result.processed, result.vouchers
            self.measure(Measurement(backend.backend, case, SEED), seed)

        if "single" in options.parts:
            def single(m: Measurement) -> None:
                with self.fresh_copy(backend, template, tag) as database:
                    with self.observe(backend, database, with_writer=False) as observed:
                        result = baselines.run_expiry_statement(database, reference)
                m.rows, m.seconds, m.growth = result.rows, result.seconds, observed.growth
            self.measure(Measurement(backend.backend, case, SINGLE), single)

        if "jobs" in options.parts:
            arguments = ["run", "voucher-expired", "--at", reference.isoformat(),
                         *options.job_args]
            job = Measurement(backend.backend, case, JOB)
            rerun = Measurement(backend.backend, case, RERUN)
            with self.fresh_copy(backend, template, tag) as database:
                self.measure(job, lambda m: self.job_step(m, backend, database, arguments,
                                                          f"{name}-job", with_writer=False))
                if case.logged_percent == 0:
                    self.measure(rerun, lambda m: self.job_step(
                        m, backend, database, arguments, f"{name}-rerun", with_writer=False))

    # --- audit-archival -------------------------------------------------------

    def run_archival(self, backend: Backend, layout: str, audit_rows: int) -> None:
        options = self.options
        case = ArchivalCase(layout, audit_rows, options.eligible)

        def fill(engine, reference):
            fill_audit_rows(engine, audit_rows, options.eligible, layout, reference,
                            options.chunk_rows, vouchers=100_000)

        template, reference = self.fill_template(
            backend, case.template_tag, case.label, 0, audit_rows, fill)
        cutoff = reference - timedelta(days=RETENTION_DAYS)
        tag = f"{case.template_tag}_c"
        try:
            if options.writer_rate > 0:
                self.measure(Measurement(backend.backend, case, IDLE),
                             lambda m: self.idle_writer(m, backend, template, tag))
            for mode in options.modes:
                self.archival_steps(backend, template, tag, case, mode, reference, cutoff)
        finally:
            backend.drop(template)

    def idle_writer(self, m: Measurement, backend: Backend, template: Database, tag: str) -> None:
        with self.fresh_copy(backend, template, tag) as database:
            with self.observe(backend, database, with_writer=True) as observed:
                time.sleep(self.options.idle_seconds)
        m.writer, m.growth = observed.writer, observed.growth

    def archival_steps(self, backend: Backend, template: Database, tag: str, case: ArchivalCase,
                       mode: str, reference: datetime, cutoff: datetime) -> None:
        options = self.options
        name = f"{backend.backend}-{case.template_tag}-{mode}"
        archive_dir = self.work_dir / "archive" / name

        if "single" in options.parts:
            def single(m: Measurement) -> None:
                with self.fresh_copy(backend, template, tag) as database:
                    with self.observe(backend, database, with_writer=True) as observed:
                        started = time.time()
                        result = baselines.run_archival_statement(
                            database, mode, cutoff, reference, archive_dir / "single")
                        observed.window = (started, time.time())
                m.rows, m.seconds = result.rows, result.seconds
                m.archive_bytes = result.archive_bytes
                m.growth, m.writer = observed.growth, observed.writer
            self.measure(Measurement(backend.backend, case, SINGLE, mode), single)

        if "jobs" in options.parts:
            arguments = ["run", "audit-archival", "--mode", mode,
                         "--retention-days", str(RETENTION_DAYS), "--at", reference.isoformat()]
            if mode == "archive-file":
                arguments += ["--archive-dir", str(archive_dir / "job")]
            arguments += options.job_args

            def job(m: Measurement) -> None:
                with self.fresh_copy(backend, template, tag) as database:
                    self.job_step(m, backend, database, arguments, f"{name}-job",
                                  with_writer=True)
                if mode == "archive-file" and m.error is None:
                    m.archive_bytes = sum(path.stat().st_size
                                          for path in (archive_dir / "job").glob("*.jsonl.gz"))
            self.measure(Measurement(backend.backend, case, JOB, mode), job)
        shutil.rmtree(archive_dir, ignore_errors=True)

    # --- a job in a child process ---------------------------------------------

    def job_step(self, m: Measurement, backend: Backend, database: Database, arguments: list[str],
                 name: str, *, with_writer: bool) -> None:
        with self.observe(backend, database, with_writer) as observed:
            run = run_job(database, arguments, self.work_dir / "logs", name,
                          self.options.step_timeout)
            observed.window = run.window
        m.wall_seconds, m.peak_rss_mib = run.wall_seconds, run.peak_rss_mib
        m.growth, m.writer = observed.growth, observed.writer
        m.error = run.error
        m.rows, m.seconds, m.batches = run.rows, run.job_seconds, run.batches
        m.median_batch_ms, m.longest_batch_ms = run.median_batch_ms, run.longest_batch_ms


def describe_run(options: argparse.Namespace, argv: list[str], work_dir: Path,
                 server: PostgresServer | None) -> RunInfo:
    run = RunInfo(
        command="python3 dev.py bench " + shlex.join(argv) if argv else "python3 dev.py bench",
        started=datetime.now().astimezone().isoformat(timespec="seconds"),
        commit=environment.git_commit(),
        load_at_start=environment.load_average(),
    )
    if options.preset == "smoke":
        run.note = ("The smoke preset only checks that every step works. Its data sets "
                    "are far too small for the figures to say anything about the targets.")
    folders = {"SQLite files": work_dir}
    if server is not None:
        run.postgresql = server.describe()
        data_directory = Path(run.postgresql.get("data_directory", ""))
        if data_directory.is_absolute() and data_directory.exists():
            folders["PostgreSQL data"] = data_directory
    run.machine = environment.describe_machine(folders)
    run.drivers = environment.describe_drivers()
    run.packages = environment.locked_packages()
    run.options = [
        ("preset", options.preset),
        ("backends", ", ".join(options.backends)),
        ("layouts", ", ".join(options.layouts)),
        ("jobs and parts", f"{', '.join(options.jobs)}; {', '.join(options.parts)}"),
        ("archival modes", ", ".join(options.modes)),
        ("vouchers", ", ".join(f"{n:,}" for n in options.vouchers)
         + f"; expired {', '.join(f'{p}%' for p in options.expired)}"
         + f"; logged {', '.join(f'{p}%' for p in options.logged)}"),
        ("audit rows", ", ".join(f"{n:,}" for n in options.audit_rows)
         + f"; {options.eligible}% past the {RETENTION_DAYS}-day retention"),
        ("partition rows", ", ".join(f"{n:,}" for n in options.partition_rows)),
        ("seed algorithm cap", f"{options.seed_vouchers:,} vouchers or "
                               f"{options.seed_seconds:g} s"),
        ("concurrent writer", f"{options.writer_rate:g} inserts/s, SQLite busy timeout "
                              f"{options.writer_busy_timeout:g} s, idle baseline "
                              f"{options.idle_seconds:g} s" if options.writer_rate
         else "off"),
        ("extra job arguments", shlex.join(options.job_args) or "none"),
    ]
    return run


def run_all(suite: Suite, backends: list[Backend]) -> None:
    options = suite.options
    for backend in backends:
        for layout in options.layouts:
            if "voucher-expired" in options.jobs:
                for vouchers in options.vouchers:
                    for expired in options.expired:
                        suite.run_expiry(backend, layout, vouchers, expired)
            if "audit-archival" in options.jobs:
                for audit_rows in options.audit_rows:
                    suite.run_archival(backend, layout, audit_rows)
    if ("partitions" in options.parts and "audit-archival" in options.jobs
            and "postgresql" in options.backends):
        run_partitions(suite)


def run_partitions(suite: Suite) -> None:
    """Retire one old partition of each size in each mode, on a database of its own."""
    options = suite.options
    for mode in options.modes:
        for rows in options.partition_rows:
            run = PartitionRun(mode, rows)
            print(f"postgresql, partition of {rows:,} rows, {mode} ...", flush=True)
            try:
                figures = partition_retirement.measure(
                    options.admin_url, rows, ArchiveMode(mode), len(suite.partition_runs) + 1)
            except Exception as exc:  # noqa: BLE001 - the report names every failed step
                run.error = f"{type(exc).__name__}: {exc}"
            else:
                run.detach_ms = figures["detach_ms"]
                run.drop_ms = figures["drop_ms"]
                run.run_seconds = figures["run_seconds"]
            suite.partition_runs.append(run)
            print(f"  {run.where}: detach {run.detach_ms} ms, DROP {run.drop_ms} ms, "
                  f"run {run.run_seconds} s" + (f", {run.error}" if run.error else ""),
                  flush=True)


def write_report(suite: Suite, run: RunInfo) -> None:
    """Evaluate the targets, print the report and write it to --output."""
    options = suite.options
    run.finished = datetime.now().astimezone().isoformat(timespec="seconds")
    run.load_at_end = environment.load_average()
    evaluated = targets.evaluate(suite.measurements, suite.partition_runs)
    method = METHOD_TEMPLATE.format(writer_rate=f"{options.writer_rate:g}",
                                    busy_timeout=f"{options.writer_busy_timeout:g}")
    text = Report(run, suite.datasets, suite.measurements, evaluated, method,
                  suite.partition_runs).render()
    print()
    print(text, flush=True)
    if options.output != "-":
        Path(options.output).write_text(text)
        print(f"Wrote {options.output}")


def main(argv: list[str]) -> int:
    options = parse_options(argv)
    own_work_dir = options.work_dir is None
    work_dir = (options.work_dir or Path(tempfile.mkdtemp(prefix="voucher-jobs-bench-"))).resolve()
    (work_dir / "logs").mkdir(parents=True, exist_ok=True)
    # The process id keeps two runs on one server apart.
    server = (PostgresServer(options.admin_url, str(os.getpid()))
              if "postgresql" in options.backends else None)
    folder = SqliteFolder(work_dir / "sqlite") if "sqlite" in options.backends else None
    backends: list[Backend] = [b for b in (folder, server) if b is not None]
    try:
        run = describe_run(options, argv, work_dir, server)
    except psycopg.OperationalError as exc:
        print(f"PostgreSQL at {mask_url(options.admin_url)} is unreachable: {exc}. Start "
              "it, pass --admin-url, or leave it out with --backends sqlite.", file=sys.stderr)
        if own_work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
        return 2
    print(f"Work folder: {work_dir}", flush=True)

    suite = Suite(options, work_dir)
    failed = 0
    try:
        run_all(suite, backends)
        failed = (sum(1 for m in suite.measurements if m.error)
                  + sum(1 for r in suite.partition_runs if r.error))
        run.status = "complete" if not failed else f"complete, {failed} steps failed"
    except KeyboardInterrupt:
        run.status = "interrupted: the figures below are incomplete"
        failed = 1
    except Exception as exc:
        run.status = (f"stopped by {type(exc).__name__}: {exc}; the figures below are "
                      "incomplete")
        raise
    finally:
        write_report(suite, run)
        for backend in backends:
            backend.drop_all()
        if own_work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Time both jobs end to end on a PostgreSQL database of production size.

The script drops and creates a database (default voucher_jobs_large on the
local server at 127.0.0.1:5432), migrates it, fills it with generated
vouchers and audit rows from voucher_jobs.data.sample, runs VACUUM ANALYZE,
and then runs the `voucher-jobs` CLI in child processes:

1. `run voucher-expired`, then again with nothing left to do;
2. `run audit-archival --dry-run`, then `--mode delete`;
3. `--mode archive-table` and `--mode archive-file`, each after the audit
   table has been emptied and filled again, so every mode starts from the
   same rows.

Before the jobs, two reference statements run on a copy of the filled
database: the whole expiry as one INSERT ... SELECT per table, and the whole
archival as one DELETE. They show what the batched jobs are measured against.

It prints the machine, the versions and a table of rows, seconds, rows/s,
batch durations (from the `-v` batch log lines, which have millisecond
resolution) and the peak RSS of each child process. The database is dropped
at the end unless --keep or --fill-only is given.

    .venv/bin/python benchmarks/large_dataset.py
    .venv/bin/python benchmarks/large_dataset.py --vouchers 100000 --audit-rows 500000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

import voucher_jobs
from voucher_jobs.data import migrate, sample
from voucher_jobs.data.clock import database_now
from voucher_jobs.data.engine import create_db_engine, mask_url

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_DATABASE = "voucher_jobs_large"
# The CLI's default retention: with four years of history, about half of
# the audit rows are older than the cutoff.
RETENTION_DAYS = 730
HISTORY_YEARS = 4.0
DATABASE_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
# With `-v` a job logs a line when it starts its batches and one per batch,
# such as `2026-12-04T10:00:00.123Z DEBUG voucher_jobs.jobs.audit_archival
# archival_batch batch=1 ...`.
JOB_STARTED_LINE = re.compile(r"^(\S+Z) INFO \S+ (expiry_started|archival_started)\b")
BATCH_LINE = re.compile(r"^(\S+Z) DEBUG \S+ (expiry_batch|archival_batch)\b")


@dataclass
class Step:
    """One measured step: a child process or a statement run in this process."""

    name: str
    rows: int | None
    seconds: float
    job_seconds: float | None = None
    batches: int | None = None
    batch_ms_median: float | None = None
    batch_ms_max: float | None = None
    peak_rss_kib: int | None = None
    counts_as_work: bool = True
    # The 1-minute load average when the step ended. The benchmark itself
    # runs about one client and one server process at a time, plus parallel
    # workers in some statements, so a value well above 2 points to other
    # processes competing for the CPU.
    load_at_end: float = field(default_factory=lambda: os.getloadavg()[0])


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--admin-url", default=DEFAULT_ADMIN_URL,
        help="PostgreSQL URL of an existing database to connect to for DROP and "
        "CREATE DATABASE.",
    )
    parser.add_argument(
        "--database", default=DEFAULT_DATABASE,
        help="Name of the benchmark database on the admin URL's server. It is dropped "
        "and created again.",
    )
    parser.add_argument(
        "--database-url", default=None,
        help="URL of the benchmark database, if it is not the admin URL with its "
        "database replaced by --database. Its database is dropped and created again.",
    )
    parser.add_argument("--vouchers", type=int, default=1_000_000,
                        help="Vouchers to generate.")
    parser.add_argument("--audit-rows", type=int, default=5_000_000,
                        help="Audit rows to generate, spread over four years.")
    parser.add_argument("--chunk-rows", type=int, default=1_000_000,
                        help="Rows per INSERT ... SELECT statement while filling.")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="--batch-size for the jobs. Default: the CLI's default.")
    parser.add_argument("--no-reference", action="store_true",
                        help="Skip the reference statements on a copy of the database.")
    parser.add_argument("--fill-only", action="store_true",
                        help="Stop after filling and VACUUM ANALYZE and keep the "
                        "database, for example to study query plans by hand.")
    parser.add_argument("--keep", action="store_true",
                        help="Keep the database and the work folder at the end.")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="Folder for the child processes' output and the archive "
                        "files. Default: a new temporary folder, removed at the end "
                        "unless --keep is given.")
    arguments = parser.parse_args(argv)

    for option in ("vouchers", "audit_rows", "chunk_rows"):
        if getattr(arguments, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1")
    return arguments


def database_urls(arguments: argparse.Namespace) -> tuple[str, str, str]:
    """Return the admin URL, the benchmark database URL and its database name."""
    admin = make_url(arguments.admin_url)
    if arguments.database_url:
        target = make_url(arguments.database_url)
    else:
        target = admin.set(database=arguments.database)
    name = target.database or ""
    if not DATABASE_NAME.match(name):
        raise SystemExit(
            f"database name {name!r} is invalid: use lower-case letters, digits and "
            "underscores, starting with a letter or underscore."
        )
    if name == admin.database or name in ("postgres", "template0", "template1"):
        raise SystemExit(
            f"database name {name!r} is rejected: the benchmark drops it. "
            "Choose a name of its own with --database."
        )
    return (
        admin.render_as_string(hide_password=False),
        target.render_as_string(hide_password=False),
        name,
    )


def recreate_database(admin: Engine, name: str, template: str | None = None) -> None:
    """Drop the database if it exists and create it, empty or as a copy of template."""
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        if template:
            # FILE_COPY copies the files once; the default WAL_LOG strategy
            # writes the whole copy to the WAL as well.
            connection.execute(
                text(f'CREATE DATABASE "{name}" TEMPLATE "{template}" STRATEGY FILE_COPY')
            )
        else:
            connection.execute(text(f'CREATE DATABASE "{name}"'))


def drop_database(admin: Engine, name: str) -> None:
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def vacuum_analyze(engine: Engine) -> float:
    started = time.monotonic()
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("VACUUM ANALYZE"))
    return time.monotonic() - started


def fill_vouchers(engine: Engine, count: int, chunk_rows: int, now: datetime) -> Step:
    started = time.monotonic()
    inserted = 0
    while inserted < count:
        chunk = min(chunk_rows, count - inserted)
        # insert_vouchers numbers codes and spreads expiries after the
        # vouchers already present, so chunks continue each other.
        inserted += sample.insert_vouchers(engine, chunk, now)
        print(f"  vouchers: {inserted:,} of {count:,}", flush=True)
    return Step("fill vouchers", inserted, time.monotonic() - started)


def fill_audit_history(
    engine: Engine, count: int, chunk_rows: int, now: datetime, vouchers: int, name: str
) -> Step:
    """Insert count audit rows over the past four years, oldest chunk first.

    Each chunk covers its own slice of the four years, so created_at and id
    both rise through the table, as in one insert_audit_history call.
    """
    started = time.monotonic()
    chunks = -(-count // chunk_rows)
    span = timedelta(days=HISTORY_YEARS * 365)
    first = now - span
    inserted = 0
    for index in range(chunks):
        chunk = count // chunks + (1 if index < count % chunks else 0)
        chunk_end = first + span * (index + 1) / chunks
        inserted += sample.insert_audit_history(
            engine, chunk, chunk_end, years=HISTORY_YEARS / chunks, vouchers_count=vouchers
        )
        print(f"  audit rows: {inserted:,} of {count:,}", flush=True)
    return Step(name, inserted, time.monotonic() - started)


def refill_audit_history(engine: Engine, arguments: argparse.Namespace) -> list[Step]:
    """Empty voucher_audit_logs and fill it again with the same generated rows."""
    started = time.monotonic()
    with engine.begin() as connection:
        connection.execute(text("TRUNCATE voucher_audit_logs RESTART IDENTITY"))
        now = database_now(connection)
    truncate = Step("truncate audit table", None, time.monotonic() - started,
                    counts_as_work=False)
    fill = fill_audit_history(engine, arguments.audit_rows, arguments.chunk_rows, now,
                              arguments.vouchers, "refill audit rows")
    vacuum = Step("VACUUM ANALYZE", None, vacuum_analyze(engine), counts_as_work=False)
    return [truncate, fill, vacuum]


def run_reference_statements(admin: Engine, source: str, source_url: str) -> list[Step]:
    """Time the unbatched equivalents of both jobs on a copy of the filled database.

    The copy is dropped afterwards, so the jobs see the database as filled.
    """
    copy_name = f"{source}_reference"[:63]
    copy_url = make_url(source_url).set(database=copy_name).render_as_string(
        hide_password=False)
    started = time.monotonic()
    recreate_database(admin, copy_name, template=source)
    steps = [Step("copy database (reference)", None, time.monotonic() - started,
                  counts_as_work=False)]
    engine = create_db_engine(copy_url)
    try:
        with engine.begin() as connection:
            # The statements the job runs per batch, over all vouchers at once.
            started = time.monotonic()
            claimed = connection.execute(text(
                """
                INSERT INTO voucher_jobs_expirations (voucher_id, expiry_date, run_id, logged_at)
                SELECT v.id, v.expiry_date, 0, statement_timestamp()
                FROM vouchers AS v
                WHERE v.deleted_at IS NULL AND v.expiry_date <= statement_timestamp()
                ON CONFLICT (voucher_id, expiry_date) DO NOTHING
                """
            )).rowcount
            written = connection.execute(text(
                """
                INSERT INTO voucher_audit_logs
                    (voucher_id, action, actor_type, code, metadata, created_at)
                SELECT v.id, 'EXPIRED', 'SYSTEM', v.code,
                       jsonb_build_object('type', v.type, 'expiry_date',
                           to_char(e.expiry_date AT TIME ZONE 'UTC',
                                   'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
                           'run_id', 0),
                       statement_timestamp()
                FROM voucher_jobs_expirations AS e
                JOIN vouchers AS v ON v.id = e.voucher_id
                WHERE e.run_id = 0
                """
            )).rowcount
            seconds = time.monotonic() - started
        if claimed != written:
            raise RuntimeError(f"reference expiry claimed {claimed} vouchers but wrote "
                               f"{written} audit rows")
        steps.append(Step("reference: expiry as 2 INSERT ... SELECT", written, seconds))

        with engine.begin() as connection:
            started = time.monotonic()
            deleted = connection.execute(text(
                "DELETE FROM voucher_audit_logs "
                "WHERE created_at < statement_timestamp() - make_interval(days => :days)"
            ), {"days": RETENTION_DAYS}).rowcount
            steps.append(Step("reference: archival as 1 DELETE", deleted,
                              time.monotonic() - started))
    finally:
        engine.dispose()
        drop_database(admin, copy_name)
    return steps


def find_cli() -> str:
    beside_python = Path(sys.executable).parent / "voucher-jobs"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("voucher-jobs")
    if found is None:
        raise SystemExit("voucher-jobs not found: run this script with the project's "
                         ".venv/bin/python, or install the project first.")
    return found


def batch_durations_ms(log_path: Path) -> list[float]:
    """Return each batch's duration in ms, from the job's log lines.

    A batch lasts from the previous batch line (or the job's started line,
    logged after its count query) to its own line, so the figure includes
    the progress and heartbeat work between two batches.
    """
    moments = []
    for line in log_path.read_text().splitlines():
        match = JOB_STARTED_LINE.match(line) or BATCH_LINE.match(line)
        if match:
            moments.append(datetime.fromisoformat(match.group(1)).timestamp())
    return [(later - earlier) * 1000 for earlier, later in zip(moments, moments[1:])]


def run_cli(
    cli: str, name: str, arguments: list[str], database_url: str, work_dir: Path,
    counts_as_work: bool = True,
) -> Step:
    """Run `voucher-jobs -v ARGUMENTS --json` in a child process and measure it.

    Peak RSS comes from wait4 on this child alone, because RUSAGE_CHILDREN
    reports the maximum over all children waited for so far.
    """
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    out_path = work_dir / f"{slug}.out"
    log_path = work_dir / f"{slug}.log"
    environment = {
        key: value for key, value in os.environ.items()
        if not key.startswith("VOUCHER_") and key != "DATABASE_URL"
    }
    environment["DATABASE_URL"] = database_url
    command = [cli, "-v", *arguments, "--json"]
    print(f"  {name}: voucher-jobs {' '.join(command[1:])}", flush=True)
    with open(out_path, "wb") as out, open(log_path, "wb") as log:
        started = time.monotonic()
        child = subprocess.Popen(command, env=environment, cwd=work_dir,
                                 stdin=subprocess.DEVNULL, stdout=out, stderr=log)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.monotonic() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-20:])
        raise SystemExit(f"{name} failed with exit code {child.returncode}. The last "
                         f"lines of {log_path}:\n{tail}")

    record = json.loads(out_path.read_text())
    result = record.get("result") or {}
    if result.get("dry_run"):
        # A dry run writes nothing, so report the rows it found to do.
        rows = result.get("eligible_at_start", result.get("would_write", 0))
    else:
        rows = record["rows_affected"]
    durations = sorted(batch_durations_ms(log_path))
    step = Step(
        name, rows, seconds,
        job_seconds=result.get("seconds"),
        batches=result.get("batches"),
        peak_rss_kib=usage.ru_maxrss,  # KiB on Linux
        counts_as_work=counts_as_work and not result.get("dry_run"),
    )
    if durations:
        step.batch_ms_median = durations[len(durations) // 2]
        step.batch_ms_max = durations[-1]
    return step


def run_jobs(
    cli: str, engine: Engine, database_url: str, work_dir: Path,
    arguments: argparse.Namespace,
) -> list[Step]:
    batch = ["--batch-size", str(arguments.batch_size)] if arguments.batch_size else []
    archival = ["run", "audit-archival", "--retention-days", str(RETENTION_DAYS), *batch]
    steps = [
        run_cli(cli, "voucher-expired", ["run", "voucher-expired", *batch],
                database_url, work_dir),
        run_cli(cli, "voucher-expired, nothing to do", ["run", "voucher-expired", *batch],
                database_url, work_dir, counts_as_work=False),
        run_cli(cli, "audit-archival --dry-run", [*archival, "--dry-run"],
                database_url, work_dir),
        run_cli(cli, "audit-archival delete", [*archival, "--mode", "delete"],
                database_url, work_dir),
    ]
    print("  refilling the audit table for archive-table", flush=True)
    steps += refill_audit_history(engine, arguments)
    steps.append(run_cli(cli, "audit-archival archive-table",
                         [*archival, "--mode", "archive-table"], database_url, work_dir))
    print("  refilling the audit table for archive-file", flush=True)
    steps += refill_audit_history(engine, arguments)
    archive_dir = work_dir / "archive"
    steps.append(run_cli(cli, "audit-archival archive-file",
                         [*archival, "--mode", "archive-file", "--archive-dir",
                          str(archive_dir)], database_url, work_dir))
    files = list(archive_dir.glob("*.jsonl.gz"))
    size = sum(path.stat().st_size for path in files)
    print(f"  archive-file wrote {len(files)} files, {size / 2**20:,.1f} MiB", flush=True)
    return steps


def describe_machine() -> list[str]:
    model = "unknown"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory_kib = 0
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                memory_kib = int(line.split()[1])
    return [
        f"CPU: {model}",
        f"cores: {os.cpu_count()}",
        f"memory: {memory_kib / 2**20:.1f} GiB",
        f"kernel: {platform.release()}",
        f"Python: {platform.python_version()} ({sys.executable})",
        f"voucher_jobs imported from: {Path(voucher_jobs.__file__).parent}",
    ]


def describe_server(admin: Engine) -> list[str]:
    # autovacuum matters: without it the claims table keeps the statistics of
    # an empty table during a voucher-expired run, and deleted audit rows stay
    # in the indexes until the next VACUUM.
    settings = ("shared_buffers", "work_mem", "maintenance_work_mem", "max_wal_size",
                "synchronous_commit", "random_page_cost", "effective_cache_size",
                "autovacuum", "jit")
    with admin.connect() as connection:
        lines = [f"PostgreSQL: {connection.execute(text('SELECT version()')).scalar_one()}"]
        values = [
            f"{name}={connection.execute(text(f'SHOW {name}')).scalar_one()}"
            for name in settings
        ]
    lines.append("settings: " + " ".join(values))
    return lines


def format_load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg()) + " (1, 5, 15 min)"


def format_table(steps: list[Step]) -> str:
    header = ("step", "rows", "batches", "seconds", "job seconds", "rows/s",
              "batch ms median", "batch ms max", "peak RSS MiB", "load")
    rows = []
    for step in steps:
        rate = (f"{step.rows / step.seconds:,.0f}"
                if step.counts_as_work and step.rows and step.seconds else "-")
        rows.append((
            step.name,
            f"{step.rows:,}" if step.rows is not None else "-",
            f"{step.batches:,}" if step.batches is not None else "-",
            f"{step.seconds:.2f}",
            f"{step.job_seconds:.2f}" if step.job_seconds is not None else "-",
            rate,
            f"{step.batch_ms_median:.1f}" if step.batch_ms_median is not None else "-",
            f"{step.batch_ms_max:.1f}" if step.batch_ms_max is not None else "-",
            f"{step.peak_rss_kib / 1024:.0f}" if step.peak_rss_kib is not None else "-",
            f"{step.load_at_end:.2f}",
        ))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["| " + " | ".join(cell.ljust(widths[i]) for i, cell in enumerate(header)) + " |",
             "| " + " | ".join("-" * width for width in widths) + " |"]
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [
            cell.rjust(widths[i]) for i, cell in enumerate(row) if i > 0]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    arguments = parse_arguments(argv)
    admin_url, database_url, name = database_urls(arguments)
    cli = find_cli()
    work_dir = arguments.work_dir or Path(tempfile.mkdtemp(prefix="voucher-jobs-bench-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    admin = create_db_engine(admin_url, isolation_level="AUTOCOMMIT")

    print("Machine and versions:")
    for line in describe_machine() + describe_server(admin):
        print(f"  {line}")
    print(f"Database: {mask_url(database_url)} (dropped and created again)")
    print(f"Work folder: {work_dir}")
    print(f"Started: {datetime.now().astimezone().isoformat(timespec='seconds')}, "
          f"load average {format_load()}", flush=True)

    recreate_database(admin, name)
    engine = create_db_engine(database_url)
    steps: list[Step] = []
    finished = False
    try:
        started = time.monotonic()
        migrate.upgrade(engine)
        steps.append(Step("migrate", None, time.monotonic() - started, counts_as_work=False))
        with engine.connect() as connection:
            now = database_now(connection)
        print("Filling:", flush=True)
        steps.append(fill_vouchers(engine, arguments.vouchers, arguments.chunk_rows, now))
        steps.append(fill_audit_history(engine, arguments.audit_rows, arguments.chunk_rows,
                                        now, arguments.vouchers, "fill audit rows"))
        steps.append(Step("VACUUM ANALYZE", None, vacuum_analyze(engine), counts_as_work=False))
        with engine.connect() as connection:
            size = connection.execute(
                text("SELECT pg_size_pretty(pg_database_size(current_database()))")
            ).scalar_one()
        print(f"  database size after filling: {size}", flush=True)
        if arguments.fill_only:
            finished = True
            return 0

        engine.dispose()
        if not arguments.no_reference:
            print("Reference statements on a copy:", flush=True)
            steps += run_reference_statements(admin, name, database_url)
        print("Jobs:", flush=True)
        steps += run_jobs(cli, engine, database_url, work_dir, arguments)
        finished = True
    finally:
        engine.dispose()
        print()
        print(f"Finished: {datetime.now().astimezone().isoformat(timespec='seconds')}, "
              f"load average {format_load()}")
        print(format_table(steps))
        keep = arguments.keep or (arguments.fill_only and finished)
        if keep:
            print(f"Kept {mask_url(database_url)} and {work_dir}.")
        else:
            drop_database(admin, name)
            if arguments.work_dir is None:
                shutil.rmtree(work_dir, ignore_errors=True)
            print(f"Dropped {name}" + ("" if finished else " after a failure") + ".")
        admin.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

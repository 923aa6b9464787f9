"""The `voucher-jobs` command."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated, Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from sqlalchemy.exc import OperationalError

from voucher_jobs import logs
from voucher_jobs.cli.errors import CliError, ExitCode, classify, report
from voucher_jobs.cli.progress import progress_reporter
from voucher_jobs.config import ENV_NAMES, SECRET_FIELDS, ArchiveMode, Settings, load_settings
from voucher_jobs.data import ledger, migrate
from voucher_jobs.data.clock import FutureReferenceTime, check_reference_time, database_now
from voucher_jobs.data.engine import engine_from_settings, mask_url
from voucher_jobs.heartbeats import check_heartbeat_urls
from voucher_jobs.jobs import audit_archival, voucher_expired
from voucher_jobs.jobs.base import BatchLimits
from voucher_jobs.job_settings import batch_limits, run_options
from voucher_jobs.runner import execute

EXIT_CODES = (
    "Exit codes: 0 done, 1 run failed, 2 invalid input or setting, 3 the job is "
    "already running, 4 database unreachable or not migrated, 5 stopped by a "
    "signal before finishing."
)

HELP = f"""Run the background jobs of a voucher backend.

Settings come from environment variables or a .env file in the working
directory: DATABASE_URL, VOUCHER_AUDIT_RETENTION_DAYS and VOUCHER_JOBS_*.
`voucher-jobs config` shows the effective values.

{EXIT_CODES}
"""

# Option help is shown in a narrow column that cuts long variable names, so
# each run command also names its variables in the full-width epilog.
EXPIRED_EPILOG = (
    "Settings come from DATABASE_URL and the VOUCHER_JOBS_* variables, which "
    "`voucher-jobs config` lists. Options override them. " + EXIT_CODES
)
ARCHIVAL_EPILOG = (
    "Settings come from DATABASE_URL, VOUCHER_AUDIT_RETENTION_DAYS and the "
    "VOUCHER_JOBS_* variables, which `voucher-jobs config` lists. Options "
    "override them. " + EXIT_CODES
)

app = typer.Typer(help=HELP, no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False)
run_app = typer.Typer(help="Run one job now on the database at DATABASE_URL.",
                      no_args_is_help=True)
db_app = typer.Typer(help="Create or upgrade the schema of the database at DATABASE_URL.",
                     no_args_is_help=True)
app.add_typer(run_app, name="run")
app.add_typer(db_app, name="db")

# Off a terminal Rich assumes 80 columns; tables read better in logs when wider.
stdout = Console(highlight=False, soft_wrap=True,
                 width=None if sys.stdout.isatty() else 160)


class State:
    verbose = 0


@app.callback()
def main_options(
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True,
                       help="-v: log every batch and show tracebacks; -vv: also SQL.")] = 0,
) -> None:
    State.verbose = verbose
    logs.configure(verbose)


def _settings() -> Settings:
    settings = load_settings()
    check_heartbeat_urls(settings)
    return settings


def _engine(settings: Settings):
    return engine_from_settings(settings)


def _ready_engine(settings: Settings):
    engine = _existing_engine(settings)
    try:
        migrate.require_current(engine)
    except OperationalError as exc:
        # SQLite's message names no file, so the error names the database.
        message, code, _ = classify(exc)
        raise CliError(f"{mask_url(engine.url)}: {message}", code) from exc
    return engine


def _existing_engine(settings: Settings):
    """The engine of a database that must exist already: a missing SQLite file is an error."""
    engine = _engine(settings)
    database = engine.url.database
    if (engine.dialect.name == "sqlite" and database and database != ":memory:"
            and not database.startswith("file:") and not Path(database).exists()):
        # Connecting would create an empty file, which then looks like a
        # database that was never migrated.
        raise CliError(
            f"{mask_url(engine.url)}: the SQLite file {database} does not exist. "
            "Run `voucher-jobs db upgrade` to create it, or point DATABASE_URL at "
            "the database of the backend.",
            ExitCode.DATABASE_UNAVAILABLE,
        )
    return engine


def parse_time(value: str | None, option: str) -> datetime | None:
    """Parse an ISO 8601 instant that carries its UTC offset."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise CliError(
            f"{option} {value!r} is not an ISO 8601 time. "
            "Use a form such as 2026-12-04T10:00:00Z.",
            ExitCode.INVALID_INPUT,
        ) from None
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        raise CliError(
            f"{option} {value!r} has no time zone. Add Z for UTC or an offset "
            "such as +01:00.",
            ExitCode.INVALID_INPUT,
        )
    return parsed


AtOption = Annotated[Optional[str], typer.Option(
    "--at", metavar="TIME",
    help="Reference time instead of the database clock's now, ISO 8601 with a "
    "zone (2026-12-04T10:00:00Z). For backfills and tests.")]
DryRunOption = Annotated[bool, typer.Option(
    "--dry-run", help="Report what would be written or removed; write nothing.")]
BatchOption = Annotated[Optional[int], typer.Option(
    "--batch-size", min=1, max=100_000,
    help="Rows (for voucher-expired: vouchers, expired or not) of the first batch; "
    "later batches follow --batch-target-ms.",
    show_default="$VOUCHER_JOBS_BATCH_SIZE or 1000")]
BatchTargetOption = Annotated[Optional[int], typer.Option(
    "--batch-target-ms", min=0, max=10_000, metavar="MS",
    help="Grow or shrink batches so each takes about this long (at most 100000 rows); "
    "0 keeps every batch at --batch-size rows.",
    show_default="$VOUCHER_JOBS_BATCH_TARGET_MS or 50")]
MaxBatchesOption = Annotated[Optional[int], typer.Option(
    "--max-batches", min=1, help="Stop after this many batches; the next run goes on.")]
MaxSecondsOption = Annotated[Optional[float], typer.Option(
    "--max-seconds", min=0.001, max=7 * 86400, help="Stop after the batch that passes this many seconds.")]
PauseOption = Annotated[Optional[float], typer.Option(
    "--pause", min=0.0, max=3600.0,
    help="Seconds to sleep between batches.",
    show_default="$VOUCHER_JOBS_BATCH_PAUSE_SECONDS or 0")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the run record as JSON.")]


def _limits(settings: Settings, batch_size, target_ms, max_batches, max_seconds, pause
            ) -> BatchLimits:
    limits = batch_limits(settings, batch_size=batch_size, max_batches=max_batches,
                          max_seconds=max_seconds, pause_seconds=pause)
    if target_ms is not None:
        limits = dataclasses.replace(limits, target_seconds=target_ms / 1000 or None)
    return limits


@run_app.command("voucher-expired", epilog=EXPIRED_EPILOG)
def run_voucher_expired(
    dry_run: DryRunOption = False,
    at: AtOption = None,
    batch_size: BatchOption = None,
    batch_target_ms: BatchTargetOption = None,
    max_batches: MaxBatchesOption = None,
    max_seconds: MaxSecondsOption = None,
    pause: PauseOption = None,
    as_json: JsonOption = False,
) -> None:
    """Write one EXPIRED audit row for each live voucher whose expiry has passed.

    A voucher has expired when deleted_at is null and expiry_date <= the
    reference time (the database clock at run start, or --at).
    """
    settings = _settings()
    parameters = voucher_expired.ExpiryParameters(
        reference_time=parse_time(at, "--at"),
        dry_run=dry_run,
        limits=_limits(settings, batch_size, batch_target_ms, max_batches, max_seconds, pause),
    )
    _run(settings, voucher_expired.NAME, parameters, as_json)


@run_app.command("audit-archival", epilog=ARCHIVAL_EPILOG)
def run_audit_archival(
    mode: Annotated[Optional[ArchiveMode], typer.Option(
        "--mode", case_sensitive=False,
        help="delete, archive-table or archive-file.",
        show_default="$VOUCHER_JOBS_ARCHIVE_MODE or delete")] = None,
    retention_days: Annotated[Optional[int], typer.Option(
        "--retention-days", min=1, max=36500,
        help="Rows older than this many days are removed.",
        show_default="$VOUCHER_AUDIT_RETENTION_DAYS or 730")] = None,
    archive_dir: Annotated[Optional[Path], typer.Option(
        "--archive-dir", file_okay=False,
        help="Folder for archive-file mode.",
        show_default="$VOUCHER_JOBS_ARCHIVE_DIR or ./archive")] = None,
    dry_run: DryRunOption = False,
    at: AtOption = None,
    batch_size: BatchOption = None,
    batch_target_ms: BatchTargetOption = None,
    max_batches: MaxBatchesOption = None,
    max_seconds: MaxSecondsOption = None,
    pause: PauseOption = None,
    as_json: JsonOption = False,
) -> None:
    """Delete or archive audit rows older than the retention, in short batches.

    The cutoff is the reference time minus the retention, fixed when the run
    starts; rows with created_at < cutoff are removed.
    """
    settings = _settings()
    parameters = audit_archival.ArchivalParameters(
        retention_days=retention_days or settings.retention_days,
        mode=mode or settings.archive_mode,
        reference_time=parse_time(at, "--at"),
        dry_run=dry_run,
        limits=_limits(settings, batch_size, batch_target_ms, max_batches, max_seconds, pause),
        archive_dir=archive_dir or settings.archive_dir,
        archive_file_rows=settings.archive_file_rows,
        partition_lock_timeout_seconds=settings.partition_lock_timeout_seconds,
    )
    if parameters.reference_time is not None:
        try:
            audit_archival.compute_cutoff(parameters.reference_time, parameters.retention_days)
        except ValueError as exc:
            raise CliError(f"--at: {exc}", ExitCode.INVALID_INPUT) from None
    if parameters.mode is ArchiveMode.ARCHIVE_FILE:
        source = "--archive-dir" if archive_dir else ENV_NAMES["archive_dir"]
        _check_archive_dir(parameters.archive_dir, source)
    _run(settings, audit_archival.NAME, parameters, as_json)


def _check_archive_dir(directory: Path, source: str) -> None:
    """Raise CliError unless archive files can be written in directory.

    A folder that does not exist passes when its nearest existing parent is
    a writable folder, because the first export creates it.
    """
    existing = directory.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        problem = f"{existing} is not a folder"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{existing} is not writable"
    else:
        return
    raise CliError(f"{source} {str(directory)!r} cannot hold archive files: {problem}. "
                   "Set it to a writable folder.", ExitCode.INVALID_INPUT)


def _run(settings: Settings, job: str, parameters, as_json: bool) -> None:
    engine = _ready_engine(settings)
    if parameters.reference_time is not None:
        with engine.connect() as connection:
            try:
                check_reference_time(parameters.reference_time, database_now(connection))
            except FutureReferenceTime as exc:
                raise CliError(f"--at: {exc}", ExitCode.INVALID_INPUT) from None
    with progress_reporter(job, enabled=not as_json) as progress:
        run, result = execute(
            engine, job, parameters, trigger="cli", progress=progress,
            **run_options(job, settings),
        )
    if as_json:
        stdout.print_json(json.dumps(_run_json(run)))
    else:
        stdout.print(_summary(run, result.dry_run), markup=False)
    if run.status == ledger.INTERRUPTED:
        raise typer.Exit(ExitCode.INTERRUPTED)


def _count(number: int, noun: str) -> str:
    """`1 row`, `2 rows`: a count with its noun in the right number."""
    return f"{number:,} {noun}" if number == 1 else f"{number:,} {noun}s"


def _summary(run: ledger.RunRow, dry_run: bool) -> str:
    details = run.result or {}
    seconds = details.get("seconds", 0)
    if run.job == voucher_expired.NAME:
        if dry_run:
            return (f"{run.job}: dry run {run.id}: {_count(details.get('would_write', 0), 'voucher')} "
                    f"would get an EXPIRED row (reference time {details.get('reference_time')})")
        return (f"{run.job}: run {run.id} {run.status}: wrote "
                f"{_count(run.rows_affected, 'EXPIRED row')} in {seconds:.2f} s (reference time {details.get('reference_time')})")
    verb = {"delete": "deleted", "archive-table": "moved to voucher_jobs_audit_archive",
            "archive-file": "archived to files and deleted"}[details.get("mode", "delete")]
    if dry_run:
        return (f"{run.job}: dry run {run.id}: {_count(details.get('eligible_at_start', 0), 'row')} older "
                f"than the cutoff {details.get('cutoff')} (oldest {details.get('oldest_eligible')}, "
                f"newest {details.get('newest_eligible')}); mode {details.get('mode')}"
                f"{_partitions_note(details.get('partitions_to_retire'), 'would be retired')}")
    return (f"{run.job}: run {run.id} {run.status}: {_count(run.rows_affected, 'row')} {verb} in "
            f"{seconds:.2f} s (cutoff {details.get('cutoff')})"
            f"{_partitions_note(details.get('partitions_retired'), 'retired')}")


def _partitions_note(partitions: list[dict] | None, verb: str) -> str:
    """Name the whole partitions of voucher_audit_logs that a run retired or would retire."""
    if not partitions:
        return ""
    listed = ", ".join(f"{entry['name']} ({entry['rows']:,} rows)" for entry in partitions)
    return f"; {len(partitions)} whole partitions {verb}: {listed}"


def _run_json(run: ledger.RunRow) -> dict:
    from voucher_jobs.runner import to_json

    return to_json(run.__dict__)


@app.command("runs")
def list_runs(
    job: Annotated[Optional[str], typer.Option("--job", help="Only runs of this job.")] = None,
    status: Annotated[Optional[str], typer.Option(
        "--status", help=f"Only runs with this status: {', '.join(ledger.STATUSES)}.")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000, help="How many runs.")] = 20,
    as_json: JsonOption = False,
) -> None:
    """Show recent runs, newest first.

    Reads the run ledger of the database at DATABASE_URL.
    """
    if status and status not in ledger.STATUSES:
        raise CliError(f"--status {status!r} is invalid. Use one of: "
                       f"{', '.join(ledger.STATUSES)}.", ExitCode.INVALID_INPUT)
    from voucher_jobs.jobs import JOBS

    if job and job not in JOBS:
        raise CliError(f"--job {job!r} is not a job. Use one of: {', '.join(JOBS)}.",
                       ExitCode.INVALID_INPUT)
    engine = _ready_engine(_settings())
    rows = ledger.recent_runs(engine, job=job, status=status, limit=limit)
    if as_json:
        stdout.print_json(json.dumps([_run_json(row) for row in rows]))
        return
    table = Table("id", "job", "trigger", "status", "started (UTC)", "seconds", "rows", "note")
    for row in rows:
        seconds = ((row.finished_at - row.started_at).total_seconds()
                   if row.finished_at else None)
        note = row.error or ""
        if row.blocked_by_run_id:
            note = f"run {row.blocked_by_run_id} was active"
        elif row.result and row.result.get("dry_run"):
            note = "dry run"
        table.add_row(str(row.id), row.job, row.trigger, row.status,
                      row.started_at.strftime("%Y-%m-%d %H:%M:%S"),
                      f"{seconds:.2f}" if seconds is not None else "",
                      f"{row.rows_affected:,}", note)
    stdout.print(table)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create the tables, or upgrade them to this version's schema.

    Works on the database at DATABASE_URL. Existing vouchers and
    voucher_audit_logs tables are kept; only missing indexes and
    voucher-jobs' own voucher_jobs_* tables are added.
    """
    settings = _settings()
    engine = _engine(settings)
    before, after = migrate.upgrade(engine)
    target = mask_url(engine.url)
    if before == after:
        stdout.print(f"{target}: already at revision {after}", markup=False)
    else:
        stdout.print(f"{target}: upgraded from {before or 'no voucher-jobs revision'} to {after}",
                     markup=False)


@db_app.command("current")
def db_current(
    check: Annotated[bool, typer.Option(
        "--check", help="Exit with code 4 unless the database is at this version's "
        "revision; for deploy pipelines.")] = False,
) -> None:
    """Print the schema revision of the database and the one this version needs.

    Reads the database at DATABASE_URL.
    """
    engine = _existing_engine(_settings())
    stdout.print(f"database: {migrate.current_revision(engine) or 'none'}; "
                 f"this version: {migrate.head_revision()}", markup=False)
    if check:
        migrate.require_current(engine)


@app.command("config")
def show_config(as_json: JsonOption = False) -> None:
    """Print the effective settings, with the database password masked.

    Shows DATABASE_URL, VOUCHER_AUDIT_RETENTION_DAYS and every VOUCHER_JOBS_*
    variable, whether it was set or left at its default.
    """
    settings = _settings()
    values = {ENV_NAMES[name]: _shown_value(name, value)
              for name, value in settings.model_dump().items()}
    if as_json:
        stdout.print_json(json.dumps(values))
        return
    for name, value in values.items():
        stdout.print(f"{name}={value}", markup=False)


def _shown_value(name: str, value: object) -> str:
    """Render a setting for display, hiding passwords, tokens and heartbeat URLs."""
    if value is None:
        return "(not set)"
    if name in SECRET_FIELDS:
        return "(set, hidden)"
    if name == "database_url":
        return mask_url(str(value))
    if name.endswith("heartbeat_url"):
        # Monitoring URLs usually carry their secret in the path, and may
        # carry a user and password before the host.
        scheme, _, rest = str(value).partition("://")
        host = rest.split("/")[0].rpartition("@")[2]
        return f"{scheme}://{host}/(path hidden)"
    if isinstance(value, ArchiveMode):
        return value.value
    return str(value)


def main() -> None:
    """Entry point: run the app and turn errors into messages and exit codes."""
    from voucher_jobs.cli import demo  # noqa: F401 - registers the demo command
    from voucher_jobs.cli import schedule_commands  # noqa: F401 - registers schedule and scheduler
    from voucher_jobs.cli import serve  # noqa: F401 - registers the serve command

    try:
        # With standalone_mode=False, click returns the code of a typer.Exit
        # that a command raises instead of raising it again.
        exit_code = app(standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(ExitCode.INTERRUPTED)
    except typer.TyperException as exc:
        # A usage error, such as an unknown option or an invalid option value.
        # Typer 0.29 raises its own copy of click's exceptions, which subclass
        # TyperException, so click.ClickException does not catch them.
        _name_rejected_value(exc)
        show = getattr(exc, "show", None)
        if show is not None:
            show()
        else:
            print(f"Error: {exc.format_message()}", file=sys.stderr)
        sys.exit(ExitCode.INVALID_INPUT)
    except Exception as exc:  # noqa: BLE001 - the top level reports every error
        sys.exit(report(exc, verbose=State.verbose > 0))
    sys.exit(exit_code if isinstance(exit_code, int) else ExitCode.OK)


def _name_rejected_value(exc: typer.TyperException) -> None:
    """Put the rejected value into Typer's message for an invalid option value.

    Typer checks option values with pydantic and shows only its reason, such
    as "Input should be greater than or equal to 1".
    """
    cause = exc.__cause__
    message = getattr(exc, "message", None)
    if not isinstance(cause, ValidationError) or not isinstance(message, str):
        return
    errors = cause.errors()
    if not errors or "input" not in errors[0]:
        return
    value = repr(errors[0]["input"])
    if value not in message:
        exc.message = f"{value}. {message}"

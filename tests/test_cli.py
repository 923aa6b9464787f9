"""The voucher-jobs command: help, option checks, exit codes and output formats."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import select

from tests.conftest import T0, Database
from voucher_jobs.data import migrate
from voucher_jobs.data.engine import create_db_engine
from voucher_jobs.data.schema import runs, voucher_audit_logs, vouchers
from voucher_jobs.jobs import JOBS

# Option checks happen before the first connection, so tests that are not
# about the database run on SQLite only.
sqlite_only = pytest.mark.parametrize("db", ["sqlite"], indirect=True)

EXIT_CODE_TEXTS = ("0 done", "1 run failed", "2 invalid input", "3 the job is already running",
                   "4 database unreachable", "5 stopped by a signal")


def unwrapped(text: str) -> str:
    """Join the lines that help output wraps at the terminal width."""
    return " ".join(text.split())


def test_help_names_settings_and_exit_codes() -> None:
    # This is the one check that `python -m voucher_jobs` starts as a process.
    result = subprocess.run([sys.executable, "-m", "voucher_jobs", "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for text in ("DATABASE_URL", "VOUCHER_AUDIT_RETENTION_DAYS", "VOUCHER_JOBS_*",
                 *EXIT_CODE_TEXTS):
        assert text in unwrapped(result.stdout)


@pytest.mark.parametrize("command", [
    ["run"], ["run", "voucher-expired"], ["run", "audit-archival"], ["runs"],
    ["db"], ["db", "upgrade"], ["db", "current"], ["config"], ["demo"],
])
def test_subcommand_help_names_database_url(cli, command: list[str]) -> None:
    result = cli(*command, "--help")
    assert result.exit_code == 0, result.stderr
    assert "Usage:" in result.stdout
    assert "DATABASE_URL" in result.stdout


@pytest.mark.parametrize("job", ["voucher-expired", "audit-archival"])
def test_run_help_lists_exit_codes(cli, job: str) -> None:
    result = cli("run", job, "--help")
    for text in ("VOUCHER_JOBS_*", *EXIT_CODE_TEXTS):
        assert text in unwrapped(result.stdout)


def test_archival_help_names_retention_variable(cli) -> None:
    result = cli("run", "audit-archival", "--help")
    assert "VOUCHER_AUDIT_RETENTION_DAYS" in unwrapped(result.stdout)


def test_no_arguments_shows_help(cli) -> None:
    result = cli()
    assert result.exit_code == 2
    assert "Usage:" in result.stdout + result.stderr


@sqlite_only
@pytest.mark.parametrize("value, reason", [
    ("2026-12-04T10:00:00", "has no time zone"),
    ("garbage", "is not an ISO 8601 time"),
    ("2026-13-01T00:00:00Z", "is not an ISO 8601 time"),
])
def test_invalid_at_rejected(db: Database, cli, value: str, reason: str) -> None:
    result = cli("run", "voucher-expired", "--at", value, env={"DATABASE_URL": db.url})
    assert result.exit_code == 2, result.stderr
    assert f"--at {value!r} {reason}" in result.stderr
    assert db.count(runs) == 0


@sqlite_only
def test_at_with_offset_accepted(db: Database, cli) -> None:
    db.add_voucher(T0 - timedelta(minutes=30))
    result = cli("run", "voucher-expired", "--at", "2026-12-04T11:00:00+01:00",
                 env={"DATABASE_URL": db.url})
    assert result.exit_code == 0, result.stderr
    assert "wrote 1 EXPIRED row in" in result.stdout


@sqlite_only
@pytest.mark.parametrize("value", ["0", "100001", "many"])
def test_invalid_batch_size_rejected(db: Database, cli, value: str) -> None:
    result = cli("run", "voucher-expired", "--batch-size", value, env={"DATABASE_URL": db.url})
    assert result.exit_code == 2, result.stderr
    assert "--batch-size" in result.stderr
    assert "Traceback" not in result.stderr
    assert db.count(runs) == 0


@sqlite_only
@pytest.mark.parametrize("arguments", [
    ["--bogus"],
    ["run", "no-such-job"],
    ["run", "audit-archival", "--mode", "shred"],
    ["run", "audit-archival", "--retention-days", "0"],
])
def test_usage_errors_exit_2(db: Database, cli, arguments: list[str]) -> None:
    result = cli(*arguments, env={"DATABASE_URL": db.url})
    assert result.exit_code == 2, result.stderr
    assert "Error:" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", [
    ["run", "voucher-expired"], ["run", "audit-archival"], ["runs"],
])
def test_unmigrated_database_exits_4(empty_database: str, cli, command: list[str]) -> None:
    result = cli(*command, env={"DATABASE_URL": empty_database})
    assert result.exit_code == 4, result.stderr
    assert "has no voucher-jobs tables" in result.stderr
    assert "voucher-jobs db upgrade" in result.stderr


def test_db_upgrade_twice(empty_database: str, cli) -> None:
    first = cli("db", "upgrade", env={"DATABASE_URL": empty_database})
    assert first.exit_code == 0, first.stderr
    assert f"upgraded from no voucher-jobs revision to {migrate.head_revision()}" in first.stdout
    second = cli("db", "upgrade", env={"DATABASE_URL": empty_database})
    assert second.exit_code == 0, second.stderr
    assert f"already at revision {migrate.head_revision()}" in second.stdout


def test_db_current_reports_revisions(empty_database: str, cli) -> None:
    before = cli("db", "current", env={"DATABASE_URL": empty_database})
    assert before.exit_code == 0, before.stderr
    assert "database: none;" in before.stdout
    cli("db", "upgrade", env={"DATABASE_URL": empty_database})
    after = cli("db", "current", env={"DATABASE_URL": empty_database})
    assert f"database: {migrate.head_revision()};" in after.stdout


def test_db_current_check_exit_codes(empty_database: str, cli) -> None:
    behind = cli("db", "current", "--check", env={"DATABASE_URL": empty_database})
    assert behind.exit_code == 4
    assert "voucher-jobs db upgrade" in behind.stderr
    cli("db", "upgrade", env={"DATABASE_URL": empty_database})
    current = cli("db", "current", "--check", env={"DATABASE_URL": empty_database})
    assert current.exit_code == 0, current.stderr


def test_refused_run_reads_as_skipped(db: Database, cli) -> None:
    from voucher_jobs.data.locks import job_lock

    with job_lock(db.engine, "voucher-expired") as acquired:
        assert acquired
        result = cli("run", "voucher-expired", env={"DATABASE_URL": db.url})
    assert result.exit_code == 3
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("skipped: voucher-expired is already running")
    assert "error:" not in result.stderr


def test_run_json_output_parses(db: Database, cli) -> None:
    db.add_voucher(T0 - timedelta(days=1))
    db.add_voucher(T0 + timedelta(days=1))
    result = cli("run", "voucher-expired", "--at", "2026-12-04T10:00:00Z", "--json",
                 env={"DATABASE_URL": db.url})
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["job"] == "voucher-expired"
    assert record["status"] == "succeeded"
    assert record["trigger"] == "cli"
    assert record["rows_affected"] == 1
    assert record["parameters"]["reference_time"] == T0.isoformat()
    assert record["result"]["dry_run"] is False


@pytest.mark.parametrize(("target", "env_target", "batches"), [
    # Fixed batches of 5 rows: 60 vouchers take 12 batches.
    (["--batch-target-ms", "0"], None, 12),
    (None, "0", 12),
    # A target far above what these batches take: 5, 10, 20, then the last 25.
    (["--batch-target-ms", "10000"], "0", 4),
    (None, "10000", 4),
])
def test_batch_target_option_and_setting(db: Database, cli, target, env_target, batches) -> None:
    for _ in range(60):
        db.add_voucher(T0 - timedelta(days=1))
    env = {"DATABASE_URL": db.url}
    if env_target is not None:
        env["VOUCHER_JOBS_BATCH_TARGET_MS"] = env_target
    result = cli("run", "voucher-expired", "--at", "2026-12-04T10:00:00Z", "--json",
                 "--batch-size", "5", *(target or []), env=env)
    assert result.exit_code == 0, result.stderr
    details = json.loads(result.stdout)["result"]
    assert details["written"] == 60
    assert details["batches"] == batches


def test_runs_json_matches_ledger(db: Database, cli) -> None:
    env = {"DATABASE_URL": db.url}
    assert cli("run", "voucher-expired", env=env).exit_code == 0
    assert cli("run", "audit-archival", "--dry-run", env=env).exit_code == 0
    result = cli("runs", "--json", env=env)
    assert result.exit_code == 0, result.stderr
    listed = json.loads(result.stdout)
    ledger = db.rows(select(runs).order_by(runs.c.id.desc()))
    assert [row["id"] for row in listed] == [row.id for row in ledger]
    assert [row["job"] for row in listed] == ["audit-archival", "voucher-expired"]
    assert [row["status"] for row in listed] == ["succeeded", "succeeded"]
    assert listed[0]["result"]["dry_run"] is True


def test_runs_filters_by_job(db: Database, cli) -> None:
    env = {"DATABASE_URL": db.url}
    cli("run", "voucher-expired", env=env)
    cli("run", "audit-archival", env=env)
    listed = json.loads(cli("runs", "--json", "--job", "audit-archival", env=env).stdout)
    assert [row["job"] for row in listed] == ["audit-archival"]


@sqlite_only
@pytest.mark.parametrize("arguments, value", [
    (["--status", "bogus"], "'bogus'"),
    (["--job", "cleanup"], "'cleanup'"),
])
def test_runs_invalid_filter_rejected(db: Database, cli, arguments, value: str) -> None:
    result = cli("runs", *arguments, env={"DATABASE_URL": db.url})
    assert result.exit_code == 2, result.stderr
    assert value in result.stderr


def test_runs_table_output(db: Database, cli) -> None:
    env = {"DATABASE_URL": db.url}
    cli("run", "voucher-expired", env=env)
    result = cli("runs", env=env)
    assert result.exit_code == 0, result.stderr
    assert "voucher-expired" in result.stdout
    assert "succeeded" in result.stdout


def test_demo_fills_empty_file(cli, tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    env = {"DATABASE_URL": url}
    first = cli("demo", "--vouchers", "40", "--audit-rows", "60", env=env)
    assert first.exit_code == 0, first.stderr
    assert "Running voucher-expired" in first.stdout
    assert "Running audit-archival" in first.stdout

    engine = create_db_engine(url)
    try:
        counts = _counts(engine)
        assert counts[vouchers.name] == 40
        assert counts[runs.name] == 3

        second = cli("demo", "--vouchers", "40", "--audit-rows", "60", env=env)
        assert second.exit_code == 2, second.stderr
        assert "already has 40 vouchers" in second.stderr
        assert _counts(engine) == counts
    finally:
        engine.dispose()


def _counts(engine) -> dict[str, int]:
    from sqlalchemy import func

    with engine.connect() as connection:
        return {
            table.name: connection.execute(select(func.count()).select_from(table)).scalar_one()
            for table in (vouchers, voucher_audit_logs, runs)
        }


def _fail_archival(db: Database, cli, monkeypatch: pytest.MonkeyPatch, *verbose: str):
    # `run` rejects an archive folder it cannot create before the run starts,
    # so the job itself raises the error that such a folder gives mid-run.
    def failing_job(engine, parameters, context):
        raise NotADirectoryError(20, "Not a directory", str(parameters.archive_dir))

    monkeypatch.setitem(JOBS, "audit-archival", failing_job)
    old = datetime.now(timezone.utc) - timedelta(days=1000)
    db.add_audit_rows([old, old + timedelta(seconds=1)])
    return cli(*verbose, "run", "audit-archival", "--mode", "archive-file",
               "--archive-dir", "archive", env={"DATABASE_URL": db.url})


def test_failing_run_reports_cause(db: Database, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    result = _fail_archival(db, cli, monkeypatch)
    assert result.exit_code == 1, result.stderr
    assert "caused by NotADirectoryError" in result.stderr
    assert "Run again as `voucher-jobs -v COMMAND ...` for the traceback." in result.stderr
    assert "Traceback" not in result.stderr
    [run] = db.rows(select(runs))
    assert run.status == "failed"
    assert "NotADirectoryError" in run.error
    assert db.count(voucher_audit_logs) == 2


@sqlite_only
def test_failing_run_verbose_traceback(db: Database, cli,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    result = _fail_archival(db, cli, monkeypatch, "-v")
    assert result.exit_code == 1, result.stderr
    assert "Traceback (most recent call last)" in result.stderr
    assert "NotADirectoryError" in result.stderr


@pytest.mark.parametrize("arguments", [["runs"], ["run", "voucher-expired"], ["db", "current"]])
def test_missing_sqlite_file_is_not_created(tmp_path: Path, cli, arguments: list[str]) -> None:
    database = tmp_path / "absent.db"
    result = cli(*arguments, env={"DATABASE_URL": f"sqlite:///{database}"})
    assert result.exit_code == 4, result.stderr
    assert f"the SQLite file {database} does not exist" in result.stderr
    assert "voucher-jobs db upgrade" in result.stderr
    assert not database.exists()


@pytest.mark.parametrize("stored", [
    # Milliseconds since 1970, as some ORMs store them.
    "1796846192844",
    # ISO text with a T and a Z: 'T' sorts after ' ', so text comparison breaks.
    "'2026-12-04T09:59:00.000Z'",
])
def test_sqlite_timestamps_in_another_format_refused(tmp_path: Path, cli, stored: str) -> None:
    import sqlite3

    database = tmp_path / "backend.db"
    url = f"sqlite:///{database}"
    assert cli("db", "upgrade", env={"DATABASE_URL": url}).exit_code == 0
    with sqlite3.connect(database) as connection:
        connection.execute(
            "INSERT INTO vouchers (code, type, expiry_date) "
            f"VALUES ('V1', 'FIXED', {stored})")
    for arguments in (["run", "voucher-expired"], ["db", "upgrade"]):
        result = cli(*arguments, env={"DATABASE_URL": url})
        assert result.exit_code == 4, result.stderr
        assert "vouchers.expiry_date contains" in result.stderr
        assert "'2026-12-04 10:00:00.000000'" in result.stderr
    with sqlite3.connect(database) as connection:
        assert connection.execute("SELECT count(*) FROM voucher_audit_logs").fetchone() == (0,)
        assert connection.execute("SELECT count(*) FROM voucher_jobs_runs").fetchone() == (0,)

"""The benchmark suite's smoke preset on SQLite and PostgreSQL.

Not a timing test: it checks that every step of the suite runs and that the
report has every section and every figure, so that a full run on a quiet
machine does not fail after an hour.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from benchmarks.datasets import (
    EXPIRY_SPREAD_DAYS,
    NEWEST_AUDIT_AGE_SECONDS,
    RETENTION_DAYS,
    ArchivalCase,
    ExpiryCase,
    fill_audit_rows,
    fill_vouchers,
)
from benchmarks.report import PATH_PLACEHOLDER, Report, RunInfo
from benchmarks.results import IDLE, JOB, RERUN, SEED, SINGLE, Measurement
from benchmarks.targets import MET, MISSED, NOT_MEASURED, evaluate
from benchmarks.writer import WriterStats
from tests.conftest import DEFAULT_POSTGRES_URL, T0, Database
from voucher_jobs.data.schema import voucher_audit_logs, vouchers

ROOT = Path(__file__).resolve().parents[1]

SECTIONS = [
    "# Benchmarks",
    "## Machine and versions",
    "## Targets",
    "## voucher-expired on SQLite",
    "## audit-archival on SQLite",
    "## voucher-expired on PostgreSQL",
    "## audit-archival on PostgreSQL",
    "## Partition retirement on PostgreSQL",
    "## Data sets",
    "## Method",
]
MACHINE_ITEMS = ["CPU", "cores", "memory", "kernel", "disk (SQLite files)", "Python", "SQLite",
                 "psycopg", "PostgreSQL server", "PostgreSQL settings"]
TARGETS = [
    "voucher-expired time ÷ single statement",
    "seed algorithm time ÷ voucher-expired time",
    "voucher-expired with nothing to do",
    "audit-archival rows/s ÷ single statement rows/s",
    "audit-archival longest batch",
    "writer p99 during audit-archival ÷ writer p99 on the idle database",
    "retirement of a whole partition",
    "peak RSS of a job process",
    "peak RSS flat",
    "SQLite writer errors",
]
# The targets that only PostgreSQL with append-ordered data judges.
CASE_TARGETS = TARGETS[:6]
# Cells that have no figure by design: nothing to rerun or batch once every
# voucher is logged, and no archive file outside archive-file mode.
EMPTY_BY_DESIGN = {
    ("logged", "100%"): {"rerun s", "median batch ms", "longest batch ms"},
    ("mode", "delete"): {"single archive MiB", "job archive MiB"},
    ("mode", "archive-table"): {"single archive MiB", "job archive MiB"},
}


def tables_by_section(text: str) -> dict[str, list[list[dict[str, str]]]]:
    """Parse the report's Markdown tables, as lists of rows, under their section titles."""
    sections: dict[str, list[list[dict[str, str]]]] = {}
    section = ""
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        if line.startswith("#"):
            section = line
            sections.setdefault(section, [])
        separator = lines[index + 1] if index + 1 < len(lines) else ""
        if line.startswith("| ") and separator and set(separator) <= set("|-: "):
            header = _cells(line)
            rows = []
            index += 2
            while index < len(lines) and lines[index].startswith("|"):
                rows.append(dict(zip(header, _cells(lines[index]))))
                index += 1
            sections[section].append(rows)
            continue
        index += 1
    return sections


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def missing_figures(rows: list[dict[str, str]]) -> list[str]:
    """List the cells without a figure, except those empty by design."""
    missing = []
    for row in rows:
        allowed: set[str] = set()
        for (column, value), columns in EMPTY_BY_DESIGN.items():
            if row.get(column) == value:
                allowed |= columns
        for column, cell in row.items():
            if column not in allowed and cell in ("", "-", "failed", "no figure"):
                missing.append(f"{column} in {row}")
    return missing


def run_smoke_preset(tmp_path: Path) -> tuple[str, str]:
    """Run the smoke preset on both backends; return the report and the printed output."""
    admin_url = os.environ.get("VOUCHER_JOBS_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)
    output = tmp_path / "benchmarks.md"
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.suite", "--preset", "smoke",
         "--backends", "sqlite,postgresql", "--admin-url", admin_url,
         "--work-dir", str(tmp_path / "work"), "--output", str(output)],
        cwd=ROOT, capture_output=True, text=True, timeout=280,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return output.read_text(), completed.stdout


@pytest.mark.slow
def test_smoke_preset_report(postgres_url: str, tmp_path: Path) -> None:
    # postgres_url skips this test when PostgreSQL is unreachable on a
    # developer machine, and fails it in CI.
    report, stdout = run_smoke_preset(tmp_path)
    sections = tables_by_section(report)

    for title in SECTIONS:
        assert title in sections, f"section {title!r} is missing"
    assert "## Failed steps" not in sections
    header = {row["item"]: row["value"] for row in sections["# Benchmarks"][0]}
    assert header["status"] == "complete"
    assert header["command"].startswith("`python3 dev.py bench --preset smoke")
    assert re.match(r"[0-9a-f]{7,}", header["commit"])

    machine = {row["item"]: row["value"] for row in sections["## Machine and versions"][0]}
    for item in MACHINE_ITEMS:
        assert machine.get(item, "-") not in ("", "-", "unknown"), f"{item} is missing"
    assert "autovacuum=" in machine["PostgreSQL settings"]
    packages = {row["package"]: row for row in sections["## Machine and versions"][1]}
    assert re.fullmatch(r"\d+(\.\d+)+", packages["sqlalchemy"]["requirements.lock"])
    assert re.fullmatch(r"\d+(\.\d+)+", packages["psycopg"]["requirements.lock"])

    target_rows = sections["## Targets"][0]
    assert len(target_rows) == len(TARGETS)
    for name, row in zip(TARGETS, target_rows):
        assert row["target"].startswith(name)
        if name in CASE_TARGETS:
            # The smoke preset runs the shuffled layout only, so nothing
            # judges the targets defined for append-ordered data.
            assert row["result"] == "not measured", row
            assert row["where"] == "-", row
            continue
        if name.startswith("peak RSS flat"):
            # The smoke preset has one size per job and mode: nothing to compare.
            assert row["result"] == "not measured", row
            continue
        assert row["result"] in ("met", "MISSED"), row
        assert row["worst measured"] not in ("-", "no figure"), row

    reported = sections["### Same figures, reported for the other cases"][0]
    assert len(reported) == len(CASE_TARGETS)
    for name, row in zip(CASE_TARGETS, reported):
        assert row["target"].startswith(name)
        assert row["SQLite, append"] == "not measured", row
        for column in ("PostgreSQL, shuffled", "SQLite, shuffled"):
            assert re.fullmatch(r"[\d,.]+ ?(x|s|ms) \((within|outside)\)", row[column]), row

    summary = [line for line in report.splitlines() if line.startswith("- ")]
    assert summary[0] == ("- On PostgreSQL with append-ordered data, the run measured "
                          "none of the 6 job targets.")
    assert summary[1].startswith("- Over every case, ")
    assert summary[2].startswith("- On SQLite, ")
    assert summary[3].startswith("- On a partitioned audit table, the partition target is ")
    assert summary[4].startswith("- Reported, not judged: ")
    assert "SQLite with append-ordered data" in summary[4]

    partitions = sections["## Partition retirement on PostgreSQL"][0]
    assert [row["mode"] for row in partitions] == ["delete", "archive-table", "archive-file"]
    for row in partitions:
        assert row["partition rows"] == "1,000"
        for column in ("detach transaction ms", "DROP ms", "detach + DROP ms", "run s"):
            assert re.fullmatch(r"[\d,.]+", row[column]), row

    assert str(tmp_path) not in report
    assert str(ROOT) not in report
    assert sys.executable not in report
    assert f"--work-dir {PATH_PLACEHOLDER}" in header["command"]

    for backend in ("SQLite", "PostgreSQL"):
        expiry = sections[f"## voucher-expired on {backend}"]
        archival = sections[f"## audit-archival on {backend}"]
        # The smoke preset runs the shuffled layout only, so there is one row
        # per logged share (0% and 100%) and one per archival mode.
        assert [len(rows) for rows in expiry] == [2, 2]
        assert [len(rows) for rows in archival] == [3, 3, 3]
        for rows in expiry + archival:
            assert missing_figures(rows) == []
        for row in archival[0]:
            assert row["rows removed"] == "2,001"

    dataset_rows = sections["## Data sets"][0]
    # Per backend: the vouchers, the vouchers all logged, the audit rows.
    assert len(dataset_rows) == 2 * 3
    assert missing_figures(dataset_rows) == []

    printed = [line for line in stdout.splitlines()
               if re.match(r"^(sqlite|postgresql), shuffled, ", line)]
    measured = [line for line in printed if "÷" not in line]
    ratios = [line for line in printed if "÷" in line]
    # Per backend, voucher-expired has 7 steps: seed algorithm, single
    # statement and job at 0% and at 100% logged, and one rerun.
    # audit-archival has 7 too: the idle writer, then single statement and
    # job in 3 modes.
    assert len(measured) == 2 * (7 + 7)
    assert [line for line in measured if "FAILED" in line] == []
    # Each job but the reruns gets its ratios: 2 voucher-expired and 3 audit-archival.
    assert len(ratios) == 2 * (2 + 3)
    assert all(re.search(r"\d+x", line) for line in ratios)
    assert sum("extrapolated from" in line for line in measured) == 2 * 2
    assert sum("writer p50/p99" in line for line in measured) == 2 * 7
    assert "## Targets" in stdout


def writer_stats(p99_ms: float) -> WriterStats:
    return WriterStats(inserts=100, p50_ms=1.0, p99_ms=p99_ms, max_ms=p99_ms, locked=0,
                       other_errors=0)


def expiry_steps(backend: str, layout: str, job_seconds: float) -> list[Measurement]:
    """Return the voucher-expired steps of one case, whose single statement takes 1 s."""
    expired = ExpiryCase(layout, 1_000, 25, 0)
    logged = ExpiryCase(layout, 1_000, 25, 100)
    return [
        Measurement(backend, expired, SEED, rows=250, seconds=500.0),
        Measurement(backend, expired, SINGLE, rows=250, seconds=1.0),
        Measurement(backend, expired, JOB, rows=250, seconds=job_seconds, peak_rss_mib=60.0),
        Measurement(backend, expired, RERUN, rows=0, seconds=0.01, peak_rss_mib=60.0),
        Measurement(backend, logged, JOB, rows=0, seconds=0.02, peak_rss_mib=60.0),
    ]


def archival_steps(backend: str, layout: str, job_seconds: float,
                   longest_batch_ms: float = 50.0) -> list[Measurement]:
    """Return the audit-archival steps of one case, whose single statement takes 1 s."""
    case = ArchivalCase(layout, 10_000, 40)
    return [
        Measurement(backend, case, IDLE, writer=writer_stats(2.0)),
        Measurement(backend, case, SINGLE, "delete", rows=4_000, seconds=1.0,
                    writer=writer_stats(2.0)),
        Measurement(backend, case, JOB, "delete", rows=4_000, seconds=job_seconds,
                    longest_batch_ms=longest_batch_ms, peak_rss_mib=70.0,
                    writer=writer_stats(2.0)),
    ]


def test_targets_judged_on_postgresql_append() -> None:
    # The shuffled layout and SQLite are slower, which must not judge the targets.
    measurements = [
        *expiry_steps("postgresql", "append", job_seconds=1.1),
        *archival_steps("postgresql", "append", job_seconds=1.0),
        *expiry_steps("postgresql", "shuffled", job_seconds=3.0),
        *archival_steps("postgresql", "shuffled", job_seconds=4.0),
        *archival_steps("sqlite", "append", job_seconds=5.0),
    ]
    evaluation = evaluate(measurements)

    assert [t.status for t in evaluation.case_targets] == [MET] * 6
    for target in evaluation.case_targets:
        assert target.where.startswith("postgresql, append, "), target
    shuffled = evaluation.reported[("postgresql", "shuffled")]
    assert (shuffled[0].worst, shuffled[0].status) == ("3.00x", MISSED)
    assert (shuffled[3].worst, shuffled[3].status) == ("0.25x", MISSED)
    sqlite_append = evaluation.reported[("sqlite", "append")]
    assert sqlite_append[0].status == NOT_MEASURED
    assert (sqlite_append[3].worst, sqlite_append[3].status) == ("0.20x", MISSED)
    assert [t.status for t in evaluation.reported[("sqlite", "shuffled")]] == [NOT_MEASURED] * 6
    # Peak RSS stays judged over every case.
    assert evaluation.memory_targets[0].status == MET
    assert evaluation.memory_targets[0].worst == "70.0 MiB"


def test_targets_without_postgresql_append() -> None:
    measurements = [
        *expiry_steps("postgresql", "shuffled", job_seconds=1.0),
        *archival_steps("sqlite", "append", job_seconds=1.0),
    ]
    evaluation = evaluate(measurements)

    for target in evaluation.case_targets:
        assert target.status == NOT_MEASURED, target
        assert target.where == "-", target
    assert evaluation.reported[("postgresql", "shuffled")][0].status == MET
    assert evaluation.memory_targets[0].status == MET
    assert evaluation.sqlite_targets[0].status == MET


def test_report_targets_summary_and_paths() -> None:
    measurements = [
        *expiry_steps("postgresql", "append", job_seconds=1.1),
        *archival_steps("postgresql", "append", job_seconds=1.0, longest_batch_ms=250.0),
        *expiry_steps("postgresql", "shuffled", job_seconds=3.0),
        *archival_steps("postgresql", "shuffled", job_seconds=1.0),
    ]
    command = ("python3 dev.py bench --work-dir /tmp/bench-folder/work --output "
               "/work/checkout/report.md --admin-url postgresql://me:hidden-word@127.0.0.1/db")
    run = RunInfo(command=command, started="2026-01-01T00:00:00+00:00",
                  options=[("extra job arguments", "--archive-dir /home/me/archives")])
    report = Report(run, [], measurements, evaluate(measurements), method="").render()

    summary = [line for line in report.splitlines() if line.startswith("- ")]
    assert summary == [
        "- On PostgreSQL with append-ordered data, 5 of 6 job targets are met. Missed: "
        "audit-archival longest batch (250.0 ms).",
        "- Over every case, 1 of 2 peak RSS targets is met. Not measured: peak RSS flat from the "
        "smallest to the largest data set, per backend, job and mode.",
        "- On SQLite, the \"database is locked\" target is not measured.",
        "- On a partitioned audit table, the partition target is not measured.",
        "- Reported, not judged: 5 of 6 figures are within the limits on PostgreSQL with "
        "shuffled data. The run did not measure SQLite with append-ordered data and "
        "SQLite with shuffled data.",
    ]
    sections = tables_by_section(report)
    judged = sections["## Targets"][0]
    assert judged[4]["result"] == "MISSED"
    assert judged[4]["where"].startswith("postgresql, append, ")
    reported = sections["### Same figures, reported for the other cases"][0]
    assert reported[0]["PostgreSQL, shuffled"] == "3.00x (outside)"
    assert reported[4]["PostgreSQL, shuffled"] == "50.0 ms (within)"
    assert reported[4]["SQLite, append"] == "not measured"

    for local in ("/tmp/bench-folder", "/work/checkout", "/home/me", "hidden-word"):
        assert local not in report
    header = {row["item"]: row["value"] for row in sections["# Benchmarks"][0]}
    assert header["command"] == (
        f"`python3 dev.py bench --work-dir {PATH_PLACEHOLDER} --output {PATH_PLACEHOLDER} "
        "--admin-url postgresql://me:***@127.0.0.1/db`")
    assert header["extra job arguments"] == f"--archive-dir {PATH_PLACEHOLDER}"


@pytest.mark.parametrize("layout", ["append", "shuffled"])
def test_dataset_layouts(db: Database, layout: str) -> None:
    count = 1_000
    # Chunks of 300 rows check that chunks continue each other.
    fill_vouchers(db.engine, ExpiryCase(layout, count, 25, 0), T0, chunk_rows=300)
    fill_audit_rows(db.engine, count, 40, layout, T0, chunk_rows=300, vouchers=count)
    voucher_rows = db.rows(select(vouchers.c.expiry_date, vouchers.c.deleted_at)
                           .order_by(vouchers.c.id))
    audit_times = db.rows(select(voucher_audit_logs.c.created_at)
                          .order_by(voucher_audit_logs.c.id))
    expiries = [row.expiry_date for row in voucher_rows]
    created = [row.created_at for row in audit_times]

    # Both layouts contain the same times, and only their order over the ids differs.
    spread = EXPIRY_SPREAD_DAYS * 86_400
    assert sorted(expiries) == [
        T0 + timedelta(seconds=position * spread // count - spread // 4)
        for position in range(count)]
    span = RETENTION_DAYS * 86_400 * 100 // 60
    assert sorted(created) == [
        T0 + timedelta(seconds=position * span // count - span - NEWEST_AUDIT_AGE_SECONDS)
        for position in range(count)]
    descents = sum(later < earlier for earlier, later in zip(created, created[1:]))
    if layout == "append":
        assert expiries == sorted(expiries)
        assert descents == 0
    else:
        assert descents > count // 4

    # Positions 0 to 250 of 1000 lie at or before T0; every 20th voucher is deleted.
    assert sum(expiry <= T0 for expiry in expiries) == 251
    assert sum(row.deleted_at is not None for row in voucher_rows) == count // 20
    # Positions 0 to 400 of 1000 are older than the retention.
    cutoff = T0 - timedelta(days=RETENTION_DAYS)
    assert sum(moment < cutoff for moment in created) == 401


def test_partition_target_judges_the_slowest_retirement() -> None:
    from benchmarks.results import PartitionRun
    from benchmarks.targets import evaluate

    quick = PartitionRun("delete", 10_000, detach_ms=3.0, drop_ms=4.0, run_seconds=0.1)
    slow = PartitionRun("archive-file", 1_000_000, detach_ms=5.0, drop_ms=55.0, run_seconds=4.0)
    [target] = evaluate([], [quick, slow]).partition_targets
    assert (target.worst, target.status) == ("60.0 ms", "missed")
    assert target.where == "postgresql, partition of 1,000,000 rows, archive-file"

    [target] = evaluate([], [quick]).partition_targets
    assert (target.worst, target.status) == ("7.0 ms", "met")

    failed = PartitionRun("archive-table", 10_000, error="OperationalError: gone")
    [target] = evaluate([], [quick, failed]).partition_targets
    assert (target.worst, target.status) == ("no figure", "missed")

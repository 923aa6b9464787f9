"""voucher-jobs' own jobs, run as the real CLI in a child process and measured.

Each run is `voucher-jobs -v run JOB ... --json`. The run record that
`--json` prints gives the rows and the run's own duration. The batch times
come from the record too, or from the `-v` log when the record has none.
Peak RSS is the child's own VmHWM, which
benchmarks/measured_cli.py writes when the child exits.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks.backends import Database

# With -v a job logs a line when its batches start and one per batch, such
# as `2026-12-04T10:00:00.123Z DEBUG voucher_jobs.jobs.audit_archival
# archival_batch run_id=3 batch=1 rows=1000 ...`. Newer versions add the
# batch's own duration as `ms=12.5`.
_STARTED_LINE = re.compile(r"^(\S+Z) INFO \S+ (expiry_started|archival_started)\b")
_BATCH_LINE = re.compile(r"^(\S+Z) DEBUG \S+ (expiry_batch|archival_batch)\b(.*)$")
_MS_FIELD = re.compile(r"\bms=([0-9.]+)\b")


@dataclass
class JobRun:
    """The figures of one child process run of a job."""

    exit_code: int
    wall_seconds: float
    peak_rss_mib: float
    rows: int | None = None
    job_seconds: float | None = None
    batches: int | None = None
    longest_batch_ms: float | None = None
    median_batch_ms: float | None = None
    details: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    # Unix times at which the run started and finished, from its run record.
    window: tuple[float, float] | None = None


def run_job(
    database: Database, arguments: list[str], work_dir: Path, name: str,
    timeout_seconds: float,
) -> JobRun:
    """Run `voucher-jobs -v ARGUMENTS --json` on database and measure it.

    The child gets no VOUCHER_* variables of this process, and runs in
    work_dir, so no .env file of the checkout changes its settings.
    """
    out_path = work_dir / f"{name}.json"
    log_path = work_dir / f"{name}.log"
    environment = {
        key: value for key, value in os.environ.items()
        if not key.startswith("VOUCHER_") and key != "DATABASE_URL"
    }
    environment["DATABASE_URL"] = database.url
    peak_path = work_dir / f"{name}.peak-kib"
    peak_path.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).with_name("measured_cli.py")), str(peak_path),
               "-v", *arguments, "--json"]
    with open(out_path, "wb") as out, open(log_path, "wb") as log:
        started = time.monotonic()
        child = subprocess.Popen(command, env=environment, cwd=work_dir,
                                 stdin=subprocess.DEVNULL, stdout=out, stderr=log)
        timer = threading.Timer(timeout_seconds, child.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(child.pid, 0)
        finally:
            timer.cancel()
        wall_seconds = time.monotonic() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    # The child's own VmHWM; ru_maxrss includes this process's memory from
    # before the child's exec (see measured_cli).
    peak_kib = int(peak_path.read_text()) if peak_path.exists() else usage.ru_maxrss
    run = JobRun(child.returncode, wall_seconds, peak_kib / 1024)
    if child.returncode != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-12:]
        run.error = (f"exit code {child.returncode} after {wall_seconds:.1f} s"
                     + (" (killed at the step timeout)" if wall_seconds >= timeout_seconds else "")
                     + ": " + " | ".join(line for line in tail if line.strip())[-1500:])
        return run

    record = json.loads(out_path.read_text())
    result = record.get("result") or {}
    run.details = result
    run.rows = record.get("rows_affected")
    run.job_seconds = result.get("seconds")
    run.batches = result.get("batches")
    if record.get("started_at") and record.get("finished_at"):
        run.window = (datetime.fromisoformat(record["started_at"]).timestamp(),
                      datetime.fromisoformat(record["finished_at"]).timestamp())
    logged = batch_durations_ms(log_path)
    if logged:
        run.median_batch_ms = statistics.median(logged)
        run.longest_batch_ms = max(logged)
    if result.get("longest_batch_ms") is not None:
        run.longest_batch_ms = float(result["longest_batch_ms"])
    return run


def batch_durations_ms(log_path: Path) -> list[float]:
    """Return each batch's duration in ms from the job's -v log.

    A batch line's `ms=` field is the batch's own time. Without it, a batch
    lasts from the previous batch line (or the job's started line, logged
    after its count query) to its own line, with the millisecond resolution
    of the log, which includes the progress and heartbeat work between
    batches.
    """
    own: list[float] = []
    moments: list[float] = []
    for line in log_path.read_text(errors="replace").splitlines():
        batch = _BATCH_LINE.match(line)
        if batch:
            field_ms = _MS_FIELD.search(batch.group(3))
            if field_ms:
                own.append(float(field_ms.group(1)))
            moments.append(datetime.fromisoformat(batch.group(1)).timestamp())
            continue
        started = _STARTED_LINE.match(line)
        if started:
            moments.append(datetime.fromisoformat(started.group(1)).timestamp())
    if own:
        return own
    return [(later - earlier) * 1000 for earlier, later in zip(moments, moments[1:])]

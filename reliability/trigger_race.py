"""Eight triggers of one job released at the same moment: one run, seven refusals.

Each round starts, for one job on a fresh database:

- 3 `voucher-jobs run JOB` processes,
- 2 `voucher-jobs scheduler` processes whose schedule fires once a day, at
  the minute in which the round was set up. At start-up each finds that fire
  time missed within the lateness limit, so both start a catch-up run.
- 3 `POST /jobs/JOB/runs` requests to one `voucher-jobs serve` process on
  127.0.0.1.

The CLI and scheduler processes are started through this module's launcher
(`python -m reliability.trigger_race BARRIER_DIR KIND ARGS`). The launcher
imports the CLI, reports ready and waits for the file `go-KIND` in
BARRIER_DIR, then runs `voucher-jobs ARGS` in the same process. The driver
creates `go-cli` and `go-scheduler` and sends the three requests at the same
moment.

Released together, a CLI run or an HTTP request reached the lock first in
most of the driver's rounds: a scheduler does more before it tries the
lock, such as reading the ledger to find the missed fire time. So a round
may release the schedulers first instead, and the CLI runs and requests
once a scheduler has recorded its run. The other six triggers then race
against a scheduler run, and their refusals must name it.

Every run uses batches of BATCH_SIZE rows with a BATCH_PAUSE pause, so the
winner works for several seconds, far longer than the triggers take to reach
the job lock. The round then checks that exactly one run did the work and
that the data is right. Every other trigger must have been refused with the
winner's run id. The CLI shows it as exit code 3 with "already running (run
N)", the HTTP API as a 409 response with `active_run_id`, and the scheduler
as a `fire_time_skipped` log line with `active_run_id`.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import select

from reliability.invariants import (
    RETENTION_DAYS,
    Tally,
    check_archival,
    check_expiry_complete,
    seed_audit_rows,
    seed_vouchers,
    snapshot,
)
from tests.conftest import Database
from tests.http_support import free_port
from tests.processes import ROOT
from voucher_jobs.data import ledger
from voucher_jobs.data.schema import runs

JOBS = ("voucher-expired", "audit-archival")
CLI_TRIGGERS = 3
SCHEDULER_TRIGGERS = 2
HTTP_TRIGGERS = 3
TRIGGERS = CLI_TRIGGERS + SCHEDULER_TRIGGERS + HTTP_TRIGGERS
# 1,000 rows in batches of 10 with a 0.05 s pause: the winning run takes at
# least 5 s. The driver prints how far apart the triggers' ledger rows are,
# about a second at most on 2 busy CPUs.
ROWS = 1000
BATCH_SIZE = "10"
BATCH_PAUSE = "0.05"
ARCHIVE_FILE_ROWS = "250"
API_TOKEN = "race-suite-token-0123456789"
# The catch-up at scheduler start-up accepts fire times up to this old. The
# round's fire time is at most about a minute old when the schedulers start.
LATENESS_SECONDS = "600"
START_TIMEOUT = 60.0
RUN_TIMEOUT = 120.0
BARRIER_POLL_SECONDS = 0.002

_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')
_ACTIVE_IN_MESSAGE = re.compile(r"already running \(run (\d+)\)")


@dataclass
class Outcome:
    """One trigger's result: the run it started, or the active run that its refusal named."""

    trigger: str
    started_run_id: int | None = None
    named_run_id: int | None = None
    refused: bool = False
    detail: str = ""
    # How a scheduler refusal happened, for the figures.
    reason: str = ""


def race_env(db: Database, job: str, mode: str, fire_time: datetime) -> dict[str, str]:
    """Return the environment of every process of a round: same batches, schedule and mode."""
    other = next(name for name in JOBS if name != job)
    schedule = f"{fire_time.minute} {fire_time.hour} * * *"
    return with_repository_path(db.env(
        VOUCHER_JOBS_BATCH_SIZE=BATCH_SIZE,
        VOUCHER_JOBS_BATCH_PAUSE_SECONDS=BATCH_PAUSE,
        VOUCHER_JOBS_BATCH_TARGET_MS="0",
        # No retries, so that a transient error shows as a failed run.
        VOUCHER_JOBS_RETRY_ATTEMPTS="0",
        VOUCHER_JOBS_ARCHIVE_MODE=mode,
        VOUCHER_JOBS_ARCHIVE_DIR=str(db.workdir / "archive"),
        VOUCHER_JOBS_ARCHIVE_FILE_ROWS=ARCHIVE_FILE_ROWS,
        VOUCHER_AUDIT_RETENTION_DAYS=str(RETENTION_DAYS),
        VOUCHER_JOBS_API_TOKEN=API_TOKEN,
        VOUCHER_JOBS_SCHEDULE_TIMEZONE="UTC",
        VOUCHER_JOBS_CATCHUP_MAX_LATENESS_SECONDS=LATENESS_SECONDS,
        **{f"VOUCHER_JOBS_{job.upper().replace('-', '_')}_SCHEDULE": schedule,
           f"VOUCHER_JOBS_{other.upper().replace('-', '_')}_ENABLED": "false"},
    ))


def seed(db: Database, job: str) -> dict[int, tuple[Any, ...]]:
    """Fill the database for job and return the audit rows before the round.

    The snapshot is empty for voucher-expired. The runs use the database
    clock, which is later than the suite's fixed reference time T0. The
    seeded vouchers all expire by T0 plus ten minutes. The old audit rows are
    older than the cutoff at T0, and the new ones are an hour newer than the
    cutoff at the current time.
    """
    if job == "voucher-expired":
        seed_vouchers(db, ROWS)
        return {}
    seed_audit_rows(db, old=ROWS, new=0)
    newest_cutoff = datetime.now(timezone.utc) - timedelta(days=RETENTION_DAYS)
    db.add_audit_rows([newest_cutoff + timedelta(hours=1, seconds=i) for i in range(50)])
    return snapshot(db)


def _start(arguments: list[str], env: dict[str, str], cwd: Path,
           log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as output:
        return subprocess.Popen(arguments, env=env, cwd=cwd, stdout=output,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _launcher(barrier: Path, kind: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "reliability.trigger_race", str(barrier), kind, *args]


def with_repository_path(env: dict[str, str]) -> dict[str, str]:
    """Return env with this checkout on PYTHONPATH, so that `-m reliability.…` works anywhere."""
    paths = [str(ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    return {**env, "PYTHONPATH": os.pathsep.join(paths)}


def _wait_ready(barrier: Path, processes: list[subprocess.Popen[bytes]], port: int,
                logs: list[Path]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    expected = {f"ready-{process.pid}" for process in processes}
    while True:
        for process, log in zip(processes, logs):
            if process.poll() is not None:
                raise RuntimeError(f"process {process.pid} exited with {process.returncode} "
                                   f"before the start:\n{log.read_text()[-2000:]}")
        ready = {path.name for path in barrier.glob("ready-*")}
        if expected <= ready and _healthy(port):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the triggers were not ready within {START_TIMEOUT} s")
        time.sleep(0.05)


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _post_runs(port: int, job: str, go: threading.Event, outcomes: list[Outcome]) -> None:
    with httpx.Client(base_url=f"http://127.0.0.1:{port}",
                      headers={"Authorization": f"Bearer {API_TOKEN}"}, timeout=30) as client:
        client.get("/healthz")  # opens the connection before the start
        go.wait()
        try:
            response = client.post(f"/jobs/{job}/runs", json={})
        except httpx.HTTPError as exc:
            outcomes.append(Outcome("http", detail=f"request failed: {exc!r}"))
            return
    try:
        body = response.json()
    except ValueError:
        body = {}
    if response.status_code == 202:
        outcomes.append(Outcome("http", started_run_id=body["run_id"], detail="202"))
    elif response.status_code == 409:
        outcomes.append(Outcome("http", named_run_id=body.get("active_run_id"), refused=True,
                                detail=f"409 skipped_run_id={body.get('skipped_run_id')}"))
    else:
        outcomes.append(Outcome("http", detail=f"{response.status_code} {response.text[:300]}"))


def _cli_outcome(process: subprocess.Popen[bytes], log: Path) -> Outcome:
    output = log.read_text()
    if process.returncode == 0:
        match = re.search(r": run (\d+) succeeded", output)
        return Outcome("cli", started_run_id=int(match[1]) if match else None,
                       detail="exit 0")
    if process.returncode == 3:
        match = _ACTIVE_IN_MESSAGE.search(output)
        return Outcome("cli", named_run_id=int(match[1]) if match else None,
                       refused="skipped:" in output, detail="exit 3")
    return Outcome("cli", detail=f"exit {process.returncode}: {output.strip()[-300:]}")


def log_events(text: str, event: str) -> list[dict[str, str]]:
    """Return the fields of every `event` line in a voucher-jobs log."""
    found = []
    for line in text.splitlines():
        parts = line.split(" ", 4)
        if len(parts) >= 4 and parts[3] == event:
            found.append({key: value.strip('"') for key, value
                          in _FIELD.findall(parts[4] if len(parts) > 4 else "")})
    return found


def _scheduler_outcome(log: Path) -> Outcome:
    text = log.read_text()
    started = [fields for fields in log_events(text, "run_started")
               if fields.get("trigger") == "scheduler"]
    skipped = log_events(text, "fire_time_skipped")
    if started and not skipped:
        return Outcome("scheduler", started_run_id=int(started[0]["run_id"]),
                       detail="run_started")
    if skipped and not started:
        fields = skipped[0]
        named = fields.get("active_run_id")
        # A catch-up that found the fire time recorded logs its cause;
        # a start refused by the runner does not.
        reason = fields.get("reason", "") + (" at the catch-up check" if "cause" in fields
                                             else "")
        return Outcome("scheduler", refused=True,
                       named_run_id=int(named) if named and named.isdigit() else None,
                       detail=f"fire_time_skipped reason={fields.get('reason')}", reason=reason)
    return Outcome("scheduler", detail=f"{len(started)} run_started and {len(skipped)} "
                   f"fire_time_skipped lines:\n{text.strip()[-1500:]}")


def _stop(process: subprocess.Popen[bytes], tally: Tally, label: str) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        tally.violations.append(f"{label}: process {process.pid} ignored SIGTERM for 60 s")
        return
    tally.expect(process.returncode == 0,
                 f"{label}: process {process.pid} exited with {process.returncode} on SIGTERM")


def _wait_for_scheduler_run(db: Database, job: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    query = select(runs.c.id).where(runs.c.job == job, runs.c.trigger == "scheduler")
    while not db.rows(query) and time.monotonic() < deadline:
        time.sleep(0.01)


def _wait_for_winner(db: Database, job: str) -> bool:
    """Wait until a run of job has finished and none is running. Return False on timeout."""
    deadline = time.monotonic() + RUN_TIMEOUT
    while time.monotonic() < deadline:
        rows = db.rows(select(runs.c.status).where(runs.c.job == job))
        statuses = [row.status for row in rows]
        if statuses and ledger.RUNNING not in statuses and any(
                status != ledger.SKIPPED for status in statuses):
            return True
        time.sleep(0.1)
    return False


def race_round(db: Database, job: str, mode: str = "delete", *,
               schedulers_first: bool = False) -> Tally:
    """Release the eight triggers of one job and check the outcome.

    All start together, unless schedulers_first releases the two schedulers
    first and the others once a scheduler has recorded its run.
    """
    tally = Tally()
    label = f"{db.backend}/{job}" + (f"/{mode}" if job == "audit-archival" else "")
    before = seed(db, job)
    barrier = db.workdir / "barrier"
    barrier.mkdir()
    env = race_env(db, job, mode, datetime.now(timezone.utc))
    port = free_port()
    server_log = db.workdir / "serve.log"
    server = _start([sys.executable, "-m", "voucher_jobs", "serve", "--host", "127.0.0.1",
                     "--port", str(port)], env, db.workdir, server_log)
    cli_logs = [db.workdir / f"cli-{i}.log" for i in range(CLI_TRIGGERS)]
    scheduler_logs = [db.workdir / f"scheduler-{i}.log" for i in range(SCHEDULER_TRIGGERS)]
    clis = [_start(_launcher(barrier, "cli", "run", job), env, db.workdir, log)
            for log in cli_logs]
    schedulers = [_start(_launcher(barrier, "scheduler", "scheduler"), env, db.workdir, log)
                  for log in scheduler_logs]
    go = threading.Event()
    http_outcomes: list[Outcome] = []
    posts = [threading.Thread(target=_post_runs, args=(port, job, go, http_outcomes))
             for _ in range(HTTP_TRIGGERS)]
    try:
        _wait_ready(barrier, clis + schedulers, port, cli_logs + scheduler_logs)
        for post in posts:
            post.start()
        time.sleep(0.2)  # the request threads connect and wait on `go`
        (barrier / "go-scheduler").touch()
        if schedulers_first:
            _wait_for_scheduler_run(db, job)
        (barrier / "go-cli").touch()
        go.set()
        for process in clis:
            process.wait(RUN_TIMEOUT)
        for post in posts:
            post.join(RUN_TIMEOUT)
        tally.expect(_wait_for_winner(db, job),
                     f"{label}: no run finished within {RUN_TIMEOUT} s")
    finally:
        go.set()
        for process in schedulers:
            _stop(process, tally, f"{label} scheduler")
        _stop(server, tally, f"{label} serve")
        for process in clis:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    outcomes = [_cli_outcome(process, log) for process, log in zip(clis, cli_logs)]
    outcomes += [_scheduler_outcome(log) for log in scheduler_logs]
    outcomes += http_outcomes
    check_round(db, job, outcomes, tally, label)
    if job == "voucher-expired":
        check_expiry_complete(db, tally, reference=datetime.now(timezone.utc))
    else:
        check_archival(db, mode, before, db.workdir / "archive", tally, complete=True)
    return tally


def check_round(db: Database, job: str, outcomes: list[Outcome], tally: Tally,
                label: str) -> None:
    """Check the ledger and each trigger's outcome, and add the round's figures to tally."""
    rows = db.rows(select(runs).where(runs.c.job == job).order_by(runs.c.id))
    started = [row for row in rows if row.status != ledger.SKIPPED]
    worked = [row for row in rows if row.rows_affected > 0]
    tally.counts["triggers started"] += len(outcomes)
    tally.counts["runs that did work"] += len(worked)
    tally.expect(len(outcomes) == TRIGGERS,
                 f"{label}: {len(outcomes)} of {TRIGGERS} triggers reported an outcome")
    tally.expect(len(worked) == 1, f"{label}: {len(worked)} runs did work: "
                 f"{[(row.id, row.trigger, row.rows_affected) for row in worked]}")
    tally.expect(len(started) == 1, f"{label}: {len(started)} runs started: "
                 f"{[(row.id, row.trigger, row.status) for row in started]}")
    if not started:
        return
    winner = started[0]
    tally.counts[f"won by {winner.trigger}"] += 1
    # How far apart the triggers that reached the ledger recorded their rows.
    moments = [row.started_at for row in rows]
    tally.counts["ledger spread ms"] += round(
        (max(moments) - min(moments)).total_seconds() * 1000)
    tally.expect(winner.status == ledger.SUCCEEDED,
                 f"{label}: run {winner.id} ended {winner.status}: {winner.error}")
    blocked_elsewhere = [row.id for row in rows
                         if row.status == ledger.SKIPPED and row.blocked_by_run_id != winner.id]
    tally.expect(not blocked_elsewhere,
                 f"{label}: skipped runs {blocked_elsewhere} do not name run {winner.id}")

    winners = [outcome for outcome in outcomes if outcome.started_run_id is not None]
    tally.expect([outcome.started_run_id for outcome in winners] == [winner.id],
                 f"{label}: triggers that report a started run: "
                 f"{[(o.trigger, o.started_run_id) for o in winners]}, ledger run {winner.id}")
    for outcome in outcomes:
        if outcome.started_run_id is not None:
            continue
        named = outcome.refused and outcome.named_run_id == winner.id
        if named:
            tally.counts["refusals naming the active run"] += 1
            tally.counts[f"refusals by {outcome.trigger}"] += 1
            if outcome.reason:
                tally.counts[f"refusals by {outcome.trigger}, {outcome.reason}"] += 1
        tally.expect(named, f"{label}: {outcome.trigger} trigger was not refused with run "
                     f"{winner.id}: refused={outcome.refused} named={outcome.named_run_id} "
                     f"{outcome.detail}")


def launch(argv: list[str]) -> int:
    """Run `voucher-jobs ARGS` once the barrier folder contains the file `go-KIND`."""
    barrier, kind, arguments = Path(argv[0]), argv[1], argv[2:]
    # Everything the command imports is loaded before the barrier, so that
    # the triggers start their work together, not their imports.
    from voucher_jobs.cli import demo, schedule_commands, serve  # noqa: F401
    from voucher_jobs.cli.main import main
    from voucher_jobs.scheduler import scheduler  # noqa: F401

    (barrier / f"ready-{os.getpid()}").touch()
    while not (barrier / f"go-{kind}").exists():
        time.sleep(BARRIER_POLL_SECONDS)
    sys.argv = ["voucher-jobs", *arguments]
    main()
    return 0


if __name__ == "__main__":
    sys.exit(launch(sys.argv[1:]))

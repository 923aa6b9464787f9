"""The recipes in deploy/: they parse, name real commands and options, and treat exit code 3 as skipped.

The fast tests read every recipe file, check the cron expressions with the
project's own parser, run `voucher-jobs <command> --help` for each command
the recipes use, and run the recipes' shell wrappers against a stand-in
`voucher-jobs` that exits with a chosen code. The slow test serves the
FastAPI example with four uvicorn workers and checks that each fire time
runs once. deploy/VERIFIED.md records the runs under real cron, PM2 and
uvicorn that these tests cannot repeat.
"""

from __future__ import annotations

import asyncio
import configparser
import importlib
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sqlalchemy import select

from tests.conftest import Database
from voucher_jobs.config import ENV_NAMES, Settings
from voucher_jobs.data import ledger
from voucher_jobs.data.schema import expirations, runs, voucher_audit_logs
from voucher_jobs.jobs import JOBS
from voucher_jobs.scheduler import scheduler_lifespan
from voucher_jobs.scheduler.cron import Schedule
from voucher_jobs.scheduler.history import run_key

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
CRONTAB = DEPLOY / "cron" / "voucher-jobs.crontab"
SYSTEMD = DEPLOY / "systemd"
CRONJOB = DEPLOY / "kubernetes" / "cronjob.yaml"
DEPLOYMENT = DEPLOY / "kubernetes" / "deployment.yaml"
WORKFLOW = DEPLOY / "github-actions" / "voucher-jobs.yml"
EVENTBRIDGE = DEPLOY / "eventbridge" / "voucher-jobs.cfn.yaml"
PM2_FILES = sorted((DEPLOY / "pm2").glob("*.config.js"))
FASTAPI_APP = DEPLOY / "fastapi" / "app.py"
MAX_RUN_SECONDS = {
    "voucher-expired": Settings.model_fields["voucher_expired_max_run_seconds"].default,
    "audit-archival": Settings.model_fields["audit_archival_max_run_seconds"].default,
}
UTC = timezone.utc

# The program name, optionally behind a folder path, followed by arguments.
COMMAND_WORD = re.compile(r"(?:[\w./-]*/)?voucher-jobs(?=[ \t])")
# What may precede a command on its line: nothing, a shell operator, a
# keyword, or sudo with a user. `sudo -u voucher-jobs` and `cd
# /var/lib/voucher-jobs` thus name a user and a folder, not the command.
COMMAND_POSITION = re.compile(
    r"(?:^|&&|\|\||[;|(!]|\b(?:if|then|do|else|exec)|\bsudo(?:\s+-u\s+\S+)?)\s*$")


def load_yaml(path: Path) -> list[dict[str, Any]]:
    documents = [document for document in yaml.safe_load_all(path.read_text())
                 if document is not None]
    assert documents, f"{path} has no YAML document"
    for document in documents:
        assert isinstance(document, dict), f"{path}: a document is not a mapping"
    return documents


def commands_in(text: str) -> list[list[str]]:
    """Return the argument lists of the `voucher-jobs` commands in shell text.

    The arguments end at the first shell operator (`>>`, `&&`, `;`, ...) or
    comment on the command's line.
    """
    commands = []
    for line in text.splitlines():
        for match in COMMAND_WORD.finditer(line):
            if not COMMAND_POSITION.search(line[:match.start()]):
                continue
            lexer = shlex.shlex(line[match.end():], posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            words = []
            for word in lexer:
                if set(word) <= set(lexer.punctuation_chars):
                    break
                words.append(word)
            if words:
                commands.append(words)
    return commands


def crontab_entries() -> tuple[dict[str, str], list[tuple[str, str, str]]]:
    """Return the crontab's variables and its (schedule, user, command) lines."""
    variables: dict[str, str] = {}
    entries = []
    for line in CRONTAB.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        assignment = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)", stripped)
        if assignment:
            variables[assignment[1]] = assignment[2]
            continue
        fields = stripped.split(None, 6)
        assert len(fields) == 7, f"crontab line has fewer than 7 fields: {line!r}"
        entries.append((" ".join(fields[:5]), fields[5], fields[6]))
    return variables, entries


def systemd_unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None,
                                       comment_prefixes=("#", ";"))
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(path.read_text(), source=str(path))
    return parser


def pm2_config(path: Path) -> dict[str, Any]:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed, so the PM2 files cannot be loaded")
    environment = {key: value for key, value in os.environ.items()
                   if not key.startswith("VOUCHER_JOBS_")}
    output = subprocess.run(
        [node, "-e", "process.stdout.write(JSON.stringify(require(process.argv[1])))",
         str(path)],
        env=environment, capture_output=True, text=True, timeout=30, check=True,
    ).stdout
    return json.loads(output)


def cronjobs() -> list[dict[str, Any]]:
    return [document for document in load_yaml(CRONJOB) if document["kind"] == "CronJob"]


def workflow() -> dict[str, Any]:
    [document] = load_yaml(WORKFLOW)
    return document


def readme_shell_commands() -> str:
    """Return the sh code blocks of deploy/README.md, with line continuations joined."""
    blocks = re.findall(r"```sh\n(.*?)```", (DEPLOY / "README.md").read_text(), re.DOTALL)
    return "\n".join(blocks).replace("\\\n", " ")


def recipe_commands() -> list[list[str]]:
    """Return every `voucher-jobs` command that a recipe or the README runs."""
    _, entries = crontab_entries()
    commands = [words for _, _, command in entries for words in commands_in(command)]
    for unit in sorted(SYSTEMD.glob("*.service")):
        commands += commands_in(systemd_unit(unit)["Service"]["ExecStart"])
    for cronjob in cronjobs():
        [container] = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
        commands += commands_in(container["command"][-1])
    [deployment] = [document for document in load_yaml(DEPLOYMENT)
                    if document["kind"] == "Deployment"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    commands.append(container["command"][1:] + container["args"])
    for step in workflow()["jobs"]["run"]["steps"]:
        commands += commands_in(step.get("run", ""))
    if shutil.which("node"):
        for path in PM2_FILES:
            commands += [app["args"] for app in pm2_config(path)["apps"]]
    commands += commands_in(readme_shell_commands())
    return commands


def command_path(words: list[str]) -> tuple[list[str], list[str]]:
    """Split a command's words into its subcommand path and the options it uses."""
    path = []
    for word in words:
        if word.startswith("-"):
            break
        path.append(word)
    options = [word.split("=", 1)[0] for word in words if word.startswith("--")]
    return path, options


# Every file in deploy/ is read by some test

def test_every_recipe_file_checked() -> None:
    checked = {CRONTAB, CRONJOB, DEPLOYMENT, WORKFLOW, EVENTBRIDGE, FASTAPI_APP,
               DEPLOY / "README.md", *PM2_FILES, *SYSTEMD.glob("*.service"),
               *SYSTEMD.glob("*.timer"),
               # tests/test_partitions.py runs these with psql.
               DEPLOY / "postgresql" / "partition_audit_logs.sql",
               DEPLOY / "postgresql" / "add_audit_log_partitions.sql"}
    # The record of the manual runs is not a recipe.
    records = {DEPLOY / "VERIFIED.md"}
    present = {path for path in DEPLOY.rglob("*")
               if path.is_file() and "__pycache__" not in path.parts}
    assert present - checked - records == set(), "recipe files that no test reads"
    assert len(PM2_FILES) == 2


# cron

def test_crontab_lines_parse() -> None:
    variables, entries = crontab_entries()
    assert variables["MAILTO"] == '""'
    assert variables["SHELL"] == "/bin/sh"
    assert "DATABASE_URL" not in variables, "the secret belongs in .env, not the crontab"
    jobs = []
    for expression, user, command in entries:
        Schedule(expression, setting=f"crontab schedule of {command!r}")
        assert user == "voucher-jobs"
        # cron turns an unescaped % into a newline.
        assert "%" not in command
        assert command.startswith("cd /var/lib/voucher-jobs && ")
        [words] = commands_in(command)
        assert words[0] == "run"
        jobs.append(words[1])
        assert re.search(rf">> /var/log/voucher-jobs/{words[1]}\.log 2>&1$", command)
    assert sorted(jobs) == sorted(JOBS)


# systemd

def test_systemd_units_parse() -> None:
    timers = sorted(SYSTEMD.glob("*.timer"))
    assert [timer.name for timer in timers] == [
        f"voucher-jobs-{job}.timer" for job in sorted(JOBS)]
    for timer in timers:
        unit = systemd_unit(timer)
        assert unit["Timer"]["Persistent"] == "true"
        assert unit["Timer"]["OnCalendar"].endswith(" UTC")
        assert unit["Install"]["WantedBy"] == "timers.target"
        service = systemd_unit(timer.with_suffix(".service"))["Service"]
        job = timer.stem.removeprefix("voucher-jobs-")
        assert service["Type"] == "oneshot"
        assert service["ExecStart"].split()[1:] == ["run", job]
        assert "3" in service["SuccessExitStatus"].split()
        minutes = int(service["TimeoutStartSec"].removesuffix("min"))
        assert minutes * 60 > MAX_RUN_SECONDS[job]
    scheduler = systemd_unit(SYSTEMD / "voucher-jobs-scheduler.service")["Service"]
    assert scheduler["ExecStart"].split()[1:] == ["scheduler"]
    assert scheduler["KillSignal"] == "SIGTERM"


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify rejects an ExecStart program that does not exist here, so the
    # copies point at this environment's voucher-jobs.
    program = Path(sys.executable).parent / "voucher-jobs"
    assert program.exists()
    units = sorted(SYSTEMD.glob("*.service")) + sorted(SYSTEMD.glob("*.timer"))
    for unit in units:
        text = unit.read_text().replace("/opt/voucher-jobs/bin/voucher-jobs", str(program))
        (tmp_path / unit.name).write_text(text)
    result = subprocess.run(
        [analyze, "verify", "--man=no", *(str(tmp_path / unit.name) for unit in units)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    # Unknown keys are only warnings, with exit code 0.
    assert result.stderr == ""
    assert result.stdout == ""


# Kubernetes

def test_cronjobs_parse() -> None:
    found = []
    for cronjob in cronjobs():
        assert cronjob["apiVersion"] == "batch/v1"
        spec = cronjob["spec"]
        Schedule(spec["schedule"], spec["timeZone"], setting=cronjob["metadata"]["name"])
        assert spec["concurrencyPolicy"] == "Forbid"
        assert spec["startingDeadlineSeconds"] > 0
        job_spec = spec["jobTemplate"]["spec"]
        assert job_spec["backoffLimit"] >= 0
        pod = job_spec["template"]["spec"]
        assert pod["restartPolicy"] == "Never"
        [container] = pod["containers"]
        [words] = commands_in(container["command"][-1])
        assert words[0] == "run"
        job = words[1]
        found.append(job)
        assert job_spec["activeDeadlineSeconds"] > MAX_RUN_SECONDS[job]
        [rule] = job_spec["podFailurePolicy"]["rules"]
        assert rule["onExitCodes"]["containerName"] == container["name"]
        assert 3 not in rule["onExitCodes"]["values"]
        database_url = {item["name"]: item for item in container["env"]}["DATABASE_URL"]
        assert database_url["valueFrom"]["secretKeyRef"] == {
            "name": "voucher-jobs", "key": "database-url"}
    assert sorted(found) == sorted(JOBS)


def test_deployment_parses() -> None:
    documents = {document["kind"]: document for document in load_yaml(DEPLOYMENT)}
    assert set(documents) == {"Deployment", "Service"}
    [container] = documents["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["voucher-jobs"]
    assert container["args"][0] == "serve"
    assert "--with-scheduler" in container["args"]
    environment = {item["name"]: item for item in container["env"]}
    assert environment["VOUCHER_JOBS_API_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "api-token"
    for job in JOBS:
        variable = f"VOUCHER_JOBS_{job.upper().replace('-', '_')}_SCHEDULE"
        Schedule(environment[variable]["value"], setting=variable)
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"


# GitHub Actions

def test_workflow_parses() -> None:
    document = workflow()
    # YAML 1.1 reads the key `on` as the boolean true.
    triggers = document.get("on", document.get(True))
    schedules = [entry["cron"] for entry in triggers["schedule"]]
    for expression in schedules:
        Schedule(expression, setting="workflow schedule")
    assert sorted(triggers["workflow_dispatch"]["inputs"]["job"]["options"]) == sorted(JOBS)
    job = document["jobs"]["run"]
    assert job["concurrency"]["cancel-in-progress"] is False
    assert job["concurrency"]["group"].startswith("voucher-jobs-")
    assert job["env"]["DATABASE_URL"] == "${{ secrets.VOUCHER_JOBS_DATABASE_URL }}"
    # Each schedule picks its job in the expressions of JOB and the group.
    assert "'0 3 * * *' && 'audit-archival'" in job["env"]["JOB"]
    assert "0 3 * * *" in schedules


# EventBridge

def test_eventbridge_template_parses() -> None:
    [template] = load_yaml(EVENTBRIDGE)
    resources = template["Resources"]
    destination = resources["StartRunDestination"]["Properties"]
    assert destination["HttpMethod"] == "POST"
    assert destination["InvocationEndpoint"]["Fn::Sub"].endswith("/jobs/*/runs")
    auth = resources["ApiConnection"]["Properties"]["AuthParameters"]["ApiKeyAuthParameters"]
    assert auth["ApiKeyName"] == "Authorization"
    assert auth["ApiKeyValue"]["Fn::Sub"] == "Bearer ${ApiToken}"
    assert template["Parameters"]["ApiToken"]["NoEcho"] is True
    rules = [resource["Properties"] for resource in resources.values()
             if resource["Type"] == "AWS::Events::Rule"]
    jobs = []
    for rule in rules:
        [target] = rule["Targets"]
        jobs += target["HttpParameters"]["PathParameterValues"]
        assert "DeadLetterConfig" in target
        assert json.loads(target["Input"]) == {}
    assert sorted(jobs) == sorted(JOBS)


# PM2

def test_pm2_files_load() -> None:
    apps = {}
    for path in PM2_FILES:
        for app in pm2_config(path)["apps"]:
            apps[app["name"]] = app
            assert app["interpreter"] == "none"
            assert app["script"] == "/opt/voucher-jobs/bin/voucher-jobs"
            assert app["cwd"] == "/var/lib/voucher-jobs"
            assert app["kill_timeout"] >= 30_000
    assert apps["voucher-jobs-scheduler"]["args"] == ["scheduler"]
    assert apps["voucher-jobs-scheduler"]["autorestart"] is True
    for job in JOBS:
        one_shot = apps[f"voucher-jobs-{job}"]
        assert one_shot["args"] == ["run", job]
        assert one_shot["autorestart"] is False
        Schedule(one_shot["cron_restart"], setting=f"cron_restart of {job}")


# Commands and options

def test_recipe_commands_exist() -> None:
    commands = recipe_commands()
    used: dict[tuple[str, ...], set[str]] = {}
    for words in commands:
        path, options = command_path(words)
        paths = [path]
        if path[-1:] in (["$JOB"], ["${JOB}"]):
            paths = [path[:-1] + [job] for job in JOBS]
        for job_path in paths:
            used.setdefault(tuple(job_path), set()).update(options)
    assert {("run", "voucher-expired"), ("run", "audit-archival"), ("scheduler",),
            ("serve",), ("runs",), ("db", "upgrade")} <= set(used)
    environment = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    for path, options in sorted(used.items()):
        result = subprocess.run(
            [sys.executable, "-m", "voucher_jobs", *path, "--help"],
            capture_output=True, text=True, timeout=60, env=environment,
        )
        assert result.returncode == 0, (path, result.stdout, result.stderr)
        for option in sorted(options):
            assert option in result.stdout, f"`voucher-jobs {' '.join(path)}` has no {option}"


# Exit code 3 in the shell wrappers

def stand_in_voucher_jobs(folder: Path) -> Path:
    """Write a `voucher-jobs` that records its arguments and exits with $STAND_IN_EXIT_CODE."""
    folder.mkdir()
    program = folder / "voucher-jobs"
    program.write_text('#!/bin/sh\necho "$@" >> "$STAND_IN_ARGUMENTS"\n'
                       'exit "$STAND_IN_EXIT_CODE"\n')
    program.chmod(0o755)
    return program


def run_wrapper(shell: list[str], script: str, tmp_path: Path, code: int,
                **variables: str) -> tuple[int, str, str]:
    arguments = tmp_path / "arguments"
    arguments.unlink(missing_ok=True)
    environment = {**os.environ, **variables,
                   "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
                   "STAND_IN_EXIT_CODE": str(code), "STAND_IN_ARGUMENTS": str(arguments)}
    result = subprocess.run([*shell, script], capture_output=True, text=True,
                            timeout=30, env=environment)
    return result.returncode, arguments.read_text().strip(), result.stdout


WRAPPED_CODES = [(0, 0), (1, 1), (2, 2), (3, 0), (4, 4), (5, 5)]


def test_cronjob_wrapper_maps_exit_codes(tmp_path: Path) -> None:
    stand_in_voucher_jobs(tmp_path / "bin")
    for cronjob in cronjobs():
        [container] = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
        assert container["command"][:2] == ["/bin/sh", "-c"]
        for code, expected in WRAPPED_CODES:
            returned, arguments, output = run_wrapper(
                ["/bin/sh", "-c"], container["command"][2], tmp_path, code)
            assert returned == expected, (container["name"], code)
            assert arguments == f"run {container['name']}"
            assert ("recorded as skipped" in output) == (code == 3)


def test_workflow_step_maps_exit_codes(tmp_path: Path) -> None:
    stand_in_voucher_jobs(tmp_path / "bin")
    [step] = [step for step in workflow()["jobs"]["run"]["steps"]
              if step.get("name") == "Run the job"]
    # GitHub runs a `run` step as `bash -e {0}`, so -e must not end the step at code 3.
    for code, expected in WRAPPED_CODES:
        returned, arguments, output = run_wrapper(
            ["bash", "--noprofile", "--norc", "-e", "-o", "pipefail", "-c"], step["run"],
            tmp_path, code, JOB="audit-archival")
        assert returned == expected, code
        assert arguments == "run audit-archival"
        assert ("::notice title=audit-archival skipped::" in output) == (code == 3)


# The FastAPI example

@pytest.fixture
def example_app() -> Iterator[Any]:
    """Import deploy/fastapi/app.py afresh; undo its logging set-up afterwards."""
    package_logger = logging.getLogger("voucher_jobs")
    saved = (package_logger.handlers[:], package_logger.level, package_logger.propagate)
    sys.modules.pop("deploy.fastapi.app", None)
    try:
        yield importlib.import_module("deploy.fastapi.app").app
    finally:
        package_logger.handlers[:], package_logger.level, package_logger.propagate = saved


def test_example_app_uses_scheduler_lifespan(example_app: Any) -> None:
    lifespan = example_app.router.lifespan_context
    assert lifespan.__qualname__ == scheduler_lifespan().__qualname__
    assert lifespan.__module__ == "voucher_jobs.scheduler.scheduler"
    assert "lifespan=scheduler_lifespan()" in FASTAPI_APP.read_text()


def test_example_app_runs_scheduler(db: Database, example_app: Any,
                                    monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ENV_NAMES.values():
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DATABASE_URL", db.url)
    monkeypatch.setenv("VOUCHER_JOBS_CATCHUP_MAX_LATENESS_SECONDS", "0")
    responses: list[httpx.Response] = []

    async def serve() -> None:
        # ASGITransport sends no lifespan events, so the test enters the
        # lifespan itself, as uvicorn does.
        async with example_app.router.lifespan_context(example_app):
            transport = httpx.ASGITransport(app=example_app)
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
                responses.append(await client.get("/healthz"))

    asyncio.run(serve())
    [response] = responses
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "active_run_ids": []}
    assert not example_app.state.scheduler.is_alive()


WORKERS = 4


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(condition: Callable[[], Any], description: str, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {description}")
        time.sleep(0.1)


def log_lines(log: Path, event: str, key: str | None = None) -> list[str]:
    return [line for line in log.read_text().splitlines()
            if f" {event} " in line and (key is None or f"run_key={key}" in line)]


def worker_pid(line: str) -> int:
    match = re.match(r"\[pid (\d+)\] ", line)
    assert match, f"log line without the worker's pid: {line!r}"
    return int(match[1])


@pytest.mark.slow
def test_example_app_four_workers(db: Database) -> None:
    # Four uvicorn workers, four schedulers, one database, on the real clock.
    # The test waits for the first minute boundary after all four are up:
    # at most about 75 s.
    for _ in range(10):
        db.add_voucher(datetime.now(UTC) - timedelta(days=1))
    log = db.workdir / "uvicorn.log"
    environment = db.env(VOUCHER_JOBS_VOUCHER_EXPIRED_SCHEDULE="* * * * *",
                         VOUCHER_JOBS_AUDIT_ARCHIVAL_ENABLED="false")
    with log.open("w") as output:
        server = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "deploy.fastapi.app:app", "--app-dir", str(ROOT),
             "--workers", str(WORKERS), "--host", "127.0.0.1", "--port", str(free_port())],
            env=environment, cwd=db.workdir, stdout=subprocess.DEVNULL, stderr=output,
            start_new_session=True,
        )

    def schedulers_started() -> bool:
        if server.poll() is not None:
            raise AssertionError(f"uvicorn exited with {server.returncode}:\n{log.read_text()}")
        return len(log_lines(log, "scheduler_started")) == WORKERS

    try:
        wait_for(schedulers_started, f"{WORKERS} schedulers to start", timeout=60)
        fire_time = datetime.now(UTC).replace(second=0, microsecond=0) + timedelta(minutes=1)
        key = run_key("voucher-expired", fire_time)
        timeout = (fire_time - datetime.now(UTC)).total_seconds() + 30
        wait_for(lambda: db.rows(select(runs).where(runs.c.run_key == key,
                                                    runs.c.status != ledger.RUNNING)),
                 f"the run for {key}", timeout=timeout)
        wait_for(lambda: len(log_lines(log, "fire_time_skipped", key)) >= WORKERS - 1,
                 f"{WORKERS - 1} fire_time_skipped lines for {key}", timeout=15)
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
            raise AssertionError(f"uvicorn ignored SIGTERM for 60 s:\n{log.read_text()}") from None

    text = log.read_text()
    assert server.returncode == 0, text
    rows = db.rows(select(runs).order_by(runs.c.id))
    keys = [row.run_key for row in rows]
    assert key in keys
    assert None not in keys
    assert len(keys) == len(set(keys))
    assert {row.status for row in rows} == {ledger.SUCCEEDED}
    assert {row.trigger for row in rows} == {"scheduler"}
    assert db.count(voucher_audit_logs, voucher_audit_logs.c.action == "EXPIRED") == 10
    assert db.count(expirations) == 10
    assert sum(row.rows_affected for row in rows) == 10

    workers = {worker_pid(line) for line in log_lines(log, "scheduler_started")}
    assert len(workers) == WORKERS
    [ran] = log_lines(log, "run_started", key)
    skipped = log_lines(log, "fire_time_skipped", key)
    assert len(skipped) == WORKERS - 1, skipped
    assert {worker_pid(ran)} | {worker_pid(line) for line in skipped} == workers
    assert {row.pid for row in rows} <= workers

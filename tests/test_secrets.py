"""No output of voucher-jobs contains the database password, the API token or a heartbeat secret.

The database is on a private PostgreSQL cluster with password authentication,
so the password in DATABASE_URL is the one that lets the jobs in. The tests
run every command and request that prints or logs: `config`, the CLI's
database errors at each verbosity, real `run` processes at -v and -vv, `runs`,
the scheduler, `serve` and every kind of HTTP response. Each test collects
the captured text by label and looks in all of it for every marker.

Each test also checks that its output names the database or the run, masked
(such as `secret_jobs:***@`), so the grep looks at output that would show a
secret if masking failed.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from sqlalchemy import select, text

from reliability.postgres_cluster import BIN, Cluster
from tests.conftest import Database, postgres_required
from tests.http_support import HEARTBEAT_SECRET, LogCapture, Monitor, free_port
from voucher_jobs.config import Settings
from voucher_jobs.data import migrate
from voucher_jobs.data.engine import create_db_engine
from voucher_jobs.data.locks import job_lock
from voucher_jobs.data.schema import runs
from voucher_jobs.http import create_app

with warnings.catch_warnings():
    # Starlette prefers another HTTP client package for its test client and
    # warns on import when it finds httpx, which the lock file pins and which works.
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

ROLE = "secret_jobs"
PASSWORD = "pw-mark-71c4e9d2"
WRONG_PASSWORD = "wrong-pw-mark-3b8a50"
TOKEN = "api-token-mark-9e2f6c1a"
# Too short to be accepted, so it appears only in a rejected setting.
SHORT_TOKEN = "tok-mk-5c1"
HEARTBEAT_PASSWORD = "hb-pw-mark-44d0"
CLUSTER_PASSWORD = "cluster-pw-secrets"
SECRETS = (PASSWORD, WRONG_PASSWORD, TOKEN, SHORT_TOKEN, HEARTBEAT_PASSWORD, HEARTBEAT_SECRET)
MASKED = f"{ROLE}:***@"
EVERY_MINUTE = "* * * * *"


def find_leaks(outputs: dict[str, str]) -> list[str]:
    """Return one line per captured text that contains a secret."""
    return [f"{label} contains {secret!r}"
            for label, captured in outputs.items()
            for secret in SECRETS if secret in captured]


def response_text(response: httpx.Response) -> str:
    headers = "\n".join(f"{name}: {value}" for name, value in response.headers.items())
    return f"{response.status_code}\n{headers}\n{response.text}"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    if not (BIN / "initdb").exists():
        if postgres_required():
            pytest.fail(f"no PostgreSQL binaries in {BIN} (required because CI=true or "
                        "VOUCHER_JOBS_REQUIRE_POSTGRES=1)")
        pytest.skip(f"no PostgreSQL binaries in {BIN}")
    server = Cluster(CLUSTER_PASSWORD)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def secret_db(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Database]:
    """The migrated database `jobs`, and an empty `jobs_empty`, owned by a role with PASSWORD."""
    admin = create_db_engine(cluster.url(), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}'"))
        connection.execute(text(f"CREATE DATABASE jobs OWNER {ROLE}"))
        connection.execute(text(f"CREATE DATABASE jobs_empty OWNER {ROLE}"))
    admin.dispose()
    url = cluster.url("jobs", ROLE, PASSWORD)
    engine = create_db_engine(url)
    migrate.upgrade(engine)
    yield Database("postgresql", url, engine, tmp_path_factory.mktemp("secrets"))
    engine.dispose()


@pytest.fixture(scope="module")
def heartbeat_url() -> Iterator[str]:
    """A monitor URL with a password in its user part and a secret in its path."""
    monitor = Monitor()
    yield monitor.url.replace("http://", f"http://monitor:{HEARTBEAT_PASSWORD}@")
    monitor.close()


def settings(database_url: str, heartbeat_url: str, **extra: str) -> dict[str, str]:
    """The variables that carry secrets, for a command on database_url."""
    return {
        "DATABASE_URL": database_url,
        "VOUCHER_JOBS_API_TOKEN": TOKEN,
        "VOUCHER_JOBS_VOUCHER_EXPIRED_HEARTBEAT_URL": heartbeat_url,
        "VOUCHER_JOBS_AUDIT_ARCHIVAL_HEARTBEAT_URL": heartbeat_url,
        **extra,
    }


def process_env(variables: dict[str, str]) -> dict[str, str]:
    """The environment of a voucher-jobs process: this one's, with only these settings."""
    environment = {key: value for key, value in os.environ.items()
                   if not key.startswith("VOUCHER_") and key != "DATABASE_URL"}
    environment.update(variables)
    return environment


@pytest.fixture(autouse=True)
def sql_log_handlers() -> Iterator[None]:
    """Restore SQLAlchemy's logger, which an in-process `-vv` points at captured output."""
    sql = logging.getLogger("sqlalchemy.engine")
    saved = (sql.handlers[:], sql.level)
    yield
    sql.handlers[:], sql.level = saved[0], saved[1]


def query_password_url(cluster: Cluster, database: str) -> str:
    """A URL that gives the password as a query parameter, which libpq accepts."""
    return f"postgresql://{ROLE}@127.0.0.1:{cluster.port}/{database}?password={PASSWORD}"


def seed(db: Database) -> None:
    """Add expired vouchers and old audit rows, so that runs have work to log."""
    now = datetime.now(timezone.utc)
    for minutes in range(1, 6):
        db.add_voucher(now - timedelta(days=1, minutes=minutes))
    db.add_audit_rows([now - timedelta(days=1000, minutes=i) for i in range(5)])


# Settings and configuration output


def test_config_hides_secrets(secret_db: Database, cluster: Cluster, heartbeat_url: str,
                              cli: Any) -> None:
    outputs: dict[str, str] = {}
    for label, url in (("user part", secret_db.url),
                       ("query", query_password_url(cluster, "jobs"))):
        for args in (["config"], ["config", "--json"]):
            result = cli(*args, env=settings(url, heartbeat_url))
            assert result.exit_code == 0, result.stderr
            outputs[f"{' '.join(args)}, password in {label}"] = result.stdout + result.stderr
    rejected = {
        "short token": {"VOUCHER_JOBS_API_TOKEN": SHORT_TOKEN},
        "invalid heartbeat URL": {"VOUCHER_JOBS_AUDIT_ARCHIVAL_HEARTBEAT_URL":
                                  f"ftp://monitor:{HEARTBEAT_PASSWORD}@127.0.0.1/"
                                  f"{HEARTBEAT_SECRET}"},
    }
    for label, extra in rejected.items():
        result = cli("config", env=settings(secret_db.url, heartbeat_url, **extra))
        assert result.exit_code == 2, result.stderr
        outputs[f"config with {label}"] = result.stdout + result.stderr

    assert find_leaks(outputs) == []
    assert MASKED in outputs["config, password in user part"]
    assert "password=***" in outputs["config, password in query"]
    assert "127.0.0.1" in outputs["config --json, password in user part"]


# Database errors of the CLI


@pytest.mark.parametrize("verbosity", [[], ["-v"], ["-vv"]], ids=["quiet", "-v", "-vv"])
def test_cli_database_errors_hide_secrets(secret_db: Database, cluster: Cluster,
                                          heartbeat_url: str, cli: Any,
                                          verbosity: list[str]) -> None:
    closed = f"postgresql://{ROLE}:{PASSWORD}@127.0.0.1:{free_port()}/jobs"
    wrong_password = cluster.url("jobs", ROLE, WRONG_PASSWORD)
    attempts = [
        ("unreachable", closed, ["run", "voucher-expired"], 4),
        ("unreachable db upgrade", closed, ["db", "upgrade"], 4),
        ("unreachable serve", closed, ["serve", "--port", str(free_port())], 4),
        ("wrong password", wrong_password, ["run", "audit-archival"], 4),
        ("wrong password runs", wrong_password, ["runs"], 4),
        ("wrong password db current", wrong_password, ["db", "current"], 4),
        ("wrong password scheduler", wrong_password, ["scheduler"], 4),
        ("unknown scheme", f"mysql://{ROLE}:{PASSWORD}@127.0.0.1:3306/jobs",
         ["run", "voucher-expired"], 2),
        ("port not a number", f"postgresql://{ROLE}:{PASSWORD}@127.0.0.1:port/jobs",
         ["run", "voucher-expired"], 2),
        ("no database name", f"postgresql://{ROLE}:{PASSWORD}@127.0.0.1:{cluster.port}",
         ["runs"], 2),
        ("no tables", cluster.url("jobs_empty", ROLE, PASSWORD), ["runs"], 4),
        ("no tables, password in query", query_password_url(cluster, "jobs_empty"),
         ["run", "voucher-expired"], 4),
    ]
    outputs: dict[str, str] = {}
    for label, url, args, expected in attempts:
        result = cli(*verbosity, *args, env=settings(url, heartbeat_url))
        assert result.exit_code == expected, f"{label}: {result.stderr}"
        outputs[label] = result.stdout + result.stderr

    assert find_leaks(outputs) == []
    assert MASKED in outputs["no tables"]
    assert "password=***" in outputs["no tables, password in query"]
    assert "password authentication failed" in outputs["wrong password"]


# Runs, their logs and the ledger


def run_process(db: Database, env: dict[str, str], *args: str) -> str:
    """Run `voucher-jobs ARGS` as a process; return its stdout and stderr."""
    result = subprocess.run([sys.executable, "-m", "voucher_jobs", *args],
                            env=process_env(env), cwd=db.workdir, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


def test_run_logs_hide_secrets(secret_db: Database, cluster: Cluster, heartbeat_url: str,
                               cli: Any) -> None:
    seed(secret_db)
    env = settings(secret_db.url, heartbeat_url)
    archive = str(secret_db.workdir / "archive")
    outputs = {
        "run -v": run_process(secret_db, env, "-v", "run", "voucher-expired"),
        "run -vv archive-file": run_process(secret_db, env, "-vv", "run", "audit-archival",
                                            "--mode", "archive-file", "--archive-dir",
                                            archive),
        "run -vv --json": run_process(secret_db, env, "-vv", "run", "voucher-expired",
                                      "--json"),
        "run -v, password in query": run_process(
            secret_db, settings(query_password_url(cluster, "jobs"), heartbeat_url),
            "-v", "run", "audit-archival", "--dry-run", "--json"),
    }
    for args in (["runs"], ["runs", "--json"], ["db", "upgrade"], ["db", "current"],
                 ["schedule"]):
        result = cli(*args, env=env)
        assert result.exit_code == 0, result.stderr
        outputs[" ".join(args)] = result.stdout + result.stderr

    assert find_leaks(outputs) == []
    assert "run_finished" in outputs["run -v"]
    assert "heartbeat_sent" in outputs["run -v"]
    assert "voucher_jobs_runs" in outputs["run -vv archive-file"]
    assert "archive_file_exported" in outputs["run -vv archive-file"]
    assert MASKED in outputs["db upgrade"]


def test_scheduler_logs_hide_secrets(secret_db: Database, heartbeat_url: str) -> None:
    seed(secret_db)
    env = settings(secret_db.url, heartbeat_url,
                   VOUCHER_JOBS_VOUCHER_EXPIRED_SCHEDULE=EVERY_MINUTE,
                   VOUCHER_JOBS_AUDIT_ARCHIVAL_SCHEDULE=EVERY_MINUTE)
    started = datetime.now(timezone.utc)
    process = subprocess.Popen([sys.executable, "-m", "voucher_jobs", "-v", "scheduler"],
                               env=process_env(env), cwd=secret_db.workdir,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # At start the scheduler catches up the fire time of the current
        # minute for both jobs, so two runs finish without waiting for cron.
        finished = wait_for_scheduled_runs(secret_db, started, count=2, process=process)
    finally:
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
    outputs = {"scheduler": stdout + stderr}

    assert find_leaks(outputs) == []
    assert finished >= 2, outputs["scheduler"]
    assert "catch_up_started" in outputs["scheduler"]
    assert "run_finished" in outputs["scheduler"]


def wait_for_scheduled_runs(db: Database, since: datetime, count: int,
                            process: subprocess.Popen[str], timeout: float = 60) -> int:
    """Wait until count scheduler runs started after since have finished; return how many."""
    query = select(runs.c.id).where(runs.c.trigger == "scheduler", runs.c.status != "running",
                                    runs.c.started_at >= since)
    deadline = time.monotonic() + timeout
    while True:
        finished = len(db.rows(query))
        if finished >= count or process.poll() is not None or time.monotonic() > deadline:
            return finished
        time.sleep(0.1)


# The HTTP API


def test_serve_hides_secrets(secret_db: Database, heartbeat_url: str) -> None:
    seed(secret_db)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "voucher_jobs", "-v", "serve", "--port", str(port)],
        env=process_env(settings(secret_db.url, heartbeat_url)), cwd=secret_db.workdir,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_serving(process, base_url)
        with httpx.Client(base_url=base_url, timeout=30) as http:
            responses = exchange_every_kind(http, secret_db)
    finally:
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
    outputs = {label: response_text(response) for label, response in responses.items()}
    outputs["serve output"] = stdout + stderr
    statuses = {label: response.status_code for label, response in responses.items()}

    assert find_leaks(outputs) == []
    assert statuses["start run"] == 202
    assert statuses["job running"] == 409
    assert statuses["wrong token"] == 401
    assert "http_run_accepted" in outputs["serve output"]
    assert "GET /runs" in outputs["serve output"]


def wait_until_serving(process: subprocess.Popen[str], base_url: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        if process.poll() is not None:
            _, stderr = process.communicate()
            raise AssertionError(f"serve exited with {process.returncode}:\n{stderr}")
        try:
            if httpx.get(f"{base_url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "serve did not answer /healthz within 30 s"
        time.sleep(0.1)


def exchange_every_kind(http: httpx.Client, db: Database) -> dict[str, httpx.Response]:
    """Send a request for every kind of response of the API, errors included; return them."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    json_type = {**auth, "Content-Type": "application/json"}
    responses = {"start run": http.post("/jobs/voucher-expired/runs", headers=auth)}
    run_path = responses["start run"].headers.get("Location", "/runs/1")
    responses["run"] = wait_for_http_run(http, run_path, auth)

    with job_lock(db.engine, "audit-archival") as acquired:
        assert acquired
        responses["job running"] = http.post("/jobs/audit-archival/runs", headers=auth)

    requests = {
        "dry run": ("POST", "/jobs/audit-archival/runs", {"json": {"dry_run": True}}),
        "runs": ("GET", "/runs", {}),
        "runs next page": ("GET", "/runs?limit=1", {}),
        "jobs": ("GET", "/jobs", {}),
        "job": ("GET", "/jobs/voucher-expired", {}),
        "metrics": ("GET", "/metrics", {}),
        "unknown job": ("POST", "/jobs/expire-all/runs", {}),
        "unknown run": ("GET", "/runs/999999", {}),
        "bad query": ("GET", "/runs?limit=0", {}),
        "malformed JSON": ("POST", "/jobs/voucher-expired/runs",
                           {"content": b'{"dry_run": tru', "headers": json_type}),
        "future reference time": ("POST", "/jobs/voucher-expired/runs",
                                  {"json": {"reference_time": "2999-01-01T00:00:00Z"}}),
        "oversized body": ("POST", "/jobs/voucher-expired/runs",
                           {"content": b"[" + b" " * 17_000 + b"]", "headers": json_type}),
    }
    for label, (method, path, options) in requests.items():
        options.setdefault("headers", auth)
        responses[label] = http.request(method, path, **options)

    responses["wrong token"] = http.get("/runs", headers={"Authorization": "Bearer wrong-0000"})
    responses["missing token"] = http.get("/metrics")
    responses["healthz"] = http.get("/healthz")
    responses["openapi"] = http.get("/openapi.json")
    responses["docs"] = http.get("/docs")
    return responses


def wait_for_http_run(http: httpx.Client, path: str, auth: dict[str, str]) -> httpx.Response:
    deadline = time.monotonic() + 30
    while True:
        response = http.get(path, headers=auth)
        if response.status_code != 200 or response.json()["status"] != "running":
            return response
        assert time.monotonic() < deadline, f"{path} still running after 30 s"
        time.sleep(0.05)


def test_http_database_errors_hide_secrets(cluster: Cluster, secret_db: Database,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("VOUCHER_") or key == "DATABASE_URL":
            monkeypatch.delenv(key)
    urls = {
        "wrong password": cluster.url("jobs", ROLE, WRONG_PASSWORD),
        "unreachable, password in query":
            f"postgresql://{ROLE}@127.0.0.1:{free_port()}/jobs?password={PASSWORD}",
    }
    auth = {"Authorization": f"Bearer {TOKEN}"}
    outputs: dict[str, str] = {}
    with LogCapture("", "voucher_jobs") as logs:
        for label, url in urls.items():
            app = create_app(Settings(_env_file=None, database_url=url, api_token=TOKEN))
            with TestClient(app) as client:
                for method, path in (("GET", "/runs"), ("GET", "/jobs"), ("GET", "/metrics"),
                                     ("GET", "/healthz"), ("POST", "/jobs/voucher-expired/runs"),
                                     ("GET", "/runs/1")):
                    response = client.request(method, path, headers=auth)
                    outputs[f"{label}: {method} {path}"] = response_text(response)
    outputs["logs"] = logs.text

    assert find_leaks(outputs) == []
    assert "503" in outputs["wrong password: GET /runs"]
    assert "database_unavailable" in outputs["logs"]
    assert "password authentication failed" in outputs["logs"]

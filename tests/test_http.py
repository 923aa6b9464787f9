"""The HTTP API on real databases: status codes, runs, pagination, metrics, serving.

Most tests call the app in process with FastAPI's TestClient. Tests of
concurrent requests and of `voucher-jobs serve` use a real uvicorn server on
127.0.0.1.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import insert, select
from sqlalchemy.engine import make_url

from tests.conftest import T0, Database
from tests.http_support import (
    HEARTBEAT_SECRET,
    BlockingJob,
    LogCapture,
    Monitor,
    free_port,
    running_server,
)
from voucher_jobs.config import ConfigError, Settings
from voucher_jobs.data import ledger
from voucher_jobs.data.engine import create_db_engine
from voucher_jobs.data.schema import runs, voucher_audit_logs, vouchers
from voucher_jobs.http import create_app
from voucher_jobs.job_settings import build_parameters
from voucher_jobs.jobs import JOBS
from voucher_jobs.jobs.base import JobResult
from voucher_jobs.runner import execute, start

with warnings.catch_warnings():
    # Starlette 1.x prefers the httpx2 package for its test client and warns
    # on import when it finds httpx instead, which the lock file pins and which works.
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

TOKEN = "test-token-5b0d7e8a4f1c2d3e"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JOB = "voucher-expired"
AT = "2026-12-04T10:00:00Z"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """Keep the machine's VOUCHER_* variables and any .env file out of the settings."""
    for key in list(os.environ):
        if key.startswith("VOUCHER_") or key == "DATABASE_URL":
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


def make_settings(db: Database, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"database_url": db.url, "api_token": TOKEN}
    values.update(overrides)
    return Settings(_env_file=None, **values)


@pytest.fixture
def client(db: Database) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(db), db.engine)) as test_client:
        yield test_client


@pytest.fixture
def blocking_job(monkeypatch: pytest.MonkeyPatch) -> Iterator[BlockingJob]:
    job = BlockingJob()
    monkeypatch.setitem(JOBS, JOB, job)
    yield job
    job.release()


@pytest.fixture
def monitor() -> Iterator[Monitor]:
    server = Monitor()
    yield server
    server.close()


def add_expired_vouchers(db: Database, count: int) -> None:
    with db.engine.begin() as connection:
        connection.execute(insert(vouchers), [
            {"code": f"E{i:06d}", "type": "PERCENTAGE",
             "expiry_date": T0 - timedelta(minutes=i + 1),
             "created_at": T0 - timedelta(days=30)}
            for i in range(count)
        ])


def wait_for_run(client: Any, run_id: int, timeout: float = 30) -> dict[str, Any]:
    """Poll GET /runs/{id} until the run has finished; return its body."""
    deadline = time.monotonic() + timeout
    while True:
        response = client.get(f"/runs/{run_id}", headers=AUTH)
        assert response.status_code == 200, response.text
        body = response.json()
        if body["status"] != "running":
            return body
        assert time.monotonic() < deadline, f"run {run_id} still running after {timeout} s"
        time.sleep(0.02)


def run_count(db: Database) -> int:
    return db.count(runs)


# POST /jobs/{name}/runs


def test_post_future_reference_time_rejected(db: Database, client: TestClient) -> None:
    response = client.post(f"/jobs/{JOB}/runs", json={"reference_time": "2099-01-01T00:00:00Z"},
                           headers=AUTH)
    assert response.status_code == 422
    assert "later than the database clock" in response.json()["message"]
    assert db.count(runs) == 0


def test_post_future_reference_time_lists_error(db: Database, client: TestClient) -> None:
    response = client.post(f"/jobs/{JOB}/runs", json={"reference_time": "2099-01-01T00:00:00Z"},
                           headers=AUTH)

    assert response.status_code == 422
    body = response.json()
    assert body["message"].startswith("Invalid body field 'reference_time': ")
    assert len(body["detail"]) == 1
    assert body["detail"][0]["loc"] == ["body", "reference_time"]
    assert "later than the database clock" in body["detail"][0]["msg"]
    assert body["detail"][0]["type"] == "value_error"


@pytest.mark.parametrize("moment", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"])
def test_post_reference_time_outside_utc_range(db: Database, client: TestClient,
                                               moment: str) -> None:
    response = client.post(f"/jobs/{JOB}/runs", json={"reference_time": moment}, headers=AUTH)

    assert response.status_code == 422, response.text
    body = response.json()
    assert "between years 1 and 9999 in UTC" in body["message"]
    assert body["detail"][0]["loc"] == ["body", "reference_time"]
    assert run_count(db) == 0


def test_post_body_not_utf8_returns_400(db: Database, client: TestClient) -> None:
    response = client.post(f"/jobs/{JOB}/runs", content=b'{"dry_run": "\xff"}',
                           headers={**AUTH, "Content-Type": "application/json"})
    documented = client.get("/openapi.json").json()["paths"]["/jobs/{name}/runs"]["post"]

    assert response.status_code == 400
    assert isinstance(response.json()["detail"], str)
    assert "400" in documented["responses"]
    assert run_count(db) == 0


def test_post_runs_job_in_background(db: Database, client: TestClient) -> None:
    add_expired_vouchers(db, 3)
    response = client.post(f"/jobs/{JOB}/runs", json={"reference_time": AT}, headers=AUTH)

    assert response.status_code == 202, response.text
    body = response.json()
    run_id = body["run_id"]
    assert body["status"] == "running"
    assert body["links"] == {"self": f"/runs/{run_id}", "job": f"/jobs/{JOB}"}
    assert response.headers["Location"] == f"/runs/{run_id}"

    finished = wait_for_run(client, run_id)
    assert finished["status"] == "succeeded"
    assert finished["trigger"] == "http"
    assert finished["rows_affected"] == 3
    assert finished["parameters"]["reference_time"] == "2026-12-04T10:00:00+00:00"
    assert finished["duration_seconds"] >= 0
    assert db.count(voucher_audit_logs) == 3


def test_post_without_body_uses_defaults(db: Database, client: TestClient) -> None:
    response = client.post("/jobs/audit-archival/runs", headers=AUTH)

    assert response.status_code == 202, response.text
    finished = wait_for_run(client, response.json()["run_id"])
    assert finished["status"] == "succeeded"
    assert finished["job"] == "audit-archival"
    assert finished["parameters"]["dry_run"] is False
    assert finished["parameters"]["retention_days"] == 730


def test_post_dry_run_writes_nothing(db: Database, client: TestClient) -> None:
    add_expired_vouchers(db, 2)
    response = client.post(f"/jobs/{JOB}/runs", json={"dry_run": True, "reference_time": AT},
                           headers=AUTH)

    assert response.status_code == 202, response.text
    finished = wait_for_run(client, response.json()["run_id"])
    assert finished["status"] == "succeeded"
    assert finished["result"]["dry_run"] is True
    assert finished["result"]["would_write"] == 2
    assert db.count(voucher_audit_logs) == 0


def test_post_unknown_job_returns_404(db: Database, client: TestClient) -> None:
    response = client.post("/jobs/voucher-expiry/runs", headers=AUTH)

    assert response.status_code == 404
    body = response.json()
    assert body["known_jobs"] == ["audit-archival", "voucher-expired"]
    assert "'voucher-expiry' not found" in body["detail"]
    assert run_count(db) == 0


INVALID_BODIES = [
    ({"reference_time": "2026-12-04T10:00:00"}, "body field 'reference_time'"),
    ({"reference_time": "yesterday"}, "body field 'reference_time'"),
    ({"reference_time": 1796378400}, "body field 'reference_time'"),
    ({"dry_run": "yes"}, "body field 'dry_run'"),
    ({"dry_run": 1}, "body field 'dry_run'"),
    ({"dry_run": True, "batch_size": 5}, "body field 'batch_size'"),
    ([], "body"),
    ("{not json", "JSON body"),
]


@pytest.mark.parametrize(("payload", "named"), INVALID_BODIES)
def test_post_invalid_body_returns_422(db: Database, client: TestClient, payload: Any,
                                       named: str) -> None:
    if isinstance(payload, str):
        response = client.post(f"/jobs/{JOB}/runs", content=payload.encode(),
                               headers={**AUTH, "Content-Type": "application/json"})
    else:
        response = client.post(f"/jobs/{JOB}/runs", json=payload, headers=AUTH)

    assert response.status_code == 422, response.text
    body = response.json()
    assert named in body["message"]
    assert body["detail"][0]["loc"][0] == "body"
    assert "input" not in body["detail"][0]
    assert run_count(db) == 0


def test_post_large_body_returns_413(db: Database, client: TestClient) -> None:
    headers = {**AUTH, "Content-Type": "application/json"}
    padded = b'{"dry_run": true' + b" " * 17_000 + b"}"

    declared = client.post(f"/jobs/{JOB}/runs", content=padded, headers=headers)

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(padded), 1000):
            yield padded[start:start + 1000]

    chunked = client.post(f"/jobs/{JOB}/runs", content=chunks(), headers=headers)

    assert declared.status_code == 413
    assert "16384 bytes" in declared.json()["detail"]
    assert chunked.status_code == 413
    assert "16384 bytes" in chunked.json()["detail"]
    assert run_count(db) == 0


def test_body_at_limit_is_accepted(db: Database, client: TestClient) -> None:
    body = b'{"dry_run": true}'
    padded = body[:-1] + b" " * (16 * 1024 - len(body)) + b"}"
    assert len(padded) == 16 * 1024

    response = client.post(f"/jobs/{JOB}/runs", content=padded,
                           headers={**AUTH, "Content-Type": "application/json"})

    assert response.status_code == 202, response.text
    wait_for_run(client, response.json()["run_id"])


# Authentication

PROTECTED = [
    ("POST", f"/jobs/{JOB}/runs"),
    ("POST", "/jobs/unknown-job/runs"),
    ("GET", "/jobs"),
    ("GET", f"/jobs/{JOB}"),
    ("GET", "/runs"),
    ("GET", "/runs/1"),
    ("GET", "/metrics"),
]


@pytest.mark.parametrize(("method", "path"), PROTECTED)
def test_invalid_auth_returns_401(db: Database, client: TestClient, method: str,
                                   path: str) -> None:
    missing = client.request(method, path)
    wrong = client.request(method, path, headers={"Authorization": "Bearer wrong-token-123456"})
    basic = client.request(method, path, headers={"Authorization": f"Basic {TOKEN}"})
    prefix = client.request(method, path, headers={"Authorization": f"Bearer {TOKEN[:-1]}"})

    assert missing.status_code == 401
    assert missing.headers["WWW-Authenticate"] == 'Bearer realm="voucher-jobs"'
    assert "Missing bearer token" in missing.json()["detail"]
    assert wrong.status_code == 401
    assert wrong.headers["WWW-Authenticate"] == (
        'Bearer realm="voucher-jobs", error="invalid_token"'
    )
    assert basic.status_code == 401
    assert prefix.status_code == 401
    assert run_count(db) == 0


@pytest.mark.parametrize("content", [b"{not json", b'{"dry_run": "\xff"}'])
def test_token_checked_before_body(db: Database, client: TestClient, content: bytes) -> None:
    headers = {"Content-Type": "application/json"}
    missing = client.post(f"/jobs/{JOB}/runs", content=content, headers=headers)
    wrong = client.post(f"/jobs/{JOB}/runs", content=content,
                        headers={**headers, "Authorization": "Bearer wrong-token-123456"})

    assert missing.status_code == 401, missing.text
    assert "Missing bearer token" in missing.json()["detail"]
    assert wrong.status_code == 401, wrong.text
    assert run_count(db) == 0


def test_open_endpoints_need_no_token(db: Database, client: TestClient) -> None:
    health = client.get("/healthz")
    schema = client.get("/openapi.json")
    docs = client.get("/docs")

    assert health.status_code == 200
    assert health.json() == {"status": "ok", "database": "ok"}
    assert schema.status_code == 200
    paths = schema.json()["paths"]
    assert "/jobs/{name}/runs" in paths
    assert "/runs" in paths
    assert "HTTPBearer" in schema.json()["components"]["securitySchemes"]
    assert docs.status_code == 200
    assert "swagger" in docs.text.lower()


def test_app_requires_token_setting(db: Database) -> None:
    with pytest.raises(ConfigError, match="VOUCHER_JOBS_API_TOKEN is not set"):
        create_app(make_settings(db, api_token=None), db.engine)
    with pytest.raises(ConfigError, match="only allowed on a loopback address"):
        create_app(make_settings(db, api_token=None, api_allow_unauthenticated=True,
                                 api_host="0.0.0.0"), db.engine)


def test_app_runs_scheduler_in_lifespan(db: Database) -> None:
    app = create_app(make_settings(db), db.engine, with_scheduler=True)
    with TestClient(app) as client:
        scheduler = app.state.scheduler
        health = client.get("/healthz")

    assert health.status_code == 200
    assert scheduler is not None
    # On start the scheduler catches up on missed fire times of the last day.
    triggers = {row.trigger for row in db.rows(select(runs.c.trigger))}
    assert triggers <= {"scheduler"}


def test_loopback_app_runs_without_token(db: Database) -> None:
    settings = make_settings(db, api_token=None, api_allow_unauthenticated=True,
                             api_host="::1")
    with TestClient(create_app(settings, db.engine)) as anonymous:
        response = anonymous.get("/runs")

    assert response.status_code == 200
    assert response.json()["runs"] == []


# Conflicts


def test_post_while_active_returns_409(db: Database) -> None:
    add_expired_vouchers(db, 300)
    # 30 batches with a 0.02 s pause after each keep the first run going for
    # well over half a second, while the second request takes milliseconds.
    settings = make_settings(db, batch_size=10, batch_pause_seconds=0.02)
    with TestClient(create_app(settings, db.engine)) as client:
        first = client.post(f"/jobs/{JOB}/runs", json={"reference_time": AT}, headers=AUTH)
        second = client.post(f"/jobs/{JOB}/runs", json={"reference_time": AT}, headers=AUTH)

        assert first.status_code == 202, first.text
        active_id = first.json()["run_id"]
        assert second.status_code == 409, second.text
        conflict = second.json()
        assert conflict["active_run_id"] == active_id
        assert f"already running (run {active_id})" in conflict["detail"]
        skipped = ledger.get_run(db.engine, conflict["skipped_run_id"])
        assert skipped is not None
        assert skipped.status == "skipped"
        assert skipped.trigger == "http"
        assert skipped.blocked_by_run_id == active_id

        finished = wait_for_run(client, active_id)
    assert finished["status"] == "succeeded"
    assert finished["rows_affected"] == 300


def test_post_while_lock_held_returns_409(db: Database, client: TestClient) -> None:
    holder = start(db.engine, JOB, build_parameters(JOB, make_settings(db)), trigger="test")
    response = client.post(f"/jobs/{JOB}/runs", headers=AUTH)
    finished, _ = holder.run(handle_signals=False)
    after = client.post(f"/jobs/{JOB}/runs", headers=AUTH)

    assert response.status_code == 409
    assert response.json()["active_run_id"] == holder.record.id
    assert finished.status == "succeeded"
    assert after.status_code == 202
    wait_for_run(client, after.json()["run_id"])


def test_simultaneous_posts_start_one_run(db: Database, blocking_job: BlockingJob) -> None:
    app = create_app(make_settings(db), db.engine)
    barrier = threading.Barrier(2)
    responses: list[httpx.Response] = []

    with running_server(app) as base_url:
        def post() -> None:
            with httpx.Client(base_url=base_url, timeout=30) as http:
                barrier.wait()
                responses.append(http.post(f"/jobs/{JOB}/runs", headers=AUTH))

        threads = [threading.Thread(target=post) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)

        assert sorted(response.status_code for response in responses) == [202, 409]
        accepted = next(response for response in responses if response.status_code == 202)
        rejected = next(response for response in responses if response.status_code == 409)
        assert rejected.json()["active_run_id"] == accepted.json()["run_id"]
        blocking_job.release()
        with httpx.Client(base_url=base_url, timeout=30) as http:
            finished = wait_for_run(http, accepted.json()["run_id"])

    assert finished["status"] == "succeeded"
    statuses = sorted(row.status for row in db.rows(select(runs.c.status)))
    assert statuses == ["skipped", "succeeded"]


def test_cli_run_during_http_run_exits_3(db: Database, client: TestClient,
                                         blocking_job: BlockingJob) -> None:
    response = client.post(f"/jobs/{JOB}/runs", headers=AUTH)
    assert response.status_code == 202, response.text
    run_id = response.json()["run_id"]
    assert blocking_job.started.wait(10)

    result = db.cli("run", JOB, "--at", AT)

    assert result.returncode == 3, result.stderr
    assert f"already running (run {run_id})" in result.stderr
    blocking_job.release()
    assert wait_for_run(client, run_id)["status"] == "succeeded"


def test_shutdown_interrupts_background_run(db: Database,
                                            blocking_job: BlockingJob) -> None:
    with TestClient(create_app(make_settings(db), db.engine)) as client:
        response = client.post(f"/jobs/{JOB}/runs", headers=AUTH)
        assert response.status_code == 202, response.text
        assert blocking_job.started.wait(10)

    run = ledger.get_run(db.engine, response.json()["run_id"])
    assert run is not None
    assert run.status == "interrupted"
    assert run.error == "stopped by web server shutdown"


# GET /runs and /runs/{id}


def test_get_missing_run_returns_404(db: Database, client: TestClient) -> None:
    missing = client.get("/runs/4242", headers=AUTH)
    not_a_number = client.get("/runs/abc", headers=AUTH)
    zero = client.get("/runs/0", headers=AUTH)

    assert missing.status_code == 404
    assert missing.json()["detail"].startswith("Run 4242 not found.")
    assert not_a_number.status_code == 422
    assert "path parameter 'run_id'" in not_a_number.json()["message"]
    assert zero.status_code == 422


@pytest.mark.parametrize("path", [f"/runs/{2**63}", f"/runs?before_id={2**63}"])
def test_run_id_above_bigint_returns_422(db: Database, client: TestClient, path: str) -> None:
    response = client.get(path, headers=AUTH)
    largest = client.get(f"/runs/{2**63 - 1}", headers=AUTH)

    assert response.status_code == 422, response.text
    assert "less than or equal to 9223372036854775807" in response.json()["message"]
    assert largest.status_code == 404


def make_runs(db: Database) -> list[int]:
    """Record six finished runs of both jobs and one skipped run; return ids, oldest first."""
    settings = make_settings(db)
    ids = []
    for job in ["voucher-expired", "audit-archival"] * 3:
        run, _ = execute(db.engine, job, build_parameters(job, settings), trigger="test",
                         handle_signals=False)
        ids.append(run.id)
    skipped = ledger.start_run(db.engine, job=JOB, trigger="test", parameters={},
                               host="h", pid=1, status=ledger.SKIPPED,
                               blocked_by_run_id=ids[0])
    ids.append(skipped.id)
    return ids


def test_list_runs_pages_by_id(db: Database, client: TestClient) -> None:
    ids = make_runs(db)
    seen: list[int] = []
    pages = 0
    link: str | None = "/runs?limit=3"
    while link:
        response = client.get(link, headers=AUTH)
        assert response.status_code == 200, response.text
        page = response.json()
        assert len(page["runs"]) <= 3
        seen.extend(run["id"] for run in page["runs"])
        link = page["links"]["next"]
        pages += 1
        assert pages <= 5

    assert seen == sorted(ids, reverse=True)
    assert pages == 3


def test_list_runs_filters_job_and_status(db: Database, client: TestClient) -> None:
    ids = make_runs(db)

    archival = client.get("/runs?job=audit-archival&limit=2", headers=AUTH).json()
    skipped = client.get("/runs?status=skipped", headers=AUTH).json()
    older = client.get(f"/runs?before_id={ids[2]}", headers=AUTH).json()

    assert [run["job"] for run in archival["runs"]] == ["audit-archival"] * 2
    assert archival["links"]["next"] == (
        f"/runs?job=audit-archival&limit=2&before_id={archival['runs'][-1]['id']}"
    )
    assert [run["id"] for run in skipped["runs"]] == [ids[-1]]
    assert skipped["runs"][0]["blocked_by_run_id"] == ids[0]
    assert skipped["links"]["next"] is None
    assert [run["id"] for run in older["runs"]] == [ids[1], ids[0]]


BAD_QUERIES = [
    ("limit=0", "query parameter 'limit'"),
    ("limit=201", "query parameter 'limit'"),
    ("limit=ten", "query parameter 'limit'"),
    ("before_id=0", "query parameter 'before_id'"),
    ("before_id=x", "query parameter 'before_id'"),
    ("status=done", "query parameter 'status'"),
    ("job=voucher-expiry", "query parameter 'job'"),
]


@pytest.mark.parametrize(("query", "named"), BAD_QUERIES)
def test_list_runs_rejects_bad_query(db: Database, client: TestClient, query: str,
                                     named: str) -> None:
    response = client.get(f"/runs?{query}", headers=AUTH)

    assert response.status_code == 422
    assert named in response.json()["message"]


# GET /jobs


def test_jobs_show_schedule_and_last_run(db: Database, monitor: Monitor) -> None:
    settings = make_settings(
        db, voucher_expired_schedule="30 4 * * *", schedule_timezone="Europe/Berlin",
        audit_archival_enabled=False, voucher_expired_heartbeat_url=monitor.url,
    )
    with TestClient(create_app(settings, db.engine)) as client:
        before = client.get("/jobs", headers=AUTH).json()["jobs"]
        run_id = client.post(f"/jobs/{JOB}/runs", headers=AUTH).json()["run_id"]
        wait_for_run(client, run_id)
        refused = ledger.start_run(db.engine, job=JOB, trigger="test", parameters={},
                                   host="h", pid=1, status=ledger.SKIPPED)
        after = {job["name"]: job for job in client.get("/jobs", headers=AUTH).json()["jobs"]}
        single = client.get(f"/jobs/{JOB}", headers=AUTH)
        unknown = client.get("/jobs/nope", headers=AUTH)

    assert [job["name"] for job in before] == ["audit-archival", "voucher-expired"]
    assert all(job["last_run"] is None for job in before)
    expired = after[JOB]
    assert expired["schedule"] == "30 4 * * *"
    assert expired["timezone"] == "Europe/Berlin"
    assert expired["enabled"] is True
    assert expired["heartbeat_configured"] is True
    assert HEARTBEAT_SECRET not in single.text
    fire = datetime.fromisoformat(expired["next_fire_time"])
    local = fire.astimezone(ZoneInfo("Europe/Berlin"))
    assert (local.hour, local.minute) == (4, 30)
    now = datetime.now(timezone.utc)
    assert now < fire <= now + timedelta(days=1)
    assert expired["last_run"]["id"] == run_id
    assert expired["last_run"]["id"] != refused.id
    assert expired["last_run"]["status"] == "succeeded"
    assert expired["active_run_id"] is None
    archival = after["audit-archival"]
    assert archival["enabled"] is False
    assert archival["next_fire_time"] is None
    assert archival["heartbeat_configured"] is False
    assert single.status_code == 200
    assert single.json() == expired
    assert unknown.status_code == 404
    assert unknown.json()["known_jobs"] == ["audit-archival", "voucher-expired"]


def test_jobs_report_invalid_schedule(db: Database) -> None:
    # model_copy skips validation, as a schedule read before it is checked would.
    settings = make_settings(db).model_copy(update={"voucher_expired_schedule": "61 * * * *"})
    with TestClient(create_app(settings, db.engine)) as client:
        response = client.get(f"/jobs/{JOB}", headers=AUTH)

    assert response.status_code == 200
    job = response.json()
    assert job["next_fire_time"] is None
    assert "VOUCHER_JOBS_VOUCHER_EXPIRED_SCHEDULE" in job["schedule_error"]


def test_jobs_show_active_run(db: Database, client: TestClient,
                              blocking_job: BlockingJob) -> None:
    run_id = client.post(f"/jobs/{JOB}/runs", headers=AUTH).json()["run_id"]
    job = client.get(f"/jobs/{JOB}", headers=AUTH).json()
    blocking_job.release()
    wait_for_run(client, run_id)

    assert job["active_run_id"] == run_id
    assert job["last_run"]["status"] == "running"


# /healthz and /metrics


def unreachable_engine() -> Any:
    """An engine for a PostgreSQL URL with a password, on a closed port of 127.0.0.1."""
    return create_db_engine(
        f"postgresql://jobs:db-password-7d1f@127.0.0.1:{free_port()}/shop?connect_timeout=2"
    )


def test_unreachable_database_returns_503(db: Database) -> None:
    engine = unreachable_engine()
    with LogCapture("", "voucher_jobs") as logs:
        with TestClient(create_app(make_settings(db), engine)) as client:
            health = client.get("/healthz")
            post = client.post(f"/jobs/{JOB}/runs", headers=AUTH)
            listing = client.get("/runs", headers=AUTH)
            metrics = client.get("/metrics", headers=AUTH)
    engine.dispose()

    assert health.status_code == 503
    assert health.json() == {"status": "unavailable", "database": "unreachable"}
    assert post.status_code == 503
    assert "database is unavailable" in post.json()["detail"]
    assert listing.status_code == 503
    assert metrics.status_code == 200
    assert "voucher_jobs_ledger_up 0.0" in metrics.text
    for response in (health, post, listing, metrics):
        assert "db-password-7d1f" not in response.text
    assert "database_unavailable" in logs.text
    assert "db-password-7d1f" not in logs.text


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Parse Prometheus text into {(sample name, sorted labels): value}."""
    parsed = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            parsed[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return parsed


def test_metrics_report_ledger_totals(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    add_expired_vouchers(db, 4)
    settings = make_settings(db)
    real, _ = execute(db.engine, JOB, build_parameters(JOB, settings, reference_time=T0),
                      trigger="test", handle_signals=False)
    execute(db.engine, JOB, build_parameters(JOB, settings, dry_run=True), trigger="test",
            handle_signals=False)
    ledger.start_run(db.engine, job=JOB, trigger="test", parameters={}, host="h", pid=1,
                     status=ledger.SKIPPED)

    def broken(engine: Any, parameters: Any, context: Any) -> JobResult:
        raise RuntimeError("broken")

    monkeypatch.setitem(JOBS, "audit-archival", broken)
    with pytest.raises(Exception, match="broken"):
        execute(db.engine, "audit-archival", build_parameters("audit-archival", settings),
                trigger="test", handle_signals=False)

    replicas = [create_app(settings, db.engine) for _ in range(2)]
    texts = []
    for app in replicas:
        with TestClient(app) as client:
            response = client.get("/metrics", headers=AUTH)
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/plain")
            texts.append(response.text)

    values = samples(texts[0])
    expired = (("job", JOB),)
    archival = (("job", "audit-archival"),)
    assert values[("voucher_jobs_ledger_up", ())] == 1
    assert values[("voucher_jobs_runs_total", (("job", JOB), ("status", "succeeded")))] == 2
    assert values[("voucher_jobs_runs_total", (("job", JOB), ("status", "skipped")))] == 1
    assert values[("voucher_jobs_runs_total", (("job", JOB), ("status", "failed")))] == 0
    assert values[("voucher_jobs_runs_total",
                   (("job", "audit-archival"), ("status", "failed")))] == 1
    assert values[("voucher_jobs_runs_in_progress", expired)] == 0
    assert values[("voucher_jobs_rows_affected_total", expired)] == 4
    assert values[("voucher_jobs_run_duration_seconds_count", expired)] == 2
    assert values[("voucher_jobs_run_duration_seconds_count", archival)] == 1
    assert values[("voucher_jobs_run_duration_seconds_bucket",
                   (("job", JOB), ("le", "+Inf")))] == 2
    assert values[("voucher_jobs_run_duration_seconds_bucket",
                   (("job", JOB), ("le", "60.0")))] == 2
    assert real.finished_at is not None
    # The dry run finished later, but only the real run counts as a success.
    assert values[("voucher_jobs_last_success_timestamp_seconds", expired)] == pytest.approx(
        real.finished_at.timestamp(), abs=1e-3
    )
    assert ("voucher_jobs_last_success_timestamp_seconds", archival) not in values
    # Every replica computes the same values from the shared ledger.
    second = samples(texts[1])
    scrape_time = "voucher_jobs_ledger_scrape_duration_seconds"
    assert {key: value for key, value in values.items() if key[0] != scrape_time} == {
        key: value for key, value in second.items() if key[0] != scrape_time
    }


def test_metrics_count_running_run(db: Database, client: TestClient,
                                   blocking_job: BlockingJob) -> None:
    run_id = client.post(f"/jobs/{JOB}/runs", headers=AUTH).json()["run_id"]
    during = samples(client.get("/metrics", headers=AUTH).text)
    blocking_job.release()
    wait_for_run(client, run_id)
    after = samples(client.get("/metrics", headers=AUTH).text)

    key = ("voucher_jobs_runs_in_progress", (("job", JOB),))
    assert during[key] == 1
    assert after[key] == 0


# Heartbeats and secrets


def test_http_run_sends_heartbeats(db: Database, monitor: Monitor) -> None:
    settings = make_settings(db, voucher_expired_heartbeat_url=monitor.url)
    with TestClient(create_app(settings, db.engine)) as client:
        run_id = client.post(f"/jobs/{JOB}/runs", headers=AUTH).json()["run_id"]
        wait_for_run(client, run_id)
        requests = monitor.wait_for(2)

    assert [request.path for request in requests] == [
        f"/ping/{HEARTBEAT_SECRET}/start",
        f"/ping/{HEARTBEAT_SECRET}",
    ]


def test_secrets_stay_out_of_output(db: Database, monitor: Monitor) -> None:
    password = "pg-password-93c1ab"
    url = db.url
    if db.backend == "postgresql":
        # Trust authentication accepts any password, so the URL can carry one.
        url = make_url(db.url).set(password=password).render_as_string(hide_password=False)
    engine = create_db_engine(url)
    settings = make_settings(db, database_url=url, voucher_expired_heartbeat_url=monitor.url)
    texts: list[str] = []
    with LogCapture("", "voucher_jobs", "uvicorn", "uvicorn.access") as logs:
        with running_server(create_app(settings, engine)) as base_url:
            with httpx.Client(base_url=base_url, timeout=30) as http:
                accepted = http.post(f"/jobs/{JOB}/runs", headers=AUTH)
                responses = [
                    accepted,
                    http.get(f"/runs/{accepted.json()['run_id']}", headers=AUTH),
                    http.post(f"/jobs/{JOB}/runs", json={"dry_run": "x"}, headers=AUTH),
                    http.get("/runs", headers=AUTH),
                    http.get("/jobs", headers=AUTH),
                    http.get("/metrics", headers=AUTH),
                    http.get("/healthz"),
                    http.get("/openapi.json"),
                    http.get("/runs", headers={"Authorization": "Bearer not-the-token"}),
                ]
                wait_for_run(http, accepted.json()["run_id"])
                monitor.wait_for(2)
    engine.dispose()

    for response in responses:
        texts.append(response.text)
        texts.extend(f"{name}: {value}" for name, value in response.headers.items())
    output = "\n".join(texts)
    assert accepted.status_code == 202
    assert "run_finished" in logs.text
    assert "uvicorn" in logs.text
    for secret in (TOKEN, password, HEARTBEAT_SECRET):
        assert secret not in output
        assert secret not in logs.text


# voucher-jobs serve


def serve_process(db: Database, port: int, *args: str,
                  **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "voucher_jobs", "serve", "--port", str(port), *args],
        env=db.env(**env), cwd=db.workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )


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


def stop(process: subprocess.Popen[str]) -> tuple[int, str]:
    process.send_signal(signal.SIGTERM)
    try:
        _, stderr = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        _, stderr = process.communicate()
        raise AssertionError(f"serve did not stop on SIGTERM:\n{stderr}") from None
    return process.returncode, stderr


@pytest.mark.slow
def test_serve_runs_jobs_over_http(db: Database) -> None:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    process = serve_process(db, port, "--workers", "2", VOUCHER_JOBS_API_TOKEN=TOKEN)
    try:
        wait_until_serving(process, base_url)
        with httpx.Client(base_url=base_url, timeout=30) as http:
            anonymous = http.get("/runs")
            accepted = http.post(f"/jobs/{JOB}/runs", headers=AUTH)
            finished = wait_for_run(http, accepted.json()["run_id"])
    finally:
        code, stderr = stop(process)

    assert anonymous.status_code == 401
    assert accepted.status_code == 202
    assert finished["status"] == "succeeded"
    assert code == 0, stderr
    assert "api_started" in stderr
    assert "run_finished" in stderr
    assert TOKEN not in stderr


@pytest.mark.slow
def test_serve_on_loopback_without_token(db: Database) -> None:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    process = serve_process(db, port, "--host", "127.0.0.1",
                            VOUCHER_JOBS_API_ALLOW_UNAUTHENTICATED="true")
    try:
        wait_until_serving(process, base_url)
        response = httpx.get(f"{base_url}/runs", timeout=10)
    finally:
        code, stderr = stop(process)

    assert response.status_code == 200
    assert code == 0, stderr
    assert "authentication=\"none (loopback only)\"" in stderr


def test_serve_refuses_unsafe_settings(db: Database) -> None:
    no_token = db.cli("serve", "--port", str(free_port()))
    public = db.cli("serve", "--host", "0.0.0.0", "--port", str(free_port()),
                    env=db.env(VOUCHER_JOBS_API_ALLOW_UNAUTHENTICATED="true"))
    bad_schedule = db.cli("serve", "--with-scheduler", "--port", str(free_port()),
                          env=db.env(VOUCHER_JOBS_API_TOKEN=TOKEN,
                                     VOUCHER_JOBS_AUDIT_ARCHIVAL_SCHEDULE="0 25 * * *"))

    assert no_token.returncode == 2
    assert "VOUCHER_JOBS_API_TOKEN is not set" in no_token.stderr
    assert public.returncode == 2
    assert "only allowed on a loopback address" in public.stderr
    assert "'0.0.0.0'" in public.stderr
    assert bad_schedule.returncode == 2
    assert "VOUCHER_JOBS_AUDIT_ARCHIVAL_SCHEDULE" in bad_schedule.stderr

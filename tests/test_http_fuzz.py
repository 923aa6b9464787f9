"""Property-based fuzz of the HTTP API, generated from the app's own OpenAPI schema.

Schemathesis reads /openapi.json from the app and sends generated requests,
valid and invalid, to every operation in process. Each test runs the real app
on a migrated SQLite or PostgreSQL database that contains sample runs, vouchers
and audit rows. With the token, every response must have a documented status
code below 500, a documented content type, headers and body, and invalid
input must be rejected. Without a valid token, every operation that declares
the token must return 401. A run that a fuzzed POST starts must finish with
status succeeded before the next example.

VOUCHER_JOBS_FUZZ_EXAMPLES sets the maximum number of generated examples per
operation (default 25: about 30 s of CPU time for both backends).
Hypothesis runs derandomized and without its example database, so a CI run
depends on no random seed and on no earlier run.
"""

from __future__ import annotations

import copy
import os
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from starlette.types import Receive, Scope, Send

from tests.conftest import Database
from tests.test_http import (  # noqa: F401 - clean_environment is an autouse fixture
    TOKEN,
    clean_environment,
    make_runs,
    make_settings,
)
from voucher_jobs.config import Settings
from voucher_jobs.data import ledger
from voucher_jobs.http import create_app
from voucher_jobs.jobs import JOBS

FUZZ_EXAMPLES = int(os.environ.get("VOUCHER_JOBS_FUZZ_EXAMPLES", "25"))
# How long a run started by a fuzzed POST may take; runs on the sample data
# take milliseconds.
RUN_WAIT_SECONDS = 30.0
WRONG_TOKEN = "Bearer wrong-token-0123456789abcdef"

FUZZ_SETTINGS = settings(
    max_examples=FUZZ_EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)


class CurrentApp:
    """An ASGI app that passes each HTTP request on to the app of the running test.

    Schemathesis binds a schema to one ASGI app when it collects the tests,
    but each test has an app of its own, on its own database. This object
    handles lifespan messages itself, so no test app's lifespan outlives its
    test.
    """

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        await self.app(scope, receive, send)


def fuzz_config(token: str | None) -> schemathesis.Config:
    """Return a Schemathesis configuration that sends token as the bearer token, if given.

    The API ignores query parameters that it does not define, as FastAPI
    does by default, so generating them would only report that. A
    reference_time that fits the schema can still be later than the
    database clock, or too early for the retention period, so the start of a
    run may reject valid input with 422.
    """
    data: dict[str, Any] = {
        "generation": {"allow-extra-parameters": False},
        "operations": [{
            "include-method": "POST",
            "include-path": "/jobs/{name}/runs",
            "checks": {"positive_data_acceptance": {
                "expected-statuses": ["2xx", "401", "404", "409", "422"],
            }},
        }],
    }
    if token is not None:
        data["auth"] = {"openapi": {"HTTPBearer": {"bearer": token}}}
    return schemathesis.Config.from_dict(data)


# The OpenAPI document depends on the code, not on the database, so an app on
# an in-memory SQLite URL that it never connects to serves it for collection.
TARGET = CurrentApp(create_app(Settings(_env_file=None, database_url="sqlite://",
                                        api_token=TOKEN)))
schema = schemathesis.openapi.from_asgi("/openapi.json", TARGET, config=fuzz_config(TOKEN))
anonymous_schema = schemathesis.openapi.from_asgi("/openapi.json", TARGET,
                                                  config=fuzz_config(None))
DOCUMENT = copy.deepcopy(schema.raw_schema)


@schema.hook
def flatmap_path_parameters(context: schemathesis.HookContext,
                            path_parameters: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Replace a generated job name with a real one in two of three cases.

    A random string is almost never a job's name, so without this POST
    /jobs/{name}/runs would only ever get 404 and start no run.
    """
    if not path_parameters or "name" not in path_parameters:
        return st.just(path_parameters)
    names = st.sampled_from([path_parameters["name"], *sorted(JOBS)])
    return names.map(lambda name: {**path_parameters, "name": name})


def add_sample_data(db: Database) -> None:
    """Fill the ledger and the tables, so that list and detail responses have content."""
    make_runs(db)
    now = datetime.now(timezone.utc)
    for days in (1, 2, 3):
        db.add_voucher(now - timedelta(days=days))
    db.add_voucher(now + timedelta(days=5))
    db.add_audit_rows([now - timedelta(days=800 + day) for day in range(5)])
    db.add_audit_rows([now - timedelta(days=day) for day in range(3)])


def wait_for_background_runs(app: FastAPI) -> None:
    """Wait until every run that a fuzzed POST started has finished."""
    runs = app.state.background_runs
    deadline = time.monotonic() + RUN_WAIT_SECONDS
    while runs.active_ids():
        assert time.monotonic() < deadline, (
            f"background runs {runs.active_ids()} still running after {RUN_WAIT_SECONDS} s"
        )
        time.sleep(0.005)


def run_threads() -> list[str]:
    return [thread.name for thread in threading.enumerate() if thread.name.startswith("run-")]


@pytest.fixture
def api(db: Database, tmp_path: Path) -> Iterator[FastAPI]:
    """The app on db with sample data; at teardown, no background run may be left."""
    add_sample_data(db)
    settings = make_settings(db, archive_mode="archive-file", archive_dir=tmp_path / "archive",
                             retry_attempts=0)
    app = create_app(settings, db.engine)
    assert app.openapi() == DOCUMENT
    previous, TARGET.app = TARGET.app, app
    try:
        yield app
        wait_for_background_runs(app)
    finally:
        TARGET.app = previous
        left = app.state.background_runs.stop_all(RUN_WAIT_SECONDS)
        assert left == [], f"background runs {left} did not stop"
    assert run_threads() == []


def requires_token(case: schemathesis.Case) -> bool:
    """Return whether the schema declares the token for the method and path of case.

    Coverage cases also send methods that the path does not have, which get
    405 from the router.
    """
    declared = bool(case.operation.definition.raw.get("security"))
    return declared and case.method.upper() == case.operation.method.upper()


@FUZZ_SETTINGS
@schema.parametrize()
def test_fuzz_with_token(case: schemathesis.Case, api: FastAPI, db: Database) -> None:
    response = case.call_and_validate()
    wait_for_background_runs(api)

    if response.status_code == 202:
        run = ledger.get_run(db.engine, response.json()["run_id"])
        assert run is not None
        assert run.status == ledger.SUCCEEDED, run.error


@FUZZ_SETTINGS
@anonymous_schema.parametrize()
def test_fuzz_without_valid_token(case: schemathesis.Case, api: FastAPI) -> None:
    # The generated case may carry a generated Authorization value.
    generated = case.call()
    case.headers = {
        name: value for name, value in (case.headers or {}).items()
        if name.lower() != "authorization"
    }
    missing = case.call()
    wrong = case.call(headers={"Authorization": WRONG_TOKEN})
    wait_for_background_runs(api)

    for response in (generated, missing, wrong):
        assert response.status_code < 500, response.text
        if requires_token(case):
            assert response.status_code == 401, response.text

"""The bad-input catalogue of reliability/bad_inputs.py, one test per case.

Each case must get its exit code or HTTP status, a message that names the
value and the fix, and leave every table, the run ledger and the working
folder as they were. The cases share one workspace per module: seeded
SQLite files and, when the PostgreSQL binaries exist, a private cluster.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from reliability.bad_inputs import (
    CASES,
    Case,
    Workspace,
    postgres_available,
    postgres_required,
)
from voucher_jobs.config import ENV_NAMES


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    use_postgres = postgres_available()
    if not use_postgres and postgres_required():
        pytest.fail("the PostgreSQL binaries for a private cluster are required "
                    "(CI=true or VOUCHER_JOBS_REQUIRE_POSTGRES=1)")
    space = Workspace(tmp_path_factory.mktemp("bad-inputs"), postgres=use_postgres)
    try:
        space.prepare()
        yield space
    finally:
        space.close()


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(workspace: Workspace, case: Case) -> None:
    outcome = workspace.run(case)
    if outcome.skipped:
        pytest.skip(outcome.skipped)
    assert outcome.problems == [], outcome.output


def test_catalogue_covers_every_setting() -> None:
    set_by_cases = {name for case in CASES for name in case.env}
    missing = sorted(set(ENV_NAMES.values()) - set_by_cases)
    assert missing == []


def test_catalogue_ids_unique() -> None:
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids))


def test_catalogue_has_every_area() -> None:
    areas = {case.area for case in CASES}
    assert areas == {"configuration", "CLI arguments", "cron and time zones", "database",
                     "HTTP requests"}


def test_runner_reports_accepted_input(workspace: Workspace) -> None:
    # A valid dry run exits with 0 and records a run in the ledger, so the
    # runner must report both, which shows that its checks can fail.
    case = Case(id="valid-dry-run", area="CLI arguments", expected=2, contains=("--at",),
                hint="ISO 8601", args=("run", "voucher-expired", "--dry-run"))

    outcome = workspace.run(case)

    assert outcome.code == 0, outcome.output
    assert "expected 2, got 0" in outcome.problems
    assert "the message lacks '--at'" in outcome.problems
    assert any(problem.startswith("sqlite ledger changed") for problem in outcome.problems)

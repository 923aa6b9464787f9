"""The endpoints of the HTTP API.

Handlers are plain functions, so FastAPI runs them in its thread pool: they
call the runner and the ledger, which block on the database.
"""

from __future__ import annotations

import logging
from typing import Annotated, Literal
from urllib.parse import urlencode

from fastapi import APIRouter, Body, Depends, Path, Query, Request, Response, status
from fastapi.responses import JSONResponse
from prometheus_client.exposition import choose_encoder
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from voucher_jobs.data.clock import FutureReferenceTime, check_reference_time, database_now
from voucher_jobs.data import ledger
from voucher_jobs.http.auth import TokenCheckedRoute, require_token
from voucher_jobs.http.job_status import job_status
from voucher_jobs.http.schemas import (
    ErrorBody,
    Health,
    Job,
    JobList,
    Run,
    RunAccepted,
    RunConflict,
    RunLinks,
    RunPage,
    RunPageLinks,
    RunRequest,
    UnknownJob,
    ValidationFailed,
)
from voucher_jobs.job_settings import build_parameters
from voucher_jobs.jobs import JOBS, audit_archival
from voucher_jobs.logs import log_event
from voucher_jobs.runner import RunRefused, start

logger = logging.getLogger(__name__)

MAX_PAGE_SIZE = 200
# Run ids are BIGINT on PostgreSQL and 64-bit INTEGER on SQLite, so a larger
# id would fail in the driver instead of finding no run.
MAX_RUN_ID = 2**63 - 1

# Query parameters accept only known values, so FastAPI lists them in the
# OpenAPI schema and rejects others with 422.
JobName = Literal[tuple(sorted(JOBS))]  # type: ignore[valid-type]
Status = Literal[ledger.STATUSES]  # type: ignore[valid-type]

UNAUTHORIZED = {401: {"model": ErrorBody, "description": "Missing or invalid bearer token."}}
INVALID = {422: {"model": ValidationFailed, "description": "Invalid parameter or body."}}
UNAVAILABLE = {503: {"model": ErrorBody, "description": "The database is unreachable or busy."}}

# The dependency declares the token in the OpenAPI schema, and
# TokenCheckedRoute checks it before FastAPI reads the body.
api = APIRouter(route_class=TokenCheckedRoute, dependencies=[Depends(require_token)],
                responses={**UNAUTHORIZED, **UNAVAILABLE})
open_api = APIRouter()


def _prefix(request: Request) -> str:
    """Return the path prefix under which the app is mounted, if any."""
    return request.scope.get("root_path", "").rstrip("/")


def _unknown_job(job: str) -> JSONResponse:
    known = sorted(JOBS)
    return JSONResponse(
        status_code=status.HTTP_404_NOT_FOUND,
        content={"detail": f"Job {job!r} not found. Known jobs: {', '.join(known)}.",
                 "known_jobs": known},
    )


def _invalid_reference_time(reason: str) -> JSONResponse:
    """Return 422 for a reference time that the body model accepts but the run cannot use.

    The body has the same fields as every other 422, which the OpenAPI schema documents.
    """
    return JSONResponse(
        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
        content={"message": f"Invalid body field 'reference_time': {reason}",
                 "detail": [{"loc": ["body", "reference_time"], "msg": reason,
                             "type": "value_error"}]},
    )


@api.post(
    "/jobs/{name}/runs",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=RunAccepted,
    responses={
        400: {"model": ErrorBody, "description": "The body could not be read, such as JSON "
              "that is not UTF-8."},
        404: {"model": UnknownJob, "description": "No job has this name."},
        409: {"model": RunConflict, "description": "Another run of the job is active."},
        413: {"model": ErrorBody, "description": "The body is larger than 16 KiB."},
        **INVALID,
    },
    summary="Start a run of a job",
)
def start_run(
    request: Request,
    response: Response,
    name: Annotated[str, Path(description="The job: voucher-expired or audit-archival.")],
    body: Annotated[RunRequest | None, Body()] = None,
) -> RunAccepted | JSONResponse:
    """Record a run and start it in the background; poll the Location URL for its outcome.

    The job's lock is taken before the response is sent, so a 202 means the
    run holds it and a concurrent request gets 409.
    """
    if name not in JOBS:
        return _unknown_job(name)
    state = request.app.state
    options = body or RunRequest()
    if options.reference_time is not None:
        with state.engine.connect() as connection:
            try:
                check_reference_time(options.reference_time, database_now(connection))
            except FutureReferenceTime as exc:
                return _invalid_reference_time(str(exc))
            if name == audit_archival.NAME:
                try:
                    audit_archival.compute_cutoff(options.reference_time,
                                                  state.settings.retention_days)
                except ValueError as exc:
                    return _invalid_reference_time(str(exc))
    parameters = build_parameters(
        name, state.settings, dry_run=options.dry_run, reference_time=options.reference_time
    )
    try:
        active = start(state.engine, name, parameters, trigger="http")
    except RunRefused as refused:
        return JSONResponse(
            status_code=status.HTTP_409_CONFLICT,
            content=RunConflict(
                detail=str(refused),
                active_run_id=refused.active_run_id,
                skipped_run_id=refused.skipped_run_id,
            ).model_dump(),
        )
    state.background_runs.launch(active)
    run_id = active.record.id
    prefix = _prefix(request)
    log_event(logger, "http_run_accepted", job=name, run_id=run_id,
              dry_run=options.dry_run)
    response.headers["Location"] = f"{prefix}/runs/{run_id}"
    return RunAccepted(
        run_id=run_id,
        status=ledger.RUNNING,
        links=RunLinks(self=f"{prefix}/runs/{run_id}", job=f"{prefix}/jobs/{name}"),
    )


@api.get("/jobs", response_model=JobList, summary="List the jobs")
def list_jobs(request: Request) -> JobList:
    """List each job's schedule, next fire time, active run and newest run that was not skipped."""
    state = request.app.state
    prefix = _prefix(request)
    return JobList(
        jobs=[job_status(state.engine, state.settings, job, prefix) for job in sorted(JOBS)]
    )


@api.get(
    "/jobs/{name}",
    response_model=Job,
    responses={404: {"model": UnknownJob, "description": "No job has this name."}},
    summary="Show one job",
)
def get_job(request: Request, name: str) -> Job | JSONResponse:
    if name not in JOBS:
        return _unknown_job(name)
    state = request.app.state
    return job_status(state.engine, state.settings, name, _prefix(request))


@api.get(
    "/runs/{run_id}",
    response_model=Run,
    responses={404: {"model": ErrorBody, "description": "No run has this id."}, **INVALID},
    summary="Show one run",
)
def get_run(request: Request,
            run_id: Annotated[int, Path(ge=1, le=MAX_RUN_ID)]) -> Run | JSONResponse:
    row = ledger.get_run(request.app.state.engine, run_id)
    if row is None:
        return JSONResponse(status_code=status.HTTP_404_NOT_FOUND,
                            content={"detail": f"Run {run_id} not found. GET /runs lists "
                                     "the recorded runs."})
    return Run.from_row(row, _prefix(request))


@api.get("/runs", response_model=RunPage, responses=INVALID, summary="List runs, newest first")
def list_runs(
    request: Request,
    job: Annotated[JobName | None, Query(description="Only runs of this job.")] = None,
    status_: Annotated[Status | None, Query(alias="status",
                                            description="Only runs with this status.")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE, description="Runs per page.")] = 20,
    before_id: Annotated[int | None, Query(
        ge=1, le=MAX_RUN_ID,
        description="Only runs with a smaller id: the next link sets it.")] = None,
) -> RunPage:
    """Page through the ledger by id, newest first; follow links.next for older runs."""
    rows = ledger.recent_runs(request.app.state.engine, job=job, status=status_,
                              limit=limit + 1, before_id=before_id)
    prefix = _prefix(request)
    next_link = None
    if len(rows) > limit:
        rows = rows[:limit]
        query = {"job": job, "status": status_, "limit": limit, "before_id": rows[-1].id}
        parameters = {key: value for key, value in query.items() if value is not None}
        next_link = f"{prefix}/runs?{urlencode(parameters)}"
    return RunPage(runs=[Run.from_row(row, prefix) for row in rows],
                   links=RunPageLinks(next=next_link))


@api.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}},
                     "description": "Prometheus text exposition format."}},
    summary="Prometheus metrics from the run ledger",
)
def metrics(request: Request) -> Response:
    """Compute the metrics from the run ledger at scrape time, the same on every replica."""
    encoder, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(content=encoder(request.app.state.metrics_registry),
                    media_type=content_type)


@open_api.get(
    "/healthz",
    response_model=Health,
    responses={503: {"model": Health, "description": "The database is unreachable."}},
    summary="Check that the database answers",
)
def healthz(request: Request) -> Health | JSONResponse:
    """Run SELECT 1 on the database. Needs no token, so load balancers and probes can call it."""
    try:
        with request.app.state.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        log_event(logger, "health_check_failed", logging.WARNING,
                  error=type(getattr(exc, "orig", None) or exc).__name__)
        return JSONResponse(status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
                            content={"status": "unavailable", "database": "unreachable"})
    return Health(status="ok", database="ok")

"""Request and response bodies of the HTTP API, as pydantic models.

The models also define the OpenAPI schema served at /openapi.json.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StrictBool, field_validator

from voucher_jobs.data.ledger import RunRow


class RunRequest(BaseModel):
    """Body of POST /jobs/{name}/runs; every field is optional."""

    model_config = ConfigDict(extra="forbid")

    dry_run: StrictBool = Field(
        default=False, description="Report what the run would write or remove; write nothing."
    )
    reference_time: AwareDatetime | None = Field(
        default=None,
        description="Reference time instead of the database clock's now: ISO 8601 with a "
        "UTC offset or Z, such as 2026-12-04T10:00:00Z. For backfills and tests.",
    )

    @field_validator("reference_time", mode="before")
    @classmethod
    def _reference_time_is_text(cls, value: Any) -> Any:
        # pydantic would also accept a number of seconds since the epoch.
        # Only ISO 8601 text carries the UTC offset that the API requires.
        if value is not None and not isinstance(value, str):
            raise ValueError("must be an ISO 8601 string such as 2026-12-04T10:00:00Z")
        return value

    @field_validator("reference_time")
    @classmethod
    def _reference_time_has_utc_value(cls, value: datetime | None) -> datetime | None:
        # Every run converts the time to UTC. An offset can move a time in
        # year 1 or 9999 out of the range that datetime represents.
        if value is not None:
            try:
                value.astimezone(timezone.utc)
            except OverflowError:
                raise ValueError("must be between years 1 and 9999 in UTC") from None
        return value


class RunLinks(BaseModel):
    """Paths of the resources related to a run."""

    self: str
    job: str


class RunAccepted(BaseModel):
    """Body of the 202 response: the run is recorded and runs in the background."""

    run_id: int
    status: str = Field(description="Always running: poll the self link for the outcome.")
    links: RunLinks


class RunConflict(BaseModel):
    """Body of the 409 response: another run of the job is active."""

    detail: str
    active_run_id: int | None = Field(
        description="The run that holds the job's lock. Null when the lock holder had "
        "recorded no running run a second after this request was rejected."
    )
    skipped_run_id: int | None = Field(
        description="This attempt, recorded in the ledger with status skipped."
    )


class ErrorBody(BaseModel):
    """Body of most error responses."""

    detail: str


class UnknownJob(BaseModel):
    """Body of the 404 response for a job name that does not exist."""

    detail: str
    known_jobs: list[str]


class ValidationIssue(BaseModel):
    """One invalid input, in FastAPI's format without the echoed input."""

    loc: list[str | int]
    msg: str
    type: str


class ValidationFailed(BaseModel):
    """Body of a 422 response."""

    message: str = Field(description="The first problem, naming the parameter or field.")
    detail: list[ValidationIssue]


class Run(BaseModel):
    """One row of the run ledger."""

    id: int
    job: str
    trigger: str = Field(description="What started the run: cli, scheduler, http or test.")
    status: str = Field(description="running, succeeded, failed, skipped or interrupted.")
    parameters: dict[str, Any]
    started_at: datetime
    finished_at: datetime | None
    heartbeat_at: datetime | None = Field(
        description="When the running process last stored its progress."
    )
    duration_seconds: float | None = Field(description="finished_at minus started_at.")
    rows_affected: int
    result: dict[str, Any] | None
    error: str | None
    host: str
    pid: int
    blocked_by_run_id: int | None = Field(
        description="For a skipped run: the run that was active at the time."
    )
    run_key: str | None = Field(description="The scheduler's job and fire time, if any.")
    links: RunLinks

    @classmethod
    def from_row(cls, row: RunRow, prefix: str = "") -> Run:
        duration = None
        if row.finished_at is not None:
            duration = (row.finished_at - row.started_at).total_seconds()
        return cls(
            id=row.id,
            job=row.job,
            trigger=row.trigger,
            status=row.status,
            parameters=row.parameters,
            started_at=row.started_at,
            finished_at=row.finished_at,
            heartbeat_at=row.heartbeat_at,
            duration_seconds=duration,
            rows_affected=row.rows_affected,
            result=row.result,
            error=row.error,
            host=row.host,
            pid=row.pid,
            blocked_by_run_id=row.blocked_by_run_id,
            run_key=row.run_key,
            links=RunLinks(self=f"{prefix}/runs/{row.id}", job=f"{prefix}/jobs/{row.job}"),
        )


class RunPageLinks(BaseModel):
    """Path of the next, older page; null on the last page."""

    next: str | None


class RunPage(BaseModel):
    """Body of GET /runs: newest runs first."""

    runs: list[Run]
    links: RunPageLinks


class Job(BaseModel):
    """A job, its schedule and its most recent run."""

    name: str
    schedule: str = Field(description="Cron expression, evaluated in the time zone below.")
    timezone: str = Field(description="IANA time zone of the schedule.")
    enabled: bool = Field(description="Whether the scheduler starts this job.")
    next_fire_time: datetime | None = Field(
        description="Next time the schedule fires after now; null when the job is "
        "disabled or the expression is invalid."
    )
    schedule_error: str | None = Field(
        description="Why the cron expression is invalid, if it is."
    )
    heartbeat_configured: bool = Field(
        description="Whether a heartbeat URL is set; the URL itself is never shown."
    )
    active_run_id: int | None = Field(description="The run in progress, if any.")
    last_run: Run | None = Field(
        description="The newest run that was not skipped, with its outcome in status."
    )


class JobList(BaseModel):
    """Body of GET /jobs."""

    jobs: list[Job]


class Health(BaseModel):
    """Body of GET /healthz."""

    status: str = Field(description="ok or unavailable.")
    database: str = Field(description="ok or unreachable.")

"""Settings, read once from the environment (and a `.env` file) and validated.

Two variables keep the names the voucher backend already uses:
`DATABASE_URL` and `VOUCHER_AUDIT_RETENTION_DAYS`. Every other setting
carries the `VOUCHER_JOBS_` prefix. This module imports nothing of the
project, so every layer may depend on it.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any

from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "VOUCHER_JOBS_"
DEFAULT_DATABASE_URL = "sqlite:///voucher-jobs.db"


class ArchiveMode(str, enum.Enum):
    """The action audit-archival takes on a row past the retention."""

    DELETE = "delete"
    ARCHIVE_TABLE = "archive-table"
    ARCHIVE_FILE = "archive-file"


class Settings(BaseSettings):
    """The effective configuration of one process."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        case_sensitive=False,
        # Reject NaN and infinity as not finite, instead of with a range error
        # that gives a misleading reason.
        allow_inf_nan=False,
    )

    database_url: str = Field(
        default=DEFAULT_DATABASE_URL,
        validation_alias=AliasChoices("DATABASE_URL", "VOUCHER_JOBS_DATABASE_URL"),
        description="SQLAlchemy or backend-style database URL.",
    )
    retention_days: int = Field(
        default=730,
        ge=1,
        le=36500,
        validation_alias=AliasChoices(
            "VOUCHER_AUDIT_RETENTION_DAYS", "VOUCHER_JOBS_RETENTION_DAYS"
        ),
        description="Audit rows older than this many days are archived.",
    )
    batch_size: int = Field(
        default=1000,
        ge=1,
        le=100_000,
        description="Rows of the first batch; of every batch when the batch target is 0.",
    )
    batch_target_ms: int = Field(
        default=50,
        ge=0,
        le=10_000,
        description="Milliseconds a batch should take; batches grow or shrink to match. "
        "0 keeps every batch at the batch size.",
    )
    archive_mode: ArchiveMode = Field(
        default=ArchiveMode.DELETE,
        description="delete, archive-table or archive-file.",
    )
    archive_dir: Path = Field(
        default=Path("archive"), description="Folder for archive-file mode."
    )
    archive_file_rows: int = Field(
        default=100_000,
        ge=1,
        le=10_000_000,
        description="Maximum rows in one archive file.",
    )
    batch_pause_seconds: float = Field(
        default=0.0, ge=0.0, le=3600.0, description="Sleep between two batches."
    )
    lock_timeout_seconds: float = Field(
        default=5.0,
        gt=0.0,
        le=600.0,
        description="How long one statement waits for a row lock before failing.",
    )
    partition_lock_timeout_seconds: float = Field(
        default=2.0,
        gt=0.0,
        le=600.0,
        description="How long retiring a whole audit partition waits for its table locks "
        "before it leaves the partition to the batches. The application's queries on "
        "voucher_audit_logs queue behind that wait.",
    )

    # Schedules. The cron expressions are checked by voucher_jobs.scheduler.cron
    # when a scheduler starts, because that module owns cron semantics.
    schedule_timezone: str = Field(
        default="UTC", description="IANA time zone of the cron schedules."
    )
    voucher_expired_schedule: str = Field(
        default="0 2 * * *", description="Cron expression of voucher-expired."
    )
    audit_archival_schedule: str = Field(
        default="0 3 * * *", description="Cron expression of audit-archival."
    )
    voucher_expired_enabled: bool = Field(default=True)
    audit_archival_enabled: bool = Field(default=True)
    voucher_expired_max_run_seconds: float = Field(default=3600.0, gt=0, le=7 * 86400)
    audit_archival_max_run_seconds: float = Field(default=4 * 3600.0, gt=0, le=7 * 86400)
    catchup_max_lateness_seconds: float = Field(
        default=86400.0,
        ge=0,
        le=30 * 86400,
        description="A missed fire time older than this gets no catch-up run.",
    )
    retry_attempts: int = Field(default=3, ge=0, le=20)
    retry_base_seconds: float = Field(default=1.0, gt=0, le=600)
    voucher_expired_heartbeat_url: str | None = Field(default=None)
    audit_archival_heartbeat_url: str | None = Field(default=None)

    # HTTP API.
    api_token: SecretStr | None = Field(default=None)
    api_allow_unauthenticated: bool = Field(default=False)
    api_host: str = Field(default="127.0.0.1")
    api_port: int = Field(default=8080, ge=1, le=65535)

    @field_validator("schedule_timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value.strip())
        except (ZoneInfoNotFoundError, ValueError, OSError):
            # OSError: a name such as "Europe" is a folder of the zone database.
            raise ValueError("is not an IANA time zone name") from None
        return value.strip()

    @field_validator("api_token")
    @classmethod
    def _token_not_blank(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value().strip()) < 16:
            raise ValueError("must be at least 16 characters")
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value.strip()

    @field_validator("archive_mode", mode="before")
    @classmethod
    def _archive_mode_any_case(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("archive_dir", mode="before")
    @classmethod
    def _archive_dir_not_blank(cls, value: Any) -> Any:
        # Checked before the conversion, which turns "" into Path("."), the
        # working directory.
        if isinstance(value, str) and not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("api_host")
    @classmethod
    def _api_host_not_blank(cls, value: str) -> str:
        # uvicorn would bind an empty host on every interface.
        if not value.strip():
            raise ValueError("must not be empty")
        return value.strip()


# Environment variable names by field, as users type them, for error messages
# and for `voucher-jobs config`.
ENV_NAMES: dict[str, str] = {
    "database_url": "DATABASE_URL",
    "retention_days": "VOUCHER_AUDIT_RETENTION_DAYS",
    "batch_size": f"{ENV_PREFIX}BATCH_SIZE",
    "batch_target_ms": f"{ENV_PREFIX}BATCH_TARGET_MS",
    "archive_mode": f"{ENV_PREFIX}ARCHIVE_MODE",
    "archive_dir": f"{ENV_PREFIX}ARCHIVE_DIR",
    "archive_file_rows": f"{ENV_PREFIX}ARCHIVE_FILE_ROWS",
    "batch_pause_seconds": f"{ENV_PREFIX}BATCH_PAUSE_SECONDS",
    "lock_timeout_seconds": f"{ENV_PREFIX}LOCK_TIMEOUT_SECONDS",
}
ENV_NAMES.update(
    {
        name: f"{ENV_PREFIX}{name.upper()}"
        for name in Settings.model_fields
        if name not in ENV_NAMES
    }
)
SECRET_FIELDS = {"api_token"}


class ConfigError(Exception):
    """An invalid setting: names the variable, the value and the fix."""


def load_settings(**overrides: Any) -> Settings:
    """Read and validate the settings, raising ConfigError on the first bad value."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc)) from None


def describe_validation_error(exc: ValidationError) -> str:
    """Turn pydantic's error into lines of `NAME=value is invalid: reason`."""
    lines = []
    for error in exc.errors():
        # pydantic reports an aliased field under its first alias, such as
        # DATABASE_URL, and any other field under its name.
        location = str(error["loc"][0]) if error["loc"] else ""
        field = _field_of(location)
        name = ENV_NAMES.get(field, location.upper())
        value = error.get("input")
        shown = "(masked)" if field in ("database_url", *SECRET_FIELDS) else repr(value)
        reason = error["msg"].removeprefix("Value error, ")
        lines.append(f"{name}={shown} is invalid: {reason}. {_hint(field)}".rstrip())
    return "\n".join(lines)


def _field_of(location: str) -> str:
    """Return the field name for an error location, which may be an alias."""
    for name, info in Settings.model_fields.items():
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            choices = {str(choice).upper() for choice in alias.choices}
            if location.upper() in choices:
                return name
    return location


def _hint(field: str) -> str:
    hints = {
        "retention_days": "Set it to a whole number of days from 1 to 36500.",
        "batch_size": "Set it to a whole number of rows from 1 to 100000.",
        "batch_target_ms": "Set it to a whole number of milliseconds from 0 (fixed batches) "
        "to 10000.",
        "archive_mode": "Use one of: delete, archive-table, archive-file.",
        "archive_file_rows": "Set it to a whole number from 1 to 10000000.",
        "batch_pause_seconds": "Set it to a number of seconds from 0 to 3600.",
        "lock_timeout_seconds": "Set it to a number of seconds above 0, at most 600.",
        "partition_lock_timeout_seconds": "Set it to a number of seconds above 0, at most 600.",
        "database_url": "Use a URL such as sqlite:///voucher-jobs.db or "
        "postgresql://user:password@localhost:5432/shop.",
        "archive_dir": "Set it to a folder path.",
        "schedule_timezone": "Use an IANA name such as UTC or Europe/Berlin.",
        "api_token": "Use a random string of at least 16 characters.",
        "retry_attempts": "Set it to a whole number from 0 to 20.",
        "retry_base_seconds": "Set it to a number of seconds above 0, at most 600.",
        "voucher_expired_max_run_seconds": "Set it to a number of seconds above 0, "
        "at most 604800.",
        "audit_archival_max_run_seconds": "Set it to a number of seconds above 0, "
        "at most 604800.",
        "catchup_max_lateness_seconds": "Set it to a number of seconds from 0 to 2592000.",
        "voucher_expired_enabled": "Use true or false.",
        "audit_archival_enabled": "Use true or false.",
        "api_allow_unauthenticated": "Use true or false.",
        "api_port": "Set it to a TCP port number from 1 to 65535.",
        "api_host": "Set it to the address to bind, such as 127.0.0.1.",
    }
    return hints.get(field, "Run `voucher-jobs config --help` and see docs/configuration.md.")

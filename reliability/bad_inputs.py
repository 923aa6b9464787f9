"""The catalogue of bad inputs, and a runner that tries each one.

Every case is one bad value: a setting, a command-line argument, a cron
expression or time zone, a database URL or database, or an HTTP request.
Each must get its exit code (2 for invalid input, 4 for a database or schema
problem) or HTTP status. Its message must contain the value, the name of the
setting or option, and a word of the fix. Nothing may be written: the row
counts of every table, the run ledger and the files in the working folder
and beside the databases stay as they were.

    python -m reliability.bad_inputs [--markdown] [--processes] [--only ID ...]

The runner prints one line per case and a summary. It exits with 1 when a
case got another exit code or status, a message without an expected text, or
wrote something. `--markdown` prints a table for the docs.
CLI cases call the command's entry point in this process, unless
`--processes` runs each as a real `voucher-jobs` process. HTTP cases call
the FastAPI app through its TestClient. tests/test_bad_inputs.py runs the
same catalogue under pytest, one test per case.

The PostgreSQL cases run on a private cluster (reliability.postgres_cluster)
with password authentication, so that a wrong password is rejected. Without
the PostgreSQL binaries they are not run.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from unittest import mock

from sqlalchemy import Engine, create_engine, inspect, insert, select, text

from reliability.postgres_cluster import BIN, Cluster, free_port
from voucher_jobs.config import Settings
from voucher_jobs.data import migrate
from voucher_jobs.data.engine import create_db_engine
from voucher_jobs.data.schema import runs, voucher_audit_logs, vouchers

# Markers that the cases and the secret checks refer to.
API_TOKEN = "bad-inputs-token-4e1f9a2b7c"
OWNER_PASSWORD = "owner-pw-5d3c"
READER_PASSWORD = "reader-pw-8b2e"
CLUSTER_PASSWORD = "cluster-pw-1a7f"
JOB = "voucher-expired"

# A regression that let `serve` or `scheduler` start would run until killed.
PROCESS_TIMEOUT_SECONDS = 60
ERROR_PREFIXES = ("error:", "Error:", "skipped:")


# The catalogue


@dataclass(frozen=True)
class Request:
    """One HTTP request. `{token}` in a header value becomes the API token."""

    method: str
    path: str
    headers: Mapping[str, str] = field(default_factory=lambda: {
        "Authorization": "Bearer {token}"})
    json: Any = None
    content: bytes | None = None
    # Sent with chunked transfer encoding, so without a Content-Length.
    chunks: tuple[bytes, ...] | None = None


@dataclass(frozen=True)
class Case:
    """One bad input, with the exit code or status and the message it must get.

    `args` and `env` are a `voucher-jobs` command line and its environment;
    `request` makes it an HTTP case instead. In args, env values and the
    expected strings, `{name}` stands for a value of the workspace, such as
    `{closed_port}` (see Workspace.values).
    """

    id: str
    area: str
    expected: int
    contains: tuple[str, ...]
    hint: str
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    # The database the command works on, a key of Workspace.urls, unless env
    # sets DATABASE_URL itself.
    database: str = "sqlite"
    request: Request | None = None
    # Files written to the working folder before the command runs.
    files: Mapping[str, str] = field(default_factory=dict)
    # The job whose lock is held while the request runs: the one case where
    # the product records something, a skipped run in the ledger.
    hold_lock: str | None = None
    input: str = ""

    @property
    def is_http(self) -> bool:
        return self.request is not None

    @property
    def needs_postgres(self) -> bool:
        return self.database.startswith("postgresql")

    def shown_input(self) -> str:
        """Return the input as a user would type it, with placeholders kept."""
        if self.input:
            return self.input
        if self.request is not None:
            return _show_request(self.request)
        assignments = [f"{name}={shlex.quote(value)}" for name, value in self.env.items()]
        assignments += [f"{name} file: {content.strip()}" for name, content in self.files.items()]
        command = shlex.join(("voucher-jobs", *self.args))
        return " ".join([*assignments, command])


def _show_request(request: Request) -> str:
    description = f"{request.method} {request.path}"
    token = request.headers.get("Authorization")
    if token is None:
        description += " without Authorization"
    elif token != "Bearer {token}":
        description += f" with Authorization: {token}"
    if request.json is not None:
        description += f" {json.dumps(request.json)}"
    if request.content is not None:
        body = request.content.decode("utf-8", "replace")
        description += f" body {body[:40]!r}" + ("..." if len(body) > 40 else "")
    if request.chunks is not None:
        description += f" chunked body of {sum(map(len, request.chunks))} bytes"
    return description


def setting(id: str, variable: str, value: str, hint: str, *,
            args: tuple[str, ...] = ("run", "audit-archival"),
            contains: tuple[str, ...] | None = None) -> Case:
    """Return a case for one invalid setting: exit 2, naming the variable and value."""
    return Case(id=f"setting-{id}", area="configuration", expected=2,
                contains=contains if contains is not None else (variable, repr(value)),
                hint=hint, args=args, env={variable: value})


RETENTION = "VOUCHER_AUDIT_RETENTION_DAYS"
PREFIX = "VOUCHER_JOBS_"
EXPIRED_SCHEDULE = f"{PREFIX}VOUCHER_EXPIRED_SCHEDULE"
ARCHIVAL_SCHEDULE = f"{PREFIX}AUDIT_ARCHIVAL_SCHEDULE"
CONFIG = ("config",)

CONFIGURATION = [
    setting("retention-zero", RETENTION, "0", "from 1 to 36500"),
    setting("retention-text", RETENTION, "abc", "from 1 to 36500"),
    setting("retention-too-large", RETENTION, "36501", "from 1 to 36500"),
    setting("retention-empty", RETENTION, "", "from 1 to 36500"),
    setting("batch-size-zero", f"{PREFIX}BATCH_SIZE", "0", "from 1 to 100000"),
    setting("batch-size-fraction", f"{PREFIX}BATCH_SIZE", "1.5", "from 1 to 100000",
            args=("run", JOB)),
    setting("batch-size-too-large", f"{PREFIX}BATCH_SIZE", "100001", "from 1 to 100000"),
    setting("batch-target-negative", f"{PREFIX}BATCH_TARGET_MS", "-1", "to 10000"),
    setting("archive-mode-unknown", f"{PREFIX}ARCHIVE_MODE", "shred", "archive-table"),
    setting("archive-mode-empty", f"{PREFIX}ARCHIVE_MODE", "", "archive-table"),
    setting("archive-dir-empty", f"{PREFIX}ARCHIVE_DIR", "", "folder path"),
    setting("archive-file-rows-zero", f"{PREFIX}ARCHIVE_FILE_ROWS", "0", "from 1 to 10000000"),
    setting("archive-file-rows-text", f"{PREFIX}ARCHIVE_FILE_ROWS", "many",
            "from 1 to 10000000"),
    setting("batch-pause-negative", f"{PREFIX}BATCH_PAUSE_SECONDS", "-1", "from 0 to 3600"),
    setting("batch-pause-nan", f"{PREFIX}BATCH_PAUSE_SECONDS", "nan", "from 0 to 3600"),
    setting("lock-timeout-zero", f"{PREFIX}LOCK_TIMEOUT_SECONDS", "0", "above 0"),
    setting("lock-timeout-too-large", f"{PREFIX}LOCK_TIMEOUT_SECONDS", "601", "at most 600"),
    setting("partition-lock-timeout-word", f"{PREFIX}PARTITION_LOCK_TIMEOUT_SECONDS", "2s",
            "above 0"),
    setting("timezone-unknown", f"{PREFIX}SCHEDULE_TIMEZONE", "Mars/Olympus", "Europe/Berlin"),
    setting("timezone-folder", f"{PREFIX}SCHEDULE_TIMEZONE", "Europe", "Europe/Berlin"),
    setting("timezone-empty", f"{PREFIX}SCHEDULE_TIMEZONE", "", "Europe/Berlin"),
    setting("timezone-offset", f"{PREFIX}SCHEDULE_TIMEZONE", "+02:00", "Europe/Berlin",
            args=("schedule",)),
    setting("expired-enabled-word", f"{PREFIX}VOUCHER_EXPIRED_ENABLED", "maybe",
            "true or false"),
    setting("archival-enabled-number", f"{PREFIX}AUDIT_ARCHIVAL_ENABLED", "2", "true or false"),
    setting("expired-max-run-zero", f"{PREFIX}VOUCHER_EXPIRED_MAX_RUN_SECONDS", "0",
            "at most 604800", args=("run", JOB)),
    setting("archival-max-run-too-large", f"{PREFIX}AUDIT_ARCHIVAL_MAX_RUN_SECONDS", "604801",
            "at most 604800"),
    setting("catchup-negative", f"{PREFIX}CATCHUP_MAX_LATENESS_SECONDS", "-1",
            "from 0 to 2592000", args=("scheduler",)),
    setting("retry-attempts-too-many", f"{PREFIX}RETRY_ATTEMPTS", "21", "from 0 to 20"),
    setting("retry-attempts-word", f"{PREFIX}RETRY_ATTEMPTS", "three", "from 0 to 20"),
    setting("retry-base-zero", f"{PREFIX}RETRY_BASE_SECONDS", "0", "above 0"),
    # A heartbeat URL often carries its secret in the path, so the message
    # names the variable but not the value.
    setting("expired-heartbeat-scheme", f"{PREFIX}VOUCHER_EXPIRED_HEARTBEAT_URL",
            "ftp://127.0.0.1/ping", "https://", args=("run", JOB),
            contains=(f"{PREFIX}VOUCHER_EXPIRED_HEARTBEAT_URL", "(masked)")),
    setting("archival-heartbeat-no-host", f"{PREFIX}AUDIT_ARCHIVAL_HEARTBEAT_URL",
            "https:///ping", "https://",
            contains=(f"{PREFIX}AUDIT_ARCHIVAL_HEARTBEAT_URL", "(masked)")),
    setting("api-token-short", f"{PREFIX}API_TOKEN", "short", "at least 16 characters",
            args=CONFIG, contains=(f"{PREFIX}API_TOKEN", "(masked)")),
    setting("api-token-blank", f"{PREFIX}API_TOKEN", " " * 16, "at least 16 characters",
            args=CONFIG, contains=(f"{PREFIX}API_TOKEN", "(masked)")),
    setting("allow-unauthenticated-word", f"{PREFIX}API_ALLOW_UNAUTHENTICATED", "sometimes",
            "true or false", args=CONFIG),
    setting("api-host-empty", f"{PREFIX}API_HOST", "", "127.0.0.1", args=CONFIG),
    setting("api-port-zero", f"{PREFIX}API_PORT", "0", "from 1 to 65535", args=CONFIG),
    setting("api-port-word", f"{PREFIX}API_PORT", "http", "from 1 to 65535", args=CONFIG),
    setting("api-port-too-large", f"{PREFIX}API_PORT", "65536", "from 1 to 65535",
            args=CONFIG),
    setting("database-url-empty", "DATABASE_URL", "", "sqlite:///", args=("run", JOB),
            contains=("DATABASE_URL", "must not be empty")),
    Case(id="setting-dotenv-batch-size", area="configuration", expected=2,
         contains=(f"{PREFIX}BATCH_SIZE", "'-5'"), hint="from 1 to 100000",
         args=("run", JOB), files={".env": f"{PREFIX}BATCH_SIZE=-5\n"}),
]


def argument(id: str, args: tuple[str, ...], contains: tuple[str, ...], hint: str,
             **options: Any) -> Case:
    return Case(id=f"cli-{id}", area="CLI arguments", expected=options.pop("expected", 2),
                contains=contains, hint=hint, args=args, **options)


ARCHIVE_FILE = ("run", "audit-archival", "--mode", "archive-file")
SERVE = ("serve", "--port", "{free_port}")

CLI_ARGUMENTS = [
    argument("unknown-job", ("run", "expire-all"), ("'expire-all'",), "--help"),
    argument("unknown-command", ("purge",), ("'purge'",), "--help"),
    argument("mode-unknown", ("run", "audit-archival", "--mode", "shred"),
             ("--mode", "'shred'"), "archive-table"),
    argument("batch-size-negative", ("run", JOB, "--batch-size", "-1"),
             ("--batch-size", "'-1'"), "greater than or equal to 1"),
    argument("batch-size-word", ("run", JOB, "--batch-size", "ten"),
             ("--batch-size", "'ten'"), "integer"),
    argument("batch-size-too-large", ("run", "audit-archival", "--batch-size", "100001"),
             ("--batch-size", "'100001'"), "less than or equal to 100000"),
    argument("batch-target-too-large", ("run", JOB, "--batch-target-ms", "10001"),
             ("--batch-target-ms", "'10001'"), "less than or equal to 10000"),
    argument("max-batches-zero", ("run", JOB, "--max-batches", "0"),
             ("--max-batches", "'0'"), "greater than or equal to 1"),
    argument("max-seconds-zero", ("run", "audit-archival", "--max-seconds", "0"),
             ("--max-seconds", "'0'"), "greater than or equal to 0.001"),
    argument("pause-negative", ("run", JOB, "--pause", "-1"),
             ("--pause", "'-1'"), "greater than or equal to 0"),
    argument("retention-days-zero", ("run", "audit-archival", "--retention-days", "0"),
             ("--retention-days", "'0'"), "greater than or equal to 1"),
    argument("at-word", ("run", JOB, "--at", "yesterday"),
             ("--at", "'yesterday'"), "2026-12-04T10:00:00Z"),
    argument("at-without-zone", ("run", JOB, "--at", "2026-01-01T00:00:00"),
             ("--at", "'2026-01-01T00:00:00'"), "Add Z"),
    argument("at-impossible-date", ("run", JOB, "--at", "2026-02-30T00:00:00Z"),
             ("--at", "'2026-02-30T00:00:00Z'"), "2026-12-04T10:00:00Z"),
    argument("at-empty", ("run", JOB, "--at", ""), ("--at", "''"), "2026-12-04T10:00:00Z"),
    argument("at-future", ("run", JOB, "--at", "2999-01-01T00:00:00Z"),
             ("--at", "2999-01-01T00:00:00"), "time in the past"),
    argument("at-future-archival", ("run", "audit-archival", "--at", "2999-01-01T00:00:00+02:00"),
             ("--at", "2998-12-31T22:00:00"), "time in the past"),
    argument("at-before-cutoff-range", ("run", "audit-archival", "--at", "0001-06-01T00:00:00Z"),
             ("--at", "0001-06-01T00:00:00", "730 days"), "later reference time"),
    argument("archive-dir-is-file", (*ARCHIVE_FILE, "--archive-dir", "{file}"),
             ("--archive-dir", "{file}"), "is a file"),
    argument("archive-dir-under-file", (*ARCHIVE_FILE, "--archive-dir", "{file}/archive"),
             ("--archive-dir", "{file}/archive"), "writable folder"),
    argument("archive-dir-read-only", (*ARCHIVE_FILE, "--archive-dir", "{read_only_dir}"),
             ("--archive-dir", "{read_only_dir}"), "writable folder"),
    argument("archive-dir-setting-read-only", ("run", "audit-archival"),
             (f"{PREFIX}ARCHIVE_DIR", "{read_only_dir}"), "writable folder",
             env={f"{PREFIX}ARCHIVE_MODE": "archive-file",
                  f"{PREFIX}ARCHIVE_DIR": "{read_only_dir}"}),
    argument("option-of-other-job", ("run", JOB, "--mode", "delete"),
             ("--mode",), "--help"),
    argument("runs-status-unknown", ("runs", "--status", "done"),
             ("--status", "'done'"), "succeeded"),
    argument("runs-job-unknown", ("runs", "--job", "expire-all"),
             ("--job", "'expire-all'"), "audit-archival"),
    argument("runs-limit-zero", ("runs", "--limit", "0"),
             ("--limit", "'0'"), "greater than or equal to 1"),
    argument("schedule-count-zero", ("schedule", "--count", "0"),
             ("--count", "'0'"), "greater than or equal to 1"),
    argument("db-unknown-subcommand", ("db", "downgrade"), ("'downgrade'",), "--help"),
    argument("serve-port-zero", ("serve", "--port", "0"), ("--port", "'0'"),
             "greater than or equal to 1", env={f"{PREFIX}API_TOKEN": API_TOKEN}),
    argument("serve-workers-zero", (*SERVE, "--workers", "0"), ("--workers", "'0'"),
             "greater than or equal to 1", env={f"{PREFIX}API_TOKEN": API_TOKEN}),
    argument("serve-without-token", SERVE, (f"{PREFIX}API_TOKEN", "is not set"),
             "at least 16 characters"),
    argument("serve-public-without-token", (*SERVE, "--host", "0.0.0.0"),
             ("'0.0.0.0'", f"{PREFIX}API_ALLOW_UNAUTHENTICATED"), "bind 127.0.0.1",
             env={f"{PREFIX}API_ALLOW_UNAUTHENTICATED": "true"}),
]


def cron(id: str, expression: str, contains: tuple[str, ...], hint: str = "five fields",
         variable: str = EXPIRED_SCHEDULE, args: tuple[str, ...] = ("schedule",)) -> Case:
    return Case(id=f"cron-{id}", area="cron and time zones", expected=2,
                contains=(variable, repr(expression), *contains), hint=hint, args=args,
                env={variable: expression})


CRON = [
    cron("six-fields", "0 0 2 * * *", ("6 fields", "seconds")),
    cron("seven-fields", "0 0 2 * * * 2027", ("7 fields",)),
    cron("four-fields", "0 2 * *", ("4 fields",), variable=ARCHIVAL_SCHEDULE),
    cron("empty", "", ("is empty",)),
    cron("hour-out-of-range", "0 25 * * *", ("hour", "25", "0-23")),
    cron("minute-out-of-range", "60 2 * * *", ("minute", "60", "0-59")),
    cron("day-of-week-out-of-range", "0 2 * * 8", ("day-of-week", "0-7")),
    cron("last-day", "0 2 L * *", ("L or W",), variable=ARCHIVAL_SCHEDULE),
    cron("nearest-weekday", "0 2 15W * *", ("L or W",)),
    cron("nth-weekday", "0 2 * * 5#3", ("'#'", "Quartz")),
    cron("question-mark", "0 2 ? * *", ("'?'", "Quartz")),
    cron("step-zero", "*/0 * * * *", ("step of 0",), hint="1 or more"),
    cron("reversed-range", "0 5-1 * * *", ("5-1", "start is after its end")),
    cron("unknown-day-name", "0 2 * * MON-FOO", ("'FOO'",), hint="three-letter name"),
    cron("jenkins-hash", "H 2 * * *", ("'H'",)),
    cron("never-fires", "0 2 30 2 *", ("never fires",), variable=ARCHIVAL_SCHEDULE),
    cron("april-31", "0 3 31 4 *", ("never fires",)),
    cron("reboot", "@reboot", ("no fire times",), hint="@daily"),
    cron("unknown-macro", "@fortnightly", ("not a known macro",), hint="@weekly"),
    cron("scheduler-start", "0 3 * *", ("4 fields",), variable=ARCHIVAL_SCHEDULE,
         args=("scheduler",)),
    Case(id="cron-serve-with-scheduler", area="cron and time zones", expected=2,
         contains=(ARCHIVAL_SCHEDULE, "'0 3 31 2 *'", "never fires"), hint="five fields",
         args=(*SERVE, "--with-scheduler"),
         env={ARCHIVAL_SCHEDULE: "0 3 31 2 *", f"{PREFIX}API_TOKEN": API_TOKEN}),
    Case(id="cron-zone-with-space", area="cron and time zones", expected=2,
         contains=(f"{PREFIX}SCHEDULE_TIMEZONE", "'America/New York'"), hint="Europe/Berlin",
         args=("schedule",), env={f"{PREFIX}SCHEDULE_TIMEZONE": "America/New York"}),
]


def database(id: str, contains: tuple[str, ...], hint: str, *, expected: int = 4,
             url: str | None = None, key: str = "sqlite",
             args: tuple[str, ...] = ("run", JOB), input: str = "") -> Case:
    return Case(id=f"database-{id}", area="database", expected=expected, contains=contains,
                hint=hint, args=args, database=key,
                env={"DATABASE_URL": url} if url is not None else {}, input=input)


CLOSED = "postgresql://jobs:secret@127.0.0.1:{closed_port}"

DATABASE = [
    database("url-word", ("DATABASE_URL", "'nonsense'"), "sqlite:///", expected=2,
             url="nonsense"),
    database("url-port-word", ("DATABASE_URL", "is not a valid URL"), "postgresql://",
             expected=2, url="postgresql://jobs:secret@127.0.0.1:port/shop"),
    database("url-unknown-scheme", ("DATABASE_URL", "'mysql'"), "postgresql://", expected=2,
             url="mysql://jobs:secret@127.0.0.1:3306/shop"),
    database("url-async-driver", ("DATABASE_URL", "'postgresql+asyncpg'"), "postgresql://",
             expected=2, url="postgresql+asyncpg://jobs:secret@127.0.0.1:5432/shop"),
    database("url-sqlite-driver", ("DATABASE_URL", "'sqlite+aiosqlite'"), "sqlite:///PATH",
             expected=2, url="sqlite+aiosqlite:///jobs.db"),
    database("url-sqlite-uri", ("DATABASE_URL", "uri"), "sqlite:///PATH", expected=2,
             url="sqlite:///file:jobs.db?mode=ro&uri=true"),
    database("url-no-database", ("DATABASE_URL", "names no database"), "localhost:5432/shop",
             expected=2, url=CLOSED),
    database("url-bad-schema", ("DATABASE_URL", "schema='public;drop'"), "letters",
             expected=2, url=CLOSED + "/shop?schema=public;drop"),
    database("unreachable", ("127.0.0.1", "{closed_port}", "Connection refused"),
             "Check DATABASE_URL", url=CLOSED + "/shop"),
    database("unreachable-db-upgrade", ("127.0.0.1", "{closed_port}"), "Check DATABASE_URL",
             url=CLOSED + "/shop", args=("db", "upgrade")),
    database("wrong-password", ("password authentication failed", '"jobs_owner"'),
             "Check DATABASE_URL", key="postgresql-wrong-password",
             input="DATABASE_URL with a wrong password: voucher-jobs run voucher-expired"),
    database("wrong-password-runs", ("password authentication failed",), "Check DATABASE_URL",
             key="postgresql-wrong-password", args=("runs",),
             input="DATABASE_URL with a wrong password: voucher-jobs runs"),
    database("unknown-database", ('"no_such_db" does not exist',), "Check DATABASE_URL",
             key="postgresql-unknown-database",
             input="DATABASE_URL naming a database that does not exist"),
    database("postgresql-no-tables", ("has no voucher-jobs tables",), "voucher-jobs db upgrade",
             key="postgresql-empty", args=("run", "audit-archival"),
             input="an empty PostgreSQL database: voucher-jobs run audit-archival"),
    database("postgresql-no-tables-runs", ("has no voucher-jobs tables",),
             "voucher-jobs db upgrade", key="postgresql-empty", args=("runs",),
             input="an empty PostgreSQL database: voucher-jobs runs"),
    database("postgresql-select-only", ("permission denied", "voucher_jobs_runs"), "GRANT",
             key="postgresql-select-only",
             input="a PostgreSQL role with only SELECT: voucher-jobs run voucher-expired"),
    database("postgresql-select-only-archival", ("permission denied",), "GRANT",
             key="postgresql-select-only", args=("run", "audit-archival"),
             input="a PostgreSQL role with only SELECT: voucher-jobs run audit-archival"),
    database("sqlite-no-tables", ("has no voucher-jobs tables",), "voucher-jobs db upgrade",
             key="sqlite-empty", input="an empty SQLite file: voucher-jobs run voucher-expired"),
    database("sqlite-no-tables-check", ("has no voucher-jobs tables",),
             "voucher-jobs db upgrade", key="sqlite-empty", args=("db", "current", "--check"),
             input="an empty SQLite file: voucher-jobs db current --check"),
    database("sqlite-file-missing", ("typo.db", "does not exist"), "voucher-jobs db upgrade",
             url="sqlite:///typo.db"),
    database("sqlite-folder-missing", ("{root}/no-such-folder/jobs.db", "does not exist"),
             "DATABASE_URL", url="sqlite:///{root}/no-such-folder/jobs.db",
             args=("runs",)),
    database("sqlite-read-only-folder", ("{read_only_db}", "unable to open database file"),
             "writable", key="sqlite-read-only",
             input="a SQLite file in a read-only folder: voucher-jobs run voucher-expired"),
]


def http(id: str, expected: int, request: Request, contains: tuple[str, ...], hint: str,
         **options: Any) -> Case:
    return Case(id=f"http-{id}", area="HTTP requests", expected=expected, contains=contains,
                hint=hint, request=request, **options)


NO_TOKEN: Mapping[str, str] = {}
POST_RUN = f"/jobs/{JOB}/runs"
JSON_TYPE = {"Authorization": "Bearer {token}", "Content-Type": "application/json"}

HTTP = [
    http("missing-token", 401, Request("GET", "/runs", headers=NO_TOKEN),
         ("Missing bearer token",), "Authorization: Bearer"),
    http("wrong-token", 401,
         Request("GET", "/runs", headers={"Authorization": "Bearer not-the-token-0000"}),
         ("Invalid bearer token",), "VOUCHER_JOBS_API_TOKEN"),
    http("basic-auth", 401,
         Request("GET", "/jobs", headers={"Authorization": "Basic am9iczpzZWNyZXQ="}),
         ("Missing bearer token",), "Authorization: Bearer"),
    http("post-without-token", 401, Request("POST", POST_RUN, headers=NO_TOKEN),
         ("Missing bearer token",), "VOUCHER_JOBS_API_TOKEN"),
    http("metrics-without-token", 401, Request("GET", "/metrics", headers=NO_TOKEN),
         ("Missing bearer token",), "VOUCHER_JOBS_API_TOKEN"),
    http("post-unknown-job", 404, Request("POST", "/jobs/expire-all/runs"),
         ("'expire-all'", "not found"), "voucher-expired"),
    http("get-unknown-job", 404, Request("GET", "/jobs/expire-all"),
         ("'expire-all'", "not found"), "audit-archival"),
    http("unknown-run", 404, Request("GET", "/runs/999999"), ("999999", "not found"),
         "GET /runs"),
    http("run-id-zero", 422, Request("GET", "/runs/0"), ("'run_id'", "'0'"),
         "greater than or equal to 1"),
    http("run-id-word", 422, Request("GET", "/runs/latest"), ("'run_id'", "'latest'"),
         "integer"),
    http("runs-limit-zero", 422, Request("GET", "/runs?limit=0"), ("'limit'", "'0'"),
         "greater than or equal to 1"),
    http("runs-limit-too-large", 422, Request("GET", "/runs?limit=201"), ("'limit'", "'201'"),
         "less than or equal to 200"),
    http("runs-limit-word", 422, Request("GET", "/runs?limit=all"), ("'limit'", "'all'"),
         "integer"),
    http("runs-status-unknown", 422, Request("GET", "/runs?status=done"),
         ("'status'", "'done'"), "'succeeded'"),
    http("runs-job-unknown", 422, Request("GET", "/runs?job=expire-all"),
         ("'job'", "'expire-all'"), "'voucher-expired'"),
    http("runs-before-id-zero", 422, Request("GET", "/runs?before_id=0"),
         ("'before_id'", "'0'"), "greater than or equal to 1"),
    http("body-too-large", 413,
         Request("POST", POST_RUN, headers=JSON_TYPE,
                 content=b'{"dry_run": true, "pad": "' + b"x" * 17_000 + b'"}'),
         ("16384 bytes",), "maximum"),
    http("chunked-body-too-large", 413,
         Request("POST", POST_RUN, headers=JSON_TYPE, chunks=(b"[" + b" " * 10_000,) * 2),
         ("16384 bytes",), "maximum"),
    http("malformed-json", 422,
         Request("POST", POST_RUN, headers=JSON_TYPE, content=b'{"dry_run": tru'),
         ("JSON",), "body"),
    http("dry-run-word", 422, Request("POST", POST_RUN, json={"dry_run": "yes"}),
         ("'dry_run'", "'yes'"), "boolean"),
    http("reference-time-number", 422,
         Request("POST", POST_RUN, json={"reference_time": 1764842400}),
         ("'reference_time'", "1764842400"), "ISO 8601"),
    http("reference-time-without-zone", 422,
         Request("POST", POST_RUN, json={"reference_time": "2026-01-01T00:00:00"}),
         ("'reference_time'", "'2026-01-01T00:00:00'"), "timezone"),
    http("reference-time-future", 422,
         Request("POST", POST_RUN, json={"reference_time": "2999-01-01T00:00:00Z"}),
         ("'reference_time'", "2999-01-01T00:00:00"), "time in the past"),
    http("reference-time-before-cutoff-range", 422,
         Request("POST", "/jobs/audit-archival/runs",
                 json={"reference_time": "0001-06-01T00:00:00Z"}),
         ("'reference_time'", "0001-06-01T00:00:00"), "later reference time"),
    http("unknown-field", 422, Request("POST", POST_RUN, json={"dryrun": True}),
         ("'dryrun'",), "Extra inputs are not permitted"),
    http("body-not-object", 422, Request("POST", POST_RUN, json=[True]),
         ("body",), "object"),
    http("form-body", 422,
         Request("POST", POST_RUN, content=b"dry_run=true",
                 headers={"Authorization": "Bearer {token}",
                          "Content-Type": "application/x-www-form-urlencoded"}),
         ("body",), "object"),
    http("job-running", 409, Request("POST", POST_RUN), ("voucher-expired", "already running"),
         "Wait for it to finish", hold_lock=JOB),
]

CASES: list[Case] = [*CONFIGURATION, *CLI_ARGUMENTS, *CRON, *DATABASE, *HTTP]


# The workspace: databases, folders and placeholder values


def postgres_available() -> bool:
    """Return whether a private PostgreSQL cluster can start on this machine."""
    if not (BIN / "initdb").exists():
        return False
    return os.geteuid() != 0 or shutil.which("runuser") is not None


def postgres_required() -> bool:
    return os.environ.get("CI", "").lower() == "true" or os.environ.get(
        "VOUCHER_JOBS_REQUIRE_POSTGRES") == "1"


def seed(engine: Engine, now: datetime) -> None:
    """Add expired vouchers and old audit rows, which a run that went ahead would change."""
    with engine.begin() as connection:
        connection.execute(insert(vouchers), [
            {"code": f"BAD{i:04d}", "type": "PERCENTAGE",
             "expiry_date": now - timedelta(days=1, minutes=i),
             "created_at": now - timedelta(days=40)}
            for i in range(20)
        ])
        connection.execute(insert(voucher_audit_logs), [
            {"voucher_id": 1, "action": "UPDATED", "actor_type": "ADMIN", "code": "BAD0000",
             "metadata": {"n": i}, "created_at": now - timedelta(days=1000 - i)}
            for i in range(20)
        ])


class ReadOnlyFolder:
    """A folder that no process can write to, root included: a read-only tmpfs, or mode 0555."""

    def __init__(self, path: Path, files: Mapping[str, Path] | None = None) -> None:
        self.path = path
        self.mounted = False
        path.mkdir()
        try:
            self._fill(files or {})
        except BaseException:
            self.close()
            raise

    def _fill(self, files: Mapping[str, Path]) -> None:
        if os.geteuid() == 0:
            # Root ignores file modes, so only a read-only file system stops it.
            self._mount("size=8m")
            self.mounted = True
        for name, source in files.items():
            shutil.copy(source, self.path / name)
        if self.mounted:
            self._mount("remount,ro")
        else:
            for name in files:
                (self.path / name).chmod(0o444)
            self.path.chmod(0o555)

    def _mount(self, options: str) -> None:
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(self.path)],
                       check=True, capture_output=True, text=True)

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", str(self.path)], check=False, capture_output=True)
        else:
            self.path.chmod(0o755)


class Workspace:
    """The databases, folders and values that the cases run against.

    Everything lives under root: `work` is the working folder of every
    command, and `db` contains the SQLite files. With postgres=True it starts a
    private cluster with two roles: jobs_owner owns the migrated database
    `jobs` and the empty `jobs_empty`, and jobs_reader may only SELECT.
    """

    def __init__(self, root: Path, *, postgres: bool, processes: bool = False) -> None:
        self.root = root
        self.work = root / "work"
        self.db_folder = root / "db"
        self.processes = processes
        self.urls: dict[str, str] = {}
        self.values: dict[str, str] = {}
        self.engines: dict[str, Engine] = {}
        self.cluster: Cluster | None = None
        self.read_only_problem: str | None = None
        self._folders: list[ReadOnlyFolder] = []
        self._client: Any = None
        # Log records of runs and requests that the runner does not print.
        self.log = io.StringIO()
        self._log_handler = logging.StreamHandler(self.log)
        self.postgres = postgres

    # Set-up

    def prepare(self) -> None:
        logging.getLogger("voucher_jobs").addHandler(self._log_handler)
        self.work.mkdir(parents=True)
        self.db_folder.mkdir()
        now = datetime.now(timezone.utc)
        self._prepare_sqlite(now)
        not_a_folder = self.root / "not-a-folder"
        not_a_folder.write_text("a regular file\n")
        self.values.update(root=str(self.root), work=str(self.work), file=str(not_a_folder),
                           closed_port=str(free_port()), free_port=str(free_port()),
                           token=API_TOKEN)
        self._prepare_read_only()
        if self.postgres:
            self._prepare_postgres(now)

    def _prepare_sqlite(self, now: datetime) -> None:
        path = self.db_folder / "jobs.db"
        self.urls["sqlite"] = f"sqlite:///{path}"
        engine = create_db_engine(self.urls["sqlite"])
        migrate.upgrade(engine)
        seed(engine, now)
        engine.dispose()
        # An empty database in WAL mode already, so that opening it changes nothing.
        empty = self.db_folder / "empty.db"
        connection = sqlite3.connect(empty)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.close()
        self.urls["sqlite-empty"] = f"sqlite:///{empty}"
        for key in ("sqlite", "sqlite-empty"):
            self.engines[key] = create_engine(self.urls[key])

    def _prepare_read_only(self) -> None:
        try:
            archive = ReadOnlyFolder(self.root / "read-only-archive")
            self._folders.append(archive)
            database = ReadOnlyFolder(self.root / "read-only-db",
                                      {"jobs.db": self.db_folder / "jobs.db"})
            self._folders.append(database)
        except (OSError, subprocess.CalledProcessError) as exc:
            self.read_only_problem = f"cannot make a read-only folder: {exc}"
            return
        self.values["read_only_dir"] = str(archive.path)
        self.values["read_only_db"] = str(database.path / "jobs.db")
        self.urls["sqlite-read-only"] = f"sqlite:///{database.path / 'jobs.db'}"

    def _prepare_postgres(self, now: datetime) -> None:
        self.cluster = Cluster(CLUSTER_PASSWORD)
        self.cluster.start()
        admin = create_db_engine(self.cluster.url(), isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.execute(text(
                f"CREATE ROLE jobs_owner LOGIN PASSWORD '{OWNER_PASSWORD}'"))
            connection.execute(text(
                f"CREATE ROLE jobs_reader LOGIN PASSWORD '{READER_PASSWORD}'"))
            connection.execute(text("CREATE DATABASE jobs OWNER jobs_owner"))
            connection.execute(text("CREATE DATABASE jobs_empty OWNER jobs_owner"))
        admin.dispose()
        owner = self.cluster.url("jobs", "jobs_owner", OWNER_PASSWORD)
        engine = create_db_engine(owner)
        migrate.upgrade(engine)
        seed(engine, now)
        with engine.begin() as connection:
            connection.execute(text("GRANT SELECT ON ALL TABLES IN SCHEMA public TO jobs_reader"))
        self.urls.update({
            "postgresql": owner,
            "postgresql-empty": self.cluster.url("jobs_empty", "jobs_owner", OWNER_PASSWORD),
            "postgresql-select-only": self.cluster.url("jobs", "jobs_reader", READER_PASSWORD),
            "postgresql-wrong-password": self.cluster.url("jobs", "jobs_owner",
                                                          "not-the-password"),
            "postgresql-unknown-database": self.cluster.url("no_such_db", "jobs_owner",
                                                            OWNER_PASSWORD),
        })
        self.engines["postgresql"] = engine
        self.engines["postgresql-empty"] = create_db_engine(self.urls["postgresql-empty"])

    def close(self) -> None:
        if self._client is not None:
            self._client.__exit__(None, None, None)
        for engine in self.engines.values():
            engine.dispose()
        for folder in self._folders:
            folder.close()
        if self.cluster is not None:
            self.cluster.stop()
        logging.getLogger("voucher_jobs").removeHandler(self._log_handler)

    # Cases

    def skip_reason(self, case: Case) -> str | None:
        """Return why this workspace cannot run case, or None when it can."""
        if case.needs_postgres and not self.postgres:
            return "needs the PostgreSQL binaries for a private cluster"
        placeholders = " ".join([*case.args, *case.env.values(), *case.contains])
        if case.database == "sqlite-read-only" or "{read_only" in placeholders:
            return self.read_only_problem
        return None

    def expand(self, template: str) -> str:
        """Replace each `{name}` of Workspace.values in template."""
        return re.sub(r"\{(\w+)\}",
                      lambda match: self.values.get(match.group(1), match.group(0)), template)

    def environment(self, case: Case) -> dict[str, str]:
        """Return the case's settings: DATABASE_URL and env, placeholders expanded."""
        values = {"DATABASE_URL": self.urls[case.database]}
        values.update({name: self.expand(value) for name, value in case.env.items()})
        return values

    def run(self, case: Case) -> Outcome:
        """Run one case and check its exit code or status, message and lack of writes."""
        reason = self.skip_reason(case)
        if reason:
            return Outcome(case, None, "", "", [], skipped=reason)
        with self._arranged(case):
            before = self.snapshot()
            if case.is_http:
                code, output = self._run_http(case)
            elif self.processes:
                code, output = self._run_process(case)
            else:
                code, output = self._run_in_process(case)
            changes = describe_changes(before, self.snapshot(), case)
        problems = self.check(case, code, output) + changes
        # The temporary folder differs on every run, so the line shows {root}.
        message = first_message_line(case, output).replace(str(self.root), "{root}")
        return Outcome(case, code, message, output, problems)

    @contextmanager
    def _arranged(self, case: Case) -> Iterator[None]:
        """Write the case's files and hold its lock, before the first snapshot."""
        from voucher_jobs.data.locks import job_lock

        with ExitStack() as stack:
            for name, content in case.files.items():
                path = self.work / name
                path.write_text(content)
                stack.callback(path.unlink, missing_ok=True)
            if case.hold_lock:
                self.client()
                acquired = stack.enter_context(job_lock(self.engines["http"], case.hold_lock))
                assert acquired, f"the lock of {case.hold_lock} is held by someone else"
            yield

    def check(self, case: Case, code: int | None, output: str) -> list[str]:
        problems = []
        if code != case.expected:
            problems.append(f"expected {case.expected}, got {code}")
        for template in (*case.contains, case.hint):
            expected_text = self.expand(template)
            if expected_text not in output:
                problems.append(f"the message lacks {expected_text!r}")
        if "Traceback" in output:
            problems.append("the message has a traceback")
        return problems

    # Runners

    def _run_in_process(self, case: Case) -> tuple[int, str]:
        from voucher_jobs.cli.main import main

        args = [self.expand(arg) for arg in case.args]
        stdout, stderr = io.StringIO(), io.StringIO()
        with isolated_process_state(self.environment(case), self.work, args) as engines, \
                redirect_stdout(stdout), redirect_stderr(stderr):
            try:
                main()
                code = 0
            except SystemExit as exc:
                code = 0 if exc.code is None else int(exc.code)
            finally:
                for engine in engines:
                    engine.dispose()
        return code, stderr.getvalue()

    def _run_process(self, case: Case) -> tuple[int | None, str]:
        environment = {key: value for key, value in os.environ.items()
                       if not key.startswith("VOUCHER_") and key != "DATABASE_URL"}
        environment.update(self.environment(case))
        command = [sys.executable, "-m", "voucher_jobs", *map(self.expand, case.args)]
        try:
            result = subprocess.run(command, env=environment, cwd=self.work, text=True,
                                    capture_output=True, timeout=PROCESS_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired as exc:
            # subprocess.run killed it, and the output so far shows what it did.
            stderr = exc.stderr.decode() if isinstance(exc.stderr, bytes) else exc.stderr or ""
            return None, f"still running after {PROCESS_TIMEOUT_SECONDS} s\n{stderr}"
        return result.returncode, result.stderr

    def _run_http(self, case: Case) -> tuple[int, str]:
        assert case.request is not None
        client = self.client()
        request = case.request
        headers = {name: self.expand(value) for name, value in request.headers.items()}
        options: dict[str, Any] = {"headers": headers}
        if request.json is not None:
            options["json"] = request.json
        elif request.content is not None:
            options["content"] = request.content
        elif request.chunks is not None:
            options["content"] = iter(request.chunks)
        response = client.request(request.method, request.path, **options)
        return response.status_code, response.text

    def client(self) -> Any:
        """Return a TestClient of the API on the SQLite database, created on first use."""
        if self._client is None:
            with warnings.catch_warnings():
                # Starlette warns that it prefers another HTTP client package.
                warnings.simplefilter("ignore")
                from fastapi.testclient import TestClient
            from voucher_jobs.http import create_app

            engine = create_db_engine(self.urls["sqlite"])
            self.engines["http"] = engine
            settings = Settings(_env_file=None, database_url=self.urls["sqlite"],
                                api_token=API_TOKEN)
            self._client = TestClient(create_app(settings, engine))
            self._client.__enter__()
        return self._client

    # Snapshots

    def snapshot(self) -> dict[str, Any]:
        """Return the row counts of every table, the ledger and the files, for comparison."""
        state: dict[str, Any] = {}
        for key, engine in self.engines.items():
            if key == "http":
                continue  # the same SQLite file as "sqlite"
            with engine.connect() as connection:
                tables = sorted(inspect(connection).get_table_names())
                if tables:
                    counts = " UNION ALL ".join(
                        f"SELECT '{table}', count(*) FROM \"{table}\"" for table in tables)
                    for table, count in connection.execute(text(counts)):
                        state[f"{key} table {table}"] = count
                if runs.name in tables:
                    state[f"{key} ledger"] = [
                        tuple(row) for row in connection.execute(
                            select(runs.c.id, runs.c.job, runs.c.status, runs.c.rows_affected)
                            .order_by(runs.c.id))]
        state["files"] = list_files(self.work) | {
            f"db/{name}": size for name, size in list_files(self.db_folder).items()
            if not name.endswith(("-wal", "-shm"))}
        return state

    def __enter__(self) -> Workspace:
        try:
            self.prepare()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def list_files(folder: Path) -> dict[str, int]:
    """Return every file under folder with its size, by relative path."""
    return {str(path.relative_to(folder)): path.stat().st_size
            for path in sorted(folder.rglob("*")) if path.is_file()}


def describe_changes(before: dict[str, Any], after: dict[str, Any], case: Case) -> list[str]:
    """Return one line per difference between two snapshots.

    A case that holds a job's lock may add exactly one skipped run to the
    ledger of the API's database, because the product records refused runs.
    """
    if case.hold_lock:
        before, after = _without_skipped_run(before, after)
    changes = []
    for key in sorted(before.keys() | after.keys()):
        old, new = before.get(key), after.get(key)
        if old == new:
            continue
        if key == "files":
            added = sorted(new.keys() - old.keys())
            removed = sorted(old.keys() - new.keys())
            resized = sorted(name for name in old.keys() & new.keys() if old[name] != new[name])
            for label, names in (("new file", added), ("removed file", removed),
                                 ("changed file", resized)):
                changes.extend(f"{label} {name}" for name in names)
        elif key.endswith("ledger"):
            changes.append(f"{key} changed: {old} -> {new}")
        else:
            changes.append(f"{key}: {old} -> {new} rows")
    return changes


def _without_skipped_run(before: dict[str, Any], after: dict[str, Any]) -> tuple[dict, dict]:
    """Return the snapshots with one new skipped run in the API's ledger taken out of after."""
    ledger, count = "sqlite ledger", f"sqlite table {runs.name}"
    old, new = before.get(ledger, []), after.get(ledger, [])
    added = new[len(old):]
    if new[:len(old)] != old or len(added) != 1 or added[0][2] != "skipped":
        return before, after
    return before, {**after, ledger: old, count: before[count]}


@contextmanager
def isolated_process_state(environment: Mapping[str, str], cwd: Path,
                           args: list[str]) -> Iterator[list[Engine]]:
    """Give an in-process `voucher-jobs` call its own settings, folder and argv.

    Removes the caller's VOUCHER_* variables and DATABASE_URL for the call,
    restores the environment, folder, argv and log handlers afterwards, and
    yields the list of engines the command creates, for disposal. A `serve`
    or `scheduler` that got past its checks would run until stopped, so
    starting uvicorn or the scheduler raises instead.
    """
    import uvicorn

    import voucher_jobs.data.engine as engine_module
    from voucher_jobs.scheduler import Scheduler

    saved_environment = dict(os.environ)
    saved_folder = Path.cwd()
    saved_argv = sys.argv
    loggers = [logging.getLogger("voucher_jobs"), logging.getLogger("sqlalchemy.engine")]
    saved_loggers = [(logger.handlers[:], logger.level, logger.propagate) for logger in loggers]
    engines: list[Engine] = []
    original_create_engine = engine_module.create_engine

    def recording_create_engine(*args: Any, **kwargs: Any) -> Engine:
        engine = original_create_engine(*args, **kwargs)
        engines.append(engine)
        return engine

    for key in list(os.environ):
        if key.startswith("VOUCHER_") or key == "DATABASE_URL":
            del os.environ[key]
    os.environ.update(environment)
    os.chdir(cwd)
    sys.argv = ["voucher-jobs", *args]
    try:
        with mock.patch.object(engine_module, "create_engine", recording_create_engine), \
                mock.patch.object(uvicorn, "run", _fail_on_start), \
                mock.patch.object(Scheduler, "start", _fail_on_start):
            yield engines
    finally:
        os.environ.clear()
        os.environ.update(saved_environment)
        os.chdir(saved_folder)
        sys.argv = saved_argv
        for logger, (handlers, level, propagate) in zip(loggers, saved_loggers):
            logger.handlers[:] = handlers
            logger.setLevel(level)
            logger.propagate = propagate


def _fail_on_start(*args: Any, **kwargs: Any) -> None:
    raise RuntimeError("the command went on to serve or schedule, so it accepted the input")


# Results


@dataclass
class Outcome:
    """The exit code or status and message that one case got, and what was wrong."""

    case: Case
    code: int | None
    message: str
    output: str
    problems: list[str]
    skipped: str | None = None

    @property
    def passed(self) -> bool:
        return self.skipped is None and not self.problems

    def line(self) -> str:
        case = self.case
        if self.skipped:
            return f"SKIP {case.id}: {self.skipped}"
        status = "ok  " if self.passed else "FAIL"
        line = f"{status} {case.id}: {self.code} {self.message}"
        if self.problems:
            line += "\n       " + "\n       ".join(self.problems)
        return line


def first_message_line(case: Case, output: str) -> str:
    """Return the line of output that states the error."""
    if case.is_http:
        try:
            body = json.loads(output)
        except ValueError:
            return output.strip().splitlines()[0] if output.strip() else ""
        if isinstance(body, dict):
            message = body.get("message") or body.get("detail")
            if isinstance(message, str):
                return message.splitlines()[0]
        return output.strip()[:200]
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in lines:
        if line.startswith(ERROR_PREFIXES):
            return line
    return lines[0] if lines else ""


def markdown_table(outcomes: list[Outcome]) -> str:
    rows = ["| area | input | answer |", "|---|---|---|"]
    for outcome in outcomes:
        if outcome.skipped:
            continue
        case = outcome.case
        answer = f"{outcome.code}: {outcome.message}"
        rows.append(f"| {case.area} | {_cell(case.shown_input(), code=True)} | "
                    f"{_cell(answer)} |")
    return "\n".join(rows)


def _cell(value: str, *, code: bool = False) -> str:
    value = value.replace("|", "\\|")
    if code:
        return f"`{value.replace('`', '')}`"
    return value


def summary(outcomes: list[Outcome]) -> str:
    tried = [outcome for outcome in outcomes if not outcome.skipped]
    passed = sum(outcome.passed for outcome in tried)
    line = f"{len(tried)} bad inputs tried, {passed} answered as expected"
    skipped = len(outcomes) - len(tried)
    if skipped:
        line += f" ({skipped} not run)"
    return line


def run_cases(cases: list[Case], *, processes: bool = False,
              report: Callable[[Outcome], None] = lambda outcome: None) -> list[Outcome]:
    """Run cases in a fresh workspace under a temporary folder; return their outcomes."""
    with tempfile.TemporaryDirectory(prefix="voucher-jobs-bad-inputs-") as folder:
        use_postgres = postgres_available()
        if not use_postgres and postgres_required():
            raise SystemExit("the PostgreSQL binaries are required (CI=true or "
                             f"VOUCHER_JOBS_REQUIRE_POSTGRES=1), but {BIN} has no initdb")
        outcomes = []
        with Workspace(Path(folder), postgres=use_postgres, processes=processes) as space:
            for case in cases:
                outcome = space.run(case)
                report(outcome)
                outcomes.append(outcome)
        return outcomes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", action="store_true",
                        help="Also print a table of area, input, and exit code or status "
                        "with the message, for the docs.")
    parser.add_argument("--processes", action="store_true",
                        help="Run every CLI case as a separate voucher-jobs process.")
    parser.add_argument("--only", nargs="+", metavar="ID", help="Run only these case ids.")
    options = parser.parse_args(argv)
    cases = [case for case in CASES if not options.only or case.id in options.only]
    outcomes = run_cases(cases, processes=options.processes,
                         report=lambda outcome: print(outcome.line(), flush=True))
    if options.markdown:
        print()
        print(markdown_table(outcomes))
        print()
    print(summary(outcomes))
    return 0 if all(outcome.passed or outcome.skipped for outcome in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Exit codes and the translation of exceptions into one-line CLI errors."""

from __future__ import annotations

import enum
import sqlite3
import sys
import traceback

from rich.console import Console
from rich.markup import escape
from sqlalchemy.exc import DBAPIError, OperationalError

from voucher_jobs.config import ConfigError
from voucher_jobs.data.engine import DatabaseURLError
from voucher_jobs.data.migrate import SchemaNotReady
from voucher_jobs.runner import RunFailed, RunRefused


# The start of SQLite's messages for a file or folder it may not open or write.
SQLITE_ACCESS_ERRORS = ("unable to open database file", "attempt to write a readonly database")


class ExitCode(enum.IntEnum):
    """Process exit codes, documented in the README."""

    OK = 0
    RUN_FAILED = 1
    INVALID_INPUT = 2
    ALREADY_RUNNING = 3
    DATABASE_UNAVAILABLE = 4
    INTERRUPTED = 5


class CliError(Exception):
    """An error already worded for the user, with its exit code."""

    def __init__(self, message: str, code: ExitCode) -> None:
        super().__init__(message)
        self.code = code


def _causes(exc: BaseException) -> list[str]:
    chain = []
    current: BaseException | None = exc.__cause__ or exc.__context__
    while current is not None and len(chain) < 5:
        text = str(current).strip().splitlines()[0] if str(current).strip() else ""
        chain.append(f"{type(current).__name__}: {text}" if text else type(current).__name__)
        current = current.__cause__ or current.__context__
    return chain


def classify(exc: BaseException) -> tuple[str, ExitCode, list[str]]:
    """Return the message, exit code and chain of causes for an exception."""
    if isinstance(exc, CliError):
        return str(exc), exc.code, []
    if isinstance(exc, (ConfigError, DatabaseURLError)):
        return str(exc), ExitCode.INVALID_INPUT, []
    if isinstance(exc, RunRefused):
        return str(exc), ExitCode.ALREADY_RUNNING, []
    if isinstance(exc, SchemaNotReady):
        return str(exc), ExitCode.DATABASE_UNAVAILABLE, []
    if isinstance(exc, RunFailed):
        return str(exc), ExitCode.RUN_FAILED, _causes(exc)
    if isinstance(exc, DBAPIError) and getattr(exc.orig, "sqlstate", None) == "42501":
        # PostgreSQL's insufficient_privilege, such as a role that may only read.
        return (
            f"the database user lacks a privilege: {_reason(exc)}. GRANT it SELECT, "
            "INSERT, UPDATE and DELETE on the voucher tables and the voucher_jobs_* "
            "tables, or set DATABASE_URL to a user that has them.",
            ExitCode.DATABASE_UNAVAILABLE,
            [],
        )
    if isinstance(exc, OperationalError) and isinstance(exc.orig, sqlite3.Error) and (
        _reason(exc).startswith(SQLITE_ACCESS_ERRORS)
    ):
        return (
            f"cannot open the SQLite database: {_reason(exc)}. Check DATABASE_URL, and "
            "that the file and its folder exist and are writable: SQLite writes its "
            "-wal and -shm files beside the database file.",
            ExitCode.DATABASE_UNAVAILABLE,
            [],
        )
    if isinstance(exc, OperationalError):
        return (
            f"cannot reach the database: {_reason(exc)}. Check DATABASE_URL and that the "
            "database server is running and accepts connections.",
            ExitCode.DATABASE_UNAVAILABLE,
            [],
        )
    if isinstance(exc, DBAPIError):
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        return f"database error: {reason}", ExitCode.RUN_FAILED, []
    return f"{type(exc).__name__}: {exc}", ExitCode.RUN_FAILED, _causes(exc)


def _reason(exc: DBAPIError) -> str:
    return str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)


def report(exc: BaseException, verbose: bool) -> ExitCode:
    """Print the error (and its causes) to stderr; the traceback only when verbose."""
    message, code, causes = classify(exc)
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    # A refused run is the lock doing its job, so cron and CI logs should not
    # read it as a failure.
    label = "[yellow]skipped:[/]" if code is ExitCode.ALREADY_RUNNING else "[bold red]error:[/]"
    console.print(f"{label} {escape(message)}", markup=True)
    for cause in causes:
        console.print(f"  caused by {cause}", markup=False)
    if verbose:
        traceback.print_exception(exc, file=sys.stderr)
    elif code is ExitCode.RUN_FAILED:
        console.print("Run again as `voucher-jobs -v COMMAND ...` for the traceback.", markup=False)
    return code

"""Classification of database errors into transient ones, which a run may retry, and others."""

from __future__ import annotations

from sqlalchemy.exc import DBAPIError

# SQLSTATE codes worth a retry: serialization failure, deadlock, lock not
# available (lock_timeout), and the connection-loss classes 08 and 57P0x
# (admin shutdown, crash shutdown, cannot connect now).
TRANSIENT_SQLSTATES = {"40001", "40P01", "55P03", "57P01", "57P02", "57P03"}
TRANSIENT_SQLSTATE_CLASSES = {"08"}
SQLITE_TRANSIENT_MESSAGES = ("database is locked", "database table is locked")


def is_transient(exc: BaseException) -> bool:
    """Return True for errors that a later attempt may not hit again."""
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    sqlstate = getattr(exc.orig, "sqlstate", None)
    if sqlstate:
        return sqlstate in TRANSIENT_SQLSTATES or sqlstate[:2] in TRANSIENT_SQLSTATE_CLASSES
    message = str(exc.orig).lower()
    if any(text in message for text in SQLITE_TRANSIENT_MESSAGES):
        return True
    # psycopg raises OperationalError without a SQLSTATE when the server
    # closes the connection or cannot be reached at all.
    return type(exc.orig).__name__ == "OperationalError" and sqlstate is None and (
        "connection" in message or "server closed" in message
    )

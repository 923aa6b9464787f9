"""Engine creation: URL normalization, session settings and SQLite pragmas.

Backend-style URLs (`postgresql://user:pw@host/db?schema=public`, as ORMs of
the Node.js world write them) work as they are: the scheme is mapped to the
psycopg 3 driver, `schema` becomes the session's `search_path`, and query
parameters that only that ORM understands are dropped.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from voucher_jobs.config import Settings

# Parameters of backend-ORM connection strings that libpq does not know.
_ORM_ONLY_PARAMETERS = {
    "schema",
    "connection_limit",
    "pool_timeout",
    "pgbouncer",
    "statement_cache_size",
    "socket_timeout",
    "sslaccept",
}

SQLITE_BUSY_TIMEOUT_MS = 30_000
# Execution option that marks a connection whose transactions only read
# (see connect_for_reads).
READ_ONLY_OPTION = "voucher_jobs_read_only"
# libpq also takes the password, and the client key's passphrase, as query
# parameters, which SQLAlchemy's hide_password leaves in place.
_QUERY_SECRET = re.compile(r"(?i)\b((?:ssl)?password=)[^&#]*")


class DatabaseURLError(ValueError):
    """A DATABASE_URL that cannot be used; the message masks the password."""


def mask_url(url: str | URL) -> str:
    """Render a URL with its password, in the user part or the query, replaced by ***."""
    try:
        parsed = url if isinstance(url, URL) else make_url(url)
    except (ArgumentError, ValueError):
        return _QUERY_SECRET.sub(r"\1***", _mask_unparsable(str(url)))
    return _QUERY_SECRET.sub(r"\1***", parsed.render_as_string(hide_password=True))


def _mask_unparsable(raw: str) -> str:
    """Replace everything between the scheme and the last @ by ***.

    Used for strings that SQLAlchemy cannot parse, so the extent of the
    password is unknown and the user name is hidden too.
    """
    scheme, separator, rest = raw.partition("://")
    if not separator:
        scheme, rest = "", raw
    if "@" in rest:
        rest = "***@" + rest.rsplit("@", 1)[1]
    return f"{scheme}{separator}{rest}"


def normalize_url(raw: str) -> tuple[URL, dict[str, Any]]:
    """Return the SQLAlchemy URL and connect arguments for a DATABASE_URL."""
    try:
        url = make_url(raw)
    except (ArgumentError, ValueError):
        # make_url raises ValueError for a port that is not a number. The
        # original message is left out because it may quote the password.
        raise DatabaseURLError(
            f"DATABASE_URL {mask_url(raw)!r} is not a valid URL. Use a URL such as "
            "sqlite:///voucher-jobs.db or postgresql://user:password@localhost:5432/shop."
        ) from None

    backend = url.get_backend_name()
    if backend in ("postgresql", "postgres"):
        return _normalize_postgresql(url)
    if backend == "sqlite":
        if url.drivername not in ("sqlite", "sqlite+pysqlite"):
            raise DatabaseURLError(
                f"DATABASE_URL driver {url.drivername!r} is not supported. "
                "Use sqlite:///PATH."
            )
        if url.query.get("uri"):
            # The job lock is a file named after the database path, which a
            # URI filename such as file:jobs.db?mode=ro does not give.
            raise DatabaseURLError(
                f"DATABASE_URL {mask_url(url)!r} uses uri=true, an SQLite URI filename, "
                "which is not supported. Use sqlite:///PATH."
            )
        return url.set(drivername="sqlite+pysqlite"), {}
    raise DatabaseURLError(
        f"DATABASE_URL scheme {url.drivername!r} is not supported "
        f"({mask_url(url)}). Use postgresql://... or sqlite:///PATH."
    )


def _normalize_postgresql(url: URL) -> tuple[URL, dict[str, Any]]:
    if url.drivername not in ("postgresql", "postgres", "postgresql+psycopg"):
        raise DatabaseURLError(
            f"DATABASE_URL driver {url.drivername!r} is not supported. "
            "Use postgresql:// (the psycopg 3 driver is chosen for you)."
        )
    if not url.database:
        raise DatabaseURLError(
            f"DATABASE_URL {mask_url(url)!r} names no database. Add it after the "
            "host, as in postgresql://user:password@localhost:5432/shop."
        )
    query = dict(url.query)
    schema = query.get("schema")
    options = ["-c timezone=UTC"]
    if schema:
        if isinstance(schema, tuple) or not schema.replace("_", "").isalnum():
            raise DatabaseURLError(
                f"DATABASE_URL schema={schema!r} is invalid. "
                "Use a single schema name made of letters, digits and underscores."
            )
        options.append(f"-c search_path={schema}")
    kept = {k: v for k, v in query.items() if k not in _ORM_ONLY_PARAMETERS}
    kept.setdefault("connect_timeout", "10")
    normalized = url.set(drivername="postgresql+psycopg", query=kept)
    return normalized, {"options": " ".join(options)}


def engine_from_settings(settings: Settings) -> Engine:
    """Create the engine for DATABASE_URL with the configured lock timeout."""
    return create_db_engine(
        settings.database_url, lock_timeout_seconds=settings.lock_timeout_seconds
    )


def create_db_engine(
    raw_url: str, *, lock_timeout_seconds: float | None = None, **engine_options: Any
) -> Engine:
    """Create an engine that stores and reads every timestamp in UTC.

    On PostgreSQL, lock_timeout_seconds bounds how long one statement waits
    for a row or table lock. The statement then fails with SQLSTATE 55P03,
    which the runner retries as transient.
    """
    url, connect_args = normalize_url(raw_url)
    if url.get_backend_name() == "sqlite":
        return _create_sqlite_engine(url, **engine_options)
    if lock_timeout_seconds is not None:
        milliseconds = max(1, int(lock_timeout_seconds * 1000))
        connect_args["options"] += f" -c lock_timeout={milliseconds}"
    return create_engine(
        url, connect_args=connect_args, pool_pre_ping=True, **engine_options
    )


def _create_sqlite_engine(url: URL, **engine_options: Any) -> Engine:
    engine = create_engine(
        url,
        connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
        **engine_options,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # pysqlite's own transaction handling is turned off so that the
        # "begin" hook below decides how each transaction starts.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        if connection.get_execution_options().get(READ_ONLY_OPTION):
            # In WAL mode a deferred transaction that only reads takes no
            # write lock, so it neither waits for writers nor blocks them.
            connection.exec_driver_sql("BEGIN")
            return
        # BEGIN IMMEDIATE takes the write lock up front. A deferred
        # transaction that reads and then writes can fail with "database is
        # locked" at once when another writer went first; an immediate one
        # waits up to busy_timeout instead.
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def connect_for_reads(engine: Engine) -> Connection:
    """Open a connection for transactions that only read.

    On SQLite they begin deferred instead of IMMEDIATE. A long scan, such as
    a job's count of its work at start, then holds no write lock, which the
    application's writes would wait for (and fail after their busy timeout).
    A write on this connection can fail with "database is locked" at once,
    so use it only to read.
    """
    return engine.connect().execution_options(**{READ_ONLY_OPTION: True})


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def sqlite_path(engine: Engine) -> Path | None:
    """Return the database file of a SQLite engine, or None for :memory:."""
    database = engine.url.database
    if not is_sqlite(engine) or not database or database == ":memory:":
        return None
    return Path(database).expanduser().resolve()

"""Column types and SQL constructs that differ between PostgreSQL and SQLite."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Integer
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import ColumnElement
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.types import String, TypeDecorator

# SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
BigId = BigInteger().with_variant(Integer(), "sqlite")
JsonDocument = JSON().with_variant(JSONB(), "postgresql")


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend.

    PostgreSQL stores `timestamp with time zone`. SQLite has no timestamp
    type, so the value is stored as UTC text with six fractional digits
    (`2026-12-04 10:00:00.000000`). Because every value has the same width,
    text order is time order, which the expiry and cutoff comparisons rely
    on. Naive datetimes are rejected instead of being guessed to be local or
    UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> Any:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware value")
        value = value.astimezone(timezone.utc)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: Any, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class iso_utc(FunctionElement[str]):  # noqa: N801 - reads as a SQL function
    """SQL expression: a UTCDateTime column as `YYYY-MM-DDTHH:MM:SS.ffffffZ` text."""

    type = String()
    inherit_cache = True


@compiles(iso_utc, "postgresql")
def _iso_utc_postgresql(element: iso_utc, compiler: Any, **kw: Any) -> str:
    column = compiler.process(list(element.clauses)[0], **kw)
    return (
        f"to_char(({column}) AT TIME ZONE 'UTC', "
        "'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"
    )


@compiles(iso_utc, "sqlite")
def _iso_utc_sqlite(element: iso_utc, compiler: Any, **kw: Any) -> str:
    column = compiler.process(list(element.clauses)[0], **kw)
    return f"(replace({column}, ' ', 'T') || 'Z')"


class json_object(FunctionElement[Any]):  # noqa: N801 - reads as a SQL function
    """SQL expression: a JSON object built from alternating keys and values."""

    type = JsonDocument
    inherit_cache = True


@compiles(json_object, "postgresql")
def _json_object_postgresql(element: json_object, compiler: Any, **kw: Any) -> str:
    return f"jsonb_build_object({compiler.process(element.clauses, **kw)})"


@compiles(json_object, "sqlite")
def _json_object_sqlite(element: json_object, compiler: Any, **kw: Any) -> str:
    return f"json_object({compiler.process(element.clauses, **kw)})"


class current_utc(FunctionElement[datetime]):  # noqa: N801 - reads as a SQL function
    """SQL expression: the database clock's time, in the UTCDateTime format."""

    type = UTCDateTime()
    inherit_cache = True


@compiles(current_utc, "postgresql")
def _current_utc_postgresql(element: current_utc, compiler: Any, **kw: Any) -> str:
    return "statement_timestamp()"


@compiles(current_utc, "sqlite")
def _current_utc_sqlite(element: current_utc, compiler: Any, **kw: Any) -> str:
    # SQLite's clock has millisecond precision. The three zeros pad it to the
    # six fractional digits that UTCDateTime stores.
    return "(strftime('%Y-%m-%d %H:%M:%f000', 'now'))"


def utc_now() -> datetime:
    """Return the local clock's time, timezone-aware UTC."""
    return datetime.now(timezone.utc)


def as_utc(value: datetime) -> datetime:
    """Return an aware datetime in UTC; naive input is rejected."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"naive datetime {value!r}: pass a timezone-aware value")
    return value.astimezone(timezone.utc)


def string_literal(value: str) -> ColumnElement[Any]:
    """Build a SQL string literal with no type, so that enum columns accept it too."""
    from sqlalchemy import literal_column

    escaped = value.replace("'", "''")
    return literal_column(f"'{escaped}'")

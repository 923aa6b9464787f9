"""Batch statements over voucher_audit_logs for audit-archival.

A run walks the eligible rows (`created_at < cutoff`) in id order, from the
lowest eligible id to the highest one it found when it started. Each batch
covers the next `size` rows above the id the previous batch reached, and
removes the eligible ones among them as one id range:
`after < id <= upper AND created_at < cutoff`. On a table that the
application appends to, ids rise with created_at, so the walk reads the
table in its physical order, and every batch is one range scan of the
primary key instead of one index lookup per row. A batch starts where the
previous one ended, never at the beginning, so it never reads the index
entries of rows that earlier batches removed.

On a table whose created_at is unrelated to its ids, the walk still visits
each eligible row once; it then also reads the rows between them that are
not eligible, and its batches remove fewer than `size` rows each.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    Select,
    bindparam,
    delete,
    func,
    insert,
    inspect,
    literal,
    select,
    text,
)
from sqlalchemy.exc import IntegrityError

from voucher_jobs.data.schema import audit_archive, voucher_audit_logs
from voucher_jobs.data.statements import id_in
from voucher_jobs.data.types import BigId, UTCDateTime

logs = voucher_audit_logs


@dataclass(frozen=True, order=True)
class Key:
    """A row's (created_at, id), as archive manifests record them."""

    created_at: datetime
    id: int


@dataclass(frozen=True)
class Walk:
    """The rows a run walks: those older than cutoff, with ids up to end_id."""

    cutoff: datetime
    end_id: int


@dataclass(frozen=True)
class BatchOutcome:
    """The outcome of one batch: rows removed, the id reached, and whether it was full.

    `last_id` is the upper end of the batch's id range, which the next batch
    starts after; it is None when the walk had already reached its end. A
    batch is `full` when its range held `size` rows, eligible or not; only
    the last batch of a walk holds fewer.
    """

    rows: int
    last_id: int | None
    full: bool = True


def summarize_eligible(connection: Connection, cutoff: datetime) -> dict[str, Any]:
    """Count the rows older than cutoff; give their oldest and newest times and id range."""
    row = connection.execute(
        select(
            func.count(),
            func.min(logs.c.created_at),
            func.max(logs.c.created_at),
            func.min(logs.c.id),
            func.max(logs.c.id),
        ).where(logs.c.created_at < bindparam("cutoff", cutoff, UTCDateTime()))
    ).one()
    return {
        "eligible": row[0],
        "oldest": row[1],
        "newest": row[2],
        "min_id": row[3],
        "max_id": row[4],
    }


def eligible(walk: Walk, after_id: int) -> Select:
    """Select the ids of eligible rows above after_id, in id order."""
    return (
        select(logs.c.id)
        .where(
            logs.c.id > bindparam("after_id", after_id, BigId),
            logs.c.id <= bindparam("end_id", walk.end_id, BigId),
            logs.c.created_at < bindparam("cutoff", walk.cutoff, UTCDateTime()),
        )
        .order_by(logs.c.id)
    )


def _batch_range(connection: Connection, walk: Walk, after_id: int, size: int
                 ) -> tuple[int, bool] | None:
    """Return the upper end of the next batch's id range and whether the range is full.

    The range (after_id, upper] holds the next `size` rows of the table,
    eligible or not, so a batch never contains more than `size` rows, however
    far apart the ids are. The query reads the primary key index only
    (an index-only scan on PostgreSQL). When fewer than `size` rows are
    left before the end of the walk, the range ends at the walk's end.
    """
    if after_id >= walk.end_id:
        return None
    upper = connection.execute(
        select(logs.c.id)
        .where(
            logs.c.id > bindparam("after_id", after_id, BigId),
            logs.c.id <= bindparam("end_id", walk.end_id, BigId),
        )
        .order_by(logs.c.id)
        .offset(size - 1)
        .limit(1)
    ).scalar()
    if upper is None:
        return walk.end_id, False
    return upper, True


def _in_range(walk: Walk, after_id: int, upper_id: int):
    return (
        logs.c.id > bindparam("after_id", after_id, BigId),
        logs.c.id <= bindparam("upper_id", upper_id, BigId),
        logs.c.created_at < bindparam("cutoff", walk.cutoff, UTCDateTime()),
    )


def delete_batch(engine: Engine, walk: Walk, after_id: int, size: int) -> BatchOutcome:
    """Delete the eligible rows among the next `size` rows above after_id.

    One short transaction; on SQLite, BEGIN IMMEDIATE (see data.engine)
    holds the write lock from its first statement.
    """
    with engine.begin() as connection:
        bounds = _batch_range(connection, walk, after_id, size)
        if bounds is None:
            return BatchOutcome(0, None)
        upper_id, full = bounds
        rows = connection.execute(delete(logs).where(*_in_range(walk, after_id, upper_id)))
    return BatchOutcome(rows.rowcount, upper_id, full)


def move_batch(
    engine: Engine,
    walk: Walk,
    after_id: int,
    size: int,
    run_id: int,
    archived_at: datetime,
) -> BatchOutcome:
    """Move the eligible rows among the next `size` rows to the archive table.

    The copy and the delete commit together, so a crash leaves each row
    either live or archived, never both and never neither. An id that is
    already in the archive (ids reused after a restore) violates the
    archive's primary key, so the whole batch rolls back, nothing is lost,
    and ArchiveConflict names the ids.
    """
    upper_id: int | None = None
    try:
        with engine.begin() as connection:
            bounds = _batch_range(connection, walk, after_id, size)
            if bounds is None:
                return BatchOutcome(0, None)
            upper_id, full = bounds
            if engine.dialect.name == "postgresql":
                rows = _move_range_postgresql(connection, walk, after_id, upper_id,
                                              run_id, archived_at)
            else:
                rows = _move_range_sqlite(connection, walk, after_id, upper_id,
                                          run_id, archived_at)
        return BatchOutcome(rows, upper_id, full)
    except IntegrityError as exc:
        ids = _conflicting_ids(engine, walk, after_id, upper_id) if upper_id else []
        raise ArchiveConflict(ids) from exc


_AUDIT_COLUMNS = ["id", "voucher_id", "action", "actor_type", "code", "metadata", "created_at"]

_MOVE_RANGE_POSTGRESQL = text(
    """
    WITH moved AS (
        DELETE FROM voucher_audit_logs
        WHERE id > :after_id AND id <= :upper_id AND created_at < :cutoff
        RETURNING id, voucher_id, action, actor_type, code, metadata, created_at
    )
    INSERT INTO voucher_jobs_audit_archive
        (id, voucher_id, action, actor_type, code, metadata, created_at, archived_at, run_id)
    SELECT id, voucher_id, action, actor_type, code, metadata, created_at,
           :archived_at, :run_id
    FROM moved
    """
).bindparams(
    bindparam("cutoff", type_=UTCDateTime()),
    bindparam("after_id", type_=BigId),
    bindparam("upper_id", type_=BigId),
    bindparam("archived_at", type_=UTCDateTime()),
    bindparam("run_id", type_=BigId),
)


def _move_range_postgresql(connection, walk, after_id, upper_id, run_id, archived_at) -> int:
    # One statement: the DELETE's RETURNING feeds the INSERT, so both act on
    # exactly the same rows even while other sessions write to the table.
    result = connection.execute(_MOVE_RANGE_POSTGRESQL, {
        "cutoff": walk.cutoff, "after_id": after_id, "upper_id": upper_id,
        "archived_at": archived_at, "run_id": run_id,
    })
    return result.rowcount


def _move_range_sqlite(connection, walk, after_id, upper_id, run_id, archived_at) -> int:
    # BEGIN IMMEDIATE holds SQLite's single write lock for the whole
    # transaction, so no other writer can add or remove rows between the
    # copy and the delete: both statements see the same rows.
    copy = insert(audit_archive).from_select(
        [*_AUDIT_COLUMNS, "archived_at", "run_id"],
        select(
            *(logs.c[name] for name in _AUDIT_COLUMNS),
            bindparam("archived_at", archived_at, UTCDateTime()),
            literal(run_id, BigId),
        ).where(*_in_range(walk, after_id, upper_id)),
    )
    connection.execute(copy)
    return connection.execute(delete(logs).where(*_in_range(walk, after_id, upper_id))).rowcount


def columns_not_archived(connection: Connection) -> list[str]:
    """Return the live table's columns that the archive modes would not copy.

    A backend may add columns to voucher_audit_logs; archiving such rows
    would lose those values, so the archive modes refuse to start.
    """
    present = {column["name"] for column in inspect(connection).get_columns(logs.name)}
    return sorted(present - set(_AUDIT_COLUMNS))


class ArchiveConflict(Exception):
    """Live audit rows whose ids the archive table already contains."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids
        shown = ", ".join(str(i) for i in ids[:10]) + (" ..." if len(ids) > 10 else "")
        super().__init__(
            f"voucher_jobs_audit_archive already contains audit row ids {shown}, which "
            "are also live in voucher_audit_logs (ids reused after a restore or a "
            "sequence reset). Nothing of this batch was deleted. Compare the two "
            "copies, remove one of them, and run again."
        )


def _conflicting_ids(engine: Engine, walk: Walk, after_id: int, upper_id: int) -> list[int]:
    batch = select(logs.c.id).where(*_in_range(walk, after_id, upper_id)).subquery()
    with engine.connect() as connection:
        return list(connection.execute(
            select(audit_archive.c.id).where(audit_archive.c.id.in_(select(batch.c.id)))
            .order_by(audit_archive.c.id)
        ).scalars())


def read_page(connection: Connection, walk: Walk, after_id: int, size: int) -> list[Any]:
    """Read the next `size` eligible rows above after_id, whole, in id order."""
    query = eligible(walk, after_id).with_only_columns(
        *(logs.c[name] for name in _AUDIT_COLUMNS)
    ).limit(size)
    return list(connection.execute(query))


# The archive line of a row, built by PostgreSQL in the format of
# archive_files.row_to_line: keys in sorted order, no spaces between items,
# created_at in UTC with six fractional digits. The metadata document is
# copied as the server prints it, which is valid JSON for json and jsonb
# columns. A json column keeps the line breaks of the document it was given.
# JSON escapes line breaks inside strings, so the raw ones are only spacing
# between tokens, and replacing them by spaces keeps each row on one line.
_ARCHIVE_LINE_POSTGRESQL = """
    '{{"action":' || coalesce(to_json(action)::text, 'null')
    || ',"actor_type":' || coalesce(to_json(actor_type)::text, 'null')
    || ',"code":' || coalesce(to_json(code)::text, 'null')
    || ',"created_at":"'
    || to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') || '"'
    || ',"id":' || id
    || ',"metadata":' || coalesce({metadata}, 'null')
    || ',"voucher_id":' || coalesce(voucher_id::text, 'null')
    || '}}'
"""
# CSV with control characters as delimiter and quote. A line contains
# neither of them (JSON escapes control characters) and no line break, so
# COPY sends each line unchanged, without the quoting and backslash escapes
# of its other formats.
COPY_LINE_OPTIONS = "FORMAT csv, DELIMITER E'\\x01', QUOTE E'\\x02'"
_COPY_BUFFER_BYTES = 1 << 20


def server_metadata_kind(connection: Connection) -> str | None:
    """Return "json" or "jsonb" when PostgreSQL can build archive lines, else None."""
    if connection.dialect.name != "postgresql":
        return None
    kind = connection.execute(text(
        "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
        "WHERE attrelid = 'voucher_audit_logs'::regclass AND attname = 'metadata' "
        "AND NOT attisdropped"
    )).scalar()
    return kind if kind in ("json", "jsonb") else None


def archive_line_sql(metadata_kind: str) -> str:
    """Return the SQL expression of a row's archive line, for a json or jsonb metadata column."""
    metadata = "metadata::text"
    if metadata_kind == "json":
        metadata = "translate(metadata::text, E'\\n\\r', '  ')"
    return _ARCHIVE_LINE_POSTGRESQL.format(metadata=metadata)


def eligible_ids(connection: Connection, walk: Walk, after_id: int, limit: int,
                 table: str = "voucher_audit_logs") -> list[int]:
    """Return the ids of the next `limit` eligible rows above after_id, in id order.

    PostgreSQL only. `table` is the quoted name of the table to read, the
    parent or one of its partitions.
    """
    query = text(
        f"SELECT array_agg(id ORDER BY id) FROM (SELECT id FROM {table} "
        "WHERE id > :after_id AND id <= :end_id AND created_at < :cutoff "
        "ORDER BY id LIMIT :limit) AS page"
    ).bindparams(
        bindparam("after_id", after_id, BigId),
        bindparam("end_id", walk.end_id, BigId),
        bindparam("cutoff", walk.cutoff, UTCDateTime()),
        bindparam("limit", limit),
    )
    return connection.execute(query).scalar() or []


def created_at_of(connection: Connection, ids: Sequence[int]) -> dict[int, datetime]:
    """Return the created_at of each listed row."""
    rows = connection.execute(
        select(logs.c.id, logs.c.created_at).where(id_in(connection.engine, logs.c.id, ids))
    )
    return {row.id: row.created_at for row in rows}


def copy_archive_lines(
    connection: Connection,
    walk: Walk,
    after_id: int,
    upper_id: int,
    metadata_kind: str,
    write: Callable[[bytes], None],
    table: str = "voucher_audit_logs",
) -> None:
    """Stream the archive lines of the eligible rows in (after_id, upper_id] to write.

    PostgreSQL only. The lines come with one `COPY ... TO STDOUT`, in id
    order, and reach `write` in chunks of about a megabyte that end at a
    line break. `table` is the quoted name of the table to read, as for
    eligible_ids.
    """
    query = (
        f"COPY (SELECT {archive_line_sql(metadata_kind)} FROM {table} "
        "WHERE id > %(after_id)s AND id <= %(upper_id)s AND created_at < %(cutoff)s "
        f"ORDER BY id) TO STDOUT WITH ({COPY_LINE_OPTIONS})"
    )
    parameters = {"after_id": after_id, "upper_id": upper_id, "cutoff": walk.cutoff}
    driver_connection = connection.connection.driver_connection
    buffer = bytearray()
    with driver_connection.cursor() as cursor, cursor.copy(query, parameters) as copy:
        for data in copy:
            buffer += data
            if len(buffer) >= _COPY_BUFFER_BYTES:
                write(bytes(buffer))
                buffer.clear()
    if buffer:
        write(bytes(buffer))


def delete_listed(engine: Engine, ids: Sequence[int], cutoff: datetime) -> int:
    """Delete the listed rows, ids in ascending order, that are still live and older than cutoff.

    It first deletes the span from the lowest to the highest listed id as
    one range scan, which is several times faster than looking each id up.
    That deletion is kept only when it removed exactly the listed rows.
    Otherwise (some were deleted before, or the span contains other rows
    older than the cutoff) it is rolled back and the rows are deleted by id.
    """
    if not ids:
        return 0
    with engine.connect() as connection:
        with connection.begin() as transaction:
            deleted = _delete_span(connection, ids[0], ids[-1], cutoff)
            if len(deleted) == len(ids) and (deleted == list(ids)
                                             or sorted(deleted) == sorted(ids)):
                return len(deleted)
            transaction.rollback()
    return delete_ids(engine, ids, cutoff)


def _delete_span(connection: Connection, first_id: int, last_id: int, cutoff: datetime
                 ) -> list[int]:
    """Delete the rows older than cutoff with ids from first_id to last_id; return their ids."""
    if connection.dialect.name == "postgresql":
        # The driver's own cursor: building a result row object for each id
        # took longer than the deletion itself in the benchmark. The session's
        # time zone is UTC (see data.engine), so an aware cutoff compares
        # right with both timestamp column types.
        with connection.connection.driver_connection.cursor() as cursor:
            cursor.execute(
                "DELETE FROM voucher_audit_logs WHERE id >= %(first_id)s "
                "AND id <= %(last_id)s AND created_at < %(cutoff)s RETURNING id",
                {"first_id": first_id, "last_id": last_id, "cutoff": cutoff},
            )
            return [row[0] for row in cursor.fetchall()]
    span = (
        delete(logs)
        .where(logs.c.id >= bindparam("first_id", first_id, BigId))
        .where(logs.c.id <= bindparam("last_id", last_id, BigId))
        .where(logs.c.created_at < bindparam("cutoff", cutoff, UTCDateTime()))
        .returning(logs.c.id)
    )
    return list(connection.execute(span).scalars())


def delete_ids(engine: Engine, ids: Sequence[int], cutoff: datetime) -> int:
    """Delete the listed rows that are still live and older than cutoff."""
    statement = (
        delete(logs)
        .where(id_in(engine, logs.c.id, ids))
        .where(logs.c.created_at < bindparam("cutoff", cutoff, UTCDateTime()))
        .returning(logs.c.id)
    )
    with engine.begin() as connection:
        return len(connection.execute(statement).fetchall())


def count_live_ids(connection: Connection, ids: Sequence[int]) -> int:
    """Count how many of the listed ids are still in the live table."""
    return connection.execute(
        select(func.count()).where(id_in(connection.engine, logs.c.id, ids))
    ).scalar_one()

"""Batch statements over voucher_audit_logs for audit-archival.

Every batch walks the (created_at, id) index forward from the last key the
previous batch reached (keyset pagination). A batch never uses OFFSET and
never starts again from the beginning of the table, so rows that earlier
batches deleted are not scanned again, and rows deleted under the walk cannot
make it skip or repeat a row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    Integer,
    Select,
    bindparam,
    delete,
    func,
    insert,
    inspect,
    literal,
    select,
    text,
    tuple_,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql.expression import ColumnElement

from voucher_jobs.data.schema import audit_archive, voucher_audit_logs
from voucher_jobs.data.statements import id_in
from voucher_jobs.data.types import BigId, UTCDateTime

logs = voucher_audit_logs


@dataclass(frozen=True, order=True)
class Key:
    """A position in the (created_at, id) walk."""

    created_at: datetime
    id: int


# Before every real row: ids are positive and no timestamp precedes year 1.
START_KEY = Key(datetime(1, 1, 1, tzinfo=timezone.utc), -(2**63))


@dataclass(frozen=True)
class BatchOutcome:
    """Rows one batch removed from the live table, and the key it reached."""

    rows: int
    last_key: Key | None


def eligible(cutoff: datetime, after: Key | None) -> Select:
    """Select the keys of rows older than cutoff that come after `after`."""
    start = after or START_KEY
    return (
        select(logs.c.created_at, logs.c.id)
        .where(
            logs.c.created_at < bindparam("cutoff", cutoff, UTCDateTime()),
            tuple_(logs.c.created_at, logs.c.id)
            > tuple_(
                bindparam("after_created_at", start.created_at, UTCDateTime()),
                bindparam("after_id", start.id, BigId),
            ),
        )
        .order_by(logs.c.created_at, logs.c.id)
    )


def summarize_eligible(connection: Connection, cutoff: datetime) -> dict[str, Any]:
    """Count the rows older than cutoff and give the oldest and newest of them."""
    row = connection.execute(
        select(func.count(), func.min(logs.c.created_at), func.max(logs.c.created_at))
        .where(logs.c.created_at < bindparam("cutoff", cutoff, UTCDateTime()))
    ).one()
    return {"eligible": row[0], "oldest": row[1], "newest": row[2]}


def delete_batch(engine: Engine, cutoff: datetime, after: Key | None, size: int) -> BatchOutcome:
    """Delete the next `size` eligible rows in one short transaction."""
    batch = eligible(cutoff, after).with_only_columns(logs.c.id).limit(size)
    statement = (
        delete(logs)
        .where(_id_in_batch(engine, batch))
        .returning(logs.c.created_at, logs.c.id)
    )
    if engine.dialect.name == "postgresql":
        # The server returns one row, the last key with the batch's row count,
        # instead of every deleted key.
        deleted = statement.cte("deleted")
        summary = (
            select(deleted.c.created_at, deleted.c.id, func.count().over())
            .order_by(deleted.c.created_at.desc(), deleted.c.id.desc())
            .limit(1)
        )
        with engine.begin() as connection:
            row = connection.execute(summary).first()
        if row is None:
            return BatchOutcome(0, None)
        return BatchOutcome(row[2], Key(row[0], row[1]))
    with engine.begin() as connection:
        keys = [Key(*row) for row in connection.execute(statement)]
    return BatchOutcome(len(keys), max(keys) if keys else None)


def _id_in_batch(engine: Engine, batch: Select) -> ColumnElement[bool]:
    """`id IN (batch)`, written as `id = ANY(ARRAY(batch))` on PostgreSQL.

    PostgreSQL plans `IN (subquery)` as a join. Estimating that join reads the
    id index from its low end, across every entry of a row that an earlier
    batch deleted and VACUUM has not yet removed, so planning grows with each
    batch. ARRAY(subquery) is computed once before the scan and needs no join.
    """
    if engine.dialect.name == "postgresql":
        return logs.c.id == func.any(func.array(batch.scalar_subquery()))
    return logs.c.id.in_(batch.scalar_subquery())


def move_batch(
    engine: Engine,
    cutoff: datetime,
    after: Key | None,
    size: int,
    run_id: int,
    archived_at: datetime,
) -> BatchOutcome:
    """Copy the next `size` eligible rows to the archive table and delete them.

    The copy and the delete commit together, so a crash leaves each row
    either live or archived, never both and never neither. A row already in
    the archive (same id) is not copied again.
    """
    if engine.dialect.name == "postgresql":
        return _move_batch_postgresql(engine, cutoff, after, size, run_id, archived_at)
    return _move_batch_sqlite(engine, cutoff, after, size, run_id, archived_at)


_AUDIT_COLUMNS = ["id", "voucher_id", "action", "actor_type", "code", "metadata", "created_at"]


_MOVE_BATCH_POSTGRESQL = text(
    """
    WITH moved AS (
        DELETE FROM voucher_audit_logs AS live
        WHERE live.id = ANY(ARRAY(
            SELECT id
            FROM voucher_audit_logs
            WHERE created_at < :cutoff
              AND (created_at, id) > (:after_created_at, :after_id)
            ORDER BY created_at, id
            LIMIT :size
        ))
        RETURNING live.*
    ),
    copied AS (
        INSERT INTO voucher_jobs_audit_archive
            (id, voucher_id, action, actor_type, code, metadata, created_at,
             archived_at, run_id)
        SELECT id, voucher_id, action, actor_type, code, metadata, created_at,
               :archived_at, :run_id
        FROM moved
    )
    SELECT created_at, id, count(*) OVER () AS rows
    FROM moved
    ORDER BY created_at DESC, id DESC
    LIMIT 1
    """
).bindparams(
    bindparam("cutoff", type_=UTCDateTime()),
    bindparam("after_created_at", type_=UTCDateTime()),
    bindparam("after_id", type_=BigId),
    bindparam("archived_at", type_=UTCDateTime()),
    bindparam("run_id", type_=BigId),
).columns(created_at=UTCDateTime(), id=BigId, rows=Integer)


def _move_batch_postgresql(engine, cutoff, after, size, run_id, archived_at) -> BatchOutcome:
    # One statement: the DELETE's RETURNING feeds the INSERT, so both act on
    # exactly the same rows even while other sessions write to the table.
    # An id already in the archive (ids reused after a restore) violates its
    # primary key, so the whole batch rolls back and no row is lost.
    start = after or START_KEY
    parameters = {
        "cutoff": cutoff,
        "after_created_at": start.created_at,
        "after_id": start.id,
        "size": size,
        "archived_at": archived_at,
        "run_id": run_id,
    }
    # The server returns one row, the last key with the batch's row count.
    try:
        with engine.begin() as connection:
            row = connection.execute(_MOVE_BATCH_POSTGRESQL, parameters).first()
    except IntegrityError as exc:
        raise ArchiveConflict(_conflicting_ids(engine, cutoff, after, size)) from exc
    if row is None:
        return BatchOutcome(0, None)
    return BatchOutcome(row.rows, Key(row.created_at, row.id))


def _move_batch_sqlite(engine, cutoff, after, size, run_id, archived_at) -> BatchOutcome:
    # BEGIN IMMEDIATE holds SQLite's single write lock for the whole
    # transaction, so no other writer can add or remove rows between the
    # copy and the delete: both statements see the same batch.
    try:
        return _move_batch_sqlite_transaction(engine, cutoff, after, size, run_id, archived_at)
    except IntegrityError as exc:
        raise ArchiveConflict(_conflicting_ids(engine, cutoff, after, size)) from exc


def _move_batch_sqlite_transaction(engine, cutoff, after, size, run_id, archived_at):
    with engine.begin() as connection:
        keys = [Key(*row) for row in connection.execute(eligible(cutoff, after).limit(size))]
        if not keys:
            return BatchOutcome(0, None)
        ids = [key.id for key in keys]
        copy = insert(audit_archive).from_select(
            [*_AUDIT_COLUMNS, "archived_at", "run_id"],
            select(
                *(logs.c[name] for name in _AUDIT_COLUMNS),
                bindparam("archived_at", archived_at, UTCDateTime()),
                literal(run_id, BigId),
            ).where(id_in(engine, logs.c.id, ids)),
        )
        connection.execute(copy)
        connection.execute(delete(logs).where(id_in(engine, logs.c.id, ids)))
    return BatchOutcome(len(keys), keys[-1])


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


def _conflicting_ids(engine: Engine, cutoff: datetime, after: Key | None, size: int) -> list[int]:
    batch = eligible(cutoff, after).with_only_columns(logs.c.id).limit(size).subquery()
    with engine.connect() as connection:
        return list(connection.execute(
            select(audit_archive.c.id).where(audit_archive.c.id.in_(select(batch.c.id)))
            .order_by(audit_archive.c.id)
        ).scalars())


def read_page(connection: Connection, cutoff: datetime, after: Key | None, size: int) -> list[Any]:
    """Read the next `size` eligible rows, whole, in key order."""
    query = eligible(cutoff, after).with_only_columns(
        *(logs.c[name] for name in _AUDIT_COLUMNS)
    ).limit(size)
    return list(connection.execute(query))


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

"""Whole partitions of a range-partitioned voucher_audit_logs (PostgreSQL only).

When voucher_audit_logs is partitioned by range of created_at, a partition
whose upper bound is at or before the cutoff contains only eligible rows.
audit-archival can then archive it as a whole and remove it with
`DETACH PARTITION` and `DROP TABLE`, instead of deleting its rows batch by
batch (see voucher_jobs.jobs.partition_retirement).

`retire_partition` retires one partition in one transaction on one
connection:

1. `SET LOCAL lock_timeout` bounds every lock wait that follows.
2. `LOCK TABLE partition IN SHARE MODE`: no row of the partition can be
   inserted, changed or deleted until the transaction ends. Reads go on, and
   so do writes that go to other partitions.
3. The caller's archive step: count the rows, copy them to
   voucher_jobs_audit_archive (`copy_to_archive_table`), or write them to
   archive files.
4. `ALTER TABLE parent DETACH PARTITION`, a rename of the detached table to
   `voucher_jobs_detached_<oid>` with a comment that marks it, then COMMIT.
   From here on its rows are no longer in voucher_audit_logs.

A crash, or a lock that is not granted, before that commit rolls the whole
transaction back: the partition stays attached with all its rows, and a copy
made in step 3 inside the transaction is gone with it.

The detached table is dropped in a transaction of its own, after the commit.
Dropping a table removes its files at commit, which takes about 200 ms for a
partition of one million rows (see docs/partitioning.md), and inside the
first transaction that time would add to the exclusive lock on the parent
table. A table that a crash left detached is dropped by the next run
(`drop_detached_tables`).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, MetaData, Table, select, text, update
from sqlalchemy.exc import DBAPIError

from voucher_jobs.data.audit_batches import Walk
from voucher_jobs.data.schema import archive_files, voucher_audit_logs
from voucher_jobs.data.types import utc_now

AUDIT_COLUMNS = ("id", "voucher_id", "action", "actor_type", "code", "metadata", "created_at")

# SQLSTATEs after which a partition is left attached and the run goes on:
# lock_not_available (lock_timeout expired) and deadlock_detected.
SKIP_SQLSTATES = {
    "55P03": "lock_timeout",
    "40P01": "deadlock",
}

_BOUND = re.compile(r"^FOR VALUES FROM \((?P<lower>.*)\) TO \((?P<upper>.*)\)$", re.DOTALL)


@dataclass(frozen=True)
class Partition:
    """One direct partition of voucher_audit_logs and its range of created_at.

    `lower` is None for MINVALUE and `upper` None for MAXVALUE. Both are None
    for the DEFAULT partition. `kind` is pg_class.relkind: r for a table, p
    for a partition that is partitioned itself, f for a foreign table.
    """

    oid: int
    schema: str
    name: str
    qualified_name: str
    kind: str
    is_default: bool
    lower: datetime | None
    upper: datetime | None

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "from": self.lower.isoformat() if self.lower else "MINVALUE",
            "to": self.upper.isoformat() if self.upper else "MAXVALUE",
        }


@dataclass(frozen=True)
class Layout:
    """The partitioned voucher_audit_logs: its quoted name and direct partitions."""

    qualified_name: str
    partitions: list[Partition]

    def retirable(self, cutoff: datetime) -> list[Partition]:
        """Return the partitions whose whole range is before cutoff, oldest first.

        The DEFAULT partition, a partition bounded by MAXVALUE and a foreign
        table are never returned.
        """
        old = [
            (partition.upper, partition) for partition in self.partitions
            if not partition.is_default
            and partition.kind in ("r", "p")
            and partition.upper is not None
            and partition.upper <= cutoff
        ]
        return [partition for _, partition in sorted(old, key=lambda pair: pair[0])]


class PartitionArchiveConflict(Exception):
    """Rows of a partition that the archive table contains with other content."""

    def __init__(self, partition: str, ids: list[int]) -> None:
        self.partition = partition
        self.ids = ids
        shown = ", ".join(str(i) for i in ids[:10]) + (" ..." if len(ids) > 10 else "")
        super().__init__(
            f"voucher_jobs_audit_archive already contains audit row ids {shown} of "
            f"partition {partition} with different content (ids reused after a restore "
            "or a sequence reset). Nothing of this partition was archived or deleted. "
            "Compare the two copies, remove one of them, and run again."
        )


# --- layout -------------------------------------------------------------------

_PARENT = text(
    """
    SELECT c.oid, c.relkind, format('%I.%I', n.nspname, c.relname) AS qualified_name,
           p.partstrat, p.partnatts, p.partexprs IS NOT NULL AS has_expressions,
           (SELECT a.attname FROM pg_attribute AS a
            WHERE a.attrelid = c.oid AND a.attnum = p.partattrs[0]) AS key_column
    FROM pg_class AS c
    JOIN pg_namespace AS n ON n.oid = c.relnamespace
    LEFT JOIN pg_partitioned_table AS p ON p.partrelid = c.oid
    WHERE c.oid = to_regclass(:table)
    """
)

_PARTITIONS = text(
    """
    SELECT c.oid, n.nspname AS schema, c.relname AS name, c.relkind AS kind,
           format('%I.%I', n.nspname, c.relname) AS qualified_name,
           pg_get_expr(c.relpartbound, c.oid) AS bound
    FROM pg_inherits AS i
    JOIN pg_class AS c ON c.oid = i.inhrelid
    JOIN pg_namespace AS n ON n.oid = c.relnamespace
    WHERE i.inhparent = :parent
    ORDER BY c.relname
    """
)


def read_layout(connection: Connection) -> Layout | None:
    """Return the partitions of the voucher_audit_logs that the search_path finds.

    Returns None on SQLite, for a plain table, and for a table partitioned
    otherwise than by range of created_at alone. Only the bounds of such a
    range show that all rows of a partition are old.
    """
    if connection.dialect.name != "postgresql":
        return None
    parent = connection.execute(_PARENT, {"table": voucher_audit_logs.name}).first()
    if parent is None or parent.relkind != "p":
        return None
    if (parent.partstrat != "r" or parent.partnatts != 1 or parent.has_expressions
            or parent.key_column != "created_at"):
        return None
    partitions = [
        _partition(connection, row)
        for row in connection.execute(_PARTITIONS, {"parent": parent.oid})
    ]
    return Layout(parent.qualified_name, partitions)


def _partition(connection: Connection, row: Any) -> Partition:
    if row.bound == "DEFAULT":
        return Partition(row.oid, row.schema, row.name, row.qualified_name, row.kind, True,
                         None, None)
    match = _BOUND.match(row.bound)
    if match is None:
        raise ValueError(f"partition {row.qualified_name} has an unknown bound {row.bound!r}")
    return Partition(
        row.oid, row.schema, row.name, row.qualified_name, row.kind, False,
        _bound_value(connection, match["lower"], "MINVALUE"),
        _bound_value(connection, match["upper"], "MAXVALUE"),
    )


def _bound_value(connection: Connection, literal: str, unbounded: str) -> datetime | None:
    """Return the instant of one bound as pg_get_expr renders it, or None when unbounded.

    The server parses the literal back in the session that rendered it, so
    DateStyle and TimeZone are the same both ways. A bound of a `timestamp`
    or `date` key is read in the session's time zone, which the engine sets
    to UTC, as the batches compare created_at with the cutoff.
    """
    literal = literal.strip()
    if literal == unbounded:
        return None
    if not (literal.startswith("'") and literal.endswith("'")):
        raise ValueError(f"partition bound {literal!r} is not a quoted literal")
    value = literal[1:-1].replace("''", "'")
    return connection.execute(
        text("SELECT CAST(:value AS timestamptz)"), {"value": value}
    ).scalar_one()


def count_rows(connection: Connection, partition: Partition) -> int:
    return connection.execute(
        text(f"SELECT count(*) FROM {partition.qualified_name}")
    ).scalar_one()


def id_range(connection: Connection, partition: Partition) -> tuple[int | None, int | None]:
    """Return the lowest and highest id in the partition, or (None, None) when it is empty."""
    row = connection.execute(text(f"SELECT min(id), max(id) FROM {partition.qualified_name}")).one()
    return row[0], row[1]


# --- retiring one partition ---------------------------------------------------


@dataclass(frozen=True)
class RetiredPartition:
    """The outcome of retire_partition.

    `detach_seconds` runs from DETACH to the end of its COMMIT, which is how
    long the parent table was locked exclusively. `drop_seconds` is the time
    of the DROP of the detached table that follows. `drop_error` is set when
    that DROP failed, and the detached table is then left for the next run.
    """

    rows: int
    # The schema-qualified name of the detached table.
    detached_as: str
    detach_seconds: float
    drop_seconds: float | None
    drop_error: str | None


# Marks a table that retire_partition detached, so that a later run may drop
# it. The parent's name follows, so that only tables of this parent match.
DETACHED_COMMENT = "voucher-jobs: retired partition of "


def retire_partition(
    engine: Engine,
    parent: str,
    partition: Partition,
    archive: Callable[[Connection], int | None],
    lock_timeout_seconds: float,
    before_commit: Callable[[Connection], None] | None = None,
) -> RetiredPartition | None:
    """Lock, archive and detach one partition in one transaction, then drop it.

    `archive` runs after the SHARE lock is granted and returns the rows it
    archived. It returns None to roll back and keep the partition, and
    retire_partition then returns None. `before_commit` runs after the
    DETACH, in the same transaction. Raises DBAPIError when a lock is not granted in time (see
    skip_reason); the transaction is then rolled back.
    """
    detached = f"voucher_jobs_detached_{partition.oid}"
    milliseconds = _milliseconds(lock_timeout_seconds)
    with engine.connect() as connection:
        transaction = connection.begin()
        try:
            connection.execute(text(f"SET LOCAL lock_timeout = {milliseconds}"))
            connection.execute(text(f"LOCK TABLE {partition.qualified_name} IN SHARE MODE"))
            rows = archive(connection)
            if rows is None:
                transaction.rollback()
                return None
            started = time.monotonic()
            connection.execute(
                text(f"ALTER TABLE {parent} DETACH PARTITION {partition.qualified_name}")
            )
            connection.execute(text(f"ALTER TABLE {partition.qualified_name} RENAME TO {detached}"))
            qualified_detached = connection.execute(
                text("SELECT format('%I.%I', CAST(:schema AS text), CAST(:name AS text))"),
                {"schema": partition.schema, "name": detached},
            ).scalar_one()
            connection.execute(text(
                f"COMMENT ON TABLE {qualified_detached} IS "
                f"'{DETACHED_COMMENT}{_literal(parent)} ({_literal(partition.name)})'"
            ))
            if before_commit is not None:
                before_commit(connection)
            transaction.commit()
            detach_seconds = time.monotonic() - started
        except BaseException:
            if transaction.is_active:
                transaction.rollback()
            raise
    drop_seconds, drop_error = _drop(engine, qualified_detached, lock_timeout_seconds)
    return RetiredPartition(rows, qualified_detached, detach_seconds, drop_seconds, drop_error)


def _milliseconds(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _literal(value: str) -> str:
    return value.replace("'", "''")


def _drop(
    engine: Engine, table: str, lock_timeout_seconds: float
) -> tuple[float | None, str | None]:
    """Drop a detached table; return its seconds, or the error when it failed."""
    started = time.monotonic()
    try:
        with engine.begin() as connection:
            connection.execute(
                text(f"SET LOCAL lock_timeout = {_milliseconds(lock_timeout_seconds)}")
            )
            connection.execute(text(f"DROP TABLE {table}"))
    except DBAPIError as exc:
        # Its rows are out of voucher_audit_logs already. When a view that
        # uses the table, or a lock, keeps it, the next run tries again.
        return None, str(exc.orig or exc).strip().splitlines()[0]
    return time.monotonic() - started, None


_DETACHED_TABLES = text(
    """
    SELECT format('%I.%I', n.nspname, c.relname) AS qualified_name
    FROM pg_class AS c
    JOIN pg_namespace AS n ON n.oid = c.relnamespace
    JOIN pg_description AS d
      ON d.objoid = c.oid AND d.classoid = 'pg_class'::regclass AND d.objsubid = 0
    WHERE c.relname LIKE 'voucher\\_jobs\\_detached\\_%'
      AND c.relkind IN ('r', 'p')
      AND NOT c.relispartition
      AND starts_with(d.description, :marker)
    ORDER BY c.relname
    """
)


def drop_detached_tables(
    engine: Engine, parent: str, lock_timeout_seconds: float
) -> list[tuple[str, str | None]]:
    """Drop the tables that an earlier retirement detached but did not drop.

    Returns each table's name with None when it was dropped, or with the
    error that kept it.
    """
    with engine.connect() as connection:
        tables = list(connection.execute(
            _DETACHED_TABLES, {"marker": f"{DETACHED_COMMENT}{parent} ("}
        ).scalars())
    return [(table, _drop(engine, table, lock_timeout_seconds)[1]) for table in tables]


def skip_reason(exc: DBAPIError) -> str | None:
    """Return why a partition is skipped after exc, or None when exc must fail the run."""
    sqlstate = getattr(exc.orig, "sqlstate", None)
    return SKIP_SQLSTATES.get(sqlstate) if sqlstate else None


def copy_to_archive_table(
    connection: Connection, partition: Partition, run_id: int, archived_at: datetime
) -> tuple[int, int]:
    """Copy a locked partition's rows to voucher_jobs_audit_archive and check the copy.

    An id that is already in the archive (left by a restore, or archived by
    hand) is not copied again. Its archived row must then equal the live
    one, or PartitionArchiveConflict is raised: dropping the partition would
    lose the live version. Returns the partition's rows and how many of
    them were in the archive already.
    """
    columns = ", ".join(AUDIT_COLUMNS)
    inserted = connection.execute(
        text(
            f"""
            INSERT INTO voucher_jobs_audit_archive ({columns}, archived_at, run_id)
            SELECT {columns}, :archived_at, :run_id FROM {partition.qualified_name}
            ON CONFLICT (id) DO NOTHING
            """
        ),
        {"archived_at": archived_at, "run_id": run_id},
    ).rowcount
    # metadata is compared as jsonb, because json has no equality operator
    # and a backend may declare the column as json. The text columns are
    # compared as text, because a backend may declare them as enums, which
    # have no equality operator with the archive's varchar.
    differing = list(connection.execute(
        text(
            f"""
            SELECT live.id
            FROM {partition.qualified_name} AS live
            LEFT JOIN voucher_jobs_audit_archive AS copy ON copy.id = live.id
            WHERE copy.id IS NULL
               OR (copy.voucher_id, copy.action::text, copy.actor_type::text,
                   copy.code::text, copy.metadata::jsonb, copy.created_at)
                  IS DISTINCT FROM
                  (live.voucher_id, live.action::text, live.actor_type::text,
                   live.code::text, live.metadata::jsonb, live.created_at)
            ORDER BY live.id
            LIMIT 11
            """
        )
    ).scalars())
    if differing:
        raise PartitionArchiveConflict(partition.qualified_name, differing)
    rows = count_rows(connection, partition)
    return rows, rows - inserted


def mark_files_complete(connection: Connection, names: list[str]) -> None:
    """Set archive files to `complete`, in the caller's transaction."""
    if names:
        connection.execute(
            update(archive_files)
            .where(archive_files.c.name.in_(names))
            .values(status="complete", completed_at=utc_now())
        )


def partition_reader(partition: Partition) -> Callable[[Connection, Walk, int, int], list[Any]]:
    """Return a page reader, like audit_batches.read_page, that reads one partition.

    It reads every row of the partition with `after_id < id <= walk.end_id`,
    in id order. The partition gets a copy of voucher_audit_logs' Table, so
    that its rows come back with the same column types as the parent's.
    """
    table: Table = voucher_audit_logs.to_metadata(
        MetaData(), schema=partition.schema, name=partition.name
    )

    def read_rows(connection: Connection, walk: Walk, after_id: int, size: int) -> list[Any]:
        query = (
            select(*(table.c[name] for name in AUDIT_COLUMNS))
            .where(table.c.id > after_id, table.c.id <= walk.end_id)
            .order_by(table.c.id)
            .limit(size)
        )
        return list(connection.execute(query))

    return read_rows

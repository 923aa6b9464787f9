"""Tables: the backend's two tables, and voucher-jobs' own under one prefix.

`vouchers` and `voucher_audit_logs` keep the shape the voucher backend
already uses, so voucher-jobs can run against that database. Every table that
only voucher-jobs reads or writes starts with `voucher_jobs_`.
"""

from __future__ import annotations

from sqlalchemy import (
    Column,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

from voucher_jobs.data.types import BigId, JsonDocument, UTCDateTime, current_utc

TABLE_PREFIX = "voucher_jobs_"

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "pk": "pk_%(table_name)s",
    }
)

vouchers = Table(
    "vouchers",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("code", String(64), nullable=False, unique=True),
    Column("type", String(32), nullable=False),
    Column("expiry_date", UTCDateTime(), nullable=False),
    Column("deleted_at", UTCDateTime(), nullable=True),
    Column(
        "created_at", UTCDateTime(), nullable=False, server_default=current_utc()
    ),
)
# voucher-expired looks for live vouchers whose expiry has passed.
Index(
    "ix_vouchers_live_expiry_date",
    vouchers.c.expiry_date,
    vouchers.c.id,
    postgresql_where=vouchers.c.deleted_at.is_(None),
    sqlite_where=vouchers.c.deleted_at.is_(None),
)

voucher_audit_logs = Table(
    "voucher_audit_logs",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("voucher_id", BigId, nullable=True),
    Column("action", String(32), nullable=False),
    Column("actor_type", String(32), nullable=False),
    Column("code", String(64), nullable=True),
    Column("metadata", JsonDocument, nullable=True),
    Column(
        "created_at", UTCDateTime(), nullable=False, server_default=current_utc()
    ),
)
# audit-archival walks this index forward: (created_at, id) is its keyset.
Index(
    "ix_voucher_audit_logs_created_at_id",
    voucher_audit_logs.c.created_at,
    voucher_audit_logs.c.id,
)
Index("ix_voucher_audit_logs_voucher_id", voucher_audit_logs.c.voucher_id)

# One row per (voucher, expiry instant) that voucher-expired has logged. The
# primary key is what makes expiry exactly-once: two runs that race for the
# same voucher both try to insert this row and only one succeeds. Kept apart
# from the audit table so that archiving an old EXPIRED row does not make the
# voucher look unlogged.
expirations = Table(
    f"{TABLE_PREFIX}expirations",
    metadata,
    Column("voucher_id", BigId, nullable=False),
    Column("expiry_date", UTCDateTime(), nullable=False),
    Column("run_id", BigId, nullable=False),
    Column("logged_at", UTCDateTime(), nullable=False),
    PrimaryKeyConstraint("voucher_id", "expiry_date"),
)
# Each batch reads back its own claims by run id and voucher id. An index on
# run_id alone would scan every earlier batch's claims again.
Index(
    f"ix_{TABLE_PREFIX}expirations_run_id_voucher_id",
    expirations.c.run_id,
    expirations.c.voucher_id,
)

runs = Table(
    f"{TABLE_PREFIX}runs",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("job", String(64), nullable=False),
    Column("trigger", String(16), nullable=False),
    Column("status", String(16), nullable=False),
    Column("parameters", JsonDocument, nullable=False),
    Column("started_at", UTCDateTime(), nullable=False),
    Column("finished_at", UTCDateTime(), nullable=True),
    Column("heartbeat_at", UTCDateTime(), nullable=True),
    Column("rows_affected", Integer, nullable=False, server_default=text("0")),
    Column("result", JsonDocument, nullable=True),
    Column("error", Text, nullable=True),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("blocked_by_run_id", BigId, nullable=True),
    # Set by the scheduler: job plus fire time, so a fire time runs once.
    Column("run_key", String(255), nullable=True),
    UniqueConstraint("run_key"),
)
Index(f"ix_{TABLE_PREFIX}runs_job_status", runs.c.job, runs.c.status)
Index(f"ix_{TABLE_PREFIX}runs_started_at", runs.c.started_at)

# archive-table mode: the same columns as voucher_audit_logs, plus when and
# by which run each row was moved.
audit_archive = Table(
    f"{TABLE_PREFIX}audit_archive",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=False),
    Column("voucher_id", BigId, nullable=True),
    Column("action", String(32), nullable=False),
    Column("actor_type", String(32), nullable=False),
    Column("code", String(64), nullable=True),
    Column("metadata", JsonDocument, nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("archived_at", UTCDateTime(), nullable=False),
    Column("run_id", BigId, nullable=False),
)
Index(f"ix_{TABLE_PREFIX}audit_archive_created_at", audit_archive.c.created_at)

# archive-file mode: one row per file whose copy is durable and verified.
# status is "exported" while its rows are still being deleted, "complete"
# once they all are.
archive_files = Table(
    f"{TABLE_PREFIX}archive_files",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("name", String(255), nullable=False, unique=True),
    Column("run_id", BigId, nullable=False),
    Column("status", String(16), nullable=False),
    Column("row_count", Integer, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("first_created_at", UTCDateTime(), nullable=False),
    Column("last_created_at", UTCDateTime(), nullable=False),
    Column("min_id", BigId, nullable=False),
    Column("max_id", BigId, nullable=False),
    Column("cutoff", UTCDateTime(), nullable=False),
    Column("exported_at", UTCDateTime(), nullable=False),
    Column("completed_at", UTCDateTime(), nullable=True),
)

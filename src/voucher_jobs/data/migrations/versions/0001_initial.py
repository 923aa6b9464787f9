"""Create the voucher tables and voucher-jobs' own tables.

`vouchers` and `voucher_audit_logs` are created only when missing: on a
database the voucher backend already uses, they are checked for the columns
the jobs read and write, and only the indexes the jobs need are added. On
PostgreSQL those indexes are built with CREATE INDEX CONCURRENTLY, so the
application keeps writing while they build.

Revision ID: 0001
Revises:
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

from voucher_jobs.data.migrate import SchemaNotReady

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TIMESTAMP = sa.DateTime(timezone=True)
JSON = sa.JSON().with_variant(sa.dialects.postgresql.JSONB(), "postgresql")

REQUIRED_COLUMNS = {
    "vouchers": {"id", "code", "type", "expiry_date", "deleted_at"},
    "voucher_audit_logs": {
        "id", "voucher_id", "action", "actor_type", "code", "metadata", "created_at",
    },
}


def _now_default() -> sa.TextClause:
    if op.get_bind().dialect.name == "sqlite":
        return sa.text("(strftime('%Y-%m-%d %H:%M:%f000', 'now'))")
    return sa.text("statement_timestamp()")


def _existing_tables() -> set[str]:
    return set(sa.inspect(op.get_bind()).get_table_names())


def _check_columns(table: str) -> None:
    present = {column["name"] for column in sa.inspect(op.get_bind()).get_columns(table)}
    missing = REQUIRED_COLUMNS[table] - present
    if missing:
        raise SchemaNotReady(
            f"table {table} exists but lacks the columns {', '.join(sorted(missing))}. "
            "voucher-jobs needs the shape the voucher backend uses; add the columns "
            "or point DATABASE_URL at another database."
        )


def _create_index(name: str, table: str, columns: list[str], adopted: bool, **kw) -> None:
    if adopted and not kw and _is_partitioned(table):
        _create_partitioned_index(name, table, columns)
        return
    existing = {index["name"]: index for index in sa.inspect(op.get_bind()).get_indexes(table)}
    # A CREATE INDEX CONCURRENTLY that failed, in an earlier upgrade or by
    # hand, leaves an invalid index, which writes keep updating but the
    # planner never uses. Such an index is dropped and built again.
    invalid = name in existing and existing[name].get("dialect_options", {}).get(
        "postgresql_invalid", False
    )
    if name in existing and not invalid:
        return
    if adopted and op.get_bind().dialect.name == "postgresql":
        with op.get_context().autocommit_block():
            if invalid:
                op.drop_index(name, table_name=table, postgresql_concurrently=True)
            op.create_index(name, table, columns, postgresql_concurrently=True, **kw)
    else:
        if invalid:
            op.drop_index(name, table_name=table)
        op.create_index(name, table, columns, **kw)


def _is_partitioned(table: str) -> bool:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return False
    kind = bind.execute(
        sa.text("SELECT relkind FROM pg_class WHERE oid = to_regclass(:table)"), {"table": table}
    ).scalar()
    return kind == "p"


_CHILD_INDEXES = sa.text(
    """
    SELECT format('%I.%I', n.nspname, c.relname) AS qualified_name, c.relkind AS kind,
           format('%I', left(c.relname || :suffix, 63)) AS index_name,
           format('%I.%I', n.nspname, left(c.relname || :suffix, 63)) AS qualified_index,
           EXISTS (SELECT FROM pg_index AS x
                   JOIN pg_inherits AS xi ON xi.inhrelid = x.indexrelid
                   WHERE x.indrelid = c.oid AND xi.inhparent = to_regclass(:index)) AS attached
    FROM pg_inherits AS i
    JOIN pg_class AS c ON c.oid = i.inhrelid
    JOIN pg_namespace AS n ON n.oid = c.relnamespace
    WHERE i.inhparent = to_regclass(:table)
    ORDER BY c.relname
    """
)


def _create_partitioned_index(name: str, table: str, columns: list[str]) -> None:
    """Build an index on a partitioned table while the application keeps writing.

    CREATE INDEX CONCURRENTLY is not allowed on a partitioned table, and a
    plain CREATE INDEX on it blocks writes to every partition while it
    builds. Instead the index is created ON ONLY the partitioned table,
    which is instant and leaves it invalid. Each partition then gets its own
    index, built CONCURRENTLY and attached; the parent index turns valid
    when the last partition's index is attached. A rerun after a failure
    goes on with the partitions that have no attached index yet.
    """
    bind = op.get_bind()
    column_list = ", ".join(f'"{column}"' for column in columns)
    # PostgreSQL's own naming scheme for a partition's index: table_columns_idx.
    suffix = f"_{'_'.join(columns)}_idx"
    with op.get_context().autocommit_block():
        _create_index_tree(bind, f'"{name}"', f'"{name}"', f'"{table}"', column_list, suffix)


def _create_index_tree(bind, name: str, index: str, table: str, column_list: str,
                       suffix: str) -> None:
    # CREATE INDEX takes the bare name and puts the index in the table's schema.
    bind.execute(sa.text(f"CREATE INDEX IF NOT EXISTS {name} ON ONLY {table} ({column_list})"))
    children = bind.execute(
        _CHILD_INDEXES, {"index": index, "table": table, "suffix": suffix}
    ).all()
    for child in children:
        if child.attached:
            continue
        if child.kind == "p":
            _create_index_tree(bind, child.index_name, child.qualified_index,
                               child.qualified_name, column_list, suffix)
        else:
            invalid = bind.execute(
                sa.text("SELECT NOT indisvalid FROM pg_index "
                        "WHERE indexrelid = to_regclass(:index)"), {"index": child.qualified_index}
            ).scalar()
            if invalid:
                bind.execute(sa.text(f"DROP INDEX CONCURRENTLY {child.qualified_index}"))
            bind.execute(sa.text(f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {child.index_name} "
                                 f"ON {child.qualified_name} ({column_list})"))
        bind.execute(sa.text(f"ALTER INDEX {index} ATTACH PARTITION {child.qualified_index}"))


def _adopt_expired_rows() -> None:
    """Record EXPIRED rows written before voucher-jobs, so they are not written again.

    An existing EXPIRED row counts for the voucher's current expiry when it
    was written at or after that expiry; run_id 0 marks such adopted claims.
    A row older than the current expiry belongs to an earlier expiry, so the
    current one still gets its own row.
    """
    now = "statement_timestamp()" if op.get_bind().dialect.name == "postgresql" else (
        "strftime('%Y-%m-%d %H:%M:%f000', 'now')"
    )
    op.execute(
        f"""
        INSERT INTO voucher_jobs_expirations (voucher_id, expiry_date, run_id, logged_at)
        SELECT DISTINCT v.id, v.expiry_date, 0, {now}
        FROM voucher_audit_logs AS l
        JOIN vouchers AS v ON v.id = l.voucher_id
        WHERE l.action = 'EXPIRED' AND l.created_at >= v.expiry_date
        """
    )


def upgrade() -> None:
    tables = _existing_tables()
    live_only = sa.text("deleted_at IS NULL")

    vouchers_adopted = "vouchers" in tables
    if vouchers_adopted:
        _check_columns("vouchers")
    else:
        op.create_table(
            "vouchers",
            sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
            sa.Column("code", sa.String(64), nullable=False),
            sa.Column("type", sa.String(32), nullable=False),
            sa.Column("expiry_date", TIMESTAMP, nullable=False),
            sa.Column("deleted_at", TIMESTAMP, nullable=True),
            sa.Column("created_at", TIMESTAMP, server_default=_now_default(), nullable=False),
            sa.PrimaryKeyConstraint("id", name="pk_vouchers"),
            sa.UniqueConstraint("code", name="uq_vouchers_code"),
        )
    _create_index(
        "ix_vouchers_live_expiry_date", "vouchers", ["expiry_date", "id"], vouchers_adopted,
        postgresql_where=live_only, sqlite_where=live_only,
    )

    logs_adopted = "voucher_audit_logs" in tables
    if logs_adopted:
        _check_columns("voucher_audit_logs")
    else:
        op.create_table(
            "voucher_audit_logs",
            sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
            sa.Column("voucher_id", BIG_ID, nullable=True),
            sa.Column("action", sa.String(32), nullable=False),
            sa.Column("actor_type", sa.String(32), nullable=False),
            sa.Column("code", sa.String(64), nullable=True),
            sa.Column("metadata", JSON, nullable=True),
            sa.Column("created_at", TIMESTAMP, server_default=_now_default(), nullable=False),
            sa.PrimaryKeyConstraint("id", name="pk_voucher_audit_logs"),
        )
    _create_index(
        "ix_voucher_audit_logs_created_at_id", "voucher_audit_logs", ["created_at", "id"],
        logs_adopted,
    )
    _create_index(
        "ix_voucher_audit_logs_voucher_id", "voucher_audit_logs", ["voucher_id"], logs_adopted
    )

    op.create_table(
        "voucher_jobs_expirations",
        sa.Column("voucher_id", BIG_ID, nullable=False),
        sa.Column("expiry_date", TIMESTAMP, nullable=False),
        sa.Column("run_id", BIG_ID, nullable=False),
        sa.Column("logged_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("voucher_id", "expiry_date", name="pk_voucher_jobs_expirations"),
    )
    op.create_index(
        "ix_voucher_jobs_expirations_run_id_voucher_id",
        "voucher_jobs_expirations",
        ["run_id", "voucher_id"],
    )

    if logs_adopted and vouchers_adopted:
        _adopt_expired_rows()

    op.create_table(
        "voucher_jobs_runs",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("job", sa.String(64), nullable=False),
        sa.Column("trigger", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("parameters", JSON, nullable=False),
        sa.Column("started_at", TIMESTAMP, nullable=False),
        sa.Column("finished_at", TIMESTAMP, nullable=True),
        sa.Column("heartbeat_at", TIMESTAMP, nullable=True),
        sa.Column("rows_affected", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("result", JSON, nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("blocked_by_run_id", BIG_ID, nullable=True),
        sa.Column("run_key", sa.String(255), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_voucher_jobs_runs"),
        sa.UniqueConstraint("run_key", name="uq_voucher_jobs_runs_run_key"),
    )
    op.create_index("ix_voucher_jobs_runs_job_status", "voucher_jobs_runs", ["job", "status"])
    op.create_index("ix_voucher_jobs_runs_started_at", "voucher_jobs_runs", ["started_at"])

    op.create_table(
        "voucher_jobs_audit_archive",
        sa.Column("id", BIG_ID, autoincrement=False, nullable=False),
        sa.Column("voucher_id", BIG_ID, nullable=True),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("actor_type", sa.String(32), nullable=False),
        sa.Column("code", sa.String(64), nullable=True),
        sa.Column("metadata", JSON, nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("archived_at", TIMESTAMP, nullable=False),
        sa.Column("run_id", BIG_ID, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_voucher_jobs_audit_archive"),
    )
    op.create_index(
        "ix_voucher_jobs_audit_archive_created_at", "voucher_jobs_audit_archive", ["created_at"]
    )

    op.create_table(
        "voucher_jobs_archive_files",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("run_id", BIG_ID, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("row_count", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("first_created_at", TIMESTAMP, nullable=False),
        sa.Column("last_created_at", TIMESTAMP, nullable=False),
        sa.Column("min_id", BIG_ID, nullable=False),
        sa.Column("max_id", BIG_ID, nullable=False),
        sa.Column("cutoff", TIMESTAMP, nullable=False),
        sa.Column("exported_at", TIMESTAMP, nullable=False),
        sa.Column("completed_at", TIMESTAMP, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_voucher_jobs_archive_files"),
        sa.UniqueConstraint("name", name="uq_voucher_jobs_archive_files_name"),
    )


def downgrade() -> None:
    # Only voucher-jobs' own tables are dropped: the voucher tables may
    # belong to the backend, which keeps its data.
    for table in (
        "voucher_jobs_archive_files",
        "voucher_jobs_audit_archive",
        "voucher_jobs_runs",
        "voucher_jobs_expirations",
    ):
        op.drop_table(table)

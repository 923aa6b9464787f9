"""Alembic environment: runs on the connection that voucher_jobs.data.migrate passes."""

from alembic import context

from voucher_jobs.data.schema import metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
    version_table="voucher_jobs_alembic_version",
)
with context.begin_transaction():
    context.run_migrations()

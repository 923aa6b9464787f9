"""Time the retirement of one old partition of voucher_audit_logs, by partition size.

    .venv/bin/python -m benchmarks.partition_retirement --rows 10000,1000000 --repeat 5

For each size and repetition, the script creates a database of its own on
the server at VOUCHER_JOBS_TEST_POSTGRES_URL (default: the local one),
creates voucher_audit_logs partitioned by month, fills the January 2020
partition with that many rows, runs VACUUM ANALYZE and then audit-archival
with a cutoff after that month. It prints, per run, the milliseconds of the
DETACH transaction (from DETACH to the end of its COMMIT: how long the
parent table was locked exclusively), the milliseconds of the DROP of the
detached table that follows, and the seconds of the whole run. Then it
drops the database. `--modes` adds archive-table and archive-file runs,
whose copy or export happens before the exclusive lock, under a SHARE lock
on the partition only. The figures are in docs/partitioning.md, and `python3
dev.py bench` measures the same with its partitions part.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import make_url

from voucher_jobs.config import ArchiveMode
from voucher_jobs.data import migrate
from voucher_jobs.data.engine import create_db_engine
from voucher_jobs.jobs import audit_archival
from voucher_jobs.jobs.base import BatchLimits, JobContext

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
REFERENCE = datetime(2026, 12, 4, 10, tzinfo=timezone.utc)

LAYOUT = """
CREATE TABLE voucher_audit_logs (
    id bigserial,
    voucher_id bigint,
    action varchar(32) NOT NULL,
    actor_type varchar(32) NOT NULL,
    code varchar(64),
    metadata jsonb,
    created_at timestamptz NOT NULL DEFAULT statement_timestamp(),
    PRIMARY KEY (id, created_at)
) PARTITION BY RANGE (created_at);
CREATE TABLE voucher_audit_logs_p2020_01 PARTITION OF voucher_audit_logs
    FOR VALUES FROM ('2020-01-01 00:00:00+00') TO ('2020-02-01 00:00:00+00');
CREATE TABLE voucher_audit_logs_p2026_12 PARTITION OF voucher_audit_logs
    FOR VALUES FROM ('2026-12-01 00:00:00+00') TO ('2027-01-01 00:00:00+00');
CREATE TABLE voucher_audit_logs_default PARTITION OF voucher_audit_logs DEFAULT;
"""

# Rows spread over January 2020, with metadata of the size that
# voucher-expired writes.
FILL = """
INSERT INTO voucher_audit_logs (voucher_id, action, actor_type, code, metadata, created_at)
SELECT g % 50000, 'UPDATED', 'ADMIN', 'V' || lpad((g % 50000)::text, 7, '0'),
       jsonb_build_object('type', 'PERCENTAGE', 'expiry_date', '2020-01-31T00:00:00.000000Z'),
       timestamptz '2020-01-01 00:00:00+00' + (g * (2678399.0 / :rows)) * interval '1 second'
FROM generate_series(1, :rows) AS g
"""


def measure(admin_url: str, rows: int, mode: ArchiveMode, number: int) -> dict[str, Any]:
    """Create, fill and retire one partition of `rows` rows; return the figures."""
    name = f"voucher_jobs_bench_partitions_{os.getpid()}_{number}"
    admin = create_db_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    engine = create_db_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(text(LAYOUT))
        migrate.upgrade(engine)
        with engine.begin() as connection:
            connection.execute(text(FILL), {"rows": rows})
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(text("VACUUM ANALYZE voucher_audit_logs"))
        events: list[tuple[str, dict[str, Any]]] = []
        with tempfile.TemporaryDirectory() as folder:
            parameters = audit_archival.ArchivalParameters(
                retention_days=730, mode=mode, reference_time=REFERENCE,
                limits=BatchLimits(batch_size=10_000), archive_dir=Path(folder),
            )
            started = time.monotonic()
            result = audit_archival.run(
                engine, parameters,
                JobContext(run_id=1, log=lambda event, **fields: events.append((event, fields))),
            )
            seconds = time.monotonic() - started
        [retired] = [fields for event, fields in events if event == "partition_retired"]
        assert retired["rows"] == rows, retired
        assert result.rows_affected == rows
        return {"rows": rows, "mode": mode.value, "detach_ms": retired["detach_ms"],
                "drop_ms": retired["drop_ms"], "run_seconds": round(seconds, 2)}
    finally:
        engine.dispose()
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="10000,1000000",
                        help="comma-separated partition sizes in rows")
    parser.add_argument("--repeat", type=int, default=5, help="runs per size and mode")
    parser.add_argument("--modes", default="delete",
                        help="comma-separated modes: delete, archive-table, archive-file")
    arguments = parser.parse_args()
    admin_url = os.environ.get("VOUCHER_JOBS_TEST_POSTGRES_URL", DEFAULT_URL)
    number = 0
    for mode in (ArchiveMode(value) for value in arguments.modes.split(",")):
        for rows in (int(value) for value in arguments.rows.split(",")):
            figures = []
            for _ in range(arguments.repeat):
                number += 1
                figures.append(measure(admin_url, rows, mode, number))
                print(figures[-1], flush=True)
            detach = [entry["detach_ms"] for entry in figures]
            drop = [entry["drop_ms"] for entry in figures]
            run = [entry["run_seconds"] for entry in figures]
            print(f"{mode.value} {rows} rows: DETACH transaction median "
                  f"{statistics.median(detach)} ms, max {max(detach)} ms; DROP median "
                  f"{statistics.median(drop)} ms, max {max(drop)} ms; run median "
                  f"{statistics.median(run)} s, max {max(run)} s", flush=True)


if __name__ == "__main__":
    main()

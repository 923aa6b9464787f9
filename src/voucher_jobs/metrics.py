"""Prometheus metrics computed from the run ledger at scrape time.

Every replica and every worker process reads the same voucher_jobs_runs
table, so each one reports the same values, whichever of them ran the job.
Per-process counters would instead count only the runs of the process that
was scraped. The cost is a few aggregate queries over the ledger per scrape,
which grows by a few rows a day per job.

Metrics (labels in braces):

- voucher_jobs_runs_total{job,status}: finished runs by status (succeeded,
  failed, skipped, interrupted), dry runs included.
- voucher_jobs_runs_in_progress{job}: runs marked running.
- voucher_jobs_run_duration_seconds{job}: histogram of finished_at minus
  started_at over runs that ran (all finished statuses but skipped).
- voucher_jobs_rows_affected_total{job}: rows written or removed by finished runs.
- voucher_jobs_last_success_timestamp_seconds{job}: Unix time at which the
  newest successful run that was not a dry run finished; absent until one has.
- voucher_jobs_ledger_up: 1 when the queries above succeeded at this scrape,
  0 when the database was unreachable (the other metrics are then absent).
- voucher_jobs_ledger_scrape_duration_seconds: time the queries took.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import CollectorRegistry
from prometheus_client.utils import floatToGoString
from sqlalchemy import Engine, Float, case, false, func, or_, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement

from voucher_jobs.data import ledger
from voucher_jobs.data.schema import runs
from voucher_jobs.jobs import JOBS
from voucher_jobs.logs import log_event

logger = logging.getLogger(__name__)

# Upper bounds in seconds, from a short run on an empty table to the
# four-hour default maximum run time of audit-archival.
DURATION_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0)
FINISHED_STATUSES = (ledger.SUCCEEDED, ledger.FAILED, ledger.SKIPPED, ledger.INTERRUPTED)
RAN_STATUSES = (ledger.SUCCEEDED, ledger.FAILED, ledger.INTERRUPTED)


class elapsed_seconds(FunctionElement[float]):  # noqa: N801 - reads as a SQL function
    """SQL expression: seconds from the first UTCDateTime argument to the second."""

    type = Float()
    inherit_cache = True


@compiles(elapsed_seconds, "postgresql")
def _elapsed_seconds_postgresql(element: elapsed_seconds, compiler: Any, **kw: Any) -> str:
    start, end = (compiler.process(clause, **kw) for clause in element.clauses)
    return f"EXTRACT(EPOCH FROM ({end}) - ({start}))"


@compiles(elapsed_seconds, "sqlite")
def _elapsed_seconds_sqlite(element: elapsed_seconds, compiler: Any, **kw: Any) -> str:
    # julianday() parses the stored UTC text and returns days as a double.
    # SQLite computes it from whole milliseconds.
    start, end = (compiler.process(clause, **kw) for clause in element.clauses)
    return f"((julianday({end}) - julianday({start})) * 86400.0)"


class LedgerCollector:
    """A prometheus_client collector that queries the run ledger on each collect()."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def describe(self) -> Iterable[Metric]:
        # Names only, so that registering the collector runs no query.
        return _families()

    def collect(self) -> Iterator[Metric]:
        started = time.monotonic()
        up = GaugeMetricFamily(
            "voucher_jobs_ledger_up",
            "1 when the run ledger could be read at this scrape, else 0.",
        )
        try:
            families = self._read()
        except SQLAlchemyError as exc:
            log_event(logger, "metrics_ledger_unreadable", logging.WARNING,
                      error=_first_line(exc))
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families
        elapsed = GaugeMetricFamily(
            "voucher_jobs_ledger_scrape_duration_seconds",
            "Seconds the run ledger queries of this scrape took.",
        )
        elapsed.add_metric([], time.monotonic() - started)
        yield elapsed

    def _read(self) -> list[Metric]:
        runs_total, in_progress, duration, rows, last_success = _families()
        jobs = sorted(JOBS)
        with self.engine.connect() as connection:
            counts = connection.execute(
                select(runs.c.job, runs.c.status, func.count(), func.sum(runs.c.rows_affected))
                .group_by(runs.c.job, runs.c.status)
            ).all()
            durations = connection.execute(_duration_query()).all()
            successes = connection.execute(_last_success_query()).all()

        by_status = {(job, status): (count, total or 0) for job, status, count, total in counts}
        for job in jobs:
            for status in FINISHED_STATUSES:
                runs_total.add_metric([job, status], by_status.get((job, status), (0, 0))[0])
            in_progress.add_metric([job], by_status.get((job, ledger.RUNNING), (0, 0))[0])
            rows.add_metric([job], sum(
                by_status.get((job, status), (0, 0))[1] for status in FINISHED_STATUSES
            ))

        by_job = {row[0]: row[1:] for row in durations}
        for job in jobs:
            values = by_job.get(job)
            cumulative = [int(value or 0) for value in values[:-2]] if values else []
            count = int(values[-2] or 0) if values else 0
            total = float(values[-1] or 0.0) if values else 0.0
            buckets = [
                (floatToGoString(bound), cumulative[index] if cumulative else 0)
                for index, bound in enumerate(DURATION_BUCKETS)
            ]
            buckets.append(("+Inf", count))
            duration.add_metric([job], buckets, total)

        for job, finished_at in successes:
            if finished_at is not None:
                last_success.add_metric([job], finished_at.timestamp())
        return [runs_total, in_progress, duration, rows, last_success]


def _families() -> list[Metric]:
    return [
        CounterMetricFamily(
            "voucher_jobs_runs",
            "Finished runs by job and status, from the run ledger.",
            labels=["job", "status"],
        ),
        GaugeMetricFamily(
            "voucher_jobs_runs_in_progress",
            "Runs of the job that the ledger marks running.",
            labels=["job"],
        ),
        HistogramMetricFamily(
            "voucher_jobs_run_duration_seconds",
            "Duration of finished runs that ran (not skipped), from the run ledger.",
            labels=["job"],
        ),
        CounterMetricFamily(
            "voucher_jobs_rows_affected",
            "Rows written or removed by finished runs, from the run ledger.",
            labels=["job"],
        ),
        GaugeMetricFamily(
            "voucher_jobs_last_success_timestamp_seconds",
            "Unix time at which the newest successful run (not a dry run) finished.",
            labels=["job"],
        ),
    ]


def _duration_query() -> Any:
    seconds = elapsed_seconds(runs.c.started_at, runs.c.finished_at)
    columns = [
        func.sum(case((seconds <= bound, 1), else_=0)) for bound in DURATION_BUCKETS
    ]
    return (
        select(runs.c.job, *columns, func.count(), func.sum(seconds))
        .where(runs.c.status.in_(RAN_STATUSES), runs.c.finished_at.is_not(None))
        .group_by(runs.c.job)
    )


def _last_success_query() -> Any:
    dry_run = runs.c.parameters["dry_run"].as_boolean()
    return (
        select(runs.c.job, func.max(runs.c.finished_at))
        .where(runs.c.status == ledger.SUCCEEDED, or_(dry_run.is_(None), dry_run == false()))
        .group_by(runs.c.job)
    )


def _first_line(exc: BaseException) -> str:
    original = getattr(exc, "orig", None) or exc
    text = str(original).strip()
    return f"{type(original).__name__}: {text.splitlines()[0] if text else ''}"


def ledger_registry(engine: Engine) -> CollectorRegistry:
    """Return a registry holding only the ledger collector for engine.

    A registry of its own keeps out prometheus_client's default process and
    platform collectors, which would differ between replicas.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(LedgerCollector(engine))
    return registry

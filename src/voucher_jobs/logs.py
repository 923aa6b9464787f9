"""Logging: one logger per module, an event name per line, fields as key=value.

Each event is logged as `logger.info("event_name", extra={"fields": {...}})`
and rendered as `2026-12-04T10:00:00.123Z INFO voucher_jobs.runner
run_started run_id=7 job=voucher-expired`.
"""

from __future__ import annotations

import logging
import sys
from datetime import datetime, timezone
from typing import Any


class KeyValueFormatter(logging.Formatter):
    """Render a record as UTC time, level, logger, event and its fields."""

    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.fromtimestamp(record.created, timezone.utc)
        fields = getattr(record, "fields", {}) or {}
        rendered = " ".join(f"{key}={_render(value)}" for key, value in fields.items())
        line = (
            f"{moment.strftime('%Y-%m-%dT%H:%M:%S.%f')[:-3]}Z {record.levelname} "
            f"{record.name} {record.getMessage()}"
        )
        if rendered:
            line = f"{line} {rendered}"
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        return line


def _render(value: Any) -> str:
    text = str(value)
    if not text or any(ch.isspace() for ch in text) or '"' in text:
        return '"' + text.replace('"', '\\"') + '"'
    return text


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one named event with its fields."""
    logger.log(level, event, extra={"fields": fields})


def configure(verbosity: int = 0, stream: Any = None) -> None:
    """Send voucher_jobs' logs to stderr; -v shows batches, -vv SQL statements."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    root = logging.getLogger("voucher_jobs")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbosity >= 1 else logging.INFO)
    root.propagate = False
    if verbosity >= 2:
        sql = logging.getLogger("sqlalchemy.engine")
        sql.handlers[:] = [handler]
        sql.setLevel(logging.INFO)

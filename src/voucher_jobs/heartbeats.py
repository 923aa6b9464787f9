"""Heartbeat calls to a cron monitor (dead man's switch) on run start, success and failure.

Placeholder until the HTTP work lands: returns no listeners.
"""

from __future__ import annotations

from voucher_jobs.config import Settings
from voucher_jobs.runner import Listener


def heartbeat_listeners(job: str, settings: Settings) -> tuple[Listener, ...]:
    """Return the listeners that call job's heartbeat URL, if one is set."""
    return ()

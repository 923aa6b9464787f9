"""Heartbeat pings to a cron monitor (dead man's switch) on run start, success and failure.

When VOUCHER_JOBS_<JOB>_HEARTBEAT_URL is set (for example
VOUCHER_JOBS_VOUCHER_EXPIRED_HEARTBEAT_URL), each run of that job sends, in
the convention of Healthchecks.io and compatible monitors:

- POST {url}/start when the run starts,
- POST {url} when it succeeds,
- POST {url}/fail when it fails.

The request body is a one-line summary of the run, which such monitors keep
as the ping's log. A run that was interrupted (stopped by a signal or by
server shutdown) sends no completion ping, so the monitor alerts only if no
later run completes within its grace time. Dry runs send nothing, because
they do not do the job's work.

A heartbeat never fails or stops the run: each ping gets TIMEOUT_SECONDS per
attempt and RETRY_DELAYS_SECONDS between attempts, and a ping that still
fails is logged and dropped. Such URLs carry their secret in the path, so
logs name only the monitor's host.
"""

from __future__ import annotations

import logging
import time
from urllib.parse import urlsplit

import httpx

from voucher_jobs import __version__
from voucher_jobs.config import ENV_NAMES, ConfigError, Settings
from voucher_jobs.data import ledger
from voucher_jobs.logs import log_event
from voucher_jobs.runner import Listener

logger = logging.getLogger(__name__)

TIMEOUT_SECONDS = 5.0
# One attempt plus one retry per delay: at most three requests per ping.
RETRY_DELAYS_SECONDS = (1.0, 2.0)
MAX_BODY_CHARS = 2000

# httpx logs each request's full URL at INFO, which would put the secret
# path in the logs of any application that logs httpx at that level. Raise
# its level unless the application has set one itself.
for _name in ("httpx", "httpcore"):
    if logging.getLogger(_name).level == logging.NOTSET:
        logging.getLogger(_name).setLevel(logging.WARNING)


INVALID_URL_REASON = "the URL must start with http:// or https:// and name a host"


def _usable(url: str) -> bool:
    try:
        parts = urlsplit(url)
        return parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:  # such as an unclosed IPv6 bracket
        return False


def check_heartbeat_urls(settings: Settings) -> None:
    """Raise ConfigError for a heartbeat URL that is set but that no ping could use.

    The message names the variable but hides the value, which usually
    contains the monitor's secret.
    """
    for field, variable in ENV_NAMES.items():
        url = getattr(settings, field) if field.endswith("_heartbeat_url") else None
        if url is None or not url.strip() or _usable(url.strip()):
            continue
        raise ConfigError(
            f"{variable}=(masked) is invalid: {INVALID_URL_REASON}. Set it to the "
            "http:// or https:// URL that the monitor gives for this job, or leave it "
            "empty to send no heartbeats."
        )


def heartbeat_listeners(job: str, settings: Settings) -> tuple[Listener, ...]:
    """Return the listeners that ping job's heartbeat URL, or () when none is set."""
    url = getattr(settings, f"{job.replace('-', '_')}_heartbeat_url", None)
    if url is None or not url.strip():
        return ()
    url = url.strip().rstrip("/")
    if not _usable(url):
        log_event(logger, "heartbeat_url_invalid", logging.ERROR, job=job,
                  reason=INVALID_URL_REASON)
        return ()
    return (HeartbeatListener(job, url, timeout=TIMEOUT_SECONDS,
                              retry_delays=RETRY_DELAYS_SECONDS),)


class HeartbeatListener:
    """A runner listener that pings one monitor URL; never raises."""

    def __init__(
        self,
        job: str,
        url: str,
        *,
        timeout: float,
        retry_delays: tuple[float, ...],
    ) -> None:
        self.job = job
        self._url = url
        self._host = urlsplit(url).hostname or "?"
        self._timeout = timeout
        self._retry_delays = retry_delays

    def __call__(self, event: str, run: ledger.RunRow) -> None:
        if run.parameters.get("dry_run"):
            return
        if event == "success" and run.status == ledger.INTERRUPTED:
            log_event(logger, "heartbeat_not_sent", logging.INFO, job=self.job,
                      run_id=run.id, reason="the run was interrupted")
            return
        suffix = {"start": "/start", "success": "", "fail": "/fail"}.get(event)
        if suffix is None:
            return
        try:
            self._send(event, self._url + suffix, _summary(event, run), run.id)
        except Exception as exc:  # noqa: BLE001 - a heartbeat never fails the run
            log_event(logger, "heartbeat_error", logging.WARNING, job=self.job,
                      run_id=run.id, ping=event, monitor=self._host,
                      error=self._redact(f"{type(exc).__name__}: {exc}"))

    def _send(self, event: str, url: str, body: str, run_id: int) -> None:
        headers = {"User-Agent": f"voucher-jobs/{__version__}",
                   "Content-Type": "text/plain; charset=utf-8"}
        attempts = len(self._retry_delays) + 1
        with httpx.Client(timeout=self._timeout, follow_redirects=False) as client:
            for attempt in range(1, attempts + 1):
                error, retryable = self._attempt(client, url, body, headers)
                if error is None:
                    log_event(logger, "heartbeat_sent", logging.DEBUG, job=self.job,
                              run_id=run_id, ping=event, monitor=self._host,
                              attempt=attempt)
                    return
                last = attempt == attempts or not retryable
                log_event(logger, "heartbeat_failed", logging.WARNING, job=self.job,
                          run_id=run_id, ping=event, monitor=self._host,
                          attempt=attempt, of=attempts, error=error,
                          retrying=not last)
                if last:
                    return
                time.sleep(self._retry_delays[attempt - 1])

    def _attempt(self, client: httpx.Client, url: str, body: str,
                 headers: dict[str, str]) -> tuple[str | None, bool]:
        """Send one request; return (error or None, whether a retry may help)."""
        try:
            response = client.post(url, content=body.encode("utf-8"), headers=headers)
        except httpx.HTTPError as exc:
            return self._redact(f"{type(exc).__name__}: {exc}"), True
        if response.is_success:
            return None, False
        retryable = response.status_code >= 500 or response.status_code == 429
        return f"HTTP status {response.status_code}", retryable

    def _redact(self, text: str) -> str:
        """Remove the URL and its path from an error message."""
        path = urlsplit(self._url).path
        text = text.replace(self._url, f"<{self._host} heartbeat URL>")
        if path and path != "/":
            text = text.replace(path, "<path>")
        return text


def _summary(event: str, run: ledger.RunRow) -> str:
    if event == "start":
        return f"{run.job} run {run.id} started (trigger {run.trigger}) on {run.host}"
    if event == "success":
        rows = "1 row" if run.rows_affected == 1 else f"{run.rows_affected} rows"
        return f"{run.job} run {run.id} succeeded: {rows}"
    error = run.error or "unknown error"
    return f"{run.job} run {run.id} failed: {error}"[:MAX_BODY_CHARS]

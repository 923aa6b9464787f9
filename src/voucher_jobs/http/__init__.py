"""The HTTP API: start runs, read the run ledger, health check and metrics.

`create_app` builds the FastAPI application; `voucher-jobs serve` runs it
with uvicorn.
"""

from voucher_jobs.http.app import create_app

__all__ = ["create_app"]

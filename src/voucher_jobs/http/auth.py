"""Bearer-token authentication and the rule for when the API may run without it.

Every endpoint except /healthz, /docs and /openapi.json requires the header
`Authorization: Bearer <VOUCHER_JOBS_API_TOKEN>`. The server runs without a
token only when VOUCHER_JOBS_API_ALLOW_UNAUTHENTICATED=true and it binds a
loopback address, so that only processes on the same host can reach it.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Depends, HTTPException, Request, Response, status
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from voucher_jobs.config import ConfigError, Settings

REALM = "voucher-jobs"

bearer_scheme = HTTPBearer(
    auto_error=False,
    description="The value of VOUCHER_JOBS_API_TOKEN.",
)


def is_loopback(host: str) -> bool:
    """Return whether host is a loopback address (127.0.0.0/8, ::1) or `localhost`.

    Other host names are not resolved, so they count as not loopback.
    """
    name = host.strip().strip("[]")
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_auth_settings(settings: Settings, host: str) -> None:
    """Raise ConfigError unless the API may serve on host with these settings."""
    if settings.api_token is not None:
        return
    if not settings.api_allow_unauthenticated:
        raise ConfigError(
            "VOUCHER_JOBS_API_TOKEN is not set, and the HTTP API does not run without "
            "one. Set it to a random string of at least 16 characters, for example the "
            "output of `python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`. "
            "For local development only, VOUCHER_JOBS_API_ALLOW_UNAUTHENTICATED=true "
            "serves without a token on a loopback address."
        )
    if not is_loopback(host):
        raise ConfigError(
            f"VOUCHER_JOBS_API_ALLOW_UNAUTHENTICATED=true is only allowed on a loopback "
            f"address, but the bind host is {host!r}. Set VOUCHER_JOBS_API_TOKEN, or "
            "bind 127.0.0.1 or ::1."
        )


def _unauthorized(message: str, error: str | None = None) -> HTTPException:
    challenge = f'Bearer realm="{REALM}"'
    if error:
        challenge += f', error="{error}"'
    return HTTPException(
        status_code=status.HTTP_401_UNAUTHORIZED,
        detail=message,
        headers={"WWW-Authenticate": challenge},
    )


def require_token(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Depends(bearer_scheme),
) -> None:
    """Reject the request with 401 unless it carries the API token.

    Does nothing when the app runs without a token, which check_auth_settings
    allows only on a loopback address.
    """
    expected: bytes | None = request.app.state.api_token
    if expected is None:
        return
    if credentials is None:
        raise _unauthorized(
            "Missing bearer token. Send the header Authorization: Bearer <token>, with "
            "the token set in VOUCHER_JOBS_API_TOKEN."
        )
    # compare_digest takes time independent of where the first difference is,
    # so the response time does not reveal how much of a guess was right.
    if not hmac.compare_digest(credentials.credentials.encode("utf-8"), expected):
        raise _unauthorized("Invalid bearer token. Send the token set in "
                            "VOUCHER_JOBS_API_TOKEN.", error="invalid_token")


class TokenCheckedRoute(APIRoute):
    """An APIRoute that checks the bearer token before FastAPI reads the request body.

    FastAPI parses a JSON body before it runs dependencies, so without this
    check a request without a valid token but with a malformed body would get
    400 or 422 instead of 401.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def check_token_first(request: Request) -> Response:
            require_token(request, await bearer_scheme(request))
            return await handler(request)

        return check_token_first

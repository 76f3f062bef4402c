"""Who may do what: write keys for `POST /v1/events`, admin keys for SQL, forget and the dashboard.

A key is presented as `Authorization: Bearer <key>` or `X-API-Key: <key>` (the dashboard's page may also take it
as `?key=`, for a browser); keys are compared in constant time (`ingest.auth.key_matches`). With no key of either
kind configured the server is open (it refuses to start so off loopback, `api.server`).
"""

from __future__ import annotations

from starlette.requests import Request

from gamestream.ingest.auth import key_matches
from gamestream.settings import Settings

BEARER = {"WWW-Authenticate": "Bearer"}


def presented_key(request: Request) -> str | None:
    """The key the request carries in `X-API-Key`, else as `Authorization: Bearer <key>`, else None."""
    given = request.headers.get("x-api-key")
    if given is None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else None
    return given


def presented_key_in(request: Request, keys: list[bytes]) -> bool:
    """Whether the request carries one of `keys` in a header (compared in constant time)."""
    return key_matches(presented_key(request), keys)


def admin_keys(settings: Settings) -> list[bytes]:
    return [key.encode() for key in settings.admin_keys]


def is_admin(request: Request) -> bool:
    """An admin request for the API (SQL, forget): keys are configured and a header carries an admin key, or
    none is configured."""
    settings: Settings = request.app.state.settings
    return not settings.keys_configured or presented_key_in(request, request.app.state.admin_keys)


def is_admin_in_browser(request: Request) -> bool:
    """`is_admin`, or the admin key as `?key=` (the dashboard's page is opened from a browser's address bar)."""
    return is_admin(request) or key_matches(request.query_params.get("key"), request.app.state.admin_keys)


def admin_key_needed(operation: str) -> str:
    return f"{operation} needs an admin key ('Authorization: Bearer <key>' or 'X-API-Key')"

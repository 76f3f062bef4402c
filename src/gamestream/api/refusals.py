"""A request refused with a readable reason: `Refuse`, raised anywhere under an endpoint and answered as
`{"error": "<reason>"}` with its status and headers (`answers_refusals`)."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

CLOSE = {"Connection": "close"}
"""On a 413 over the body size: the rest of the body is not wanted (http_guard drains it before closing)."""

Endpoint = Callable[[Request], Awaitable[Response]]


class Refuse(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        self.status, self.message, self.headers = status, message, headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.message}, status_code=self.status, headers=self.headers)


def answer_refusal(error: Refuse | ClientDisconnect) -> Response:
    """A refusal's answer; a client that is gone, or cut off by the body timer (http_guard answered 408), gets an
    empty 408 nobody reads."""
    if isinstance(error, Refuse):
        return error.response()
    return Response(status_code=408)


def answers_refusals(endpoint: Endpoint) -> Endpoint:
    """`endpoint` with its `Refuse` and `ClientDisconnect` answered (`answer_refusal`)."""

    @functools.wraps(endpoint)
    async def answered(request: Request) -> Response:
        try:
            return await endpoint(request)
        except (Refuse, ClientDisconnect) as error:
            return answer_refusal(error)

    return answered


async def read_capped_body(request: Request, limit: int) -> bytes:
    """The whole body of a small request (a query, a forget), refused with 413 once it passes `limit` bytes."""
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise Refuse(413, f"body is over the {limit:,}-byte limit", CLOSE)
    return bytes(raw)

"""`GET /openapi.json`: the HTTP document (`gamestream.api.openapi`)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gamestream.api.openapi import openapi


async def openapi_json(request: Request) -> Response:
    return JSONResponse(openapi(request.app.state.settings))

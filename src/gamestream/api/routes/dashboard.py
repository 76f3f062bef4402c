"""The dashboard: its page at `/` (static files under `/static`) and the JSON it polls, `GET /v1/dashboard`
(`?dimension=NAME` splits it by a dimension's values; an unknown name is a 400 naming the known ones).
Both need an admin key when keys are configured, in a header or as `?key=` (a browser's address bar)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response

from gamestream.api.access import is_admin_in_browser
from gamestream.api.collector import Collector
from gamestream.api.dashboard import DashboardData
from gamestream.api.dashboard.segments import UnknownDimension

STATIC = Path(__file__).resolve().parents[1] / "dashboard" / "static"
NO_STORE = {"Cache-Control": "no-store"}
ADMIN_KEY_PAGE = ("<!doctype html><title>gamestream</title><h1>401: admin key needed</h1>"
                  "<p>Open this page as <code>/?key=&lt;admin key&gt;</code>.</p>")


async def page(request: Request) -> Response:
    if not is_admin_in_browser(request):
        return HTMLResponse(ADMIN_KEY_PAGE, status_code=401)
    return FileResponse(STATIC / "index.html", headers=NO_STORE)


async def dashboard_json(request: Request) -> Response:
    if not is_admin_in_browser(request):
        return JSONResponse({"error": "the dashboard needs an admin key"}, status_code=401)
    collector: Collector = request.app.state.collector
    dashboard: DashboardData = request.app.state.dashboard
    try:
        data = await asyncio.to_thread(dashboard.snapshot, backlog=collector.backlog,
                                       events_per_second=collector.ingest_rate.per_second(),
                                       dimension=request.query_params.get("dimension"))
    except UnknownDimension as error:
        return JSONResponse({"error": str(error), "dimensions": error.known}, status_code=400, headers=NO_STORE)
    return JSONResponse(data, headers=NO_STORE)

"""The collector as an ASGI app: the routes (`gamestream.api.routes`, one module per endpoint or group), the
shared state they read from `request.app.state`, and the lifespan that starts and stops the collector."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import Receive, Scope, Send
from starlette.staticfiles import StaticFiles

from gamestream.api.access import admin_keys
from gamestream.api.collector import Collector
from gamestream.api.dashboard import DashboardData
from gamestream.api.purge_jobs import PurgeJobs, purge_with_kpi_fold
from gamestream.api.routes import dashboard, events, forget, funnel, health, openapi, sql
from gamestream.api.compat import routes as compat
from gamestream.log import EventLog
from gamestream.settings import Settings

ROUTES: list[BaseRoute] = [
    Route("/v1/events", events.post_events, methods=["POST"]),
    Route("/healthz", health.healthz, methods=["GET"]),
    Route("/metrics", health.metrics, methods=["GET"]),
    Route("/openapi.json", openapi.openapi_json, methods=["GET"]),
    Route("/v1/sql", sql.post_sql, methods=["POST"]),
    Route("/v1/funnel", funnel.post_funnel, methods=["POST"]),
    Route("/v1/forget", forget.post_forget, methods=["POST"]),
    Route("/v1/forget/{entry}", forget.get_forget, methods=["GET"]),
    Route("/", dashboard.page, methods=["GET"]),
    Route("/v1/dashboard", dashboard.dashboard_json, methods=["GET"]),
    Mount("/static", app=StaticFiles(directory=dashboard.STATIC), name="static"),
    *compat.ROUTES,  # the vendor SDKs' protocols (docs/compat.md)
]


class CollectorApp(Starlette):
    """Starlette, with `POST /v1/events` — the one route every game calls, thousands of times a second — served
    straight from the ASGI call: the same handler (`routes.events.post_events`, which answers every refusal
    itself), without the middleware stack and the router around it, which cost about as much CPU as the HTTP
    server itself (`benchmarks/collector.py`: 150 against 85 µs a request for a no-op). Every other path and
    method (a GET or OPTIONS on /v1/events: 405; /v1/events/: the redirect) goes through Starlette as before."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == "/v1/events":
            scope["app"] = self
            response = await events.post_events(Request(scope, receive, send))
            await response(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def create_app(settings: Settings, log: EventLog | None = None) -> Starlette:
    """The collector as an ASGI app. Opens the log the settings name (`log.connect`: `--log URL`, else the
    embedded one) when `log` is not given, and closes it on exit."""
    from gamestream.log import connect

    own_log = log is None
    collector = Collector(settings, log if log is not None else connect(settings))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await collector.start()
        try:
            yield
        finally:
            await collector.stop()
            if own_log:
                await asyncio.to_thread(collector.log.close)

    app = CollectorApp(routes=list(ROUTES), lifespan=lifespan)
    app.state.settings = settings
    app.state.collector = collector
    app.state.admin_keys = admin_keys(settings)
    app.state.dashboard = DashboardData(settings)
    app.state.purge_jobs = PurgeJobs(settings, purge_with_kpi_fold)
    return app

"""`GET /healthz` (log writable, disk space, which process) and `GET /metrics` (Prometheus)."""

from __future__ import annotations

import asyncio
import os
import shutil
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gamestream.api.collector import Collector
from gamestream.settings import Settings


async def healthz(request: Request) -> Response:
    """200 when healthy, 503 when not; `pid` tells the processes of `serve --workers N` apart, `log_url` says
    which log this one writes to."""
    settings: Settings = request.app.state.settings
    collector: Collector = request.app.state.collector
    checks: dict[str, Any] = {"pid": os.getpid(), "log_url": collector.log_description}
    disk_ok = _check_disk(settings, checks)
    log_ok = await _check_log(collector, checks)
    healthy = disk_ok and log_ok
    checks["backlog_events"] = collector.backlog
    checks["status"] = "ok" if healthy else "unhealthy"
    collector.metrics.requests.labels("/healthz", "200" if healthy else "503").inc()
    return JSONResponse(checks, status_code=200 if healthy else 503)


def _check_disk(settings: Settings, checks: dict[str, Any]) -> bool:
    free = shutil.disk_usage(settings.data_dir).free
    checks["disk_free_bytes"] = free
    if free < settings.min_free_disk_bytes:
        checks["disk"] = f"under {settings.min_free_disk_bytes:,} bytes free"
        return False
    return True


async def _check_log(collector: Collector, checks: dict[str, Any]) -> bool:
    """Whether the log takes writes: the backend's own check when it has one (the embedded log takes its write
    lock), else a read of partition 0's head, which needs the log's servers to answer."""
    try:
        await asyncio.to_thread(collector.log.check_writable)
    except Exception as error:
        checks["log"] = f"not writable: {type(error).__name__}: {error}"
        collector.metrics.log_reachable.set(0)
        return False
    checks["log"] = "writable"
    collector.metrics.log_reachable.set(1)
    return True


async def metrics(request: Request) -> Response:
    """The collector's figures, then the processor's when it runs in this process."""
    from gamestream.metrics import REGISTRY as stages

    collector: Collector = request.app.state.collector
    return Response(generate_latest(collector.metrics.registry) + generate_latest(stages),
                    media_type=CONTENT_TYPE_LATEST)

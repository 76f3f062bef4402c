"""`gamestream demo`: collector + processor + generator in one process, on the embedded defaults.

Shutdown order (Ctrl-C, SIGTERM or --duration): stop the generator, stop the collector (in-flight requests are
answered), then let the processor drain the log, so every acknowledged event is committed to the table before
the command returns.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from typing import Callable

from gamestream import server
from gamestream.collector import create_app
from gamestream.generator import SendStats, live_events, send
from gamestream.log import open_log
from gamestream.pipeline import Pipeline
from gamestream.processor import ProcessorStats
from gamestream.settings import Settings


@dataclass
class DemoSummary:
    url: str
    sent: SendStats
    processed: ProcessorStats
    seconds: float


async def run_demo(settings: Settings, *, port: int, rate: float | None, users: int, duration: float | None,
                   seed: int, on_started: Callable[[str], None], on_tick: Callable[[SendStats, ProcessorStats, int],
                                                                                    None]) -> DemoSummary:
    started = time.monotonic()
    stop = _ThreadsafeEvent(asyncio.get_running_loop())
    server.install_stop_signals(stop)
    log = open_log(settings.data_dir, partitions=settings.partitions)
    processor = Pipeline(settings, log, maintenance=True)
    failures: list[BaseException] = []

    def process() -> None:
        try:
            processor.run()
        except BaseException as error:  # surfaced to the command once the collector has stopped
            failures.append(error)
            stop.set_threadsafe()

    processing = threading.Thread(target=process, name="processor", daemon=True)
    processing.start()
    app = create_app(settings, log)
    sock = server.bind(settings.host, port)
    url = f"http://{settings.host}:{sock.getsockname()[1]}"
    collector_stop = asyncio.Event()
    serving = asyncio.create_task(server.serve(app, sock, collector_stop, settings))
    await _wait_until_up(url)
    on_started(url)

    stats = SendStats()
    api_key = settings.api_keys[0] if settings.api_keys else None
    generating = asyncio.create_task(send(url, live_events(users=users, seed=seed), batch=20, concurrency=4,
                                          rate=rate, duration=duration, api_key=api_key, stop=stop, stats=stats))
    try:
        while not generating.done():
            await asyncio.wait([generating], timeout=2.0)
            backlog = app.state.collector.backlog
            on_tick(stats, processor.stats, backlog)
    finally:
        stop.set()
        await asyncio.gather(generating, return_exceptions=True)
        collector_stop.set()
        await serving
        processor.stop(drain=True)
        await asyncio.to_thread(processing.join)
        log.close()
    if failures:
        raise RuntimeError("the processor failed") from failures[0]
    return DemoSummary(url=url, sent=stats, processed=processor.stats, seconds=time.monotonic() - started)


class _ThreadsafeEvent(asyncio.Event):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._owner = loop

    def set_threadsafe(self) -> None:
        self._owner.call_soon_threadsafe(self.set)


async def _wait_until_up(url: str) -> None:
    import httpx

    async with httpx.AsyncClient() as client:
        for _ in range(200):
            try:
                if (await client.get(url + "/healthz")).status_code in (200, 503):
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError(f"the collector did not come up at {url}")

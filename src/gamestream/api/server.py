"""Running the collector app on uvicorn (uvloop + httptools), for `serve` and `demo`; `serve --workers N` runs N
such processes on one listening socket (`serve_workers`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import threading
from typing import Iterator

import uvicorn
from starlette.applications import Starlette

from gamestream.ingest.http_guard import protocol_for
from gamestream.settings import Settings
from gamestream.shutdown import stop_on_signals

logger = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_S = 10
"""In-flight requests get this long to finish after a stop (uvicorn's graceful shutdown)."""


class _Server(uvicorn.Server):
    # The commands own SIGINT/SIGTERM (they stop the generator and drain the processor first); uvicorn must not
    # install its own handlers or re-raise the signal after shutting down.
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind(host: str, port: int) -> socket.socket:
    """Binds the listening socket up front, so that a port already in use is a clear error at start-up and
    port 0 gives a free port that can be printed."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def listen_backlog(settings: Settings) -> int:
    """Connections the kernel queues before we accept them: as many as we serve at once, within the bounds
    Linux applies anyway (somaxconn is 4096 on current kernels). A burst past it is refused by the kernel,
    which a client sees at once, instead of waiting in a queue we would not serve in time."""
    return max(128, min(settings.max_connections, 4096))


async def serve(app: Starlette, sock: socket.socket, stop: asyncio.Event, settings: Settings) -> None:
    """Serves `app` on `sock` until `stop` is set; in-flight requests finish before it returns.

    Connections go through `http_guard` (head and body timers, head limits, draining before a close, the
    connection limit); `settings` carries those limits. With the native front (`api.front.front_of`) the
    socket is served by it, with `app` behind it."""
    sock.listen(listen_backlog(settings))  # listening already (see `bind`); this sets the backlog
    config: dict = dict(log_level="warning", access_log=False, lifespan="on", ws="none",
                        # the peer as it is: X-Forwarded-For is believed only from the configured proxies, by
                        # `ingest.geo` (uvicorn's own default believes it from loopback, FORWARDED_ALLOW_IPS)
                        proxy_headers=False,
                        # idle keep-alive connections: closed by the head timer, and by uvicorn's at the same time
                        timeout_keep_alive=settings.header_timeout_s,
                        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    from gamestream.api.front import front_of, serve_fronted

    if front_of(settings) == "native":
        await serve_fronted(app, sock, stop, settings, config, _Server)
        return
    server = _Server(uvicorn.Config(app, http=protocol_for(settings), **config))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait([task, stopper], return_when=asyncio.FIRST_COMPLETED)
    server.should_exit = True
    await task
    stopper.cancel()


def install_stop_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)


def run(coroutine) -> object:
    """asyncio.run on uvloop (the fastest loop here)."""
    import uvloop

    return uvloop.run(coroutine)


# ------------------------------------------------------------------------------------------ several processes
def serve_workers(settings: Settings, sock: socket.socket, *, log_format: str = "text") -> int:
    """Serves the collector from `settings.workers` processes sharing the listening `sock` until SIGINT or
    SIGTERM; returns 0 after a clean stop, 1 when a worker died on its own (the others are stopped then).

    Why this shape:
    - one socket, bound here and inherited by every worker (as gunicorn and uvicorn's own workers do): the kernel
      hands each connection to whichever worker accepts first, a port in use is one error at start, and a worker
      that dies takes no queued connection with it;
    - spawned, not forked: deltalake's runtime panics in a forked child, and a fresh interpreter holds no lock
      or thread of ours;
    - each worker is a whole collector (`create_app` + `serve`): the same limits (`http_guard`), its own log
      connection, and the same stop on SIGINT/SIGTERM (in-flight requests are answered). The log serialises
      appends from every process (SQLite's write lock, or JetStream), so the workers share nothing else;
    - a worker whose parent is gone stops by itself: no orphan keeps the port."""
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_worker, args=(settings, sock, index, log_format, os.getpid()),
                               name=f"gamestream-collector-{index + 1}") for index in range(settings.workers)]
    stop = threading.Event()
    restore_signals = stop_on_signals(stop)
    died: list[int] = []
    try:
        for worker in workers:
            worker.start()
        while not stop.wait(0.2):
            died = [w.exitcode for w in workers if w.exitcode is not None]  # type: ignore[misc]
            if died:
                logger.error("a collector worker exited on its own; stopping the others",
                             extra={"exit_codes": died})
                break
    finally:
        for worker in workers:
            if worker.is_alive() and worker.pid is not None:
                os.kill(worker.pid, signal.SIGTERM)
        for worker in workers:
            worker.join(GRACEFUL_SHUTDOWN_S + 5)
            if worker.is_alive():
                logger.error("a collector worker did not stop in time; killing it", extra={"pid": worker.pid})
                worker.kill()
                worker.join()
        restore_signals()
        sock.close()
    return 1 if died else 0


def _worker(settings: Settings, sock: socket.socket, index: int, log_format: str, parent: int) -> None:
    """One collector process of `serve_workers`."""
    from gamestream import logs
    from gamestream.api.app import create_app

    logs.setup(log_format)

    async def main() -> None:
        stop = asyncio.Event()
        install_stop_signals(stop)
        orphan_watch = asyncio.create_task(_stop_when_orphaned(parent, stop))
        try:
            await serve(create_app(settings), sock, stop, settings)
        finally:
            orphan_watch.cancel()

    code = 0
    try:
        run(main())
    except BaseException:
        logger.exception("collector worker failed", extra={"worker": index + 1, "pid": os.getpid()})
        code = 1
    # deltalake can abort the interpreter at exit after a table was read (the dashboard reads them): end here
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


async def _stop_when_orphaned(parent: int, stop: asyncio.Event) -> None:
    while os.getppid() == parent:
        await asyncio.sleep(1.0)
    logger.warning("the serving command is gone; this collector worker stops", extra={"pid": os.getpid()})
    stop.set()

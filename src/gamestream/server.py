"""Running the collector app on uvicorn (uvloop + httptools), for `serve` and `demo`."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from typing import Iterator

import uvicorn
from starlette.applications import Starlette

from gamestream.http_guard import protocol_for
from gamestream.settings import Settings


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
    connection limit); `settings` carries those limits."""
    sock.listen(listen_backlog(settings))  # listening already (see `bind`); this sets the backlog
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            http=protocol_for(settings), ws="none",
                            # idle keep-alive connections: closed by the head timer, and by uvicorn's at the same time
                            timeout_keep_alive=settings.header_timeout_s,  # type: ignore[arg-type]
                            timeout_graceful_shutdown=10)
    server = _Server(config)
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

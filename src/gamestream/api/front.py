"""The collector's native front (`serve`'s default when the native module has it; `--front python`, or
GAMESTREAM_FRONT=python, serves with uvicorn alone): the listening socket served by `gamestream_native.Front`
(native/src/front.rs), the whole app behind it as before.

The front answers `POST /v1/events` itself when the answer is a plain 200: an ordinary request (no Sent-At or
Expect; a content type, encoding and write key the route takes; the backlog under its bound) whose events are
all provably valid (the validator's kernel, the one the route uses). HTTP, the body timer, gunzip and
validation run in Rust with no GIL; the accepted requests of a moment are made durable together, with one call
into Python (`_Appender`), and each is answered only once that is durable. A request with an Idempotency-Key
keeps its own records, stored with its key and answer in the same transaction, as the route stores them; a key
used before gets the first answer (`Idempotent-Replayed: true`) and stores nothing.

Every other request — a refusal of any kind, a rejected event, another route, a head it cannot read, the
connection limit — is not decided there: the connection, with the bytes read so far, is handed whole to this
app on a Unix socket in a private directory (uvicorn with `http_guard`, as `serve` runs it), after one line that
names the client's address (`GSPEER <ip> <port>`, read by `FrontedProtocol`). So refusals, their words and their
metrics come from the route as before, and geo and the audit see the real client. The connection limit counts
the front's connections (`FrontedProtocol.connections_open`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import stat
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar

import uvicorn
from starlette.applications import Starlette

from gamestream.api.collector import Collector
from gamestream.ingest import batch
from gamestream.ingest.http_guard import GuardedHttpToolsProtocol
from gamestream.ingest.native_validate import native_validator
from gamestream.log import Append, AppendResult, Idempotency, envelope
from gamestream.settings import Settings

logger = logging.getLogger(__name__)

_PEER = b"GSPEER "
_PEER_LINE_MAX = 128


class FrontUnavailable(RuntimeError):
    """`--front native` without a native kernel that has the front (native/ not built)."""


class FrontedProtocol(GuardedHttpToolsProtocol):
    """`http_guard`'s protocol for a connection the front hands on: the first line names the client (`GSPEER
    <ip> <port>`), and the connection limit counts the front's connections."""

    front: ClassVar[Any]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._peer_line: bytearray | None = bytearray()

    def data_received(self, data: bytes) -> None:
        if self._peer_line is not None:
            self._peer_line += data
            end = self._peer_line.find(b"\r\n")
            if end < 0:
                if len(self._peer_line) > _PEER_LINE_MAX:
                    self.transport.close()
                return
            line, data = bytes(self._peer_line[:end]), bytes(self._peer_line[end + 2:])
            self._peer_line = None
            address, _, port = line.removeprefix(_PEER).decode("ascii", "replace").rpartition(" ")
            if not line.startswith(_PEER) or not port.isdigit():
                self.transport.close()
                return
            self.client = (address, int(port))
            if not data:
                return
        super().data_received(data)

    def connections_open(self) -> int:
        return self.front.open_connections()


class _Appender:
    """The front's one call per group (on its committer thread): the group's records durable in the log, and the
    route's metrics for its requests (requests by status, accepted events, latency, log submits)."""

    def __init__(self, collector: Collector) -> None:
        self.collector = collector
        self.failing = False  # an episode of failed appends: warned about once, its end logged once

    def __call__(self, items: list[tuple[str | None, bytes | None, list[tuple[int, bytes, int]], int]],
                 ages: list[float]) -> list[bytes | str | None]:
        """`items`: `(key, answer, records, events)` — one for the requests without an Idempotency-Key (key and
        answer None), one per request with one; `ages`: how long each request of the group has waited. Gives
        back, item by item, None (stored), the answer stored under its key before (nothing stored), or the type
        name of the error that refused it (nothing of it stored: the front answers 503); raises when the log
        refused the whole group."""
        collector = self.collector
        started = time.perf_counter()
        group = [([Append(p, record, n) for p, record, n in records],
                  None if key is None else Idempotency(key, answer))  # type: ignore[arg-type]
                 for key, answer, records, _ in items]
        unkeyed = len(ages) - sum(item[0] is not None for item in items)  # requests in the item without a key
        try:
            outcomes = collector.log.append_group_now(group)
        except Exception as error:  # nothing was stored: the front answers each request 503 with Retry-After
            self._failed(error, len(ages))
            raise
        requests = [unkeyed if key is None else 1 for key, *_ in items]
        refused = [(outcome, n) for outcome, n in zip(outcomes, requests) if isinstance(outcome, Exception)]
        if refused:
            self._failed(refused[0][0], sum(n for _, n in refused))
        elif self.failing:
            logger.info("log appends succeed again", extra={"requests": len(ages)})
            self.failing = False
        elapsed = time.perf_counter() - started
        for age in ages:
            collector.metrics.latency.observe(age + elapsed)
        collector.count_request(200, len(ages) - sum(n for _, n in refused))
        collector.count_accepted(sum(item[3] for item, outcome in zip(items, outcomes)
                                     if isinstance(outcome, AppendResult) and outcome.replayed is None))
        if unkeyed:  # `gamestream_log_submits` counts the submits of requests without a key, as the route does
            collector.coalescer.groups += 1
            collector.coalescer.requests += unkeyed
        return [type(outcome).__name__ if isinstance(outcome, Exception) else outcome.replayed
                for outcome in outcomes]

    def _failed(self, error: Exception, requests: int) -> None:
        """`requests` answered 503: counted, and warned about once per episode of failures."""
        self.collector.count_request(503, requests)
        if not self.failing:
            logger.warning("log append failed; answering 503 until it works again",
                           extra={"requests": requests, "error": type(error).__name__, "reason": str(error)})
        self.failing = True


def front_of(settings: Settings) -> str:
    """What serves the collector's socket for `settings`: "native" or "python" (`Settings.front`; auto: native
    when the native module has the front and a validator for the schema). `FrontUnavailable` when native is
    asked for and cannot be had."""
    if settings.front == "python":
        return "python"
    missing = _missing(settings)
    if missing is None:
        return "native"
    if settings.front == "native":
        raise FrontUnavailable(missing)
    return "python"


def _missing(settings: Settings) -> str | None:
    """Why the native front cannot serve `settings`, or None."""
    try:
        import gamestream_native
    except ImportError:
        gamestream_native = None
    if not hasattr(gamestream_native, "Front"):
        return ("--front native needs the native module with its front (native/, built by ./dev); rebuild it, or "
                "serve with --front python")
    if native_validator(settings.schema_params, settings.max_event_bytes) is None:
        return "--front native needs the native validator for this schema; serve with --front python"
    return None


def native_front(settings: Settings, collector: Collector, sock: socket.socket, upstream: Path) -> Any:
    """A `gamestream_native.Front` on `sock` (not started) for `collector`, handing what it does not take to
    `upstream` (`front_of` has said it can be had)."""
    from gamestream_native import Front

    kernel = native_validator(settings.schema_params, settings.max_event_bytes)
    log, geo = collector.log, collector.geo
    return Front(
        sock.fileno(), str(upstream), kernel._kernel, _Appender(collector),
        collector.country_for if geo is not None else None,
        keys=collector.keys, max_body_bytes=settings.max_body_bytes,
        max_events=min(settings.max_events_per_request, batch.MIN_BATCH_EVENTS - 1),
        max_header_bytes=settings.max_header_bytes, header_timeout_s=settings.header_timeout_s,
        body_timeout_s=settings.body_timeout_s, max_connections=settings.max_connections,
        drain_max_bytes=settings.drain_max_bytes, retry_after_s=settings.retry_after_s,
        partitions=None if log.own_routing else log.partitions, record_limit=log.max_record_bytes,
        max_idempotency_key=envelope.MAX_IDEMPOTENCY_KEY,
        forwarded_header=geo.header if geo is not None and geo.trusted else None)


_PRIVATE_PREFIX = "gamestream-front-"
_SOCKET_PATH_MAX = 107  # bytes in a Unix socket's path (sun_path, less its final NUL)


def _private_base() -> Path:
    """Where the private directories go: the temporary directory (TMPDIR), unless the app's socket path in it
    would be too long for a Unix socket (a deep TMPDIR); then /tmp."""
    base = Path(tempfile.gettempdir())
    longest = len(os.fsencode(base / f"{_PRIVATE_PREFIX}{2**22}-xxxxxxxx" / "app.sock"))
    return base if longest <= _SOCKET_PATH_MAX else Path("/tmp")


def _remove_stale_private_directories(base: Path) -> None:
    """Removes the private directories (`gamestream-front-<pid>-*`) under `base` of fronts that are gone: a
    `serve` killed outright (SIGKILL, a crash) could not remove its own. Only directories of this user, named for
    a pid that no process has now, whose socket nobody listens on (a front in another pid namespace sharing this
    /tmp keeps its own), are touched."""
    for path in base.glob(f"{_PRIVATE_PREFIX}*-*"):
        pid = path.name.removeprefix(_PRIVATE_PREFIX).split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            status = path.lstat()
        except OSError:  # gone already
            continue
        if not stat.S_ISDIR(status.st_mode) or status.st_uid != os.getuid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # its process lives
        except ProcessLookupError:
            pass
        except OSError:  # another user's process has that pid: not ours to judge
            continue
        if not _listened_on(path / "app.sock"):
            shutil.rmtree(path, ignore_errors=True)


def _listened_on(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
        return True
    except OSError:  # refused (nobody listens), or no socket there
        return False
    finally:
        probe.close()


async def serve_fronted(app: Starlette, sock: socket.socket, stop: asyncio.Event, settings: Settings,
                        config: dict[str, Any], server_class: type[uvicorn.Server]) -> None:
    """`api.server.serve` with the native front on `sock` and `app` behind it on a private Unix socket (its
    directory removed on the way out)."""
    collector: Collector = app.state.collector
    base = _private_base()
    _remove_stale_private_directories(base)
    # 0700: only this user reaches the app
    private = Path(tempfile.mkdtemp(prefix=f"{_PRIVATE_PREFIX}{os.getpid()}-", dir=base))
    upstream = private / "app.sock"
    inner = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        inner.bind(str(upstream))
        inner.listen(4096)
        inner.setblocking(False)
        front = native_front(settings, collector, sock, upstream)
        collector.metrics.front_requests.labels("taken").set_function(lambda: front.counts()[0])
        collector.metrics.front_requests.labels("spliced").set_function(lambda: front.counts()[1])
        protocol = type("FrontedProtocol", (FrontedProtocol,), {"settings": settings, "front": front})
        server = server_class(uvicorn.Config(app, **{**config, "http": protocol}))
        collector.front = front
        task = asyncio.create_task(server.serve(sockets=[inner]))
        while not server.started and not task.done():  # the app's lifespan first: the log, the backlog
            await asyncio.sleep(0.01)
        if task.done():
            await task
            return
        front.start()
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait([task, stopper], return_when=asyncio.FIRST_COMPLETED)
        # requests taken by the front are answered first (their log appends need the app's log open), within
        # the graceful shutdown the app's own requests get
        await asyncio.to_thread(front.stop, config["timeout_graceful_shutdown"])
        server.should_exit = True
        await task
        stopper.cancel()
    finally:
        inner.close()
        shutil.rmtree(private, ignore_errors=True)

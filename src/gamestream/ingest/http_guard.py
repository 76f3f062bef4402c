"""Connection-level limits that uvicorn and its HTTP parser do not enforce by themselves.

llhttp (httptools) puts no bound on a request head; uvicorn runs no timer on a head in progress or on a body, and
it closes the connection the moment an answer carrying `Connection: close` is written, so a client still writing
its body (Python's http.client, most mobile SDKs: they write the whole body before reading) sees a reset instead
of the answer, and a retrying client retries the same request for ever. `GuardedHttpToolsProtocol` is uvicorn's
httptools protocol with, per connection:

1. **Head limits.** A request line plus headers over `max_header_bytes`, or over `MAX_HEADER_LINES` header lines,
   gets 431 and the connection is closed. Counted from the parser's callbacks and, while a head is incomplete,
   from the raw bytes (llhttp buffers a single header in parts, so callbacks alone would let one huge header
   grow without bound).
2. **Head timer.** A connection that has not sent a complete head within `header_timeout_s` of opening, or of
   its previous answer, is closed: an idle connection, or one trickling its headers, holds nothing for long.
3. **Body timer.** A body not received in full within `body_timeout_s` of its head gets 408 (if nothing was
   answered yet) and the connection is closed.
4. **Drain before close.** When the app answers before the body has arrived (a 413 on a declared length) and asks
   for `Connection: close`, the rest of the body is read and discarded — up to `drain_max_bytes`, within the body
   timer — and only then is the connection closed, so the client reads the answer. No draining when the client
   sent `Expect: 100-continue` and no body yet (it is waiting for our answer), or when the declared length is
   over the drain bound (the client gets the answer if it reads while writing, a reset otherwise).
5. **Connection limit.** With more than `max_connections` connections open, a request gets 503 with Retry-After
   and `Connection: close`. (uvicorn's own `limit_concurrency` refuses one connection early — it counts the
   connection asking — and answers in plain text, outside the documented JSON error shape.)

Answers written here (408, 431) are followed by a lingering close as nginx does: our side is shut for writing,
and what the client still sends is read and discarded for up to `LINGER_S`, so the answer is not lost to a
reset.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, ClassVar

import httptools
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from gamestream.settings import Settings

MAX_HEADER_LINES = 100
"""Header lines in one request head; more gets 431 (nginx and Apache refuse at about this count)."""
LINGER_S = 2.0
"""After an answer written here, how long what the client still sends is read and discarded before closing."""


class _HeadRefused(Exception):
    """Raised from a parser callback to stop parsing a head that is over a limit."""


def protocol_for(settings: Settings) -> type["GuardedHttpToolsProtocol"]:
    """The protocol class to pass as `uvicorn.Config(http=...)`, bound to the settings' limits."""
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), {"settings": settings})


def _error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


class _DrainingTransport:
    """The transport as one request's cycle sees it: `close()` while that request's body is still arriving lets
    the protocol drain the body first (point 4 of the module docstring)."""

    def __init__(self, protocol: "GuardedHttpToolsProtocol", cycle: RequestResponseCycle) -> None:
        self._protocol, self._cycle, self._transport = protocol, cycle, protocol.transport

    def close(self) -> None:
        self._protocol._close_after_answer(self._cycle)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    settings: ClassVar[Settings]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0  # of the head being parsed, as the parser's callbacks report it
        self._head_lines = 0
        self._raw_head_bytes = 0  # bytes received while a head is incomplete
        self._heads = 0  # heads completed on this connection
        self._in_body = False  # a head is complete and its body is not
        self._body_bytes = 0
        self._declared_length: int | None = None
        self._close_after_body = False
        self._refusal: tuple[int, str] | None = None
        self._discarding = False  # answered here: what still arrives is thrown away until the close
        self._discarded = 0

    # ------------------------------------------------------------------------------------------- connection
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._head_timer, self._body_timer, self._linger_timer):
            if timer is not None:
                timer.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            self._discarded += len(data)
            if self._discarded > self.settings.drain_max_bytes:
                self.transport.close()
            return
        self._unset_keepalive_if_required()
        in_head, heads = not self._in_body, self._heads
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            return  # no protocol to upgrade to: the request is answered as plain HTTP, as uvicorn does
        except httptools.HttpParserError:
            if self._refusal is not None:
                self._answer_and_linger(*self._refusal)
            else:
                self.send_400_response("Invalid HTTP request received.")
            return
        if in_head and self._heads == heads and not self.transport.is_closing():
            # No head completed in this chunk, so all of it belongs to the head in progress.
            self._raw_head_bytes += len(data)
            if self._raw_head_bytes > self.settings.max_header_bytes:
                self._answer_and_linger(431, self._head_too_large())

    def eof_received(self) -> bool | None:
        return None  # the transport closes itself; a half-closed client gets no more answers anyway

    def connections_open(self) -> int:
        """Connections open on the server now, this one included (the connection limit counts these)."""
        return len(self.connections)

    # ------------------------------------------------------------------------------------------------ head
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = self._head_lines = 0

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self._count_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        self._head_lines += 1
        self._count_head(len(name) + len(value) + 4)  # ": " and CRLF

    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self.settings.max_header_bytes:
            self._refusal = (431, self._head_too_large())
        elif self._head_lines > MAX_HEADER_LINES:
            self._refusal = (431, f"more than {MAX_HEADER_LINES} header lines")
        else:
            return
        raise _HeadRefused

    def _head_too_large(self) -> str:
        return f"request line and headers are over the {self.settings.max_header_bytes:,}-byte limit"

    def on_headers_complete(self) -> None:
        self._heads += 1
        self._raw_head_bytes = 0
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._in_body, self._body_bytes, self._close_after_body = True, 0, False
        self._declared_length = next((int(value) for name, value in self.headers if name == b"content-length"),
                                     None)
        # the count holds this connection too: the (max_connections + 1)th one is refused.
        over_limit = self.connections_open() > self.settings.max_connections
        app = self.app
        if over_limit:
            self.app = self._over_connection_limit
        try:
            super().on_headers_complete()
        finally:
            self.app = app
        self.cycle.transport = _DrainingTransport(self, self.cycle)  # type: ignore[assignment]
        self._body_timer = self.loop.call_later(self.settings.body_timeout_s, self._body_timed_out)

    # ------------------------------------------------------------------------------------------------ body
    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self.cycle.response_complete and self._body_bytes > self.settings.drain_max_bytes:
            self.transport.close()  # answered already, and this body is too long to read to its end
        super().on_body(body)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_body = False
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        if self._close_after_body:
            self.transport.close()  # the drained body was the last thing the client had to send
        elif self.cycle.response_complete:
            self._arm_head_timer()  # answered while the body was arriving: now idle until the next head

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self._in_body and self.cycle.response_complete:
            self._arm_head_timer()

    def _close_after_answer(self, cycle: RequestResponseCycle) -> None:
        """An answer asked for the connection to be closed: now, or once the body has been drained."""
        if self.transport.is_closing():
            return
        declared = self._declared_length
        drain = (cycle is self.cycle and self._in_body
                 and not (self.expect_100_continue and self._body_bytes == 0)
                 and (declared is None or declared <= self.settings.drain_max_bytes))
        if drain:
            self._close_after_body = True  # the body timer and the drain bound still apply
        else:
            self.transport.close()

    # ---------------------------------------------------------------------------------------------- timers
    def _arm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.settings.header_timeout_s, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.close()  # no request is in progress, so there is nobody to answer

    def _body_timed_out(self) -> None:
        self._body_timer = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_started:
            # The app's pending receive() now reads a disconnect, and whatever it answers goes nowhere.
            cycle.disconnected = True
            cycle.message_event.set()
            self._answer_and_linger(408, f"request body not received within {self.settings.body_timeout_s:g} s")
        else:
            self.transport.close()

    # --------------------------------------------------------------------------------------------- answers
    def _answer_and_linger(self, status: int, message: str, headers: tuple[bytes, ...] = ()) -> None:
        body = _error_body(message)
        head = [STATUS_LINE[status]]
        head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
        head += [b"content-type: application/json\r\n", b"content-length: %d\r\n" % len(body),
                 b"connection: close\r\n", *headers, b"\r\n"]
        self.transport.write(b"".join(head) + body)
        self._discarding = True
        self.flow.resume_reading()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._linger_timer = self.loop.call_later(LINGER_S, self.transport.close)

    async def _over_connection_limit(self, scope: Any, receive: Any, send: Any) -> None:
        body = _error_body(f"more than {self.settings.max_connections:,} connections are open; retry later")
        await send({"type": "http.response.start", "status": 503, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(self.settings.retry_after_s).encode()), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

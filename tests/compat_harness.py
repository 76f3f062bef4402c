"""What the vendor-protocol tests share (tests/test_compat_*.py): a real `gamestream serve`, a front that answers
503 or 429 for a while before passing requests through (so a vendor SDK's own retry logic runs), and the
tables read back after `gamestream process --until-idle`."""

from __future__ import annotations

import contextlib
import http.client
import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from collector_server import ServeProcess
from conftest import gamestream, table_rows


@contextlib.contextmanager
def collector(data_dir: Path, *args: str, env: dict | None = None) -> Iterator[ServeProcess]:
    """`gamestream serve` on a loopback port of its own; stopped (SIGTERM) at the end."""
    server = ServeProcess(data_dir, *args, env=env)
    try:
        yield server
    finally:
        server.stop()


class RefusingFront:
    """An HTTP front on a loopback port of its own: the first `refusals` requests are answered `status` (503 or
    429, with Retry-After: 0 and a JSON body) without reaching the collector; every later one is passed to the
    collector at `target` and its answer passed back unchanged. `refused` and `passed` count them, `paths` records
    the path of every request, so a test can assert the SDK really met the refusals and really retried."""

    def __init__(self, target: str, *, refusals: int, status: int = 503) -> None:
        self.target = urlsplit(target)
        self.refusals = refusals
        self.status = status
        self.refused = 0
        self.passed = 0
        self.paths: list[str] = []
        self._lock = threading.Lock()
        front = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with front._lock:
                    front.paths.append(self.path)
                    refuse = front.refused < front.refusals
                    if refuse:
                        front.refused += 1
                    else:
                        front.passed += 1
                if refuse:
                    answer = b'{"error": "refused by the test front", "code": %d}' % front.status
                    self.send_response(front.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Retry-After", "0")
                    self.send_header("Content-Length", str(len(answer)))
                    self.end_headers()
                    self.wfile.write(answer)
                    return
                connection = http.client.HTTPConnection(front.target.hostname, front.target.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                connection.request(self.command, self.path, body=body if self.command != "GET" else None,
                                   headers=headers)
                response = connection.getresponse()
                data = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("content-length", "connection", "transfer-encoding", "date", "server"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                connection.close()

            do_GET = do_POST = do_OPTIONS = _any

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> RefusingFront:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def process(data_dir: Path) -> None:
    """Everything in the log into the tables (events and KPIs)."""
    gamestream("process", "--until-idle", data_dir=data_dir)


def events(data_dir: Path) -> list[dict]:
    return table_rows(data_dir / "tables" / "events")


def kpi_daily(data_dir: Path) -> dict:
    """eventDate → the row of kpi_daily (dau, bookings, …)."""
    return {row.pop("eventDate"): row for row in table_rows(data_dir / "tables" / "kpi_daily")}


def wait_until(condition, timeout: float = 60, every: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(every)

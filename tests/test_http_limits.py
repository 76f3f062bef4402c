"""Connection-level limits (http_guard) on a real `gamestream serve` on a loopback port: every oversized, slow or
malformed request gets an answer the client can read, and holds nothing for long."""

from __future__ import annotations

import gzip
import http.client
import json
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from collector_server import ServeProcess

BODY_LIMIT = 16 * 1024
EVENT = b'{"eventName": "levelStart", "eventParams": {"device_id": "d1"}}'
# Small limits, so that slow clients are cut off within a test's patience.
LIMITS = {"GAMESTREAM_MAX_BODY_BYTES": str(BODY_LIMIT), "GAMESTREAM_BODY_TIMEOUT_S": "1",
          "GAMESTREAM_HEADER_TIMEOUT_S": "1"}


@pytest.fixture(scope="module")
def collector(tmp_path_factory: pytest.TempPathFactory):
    server = ServeProcess(tmp_path_factory.mktemp("limits") / "data", env=LIMITS)
    yield server
    server.stop()


def address(server: ServeProcess) -> tuple[str, int]:
    parts = urlsplit(server.url)
    return parts.hostname, parts.port  # type: ignore[return-value]


def connect(server: ServeProcess) -> socket.socket:
    sock = socket.create_connection(address(server), timeout=15)
    return sock


def read_answer(sock: socket.socket) -> http.client.HTTPResponse:
    response = http.client.HTTPResponse(sock)
    response.begin()
    response.body = response.read()  # type: ignore[attr-defined]
    return response


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server has closed its side: reads what is left until the end of the stream."""
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def others_are_served(server: ServeProcess) -> None:
    assert httpx.get(server.url + "/healthz", timeout=10).status_code == 200


# ----------------------------------------------------------------------------------------- oversized bodies
@pytest.mark.parametrize("shape", ["declared length", "chunked", "gzip inflating over the limit"])
def test_a_client_that_writes_its_whole_over_limit_body_before_reading_gets_413_every_time(collector, shape) -> None:
    host, port = address(collector)
    big = b"[" + b",".join([EVENT] * (8 * 1024 * 1024 // len(EVENT))) + b"]"  # 8 MiB: more than socket buffers
    for _ in range(20):
        connection = http.client.HTTPConnection(host, port, timeout=30)
        headers = {"Content-Type": "application/json"}
        if shape == "declared length":
            connection.request("POST", "/v1/events", body=big, headers=headers)
        elif shape == "chunked":
            pieces = (big[i:i + 65536] for i in range(0, len(big), 65536))
            connection.request("POST", "/v1/events", body=pieces, headers=headers, encode_chunked=True)
        else:
            bomb = gzip.compress(b" " * (BODY_LIMIT * 64))
            assert len(bomb) < BODY_LIMIT
            connection.request("POST", "/v1/events", body=bomb, headers={**headers, "Content-Encoding": "gzip"})
        response = connection.getresponse()
        assert response.status == 413
        assert response.getheader("Connection") == "close"
        assert "limit" in json.loads(response.read())["error"]
        connection.close()
    others_are_served(collector)


def test_expect_100_continue_with_an_over_limit_length_gets_413_without_sending_the_body(collector) -> None:
    with connect(collector) as sock:
        sock.sendall(b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 10485760\r\nExpect: 100-continue\r\n\r\n")
        response = read_answer(sock)
        assert response.status == 413  # not "100 Continue": the body is not wanted
        assert response.getheader("Connection") == "close"
        assert closed_by_server(sock)


def test_expect_100_continue_within_the_limit_is_invited_and_taken(collector) -> None:
    with connect(collector) as sock:
        sock.sendall(b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % len(EVENT))
        assert sock.recv(1024).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(EVENT)
        response = read_answer(sock)
        assert response.status == 200 and json.loads(response.body)["accepted"] == 1  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------------------------- slow clients
def trickle(sock: socket.socket, piece: bytes, stop: threading.Event, every_s: float = 0.2) -> threading.Thread:
    def run() -> None:
        while not stop.is_set():
            try:
                sock.sendall(piece)
            except OSError:
                return
            time.sleep(every_s)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_body_trickled_a_byte_at_a_time_gets_408_and_the_connection_is_closed(collector) -> None:
    stop = threading.Event()
    with connect(collector) as sock:
        sock.sendall(b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n")
        sender = trickle(sock, b" ", stop)
        others_are_served(collector)
        try:
            response = read_answer(sock)
            assert response.status == 408
            assert response.getheader("Connection") == "close"
            assert "not received within 1 s" in json.loads(response.body)["error"]  # type: ignore[attr-defined]
            assert closed_by_server(sock)
        finally:
            stop.set()
            sender.join()
    others_are_served(collector)


def test_a_connection_that_never_sends_anything_is_closed(collector) -> None:
    with connect(collector) as idle:
        others_are_served(collector)
        assert idle.recv(1024) == b""  # closed after header_timeout_s, with nothing to answer


def test_a_keep_alive_connection_left_idle_after_its_answer_is_closed(collector) -> None:
    with connect(collector) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_answer(sock).status == 200
        assert closed_by_server(sock)


def test_request_headers_trickled_are_cut_off(collector) -> None:
    stop = threading.Event()
    with connect(collector) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        sender = trickle(sock, b"X-Slow: 1\r\n", stop)
        try:
            others_are_served(collector)
            assert closed_by_server(sock)
        finally:
            stop.set()
            sender.join()


# ------------------------------------------------------------------------------------------------ header floods
@pytest.mark.parametrize("head", [
    pytest.param(b"X-Flood: " + b"a" * 40_000 + b"\r\n", id="one huge header"),
    pytest.param(b"".join(b"X-Flood-%d: %s\r\n" % (i, b"b" * 400) for i in range(90)), id="many long headers"),
    pytest.param(b"".join(b"X-Line-%d: 1\r\n" % i for i in range(150)), id="too many header lines"),
])
def test_a_header_flood_gets_431_and_the_connection_is_closed(collector, head: bytes) -> None:
    with connect(collector) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n")
        response = read_answer(sock)
        assert response.status == 431
        assert response.getheader("Connection") == "close"
        assert json.loads(response.body)["error"]  # type: ignore[attr-defined]
        assert closed_by_server(sock)
    others_are_served(collector)


def test_a_huge_header_sent_in_pieces_is_refused_before_it_completes(collector) -> None:
    with connect(collector) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Flood: ")
        sent = 0
        try:
            while sent < 1024 * 1024:  # never ends the header: only the raw count can stop it
                sock.sendall(b"a" * 4096)
                sent += 4096
                time.sleep(0.001)
        except OSError:
            pass
        response = read_answer(sock)
        assert response.status == 431
    others_are_served(collector)


def test_a_head_at_the_limits_is_served(collector) -> None:
    headers = {f"X-Fine-{i}": "c" * 200 for i in range(90)}
    assert httpx.get(collector.url + "/healthz", headers=headers, timeout=10).status_code == 200


# -------------------------------------------------------------------------------------------- connection limit
def test_connections_over_the_limit_get_503_and_the_server_takes_requests_again_once_they_close(
        tmp_path: Path) -> None:
    server = ServeProcess(tmp_path / "data", env={"GAMESTREAM_MAX_CONNECTIONS": "5"})
    try:
        held = []
        for _ in range(5):
            sock = connect(server)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_answer(sock).status == 200  # served, and kept open
            held.append(sock)
        with connect(server) as extra:
            extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            response = read_answer(extra)
            assert response.status == 503
            assert response.getheader("Retry-After") == "1"
            assert response.getheader("Connection") == "close"
            assert "connections" in json.loads(response.body)["error"]  # type: ignore[attr-defined]
        for sock in held:
            sock.close()
        deadline = time.monotonic() + 10
        while True:  # the server learns of the closes asynchronously
            status = httpx.get(server.url + "/healthz", timeout=10).status_code
            if status == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert status == 200
    finally:
        server.stop()

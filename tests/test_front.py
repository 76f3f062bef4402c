"""The native front (`api.front`, native/src/front.rs) on a real `gamestream serve`: it is what `serve` runs by
default, it answers plain accepted requests itself, and every request (taken or handed to the app behind it)
gets the answer, and leaves the log, exactly as the Python front does. The connection-level limits, the crash,
disk-full, shutdown, geo and worker tests run on it too, being `serve`'s default."""

from __future__ import annotations

import gzip
import http.client
import json
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from collector_server import ServeProcess, front_counts
from gamestream.log.sqlite import SqliteEventLog

NDJSON = {"Content-Type": "application/x-ndjson"}
SERVER_TIMES = ("receivedAt", "eventTime")  # stamped at the moment a server takes the request


def line(i: int, **params) -> bytes:
    return json.dumps({"eventName": "levelStart", "eventId": f"id-{i}",
                       "eventParams": {"device_id": f"d{i % 7}", **params}}).encode()


def logged_events(data_dir: Path) -> list[dict]:
    """Every event in the embedded log of `data_dir`, without the times its server stamped, sorted."""
    log = SqliteEventLog(data_dir / "log", partitions=4)
    try:
        events = [json.loads(text) for p in range(4) for record in log.read(p, 0, 10**6)
                  for text in record.payload.decode().splitlines()]
    finally:
        log.close()
    for event in events:
        for name in SERVER_TIMES:
            event.pop(name, None)
    return sorted(events, key=lambda e: json.dumps(e, sort_keys=True))


def test_serve_runs_the_native_front_by_default_and_it_takes_plain_requests_itself(tmp_path: Path) -> None:
    server = ServeProcess(tmp_path / "data")
    try:
        with httpx.Client(base_url=server.url) as client:
            for request in range(20):
                body = b"\n".join(line(request * 10 + i) for i in range(10))
                answer = client.post("/v1/events", content=body, headers=NDJSON)
                assert answer.status_code == 200 and answer.json() == {"accepted": 10, "rejected": 0, "errors": []}
                assert answer.headers["server"] == "gamestream"  # answered by the front, not uvicorn
        counts = front_counts(server.url)
    finally:
        assert server.stop() == 0
    assert counts["taken"] == 20
    assert len(logged_events(server.data_dir)) == 200


def private_directories(tmp: Path, pid: int, wait: bool = True) -> list[Path]:
    """The front's private directories of `serve` `pid` under `tmp`; with `wait`, once there is one (within 30 s):
    "listening" is said before the front starts and makes its directory."""
    deadline = time.monotonic() + (30 if wait else 0)
    while not (found := list(tmp.glob(f"gamestream-front-{pid}-*"))) and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def test_a_killed_serves_private_directory_is_removed_by_the_next_serve_and_live_ones_are_kept(
        tmp_path: Path) -> None:
    """The app behind the front listens on a Unix socket in a private directory named for the serve's pid; a
    `serve` killed outright (SIGKILL) cannot remove it. The next `serve` removes the directories of pids that no
    process has and whose socket nobody listens on, and keeps those of live ones, one whose socket listens (a
    front in another pid namespace) and anything not named for a pid."""
    # a temporary directory of this test's own (other tests' serves are not ours to count), short enough for the
    # socket's path
    tmp = Path(tempfile.mkdtemp(prefix="gs-", dir="/tmp"))
    env = {"TMPDIR": str(tmp)}
    killed, alive = ServeProcess(tmp_path / "a", env=env), ServeProcess(tmp_path / "b", env=env)
    try:
        left = private_directories(tmp, killed.process.pid)
        assert len(left) == 1 and (left[0] / "app.sock").is_socket()
        assert private_directories(tmp, alive.process.pid)
        killed.kill()
        assert killed.process.returncode == -signal.SIGKILL and left[0].is_dir()  # killed, its directory stayed
        (tmp / "gamestream-front-other").mkdir()
        # a front in another pid namespace sharing the directory: its pid is none here, but its socket listens
        gone = subprocess.Popen(["true"])
        gone.wait()
        elsewhere = tmp / f"gamestream-front-{gone.pid}-elsewhere"
        elsewhere.mkdir()
        listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listening.bind(str(elsewhere / "app.sock"))
        listening.listen(8)
        following = ServeProcess(tmp_path / "c", env=env)
        try:
            assert private_directories(tmp, following.process.pid)
            assert not left[0].exists()  # removed before the new directory was made
            assert sorted(p.name.split("-")[2] for p in tmp.glob("gamestream-front-*")) == sorted(
                [str(alive.process.pid), str(following.process.pid), "other", str(gone.pid)])
            assert httpx.get(alive.url + "/healthz", timeout=10).status_code == 200  # through its private socket
        finally:
            following.stop()
            listening.close()
    finally:
        alive.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def test_a_temporary_directory_too_deep_for_a_unix_socket_puts_the_private_directory_in_tmp(tmp_path: Path) -> None:
    """A Unix socket's path holds at most 107 bytes: with a deeper TMPDIR, `serve` failed to start ("AF_UNIX path
    too long", a traceback). The private directory then goes under /tmp, and the front serves."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    server = ServeProcess(tmp_path / "data", env={"TMPDIR": str(deep)})
    try:
        assert private_directories(Path("/tmp"), server.process.pid) and not list(deep.iterdir())
        answer = httpx.post(server.url + "/v1/events", content=line(1), headers=NDJSON, timeout=10)
        assert answer.status_code == 200 and answer.json()["accepted"] == 1
        assert httpx.get(server.url + "/healthz", timeout=10).status_code == 200  # the app, over the socket
    finally:
        assert server.stop() == 0
    assert not private_directories(Path("/tmp"), server.process.pid, wait=False)


def test_a_python_front_is_served_when_asked_for(tmp_path: Path) -> None:
    server = ServeProcess(tmp_path / "data", "--front", "python")
    try:
        answer = httpx.post(server.url + "/v1/events", content=line(1), headers=NDJSON)
        assert answer.status_code == 200 and answer.headers["server"] == "uvicorn"
        assert front_counts(server.url) == {}
    finally:
        assert server.stop() == 0


# (method, path, headers, body): what a client may send, taken by the front or not
GZIPPED = gzip.compress(b"\n".join(line(i) for i in range(300, 305)))
CASES = [
    ("POST", "/v1/events", NDJSON, b"\n".join(line(i) for i in range(3))),
    ("POST", "/v1/events", {"Content-Type": "application/json"}, line(10)),
    ("POST", "/v1/events", {}, b"  \n" + line(11) + b"\r\n\n" + line(12) + b"\n"),
    ("POST", "/v1/events", {**NDJSON, "Content-Encoding": "gzip"}, GZIPPED),
    ("POST", "/v1/events", NDJSON, line(20) + b"\n{not json\n" + line(21)),
    ("POST", "/v1/events", NDJSON, json.dumps({"eventName": "x", "eventParams": {}}).encode()),
    ("POST", "/v1/events", NDJSON, json.dumps({"eventName": "noId", "eventParams": {"device_id": "d"}}).encode()),
    ("POST", "/v1/events", {"Content-Type": "application/json"}, b"[" + line(30) + b"," + line(31) + b"]"),
    ("POST", "/v1/events", {"Content-Type": "text/html"}, line(40)),
    ("POST", "/v1/events", {**NDJSON, "Content-Encoding": "br"}, line(41)),
    ("POST", "/v1/events", {**NDJSON, "Content-Encoding": "gzip"}, b"not gzip at all"),
    ("POST", "/v1/events", {**NDJSON, "Content-Encoding": "gzip"}, GZIPPED + b"trailing"),
    ("POST", "/v1/events", {**NDJSON, "Content-Encoding": "gzip"}, GZIPPED[:-6]),
    ("POST", "/v1/events", NDJSON, b"   \n"),
    ("POST", "/v1/events", NDJSON, b"\n".join(line(i) for i in range(500, 1001))),
    ("POST", "/v1/events", {**NDJSON, "Idempotency-Key": "k1"}, line(50)),
    ("POST", "/v1/events", {**NDJSON, "Idempotency-Key": "k1"}, line(51)),
    ("POST", "/v1/events", {**NDJSON, "Idempotency-Key": "k2"}, line(52) + b"\nnot json"),
    ("POST", "/v1/events", {**NDJSON, "Idempotency-Key": "k2"}, line(53)),
    ("POST", "/v1/events", {**NDJSON, "Idempotency-Key": "k" * 201}, line(54)),
    ("POST", "/v1/events", {**NDJSON, "Idempotency-Key": "k" * 200}, line(55)),
    ("POST", "/v1/events", {**NDJSON, "Sent-At": "2026-12-06T00:00:00Z"}, line(60)),
    ("POST", "/v1/events", {**NDJSON, "Sent-At": "yesterday"}, line(61)),
    ("POST", "/v1/events", {**NDJSON, "Connection": "close"}, line(70)),
    ("POST", "/v1/events?x=1", NDJSON, line(71)),
    ("POST", "/v1/events/", NDJSON, line(72)),
    ("GET", "/v1/events", {}, b""),
    ("POST", "/v1/events", NDJSON, line(80, score=1.5, level=3, name="caf\\u00e9")),
    ("POST", "/v1/events", NDJSON, line(81)[:-1] + b', "extra": 1}'),
]


def exchange(url: str, method: str, path: str, headers: dict, body: bytes
             ) -> tuple[int, object, str | None, str | None]:
    """One request on its own connection: status, JSON answer (or the raw text), Retry-After,
    Idempotent-Replayed."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        connection.request(method, path, body=body or None, headers=headers)
        response = connection.getresponse()
        raw = response.read()
        try:
            answer: object = json.loads(raw)
        except ValueError:
            answer = raw.decode(errors="replace")
        return response.status, answer, response.getheader("retry-after"), response.getheader("idempotent-replayed")
    finally:
        connection.close()


def test_every_request_gets_the_answer_and_leaves_the_log_as_with_the_python_front(tmp_path: Path) -> None:
    fronts = {front: ServeProcess(tmp_path / front, "--front", front) for front in ("python", "native")}
    try:
        answers = {front: [exchange(server.url, *case) for case in CASES] for front, server in fronts.items()}
        # the same again on one keep-alive connection: requests taken by the front, then handed on mid-connection
        for front, server in fronts.items():
            with httpx.Client(base_url=server.url) as client:
                for i in range(3):
                    assert client.post("/v1/events", content=line(900 + i), headers=NDJSON).status_code == 200
                assert client.post("/v1/events", content=b"{bad", headers=NDJSON).status_code == 400
                assert client.post("/v1/events", content=line(910), headers=NDJSON).status_code == 200
        counts = front_counts(fronts["native"].url)
    finally:
        for server in fronts.values():
            assert server.stop() == 0
    for case, python, native in zip(CASES, answers["python"], answers["native"]):
        assert native == python, case
    assert {status for status, *_ in answers["native"]} >= {200, 400, 405, 413, 415}
    assert sum(replayed == "true" for *_, replayed in answers["native"]) == 2
    assert counts["taken"] >= 8 and counts["spliced"] >= 10  # both paths were really taken
    python_events, native_events = (logged_events(server.data_dir) for server in fronts.values())
    assert len(native_events) > 20
    # an event sent without an eventId gets a new one from each server
    generated = [e.pop("eventId") for events in (python_events, native_events) for e in events
                 if e["eventName"] == "noId"]
    assert len(generated) == 2 and generated[0] != generated[1]
    assert native_events == python_events


def test_write_keys_are_checked_by_the_front_and_a_wrong_one_is_answered_by_the_app(tmp_path: Path) -> None:
    server = ServeProcess(tmp_path / "data", env={"GAMESTREAM_API_KEYS": "k-write", "GAMESTREAM_ADMIN_KEYS": "k-admin"})
    try:
        for headers in ({"X-API-Key": "k-write"}, {"Authorization": "Bearer k-write"},
                        {"Authorization": "bearer   k-write"}):
            answer = httpx.post(server.url + "/v1/events", content=line(1), headers={**NDJSON, **headers})
            assert answer.status_code == 200 and answer.headers["server"] == "gamestream", headers
        for headers in ({}, {"X-API-Key": "k-wrong"}, {"X-API-Key": "k-write!"}, {"X-API-Key": "k-writ"},
                        {"Authorization": "Basic k-write"}, {"X-API-Key": "k-wrong", "Authorization": "Bearer k-write"}):
            answer = httpx.post(server.url + "/v1/events", content=line(2), headers={**NDJSON, **headers})
            assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer", headers
        counts = front_counts(server.url, {"X-API-Key": "k-admin"})
    finally:
        assert server.stop() == 0
    assert counts["taken"] == 3
    assert len(logged_events(server.data_dir)) == 3


def test_requests_with_idempotency_keys_sent_at_once_store_each_key_once(tmp_path: Path) -> None:
    """Eight clients send the same 25 keyed requests at the same moment, so the front's groups hold several keyed
    requests (and may hold one key twice): each key's events are stored once, its first answer is the one every
    copy gets, and the copies say they are replays."""
    from concurrent.futures import ThreadPoolExecutor

    server = ServeProcess(tmp_path / "data")
    bodies = {f"key-{k}": b"\n".join(line(k * 10 + i) for i in range(1 + k % 4)) for k in range(25)}

    def client(_: int) -> list[tuple[str, int, dict, str | None]]:
        with httpx.Client(base_url=server.url) as http:
            answers = []
            for key, body in bodies.items():
                answer = http.post("/v1/events", content=body, headers={**NDJSON, "Idempotency-Key": key})
                answers.append((key, answer.status_code, answer.json(), answer.headers.get("idempotent-replayed")))
            return answers

    try:
        with ThreadPoolExecutor(8) as pool:
            answers = [a for answers in pool.map(client, range(8)) for a in answers]
        counts = front_counts(server.url)
    finally:
        assert server.stop() == 0
    assert counts["taken"] == 8 * 25
    for key, body in bodies.items():
        mine = [(status, answer, replayed) for k, status, answer, replayed in answers if k == key]
        events = body.count(b"\n") + 1
        assert all(status == 200 and answer == {"accepted": events, "rejected": 0, "errors": []}
                   for status, answer, _ in mine)
        assert sorted(replayed or "" for *_, replayed in mine) == [""] + ["true"] * 7, key
    assert len(logged_events(server.data_dir)) == sum(body.count(b"\n") + 1 for body in bodies.values())


class AnswerDroppingProxy:
    """A TCP proxy in front of a collector that passes every request on and drops every `every`-th answer: it
    closes the client's connection instead of passing the answer back (the request did land)."""

    def __init__(self, upstream: str, every: int) -> None:
        import socket
        import threading

        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.every, self.seen, self.dropped = every, 0, 0
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client) -> None:
        import socket

        with client, socket.create_connection(self.upstream) as upstream:
            client.settimeout(30)
            upstream.settimeout(30)
            while True:
                request = read_message(client)
                if request is None:
                    return
                upstream.sendall(request)
                answer = read_message(upstream)
                with self.lock:
                    self.seen += 1
                    drop = self.seen % self.every == 0
                    self.dropped += drop
                if drop or answer is None:
                    return  # the request landed; its client never hears how
                client.sendall(answer)

    def close(self) -> None:
        self.listener.close()


def read_message(sock) -> bytes | None:
    """One HTTP/1.1 message with a Content-Length (head and body) from `sock`, or None at its end."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)[1])
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        body += chunk
    return head + b"\r\n\r\n" + body


def test_answers_lost_on_the_way_back_are_retried_with_their_keys_and_each_event_lands_once(tmp_path: Path) -> None:
    """A proxy drops every third answer after the front has made its request durable; the clients retry with the
    same Idempotency-Key until they hear back. Every event is in the log once, and the retries of a request that
    had landed are answered from the log (`Idempotent-Replayed`)."""
    from concurrent.futures import ThreadPoolExecutor

    server = ServeProcess(tmp_path / "data")
    proxy = AnswerDroppingProxy(server.url, every=3)
    requests = {f"lost-{k}": b"\n".join(line(k * 10 + i) for i in range(5)) for k in range(60)}

    def post_until_answered(key: str) -> tuple[int, int]:
        """(attempts, replayed answers) for one request."""
        attempts = 0
        while True:
            attempts += 1
            assert attempts <= 10, f"{key} never answered"
            try:
                answer = httpx.post(proxy.url + "/v1/events", content=requests[key],
                                    headers={**NDJSON, "Idempotency-Key": key}, timeout=30)
            except httpx.TransportError:  # the answer was lost: retry with the same key
                continue
            assert answer.status_code == 200 and answer.json()["accepted"] == 5, answer.text
            return attempts, answer.headers.get("idempotent-replayed") == "true"

    try:
        with ThreadPoolExecutor(6) as pool:
            outcomes = list(pool.map(post_until_answered, requests))
        counts = front_counts(server.url)
    finally:
        proxy.close()
        assert server.stop() == 0
    assert proxy.dropped >= 20  # the fault happened
    assert sum(attempts - 1 for attempts, _ in outcomes) == proxy.dropped  # each lost answer, one retry
    retried = sum(attempts > 1 for attempts, _ in outcomes)
    assert retried >= 10 and sum(replayed for _, replayed in outcomes) == retried
    assert counts["taken"] == sum(attempts for attempts, _ in outcomes)  # every attempt answered by the front
    stored = logged_events(server.data_dir)
    assert len(stored) == 60 * 5 and len({e["eventId"] for e in stored}) == 60 * 5


def test_a_paused_collector_answers_every_waiting_request_once_it_runs_again(tmp_path: Path) -> None:
    """SIGSTOP while clients post: nothing is answered while it is stopped; after SIGCONT every request is
    answered 200 and its events are in the log once."""
    import os
    import signal
    from concurrent.futures import ThreadPoolExecutor

    server = ServeProcess(tmp_path / "data")
    bodies = [b"\n".join(line(k * 10 + i) for i in range(10)) for k in range(40)]
    try:
        httpx.post(server.url + "/v1/events", content=line(999), headers=NDJSON)  # warm: the log is open
        os.kill(server.process.pid, signal.SIGSTOP)
        with ThreadPoolExecutor(8) as pool:
            pending = [pool.submit(httpx.post, server.url + "/v1/events", content=body, headers=NDJSON, timeout=60)
                       for body in bodies]
            time.sleep(1.5)
            assert not any(p.done() for p in pending)  # the fault happened: nobody was answered meanwhile
            assert open(f"/proc/{server.process.pid}/stat").read().rsplit(")", 1)[1].split()[0] == "T"
            os.kill(server.process.pid, signal.SIGCONT)
            answers = [p.result() for p in pending]
        counts = front_counts(server.url)
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
        assert server.stop() == 0
    assert all(a.status_code == 200 and a.json()["accepted"] == 10 for a in answers)
    assert counts["taken"] == 41
    stored = logged_events(server.data_dir)
    assert len(stored) == 401 and len({e["eventId"] for e in stored}) == 401

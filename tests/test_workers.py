"""`gamestream serve --workers N`: several collector processes on one port, run as a user runs them."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from collector_server import ServeProcess
from conftest import gamestream

NDJSON = {"Content-Type": "application/x-ndjson"}


def _worker_pids(url: str, *, want: int, deadline_s: float = 60) -> set[int]:
    """The pids that answer /healthz, each request on a new connection, until `want` different ones did."""
    seen: set[int] = set()
    deadline = time.monotonic() + deadline_s
    while len(seen) < want and time.monotonic() < deadline:
        answers: list[int] = []

        def ask() -> None:
            with httpx.Client(timeout=10) as client:  # a client per request: a new connection each time
                answers.append(client.get(url + "/healthz").json()["pid"])

        threads = [threading.Thread(target=ask) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seen.update(answers)
    return seen


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _event_ids_in_log(data_dir: Path) -> Counter:
    from gamestream.log.sqlite import SqliteEventLog

    log = SqliteEventLog(data_dir / "log", partitions=None)
    ids: Counter = Counter()
    try:
        for partition in range(log.partitions):
            after = 0
            while records := log.read(partition, after, 1000):
                for record in records:
                    ids.update(json.loads(line)["eventId"] for line in record.payload.split(b"\n"))
                after = records[-1].offset
    finally:
        log.close()
    return ids


def test_two_workers_share_the_port_and_store_each_concurrent_event_once(tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = ServeProcess(data, "--workers", "2")
    try:
        pids = _worker_pids(server.url, want=2)
        assert len(pids) == 2 and server.process.pid not in pids, pids

        accepted: list[int] = []

        def post(sender: int) -> None:
            with httpx.Client(timeout=30) as client:
                for request in range(10):
                    lines = [json.dumps({"eventName": "levelUp", "eventId": f"s{sender}-r{request}-e{n}",
                                         "eventParams": {"device_id": f"device-{sender}-{n}"}}) for n in range(20)]
                    answer = client.post(server.url + "/v1/events", content="\n".join(lines), headers=NDJSON)
                    assert answer.status_code == 200, answer.text
                    accepted.append(answer.json()["accepted"])

        senders = [threading.Thread(target=post, args=(sender,)) for sender in range(8)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
        assert sum(accepted) == 8 * 10 * 20

        health = httpx.get(server.url + "/healthz", timeout=10).json()
        assert health["log_url"] == f"sqlite:{(data / 'log').absolute()}" and health["log"] == "writable"
        metrics = httpx.get(server.url + "/metrics", timeout=10).text
        assert f'gamestream_log_reachable{{log="sqlite:{(data / "log").absolute()}"}} 1.0' in metrics
    finally:
        code = server.stop()  # SIGTERM
    assert code == 0
    assert not any(_alive(pid) for pid in pids), "a worker outlived `serve`"
    ids = _event_ids_in_log(data)
    assert sum(ids.values()) == len(ids) == 8 * 10 * 20


def test_a_worker_that_dies_stops_the_others_and_serve_exits_non_zero(tmp_path: Path) -> None:
    server = ServeProcess(tmp_path / "data", "--workers", "2")
    try:
        pids = _worker_pids(server.url, want=2)
        assert len(pids) == 2
        os.kill(min(pids), signal.SIGKILL)
        code = server.process.wait(timeout=60)
    finally:
        server.kill()
    assert code != 0
    assert not any(_alive(pid) for pid in pids)


def test_a_log_url_nobody_serves_is_one_line_and_exit_2(tmp_path: Path) -> None:
    unknown = gamestream("serve", "--port", "0", "--log", "kafka://somewhere:9092", data_dir=tmp_path / "data",
                         check=False, timeout=60)
    assert unknown.returncode == 2
    assert "Traceback" not in unknown.stderr
    assert "cannot open the event log kafka://somewhere:9092" in unknown.stderr
    assert len([line for line in unknown.stderr.splitlines() if line.strip()]) == 1


@pytest.mark.parametrize("command", [("status",), ("generate", "--to-log", "--events", "10")])
def test_log_url_from_the_environment_reaches_every_command(tmp_path: Path, command: tuple[str, ...]) -> None:
    completed = gamestream(*command, data_dir=tmp_path / "data", check=False, timeout=60,
                           env={"GAMESTREAM_LOG": "kafka://somewhere:9092"})
    assert "cannot open the event log kafka://somewhere:9092" in completed.stdout + completed.stderr
    assert "Traceback" not in completed.stderr

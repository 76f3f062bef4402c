"""`gamestream demo`, run as a user runs it, for 30 seconds."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from conftest import gamestream, table_rows


@pytest.mark.slow
def test_demo_runs_for_30_seconds_and_the_table_holds_exactly_what_was_accepted(tmp_path: Path) -> None:
    data = tmp_path / "data"
    result = gamestream("demo", "--port", "0", "--duration", "30", "--rate", "1000", "--seed", "1", data_dir=data,
                        timeout=180)
    assert re.search(r"collector http://127\.0\.0\.1:\d+/v1/events", result.stdout)
    assert re.search(r"sent [\d,]+ · accepted [\d,]+ · rejected 0 · committed [\d,]+", result.stdout)
    accepted = int(re.search(r"generator accepted ([\d,]+) events", result.stdout)[1].replace(",", ""))
    committed = int(re.search(r"table committed ([\d,]+)", result.stdout)[1].replace(",", ""))
    assert accepted > 10_000  # ~1,000 events/s for 30 s
    ids = Counter(r["eventId"] for r in table_rows(data / "tables" / "events", ["eventId"]))
    assert sum(ids.values()) == len(ids) == accepted == committed


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def test_the_supervisor_restarts_a_part_in_one_line_backs_off_and_gives_up_after_repeated_fast_failures(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from gamestream.demo import supervisor as module

    clock = _Clock()
    monkeypatch.setattr(module.time, "monotonic", clock.monotonic)
    news: list[str] = []
    state = {"status": None, "pid": 100, "starts": 0, "fail_start": False}

    def start() -> int:
        if state["fail_start"]:
            raise FileNotFoundError("nats-server not found")
        state["starts"] += 1
        state["pid"] += 1
        state["status"] = None
        return state["pid"]

    supervisor = module.Supervisor(news.append)
    part = supervisor.add(module.Part("processor-1", start=start,
                                      ended=lambda: None if state["status"] is None else
                                      module.how_it_ended(state["status"]),
                                      why=lambda: "error: port 8000 is in use"), pid=100)
    clock.now += 30
    state["status"] = -9  # kill -9 after 30 s: one line, restarted after 1 s
    supervisor.check()
    supervisor.check()
    assert news == ["processor-1 (pid 100) was killed by SIGKILL after 30.0s; restarting it in 1s"]
    clock.now += 1
    supervisor.check()
    assert news[1:] == ["processor-1 restarted (pid 101)"] and part.pid == 101 and part.pids == [100, 101]
    assert supervisor.owner_of(100) == ("processor-1", False) and supervisor.owner_of(101) == ("processor-1", True)

    # exits at once, again and again: the delay doubles, the reason is shown, then it is given up
    delays = []
    for _ in range(module.GIVE_UP_AFTER):
        clock.now += 0.5
        state["status"] = 1
        supervisor.check()
        if part.given_up:
            break
        delays.append(part.restart_at - clock.now)
        clock.now = part.restart_at
        supervisor.check()
    assert delays == [1.0, 2.0, 4.0, 8.0]
    assert news[2] == "processor-1 (pid 101) exited with status 1 after 0.5s (error: port 8000 is in use); " \
                      "restarting it in 1s"
    assert part.given_up and news[-1].endswith(f"it failed {module.GIVE_UP_AFTER} times in a row within 10s of "
                                               f"starting: giving up on it")
    count = len(news)
    clock.now += 60
    supervisor.check()
    assert len(news) == count  # given up: no more lines, no more starts

    # a part that cannot be started at all: one line, retried later, never a traceback
    other = supervisor.add(module.Part("n2", start=start, ended=lambda: "was killed by SIGKILL"), pid=7)
    state["fail_start"] = True
    supervisor.check()
    clock.now = other.restart_at
    supervisor.check()
    assert news[-1] == "n2 could not start (FileNotFoundError: nats-server not found); restarting it in 2s"

    # released (the demo is stopping it): never restarted
    supervisor.release(["n2"])
    clock.now += 60
    supervisor.check()
    assert news[-1].startswith("n2 could not start")


def test_demo_on_a_port_in_use_says_so_in_one_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = gamestream("demo", "--port", str(port), "--duration", "5", data_dir=tmp_path / "data", check=False,
                            timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert re.search(rf"Error: the collector cannot listen on 127\.0\.0\.1:{port}: Address already in use",
                     result.stderr), result.stdout + result.stderr


@pytest.mark.slow
def test_cluster_demo_whose_collector_port_is_in_use_says_so_in_one_line(tmp_path: Path) -> None:
    import socket

    data = tmp_path / "data"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = gamestream("demo", "--cluster", "--port", str(port), "--duration", "5", data_dir=data,
                            check=False, timeout=240, env={"GAMESTREAM_LOG": ""})
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output
    assert re.search(r"Error: collector-1 could not start: it exited with status \d+ \(.*\); its output: \S+"
                     r"collector-1\.log", result.stderr), output

"""`gamestream demo --cluster`, run as a user runs it: three nats-server nodes, two collectors, two processors
and the generator as separate processes, stopped in order at the end of --duration."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from conftest import table_rows


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that name `text` (the demo's children all name its data directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(cmdline)
    return found


@pytest.mark.slow
def test_cluster_demo_commits_exactly_what_both_collectors_accepted_and_leaves_no_process(tmp_path: Path) -> None:
    data = tmp_path / "data"
    demo = subprocess.Popen(
        [sys.executable, "-m", "gamestream", "demo", "--cluster", "--port", "0", "--duration", "20", "--rate", "400",
         "--seed", "5", "--data-dir", str(data)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "GAMESTREAM_LOG": ""})
    lines: list[str] = []
    collectors: list[str] = []
    both_listed = threading.Event()

    def read_stdout() -> None:
        assert demo.stdout is not None
        for line in demo.stdout:
            lines.append(line)
            match = re.match(r"collector \d: (http://[\d.]+:\d+)/v1/events", line)
            if match:
                collectors.append(match[1])
                if len(collectors) == 2:
                    both_listed.set()

    reader = threading.Thread(target=read_stdout, daemon=True)
    reader.start()
    try:
        assert both_listed.wait(180), "".join(lines)
        health = [httpx.get(url + "/healthz", timeout=10) for url in collectors]
        stderr_tail = ""
    finally:
        try:
            demo.wait(timeout=300)
        finally:
            if demo.poll() is None:
                demo.kill()
                demo.wait()
        reader.join(10)
        stderr_tail = demo.stderr.read()[-3000:] if demo.stderr else ""
    output = "".join(lines)
    assert demo.returncode == 0, output + stderr_tail

    assert [answer.status_code for answer in health] == [200, 200]
    assert all(answer.json()["log_url"].startswith("nats://127.0.0.1:") for answer in health)
    assert len({answer.json()["pid"] for answer in health}) == 2
    assert re.search(r"nats \(3 nodes.*\): nats://127\.0\.0\.1:\d+,127\.0\.0\.1:\d+,127\.0\.0\.1:\d+", output)
    assert re.search(r"dashboard http://127\.0\.0\.1:\d+/", output)

    assert not _processes_mentioning(str(data)), "a child of the demo outlived it"

    summary = re.search(r"generator accepted ([\d,]+) events \(([\d,]+) via \S+, ([\d,]+) via \S+\); "
                        r"table committed ([\d,]+)", output)
    assert summary, output
    accepted, via_first, via_second, committed = (int(group.replace(",", "")) for group in summary.groups())
    assert via_first > 0 and via_second > 0 and via_first + via_second == accepted
    ids = Counter(row["eventId"] for row in table_rows(data / "tables" / "events", ["eventId"]))
    assert sum(ids.values()) == len(ids) == accepted == committed

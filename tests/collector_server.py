"""A real `gamestream serve` on a loopback port, for tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from gamestream.log.sqlite import SqliteEventLog


class ServeProcess:
    def __init__(self, data_dir: Path, *args: str, env: dict | None = None, prefix: tuple[str, ...] = ()) -> None:
        """`prefix`: a command the server runs under (`unshare --net …`, say)."""
        self.data_dir = data_dir
        self.process = subprocess.Popen(
            [*prefix, sys.executable, "-m", "gamestream", "serve", "--data-dir", str(data_dir), "--port", "0", *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
        )
        self.url = self._wait_for_url()

    def _wait_for_url(self) -> str:
        deadline = time.monotonic() + 60
        seen = []
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            if not line:
                break
            seen.append(line)
            match = re.search(r"listening on (http://[\d.]+:\d+)", line)
            if match:
                return match[1]
        self.kill()
        raise RuntimeError("serve did not start:\n" + "".join(seen))

    def kill(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()
        if self.process.stderr:
            self.process.stderr.close()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=30)
        if self.process.stderr:
            self.process.stderr.close()
        return code


def front_counts(url: str, headers: dict | None = None) -> dict[str, float]:
    """The native front's counts on a collector's /metrics: requests it answered ("taken"), connections it
    handed to the app ("spliced"); empty without the front."""
    text = httpx.get(url + "/metrics", headers=headers).text
    return {kind: float(value) for kind, value in
            re.findall(r'^gamestream_front_requests\{kind="(\w+)"\} (\S+)$', text, re.MULTILINE)}


def stored_events(data_dir: Path) -> int:
    """Events in the embedded log of `data_dir`, processed or not."""
    log = SqliteEventLog(data_dir / "log", partitions=4)
    try:
        return sum(log.events_after(p, 0) for p in range(4))
    finally:
        log.close()

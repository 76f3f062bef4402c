"""Keeping the demo's parts running, as an orchestrator would.

A part (a child process, a nats-server node, a thread, a task) that ends while it should run is reported in one
line — which part, how it ended — and started again after a short delay: `RESTART_DELAY_S`, doubled for each fast
failure in a row (one within `FAST_FAILURE_S` of starting) up to `MAX_DELAY_S`; after `GIVE_UP_AFTER` fast
failures in a row the part is given up, in one line. A part that cannot even be started (a binary missing, an
exception from its start) counts as a fast failure.

`Supervisor.check` does the looking and the restarting; the demo calls it every `CHECK_INTERVAL_S` from its
event loop (`Supervisor.run`). Stopping the demo first stops supervising a part (`release`), then stops it.
"""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

RESTART_DELAY_S = 1.0
MAX_DELAY_S = 8.0
FAST_FAILURE_S = 10.0
GIVE_UP_AFTER = 5
CHECK_INTERVAL_S = 0.25


def how_it_ended(status: int | None) -> str:
    """A process's exit status in words: `was killed by SIGKILL`, `exited with status 1`."""
    if status is None:
        return "is running"
    if status < 0:
        try:
            return f"was killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"was killed by signal {-status}"
    return f"exited with status {status}"


def last_line(path: Path) -> str:
    """The last non-empty line of a part's output file (why it stopped, often), shortened; '' when none."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, 2)
            handle.seek(max(0, handle.tell() - 4096))
            lines = [line.strip() for line in handle.read().decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    if not lines:
        return ""
    line = lines[-1]
    return line if len(line) <= 160 else line[:157] + "..."


@dataclass
class Part:
    """One supervised part.

    `start()` starts it and returns its pid (or None for a thread or task); `ended()` is None while it runs, else
    how it ended in words (`was killed by SIGKILL`); `why()` gives a hint for a failure (the last line of its
    output), '' when there is none."""

    name: str
    start: Callable[[], int | None]
    ended: Callable[[], str | None]
    why: Callable[[], str] = lambda: ""
    pid: int | None = None
    pids: list[int] = field(default_factory=list)  # every pid it has had, the current one last
    started_at: float = 0.0
    fast_failures: int = 0
    restart_at: float | None = None
    given_up: bool = False
    supervised: bool = True
    restarts: int = 0
    min_delay_s: float = 0.0  # wait at least this long before a restart (a processor: until its leases lapse)
    delay_note: str = ""  # why, said in the line

    @property
    def running(self) -> bool:
        return self.restart_at is None and not self.given_up and self.ended() is None


class Supervisor:
    """Restarts the parts it is given (`add`, already started) when they end; `report` gets its one-line news."""

    def __init__(self, report: Callable[[str], None]) -> None:
        self.report = report
        self.parts: dict[str, Part] = {}

    def add(self, part: Part, pid: int | None = None) -> Part:
        part.pid = pid
        if pid is not None:
            part.pids.append(pid)
        part.started_at = time.monotonic()
        self.parts[part.name] = part
        return part

    def release(self, names: list[str] | None = None) -> None:
        """Stops supervising these parts (all when None): the demo is about to stop them."""
        for name in names if names is not None else list(self.parts):
            part = self.parts.get(name)
            if part is not None:
                part.supervised = False
                part.restart_at = None

    def owner_of(self, pid: int) -> tuple[str, bool] | None:
        """The part that has or had `pid`, and whether that pid is its current, running one."""
        for part in self.parts.values():
            if pid in part.pids:
                return part.name, pid == part.pid and part.running
        return None

    def check(self) -> None:
        """Reports the parts that ended since the last look and schedules their restart; starts those due."""
        now = time.monotonic()
        for part in self.parts.values():
            if not part.supervised or part.given_up:
                continue
            if part.restart_at is None:
                ended = part.ended()
                if ended is not None:
                    self._ended(part, ended, now)
            elif now >= part.restart_at:
                self._restart(part, now)

    def _ended(self, part: Part, ended: str, now: float) -> None:
        lived = now - part.started_at
        fast = lived < FAST_FAILURE_S
        part.fast_failures = part.fast_failures + 1 if fast else 0
        pid = f" (pid {part.pid})" if part.pid is not None else ""
        if ended.startswith("could not start"):
            what = f"{part.name} {ended}"
        else:
            # why it exited (its last line of output), for an exit of its own soon after starting; not for a kill
            why = part.why() if fast and "killed" not in ended else ""
            what = f"{part.name}{pid} {ended} after {lived:.1f}s" + (f" ({why})" if why else "")
        if part.fast_failures >= GIVE_UP_AFTER:
            part.given_up = True
            self.report(f"{what}; it failed {part.fast_failures} times in a row within {FAST_FAILURE_S:.0f}s of "
                        f"starting: giving up on it")
            return
        delay = min(MAX_DELAY_S, RESTART_DELAY_S * 2 ** max(0, part.fast_failures - 1))
        note = f" ({part.delay_note})" if part.delay_note and part.min_delay_s > delay else ""
        delay = max(delay, part.min_delay_s)
        part.restart_at = now + delay
        self.report(f"{what}; restarting it in {delay:.0f}s{note}")

    def _restart(self, part: Part, now: float) -> None:
        part.restart_at = None
        part.started_at = now
        try:
            pid = part.start()
        except Exception as error:  # counts as a fast failure: one line, a retry later, at worst giving up
            part.pid = None
            self._ended(part, f"could not start ({type(error).__name__}: {error})", now)
            return
        part.pid = pid
        part.restarts += 1
        if pid is not None:
            part.pids.append(pid)
            self.report(f"{part.name} restarted (pid {pid})")
        else:
            self.report(f"{part.name} restarted")

    async def run(self, stop: asyncio.Event) -> None:
        """`check` every CHECK_INTERVAL_S until `stop` is set (a failure of its own is reported, not raised)."""
        while not stop.is_set():
            try:
                self.check()
            except Exception as error:  # never let the watching end the demo
                self.report(f"supervisor: {type(error).__name__}: {error}")
            try:
                await asyncio.wait_for(stop.wait(), CHECK_INTERVAL_S)
            except TimeoutError:
                pass

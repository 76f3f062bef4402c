"""A scaled-out gamestream on one machine, for fault tests: a NATS cluster, collectors and processors as real
processes, and a client that posts a steady load the way a game's SDK would (Idempotency-Keys, retries,
failing over between collectors), remembering exactly which events were acknowledged."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from gamestream.demo.nats_cluster import NatsCluster


@dataclass
class Child:
    """A `gamestream` subprocess whose stderr (JSON log lines) goes to a file."""

    name: str
    args: list[str]
    stderr_path: Path
    env: dict[str, str]
    process: subprocess.Popen | None = None
    url: str | None = None

    def start(self) -> "Child":
        with open(self.stderr_path, "a") as stderr:
            self.process = subprocess.Popen([sys.executable, "-m", "gamestream", "--log-format", "json", *self.args],
                                            stdout=subprocess.DEVNULL, stderr=stderr, text=True,
                                            env={**os.environ, **self.env})
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def kill(self) -> None:
        if self.alive():
            self.process.kill()  # type: ignore[union-attr]
            self.process.wait(timeout=30)  # type: ignore[union-attr]

    def stop(self, timeout: float = 60) -> int | None:
        if self.process is None:
            return None
        if self.alive():
            self.process.send_signal(signal.SIGCONT)
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def text(self) -> str:
        return self.stderr_path.read_text() if self.stderr_path.exists() else ""

    def records(self) -> list[dict]:
        """The JSON log records written so far."""
        found = []
        for line in self.text().splitlines():
            if line.startswith("{"):
                try:
                    found.append(json.loads(line))
                except ValueError:
                    pass
        return found

    def wait_for(self, pattern: str, timeout: float = 60) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.text())
            if match:
                return match
            if not self.alive():
                break
            time.sleep(0.1)
        raise AssertionError(f"{self.name}: no {pattern!r} within {timeout}s:\n{self.text()[-3000:]}")


def leases_held(child: Child, since: float = 0.0) -> set[str]:
    """Lease keys `child` acquired (after unix time `since`) and did not lose or release afterwards."""
    held: set[str] = set()
    for record in child.records():
        if _record_time(record) < since:
            continue
        key = record.get("key")
        if record.get("message") == "lease acquired" and key:
            held.add(key)
        elif record.get("message") == "lease lost" and key:
            held.discard(key)
        elif record.get("message") == "leases released":
            held.clear()
    return held


def leases_acquired(child: Child, since: float = 0.0) -> set[str]:
    return {r["key"] for r in child.records()
            if r.get("message") == "lease acquired" and r.get("key") and _record_time(r) >= since}


def leases_lost(child: Child, since: float = 0.0) -> set[str]:
    return {r["key"] for r in child.records()
            if r.get("message") == "lease lost" and r.get("key") and _record_time(r) >= since}


def _record_time(record: dict) -> float:
    import datetime as dt

    return dt.datetime.fromisoformat(record["time"]).timestamp() if "time" in record else 0.0


@dataclass
class Fleet:
    """A 3-node NATS cluster (replicas 3, sync always), `collectors` collectors and `processors` processors on
    one data directory, all against the same stream."""

    root: Path
    collectors: int = 2
    processors: int = 2
    partitions: int = 4
    lease_ttl_s: int = 2
    isolated: bool = False
    cluster: NatsCluster = field(init=False)
    collector_children: list[Child] = field(default_factory=list)
    processor_children: list[Child] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.data_dir = self.root / "data"
        self.cluster = NatsCluster(self.root / "nats", nodes=3, isolated=self.isolated)
        self.env = {"GAMESTREAM_LEASE_TTL_S": str(self.lease_ttl_s), "GAMESTREAM_BATCH_MAX_WAIT_S": "0.2"}

    def start(self) -> "Fleet":
        self.cluster.start()
        for index in range(self.collectors):
            self.collector_children.append(self._collector(index))
        for index in range(self.processors):
            self.processor_children.append(self.start_processor(index))
        return self

    def _collector(self, index: int) -> Child:
        child = Child(f"collector{index}", ["serve", "--log", self.cluster.url, "--data-dir", str(self.data_dir),
                                            "--port", "0", "--partitions", str(self.partitions)],
                      self.root / f"collector{index}.log", self.env).start()
        child.url = child.wait_for(r"listening on (http://[\d.]+:\d+)")[1]
        return child

    def start_processor(self, index: int) -> Child:
        child = Child(f"processor{index}", ["process", "--log", self.cluster.url, "--data-dir",
                                            str(self.data_dir)],
                      self.root / f"processor{index}.log", self.env).start()
        child.wait_for(r'"processor started"')
        return child

    def restart_collector(self, index: int) -> None:
        self.collector_children[index] = self._collector(index)

    def urls(self) -> list[str]:
        return [c.url for c in self.collector_children if c.url]

    def stop(self) -> None:
        for child in self.collector_children + self.processor_children:
            child.stop()
        self.cluster.stop()

    def processor_owning_partitions(self, timeout: float = 30) -> tuple[int, set[str]]:
        """(index, lease keys) of a live processor that holds at least one partition lease."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for index, child in enumerate(self.processor_children):
                held = {k for k in leases_held(child) if "kpi" not in k}
                if child.alive() and held:
                    return index, held
            time.sleep(0.2)
        raise AssertionError("no processor holds a partition lease")


class SteadyLoad:
    """Posts batches of valid events in a thread, `rate` batches a second, round-robin over the collectors.

    Each batch carries an Idempotency-Key and is retried (same key, same body) on any failure — a refused
    connection, a timeout, 429/5xx — moving to the next collector each time, until a collector answers 200. So
    every batch is acknowledged in the end (unless `stop(give_up=True)`), and `acked` holds exactly the event
    ids that a 200 covered."""

    def __init__(self, urls: list[str], *, batch: int = 20, rate: float = 20.0, devices: int = 200) -> None:
        self.urls = list(urls)
        self.batch = batch
        self.rate = rate
        self.devices = devices
        self.acked: list[str] = []
        self.statuses: Counter = Counter()
        self.failures: Counter = Counter()  # (collector url, error type) of failed attempts
        self.batches_acked = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="steady-load", daemon=True)
        self._counter = itertools.count()
        self.error: BaseException | None = None

    def start(self) -> "SteadyLoad":
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            with httpx.Client(timeout=5) as client:
                turn = 0
                while not self._stop.is_set():
                    started = time.monotonic()
                    number = next(self._counter)
                    ids = [f"b{number}-e{i}" for i in range(self.batch)]
                    body = "\n".join(json.dumps({"eventId": ident, "eventName": "levelStart", "eventParams": {
                        "device_id": f"dev-{(number * self.batch + i) % self.devices}", "game_keyword": "fault",
                        "scoreAdjustment": i}}) for i, ident in enumerate(ids))
                    key = f"batch-{number}"
                    deadline = time.monotonic() + 120
                    while True:
                        url = self.urls[turn % len(self.urls)]
                        turn += 1
                        try:
                            response = client.post(url + "/v1/events", content=body, headers={
                                "Content-Type": "application/x-ndjson", "Idempotency-Key": key})
                            self.statuses[response.status_code] += 1
                            if response.status_code == 200:
                                answer = response.json()
                                assert answer["accepted"] == len(ids), answer
                                self.acked.extend(ids)
                                self.batches_acked += 1
                                break
                            if response.status_code not in (429, 500, 502, 503, 504):
                                raise AssertionError(f"{response.status_code}: {response.text}")
                            self.failures[(url, str(response.status_code))] += 1
                        except httpx.HTTPError as error:
                            self.failures[(url, type(error).__name__)] += 1
                        if time.monotonic() > deadline:
                            raise AssertionError(f"batch {key} not acknowledged within 120 s")
                        time.sleep(0.1)
                    pause = 1 / self.rate - (time.monotonic() - started)
                    if pause > 0:
                        self._stop.wait(pause)
        except BaseException as error:
            self.error = error

    def wait_batches(self, count: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        target = self.batches_acked + count
        while self.batches_acked < target:
            if self.error:
                raise self.error
            if time.monotonic() > deadline:
                raise AssertionError(f"load stalled: {self.batches_acked} batches acked, waiting for {target}; "
                                     f"statuses {dict(self.statuses)}, failures {dict(self.failures)}")
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=180)
        assert not self._thread.is_alive(), "the load did not finish its last batch"
        if self.error:
            raise self.error


def wait_for_table(data_dir: Path, expected: int, timeout: float = 90) -> list[str]:
    """The events table's eventIds once it holds `expected` rows (or whatever it holds at the timeout)."""
    from deltalake import DeltaTable

    uri = str(data_dir / "tables" / "events")
    deadline = time.monotonic() + timeout
    ids: list[str] = []
    while time.monotonic() < deadline:
        if DeltaTable.is_deltatable(uri):
            ids = DeltaTable(uri).to_pyarrow_table(columns=["eventId"]).column("eventId").to_pylist()
            if len(ids) >= expected:
                time.sleep(1.0)  # anything more (a duplicate) would land now
                return DeltaTable(uri).to_pyarrow_table(columns=["eventId"]).column("eventId").to_pylist()
        time.sleep(0.3)
    return ids


def wait_for_kpi_events(data_dir: Path, expected: int, timeout: float = 60) -> int:
    """The events counted in kpi_events_hourly once they reach `expected` (or whatever they are at the
    timeout): the KPI stage, whichever processor runs it, counts every committed event once."""
    from deltalake import DeltaTable

    uri = str(data_dir / "tables" / "kpi_events_hourly")
    deadline = time.monotonic() + timeout
    counted = -1
    while time.monotonic() < deadline:
        if DeltaTable.is_deltatable(uri):
            counted = sum(DeltaTable(uri).to_pyarrow_table(columns=["events"]).column("events").to_pylist())
            if counted >= expected:
                time.sleep(1.5)  # a double count would land now
                return sum(DeltaTable(uri).to_pyarrow_table(columns=["events"]).column("events").to_pylist())
        time.sleep(0.3)
    return counted


def assert_exactly_once(table_ids: list[str], acked: list[str]) -> None:
    """Every acknowledged event in the table once, and nothing else."""
    counts = Counter(table_ids)
    duplicated = {k: v for k, v in counts.items() if v > 1}
    assert not duplicated, f"{len(duplicated)} events more than once, e.g. {list(duplicated.items())[:5]}"
    missing = set(acked) - set(counts)
    assert not missing, f"{len(missing)} acknowledged events missing, e.g. {sorted(missing)[:5]}"
    extra = set(counts) - set(acked)
    assert not extra, f"{len(extra)} events in the table that were never acknowledged, e.g. {sorted(extra)[:5]}"
    assert len(acked) == len(set(acked)), "the client acknowledged an event twice"

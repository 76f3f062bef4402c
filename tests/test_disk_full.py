"""A full disk is survived: the collector refuses with 503, the processor waits, everything resumes by itself.

The data directory is a small tmpfs, so the disk really fills: the collector's log and the processor's Delta
writes get ENOSPC from the kernel, not from a mock.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from deltalake import DeltaTable

from collector_server import ServeProcess, front_counts
from gamestream.settings import TABLES

DISK = 40 * 1024 * 1024
ROOM_FOR_THE_LOG = 3 * 1024 * 1024  # what the first ballast leaves: the log fills it within a few requests
EVENTS_PER_REQUEST = 100


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 40 MiB tmpfs mounted on `tmp_path/data`, unmounted afterwards."""
    mount_point = tmp_path / "data"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK}", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        for _ in range(50):
            if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)  # a process of the test is still closing its files
        else:
            subprocess.run(["umount", "-l", str(mount_point)], check=True)


def fill(path: Path, leave: int = 0) -> None:
    """Writes `path` until only `leave` bytes are free on its file system (or nothing is)."""
    with open(path, "wb", buffering=0) as handle:
        chunk = b"\0" * 65536
        try:
            while shutil.disk_usage(path.parent).free > leave + len(chunk):
                handle.write(chunk)
            if leave == 0:
                while True:
                    handle.write(b"\0" * 4096)
        except OSError as error:
            assert error.errno == 28, error  # ENOSPC: the disk is full, as wanted


def events(prefix: str, n: int) -> list[dict]:
    # a random app_name makes each event ~750 bytes that no compression shrinks: the disk fills in few requests
    return [{"eventId": f"{prefix}-{i}", "eventName": "levelStart",
             "eventParams": {"device_id": f"dev-{secrets.token_hex(4)}", "app_name": secrets.token_hex(300)}}
            for i in range(n)]


class Client:
    """Posts batches and keeps the books: ids answered 200, ids answered 503, every status seen."""

    def __init__(self, url: str, body: str = "array") -> None:
        self.http = httpx.Client(base_url=url, timeout=60)
        self.body = body  # "array": one JSON array (the app answers); "ndjson": NDJSON (the native front does)
        self.acknowledged: list[str] = []
        self.refused: list[str] = []
        self.statuses: Counter[int] = Counter()
        self.requests = 0

    def post(self, batch: list[dict]) -> int:
        self.requests += 1
        if self.body == "array":
            response = self.http.post("/v1/events", json=batch)
        else:
            response = self.http.post("/v1/events", content=b"\n".join(json.dumps(e).encode() for e in batch),
                                      headers={"Content-Type": "application/x-ndjson"})
        self.statuses[response.status_code] += 1
        ids = [e["eventId"] for e in batch]
        if response.status_code == 200:
            assert response.json()["accepted"] == len(batch)
            self.acknowledged += ids
        elif response.status_code == 503:
            assert int(response.headers["Retry-After"]) >= 1
            self.refused += ids
        else:
            raise AssertionError(f"status {response.status_code}: {response.text}")
        return response.status_code


def log_records(path: Path) -> list[dict]:
    """The JSON log records in a `--log-format json` process's stderr (other lines are progress output)."""
    records = []
    for text in path.read_text(errors="replace").splitlines():
        if text.startswith("{"):
            try:
                records.append(json.loads(text))
            except json.JSONDecodeError:
                pass
    return records


def wait_for(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def table_ids(uri: Path) -> Counter[str]:
    return Counter(DeltaTable(str(uri)).to_pyarrow_table(columns=["eventId"])["eventId"].to_pylist())


def commit_files_are_whole_and_txn_versions_only_grow(table: Path) -> int:
    """Every `_delta_log/N.json` parses line by line, N has no gaps, and each appId's txn version grows from
    one commit to the next. Returns the number of commits."""
    commits = sorted(table.glob("_delta_log/*.json"))
    assert [int(c.stem) for c in commits] == list(range(len(commits)))
    last: dict[str, int] = {}
    for commit in commits:
        for text in commit.read_text().splitlines():
            action = json.loads(text)  # a half-written commit would not parse
            if "txn" in action:
                app_id, version = action["txn"]["appId"], action["txn"]["version"]
                assert version > last.get(app_id, 0), f"{commit.name}: txn {app_id} went from {last[app_id]} " \
                                                      f"to {version}"
                last[app_id] = version
    return len(commits)


@pytest.mark.parametrize("body", ["array", "ndjson"])
def test_a_full_disk_is_refused_with_503_waited_out_by_the_processor_and_loses_nothing(
        small_disk: Path, tmp_path: Path, body: str) -> None:
    data = small_disk
    collector = ServeProcess(data)
    processor_log = tmp_path / "process.stderr"  # outside the small disk: its lines must not be lost
    processor = None
    client = Client(collector.url, body)
    try:
        with open(processor_log, "w") as stderr:
            processor = subprocess.Popen(
                [sys.executable, "-m", "gamestream", "--log-format", "json", "process", "--data-dir", str(data),
                 "--max-batch-wait", "0.2", "--metrics-port", "0"],
                stdout=subprocess.DEVNULL, stderr=stderr)
        events_table = data / "tables" / "events"

        # 1. a running system: events in, committed
        assert client.post(events("before", EVENTS_PER_REQUEST)) == 200
        wait_for(lambda: (events_table / "_delta_log").is_dir() and sum(table_ids(events_table).values())
                 == EVENTS_PER_REQUEST, "the first events in the table")

        # 2. the processor is held still (so that acknowledged events wait for it) while the disk fills
        processor.send_signal(signal.SIGSTOP)
        fill(data / "ballast-1", leave=ROOM_FOR_THE_LOG)
        batch = 0
        while client.post(events(f"filling-{batch}", EVENTS_PER_REQUEST)) == 200:
            batch += 1
            assert batch < 200, "the log never filled the disk"
        acknowledged_before_full = len(client.acknowledged)
        assert acknowledged_before_full > EVENTS_PER_REQUEST  # some of the filling was taken, then refused
        fill(data / "ballast-2")  # whatever the log could not use: now nothing at all is free
        assert shutil.disk_usage(data).free < 64 * 1024
        # SQLite may still reuse room inside its own files (WAL pages a rolled-back write left): a request or two
        # can fit there; then every request is refused (one CI run in four took one more request here)
        statuses = [client.post(events(f"while-full-{i}", EVENTS_PER_REQUEST)) for i in range(4)]
        assert statuses[-1] == 503 and statuses.count(503) >= 2, statuses

        # 3. the processor goes on: its Delta write fails for want of space, and it waits
        processor.send_signal(signal.SIGCONT)

        def out_of_space_warned() -> bool:
            return any(r["level"] == "WARNING" and r["logger"] == "gamestream.tables.lake" and r.get("table") == "events"
                       and r["message"].startswith("disk full") for r in log_records(processor_log))

        wait_for(out_of_space_warned, "the processor's disk-full warning", timeout=30)
        time.sleep(1.0)  # a few more attempts fail meanwhile
        assert processor.poll() is None, "the processor died of the full disk"
        assert client.post(events("still-full", EVENTS_PER_REQUEST)) == 503

        # 4. space is freed: everything resumes by itself
        for ballast in ("ballast-1", "ballast-2"):
            (data / ballast).unlink()
        wait_for(lambda: sum(table_ids(events_table).values()) == len(client.acknowledged),
                 "the acknowledged events in the table after space was freed")
        for batch in range(3):  # the collector takes events again
            assert client.post(events(f"after-{batch}", EVENTS_PER_REQUEST)) == 200
        wait_for(lambda: sum(table_ids(events_table).values()) == len(client.acknowledged),
                 "the events acknowledged after recovery in the table")

        records = log_records(processor_log)
        assert any(r["message"] == "commit made after the disk was full" and r.get("table") == "events"
                   for r in records)
        metrics_url = re.search(r"metrics on (http://\S+)", processor_log.read_text())[1]
        scraped = httpx.get(metrics_url).text
        retried = re.search(r'gamestream_commit_retries_total\{reason="out_of_space",table="events"\} (\S+)',
                            scraped)
        assert retried and float(retried[1]) >= 2, "the processor never retried a commit for want of space"

        processor.send_signal(signal.SIGTERM)
        assert processor.wait(timeout=60) == 0
        # NDJSON requests are answered by the native front (its log append failing, then not); arrays by the app
        assert front_counts(collector.url).get("taken", 0) == (client.requests if body == "ndjson" else 0)
    finally:
        if processor is not None and processor.poll() is None:
            processor.kill()
            processor.wait()
        client.http.close()
        collector.stop()

    # every acknowledged event exactly once; nothing that was refused
    stored = table_ids(data / "tables" / "events")
    assert not {i: n for i, n in stored.items() if n > 1}, "events written twice"
    assert set(stored) == set(client.acknowledged)
    assert not set(stored) & set(client.refused)
    assert client.statuses[503] >= 3 and set(client.statuses) == {200, 503}  # never a 500
    # the KPI stage, which also waited, counted every event once
    hourly = DeltaTable(str(data / "tables" / "kpi_events_hourly")).to_pyarrow_table(columns=["events"])
    assert sum(hourly["events"].to_pylist()) == len(client.acknowledged)
    # no half-written commit, no txn going backwards, every table readable
    # the audit table is made by the first `forget`, the alerts table by the first alert
    for name in [n for n in TABLES if n not in ("audit", "alerts")]:
        table = data / "tables" / name
        assert commit_files_are_whole_and_txn_versions_only_grow(table) >= 1
        DeltaTable(str(table)).to_pyarrow_table()
    # the log's file is consistent after the failed transactions were rolled back
    connection = sqlite3.connect(data / "log" / "events.sqlite")
    try:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        connection.close()


def test_a_pipeline_stopped_while_the_disk_is_full_leaves_its_events_to_a_run_started_on_a_full_disk(small_disk: Path) -> None:
    import threading

    from gamestream import metrics
    from gamestream.log import Append, open_log
    from gamestream.process.pipeline import Pipeline
    from gamestream.settings import Settings

    def out_of_space_retries() -> float:  # the first commit that waits: events, or event_ids (its first load)
        return sum(metrics.REGISTRY.get_sample_value(
            "gamestream_commit_retries_total", {"table": table, "reason": "out_of_space"}) or 0.0
            for table in ("events", "event_ids"))

    settings = Settings(data_dir=small_disk, partitions=2, batch_max_wait_s=0.05, kpi_interval_s=0.2)
    lines = [json.dumps({"eventId": f"e-{i}", "eventName": "levelStart", "eventTime": "2026-11-01T10:00:00Z",
                         "eventParams": {"device_id": f"d{i}"}}).encode() for i in range(100)]
    log = open_log(small_disk, partitions=2)
    try:
        log.append([Append(0, b"\n".join(lines[:50]), 50), Append(1, b"\n".join(lines[50:]), 50)])
        pipeline = Pipeline(settings, log)  # creates the tables
        fill(small_disk / "ballast")
        retries_before = out_of_space_retries()
        failures: list[BaseException] = []

        def run() -> None:
            try:
                pipeline.run()
            except BaseException as error:
                failures.append(error)

        running = threading.Thread(target=run)
        running.start()
        wait_for(lambda: out_of_space_retries() >= retries_before + 2, "commits failing for want of space", 30)
        pipeline.stop(drain=False)  # what SIGTERM does: the wait for space ends, the run returns
        running.join(timeout=30)
        assert not running.is_alive() and failures == []
        assert DeltaTable(settings.table_uri("events")).version() == 0  # nothing committed, nothing half-done

        # the next run starts on the still-full disk, waits, and commits what the stopped one could not
        retries_before = out_of_space_retries()
        draining = threading.Thread(target=Pipeline(settings, log).run, kwargs={"until_idle": True})
        draining.start()
        wait_for(lambda: out_of_space_retries() >= retries_before + 2, "the restarted run waiting for space", 30)
        (small_disk / "ballast").unlink()
        draining.join(timeout=60)
        assert not draining.is_alive()
    finally:
        log.close()
    assert table_ids(Path(settings.table_uri("events"))) == Counter({f"e-{i}": 1 for i in range(100)})
    hourly = DeltaTable(settings.table_uri("kpi_events_hourly")).to_pyarrow_table(columns=["events"])
    assert sum(hourly["events"].to_pylist()) == 100

"""Tables on object storage (`--tables s3://bucket/prefix`): every command, against a real S3-compatible server
(moto's, in its own process; SeaweedFS for a server that is killed and restarted), configured only by the
standard AWS environment."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from collector_server import ServeProcess
from conftest import gamestream, write_ndjson
from gamestream.demo.generator import simulate
from s3_store import BUCKET, MotoServer, OverwritingStore, Relay, SeaweedServer, aws_environment


@pytest.fixture(scope="module")
def moto():
    server = MotoServer()
    yield server
    server.stop()


@pytest.fixture
def s3(moto, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest):
    """A fresh prefix in the bucket, and this process's AWS environment pointing at the server (so the test reads
    the tables as any other reader would)."""
    for name, value in aws_environment(moto.endpoint).items():
        monkeypatch.setenv(name, value)
    return f"s3://{BUCKET}/{request.node.name[:60]}"


@pytest.fixture
def seaweed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """SeaweedFS on its own ports and data under the test's directory, this process's AWS environment pointing
    at it; stopped (its process group killed) whatever the test does."""
    server = SeaweedServer(tmp_path / "seaweedfs")
    try:
        for name, value in aws_environment(server.endpoint).items():
            monkeypatch.setenv(name, value)
        yield server
    finally:
        server.stop()


def _run(*args: str, data_dir: Path, tables: str, endpoint: str, check: bool = True, timeout: float = 300):
    return gamestream(*args, "--tables", tables, data_dir=data_dir, check=check, timeout=timeout,
                      env=aws_environment(endpoint))


def _events_file(path: Path, count: int, seed: int = 5) -> tuple[Path, list[dict]]:
    events = list(simulate(events=count, users=300, seed=seed, days=1))
    nulls = [{"eventName": "levelEnd", "eventId": f"null-{i}", "eventTime": None,
              "eventParams": {"device_id": f"dev-{i}"}} for i in range(5)]
    write_ndjson(path, events + nulls)
    return path, events


def _stored_ids(uri: str) -> Counter:
    from gamestream.tables import lake

    return Counter(lake.open_table(uri).to_pyarrow_table(columns=["eventId"]).column("eventId").to_pylist())


def test_pipeline_on_s3_commits_every_event_once_and_serves_kpis_sql_status_and_maintenance(
        tmp_path: Path, moto, s3: str) -> None:
    from gamestream.tables import lake

    data = tmp_path / "data"
    path, events = _events_file(tmp_path / "events.ndjson", 4000)
    gamestream("load", str(path), "--chunk-lines", "5000", data_dir=data)
    _run("process", "--until-idle", "--max-batch-events", "1000", data_dir=data, tables=s3, endpoint=moto.endpoint)

    assert not (data / "tables").exists(), "nothing of the tables may land in the data directory"
    stored = _stored_ids(f"{s3}/events")
    assert set(stored) == {e["eventId"] for e in events} and max(stored.values()) == 1
    quarantined = lake.open_table(f"{s3}/events_quarantine").to_pyarrow_table().num_rows
    assert quarantined == 5
    for kpi in ("kpi_events_hourly", "kpi_bookings_hourly", "kpi_daily"):
        assert lake.table_exists(f"{s3}/{kpi}"), kpi
    hourly = lake.open_table(f"{s3}/kpi_events_hourly").to_pyarrow_table().to_pylist()
    assert sum(row["events"] for row in hourly) == len(events)

    counted = _run("sql", "SELECT count(*) AS n FROM events", "--format", "json", data_dir=data, tables=s3,
                   endpoint=moto.endpoint)
    assert json.loads(counted.stdout) == [{"n": len(events)}]
    status = _run("status", data_dir=data, tables=s3, endpoint=moto.endpoint)
    assert s3 in status.stdout and "events_quarantine" in status.stdout

    # the SQL forms name the table by its location on the store; OPTIMIZE compacts, VACUUM lists on S3 too
    before = lake.open_table(f"{s3}/events").version()
    _run("sql", f"OPTIMIZE '{s3}/events'", data_dir=data, tables=s3, endpoint=moto.endpoint)
    assert lake.open_table(f"{s3}/events").version() > before
    assert _stored_ids(f"{s3}/events") == stored
    swept = _run("sql", f"VACUUM '{s3}/events' RETAIN 168 HOURS DRY RUN", "--format", "json", data_dir=data,
                 tables=s3, endpoint=moto.endpoint)
    assert json.loads(swept.stdout) == []
    refused = _run("sql", f"OPTIMIZE 's3://{BUCKET}/elsewhere/events'", data_dir=data, tables=s3,
                   endpoint=moto.endpoint, check=False)
    assert refused.returncode == 2 and "not one of this data directory's tables" in refused.stderr

    # the collector's dashboard and SQL read the same tables on the store
    server = ServeProcess(data, "--tables", s3, env=aws_environment(moto.endpoint))
    try:
        board = httpx.get(server.url + "/v1/dashboard", timeout=60).json()
        assert sum(row["events"] for row in board["hourly"]) == len(events)
        assert board["quarantine"]["count"] == 5
        assert board["tables"]["events"]["files"] >= 1
        answer = httpx.post(server.url + "/v1/sql", json={"query": "SELECT count(DISTINCT eventId) AS n FROM events"},
                            timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"columns": ["n"], "rows": [[len(events)]]}
    finally:
        server.stop()


def test_store_that_accepts_an_overwrite_is_refused_at_start_unless_unsafe(tmp_path: Path) -> None:
    store = OverwritingStore()
    try:
        data = tmp_path / "data"
        env = aws_environment(store.endpoint)
        refused = gamestream("process", "--until-idle", "--tables", f"s3://{BUCKET}/t", data_dir=data,
                             check=False, env=env, timeout=60)
        assert refused.returncode == 2, refused.stderr
        assert "If-None-Match" in refused.stderr and "--unsafe-no-conditional-writes" in refused.stderr
        # with the flag the probe's verdict is only a warning; what fails next is this fake store's lack of
        # everything else, not the probe
        unsafe = gamestream("optimize", "--tables", f"s3://{BUCKET}/t", "--unsafe-no-conditional-writes",
                            data_dir=data, check=False, env=env, timeout=120)
        assert "conditional-write probe" in unsafe.stderr
        assert "accepted a second PUT" not in unsafe.stderr
    finally:
        store.stop()


def test_conditional_write_probe_passes_on_the_s3_server_and_leaves_no_key(moto, s3: str) -> None:
    from gamestream.tables import lake

    lake.check_conditional_writes(s3)
    assert moto.keys(s3.removeprefix(f"s3://{BUCKET}/")) == []


# 4 kills per processor (8 in all) land in every phase of a run, as 20 did; the events are enough for each pair of
# partitions to outlast its kills (a run killed within 0.3 s of starting commits a batch or two of 200) and leave
# most of the drain to the last runs, which commit beside each other
KILLS_PER_PROCESSOR = 4


@pytest.mark.slow
def test_two_processors_on_disjoint_partitions_killed_8_times_commit_each_event_once_on_s3(
        tmp_path: Path, moto, s3: str) -> None:
    rng = random.Random(20261130)
    data = tmp_path / "data"
    path, events = _events_file(tmp_path / "events.ndjson", 20_000, seed=11)
    # small records (~250 events): each run killed within 0.3 s of starting makes at most a commit or two
    gamestream("load", str(path), "--partitions", "4", "--chunk-lines", "1000", data_dir=data)
    env = {**os.environ, **aws_environment(moto.endpoint)}

    def command(only: str) -> list[str]:
        return [sys.executable, "-m", "gamestream", "process", "--until-idle", "--no-kpi", "--only", only,
                "--tables", s3, "--data-dir", str(data), "--max-batch-events", "200", "--max-batch-wait", "0.05"]

    kills = Counter()

    def kill_loop(only: str) -> None:
        # each pair of partitions is drained by runs killed at random moments while the other pair's runs
        # commit to the same table
        while kills[only] < KILLS_PER_PROCESSOR:
            child = subprocess.Popen(command(only), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env=env)
            child.stderr.readline()  # "processing partitions …": the tables are open, draining starts now
            time.sleep(rng.uniform(0.05, 0.3))
            if child.poll() is None:
                os.kill(child.pid, signal.SIGKILL)
                kills[only] += 1
            child.wait()
            child.stderr.close()
            if child.returncode == 0:
                return  # drained before the kill: the kills so far are what this pair got

    threads = [threading.Thread(target=kill_loop, args=(only,)) for only in ("0,1", "2,3")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(kills.values()) >= 2 * KILLS_PER_PROCESSOR, f"drained after only {kills}; use more events"
    finals = [subprocess.Popen(command(only), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env=env) for only in ("0,1", "2,3")]
    for final in finals:
        _, err = final.communicate(timeout=240)
        assert final.returncode == 0, err
    stored = _stored_ids(f"{s3}/events")
    duplicates = {event_id: n for event_id, n in stored.items() if n > 1}
    assert not duplicates, f"{len(duplicates)} events written twice"
    assert set(stored) == {e["eventId"] for e in events}


@pytest.mark.slow
def test_optimize_and_vacuum_while_processors_write_to_s3_keep_every_event_once(
        tmp_path: Path, moto, s3: str) -> None:
    data = tmp_path / "data"
    path, events = _events_file(tmp_path / "events.ndjson", 20_000, seed=13)
    gamestream("load", str(path), "--partitions", "4", "--chunk-lines", "5000", data_dir=data)  # many records
    env = {**os.environ, **aws_environment(moto.endpoint)}
    processors = [subprocess.Popen(
        [sys.executable, "-m", "gamestream", "process", "--until-idle", "--no-kpi", "--only", only, "--tables", s3,
         "--data-dir", str(data), "--max-batch-events", "200", "--max-batch-wait", "0.05"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env) for only in ("0,1", "2,3")]
    for child in processors:
        child.stderr.readline()
    time.sleep(1.0)  # the table exists and grows
    compactions = 0
    while any(child.poll() is None for child in processors) or compactions < 2:
        _run("optimize", data_dir=data, tables=s3, endpoint=moto.endpoint)
        _run("vacuum", "--retain", "0h", "--force", data_dir=data, tables=s3, endpoint=moto.endpoint)
        compactions += 1
    for child in processors:
        _, err = child.communicate(timeout=240)
        assert child.returncode == 0, err
    stored = _stored_ids(f"{s3}/events")
    assert max(stored.values()) == 1 and set(stored) == {e["eventId"] for e in events}
    from gamestream.tables import lake

    history = [c.get("operation") for c in lake.open_table(f"{s3}/events").history()]
    assert "OPTIMIZE" in history and "VACUUM END" in history


@pytest.mark.slow
def test_store_unreachable_mid_load_the_processor_retries_and_loses_nothing(tmp_path: Path, moto, s3: str) -> None:
    relay = Relay(moto.port)
    data = tmp_path / "data"
    path, events = _events_file(tmp_path / "events.ndjson", 20_000, seed=17)
    gamestream("load", str(path), "--chunk-lines", "5000", data_dir=data)
    env = {**os.environ, **aws_environment(relay.endpoint)}
    child = subprocess.Popen(
        [sys.executable, "-m", "gamestream", "process", "--until-idle", "--tables", s3, "--data-dir", str(data),
         "--max-batch-events", "500", "--max-batch-wait", "0.05"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    started = threading.Event()

    def read_stderr() -> None:
        for line in child.stderr:
            lines.append(line)
            if "processing partitions" in line:
                started.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        assert started.wait(60), "".join(lines)
        time.sleep(0.8)
        relay.cut()
        # held until a commit has failed past object_store's own retries and ours have taken over (how long that
        # takes depends on where the processor was when the store went away)
        deadline = time.monotonic() + 90
        while not any("object store unreachable" in line for line in lines) and time.monotonic() < deadline:
            assert child.poll() is None, "the processor exited while the store was unreachable:\n" + "".join(lines)
            time.sleep(0.2)
        time.sleep(1.0)  # a few more of our retries fail meanwhile
        assert child.poll() is None, "the processor gave up while the store was unreachable:\n" + "".join(lines)
        relay.restore()
        child.wait(timeout=240)
        reader.join(10)
    finally:
        relay.cut()
        if child.poll() is None:
            child.kill()
    err = "".join(lines)
    assert child.returncode == 0, err
    assert "object store unreachable" in err
    stored = _stored_ids(f"{s3}/events")
    assert max(stored.values()) == 1 and set(stored) == {e["eventId"] for e in events}


@pytest.mark.slow
def test_store_server_killed_and_restarted_mid_load_the_processor_retries_and_loses_nothing(
        tmp_path: Path, seaweed: SeaweedServer, request: pytest.FixtureRequest) -> None:
    # the server itself goes away (SIGKILL: no goodbye to its clients, whatever it had in flight lost) and comes
    # back on the same data directory; unlike the relay test above, the store's own state survives only as it
    # was on disk
    prefix = request.node.name[:60]
    s3 = f"s3://{BUCKET}/{prefix}"
    data = tmp_path / "data"
    path, events = _events_file(tmp_path / "events.ndjson", 20_000, seed=19)
    gamestream("load", str(path), "--chunk-lines", "5000", data_dir=data)
    env = {**os.environ, **aws_environment(seaweed.endpoint)}
    child = subprocess.Popen(
        [sys.executable, "-m", "gamestream", "process", "--until-idle", "--tables", s3, "--data-dir", str(data),
         "--max-batch-events", "500", "--max-batch-wait", "0.05"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    started = threading.Event()

    def read_stderr() -> None:
        for line in child.stderr:
            lines.append(line)
            if "processing partitions" in line:
                started.set()
        started.set()  # the processor exited: no point waiting

    def events_versions() -> list[int]:
        return [int(m.group(1)) for key in seaweed.keys(f"{prefix}/events/_delta_log/")
                if (m := re.search(r"/(\d{20})\.json$", key))]

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        started.wait(60)
        assert any("processing partitions" in line for line in lines), \
            f"the processor did not start (exit status {child.poll()}):\n" + "".join(lines)
        deadline = time.monotonic() + 60
        while max(events_versions(), default=0) < 1:  # version 0 creates the table; 1 is a first batch of events
            assert child.poll() is None, "the processor exited before a commit landed:\n" + "".join(lines)
            assert time.monotonic() < deadline, "no commit of events in 60 s:\n" + "".join(lines)
            time.sleep(0.05)
        committed_before = max(events_versions())
        assert seaweed.kill() == -signal.SIGKILL
        with pytest.raises(ConnectionRefusedError):  # nothing answers on the server's port any more
            socket.create_connection(("127.0.0.1", seaweed.port), timeout=5).close()
        # held down until a commit has failed past object_store's own retries and ours have taken over
        deadline = time.monotonic() + 90
        while not any("object store unreachable" in line for line in lines) and time.monotonic() < deadline:
            assert child.poll() is None, "the processor exited while the store was down:\n" + "".join(lines)
            time.sleep(0.2)
        assert any("object store unreachable" in line for line in lines), \
            "the processor never hit the outage in 90 s:\n" + "".join(lines)
        time.sleep(3.0)  # more of our retries fail meanwhile (each waits out object_store's own, ~2 s here)
        assert child.poll() is None, "the processor gave up while the store was down:\n" + "".join(lines)
        assert not seaweed.running
        seaweed.restart()
        child.wait(timeout=240)
        reader.join(10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    err = "".join(lines)
    assert child.returncode == 0, err
    assert "object store unreachable" in err and "commit made after the object store was unreachable" in err, err
    assert committed_before < max(events_versions()), "nothing was committed after the restart"
    stored = _stored_ids(f"{s3}/events")
    assert max(stored.values()) == 1 and set(stored) == {e["eventId"] for e in events}


def test_maintenance_lock_is_one_nats_lease_across_machines_when_tables_are_on_s3(tmp_path: Path) -> None:
    """Two processes with their own data directories (two machines) and tables on object storage: the
    maintenance lock is the NATS lease, so only one holds it; a flock would have let both in."""
    from gamestream.tables.maintenance import MaintenanceLock
    from gamestream.demo.nats_cluster import NatsCluster
    from gamestream.settings import Settings

    cluster = NatsCluster(tmp_path / "nats", nodes=1).start()
    try:
        machines = [Settings(data_dir=tmp_path / f"machine{i}", log=cluster.url, tables_uri=f"s3://{BUCKET}/lake",
                             lease_ttl_s=2) for i in (1, 2)]
        first, second = (MaintenanceLock(s) for s in machines)
        assert first.uses_lease and second.uses_lease
        held = first.acquire(wait=False)
        assert held is not None
        assert second.acquire(wait=False) is None, "a second machine got the maintenance lock while it was held"
        held.close()
        deadline = time.monotonic() + 10
        again = None
        while again is None and time.monotonic() < deadline:
            again = second.acquire(wait=False)
            time.sleep(0.2)
        assert again is not None, "the lock was not free after its holder released it"
        again.close()
        # local tables: each machine's flock, which is what one machine needs
        local = [MaintenanceLock(Settings(data_dir=tmp_path / f"machine{i}", log=cluster.url)) for i in (1, 2)]
        assert not local[0].uses_lease
        handles = [lock.acquire(wait=False) for lock in local]
        assert all(handles)
        for handle in handles:
            handle.close()
    finally:
        cluster.stop()

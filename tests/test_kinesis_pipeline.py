"""The pipeline on a Kinesis stream (`--log kinesis://STREAM`), against moto's Kinesis server patched to behave as
Kinesis documents (tests/test_log_kinesis.py): records put exactly as the seed's Lambda puts them, next to
gamestream's own, land once with 56-digit sequence numbers as positions; SIGKILLs of the processor lose and
duplicate nothing; a split and a merge while the processor runs keep every event once and each device's events
in parent-before-child order."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from unittest import mock

import pyarrow as pa
import pytest

from conftest import gamestream, table_rows, write_ndjson
from gamestream.tables import lake
from gamestream.log import Append
from gamestream.log.kinesis import KinesisEventLog
from s3_store import aws_environment
from test_envelope import game_event, lambda_context, seed_handler, v1_event, v2_event
from test_log_kinesis import KinesisServer, fresh_stream


@pytest.fixture(scope="module")
def kinesis():
    server = KinesisServer()
    yield server
    server.stop()


@pytest.fixture
def env(kinesis: KinesisServer):
    """The standard AWS environment pointing at the server, for this process and the CLI's."""
    environment = aws_environment(kinesis.endpoint)
    with mock.patch.dict(os.environ, environment):
        yield environment


def _ids(data: Path) -> Counter:
    return Counter(r["eventId"] for r in table_rows(str(data / "tables" / "events"), ["eventId"]))


def _ndjson(events: list[dict]) -> bytes:
    return b"\n".join(json.dumps(e, separators=(",", ":")).encode() for e in events)


def _event(device: str, event_id: str) -> dict:
    return {"eventId": event_id, "eventName": "levelStart", "eventTime": "2026-11-01T10:00:00Z",
            "eventParams": {"device_id": device}}


def test_seed_lambda_records_and_gamestreams_own_land_once_and_a_rerun_writes_nothing(
        env: dict, tmp_path: Path) -> None:
    stream = "streamdemo_incoming"  # the seed's handler names its stream in its code
    log = KinesisEventLog.connect(f"kinesis://{stream}", partitions=2)
    handler = seed_handler()
    stamped = {}
    for i in range(30):
        make = v1_event if i % 2 else v2_event
        before = int(time.time())
        handler(make(json.dumps(game_event(f"seed-{i}"))), lambda_context())
        stamped[f"seed-{i}"] = (before, int(time.time()))
    own = [_event(f"dev-{i % 7}", f"own-{i}") for i in range(200)]
    data = tmp_path / "data"
    events_file = write_ndjson(tmp_path / "own.ndjson", own)
    gamestream("load", str(events_file), "--log", f"kinesis://{stream}", data_dir=data)
    log.close()

    gamestream("process", "--until-idle", "--log", f"kinesis://{stream}", data_dir=data)
    rows = table_rows(str(data / "tables" / "events"))
    ids = Counter(r["eventId"] for r in rows)
    seed_rows = [r for r in rows if r["eventId"].startswith("kinesis-")]
    assert max(ids.values()) == 1 and len(seed_rows) == 30
    assert {r["eventId"] for r in rows} - {r["eventId"] for r in seed_rows} == {e["eventId"] for e in own}
    for row in seed_rows:
        shard, sequence = row["eventId"].split("-")[1:3]
        assert len(sequence) >= 56  # the id carries the 56-digit sequence number it came from
        low, high = stamped[row["eventParams"]["device_id"]]
        assert low <= row["eventTime"].timestamp() <= high  # the seed's int(time.time())
    # the positions are counters with the sequence number in the same commit
    events = lake.open_table(str(data / "tables" / "events"))
    positions = lake.TxnPositions(counted=True).offsets(events, [lake.txn_app_id("gamestream", p) for p in (0, 1)])
    assert all(len(str(offset)) >= 56 for offset in positions.values())

    version = events.version()
    rerun = gamestream("process", "--until-idle", "--log", f"kinesis://{stream}", data_dir=data)
    assert "committed 0 events" in rerun.stdout
    assert lake.open_table(str(data / "tables" / "events")).version() == version


# each run is killed a random moment after a commit of its own: 6 such kills interrupt the drain as 10 did, and
# the 600 records of 10 events (batches of 10) outlast them many times over
KILLS = 6


@pytest.mark.slow
def test_sigkill_of_the_processor_while_it_drains_a_stream_loses_and_duplicates_nothing(
        env: dict, tmp_path: Path) -> None:
    stream = fresh_stream()
    log = KinesisEventLog.connect(f"kinesis://{stream}", partitions=2)
    expected = set()
    for r in range(600):  # 600 records of 10 events, spread over both shards by device
        device = f"dev-{r % 11}"
        events = [_event(device, f"e-{r}-{k}") for k in range(10)]
        expected |= {e["eventId"] for e in events}
        log.append([Append(log.route(device), _ndjson(events), len(events))])
    log.close()
    data = tmp_path / "data"
    command = [sys.executable, "-m", "gamestream", "process", "--until-idle", "--log", f"kinesis://{stream}",
               "--data-dir", str(data), "--max-batch-events", "10", "--max-batch-wait", "0.05"]
    rng = random.Random(7)
    kills = landed = 0
    version = -1
    while kills < KILLS:
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 env={**os.environ, **env})
        # the kill lands at a random moment after this run's first commit: on a busy machine (the suite runs files
        # in parallel) a fixed delay can end a run before it has even imported its modules
        _wait_for_a_commit_after(data / "tables" / "events", version, child, timeout=60)
        time.sleep(rng.uniform(0.0, 0.8))
        if child.poll() is not None:
            break  # drained before this kill: the remaining rounds have nothing to interrupt
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
        kills += 1
        if lake.table_exists(str(data / "tables" / "events")):
            now = lake.open_table(str(data / "tables" / "events")).version()
            landed += now > version
            version = now
    assert kills >= KILLS, f"the stream drained after only {kills} kills: make it longer"
    assert landed >= 3, f"only {landed} of {kills} runs committed anything before their kill"
    gamestream("process", "--until-idle", "--log", f"kinesis://{stream}", data_dir=data)
    ids = _ids(data)
    assert max(ids.values()) == 1 and set(ids) == expected


def _wait_for_a_commit_after(events: Path, version: int, child: subprocess.Popen, *, timeout: float) -> None:
    """Returns once the events table has a version above `version` (or the child has exited)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and child.poll() is None:
        if lake.table_exists(str(events)) and lake.open_table(str(events)).version() > version:
            return
        time.sleep(0.05)


@pytest.mark.slow
def test_a_split_and_a_merge_while_the_processor_runs_keep_every_event_once_parents_first(
        env: dict, tmp_path: Path, kinesis: KinesisServer) -> None:
    stream = fresh_stream()
    log = KinesisEventLog.connect(f"kinesis://{stream}", partitions=2)
    devices = [f"dev-{i}" for i in range(24)]
    phase_of: dict[str, int] = {}
    counter = defaultdict(int)

    def put(phase: int, rounds: int) -> None:
        for _ in range(rounds):
            for device in devices:
                ids = [f"{device}-{counter[device] + k}" for k in range(5)]
                counter[device] += 5
                phase_of.update({i: phase for i in ids})
                log.append([Append(log.route(device), _ndjson([_event(device, i) for i in ids]), 5)])

    data = tmp_path / "data"
    # a processor runs while phase 0 is put, then stops; the stream is resharded with the processor away, so
    # at its restart parents and children all hold unread records: only the parent-first rule orders them
    child = subprocess.Popen([sys.executable, "-m", "gamestream", "process", "--log", f"kinesis://{stream}",
                              "--data-dir", str(data), "--max-batch-wait", "0.1"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, **env})
    try:
        put(0, 1)
        deadline = time.monotonic() + 60
        while not (lake.table_exists(str(data / "tables" / "events")) and sum(_ids(data).values()) == len(phase_of)):
            assert time.monotonic() < deadline and child.poll() is None, "phase 0 was not committed"
            time.sleep(0.3)
    finally:
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=60) == 0, child.stderr.read()
    try:
        put(1, 2)
        shards = {s["ShardId"]: s for s in kinesis.client.list_shards(StreamName=stream)["Shards"]}
        first = shards["shardId-000000000000"]["HashKeyRange"]
        middle = (int(first["StartingHashKey"]) + int(first["EndingHashKey"])) // 2
        kinesis.client.split_shard(StreamName=stream, ShardToSplit="shardId-000000000000",
                                   NewStartingHashKey=str(middle))
        time.sleep(6)  # the log's shard list is cached for a few seconds
        assert log.parents(2) == [0] and log.parents(3) == [0] and log.is_closed(0)
        put(2, 2)
        kinesis.client.merge_shards(StreamName=stream, ShardToMerge="shardId-000000000003",
                                    AdjacentShardToMerge="shardId-000000000001")
        time.sleep(6)
        assert sorted(log.parents(4)) == [1, 3] and log.is_closed(1) and log.is_closed(3)
        put(3, 2)
    finally:
        log.close()
    moved = {d for d in devices if len({log.route(d)} | {0, 1}) > 2}
    assert moved, "no device moved to a child shard: the reshard proves nothing"
    # the children's processor starts first: it must wait for the parents, which another processor drains
    children = subprocess.Popen([sys.executable, "-m", "gamestream", "process", "--log", f"kinesis://{stream}",
                                 "--data-dir", str(data), "--only", "2,3,4", "--max-batch-wait", "0.1"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, **env})
    try:
        time.sleep(8)
        assert children.poll() is None, children.stderr.read()
        early = set(_ids(data)) - {i for i, phase in phase_of.items() if phase == 0}
        assert not early, f"children read before their parents were drained: {sorted(early)[:5]}"
        gamestream("process", "--until-idle", "--log", f"kinesis://{stream}", "--only", "0,1",
                   "--max-batch-events", "60", "--no-kpi", data_dir=data)
        deadline = time.monotonic() + 90
        while sum(_ids(data).values()) < len(phase_of):
            assert time.monotonic() < deadline and children.poll() is None, "the children were never processed"
            time.sleep(0.3)
    finally:
        children.send_signal(signal.SIGTERM)
        children.wait(timeout=60)
    ids = _ids(data)
    assert max(ids.values()) == 1 and set(ids) == set(phase_of), "events lost or duplicated across the reshard"
    # each device's events of one phase committed no later than those of the next (parents before children)
    events = lake.open_table(str(data / "tables" / "events"))
    changes = pa.table(events.load_cdf(starting_version=0, columns=['"eventId"', "_change_type", "_commit_version"]
                                       ).read_all()).to_pylist()
    version_of = {c["eventId"]: c["_commit_version"] for c in changes if c["_change_type"] == "insert"}
    for device in devices:
        by_phase = defaultdict(list)
        for event_id, phase in phase_of.items():
            if event_id.rsplit("-", 1)[0] == device:
                by_phase[phase].append(version_of[event_id])
        for phase in (1, 2):
            assert max(by_phase[phase]) <= min(by_phase[phase + 1]), (device, phase, dict(by_phase))


def test_kpis_on_the_seed_lambdas_random_partition_keys_with_two_processors_are_exact(
        env: dict, tmp_path: Path) -> None:
    """The seed's Lambda puts with `PartitionKey = str(random.randint(1,100))`: a device's events spread over
    every shard. Two processors, one shard each, and the KPI stage: every KPI equals the plain-Python answer
    over the events the table holds, and the watermark's record names both shards."""
    from kpi_reference import daily_and_cohorts
    from test_envelope import SEED_HANDLER, SEED_STREAM

    stream = fresh_stream()
    KinesisEventLog.connect(f"kinesis://{stream}", partitions=2).close()
    namespace: dict = {}
    exec(compile(SEED_HANDLER.replace(SEED_STREAM, stream), "seed_lambda.py", "exec"), namespace)
    handler = namespace["lambda_handler"]
    rng = random.Random(11)
    for i in range(240):
        device = f"dev-{i % 12}"
        body = (game_event(device) if i % 5 else
                {"eventName": "purchaseEvent", "eventParams": {"device_id": device, "amount": rng.choice([0.99, 4.99])}})
        handler(v2_event(json.dumps(body)), lambda_context())

    data = tmp_path / "data"
    processors = [subprocess.Popen([sys.executable, "-m", "gamestream", "process", "--until-idle", "--log",
                                    f"kinesis://{stream}", "--data-dir", str(data), "--only", only,
                                    "--max-batch-events", "50"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                   env={**os.environ, **env}) for only in ("0", "1")]
    for child in processors:
        assert child.wait(timeout=120) == 0, child.stderr.read()
    # the KPI role is one process's: a last run folds what the other committed after the holder's final fold
    gamestream("process", "--until-idle", "--log", f"kinesis://{stream}", data_dir=data)

    rows = table_rows(str(data / "tables" / "events"))
    assert len(rows) == len({r["eventId"] for r in rows}) == 240
    shards = defaultdict(set)
    for row in rows:
        shards[row["eventParams"]["device_id"]].add(row["eventId"].split("-")[1])
    assert all(len(s) == 2 for s in shards.values()), "random keys did not spread each device over both shards"
    recorded = {p for c in lake.open_table(str(data / "tables" / "events")).history()
                for p in (lake.greatest_times_of(c) or {})}
    assert recorded == {0, 1}

    events = [{"eventTime": r["eventTime"].isoformat(), "eventName": r["eventName"],
               "eventParams": {"device_id": r["eventParams"]["device_id"], "amount": r["eventParams"]["amount"]}}
              for r in rows]
    want_daily, want_cohorts, want_names = daily_and_cohorts(events)

    def rounded(table: str, key: str) -> dict:
        return {r.pop(key): {k: round(v, 6) if isinstance(v, float) else v for k, v in r.items()}
                for r in table_rows(str(data / "tables" / table))}

    want = {day: {k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()}
            for day, row in want_daily.items()}
    assert rounded("kpi_daily", "eventDate") == want
    assert rounded("kpi_retention", "cohort_day") == {c: {k: round(v, 6) if isinstance(v, float) else v
                                                          for k, v in row.items()} for c, row in want_cohorts.items()}
    assert sum(r["events"] for r in table_rows(str(data / "tables" / "kpi_events_hourly"))) == 240
    assert sum(r["purchases"] for r in table_rows(str(data / "tables" / "kpi_bookings_hourly"))) == 48


def _seed_events_sent_again_on_random_keys(env: dict, tmp_path: Path, change) -> tuple[Path, list, set[str], str]:
    """The seed's envelopes (`{"body": {...}}`) put with random partition keys, as its Lambda puts them, each
    event carrying its own eventId; then a third of them put again — `change(body)` of them — with new random keys.
    About half land on another shard than their original. Two processors, one shard each, committing at once in
    batches of 20 (so their commits race): (the data directory, each processor's (stdout, stderr), the eventIds
    sent twice, the stream)."""
    import boto3

    stream = fresh_stream()
    KinesisEventLog.connect(f"kinesis://{stream}", partitions=2).close()
    client = boto3.client("kinesis")
    rng = random.Random(23)

    def put(body: dict) -> str:
        envelope = v2_event(json.dumps(body))
        envelope["body"] = body  # what the seed's handler puts: the parsed body inside the request's envelope
        answer = client.put_record(StreamName=stream, Data=json.dumps(envelope),
                                   PartitionKey=str(rng.randint(1, 100)))
        return answer["ShardId"]

    originals = [{"eventId": f"evt-{i:04d}", "eventName": "purchaseEvent" if i % 4 == 0 else "levelStart",
                  "eventTime": 1793750400 + i,
                  "eventParams": {"device_id": f"dev-{i % 9}", **({"amount": 4.99} if i % 4 == 0 else {})}}
                 for i in range(300)]
    shard_of = {body["eventId"]: put(body) for body in originals}
    again = rng.sample(originals, 100)
    crossed = sum(put(change(body)) != shard_of[body["eventId"]] for body in again)
    assert crossed >= 20, "too few events sent again landed on another shard than their original to test anything"

    data = tmp_path / "data"
    processors = [subprocess.Popen([sys.executable, "-m", "gamestream", "process", "--until-idle", "--no-kpi",
                                    "--log", f"kinesis://{stream}", "--data-dir", str(data), "--only", only,
                                    "--max-batch-events", "20"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env={**os.environ, **env}) for only in ("0", "1")]
    outputs = [child.communicate(timeout=180) for child in processors]
    for child, (_, err) in zip(processors, outputs):
        assert child.returncode == 0, err
    assert all("committed" in out for out, _ in outputs), outputs  # both processors worked
    return data, outputs, {body["eventId"] for body in again}, stream


def test_copies_under_the_seed_lambdas_random_partition_keys_land_once_with_two_processors(
        env: dict, tmp_path: Path) -> None:
    """An SDK's retry after a lost answer, on the seed's random partition keys: a copy lands on another shard
    than its original about half the time, where a state per partition would let it in. Every event is stored
    once, the copies are counted, and the ones that crossed shards are among them."""
    data, outputs, _, stream = _seed_events_sent_again_on_random_keys(env, tmp_path, lambda body: body)
    ids = _ids(data)
    assert len(ids) == 300 and set(ids.values()) == {1}, ids.most_common(3)
    assert table_rows(str(data / "tables" / "events_quarantine")) == []
    dropped = sum(int(n.replace(",", "")) for out, _ in outputs
                  for n in re.findall(r"duplicates dropped ([\d,]+);", out))
    assert dropped == 100
    status = gamestream("status", "--log", f"kinesis://{stream}", data_dir=data).stdout
    assert "duplicates dropped: 100 copies" in status


def test_eventids_reused_with_another_payload_on_random_partition_keys_are_each_quarantined_once(
        env: dict, tmp_path: Path) -> None:
    """The same, but what is sent again has another payload under the same eventId (a buggy client reusing ids).
    The two processors' commits race, so a reuse is often committed by one processor between the other's
    quarantine and events commits: the events commit, retried, judges again and keeps the reuse out — and it
    must still reach the quarantine (it was once lost there: in neither table). Each eventId is in the events table once, and
    each reuse is in the quarantine once, with its reason; nothing counts as a copy."""
    def changed(body: dict) -> dict:
        return {**body, "eventName": "levelEnd", "eventParams": {**body["eventParams"], "score": 7}}

    data, outputs, reused, _ = _seed_events_sent_again_on_random_keys(env, tmp_path, changed)
    ids = _ids(data)
    assert len(ids) == 300 and set(ids.values()) == {1}, ids.most_common(3)
    quarantined = table_rows(str(data / "tables" / "events_quarantine"))
    assert {row["reason"] for row in quarantined} == {"duplicate eventId with a different payload"}
    by_id = Counter(json.loads(row["payload"])["eventId"] for row in quarantined)
    assert set(by_id) == reused and set(by_id.values()) == {1}, (len(by_id), by_id.most_common(3))
    dropped = sum(int(n.replace(",", "")) for out, _ in outputs
                  for n in re.findall(r"duplicates dropped ([\d,]+);", out))
    assert dropped == 0

"""Exactly once by event identity (process/identity.py): an eventId lands once however often it arrives — `load`
run twice, a mobile SDK's retry re-batched under new Idempotency-Keys, a week-old queue flushed again, HTTP and
`load` mixed, the processor killed between its events commit and its `event_ids` commit — and the same eventId
with another payload is quarantined with the reason, the first kept. Real collector, real processor, real tables."""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa

from collector_server import ServeProcess
from conftest import gamestream, table_rows, write_ndjson
from gamestream.demo.generator import simulate
from gamestream.process import identity
from gamestream.settings import Settings
from test_kpi import expected_kpis, kpi_tables, rounded_rows

UTC = dt.timezone.utc
NDJSON = {"Content-Type": "application/x-ndjson"}


def iso(moment: dt.datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def purchases(count: int, *, seed: int, when: dt.datetime) -> list[dict]:
    rng = random.Random(seed)
    return [{"eventId": str(uuid.UUID(int=rng.getrandbits(128), version=4)), "eventName": "purchaseEvent",
             "eventTime": iso(when + dt.timedelta(seconds=i)),
             "eventParams": {"device_id": f"device-{rng.randrange(60)}", "amount": round(rng.uniform(0.5, 3), 2)}}
            for i in range(count)]


def post(url: str, events: list[dict], key: str) -> None:
    answer = httpx.post(url + "/v1/events", content=b"\n".join(json.dumps(e).encode() for e in events),
                        headers={**NDJSON, "Idempotency-Key": key}, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json()["accepted"] == len(events), answer.text


def events_by_id(data: Path) -> Counter:
    return Counter(row["eventId"] for row in table_rows(data / "tables" / "events", ["eventId"]))


def bookings(data: Path) -> float:
    return round(sum(r["eventParams"]["amount"] or 0 for r in table_rows(data / "tables" / "events",
                                                                         ["eventParams"])), 2)


def test_load_twice_sdk_retries_rebatched_under_new_keys_and_a_week_old_queue_land_each_event_once(
        tmp_path: Path) -> None:
    """The issue's measurement: the same 2,000-event file loaded twice, 300 events posted as two requests and
    again as three with new Idempotency-Keys, then 40 of the first events sent again a week later (by their
    eventTime) over HTTP: 2,300 rows, bookings counted once, every copy dropped and counted."""
    data = tmp_path / "data"
    week_ago = dt.datetime.now(UTC) - dt.timedelta(days=7)
    first = purchases(2000, seed=1, when=week_ago)
    write_ndjson(tmp_path / "first.ndjson", first)
    gamestream("load", str(tmp_path / "first.ndjson"), data_dir=data)
    gamestream("load", str(tmp_path / "first.ndjson"), data_dir=data)
    server = ServeProcess(data)
    try:
        live = purchases(300, seed=2, when=dt.datetime.now(UTC) - dt.timedelta(minutes=10))
        post(server.url, live[:150], "a")
        post(server.url, live[150:], "b")
        post(server.url, live[:100], "retry-1")  # the SDK's retry, re-batched, new keys
        post(server.url, live[100:220], "retry-2")
        post(server.url, live[220:], "retry-3")
        post(server.url, first[:40], "old-queue")  # a week-old queue flushed again
    finally:
        assert server.stop() == 0
    processed = gamestream("process", "--until-idle", data_dir=data)

    ids = events_by_id(data)
    assert len(ids) == 2300 and set(ids.values()) == {1}, ids.most_common(3)
    assert bookings(data) == round(sum(e["eventParams"]["amount"] for e in first + live), 2)
    assert "quarantined 0; duplicates dropped 2,340;" in processed.stdout, processed.stdout
    assert table_rows(data / "tables" / "events_quarantine") == []
    # `status` counts them too, from the events table (a later process, not this one's memory)
    assert "duplicates dropped: 2,340 copies" in gamestream("status", data_dir=data).stdout


def test_an_eventid_reused_with_another_payload_keeps_the_first_and_quarantines_the_later_with_the_reason(
        tmp_path: Path) -> None:
    """Within one batch and across runs: the first payload lands, a later different one is quarantined with
    `duplicate eventId with a different payload`, an exact copy is only dropped."""
    data = tmp_path / "data"
    when = dt.datetime(2026, 11, 20, 12, tzinfo=UTC)
    original = purchases(3, seed=3, when=when)
    changed = {**original[0], "eventParams": {**original[0]["eventParams"], "amount": 999.0}}
    write_ndjson(tmp_path / "a.ndjson", [*original, changed, original[1]])  # both kinds inside one batch
    gamestream("load", str(tmp_path / "a.ndjson"), data_dir=data)
    gamestream("process", "--until-idle", data_dir=data)
    renamed = {**original[2], "eventName": "levelEnd"}
    write_ndjson(tmp_path / "b.ndjson", [renamed, original[2]])  # across runs
    gamestream("load", str(tmp_path / "b.ndjson"), data_dir=data)
    processed = gamestream("process", "--until-idle", data_dir=data)

    rows = {r["eventId"]: r for r in table_rows(data / "tables" / "events", ["eventId", "eventName", "eventParams"])}
    assert len(rows) == 3
    assert rows[original[0]["eventId"]]["eventParams"]["amount"] == original[0]["eventParams"]["amount"]
    assert rows[original[2]["eventId"]]["eventName"] == "purchaseEvent"
    quarantined = table_rows(data / "tables" / "events_quarantine")
    assert sorted(json.loads(q["payload"])["eventId"] for q in quarantined) == sorted(
        [original[0]["eventId"], original[2]["eventId"]])
    assert {q["reason"] for q in quarantined} == {"duplicate eventId with a different payload"}
    assert {json.loads(q["payload"])["eventParams"].get("amount") for q in quarantined
            if json.loads(q["payload"])["eventId"] == original[0]["eventId"]} == {999.0}
    assert "quarantined 1; duplicates dropped 1;" in processed.stdout, processed.stdout


def test_the_kpi_tables_never_count_a_copy(tmp_path: Path) -> None:
    """Five days of play loaded, then a third of it again in another order and other batches: every KPI table
    equals the plain-Python answer over the events counted once."""
    data = tmp_path / "data"
    start = dt.datetime(2026, 10, 1, tzinfo=UTC)
    events = list(simulate(events=6000, users=200, seed=8, start=start, days=5))
    copies = random.Random(4).sample(events, 2000)
    write_ndjson(tmp_path / "events.ndjson", events)
    gamestream("load", str(tmp_path / "events.ndjson"), data_dir=data)
    gamestream("process", "--until-idle", data_dir=data)
    write_ndjson(tmp_path / "copies.ndjson", copies)
    gamestream("load", str(tmp_path / "copies.ndjson"), data_dir=data)
    processed = gamestream("process", "--until-idle", data_dir=data)
    assert "duplicates dropped 2,000;" in processed.stdout

    want_hourly, want_bookings, want_daily, want_cohorts, want_names = expected_kpis([events])
    got_hourly, got_bookings, got_daily, got_cohorts, got_names = kpi_tables(data)
    assert got_hourly == want_hourly
    assert rounded_rows(got_bookings) == rounded_rows(want_bookings)
    assert rounded_rows(got_daily) == rounded_rows(want_daily)
    assert rounded_rows(got_cohorts) == rounded_rows(want_cohorts)
    assert got_names == want_names


def test_a_processor_killed_between_its_events_and_event_ids_commits_lets_no_copy_in_and_loses_nothing(
        tmp_path: Path) -> None:
    """The processor commits the ids that landed to `event_ids` only every few seconds: SIGKILL it after its
    events commits, while copies of what it committed keep arriving, and restart it. The restarted processor
    reads the missing ids back from the events table (its log says how many), so every event is there once."""
    data = tmp_path / "data"
    when = dt.datetime(2026, 11, 25, tzinfo=UTC)
    originals = purchases(6000, seed=5, when=when)
    rng = random.Random(6)
    env = {**os.environ, "GAMESTREAM_LOG": "", "GAMESTREAM_BATCH_MAX_WAIT_S": "0.2"}
    caught_up = 0
    loaded: list[dict] = []
    for round_ in range(4):
        fresh = originals[round_ * 1500:(round_ + 1) * 1500]
        batch = fresh + rng.sample(loaded, min(len(loaded), 800))  # copies of what was committed before
        rng.shuffle(batch)
        loaded += fresh
        write_ndjson(tmp_path / f"r{round_}.ndjson", batch)
        gamestream("load", str(tmp_path / f"r{round_}.ndjson"), data_dir=data)
        processor = subprocess.Popen([sys.executable, "-m", "gamestream", "process", "--data-dir", str(data)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        output = _until_committed(processor, data, expected=len(loaded))
        processor.send_signal(signal.SIGKILL)  # well within the ids' commit interval (10 s)
        output += processor.communicate(timeout=30)[0]
        assert processor.returncode == -signal.SIGKILL
        caught_up += sum(int(n) for n in re.findall(r"event ids loaded .*caught_up_ids=(\d+)", output))
    assert caught_up > 0, "no kill fell between an events commit and its event_ids commit"
    ids = events_by_id(data)
    assert len(ids) == 6000 and set(ids.values()) == {1}, ids.most_common(3)
    assert table_rows(data / "tables" / "events_quarantine") == []
    # every copy counted once, though the processor was killed four times: the counter commits with the rows
    assert "duplicates dropped: 2,400 copies" in gamestream("status", data_dir=data).stdout


def _until_committed(processor: subprocess.Popen, data: Path, *, expected: int, timeout: float = 120) -> str:
    """Waits until the events table holds `expected` distinct events (and no more rows); the processor's
    output so far is not read (it is read once it has exited)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if processor.poll() is not None:
            raise AssertionError("the processor exited:\n" + processor.communicate()[0])
        try:
            ids = events_by_id(data)
        except Exception:  # the table is not there yet
            ids = Counter()
        if len(ids) >= expected:
            assert sum(ids.values()) == len(ids) == expected, ids.most_common(3)
            return ""
        time.sleep(0.2)
    raise AssertionError(f"the events table did not reach {expected} events in {timeout}s")


def test_ids_older_than_the_window_are_forgotten_and_a_partition_loads_only_its_own(tmp_path: Path) -> None:
    """`event_ids` rows that arrived before the window (dedupe_days) are not loaded: a copy that late lands
    again, as documented; another partition's rows are not loaded either."""
    settings = Settings(data_dir=tmp_path, dedupe_days=7)
    ids = identity.EventIds(settings)
    today = identity.today()
    rows = pa.table({"logPartition": pa.array([0, 0, 1], pa.int32()), "idKey": pa.array([1, 2, 3], pa.int64()),
                     "fingerprint": pa.array([10, 20, 30], pa.int64()),
                     "arrivedOn": pa.array([today - 6, today - 7, today], pa.int32()).cast(pa.date32())})
    from deltalake import write_deltalake

    write_deltalake(ids.table, rows, mode="append", partition_by=identity.PARTITION_BY)
    from gamestream.tables import lake

    events = lake.open_events(settings.table_uri("events"))
    ids.load({0: 0}, settings.table_uri("events"), {0: lake.txn_app_id(settings.pipeline, 0)})
    held = ids.partitions[0]
    found, prints = held.find(np.array([1, 2, 3], dtype=np.int64))
    assert found.tolist() == [True, False, False] and prints[0] == 10
    assert events.version() == 0


def test_the_maintenance_deletes_event_ids_older_than_the_window_and_the_state_forgets_them(tmp_path: Path) -> None:
    from gamestream.tables.maintenance import expire_event_ids
    from deltalake import DeltaTable, write_deltalake

    settings = Settings(data_dir=tmp_path, dedupe_days=7)
    ids = identity.EventIds(settings)
    today = identity.today()
    write_deltalake(ids.table, pa.table({
        "logPartition": pa.array([0, 0, 1], pa.int32()), "idKey": pa.array([1, 2, 3], pa.int64()),
        "fingerprint": pa.array([10, 20, 30], pa.int64()),
        "arrivedOn": pa.array([today - 6, today - 7, today - 30], pa.int32()).cast(pa.date32())}),
        mode="append", partition_by=identity.PARTITION_BY)
    assert expire_event_ids(settings) == 2
    assert DeltaTable(settings.table_uri("event_ids")).to_pyarrow_table()["idKey"].to_pylist() == [1]
    assert expire_event_ids(settings) == 0

    held = identity.PartitionIds()
    held.add(np.array([5, 6], dtype=np.int64), np.array([50, 60], dtype=np.int64), np.array([today - 8, today]))
    held.expire(today - 6)
    assert held.find(np.array([5, 6], dtype=np.int64))[0].tolist() == [False, True]


def test_ids_written_as_uuids_and_any_other_ids_both_find_their_copies() -> None:
    """A UUID eventId is keyed by its own lower 64 bits (read in bulk), any other by the lower half of its MD5:
    either way a copy in the same batch or in the state is found, and a different id is not."""
    from gamestream import schema

    an_id = str(uuid.uuid4())
    rows = [{"eventId": i, "eventName": "levelEnd", "eventTime": dt.datetime(2026, 11, 1, tzinfo=UTC),
             "eventParams": {"device_id": "d"}} for i in ("order-17", an_id, "order-17", an_id, "order-18", None)]
    table = pa.Table.from_pylist(rows, schema=schema.arrow_schema())
    keys, _, has_id = identity.identity_keys(table)
    assert keys[0] == keys[2] and keys[1] == keys[3] and len({keys[0], keys[1], keys[4]}) == 3
    assert keys[1].view(np.uint64) == uuid.UUID(an_id).int & (2**64 - 1)
    assert has_id.tolist() == [True] * 5 + [False]
    verdict = identity.judge(identity.PartitionIds(), table)
    assert verdict.copies == 2 and verdict.rows.num_rows == 4 and verdict.conflicts.num_rows == 0
    state = identity.PartitionIds()
    state.add(verdict.new_keys, verdict.new_prints, identity.today())
    again = identity.judge(state, table.slice(0, 2))
    assert again.copies == 2 and again.rows.num_rows == 0


def test_judge_agrees_with_a_plain_reference_over_many_batches_with_copies_conflicts_and_repeats() -> None:
    """Random batches against a growing state (runs small and large next to a batch, so both ways of searching
    run): which rows land, which are copies, which conflict, and what joins the state, as a dict would say."""
    rng = np.random.default_rng(7)
    state, reference = identity.PartitionIds(), {}
    pool = rng.integers(-2**63, 2**63 - 1, 60_000, dtype=np.int64)
    repeats_seen = copies_seen = conflicts_seen = 0
    for size in [5, 40_000, 300, 7, 2_000, 1, 25_000, 64, 0, 900] * 3:
        keys = rng.choice(pool, size)
        prints = rng.integers(0, 3, size).astype(np.int64)  # a copy, or another payload
        has_id = rng.random(size) > 0.02
        rows = pa.table({"i": np.arange(size)})
        verdict = identity.judge(state, rows, (keys, prints, has_id))
        expected_keep, expected_conflicts, copies, new = [], [], 0, {}
        for i in range(size):
            key, fingerprint = int(keys[i]), int(prints[i])
            first = reference.get(key, new.get(key))
            if not has_id[i] or first is None:
                expected_keep.append(i)
                if has_id[i]:
                    new[key] = fingerprint
            elif first == fingerprint:
                copies += 1
            else:
                expected_conflicts.append(i)
        repeats_seen += size - len(set(keys.tolist())) > 0
        copies_seen += copies
        conflicts_seen += len(expected_conflicts)
        assert verdict.rows["i"].to_pylist() == expected_keep
        assert verdict.conflicts["i"].to_pylist() == expected_conflicts
        assert verdict.copies == copies
        assert dict(zip(verdict.new_keys.tolist(), verdict.new_prints.tolist())) == new
        state.add(verdict.new_keys, verdict.new_prints, 1, unique=True)
        reference.update(new)
        assert len(state) == len(reference)
    assert repeats_seen and copies_seen and conflicts_seen


def test_an_event_sent_without_a_time_and_sent_again_later_is_a_copy_not_another_payload(tmp_path: Path) -> None:
    """A device that sends no eventTime gets the receive time as eventTime; its retry arrives later, so that time
    differs — the copy must still be dropped as a copy (found by the Kafka fault tests: retries through another
    collector were quarantined as `duplicate eventId with a different payload`)."""
    data = tmp_path / "data"
    timeless = {"eventId": "no-time-1", "eventName": "levelStart", "eventParams": {"device_id": "d1", "level": 3}}
    timed = {"eventId": "with-time-1", "eventName": "levelStart", "eventTime": iso(dt.datetime.now(UTC)),
             "eventParams": {"device_id": "d1"}}
    changed = {**timeless, "eventId": "no-time-2"}
    server = ServeProcess(data)
    try:
        post(server.url, [timeless, timed, changed], "first")
        time.sleep(1.1)  # the retry's receive time is another second
        post(server.url, [timeless, timed, {**changed, "eventParams": {"device_id": "d1", "level": 4}}], "retry")
    finally:
        assert server.stop() == 0
    processed = gamestream("process", "--until-idle", data_dir=data)
    assert sorted(events_by_id(data).items()) == [("no-time-1", 1), ("no-time-2", 1), ("with-time-1", 1)]
    assert "quarantined 1; duplicates dropped 2;" in processed.stdout, processed.stdout
    quarantined = table_rows(data / "tables" / "events_quarantine")
    assert [(q["reason"], json.loads(q["payload"])["eventId"]) for q in quarantined] == [
        (identity.DIFFERENT_PAYLOAD, "no-time-2")]  # a different level is still another payload

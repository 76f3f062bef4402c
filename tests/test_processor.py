"""The processor in-process: records other producers wrote, crashes between its two commits, scale-out."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from deltalake import DeltaTable

from conftest import table_rows
from gamestream.tables import lake
from gamestream.log import Append, open_log
from gamestream.process.processor import Processor
from gamestream.settings import Settings


def line(event_id: str, **extra) -> bytes:
    event = {"eventId": event_id, "eventName": "levelStart", "eventTime": "2026-11-01T10:00:00Z",
             "eventParams": {"device_id": "d1"}}
    event.update(extra)
    return json.dumps(event).encode()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", partitions=2)


def drain(settings: Settings, partitions: list[int] | None = None) -> Processor:
    log = open_log(settings.data_dir, partitions=settings.partitions)
    try:
        processor = Processor(settings, log, partitions)
        processor.run(until_idle=True)
        return processor
    finally:
        log.close()


def _arrow_payload(lines: list[bytes]) -> bytes:
    """Canonical lines as the collector's fast path writes them: an Arrow record payload."""
    import io

    import pyarrow.json as pj

    from gamestream.log import payload
    from gamestream import schema

    table = pj.read_json(io.BytesIO(b"\n".join(lines)),
                         parse_options=pj.ParseOptions(explicit_schema=schema.decode_schema()))
    return payload.encode(table, "lz4")


def test_a_log_of_old_ndjson_and_new_arrow_records_gives_every_event_once(settings: Settings) -> None:
    from gamestream.log import payload

    log = open_log(settings.data_dir, partitions=2)
    old = [line(f"ndjson-{i}") for i in range(30)]
    new = [line(f"arrow-{i}", eventTime=f"2026-11-0{1 + i % 3}T10:00:00.000123Z") for i in range(30)]
    arrow = _arrow_payload(new[:20])
    assert payload.is_arrow(arrow) and not payload.is_arrow(old[0])
    log.append([Append(0, b"\n".join(old[:15]), 15), Append(1, arrow, 20)])
    log.append([Append(0, _arrow_payload(new[20:]), 10), Append(1, b"\n".join(old[15:]), 15)])
    log.append([Append(0, b"GSA1 this is no IPC stream", 1)])  # damaged: quarantined with its reason, not fatal
    log.close()
    processor = drain(settings)
    rows = table_rows(processor.settings.table_uri("events"))
    ids = Counter(r["eventId"] for r in rows)
    assert max(ids.values()) == 1 and set(ids) == {f"ndjson-{i}" for i in range(30)} | {f"arrow-{i}" for i in range(30)}
    by_id = {r["eventId"]: r for r in rows}
    assert str(by_id["arrow-4"]["eventTime"]) == "2026-11-02 10:00:00.000123+00:00"
    assert str(by_id["arrow-4"]["eventDate"]) == "2026-11-02"
    assert by_id["arrow-4"]["eventParams"]["device_id"] == "d1"
    quarantined = table_rows(processor.settings.table_uri("events_quarantine"))
    assert [q["reason"].split(":")[0] for q in quarantined] == ["unreadable Arrow record payload"]


def test_a_bad_row_inside_an_arrow_record_is_quarantined_alone(settings: Settings) -> None:
    log = open_log(settings.data_dir, partitions=2)
    first = log.append([Append(0, _arrow_payload([line("a"), line("b")]), 2)])[0]
    second = log.append([Append(0, _arrow_payload([line("fine"), line("no-time", eventTime=None)]), 2)])[0]
    log.close()
    processor = drain(settings)
    assert sorted(r["eventId"] for r in table_rows(processor.settings.table_uri("events"))) == ["a", "b", "fine"]
    quarantined = table_rows(processor.settings.table_uri("events_quarantine"))
    assert len(quarantined) == 1 and quarantined[0]["reason"].startswith("eventTime: null")
    assert (quarantined[0]["logPartition"], quarantined[0]["logOffset"]) == (0, second) and second > first
    assert json.loads(quarantined[0]["payload"]) == {  # canonical: null fields omitted but the null eventTime
        "eventId": "no-time", "eventName": "levelStart", "eventTime": None, "eventParams": {"device_id": "d1"}}


def test_bad_lines_from_another_producer_are_quarantined_one_by_one(settings: Settings) -> None:
    log = open_log(settings.data_dir, partitions=2)
    payload = b"\n".join([
        line("ok-1"),
        b'{"eventName": "x", "eventParams": {"devi',  # truncated
        line("bad-type", eventParams={"device_id": "d1", "scoreAdjustment": "lots"}),
        line("no-time", eventTime=None),
        line("no-device", eventParams={"platform": "ios"}),
        line("empty-name", eventName=""),
        line("ok-2"),
    ])
    log.append([Append(0, payload, 7), Append(1, line("ok-3"), 1)])
    log.close()
    processor = drain(settings)
    assert sorted(r["eventId"] for r in table_rows(processor.settings.table_uri("events"))) == ["ok-1", "ok-2", "ok-3"]
    quarantined = table_rows(processor.settings.table_uri("events_quarantine"))
    reasons = sorted(q["reason"].split(":")[0] for q in quarantined)
    assert reasons == ["eventName", "eventParams.device_id", "eventParams.scoreAdjustment", "eventTime",
                       "invalid JSON"]
    assert {q["logPartition"] for q in quarantined} == {0} and {q["logOffset"] for q in quarantined} == {1}
    assert any(q["payload"].startswith('{"eventName": "x"') for q in quarantined)  # the raw bytes, as sent
    assert processor.stats.events_committed == 3 and processor.stats.events_quarantined == 5


def test_a_crash_between_the_quarantine_and_the_events_commit_duplicates_nothing(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = open_log(settings.data_dir, partitions=2)
    log.append([Append(0, b"\n".join([line("a"), line("q", eventTime=None), line("b")]), 3)])
    log.close()

    real_commit = lake.commit_exactly_once

    def crash_before_events(table, app_ids, build, **kwargs):
        if table.table_uri.rstrip("/").endswith("events"):
            raise SystemExit("simulated crash after the quarantine commit")
        return real_commit(table, app_ids, build, **kwargs)

    monkeypatch.setattr(lake, "commit_exactly_once", crash_before_events)
    with pytest.raises(SystemExit):
        drain(settings)
    assert len(table_rows(settings.table_uri("events_quarantine"))) == 1
    assert table_rows(settings.table_uri("events")) == []

    monkeypatch.setattr(lake, "commit_exactly_once", real_commit)
    processor = drain(settings)  # the restart replays the batch; each table takes only what it lacks
    assert sorted(r["eventId"] for r in table_rows(settings.table_uri("events"))) == ["a", "b"]
    assert len(table_rows(settings.table_uri("events_quarantine"))) == 1
    assert processor.stats.events_quarantined == 0 and processor.stats.events_committed == 2


def test_a_batch_already_in_the_table_is_skipped_by_its_txn_version(settings: Settings) -> None:
    log = open_log(settings.data_dir, partitions=2)
    log.append([Append(1, line("x"), 1)])
    log.close()
    drain(settings)
    table = DeltaTable(settings.table_uri("events"))
    assert table.transaction_version(lake.txn_app_id("gamestream", 1)) == 1
    version = table.version()
    # a processor that believes it is behind (its position is forced back) still writes nothing twice
    log = open_log(settings.data_dir, partitions=2)
    try:
        processor = Processor(settings, log)
        processor.stats.positions[1] = 0
        processor.run(until_idle=True)
        assert processor.stats.batches_skipped == 1 and processor.stats.events_committed == 0
    finally:
        log.close()
    assert DeltaTable(settings.table_uri("events")).version() == version


def test_processors_owning_different_partitions_write_one_table_concurrently(settings: Settings) -> None:
    import threading

    records_per_partition = 30
    log = open_log(settings.data_dir, partitions=2)
    log.append([Append(p, b"\n".join(line(f"p{p}-{r}-{i}") for i in range(100)), 100)
                for p in (0, 1) for r in range(records_per_partition)])
    log.close()
    small_batches = settings.with_(batch_max_events=100)  # a commit per record: many chances to conflict
    threads = [threading.Thread(target=drain, args=(small_batches, [p])) for p in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = Counter(r["eventId"] for r in table_rows(settings.table_uri("events")))
    assert len(ids) == 200 * records_per_partition and set(ids.values()) == {1}  # every record once
    table = DeltaTable(settings.table_uri("events"))
    assert [table.transaction_version(lake.txn_app_id("gamestream", p)) for p in (0, 1)] == [30, 30]
    assert table.version() == 2 * records_per_partition


def test_log_records_are_trimmed_only_after_commit_and_retention(settings: Settings) -> None:
    log = open_log(settings.data_dir, partitions=2)
    log.append([Append(0, line("t"), 1)])
    assert log.trim(0) == 0  # not committed downstream yet
    log.close()
    drain(settings)
    log = open_log(settings.data_dir, partitions=2)
    try:
        assert log.committed("gamestream", 0) == 1
        assert log.trim(3600) == 0  # committed, still inside the retention
        assert log.trim(0) == 1
    finally:
        log.close()


def test_processors_starting_together_create_each_table_once(tmp_path: Path) -> None:
    import threading

    for attempt in range(10):
        uri = str(tmp_path / f"events-{attempt}")
        openers = [threading.Thread(target=lake.open_events, args=(uri,)) for _ in range(3)]
        for t in openers:
            t.start()
        for t in openers:
            t.join()
        assert DeltaTable(uri).version() == 0  # one create commit, not a create per racer


def test_stage_metrics_count_the_committed_events_commits_and_positions(settings: Settings) -> None:
    from gamestream import metrics

    def sample(name: str, **labels: str) -> float:
        return metrics.REGISTRY.get_sample_value(name, labels) or 0.0

    # the registry is process-global: count from what earlier tests left in it
    before = {
        "events": sample("gamestream_events_committed_total"),
        "quarantined": sample("gamestream_events_quarantined_total"),
        "events_commits": sample("gamestream_commits_total", table="events"),
        "quarantine_commits": sample("gamestream_commits_total", table="events_quarantine"),
        "batches": sample("gamestream_batch_events_count"),
        "commit_latencies": sample("gamestream_commit_seconds_count", table="events"),
    }
    log = open_log(settings.data_dir, partitions=2)
    log.append([Append(0, b"\n".join([line("m1"), line("m2"), line("mq", eventTime=None)]), 3)])
    log.append([Append(1, line("m3"), 1)])
    log.close()
    drain(settings.with_(batch_max_events=3))  # the first record fills a batch: two commits in all

    assert sample("gamestream_events_committed_total") - before["events"] == 3
    assert sample("gamestream_events_quarantined_total") - before["quarantined"] == 1
    assert sample("gamestream_commits_total", table="events") - before["events_commits"] == 2
    assert sample("gamestream_commits_total", table="events_quarantine") - before["quarantine_commits"] == 1
    assert sample("gamestream_batch_events_count") - before["batches"] == 2
    assert sample("gamestream_commit_seconds_count", table="events") - before["commit_latencies"] == 2
    assert sample("gamestream_log_committed_offset", partition="0") == 1
    assert sample("gamestream_log_committed_offset", partition="1") == 1
    assert sample("gamestream_log_lag_events", partition="0") == 0  # drained
    assert sample("gamestream_log_lag_events", partition="1") == 0


def test_a_conflicting_commit_is_retried_from_the_txn_check_and_given_up_past_the_budget(tmp_path: Path) -> None:
    import pyarrow as pa
    from deltalake.exceptions import CommitFailedError

    from gamestream import metrics, schema

    table = lake.open_quarantine(str(tmp_path / "q"))
    rows = pa.Table.from_pylist([{"payload": "x", "reason": "r", "logPartition": 0, "logOffset": 1}],
                                schema=schema.QUARANTINE_SCHEMA)
    seen: list[dict[str, int]] = []

    def conflicting(times: int):
        def build(versions: dict[str, int]) -> lake.Batch:
            seen.append(dict(versions))  # step 1 ran again before this attempt
            if len(seen) <= times:
                raise CommitFailedError("Failed to commit transaction: 15")  # what delta-rs raises on a conflict
            return lake.Batch(rows, {"app": versions["app"] + 1})
        return build

    conflicts = metrics.REGISTRY.get_sample_value("gamestream_commit_retries_total",
                                                  {"table": "q", "reason": "conflict"}) or 0.0
    assert lake.commit_exactly_once(table, ["app"], conflicting(2), partition_by=None, retries=5) == 1
    assert seen == [{"app": 0}] * 3
    assert metrics.REGISTRY.get_sample_value("gamestream_commit_retries_total",
                                             {"table": "q", "reason": "conflict"}) - conflicts == 2
    seen.clear()
    with pytest.raises(lake.CommitGaveUp):
        lake.commit_exactly_once(table, ["app"], conflicting(99), partition_by=None, retries=4)
    assert seen == [{"app": 1}] * 4  # the budget is attempts in all, each starting from the committed version


@pytest.mark.parametrize(("events", "committed_early"), [(250, True), (240, False)])
def test_a_live_processor_read_to_the_end_commits_a_quarter_batch_at_once_and_less_after_the_wait(
        settings: Settings, events: int, committed_early: bool) -> None:
    """Live (not draining), `batch_max_events` 1,000, `batch_max_wait_s` an hour: a quarter batch (250 events)
    read to the log's end is committed at once — a burst's tail — while fewer events wait for the timer."""
    import threading
    import time

    log = open_log(settings.data_dir, partitions=2)
    try:
        log.append([Append(p, b"\n".join(line(f"q{p}-{i}") for i in range(events // 2)), events // 2)
                    for p in (0, 1)])
        processor = Processor(settings.with_(batch_max_events=1000, batch_max_wait_s=3600.0), log)
        running = threading.Thread(target=processor.run, kwargs={"until_idle": False})
        running.start()
        deadline = time.monotonic() + (20.0 if committed_early else 1.5)  # (the other case: 1.5 s of rounds)
        while processor.stats.events_committed < events and time.monotonic() < deadline:
            time.sleep(0.05)
        committed = processor.stats.events_committed
        processor.stop(drain=False)  # commits what it has read, then returns
        running.join(timeout=60)
        assert not running.is_alive()
    finally:
        log.close()
    assert committed == (events if committed_early else 0)
    assert processor.stats.events_committed == events  # the rest at the stop

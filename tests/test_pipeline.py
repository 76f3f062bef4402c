"""load → log → process → Delta, through the real `gamestream` command on real files."""

from __future__ import annotations

import datetime as dt
import json
import random
import re
from pathlib import Path

import duckdb
import polars as pl
import pytest
from deltalake import DeltaTable

from conftest import gamestream, table_rows, write_ndjson
from gamestream.demo.generator import simulate

BAD = {
    "wrong type": '{"eventName": "x", "eventParams": {"device_id": "d", "scoreAdjustment": "many"}}',
    "wrong nested type": '{"eventName": "x", "eventParams": {"device_id": "d", "amount": [1]}}',
    "int32 overflow": '{"eventName": "x", "eventParams": {"device_id": "d", "scoreAdjustment": 4294967296}}',
    "missing device": '{"eventName": "x", "eventParams": {"platform": "ios"}}',
    "truncated": '{"eventName": "x", "eventParams": {"devi',
    "naive time": '{"eventName": "x", "eventParams": {"device_id": "d"}, "eventTime": "2026-11-02T00:00:00"}',
}


def _mixed_file(path: Path, n: int, seed: int = 1) -> tuple[list[dict], list[str], list[dict]]:
    """n generated events, with bad lines (rejected by load) and null-eventTime events (quarantined) mixed in."""
    rng = random.Random(seed)
    good = list(simulate(events=n, users=200, seed=seed, days=3))
    nulls = [{"eventName": "purchaseEvent", "eventId": f"null-{i}", "eventTime": None,
              "eventParams": {"device_id": f"dev-null-{i}", "amount": 1.99}} for i in range(7)]
    lines: list = list(good) + nulls + list(BAD.values())
    rng.shuffle(lines)
    write_ndjson(path, lines)
    return good, list(BAD.values()), nulls


def test_loaded_events_land_in_delta_exactly_once_and_every_line_is_accounted_for(tmp_path: Path) -> None:
    data = tmp_path / "data"
    good, bad, nulls = _mixed_file(tmp_path / "events.ndjson", 5000)
    loaded = gamestream("load", str(tmp_path / "events.ndjson"), data_dir=data)
    accepted = int(re.search(r"([\d,]+) accepted", loaded.stdout)[1].replace(",", ""))
    rejected = int(re.search(r"([\d,]+) rejected", loaded.stdout)[1].replace(",", ""))
    assert (accepted, rejected) == (len(good) + len(nulls), len(bad))
    # the first rejection reasons, with line numbers and fields
    assert re.search(r"line \d+: eventParams.scoreAdjustment: expected int \| null, got str", loaded.stdout)
    assert re.search(r"line \d+: eventParams.device_id: required", loaded.stdout)
    assert re.search(r"line \d+: invalid JSON", loaded.stdout)

    gamestream("process", "--until-idle", data_dir=data)
    events = table_rows(data / "tables" / "events")
    assert sorted(e["eventId"] for e in events) == sorted(e["eventId"] for e in good)
    quarantined = table_rows(data / "tables" / "events_quarantine")
    assert sorted(json.loads(q["payload"])["eventId"] for q in quarantined) == sorted(n["eventId"] for n in nulls)
    assert all(q["reason"].startswith("eventTime: null") for q in quarantined)
    assert all(q["logOffset"] > 0 and 0 <= q["logPartition"] < 4 for q in quarantined)
    assert len(events) + rejected + len(quarantined) == len(good) + len(bad) + len(nulls)


def test_stored_rows_keep_the_events_values_and_derive_event_date_in_utc(tmp_path: Path) -> None:
    data = tmp_path / "data"
    sent = {"eventName": "purchaseEvent", "eventId": "e-1", "eventTime": "2026-11-02T00:30:00.250+02:00",
            "eventParams": {"game_keyword": "g", "app_name": "a", "scoreAdjustment": -2147483648,
                            "platform": "ios", "app_version": "3.2", "device_id": "d", "amount": 9.99,
                            "client_event_time": 1762036200}}
    write_ndjson(tmp_path / "one.ndjson", [sent])
    gamestream("load", str(tmp_path / "one.ndjson"), data_dir=data)
    gamestream("process", "--until-idle", data_dir=data)
    (row,) = table_rows(data / "tables" / "events")
    utc = dt.timezone.utc
    assert row["eventTime"] == dt.datetime(2026, 11, 1, 22, 30, 0, 250000, tzinfo=utc)
    assert row["eventDate"] == dt.date(2026, 11, 1)  # the UTC date, not the sender's
    assert row["eventParams"] == {**sent["eventParams"],
                                  "client_event_time": dt.datetime(2025, 11, 1, 22, 30, tzinfo=utc)}
    assert (row["eventName"], row["eventId"]) == ("purchaseEvent", "e-1")


def test_processing_an_already_drained_log_again_writes_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _mixed_file(tmp_path / "events.ndjson", 2000)
    gamestream("load", str(tmp_path / "events.ndjson"), data_dir=data)
    gamestream("process", "--until-idle", data_dir=data)
    events, quarantine = DeltaTable(str(data / "tables" / "events")), DeltaTable(str(data / "tables/events_quarantine"))
    versions = (events.version(), quarantine.version())
    again = gamestream("process", "--until-idle", data_dir=data)
    assert "committed 0 events in 0 commits" in again.stdout
    assert (DeltaTable(str(data / "tables/events")).version(),
            DeltaTable(str(data / "tables/events_quarantine")).version()) == versions


def test_table_is_partitioned_by_event_date_and_readable_by_duckdb_and_polars(tmp_path: Path) -> None:
    data = tmp_path / "data"
    good, _, _ = _mixed_file(tmp_path / "events.ndjson", 3000)
    gamestream("load", str(tmp_path / "events.ndjson"), data_dir=data)
    gamestream("process", "--until-idle", data_dir=data)
    root = data / "tables" / "events"
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != "_delta_log")
    expected_dates = sorted({e["eventTime"][:10] for e in good})
    assert folders == [f"eventDate={d}" for d in expected_dates]

    table = DeltaTable(str(root))
    protocol = table.protocol()
    # reader 1 / writer 4 (the change data feed): no timestampNtz upgrade to reader 3 / writer 7
    assert (protocol.min_reader_version, protocol.min_writer_version) == (1, 4)
    assert not protocol.reader_features and not protocol.writer_features

    connection = duckdb.connect()
    connection.register("events", table.to_pyarrow_dataset())
    per_day = connection.execute(
        "SELECT CAST(eventDate AS VARCHAR), count(*), count(DISTINCT eventParams.device_id) FROM events "
        "GROUP BY 1 ORDER BY 1").fetchall()
    expected = {}
    for e in good:
        day = e["eventTime"][:10]
        count, devices = expected.get(day, (0, set()))
        expected[day] = (count + 1, devices | {e["eventParams"]["device_id"]})
    assert per_day == [(day, c, len(d)) for day, (c, d) in sorted(expected.items())]

    frame = pl.read_delta(str(root))
    assert frame.height == len(good)
    assert frame.schema["eventTime"] == pl.Datetime("us", "UTC")
    assert set(frame["eventId"].to_list()) == {e["eventId"] for e in good}


def test_a_second_processor_on_the_same_partitions_is_refused(tmp_path: Path) -> None:
    from gamestream.log import open_log
    from gamestream.process.processor import PartitionBusy, Processor
    from gamestream.settings import Settings

    settings = Settings(data_dir=tmp_path / "data")
    log = open_log(settings.data_dir, partitions=4)
    try:
        first = Processor(settings, log, [0, 1])
        with pytest.raises(PartitionBusy, match="partition 1"):
            Processor(settings, log, [1, 2])
        second = Processor(settings, log, [2, 3])  # disjoint partitions: scale-out
        first.ownership.close()
        second.ownership.close()
    finally:
        log.close()


def test_load_reports_a_missing_file_and_exits_non_zero(tmp_path: Path) -> None:
    result = gamestream("load", str(tmp_path / "nope.ndjson"), data_dir=tmp_path / "data", check=False)
    assert result.returncode != 0
    assert "does not exist" in result.stderr

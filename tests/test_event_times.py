"""Four times per event: the device's event time (`eventParams.client_event_time`), the device's send time
(`sentAt`, an event field or the request's Sent-At header), the collector's receive time (`receivedAt`) and the
event time every KPI uses (`eventTime`: the receive time, or with sentAt the device's time corrected by
receivedAt − sentAt). Through a real collector, the processor and the KPI stage; the batch validator and the
per-event one agree; `load` and the API Gateway envelopes keep or stamp receivedAt."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import httpx
import pytest

from collector_server import ServeProcess
from conftest import gamestream, table_rows, write_ndjson
from gamestream import schema
from gamestream.ingest.batch import MIN_BATCH_EVENTS, validate_batch

UTC = dt.timezone.utc
NDJSON = {"Content-Type": "application/x-ndjson"}


def iso(moment: dt.datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def event(event_id: str, device: str, device_time: dt.datetime, **extra) -> dict:
    return {"eventId": event_id, "eventName": "levelEnd", "eventTime": iso(device_time),
            "eventParams": {"device_id": device}, **extra}


def ndjson(*events: dict) -> bytes:
    return b"\n".join(json.dumps(e).encode() for e in events)


@pytest.fixture
def collector(tmp_path: Path):
    server = ServeProcess(tmp_path / "data")
    yield server
    server.stop()


def test_skewed_device_clocks_land_on_the_day_and_window_they_happened(collector: ServeProcess) -> None:
    """A phone 3 days ahead (sentAt in each event), one 2 hours behind (the Sent-At header), one without
    sentAt: after processing, each event's eventTime, eventDate and hourly window are where it really happened,
    and its four times are stored."""
    url = collector.url + "/v1/events"
    now = dt.datetime.now(UTC)
    ahead, behind = dt.timedelta(days=3), dt.timedelta(hours=-2)
    # the events happened 10 and 40 minutes before the request, by a correct clock
    happened = [now - dt.timedelta(minutes=10), now - dt.timedelta(minutes=40)]
    skewed = [event(f"ahead-{i}", "phone-ahead", t + ahead, sentAt=iso(now + ahead)) for i, t in enumerate(happened)]
    assert httpx.post(url, content=ndjson(*skewed), headers=NDJSON).json()["accepted"] == 2
    late_clock = [event(f"behind-{i}", "phone-behind", t + behind) for i, t in enumerate(happened)]
    answer = httpx.post(url, content=ndjson(*late_clock), headers={**NDJSON, "Sent-At": iso(now + behind)})
    assert answer.status_code == 200 and answer.json()["accepted"] == 2
    plain = event("plain", "phone-plain", now - dt.timedelta(days=2))  # no sentAt: as today, the receive time
    assert httpx.post(url, json=plain).json()["accepted"] == 1
    collector.stop()

    gamestream("process", "--until-idle", data_dir=collector.data_dir)
    rows = {r["eventId"]: r for r in table_rows(collector.data_dir / "tables" / "events")}
    assert len(rows) == 5
    for i, t in enumerate(happened):
        for prefix, skew in (("ahead", ahead), ("behind", behind)):
            row = rows[f"{prefix}-{i}"]
            received = row["receivedAt"]
            assert abs((received - now).total_seconds()) < 60  # stamped by the collector
            # corrected: the device's time + (receivedAt − sentAt) = when it happened, give or take the request's
            # time in flight (the test's `now` is taken before the request)
            assert abs((row["eventTime"] - t).total_seconds()) < 60, (prefix, row["eventTime"], t)
            assert row["eventParams"]["client_event_time"] == (t + skew).replace(microsecond=t.microsecond)
            assert row["sentAt"] == (now + skew)
            assert row["eventDate"] == row["eventTime"].date()
    assert rows["ahead-0"]["eventDate"] != (happened[0] + ahead).date()  # 3 days ahead: not that day
    assert rows["plain"]["eventTime"] == rows["plain"]["receivedAt"] and rows["plain"]["sentAt"] is None
    assert rows["plain"]["eventParams"]["client_event_time"].date() == (now - dt.timedelta(days=2)).date()

    # the KPI tables count every event where it happened: no row for the phone's future days
    daily = {r["eventDate"]: r for r in table_rows(collector.data_dir / "tables" / "kpi_daily")}
    assert set(daily) <= {t.date() for t in happened} | {now.date()}
    assert sum(r["events"] for r in daily.values()) == 5
    windows = {r["window_start"] for r in table_rows(collector.data_dir / "tables" / "kpi_events_hourly")}
    assert {r["eventTime"].replace(minute=0, second=0, microsecond=0) for r in rows.values()} == windows


def test_a_time_still_in_the_future_after_correction_is_rejected_with_the_reason(collector: ServeProcess) -> None:
    url = collector.url + "/v1/events"
    now = dt.datetime.now(UTC)
    body = ndjson(event("ok", "d", now, sentAt=iso(now)),
                  event("future", "d", now + dt.timedelta(hours=3), sentAt=iso(now)))
    answer = httpx.post(url, content=body, headers=NDJSON).json()
    assert answer["accepted"] == 1 and answer["rejected"] == 1
    assert answer["errors"][0]["index"] == 1
    assert "eventTime: 3.0 hours after it was received" in answer["errors"][0]["error"]
    bad = httpx.post(url, json=event("x", "d", now), headers={"Sent-At": "yesterday"})
    assert bad.status_code == 400 and bad.json()["error"].startswith("Sent-At: expected an RFC 3339 timestamp")
    zoneless = httpx.post(url, json=event("x", "d", now), headers={"Sent-At": "2026-12-04T10:00:00"})
    assert zoneless.status_code == 400 and "needs a zone" in zoneless.json()["error"]


def test_the_batch_validator_corrects_exactly_as_the_per_event_one() -> None:
    """A request of MIN_BATCH_EVENTS events takes the whole-batch path: the same rows as event by event, with a
    header's sentAt, an event's own, and none; one event too far ahead sends the batch to the per-event path."""
    now = dt.datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
    events = []
    header = now - dt.timedelta(hours=2)  # the request's Sent-At: a device 2 hours behind
    for i in range(MIN_BATCH_EVENTS):
        skew = dt.timedelta(days=i % 3 - 1) if i % 4 else dt.timedelta(hours=-2)  # a day behind, right, ahead
        own = {"sentAt": iso(now + skew)} if i % 4 else {}  # … each event's own sentAt; else the header's
        happened = now - dt.timedelta(minutes=i % 50)
        events.append(json.dumps(event(f"e{i}", f"d{i % 7}", happened + skew, **own)).encode())
    tables = validate_batch(events, now=now, mode="server", partitions=1, max_event_bytes=100_000, sent_at=header)
    assert tables is not None
    validator = schema.EventValidator(event_time="server")
    by_event = [json.loads(validator.validate(e, now, header).line) for e in events]
    batch_rows = tables[0].to_pylist()
    for row, expected in zip(batch_rows, by_event):
        for name in ("eventTime", "sentAt", "receivedAt"):
            assert iso(row[name]) == expected.get(name), (name, row, expected)
        assert iso(row["eventParams"]["client_event_time"]) == expected["eventParams"]["client_event_time"]
    assert {r["receivedAt"] for r in batch_rows} == {now}
    assert all(r["eventTime"] == now - dt.timedelta(minutes=i % 50) for i, r in enumerate(batch_rows))
    too_far = events + [json.dumps(event("far", "d", now + dt.timedelta(hours=2), sentAt=iso(now))).encode()]
    assert validate_batch(too_far, now=now, mode="server", partitions=1, max_event_bytes=100_000) is None
    assert isinstance(validator.validate(too_far[-1], now), schema.Rejection)


def test_load_keeps_a_files_received_at_and_stamps_the_rest(tmp_path: Path) -> None:
    data = tmp_path / "data"
    then = dt.datetime(2026, 11, 2, 8, 30, tzinfo=UTC)
    lines = [event("kept", "d1", then, receivedAt=iso(then + dt.timedelta(seconds=5)), sentAt=iso(then)),
             event("stamped", "d2", then)]
    before = dt.datetime.now(UTC)
    gamestream("load", str(write_ndjson(tmp_path / "e.ndjson", lines)), data_dir=data)
    gamestream("process", "--until-idle", data_dir=data)
    rows = {r["eventId"]: r for r in table_rows(data / "tables" / "events")}
    assert rows["kept"]["receivedAt"] == then + dt.timedelta(seconds=5) and rows["kept"]["sentAt"] == then
    assert rows["kept"]["eventTime"] == then  # load keeps the file's own eventTime: no correction
    assert rows["stamped"]["receivedAt"] >= before.replace(microsecond=0) and rows["stamped"]["eventTime"] == then


def test_an_api_gateway_envelope_stamps_received_at_from_its_request_context() -> None:
    from test_envelope import REQUEST_EPOCH_MS, v1_event

    from gamestream.log import envelope
    from gamestream.log.base import LogRecord

    request = v1_event(json.dumps({"eventName": "levelEnd", "eventParams": {"device_id": "d"}}))
    unwrapped = envelope.unwrap(LogRecord(0, 7, json.dumps(request).encode(), 1, 0.0))
    assert unwrapped is not None and unwrapped.record is not None
    line = json.loads(unwrapped.record.payload)
    stamp = iso(dt.datetime.fromtimestamp(REQUEST_EPOCH_MS / 1000, UTC))
    assert line["receivedAt"] == stamp and line["eventTime"] == stamp

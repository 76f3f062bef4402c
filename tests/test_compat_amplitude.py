"""Amplitude's HTTP API v2 (`gamestream.api.compat.amplitude`), driven by Amplitude's own Python SDK
(amplitude-analytics, pinned) against a real `gamestream serve`: sessions of play land once with their fields and
count in the KPIs; the SDK's retries through 503 and 429 land once; an invalid event is answered 400 naming it
and the SDK resends the rest; a wrong api_key is refused the way Amplitude refuses it. Hand-written requests pin
the exact answers (gzip, 413, the backlog's 429, CORS)."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import logging
import threading
from pathlib import Path

import httpx
import pytest
from amplitude import Amplitude, BaseEvent, Config, EventOptions, Identify, Revenue

from compat_harness import RefusingFront, collector, events, kpi_daily, process, wait_until
from collector_server import stored_events

KEY = "amp-write-key-for-tests"
T0 = 1_764_892_800_000  # 2025-12-05T00:00:00Z, the devices' clock (epoch ms)


class Sdk:
    """An Amplitude client the way a game runs one, recording every event's final answer (its callback)."""

    def __init__(self, url: str, api_key: str = KEY, **config: object) -> None:
        self.answers: dict[str, tuple[int, str | None]] = {}  # insert_id → (code, message)
        self.tracked = 0
        self._lock = threading.Lock()
        self.client = Amplitude(api_key, Config(server_url=url, flush_interval_millis=100, flush_max_retries=12,
                                                callback=self._answered, **config))

    def _answered(self, event: BaseEvent, code: int, message: str | None = None) -> None:
        with self._lock:
            self.answers[event.insert_id] = (code, message)

    def track(self, event: BaseEvent) -> BaseEvent:
        self.client.track(event)
        self.tracked += 1
        return event

    def identify(self, identify: Identify, options: EventOptions) -> None:
        self.client.identify(identify, options)
        self.tracked += 1

    def done(self) -> None:
        """Flushes, waits until every event tracked has its final answer, and shuts the client down."""
        self.client.flush()
        wait_until(lambda: len(self.answers) >= self.tracked, timeout=30, every=0.05)
        self.client.shutdown()


def event(name: str, device: str, n: int, **options: object) -> BaseEvent:
    return BaseEvent(name, device_id=device, insert_id=f"{device}-{n}", time=T0 + n * 60_000, **options)



def upload(url: str, events: list, *, api_key: str | None = KEY, **extra: object) -> httpx.Response:
    body = {"events": events, **extra} if api_key is None else {"api_key": api_key, "events": events, **extra}
    return httpx.post(url + "/2/httpapi", json=body)


def by_id(data_dir: Path) -> dict[str, dict]:
    rows = events(data_dir)
    ids = [row["eventId"] for row in rows]
    assert len(ids) == len(set(ids)), "an event landed twice"
    return {row["eventId"]: row for row in rows}


# ------------------------------------------------------------------------------------------ the SDK, end to end
def test_sessions_of_play_from_the_sdk_land_once_with_their_fields_and_count_in_the_kpis(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with collector(data) as server:
        http, batch = Sdk(server.url + "/2/httpapi"), Sdk(server.url + "/batch", use_batch=True)
        sent: dict[str, BaseEvent] = {}
        bookings = 0.0
        for d in range(4):
            device, sdk = f"device-{d:03d}", (http if d % 2 else batch)
            n = 0
            for session in range(3):
                session_id = T0 + session * 3_600_000
                for kind in ("level_start", "level_end"):
                    e = sdk.track(event(kind, device, n, session_id=session_id, platform="Android",
                                        app_version="2.4.1", os_name="android", country="FR",
                                        user_id=f"player-{d}", event_properties={"level": session, "mode": "ranked"}))
                    sent[e.insert_id] = e
                    n += 1
            # the SDK's Revenue API: event "revenue_amount", $price × $quantity in event_properties
            revenue = Revenue(price=0.99, quantity=3, product_id="gems_small")
            revenue_event = revenue.to_revenue_event()
            revenue_event.load_event_options(EventOptions(device_id=device, insert_id=f"{device}-{n}",
                                                          time=T0 + n * 60_000))
            sent[sdk.track(revenue_event).insert_id] = revenue_event
            n += 1
            # a purchase named as the game names it, with Amplitude's top-level revenue
            e = sdk.track(event("purchase", device, n, revenue=4.99, product_id="starter_pack"))
            sent[e.insert_id] = e
            n += 1
            bookings += 0.99 * 3 + 4.99
            sdk.identify(Identify().set("tier", "gold"),
                         EventOptions(device_id=device, insert_id=f"{device}-{n}", time=T0))
        http.done()
        batch.done()
        total = len(sent) + 4  # and four $identify
        assert {code for code, _ in (*http.answers.values(), *batch.answers.values())} == {200}
        metrics = httpx.get(server.url + "/metrics").text
        assert 'path="/batch"' in metrics and 'path="/2/httpapi"' in metrics  # both endpoints were used
    process(data)
    rows = by_id(data)
    assert len(rows) == total
    for insert_id, e in sent.items():
        row = rows[insert_id]  # eventId = insert_id
        params = row["eventParams"]
        assert params["device_id"] == e.device_id
        assert params["client_event_time"] == dt.datetime.fromtimestamp(e.time / 1000, dt.timezone.utc)
        if e.event_type in ("revenue_amount", "purchase"):
            assert row["eventName"] == "purchaseEvent"
            assert json.loads(row["eventParams_extra"])["vendor_event"] == e.event_type
            assert params["amount"] == pytest.approx(2.97 if e.event_type == "revenue_amount" else 4.99)
        else:
            assert row["eventName"] == e.event_type and params["amount"] is None
            assert (params["platform"], params["app_version"]) == ("Android", "2.4.1")
            assert json.loads(row["eventParams_extra"]) == {"level": e["event_properties"]["level"],
                                                            "mode": "ranked"}
            extra = json.loads(row["event_extra"])
            assert extra["user_id"] == e.user_id and extra["session_id"] == e.session_id
            assert extra["os_name"] == "android" and extra["country"] == "FR"
            assert extra["library"].startswith("amplitude-python/")
    identifies = [row for row in rows.values() if row["eventName"] == "$identify"]
    assert len(identifies) == 4
    assert json.loads(identifies[0]["event_extra"])["user_properties"] == {"$set": {"tier": "gold"}}
    # eventTime is the receive time (the Python SDK sends no client_upload_time): the day is today's, or two
    # days' if the test runs across midnight UTC
    days: dict[dt.date, list[dict]] = {}
    for row in rows.values():
        days.setdefault(row["eventDate"], []).append(row)
    kpis = kpi_daily(data)
    assert set(kpis) == set(days)
    for day, day_rows in days.items():
        assert kpis[day]["dau"] == len({row["eventParams"]["device_id"] for row in day_rows})
        assert kpis[day]["events"] == len(day_rows)
    assert sum(k["dau"] for k in kpis.values()) >= 4 and sum(k["events"] for k in kpis.values()) == total
    assert sum(k["bookings"] for k in kpis.values()) == pytest.approx(bookings, abs=1e-9)
    if len(kpis) == 1:
        assert next(iter(kpis.values()))["paying_users"] == 4 and next(iter(kpis.values()))["dau"] == 4


def test_the_sdks_retries_through_503_and_429_land_once(tmp_path: Path) -> None:
    data = tmp_path / "data"
    sent: list[str] = []
    with collector(data) as server:
        for status in (503, 429):
            with RefusingFront(server.url, refusals=3, status=status) as front:
                sdk = Sdk(front.url + "/2/httpapi")
                for n in range(6):
                    sent.append(sdk.track(event("match_end", f"retry-{status}", n,
                                                event_properties={"won": n % 2 == 0})).insert_id)
                sdk.done()
                assert front.refused == 3 and front.passed >= 1  # the SDK met every refusal, then got through
                assert front.paths == ["/2/httpapi"] * (front.refused + front.passed)
                assert {code for code, _ in sdk.answers.values()} == {200}
        # A retry after a lost answer: the same event again (same insert_id, same payload), accepted again.
        again = Sdk(server.url + "/2/httpapi")
        again.track(event("match_end", "retry-503", 0, event_properties={"won": True}))
        again.done()
        assert stored_events(data) == 13
    process(data)
    rows = by_id(data)
    assert sorted(rows) == sorted(sent)  # the copy was dropped by eventId: each event once


def test_an_invalid_event_is_answered_400_naming_it_and_the_sdk_resends_the_rest(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with collector(data) as server:
        sdk = Sdk(server.url + "/2/httpapi")
        good = [sdk.track(event("level_start", "device-ok", n)).insert_id for n in range(3)]
        # scoreAdjustment is a schema field (int32): a string there is invalid
        bad = sdk.track(event("score", "device-ok", 9, event_properties={"scoreAdjustment": "lots"})).insert_id
        sdk.done()
        code, message = sdk.answers[bad]
        assert code == 400 and "eventParams.scoreAdjustment" in message and "nothing was stored" in message
        assert [sdk.answers[i][0] for i in good] == [200, 200, 200]  # resent by the SDK, then stored

        # The exact answer, by hand: missing event_type, no id at all, an invalid time, a schema type.
        response = upload(server.url, [
            {"event_type": "ok", "device_id": "device-ok", "insert_id": "h-0"},
            {"device_id": "device-ok"},
            {"event_type": "orphan"},
            {"event_type": "late", "device_id": "device-ok", "time": "yesterday"},
            {"event_type": "x", "device_id": "device-ok", "event_properties": {"scoreAdjustment": 1.5}},
            {"event_type": "x", "device_id": "device-ok", "insert_id": "i" * 129},
        ])
        assert response.status_code == 400
        answer = response.json()
        assert answer["code"] == 400 and "missing_field" not in answer  # else the SDK would drop all of them
        assert answer["events_with_missing_fields"] == {"event_type": [1], "device_id": [2]}
        assert answer["events_with_invalid_fields"] == {"time": [3], "event_properties": [4], "insert_id": [5]}
        assert [e["index"] for e in answer["errors"]] == [1, 2, 3, 4, 5]
        assert "5 of 6 events are invalid and nothing was stored" in answer["error"]

        not_json = httpx.post(server.url + "/2/httpapi", content=b"{not json")
        assert (not_json.status_code, not_json.json()["error"]) == (400, "Invalid JSON request body")
        no_events = upload(server.url, [])
        assert no_events.status_code == 400 and no_events.json()["missing_field"] == "events"
        assert stored_events(data) == 3  # the three good events, once; nothing of the refused requests
    process(data)
    assert sorted(by_id(data)) == sorted(good)


def test_a_wrong_api_key_is_refused_the_way_amplitude_does_and_never_echoed(tmp_path: Path,
                                                                            caplog: pytest.LogCaptureFixture
                                                                            ) -> None:
    data = tmp_path / "data"
    wrong = "wrong-key-0123456789"
    with collector(data, "--api-key", KEY) as server:
        caplog.set_level(logging.ERROR, logger="amplitude")
        intruder = Sdk(server.url + "/2/httpapi", api_key=wrong)
        intruder.track(event("level_start", "device-x", 0))
        intruder.client.flush()
        # the SDK read the answer as a bad key: it logs it and drops the batch, without retrying
        wait_until(lambda: "Invalid API Key" in caplog.text, timeout=30, every=0.05)
        intruder.client.shutdown()

        refused = upload(server.url, [{"event_type": "x", "device_id": "device-x"}], api_key=wrong)
        assert refused.status_code == 400 and refused.json()["error"].startswith("Invalid API key:")
        assert wrong not in refused.text
        missing = upload(server.url, [{"event_type": "x", "device_id": "device-x"}], api_key=None)
        assert missing.status_code == 400 and missing.json()["missing_field"] == "api_key"
        assert stored_events(data) == 0

        sdk = Sdk(server.url + "/2/httpapi")
        sdk.track(event("level_start", "device-x", 1))
        sdk.done()
        assert list(sdk.answers.values()) == [(200, "Event sent successfully.")]
        assert stored_events(data) == 1


# ------------------------------------------------------------------------------------- the answers, by hand
def test_the_answers_gzip_size_limit_backlog_and_cors_in_amplitudes_shapes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = {"GAMESTREAM_MAX_EVENTS_PER_REQUEST": "3", "GAMESTREAM_MAX_BACKLOG_EVENTS": "0"}
    with collector(data, env=env) as server:
        url = server.url + "/batch"
        one = [{"event_type": "level_start", "device_id": "device-gz", "insert_id": "gz-0", "time": T0}]
        too_many = httpx.post(url, json={"api_key": KEY, "events": one * 4})
        assert too_many.status_code == 413 and too_many.json()["code"] == 413  # the SDK splits its batch

        body = gzip.compress(json.dumps({"api_key": KEY, "events": one,
                                         "client_upload_time": "2025-12-05T00:00:05.000Z"}).encode())
        ok = httpx.post(url, content=body, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})
        assert ok.status_code == 200
        answer = ok.json()
        assert (answer["code"], answer["events_ingested"]) == (200, 1)
        assert answer["payload_size_bytes"] > 0 and isinstance(answer["server_upload_time"], int)
        assert ok.headers["access-control-allow-origin"] == "*"

        preflight = httpx.options(url, headers={"Origin": "https://game.example", "Access-Control-Request-Method":
                                                "POST"})
        assert preflight.status_code == 204 and "POST" in preflight.headers["access-control-allow-methods"]

        # One event in the log and a bound of 0: the backlog is over its bound once the collector has read it
        # (the probe is invalid, so that it stores nothing before then).
        probe = [{"device_id": "device-gz"}] * 2
        wait_until(lambda: upload(server.url, probe).status_code == 429, timeout=10)
        busy = upload(server.url, probe)
        assert busy.json()["throttled_events"] == [0, 1] and busy.json()["code"] == 429
        assert busy.headers["retry-after"] == "1" and "retry later" in busy.json()["error"]
        assert stored_events(data) == 1
    process(data)
    (row,) = events(data)
    # client_upload_time is the sentAt: eventTime is the device's time corrected by its clock's error
    assert row["sentAt"] == dt.datetime(2025, 12, 5, 0, 0, 5, tzinfo=dt.timezone.utc)
    assert row["eventTime"] - row["receivedAt"] == dt.timedelta(seconds=-5)

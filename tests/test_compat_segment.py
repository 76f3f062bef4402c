"""Segment's tracking API (`gamestream.api.compat.segment`), spoken to by the real SDK, segment-analytics-python,
pointed at a real `gamestream serve` — through a front that refuses its first requests when the test is about retries —
and by hand-written requests shaped as Segment's mobile and web SDKs send them; read back from the events table
and kpi_daily after `gamestream process`."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import re
import threading
from pathlib import Path

import httpx
import pytest
from segment.analytics import Client
from segment.analytics.request import APIError

from compat_harness import RefusingFront, collector, events, kpi_daily, process, wait_until
from conftest import gamestream

UTC = dt.UTC
TODAY = dt.datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)
DAY1, DAY2 = TODAY - dt.timedelta(days=2), TODAY - dt.timedelta(days=1)
IOS = {"os": {"name": "iOS", "version": "17.4"}, "app": {"name": "Dragon Run", "version": "2.1.0"},
       "device": {"id": "idfv-a", "type": "ios"}, "locale": "fr-FR"}
ANDROID = {"os": {"name": "Android"}, "app": {"version": "2.0.3"}, "device": {"type": "android"}}


class Sdk:
    """A segment-analytics-python `Client` on `host`, collecting what its `on_error` reports; `close` flushes its
    queue (waiting for every retry) and stops its consumer thread."""

    def __init__(self, host: str, write_key: str = "game-write-key", **options: object) -> None:
        self.errors: list[tuple[Exception, list]] = []
        self.client = Client(write_key, host=host, upload_interval=0.2, max_retries=6,
                             on_error=lambda error, batch: self.errors.append((error, batch)), **options)

    def close(self) -> None:
        self.client.flush()
        self.client.join()


def play_sessions(client: Client) -> dict[str, dict]:
    """Three players over two days: identify, screens, pages, tracks and purchases (one call repeated by the game
    with the same messageId). What each messageId should become: {messageId: expected fields}."""
    expected: dict[str, dict] = {}

    def call(method: str, message_id: str, expect: dict, **kwargs: object) -> None:
        getattr(client, method)(message_id=message_id, **kwargs)
        expected[message_id] = expect

    at = lambda day, minutes: day + dt.timedelta(minutes=minutes)
    # dev-a (user-1, iOS): both days, two purchases (revenue; total as a string)
    call("identify", "a-1", {"name": "identify", "device": "dev-a"}, user_id="user-1", anonymous_id="dev-a",
         traits={"level": 3}, context=IOS, timestamp=at(DAY1, 0))
    call("screen", "a-2", {"name": "screen:Home", "device": "dev-a"}, user_id="user-1", anonymous_id="dev-a",
         name="Home", context=IOS, timestamp=at(DAY1, 1))
    call("track", "a-3", {"name": "Level Started", "device": "dev-a"}, user_id="user-1", anonymous_id="dev-a",
         event="Level Started", properties={"level": 3, "scoreAdjustment": 40}, context=IOS, timestamp=at(DAY1, 2))
    call("track", "a-4", {"name": "purchaseEvent", "device": "dev-a", "amount": 4.99}, user_id="user-1",
         anonymous_id="dev-a", event="Order Completed", properties={"revenue": 4.99, "currency": "EUR"},
         context=IOS, timestamp=at(DAY1, 3))
    call("screen", "a-5", {"name": "screen:Shop", "device": "dev-a"}, user_id="user-1", anonymous_id="dev-a",
         name="Shop", context=IOS, timestamp=at(DAY2, 0))
    call("track", "a-6", {"name": "purchaseEvent", "device": "dev-a", "amount": 9.99}, user_id="user-1",
         anonymous_id="dev-a", event="Order Completed", properties={"total": "9.99"}, context=IOS,
         timestamp=at(DAY2, 5))
    # dev-b (anonymous, Android): both days, one purchase named "purchase" with a price
    call("screen", "b-1", {"name": "screen:Home", "device": "dev-b"}, anonymous_id="dev-b", name="Home",
         context=ANDROID, timestamp=at(DAY1, 10))
    call("track", "b-2", {"name": "Level Started", "device": "dev-b"}, anonymous_id="dev-b", event="Level Started",
         context=ANDROID, timestamp=at(DAY1, 11))
    call("track", "b-3", {"name": "purchaseEvent", "device": "dev-b", "amount": 1.5}, anonymous_id="dev-b",
         event="purchase", properties={"price": 1.5, "sku": "gems_100"}, context=ANDROID, timestamp=at(DAY2, 12))
    # dev-c (user-3): the second day only; revenue wins over total (the first of the mapping's amounts found)
    call("identify", "c-1", {"name": "identify", "device": "dev-c"}, user_id="user-3", anonymous_id="dev-c",
         traits={"plan": "vip"}, timestamp=at(DAY2, 20))
    call("page", "c-2", {"name": "page:Store", "device": "dev-c"}, user_id="user-3", anonymous_id="dev-c",
         name="Store", properties={"path": "/store"}, timestamp=at(DAY2, 21))
    call("track", "c-3", {"name": "purchaseEvent", "device": "dev-c", "amount": 20.0}, user_id="user-3",
         anonymous_id="dev-c", event="Order Completed", properties={"revenue": 20, "total": 25},
         timestamp=at(DAY2, 22))
    # the game sends c-3 again (its own retry, same messageId): it lands once
    client.track(user_id="user-3", anonymous_id="dev-c", event="Order Completed", message_id="c-3",
                 properties={"revenue": 20, "total": 25}, timestamp=at(DAY2, 22))
    return expected


def by_id(rows: list[dict]) -> dict[str, dict]:
    ids = [row["eventId"] for row in rows]
    assert len(ids) == len(set(ids)), "an eventId landed twice"
    return {row["eventId"]: row for row in rows}


def metric(url: str, path: str, status: int) -> float:
    text = httpx.get(url + "/metrics").text
    match = re.search(rf'gamestream_http_requests_total{{path="{re.escape(path)}",status="{status}"}} (\S+)', text)
    return float(match[1]) if match else 0.0


# ---------------------------------------------------------------------------------------------- the real SDK
def test_sdk_sessions_land_once_with_their_mapped_fields_and_exact_kpis(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with collector(data) as server:
        plain, gzipped = Sdk(server.url), Sdk(server.url, gzip=True)
        expected = play_sessions(plain.client)
        gzipped.client.track(anonymous_id="dev-d", event="Level Started", message_id="d-1",
                             timestamp=DAY2 + dt.timedelta(minutes=30))
        expected["d-1"] = {"name": "Level Started", "device": "dev-d"}
        plain.close()
        # the purchase c-3 again, in another batch sent at another time (an app restarted with its queue)
        gzipped.client.track(user_id="user-3", anonymous_id="dev-c", event="Order Completed", message_id="c-3",
                             properties={"revenue": 20, "total": 25}, timestamp=DAY2 + dt.timedelta(minutes=22))
        gzipped.close()
        assert plain.errors == [] and gzipped.errors == []
        assert metric(server.url, "/v1/batch", 200) >= 2
    processed = gamestream("process", "--until-idle", data_dir=data)
    # both copies of c-3 are the same payload (nothing that changes between sends is in it): dropped, not
    # quarantined as a different payload
    assert "quarantined 0; duplicates dropped 2;" in processed.stdout, processed.stdout
    rows = by_id(events(data))
    assert sorted(rows) == sorted(expected)
    for message_id, expect in expected.items():
        row = rows[message_id]
        assert (row["eventName"], row["eventParams"]["device_id"]) == (expect["name"], expect["device"])
        assert row["eventParams"]["amount"] == expect.get("amount")
        assert row["sentAt"] is not None and row["receivedAt"] is not None
    purchase = rows["a-4"]
    assert purchase["eventParams"]["client_event_time"] == DAY1 + dt.timedelta(minutes=3)
    # the event's time is the device's, corrected for its clock by sentAt (here the same clock: milliseconds)
    assert abs(purchase["eventTime"] - purchase["eventParams"]["client_event_time"]) < dt.timedelta(seconds=30)
    assert (purchase["eventParams"]["platform"], purchase["eventParams"]["app_version"],
            purchase["eventParams"]["app_name"]) == ("ios", "2.1.0", "Dragon Run")
    assert json.loads(purchase["eventParams_extra"]) == {"revenue": 4.99, "currency": "EUR",
                                                         "vendor_event": "Order Completed"}
    extra = json.loads(purchase["event_extra"])
    assert (extra["vendor"], extra["type"], extra["userId"], extra["anonymousId"]) == (
        "segment", "track", "user-1", "dev-a")
    assert extra["context"]["locale"] == "fr-FR" and extra["context"]["library"]["name"] == "analytics-python"
    assert "writeKey" not in purchase["event_extra"] and "game-write-key" not in json.dumps(rows, default=str)
    assert rows["a-3"]["eventParams"]["scoreAdjustment"] == 40  # a property that is a schema field is typed
    assert json.loads(rows["a-1"]["event_extra"])["traits"] == {"level": 3}
    assert rows["b-3"]["eventParams"]["platform"] == "android"
    kpis = kpi_daily(data)
    day1, day2 = kpis[DAY1.date()], kpis[DAY2.date()]
    assert (day1["dau"], day1["events"], day1["bookings"]) == (2, 6, pytest.approx(4.99))
    assert (day2["dau"], day2["events"], day2["bookings"]) == (4, 7, pytest.approx(9.99 + 1.5 + 20.0))
    assert (day1["paying_users"], day2["paying_users"]) == (1, 3)


@pytest.mark.parametrize("status", [503, 429])
def test_the_sdk_retries_a_refused_batch_and_it_lands_once(tmp_path: Path, status: int) -> None:
    data = tmp_path / "data"
    with collector(data) as server, RefusingFront(server.url, refusals=3, status=status) as front:
        sdk = Sdk(front.url)
        sent = [f"retry-{status}-{i}" for i in range(12)]
        for i, message_id in enumerate(sent):
            sdk.client.track(anonymous_id=f"dev-{i % 3}", event="Level Started", message_id=message_id)
        sdk.close()
        assert sdk.errors == []
        assert front.refused == 3 and front.passed >= 1  # the SDK met the refusals and retried through them
        assert set(front.paths) == {"/v1/batch"}
    process(data)
    assert sorted(by_id(events(data))) == sorted(sent)


@pytest.mark.slow
def test_the_collectors_own_backlog_refusal_is_waited_out_by_the_sdk(tmp_path: Path) -> None:
    """The collector answers 503 with Retry-After once its unprocessed backlog passes its bound; the SDK keeps the
    batch, waits, retries, and the batch lands once the processor has caught up."""
    data = tmp_path / "data"
    with collector(data, env={"GAMESTREAM_MAX_BACKLOG_EVENTS": "2"}) as server:
        first = [{"type": "track", "event": "Level Started", "anonymousId": "dev-1", "messageId": f"first-{i}"}
                 for i in range(3)]
        assert httpx.post(server.url + "/v1/batch", json={"batch": first}).json() == {"success": True}
        wait_until(lambda: httpx.post(server.url + "/v1/batch", json={"batch": first}).status_code == 503, 10, 0.1)
        refused = httpx.post(server.url + "/v1/batch", json={"batch": first})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["success"] is False and refused.json()["code"] == "unavailable"
        assert "backlog" in refused.json()["message"]
        sdk = Sdk(server.url)
        sdk.client.track(anonymous_id="dev-2", event="Level Started", message_id="late-1")
        flushed = threading.Thread(target=sdk.close)
        flushed.start()
        wait_until(lambda: metric(server.url, "/v1/batch", 503) >= 3, 10, 0.1)  # the SDK's batch was refused too
        process(data)  # the backlog drains: the SDK's next attempt passes
        flushed.join(60)
        assert not flushed.is_alive() and sdk.errors == []
    process(data)
    assert sorted(by_id(events(data))) == ["first-0", "first-1", "first-2", "late-1"]


def test_the_write_key_is_the_basic_user_name_or_the_bodys_write_key(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with collector(data, "--api-key", "right-key", "--api-key", "other-key") as server:
        good, bad = Sdk(server.url, write_key="right-key"), Sdk(server.url, write_key="wrong-key")
        good.client.track(anonymous_id="dev-1", event="Level Started", message_id="keyed-1")
        bad.client.track(anonymous_id="dev-1", event="Level Started", message_id="unkeyed-1")
        good.close()
        bad.close()
        assert good.errors == []
        [(error, batch)] = bad.errors  # 401 is not retried: the SDK reports it and drops the batch
        assert isinstance(error, APIError) and (error.status, error.code) == (401, "unauthorized")
        assert "invalid write key" in error.message and "wrong-key" not in error.message
        assert [message["messageId"] for message in batch] == ["unkeyed-1"]
        # the mobile and web SDKs send the key in the body, no header
        message = {"type": "track", "event": "Level Started", "anonymousId": "dev-2", "messageId": "body-key-1"}
        url = server.url + "/v1/b"
        assert httpx.post(url, json={"batch": [message], "writeKey": "other-key"}).status_code == 200
        for body in ({"batch": [message], "writeKey": "nope-key"}, {"batch": [message]}):
            answer = httpx.post(url, json=body)
            assert answer.status_code == 401 and answer.json()["code"] == "unauthorized"
            assert "nope-key" not in answer.text and "write key" in answer.json()["message"]
        # a wrong Basic key is refused even with a right key in the body (the header is read first)
        answer = httpx.post(url, json={"batch": [message], "writeKey": "right-key"}, auth=("nope-key", ""))
        assert answer.status_code == 401
    process(data)
    assert sorted(by_id(events(data))) == ["body-key-1", "keyed-1"]


# ------------------------------------------------------------------------------------- hand-written requests
@pytest.fixture(scope="module")
def shaped(tmp_path_factory: pytest.TempPathFactory):
    """A collector whose Segment mapping takes the user id as the player, with small limits."""
    data = tmp_path_factory.mktemp("segment") / "data"
    data.mkdir()
    (data / "gamestream.toml").write_text('[compat.segment]\nplayer = "user"\npurchases = ["Gems Bought"]\n'
                                          'amount = ["usd"]\nrename = { lvl = "level" }\n')
    with collector(data, env={"GAMESTREAM_MAX_EVENTS_PER_REQUEST": "20",
                              "GAMESTREAM_MAX_BODY_BYTES": str(64 * 1024)}) as server:
        yield server


def test_each_single_call_endpoint_takes_one_message_of_its_type(shaped) -> None:
    at = "2025-03-01T10:00:00.000Z"
    calls = {
        "/v1/track": {"event": "Gems Bought", "properties": {"usd": "2.99", "lvl": 7}},
        "/v1/screen": {"name": "Map", "category": "World"},
        "/v1/page": {"properties": {"path": "/"}},
        "/v1/identify": {"traits": {"email": "p@example.com"}},
        "/v1/group": {"groupId": "guild-9", "traits": {"name": "Knights"}},
        "/v1/alias": {"previousId": "dev-9"},
        "/v1/t": {"event": "Level Started", "_metadata": {"retryCount": 2}, "sentAt": "2025-03-01T10:00:01.000Z"},
    }
    for path, fields in calls.items():
        message = {"userId": "player-9", "anonymousId": "dev-9", "messageId": "single" + path.replace("/", "-"),
                   "timestamp": at, "writeKey": "any", **fields}
        # analytics.js sends text/plain (no preflight) with the write key in the body
        answer = httpx.post(shaped.url + path, content=json.dumps(message), headers={"Content-Type": "text/plain"})
        assert (answer.status_code, answer.json()) == (200, {"success": True}), path
        assert answer.headers["access-control-allow-origin"] == "*"
    process(shaped.data_dir)
    rows = {row["eventId"]: row for row in events(shaped.data_dir) if row["eventId"].startswith("single")}
    assert {k: (r["eventName"], r["eventParams"]["device_id"]) for k, r in rows.items()} == {
        "single-v1-track": ("purchaseEvent", "player-9"), "single-v1-screen": ("screen:Map", "player-9"),
        "single-v1-page": ("page", "player-9"), "single-v1-identify": ("identify", "player-9"),
        "single-v1-group": ("group", "player-9"), "single-v1-alias": ("alias", "player-9"),
        "single-v1-t": ("Level Started", "player-9")}
    track = rows["single-v1-track"]
    assert track["eventParams"]["amount"] == 2.99
    assert json.loads(track["eventParams_extra"]) == {"usd": "2.99", "level": 7, "vendor_event": "Gems Bought"}
    assert json.loads(rows["single-v1-screen"]["event_extra"])["category"] == "World"
    assert json.loads(rows["single-v1-group"]["event_extra"])["groupId"] == "guild-9"
    assert json.loads(rows["single-v1-alias"]["event_extra"])["previousId"] == "dev-9"
    # what changes between an SDK's retries, and the write key, are not kept
    kept = json.loads(rows["single-v1-t"]["event_extra"])
    assert not {"_metadata", "sentAt", "writeKey"} & set(kept)
    assert rows["single-v1-t"]["sentAt"] == dt.datetime(2025, 3, 1, 10, 0, 1, tzinfo=UTC)


def test_a_mobile_batch_is_gzipped_text_to_v1_b_and_a_partly_invalid_one_keeps_its_good_messages(shaped) -> None:
    good = {"type": "track", "event": "Level Started", "userId": "p-1", "messageId": "mobile-1",
            "timestamp": "2025-03-01T10:00:00Z"}
    batch = {"batch": [good,
                       {"type": "track", "userId": "p-1", "messageId": "mobile-no-name"},
                       {"type": "track", "event": "x", "messageId": "mobile-no-player"},
                       {"type": "sing", "userId": "p-1"},
                       "not a message",
                       {"type": "track", "event": "x", "userId": "p-1", "properties": {"amount": "lots"}},
                       {**good, "messageId": "mobile-2", "type": "screen", "name": "Home"}],
             "sentAt": "2025-03-01T10:00:05Z", "writeKey": "any", "context": {"app": {"version": "3.0"}}}
    answer = httpx.post(shaped.url + "/v1/b", content=gzip.compress(json.dumps(batch).encode()),
                        headers={"Content-Type": "text/plain", "Content-Encoding": "gzip"})
    assert answer.status_code == 200
    assert answer.json() == {"success": True, "accepted": 2, "rejected": 5, "errors": [
        {"index": 1, "error": 'a track message needs "event", the name of the event'},
        {"index": 2, "error": "the event has neither a device id nor a user id (segment sends one of them)"},
        {"index": 3, "error": "unknown message type 'sing'; Segment's types are track, screen, page, identify, "
                              "group, alias"},
        {"index": 4, "error": "a message must be a JSON object"},
        {"index": 5, "error": "eventParams.amount: expected float | null, got str"},
    ]}
    process(shaped.data_dir)
    rows = {row["eventId"]: row for row in events(shaped.data_dir) if row["eventId"].startswith("mobile")}
    assert sorted(rows) == ["mobile-1", "mobile-2"]
    assert rows["mobile-1"]["eventParams"]["app_version"] == "3.0"  # the batch's context, under the message's
    # the event's time corrected by the batch's sentAt: received − 5 s (the device's clock is in 2025)
    assert rows["mobile-1"]["eventTime"] == rows["mobile-1"]["receivedAt"] - dt.timedelta(seconds=5)


@pytest.mark.parametrize("body, headers, status, message", [
    (b"{not json", {}, 400, "the body is not JSON"),
    (b"[1, 2]", {}, 400, "the body must be a JSON object"),
    (b'{"messages": []}', {}, 400, 'this body has no "batch" list'),
    (b'{"batch": []}', {}, 400, "the batch holds no message"),
    (b'{"batch": [{"type": "track", "event": "x"}]}', {}, 400, "no valid message in the body"),
    (json.dumps({"batch": [{"type": "track", "event": "x", "userId": "u"}] * 21}).encode(), {}, 413,
     "21 events in one request; the limit is 20"),
    (b"x" * (65 * 1024), {}, 413, "over the 65,536-byte limit"),
    (b"{}", {"Content-Encoding": "br"}, 415, "content encoding 'br' is not taken"),
])
def test_a_batch_that_cannot_be_taken_is_answered_in_segments_shape_with_the_reason(
        shaped, body: bytes, headers: dict, status: int, message: str) -> None:
    answer = httpx.post(shaped.url + "/v1/batch", content=body, headers={"Content-Type": "application/json",
                                                                         **headers})
    assert answer.status_code == status
    shape = answer.json()
    assert shape["success"] is False and message in shape["message"]
    assert shape["code"] == {400: "invalid_request", 413: "payload_too_large", 415: "unsupported_media_type"}[status]
    assert answer.headers["access-control-allow-origin"] == "*"


def test_a_browsers_preflight_is_answered_for_every_segment_path(shaped) -> None:
    for path in ("/v1/batch", "/v1/b", "/v1/t", "/v1/identify"):
        answer = httpx.options(shaped.url + path, headers={"Origin": "https://game.example",
                                                           "Access-Control-Request-Method": "POST"})
        assert answer.status_code == 204 and answer.headers["access-control-allow-origin"] == "*"
        assert "POST" in answer.headers["access-control-allow-methods"]

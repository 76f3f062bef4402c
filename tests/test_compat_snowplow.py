"""Snowplow's tracker protocol (`gamestream.api.compat.snowplow`), driven by the real Python tracker (snowplow-tracker,
pinned) against a real `gamestream serve`: sessions of play over POST and GET land once per event with their
mapped fields and count in kpi_daily; the tracker's own retries through 503 and 429 land once; a keyed collector
takes the key from the tracker's HTTP session; hand-written requests pin the exact shapes (GET /i with ue_px, the
pixel, the CORS preflight, bad payloads answered 400 with the reason)."""

from __future__ import annotations

import base64
import datetime as dt
import json
import uuid
import warnings
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import requests
from snowplow_tracker import Emitter, ScreenView, SelfDescribing, SelfDescribingJson, StructuredEvent, Subject, Tracker

from compat_harness import RefusingFront, collector, events, kpi_daily, process, wait_until

TP2 = "/com.snowplowanalytics.snowplow/tp2"
PAYLOAD_DATA = "iglu:com.snowplowanalytics.snowplow/payload_data/jsonschema/1-0-4"
MOBILE_CONTEXT = "iglu:com.snowplowanalytics.snowplow/mobile_context/jsonschema/1-0-2"
APPLICATION_CONTEXT = "iglu:com.snowplowanalytics.mobile/application/jsonschema/1-0-0"
LEVEL_UP = "iglu:com.acme/level_up/jsonschema/1-0-0"
PURCHASE = "iglu:com.acme/purchase/jsonschema/1-0-0"


class Sent:
    """What the tracker reports through its callbacks: the payloads it delivered (2xx) and those it did not."""

    def __init__(self) -> None:
        self.delivered: list[dict] = []
        self.failed: list[dict] = []

    def on_success(self, payloads: list[dict]) -> None:
        self.delivered.extend(dict(p) for p in payloads)

    def on_failure(self, sent: int, payloads: list[dict]) -> None:
        self.failed.extend(dict(p) for p in payloads)


def emitter(url: str, sent: Sent, *, method: str = "post", batch_size: int = 4,
            session: requests.Session | None = None) -> Emitter:
    """The tracker's synchronous emitter pointed at `url` the way a studio would: the collector's host:port."""
    return Emitter(urlsplit(url).netloc, protocol="http", method=method, batch_size=batch_size,  # type: ignore[arg-type]
                   on_success=sent.on_success, on_failure=sent.on_failure, request_timeout=10, session=session)


def device_tracker(emit: Emitter, *, device: str | None, user: str) -> Tracker:
    subject = Subject().set_platform("mob").set_user_id(user)
    if device is not None:
        subject.set_domain_user_id(device)
    return Tracker(namespace="game", emitters=emit, subject=subject, app_id="dragon-quest")


def mobile_context(os_type: str, **ids: str) -> list[SelfDescribingJson]:
    return [SelfDescribingJson(MOBILE_CONTEXT, {"osType": os_type, "osVersion": "14", "deviceManufacturer": "Acme",
                                                "deviceModel": "A1", **ids}),
            SelfDescribingJson(APPLICATION_CONTEXT, {"version": "2.3.1", "build": "231"})]


def play_session(tracker: Tracker, context: list[SelfDescribingJson], *, level: int) -> None:
    tracker.track(ScreenView(id_=str(uuid.uuid4()), name="MainMenu", context=context))
    tracker.track(StructuredEvent(category="progress", action="level_start", label=f"level-{level}",
                                  property_="normal", value=level, context=context))
    tracker.track(SelfDescribing(SelfDescribingJson(LEVEL_UP, {"level": level + 1, "stars": 3}), context=context))


def flushed(*emitters: Emitter) -> None:
    for emit in emitters:
        emit.flush()


def by_id(rows: list[dict]) -> dict[str, dict]:
    ids = [row["eventId"] for row in rows]
    assert len(ids) == len(set(ids)), "an event landed twice"
    return dict(zip(ids, rows))


def ms(moment: dt.datetime) -> int:
    return round(moment.timestamp() * 1000)


# ------------------------------------------------------------------------------------------- the real tracker
@pytest.mark.slow
def test_sessions_of_play_over_post_and_get_land_once_with_their_mapped_fields_and_count_in_kpis(
        tmp_path: Path) -> None:
    data = tmp_path / "data"
    sent = Sent()
    with collector(data) as server:
        post = emitter(server.url, sent, batch_size=4)
        get = emitter(server.url, sent, method="get")
        # device-a: the web-style domain user id; device-b: only its mobile context names it (appleIdfv);
        # device-c: a tracker on the GET method, paying with a (legacy) ecommerce transaction.
        a = device_tracker(post, device="device-a", user="user-a")
        b = device_tracker(post, device=None, user="user-b")
        c = device_tracker(get, device="device-c", user="user-c")
        a_context = mobile_context("Android", androidIdfa="idfa-a")
        b_context = mobile_context("iOS", appleIdfv="device-b")
        play_session(a, a_context, level=1)
        a.track(StructuredEvent(category="shop", action="purchase", label="gems_100", value=4.99, context=a_context))
        play_session(b, b_context, level=3)
        b.track(SelfDescribing(SelfDescribingJson(PURCHASE, {"revenue": 9.99, "currency": "USD",
                                                            "sku": "starter_pack"}), context=b_context))
        play_session(c, [], level=2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            c.track_ecommerce_transaction(order_id="order-1", total_value=19.99, currency="USD",
                                          items=[{"sku": "crown", "price": 19.99, "quantity": 1}])
        flushed(post, get)
        assert sent.failed == [] and len(sent.delivered) == 4 + 4 + 5
    process(data)

    stored = by_id(events(data))
    assert set(stored) == {p["eid"] for p in sent.delivered}  # eventId = eid, each once
    for payload in sent.delivered:
        row = stored[payload["eid"]]
        params = row["eventParams"]
        assert ms(params["client_event_time"]) == int(payload.get("ttm", payload["dtm"]))
        assert ms(row["sentAt"]) == int(payload["stm"])
        assert params["app_name"] == "dragon-quest"
        extra = json.loads(row["event_extra"])
        assert extra["vendor"] == "snowplow" and extra["snowplow"]["uid"] == payload["uid"]
    names = sorted(row["eventName"] for row in stored.values())
    assert names == sorted(["screen_view"] * 3 + ["level_start"] * 3 + ["level_up"] * 3 + ["purchaseEvent"] * 3
                           + ["transaction_item"])
    devices = {row["eventParams"]["device_id"] for row in stored.values()}
    assert devices == {"device-a", "device-b", "device-c"}
    amounts = sorted((r["eventParams"]["device_id"], r["eventParams"]["amount"]) for r in stored.values()
                     if r["eventName"] == "purchaseEvent")
    assert amounts == [("device-a", 4.99), ("device-b", 9.99), ("device-c", 19.99)]
    level_up = next(r for r in stored.values() if r["eventName"] == "level_up" and
                    r["eventParams"]["device_id"] == "device-b")
    assert level_up["eventParams"]["platform"] == "ios" and level_up["eventParams"]["app_version"] == "2.3.1"
    assert json.loads(level_up["eventParams_extra"]) == {"level": 4, "stars": 3}
    assert json.loads(level_up["event_extra"])["schema"] == LEVEL_UP
    start = next(r for r in stored.values() if r["eventName"] == "level_start" and
                 r["eventParams"]["device_id"] == "device-c")
    assert start["eventParams"]["platform"] == "mob"  # no mobile context: the tracker's p
    assert json.loads(start["eventParams_extra"]) == {"category": "progress", "label": "level-2",
                                                      "property": "normal", "value": 2.0}

    days = kpi_daily(data)
    assert len(days) == 1
    (day,) = days.values()
    assert day["dau"] == 3 and day["events"] == len(sent.delivered)
    assert day["bookings"] == pytest.approx(4.99 + 9.99 + 19.99, abs=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("status", [503, 429])
def test_the_trackers_own_retries_through_refusals_land_each_event_once(tmp_path: Path, status: int) -> None:
    data = tmp_path / "data"
    sent = Sent()
    with collector(data) as server, RefusingFront(server.url, refusals=2, status=status) as front:
        post = emitter(front.url, sent, batch_size=3)
        tracker = device_tracker(post, device="device-r", user="user-r")
        play_session(tracker, mobile_context("Android"), level=1)  # 3 events: a full batch, sent at once
        # 1st attempt refused, retried after its backoff (< 1 s), refused again (< 3 s more), then passed
        wait_until(lambda: len(sent.delivered) == 3 and post.event_store.size() == 0
                   and not post.retry_timer.is_active(), timeout=30, every=0.1)
        assert front.refused == 2 and set(front.paths) == {TP2}
        assert len(sent.failed) == 2 * 3 and len(sent.delivered) == 3
        # An answer lost on the way back makes a tracker send the same batch again: replayed by hand, it lands once.
        replay = httpx.post(server.url + TP2, json={"schema": PAYLOAD_DATA, "data": sent.delivered})
        assert replay.status_code == 200 and replay.json()["accepted"] == 3
    process(data)
    stored = by_id(events(data))
    assert set(stored) == {p["eid"] for p in sent.delivered}


@pytest.mark.slow
def test_a_collector_over_its_backlog_answers_503_and_the_tracker_retries_until_it_is_processed(
        tmp_path: Path) -> None:
    data = tmp_path / "data"
    sent = Sent()
    with collector(data, env={"GAMESTREAM_MAX_BACKLOG_EVENTS": "2"}) as server:
        post = emitter(server.url, sent, batch_size=3)
        tracker = device_tracker(post, device="device-q", user="user-q")
        play_session(tracker, [], level=1)  # accepted: the backlog was 0
        wait_until(lambda: len(sent.delivered) == 3, timeout=10)
        wait_until(lambda: httpx.post(server.url + TP2, json={"schema": PAYLOAD_DATA, "data": []}).status_code
                   == 503, timeout=10)  # the backlog (3 > 2) is re-read every 0.5 s
        refused = httpx.post(server.url + TP2, json={"schema": PAYLOAD_DATA, "data": []})
        assert refused.status_code == 503 and "backlog" in refused.json()["error"]
        assert refused.headers["Retry-After"] == "1"
        play_session(tracker, [], level=2)  # refused: the tracker keeps them and retries with its backoff
        assert len(sent.failed) >= 3 and len(sent.delivered) == 3
        process(data)  # the backlog drains; the tracker's next retry passes
        wait_until(lambda: len(sent.delivered) == 6 and post.event_store.size() == 0, timeout=40, every=0.2)
    process(data)
    assert set(by_id(events(data))) == {p["eid"] for p in sent.delivered}


def test_a_keyed_collector_refuses_a_tracker_without_the_key_and_takes_it_from_its_session_headers(
        tmp_path: Path) -> None:
    key = "k-" + uuid.uuid4().hex
    sent = Sent()
    with collector(tmp_path / "data", env={"GAMESTREAM_API_KEYS": key}) as server:
        keyless = emitter(server.url, sent, batch_size=1)
        device_tracker(keyless, device="device-k", user="user-k").track(
            StructuredEvent(category="c", action="keyless"))
        # 401 is one of the statuses the tracker does not retry: the event is dropped, not retried for ever
        assert len(sent.failed) == 1 and not keyless.retry_timer.is_active() and keyless.event_store.size() == 0
        answer = httpx.post(server.url + TP2, json={"schema": PAYLOAD_DATA, "data": []})
        assert answer.status_code == 401 and "X-API-Key" in answer.json()["error"] and key not in answer.text
        wrong = httpx.get(server.url + "/i", params={"e": "se", "se_ac": "x", "duid": "d"},
                          headers={"X-API-Key": "wrong-" + key})
        assert wrong.status_code == 401 and key not in wrong.text

        session = requests.Session()
        session.headers["X-API-Key"] = key  # the Python tracker's way to send a header: its requests session
        keyed = emitter(server.url, sent, batch_size=1, session=session)
        device_tracker(keyed, device="device-k", user="user-k").track(StructuredEvent(category="c", action="keyed"))
        assert len(sent.delivered) == 1 and sent.delivered[0]["se_ac"] == "keyed"


# -------------------------------------------------------------------------------------- hand-written requests
def b64url(value: object, *, padded: bool = False) -> str:
    text = base64.urlsafe_b64encode(json.dumps(value).encode()).decode()
    return text if padded else text.rstrip("=")


def se(eid: str, action: str, **more: str) -> dict:
    return {"e": "se", "eid": eid, "se_ca": "shop", "se_ac": action, "duid": "device-h", "p": "mob",
            "dtm": "1767225600000", "stm": "1767225601000", "tv": "py-1.1.0", **more}


def test_hand_written_requests_get_the_pixel_the_preflight_and_readable_400s(tmp_path: Path) -> None:
    data = tmp_path / "data"
    unstruct = {"schema": "iglu:com.snowplowanalytics.snowplow/unstruct_event/jsonschema/1-0-0",
                "data": {"schema": PURCHASE, "data": {"revenue": "2.50", "sku": "gems"}}}
    contexts = {"schema": "iglu:com.snowplowanalytics.snowplow/contexts/jsonschema/1-0-1",
                "data": [{"schema": MOBILE_CONTEXT, "data": {"osType": "android", "appleIdfv": "ignored"}}]}
    with collector(data) as server:
        # GET /i as the JavaScript tracker sends it: ue_px and cx base64url without padding, numbers as text
        pixel = httpx.get(server.url + "/i", params={
            "e": "ue", "eid": "pixel-1", "ue_px": b64url(unstruct), "cx": b64url(contexts), "duid": "device-p",
            "uid": "user-p", "p": "web", "aid": "web-shop", "dtm": "1767225600000", "stm": "1767225600500"})
        assert pixel.status_code == 200 and pixel.headers["content-type"] == "image/gif"
        assert pixel.content.startswith(b"GIF89a")

        preflight = httpx.options(server.url + TP2, headers={
            "Origin": "https://game.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://game.example"
        assert preflight.headers["access-control-allow-credentials"] == "true"
        assert "content-type" in preflight.headers["access-control-allow-headers"].lower()

        def post(body: object, **kwargs: object) -> httpx.Response:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            return httpx.post(server.url + TP2, content=content, headers={
                "Content-Type": "application/json; charset=utf-8", "Origin": "https://game.example"}, **kwargs)

        not_json = post(b"{not json")
        assert not_json.status_code == 400 and "not JSON" in not_json.json()["error"]
        assert not_json.headers["access-control-allow-origin"] == "https://game.example"
        assert "payload_data envelope" in post([se("x", "y")]).json()["error"]
        assert "schema must be" in post({"schema": "iglu:com.acme/other/jsonschema/1-0-0", "data": []}).json()["error"]

        mixed = post({"schema": PAYLOAD_DATA, "data": [
            se("ok-1", "level_start"), {"e": "se", "eid": "bad-1", "duid": "d"}, {"e": "xx", "duid": "d"},
            {"e": "ue", "ue_px": "%%%", "duid": "d"}, se("ok-2", "purchase", se_va="1.25"), "not a map",
            {"e": "se", "se_ac": "nobody"}]})
        assert mixed.status_code == 200
        answer = mixed.json()
        assert (answer["accepted"], answer["rejected"]) == (2, 5)
        reasons = {e["index"]: e["error"] for e in answer["errors"]}
        assert "se_ac" in reasons[1] and "e='xx'" in reasons[2] and "ue_px is not base64url" in reasons[3]
        assert "map of tracker-protocol parameters" in reasons[5] and "neither a device id" in reasons[6]

        nothing = post({"schema": PAYLOAD_DATA, "data": [{"e": "pv", "duid": "d", "dtm": "x", "eid": "y" * 200}]})
        assert nothing.status_code == 400 and nothing.json()["rejected"] == 1
        assert "eventId" in nothing.json()["errors"][0]["error"]
        bad_pixel = httpx.get(server.url + "/i", params={"e": "ue", "ue_pr": "{", "duid": "d"})
        assert bad_pixel.status_code == 400 and "ue_pr is not JSON" in bad_pixel.json()["error"]
        assert httpx.get(server.url + "/i").status_code == 400
    process(data)

    stored = by_id(events(data))
    assert set(stored) == {"pixel-1", "ok-1", "ok-2"}
    pixel_row = stored["pixel-1"]
    assert pixel_row["eventName"] == "purchaseEvent" and pixel_row["eventParams"]["amount"] == 2.5
    assert pixel_row["eventParams"]["device_id"] == "device-p"  # duid before the mobile context's ids
    assert pixel_row["eventParams"]["platform"] == "android" and pixel_row["eventParams"]["app_name"] == "web-shop"
    extra = json.loads(pixel_row["event_extra"])
    assert extra["schema"] == PURCHASE and extra["contexts"] == contexts["data"]
    assert extra["snowplow"] == {"duid": "device-p", "uid": "user-p", "p": "web"}
    assert stored["ok-2"]["eventName"] == "purchaseEvent" and stored["ok-2"]["eventParams"]["amount"] == 1.25
    assert stored["ok-1"]["eventParams"]["client_event_time"] == dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def test_the_mapping_follows_compat_snowplow_in_the_configuration_file(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "gamestream.toml").write_text('[compat.snowplow]\nplayer = "user"\npurchases = ["buy_gems"]\n'
                                          'amount = ["value"]\nrename = { label = "sku" }\n')
    with collector(data) as server:
        answer = httpx.post(server.url + TP2, json={"schema": PAYLOAD_DATA, "data": [
            se("u-1", "buy_gems", uid="user-7", se_va="3", se_la="gems_300"),
            se("u-2", "purchase", se_va="5")]})
        assert answer.status_code == 200 and answer.json()["accepted"] == 2
    process(data)
    stored = by_id(events(data))
    assert stored["u-1"]["eventName"] == "purchaseEvent" and stored["u-1"]["eventParams"]["amount"] == 3.0
    assert stored["u-1"]["eventParams"]["device_id"] == "user-7"  # player = "user"
    assert json.loads(stored["u-1"]["eventParams_extra"])["sku"] == "gems_300"
    assert stored["u-2"]["eventName"] == "purchase"  # no longer a purchase by this mapping
    assert stored["u-2"]["eventParams"]["device_id"] == "device-h"  # no uid: falls back to the device

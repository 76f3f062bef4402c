"""PostHog's capture protocol (gamestream.api.compat.posthog): the real posthog-python SDK and posthog-js in a real
headless Chromium, against a real `gamestream serve`, then `gamestream process`; the events land once with their
mapped fields, the KPIs count them, the SDKs' retries after a refusal land nothing twice."""

from __future__ import annotations

import base64
import datetime as dt
import gzip
import http.server
import json
import subprocess
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlencode

import httpx
import pytest

from compat_harness import RefusingFront, collector, events, kpi_daily, process, wait_until

ROOT = Path(__file__).resolve().parents[1]
KEY = "phc_gamestream_test_write_key"  # a write key made up for these tests
UTC = dt.timezone.utc
YESTERDAY_NOON = dt.datetime.combine(dt.datetime.now(UTC).date() - dt.timedelta(days=1), dt.time(12), UTC)


def posthog_client(url: str, key: str = KEY, **options):
    from posthog import Posthog

    return Posthog(key, host=url, flush_at=50, flush_interval=0.2, disable_geoip=True, **options)


def extra(row: dict) -> dict:
    return json.loads(row["eventParams_extra"] or "{}")


def by_id(rows: list[dict]) -> dict[str, dict]:
    ids = [row["eventId"] for row in rows]
    assert len(ids) == len(set(ids)), "an event landed twice"
    return {row["eventId"]: row for row in rows}


def post(url: str, body: bytes | str, *, headers: dict | None = None) -> httpx.Response:
    return httpx.post(url, content=body, headers=headers or {"Content-Type": "application/json"}, timeout=30)


def event(name: str, player: str, **fields) -> dict:
    return {"event": name, "distinct_id": player, "uuid": str(uuid.uuid4()),
            "timestamp": YESTERDAY_NOON.isoformat(), **fields}


# ------------------------------------------------------------------------------------------ the Python SDK
def play_sessions(client, players: list[str]) -> dict[str, dict]:
    """A session per player yesterday at noon: start, levels, a purchase for every other one, a person update
    and a group; uuid → what was sent."""
    sent: dict[str, dict] = {}
    for number, player in enumerate(players):
        start = YESTERDAY_NOON + dt.timedelta(minutes=number)
        device = {"platform": "android", "$app_version": "2.4.1"}  # a game server names the player's platform
        steps = [("session_start", device), ("level_up", {"level": 3, **device})]
        if number % 2 == 0:
            steps.append(("purchase", {"revenue": 4.99 + number, "currency": "USD", **device}))
        for step, (name, properties) in enumerate(steps):
            at = start + dt.timedelta(seconds=10 * step)
            event_id = client.capture(name, distinct_id=player, properties=properties, timestamp=at)
            sent[event_id] = {"name": name, "player": player, "at": at, "properties": properties}
        event_id = client.set(distinct_id=player, properties={"plan": "free"}, timestamp=start)
        sent[event_id] = {"name": "$set", "player": player, "at": start, "properties": {}}
    return sent


def test_the_python_sdk_lands_each_event_once_with_its_mapped_fields_and_the_kpis_count_them(
        tmp_path: Path) -> None:
    data = tmp_path / "data"
    players = [f"player-{n}" for n in range(5)]
    errors: list[Exception] = []
    with collector(data, "--api-key", KEY) as server:
        plain, gzipped = (posthog_client(server.url, on_error=lambda e, batch: errors.append(e), gzip=gz)
                          for gz in (False, True))
        sent = play_sessions(plain, players[:3])
        sent.update(play_sessions(gzipped, players[3:]))
        gzipped.group_identify("guild", "dragons", {"members": 2}, distinct_id=players[3],
                               timestamp=YESTERDAY_NOON)
        plain.shutdown()
        gzipped.shutdown()
    assert errors == []
    process(data)

    rows = by_id(events(data))
    assert set(sent) <= set(rows)
    for event_id, what in sent.items():
        row = rows[event_id]
        params = row["eventParams"]
        assert params["device_id"] == what["player"]
        assert params["client_event_time"].replace(tzinfo=UTC) == what["at"]
        assert row["sentAt"] is not None and abs(row["sentAt"].replace(tzinfo=UTC) - dt.datetime.now(UTC)) \
            < dt.timedelta(minutes=5)
        assert abs(row["eventTime"].replace(tzinfo=UTC) - what["at"]) < dt.timedelta(minutes=1)  # clock-corrected
        assert KEY not in json.dumps(extra(row)) and KEY not in (row["event_extra"] or "")
        if what["name"] == "purchase":
            assert row["eventName"] == "purchaseEvent" and extra(row)["vendor_event"] == "purchase"
            assert params["amount"] == what["properties"]["revenue"] and params["platform"] == "android"
        else:
            assert row["eventName"] == what["name"]
        if what["name"] == "level_up":
            assert params["app_version"] == "2.4.1" and extra(row)["level"] == 3
    groups = [row for row in rows.values() if row["eventName"] == "$groupidentify"]
    assert len(groups) == 1 and extra(groups[0])["$group_type"] == "guild"
    person = next(row for row in rows.values() if row["eventName"] == "$set")
    assert json.loads(person["event_extra"])["$set"] == {"plan": "free"}
    assert person["eventParams"]["platform"] == "posthog-python"  # neither platform nor $os: the SDK ($lib)

    day = kpi_daily(data)[YESTERDAY_NOON.date()]
    assert day["dau"] == len(players)
    assert day["bookings"] == pytest.approx(sum(what["properties"]["revenue"] for what in sent.values()
                                                if what["name"] == "purchase"))


def test_the_python_sdk_retries_through_503_and_429_and_nothing_lands_twice(tmp_path: Path) -> None:
    data = tmp_path / "data"
    errors: list[Exception] = []
    sent: dict[str, dict] = {}
    with collector(data) as server:
        for status in (503, 429):
            with RefusingFront(server.url, refusals=2, status=status) as front:
                client = posthog_client(front.url, on_error=lambda e, batch: errors.append(e), max_retries=3)
                sent.update(play_sessions(client, [f"retry-{status}-a", f"retry-{status}-b"]))
                client.shutdown()
            assert front.refused == 2 and front.passed >= 1, status  # the SDK met the refusals and came back
            assert all(path == "/batch/" for path in front.paths)
    assert errors == []
    process(data)
    rows = by_id(events(data))
    assert set(rows) == set(sent)


def test_a_backlog_over_its_bound_gets_503_with_retry_after_which_the_sdk_retries(tmp_path: Path) -> None:
    data = tmp_path / "data"
    errors: list[Exception] = []
    env = {"GAMESTREAM_MAX_BACKLOG_EVENTS": "5", "GAMESTREAM_RETRY_AFTER_S": "2"}
    with collector(data, env=env) as server:
        filler = [event("filler", f"f-{n}") for n in range(10)]
        assert post(server.url + "/batch/", json.dumps({"api_key": "k", "batch": filler})).status_code == 200

        def busy() -> bool:
            return post(server.url + "/e/", json.dumps(event("probe", "p"))).status_code == 503
        wait_until(busy, timeout=10)
        refused = post(server.url + "/e/", json.dumps(event("probe", "p")))
        assert refused.headers["Retry-After"] == "2" and "backlog" in refused.json()["detail"]
        assert refused.headers["Access-Control-Allow-Origin"] == "*"

        client = posthog_client(server.url, on_error=lambda e, batch: errors.append(e), max_retries=5)
        event_id = client.capture("after_backlog", distinct_id="late-player", timestamp=YESTERDAY_NOON)
        time.sleep(1.5)  # the SDK's first attempt meets the backlog; then the processor catches up
        process(data)
        client.shutdown()
    assert errors == []
    process(data)
    assert event_id in by_id(events(data))


def test_a_wrong_or_missing_key_is_refused_with_401_and_the_key_is_never_echoed(tmp_path: Path) -> None:
    data = tmp_path / "data"
    errors: list[Exception] = []
    with collector(data, "--api-key", KEY) as server:
        client = posthog_client(server.url, key="phc_not_the_key", on_error=lambda e, batch: errors.append(e))
        client.capture("level_up", distinct_id="intruder")
        client.shutdown()
        url = server.url + "/e/"
        no_key = post(url, json.dumps(event("level_up", "p")))
        wrong_in_properties = post(url, json.dumps(event("level_up", "p", properties={"token": "phc_wrong"})))
        right = post(url, json.dumps({"api_key": KEY, "batch": [event("level_up", "p",
                                                                          properties={"token": KEY})]}))
        smuggled = post(url, json.dumps({"api_key": KEY, "batch": [event("level_up", "p", api_key="phc_wrong")]}))
    assert len(errors) == 1 and errors[0].status == 401 and "API key" in errors[0].message  # not retried
    for answer in (no_key, wrong_in_properties, smuggled):
        assert answer.status_code == 401 and answer.json()["type"] == "authentication_error"
        assert "phc_wrong" not in answer.text and KEY not in answer.text
    assert right.status_code == 200 and right.json()["status"] == 1 and KEY not in right.text
    process(data)
    rows = events(data)
    assert [row["eventParams"]["device_id"] for row in rows] == ["p"]
    assert KEY not in json.dumps(rows, default=str)  # properties.token is not stored


# ----------------------------------------------------------------------------------- hand-written requests
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with collector(tmp_path_factory.mktemp("posthog") / "data") as running:
        yield running


def test_posthog_js_encodings_and_every_capture_path_are_read(server) -> None:
    sent = {name: event(name, "enc-player", properties={"$os": "iOS", "$lib": "posthog-ios", "token": "t"})
            for name in ("gzip_js", "gzip_magic", "base64_form", "plain_form", "array", "single", "capture",
                         "no_slash", "content_encoding", "v0", "track")}
    text_plain = {"Content-Type": "text/plain"}
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    envelope = lambda *events: json.dumps({"api_key": "t", "batch": list(events),  # noqa: E731
                                            "sent_at": dt.datetime.now(UTC).isoformat()})
    answers = {
        "gzip_js": post(server.url + "/e/?compression=gzip-js&ip=0&ver=1.449.2",
                        gzip.compress(envelope(sent["gzip_js"]).encode()), headers=text_plain),
        "gzip_magic": post(server.url + "/e/?ip=0&ver=1.449.2", gzip.compress(envelope(sent["gzip_magic"]).encode()),
                           headers=text_plain),
        "base64_form": post(server.url + "/e/?compression=base64", urlencode(
            {"data": base64.b64encode(envelope(sent["base64_form"]).encode()).decode()}), headers=form),
        "plain_form": post(server.url + "/e/", urlencode({"data": json.dumps(sent["plain_form"])}), headers=form),
        "array": post(server.url + "/i/v0/e/", json.dumps([sent["array"]])),
        "single": post(server.url + "/i/v0/e", json.dumps(sent["single"])),
        "capture": post(server.url + "/capture/", json.dumps({"api_key": "t", **sent["capture"]})),
        "no_slash": post(server.url + "/e", envelope(sent["no_slash"])),
        "content_encoding": post(server.url + "/batch/", gzip.compress(envelope(sent["content_encoding"]).encode()),
                                 headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}),
        "v0": post(server.url + "/i/v0/e/?compression=gzip-js", gzip.compress(envelope(sent["v0"]).encode()),
                   headers=text_plain),
        "track": post(server.url + "/track/", envelope(sent["track"])),
    }
    for name, answer in answers.items():
        assert answer.status_code == 200, (name, answer.text)
        assert answer.json() == {"status": 1, "accepted": 1, "rejected": 0, "errors": []}
    again = post(server.url + "/e/", envelope(sent["array"], sent["single"]))  # an SDK's retry of both
    assert again.status_code == 200

    lz64 = post(server.url + "/e/?compression=lz64", "data=N4Ig", headers=form)
    not_json = post(server.url + "/e/", "{not json")
    cut_gzip = post(server.url + "/e/?compression=gzip-js", gzip.compress(b'{"batch": []}')[:-6], headers=text_plain)
    partly = post(server.url + "/batch/", envelope(event("ok", "p1"), event("no_player", ""),
                                                   {"distinct_id": "p2"}, "not an object"))
    nothing = post(server.url + "/batch/", envelope({"distinct_id": "p2"}))
    empty = post(server.url + "/batch/", envelope())
    assert lz64.status_code == 400 and "lz64" in lz64.json()["detail"]
    assert not_json.status_code == 400 and "not valid JSON" in not_json.json()["detail"]
    assert cut_gzip.status_code == 400 and "gzip" in cut_gzip.json()["detail"]
    assert partly.status_code == 200 and partly.json()["accepted"] == 1 and partly.json()["rejected"] == 3
    reasons = {e["index"]: e["error"] for e in partly.json()["errors"]}
    assert "neither a device id nor a user id" in reasons[1] and "no name" in reasons[2]
    assert "not a JSON object" in reasons[3]
    assert nothing.status_code == 400 and nothing.json()["code"] == "invalid_payload"
    assert "no name" in nothing.json()["detail"]
    assert empty.status_code == 400

    process(server.data_dir)
    rows = by_id([row for row in events(server.data_dir) if row["eventParams"]["device_id"] == "enc-player"])
    assert set(rows) == {e["uuid"] for e in sent.values()}  # each once, the retried two included
    for name, sent_event in sent.items():
        row = rows[sent_event["uuid"]]
        assert row["eventName"] == name and row["eventParams"]["platform"] == "ios"
        assert "token" not in extra(row)


def test_too_many_events_get_413_and_a_big_gzip_body_is_not_inflated_past_the_limit(server) -> None:
    many = json.dumps({"api_key": "t", "batch": [event("e", "p") for _ in range(501)]})
    answer = post(server.url + "/batch/", many)
    assert answer.status_code == 413 and "limit" in answer.json()["detail"]
    bomb = gzip.compress(b'{"batch": [' + b" " * (2 * 1024 * 1024) + b"]}")
    answer = post(server.url + "/e/?compression=gzip-js", bomb, headers={"Content-Type": "text/plain"})
    assert answer.status_code == 413 and answer.json()["code"] == "payload_too_large"


def test_cors_preflight_and_the_start_up_calls_of_posthog_js_are_answered(server) -> None:
    origin = {"Origin": "http://game.example", "Access-Control-Request-Method": "POST",
              "Access-Control-Request-Headers": "content-type"}
    for path in ("/e/", "/i/v0/e/", "/batch/", "/flags/"):
        answer = httpx.options(server.url + path, headers=origin)
        assert answer.status_code in (200, 204), path
        assert answer.headers["Access-Control-Allow-Origin"] == "*"
        assert "POST" in answer.headers["Access-Control-Allow-Methods"]
        assert answer.headers["Access-Control-Allow-Headers"] == "content-type"
    assert "access-control-allow-origin" not in httpx.get(server.url + "/healthz", headers=origin).headers

    flags = httpx.post(server.url + "/flags/?v=2&config=true", json={"token": "secret-token", "distinct_id": "p"})
    decide = httpx.post(server.url + "/decide/?v=3", json={"token": "secret-token", "distinct_id": "p"})
    config = httpx.get(server.url + "/array/secret-token/config")
    script = httpx.get(server.url + "/array/secret-token/config.js")
    for answer in (flags, decide, config, script):
        assert answer.status_code == 200 and "secret-token" not in answer.text
        assert answer.headers["Access-Control-Allow-Origin"] == "*"
    assert flags.json()["featureFlags"] == {} and decide.json()["featureFlags"] == {}
    assert config.json()["supportedCompression"] == ["gzip", "gzip-js"] and config.json()["sessionRecording"] is False
    assert "_POSTHOG_REMOTE_CONFIG" in script.text


def test_batch_with_or_without_a_slash_takes_posthog_bodies_and_amplitude_keeps_its_own(server) -> None:
    """posthog-python posts to /batch/; PostHog's Unity, Android and iOS SDKs to /batch, which is also Amplitude's
    batch API: a PostHog body there is answered as PostHog, an Amplitude body as Amplitude, never redirected."""
    answer = post(server.url + "/batch/", json.dumps({"api_key": "t", "batch": [event("slash", "s")]}))
    assert answer.status_code == 200 and answer.json()["status"] == 1
    mobile = httpx.post(server.url + "/batch", follow_redirects=False, content=gzip.compress(json.dumps(
        {"api_key": "t", "batch": [event("mobile_batch", "m-1")]}).encode()),
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert mobile.status_code == 200 and mobile.json()["status"] == 1
    other = httpx.post(server.url + "/batch", json={"api_key": "t", "events": []}, follow_redirects=False)
    assert other.status_code == 400 and other.json()["missing_field"] == "events"  # Amplitude's answer
    process(server.data_dir)
    assert {row["eventName"] for row in events(server.data_dir)} >= {"slash", "mobile_batch"}


# ---------------------------------------------------------------------------------------------- posthog-js
PAGE = """<!doctype html><html><head><script src="/posthog.js"></script></head><body><script>
posthog.init(%(key)s, {api_host: %(host)s, request_batching: false, autocapture: false,
  capture_pageview: true, capture_pageleave: false, disable_session_recording: true, disable_surveys: true,
  opt_out_useragent_filter: true, persistence: 'memory',  // headless Chromium's user agent reads as a bot
  loaded: function (ph) {
    ph.identify('browser-player', {plan: 'whale'});
    ph.capture('level_up', {level: 7});
    ph.capture('purchase', {revenue: 9.99, currency: 'EUR'});
    window.sentIds = 'done';
  }});
</script></body></html>"""


def posthog_js() -> Path:
    """dist/array.js of the pinned posthog-js, fetched from the npm registry by scripts/fetch-posthog-js."""
    completed = subprocess.run([str(ROOT / "scripts" / "fetch-posthog-js")], capture_output=True, text=True,
                               timeout=300, check=True)
    return Path(completed.stdout.strip().splitlines()[-1]) / "dist" / "array.js"


class Page:
    """The game's web page on its own origin (a loopback port of its own), loading posthog-js from disk."""

    def __init__(self, html: str, bundle: Path) -> None:
        files = {"/": (html.encode(), "text/html"), "/posthog.js": (bundle.read_bytes(), "application/javascript")}

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                body, kind = files.get(self.path, (b"", "text/plain"))
                self.send_response(200 if body else 404)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.mark.slow
def test_posthog_js_in_a_browser_lands_a_session_with_a_purchase_once(tmp_path: Path) -> None:
    from browser import chromium

    bundle = posthog_js()
    data = tmp_path / "data"
    uploads: list[tuple[str | None, bytes]] = []  # (Content-Type, body) of each capture request
    with collector(data, "--api-key", KEY) as server:
        front = RefusingFront(server.url, refusals=0)
        with front:
            page_server = Page(PAGE % {"key": json.dumps(KEY), "host": json.dumps(front.url)}, bundle)
            try:
                with chromium() as browser:
                    page = browser.new_page()
                    page.on("request", lambda request: uploads.append(
                        (request.headers.get("content-type"), request.post_data_buffer or b""))
                        if request.method == "POST" and "/e/" in request.url else None)
                    page.goto(page_server.url)
                    page.wait_for_function("window.sentIds === 'done'", timeout=30_000)
                    wait_until(lambda: sum(path.startswith(("/e/", "/i/v0/e/")) for path in front.paths) >= 4,
                               timeout=30)
                    time.sleep(1)  # the answers of the last requests
            finally:
                page_server.close()
    assert any(path.startswith("/array/") for path in front.paths)  # the remote config was read…
    assert uploads and all(kind == "text/plain" and body[:2] == b"\x1f\x8b" for kind, body in uploads)  # …gzip-js
    process(data)
    rows = by_id(events(data))
    names = sorted(row["eventName"] for row in rows.values())
    assert names == ["$identify", "$pageview", "level_up", "purchaseEvent"], names
    devices = {row["eventParams"]["device_id"] for row in rows.values()}
    assert len(devices) == 1 and devices != {"browser-player"}  # the anonymous $device_id, kept across identify
    purchase = next(row for row in rows.values() if row["eventName"] == "purchaseEvent")
    assert purchase["eventParams"]["amount"] == 9.99 and purchase["eventParams"]["platform"] == "web"
    assert json.loads(purchase["event_extra"])["distinct_id"] == "browser-player"
    assert purchase["sentAt"] is not None and purchase["eventParams"]["client_event_time"] is not None
    assert all(KEY not in (row["eventParams_extra"] or "") for row in rows.values())
    day = kpi_daily(data)[purchase["eventDate"]]
    assert day["dau"] == 1 and day["bookings"] == pytest.approx(9.99)

"""The HTTP collector, on a real server on a loopback port, into real SQLite and Delta files."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import time
from pathlib import Path

import httpx
import pytest

from collector_server import ServeProcess, stored_events
from conftest import gamestream, table_rows

NDJSON = {"Content-Type": "application/x-ndjson"}


def ev(event_id: str, **params) -> dict:
    return {"eventId": event_id, "eventName": "levelStart", "eventParams": {"device_id": f"dev-{event_id}", **params}}


def ndjson(*events) -> bytes:
    return b"\n".join(e if isinstance(e, bytes) else json.dumps(e).encode() for e in events)



@pytest.fixture
def collector(tmp_path: Path):
    server = ServeProcess(tmp_path / "data")
    yield server
    server.stop()


def test_mixed_ndjson_gets_exact_per_index_errors_and_only_valid_events_reach_the_table(collector) -> None:
    body = ndjson(
        ev("good-0"),
        b'{"eventName": "levelEnd", "eventParams": {"device_id": "d", "amo',  # truncated line
        ev("wrong-type", scoreAdjustment="high"),
        {"eventId": "wrong-nested", "eventName": "x", "eventParams": {"device_id": {"id": 1}}},
        ev("huge", app_name="x" * 100 * 1024),
        ev("good-5", amount=1.5),
        {"eventId": "good-6", "eventName": "purchaseEvent", "eventTime": 1700000000,
         "eventParams": {"device_id": "d6", "amount": 4.99}},
    )
    before = dt.datetime.now(dt.timezone.utc)
    response = httpx.post(collector.url + "/v1/events", content=body, headers=NDJSON)
    assert response.status_code == 200
    assert response.json() == {
        "accepted": 3,
        "rejected": 4,
        "errors": [
            {"index": 1, "error": "invalid JSON: input data was truncated"},
            {"index": 2, "error": "eventParams.scoreAdjustment: expected int | null, got str"},
            {"index": 3, "error": "eventParams.device_id: expected str, got object"},
            {"index": 4, "error": f"event is {len(json.dumps(ev('huge', app_name='x' * 100 * 1024)))} bytes, "
                                  "over the 32768-byte limit"},
        ],
    }
    gamestream("process", "--until-idle", data_dir=collector.data_dir)
    rows = {r["eventId"]: r for r in table_rows(collector.data_dir / "tables" / "events")}
    assert sorted(rows) == ["good-0", "good-5", "good-6"]
    # eventTime is the server's receive time; the client's own time is kept as client_event_time
    assert before <= rows["good-6"]["eventTime"] <= dt.datetime.now(dt.timezone.utc)
    assert rows["good-6"]["eventParams"]["client_event_time"] == dt.datetime.fromtimestamp(1700000000, dt.timezone.utc)


def test_json_object_array_and_gzip_bodies_are_taken_and_ids_assigned(collector) -> None:
    url = collector.url + "/v1/events"
    assert httpx.post(url, json=ev("single")).json()["accepted"] == 1
    assert httpx.post(url, json=[ev("a1"), ev("a2"), {"eventName": "x"}]).json() == {
        "accepted": 2, "rejected": 1, "errors": [{"index": 2, "error": "eventParams: required"}]}
    zipped = gzip.compress(ndjson(ev("z1"), ev("z2")))
    answer = httpx.post(url, content=zipped, headers={**NDJSON, "Content-Encoding": "gzip"})
    assert answer.json()["accepted"] == 2
    no_id = {"eventName": "levelStart", "eventParams": {"device_id": "d"}}
    assert httpx.post(url, json=no_id).json()["accepted"] == 1
    gamestream("process", "--until-idle", data_dir=collector.data_dir)
    ids = [r["eventId"] for r in table_rows(collector.data_dir / "tables" / "events")]
    assert {"single", "a1", "a2", "z1", "z2"} < set(ids) and len(ids) == 6
    (assigned,) = set(ids) - {"single", "a1", "a2", "z1", "z2"}
    assert assigned[14] == "7"  # a UUIDv7


@pytest.mark.parametrize(
    ("body", "headers", "status", "message"),
    [
        (b'{"eventName": ', {"Content-Type": "application/json"}, 400, "no valid event"),
        (b'[{"eventName": "x"', {"Content-Type": "application/json"}, 400, "not a valid JSON array"),
        (b"   ", NDJSON, 400, "body is empty"),
        (ndjson({"eventName": "x"}, b"nope"), NDJSON, 400, "no valid event"),
        (b"not gzip", {**NDJSON, "Content-Encoding": "gzip"}, 400, "not valid gzip"),
        (b"x" * (1024 * 1024 + 1), NDJSON, 413, "over the 1,048,576-byte limit"),
        (ndjson(*[ev(f"e{i}") for i in range(501)]), NDJSON, 413, "501 events in one request; the limit is 500"),
        (gzip.compress(b" " * (3 * 1024 * 1024)), {**NDJSON, "Content-Encoding": "gzip"}, 413,
         "decompressed body is over"),
        (ndjson(ev("t")), {"Content-Type": "text/plain"}, 415, "content type 'text/plain' is not taken"),
        (ndjson(ev("b")), {**NDJSON, "Content-Encoding": "br"}, 415, "content encoding 'br' is not taken"),
    ],
)
def test_unusable_requests_get_a_readable_error_and_store_nothing(collector, body, headers, status, message) -> None:
    response = httpx.post(collector.url + "/v1/events", content=body, headers=headers)
    assert response.status_code == status
    assert message in response.json()["error"]
    assert stored_events(collector.data_dir) == 0


def test_write_keys_are_required_when_configured(tmp_path: Path) -> None:
    server = ServeProcess(tmp_path / "data", "--api-key", "k-one", env={"GAMESTREAM_API_KEYS": "ignored"})
    try:
        url = server.url + "/v1/events"
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "k-on"}, {"Authorization": "k-one"}):
            response = httpx.post(url, json=ev("x"), headers=headers)
            assert response.status_code == 401 and "API key" in response.json()["error"]
        assert stored_events(server.data_dir) == 0
        assert httpx.post(url, json=ev("b"), headers={"Authorization": "Bearer k-one"}).status_code == 200
        assert httpx.post(url, json=ev("x"), headers={"X-API-Key": "k-one"}).status_code == 200
        assert stored_events(server.data_dir) == 2
    finally:
        server.stop()


def test_backlog_over_its_bound_gets_503_with_retry_after_and_stores_nothing(tmp_path: Path) -> None:
    server = ServeProcess(tmp_path / "data", env={"GAMESTREAM_MAX_BACKLOG_EVENTS": "10",
                                                  "GAMESTREAM_RETRY_AFTER_S": "3"})
    try:
        url = server.url + "/v1/events"
        assert httpx.post(url, content=ndjson(*[ev(f"e{i}") for i in range(20)]), headers=NDJSON).status_code == 200
        deadline = time.monotonic() + 10
        while (response := httpx.post(url, json=ev("late"))).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.2)  # the backlog is re-read every 0.5 s
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "3"
        assert "backlog" in response.json()["error"]
        accepted_before_503 = stored_events(server.data_dir)
        assert httpx.post(url, json=ev("refused")).status_code == 503
        assert stored_events(server.data_dir) == accepted_before_503
        gamestream("process", "--until-idle", data_dir=server.data_dir)  # the processor catches up…
        deadline = time.monotonic() + 10
        while (response := httpx.post(url, json=ev("again"))).status_code == 503 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert response.status_code == 200  # …and the collector takes events again
    finally:
        server.stop()


def test_the_same_idempotency_key_twice_stores_the_events_once(collector) -> None:
    url = collector.url + "/v1/events"
    headers = {**NDJSON, "Idempotency-Key": "batch-42"}
    first = httpx.post(url, content=ndjson(ev("i1"), ev("i2"), {"eventName": "bad"}), headers=headers)
    again = httpx.post(url, content=ndjson(ev("i1"), ev("i2"), {"eventName": "bad"}), headers=headers)
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json() == {"accepted": 2, "rejected": 1,
                                            "errors": [{"index": 2, "error": "eventParams: required"}]}
    assert again.headers["Idempotent-Replayed"] == "true"
    gamestream("process", "--until-idle", data_dir=collector.data_dir)
    assert sorted(r["eventId"] for r in table_rows(collector.data_dir / "tables" / "events")) == ["i1", "i2"]


def test_health_metrics_and_openapi_describe_the_service(collector) -> None:
    health = httpx.get(collector.url + "/healthz")
    assert health.status_code == 200
    assert health.json()["status"] == "ok" and health.json()["log"] == "writable"
    httpx.post(collector.url + "/v1/events", content=ndjson(ev("m1"), {"eventName": "x"}), headers=NDJSON)
    httpx.post(collector.url + "/v1/events", content=b"", headers={"Content-Type": "text/csv"})
    metrics = httpx.get(collector.url + "/metrics").text
    assert 'gamestream_http_requests_total{path="/v1/events",status="200"} 1.0' in metrics
    assert 'gamestream_http_requests_total{path="/v1/events",status="415"} 1.0' in metrics
    assert "gamestream_events_accepted_total 1.0" in metrics
    assert "gamestream_events_rejected_total 1.0" in metrics
    assert "gamestream_ingest_latency_seconds_bucket" in metrics
    assert "gamestream_log_backlog_events" in metrics
    spec = httpx.get(collector.url + "/openapi.json").json()
    post = spec["paths"]["/v1/events"]["post"]
    assert set(post["responses"]) == {"200", "400", "401", "408", "413", "415", "431", "503"}
    event = spec["components"]["schemas"]["Event"]
    assert set(event["required"]) == {"eventName", "eventParams"}
    params = spec["components"]["schemas"]["EventParams"]["properties"]
    assert params["scoreAdjustment"]["anyOf"][0] == {"type": "integer", "minimum": -2147483648,
                                                     "maximum": 2147483647}


def test_v1_events_answers_posts_on_its_fast_path_and_everything_else_as_starlette_did(collector) -> None:
    """POST /v1/events is served straight from the ASGI call (`api.app.CollectorApp`); other methods, the
    trailing slash and the other routes still go through Starlette's router, with its answers."""
    url = collector.url
    assert httpx.post(url + "/v1/events", json=ev("fast-1")).json() == {"accepted": 1, "rejected": 0, "errors": []}
    wrong_method = httpx.get(url + "/v1/events")
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    assert httpx.request("OPTIONS", url + "/v1/events").status_code == 405
    slash = httpx.post(url + "/v1/events/", json=ev("slash-1"), follow_redirects=False)
    assert slash.status_code == 307 and slash.headers["location"].endswith("/v1/events")
    assert httpx.get(url + "/healthz").status_code == 200
    assert 'gamestream_http_requests_total{path="/v1/events",status="200"} 1.0' in httpx.get(url + "/metrics").text
    assert stored_events(collector.data_dir) == 1

"""Records the seed's Lambda wrote (whole API Gateway proxy events with the event as `body`) are read as they are:
unwrapped, validated with the one schema, given ids derived from their place in the log, quarantined with the
raw record when bad. Also the fixtures tests/test_aws_lambda.py shares: proxy events (REST 1.0, HTTP API 2.0) and
the seed's handler, verbatim."""

from __future__ import annotations

import base64
import datetime as dt
import gzip
import json
import time
import types
from collections import Counter
from pathlib import Path

import pytest

from conftest import table_rows
from gamestream.log import envelope
from gamestream.process.decode import decode_records
from gamestream.log import Append, LogRecord, open_log
from gamestream.process.processor import Processor
from gamestream.settings import Settings

REQUEST_EPOCH_MS = 1_793_527_200_000  # 2026-11-01T10:00:00Z, when API Gateway received the request

# The seed's Lambda, as the blog post gives it, ported to Python 3 (`print` is a function); nothing else changed.
SEED_HANDLER = '''
import json
import boto3
import random
import base64
import time

def lambda_handler(event, context):
    print("Received event: {}".format(event))
    stream_name = 'streamdemo_incoming'
    record = json.loads(event['body'])
    record['eventTime'] = int(time.time())
    event['body'] = record
    client = boto3.client('kinesis')
    client.put_record(StreamName = stream_name, Data = json.dumps(event), PartitionKey = str(random.randint(1,100)))
    return None
'''
SEED_STREAM = "streamdemo_incoming"


def seed_handler():
    """The seed's `lambda_handler`, compiled from its own text."""
    namespace: dict = {}
    exec(compile(SEED_HANDLER, "seed_lambda.py", "exec"), namespace)
    return namespace["lambda_handler"]


def lambda_context() -> types.SimpleNamespace:
    """What the Lambda runtime passes as `context` (the seed's handler never looks at it)."""
    return types.SimpleNamespace(function_name="gamestream-ingest", function_version="$LATEST",
                                 aws_request_id="c6af9ac6-7b61-11e6-9a41-93e8deadbeef", memory_limit_in_mb=256,
                                 invoked_function_arn="arn:aws:lambda:us-east-1:123456789012:function:ingest",
                                 get_remaining_time_in_millis=lambda: 3000)


def v1_event(body: str | bytes | None, headers: dict[str, str] | None = None, *, base64_body: bool = False) -> dict:
    """A REST API (payload format 1.0) Lambda proxy event for POST /events."""
    headers = {"Content-Type": "application/json", "Host": "abc123.execute-api.us-east-1.amazonaws.com",
               "User-Agent": "game/1.0", **(headers or {})}
    if isinstance(body, bytes):
        body = base64.b64encode(body).decode() if base64_body else body.decode()
    return {
        "resource": "/events", "path": "/events", "httpMethod": "POST",
        "headers": headers, "multiValueHeaders": {k: [v] for k, v in headers.items()},
        "queryStringParameters": None, "multiValueQueryStringParameters": None, "pathParameters": None,
        "stageVariables": None,
        "requestContext": {
            "resourceId": "x1y2z3", "resourcePath": "/events", "httpMethod": "POST",
            "extendedRequestId": "Kx2jWFy4IAMEbXw=", "requestTime": "01/Nov/2026:10:00:00 +0000",
            "path": "/prod/events", "accountId": "123456789012", "protocol": "HTTP/1.1", "stage": "prod",
            "domainPrefix": "abc123", "requestTimeEpoch": REQUEST_EPOCH_MS,
            "requestId": "c6af9ac6-7b61-11e6-9a41-93e8deadbeef",
            "identity": {"sourceIp": "203.0.113.7", "userAgent": "game/1.0"},
            "domainName": "abc123.execute-api.us-east-1.amazonaws.com", "apiId": "abc123",
        },
        "body": body, "isBase64Encoded": base64_body,
    }


def v2_event(body: str | bytes | None, headers: dict[str, str] | None = None, *, base64_body: bool = False) -> dict:
    """An HTTP API (payload format 2.0) Lambda proxy event for POST /events: header names in lower case."""
    headers = {"content-type": "application/json", "host": "abc123.execute-api.us-east-1.amazonaws.com",
               "user-agent": "game/1.0", **{k.lower(): v for k, v in (headers or {}).items()}}
    if isinstance(body, bytes):
        body = base64.b64encode(body).decode() if base64_body else body.decode()
    return {
        "version": "2.0", "routeKey": "POST /events", "rawPath": "/events", "rawQueryString": "",
        "headers": headers,
        "requestContext": {
            "accountId": "123456789012", "apiId": "abc123",
            "domainName": "abc123.execute-api.us-east-1.amazonaws.com", "domainPrefix": "abc123",
            "http": {"method": "POST", "path": "/events", "protocol": "HTTP/1.1", "sourceIp": "203.0.113.7",
                     "userAgent": "game/1.0"},
            "requestId": "JKJaXmPLvHcESHA=", "routeKey": "POST /events", "stage": "$default",
            "time": "01/Nov/2026:10:00:00 +0000", "timeEpoch": REQUEST_EPOCH_MS,
        },
        "body": body, "isBase64Encoded": base64_body,
    }


def game_event(device: str = "d1", **extra) -> dict:
    event = {"eventName": "levelStart", "eventParams": {"device_id": device, "game_keyword": "dragon-quest",
                                                        "scoreAdjustment": 5}}
    event.update(extra)
    return event


class RecordingKinesis:
    """Stands in for boto3's Kinesis client: keeps what `put_record` was given."""

    def __init__(self) -> None:
        self.puts: list[dict] = []

    def put_record(self, **kwargs) -> dict:
        self.puts.append(kwargs)
        return {"ShardId": "shardId-000000000000", "SequenceNumber": str(len(self.puts))}


def run_seed(monkeypatch: pytest.MonkeyPatch, event: dict) -> tuple[bytes, int, int]:
    """What the seed's handler puts for `event`: the record's bytes, and the epoch seconds around the call."""
    import boto3

    kinesis = RecordingKinesis()
    monkeypatch.setattr(boto3, "client", lambda service, *a, **k: kinesis)
    before = int(time.time())
    assert seed_handler()(event, lambda_context()) is None
    after = int(time.time())
    (put,) = kinesis.puts
    assert put["StreamName"] == SEED_STREAM and 1 <= int(put["PartitionKey"]) <= 100
    return put["Data"].encode(), before, after


def record(data: bytes, partition: int = 1, offset: int = 42) -> LogRecord:
    return LogRecord(partition, offset, data, 1, 0.0)


def epoch(value: dt.datetime) -> float:
    return value.timestamp()


# ------------------------------------------------------------------------------------------------------ decoding
@pytest.mark.parametrize("make", [v1_event, v2_event], ids=["rest-v1", "http-api-v2"])
def test_a_record_the_seeds_lambda_wrote_is_read_as_it_is(monkeypatch: pytest.MonkeyPatch, make) -> None:
    data, before, after = run_seed(monkeypatch, make(json.dumps(game_event())))
    assert isinstance(json.loads(data)["body"], dict)  # the seed's form: the event itself, with an int eventTime
    decoded = decode_records([record(data)])
    assert decoded.quarantine == []
    (row,) = decoded.events_table().to_pylist()
    assert row["eventId"] == "kinesis-1-42"
    assert before <= epoch(row["eventTime"]) <= after and epoch(row["eventTime"]) == int(epoch(row["eventTime"]))
    assert row["eventName"] == "levelStart" and row["eventParams"]["device_id"] == "d1"
    assert row["eventParams"]["scoreAdjustment"] == 5
    assert row["eventDate"] == row["eventTime"].date()


def test_a_client_event_id_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    data, _, _ = run_seed(monkeypatch, v1_event(json.dumps(game_event(eventId="client-7"))))
    assert decode_records([record(data)]).events_table()["eventId"].to_pylist() == ["client-7"]


def test_a_body_still_in_json_text_is_parsed() -> None:
    body = json.dumps(game_event(eventTime=1_700_000_000))
    decoded = decode_records([record(json.dumps(v1_event(body)).encode(), 0, 7)])
    (row,) = decoded.events_table().to_pylist()
    assert row["eventId"] == "kinesis-0-7" and epoch(row["eventTime"]) == 1_700_000_000


def test_without_an_event_time_the_request_time_of_api_gateway_is_taken() -> None:
    decoded = decode_records([record(json.dumps(v2_event(json.dumps(game_event()))).encode())])
    (row,) = decoded.events_table().to_pylist()
    assert epoch(row["eventTime"]) == REQUEST_EPOCH_MS / 1000


def test_base64_bodies_of_several_events_get_an_id_each() -> None:
    ndjson = b"\n".join(json.dumps(game_event(f"d{i}", eventTime=1_700_000_000 + i)).encode() for i in range(3))
    plain = v2_event(ndjson, {"content-type": "application/x-ndjson"}, base64_body=True)
    zipped = v1_event(gzip.compress(json.dumps([game_event("z", eventTime=1_700_000_000)] * 2).encode()),
                      {"Content-Encoding": "gzip"}, base64_body=True)
    assert plain["isBase64Encoded"] and zipped["isBase64Encoded"]
    decoded = decode_records([record(json.dumps(plain).encode(), 1, 5), record(json.dumps(zipped).encode(), 0, 9)])
    assert decoded.quarantine == []
    rows = decoded.events_table().to_pylist()
    assert [r["eventId"] for r in rows] == ["kinesis-1-5-0", "kinesis-1-5-1", "kinesis-1-5-2", "kinesis-0-9-0",
                                            "kinesis-0-9-1"]
    assert [r["eventParams"]["device_id"] for r in rows] == ["d0", "d1", "d2", "z", "z"]
    assert [epoch(r["eventTime"]) for r in rows[:3]] == [1_700_000_000, 1_700_000_001, 1_700_000_002]


def test_bad_bodies_are_quarantined_with_the_raw_record_and_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    no_device, _, _ = run_seed(monkeypatch, v1_event(json.dumps({"eventName": "levelStart", "eventParams": {}})))
    not_json = json.dumps(v2_event('{"eventName": "levelStart", "eventPar')).encode()
    mixed = json.dumps(v1_event(json.dumps([game_event("ok"), game_event("d", eventParams="nope")]))).encode()
    bad_base64 = json.dumps(v2_event("%%% not base64", base64_body=True)).encode()
    null_time = json.dumps(v1_event(json.dumps(game_event(eventTime=None)))).encode()
    records = [record(data, 0, offset) for offset, data in enumerate([no_device, not_json, mixed, bad_base64,
                                                                      null_time], start=1)]
    decoded = decode_records(records)
    assert decoded.events_table()["eventId"].to_pylist() == ["kinesis-0-3-0"]
    reasons = {q["logOffset"]: q["reason"] for q in decoded.quarantine}
    assert reasons == {
        1: "eventParams.device_id: required (API Gateway event body)",
        2: reasons[2],
        3: "eventParams: expected object, got str (API Gateway event body[1])",
        4: "body is not valid base64 (isBase64Encoded is true) (API Gateway event body)",
        5: "eventTime: null, which the seed's eventTime.isNotNull() filter drops (API Gateway event body)",
    }
    assert reasons[2].startswith("invalid JSON") and reasons[2].endswith("(API Gateway event body)")
    for q in decoded.quarantine:  # the whole record, as it was in the log
        assert q["payload"] == records[q["logOffset"] - 1].payload.decode() and q["logPartition"] == 0


def test_decoding_a_record_again_gives_the_same_ids() -> None:
    body = json.dumps([game_event("a"), game_event("b")])
    data = json.dumps(v2_event(body)).encode()
    first = decode_records([record(data, 3, 1234)]).events_table()
    second = decode_records([record(data, 3, 1234)]).events_table()
    assert first.equals(second)
    assert first["eventId"].to_pylist() == ["kinesis-3-1234-0", "kinesis-3-1234-1"]
    moved = decode_records([record(data, 3, 1235)]).events_table()  # another record: other ids
    assert moved["eventId"].to_pylist() == ["kinesis-3-1235-0", "kinesis-3-1235-1"]


def test_records_that_are_no_proxy_event_are_read_as_before() -> None:
    # one canonical event whose values happen to read "body" and "requestContext": not an envelope
    own = json.dumps({"eventId": "own-1", "eventName": "body", "eventTime": "2026-11-01T10:00:00Z",
                      "eventParams": {"device_id": "requestContext", "app_name": "httpMethod"}}).encode()
    # an object with a body and a requestContext that is an event (it has eventName): an event, unknown fields
    evented = json.dumps({"eventId": "own-2", "eventName": "x", "eventTime": 0, "body": {}, "requestContext": {},
                          "eventParams": {"device_id": "d"}}).encode()
    ndjson = own + b"\n" + evented
    assert not envelope.looks_like_envelope(own) and envelope.looks_like_envelope(evented)
    assert envelope.unwrap(record(own)) is None and envelope.unwrap(record(ndjson)) is None and envelope.unwrap(record(evented)) is None
    decoded = decode_records([record(own, 0, 1), record(ndjson, 0, 2)])
    assert decoded.events_table()["eventId"].to_pylist() == ["own-1", "own-1", "own-2"]
    # a record that starts as a canonical line does (its first event's eventName) is told apart by that alone
    canonical = b'{"eventName":"x","body":"y","requestContext":{},"eventParams":{"device_id":"d"}}'
    assert not envelope.looks_like_envelope(canonical) and envelope.unwrap(record(canonical)) is None
    assert envelope.looks_like_envelope(b'{"httpMethod":"POST","body":"{}","eventName":"x"}')  # eventName later


# ------------------------------------------------------------------------------------------ through the processor
def test_seed_records_reach_the_table_exactly_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(data_dir=tmp_path / "data", partitions=2)
    puts = []
    for i in range(6):
        make = v1_event if i % 2 else v2_event
        data, before, after = run_seed(monkeypatch, make(json.dumps(game_event(f"dev-{i}"))))
        puts.append((data, before, after))
    bad, _, _ = run_seed(monkeypatch, v1_event(json.dumps({"eventName": "levelStart", "eventParams": {}})))
    log = open_log(settings.data_dir, partitions=2)
    offsets = log.append([Append(i % 2, data, 1) for i, (data, _, _) in enumerate(puts)] + [Append(0, bad, 1)])
    log.close()

    def drain() -> Processor:
        log = open_log(settings.data_dir, partitions=2)
        try:
            processor = Processor(settings, log)
            processor.run(until_idle=True)
            return processor
        finally:
            log.close()

    processor = drain()
    rows = table_rows(settings.table_uri("events"))
    ids = Counter(r["eventId"] for r in rows)
    assert set(ids.values()) == {1}
    assert set(ids) == {f"kinesis-{i % 2}-{offsets[i]}" for i in range(6)}
    by_device = {r["eventParams"]["device_id"]: r for r in rows}
    for i, (_, before, after) in enumerate(puts):
        seconds = epoch(by_device[f"dev-{i}"]["eventTime"])
        assert before <= seconds <= after and seconds == int(seconds)  # the seed's int(time.time())
    (quarantined,) = table_rows(settings.table_uri("events_quarantine"))
    assert quarantined["reason"] == "eventParams.device_id: required (API Gateway event body)"
    assert quarantined["payload"] == bad.decode() and quarantined["logOffset"] == offsets[-1]
    assert processor.stats.events_committed == 6 and processor.stats.events_quarantined == 1

    again = drain()  # a restart over the same log writes nothing
    assert again.stats.events_committed == 0 and again.stats.events_quarantined == 0
    assert len(table_rows(settings.table_uri("events"))) == 6

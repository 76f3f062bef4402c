"""The Lambda handler (`gamestream.integrations.aws`) against a real Kinesis API (moto's server in its own process): the
collector's answers for the same bodies, records that gamestream's processor reads with no envelope, retries of
refused records; the seed's own handler, verbatim, into the processor exactly once; and the deployment zip of
`gamestream aws package-lambda`, imported in a clean virtual environment."""

from __future__ import annotations

import datetime as dt
import gzip
import itertools
import json
import os
import sqlite3
import subprocess
import sys
import time
import zipfile
from collections import Counter
from pathlib import Path

import pytest
import stamina

from conftest import table_rows
from gamestream.integrations import aws
from gamestream.log import Append, open_log
from gamestream.process.processor import Processor
from gamestream.settings import Settings
from s3_store import MotoServer, aws_environment
from test_envelope import SEED_STREAM, game_event, lambda_context, seed_handler, v1_event, v2_event

# small limits, so the over-limit fixtures stay small; the collector gets the same ones
LIMITS = dict(max_body_bytes=4096, max_events_per_request=5, max_event_bytes=1024)
BOTH_FORMATS = pytest.mark.parametrize("make", [v1_event, v2_event], ids=["rest-v1", "http-api-v2"])
_names = itertools.count()


@pytest.fixture(scope="module")
def moto():
    server = MotoServer()
    yield server
    server.stop()


def kinesis(moto: MotoServer):
    import boto3

    return boto3.client("kinesis", endpoint_url=moto.endpoint, aws_access_key_id="testing",
                        aws_secret_access_key="testing", region_name="us-east-1")


def create_stream(client, name: str, shards: int = 2) -> str:
    client.create_stream(StreamName=name, ShardCount=shards)
    client.get_waiter("stream_exists").wait(StreamName=name, WaiterConfig={"Delay": 0.1, "MaxAttempts": 50})
    return name


@pytest.fixture
def stream(moto):
    client = kinesis(moto)
    return client, create_stream(client, f"gamestream-{next(_names)}")


def stream_records(client, name: str) -> list[dict]:
    """Every record on the stream, shard by shard, oldest first, with its shard's number."""
    records = []
    for shard in client.list_shards(StreamName=name)["Shards"]:
        iterator = client.get_shard_iterator(StreamName=name, ShardId=shard["ShardId"],
                                             ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
        while iterator:
            page = client.get_records(ShardIterator=iterator, Limit=1000)
            for r in page["Records"]:
                records.append({"shard": int(shard["ShardId"].rsplit("-", 1)[1]), "sequence": r["SequenceNumber"],
                                "key": r["PartitionKey"], "data": r["Data"]})
            if not page["Records"]:
                break
            iterator = page.get("NextShardIterator")
    return records


@pytest.fixture
def collector(tmp_path: Path):
    """The real collector app (in process, starlette's test client) with the same limits."""
    import warnings

    with warnings.catch_warnings():  # starlette asks for httpx2 now; httpx still serves the test client
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient

    from gamestream.api.app import create_app

    settings = Settings(data_dir=tmp_path / "collector", partitions=2, **LIMITS)
    settings.data_dir.mkdir(parents=True)
    log = open_log(settings.data_dir, partitions=2)
    with TestClient(create_app(settings, log)) as client:
        def post(body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
            response = client.post("/v1/events", content=body, headers=headers)
            return response.status_code, response.json()
        yield post
    log.close()


def call(stream, event: dict, **limits) -> dict:
    client, name = stream
    return aws.handle(event, client=client, stream=name, settings=Settings(**{**LIMITS, **limits}))


def answer(result: dict) -> tuple[int, dict]:
    assert result["headers"]["Content-Type"] == "application/json" and result["isBase64Encoded"] is False
    return result["statusCode"], json.loads(result["body"])


def lines(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.split(b"\n")]


# ---------------------------------------------------------------------------------------- the collector's answers
@BOTH_FORMATS
def test_good_events_get_the_collectors_answer_and_reach_the_stream_one_record_per_device(stream, collector,
                                                                                          make) -> None:
    body = json.dumps([game_event("d1"), game_event("d2", eventId="mine"), game_event("d1", eventTime=1_700_000_000)])
    before = dt.datetime.now(dt.timezone.utc)
    result = call(stream, make(body))
    assert answer(result) == collector(body.encode(), {"Content-Type": "application/json"})
    assert answer(result) == (200, {"accepted": 3, "rejected": 0, "errors": []})
    assert "Idempotency-Honoured" not in result["headers"]
    records = stream_records(*stream)
    assert sorted(r["key"] for r in records) == ["d1", "d2"]  # PartitionKey = device_id, one record per device
    by_key = {r["key"]: lines(r["data"]) for r in records}
    assert [e["eventParams"]["device_id"] for e in by_key["d1"]] == ["d1", "d1"]
    assert by_key["d2"][0]["eventId"] == "mine"
    stamped = {e["eventTime"] for r in records for e in lines(r["data"])}
    assert len(stamped) == 1  # one receive time per request
    assert dt.datetime.fromisoformat(stamped.pop().replace("Z", "+00:00")) >= before.replace(microsecond=0)
    assert by_key["d1"][1]["eventParams"]["client_event_time"] == "2023-11-14T22:13:20Z"  # the client's own time
    assert all(len(e["eventId"]) == 36 for e in by_key["d1"])  # UUIDv7s assigned


@BOTH_FORMATS
def test_mixed_ndjson_gets_per_index_errors_like_the_collector(stream, collector, make) -> None:
    body = b"\n".join([json.dumps(game_event("a")).encode(), b'{"eventName": "x", "eventPar',
                       json.dumps(game_event("b", eventParams={"device_id": "b", "scoreAdjustment": "lots"})).encode(),
                       json.dumps({"eventName": "x", "eventParams": {}}).encode(),
                       json.dumps(game_event("c", app_name="x" * 2000)).encode()])
    headers = {"Content-Type": "application/x-ndjson"}
    status, got = answer(call(stream, make(body, headers)))
    assert (status, got) == collector(body, headers)
    assert status == 200 and got["accepted"] == 1 and [e["index"] for e in got["errors"]] == [1, 2, 3, 4]
    assert [r["key"] for r in stream_records(*stream)] == ["a"]


@BOTH_FORMATS
def test_gzip_and_base64_bodies(stream, collector, make) -> None:
    raw = b"\n".join(json.dumps(game_event(f"g{i}")).encode() for i in range(4))
    headers = {"Content-Type": "application/x-ndjson", "Content-Encoding": "gzip"}
    result = call(stream, make(gzip.compress(raw), headers, base64_body=True))
    assert answer(result) == collector(gzip.compress(raw), headers) == (200, {"accepted": 4, "rejected": 0,
                                                                                "errors": []})
    assert sorted(r["key"] for r in stream_records(*stream)) == ["g0", "g1", "g2", "g3"]
    plain = call(stream, make(raw, {"Content-Type": "application/x-ndjson"}, base64_body=True))
    assert answer(plain)[0] == 200


@BOTH_FORMATS
@pytest.mark.parametrize("case", ["oversized", "oversized-gzip", "too-many", "content-type", "encoding", "empty",
                                  "none-valid", "bad-array", "bad-gzip", "long-idempotency-key"])
def test_refusals_are_the_collectors(stream, collector, make, case: str) -> None:
    ndjson = {"Content-Type": "application/x-ndjson"}
    body, headers, encoded = {
        "oversized": (b"[" + b" " * 5000 + b"]", {"Content-Type": "application/json"}, None),
        "oversized-gzip": (gzip.compress(b"\n" * 9000), {**ndjson, "Content-Encoding": "gzip"}, True),
        "too-many": (b"\n".join([json.dumps(game_event()).encode()] * 6), ndjson, None),
        "content-type": (b"{}", {"Content-Type": "text/plain"}, None),
        "encoding": (b"{}", {"Content-Type": "application/json", "Content-Encoding": "br"}, None),
        "empty": (b"  ", {"Content-Type": "application/json"}, None),
        "none-valid": (b'[{"eventName": ""}, 7]', {"Content-Type": "application/json"}, None),
        "bad-array": (b'[{"eventName": ', {"Content-Type": "application/json"}, None),
        "bad-gzip": (b"not gzip at all", {**ndjson, "Content-Encoding": "gzip"}, True),
        "long-idempotency-key": (json.dumps(game_event()).encode(), {"Idempotency-Key": "k" * 201}, None),
    }[case]
    status, got = answer(call(stream, make(body, headers, base64_body=bool(encoded))))
    assert (status, got) == collector(body, headers)
    assert status in (400, 413, 415)
    assert stream_records(*stream) == []


@BOTH_FORMATS
def test_a_sent_at_header_corrects_the_device_clock_as_the_collector_does(stream, make) -> None:
    """A device 3 days ahead: its events land at their real time, with sentAt and receivedAt stored; a Sent-At
    that is not a timestamp gets the collector's 400."""
    received = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    ahead = dt.timedelta(days=3)
    happened = received - dt.timedelta(minutes=5)
    body = json.dumps(game_event("skewed", eventTime=(happened + ahead).isoformat()))
    sent = (received + ahead).isoformat()
    client, name = stream
    result = aws.handle(make(body, {"Sent-At": sent}), client=client, stream=name, settings=Settings(**LIMITS),
                        received=received)
    assert answer(result) == (200, {"accepted": 1, "rejected": 0, "errors": []})
    (event,) = lines(stream_records(*stream)[0]["data"])
    assert event["eventTime"] == happened.isoformat().replace("+00:00", "Z")
    assert event["receivedAt"] == received.isoformat().replace("+00:00", "Z")
    assert event["sentAt"] == (received + ahead).isoformat().replace("+00:00", "Z")
    refused = call(stream, make(body, {"Sent-At": "soon"}))
    assert refused["statusCode"] == 400 and "Sent-At: expected an RFC 3339 timestamp" in refused["body"]


def test_answers_say_the_idempotency_key_is_not_honoured(stream) -> None:
    body = json.dumps(game_event("idem"))
    first = call(stream, v2_event(body, {"Idempotency-Key": "k-1"}))
    second = call(stream, v1_event(body, {"Idempotency-Key": "k-1"}))
    for result in (first, second):
        assert result["statusCode"] == 200 and result["headers"]["Idempotency-Honoured"] == "false"
    assert len(stream_records(*stream)) == 2  # Kinesis has no deduplication: the retry is stored again


def test_api_keys_are_checked_when_configured(stream) -> None:
    event = v2_event(json.dumps(game_event()))
    status, got = answer(call(stream, event, api_keys=("s3cret",)))
    assert status == 401 and "API key" in got["error"]
    assert answer(call(stream, v2_event(json.dumps(game_event()), {"Authorization": "Bearer s3cret"}),
                       api_keys=("s3cret",)))[0] == 200


def test_lambda_handler_reads_its_stream_and_boto3_from_the_environment(moto, stream,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in aws_environment(moto.endpoint).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv(aws.STREAM_ENV, stream[1])
    monkeypatch.setenv("GAMESTREAM_MAX_EVENTS_PER_REQUEST", "2")
    monkeypatch.setattr(aws, "_client", None)
    monkeypatch.setattr(aws, "_settings", None)
    result = aws.lambda_handler(v1_event(json.dumps([game_event("e1"), game_event("e2")])), lambda_context())
    assert answer(result) == (200, {"accepted": 2, "rejected": 0, "errors": []})
    assert answer(aws.lambda_handler(v1_event(json.dumps([game_event()] * 3)), lambda_context()))[0] == 413
    assert sorted(r["key"] for r in stream_records(*stream)) == ["e1", "e2"]
    monkeypatch.delenv(aws.STREAM_ENV)
    with pytest.raises(RuntimeError, match=aws.STREAM_ENV):
        aws.lambda_handler(v1_event("{}"), lambda_context())


# --------------------------------------------------------------------------------------------- records, retries
def test_a_devices_lines_are_split_only_past_the_record_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aws, "MAX_RECORD_BYTES", 100)
    lines_ = [b"x" * 30] * 5
    entries = aws.device_entries("dev", lines_)
    assert [e.events for e in entries] == [3, 2] and all(e.size <= 100 for e in entries)
    assert b"\n".join(e.data for e in entries) == b"\n".join(lines_)
    assert aws.partition_key("d" * 256) == "d" * 256 and len(aws.partition_key("d" * 257)) <= 256
    monkeypatch.setattr(aws, "MAX_CALL_RECORDS", 2)
    assert aws.calls(entries * 2) == [[0, 1], [2, 3]]


class Refusing:
    """A Kinesis client throttled as a busy shard is: its first call takes every other record, the next
    `refuse_calls` - 1 calls take none, later ones take all."""

    def __init__(self, client, refuse_calls: int) -> None:
        self.client, self.refuse_calls, self.calls = client, refuse_calls, []

    def put_records(self, **kwargs) -> dict:
        self.calls.append(len(kwargs["Records"]))
        if len(self.calls) > self.refuse_calls:
            return self.client.put_records(**kwargs)
        through = set(range(0, len(kwargs["Records"]), 2)) if len(self.calls) == 1 else set()
        response = self.client.put_records(**{**kwargs, "Records": [r for i, r in enumerate(kwargs["Records"])
                                                                    if i in through]}) if through else None
        written = iter(response["Records"] if response else [])
        results = [next(written) if i in through else {"ErrorCode": "ProvisionedThroughputExceededException",
                                                       "ErrorMessage": "Rate exceeded for shard"}
                   for i in range(len(kwargs["Records"]))]
        return {"FailedRecordCount": sum("ErrorCode" in r for r in results), "Records": results}


def test_refused_records_are_retried_alone_and_answered_once_all_are_written(stream) -> None:
    client, name = stream
    refusing = Refusing(client, refuse_calls=2)
    body = json.dumps([game_event(f"r{i}") for i in range(5)])
    with stamina.set_testing(True, attempts=aws.RETRY_ATTEMPTS):
        result = aws.handle(v2_event(body), client=refusing, stream=name, settings=Settings(**LIMITS))
    assert answer(result) == (200, {"accepted": 5, "rejected": 0, "errors": []})
    assert refusing.calls == [5, 2, 2]  # only the refused ones again
    keys = Counter(r["key"] for r in stream_records(client, name))
    assert keys == Counter({f"r{i}": 1 for i in range(5)})  # each once


def test_throttling_past_the_retries_answers_503_with_retry_after(stream) -> None:
    client, name = stream
    refusing = Refusing(client, refuse_calls=1000)
    body = json.dumps([game_event(f"t{i}") for i in range(4)])
    with stamina.set_testing(True, attempts=3):
        result = aws.handle(v1_event(body), client=refusing, stream=name, settings=Settings(**LIMITS))
    status, got = answer(result)
    assert status == 503 and result["headers"]["Retry-After"] == "1"
    assert "ProvisionedThroughputExceededException" in got["error"] and "2 of 4 records were stored" in got["error"]


# ------------------------------------------------------------------------------------------- into the processor
def append_at(log_dir: Path, log, partition: int, offset: int, data: bytes, events: int) -> None:
    """Appends `data` to the embedded log at exactly `offset` (the record's Kinesis sequence number): the log
    assigns head + 1, so the head is moved to offset - 1 first (offsets still only grow within a partition)."""
    with sqlite3.connect(log_dir / "log" / "events.sqlite") as db:
        (head,) = db.execute("SELECT last_offset FROM heads WHERE partition = ?", (partition,)).fetchone()
        assert offset > head
        db.execute("UPDATE heads SET last_offset = ? WHERE partition = ?", (offset - 1, partition))
    assert log.append([Append(partition, data, events)]) == [offset]


def process(settings: Settings) -> Processor:
    log = open_log(settings.data_dir, partitions=settings.partitions)
    try:
        processor = Processor(settings, log)
        processor.run(until_idle=True)
        return processor
    finally:
        log.close()


def test_the_lambdas_records_are_read_by_the_processor_with_no_envelope(stream, tmp_path: Path) -> None:
    client, name = stream
    bodies = [json.dumps([game_event(f"p{i}"), game_event(f"p{i + 1}")]) for i in range(0, 6, 2)]
    for body in bodies:
        assert call(stream, v2_event(body))["statusCode"] == 200
    settings = Settings(data_dir=tmp_path / "data", partitions=2)
    log = open_log(settings.data_dir, partitions=2)
    records = stream_records(client, name)
    for r in records:
        append_at(settings.data_dir, log, r["shard"], int(r["sequence"]), r["data"], len(lines(r["data"])))
    log.close()
    processor = process(settings)
    rows = table_rows(settings.table_uri("events"))
    assert sorted(r["eventParams"]["device_id"] for r in rows) == [f"p{i}" for i in range(6)]
    assert {r["eventId"] for r in rows} == {e["eventId"] for r in records for e in lines(r["data"])}
    assert processor.stats.events_committed == 6 and processor.stats.events_quarantined == 0


def test_the_seeds_handler_verbatim_into_the_processor_exactly_once(moto, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in aws_environment(moto.endpoint).items():
        monkeypatch.setenv(key, value)
    client = kinesis(moto)
    try:
        create_stream(client, SEED_STREAM, shards=2)
    except client.exceptions.ResourceInUseException:
        pass
    handler = seed_handler()
    stamped = {}
    for i in range(12):
        make = v1_event if i % 2 else v2_event
        before = int(time.time())
        handler(make(json.dumps(game_event(f"seed-{i}", eventId=None) if i == 0 else game_event(f"seed-{i}"))),
                lambda_context())
        stamped[f"seed-{i}"] = (before, int(time.time()))
    records = stream_records(client, SEED_STREAM)
    assert len(records) == 12 and all(isinstance(json.loads(r["data"])["body"], dict) for r in records)
    assert {r["shard"] for r in records} == {0, 1}  # the seed's random partition keys spread them

    settings = Settings(data_dir=tmp_path / "data", partitions=2)
    log = open_log(settings.data_dir, partitions=2)
    for r in records:
        append_at(settings.data_dir, log, r["shard"], int(r["sequence"]), r["data"], 1)
    log.close()
    processor = process(settings)
    rows = table_rows(settings.table_uri("events"))
    ids = Counter(r["eventId"] for r in rows)
    assert set(ids.values()) == {1} and set(ids) == {f"kinesis-{r['shard']}-{r['sequence']}" for r in records}
    for row in rows:
        seconds = row["eventTime"].timestamp()
        low, high = stamped[row["eventParams"]["device_id"]]
        assert low <= seconds <= high and seconds == int(seconds)  # the seed's int(time.time()), as it is
    assert processor.stats.events_committed == 12 and table_rows(settings.table_uri("events_quarantine")) == []

    version = len(table_rows(settings.table_uri("events")))
    again = process(settings)  # re-processing the same log writes nothing
    assert again.stats.events_committed == 0 and len(table_rows(settings.table_uri("events"))) == version


# ------------------------------------------------------------------------------------------- the deployment zip
HANDLER_CALL = """
import json, os, sys
sys.path.insert(0, os.environ["LAMBDA_TASK_ROOT"])  # what the Lambda runtime does with the unzipped package
import gamestream.integrations.aws
assert gamestream.integrations.aws.__file__.startswith(os.environ["LAMBDA_TASK_ROOT"]), gamestream.integrations.aws.__file__
heavy = sorted(m for m in ("deltalake", "duckdb", "starlette", "polars", "pyarrow") if m in sys.modules)
event = json.loads(sys.stdin.read())
print(json.dumps({"answer": gamestream.integrations.aws.lambda_handler(event, None), "heavy": heavy}))
"""


@pytest.mark.slow
def test_the_deployment_zip_runs_the_handler_in_a_clean_environment(moto, stream, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from gamestream.cli import cli

    package = tmp_path / "lambda.zip"
    result = CliRunner().invoke(cli, ["aws", "package-lambda", str(package)])
    if result.exit_code != 0 and "pip could not fetch" in result.output:
        pytest.skip(f"no package index reachable for the wheels: {result.output[-300:]}")
    assert result.exit_code == 0, result.output
    with zipfile.ZipFile(package) as archive:
        names = archive.namelist()
        archive.extractall(tmp_path / "task")
    assert "gamestream/integrations/aws.py" in names and "gamestream/log/envelope.py" in names
    assert not any(n.startswith(("gamestream/collector", "gamestream/processor", "deltalake/", "duckdb/", "boto3/",
                                 "pyarrow/"))
                   for n in names)
    assert any(n.startswith("msgspec/") for n in names)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    import boto3  # the Lambda runtime provides boto3: the same version as here

    install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", f"boto3=={boto3.__version__}"],
                             capture_output=True, text=True)
    if install.returncode != 0:
        pytest.skip(f"boto3 could not be installed in the clean environment: {install.stderr[-300:]}")
    client, name = stream
    env = {"PATH": os.environ["PATH"], "LAMBDA_TASK_ROOT": str(tmp_path / "task"), aws.STREAM_ENV: name,
           **aws_environment(moto.endpoint)}
    event = v2_event(gzip.compress(b'{"eventName": "levelStart", "eventParams": {"device_id": "zip-1"}}'),
                     {"Content-Type": "application/json", "Content-Encoding": "gzip"}, base64_body=True)
    ran = subprocess.run([str(python), "-I", "-c", HANDLER_CALL], input=json.dumps(event),
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert ran.returncode == 0, ran.stderr
    output = json.loads(ran.stdout.strip().splitlines()[-1])
    assert output["heavy"] == []
    assert output["answer"]["statusCode"] == 200
    assert json.loads(output["answer"]["body"]) == {"accepted": 1, "rejected": 0, "errors": []}
    (record,) = stream_records(client, name)
    assert record["key"] == "zip-1" and lines(record["data"])[0]["eventParams"] == {"device_id": "zip-1"}

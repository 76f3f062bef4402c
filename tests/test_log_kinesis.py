"""The Kinesis event log against moto's Kinesis server (a real HTTP endpoint, in its own process, reached by boto3
through the standard AWS environment): the conformance suite (without trim, which Kinesis leaves to the stream's
retention), plus what only Kinesis shows: PutRecords' limits and partial failures, shard iterators that expire,
and resharding (split and merge).

moto gets a few things about shards wrong that matter here; the server we start patches them to behave as Kinesis
documents (see `_KINESIS_LIKE`):
- after SplitShard/MergeShards, moto routes a record by hash key to the first shard whose range holds it, closed or
  not — so every later record lands in the closed parent; and it treats EndingHashKey as exclusive;
- SplitShard re-puts the parent's records, MergeShards copies them into the child (Kinesis leaves a closed
  shard's records where they are, readable until the retention expires them);
- its sequence numbers are 1, 2, 3… per shard; Kinesis' are 56-digit numbers, so the server starts each shard's
  numbers there (offsets must work as Python ints of that size).
What moto also does not do, and the tests reach at the client boundary instead: throttle or fail PutRecords
entries, expire shard iterators, end a closed shard's iterator chain (NextShardIterator stays set)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from unittest import mock

import botocore.exceptions
import pytest

from gamestream import log as log_module
from gamestream.log import payload as payload_format
from gamestream.log import Append, Idempotency, LogUnavailable
from gamestream.log import kinesis as kinesis_log
from gamestream.log.kinesis import KinesisEventLog, RecordTooLarge, hash_key
from gamestream.settings import Settings
from log_conformance import LogConformance, payload, read_all
from s3_store import aws_environment, free_port

_KINESIS_LIKE = r'''
import sys
from collections import OrderedDict
from operator import attrgetter
import moto.kinesis.models as m

FIRST_SEQUENCE = 49_590_338_271_490_256_608_559_692_538_361_571_095_921_575_989_136_588_898  # 56 digits


def get_shard_for_key(self, partition_key, explicit_hash_key):
    if explicit_hash_key:
        key = int(explicit_hash_key)
        if key >= 2 ** 128:
            raise m.InvalidArgumentError("explicit_hash_key")
    else:
        key = int(m.md5_hash(partition_key.encode("utf-8")).hexdigest(), 16)
    for shard in self.shards.values():
        if shard.is_open and shard.starting_hash <= key <= shard.ending_hash:
            return shard
    return None


def put_record(self, partition_key, data, explicit_hash_key):
    last = self.get_max_sequence_number() if self.records else FIRST_SEQUENCE + self._shard_id * 10 ** 30
    self.records[last + 1] = m.Record(partition_key, data, last + 1, explicit_hash_key)
    return str(last + 1)


def split_shard(self, shard_to_split, new_starting_hash_key):
    new_start = int(new_starting_hash_key)
    shard = self.shards[shard_to_split]
    if not (shard.starting_hash < new_start <= shard.ending_hash) or not shard.is_open:
        raise m.InvalidArgumentError(message=f"cannot split {shard_to_split} at {new_start}")
    last_id = max(s._shard_id for s in self.shards.values())
    for number, start, end in ((last_id + 1, shard.starting_hash, new_start - 1),
                               (last_id + 2, new_start, shard.ending_hash)):
        child = m.Shard(number, start, end, parent=shard.shard_id)
        self.shards[child.shard_id] = child
    shard.is_open = False


def merge_shards(self, shard_to_merge, adjacent_shard_to_merge):
    first, second = self.shards[shard_to_merge], self.shards[adjacent_shard_to_merge]
    if first.ending_hash + 1 != second.starting_hash or not (first.is_open and second.is_open):
        raise m.InvalidArgumentError(adjacent_shard_to_merge)
    last_id = max(s._shard_id for s in self.shards.values())
    child = m.Shard(last_id + 1, first.starting_hash, second.ending_hash, parent=first.shard_id,
                    adjacent_parent=second.shard_id)
    self.shards[child.shard_id] = child
    first.is_open = second.is_open = False


m.Stream.get_shard_for_key = get_shard_for_key
m.Stream.split_shard = split_shard
m.Stream.merge_shards = merge_shards
m.Shard.put_record = put_record

from moto.server import main
main(["-H", "127.0.0.1", "-p", sys.argv[1]])
'''


class KinesisServer:
    """moto's server with `_KINESIS_LIKE`'s patches, on a free loopback port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([sys.executable, "-c", _KINESIS_LIKE, str(self.port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import boto3

        self.client = boto3.client("kinesis", endpoint_url=self.endpoint, aws_access_key_id="testing",
                                   aws_secret_access_key="testing", region_name="us-east-1")
        deadline = time.monotonic() + 30
        while True:
            try:
                self.client.list_streams()
                return
            except Exception:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.stop()
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


@pytest.fixture(scope="module")
def kinesis():
    server = KinesisServer()
    environment = {**aws_environment(server.endpoint)}
    environment.pop("AWS_DEFAULT_REGION")  # boto3 reads AWS_DEFAULT_REGION; the log also takes AWS_REGION
    with mock.patch.dict(os.environ, environment):
        os.environ.pop("AWS_DEFAULT_REGION", None)
        yield server
    server.stop()


def fresh_stream() -> str:
    return "t" + uuid.uuid4().hex[:12]


def open_stream(partitions: int | None = 4, stream: str | None = None) -> KinesisEventLog:
    return KinesisEventLog.connect(f"kinesis://{stream or fresh_stream()}", partitions=partitions)


@pytest.fixture
def log(kinesis: KinesisServer):
    log = open_stream(4)
    yield log
    log.close()


class TestKinesisConformance(LogConformance):
    @pytest.fixture
    def open_log(self, kinesis: KinesisServer):
        stream = fresh_stream()  # one stream per test; reopening finds the same one
        return lambda partitions: open_stream(partitions, stream)


class Recorder:
    """Wraps a boto3 client's method at the client boundary: records each call's arguments, and can answer some
    PutRecords entries with an ErrorCode without sending them (as Kinesis does when a shard is throttled)."""

    def __init__(self, client, method: str, fail=None) -> None:
        self.real = getattr(client, method)
        self.calls: list[dict] = []
        self.fail = fail  # (call number, entry index, entry) → ErrorCode or None
        setattr(client, method, self)

    def __call__(self, **kwargs):
        number = len(self.calls)
        self.calls.append(kwargs)
        if self.fail is None or "Records" not in kwargs:
            return self.real(**kwargs)
        entries = kwargs["Records"]
        codes = [self.fail(number, index, entry) for index, entry in enumerate(entries)]
        sent = [entry for entry, code in zip(entries, codes) if not code]
        answer = self.real(**{**kwargs, "Records": sent}) if sent else {"Records": []}
        stored = iter(answer["Records"])
        results = [{"ErrorCode": code, "ErrorMessage": "Rate exceeded for shard"} if code else next(stored)
                   for code in codes]
        return {"FailedRecordCount": sum(1 for code in codes if code), "Records": results}


# ------------------------------------------------------------------------------------------ connect, describe
def test_connect_and_describe_take_kinesis_urls_and_the_aws_environment(kinesis: KinesisServer) -> None:
    stream = fresh_stream()
    settings = Settings(log=f"kinesis://{stream}", partitions=3)
    opened = log_module.connect(settings)
    try:
        assert isinstance(opened, KinesisEventLog) and opened.partitions == 3
        assert opened._client.meta.region_name == "us-east-1"  # from AWS_REGION: AWS_DEFAULT_REGION is unset
        assert log_module.describe(settings) == f"kinesis://{stream} (region us-east-1, endpoint {kinesis.endpoint})"
        assert opened.idempotency_scope == "process" and not opened.supports_trim
    finally:
        opened.close()
    again = log_module.connect(Settings(log=f"kinesis://{stream}"))  # no count: the existing stream's shards
    try:
        assert again.partitions == 3
    finally:
        again.close()
    with pytest.raises(ValueError, match="nats://.*kinesis://STREAM"):
        log_module.connect(Settings(log="kafka://broker:9092"))


def test_a_missing_stream_is_created_only_when_a_partition_count_is_given(kinesis: KinesisServer) -> None:
    stream = fresh_stream()
    with pytest.raises(ValueError, match=f"create-stream --stream-name {stream}"):
        open_stream(None, stream)
    created = open_stream(2, stream)
    try:
        summary = kinesis.client.describe_stream_summary(StreamName=stream)["StreamDescriptionSummary"]
        assert summary["StreamStatus"] == "ACTIVE" and summary["OpenShardCount"] == 2
    finally:
        created.close()


def test_an_unreachable_endpoint_is_log_unavailable(kinesis: KinesisServer, monkeypatch) -> None:
    monkeypatch.setattr(kinesis_log, "READ_RETRY_SECONDS", 1.0)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    with pytest.raises(LogUnavailable, match="DescribeStreamSummary"):
        open_stream(2)
    assert time.monotonic() - started < 15


# ------------------------------------------------------------------------------------------------- records
def test_offsets_are_kinesis_sized_sequence_numbers(log: KinesisEventLog) -> None:
    (offset,) = log.append([Append(1, payload("big"), 1)])
    assert len(str(offset)) >= 56 and log.read(1, 0, 10)[0].offset == offset


def test_events_are_counted_from_the_payload_arrow_rows_or_ndjson_lines(log: KinesisEventLog) -> None:
    import datetime as dt

    import pyarrow as pa

    from gamestream import schema

    now = dt.datetime.now(dt.timezone.utc)
    rows = [{"eventId": f"e{i}", "eventName": "x", "eventTime": now, "eventParams": {"device_id": f"d{i}"}}
            for i in range(700)]
    table = pa.Table.from_pylist(rows, schema=schema.decode_schema())
    table = pa.concat_tables([table.slice(0, 300), table.slice(300)])  # two record batches
    records = [Append(2, payload_format.encode(table, compression), 700) for compression in ("none", "lz4", "zstd")]
    records.append(Append(2, b'{"a":1}\n\n{"b":2}\n  \n{"c":3}', 3))
    log.append(records)
    assert [r.events for r in log.read(2, 0, 10)] == [700, 700, 700, 3]
    assert kinesis_log.events_in(b"GSA1 not arrow at all") == 0


def test_a_record_over_one_mib_is_refused_not_split(log: KinesisEventLog) -> None:
    assert log.max_record_bytes <= 1024 * 1024 - 6
    with pytest.raises(RecordTooLarge, match="1,048,576"):
        log.append([Append(0, b"x" * (1024 * 1024), 1)])
    big = b"y" * log.max_record_bytes
    (offset,) = log.append([Append(0, big, 1)])
    assert log.read(0, 0, 1)[0].payload == big and offset > 0


def test_put_records_calls_stay_within_500_entries_and_5_mib_and_keep_each_appends_order(
        log: KinesisEventLog) -> None:
    calls = Recorder(log._client, "put_records")
    # many concurrent single-record appends: the writer packs them into rounds of up to 500 entries per call
    futures = [log.submit([Append(i % 4, payload(f"s{i}"), 1)]) for i in range(1500)]
    offsets = [f.result(60).offsets[0] for f in futures]
    sizes = [len(call["Records"]) for call in calls.calls]
    assert max(sizes) == 500 and sum(sizes) == 1500
    for partition in range(4):
        stored = read_all(log, partition, chunk=1000)
        assert sorted(r.offset for r in stored) == sorted(o for i, o in enumerate(offsets) if i % 4 == partition)
        assert len(stored) == 375

    # big records: 8 of ~1 MiB at once are more than 5 MiB, so they take several calls
    calls.calls.clear()
    big = [Append(p, bytes([65 + p + 4 * k]) * (log.max_record_bytes - 10), 1) for k in range(2) for p in range(4)]
    results = [log.submit(big[:4]), log.submit(big[4:])]
    for result in results:
        result.result(60)
    volumes = [sum(len(e["Data"]) + len(e["PartitionKey"]) for e in call["Records"]) for call in calls.calls]
    assert len(volumes) >= 2 and max(volumes) <= 5 * 1024 * 1024
    stored = [r.payload for p in range(4) for r in read_all(log, p, chunk=1000) if len(r.payload) > 1000]
    assert sorted(stored) == sorted(a.payload for a in big)


def test_one_append_never_puts_two_records_for_one_shard_in_one_call(log: KinesisEventLog) -> None:
    calls = Recorder(log._client, "put_records")
    records = [Append(k % 2, payload(f"o{k}"), 1) for k in range(40)]  # 20 each for shards 0 and 1
    offsets = log.append(records)
    for call in calls.calls:
        assert len(call["Records"]) == len({e["PartitionKey"] for e in call["Records"]}) <= 2
    for partition in (0, 1):
        mine = [o for r, o in zip(records, offsets) if r.partition == partition]
        assert mine == sorted(mine)
        assert [r.payload for r in read_all(log, partition)] == [r.payload for r in records
                                                                  if r.partition == partition]


def test_failed_entries_are_retried_alone_and_order_within_each_append_holds(log: KinesisEventLog) -> None:
    failures = Counter()

    def throttle(call: int, index: int, entry: dict) -> str | None:
        # the first calls lose every other entry (and shard 2 whole), as a shard over its write limit would
        if call < 6 and (index % 2 == 1 or entry["PartitionKey"] == "2"):
            failures[entry["PartitionKey"]] += 1
            return "ProvisionedThroughputExceededException" if index % 3 else "InternalFailure"
        return None

    calls = Recorder(log._client, "put_records", fail=throttle)
    appends = [[Append((w + k) % 4, payload(f"f{w}-{k}"), 1) for k in range(12)] for w in range(6)]
    futures = [log.submit(records) for records in appends]
    results = [f.result(60).offsets for f in futures]
    assert sum(failures.values()) > 10 and len(calls.calls) > 6
    stored = {p: [(r.offset, r.payload) for r in read_all(log, p)] for p in range(4)}
    bodies = [body for entries in stored.values() for _, body in entries]
    assert len(bodies) == len(set(bodies)) == 72  # every record once: only the failed entries were re-sent
    for records, offsets in zip(appends, results):
        for record, offset in zip(records, offsets):
            assert (offset, record.payload) in stored[record.partition]
        for partition in range(4):  # within an append, a shard's records keep their order
            mine = [o for r, o in zip(records, offsets) if r.partition == partition]
            assert mine == sorted(mine)


def test_throttling_that_outlasts_the_retries_is_log_unavailable_and_then_passes(log: KinesisEventLog,
                                                                                 monkeypatch) -> None:
    monkeypatch.setattr(kinesis_log, "PUT_RETRY_SECONDS", 0.5)
    throttled = threading.Event()
    throttled.set()
    Recorder(log._client, "put_records",
             fail=lambda call, index, entry: "ProvisionedThroughputExceededException" if throttled.is_set() else None)
    with pytest.raises(LogUnavailable, match="ProvisionedThroughputExceeded"):
        log.append([Append(0, payload("t"), 1)])
    assert log.read(0, 0, 10) == []
    throttled.clear()
    (offset,) = log.append([Append(0, payload("t2"), 1)])
    assert [r.offset for r in log.read(0, 0, 10)] == [offset]


def test_a_closed_or_unknown_shard_takes_no_append(log: KinesisEventLog) -> None:
    with pytest.raises(ValueError, match="partition 9"):
        log.append([Append(9, payload("x"), 1)])


# ------------------------------------------------------------------------------------------------- reading
def test_reads_continue_with_the_kept_iterator_and_recover_an_expired_one(log: KinesisEventLog) -> None:
    offsets = log.append([Append(3, payload(f"i{k}"), 1) for k in range(6)])
    iterators = Recorder(log._client, "get_shard_iterator")
    first = log.read(3, 0, 2)
    second = log.read(3, first[-1].offset, 2)
    assert [r.offset for r in first + second] == offsets[:4]
    assert len(iterators.calls) == 1  # the second read went on with the NextShardIterator of the first

    expired = {"left": 1}
    real_get_records = log._client.get_records

    def expiring(**kwargs):
        if expired["left"]:
            expired["left"] -= 1
            raise botocore.exceptions.ClientError(
                {"Error": {"Code": "ExpiredIteratorException", "Message": "Iterator expired"}}, "GetRecords")
        return real_get_records(**kwargs)

    log._client.get_records = expiring
    third = log.read(3, second[-1].offset, 10)
    assert [r.offset for r in third] == offsets[4:] and expired["left"] == 0
    assert iterators.calls[-1]["ShardIteratorType"] == "AFTER_SEQUENCE_NUMBER"
    assert iterators.calls[-1]["StartingSequenceNumber"] == str(second[-1].offset)

    log._iterators[3].obtained -= 3600  # kept past an iterator's life: not used, a new one is asked for
    calls_before = len(iterators.calls)
    assert log.read(3, offsets[-1], 10) == []
    assert len(iterators.calls) == calls_before + 1


def test_an_offset_from_another_reader_reads_on_from_there(log: KinesisEventLog, kinesis: KinesisServer) -> None:
    offsets = log.append([Append(1, payload(f"x{k}"), 1) for k in range(5)])
    other = open_stream(None, log.stream)  # another process: no iterator, no knowledge of this one's appends
    try:
        assert other.last_offset(1) == 0  # an open shard's last offset is a lower bound: nothing known yet
        assert [r.offset for r in other.read(1, offsets[1], 10)] == offsets[2:]
        assert other.last_offset(1) == offsets[-1]
        assert other.pending_events("p") == 3  # only what it has read
    finally:
        other.close()


def test_idempotency_holds_within_a_process_only(log: KinesisEventLog) -> None:
    key = Idempotency("req-1", b"first")
    assert log.submit([Append(0, payload("a"), 1)], key).result().replayed is None
    assert log.submit([Append(0, payload("b"), 1)], key).result().replayed == b"first"
    other = open_stream(None, log.stream)  # another collector process: it cannot know the key
    try:
        assert other.submit([Append(0, payload("c"), 1)], key).result().replayed is None
    finally:
        other.close()
    assert [r.payload for r in read_all(log, 0)] == [payload("a"), payload("c")]


def test_a_failed_append_frees_its_idempotency_key(log: KinesisEventLog, monkeypatch) -> None:
    monkeypatch.setattr(kinesis_log, "PUT_RETRY_SECONDS", 0.3)
    failing = threading.Event()
    failing.set()
    recorder = Recorder(log._client, "put_records",
                        fail=lambda call, index, entry: "InternalFailure" if failing.is_set() else None)
    with pytest.raises(LogUnavailable):
        log.submit([Append(0, payload("x"), 1)], Idempotency("k", b"r")).result()
    failing.clear()
    retry = log.submit([Append(0, payload("x"), 1)], Idempotency("k", b"r")).result()
    assert retry.replayed is None and len(retry.offsets) == 1 and len(recorder.calls) >= 4


# ---------------------------------------------------------------------------------------------- resharding
def _devices_on(log: KinesisEventLog, partition: int, count: int) -> list[str]:
    devices, n = [], 0
    while len(devices) < count:
        device = f"device-{n}"
        if log.route(device) == partition:
            devices.append(device)
        n += 1
    return devices


def test_split_and_merge_move_devices_only_to_children_and_keep_every_record_readable(
        kinesis: KinesisServer, monkeypatch) -> None:
    monkeypatch.setattr(kinesis_log, "SHARD_CACHE_SECONDS", 0.0)
    log = open_stream(2)
    try:
        assert log.partitions == 2 and log.open_partitions() == [0, 1] and log.parents(0) == []
        on_zero, on_one = _devices_on(log, 0, 30), _devices_on(log, 1, 10)
        assert all(hash_key(d) == int(hashlib.md5(d.encode()).hexdigest(), 16) for d in on_zero)
        before = log.append([Append(log.route(d), payload(f"before-{d}"), 1) for d in on_zero])

        parent = kinesis.client.list_shards(StreamName=log.stream)["Shards"][0]["HashKeyRange"]
        middle = (int(parent["StartingHashKey"]) + int(parent["EndingHashKey"])) // 2
        kinesis.client.split_shard(StreamName=log.stream, ShardToSplit="shardId-000000000000",
                                   NewStartingHashKey=str(middle))
        assert log.partitions == 4  # shards 2 and 3 are 0's children
        assert log.is_closed(0) and not log.is_closed(1) and not log.is_closed(2)
        assert log.parents(2) == [0] and log.parents(3) == [0] and log.open_partitions() == [1, 2, 3]
        moved = {d: log.route(d) for d in on_zero}
        assert set(moved.values()) == {2, 3}  # both children got some of the devices
        assert all((hash_key(d) < middle) == (p == 2) for d, p in moved.items())
        assert all(log.route(d) == 1 for d in on_one)  # the other shard's devices stay
        with pytest.raises(ValueError, match="shardId-000000000000.*closed"):
            log.append([Append(0, payload("late"), 1)])

        after = log.append([Append(moved[d], payload(f"after-{d}"), 1) for d in on_zero])
        parent_records = read_all(log, 0)
        assert [r.payload for r in parent_records] == [payload(f"before-{d}") for d in on_zero]
        assert [r.offset for r in parent_records] == before
        assert log.last_offset(0) == before[-1]  # a closed shard's EndingSequenceNumber
        assert log.read(0, before[-1], 10) == []  # drained
        for child in (2, 3):
            assert [r.payload for r in read_all(log, child)] == [payload(f"after-{d}") for d in on_zero
                                                                  if moved[d] == child]
        assert sorted(after) == sorted(r.offset for c in (2, 3) for r in read_all(log, c))

        kinesis.client.merge_shards(StreamName=log.stream, ShardToMerge="shardId-000000000002",
                                    AdjacentShardToMerge="shardId-000000000003")
        assert log.partitions == 5 and log.parents(4) == [2, 3] and log.open_partitions() == [1, 4]
        assert all(log.route(d) == 4 for d in on_zero)
        (merged,) = log.append([Append(log.route(on_zero[0]), payload("merged"), 1)])
        assert [r.payload for r in read_all(log, 4)] == [payload("merged")]
        assert [r.payload for r in read_all(log, 2)] == [payload(f"after-{d}") for d in on_zero if moved[d] == 2]
        assert merged > 0 and log.last_offset(4) == merged

        reopened = open_stream(None, log.stream)  # another process sees the same lineage
        try:
            assert reopened.partitions == 5 and reopened.parents(4) == [2, 3] and reopened.is_closed(2)
            assert [reopened.route(d) for d in on_one] == [1] * len(on_one)
        finally:
            reopened.close()
    finally:
        log.close()


def test_a_record_put_to_a_shard_closed_meanwhile_lands_in_its_child_and_is_acknowledged(
        kinesis: KinesisServer, monkeypatch) -> None:
    monkeypatch.setattr(kinesis_log, "SHARD_CACHE_SECONDS", 3600.0)
    log = open_stream(1)  # the shard map stays cached: the writer still believes shard 0 is open
    try:
        log.append([Append(0, payload("first"), 1)])
        kinesis.client.split_shard(StreamName=log.stream, ShardToSplit="shardId-000000000000",
                                   NewStartingHashKey=str(2 ** 127))
        (offset,) = log.append([Append(0, payload("raced"), 1)])  # ExplicitHashKey 0: now child 1's range
        log._shards_expire()
        assert [r.payload for r in read_all(log, 1)] == [payload("raced")] and read_all(log, 1)[0].offset == offset
        assert [r.payload for r in read_all(log, 0)] == [payload("first")]
    finally:
        log.close()


def test_kinesis_records_from_other_producers_count_their_lines(log: KinesisEventLog,
                                                                kinesis: KinesisServer) -> None:
    hash_start = kinesis.client.list_shards(StreamName=log.stream)["Shards"][1]["HashKeyRange"]["StartingHashKey"]
    kinesis.client.put_record(StreamName=log.stream, Data=b'{"e":1}\n{"e":2}\n', PartitionKey="device-x",
                              ExplicitHashKey=hash_start)
    (record,) = log.read(1, 0, 10)
    assert record.events == 2 and record.partition == 1


def test_pending_events_follow_this_processs_appends_and_commits(log: KinesisEventLog) -> None:
    offsets = log.append([Append(0, payload("a"), 10), Append(1, payload("b"), 5), Append(0, payload("c"), 2)])
    assert log.pending_events("c") == 17 and log.pending_events_in(0, "c") == 12
    log.commit("c", 0, offsets[0])
    assert log.pending_events("c") == 7


def test_an_offset_kinesis_refuses_as_a_sequence_number_reads_from_the_oldest_record_on(
        log: KinesisEventLog) -> None:
    offsets = log.append([Append(2, payload(f"n{k}"), 1) for k in range(4)])
    real = log._client.get_shard_iterator

    def strict(**kwargs):  # as Kinesis answers for a number that is not one of the shard's sequence numbers
        if kwargs.get("StartingSequenceNumber") == str(offsets[1]):
            raise botocore.exceptions.ClientError(
                {"Error": {"Code": "InvalidArgumentException", "Message": "Invalid StartingSequenceNumber"}},
                "GetShardIterator")
        return real(**kwargs)

    log._client.get_shard_iterator = strict
    assert [r.offset for r in log.read(2, offsets[1], 10)] == offsets[2:]


def test_a_deleted_stream_is_log_unavailable_not_a_crash(kinesis: KinesisServer, monkeypatch) -> None:
    monkeypatch.setattr(kinesis_log, "SHARD_CACHE_SECONDS", 3600.0)
    log = open_stream(1)
    try:
        kinesis.client.delete_stream(StreamName=log.stream)
        with pytest.raises(LogUnavailable, match="ResourceNotFound"):
            log.append([Append(0, payload("x"), 1)])
        with pytest.raises(LogUnavailable, match="ResourceNotFound"):
            log.read(0, 0, 10)
    finally:
        log.close()

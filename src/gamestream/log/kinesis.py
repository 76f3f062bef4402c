"""The event log on AWS Kinesis Data Streams (boto3): `kinesis://STREAM`.

Region, credentials and endpoint come only from the standard AWS environment, which boto3 reads itself
(AWS_REGION or AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN or AWS_PROFILE, an
instance role, AWS_ENDPOINT_URL for a local Kinesis such as moto's server). gamestream has no settings of its own
for them.

How the `EventLog` protocol maps onto Kinesis:

- **Partition = shard number**: `shardId-000000000007` is partition 7. `partitions` is 1 + the highest shard
  number in the stream (ListShards, closed shards included), cached for SHARD_CACHE_SECONDS: it grows when the
  stream is resharded. A partition number with no shard (a closed shard past the stream's retention, which
  ListShards no longer lists) reads as empty and takes no appends.
- **Routing**: `route(device_id)` is the open shard whose hash-key range holds MD5(device_id), exactly Kinesis' own
  rule for PartitionKey=device_id, so a SplitShard or MergeShards moves a device only from a shard to its
  children. `parents`, `is_closed` and `open_partitions` tell a reader (the processor) the shard lineage, so it
  can drain a parent before it reads the children.
- **A record** is one Kinesis record, sent to shard `partition` with ExplicitHashKey = that shard's
  StartingHashKey (PartitionKey = str(partition), which Kinesis then ignores for routing). Appending to a closed
  or unknown shard is refused (ValueError). If the stream is resharded between our check and the put, Kinesis
  stores the record in the child shard that now owns that hash key: the append still succeeds (the record is
  durable and will be read from that child; a warning is logged) — its offset is then one of the child's.
- **Offsets** are the records' SequenceNumbers as Python ints (up to 56 digits): positive and growing within a
  shard, not contiguous. `LogRecord.events` is counted from the payload (rows of an Arrow payload, read from the
  IPC metadata without decompressing; non-blank lines of NDJSON), so records of foreign producers count too.
  `appended_at` is the record's ApproximateArrivalTimestamp.
- **Appends** go through PutRecords within its limits (≤ PUT_MAX_ENTRIES entries and ≤ PUT_MAX_BYTES per call,
  ≤ 1 MiB per record including its partition key: `max_record_bytes`, bigger records raise RecordTooLarge).
  A single writer thread sends them; see `_Writer` for how order survives partial failures (the short of it:
  one PutRecords call never carries two records of one append for the same shard).
- **Durability**: a record has a SequenceNumber once Kinesis has stored it (replicated over three availability
  zones); an append resolves only once every one of its records has one.
- **What Kinesis cannot do** (the flags tell the conformance suite and callers):
  * no transactions: an append that fails (throttled past PUT_RETRY_SECONDS, or unreachable) may have stored
    some of its records; and a PutRecords call that timed out may have stored records that a retry (botocore's
    or ours) stores again. The processor cannot tell such duplicates apart.
  * `idempotency_scope = "process"`: an idempotency key is honoured within this process only (an in-memory LRU of
    IDEMPOTENCY_MAX_KEYS keys for IDEMPOTENCY_SECONDS). **Across collector processes, or after a restart, a
    retried request may append twice**, and the processor cannot tell.
  * `supports_trim = False`: records leave the stream by its retention period (a stream setting, 24 h by
    default), not by `trim`, which returns 0.
  * `positions_scope = "process"`: `commit` / `committed` are kept in memory (the Delta tables hold the real
    positions). `pending_events` counts, per partition, the events of the records this object appended or read
    (the last KNOWN_RECORDS of each) after the consumer's position as this process knows it: exact in the
    process that appends, reads and commits; in a process that only appends (a collector) it cannot see the
    processor's commits and counts everything it appended that is still remembered.
  * `last_offset` of an open shard is the highest sequence this object appended or read there — a lower bound
    (Kinesis cannot tell a shard's last sequence without reading it); a closed shard's is its
    EndingSequenceNumber. `last_appended_at` likewise.
- **Errors**: connection failures, throttling that outlasts the retries, and a stream being created or updated
  raise `LogUnavailable` (wait and retry). A missing stream is created when `partitions` is given (CreateStream
  with that many shards, then waiting until it is ACTIVE); otherwise opening it raises ValueError saying how to
  create it.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import re
import struct
import threading
import time
from bisect import bisect_right
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import stamina

from gamestream.log.base import Append, AppendResult, Idempotency, LogFeatures, LogRecord, LogUnavailable
from gamestream.log import payload as payload_format

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
PUT_MAX_ENTRIES = 500  # PutRecords: entries per call
PUT_MAX_BYTES = 5 * MiB  # PutRecords: data + partition keys per call
RECORD_MAX_BYTES = 1 * MiB  # one record: data + partition key
_KEY_ROOM = 256  # a partition key is at most 256 characters: max_record_bytes leaves room for it
GET_MAX_RECORDS = 10_000  # GetRecords' Limit
SHARD_CACHE_SECONDS = 5.0
PUT_RETRY_SECONDS = 10.0  # failed entries (throttled, InternalFailure) are retried this long, then LogUnavailable
READ_RETRY_SECONDS = 10.0  # GetRecords / GetShardIterator throttled or unreachable this long → LogUnavailable
OPEN_WAIT_SECONDS = 120.0  # opening waits this long for a stream being created (CREATING → ACTIVE)
EMPTY_PAGES_SECONDS = 2.0  # read follows empty GetRecords pages (MillisBehindLatest > 0) this long per call
READ_YOUR_WRITES_SECONDS = 2.0  # read waits this long for a record this object appended to become visible
ITERATOR_MAX_AGE_SECONDS = 240.0  # a shard iterator expires after 5 minutes; a cached one older is not reused
IDEMPOTENCY_SECONDS = 24 * 3600
IDEMPOTENCY_MAX_KEYS = 100_000
KNOWN_RECORDS = 20_000  # per partition, (offset, events) remembered for pending_events

_RETRYABLE_CODES = {"ProvisionedThroughputExceededException", "ThrottlingException", "LimitExceededException",
                    "InternalFailure", "InternalFailureException", "ServiceUnavailable",
                    "ServiceUnavailableException", "KMSThrottlingException", "RequestTimeout",
                    "RequestTimeoutException", "SlowDown"}
# a stream being created, updated or deleted: the caller waits (LogUnavailable)
_STREAM_BUSY_CODES = ("ResourceInUseException", "ResourceNotFoundException")
_STREAM_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")


class RecordTooLarge(ValueError):
    """A record (with its partition key) is over Kinesis' 1 MiB per record; it is refused rather than split."""


class _EntriesFailed(Exception):
    """Some entries of a PutRecords call came back with an ErrorCode (throttled, InternalFailure)."""

    def __init__(self, codes: collections.Counter) -> None:
        super().__init__(", ".join(f"{code} ×{count}" for code, count in codes.items()))
        self.codes = codes


def _error_code(error: BaseException) -> str:
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def _transient(error: BaseException) -> bool:
    """Worth retrying the same call: throttling, a server-side failure, a connection or read timeout."""
    import botocore.exceptions as bx

    if isinstance(error, _EntriesFailed):
        return True
    if isinstance(error, (bx.ConnectionError, bx.HTTPClientError)):  # EndpointConnectionError, ReadTimeout, …
        return True
    if isinstance(error, bx.ClientError):
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return _error_code(error) in _RETRYABLE_CODES or status >= 500
    return False


def _unavailable(error: BaseException, what: str) -> LogUnavailable:
    return LogUnavailable(f"the Kinesis log is unavailable ({what}): {type(error).__name__}: {error}")


def shard_number(shard_id: str) -> int:
    """`shardId-000000000007` → 7."""
    return int(shard_id.rsplit("-", 1)[1])


def shard_id(partition: int) -> str:
    return f"shardId-{partition:012d}"


def hash_key(device_id: str) -> int:
    """Kinesis' hash of a partition key: MD5 as a 128-bit integer."""
    return int(hashlib.md5(device_id.encode()).hexdigest(), 16)


def _arrow_rows(data: bytes) -> int:
    """Rows of an Arrow payload from its IPC messages' metadata (the RecordBatch `length` of each record batch
    message, read from the flatbuffer), without decompressing the bodies; `payload.decode` when that fails."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    try:
        total = 0
        for message in ipc.MessageReader.open_stream(pa.py_buffer(data)[len(payload_format.MAGIC):]):
            if message.type != "record batch":
                continue
            meta = message.metadata.to_pybytes()

            def field_at(table: int, index: int) -> int | None:
                vtable = table - struct.unpack_from("<i", meta, table)[0]
                size = struct.unpack_from("<H", meta, vtable)[0]
                if 4 + 2 * index >= size:
                    return None
                offset = struct.unpack_from("<H", meta, vtable + 4 + 2 * index)[0]
                return table + offset if offset else None

            root = struct.unpack_from("<I", meta, 0)[0]
            kind, header = field_at(root, 1), field_at(root, 2)  # Message.header_type, Message.header
            if kind is None or meta[kind] != 3 or header is None:  # 3: MessageHeader.RecordBatch
                raise ValueError("not a record batch header")
            batch = header + struct.unpack_from("<I", meta, header)[0]
            length = field_at(batch, 0)  # RecordBatch.length
            total += struct.unpack_from("<q", meta, length)[0] if length is not None else 0
        return total
    except Exception:
        try:
            return payload_format.decode(data).num_rows
        except ValueError:
            return 0


def events_in(data: bytes) -> int:
    """How many events a payload holds: rows of an Arrow payload, non-blank lines of NDJSON."""
    if payload_format.is_arrow(data):
        return _arrow_rows(data)
    return sum(1 for line in data.split(b"\n") if line.strip())


@dataclass(frozen=True, slots=True)
class Shard:
    number: int
    starting_hash: int
    ending_hash: int
    parents: tuple[int, ...]
    ending_sequence: int | None  # set once the shard is closed (split or merged)

    @property
    def closed(self) -> bool:
        return self.ending_sequence is not None


# ------------------------------------------------------------------------------------------------ the writer
@dataclass(eq=False)
class _Submit:
    records: Sequence[Append]
    future: Future
    offsets: list[int]
    queues: dict[int, collections.deque]  # shard → indices of this submit's records not yet stored, in order
    left: int


@dataclass(eq=False)
class _Entry:
    submit: _Submit
    index: int
    request: dict[str, Any]
    size: int


class _Writer:
    """One thread that turns submits into PutRecords calls.

    **Order under partial failure.** PutRecords may store entry i+1 and fail entry i (each entry succeeds or fails
    on its own: ProvisionedThroughputExceededException, InternalFailure). If both were records of one append for
    the same shard, re-sending i would store it after i+1: the append's order would be lost; re-sending i and i+1
    would store i+1 twice. So the writer works in rounds, and a round holds at most one record per (submit,
    shard) pair — the first one of that submit for that shard not yet stored. A round is sent as few PutRecords
    calls as the limits allow; entries that fail are re-sent (only they) with backoff until every entry of the
    round has a SequenceNumber, and only then does the next round take the submit's next record for that shard.
    A record is therefore sent only after the previous record of its append for its shard is stored, so it gets
    a higher sequence number. Records of *different* submits share calls freely: concurrent appends promise no
    order between each other. The cost is one round trip per record of an append for one shard — an append of
    n records for one shard takes n calls. Producers of big appends (`load`) write records near 1 MiB, which is
    what a shard takes per second anyway; the collector's many small concurrent appends share rounds.

    A round that cannot be stored within PUT_RETRY_SECONDS fails its submits with LogUnavailable (records of
    those submits stored in earlier rounds stay stored: Kinesis has no transactions). While a round's failed
    entries wait for their retry, the next round waits too: a throttled shard slows every append of this writer
    (the collector then answers 503 once the retries are spent, which is the backpressure Kinesis asks for)."""

    def __init__(self, log: "KinesisEventLog") -> None:
        self._log = log
        self._lock = threading.Condition()
        self._active: list[_Submit] = []
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"kinesis-writer-{log.stream}", daemon=True)
        self._thread.start()

    def submit(self, records: Sequence[Append], future: Future) -> None:
        queues: dict[int, collections.deque] = {}
        for index, record in enumerate(records):
            queues.setdefault(record.partition, collections.deque()).append(index)
        with self._lock:
            if self._closed:
                raise RuntimeError("the log is closed")
            self._active.append(_Submit(records, future, [0] * len(records), queues, len(records)))
            self._lock.notify()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._thread.join(timeout=PUT_RETRY_SECONDS + 30)

    def _heads(self) -> list[tuple[_Submit, int, int]]:
        """(submit, shard, record index) of each submit's first record not yet stored, per shard."""
        return [(submit, shard, queue[0]) for submit in self._active for shard, queue in submit.queues.items()
                if queue]

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._active and not self._closed:
                    self._lock.wait()
                if not self._active:
                    return
                heads = self._heads()
            entries = []
            for submit, shard, index in heads:
                try:
                    starting_hash = self._log._starting_hash(shard)
                except Exception as error:  # the shard map could not be read, or the shard is gone
                    if not submit.future.done():
                        submit.future.set_exception(error)
                    continue
                record = submit.records[index]
                request = {"Data": record.payload, "PartitionKey": str(shard), "ExplicitHashKey": str(starting_hash)}
                entries.append(_Entry(submit, index, request, len(record.payload) + len(str(shard))))
            try:
                for call in self._calls(entries):
                    self._put(call)
            except BaseException as error:  # a bug, not the stream: fail the round's appends rather than hang
                logger.exception("the Kinesis writer failed a round")
                for entry in entries:
                    if not entry.submit.future.done():
                        entry.submit.future.set_exception(error)
            self._finish()

    @staticmethod
    def _calls(entries: list[_Entry]) -> list[list[_Entry]]:
        calls: list[list[_Entry]] = [[]]
        size = 0
        for entry in entries:
            if calls[-1] and (len(calls[-1]) >= PUT_MAX_ENTRIES or size + entry.size > PUT_MAX_BYTES):
                calls.append([])
                size = 0
            calls[-1].append(entry)
            size += entry.size
        return [call for call in calls if call]

    def _put(self, call: list[_Entry]) -> None:
        log = self._log
        pending = [entry for entry in call if not entry.submit.future.done()]
        try:
            for attempt in stamina.retry_context(on=_transient, attempts=None, timeout=PUT_RETRY_SECONDS,
                                                 wait_initial=0.05, wait_max=2.0, wait_jitter=0.1):
                with attempt:
                    if not pending:
                        return
                    answer = log._client.put_records(StreamName=log.stream, Records=[e.request for e in pending])
                    failed, codes = [], collections.Counter()
                    for entry, result in zip(pending, answer["Records"]):
                        if result.get("SequenceNumber") and not result.get("ErrorCode"):
                            self._stored(entry, result)
                        else:
                            failed.append(entry)
                            codes[result.get("ErrorCode") or "no SequenceNumber"] += 1
                    pending = failed
                    if pending:
                        logger.debug("PutRecords: %d of %d entries failed (%s); re-sending them",
                                     len(failed), len(answer["Records"]), dict(codes))
                        raise _EntriesFailed(codes)
        except Exception as error:
            unavailable = _transient(error) or _error_code(error) in _STREAM_BUSY_CODES
            problem: BaseException = _unavailable(error, "PutRecords") if unavailable else error
            for entry in pending:
                if not entry.submit.future.done():
                    entry.submit.future.set_exception(problem)

    def _stored(self, entry: _Entry, result: dict[str, Any]) -> None:
        submit = entry.submit
        record = submit.records[entry.index]
        offset = int(result["SequenceNumber"])
        partition = shard_number(result.get("ShardId") or shard_id(record.partition))
        if partition != record.partition:
            logger.warning("a record for shard %d was stored in shard %d: the stream was resharded meanwhile",
                           record.partition, partition)
            self._log._shards_expire()
        submit.offsets[entry.index] = offset
        submit.left -= 1
        self._log._known(partition, offset, record.events, time.time())

    def _finish(self) -> None:
        with self._lock:
            still = []
            for submit in self._active:
                if submit.future.done():  # failed
                    continue
                if submit.left == 0:
                    submit.future.set_result(AppendResult(submit.offsets))
                    continue
                for shard, queue in submit.queues.items():  # drop the heads that were stored
                    while queue and submit.offsets[queue[0]]:
                        queue.popleft()
                still.append(submit)
            self._active = still


# ---------------------------------------------------------------------------------------------- the log
@dataclass
class _Iterator:
    after: int  # the iterator returns records after this sequence
    iterator: str
    obtained: float  # monotonic


@dataclass
class _Partition:
    """What this object knows of one partition from its own appends and reads."""

    last_offset: int = 0
    last_appended_at: float | None = None
    records: collections.OrderedDict = field(default_factory=collections.OrderedDict)  # offset → events


@dataclass
class _Idem:
    future: Future
    response: bytes
    at: float


class KinesisEventLog(LogFeatures):
    """`EventLog` on a Kinesis data stream. Thread-safe; any number of processes may open the same stream (with
    the limits on idempotency and positions the module docstring lists).

    >>> log = KinesisEventLog.connect("kinesis://games", partitions=4)   # creates the stream when absent
    >>> log.append([Append(log.route("device-1"), b'{"eventName":"x"}', 1)])
    """

    idempotency_scope = "process"
    positions_scope = "process"
    own_routing = True  # hash-key ranges of the open shards (`route`)
    reshards = True  # shards split and merge (`parents`, `is_closed`)
    supports_trim = False
    long_offsets = True  # sequence numbers exceed int64: the tables keep them as lake.TxnPositions(counted=True)
    max_record_bytes = RECORD_MAX_BYTES - _KEY_ROOM

    def __init__(self, stream: str, *, partitions: int | None = None, client: Any = None) -> None:
        if not _STREAM_NAME.fullmatch(stream):
            raise ValueError(f"Kinesis stream name {stream!r}: 1-128 letters, digits, '_', '-' and '.'")
        if partitions is not None and partitions < 1:
            raise ValueError("partitions must be >= 1")
        self.stream = stream
        self._client = client if client is not None else self._new_client()
        self._lock = threading.Lock()
        self._shard_map: dict[int, Shard] = {}
        self._open_ranges: list[tuple[int, int, int]] = []  # (starting hash, ending hash, number), sorted
        self._shards_at = float("-inf")
        self._shards_lock = threading.Lock()
        self._iterators: dict[int, _Iterator] = {}
        self._partitions: dict[int, _Partition] = collections.defaultdict(_Partition)
        self._positions: dict[tuple[str, int], int] = {}
        self._idempotency: collections.OrderedDict[str, _Idem] = collections.OrderedDict()
        self._idempotency_lock = threading.Lock()
        self._closed = False
        self._open(partitions)
        self._writer = _Writer(self)

    @classmethod
    def connect(cls, url: str, *, partitions: int | None = None) -> "KinesisEventLog":
        """Opens the stream `kinesis://STREAM` names; creates it with `partitions` shards when it does not exist
        and `partitions` is given. An existing stream keeps its own shards (resharding is Kinesis' business)."""
        scheme, sep, rest = url.partition("://")
        if not sep or scheme.lower() != "kinesis":
            raise ValueError(f"log URL {url!r}: expected kinesis://STREAM")
        stream = rest.strip("/")
        return cls(stream, partitions=partitions)

    @staticmethod
    def _new_client() -> Any:
        import boto3
        from botocore.config import Config

        # boto3 reads AWS_DEFAULT_REGION; AWS_REGION (what most tools set) only when that is absent
        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or None
        config = Config(retries={"mode": "standard", "max_attempts": 3}, connect_timeout=5, read_timeout=20,
                        max_pool_connections=32)
        return boto3.client("kinesis", region_name=region, config=config)

    # ---------------------------------------------------------------------------------------------- plumbing
    def _call(self, what: str, function: Callable[..., Any], /, *, passthrough: tuple[str, ...] = (),
              **kwargs: Any) -> Any:
        """One AWS call, retried while throttled or unreachable for up to READ_RETRY_SECONDS, then LogUnavailable;
        also LogUnavailable for a stream being created or updated (ResourceInUse, ResourceNotFound) unless the
        caller handles that code itself (`passthrough`)."""
        try:
            for attempt in stamina.retry_context(on=_transient, attempts=None, timeout=READ_RETRY_SECONDS,
                                                 wait_initial=0.05, wait_max=1.0, wait_jitter=0.1):
                with attempt:
                    return function(**kwargs)
        except Exception as error:
            code = _error_code(error)
            if code in passthrough:
                raise
            if _transient(error) or code in _STREAM_BUSY_CODES:
                raise _unavailable(error, what) from error
            raise
        raise AssertionError("unreachable")

    def _open(self, partitions: int | None) -> None:
        deadline = time.monotonic() + OPEN_WAIT_SECONDS
        created = False
        while True:
            try:
                summary = self._call("DescribeStreamSummary", self._client.describe_stream_summary, passthrough=(
                    "ResourceNotFoundException",), StreamName=self.stream)["StreamDescriptionSummary"]
            except Exception as error:
                if _error_code(error) != "ResourceNotFoundException":
                    raise
                if created:  # just created: not visible yet
                    summary = {"StreamStatus": "CREATING"}
                elif partitions is None:
                    raise ValueError(
                        f"Kinesis stream {self.stream!r} does not exist (region "
                        f"{self._client.meta.region_name}); create it with `aws kinesis create-stream --stream-name "
                        f"{self.stream} --shard-count N`, or give --partitions N to have gamestream create it with "
                        "N shards") from None
                else:
                    try:
                        self._call("CreateStream", self._client.create_stream, passthrough=(
                            "ResourceInUseException",), StreamName=self.stream, ShardCount=partitions)
                        logger.info("created Kinesis stream %s with %d shards", self.stream, partitions)
                    except Exception as create_error:
                        if _error_code(create_error) != "ResourceInUseException":
                            raise  # ResourceInUse: created meanwhile by another process
                    created = True
                    summary = {"StreamStatus": "CREATING"}
            status = summary.get("StreamStatus")
            if status in ("ACTIVE", "UPDATING"):  # UPDATING (a reshard) still takes reads and writes
                break
            if status == "DELETING":
                raise LogUnavailable(f"Kinesis stream {self.stream!r} is being deleted")
            if time.monotonic() > deadline:
                raise LogUnavailable(f"Kinesis stream {self.stream!r} is still {status} after "
                                     f"{OPEN_WAIT_SECONDS:.0f} s")
            time.sleep(0.5)
        self._shards(refresh=True)
        if partitions is not None and not created:
            open_count = len(self._open_ranges)
            if open_count != partitions:
                logger.info("Kinesis stream %s has %d open shards (partitions 0..%d); --partitions %d is ignored "
                            "for an existing stream", self.stream, open_count, self.partitions - 1, partitions)

    # ------------------------------------------------------------------------------------------------ shards
    def _shards(self, refresh: bool = False) -> dict[int, Shard]:
        """The stream's shards by number (ListShards, all pages, closed shards included), cached."""
        if not refresh and time.monotonic() - self._shards_at < SHARD_CACHE_SECONDS:
            return self._shard_map
        with self._shards_lock:
            if not refresh and time.monotonic() - self._shards_at < SHARD_CACHE_SECONDS:
                return self._shard_map
            shards: dict[int, Shard] = {}
            kwargs: dict[str, Any] = {"StreamName": self.stream}
            while True:
                answer = self._call("ListShards", self._client.list_shards, **kwargs)
                for item in answer.get("Shards", []):
                    number = shard_number(item["ShardId"])
                    parents = tuple(shard_number(item[key]) for key in ("ParentShardId", "AdjacentParentShardId")
                                    if item.get(key))
                    ending = item.get("SequenceNumberRange", {}).get("EndingSequenceNumber")
                    shards[number] = Shard(number, int(item["HashKeyRange"]["StartingHashKey"]),
                                           int(item["HashKeyRange"]["EndingHashKey"]), parents,
                                           int(ending) if ending is not None else None)
                token = answer.get("NextToken")
                if not token:
                    break
                kwargs = {"NextToken": token}
            self._shard_map = shards
            self._open_ranges = sorted((s.starting_hash, s.ending_hash, s.number)
                                       for s in shards.values() if not s.closed)
            self._shards_at = time.monotonic()
            return shards

    def _shards_expire(self) -> None:
        self._shards_at = float("-inf")

    def _shard(self, partition: int, *, fresh_if_missing: bool = True) -> Shard | None:
        shard = self._shards().get(partition)
        if shard is None and fresh_if_missing:
            shard = self._shards(refresh=True).get(partition)
        return shard

    def _starting_hash(self, partition: int) -> int:
        shard = self._shard(partition)
        if shard is None:
            raise ValueError(f"partition {partition} is not a shard of Kinesis stream {self.stream!r}")
        return shard.starting_hash

    @property
    def partitions(self) -> int:
        """1 + the highest shard number: grows when the stream is resharded."""
        shards = self._shards()
        return max(shards) + 1 if shards else 0

    def open_partitions(self) -> list[int]:
        self._shards()
        return sorted(number for _, _, number in self._open_ranges)

    def parents(self, partition: int) -> list[int]:
        """The shards this one was split or merged from (ParentShardId, AdjacentParentShardId): read those to
        their end before this one to keep a device's order."""
        shard = self._shard(partition)
        return list(shard.parents) if shard else []

    def is_closed(self, partition: int) -> bool:
        """Whether the shard was split or merged (it has an EndingSequenceNumber: it takes no more records). A
        partition number with no shard (expired) counts as closed. A shard closed since the last ListShards is
        seen within SHARD_CACHE_SECONDS."""
        shard = self._shard(partition)
        return shard is None or shard.closed

    def route(self, device_id: str) -> int:
        """The open shard whose hash-key range holds MD5(device_id): Kinesis' own rule for PartitionKey=device_id."""
        key = hash_key(device_id)
        for refresh in (False, True):
            self._shards(refresh=refresh)
            ranges = self._open_ranges
            index = bisect_right(ranges, (key, float("inf"), 0)) - 1
            if index >= 0 and ranges[index][0] <= key <= ranges[index][1]:
                return ranges[index][2]
        raise LogUnavailable(f"no open shard of Kinesis stream {self.stream!r} holds hash key {key} "
                             "(a reshard under way?)")

    # ------------------------------------------------------------------------------------------------ append
    def append(self, records: Sequence[Append]) -> list[int]:
        """Appends durably; returns the offsets once every record has a SequenceNumber."""
        return self.submit(records).result().offsets

    def _check(self, records: Sequence[Append]) -> None:
        for refresh in (False, True):
            shards = self._shards(refresh=refresh)
            bad = [r.partition for r in records if r.partition not in shards or shards[r.partition].closed]
            if not bad:
                break
        for record in records:
            shard = shards.get(record.partition)
            if shard is None:
                raise ValueError(f"partition {record.partition} is outside the shards of Kinesis stream "
                                 f"{self.stream!r} (open: {self.open_partitions()})")
            if shard.closed:
                raise ValueError(f"partition {record.partition} ({shard_id(record.partition)}) of Kinesis stream "
                                 f"{self.stream!r} is closed (split or merged); open: {self.open_partitions()}")
            if len(record.payload) + len(str(record.partition)) > RECORD_MAX_BYTES:
                raise RecordTooLarge(f"a record of {len(record.payload):,} bytes is over Kinesis' limit of "
                                     f"{RECORD_MAX_BYTES:,} bytes per record; split it (max_record_bytes)")

    def submit(self, records: Sequence[Append], idempotency: Idempotency | None = None) -> Future[AppendResult]:
        """Starts an append; the future resolves once every record has a SequenceNumber, or fails (LogUnavailable
        when throttled or unreachable for PUT_RETRY_SECONDS). An idempotency key is honoured within this process
        only (`idempotency_scope`)."""
        if self._closed:
            raise RuntimeError("the log is closed")
        records = list(records)
        self._check(records)
        if idempotency is None:
            return self._enqueue(records)
        return self._submit_idempotent(records, idempotency)

    def _enqueue(self, records: list[Append]) -> Future[AppendResult]:
        future: Future[AppendResult] = Future()
        if not records:
            future.set_result(AppendResult([]))
        else:
            self._writer.submit(records, future)
        return future

    def _submit_idempotent(self, records: list[Append], idempotency: Idempotency) -> Future[AppendResult]:
        """Checked and filled under one lock: of concurrent submits with one key, the first appends, the others
        wait for it and replay its response (or, if it failed, try again themselves)."""
        now = time.time()
        with self._idempotency_lock:
            while self._idempotency:  # the oldest first: expire those past IDEMPOTENCY_SECONDS
                oldest = next(iter(self._idempotency.values()))
                if now - oldest.at < IDEMPOTENCY_SECONDS and len(self._idempotency) < IDEMPOTENCY_MAX_KEYS:
                    break
                self._idempotency.popitem(last=False)
            known = self._idempotency.get(idempotency.key)
            if known is None:
                first = self._enqueue(records)
                entry = _Idem(first, idempotency.response, now)
                self._idempotency[idempotency.key] = entry

                def forget_on_failure(done: Future, key: str = idempotency.key, entry: _Idem = entry) -> None:
                    if done.exception() is not None:
                        with self._idempotency_lock:
                            if self._idempotency.get(key) is entry:
                                del self._idempotency[key]

                first.add_done_callback(forget_on_failure)
                return first
        result: Future[AppendResult] = Future()

        def replay(done: Future) -> None:
            if done.exception() is None:
                result.set_result(AppendResult([], replayed=known.response))
                return
            try:  # the first append failed: its key is free again, and this request tries itself
                again = self._submit_idempotent(records, idempotency)
            except BaseException as error:
                result.set_exception(error)
                return
            again.add_done_callback(lambda f: result.set_exception(f.exception()) if f.exception() is not None
                                    else result.set_result(f.result()))

        known.future.add_done_callback(replay)
        return result

    # ---------------------------------------------------------------------------------------- what we know
    def _known(self, partition: int, offset: int, events: int, appended_at: float) -> None:
        with self._lock:
            known = self._partitions[partition]
            if offset > known.last_offset:
                known.last_offset = offset
                known.last_appended_at = appended_at
            if offset not in known.records:
                known.records[offset] = events
                if len(known.records) > KNOWN_RECORDS:
                    known.records.popitem(last=False)

    # -------------------------------------------------------------------------------------------------- read
    def _new_iterator(self, partition: int, after: int) -> str | None:
        """An iterator after `after` (from the oldest record when 0); None when the shard no longer exists."""
        kwargs: dict[str, Any] = {"StreamName": self.stream, "ShardId": shard_id(partition),
                                  "passthrough": ("InvalidArgumentException", "ResourceNotFoundException")}
        try:
            if after > 0:
                try:
                    return self._call("GetShardIterator", self._client.get_shard_iterator,
                                      ShardIteratorType="AFTER_SEQUENCE_NUMBER", StartingSequenceNumber=str(after),
                                      **kwargs)["ShardIterator"]
                except Exception as error:
                    if _error_code(error) != "InvalidArgumentException":
                        raise
                    # not a sequence number of this shard (an offset that never was one): read from the oldest
                    # record and skip those at or below `after`
            return self._call("GetShardIterator", self._client.get_shard_iterator, ShardIteratorType="TRIM_HORIZON",
                              **kwargs)["ShardIterator"]
        except Exception as error:
            if _error_code(error) != "ResourceNotFoundException":
                raise
            if self._shards(refresh=True).get(partition) is None:
                return None  # expired past the retention: reads as empty
            raise _unavailable(error, "GetShardIterator") from error

    def read(self, partition: int, after_offset: int, max_records: int) -> list[LogRecord]:
        """Records of the shard after `after_offset`, in sequence order. Continues from the iterator the previous
        read of this partition ended with when it ended at `after_offset` (no GetShardIterator per call); follows
        empty pages while Kinesis says the iterator is behind (MillisBehindLatest > 0) for EMPTY_PAGES_SECONDS;
        waits up to READ_YOUR_WRITES_SECONDS for a record this object appended to become visible; and returns []
        at once when caught up."""
        if max_records <= 0:
            return []
        shard = self._shard(partition)
        if shard is None:
            return []
        if shard.closed and after_offset >= (shard.ending_sequence or 0):
            return []
        with self._lock:
            cached = self._iterators.pop(partition, None)
            expected = self._partitions[partition].last_offset if partition in self._partitions else 0
        if cached is not None and (cached.after != after_offset
                                   or time.monotonic() - cached.obtained > ITERATOR_MAX_AGE_SECONDS):
            cached = None
        iterator = cached.iterator if cached else self._new_iterator(partition, after_offset)
        obtained = cached.obtained if cached else time.monotonic()
        started = time.monotonic()
        renewed = 0
        while True:
            if iterator is None:
                return []
            try:
                answer = self._call("GetRecords", self._client.get_records, passthrough=(
                    "ExpiredIteratorException",), ShardIterator=iterator, Limit=min(max_records, GET_MAX_RECORDS))
            except Exception as error:
                if _error_code(error) != "ExpiredIteratorException" or renewed >= 3:
                    raise
                renewed += 1  # kept too long (5 minutes): a new one from the same position
                iterator, obtained = self._new_iterator(partition, after_offset), time.monotonic()
                continue
            records = []
            for item in answer.get("Records", []):
                offset = int(item["SequenceNumber"])
                if offset <= after_offset:
                    continue
                data = bytes(item["Data"])
                stamp = item.get("ApproximateArrivalTimestamp")
                appended_at = stamp.timestamp() if stamp is not None else time.time()
                records.append(LogRecord(partition, offset, data, events_in(data), appended_at))
            following = answer.get("NextShardIterator")
            if records:
                records = records[:max_records]
                for record in records:
                    self._known(partition, record.offset, record.events, record.appended_at)
                if following and records[-1].offset == int(answer["Records"][-1]["SequenceNumber"]):
                    self._keep(partition, records[-1].offset, following, obtained)
                return records
            if not following:  # a closed shard read to its end
                return []
            iterator = following
            if answer.get("Records"):  # only records at or below `after` (read from TRIM_HORIZON): go on
                continue
            waited = time.monotonic() - started
            if answer.get("MillisBehindLatest", 0) > 0 and waited < EMPTY_PAGES_SECONDS:
                continue
            if after_offset < expected and waited < READ_YOUR_WRITES_SECONDS:
                time.sleep(0.02)  # a record we appended is not visible yet
                continue
            self._keep(partition, after_offset, iterator, obtained)
            return []

    def _keep(self, partition: int, after: int, iterator: str, obtained: float) -> None:
        with self._lock:
            self._iterators[partition] = _Iterator(after, iterator, obtained)

    # ------------------------------------------------------------------------------------- offsets and time
    def last_offset(self, partition: int) -> int:
        """A closed shard's EndingSequenceNumber; for an open shard the highest sequence this object appended or
        read there — a lower bound (0 until it has done either)."""
        shard = self._shard(partition, fresh_if_missing=False)
        with self._lock:
            known = self._partitions[partition].last_offset if partition in self._partitions else 0
        if shard is not None and shard.closed:
            return max(shard.ending_sequence or 0, known)
        return known

    def last_appended_at(self, partition: int) -> float | None:
        """When the newest record this object appended or read in the partition arrived; None when none."""
        with self._lock:
            return self._partitions[partition].last_appended_at if partition in self._partitions else None

    # ------------------------------------------------------------------------------------ consumers and trim
    def commit(self, consumer: str, partition: int, offset: int) -> None:
        """In memory, forward only: the Delta tables hold the positions that survive a restart."""
        with self._lock:
            key = (consumer, partition)
            if offset > self._positions.get(key, 0):
                self._positions[key] = offset

    def committed(self, consumer: str, partition: int) -> int:
        with self._lock:
            return self._positions.get((consumer, partition), 0)

    def pending_events_in(self, partition: int, consumer: str) -> int:
        """Events of the records this object appended or read in the partition (the last KNOWN_RECORDS) after
        what `consumer` committed in this process: an estimate, see the module docstring."""
        with self._lock:
            if partition not in self._partitions:
                return 0
            position = self._positions.get((consumer, partition), 0)
            return sum(events for offset, events in self._partitions[partition].records.items() if offset > position)

    def pending_events(self, consumer: str) -> int:
        with self._lock:
            partitions = list(self._partitions)
        return sum(self.pending_events_in(p, consumer) for p in partitions)

    def trim(self, retention_seconds: float, now: float | None = None) -> int:
        """Nothing: records leave a Kinesis stream by its retention period (`supports_trim` is False).
        Idempotency keys expire by themselves after IDEMPOTENCY_SECONDS."""
        return 0

    def close(self) -> None:
        """Lets the writer finish what was submitted, then stops it."""
        if self._closed:
            return
        self._closed = True
        self._writer.close()

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
  A single writer thread sends them; see `writer.Writer` for how order survives partial failures (the short of it:
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

The package's modules, one concern each: `errors` (what a retry can help, one AWS call retried), `shards` (the
shard map, routing by hash-key ranges), `writer` (PutRecords batches), `reader` (iterators, GetRecords pages),
`events` (events counted from a payload), `idempotency` (keys honoured within this process). The log itself,
`KinesisEventLog`, is here, with the timings a test or deployment may change on this module (read at each call).
"""

from __future__ import annotations

import collections
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from gamestream.log.base import (Append, AppendResult, Idempotency, LogFeatures, LogRecord, LogUnavailable,
                                 RecordTooLarge)
from gamestream.log.kinesis import errors
from gamestream.log.kinesis.errors import error_code, unavailable
from gamestream.log.kinesis.events import events_in
from gamestream.log.kinesis.idempotency import IDEMPOTENCY_MAX_KEYS, IDEMPOTENCY_SECONDS, ProcessIdempotency
from gamestream.log.kinesis.reader import CachedIterator, behind_latest, ends_with_page, records_of
from gamestream.log.kinesis.shards import Shard, ShardMap, hash_key, shard_id, shard_number
from gamestream.log.kinesis.writer import PUT_MAX_BYTES, PUT_MAX_ENTRIES, Writer

__all__ = [
    "GET_MAX_RECORDS",
    "IDEMPOTENCY_MAX_KEYS",
    "IDEMPOTENCY_SECONDS",
    "PUT_MAX_BYTES",
    "PUT_MAX_ENTRIES",
    "RECORD_MAX_BYTES",
    "KinesisEventLog",
    "RecordTooLarge",
    "Shard",
    "events_in",
    "hash_key",
    "shard_id",
    "shard_number",
]

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
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
KNOWN_RECORDS = 20_000  # per partition, (offset, events) remembered for pending_events

_STREAM_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")


@dataclass
class _Partition:
    """What this object knows of one partition from its own appends and reads."""

    last_offset: int = 0
    last_appended_at: float | None = None
    records: collections.OrderedDict = field(default_factory=collections.OrderedDict)  # offset → events


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
        self._shard_map = ShardMap(lambda **kwargs: self._call("ListShards", self._client.list_shards, **kwargs))
        self._iterators: dict[int, CachedIterator] = {}
        self._partitions: dict[int, _Partition] = collections.defaultdict(_Partition)
        self._positions: dict[tuple[str, int], int] = {}
        self._idempotency = ProcessIdempotency(self._enqueue)
        self._closed = False
        self._open(partitions)
        self._writer = Writer(
            stream, put_records=lambda entries: self._client.put_records(StreamName=self.stream, Records=entries),
            starting_hash=self._starting_hash, on_stored=self._known, on_resharded=self._shards_expire,
            retry_seconds=lambda: PUT_RETRY_SECONDS)

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
        """One AWS call, retried while throttled or unreachable for up to READ_RETRY_SECONDS (`errors.call`)."""
        return errors.call(what, function, timeout=READ_RETRY_SECONDS, passthrough=passthrough, **kwargs)

    def _open(self, partitions: int | None) -> None:
        deadline = time.monotonic() + OPEN_WAIT_SECONDS
        created = False
        while True:
            try:
                summary = self._call("DescribeStreamSummary", self._client.describe_stream_summary, passthrough=(
                    "ResourceNotFoundException",), StreamName=self.stream)["StreamDescriptionSummary"]
            except Exception as error:
                if error_code(error) != "ResourceNotFoundException":
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
                        if error_code(create_error) != "ResourceInUseException":
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
            open_count = len(self._shard_map.open_ranges)
            if open_count != partitions:
                logger.info("Kinesis stream %s has %d open shards (partitions 0..%d); --partitions %d is ignored "
                            "for an existing stream", self.stream, open_count, self.partitions - 1, partitions)

    # ------------------------------------------------------------------------------------------------ shards
    def _shards(self, refresh: bool = False) -> dict[int, Shard]:
        """The stream's shards by number (ListShards, all pages, closed shards included), cached."""
        return self._shard_map.get(refresh=refresh, max_age=SHARD_CACHE_SECONDS, stream=self.stream)

    def _shards_expire(self) -> None:
        self._shard_map.expire()

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
        return sorted(number for _, _, number in self._shard_map.open_ranges)

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
            number = self._shard_map.open_shard_holding(key)
            if number is not None:
                return number
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
        return self._idempotency.submit(records, idempotency)

    def _enqueue(self, records: list[Append]) -> Future[AppendResult]:
        future: Future[AppendResult] = Future()
        if not records:
            future.set_result(AppendResult([]))
        else:
            self._writer.submit(records, future)
        return future

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
                    if error_code(error) != "InvalidArgumentException":
                        raise
                    # not a sequence number of this shard (an offset that never was one): read from the oldest
                    # record and skip those at or below `after`
            return self._call("GetShardIterator", self._client.get_shard_iterator, ShardIteratorType="TRIM_HORIZON",
                              **kwargs)["ShardIterator"]
        except Exception as error:
            if error_code(error) != "ResourceNotFoundException":
                raise
            if self._shards(refresh=True).get(partition) is None:
                return None  # expired past the retention: reads as empty
            raise unavailable(error, "GetShardIterator") from error

    def read(self, partition: int, after_offset: int, max_records: int) -> list[LogRecord]:
        """Records of the shard after `after_offset`, in sequence order. Continues from the iterator the previous
        read of this partition ended with when it ended at `after_offset` (no GetShardIterator per call); follows
        empty pages while Kinesis says the iterator is behind (MillisBehindLatest > 0) for EMPTY_PAGES_SECONDS;
        waits up to READ_YOUR_WRITES_SECONDS for a record this object appended to become visible; and returns []
        at once when caught up."""
        if max_records <= 0:
            return []
        shard = self._shard(partition)
        if shard is None or _read_to_its_end(shard, after_offset):
            return []
        iterator, obtained, expected = self._start_reading(partition, after_offset)
        return self._read_pages(partition, after_offset, max_records, iterator, obtained, expected)

    def _start_reading(self, partition: int, after_offset: int) -> tuple[str | None, float, int]:
        """The iterator the previous read ended with, when it ended at `after_offset` and is young enough, else a
        new one; when it was obtained; and the highest offset this object appended or read in the partition."""
        with self._lock:
            cached = self._iterators.pop(partition, None)
            expected = self._partitions[partition].last_offset if partition in self._partitions else 0
        if cached is not None and cached.continues(after_offset, ITERATOR_MAX_AGE_SECONDS):
            return cached.iterator, cached.obtained, expected
        return self._new_iterator(partition, after_offset), time.monotonic(), expected

    def _read_pages(self, partition: int, after_offset: int, max_records: int, iterator: str | None,
                    obtained: float, expected: int) -> list[LogRecord]:
        """GetRecords from `iterator` until a page has records after `after_offset`, the shard ends, or (caught
        up) the waits for pages behind the tip and for our own appends (up to `expected`) are over."""
        started = time.monotonic()
        renewed = 0
        while iterator is not None:
            try:
                answer = self._call("GetRecords", self._client.get_records, passthrough=(
                    "ExpiredIteratorException",), ShardIterator=iterator, Limit=min(max_records, GET_MAX_RECORDS))
            except Exception as error:
                if error_code(error) != "ExpiredIteratorException" or renewed >= 3:
                    raise
                renewed += 1  # kept too long (5 minutes): a new one from the same position
                iterator, obtained = self._new_iterator(partition, after_offset), time.monotonic()
                continue
            records = records_of(partition, answer, after_offset)
            following = answer.get("NextShardIterator")
            if records:
                return self._took(partition, records[:max_records], answer, following, obtained)
            if not following:  # a closed shard read to its end
                return []
            iterator = following
            if answer.get("Records"):  # only records at or below `after` (read from TRIM_HORIZON): go on
                continue
            waited = time.monotonic() - started
            if behind_latest(answer) and waited < EMPTY_PAGES_SECONDS:
                continue
            if after_offset < expected and waited < READ_YOUR_WRITES_SECONDS:
                time.sleep(0.02)  # a record we appended is not visible yet
                continue
            self._keep(partition, after_offset, iterator, obtained)
            return []
        return []

    def _took(self, partition: int, records: list[LogRecord], answer: dict[str, Any], following: str | None,
              obtained: float) -> list[LogRecord]:
        """Notes the records read, and keeps the page's NextShardIterator when it continues right after them."""
        for record in records:
            self._known(partition, record.offset, record.events, record.appended_at)
        if following and ends_with_page(records, answer):
            self._keep(partition, records[-1].offset, following, obtained)
        return records

    def _keep(self, partition: int, after: int, iterator: str, obtained: float) -> None:
        with self._lock:
            self._iterators[partition] = CachedIterator(after, iterator, obtained)

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


def _read_to_its_end(shard: Shard, after_offset: int) -> bool:
    """A closed shard read up to its EndingSequenceNumber: nothing more will come."""
    return shard.closed and after_offset >= (shard.ending_sequence or 0)

"""The contract every event log backend keeps: `EventLog`, its records, and how a device picks its partition.

The invariants are the package's (`gamestream.log`'s docstring); the backends (`sqlite`, `nats`, `kinesis`) import
this module, never the package, so that `gamestream.log.connect` can import them without a cycle.
"""

from __future__ import annotations

import zlib
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal, Protocol, Sequence, runtime_checkable

from gamestream.errors import TransientError

if TYPE_CHECKING:
    pass


class LogUnavailable(TransientError, RuntimeError):
    """The log cannot be reached, or cannot serve this call, right now (no leader, no server answering); the
    same call may well succeed in a few seconds. Raised instead of the backend's own timeout errors, so the
    stages can wait and retry without knowing which backend they run on."""


@dataclass(frozen=True, slots=True)
class LogRecord:
    partition: int
    offset: int
    payload: bytes  # canonical NDJSON lines of one batch, "\n"-separated
    events: int  # how many events the payload holds
    appended_at: float  # unix seconds
    # why nothing in the record can be an event (a foreign producer's message the log could not read: empty, not
    # UTF-8, not JSON…), naming where it sits; the processor quarantines the whole record with this reason
    refused: str | None = None


@dataclass(frozen=True, slots=True)
class Append:
    """One record to append: a batch of events bound for one partition."""

    partition: int
    payload: bytes
    events: int


class RecordTooLarge(ValueError):
    """A record is larger than the log takes in one record; it is refused rather than truncated or split."""


def check_records(records: Sequence[Append], partitions: int, max_bytes: int | None = None, limit: str = "") -> None:
    """Refuses a batch before any of it is written: a record for a partition outside 0..`partitions`-1
    (ValueError), or one over `max_bytes` (RecordTooLarge; `limit` names the limit and how to raise it)."""
    for record in records:
        if not 0 <= record.partition < partitions:
            raise ValueError(f"partition {record.partition} is outside 0..{partitions - 1}")
        if max_bytes is not None and len(record.payload) > max_bytes:
            raise RecordTooLarge(f"a record of {len(record.payload):,} bytes is over {limit}")


@dataclass(frozen=True, slots=True)
class Idempotency:
    """Makes an append happen at most once per key: the first append stores `response` with its records, in the
    same transaction; a later append with the key stores nothing and gets that response back."""

    key: str
    response: bytes


@dataclass(frozen=True, slots=True)
class AppendResult:
    offsets: list[int]  # empty when `replayed` is set
    replayed: bytes | None = None  # the first append's response, when the idempotency key was already used


IDEMPOTENCY_SECONDS = 24 * 3600
"""How long a log keeps the answer to an Idempotency-Key (a NATS bucket's TTL, Kinesis' in-process cache): a
client retrying a lost answer within this gets the first answer again."""


class LogFeatures:
    """What a backend may do beyond the common contract, declared with the defaults of a plain partitioned log.
    Every backend inherits this and overrides what differs; callers read these, never probe with `getattr`.

    - `max_record_bytes`: the largest payload of one record (a log of messages caps it: NATS' `max_payload`,
      Kinesis' 1 MiB), or None for no cap. Producers split a partition's events before it.
    - `long_offsets`: offsets may exceed a signed 64-bit integer (Kinesis sequence numbers), so the tables keep
      them beside a counter (`gamestream.tables.lake.TxnPositions`) rather than as the txn version itself.
    - `positions_scope`: "log" when `commit`/`committed` are kept by the log (every process sees them), "process"
      when only in this process's memory (Kinesis: the tables hold the real positions), so the log cannot tell a
      backlog.
    - `own_routing`: the log routes a device itself (`route`: Kinesis' hash-key ranges of its open shards);
      otherwise `route` is `partition_for` over `partitions` and producers may compute it column-wise.
    - `reshards`: partitions may close and have children (`parents`, `is_closed`): a child is read only after
      every parent is read to its end.
    - `supports_trim`: `trim` deletes records (False: they leave by the log's own retention, as on Kinesis).
    - `idempotency_scope`: "log" when an Idempotency-Key is honoured by every process of the log, "process" when
      within this process only.
    """

    max_record_bytes: int | None = None
    long_offsets: bool = False
    positions_scope: Literal["log", "process"] = "log"
    own_routing: bool = False
    reshards: bool = False
    supports_trim: bool = True
    idempotency_scope: Literal["log", "process"] = "log"

    def append_group_now(self, group: Sequence[tuple[Sequence[Append], Idempotency | None]]
                         ) -> list[AppendResult | Exception]:
        """The appends of `group` durable when it returns, each as `submit` makes it (its key, if any, stored
        with its records; a key used before: nothing stored, the first response given back), for a caller that
        groups appends itself (the native front's committer, `api.front`). Written from the calling thread in
        one transaction where the log can (the embedded log: no hand-off to its writer thread; all stored or,
        raised, none); else one submit per item, all in flight at once, and an item the log refused gets its
        error in its place (nothing of that item stored, the others as they went)."""
        outcomes: list[AppendResult | Exception] = []
        submitted = []
        for records, idempotency in group:
            try:
                submitted.append(self.submit(records, idempotency))  # type: ignore[attr-defined]
            except Exception as error:  # refused before anything was sent (closed, a partition out of range)
                submitted.append(error)
        for done in submitted:
            if isinstance(done, Exception):
                outcomes.append(done)
                continue
            try:
                outcomes.append(done.result())
            except Exception as error:
                outcomes.append(error)
        return outcomes

    def route(self, device_id: str) -> int:
        """The partition of a device's events (`partition_for` unless `own_routing`)."""
        return partition_for(device_id, self.partitions)  # type: ignore[attr-defined]

    def parents(self, partition: int) -> list[int]:
        """The partitions `partition` was split or merged from (none unless `reshards`)."""
        return []

    def is_closed(self, partition: int) -> bool:
        """Whether `partition` takes no more appends (never, unless `reshards`)."""
        return False

    def check_writable(self) -> None:
        """Raises unless the log takes writes now: by default a read of partition 0's head, which needs the
        log's servers to answer; a backend with a sharper check (the embedded log takes its write lock) overrides
        it."""
        self.last_offset(0)  # type: ignore[attr-defined]


@runtime_checkable
class EventLog(Protocol):
    @property
    def partitions(self) -> int:
        """How many partitions the log has; fixed when it is created."""
        ...

    def append(self, records: Sequence[Append]) -> list[int]:
        """Appends the records durably, in order, and returns their offsets (same order)."""
        ...

    def submit(self, records: Sequence[Append], idempotency: Idempotency | None = None) -> Future[AppendResult]:
        """Starts a durable append; the future resolves once it is durable (for asyncio: wrap_future)."""
        ...

    def read(self, partition: int, after_offset: int, max_records: int) -> list[LogRecord]:
        """Records of `partition` with offset > `after_offset`, oldest first, at most `max_records`."""
        ...

    def last_offset(self, partition: int) -> int:
        """The highest offset ever appended to `partition`, 0 when none."""
        ...

    def last_appended_at(self, partition: int) -> float | None:
        """When the newest record still held in `partition` was appended (unix seconds); None when it holds none."""
        ...

    def commit(self, consumer: str, partition: int, offset: int) -> None:
        """Records that `consumer` has committed `partition` up to `offset` downstream (never moves back)."""
        ...

    def committed(self, consumer: str, partition: int) -> int:
        """What `consumer` last committed for `partition`, 0 when nothing."""
        ...

    def pending_events(self, consumer: str) -> int:
        """Events appended but not yet committed by `consumer`, over all partitions (the backlog)."""
        ...

    def pending_events_in(self, partition: int, consumer: str) -> int:
        """The backlog of one partition."""
        ...

    def trim(self, retention_seconds: float, now: float | None = None) -> int:
        """Deletes records that every consumer has committed and that are older than the retention, and
        idempotency keys older than the retention or 24 h, whichever is longer."""
        ...

    def close(self) -> None: ...

    # the features of `LogFeatures`, which every backend inherits
    max_record_bytes: int | None
    long_offsets: bool
    positions_scope: Literal["log", "process"]
    own_routing: bool
    reshards: bool
    supports_trim: bool
    idempotency_scope: Literal["log", "process"]

    def route(self, device_id: str) -> int: ...

    def parents(self, partition: int) -> list[int]: ...

    def is_closed(self, partition: int) -> bool: ...

    def check_writable(self) -> None: ...


def partition_for(device_id: str, partitions: int) -> int:
    """The log partition of a device: stable across processes and releases (CRC-32, not Python's hash), so a
    device's events stay in one partition and keep their order."""
    return zlib.crc32(device_id.encode()) % partitions


def router(log: "EventLog") -> Callable[[str], int]:
    """Which partition a device's events go to on `log`: the log's own rule when it has one (`route`: Kinesis
    routes by the hash-key ranges of its open shards, so a device moves only from a shard to its children when
    the stream is resharded), else `partition_for` over its partition count."""
    if log.own_routing:
        return log.route
    partitions = log.partitions
    return lambda device_id: partition_for(device_id, partitions)


DEFAULT_PARTITIONS = 4

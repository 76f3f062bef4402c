"""The event log: partitioned, durable, replayable.

Every backend implements `EventLog` and passes the shared conformance suite (tests/log_conformance.py). The
embedded default is SQLite (`gamestream.log.sqlite`); NATS JetStream and Kinesis come as further modules.

Invariants every backend keeps:
- `append` returns only once its records are durable (fsync'd or replicated); its offsets are then final.
- An append that fails (the disk is full, …) raises and leaves none of its records visible; the log stays usable
  and takes appends again once the cause is gone. A failed append is never reported as done.
- Offsets are positive and strictly increase within a partition, also across restarts and trims. They need not
  be contiguous (JetStream's are not).
- `read(p, after, n)` returns records of partition p with offset > after, in offset order, at most n. A record
  is never visible before every record of the same partition with a lower offset is.
- Records are trimmed only once every registered consumer has committed them and they are older than the
  retention.
- A backend that cannot reach its log for a while (a distributed log electing a leader, a server restarting, a
  network partition) raises `LogUnavailable`: the caller waits and tries again; nothing was half-done.
"""

from __future__ import annotations

import zlib
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:
    from gamestream.settings import Settings


class LogUnavailable(RuntimeError):
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


@dataclass(frozen=True, slots=True)
class Append:
    """One record to append: a batch of events bound for one partition."""

    partition: int
    payload: bytes
    events: int


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


def partition_for(device_id: str, partitions: int) -> int:
    """The log partition of a device: stable across processes and releases (CRC-32, not Python's hash), so a
    device's events stay in one partition and keep their order."""
    return zlib.crc32(device_id.encode()) % partitions


def router(log: "EventLog") -> Callable[[str], int]:
    """Which partition a device's events go to on `log`: the log's own rule when it has one (`route`: Kinesis
    routes by the hash-key ranges of its open shards, so a device moves only from a shard to its children when
    the stream is resharded), else `partition_for` over its partition count."""
    route = getattr(log, "route", None)
    if route is not None:
        return route
    partitions = log.partitions
    return lambda device_id: partition_for(device_id, partitions)


DEFAULT_PARTITIONS = 4


def connect(settings: "Settings") -> EventLog:
    """The log the settings name (`settings.log`, `--log URL`, GAMESTREAM_LOG): the embedded SQLite log under
    `<data_dir>/log` when unset, a NATS JetStream stream for `nats://…`, a Kinesis data stream for
    `kinesis://STREAM`. `settings.partitions` fixes the count when the log is created; None takes an existing log's
    own count (DEFAULT_PARTITIONS for a new one; Kinesis creates a missing stream only when a count is given)."""
    url = settings.log
    if not url:
        return open_log(settings.data_dir, partitions=settings.partitions)
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in ("nats", "tls"):
        from gamestream.log.nats import NatsEventLog

        return NatsEventLog.connect(url, partitions=settings.partitions)
    if scheme == "kinesis":
        from gamestream.log.kinesis import KinesisEventLog

        return KinesisEventLog.connect(url, partitions=settings.partitions)
    raise ValueError(f"log URL {url!r}: give nats://host:port[,host:port…][?stream=NAME], kinesis://STREAM (region, "
                     "credentials and endpoint from the AWS environment), or nothing for the embedded log in the "
                     "data directory")


def describe(settings: "Settings") -> str:
    """Where the log is, for start-up lines, /healthz and /metrics (no credentials: a URL's user:password part
    is dropped)."""
    if not settings.log:
        return f"sqlite:{(Path(settings.data_dir) / 'log').absolute()}"
    scheme, _, rest = settings.log.partition("://")
    if scheme.lower() == "kinesis":  # no host in the URL: the region and any endpoint come from the environment
        import os

        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
        endpoint = os.environ.get("AWS_ENDPOINT_URL_KINESIS") or os.environ.get("AWS_ENDPOINT_URL")
        where = ", ".join(part for part in (region and f"region {region}", endpoint and f"endpoint {endpoint}")
                          if part)
        return f"kinesis://{rest.strip('/')}" + (f" ({where})" if where else "")
    hosts = ",".join(part.rsplit("@", 1)[-1] for part in rest.split(","))
    return f"{scheme}://{hosts}"


def open_log(data_dir: Path, *, partitions: int | None) -> EventLog:
    """Opens (or creates) the embedded log under `<data_dir>/log/`. `partitions=None` takes the existing log's
    count, or DEFAULT_PARTITIONS for a new log; an explicit count must match an existing log's."""
    from gamestream.log.sqlite import SqliteEventLog

    return SqliteEventLog(Path(data_dir) / "log", partitions=partitions)

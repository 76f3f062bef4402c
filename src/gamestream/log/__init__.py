"""The event log: partitioned, durable, replayable.

Every backend implements `EventLog` and passes the shared conformance suite (tests/log_conformance.py). The
embedded default is SQLite (`gamestream.log.sqlite`); NATS JetStream, Kinesis and Kafka come as further modules.

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

Owns besides the backends: what a record's payload holds (`payload`), what wraps events on their way in — request
bodies and the seed's API Gateway proxy events found in a log (`envelope`) — and who consumes which partition
(`ownership`: lock files, or leases kept on the log's own cluster), since a log's consumers share it out.

May import: core
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from gamestream.log.base import (DEFAULT_PARTITIONS, Append, AppendResult, EventLog, Idempotency, LogRecord,
                                 LogUnavailable, RecordTooLarge, partition_for, router)

if TYPE_CHECKING:
    from gamestream.settings import Settings

__all__ = ["Append", "AppendResult", "DEFAULT_PARTITIONS", "EventLog", "Idempotency", "LogRecord", "LogUnavailable",
           "RecordTooLarge", "partition_for", "router", "connect", "describe", "open_log"]


def connect(settings: "Settings") -> EventLog:
    """The log the settings name (`settings.log`, `--log URL`, GAMESTREAM_LOG): the embedded SQLite log under
    `<data_dir>/log` when unset, a NATS JetStream stream for `nats://…`, a Kinesis data stream for
    `kinesis://STREAM`, a Kafka topic for `kafka://host:port[,host:port…]/TOPIC` (security settings from the
    environment: `gamestream.log.kafka`). `settings.partitions` fixes the count when the log is created; None takes
    an existing log's own count (DEFAULT_PARTITIONS for a new one; Kinesis creates a missing stream only when a
    count is given)."""
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
    if scheme == "kafka" and url.split("://", 1)[1].partition("/")[2].strip("/"):
        from gamestream.log.kafka import KafkaEventLog

        return KafkaEventLog.connect(url, partitions=settings.partitions)
    raise ValueError(f"log URL {url!r}: give nats://host:port[,host:port…][?stream=NAME], kinesis://STREAM (region, "
                     "credentials and endpoint from the AWS environment), kafka://host:port[,host:port…]/TOPIC "
                     "(security settings from GAMESTREAM_KAFKA_* variables), or nothing for the embedded log in the "
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
    if scheme.lower() == "kafka":  # the security protocol comes from the environment: say which
        from gamestream.log.kafka import security_protocol

        return f"kafka://{hosts.rstrip('/')} ({security_protocol()})"
    return f"{scheme}://{hosts}"


def open_log(data_dir: Path, *, partitions: int | None) -> EventLog:
    """Opens (or creates) the embedded log under `<data_dir>/log/`. `partitions=None` takes the existing log's
    count, or DEFAULT_PARTITIONS for a new log; an explicit count must match an existing log's."""
    from gamestream.log.sqlite import SqliteEventLog

    return SqliteEventLog(Path(data_dir) / "log", partitions=partitions)

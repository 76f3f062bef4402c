"""The event log on an Apache Kafka topic (or a Kafka-compatible service): `kafka://host:9092[,host:9092…]/TOPIC`.

Through librdkafka (`confluent-kafka`). The URL names only the bootstrap servers and the topic; security settings
come from the environment, never from the command line, where `ps` and shell histories would show them:

- `GAMESTREAM_KAFKA_CONFIG`: a librdkafka properties file (`name=value` lines, `#` comments), applied to every
  client this log makes (producer, readers, admin, offset commits) — e.g. `security.protocol=SASL_SSL`,
  `sasl.mechanism=SCRAM-SHA-512`, `sasl.username=…`, `sasl.password=…`, `ssl.ca.location=…`.
- Or, for the common cases, one variable per property, read after the file (a variable wins):
  `GAMESTREAM_KAFKA_SECURITY_PROTOCOL` (`security.protocol`), `GAMESTREAM_KAFKA_SASL_MECHANISM`,
  `GAMESTREAM_KAFKA_SASL_USERNAME`, `GAMESTREAM_KAFKA_SASL_PASSWORD`, `GAMESTREAM_KAFKA_SSL_CA_LOCATION`,
  `GAMESTREAM_KAFKA_SSL_CERTIFICATE_LOCATION`, `GAMESTREAM_KAFKA_SSL_KEY_LOCATION`,
  `GAMESTREAM_KAFKA_SSL_KEY_PASSWORD` (see `ENVIRONMENT_PROPERTIES`).
  Neither may weaken what the log promises: `acks` other than all, or `enable.idempotence=false`, is refused.

How the `EventLog` protocol maps onto Kafka:

- **Partition = Kafka partition.** gamestream's producers route a device with `partition_for` (CRC-32 % P, as on
  every other log) and produce to that partition explicitly — never through Kafka's key hashing — so a device's
  events stay in one partition.
- **Offset = Kafka offset + 1**: the protocol wants positive offsets; Kafka's start at 0. So the offset of a
  record is also the position a Kafka consumer commits after it ("the next offset to read"), and `read(p, after)`
  starts reading at Kafka offset `after`. Offsets are contiguous unless the topic holds transaction markers or
  is compacted (foreign producers), which the protocol allows. An append's result gives 0 for a record whose
  offset the producer was not told (a resend after a lost answer that the leader already held): it is stored.
- **The topic** is created when absent with the given partition count (DEFAULT_PARTITIONS when None),
  replication factor min(3, brokers), `min.insync.replicas` 2 with 3 or more brokers (else 1), broker-stamped
  timestamps (`message.timestamp.type=LogAppendTime`, so `appended_at` is the broker's clock) and records up to
  MAX_RECORD_BYTES. An existing topic keeps its own count (None takes it; another explicit count is refused, as
  on NATS), its replication and its retention.
- **Durability**: the producer is idempotent with `acks=all`: a record is acknowledged once every in-sync
  replica has it, and the broker refuses it (NOT_ENOUGH_REPLICAS) while fewer than `min.insync.replicas` are in
  sync. `append`/`submit` resolve only once every record of the append has been acknowledged; a record not
  acknowledged within PUBLISH_TIMEOUT_SECONDS (brokers unreachable, too few replicas, no leader) fails the append
  with `LogUnavailable`. Kafka acknowledges a write once the replicas hold it in memory; each broker fsyncs when
  `flush.messages` / `log.flush.interval.messages` say (gamestream/demo/kafka_cluster.py sets 1, as gamestream's NATS nodes
  set `sync_interval: always`; docs/kafka.md).
- **What Kafka cannot do** without transactions (the flags tell callers):
  * an append that fails may still have stored some of its records (Kafka has no multi-record atomicity outside
    transactions, and a produce request that timed out may have been written): as on Kinesis, a failed append
    is never reported as done, but a retry may store a record twice. The processor's eventId check is the guard.
  * `idempotency_scope = "process"`: an Idempotency-Key is honoured within this process only (the same in-memory
    keys as the Kinesis log, `ProcessIdempotency`). Kafka has no conditional write to claim a key with, as NATS'
    KV `create` does; docs/kafka.md sketches the cross-process design (claims ordered in a side topic).
  * `supports_trim = False`: records leave by the topic's retention (`retention.ms`), not by `trim`.
- **Consumer positions**: `commit(consumer, p, offset)` commits Kafka offset `offset` (the next to read) for
  topic-partition p in the consumer group named `consumer`, so Kafka's lag tools (kafka-consumer-groups, Burrow,
  exporters) show the backlog; read back with the group's committed offsets; forward only (a lower commit is
  ignored — read, compare, commit, under a lock within this process).
- **Reads** use one assigned (group-less) consumer per partition, kept at its position, so reading a partition
  forward costs one fetch stream, not a seek per call. `read` returns what is there when called: it stops at the
  partition's high watermark, which an acknowledged (acks=all) record is already below.
- **Events per record**: header `gs-events` on gamestream's records; for records without it (other producers),
  counted from the payload (Arrow rows or NDJSON lines).
- **Other producers' messages** (no `gs-events` header) are read by what they hold, never by gamestream's payload
  format (`kafka_foreign`): one JSON event, a JSON array of events, NDJSON, an API Gateway proxy event; anything
  else comes back `refused`, with a reason naming topic, partition and offset, and the processor quarantines it.
- **Ownership** of the partitions among processors (and of the singleton roles) is Kafka's consumer-group
  protocol: `kafka_group.KafkaGroupOwnership`, chosen by `ownership.open_ownership` for a `kafka://` log.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from gamestream.log.base import (
    DEFAULT_PARTITIONS,
    Append,
    AppendResult,
    Idempotency,
    LogFeatures,
    LogRecord,
    LogUnavailable,
    check_records,
)
from gamestream.log.kafka_foreign import read_foreign
from gamestream.log.kinesis.events import events_in
from gamestream.log.kinesis.idempotency import ProcessIdempotency
from gamestream.log.sqlite import LogPartitionsMismatch

logger = logging.getLogger(__name__)

EVENTS_HEADER = "gs-events"
MAX_RECORD_BYTES = 8 * 1024 * 1024  # a topic gamestream creates takes records this large (as the NATS nodes' 8 MB)
_RECORD_ROOM = 1024  # record and batch overhead on top of the payload (headers, lengths, CRC)
PUBLISH_TIMEOUT_SECONDS = 10.0  # a record not acknowledged this long fails its append (LogUnavailable)
REQUEST_SECONDS = 10.0  # metadata, offsets, commits: longer than this is LogUnavailable
OPEN_RETRY_SECONDS = 30.0  # opening waits this long for brokers, and for a new topic's leaders
PENDING_SCAN_RECORDS = 16  # pending_events reads this many records per partition (whole payloads), then extrapolates

ENVIRONMENT_PROPERTIES = {
    "GAMESTREAM_KAFKA_SECURITY_PROTOCOL": "security.protocol",
    "GAMESTREAM_KAFKA_SASL_MECHANISM": "sasl.mechanism",
    "GAMESTREAM_KAFKA_SASL_USERNAME": "sasl.username",
    "GAMESTREAM_KAFKA_SASL_PASSWORD": "sasl.password",
    "GAMESTREAM_KAFKA_SSL_CA_LOCATION": "ssl.ca.location",
    "GAMESTREAM_KAFKA_SSL_CERTIFICATE_LOCATION": "ssl.certificate.location",
    "GAMESTREAM_KAFKA_SSL_KEY_LOCATION": "ssl.key.location",
    "GAMESTREAM_KAFKA_SSL_KEY_PASSWORD": "ssl.key.password",
}
CONFIG_FILE_VARIABLE = "GAMESTREAM_KAFKA_CONFIG"

# Errors of a cluster between leaders, short of in-sync replicas, or out of reach: the same call may succeed
# in a few seconds (LogUnavailable).
_TRANSIENT = {KafkaError._MSG_TIMED_OUT, KafkaError._TIMED_OUT, KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN,
              KafkaError.NOT_ENOUGH_REPLICAS, KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
              KafkaError.REQUEST_TIMED_OUT, KafkaError.LEADER_NOT_AVAILABLE, KafkaError.NOT_LEADER_FOR_PARTITION,
              KafkaError.COORDINATOR_NOT_AVAILABLE, KafkaError.NOT_COORDINATOR,
              KafkaError.COORDINATOR_LOAD_IN_PROGRESS, KafkaError._PURGE_INFLIGHT, KafkaError._PURGE_QUEUE,
              # a partition's new leader before its high watermark has caught up, or whose epoch the client has
              # not learnt yet, or a broker handle librdkafka dropped (each seen right after a broker was killed:
              # the watermark read failed for a moment)
              KafkaError.OFFSET_NOT_AVAILABLE, KafkaError.FENCED_LEADER_EPOCH, KafkaError.UNKNOWN_LEADER_EPOCH,
              KafkaError.KAFKA_STORAGE_ERROR, KafkaError._DESTROY_BROKER,
              # a client whose metadata does not list the partition yet (a reader opened right after a broker
              # restart): the topic's partitions were read back when the log was opened, so it exists
              KafkaError._UNKNOWN_PARTITION}
_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")
# A group's coordinator that moved or is loading: asked again briefly (`_committed_by`)
_COORDINATOR_MOVING = {KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_NOT_AVAILABLE,
                       KafkaError.COORDINATOR_LOAD_IN_PROGRESS}
COORDINATOR_WAIT_SECONDS = 5.0


@dataclass(frozen=True)
class LogUrl:
    """`kafka://host:port[,host:port…]/TOPIC`, taken apart."""

    bootstrap: str
    topic: str

    @classmethod
    def parse(cls, url: str) -> LogUrl:
        scheme, sep, rest = url.partition("://")
        if not sep or scheme.lower() != "kafka":
            raise ValueError(f"log URL {url!r}: expected kafka://host:port[,host:port…]/TOPIC")
        hosts, _, topic = rest.partition("/")
        topic = topic.strip("/")
        if "@" in hosts:
            raise ValueError(f"log URL {url!r}: credentials do not go in the URL; set them in the environment "
                             f"({CONFIG_FILE_VARIABLE} or GAMESTREAM_KAFKA_SASL_USERNAME / _PASSWORD)")
        servers = [host.strip() for host in hosts.split(",") if host.strip()]
        if not servers:
            raise ValueError(f"log URL {url!r} names no broker")
        if not _TOPIC_NAME.fullmatch(topic) or topic in (".", ".."):
            raise ValueError(f"log URL {url!r}: name the topic after the brokers (kafka://host:port/TOPIC; "
                             "letters, digits, '.', '_' and '-')")
        return cls(",".join(servers), topic)


def read_properties(path: str | Path) -> dict[str, str]:
    """A librdkafka / Java client properties file: `name=value` (or `name: value`) lines, `#` and `!` comments."""
    properties: dict[str, str] = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#!":
            continue
        match = re.fullmatch(r"([^=:\s]+)\s*[=:]\s*(.*)", line)
        if match is None:
            raise ValueError(f"{path}: not a property line: {line!r}")
        name, value = match.groups()
        properties[name] = value
    return properties


def client_config(bootstrap: str) -> dict[str, str]:
    """The settings every client of the log shares: the bootstrap servers from the URL, security from the
    environment (the properties file `GAMESTREAM_KAFKA_CONFIG`, then the `ENVIRONMENT_PROPERTIES` variables)."""
    config: dict[str, str] = {}
    if os.environ.get(CONFIG_FILE_VARIABLE):
        config.update(read_properties(os.environ[CONFIG_FILE_VARIABLE]))
    for variable, name in ENVIRONMENT_PROPERTIES.items():
        if os.environ.get(variable):
            config[name] = os.environ[variable]
    if config.get("acks", "all") not in ("all", "-1"):
        raise ValueError(f"{CONFIG_FILE_VARIABLE}: acks={config['acks']} would acknowledge records the in-sync "
                         "replicas do not all hold; gamestream's log uses acks=all")
    if config.get("enable.idempotence", "true").lower() != "true":
        raise ValueError(f"{CONFIG_FILE_VARIABLE}: enable.idempotence=false could store a retried record twice; "
                         "gamestream's log uses an idempotent producer")
    config["bootstrap.servers"] = bootstrap
    config.setdefault("client.id", "gamestream")
    return config


def _with_logger(config: dict[str, Any]) -> dict[str, Any]:
    """librdkafka's own log lines (a broker down, a coordinator loading) go to Python logging, not stderr."""
    return {**config, "logger": _librdkafka_logger}


_librdkafka_logger = logging.getLogger(f"{__name__}.librdkafka")


def security_protocol() -> str:
    """The security protocol the environment sets (PLAINTEXT when none), for `describe` (no secrets)."""
    protocol = os.environ.get("GAMESTREAM_KAFKA_SECURITY_PROTOCOL")
    if not protocol and os.environ.get(CONFIG_FILE_VARIABLE):
        try:
            protocol = read_properties(os.environ[CONFIG_FILE_VARIABLE]).get("security.protocol")
        except (OSError, ValueError):
            protocol = None
    return (protocol or "PLAINTEXT").upper()


def _unavailable(error: KafkaError | KafkaException | Exception) -> bool:
    """Whether a Kafka error is one a retry in a few seconds can help (see `_TRANSIENT`)."""
    if isinstance(error, KafkaException):
        error = error.args[0] if error.args and isinstance(error.args[0], KafkaError) else error
    if isinstance(error, KafkaError):
        return error.code() in _TRANSIENT or (error.retriable() and not error.fatal())
    return False


def _raise_kafka(error: Exception, what: str) -> None:
    """Raises `LogUnavailable` for a transient Kafka error (or a bound we set running out), else nothing."""
    if _unavailable(error) or isinstance(error, TimeoutError):
        raise LogUnavailable(f"the Kafka log is unavailable ({what}): {error}") from error


def _is_ours(message: Message) -> bool:
    """A record a gamestream producer wrote (it carries the `gs-events` header)."""
    return any(name == EVENTS_HEADER for name, _ in message.headers() or ())


def _events_of(message: Message) -> int:
    for name, value in message.headers() or ():
        if name == EVENTS_HEADER and value:
            return int(value)
    return events_in(message.value() or b"")


class _Append:
    """One append in flight: its records' offsets as their acknowledgements arrive (from the producer's poll
    thread); the future resolves when the last one is in, or fails at the first error."""

    def __init__(self, count: int) -> None:
        self.future: Future[AppendResult] = Future()
        self.offsets = [0] * count
        self.waiting = count
        self.lock = threading.Lock()

    def delivered(self, index: int, error: KafkaError | None, message: Message) -> None:
        with self.lock:
            if self.future.done():
                return
            if error is not None:
                if _unavailable(error):
                    failure: Exception = LogUnavailable(f"the Kafka log did not acknowledge a record: {error.str()} "
                                                        f"({error.name()})")
                else:
                    failure = KafkaException(error)
                self.future.set_exception(failure)
                return
            # A record the idempotent producer sent again after a lost answer, which the partition leader already
            # held (DUPLICATE_SEQUENCE_NUMBER), is reported delivered without its offset (seen after a broker was
            # killed under load): it is durable all the same; its offset is given as 0, unknown.
            offset = message.offset()
            self.offsets[index] = offset + 1 if offset is not None and offset >= 0 else 0
            self.waiting -= 1
            if self.waiting == 0:
                self.future.set_result(AppendResult(self.offsets))


class _Reader:
    """A group-less consumer assigned to one partition, kept where the last read stopped."""

    def __init__(self, config: dict[str, Any], topic: str, partition: int) -> None:
        self.consumer = Consumer({**config, "group.id": "gamestream-reader", "enable.auto.commit": False,
                                  "enable.auto.offset.store": False, "enable.partition.eof": True,
                                  "auto.offset.reset": "earliest", "isolation.level": "read_committed",
                                  "fetch.wait.max.ms": 50, "fetch.error.backoff.ms": 50})
        self.topic, self.partition = topic, partition
        self.position: int | None = None  # the Kafka offset the next consumed message has
        self.lock = threading.Lock()

    def watermarks(self) -> tuple[int, int]:
        found = self.consumer.get_watermark_offsets(TopicPartition(self.topic, self.partition),
                                                    timeout=REQUEST_SECONDS, cached=False)
        if found is None:
            raise TimeoutError("no answer for the partition's offsets")
        return found

    def fetch(self, start: int, limit: int, high: int) -> list[Message]:
        """Up to `limit` messages from Kafka offset `start` (or the first still held after it), stopping at `high`
        (a watermark read before: what was acknowledged when the read began)."""
        if self.position != start:
            self.consumer.assign([TopicPartition(self.topic, self.partition, start)])
            self.position = start
        messages: list[Message] = []
        deadline = time.monotonic() + REQUEST_SECONDS
        while len(messages) < limit and self.position < high:
            # no more than the records left below `high`, and the end-of-partition event after them: librdkafka
            # returns a batch once it holds that many (or at the timeout), so asking for more than the partition
            # has waited the whole timeout on every read that took a partition to its end
            wanted = min(limit - len(messages), high - self.position + 1)
            batch = self.consumer.consume(num_messages=wanted, timeout=0.2)
            at_end = False
            for message in batch:  # every message of a batch is kept: it is consumed, the next read goes on after it
                error = message.error()
                if error is None:
                    messages.append(message)
                    self.position = message.offset() + 1
                elif error.code() == KafkaError._PARTITION_EOF:
                    at_end = message.offset() >= high  # else an end reached before later records came
                else:
                    self.position = None  # re-assigned at the next call
                    raise KafkaException(error)
            if at_end:
                break
            if not batch and time.monotonic() > deadline:
                raise TimeoutError(f"partition {self.partition}: no records below the high watermark {high} after "
                                   f"{REQUEST_SECONDS:.0f} s")
        return messages

    def close(self) -> None:
        try:
            self.consumer.close()
        except Exception:
            pass


class KafkaEventLog(LogFeatures):
    """`EventLog` on a Kafka topic. Thread-safe; any number of processes may open the same topic (with the limits
    on idempotency the module docstring lists).

    >>> log = KafkaEventLog.connect("kafka://127.0.0.1:9092/games", partitions=4)   # creates the topic if absent
    >>> log.append([Append(log.route("device-1"), b'{"eventName":"x"}', 1)])
    """

    idempotency_scope = "process"
    supports_trim = False

    def __init__(self, url: str, *, partitions: int | None) -> None:
        if partitions is not None and partitions < 1:
            raise ValueError("partitions must be >= 1")
        self._url = LogUrl.parse(url)
        self.topic = self._url.topic
        self._config = _with_logger(client_config(self._url.bootstrap))
        self._closed = False
        self._lock = threading.Lock()
        # (partition, side) → its reader; `side`: the one that peeks (a partition's tail, the pending scan), so
        # the processor's own reader keeps its position and what librdkafka prefetched for it
        self._readers: dict[tuple[int, bool], _Reader] = {}
        self._committers: dict[str, tuple[Consumer, threading.Lock]] = {}
        self._events_per_record = 1.0  # running mean of what was appended or scanned, for pending_events
        self._admin = AdminClient({**self._config, "socket.connection.setup.timeout.ms": 5000})
        self._partitions, self._replicas, self._max_message = self._open(partitions)
        self._producer = self._new_producer()
        self._producer_failed = False
        self._retired: list[Producer] = []  # producers replaced after a fatal error, polled until drained
        self._idempotency = ProcessIdempotency(self._enqueue)
        self._poller = threading.Thread(target=self._poll_loop, name=f"kafka-log-{self.topic}", daemon=True)
        self._poller.start()

    @classmethod
    def connect(cls, url: str, *, partitions: int | None = None) -> KafkaEventLog:
        """Opens the topic the URL names, creating it (with `partitions`, else DEFAULT_PARTITIONS) when absent;
        an existing topic keeps its own count, and an explicit different count is refused."""
        return cls(url, partitions=partitions)

    # ----------------------------------------------------------------------------------------------- topic
    def _open(self, partitions: int | None) -> tuple[int, int, int]:
        """The topic's partition count, replication factor and `max.message.bytes`, creating it when absent.
        Waits up to OPEN_RETRY_SECONDS for brokers to answer and for every partition to have a leader."""
        deadline = time.monotonic() + OPEN_RETRY_SECONDS
        created = False
        while True:
            try:
                metadata = self._admin.list_topics(timeout=REQUEST_SECONDS)
                topic = metadata.topics.get(self.topic)
                missing = topic is None or (topic.error is not None and
                                            topic.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART)
                if missing and not created:
                    self._create_topic(partitions or DEFAULT_PARTITIONS, len(metadata.brokers))
                    created = True
                elif not missing and topic.error is None and topic.partitions and all(
                        p.leader >= 0 for p in topic.partitions.values()):
                    count = len(topic.partitions)
                    replicas = len(next(iter(topic.partitions.values())).replicas)
                    break
            except KafkaException as error:
                if not _unavailable(error) or time.monotonic() > deadline:
                    _raise_kafka(error, f"opening topic {self.topic!r}")
                    raise
            if time.monotonic() > deadline:
                raise LogUnavailable(f"Kafka topic {self.topic!r}: no leader for every partition after "
                                     f"{OPEN_RETRY_SECONDS:.0f} s")
            time.sleep(0.2)
        if partitions is not None and partitions != count:
            raise LogPartitionsMismatch(f"the Kafka topic {self.topic!r} has {count} partitions, not {partitions}; "
                                        f"use --partitions {count} or another topic (kafka://…/OTHER)")
        return count, replicas, self._topic_max_message()

    def _create_topic(self, partitions: int, brokers: int) -> None:
        replicas = max(1, min(3, brokers))
        config = {"min.insync.replicas": "2" if replicas >= 3 else "1",
                  "message.timestamp.type": "LogAppendTime",
                  "max.message.bytes": str(MAX_RECORD_BYTES + _RECORD_ROOM)}
        futures = self._admin.create_topics([NewTopic(self.topic, num_partitions=partitions,
                                                      replication_factor=replicas, config=config)],
                                            request_timeout=REQUEST_SECONDS)
        try:
            futures[self.topic].result()
            logger.info("created Kafka topic %s: %d partitions, replication factor %d", self.topic, partitions,
                        replicas)
        except KafkaException as error:
            if error.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:  # else created meanwhile by another process
                raise

    def _topic_max_message(self) -> int:
        resource = ConfigResource("topic", self.topic)
        try:
            entries = self._admin.describe_configs([resource], request_timeout=REQUEST_SECONDS)[resource].result()
            return int(entries["max.message.bytes"].value)
        except (KafkaException, KeyError, ValueError) as error:
            logger.debug("max.message.bytes of topic %s not read (%s); assuming Kafka's default", self.topic, error)
            return 1024 * 1024

    @property
    def partitions(self) -> int:
        return self._partitions

    @property
    def replication_factor(self) -> int:
        return self._replicas

    @property
    def max_record_bytes(self) -> int:  # type: ignore[override]
        """The largest payload one record may have: the topic's `max.message.bytes` (capped at what the producer
        sends) less room for the record's framing and headers."""
        return min(self._max_message, MAX_RECORD_BYTES + _RECORD_ROOM) - _RECORD_ROOM

    # ------------------------------------------------------------------------------------------------ append
    def _new_producer(self) -> Producer:
        return Producer({**self._config, "enable.idempotence": True, "acks": "all",
                         "message.timeout.ms": int(PUBLISH_TIMEOUT_SECONDS * 1000),
                         "request.timeout.ms": int(PUBLISH_TIMEOUT_SECONDS * 1000) // 2,
                         "linger.ms": 2, "compression.type": "none",  # payloads come compressed (zstd Arrow)
                         "message.max.bytes": MAX_RECORD_BYTES + 64 * 1024,
                         "reconnect.backoff.max.ms": 1000, "socket.connection.setup.timeout.ms": 5000})

    def _poll_loop(self) -> None:
        """Serves the producers' delivery reports (which resolve the appends) until the log is closed."""
        while not self._closed:
            try:
                self._producer.poll(0.05)
                for retired in list(self._retired):
                    if retired.poll(0) == 0 and len(retired) == 0:
                        self._retired.remove(retired)
            except Exception:  # a report that cannot be served must not stop the others: appends would hang
                logger.exception("a Kafka delivery report failed")

    def append(self, records: Sequence[Append]) -> list[int]:
        """Appends; returns the offsets once every record is acknowledged by all in-sync replicas."""
        return self.submit(records).result().offsets

    def submit(self, records: Sequence[Append], idempotency: Idempotency | None = None) -> Future[AppendResult]:
        """Starts an append; the future resolves once every record is acknowledged (acks=all), or fails with
        LogUnavailable when one is not within PUBLISH_TIMEOUT_SECONDS."""
        if self._closed:
            raise RuntimeError("the log is closed")
        check_records(records, self._partitions, self.max_record_bytes, f"topic {self.topic!r}'s max.message.bytes "
                      f"of {self._max_message:,}; split it, or raise the limit")
        if idempotency is not None:
            return self._idempotency.submit(list(records), idempotency)
        return self._enqueue(list(records))

    def _enqueue(self, records: list[Append]) -> Future[AppendResult]:
        """Produces the records in order (those of one partition keep their order: the producer is idempotent,
        so a retried request never reorders or repeats them)."""
        pending = _Append(len(records))
        if not records:
            pending.future.set_result(AppendResult([]))
            return pending.future
        producer = self._current_producer()
        for index, record in enumerate(records):
            self._produce(producer, record,
                          lambda error, message, index=index: self._delivered(pending, index, error, message))
            self._events_per_record += (record.events - self._events_per_record) * 0.05
        return pending.future

    def _produce(self, producer: Producer, record: Append, callback: Any) -> None:
        while True:
            try:
                producer.produce(self.topic, record.payload, partition=record.partition,
                                 headers=[(EVENTS_HEADER, str(record.events).encode())], on_delivery=callback)
                return
            except BufferError:  # the producer's queue is full: wait for acknowledgements to drain it
                time.sleep(0.01)
            except KafkaException as error:
                _raise_kafka(error, "produce")
                raise

    def _current_producer(self) -> Producer:
        """The producer; one that hit a fatal error (its idempotence state lost, e.g. a sequence gap after data
        loss on the brokers) is replaced — librdkafka refuses every later record on it."""
        with self._lock:
            if self._producer_failed:
                logger.warning("the Kafka producer hit a fatal error; starting a new one")
                self._retired.append(self._producer)
                self._producer = self._new_producer()
                self._producer_failed = False
            return self._producer

    def _delivered(self, pending: _Append, index: int, error: KafkaError | None, message: Message) -> None:
        if error is not None and error.fatal():
            self._producer_failed = True
        pending.delivered(index, error, message)

    # -------------------------------------------------------------------------------------------------- read
    def _reader(self, partition: int, *, side: bool = False) -> _Reader:
        if not 0 <= partition < self._partitions:
            raise ValueError(f"partition {partition} is outside 0..{self._partitions - 1}")
        with self._lock:
            reader = self._readers.get((partition, side))
            if reader is None:
                reader = self._readers[(partition, side)] = _Reader(self._config, self.topic, partition)
            return reader

    def _messages(self, partition: int, after_offset: int, limit: int, *, side: bool = False) -> list[Message]:
        """Messages with Kafka offset >= `after_offset` (our offset > after), up to the high watermark now.
        `side`: a peek (not the processor's sequential read), through a reader of its own."""
        reader = self._reader(partition, side=side)
        with reader.lock:
            try:
                low, high = reader.watermarks()
                start = max(after_offset, low)
                if start >= high:
                    return []
                return reader.fetch(start, limit, high)
            except (KafkaException, TimeoutError) as error:
                reader.position = None
                _raise_kafka(error, f"reading partition {partition}")
                raise

    def read(self, partition: int, after_offset: int, max_records: int) -> list[LogRecord]:
        """gamestream's records (header `gs-events`) as they are; another producer's messages as what they hold
        (`kafka_foreign`: an event, an array of events, NDJSON, an API Gateway event), or refused with a reason
        naming topic, partition and offset, which the processor quarantines."""
        if max_records <= 0:
            return []
        return [self._record(partition, message) for message in self._messages(partition, after_offset,
                                                                                  max_records)]

    def _record(self, partition: int, message: Message) -> LogRecord:
        offset, appended_at = message.offset() + 1, message.timestamp()[1] / 1000
        if _is_ours(message):
            return LogRecord(partition, offset, message.value() or b"", _events_of(message), appended_at)
        foreign = read_foreign(message.value(), topic=self.topic, partition=partition, kafka_offset=message.offset(),
                               timestamp_ms=message.timestamp()[1])
        return LogRecord(partition, offset, foreign.payload, foreign.events, appended_at, foreign.refused)

    def _high(self, partition: int) -> tuple[int, int]:
        reader = self._reader(partition)
        with reader.lock:
            try:
                return reader.watermarks()
            except (KafkaException, TimeoutError) as error:
                _raise_kafka(error, f"offsets of partition {partition}")
                raise

    def last_offset(self, partition: int) -> int:
        """The partition's high watermark: the Kafka offset after its last record, which is that record's offset
        here (0 when the partition never held a record)."""
        return self._high(partition)[1]

    def last_appended_at(self, partition: int) -> float | None:
        return self._tail(partition)[1]

    def _tail(self, partition: int) -> tuple[int, float | None]:
        low, high = self._high(partition)
        if high <= low:
            return high, None
        messages = self._messages(partition, high - 1, 1, side=True)
        return high, (messages[-1].timestamp()[1] / 1000 if messages else None)

    def partition_tails(self) -> dict[int, tuple[int, float | None]]:
        """Every partition's (`last_offset`, `last_appended_at`), asked of the brokers for all partitions at once:
        each takes two round trips and a fetch, ~0.3 s, so one after the other they held the KPI stage's watermark
        check for seconds on 16 partitions (each partition has a reader, and a lock, of its own)."""
        return _each_partition(self._tail, range(self._partitions))

    # ------------------------------------------------------------------------------------------- positions
    def _committer(self, consumer: str) -> tuple[Consumer, threading.Lock]:
        with self._lock:
            found = self._committers.get(consumer)
            if found is None:
                client = Consumer({**self._config, "group.id": consumer, "enable.auto.commit": False,
                                   "enable.auto.offset.store": False})
                found = self._committers[consumer] = (client, threading.Lock())
            return found

    def _committed_by(self, client: Consumer, partition: int) -> int:
        """The group's committed position; a coordinator that moved or is loading (NOT_COORDINATOR, seen under
        load) is asked again for up to COORDINATOR_WAIT_SECONDS — the client finds the new one meanwhile —
        before LogUnavailable."""
        deadline = time.monotonic() + COORDINATOR_WAIT_SECONDS
        while True:
            try:
                (position,) = client.committed([TopicPartition(self.topic, partition)], timeout=REQUEST_SECONDS)
                error = position.error
            except KafkaException as raised:
                error = raised.args[0] if raised.args and isinstance(raised.args[0], KafkaError) else None
                if error is None:
                    _raise_kafka(raised, "reading a committed position")
                    raise
            if error is None:
                return max(position.offset, 0)  # OFFSET_INVALID (-1001) when the group committed nothing here
            if error.code() in _COORDINATOR_MOVING and time.monotonic() < deadline:
                time.sleep(0.2)
                continue
            _raise_kafka(KafkaException(error), "reading a committed position")
            raise KafkaException(error)

    def commit(self, consumer: str, partition: int, offset: int) -> None:
        """Commits `offset` (the Kafka offset to read next) in consumer group `consumer`, unless it holds as much
        already: forward only. Visible to Kafka's lag tools."""
        client, lock = self._committer(consumer)
        with lock:
            if self._committed_by(client, partition) >= offset:
                return
            try:
                client.commit(offsets=[TopicPartition(self.topic, partition, offset)], asynchronous=False)
            except KafkaException as error:
                _raise_kafka(error, "committing a position")
                raise

    def committed(self, consumer: str, partition: int) -> int:
        client, lock = self._committer(consumer)
        with lock:
            return self._committed_by(client, partition)

    def pending_events_in(self, partition: int, consumer: str) -> int:
        """Events after the consumer's committed position: the first PENDING_SCAN_RECORDS records counted
        exactly, the rest as records × the mean events per record of those (of this process's appends when none
        could be read): an estimate, cheap enough for the collector's backpressure check."""
        after = self.committed(consumer, partition)
        low, high = self._high(partition)
        start = max(after, low)
        if start >= high:
            return 0
        messages = self._messages(partition, start, PENDING_SCAN_RECORDS, side=True)
        counted = sum(_events_of(message) for message in messages)
        scanned_to = messages[-1].offset() + 1 if messages else start
        per_record = counted / len(messages) if messages else self._events_per_record
        return counted + round(max(0, high - scanned_to) * per_record)

    def pending_events(self, consumer: str) -> int:
        return sum(self.pending_events_by_partition(consumer).values())

    def pending_events_by_partition(self, consumer: str, partitions: Sequence[int] | None = None) -> dict[int, int]:
        """`pending_events_in` of every partition (or of `partitions`), asked in parallel threads: one after the
        other, their round trips held the processor's lag gauges for a second on 16 partitions."""
        wanted = range(self._partitions) if partitions is None else partitions
        return _each_partition(lambda partition: self.pending_events_in(partition, consumer), wanted)

    def trim(self, retention_seconds: float, now: float | None = None) -> int:
        """Nothing: records leave a Kafka topic by its retention (`retention.ms`; `supports_trim` is False)."""
        return 0

    def close(self) -> None:
        """Waits (up to PUBLISH_TIMEOUT_SECONDS) for records submitted and not yet acknowledged, then closes
        every client."""
        if self._closed:
            return
        try:
            self._producer.flush(PUBLISH_TIMEOUT_SECONDS)
        except Exception:
            pass
        self._closed = True
        self._poller.join(timeout=5)
        for reader in self._readers.values():
            reader.close()
        for client, _ in self._committers.values():
            try:
                client.close()
            except Exception:
                pass


def _each_partition(ask: Callable[[int], Any], partitions: Sequence[int]) -> dict[int, Any]:
    """partition → `ask(partition)`, asked of every partition at once in threads (up to 16): each is a few broker
    round trips, and each partition has a reader, and a lock, of its own."""
    wanted = list(partitions)
    if not wanted:
        return {}
    with ThreadPoolExecutor(max_workers=min(16, len(wanted))) as pool:
        return dict(zip(wanted, pool.map(ask, wanted)))

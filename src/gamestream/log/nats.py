"""The distributed event log: one NATS JetStream stream, one subject per partition.

How the `EventLog` protocol maps onto JetStream:

- **Stream and subjects**: stream `<stream>` (URL `?stream=NAME`, default `gamestream`) holds subjects
  `<stream>.<partition>`, file storage, replicas = min(3, servers in the cluster). The partition count lives in
  the stream's metadata (`gamestream.partitions`), written when the stream is created and read back afterwards.
- **Offsets** are stream sequences: positive and growing per subject, shared by all partitions, so not
  contiguous within one. A purge never lowers the stream's last sequence, so offsets keep growing after a trim.
- **A record** is one message: payload = the NDJSON bytes, header `Gs-Events` = the event count, `Nats-Msg-Id` =
  the record's id. `appended_at` is the message's timestamp, stamped by the stream leader.
- **Durability**: a message's PubAck comes once the leader and a quorum of replicas stored it; with the nodes'
  `sync_interval: always` (nats_cluster.py; an operator's own cluster must set it too) every replica fsync's
  before acknowledging. An append resolves only once every one of its PubAcks is back.
- **Consumer positions**: KV bucket `<stream>_consumers`, key `c.<consumer>.<partition>`, moved forward only by
  revision-checked updates. Key `trimmed.<partition>` remembers how far a partition was purged, so `last_offset`
  stays right once a partition is empty.
- **Idempotency keys**: KV bucket `<stream>_idempotency` (entries expire after 24 h). See `_append_idempotent`.

The synchronous `EventLog` API runs nats-py's asyncio client on a private event loop in a daemon thread, so it
may be called from any thread (the collector submits from its own event loop, the processor reads from threads).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import logging
import os
import re
import ssl
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Coroutine, Sequence, TypeVar
from urllib.parse import parse_qs, unquote

import nats
import nats.errors
import nats.js.errors
import stamina
from nats.js.api import KeyValueConfig, StorageType, StreamConfig

from gamestream.log.base import (DEFAULT_PARTITIONS, IDEMPOTENCY_SECONDS, Append, AppendResult, Idempotency,
                                 LogFeatures, LogRecord, LogUnavailable, check_records)
from gamestream.log.sqlite import LogPartitionsMismatch

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_STREAM = "gamestream"
PARTITIONS_METADATA = "gamestream.partitions"
EVENTS_HEADER = "Gs-Events"
DUPLICATE_WINDOW_SECONDS = 5 * 60  # a retried publish within this window is stored once (Nats-Msg-Id)
PUBLISH_RETRY_SECONDS = 10.0  # a publish is retried this long while the stream has no leader, then fails
PUBLISH_ATTEMPT_SECONDS = 2.0
OPEN_RETRY_SECONDS = 30.0  # opening the log waits this long for a new cluster's or stream's leaders
ATOMIC_BATCH_MAX = 1000  # the server's limit of messages in one atomic batch
_NO_SUITABLE_PEERS = 10005
_STREAM_NAME_IN_USE = 10058
_DUPLICATE_IN_PROCESS = 10158
_DUPLICATE_IN_BATCH = 10201  # JetStream: "atomic publish batch contains duplicate message id"
CLAIM_TIMEOUT_SECONDS = 20.0  # an idempotency claim older than this is taken over (its appender crashed)
PENDING_SCAN_BYTES = 256 * 1024  # pending_events reads at most this much per partition; beyond, it extrapolates
REQUEST_SECONDS = 10.0
_HEADER_ROOM = 256  # bytes for our headers (Nats-Msg-Id, Gs-Events) on top of the payload

_CLAIM = b"C"  # idempotency entry: a claim, followed by the claim's unix time
_DONE = b"R"  # idempotency entry: the stored response, followed by its bytes
_KEY_SAFE = re.compile(r"^[A-Za-z0-9_-]+$")


class StreamNotWritable(RuntimeError):
    """The stream cannot take writes now (no leader, sealed, …)."""


@dataclass(frozen=True)
class LogUrl:
    """`nats://[user:password@]host:port[,host:port…][?stream=NAME]` (or `tls://…`), taken apart."""

    servers: list[str]
    stream: str
    user: str | None
    password: str | None

    @classmethod
    def parse(cls, url: str) -> "LogUrl":
        scheme, sep, rest = url.partition("://")
        if not sep or scheme.lower() not in ("nats", "tls"):
            raise ValueError(f"log URL {url!r}: expected nats://host:port[,host:port…][?stream=NAME]")
        rest, _, query = rest.partition("?")
        stream = (parse_qs(query).get("stream") or [DEFAULT_STREAM])[0]
        if not re.fullmatch(r"[A-Za-z0-9_-]+", stream):
            raise ValueError(f"log URL {url!r}: a stream name is letters, digits, '-' and '_'")
        user = password = None
        servers = []
        for host in filter(None, (part.strip().rstrip("/") for part in rest.split(","))):
            if "@" in host:
                credentials, host = host.rsplit("@", 1)
                name, _, secret = credentials.partition(":")
                user, password = unquote(name), (unquote(secret) if secret else None)
            servers.append(f"{scheme.lower()}://{host}")
        if not servers:
            raise ValueError(f"log URL {url!r} names no server")
        return cls(servers, stream, user, password)


def _connect_options(parsed: LogUrl) -> dict[str, Any]:
    """nats-py's connect options: credentials from the URL, a creds file from NATS_CREDS, TLS files from
    NATS_CA / NATS_CERT / NATS_KEY (the names the `nats` CLI uses)."""
    # A server cut off by a network partition does not close our connection: only missed pings tell. Pings
    # every 2 s, given up after 2 missed, move the client to another server within seconds (the default, 2
    # minutes, would leave a collector answering 503 for that long).
    options: dict[str, Any] = {"servers": parsed.servers, "name": "gamestream", "max_reconnect_attempts": -1,
                               "reconnect_time_wait": 0.5, "connect_timeout": 5, "ping_interval": 2,
                               "max_outstanding_pings": 2, "error_cb": _connection_error,
                               "reconnected_cb": _reconnected}
    if parsed.user is not None:
        if parsed.password is None:
            options["token"] = parsed.user
        else:
            options["user"], options["password"] = parsed.user, parsed.password
    if os.environ.get("NATS_CREDS"):
        options["user_credentials"] = os.environ["NATS_CREDS"]
    ca, cert, key = (os.environ.get(name) for name in ("NATS_CA", "NATS_CERT", "NATS_KEY"))
    if ca or cert:
        context = ssl.create_default_context(cafile=ca or None)
        if cert:
            context.load_cert_chain(cert, key or None)
        options["tls"] = context
    return options


async def _connection_error(error: Exception) -> None:
    """nats-py's own callback would log a traceback per failed reconnection attempt; one line is enough."""
    logger.debug("NATS connection error: %s: %s", type(error).__name__, error)


async def _reconnected() -> None:
    logger.info("reconnected to a NATS server")


def _transient(error: Exception) -> bool:
    """Errors of a cluster between leaders or a connection between servers: worth retrying the same publish."""
    if isinstance(error, nats.js.errors.APIError):
        # unavailable / JetStream not ready / "no suitable peers for placement, peer offline" (a busy cluster's
        # meta layer briefly thinks a peer is gone: creating a replicated stream or bucket then fails)
        # "duplicate message id is in process": an earlier attempt of this publish is still being replicated;
        # the retry gets its acknowledgement (a duplicate) once it is stored
        return error.code == 503 or error.err_code in (10008, _NO_SUITABLE_PEERS, _DUPLICATE_IN_PROCESS)
    return isinstance(error, (nats.errors.TimeoutError, nats.errors.NoRespondersError,
                              nats.js.errors.NoStreamResponseError, nats.errors.ConnectionReconnectingError,
                              nats.errors.StaleConnectionError, nats.errors.OutboundBufferLimitError))


def _parse_nats_time(value: str) -> float:
    """`2026-11-30T18:04:16.943433489Z` (nanoseconds) → unix seconds; Python parses at most microseconds."""
    value = value.rstrip("Z")
    whole, _, fraction = value.partition(".")
    stamp = dt.datetime.fromisoformat(whole).replace(tzinfo=dt.timezone.utc).timestamp()
    return stamp + (float("0." + fraction) if fraction else 0.0)


def _key_part(name: str) -> str:
    """A consumer name as a KV key token: itself when safe, else its hex (KV keys allow few characters)."""
    return name if _KEY_SAFE.match(name) else "x" + name.encode().hex()


def _claim_abandoned(value: bytes) -> bool:
    """Whether an idempotency entry holding a claim (`_CLAIM` and its unix time) is older than
    CLAIM_TIMEOUT_SECONDS: its appender crashed, and the claim may be taken over."""
    claimed_at = float(value[len(_CLAIM):] or 0)
    return time.time() - claimed_at > CLAIM_TIMEOUT_SECONDS


@dataclass(frozen=True, slots=True)
class _Message:
    seq: int
    subject: str
    data: bytes
    headers: dict[str, str]
    time: float

    @property
    def events(self) -> int:
        return int(self.headers.get(EVENTS_HEADER, "0"))


class NatsEventLog(LogFeatures):
    """`EventLog` on a NATS JetStream stream. Thread-safe; any number of processes may open the same stream.

    >>> log = NatsEventLog.connect("nats://127.0.0.1:4222?stream=games", partitions=4)
    >>> log.append([Append(0, b'{"eventName":"x"}', 1)])   # [1]
    """

    def __init__(self, url: str, *, partitions: int | None) -> None:
        if partitions is not None and partitions < 1:
            raise ValueError("partitions must be >= 1")
        self._url = LogUrl.parse(url)
        self.stream = self._url.stream
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"nats-log-{self.stream}", daemon=True)
        self._thread.start()
        self._closed = False
        try:
            self._call(self._open(partitions), timeout=60)
        except BaseException:
            self._stop_loop()
            raise

    @classmethod
    def connect(cls, url: str, *, partitions: int | None = None) -> "NatsEventLog":
        """Opens the stream the URL names, creating it (with `partitions`, else DEFAULT_PARTITIONS) when absent;
        an existing stream keeps its own count, and an explicit different count is refused."""
        return cls(url, partitions=partitions)

    # ------------------------------------------------------------------------------------------- plumbing
    def _call(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = 60) -> T:
        """Runs `coroutine` on the client's loop; a cluster between leaders or out of reach is `LogUnavailable`."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(timeout)
        except LogUnavailable:
            raise
        except Exception as error:
            if isinstance(error, nats.errors.Error) and (_transient(error) or isinstance(
                    error, (nats.errors.ConnectionClosedError, nats.errors.StaleConnectionError))):
                raise LogUnavailable(f"the NATS log is unavailable: {type(error).__name__}: {error}") from error
            if isinstance(error, TimeoutError):  # ours (the call's bound) or one inside it (a reply awaited)
                if not future.done():
                    future.cancel()
                raise LogUnavailable(f"the NATS log did not answer in time ({type(error).__name__})") from error
            raise

    def _stop_loop(self) -> None:
        """Ends the private loop cleanly: the client's background tasks are cancelled and awaited first, so none
        is left to be collected on a closed loop."""
        async def cancel_the_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(cancel_the_rest(), self._loop).result(10)
        except Exception:
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()

    async def _open(self, partitions: int | None) -> None:
        async def disconnected() -> None:
            if not self._closed:  # our own close() disconnects too: nothing to warn about
                logger.warning("disconnected from the NATS server; reconnecting")

        self._nc = await nats.connect(**{**_connect_options(self._url), "disconnected_cb": disconnected})
        self._js = self._nc.jetstream(timeout=REQUEST_SECONDS)
        info = self._nc._server_info  # the INFO of the server we reached: cluster members, max_payload
        # The cluster's size: the members the server we reached knows (`connect_urls`) — which, in a cluster still
        # forming, can miss a node whose route is not up yet — or the servers the URL names, whichever is more.
        # (A CI run created an R2 stream that way, and lost its quorum with the leader.)
        known = len(set(info.get("connect_urls") or []))
        servers = max(known, len(self._url.servers)) if (info.get("cluster") or known) else 1
        self._max_payload = int(info.get("max_payload", 1024 * 1024))
        # A cluster just started, or a stream/bucket just created by another process, answers nothing until its
        # leaders are elected: wait for that (bounded), rather than failing the command that opens the log.
        async for attempt in stamina.retry_context(on=_transient, attempts=None, timeout=OPEN_RETRY_SECONDS,
                                                   wait_initial=0.1, wait_max=1.0, wait_jitter=0.1):
            with attempt:
                self._partitions, self._replicas = await self._ensure_stream(partitions, min(3, max(1, servers)))
                self._consumers = await self._ensure_bucket(f"{self.stream}_consumers", None)
                self._idempotency = await self._ensure_bucket(f"{self.stream}_idempotency", IDEMPOTENCY_SECONDS)
        self._inbox_prefix = self._nc.new_inbox()
        self._replies: dict[str, asyncio.Queue] = {}
        self._reply_sub = await self._nc.subscribe(f"{self._inbox_prefix}.*", cb=self._on_reply)
        self._events_per_record = 1.0  # running mean, for pending_events beyond what it scans
        self._last_ack_seq = 0  # the highest stream sequence a PubAck reported: later appends land above it

    async def _ensure_stream(self, partitions: int | None, replicas: int) -> tuple[int, int]:
        try:
            info = await self._js.stream_info(self.stream)
        except nats.js.errors.NotFoundError:
            count = partitions or DEFAULT_PARTITIONS
            config = StreamConfig(
                name=self.stream, subjects=[f"{self.stream}.*"], storage=StorageType.FILE, num_replicas=replicas,
                allow_direct=True, allow_atomic=True, duplicate_window=DUPLICATE_WINDOW_SECONDS, max_msg_size=-1,
                metadata={PARTITIONS_METADATA: str(count)},
                description=f"gamestream event log, {count} partitions (subjects {self.stream}.0 …)")
            try:
                info = await self._js.add_stream(config)
            except nats.js.errors.BadRequestError as error:
                if error.err_code != _STREAM_NAME_IN_USE:
                    raise  # retried by _open when transient (_transient)
                info = await self._js.stream_info(self.stream)  # created meanwhile by another process
        stored = (info.config.metadata or {}).get(PARTITIONS_METADATA)
        if stored is None:
            raise LogPartitionsMismatch(f"stream {self.stream!r} exists but was not created by gamestream (no "
                                        f"{PARTITIONS_METADATA} metadata); name another with ?stream=NAME")
        existing = int(stored)
        if partitions is not None and partitions != existing:
            raise LogPartitionsMismatch(f"the log stream {self.stream!r} has {existing} partitions, not {partitions}; "
                                        f"use --partitions {existing} or another stream (?stream=NAME)")
        # a stream created before atomic batches were used: appends of several records fall back to one
        # publish each (see _append)
        self._atomic = bool(info.config.allow_atomic)
        return existing, info.config.num_replicas or 1

    async def _ensure_bucket(self, bucket: str, ttl: float | None):
        """A KV bucket without direct gets: every read goes to the bucket's leader, so a commit is seen by the
        next `committed` whichever replica would have answered a direct get."""
        try:
            return await self._js.key_value(bucket)
        except nats.js.errors.BucketNotFoundError:
            pass
        try:
            return await self._js.create_key_value(KeyValueConfig(
                bucket=bucket, history=1, ttl=ttl, storage=StorageType.FILE, replicas=self._replicas, direct=False))
        except nats.js.errors.BadRequestError as error:
            if error.err_code == _NO_SUITABLE_PEERS:
                raise  # retried by _open (_transient)
            return await self._js.key_value(bucket)  # created meanwhile by another process

    @property
    def partitions(self) -> int:
        return self._partitions

    @property
    def max_record_bytes(self) -> int:
        """The largest payload one record may have: the servers' `max_payload` less room for our headers. A
        producer that builds big records (`load`) should split a partition's lines before this."""
        return self._max_payload - _HEADER_ROOM

    def _subject(self, partition: int) -> str:
        return f"{self.stream}.{partition}"

    # ------------------------------------------------------------------------------------------------ append
    def append(self, records: Sequence[Append]) -> list[int]:
        """Appends durably; returns the offsets once every record's PubAck is back."""
        return self.submit(records).result().offsets

    def submit(self, records: Sequence[Append], idempotency: Idempotency | None = None) -> Future[AppendResult]:
        """Starts an append; the future resolves once every record is acknowledged by the stream (replicated and
        fsync'd), or fails — after retrying for up to PUBLISH_RETRY_SECONDS while the stream has no leader."""
        if self._closed:
            raise RuntimeError("the log is closed")
        check_records(records, self._partitions, self.max_record_bytes, f"the NATS servers' max_payload of "
                      f"{self._max_payload:,} bytes; split it, or raise max_payload")
        if not records and idempotency is None:
            done: Future[AppendResult] = Future()
            done.set_result(AppendResult([]))
            return done
        if idempotency is None:
            ids = [uuid.uuid4().hex for _ in records]
            return asyncio.run_coroutine_threadsafe(self._append(records, ids), self._loop)
        return asyncio.run_coroutine_threadsafe(self._append_idempotent(records, idempotency), self._loop)

    async def _append(self, records: Sequence[Append], ids: list[str]) -> AppendResult:
        """Stores the records: several at once as JetStream atomic batches (all stored, or none — the Protocol's
        "a failed append leaves none of its records visible"), one alone as a plain publish."""
        if len(records) > 1 and self._atomic:
            offsets: list[int] = []
            for start in range(0, len(records), ATOMIC_BATCH_MAX):
                offsets += await self._publish_atomic(records[start:start + ATOMIC_BATCH_MAX],
                                                      ids[start:start + ATOMIC_BATCH_MAX])
        else:
            offsets = await self._publish_each(records, ids)
        for record in records:
            self._events_per_record += (record.events - self._events_per_record) * 0.05
        return AppendResult(offsets)

    async def _publish_atomic(self, records: Sequence[Append], ids: list[str]) -> list[int]:
        """One atomic batch (ADR-50): every message carries `Nats-Batch-Id` and its `Nats-Batch-Sequence`, the
        last one `Nats-Batch-Commit`; the server stores the whole batch at consecutive sequences when it commits,
        or nothing. Retried while the stream elects a leader, as a new batch with the same Msg-Ids: if an earlier
        attempt was committed but its PubAck lost, the server refuses the retry as containing stored Msg-Ids,
        and the offsets are found by those ids instead."""
        async for attempt in stamina.retry_context(on=_transient, attempts=None, timeout=PUBLISH_RETRY_SECONDS,
                                                   wait_initial=0.05, wait_max=1.0, wait_jitter=0.1):
            with attempt:
                batch = uuid.uuid4().hex
                last = len(records)
                for number, (record, msg_id) in enumerate(zip(records, ids), start=1):
                    headers = {"Nats-Batch-Id": batch, "Nats-Batch-Sequence": str(number), "Nats-Msg-Id": msg_id,
                               EVENTS_HEADER: str(record.events)}
                    subject = self._subject(record.partition)
                    if number == last:
                        headers["Nats-Batch-Commit"] = "1"
                    elif number > 1:  # acknowledged at the start and at the commit only
                        await self._nc.publish(subject, record.payload, headers=headers)
                        continue
                    reply = await self._nc.request(subject, record.payload, headers=headers,
                                                   timeout=PUBLISH_ATTEMPT_SECONDS)
                    answer = json.loads(reply.data) if reply.data else {}
                    error = answer.get("error")
                    if error and error.get("err_code") == _DUPLICATE_IN_BATCH:
                        return await self._locate(records, ids)
                    if error:
                        nats.js.errors.APIError.from_error(error)  # raises the specific error (503: retried)
                end = int(answer.get("seq", 0)) if number == last else 0
        self._last_ack_seq = max(self._last_ack_seq, end)
        return [end - len(records) + 1 + index for index in range(len(records))]

    async def _locate(self, records: Sequence[Append], ids: list[str]) -> list[int]:
        """The offsets of records stored by an earlier attempt whose PubAck was lost: found by their Msg-Ids,
        scanning each partition's subject over the duplicate window (the server only refuses a Msg-Id it stored
        within that window, so the records are there)."""
        wanted = {msg_id: index for index, msg_id in enumerate(ids)}
        offsets = [0] * len(records)
        since = time.time() - DUPLICATE_WINDOW_SECONDS - 60
        for partition in sorted({record.partition for record in records}):
            first = await self._first_since(partition, since)
            if first is None:
                continue
            after = first - 1
            while True:
                messages, _ = await self._direct_batch(self._subject(partition), after, 1000)
                if not messages:
                    break
                for message in messages:
                    index = wanted.get(message.headers.get("Nats-Msg-Id", ""))
                    if index is not None:
                        offsets[index] = message.seq
                after = messages[-1].seq
        if not all(offsets):
            raise nats.errors.TimeoutError  # not visible on this replica yet: the caller's retry looks again
        self._last_ack_seq = max(self._last_ack_seq, *offsets)
        return offsets

    async def _publish_each(self, records: Sequence[Append], ids: list[str]) -> list[int]:
        """Publishes the records of each partition one after the other (so their offsets follow the records'
        order even when one is retried), the partitions concurrently."""
        offsets: list[int] = [0] * len(records)
        by_partition: dict[int, list[int]] = {}
        for index, record in enumerate(records):
            by_partition.setdefault(record.partition, []).append(index)

        async def publish_partition(indices: list[int]) -> None:
            for index in indices:
                offsets[index] = await self._publish(records[index], ids[index])

        await asyncio.gather(*(publish_partition(indices) for indices in by_partition.values()))
        return offsets

    async def _publish(self, record: Append, msg_id: str) -> int:
        """One message, retried with the same Nats-Msg-Id while the stream elects a leader: the duplicate window
        stores it once even when an earlier attempt was stored but its PubAck lost."""
        headers = {"Nats-Msg-Id": msg_id, EVENTS_HEADER: str(record.events)}
        async for attempt in stamina.retry_context(on=_transient, attempts=None, timeout=PUBLISH_RETRY_SECONDS,
                                                   wait_initial=0.05, wait_max=1.0, wait_jitter=0.1):
            with attempt:
                ack = await self._js.publish(self._subject(record.partition), record.payload,
                                             timeout=PUBLISH_ATTEMPT_SECONDS, headers=dict(headers))
        self._last_ack_seq = max(self._last_ack_seq, ack.seq)
        return ack.seq

    async def _append_idempotent(self, records: Sequence[Append], idempotency: Idempotency) -> AppendResult:
        """At most one append per key, also across processes:

        1. claim the key with a KV `create` (fails when the key exists); the winner publishes;
        2. the records' Msg-Ids derive from the key, partition and index, so a re-publish of the same request
           (after a crash, or a takeover) is stored once within the duplicate window;
        3. the winner puts the response in the key before the future resolves (the answer is stored before it
           is sent);
        4. a loser waits for the response and replays it; a claim older than CLAIM_TIMEOUT_SECONDS belongs to a
           crashed appender and is taken over with a revision-checked update.
        """
        key = hashlib.sha256(idempotency.key.encode()).hexdigest()
        # Step 1 (and step 4 for a loser: the stored response comes back instead of a claim)
        claimed = await self._claim_or_replay(key)
        if isinstance(claimed, AppendResult):
            return claimed
        # Step 2
        ids = [f"{key[:32]}-{record.partition}-{index}" for index, record in enumerate(records)]
        result = await self._append_releasing_claim(records, ids, key, revision=claimed)
        # Step 3
        await self._store_response(key, idempotency.response)
        return result

    async def _claim_or_replay(self, key: str) -> int | AppendResult:
        """Steps 1 and 4 of `_append_idempotent`: the revision of this appender's claim on `key` (created, or taken
        over from a crashed appender), or the stored response of the append that did claim it, to replay.
        Raises TimeoutError when another appender holds the claim for too long."""
        deadline = time.monotonic() + CLAIM_TIMEOUT_SECONDS + PUBLISH_RETRY_SECONDS * 2
        while True:
            claim = _CLAIM + repr(time.time()).encode()
            if time.monotonic() > deadline:
                raise TimeoutError(f"idempotency key still being appended by another request after "
                                   f"{CLAIM_TIMEOUT_SECONDS:.0f} s")
            try:
                return await self._idempotency.create(key, claim)
            # KeyNotFoundError out of create: in a cluster the leader refuses a create against a claim it has
            # proposed but not yet stored, and nats-py's check for a deleted key then finds nothing.
            except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.KeyNotFoundError):
                pass
            try:
                entry = await self._idempotency.get(key)
            except nats.js.errors.KeyNotFoundError:
                await asyncio.sleep(0.02)  # a claim not stored yet, or released / expired: try again
                continue
            value = entry.value or b""
            if value.startswith(_DONE):
                return AppendResult([], replayed=value[len(_DONE):])
            if _claim_abandoned(value):
                try:
                    return await self._idempotency.update(key, claim, last=entry.revision)
                except nats.js.errors.KeyWrongLastSequenceError:
                    continue
            await asyncio.sleep(0.02)

    async def _append_releasing_claim(self, records: Sequence[Append], ids: list[str], key: str, *,
                                      revision: int) -> AppendResult:
        """`_append`; should it fail, the claim (at `revision`) is deleted on the way out."""
        try:
            return await self._append(records, ids)
        except BaseException:
            try:  # let the client's retry claim the key at once instead of after the claim timeout
                await self._idempotency.delete(key, last=revision)
            except Exception:
                pass
            raise

    async def _store_response(self, key: str, response: bytes) -> None:
        """Step 3 of `_append_idempotent`: the response in the key, in place of the claim (retried while the
        stream has no leader)."""
        async for attempt in stamina.retry_context(on=_transient, attempts=None, timeout=PUBLISH_RETRY_SECONDS,
                                                   wait_initial=0.05, wait_max=1.0, wait_jitter=0.1):
            with attempt:
                await self._idempotency.put(key, _DONE + response)

    # -------------------------------------------------------------------------------------------------- read
    async def _on_reply(self, msg) -> None:
        queue = self._replies.get(msg.subject)
        if queue is not None:
            queue.put_nowait(msg)

    async def _direct_batch(self, subject: str, after: int, batch: int,
                            max_bytes: int | None = None) -> tuple[list[_Message], int]:
        """Up to `batch` messages of `subject` with sequence > `after`, by one batched direct get; and how many
        more the subject holds after the last one returned (the server's Nats-Num-Pending).

        Why direct get rather than an ephemeral ordered consumer: one request, answered by any replica from its
        store, with no consumer to create (a meta-layer operation in a cluster) for every read; measured here
        ~22k 1-KiB records/s for one reader on one core, i.e. millions of events/s at 100+ events a record.
        A replica may lag the leader by a few messages; it still answers with a prefix, never with a gap."""
        inbox = f"{self._inbox_prefix}.{uuid.uuid4().hex}"
        queue: asyncio.Queue = asyncio.Queue()
        self._replies[inbox] = queue
        request: dict[str, Any] = {"seq": after + 1, "next_by_subj": subject, "batch": batch}
        if max_bytes:
            request["max_bytes"] = max_bytes
        messages: list[_Message] = []
        remaining = 0
        try:
            await self._nc.publish(f"$JS.API.DIRECT.GET.{self.stream}", json.dumps(request).encode(), reply=inbox)
            while True:
                msg = await asyncio.wait_for(queue.get(), REQUEST_SECONDS)
                headers = msg.headers or {}
                status = headers.get("Status")
                if status:
                    if status in ("204", "404"):  # end of batch / nothing after `after`
                        return messages, remaining
                    raise nats.js.errors.APIError(code=int(status), description=headers.get("Description", ""))
                remaining = int(headers.get("Nats-Num-Pending", "0"))
                messages.append(_Message(int(headers["Nats-Sequence"]), headers.get("Nats-Subject", subject),
                                         msg.data, headers, _parse_nats_time(headers["Nats-Time-Stamp"])))
        finally:
            self._replies.pop(inbox, None)

    async def _leader_get(self, request: dict[str, Any]) -> _Message | None:
        """One message through the stream leader (`STREAM.MSG.GET`): current, unlike a replica's direct get."""
        try:
            raw = await self._js.get_msg(self.stream, seq=request.get("seq"),
                                         subject=request.get("next_by_subj") or request.get("last_by_subj"),
                                         next="next_by_subj" in request)
        except nats.js.errors.NotFoundError:
            return None
        return _Message(raw.seq or 0, raw.subject or "", raw.data or b"", dict(raw.headers or {}),
                        raw.time.timestamp() if raw.time else 0.0)

    async def _read(self, partition: int, after: int, limit: int, max_bytes: int | None = None
                    ) -> tuple[list[_Message], int]:
        """`_direct_batch`, made current: when a replica answered with less than asked, the leader tells whether
        newer messages exist, and those are read from the leader — so a record appended (PubAck received) before
        the read started is always returned (read-your-writes, as the embedded log gives)."""
        subject = self._subject(partition)
        messages, remaining = await self._direct_batch(subject, after, limit, max_bytes)
        if self._replicas == 1 or remaining or len(messages) >= limit or max_bytes:
            return messages, remaining
        seen = messages[-1].seq if messages else after
        while len(messages) < limit:
            newer = await self._leader_get({"seq": seen + 1, "next_by_subj": subject})
            if newer is None:
                break
            messages.append(newer)
            seen = newer.seq
        return messages, remaining

    def read(self, partition: int, after_offset: int, max_records: int) -> list[LogRecord]:
        if max_records <= 0:
            return []
        messages, _ = self._call(self._read(partition, after_offset, max_records))
        return [LogRecord(partition, m.seq, m.data, m.events, m.time) for m in messages]

    async def _last(self, partition: int) -> _Message | None:
        return await self._leader_get({"last_by_subj": self._subject(partition)})

    def last_offset(self, partition: int) -> int:
        async def last() -> int:
            message = await self._last(partition)
            trimmed = await self._kv_int(self._consumers, f"trimmed.{partition}")
            return max(message.seq if message else 0, trimmed)

        return self._call(last())

    def last_appended_at(self, partition: int) -> float | None:
        message = self._call(self._last(partition))
        return message.time if message else None

    # ------------------------------------------------------------------------------------ consumers and trim
    @staticmethod
    async def _kv_int(bucket, key: str) -> int:
        try:
            entry = await bucket.get(key)
        except nats.js.errors.KeyNotFoundError:
            return 0
        return int(entry.value or 0)

    @staticmethod
    async def _kv_raise_to(bucket, key: str, value: int) -> None:
        """Sets `key` to `value` unless it already holds as much: a read, then an update checked against the
        revision read (create when absent), retried when another writer got in between — a position never
        moves back, whatever order concurrent commits arrive in."""
        while True:
            try:
                entry = await bucket.get(key)
            except nats.js.errors.KeyNotFoundError:
                entry = None
            if entry is not None and int(entry.value or 0) >= value:
                return
            try:
                if entry is None:
                    await bucket.create(key, str(value).encode())
                else:
                    await bucket.update(key, str(value).encode(), last=entry.revision)
                return
            except nats.js.errors.KeyWrongLastSequenceError:
                continue

    def commit(self, consumer: str, partition: int, offset: int) -> None:
        self._call(self._kv_raise_to(self._consumers, f"c.{_key_part(consumer)}.{partition}", offset))

    def committed(self, consumer: str, partition: int) -> int:
        return self._call(self._kv_int(self._consumers, f"c.{_key_part(consumer)}.{partition}"))

    async def _pending_in(self, partition: int, consumer: str) -> int:
        """Events after the consumer's position: summed from the records' Gs-Events headers when the backlog
        fits in PENDING_SCAN_BYTES (one direct get), else that sum plus the records not read × the mean events
        per record seen — an estimate, cheap enough for the collector's backpressure check every 0.5 s."""
        after = await self._kv_int(self._consumers, f"c.{_key_part(consumer)}.{partition}")
        messages, remaining = await self._direct_batch(self._subject(partition), after, 10_000, PENDING_SCAN_BYTES)
        counted = sum(m.events for m in messages)
        if messages:
            self._events_per_record += (counted / len(messages) - self._events_per_record) * 0.2
        if self._replicas > 1 and not remaining:  # a lagging replica may have answered: ask the leader
            last = await self._last(partition)
            seen = messages[-1].seq if messages else after
            if last is not None and last.seq > seen:
                more, _ = await self._read(partition, seen, 10_000)
                counted += sum(m.events for m in more)
        return counted + round(remaining * self._events_per_record)

    def pending_events(self, consumer: str) -> int:
        async def total() -> int:
            return sum(await asyncio.gather(*(self._pending_in(p, consumer) for p in range(self._partitions))))

        return self._call(total())

    def pending_events_in(self, partition: int, consumer: str) -> int:
        return self._call(self._pending_in(partition, consumer))

    async def _consumer_positions(self) -> dict[int, list[int]]:
        """Every consumer's committed position per partition. The keys are listed by the bucket's stream leader
        (STREAM.INFO with a subjects filter), not by `keys()`, whose ordered consumer may sit on a replica that
        has not yet seen a consumer's first commit: a consumer missing from the list would let a trim delete
        records it has not read."""
        bucket = f"{self.stream}_consumers"
        prefix = f"$KV.{bucket}."
        info = await self._js.stream_info(f"KV_{bucket}", subjects_filter=f"{prefix}c.>")
        keys = [subject[len(prefix):] for subject in (info.state.subjects or {})]
        positions: dict[int, list[int]] = {}
        for key in keys:
            partition = int(key.rsplit(".", 1)[1])
            positions.setdefault(partition, []).append(await self._kv_int(self._consumers, key))
        return positions

    async def _first_young(self, partition: int, cutoff: float, safe: int) -> int:
        """The purge bound of a partition: the first sequence to keep, i.e. the lower of the first record not
        committed by every consumer (safe + 1) and the first record younger than the retention (asked of the
        stream leader by `start_time`: current, where a lagging replica could miss the youngest records; records
        are in time order, as the leader stamps them when it sequences them)."""
        young = await self._first_since(partition, cutoff)
        return min(safe + 1, young) if young is not None else safe + 1

    async def _first_since(self, partition: int, since: float) -> int | None:
        """The sequence of the partition's first record stamped at or after `since` (unix seconds), from the
        stream leader (`STREAM.MSG.GET` by `start_time`); None when there is none."""
        stamp = dt.datetime.fromtimestamp(max(since, 0), dt.timezone.utc).isoformat().replace("+00:00", "Z")
        request = {"start_time": stamp, "next_by_subj": self._subject(partition)}
        reply = await self._nc.request(f"$JS.API.STREAM.MSG.GET.{self.stream}", json.dumps(request).encode(),
                                       timeout=REQUEST_SECONDS)
        answer = json.loads(reply.data)
        error = answer.get("error")
        if error and error.get("code") == 404:
            return None
        if error:
            nats.js.errors.APIError.from_error(error)
        return int(answer["message"]["seq"])

    async def _trim(self, retention_seconds: float, now: float) -> int:
        cutoff = now - retention_seconds
        purged_total = 0
        positions = await self._consumer_positions()
        for partition in range(self._partitions):
            if partition not in positions:
                continue  # nobody has committed anything: nothing is safe to delete
            safe = min(positions[partition])
            bound = await self._first_young(partition, cutoff, safe)
            reply = await self._nc.request(
                f"$JS.API.STREAM.PURGE.{self.stream}",
                json.dumps({"filter": self._subject(partition), "seq": bound}).encode(), timeout=REQUEST_SECONDS)
            answer = json.loads(reply.data)
            if "error" in answer:
                raise nats.js.errors.APIError.from_error(answer["error"])
            purged = int(answer.get("purged", 0))
            if purged:
                await self._kv_raise_to(self._consumers, f"trimmed.{partition}", bound - 1)
            purged_total += purged
        return purged_total

    def trim(self, retention_seconds: float, now: float | None = None) -> int:
        """Purges each partition's records that every consumer committed and that are older than the retention.
        Idempotency answers expire by themselves after IDEMPOTENCY_SECONDS (the bucket's TTL)."""
        return self._call(self._trim(retention_seconds, time.time() if now is None else now), timeout=300)

    def check_writable(self) -> None:
        """Raises when the stream cannot take writes: no leader (an election under way), sealed, or gone."""
        async def check() -> None:
            info = await self._js.stream_info(self.stream)
            if info.config.sealed:
                raise StreamNotWritable(f"stream {self.stream!r} is sealed")
            if info.cluster is not None and self._replicas > 1 and not info.cluster.leader:
                raise StreamNotWritable(f"stream {self.stream!r} has no leader")

        self._call(check(), timeout=REQUEST_SECONDS + 5)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._call(self._nc.close(), timeout=10)
        except Exception:
            pass
        self._stop_loop()

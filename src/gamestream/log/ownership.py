"""Which log partitions (and which singleton roles, such as the KPI stage) this process owns right now.

A partition is written by one processor at a time, so its micro-batches stay in offset order and a processor does
not waste work on records another one is committing. Ownership is an optimisation of who works, not the guarantee
of exactly once: the Delta `txn` check in `gamestream.tables.lake.commit_exactly_once` is what keeps a stale owner (a process
paused past its lease, then resumed) from committing a row twice, and it holds even when two processes believe
they own the same partition.

Three implementations of `Ownership`:

- `LocalOwnership`: one machine, the embedded log. A fixed set of partitions (all, or `process --only`), each
  held by a `flock` that the kernel releases when the process dies; `PartitionBusy` when another process holds
  one.
- `LeaseOwnership`: any number of processors on any machines, through leases in a NATS JetStream key-value
  bucket. Partitions are shared out by a fair-share rule and move within seconds when a processor joins, stops
  or dies (docs/architecture.md, "Ownership").
- `KafkaGroupOwnership` (`gamestream.log.kafka_group`): on a Kafka log, Kafka's own consumer-group protocol
  (cooperative-sticky) assigns the partitions, and a consumer group per role on a one-partition topic holds the
  singletons.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import math
import os
import random
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Protocol, runtime_checkable
from urllib.parse import urlsplit

from gamestream.errors import is_out_of_space

if TYPE_CHECKING:
    from gamestream.settings import Settings

logger = logging.getLogger(__name__)

KPI_ROLE = "kpi"
MAINTENANCE_ROLE = "maintenance"


class PartitionBusy(RuntimeError):
    """Another processor holds this partition's lock."""


class OwnershipUnavailable(RuntimeError):
    """Leases cannot be used as asked: no NATS server answers at the URL, or a fixed `--only` set was asked for
    with a NATS log (processors share the partitions by themselves there). The message says which."""


@runtime_checkable
class Ownership(Protocol):
    """What a processor may work on. The set can change at any moment (leases are gained, lost, handed over); a
    processor reads it at the start of each round and checks `owns` again right before it commits.

    Terms: `owned()` maps each owned partition to the term of its current ownership, a number that changes each
    time the partition is acquired anew. A partition lost and won back between two looks has a new term, so the
    processor re-reads its committed position from the events table instead of trusting what it had read."""

    @property
    def partitions(self) -> int:
        """How many partitions the log has."""
        ...

    def owned(self) -> dict[int, int]:
        """Partition → term, for every partition this process owns now."""
        ...

    def owns(self, partition: int) -> bool:
        """Whether this process still owns `partition` at this instant (its lease has not lapsed)."""
        ...

    def surplus(self) -> frozenset[int]:
        """Owned partitions that others should have (beyond this process' fair share): the processor commits what
        it has read of them, then `release`s them."""
        ...

    def release(self, partitions: Iterable[int]) -> None:
        """Gives partitions up at once, so another process can take them without waiting for a lease to lapse."""
        ...

    def claim(self, role: str) -> bool:
        """Tries to take a singleton role (`"kpi"`) now; True if this process holds it afterwards."""
        ...

    def holds(self, role: str) -> bool:
        """Whether this process still holds `role` at this instant."""
        ...

    def release_role(self, role: str) -> None:
        ...

    def grow(self, partitions: int) -> list[int]:
        """Takes what it should of the partitions a resharded log gained (`partitions` is the new count); returns
        those now owned. Leases never grow: a NATS stream is never resharded."""
        ...

    def close(self) -> None:
        """Releases every partition and role at once and stops renewing. Idempotent."""
        ...


def uses_leases(settings: "Settings") -> bool:
    """True when ownership is held by leases on NATS (the log is `nats://…`), visible to every machine."""
    return bool(settings.log and settings.log.startswith("nats://"))


def uses_kafka_groups(settings: "Settings") -> bool:
    """True when ownership is held by Kafka consumer groups (the log is `kafka://…`), visible to every machine."""
    return bool(settings.log and settings.log.lower().startswith("kafka://"))


def shared_across_machines(settings: "Settings") -> bool:
    """Whether ownership (partitions and roles) is kept on the log's cluster — NATS leases or Kafka consumer
    groups — so processes on any machine see it; else lock files in the data directory."""
    return uses_leases(settings) or uses_kafka_groups(settings)


def open_roles(settings: "Settings") -> Ownership:
    """An ownership holding no partition, only the roles it `claim`s (the maintenance lock of `optimize`, the KPI
    fold of `forget`): on the log's cluster when it is shared across machines, else lock files."""
    if uses_leases(settings):
        return LeaseOwnership(settings.log, pipeline=settings.pipeline, partitions=0,  # type: ignore[arg-type]
                              ttl_s=settings.lease_ttl_s)
    if uses_kafka_groups(settings):
        from gamestream.log.kafka_group import KafkaGroupOwnership

        return KafkaGroupOwnership(settings.log, pipeline=settings.pipeline, partitions=0,  # type: ignore[arg-type]
                                   session_timeout_s=settings.lease_ttl_s)
    return LocalOwnership(settings.data_dir / "log", 0, [])


def open_ownership(settings: "Settings", partitions: int, only: list[int] | None = None) -> Ownership:
    """The ownership a pipeline uses: leases on the NATS cluster that holds the log (`settings.log` is
    `nats://…`), the log's consumer groups on a Kafka log (`kafka://…`: `kafka_group.KafkaGroupOwnership`), else
    flocks under `<data_dir>/log`.

    With leases, a fixed `only` list is refused: a processor that takes partitions regardless of the shares would
    fight the others' balancing. Run more processors instead; they share the partitions by themselves."""
    if uses_leases(settings):
        if only is not None:
            raise OwnershipUnavailable("--only does not combine with a nats:// log: processors share the partitions by "
                             "leases; start more processors instead")
        return LeaseOwnership(settings.log, pipeline=settings.pipeline, partitions=partitions,
                              ttl_s=settings.lease_ttl_s)
    if uses_kafka_groups(settings):
        if only is not None:
            raise OwnershipUnavailable("--only does not combine with a kafka:// log: processors share the partitions "
                                       "through the consumer group; start more processors instead")
        from gamestream.log.kafka_group import GroupUnavailable, KafkaGroupOwnership

        try:
            return KafkaGroupOwnership(settings.log, pipeline=settings.pipeline,  # type: ignore[arg-type]
                                       partitions=partitions, session_timeout_s=settings.lease_ttl_s)
        except GroupUnavailable as error:
            raise OwnershipUnavailable(str(error)) from error
    return LocalOwnership(settings.data_dir / "log", partitions, only)


# ------------------------------------------------------------------------------------------------------ flock
class ProcessLocks:
    """flock()s on `<directory>/<name>.lock` files: released by the kernel when the process dies."""

    def __init__(self, directory: Path, names: list[str], what: Callable[[str], str]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._files = []
        try:
            for name in names:
                handle = open(directory / f"{name}.lock", "a+")
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    handle.seek(0)
                    holder = handle.read().strip() or "another process"
                    handle.close()
                    raise PartitionBusy(f"{what(name)} is being processed by {holder}") from None
                self._files.append(handle)
                try:  # who holds it, for the message above: a note, so a full disk must not stop the start
                    handle.truncate(0)
                    os.write(handle.fileno(), f"pid {os.getpid()}".encode())  # unbuffered: close cannot fail
                except OSError as error:
                    if not is_out_of_space(error):
                        raise
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        for handle in self._files:
            handle.close()
        self._files.clear()


class LocalOwnership:
    """A fixed set of partitions (all, or `only`), held by flocks in `directory` until `close` or process death.

    The set never changes, so nothing is ever surplus; a second process asking for a held partition gets
    `PartitionBusy` at construction, naming the holder's pid. Roles are flocks too (`kpi.lock`), tried again on
    every `claim`, so a second processor on the same data directory takes the KPI stage over when the first dies.
    """

    def __init__(self, directory: Path, partitions: int, only: list[int] | None = None) -> None:
        self.directory = directory
        self._partitions = partitions
        chosen = sorted(set(only) if only is not None else range(partitions))
        for partition in chosen:
            if not 0 <= partition < partitions:
                raise ValueError(f"partition {partition} is outside 0..{partitions - 1}")
        self._locks = [self._lock_partitions(chosen)]
        self._owned = {p: 1 for p in chosen}
        self._roles: dict[str, ProcessLocks] = {}
        self._every = only is None

    def _lock_partitions(self, partitions: list[int]) -> ProcessLocks:
        return ProcessLocks(self.directory, [f"processor-p{p}" for p in partitions],
                            lambda name: f"log partition {name.removeprefix('processor-p')}")

    def grow(self, partitions: int) -> list[int]:
        """Holding every partition (no `only`), takes those a log gained since (a resharded Kinesis stream has
        new shards); returns them."""
        if not self._every or partitions <= self._partitions:
            return []
        new = list(range(self._partitions, partitions))
        self._locks.append(self._lock_partitions(new))
        self._owned.update({p: 1 for p in new})
        self._partitions = partitions
        return new

    @property
    def partitions(self) -> int:
        return self._partitions

    def owned(self) -> dict[int, int]:
        return dict(self._owned)

    def owns(self, partition: int) -> bool:
        return partition in self._owned

    def surplus(self) -> frozenset[int]:
        return frozenset()

    def release(self, partitions: Iterable[int]) -> None:
        # The partitions' locks are one group: they are released together, by `close`. A processor that stops
        # releases everything anyway, which is the only time it calls this.
        for partition in list(partitions):
            self._owned.pop(partition, None)
        if not self._owned:
            for locks in self._locks:
                locks.release()

    def claim(self, role: str) -> bool:
        if role in self._roles:
            return True
        try:
            self._roles[role] = ProcessLocks(self.directory, [role],
                                             lambda _: "the KPI stage" if role == KPI_ROLE else f"role {role}")
        except PartitionBusy:
            return False
        return True

    def holds(self, role: str) -> bool:
        return role in self._roles

    def release_role(self, role: str) -> None:
        lock = self._roles.pop(role, None)
        if lock:
            lock.release()

    def close(self) -> None:
        self._owned.clear()
        for locks in self._locks:
            locks.release()
        for role in list(self._roles):
            self.release_role(role)


# ------------------------------------------------------------------------------------------------ NATS leases
def nats_servers(url: str) -> list[str]:
    """`nats://h1:p1,h2:p2[?…]` → `["nats://h1:p1", "nats://h2:p2"]` (the query names the log's stream)."""
    parts = urlsplit(url)
    if parts.scheme != "nats" or not parts.netloc:
        raise ValueError(f"not a NATS URL: {url!r} (expected nats://host:port[,host:port…])")
    return [f"nats://{server.strip()}" for server in parts.netloc.split(",") if server.strip()]


def bucket_name(pipeline: str) -> str:
    """The KV bucket of a pipeline's leases: one per pipeline, so two pipelines on one cluster never compete."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", pipeline) + "-ownership"


_WRONG_LAST_SEQUENCE = (10071, 10164)  # JetStream: Nats-Expected-Last-Subject-Sequence did not match
_MEMBERS = "members."
_PARTITIONS = "partitions."
_ROLES = "roles."


@dataclass
class _Lease:
    revision: int  # the stream sequence of our last write of the key: a renewal must name it
    deadline: float  # time.monotonic() after which we no longer count on it (the server drops it then or later)
    term: int  # changes each time the key is acquired anew


class LeaseOwnership:
    """Partitions and roles held as leases in the JetStream KV bucket `<pipeline>-ownership`.

    A lease is a key with a per-message TTL of `ttl_s` (whole seconds, at least 1):
    - acquire: `create` — JetStream refuses it while the key exists, so one holder at a time;
    - renew: a publish to `$KV.<bucket>.<key>` with `Nats-Expected-Last-Subject-Sequence` = our last revision
      and a fresh `Nats-TTL`: refused if anyone else wrote the key since, or if it expired meanwhile;
    - lapse: a holder that stops renewing (killed, paused, cut off) loses the key after the TTL, by the server;
    - release: a purge of the key's subject up to our revision — it frees the key at once, and cannot remove a
      newer holder's lease.

    Every `ttl_s / 3` a background thread (an asyncio loop with a NATS connection of its own, independent of the
    event log's backend) renews this member's key and its leases, then balances: with M live members (keys
    `members.<id>`, renewed like leases) each process takes free partitions up to its fair share ⌈partitions / M⌉
    and offers what it holds beyond it as `surplus`, which the processor releases after committing what it read.

    A member that joins and a member that releases leases publish a nudge (a plain NATS message on
    `gamestream.ownership.<bucket>.nudge`): every member runs its round at once instead of at its next interval,
    so partitions move within a commit of a processor joining or leaving, not seconds later. A nudge lost (a
    reconnection) only delays the move to the next round.

    A lease counts as held only until `deadline` = the time its last renewal was sent + TTL: the server's clock
    starts later than ours, so we give a partition up locally no later than the server frees it. A failed
    renewal (the key was taken over, or expired) loses it at once; a renewal that cannot reach the server keeps
    the lease only until its deadline.
    """

    def __init__(self, url: str, *, pipeline: str, partitions: int, ttl_s: float = 5.0,
                 connect_timeout_s: float = 10.0) -> None:
        self._servers = nats_servers(url)
        self._partitions = partitions
        self.bucket = bucket_name(pipeline)
        self.ttl = max(1, math.ceil(ttl_s))  # JetStream per-message TTLs are whole seconds
        self.interval = self.ttl / 3
        self.member = uuid.uuid4().hex
        self._identity = json.dumps({"member": self.member, "host": socket.gethostname(), "pid": os.getpid()}
                                    ).encode()
        self._held: dict[str, _Lease] = {}  # key → lease
        self._surplus: frozenset[int] = frozenset()
        self._terms = 0
        self._state = threading.Lock()
        self._closed = False
        self._warned = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="ownership", daemon=True)
        self._thread.start()
        try:
            self._call(asyncio.wait_for(self._start(), connect_timeout_s), timeout=connect_timeout_s + 5)
        except Exception as error:
            self._stop_loop()
            raise OwnershipUnavailable(f"cannot hold leases on NATS at {url}: {type(error).__name__} {error}"
                                       .rstrip()) from error
        except BaseException:
            self._stop_loop()
            raise
        self._rounds = self._call(self._spawn_rounds(), timeout=5)
        logger.info("leases started", extra={"bucket": self.bucket, "member": self.member, "ttl_s": self.ttl,
                                             "partitions": sorted(self.owned())})

    # ------------------------------------------------------------------------------------------ the protocol
    @property
    def partitions(self) -> int:
        return self._partitions

    def owned(self) -> dict[int, int]:
        now = time.monotonic()
        with self._state:
            return {int(key.removeprefix(_PARTITIONS)): lease.term for key, lease in self._held.items()
                    if key.startswith(_PARTITIONS) and now < lease.deadline}

    def owns(self, partition: int) -> bool:
        return self._valid(f"{_PARTITIONS}{partition}")

    def surplus(self) -> frozenset[int]:
        with self._state:
            return self._surplus

    def release(self, partitions: Iterable[int]) -> None:
        self._release_keys([f"{_PARTITIONS}{p}" for p in partitions])

    def claim(self, role: str) -> bool:
        if self._valid(_ROLES + role):
            return True
        if self._closed:
            return False
        try:
            return self._call(self._serialized(self._acquire(_ROLES + role)), timeout=self.ttl + 5)
        except Exception as error:  # unreachable cluster: not held, try again later
            self._warn("cannot reach NATS to claim a role", error)
            return False

    def holds(self, role: str) -> bool:
        return self._valid(_ROLES + role)

    def release_role(self, role: str) -> None:
        self._release_keys([_ROLES + role])

    def grow(self, partitions: int) -> list[int]:
        """Nothing: leases are kept on a NATS cluster, whose streams are never resharded (the count is fixed at
        creation)."""
        return []

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._call(self._serialized(self._cancel_rounds()), timeout=self.ttl + 5)
        except Exception:  # the loop is stuck: whatever a round held lapses after the TTL
            pass
        with self._state:
            keys = list(self._held)
        try:
            self._release_keys(keys)  # partitions and roles, then the membership: others rebalance at once
        finally:
            try:
                self._call(self._nc.close(), timeout=5)
            except Exception:
                pass
            self._stop_loop()
        logger.info("leases released", extra={"bucket": self.bucket, "member": self.member})

    # ---------------------------------------------------------------------------------------------- helpers
    def _valid(self, key: str) -> bool:
        with self._state:
            lease = self._held.get(key)
            return lease is not None and time.monotonic() < lease.deadline

    def _call(self, coroutine, timeout: float):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def _stop_loop(self) -> None:
        async def cancel_the_rest() -> None:  # so no task is destroyed while pending
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self._call(cancel_the_rest(), timeout=5)
        except Exception:
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def _subject(self, key: str) -> str:
        return f"$KV.{self.bucket}.{key}"

    def _release_keys(self, keys: list[str]) -> None:
        with self._state:
            # forgotten first: from here on we do not count on them, whatever the server answers
            leases = {key: self._held.pop(key) for key in keys if key in self._held}
            self._surplus = self._surplus - {int(k.removeprefix(_PARTITIONS)) for k in leases
                                             if k.startswith(_PARTITIONS)}
        if not leases:
            return
        try:
            self._call(self._serialized(self._purge(leases)), timeout=self.ttl + 5)
        except Exception as error:  # they lapse by themselves after the TTL
            self._warn("could not release leases; they lapse after the TTL", error)

    def _warn(self, message: str, error: BaseException) -> None:
        logger.warning(message, extra={"bucket": self.bucket, "error": f"{type(error).__name__}: {error}"})

    # ------------------------------------------------------------------------------------ on the NATS loop
    async def _serialized(self, coroutine):
        """One lease operation at a time on the loop: a renewal must not interleave with the release of the same
        key (the purge would name a revision the renewal just replaced, leaving the key held until the TTL)."""
        async with self._busy:
            return await coroutine

    async def _start(self) -> None:
        import nats
        import nats.errors
        import nats.js.errors
        import stamina
        from nats.js.api import KeyValueConfig

        async def quiet(error: Exception) -> None:  # reconnections are logged once per episode by the rounds
            logger.debug("NATS connection: %s", error)

        self._nc = await nats.connect(servers=self._servers, name=f"gamestream-ownership-{self.member[:8]}",
                                      connect_timeout=2, max_reconnect_attempts=-1, reconnect_time_wait=0.5,
                                      error_cb=quiet, disconnected_cb=None)
        self._js = self._nc.jetstream(timeout=max(1.0, self.interval))
        self._busy = asyncio.Lock()
        # allow_msg_ttl is set by nats-py on every bucket it creates; one replica per listed server, up to 3
        config = KeyValueConfig(bucket=self.bucket, history=1, replicas=min(3, len(self._servers)))

        def electing(error: Exception) -> bool:
            """A bucket just created (here or by a member starting at the same moment) answers nothing until
            its replicas have elected a leader: worth retrying, within the connect timeout."""
            if isinstance(error, nats.js.errors.APIError) and error.err_code == 10005:
                return True  # "no suitable peers for placement": a busy meta layer briefly misses a peer
            return isinstance(error, (nats.errors.TimeoutError, nats.errors.NoRespondersError,
                                      nats.js.errors.NoStreamResponseError, nats.js.errors.ServiceUnavailableError))

        async for attempt in stamina.retry_context(on=electing, attempts=None, timeout=None, wait_initial=0.05,
                                                   wait_max=0.5, wait_jitter=0.05):
            with attempt:
                try:
                    await self._js.create_key_value(config)
                except Exception as error:
                    if electing(error):
                        raise
                    await self._js.key_value(self.bucket)  # created by another member, maybe differently
                await self._acquire(_MEMBERS + self.member)
        self._nudged = asyncio.Event()
        await self._nc.subscribe(self._nudge_subject, cb=self._on_nudge)
        await self._round()
        await self._nudge()  # the members already there see this one now, not at their next round

    async def _acquire(self, key: str) -> bool:
        from nats.js.api import Header
        from nats.js.errors import APIError

        sent = time.monotonic()
        try:
            ack = await self._js.publish(self._subject(key), self._identity, msg_ttl=self.ttl,
                                         headers={Header.EXPECTED_LAST_SUBJECT_SEQUENCE: "0"})
        except APIError as error:
            if error.err_code in _WRONG_LAST_SEQUENCE:
                return False  # someone holds it
            raise
        with self._state:
            self._terms += 1
            self._held[key] = _Lease(ack.seq, sent + self.ttl, self._terms)
        if not key.startswith(_MEMBERS):
            logger.info("lease acquired", extra={"bucket": self.bucket, "key": key, "revision": ack.seq})
        return True

    async def _renew(self, key: str, lease: _Lease) -> None:
        from nats.js.api import Header
        from nats.js.errors import APIError

        with self._state:
            if self._held.get(key) is not lease:
                return  # released since the round looked: the release's purge follows this round
        if time.monotonic() >= lease.deadline:
            self._lose(key, lease, "lapsed: not renewed within the TTL")
            return
        sent = time.monotonic()
        try:
            ack = await self._js.publish(self._subject(key), self._identity, msg_ttl=self.ttl,
                                         headers={Header.EXPECTED_LAST_SUBJECT_SEQUENCE: str(lease.revision)})
        except APIError as error:
            if error.err_code in _WRONG_LAST_SEQUENCE:  # taken over, or expired on the server
                self._lose(key, lease, "renewal refused: taken over or expired")
                return
            raise
        with self._state:
            # the revision even of a lease released while this renewal was in flight: the release's purge, which
            # runs after this round, must name it, or the renewed key would stay held until the TTL
            lease.revision = ack.seq
            if self._held.get(key) is lease:
                lease.deadline = sent + self.ttl

    def _lose(self, key: str, lease: _Lease, why: str) -> None:
        with self._state:
            if self._held.get(key) is lease:
                del self._held[key]
        logger.warning("lease lost", extra={"bucket": self.bucket, "key": key, "reason": why})

    async def _purge(self, leases: dict[str, _Lease]) -> None:
        for key, lease in leases.items():
            # only our revision and older: a newer holder's write (after a lapse) survives
            await self._js.purge_stream(f"KV_{self.bucket}", subject=self._subject(key), seq=lease.revision + 1)
        await self._nudge()  # whoever is below its share takes them now

    async def _round(self) -> None:
        """Renew, look, acquire up to the fair share, mark the rest surplus."""
        with self._state:
            held = list(self._held.items())
        for key, lease in held:
            await self._renew(key, lease)
        if not self._valid(_MEMBERS + self.member):
            await self._acquire(_MEMBERS + self.member)  # lapsed while paused or cut off: join again
        info = await self._js.stream_info(f"KV_{self.bucket}", subjects_filter=f"$KV.{self.bucket}.>")
        keys = [subject.removeprefix(f"$KV.{self.bucket}.") for subject in (info.state.subjects or {})]
        members = max(1, sum(1 for key in keys if key.startswith(_MEMBERS)))
        taken = {int(key.removeprefix(_PARTITIONS)) for key in keys if key.startswith(_PARTITIONS)}
        share = math.ceil(self._partitions / members)
        mine = sorted(self.owned())
        # start the search at a random partition, so members joining together do not race for the same keys
        start = random.randrange(self._partitions) if self._partitions else 0
        for step in range(self._partitions):
            if len(mine) >= share:
                break
            partition = (start + step) % self._partitions
            if partition not in taken and await self._acquire(f"{_PARTITIONS}{partition}"):
                mine.append(partition)
        with self._state:
            self._surplus = frozenset(sorted(mine)[share:])

    @property
    def _nudge_subject(self) -> str:
        return f"gamestream.ownership.{self.bucket}.nudge"

    async def _on_nudge(self, _message) -> None:
        self._nudged.set()

    async def _nudge(self) -> None:
        """Tells every member to run its round now (a lease was released, or a member joined)."""
        try:
            await self._nc.publish(self._nudge_subject, b"")
            await self._nc.flush(timeout=1)  # out before a close that may follow at once
        except Exception as error:  # the next rounds balance all the same
            logger.debug("nudge not sent: %s", error)

    async def _spawn_rounds(self) -> asyncio.Task:
        return asyncio.get_running_loop().create_task(self._rounds_forever())

    async def _cancel_rounds(self) -> None:
        """Cancels the rounds between two of them (called holding the lock a round runs under): a round cancelled
        half-way could have taken a lease the server holds but this member no longer knows of, which would then
        stay taken until the TTL instead of being released by the close."""
        self._rounds.cancel()

    async def _rounds_forever(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._nudged.wait(), self.interval)
            except asyncio.TimeoutError:
                pass
            self._nudged.clear()
            try:
                await self._serialized(self._round())
                if self._warned:
                    logger.info("leases renewed again", extra={"bucket": self.bucket})
                self._warned = False
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the cluster is unreachable: leases lapse by their deadlines meanwhile
                if not self._warned:
                    self._warn("cannot renew leases; retrying", error)
                self._warned = True

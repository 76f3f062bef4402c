"""Ownership on a Kafka log (`kafka://…/TOPIC`): Kafka's own consumer-group protocol says which processor works on
which partition, and which one holds each singleton role — on any number of machines.

- **Partitions**: every processor of a pipeline is a member of the consumer group `<pipeline>.<topic>.processors`,
  subscribed to the log's topic with the `cooperative-sticky` assignor (KIP-429's incremental rebalancing). The
  group's assignment is the ownership: a partition assigned to this member is owned, with a term that changes
  each time it is assigned anew. The member never reads messages through the group (its partitions are paused
  the moment they are assigned): the processor reads through the log, from the Delta txn positions.
- **A rebalance that moves a partition away** (another processor joined) revokes it here first: the revoke
  callback offers it as `surplus` and waits (up to REVOKE_WAIT_SECONDS) for the processor to commit what it read
  and `release` it — so no commit for it is made after the revoke returns, unless the processor is stuck in a
  commit longer than that (then the Delta txn check fences it, as below).
- **A member that dies** (SIGKILL, a machine lost, a pause) is dropped by the group coordinator after
  `session.timeout.ms` (SESSION_TIMEOUT_SECONDS, at least the brokers' `group.min.session.timeout.ms`, 6 s by
  default); the survivors are assigned its partitions in the next rebalance.
- **A zombie** — a member paused past its session, that wakes up believing it still owns partitions — is the
  case the group cannot prevent. Locally: a partition counts as owned only while this member's group thread
  polled within the session timeout, and after a gap longer than that (the process was paused) nothing counts
  as owned until the group has answered again (a lost assignment, a new one). Globally: the Delta txn check in
  `lake.commit_exactly_once` refuses any offset the table already holds, whoever commits — the guarantee, as on
  every log.
- **Singleton roles** (`kpi`, `maintenance`): a role is a consumer group of its own, `<pipeline>.<topic>.<role>`,
  subscribed to the one-partition topic COORDINATION_TOPIC (created when absent; it never holds a message).
  `claim(role)` joins that group; the member assigned its partition 0 holds the role. When the holder leaves
  (`release_role`, `close`) the group hands the partition to another member at once; when it dies, after the
  session timeout. A process that never claims a role never joins its group, so a command that only wants the
  maintenance lock (`optimize`) does not take the KPI stage.

Why the classic protocol with cooperative-sticky and not KIP-848's `group.protocol=consumer` (which librdkafka
supports since 2.12 and Kafka 4.x serves): under KIP-848 the session timeout is the brokers' setting
(`group.consumer.session.timeout.ms`, 45 s by default and at least 45 s unless the operator lowers
`group.consumer.min.session.timeout.ms`), and librdkafka refuses a client's `session.timeout.ms`. A processor's
partitions would then wait 45 s to move after it dies on a stock cluster; with the classic protocol the client
asks for 6 s. Both keep a member's other partitions where they are during a rebalance.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import Callable, Iterable

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from gamestream.log.kafka import REQUEST_SECONDS, LogUrl, _with_logger, client_config

logger = logging.getLogger(__name__)

COORDINATION_TOPIC = "gamestream-coordination"
SESSION_TIMEOUT_SECONDS = 6.0  # Kafka brokers' default group.min.session.timeout.ms: the fastest failover allowed
REVOKE_WAIT_SECONDS = 30.0  # how long a revoke waits for the processor to commit and release (then it goes anyway)
JOIN_TIMEOUT_SECONDS = 30.0  # joining a group: brokers that answer assign within about a second
_POLL_SECONDS = 0.05


def processors_group(pipeline: str, topic: str) -> str:
    """The consumer group whose members share the log's partitions: one per pipeline and topic, so two pipelines
    (or one pipeline's name reused on another topic) never rebalance each other. Not the group `<pipeline>` the
    processor commits its positions to for lag tools (`KafkaEventLog.commit`): a group with active members
    refuses commits from outside it."""
    return f"{pipeline}.{topic}.processors"


def role_group(pipeline: str, topic: str, role: str) -> str:
    """The consumer group whose member assigned COORDINATION_TOPIC's partition 0 holds `role`."""
    return f"{pipeline}.{topic}.{role}"


class GroupUnavailable(RuntimeError):
    """The consumer group assigned nothing in time: brokers out of reach, or ACLs missing (the message says
    which); `ownership.open_ownership` raises it as `OwnershipUnavailable`."""


class _Member:
    """One consumer-group membership: the partitions the group assigned it (partition → term), kept up to date by
    the rebalance callbacks, which run in `poll` on the ownership's group thread."""

    def __init__(self, owner: "KafkaGroupOwnership", group: str, topic: str,
                 on_revoke: Callable[["_Member", list[int]], None] | None = None) -> None:
        self.owner, self.group, self.topic = owner, group, topic
        self.assigned: dict[int, int] = {}
        self.joined = threading.Event()  # the first assignment arrived (possibly empty)
        self.lock = threading.Lock()  # poll and close never run together on one consumer
        self.closed = False
        self.suspect_since: float | None = None  # a gap in polling: trust nothing until the group answers
        self._wait_on_revoke = on_revoke
        self.consumer = Consumer({**owner._config, "group.id": group,
                                  "partition.assignment.strategy": "cooperative-sticky",
                                  "session.timeout.ms": int(owner.session_timeout * 1000),
                                  "heartbeat.interval.ms": max(200, int(owner.session_timeout * 1000 / 6)),
                                  "enable.auto.commit": False, "enable.auto.offset.store": False,
                                  "auto.offset.reset": "latest", "client.id": owner.client_id})
        self.consumer.subscribe([topic], on_assign=self._assigned, on_revoke=self._revoked, on_lost=self._lost)

    def _assigned(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        consumer.incremental_assign(partitions)
        if partitions:
            consumer.pause(partitions)  # ownership only: the processor reads through the log
        numbers = sorted(tp.partition for tp in partitions)
        with self.owner._state:
            for partition in numbers:
                self.owner._terms += 1
                self.assigned[partition] = self.owner._terms
            self.suspect_since = None
        self.joined.set()
        if numbers:
            logger.info("partitions assigned", extra={"group": self.group, "partitions": numbers})

    def _revoked(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        numbers = sorted(tp.partition for tp in partitions)
        if self._wait_on_revoke is not None and numbers and not self.owner._closing:
            self._wait_on_revoke(self, numbers)
        with self.owner._state:
            for partition in numbers:
                self.assigned.pop(partition, None)
            self.suspect_since = None
        if numbers:
            logger.info("partitions revoked", extra={"group": self.group, "partitions": numbers})

    def _lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        numbers = sorted(tp.partition for tp in partitions)
        with self.owner._state:
            for partition in numbers:
                self.assigned.pop(partition, None)
            self.suspect_since = None
        logger.warning("partitions lost: this member's session expired", extra={"group": self.group,
                                                                               "partitions": numbers})

    def poll(self) -> None:
        with self.lock:
            if self.closed:
                return
            try:
                self.consumer.poll(_POLL_SECONDS)  # a message (before the pause took) is ignored
            except (KafkaException, RuntimeError) as error:
                logger.debug("group poll: %s", error, extra={"group": self.group})

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            try:
                self.consumer.close()  # leaves the group: its partitions move at once
            except (KafkaException, RuntimeError) as error:
                logger.debug("group close: %s", error, extra={"group": self.group})
        with self.owner._state:
            self.assigned.clear()


class KafkaGroupOwnership:
    """`Ownership` by Kafka consumer groups (see the module docstring).

    >>> ownership = KafkaGroupOwnership("kafka://127.0.0.1:9092/events", pipeline="gamestream", partitions=8)
    >>> ownership.owned()   # e.g. {0: 1, 1: 2, 2: 3, 3: 4} with another processor holding 4..7
    """

    def __init__(self, url: str, *, pipeline: str, partitions: int, session_timeout_s: float = SESSION_TIMEOUT_SECONDS,
                 join_timeout_s: float = JOIN_TIMEOUT_SECONDS) -> None:
        parsed = LogUrl.parse(url)
        self.topic = parsed.topic
        self.pipeline = pipeline
        self._partitions = partitions
        # at least the brokers' default group.min.session.timeout.ms: a shorter one is refused at join
        self.session_timeout = max(SESSION_TIMEOUT_SECONDS, float(session_timeout_s))
        self.join_timeout = join_timeout_s
        self._config = _with_logger(client_config(parsed.bootstrap))
        self.client_id = f"gamestream-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._state = threading.Lock()
        self._released = threading.Condition(self._state)
        self._terms = 0
        self._revoking: set[int] = set()  # revoked by a rebalance, waiting for the processor to release them
        self._given_up: set[int] = set()  # released while still assigned (the processor stopped)
        self._roles: dict[str, _Member] = {}
        self._announced: set[str] = set()  # roles whose taking was logged
        self._members: list[_Member] = []
        self._closing = False
        self._last_poll = time.monotonic()
        self._coordination_ready = False
        self._thread = threading.Thread(target=self._poll_forever, name="kafka-group", daemon=True)
        self._thread.start()
        self._partition_member: _Member | None = None
        if partitions > 0:
            member = _Member(self, processors_group(pipeline, self.topic), self.topic, on_revoke=self._hand_over)
            self._partition_member = member
            self._members.append(member)
            if not member.joined.wait(join_timeout_s):
                self.close()
                raise GroupUnavailable(f"the Kafka consumer group {member.group!r} assigned nothing within "
                                       f"{join_timeout_s:.0f} s (brokers at {parsed.bootstrap} unreachable, or "
                                       "no Read/Describe ACL on the group and the topic)")
        logger.info("consumer group joined", extra={"group": processors_group(pipeline, self.topic),
                                                   "client": self.client_id, "partitions": sorted(self.owned())})

    # ------------------------------------------------------------------------------------------ the protocol
    @property
    def partitions(self) -> int:
        return self._partitions

    def owned(self) -> dict[int, int]:
        member = self._partition_member
        if member is None:
            return {}
        with self._state:
            if not self._trusted(member):
                return {}
            return {p: term for p, term in member.assigned.items() if p not in self._given_up}

    def owns(self, partition: int) -> bool:
        return partition in self.owned()

    def surplus(self) -> frozenset[int]:
        with self._state:
            return frozenset(self._revoking)

    def release(self, partitions: Iterable[int]) -> None:
        """Revoked partitions: the revoke callback may return (the group moves them on). Others: no longer
        worked on here; they move when this member leaves the group (`close`)."""
        with self._state:
            for partition in partitions:
                if partition in self._revoking:
                    self._revoking.discard(partition)
                else:
                    self._given_up.add(partition)
            self._released.notify_all()

    def claim(self, role: str) -> bool:
        if self._closing:
            return False
        member = self._roles.get(role)
        if member is None:
            try:
                self._ensure_coordination_topic()
                member = _Member(self, role_group(self.pipeline, self.topic, role), COORDINATION_TOPIC)
            except KafkaException as error:
                logger.warning("cannot join the role's consumer group; trying again later",
                               extra={"role": role, "error": str(error)})
                return False
            self._roles[role] = member
            self._members.append(member)
            member.joined.wait(self.join_timeout)
        held = self.holds(role)
        if held and role not in self._announced:
            logger.info("role held", extra={"role": role, "group": member.group, "client": self.client_id})
            self._announced.add(role)
        return held

    def holds(self, role: str) -> bool:
        member = self._roles.get(role)
        if member is None:
            return False
        with self._state:
            return self._trusted(member) and 0 in member.assigned

    def release_role(self, role: str) -> None:
        member = self._roles.pop(role, None)
        self._announced.discard(role)
        if member is None:
            return
        if member in self._members:
            self._members.remove(member)
        member.close()

    def grow(self, partitions: int) -> list[int]:
        """Nothing: the group assigns every partition of the topic, whatever their number."""
        return []

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        with self._state:
            self._revoking.clear()
            self._released.notify_all()
        self._thread.join(timeout=REVOKE_WAIT_SECONDS + 5)
        for member in list(self._members):
            member.close()
        self._members.clear()
        self._roles.clear()
        logger.info("consumer groups left", extra={"client": self.client_id})

    # ---------------------------------------------------------------------------------------------- helpers
    def _trusted(self, member: _Member) -> bool:
        """Whether `member`'s assignment may be believed now: its group thread polled within the session timeout
        (it was not paused past its session), and no gap since has gone unanswered by the group."""
        return member.suspect_since is None and time.monotonic() - self._last_poll < self.session_timeout

    def _hand_over(self, member: _Member, partitions: list[int]) -> None:
        """The revoke of a rebalance: offers the partitions as surplus and waits until the processor committed
        what it read of them and released them (or REVOKE_WAIT_SECONDS passed, or this ownership closes)."""
        deadline = time.monotonic() + REVOKE_WAIT_SECONDS
        with self._state:
            mine = {p for p in partitions if p in member.assigned and p not in self._given_up}
            self._revoking |= mine
            while self._revoking & mine and not self._closing and time.monotonic() < deadline:
                self._released.wait(0.1)
                self._last_poll = time.monotonic()  # this thread is alive: the member's session is too
            late = self._revoking & mine
            self._revoking -= mine
            self._given_up -= set(partitions)
        if late:
            logger.warning("revoked partitions not released in time; handed over anyway (the Delta txn check "
                           "fences any later commit of them)", extra={"partitions": sorted(late)})

    def _ensure_coordination_topic(self) -> None:
        if self._coordination_ready:
            return
        admin = AdminClient({**self._config, "socket.connection.setup.timeout.ms": 5000})
        metadata = admin.list_topics(timeout=REQUEST_SECONDS)
        if COORDINATION_TOPIC not in metadata.topics or metadata.topics[COORDINATION_TOPIC].error is not None:
            replicas = max(1, min(3, len(metadata.brokers)))
            futures = admin.create_topics([NewTopic(COORDINATION_TOPIC, num_partitions=1,
                                                    replication_factor=replicas)], request_timeout=REQUEST_SECONDS)
            try:
                futures[COORDINATION_TOPIC].result()
            except KafkaException as error:
                if error.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
        self._coordination_ready = True

    def _poll_forever(self) -> None:
        """The group thread: serves every membership's heartbeats and rebalance callbacks; notices a gap (the
        process was paused, or starved) longer than the session timeout, after which nothing counts as owned
        until the group answers — or, if no answer comes within two session timeouts (the session survived),
        the partitions count again with new terms (the processor re-reads their positions)."""
        while not self._closing:
            now = time.monotonic()
            if now - self._last_poll > self.session_timeout:
                with self._state:
                    for member in self._members:
                        member.suspect_since = now
                logger.warning("the group thread did not run for %.1f s (paused?): no partition or role counts "
                               "until the group answers", now - self._last_poll)
            self._last_poll = now
            self._settle_suspicions(now)
            for member in list(self._members):
                member.poll()
            if not self._members:
                time.sleep(_POLL_SECONDS)

    def _settle_suspicions(self, now: float) -> None:
        with self._state:
            for member in self._members:
                if member.suspect_since is not None and now - member.suspect_since > 2 * self.session_timeout:
                    for partition in member.assigned:
                        self._terms += 1
                        member.assigned[partition] = self._terms
                    member.suspect_since = None

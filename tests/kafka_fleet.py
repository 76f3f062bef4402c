"""fleet.Fleet on a Kafka log, for fault tests: a 3-broker KRaft cluster (replication factor 3,
min.insync.replicas 2), collectors and processors as real processes on `--log kafka://…/TOPIC`, and the same
client (`SteadyLoad`: Idempotency-Keys, retries, failover between collectors) and the same verdict
(`assert_exactly_once`).

What differs from NATS is who owns a partition: Kafka's consumer-group protocol
(`gamestream.log.kafka_group`), not leases. Its evidence is the group coordinator's assignment, read through
`gamestream.demo.leases.GroupView` — in a child process, because librdkafka's admin client can abort the process
that asks when the group's coordinator broker dies during the request (a broker-kill test must survive that).

    with kafka_cluster(tmp_path / "kafka") as cluster:
        fleet = KafkaFleet(tmp_path, cluster).start()        # a fresh topic and pipeline on a running cluster
        fleet.assignment()                                   # {processor index: partitions}, the group's word
        fleet.cluster.kill(fleet.cluster.leader_index(fleet.topic, 0))
        fleet.stop()                                          # the children; the cluster is the caller's
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fleet import Child, SteadyLoad, assert_exactly_once, wait_for_kpi_events, wait_for_table
from gamestream.demo.leases import GroupView
from gamestream.log.kafka import KafkaEventLog
from kafka_cluster import KafkaCluster

__all__ = ["KafkaFleet", "SteadyLoad", "assert_exactly_once", "quarantined_event_ids", "wait_for_kpi_events",
           "wait_for_log_since", "wait_for_table"]

Assignment = dict[int, set[int]]  # processor index → the partitions the group coordinator assigned it


@dataclass
class KafkaFleet:
    """`collectors` collectors and `processors` processors on one data directory and one fresh topic of
    `cluster` (`partitions` partitions, created up front), under a pipeline name of their own so their consumer
    groups meet nobody else's. `start` returns once every collector listens and the group has given every
    processor a share of the partitions."""

    root: Path
    cluster: KafkaCluster
    collectors: int = 2
    processors: int = 2
    partitions: int = 4
    topic: str = field(default_factory=lambda: "faults" + uuid.uuid4().hex[:8])
    pipeline: str = field(default_factory=lambda: "p" + uuid.uuid4().hex[:8])
    collector_children: list[Child] = field(default_factory=list)
    processor_children: list[Child] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.data_dir = self.root / "data"
        self.env = {"GAMESTREAM_PIPELINE": self.pipeline, "GAMESTREAM_BATCH_MAX_WAIT_S": "0.2"}
        self._view: GroupView | None = None

    @property
    def url(self) -> str:
        return f"kafka://{self.cluster.bootstrap}/{self.topic}"

    def start(self, timeout: float = 120) -> "KafkaFleet":
        KafkaEventLog.connect(self.url, partitions=self.partitions).close()  # replicated 3×, min ISR 2
        # every child started before any is waited for: each pays a Python start on busy cores
        self.collector_children = [self._child(f"collector{i}", "serve", "--port", "0") for i in range(self.collectors)]
        self.processor_children = [self._child(f"processor{i}", "process") for i in range(self.processors)]
        for child in self.collector_children:
            child.url = child.wait_for(r"listening on (http://[\d.]+:\d+)", timeout=timeout)[1]
        for child in self.processor_children:
            child.wait_for(r'"processor started"', timeout=timeout)
        self._view = GroupView(self.url, pipeline=self.pipeline, partitions=self.partitions)
        self.wait_for_assignment(self.shared_by_all, "every processor is assigned some partitions, together all",
                                 timeout=timeout)
        return self

    def _child(self, name: str, command: str, *extra: str) -> Child:
        return Child(name, [command, "--log", self.url, "--data-dir", str(self.data_dir), *extra],
                     self.root / f"{name}.log", self.env).start()

    def urls(self) -> list[str]:
        return [c.url for c in self.collector_children if c.url]

    def stop(self) -> None:
        """Stops every child at once (a processor's clean stop leaves its groups, which takes a moment each) and
        the group view; never the cluster."""
        stopping = [threading.Thread(target=child.stop) for child in self.collector_children + self.processor_children]
        for thread in stopping:
            thread.start()
        for thread in stopping:
            thread.join()
        if self._view is not None:
            asyncio.run(self._view.close())
            self._view = None

    # ------------------------------------------------------------------------------- the group's assignment
    def assignment(self) -> Assignment | None:
        """Processor index → the partitions the group coordinator assigns it now (a member's pid is in its client
        id); None while the group rebalances or no broker answers. Only processors this fleet started count: a
        partition held by no member, or by an unknown pid, is in nobody's set."""
        assert self._view is not None, "start() the fleet first"
        holders = asyncio.run(self._view.holders())
        if holders is None:
            return None
        by_pid = {child.pid: index for index, child in enumerate(self.processor_children)}
        found: Assignment = {index: set() for index in range(len(self.processor_children))}
        for partition, pid in holders.items():
            if pid in by_pid:
                found[by_pid[pid]].add(partition)
        return found

    def shared_by_all(self, assignment: Assignment) -> bool:
        """Every partition assigned, and every live processor holding at least one."""
        live = [i for i, child in enumerate(self.processor_children) if child.alive()]
        return (all(assignment[i] for i in live)
                and set().union(*assignment.values()) == set(range(self.partitions)))

    def wait_for_assignment(self, check: Callable[[Assignment], bool], what: str, timeout: float = 60) -> Assignment:
        """The group's assignment once `check` holds for it; AssertionError with the last one seen otherwise."""
        deadline = time.monotonic() + timeout
        last: Assignment | None = None
        while time.monotonic() < deadline:
            seen = self.assignment()
            if seen is not None:
                last = seen
                if check(seen):
                    return seen
            time.sleep(0.25)
        raise AssertionError(f"not within {timeout:.0f}s: {what}; the group's last stable assignment: {last}; "
                             f"the processors' last lines: " + " | ".join(
                                 f"{c.name}: {c.text()[-600:]}" for c in self.processor_children))

    # ---------------------------------------------------------------------------------- the topic's replicas
    def leader(self, partition: int = 0) -> int:
        """The node id of the broker leading `partition` of the fleet's topic."""
        leader, _, _ = self.cluster.partition_state(self.topic, partition)
        assert leader >= 0, f"{self.topic}-{partition} has no leader"
        return leader

    def wait_all_in_sync(self, timeout: float = 90) -> None:
        """Until every partition of the topic has all three brokers as in-sync replicas."""
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            try:
                last = [self.cluster.partition_state(self.topic, p) for p in range(self.partitions)]
                if all(len(isr) == 3 for _, _, isr in last):  # type: ignore[misc]
                    return
            except Exception as error:  # a broker starting: ask again
                last = error
            time.sleep(0.5)
        raise AssertionError(f"{self.topic}: replicas not all in sync within {timeout:.0f}s (last seen: {last})")


def log_since(child: Child, mark: int) -> str:
    """What `child` logged after its log was `mark` characters long."""
    return child.text()[mark:]


def wait_for_log_since(child: Child, mark: int, pattern: str, timeout: float = 60) -> re.Match:
    """The first match of `pattern` in what `child` logged after `mark` characters (a fault's consequence, not
    something it said before the fault)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(pattern, log_since(child, mark))
        if match:
            return match
        time.sleep(0.2)
    raise AssertionError(f"{child.name}: no {pattern!r} within {timeout:.0f}s after the fault:\n"
                         f"{log_since(child, mark)[-3000:]}")


def quarantined_event_ids(data_dir: Path) -> list[str]:
    """The eventIds of the rows in `events_quarantine` (none when the table was never made). A retry's copy
    belongs there only when it differs from the event that landed; it must never hold an event no client sent."""
    from deltalake import DeltaTable

    uri = str(data_dir / "tables" / "events_quarantine")
    if not DeltaTable.is_deltatable(uri):
        return []
    payloads = DeltaTable(uri).to_pyarrow_table(columns=["payload"]).column("payload").to_pylist()
    found = []
    for payload in payloads:
        try:
            found.append(json.loads(payload).get("eventId"))
        except (ValueError, AttributeError):
            found.append(f"(not an event: {payload[:80]!r})")
    return found

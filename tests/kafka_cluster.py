"""A real 3-broker Apache Kafka cluster (KRaft) for the tests: `gamestream.demo.kafka_cluster.KafkaCluster` (what
scripts/kafka-cluster and `demo --cluster --log kafka` start), with what fault tests ask of it — who leads a partition, which replicas are in sync.

    with kafka_cluster(tmp_path) as cluster:
        log = KafkaEventLog.connect(f"kafka://{cluster.bootstrap}/events", partitions=4)
        cluster.kill(cluster.leader_index("events", 0))     # SIGKILL the partition leader's JVM
        cluster.pause(1); cluster.resume(1)                  # SIGSTOP / SIGCONT
        cluster.restart(0)                                   # back on its port, with its data

The broker jars are fetched once into ~/.cache/gamestream/kafka-4.4.0 (scripts/setup-test-env does it ahead).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

from gamestream.demo import kafka_cluster as base
from gamestream.demo.kafka_cluster import fetch

__all__ = ["KafkaCluster", "fetch", "kafka_cluster"]


class KafkaCluster(base.KafkaCluster):
    """The script's cluster, plus the cluster's view of a topic through an admin client."""

    def admin(self):
        from confluent_kafka.admin import AdminClient

        running = ",".join(b.address for b in self.members if b.running)
        return AdminClient({"bootstrap.servers": running or self.bootstrap, "socket.connection.setup.timeout.ms": 3000})

    def partition_state(self, topic: str, partition: int, timeout: float = 5.0) -> tuple[int, list[int], list[int]]:
        """(leader node id, replicas, in-sync replicas) of a partition, as the cluster's metadata says; leader -1
        while none is elected."""
        metadata = self.admin().list_topics(topic, timeout=timeout)
        state = metadata.topics[topic].partitions[partition]
        return state.leader, list(state.replicas), list(state.isrs)

    def index_of(self, node_id: int) -> int:
        return next(i for i, broker in enumerate(self.members) if broker.node_id == node_id)

    def leader_index(self, topic: str, partition: int) -> int:
        leader, _, _ = self.partition_state(topic, partition)
        assert leader >= 0, f"{topic}-{partition} has no leader"
        return self.index_of(leader)

    def wait_for_leader(self, topic: str, partition: int, not_on: int | None = None, timeout: float = 30) -> int:
        """The node id leading the partition once it is a running broker other than `not_on` (a node id)."""
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            try:
                leader, _, _ = last = self.partition_state(topic, partition)
                if leader >= 0 and leader != not_on and self.members[self.index_of(leader)].running:
                    return leader
            except Exception as error:  # a broker being elected or unreachable: ask again
                last = error
            time.sleep(0.2)
        raise TimeoutError(f"{topic}-{partition}: no new leader within {timeout:.0f} s (last seen: {last})")


@contextlib.contextmanager
def kafka_cluster(directory: Path, brokers: int = 3) -> Iterator[KafkaCluster]:
    """Starts `brokers` brokers with their data under `directory`; stops every one of them at the end."""
    cluster = KafkaCluster(Path(directory), brokers=brokers)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()

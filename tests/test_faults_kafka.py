"""The fault tests of test_faults_nats.py on a Kafka log: a 3-broker KRaft cluster (replication factor 3,
min.insync.replicas 2), two collectors and two processors as real processes on `--log kafka://…`, a steady load
posted through both collectors with Idempotency-Keys and retries. Each test injects one fault, asserts that it
really happened (a partition leader moved, the group's assignment changed, a collector died), then that every
acknowledged event is in the Delta table exactly once and nothing else is.

On Kafka an Idempotency-Key is honoured within one collector process only: a retry that reaches the other
collector appends the batch again, and the processors' deduplication by eventId keeps the copy out of the table.
One cluster serves the whole module (three JVMs take a while to start); each test has a topic and pipeline of its
own, and the broker test restarts the broker it killed."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from kafka_cluster import KafkaCluster, kafka_cluster
from kafka_fleet import (KafkaFleet, SteadyLoad, assert_exactly_once, quarantined_event_ids, wait_for_kpi_events,
                         wait_for_log_since, wait_for_table)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    with kafka_cluster(tmp_path_factory.mktemp("kafka")) as started:
        yield started


@pytest.fixture
def fleet(cluster: KafkaCluster, tmp_path: Path):
    fleet = KafkaFleet(tmp_path, cluster)
    try:
        yield fleet.start()
    finally:
        fleet.stop()  # also when start() failed half-way: no gamestream process left behind
        for index, broker in enumerate(cluster.members):  # a test that failed mid-fault: the next gets 3 brokers
            if not broker.running:
                cluster.restart(index)


def finish(fleet: KafkaFleet, load: SteadyLoad) -> None:
    load.stop()
    assert load.batches_acked >= 10, f"too little load to prove anything: {load.batches_acked} batches"
    table_ids = wait_for_table(fleet.data_dir, len(load.acked))
    assert_exactly_once(table_ids, load.acked)
    # a batch appended twice (a retry through the other collector) is dropped as a copy, never quarantined
    quarantined = quarantined_event_ids(fleet.data_dir)
    assert quarantined == [], f"quarantined: {quarantined[:5]}"
    assert wait_for_kpi_events(fleet.data_dir, len(load.acked)) == len(load.acked)


def test_sigkill_of_the_partition_leader_broker_loses_and_duplicates_nothing(fleet: KafkaFleet) -> None:
    load = SteadyLoad(fleet.urls()).start()
    load.wait_batches(20)
    leader = fleet.leader(0)
    victim = fleet.cluster.index_of(leader)
    fleet.cluster.kill(victim)
    assert not fleet.cluster.members[victim].running  # the leader's JVM is gone
    moved_to = fleet.cluster.wait_for_leader(fleet.topic, 0, not_on=leader, timeout=60)
    assert moved_to != leader  # another in-sync replica took the partition over
    load.wait_batches(20, timeout=90)  # the load goes on through the election, on two brokers
    fleet.cluster.restart(victim)  # …and the killed broker comes back with its data and catches up
    fleet.wait_all_in_sync()
    assert fleet.cluster.members[victim].node_id in fleet.cluster.partition_state(fleet.topic, 0)[2]
    load.wait_batches(20)
    finish(fleet, load)


def test_sigkill_of_a_processor_moves_its_partitions_and_loses_nothing(fleet: KafkaFleet) -> None:
    load = SteadyLoad(fleet.urls()).start()
    load.wait_batches(20)
    before = fleet.wait_for_assignment(fleet.shared_by_all, "both processors hold partitions")
    victim, survivor = 0, 1
    fleet.processor_children[victim].kill()  # SIGKILL: it never leaves the group, its session must expire
    assert not fleet.processor_children[victim].alive()
    fleet.wait_for_assignment(lambda a: a[survivor] == set(range(fleet.partitions)) and not a[victim],
                              f"the survivor is assigned the killed processor's partitions {sorted(before[victim])}")
    load.wait_batches(20)
    finish(fleet, load)


def test_a_processor_paused_past_its_session_writes_no_duplicate_when_it_resumes(fleet: KafkaFleet) -> None:
    load = SteadyLoad(fleet.urls()).start()
    load.wait_batches(20)
    before = fleet.wait_for_assignment(fleet.shared_by_all, "both processors hold partitions")
    paused, other = fleet.processor_children
    mark = len(paused.text())
    paused.signal(signal.SIGSTOP)
    try:
        # past its 6 s session the group drops it and gives the other all of its partitions
        fleet.wait_for_assignment(lambda a: a[1] == set(range(fleet.partitions)) and not a[0],
                                  f"the paused processor's partitions {sorted(before[0])} move to the other")
        load.wait_batches(10)  # …which commits them while the paused one still holds what it had read
    finally:
        paused.signal(signal.SIGCONT)
    # resumed, it learns it lost its partitions (or notices the gap and trusts none of them) before its
    # next commit; whatever it read is fenced by the Delta txn check
    wait_for_log_since(paused, mark, r"partitions lost|did not run for", timeout=30)
    wait_for_log_since(paused, mark, r'"partitions released"', timeout=30)  # its reads dropped, not committed
    assert paused.alive()
    fleet.wait_for_assignment(lambda a: bool(a[0]) and bool(a[1]), "the resumed processor rejoins and gets a share")
    load.wait_batches(20)
    finish(fleet, load)


def test_sigkill_of_a_collector_under_load_loses_and_duplicates_nothing(fleet: KafkaFleet) -> None:
    load = SteadyLoad(fleet.urls()).start()
    load.wait_batches(20)
    victim = fleet.collector_children[0]
    victim.kill()
    assert not victim.alive()
    acked_at_kill = load.batches_acked
    load.wait_batches(20)  # the client fails over to the other collector, with the same keys
    assert any(url == victim.url for url, _ in load.failures), "no request ever failed on the killed collector"
    assert load.batches_acked >= acked_at_kill + 20
    finish(fleet, load)


"""Jepsen-style faults against the scaled-out pipeline: a 3-node NATS cluster (replicas 3, sync always), two
collectors and two processors as real processes, a steady load posted through both collectors with
Idempotency-Keys and retries. Each test injects one fault, asserts that it really happened, then that every
acknowledged event is in the Delta table exactly once and nothing else is."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from fleet import (Fleet, SteadyLoad, assert_exactly_once, leases_acquired, leases_held, leases_lost,
                   wait_for_kpi_events, wait_for_table)

pytestmark = pytest.mark.slow


@pytest.fixture
def fleet(tmp_path: Path, request: pytest.FixtureRequest):
    isolated = bool(getattr(request, "param", False))
    if isolated and os.geteuid() != 0:
        pytest.skip("network namespaces need root (CI runs as root)")
    fleet = Fleet(tmp_path, isolated=isolated)
    try:
        yield fleet.start()
    finally:
        fleet.stop()  # also when start() failed half-way: no nats-server or gamestream process left behind


def wait_until_sole_owner(fleet: Fleet, child, *, moved_since: float, timeout: float = 30) -> None:
    """Until `child` holds every partition's lease, having acquired at least one since `moved_since` (the
    fault): ownership really moved to it."""
    every = {f"partitions.{p}" for p in range(fleet.partitions)}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if every <= leases_held(child) and leases_acquired(child, since=moved_since) & every:
            return
        time.sleep(0.2)
    raise AssertionError(f"{child.name} holds {sorted(leases_held(child))} and acquired "
                         f"{sorted(leases_acquired(child, since=moved_since))} since the fault; expected all of "
                         f"{sorted(every)}")


def finish(fleet: Fleet, load: SteadyLoad) -> None:
    load.stop()
    assert load.batches_acked >= 10, f"too little load to prove anything: {load.batches_acked} batches"
    table_ids = wait_for_table(fleet.data_dir, len(load.acked))
    assert_exactly_once(table_ids, load.acked)
    assert wait_for_kpi_events(fleet.data_dir, len(load.acked)) == len(load.acked)


def current_leader(fleet: Fleet) -> str:
    leader = fleet.cluster.stream_leader("gamestream")
    assert leader is not None, "the stream has no leader"
    return leader


def wait_for_new_leader(fleet: Fleet, old: str, why: str, timeout: float = 60) -> None:
    """Until the nodes still reachable report a stream leader other than `old` (the fault really moved it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fleet.cluster.stream_leader("gamestream") not in (None, old):
            return
        time.sleep(0.2)
    logs = {node.name: (node.directory / "nats.log").read_text(errors="replace").splitlines()[-12:]
            for node in fleet.cluster.members}
    raise AssertionError(f"{why} within {timeout}s; the nodes' views: {fleet.cluster.stream_views('gamestream')}; "
                         f"their logs' last lines: {logs}")


def wait_for_current_followers(fleet: Fleet, leader: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        view = fleet.cluster.stream_views("gamestream").get(leader)
        if isinstance(view, dict) and view.get("leader") == leader and len(view.get("replicas") or []) == 2 and all(
                replica.get("current") for replica in view["replicas"]):
            return  # R3: the leader and two current followers, a majority without the leader
        time.sleep(0.2)
    raise AssertionError(f"the followers of {leader} never caught up: {fleet.cluster.stream_views('gamestream')}")


def test_sigkill_of_the_stream_leader_loses_and_duplicates_nothing(fleet: Fleet) -> None:
    load = SteadyLoad(fleet.urls()).start()
    load.wait_batches(20)
    leader = current_leader(fleet)
    victim = fleet.cluster.index_of(leader)
    fleet.cluster.kill(victim)
    wait_for_new_leader(fleet, leader, "the stream leader did not change after its node was killed")
    load.wait_batches(20, timeout=60)  # the load goes on through the election
    fleet.cluster.restart(victim)  # …and the old leader comes back and catches up
    load.wait_batches(20)
    finish(fleet, load)


def test_sigkill_of_a_processor_moves_its_partitions_and_loses_nothing(fleet: Fleet) -> None:
    load = SteadyLoad(fleet.urls()).start()
    load.wait_batches(20)
    index, _ = fleet.processor_owning_partitions()
    survivor = fleet.processor_children[1 - index]
    killed_at = time.time()
    fleet.processor_children[index].kill()
    wait_until_sole_owner(fleet, survivor, moved_since=killed_at)
    load.wait_batches(20)
    finish(fleet, load)


def test_a_processor_paused_past_its_lease_writes_no_duplicate_when_it_resumes(fleet: Fleet) -> None:
    load = SteadyLoad(fleet.urls()).start()
    load.wait_batches(20)
    index, _ = fleet.processor_owning_partitions()
    paused, other = fleet.processor_children[index], fleet.processor_children[1 - index]
    paused_at = time.time()
    paused.signal(signal.SIGSTOP)
    try:
        wait_until_sole_owner(fleet, other, moved_since=paused_at)
        load.wait_batches(10)
    finally:
        paused.signal(signal.SIGCONT)
    # resumed, it finds its leases gone; whatever it had read is fenced by the Delta txn check
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not leases_lost(paused, since=paused_at):
        time.sleep(0.2)
    assert leases_lost(paused, since=paused_at), "the resumed processor never noticed it lost its leases"
    assert paused.alive()
    load.wait_batches(20)
    finish(fleet, load)


def test_sigkill_of_a_collector_under_load_loses_and_duplicates_nothing(fleet: Fleet) -> None:
    load = SteadyLoad(fleet.urls()).start()
    load.wait_batches(20)
    victim = fleet.collector_children[0]
    victim.kill()
    load.wait_batches(20)  # the client fails over to the other collector, with the same keys
    assert any(url == victim.url for url, _ in load.failures), "no request ever failed on the killed collector"
    finish(fleet, load)


@pytest.mark.parametrize("fleet", [True], indirect=True, ids=["isolated"])
def test_a_network_partition_isolating_the_stream_leader_loses_and_duplicates_nothing(fleet: Fleet) -> None:
    load = SteadyLoad(fleet.urls()).start()
    load.wait_batches(20)
    leader = current_leader(fleet)
    victim = fleet.cluster.index_of(leader)
    # A follower still catching up may not become leader (nats-server refuses it, rightly): cut the leader off
    # while both followers are current, so the majority can and must elect.
    wait_for_current_followers(fleet, leader)
    fleet.cluster.partition(victim)
    try:
        wait_for_new_leader(fleet, leader, "the majority side did not elect a new stream leader")
        load.wait_batches(20, timeout=90)  # the majority keeps taking writes
    finally:
        fleet.cluster.heal(victim)
    load.wait_batches(20, timeout=90)
    finish(fleet, load)

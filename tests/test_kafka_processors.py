"""Processors on a Kafka log, against a real 3-broker Apache Kafka cluster (scripts/kafka-cluster): partitions
shared by Kafka's consumer-group protocol (`gamestream.log.kafka_group`), revokes handed over after a commit, the
Delta txn check as the fence against a zombie, the singleton roles held through a group of their own, a processor
SIGKILLed under load; and topics another producer writes (`gamestream.log.kafka_foreign`)."""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Callable

import pytest
from confluent_kafka import KafkaError
from deltalake import DeltaTable

from conftest import gamestream, table_rows
from gamestream.log import Append, partition_for
from gamestream.log.kafka import KafkaEventLog
from gamestream.log.kafka_group import KafkaGroupOwnership, processors_group, role_group
from gamestream.log.ownership import KPI_ROLE, MAINTENANCE_ROLE, LocalOwnership, OwnershipUnavailable, open_ownership
from gamestream.process.processor import Processor
from gamestream.settings import Settings
from kafka_cluster import KafkaCluster, kafka_cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    with kafka_cluster(tmp_path_factory.mktemp("kafka")) as started:
        yield started


def fresh(prefix: str = "t") -> str:
    return prefix + uuid.uuid4().hex[:10]


def eventually(check: Callable[[], bool], within: float, what: str) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > within:
            raise AssertionError(f"not within {within}s: {what}")
        time.sleep(0.1)
    return time.monotonic() - started


def event(i: int, device: str | None = None, **extra) -> dict:
    return {"eventId": f"e{i}", "eventName": "levelStart", "eventTime": "2026-12-01T10:00:00Z",
            "eventParams": {"device_id": device or f"d{i % 97}"}, **extra}


def append_events(log: KafkaEventLog, events: list[dict], per_record: int = 50) -> None:
    by_partition: dict[int, list[dict]] = {}
    for e in events:
        by_partition.setdefault(partition_for(e["eventParams"]["device_id"], log.partitions), []).append(e)
    appends = [Append(p, "\n".join(json.dumps(e) for e in chunk[i:i + per_record]).encode(),
                      len(chunk[i:i + per_record]))
               for p, chunk in by_partition.items() for i in range(0, len(chunk), per_record)]
    log.append(appends)


def group_assignment(cluster: KafkaCluster, group: str) -> dict[str, set[int]]:
    """client.id → partitions, as the group coordinator says (not as any member believes)."""
    from confluent_kafka import KafkaException

    admin = cluster.admin()
    try:
        (description,) = [future.result() for future in admin.describe_consumer_groups([group],
                                                                                      request_timeout=10).values()]
    except KafkaException as error:  # a group's coordinator still loading, or moving: ask again
        if error.args[0].code() not in (KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
                                        KafkaError.COORDINATOR_NOT_AVAILABLE, KafkaError.GROUP_ID_NOT_FOUND):
            raise
        return {}
    return {member.client_id: {tp.partition for tp in member.assignment.topic_partitions}
            for member in description.members}


def held_by_pid(assignment: dict[str, set[int]], pid: int) -> set[int]:
    return {p for client, parts in assignment.items() if f"-{pid}-" in client for p in parts}


# ---------------------------------------------------------------------------------------- ownership by groups
def test_processors_share_the_partitions_through_the_group_and_hand_revoked_ones_over(cluster: KafkaCluster) -> None:
    topic, pipeline = fresh(), fresh("p")
    url = f"kafka://{cluster.bootstrap}/{topic}"
    KafkaEventLog.connect(url, partitions=6).close()
    first = KafkaGroupOwnership(url, pipeline=pipeline, partitions=6)
    second = None
    try:
        assert sorted(first.owned()) == list(range(6))  # alone: every partition, from the constructor on
        made: list[KafkaGroupOwnership] = []
        joined = threading.Thread(target=lambda: made.append(KafkaGroupOwnership(url, pipeline=pipeline,
                                                                                 partitions=6)))
        joined.start()
        # the join revokes some of the first member's partitions: offered as surplus until released
        eventually(lambda: first.surplus() != frozenset(), within=20, what="a revoke reaches the first member")
        revoked = first.surplus()
        assert revoked <= set(first.owned())  # still owned until the processor released them
        first.release(revoked)
        joined.join(timeout=30)
        (second,) = made
        eventually(lambda: len(second.owned()) == 3 and len(first.owned()) == 3, within=20,
                   what="each member owns three partitions")
        assert not set(first.owned()) & set(second.owned())
        assert set(first.owned()) | set(second.owned()) == set(range(6))
        assert set(second.owned()) == set(revoked)  # the group moved exactly what was handed over
        assert sorted(p for parts in group_assignment(cluster, processors_group(pipeline, topic)).values()
                      for p in parts) == list(range(6))

        second.close()  # leaves the group: its partitions come back without waiting for a session timeout
        took = eventually(lambda: sorted(first.owned()) == list(range(6)), within=15,
                          what="the remaining member takes every partition back")
        assert took < 6.0
    finally:
        first.close()
        if second is not None:
            second.close()


def test_a_role_has_one_holder_in_its_group_and_moves_when_released(cluster: KafkaCluster) -> None:
    topic, pipeline = fresh(), fresh("p")
    url = f"kafka://{cluster.bootstrap}/{topic}"
    KafkaEventLog.connect(url, partitions=2).close()
    first = KafkaGroupOwnership(url, pipeline=pipeline, partitions=0)  # roles only (what `optimize` opens)
    second = KafkaGroupOwnership(url, pipeline=pipeline, partitions=0)
    try:
        assert first.owned() == {} and first.claim(KPI_ROLE)
        assert not second.claim(KPI_ROLE)
        assert second.claim(MAINTENANCE_ROLE)  # another role, another group: held independently
        time.sleep(8)  # past the session timeout: heartbeats keep it
        assert first.holds(KPI_ROLE) and not second.claim(KPI_ROLE)
        assert list(group_assignment(cluster, role_group(pipeline, topic, KPI_ROLE)).values()).count({0}) == 1
        first.release_role(KPI_ROLE)
        assert not first.holds(KPI_ROLE)
        took = eventually(lambda: second.claim(KPI_ROLE), within=15, what="the other member gets the role")
        assert took < 6.0  # released: no session timeout to wait for
    finally:
        first.close()
        second.close()


def test_a_kafka_log_is_owned_by_its_group_and_refuses_only(cluster: KafkaCluster, tmp_path: Path) -> None:
    topic = fresh()
    url = f"kafka://{cluster.bootstrap}/{topic}"
    KafkaEventLog.connect(url, partitions=2).close()
    settings = Settings(data_dir=tmp_path, log=url, pipeline=fresh("p"))
    ownership = open_ownership(settings, 2)
    try:
        assert isinstance(ownership, KafkaGroupOwnership) and sorted(ownership.owned()) == [0, 1]
    finally:
        ownership.close()
    with pytest.raises(OwnershipUnavailable, match="--only does not combine with a kafka:// log"):
        open_ownership(settings, 2, only=[0])


def test_a_zombie_that_lost_its_partitions_commits_no_event_twice(cluster: KafkaCluster, tmp_path: Path) -> None:
    """A processor that read records, lost its partitions (paused past its session) and flushes before it
    notices: its commits find the new owner's txn versions and add nothing. Made on purpose with two lock
    directories, so both processors believe they own every partition of the Kafka log."""
    url = f"kafka://{cluster.bootstrap}/{fresh()}"
    log = KafkaEventLog.connect(url, partitions=3)
    settings = Settings(data_dir=tmp_path / "data", log=url, batch_max_wait_s=0.1, kpi_interval_s=0.2)
    try:
        append_events(log, [event(i) for i in range(600)])
        zombie = Processor(settings, log, ownership=LocalOwnership(tmp_path / "locks-a", 3))
        owner = Processor(settings, log, ownership=LocalOwnership(tmp_path / "locks-b", 3))
        zombie._read_available()  # read everything, then "paused" before its flush
        owner.run(until_idle=True)
        assert owner.stats.events_committed == 600
        zombie.flush()  # the txn versions are the new owner's: nothing is committed again
        assert zombie.stats.events_committed == 0 and zombie.stats.batches_skipped == 1
        append_events(log, [event(i) for i in range(600, 900)])
        both = [threading.Thread(target=p.run, kwargs={"until_idle": True}) for p in (zombie, owner)]
        for thread in both:
            thread.start()
        for thread in both:
            thread.join()
    finally:
        log.close()
    stored = Counter(row["eventId"] for row in table_rows(settings.table_uri("events"), ["eventId"]))
    assert set(stored) == {f"e{i}" for i in range(900)} and set(stored.values()) == {1}


# ------------------------------------------------------------------------------------ topics written by others
def test_a_topic_written_by_another_producer_lands_its_events_once_and_quarantines_the_rest(
        cluster: KafkaCluster, tmp_path: Path) -> None:
    from confluent_kafka import Producer
    from confluent_kafka.admin import NewTopic

    topic = fresh("foreign")
    admin = cluster.admin()
    admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=3)])[topic].result()
    producer = Producer({"bootstrap.servers": cluster.bootstrap, "acks": "all"})  # its own key hashing
    single = [event(i, device=f"dev{i % 5}") for i in range(40)]
    arrays = [[event(100 + 10 * a + j, device=f"dev{a}") for j in range(5)] for a in range(4)]
    no_id = {"eventName": "purchaseEvent", "eventParams": {"device_id": "dev9", "amount": 1.5}}  # id from its place
    envelope_event = {"resource": "/events", "httpMethod": "POST", "headers": {"content-type": "application/json"},
                      "requestContext": {"requestTimeEpoch": 1767225600000},
                      "body": {"eventId": "env-1", "eventName": "levelEnd", "eventParams": {"device_id": "dev3"},
                               "eventTime": 1767225600}}
    bad = [b"not json at all {", b"\xff\xfe\x00garbage", b"", b"42"]
    invalid_event = {"eventId": "bad-1", "eventParams": {"device_id": "dev1"}}  # no eventName
    messages: list[tuple[str, bytes]] = [(e["eventParams"]["device_id"], json.dumps(e).encode()) for e in single]
    messages += [(a[0]["eventParams"]["device_id"], json.dumps(a).encode()) for a in arrays]
    messages += [("dev9", json.dumps(no_id).encode()), ("dev3", json.dumps(envelope_event).encode()),
                 ("dev1", json.dumps(invalid_event).encode())]
    messages += [(f"junk{i}", value) for i, value in enumerate(bad)]
    for key, value in messages:
        producer.produce(topic, value, key=key.encode())
    assert producer.flush(30) == 0

    data = tmp_path / "data"
    url = f"kafka://{cluster.bootstrap}/{topic}"
    processed = gamestream("process", "--until-idle", "--log", url, data_dir=data, timeout=300)
    valid = len(single) + 20 + 1 + 1
    assert f"committed {valid} events" in processed.stdout, processed.stdout + processed.stderr
    stored = Counter(row["eventId"] for row in table_rows(data / "tables" / "events", ["eventId"]))
    assert set(stored.values()) == {1} and len(stored) == valid
    assert {e["eventId"] for e in single} | {e["eventId"] for a in arrays for e in a} | {"env-1"} <= set(stored)
    assert [i for i in stored if i.startswith(f"kafka-{topic}-")] != []  # the event without an id got its place

    quarantined = table_rows(data / "tables" / "events_quarantine")
    by_reason = {row["reason"]: row for row in quarantined}
    assert len(quarantined) == len(bad) + 1
    whole = [row for row in quarantined if f"kafka topic {topic} partition " in row["reason"]]
    assert len(whole) == len(bad)  # each message that holds no event: the reason names topic, partition, offset
    assert any(r.startswith("not JSON") for r in by_reason) and any(r.startswith("not UTF-8") for r in by_reason)
    assert any(r.startswith("an empty message") for r in by_reason)
    assert any(r.startswith("a JSON int") for r in by_reason)
    for row in whole:
        partition, offset = row["reason"].rsplit("partition ", 1)[1].rstrip(")").split(" offset ")
        assert (row["logPartition"], row["logOffset"]) == (int(partition), int(offset) + 1)
    (invalid,) = [row for row in quarantined if row not in whole]
    assert "eventName" in invalid["reason"] and invalid["logPartition"] is not None

    again = gamestream("process", "--until-idle", "--log", url, data_dir=data, timeout=300)
    assert "committed 0 events" in again.stdout  # read once: the txn positions hold
    assert len(table_rows(data / "tables" / "events_quarantine")) == len(quarantined)


# --------------------------------------------------------------------------------------------- processes
@pytest.mark.slow
def test_two_process_commands_share_six_partitions_and_a_sigkilled_ones_move_with_every_event_once(
        cluster: KafkaCluster, tmp_path: Path) -> None:
    """Two `gamestream process --log kafka://…` share 6 partitions through the group; the one running the KPI
    stage is SIGKILLed while events keep coming: the other is assigned its partitions within the session timeout
    and a rebalance, takes the KPI role over, and every appended event is in the table once."""
    from fleet import Child

    topic, pipeline = fresh(), fresh("p")
    url = f"kafka://{cluster.bootstrap}/{topic}"
    data = tmp_path / "data"
    log = KafkaEventLog.connect(url, partitions=6)
    appended: list[str] = []
    stop_appending = threading.Event()

    def appender() -> None:
        i = 0
        while not stop_appending.is_set():
            batch = [event(i + j, device=f"d{(i + j) % 211}") for j in range(500)]
            append_events(log, batch, per_record=25)
            appended.extend(e["eventId"] for e in batch)
            i += 500
            time.sleep(0.05)

    env = {"GAMESTREAM_PIPELINE": pipeline, "GAMESTREAM_BATCH_MAX_WAIT_S": "0.2", "GAMESTREAM_KPI_INTERVAL_S": "0.5"}
    children = [Child(f"processor{i}", ["process", "--log", url, "--data-dir", str(data)],
                      tmp_path / f"processor{i}.log", env) for i in range(2)]
    appending = threading.Thread(target=appender, daemon=True)
    group, kpi_group = processors_group(pipeline, topic), role_group(pipeline, topic, KPI_ROLE)
    try:
        appending.start()
        for child in children:
            child.start()

        def shared() -> bool:
            assignment = group_assignment(cluster, group)
            mine = [held_by_pid(assignment, c.pid) for c in children]
            return all(mine) and not mine[0] & mine[1] and mine[0] | mine[1] == set(range(6))

        eventually(shared, within=60, what="each process holds some partitions, together all six")

        def kpi_holders() -> list[int]:
            assignment = group_assignment(cluster, kpi_group)
            return [c.pid for c in children if c.alive() and held_by_pid(assignment, c.pid) == {0}]

        eventually(lambda: len(kpi_holders()) == 1, within=30, what="one process runs the KPI stage")
        for _ in range(10):  # one at a time, whenever looked at
            assert len(kpi_holders()) == 1
            time.sleep(0.2)
        (holder_pid,) = kpi_holders()
        holder = next(c for c in children if c.pid == holder_pid)
        survivor = next(c for c in children if c is not holder)
        eventually(lambda: len(table_rows(data / "tables" / "events", ["eventId"])) > 2000, within=60,
                   what="both commit events")
        holder.process.send_signal(signal.SIGKILL)
        holder.process.wait(timeout=30)
        killed = time.monotonic()
        assert not holder.alive()  # the kill happened
        took = eventually(lambda: held_by_pid(group_assignment(cluster, group), survivor.pid) == set(range(6)),
                          within=30, what="the survivor is assigned the killed process's partitions")
        assert took < 20  # the session timeout (6 s), then one rebalance
        eventually(lambda: kpi_holders() == [survivor.pid], within=30, what="the KPI role moves to the survivor")
        assert time.monotonic() - killed < 30
        time.sleep(2)
        stop_appending.set()
        appending.join(timeout=60)
        expected = set(appended)
        assert 10_000 <= len(expected) <= 200_000

        def all_stored() -> bool:
            return len(table_rows(data / "tables" / "events", ["eventId"])) >= len(expected)

        eventually(all_stored, within=120, what="the survivor commits every appended event")
        assert survivor.stop() == 0
        assert "KPI stage taken over" in survivor.text() or "partitions assigned" in survivor.text()
    finally:
        stop_appending.set()
        for child in children:
            child.kill()
        log.close()
    stored = Counter(row["eventId"] for row in table_rows(data / "tables" / "events", ["eventId"]))
    duplicates = {event_id: n for event_id, n in stored.items() if n > 1}
    assert not duplicates, f"{len(duplicates)} events written more than once"
    assert set(stored) == expected


@pytest.mark.slow
def test_a_processor_paused_past_its_session_wakes_as_a_zombie_and_no_event_lands_twice(
        cluster: KafkaCluster, tmp_path: Path) -> None:
    """SIGSTOP one of two `gamestream process` past its session timeout with records read and not committed: the
    group gives its partitions to the other; SIGCONT: it wakes up believing, for an instant, that it owns them,
    learns from the group it lost them, rejoins — and every appended event is in the table once."""
    from fleet import Child

    topic, pipeline = fresh(), fresh("p")
    url = f"kafka://{cluster.bootstrap}/{topic}"
    data = tmp_path / "data"
    log = KafkaEventLog.connect(url, partitions=6)
    appended: list[str] = []
    stop_appending = threading.Event()

    def appender() -> None:
        i = 0
        while not stop_appending.is_set():
            batch = [event(i + j, device=f"d{(i + j) % 211}") for j in range(300)]
            append_events(log, batch, per_record=20)
            appended.extend(e["eventId"] for e in batch)
            i += 300
            time.sleep(0.05)

    env = {"GAMESTREAM_PIPELINE": pipeline, "GAMESTREAM_BATCH_MAX_WAIT_S": "1.0"}
    children = [Child(f"processor{i}", ["process", "--no-kpi", "--log", url, "--data-dir", str(data)],
                      tmp_path / f"processor{i}.log", env) for i in range(2)]
    appending = threading.Thread(target=appender, daemon=True)
    group = processors_group(pipeline, topic)
    try:
        appending.start()
        for child in children:
            child.start()
        eventually(lambda: all(held_by_pid(group_assignment(cluster, group), c.pid) for c in children), within=60,
                   what="both processes hold partitions")
        paused, other = children
        paused.signal(signal.SIGSTOP)
        took = eventually(lambda: held_by_pid(group_assignment(cluster, group), other.pid) == set(range(6)),
                          within=30, what="the paused process's partitions move to the other")
        assert took < 20
        time.sleep(2)
        paused.signal(signal.SIGCONT)
        paused.wait_for(r"partitions lost|did not run for", timeout=30)  # it learned it was a zombie
        eventually(lambda: held_by_pid(group_assignment(cluster, group), paused.pid) != set(), within=30,
                   what="the resumed process rejoins and gets a share again")
        time.sleep(2)
        stop_appending.set()
        appending.join(timeout=60)
        expected = set(appended)
        assert len(expected) >= 10_000

        def all_stored() -> bool:
            return len(table_rows(data / "tables" / "events", ["eventId"])) >= len(expected)

        eventually(all_stored, within=120, what="every appended event is committed")
        for child in children:
            assert child.stop() == 0
    finally:
        stop_appending.set()
        for child in children:
            child.kill()
        log.close()
    stored = Counter(row["eventId"] for row in table_rows(data / "tables" / "events", ["eventId"]))
    duplicates = {event_id: n for event_id, n in stored.items() if n > 1}
    assert not duplicates, f"{len(duplicates)} events written more than once"
    assert set(stored) == expected


@pytest.mark.slow
def test_rebalances_while_processors_commit_under_load_land_every_event_once_without_the_eventid_check(
        cluster: KafkaCluster, tmp_path: Path) -> None:
    """Partitions move while their processors are committing: under a steady load of small commits, a second and a
    third `process` join the group (each join revokes partitions from processors in the middle of their batches),
    then the second leaves cleanly (its partitions go back). Deduplication by eventId is off (`dedupe_days = 0`),
    so only the revoke hand-over and the Delta txn check stand between a moved partition and a record committed
    twice: every appended event is in the table exactly once."""
    from fleet import Child

    topic, pipeline = fresh(), fresh("p")
    url = f"kafka://{cluster.bootstrap}/{topic}"
    data = tmp_path / "data"
    log = KafkaEventLog.connect(url, partitions=6)
    appended: list[str] = []
    stop_appending = threading.Event()

    def appender() -> None:
        i = 0
        while not stop_appending.is_set():
            batch = [event(i + j, device=f"d{(i + j) % 211}") for j in range(300)]
            append_events(log, batch, per_record=10)
            appended.extend(e["eventId"] for e in batch)
            i += 300
            time.sleep(0.05)

    env = {"GAMESTREAM_PIPELINE": pipeline, "GAMESTREAM_BATCH_MAX_WAIT_S": "0.05",
           "GAMESTREAM_BATCH_MAX_EVENTS": "200", "GAMESTREAM_DEDUPE_DAYS": "0"}
    children = [Child(f"processor{i}", ["process", "--no-kpi", "--log", url, "--data-dir", str(data)],
                      tmp_path / f"processor{i}.log", env) for i in range(3)]
    group = processors_group(pipeline, topic)

    def held(child) -> set[int]:
        return held_by_pid(group_assignment(cluster, group), child.pid)

    def committed() -> int:  # rows in the events table, from its files' metadata (cheap enough to poll)
        events = data / "tables" / "events"
        return DeltaTable(str(events)).to_pyarrow_dataset().count_rows() if (events / "_delta_log").exists() else 0

    appending = threading.Thread(target=appender, daemon=True)
    moves = 0
    try:
        appending.start()
        children[0].start()
        eventually(lambda: held(children[0]) == set(range(6)), within=60, what="the first process holds all six")
        eventually(lambda: committed() > 1000, within=60, what="the first process commits")
        for joining in children[1:]:
            before = committed()
            joining.start()
            eventually(lambda: bool(held(joining)), within=60, what=f"{joining.name} is assigned partitions")
            moves += 1
            eventually(lambda: committed() > before + 1000, within=60, what="commits go on across the rebalance")
        shares = [held(child) for child in children]
        assert all(shares) and set().union(*shares) == set(range(6)) and sum(map(len, shares)) == 6, shares
        before = committed()
        assert children[1].stop() == 0  # a clean leave: its partitions go back to the others
        eventually(lambda: held(children[0]) | held(children[2]) == set(range(6)), within=30,
                   what="the partitions of the process that left are assigned again")
        moves += 1
        eventually(lambda: committed() > before + 1000, within=60, what="commits go on after it left")
        stop_appending.set()
        appending.join(timeout=60)
        expected = set(appended)
        eventually(lambda: committed() >= len(expected), within=120, what="every appended event is committed")
        time.sleep(2)  # anything committed twice would be in by now
        for child in (children[0], children[2]):
            assert child.stop() == 0
    finally:
        stop_appending.set()
        for child in children:
            child.kill()
        log.close()
    assert moves == 3  # the faults happened: two joins and a leave, each a rebalance under load
    revokes = sum(child.text().count("partitions revoked") for child in children)
    assert revokes >= 2, "no partition was revoked from a committing processor"
    stored = Counter(row["eventId"] for row in table_rows(data / "tables" / "events", ["eventId"]))
    duplicates = {event_id: n for event_id, n in stored.items() if n > 1}
    assert not duplicates, f"{len(duplicates)} events written more than once"
    assert set(stored) == expected

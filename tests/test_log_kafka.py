"""The Kafka event log against a real 3-broker Apache Kafka cluster (KRaft, the brokers' jars from Maven Central:
scripts/kafka-cluster): the conformance suite (without trim, which Kafka leaves to the topic's retention), plus
what only Kafka shows — the topic's replication and min.insync.replicas, the partition count read back, routing
by `partition_for`, positions as consumer-group offsets, security settings from the environment, and the faults:
the partition leader's broker SIGKILLed under load, two of three brokers stopped."""

from __future__ import annotations

import signal
import threading
import time
import uuid

import pytest

from gamestream import log as log_module
from gamestream.log import Append, LogUnavailable, partition_for, router
from gamestream.log import kafka as kafka_log
from gamestream.log import RecordTooLarge
from gamestream.log.kafka import KafkaEventLog
from gamestream.log.sqlite import LogPartitionsMismatch
from gamestream.settings import Settings
from kafka_cluster import KafkaCluster, kafka_cluster
from log_conformance import LogConformance, payload, read_all


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    with kafka_cluster(tmp_path_factory.mktemp("kafka")) as started:
        yield started


def fresh_topic() -> str:
    return "t" + uuid.uuid4().hex[:12]


def topic_url(cluster: KafkaCluster, topic: str) -> str:
    return f"kafka://{cluster.bootstrap}/{topic}"


class TestKafkaConformance(LogConformance):
    @pytest.fixture
    def open_log(self, cluster: KafkaCluster):
        url = topic_url(cluster, fresh_topic())  # one topic per test; reopening finds the same one
        return lambda partitions: KafkaEventLog.connect(url, partitions=partitions)


# --------------------------------------------------------------------------------------------- URL and topic
def test_connect_and_describe_take_kafka_urls(cluster: KafkaCluster) -> None:
    topic = fresh_topic()
    settings = Settings(log=topic_url(cluster, topic), partitions=3)
    opened = log_module.connect(settings)
    try:
        assert isinstance(opened, KafkaEventLog) and opened.partitions == 3 and opened.topic == topic
        assert not opened.supports_trim and opened.idempotency_scope == "process"
        assert opened.positions_scope == "log"
    finally:
        opened.close()
    assert log_module.describe(settings) == f"kafka://{cluster.bootstrap}/{topic} (PLAINTEXT)"
    with pytest.raises(ValueError, match="nats://.*kinesis://STREAM.*kafka://host:port"):
        log_module.connect(Settings(log="kafka://broker:9092"))  # no topic
    with pytest.raises(ValueError, match="credentials do not go in the URL"):
        KafkaEventLog.connect(f"kafka://user:secret@{cluster.members[0].address}/{topic}")


def test_the_topic_is_replicated_three_times_with_min_insync_replicas_two(cluster: KafkaCluster) -> None:
    from confluent_kafka.admin import ConfigResource

    topic = fresh_topic()
    log = KafkaEventLog.connect(topic_url(cluster, topic), partitions=4)
    try:
        assert log.replication_factor == 3
        for partition in range(4):
            leader, replicas, in_sync = cluster.partition_state(topic, partition)
            assert sorted(replicas) == [1, 2, 3] and sorted(in_sync) == [1, 2, 3] and leader in replicas
        resource = ConfigResource("topic", topic)
        admin = cluster.admin()  # kept while its futures resolve: a collected client cancels them
        config = admin.describe_configs([resource])[resource].result()
        assert config["min.insync.replicas"].value == "2"
        assert config["message.timestamp.type"].value == "LogAppendTime"  # appended_at is the broker's clock
        assert int(config["max.message.bytes"].value) >= kafka_log.MAX_RECORD_BYTES
    finally:
        log.close()


def test_the_partition_count_is_read_back_from_an_existing_topic(cluster: KafkaCluster) -> None:
    url = topic_url(cluster, fresh_topic())
    KafkaEventLog.connect(url, partitions=6).close()
    log = KafkaEventLog.connect(url, partitions=None)
    try:
        assert log.partitions == 6
    finally:
        log.close()
    with pytest.raises(LogPartitionsMismatch, match="has 6 partitions"):
        KafkaEventLog.connect(url, partitions=8)
    fresh = KafkaEventLog.connect(topic_url(cluster, fresh_topic()), partitions=None)
    try:
        assert fresh.partitions == 4
    finally:
        fresh.close()


def test_a_device_is_routed_by_partition_for_to_an_explicit_partition(cluster: KafkaCluster) -> None:
    log = KafkaEventLog.connect(topic_url(cluster, fresh_topic()), partitions=5)
    try:
        route = router(log)
        devices = [f"device-{i}" for i in range(50)]
        assert [log.route(d) for d in devices] == [route(d) for d in devices] == [partition_for(d, 5)
                                                                                 for d in devices]
        device = devices[7]
        (offset,) = log.append([Append(log.route(device), payload(device), 1)])
        assert [r.offset for r in log.read(partition_for(device, 5), 0, 10)] == [offset]  # where it was sent
    finally:
        log.close()


def test_a_record_over_the_topics_max_message_bytes_is_refused_not_truncated(cluster: KafkaCluster) -> None:
    log = KafkaEventLog.connect(topic_url(cluster, fresh_topic()), partitions=1)
    try:
        with pytest.raises(RecordTooLarge, match="max.message.bytes"):
            log.append([Append(0, b"x" * (log.max_record_bytes + 1), 1)])
        big = b"y" * (2 * 1024 * 1024)  # over Kafka's 1 MiB default: the topics gamestream creates take 8 MiB
        (offset,) = log.append([Append(0, big, 1)])
        assert [(r.offset, r.payload) for r in log.read(0, 0, 10)] == [(offset, big)]
    finally:
        log.close()


def test_commits_are_the_consumer_groups_offsets_that_lag_tools_read(cluster: KafkaCluster) -> None:
    from confluent_kafka import Consumer, TopicPartition

    topic = fresh_topic()
    log = KafkaEventLog.connect(topic_url(cluster, topic), partitions=2)
    try:
        offsets = log.append([Append(1, payload(f"c{i}"), 1) for i in range(5)])
        log.commit("lag-watch", 1, offsets[2])
        outside = Consumer({"bootstrap.servers": cluster.bootstrap, "group.id": "lag-watch"})
        try:
            (position,) = outside.committed([TopicPartition(topic, 1)], timeout=10)
            _, high = outside.get_watermark_offsets(TopicPartition(topic, 1), timeout=10)
        finally:
            outside.close()
        assert position.offset == offsets[2]  # the next Kafka offset to read: 2 records are still to do
        assert high - position.offset == 2 == log.pending_events("lag-watch")
    finally:
        log.close()


def test_security_settings_come_from_the_environment_never_the_url(tmp_path, monkeypatch) -> None:
    properties = tmp_path / "client.properties"
    properties.write_text("# Confluent Cloud\nsecurity.protocol=SASL_SSL\nsasl.mechanism = PLAIN\n"
                          "sasl.username=from-file\nsasl.password: secret\n")
    monkeypatch.setenv("GAMESTREAM_KAFKA_CONFIG", str(properties))
    monkeypatch.setenv("GAMESTREAM_KAFKA_SASL_USERNAME", "from-variable")
    config = kafka_log.client_config("b1:9092,b2:9092")
    assert config["bootstrap.servers"] == "b1:9092,b2:9092"
    assert (config["security.protocol"], config["sasl.mechanism"], config["sasl.username"],
            config["sasl.password"]) == ("SASL_SSL", "PLAIN", "from-variable", "secret")
    assert log_module.describe(Settings(log="kafka://b1:9092/events")) == "kafka://b1:9092/events (SASL_SSL)"
    properties.write_text("acks=1\n")
    with pytest.raises(ValueError, match="acks=all"):
        kafka_log.client_config("b1:9092")
    properties.write_text("enable.idempotence=false\n")
    with pytest.raises(ValueError, match="idempotent"):
        kafka_log.client_config("b1:9092")


# ------------------------------------------------------------------------------------------------------ faults
def _wait_in_sync(cluster: KafkaCluster, topic: str, partitions: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if all(len(cluster.partition_state(topic, p)[2]) == 3 for p in range(partitions)):
                return
        except Exception:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{topic}: replicas not back in sync within {timeout:.0f} s")


@pytest.mark.slow
def test_acknowledged_appends_survive_a_sigkill_of_the_partition_leader(cluster: KafkaCluster) -> None:
    topic = fresh_topic()
    log = KafkaEventLog.connect(topic_url(cluster, topic), partitions=2)
    acked: dict[bytes, tuple[int, int]] = {}
    failed: list[bytes] = []
    stop = threading.Event()

    def appender() -> None:
        i = 0
        while not stop.is_set():
            body = payload(f"k{i}")
            try:
                (offset,) = log.append([Append(i % 2, body, 1)])
                acked[body] = (i % 2, offset)
            except LogUnavailable:
                failed.append(body)  # raised, so the collector would answer 503: never a false success
            i += 1

    thread = threading.Thread(target=appender)
    killed = None
    try:
        thread.start()
        time.sleep(1.0)
        leader = cluster.partition_state(topic, 0)[0]
        killed = cluster.index_of(leader)
        before = len(acked)
        cluster.kill(killed)
        assert not cluster.members[killed].running  # the leader's JVM is gone
        new_leader = cluster.wait_for_leader(topic, 0, not_on=leader)
        assert new_leader != leader  # another replica took over
        deadline = time.monotonic() + 30
        grown = len(acked)
        while len(acked) < grown + 50 and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        thread.join(timeout=60)
        assert len(acked) > before + 50  # appends went on under the new leader

        stored = {p: [(r.offset, r.payload) for r in read_all(log, p, chunk=500)] for p in range(2)}
        bodies = [body for records in stored.values() for _, body in records]
        assert len(bodies) == len(set(bodies))  # nothing stored twice (the idempotent producer's retries)
        for body, (partition, offset) in acked.items():
            assert (offset, body) in stored[partition]  # every acknowledged record is there, at its offset
        assert set(bodies) <= set(acked) | set(failed)

        cluster.restart(killed)
        _wait_in_sync(cluster, topic, 2)  # the restarted broker caught up and is an in-sync replica again
        killed = None
    finally:
        stop.set()
        thread.join(timeout=60)
        log.close()
        if killed is not None and not cluster.members[killed].running:
            cluster.restart(killed)


@pytest.mark.slow
def test_with_two_of_three_brokers_stopped_an_append_fails_and_never_reports_success(cluster: KafkaCluster,
                                                                                   monkeypatch) -> None:
    monkeypatch.setattr(kafka_log, "PUBLISH_TIMEOUT_SECONDS", 6.0)
    topic = fresh_topic()
    log = KafkaEventLog.connect(topic_url(cluster, topic), partitions=1)
    paused: list[int] = []
    try:
        (before,) = log.append([Append(0, payload("before"), 1)])
        leader = cluster.leader_index(topic, 0)
        paused = [i for i in range(3) if i != leader]
        for index in paused:
            cluster.signal(index, signal.SIGSTOP)  # the leader stays up, both its followers freeze
        started = time.monotonic()
        with pytest.raises(LogUnavailable):
            log.append([Append(0, payload("during"), 1)])
        assert time.monotonic() - started < 30  # a bounded wait, then 503 — never a 200
        for index in paused:
            cluster.signal(index, signal.SIGCONT)
        paused = []
        deadline = time.monotonic() + 60
        while True:
            try:
                (after,) = log.append([Append(0, payload("after"), 1)])
                break
            except LogUnavailable:
                if time.monotonic() > deadline:
                    raise
        assert after > before
        stored = [r.payload for r in read_all(log, 0)]
        assert stored[0] == payload("before") and stored[-1] == payload("after")
        # The failed append may have been written by the leader and replicated once the followers woke (Kafka
        # has no atomicity without transactions; module docstring): it is there at most once.
        assert stored.count(payload("during")) <= 1 and len(stored) in (2, 3)
        _wait_in_sync(cluster, topic, 1)
    finally:
        for index in paused:
            cluster.signal(index, signal.SIGCONT)
        log.close()


# ------------------------------------------------------------------------------------------- the commands
def test_load_serve_status_and_process_on_a_kafka_log(cluster: KafkaCluster, tmp_path) -> None:
    """The commands end to end on `--log kafka://…`: load and the collector append to the topic, status reads
    it, process drains it into the tables exactly once and commits the consumer group's offsets."""
    import json

    import httpx

    from collector_server import ServeProcess
    from conftest import gamestream, table_rows, write_ndjson

    url = topic_url(cluster, fresh_topic())
    data = tmp_path / "data"
    events = [{"eventId": f"e{i}", "eventName": "levelStart", "eventParams": {"device_id": f"d{i % 37}"}}
              for i in range(2000)]
    events.append({"eventName": "levelStart", "eventParams": {"device_id": 7}})  # rejected with its reason
    loaded = gamestream("load", str(write_ndjson(tmp_path / "e.ndjson", events)), "--log", url,
                        "--partitions", "3", data_dir=data)
    assert "2,000 accepted" in loaded.stdout and "1 rejected" in loaded.stdout
    server = ServeProcess(data, "--log", url)
    try:
        posted = httpx.post(f"{server.url}/v1/events", timeout=30,
                            json=[{"eventId": f"h{i}", "eventName": "levelEnd", "eventParams": {"device_id": f"d{i}"}}
                                  for i in range(50)])
        assert posted.status_code == 200 and posted.json()["accepted"] == 50
    finally:
        assert server.stop() == 0
    status = gamestream("status", "--log", url, data_dir=data)
    assert "event log (kafka://" in status.stdout
    processed = gamestream("process", "--until-idle", "--log", url, data_dir=data, timeout=300)
    assert "committed 2,050 events" in processed.stdout, processed.stdout + processed.stderr
    ids = [r["eventId"] for r in table_rows(data / "tables" / "events", ["eventId"])]
    assert len(ids) == 2050 == len(set(ids))
    again = gamestream("process", "--until-idle", "--log", url, data_dir=data, timeout=300)
    assert "committed 0 events" in again.stdout  # drained: the txn positions hold across runs
    log = KafkaEventLog.connect(url, partitions=None)
    try:  # the processor committed its positions to the log (the consumer group's offsets) as it drained
        assert log.pending_events("gamestream") == 0
        assert sum(log.committed("gamestream", p) for p in range(3)) > 0
    finally:
        log.close()
    counted = json.loads(gamestream("sql", "select count(*) as n from events", "--format", "json",
                                    data_dir=data).stdout)
    assert counted == [{"n": 2050}]

"""The NATS JetStream event log against real nats-server processes: the conformance suite on one node and on a
3-node cluster (replicas 3), plus what only JetStream can show (Msg-Id deduplication, the partition count in the
stream's metadata, the loss of the stream leader while appending)."""

from __future__ import annotations

import hashlib
import threading
import time
import uuid

import pytest

from gamestream.log import Append, Idempotency
from gamestream.log import RecordTooLarge
from gamestream.log.nats import NatsEventLog
from gamestream.log.sqlite import LogPartitionsMismatch
from gamestream.demo.nats_cluster import NatsCluster
from log_conformance import LogConformance, payload, read_all


@pytest.fixture(scope="module")
def single_node(tmp_path_factory: pytest.TempPathFactory):
    cluster = NatsCluster(tmp_path_factory.mktemp("nats1"), nodes=1).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def three_nodes(tmp_path_factory: pytest.TempPathFactory):
    cluster = NatsCluster(tmp_path_factory.mktemp("nats3"), nodes=3).start()
    yield cluster
    cluster.stop()


def stream_url(cluster: NatsCluster, stream: str) -> str:
    return f"{cluster.url}?stream={stream}"


def fresh_stream() -> str:
    return "t" + uuid.uuid4().hex[:12]


class TestNatsSingleNodeConformance(LogConformance):
    @pytest.fixture
    def open_log(self, single_node: NatsCluster):
        url = stream_url(single_node, fresh_stream())  # one stream per test; reopening finds the same one
        return lambda partitions: NatsEventLog.connect(url, partitions=partitions)


class TestNatsClusterConformance(LogConformance):
    @pytest.fixture
    def open_log(self, three_nodes: NatsCluster):
        url = stream_url(three_nodes, fresh_stream())
        return lambda partitions: NatsEventLog.connect(url, partitions=partitions)


def test_stream_is_replicated_on_three_nodes_with_subjects_per_partition(three_nodes: NatsCluster) -> None:
    stream = fresh_stream()
    log = NatsEventLog.connect(stream_url(three_nodes, stream), partitions=4)
    try:
        info = log._call(log._js.stream_info(stream))
        assert info.config.num_replicas == 3
        assert info.config.subjects == [f"{stream}.*"]
        assert info.config.metadata["gamestream.partitions"] == "4"
        assert info.config.allow_direct and info.config.duplicate_window >= 60
        assert info.config.allow_atomic  # several records of one append are stored together or not at all
    finally:
        log.close()


def test_a_publish_retried_with_the_same_msg_id_is_stored_once(single_node: NatsCluster) -> None:
    log = NatsEventLog.connect(stream_url(single_node, fresh_stream()), partitions=2)
    try:
        record = Append(1, payload("retried"), 1)
        first = log._call(log._publish(record, "same-id"))
        again = log._call(log._publish(record, "same-id"))  # as after a PubAck lost in a leader change
        assert again == first
        assert [(r.offset, r.payload) for r in read_all(log, 1)] == [(first, payload("retried"))]
    finally:
        log.close()


@pytest.mark.parametrize("nodes", ["single_node", "three_nodes"])
def test_an_append_of_several_records_is_one_atomic_batch_and_a_lost_ack_retry_stores_nothing_twice(
        nodes: str, request: pytest.FixtureRequest) -> None:
    cluster: NatsCluster = request.getfixturevalue(nodes)
    log = NatsEventLog.connect(stream_url(cluster, fresh_stream()), partitions=3)
    try:
        assert log._atomic
        records = [Append(p, payload(f"r{p}-{i}"), 1) for i in range(2) for p in range(3)]
        ids = [f"batch-{i}" for i in range(len(records))]
        offsets = log._call(log._publish_atomic(records, ids))
        assert offsets == list(range(offsets[0], offsets[0] + len(records)))  # one batch, consecutive
        # the same batch again, as after a PubAck lost to a leader change: the server refuses it as holding
        # stored Msg-Ids, and the first attempt's offsets are found by those ids
        assert log._call(log._publish_atomic(records, ids)) == offsets
        stored = {r.offset: r.payload for p in range(3) for r in read_all(log, p)}
        assert stored == {offset: record.payload for offset, record in zip(offsets, records)}
    finally:
        log.close()


def test_the_partition_count_is_read_back_from_an_existing_stream(single_node: NatsCluster) -> None:
    url = stream_url(single_node, fresh_stream())
    NatsEventLog.connect(url, partitions=6).close()
    log = NatsEventLog.connect(url, partitions=None)
    try:
        assert log.partitions == 6
    finally:
        log.close()
    with pytest.raises(LogPartitionsMismatch, match="has 6 partitions"):
        NatsEventLog.connect(url, partitions=8)
    fresh = NatsEventLog.connect(stream_url(single_node, fresh_stream()), partitions=None)
    try:
        assert fresh.partitions == 4
    finally:
        fresh.close()


def test_a_record_over_the_servers_max_payload_is_refused_not_truncated(single_node: NatsCluster) -> None:
    log = NatsEventLog.connect(stream_url(single_node, fresh_stream()), partitions=1)
    try:
        with pytest.raises(RecordTooLarge, match="max_payload"):
            log.append([Append(0, b"x" * (log._max_payload + 1), 1)])
        assert log.read(0, 0, 10) == []
        big = b"y" * (2 * 1024 * 1024)  # over NATS's 1 MiB default: the nodes we start take 8 MB
        (offset,) = log.append([Append(0, big, 1)])
        assert log.read(0, 0, 10)[0].payload == big and offset > 0
    finally:
        log.close()


def test_an_idempotency_claim_left_by_a_crashed_appender_is_taken_over(single_node: NatsCluster,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import gamestream.log.nats as nats_log

    log = NatsEventLog.connect(stream_url(single_node, fresh_stream()), partitions=1)
    try:
        key = hashlib.sha256(b"crashed").hexdigest()  # the key as the log stores it
        log._call(log._idempotency.create(key, b"C" + repr(time.time()).encode()))  # claimed, never answered
        monkeypatch.setattr(nats_log, "CLAIM_TIMEOUT_SECONDS", 0.5)
        result = log.submit([Append(0, payload("after-crash"), 1)], Idempotency("crashed", b"answer")).result(30)
        assert result.replayed is None and len(result.offsets) == 1
        replay = log.submit([Append(0, payload("again"), 1)], Idempotency("crashed", b"other")).result(30)
        assert replay.replayed == b"answer"
        assert [r.payload for r in read_all(log, 0)] == [payload("after-crash")]
    finally:
        log.close()


def test_losing_the_stream_leader_loses_and_duplicates_no_acknowledged_record(three_nodes: NatsCluster) -> None:
    stream = fresh_stream()
    log = NatsEventLog.connect(stream_url(three_nodes, stream), partitions=2)
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
            except Exception:
                failed.append(body)  # raised, so the collector would answer 503: never a false success
            i += 1

    thread = threading.Thread(target=appender)
    killed = None
    try:
        thread.start()
        time.sleep(0.5)
        leader = three_nodes.stream_leader(stream)
        assert leader is not None
        killed = three_nodes.index_of(leader)
        before = len(acked)
        three_nodes.kill(killed)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            now_leading = three_nodes.stream_leader(stream)
            if now_leading not in (None, leader):
                break
            time.sleep(0.1)
        assert three_nodes.stream_leader(stream) not in (None, leader)  # a new leader was elected
        grown = len(acked)
        while len(acked) < grown + 50 and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        thread.join(timeout=60)
        assert len(acked) > before + 50  # appends went on after the election

        stored = {p: [(r.offset, r.payload) for r in read_all(log, p, chunk=500)] for p in range(2)}
        bodies = [body for records in stored.values() for _, body in records]
        assert len(bodies) == len(set(bodies))  # nothing stored twice, retried or not
        for body, (partition, offset) in acked.items():
            assert (offset, body) in stored[partition]  # every acknowledged record is there, at its offset
        assert set(bodies) <= set(acked) | set(failed)

        three_nodes.restart(killed)
        killed_node = three_nodes.members[killed]
        last = max(offset for records in stored.values() for offset, _ in records)
        deadline = time.monotonic() + 30
        caught_up = None
        while time.monotonic() < deadline:
            details = [d for account in killed_node.jsz().get("account_details", [])
                       for d in account.get("stream_detail", []) if d.get("name") == stream]
            caught_up = details[0]["state"]["last_seq"] if details else None
            if caught_up is not None and caught_up >= last:
                break
            time.sleep(0.2)
        assert caught_up is not None and caught_up >= last  # the restarted node caught up with the stream
        killed = None
    finally:
        stop.set()
        thread.join(timeout=60)
        log.close()
        if killed is not None and not three_nodes.members[killed].running:
            three_nodes.restart(killed)


def test_a_cluster_whose_picked_port_was_taken_before_its_node_bound_it_starts_on_new_ports(tmp_path) -> None:
    """The ports are picked free, then bound by the nodes a moment later: in between, another process (a parallel
    test, an outgoing connection) can take one. The node exits saying so, and the cluster starts again on new
    ports instead of failing."""
    import socket

    cluster = NatsCluster(tmp_path, nodes=3)
    taken = cluster.members[1].client_port
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        cluster.start(timeout=30)
        try:
            assert "address already in use" in (tmp_path / "n2" / "nats.log").read_text().lower()  # it happened
            assert taken not in {node.client_port for node in cluster.members}
            log = NatsEventLog.connect(stream_url(cluster, fresh_stream()), partitions=2)
            try:
                [offset] = log.append([Append(0, payload("after"), 1)])
                assert [(r.offset, r.payload) for r in read_all(log, 0)] == [(offset, payload("after"))]
            finally:
                log.close()
        finally:
            cluster.stop()

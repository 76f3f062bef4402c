"""The conformance suite every `EventLog` backend must pass.

A backend's test module subclasses `LogConformance` and provides the `open_log` fixture: a callable that opens
(or reopens) the *same* log with the given partition count. See test_log_sqlite.py.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from typing import Callable

import pytest

from gamestream.log import Append, EventLog, Idempotency

OpenLog = Callable[[int], EventLog]


def payload(tag: str) -> bytes:
    return f'{{"eventName":"{tag}","eventParams":{{"device_id":"d"}}}}'.encode()


def read_all(log: EventLog, partition: int, after: int = 0, chunk: int = 100) -> list:
    records = []
    while True:
        batch = log.read(partition, after, chunk)
        if not batch:
            return records
        records.extend(batch)
        after = batch[-1].offset


def require_trim(log: EventLog) -> None:
    """Skips a test of `trim` on a log whose records leave by the stream's own retention (Kinesis)."""
    if not log.supports_trim:
        pytest.skip(f"{type(log).__name__} does not trim: records leave by the stream's retention period")


class LogConformance:
    @pytest.fixture
    def log(self, open_log: OpenLog):
        log = open_log(4)
        yield log
        log.close()

    def test_append_returns_positive_growing_offsets_per_partition(self, log: EventLog) -> None:
        offsets = log.append([Append(0, payload("a"), 1), Append(1, payload("b"), 1), Append(0, payload("c"), 1)])
        assert offsets[0] > 0 and offsets[1] > 0
        assert offsets[2] > offsets[0]
        more = log.append([Append(0, payload("d"), 1)])
        assert more[0] > offsets[2]
        assert log.last_offset(0) == more[0]
        assert log.last_offset(1) == offsets[1]
        assert log.last_offset(2) == 0

    def test_read_returns_records_after_offset_in_order_with_payloads(self, log: EventLog) -> None:
        appended = [log.append([Append(2, payload(f"e{i}"), 1)])[0] for i in range(10)]
        records = log.read(2, 0, 100)
        assert [r.offset for r in records] == appended
        assert [r.payload for r in records] == [payload(f"e{i}") for i in range(10)]
        assert all(r.partition == 2 and r.events == 1 for r in records)
        assert [r.offset for r in log.read(2, appended[4], 3)] == appended[5:8]
        assert log.read(2, appended[-1], 10) == []
        assert log.read(3, 0, 10) == []

    def test_a_batch_record_keeps_its_event_count_and_bytes(self, log: EventLog) -> None:
        body = b"\n".join(payload(f"x{i}") for i in range(500))
        (offset,) = log.append([Append(1, body, 500)])
        (record,) = log.read(1, offset - 1, 1)
        assert record.payload == body and record.events == 500 and record.appended_at <= time.time()

    def test_appends_survive_reopening_and_offsets_keep_growing(self, open_log: OpenLog) -> None:
        log = open_log(4)
        first = log.append([Append(0, payload("before"), 1)])
        log.close()
        log = open_log(4)
        try:
            assert [r.payload for r in log.read(0, 0, 10)] == [payload("before")]
            assert log.append([Append(0, payload("after"), 1)])[0] > first[0]
        finally:
            log.close()

    def test_partition_outside_range_is_refused(self, log: EventLog) -> None:
        with pytest.raises(ValueError):
            log.append([Append(4, payload("x"), 1)])
        assert log.partitions == 4

    def test_concurrent_appenders_get_unique_growing_offsets_and_lose_nothing(self, log: EventLog) -> None:
        acked: dict[int, list[tuple[int, bytes]]] = defaultdict(list)
        lock = threading.Lock()

        def appender(worker: int) -> None:
            for i in range(150):
                items = [Append((worker + i) % 4, payload(f"w{worker}-{i}-{k}"), 1) for k in range(2)]
                offsets = log.append(items)
                assert offsets[1] > offsets[0] or items[0].partition != items[1].partition
                with lock:
                    for item, offset in zip(items, offsets):
                        acked[item.partition].append((offset, item.payload))

        threads = [threading.Thread(target=appender, args=(w,)) for w in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sum(len(v) for v in acked.values()) == 8 * 150 * 2
        for partition, entries in acked.items():
            stored = [(r.offset, r.payload) for r in read_all(log, partition)]
            assert stored == sorted(entries)  # every acknowledged record, once, in offset order
            assert len({offset for offset, _ in stored}) == len(stored)

    def test_reader_racing_a_writer_never_skips_a_record(self, log: EventLog) -> None:
        done = threading.Event()
        acked: list[int] = []
        seen: list[int] = []

        def writer() -> None:
            try:
                for i in range(400):
                    acked.extend(log.append([Append(3, payload(f"r{i}"), 1)]))
            finally:
                done.set()  # a failed append ends the reader too: the test fails on the count, not by timeout

        def reader() -> None:
            after = 0
            while True:
                finished = done.is_set()
                batch = log.read(3, after, 7)
                for record in batch:
                    assert record.offset > after  # offsets only grow
                    seen.append(record.offset)
                    after = record.offset
                if finished and not batch:
                    return

        threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(acked) == 400
        assert seen == acked

    def test_committed_position_only_moves_forward(self, log: EventLog) -> None:
        assert log.committed("p", 0) == 0
        log.commit("p", 0, 10)
        log.commit("p", 0, 4)
        assert log.committed("p", 0) == 10
        assert log.committed("other", 0) == 0

    def test_trim_deletes_only_committed_records_older_than_retention(self, log: EventLog) -> None:
        require_trim(log)
        offsets = [log.append([Append(0, payload(f"t{i}"), 1)])[0] for i in range(6)]
        assert log.trim(0, now=time.time() + 10) == 0  # no consumer has committed anything
        log.commit("pipeline", 0, offsets[2])
        assert log.trim(3600) == 0  # committed, but too young
        assert log.trim(0, now=time.time() + 10) == 3
        assert [r.offset for r in read_all(log, 0)] == offsets[3:]
        log.commit("slow-consumer", 0, offsets[3])
        log.commit("pipeline", 0, offsets[5])
        assert log.trim(0, now=time.time() + 10) == 1  # held back by the slowest consumer
        assert [r.offset for r in read_all(log, 0)] == offsets[4:]

    def test_offsets_keep_growing_after_everything_is_trimmed(self, open_log: OpenLog) -> None:
        log = open_log(4)
        if not log.supports_trim:
            log.close()
            require_trim(log)
        last = log.append([Append(1, payload("x"), 1)])[0]
        log.commit("c", 1, last)
        assert log.trim(0, now=time.time() + 10) == 1
        log.close()
        log = open_log(4)
        try:
            assert log.read(1, 0, 10) == []
            assert log.append([Append(1, payload("y"), 1)])[0] > last
        finally:
            log.close()

    def test_an_idempotency_key_appends_once_and_replays_the_first_response(self, log: EventLog) -> None:
        first = log.submit([Append(0, payload("i1"), 1)], Idempotency("key-1", b'{"accepted":1}')).result()
        assert len(first.offsets) == 1 and first.replayed is None
        again = log.submit([Append(0, payload("i1-retry"), 1)], Idempotency("key-1", b"other")).result()
        assert again.offsets == [] and again.replayed == b'{"accepted":1}'
        assert [r.payload for r in read_all(log, 0)] == [payload("i1")]
        other = log.submit([Append(0, payload("i2"), 1)], Idempotency("key-2", b"{}")).result()
        assert other.replayed is None and other.offsets[0] > first.offsets[0]

    def test_concurrent_appends_with_one_idempotency_key_store_once(self, log: EventLog) -> None:
        futures = [log.submit([Append(1, payload(f"c{i}"), 1)], Idempotency("same", b"first")) for i in range(20)]
        results = [f.result() for f in futures]
        assert sum(1 for r in results if r.replayed is None) == 1
        assert len(read_all(log, 1)) == 1

    def test_pending_events_counts_what_a_consumer_has_not_committed(self, log: EventLog) -> None:
        assert log.pending_events("c") == 0
        a = log.append([Append(0, payload("a"), 10), Append(1, payload("b"), 5)])
        assert log.pending_events("c") == 15
        log.commit("c", 0, a[0])
        assert log.pending_events("c") == 5
        assert log.pending_events("other") == 15

    def test_last_appended_at_tells_how_recent_a_partition_is(self, log: EventLog) -> None:
        assert log.last_appended_at(2) is None
        before = time.time()
        log.append([Append(2, payload("x"), 1)])
        appended = log.last_appended_at(2)
        assert appended is not None and before - 1 <= appended <= time.time() + 1

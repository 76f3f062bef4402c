"""The SQLite event log: the conformance suite, plus what only a local file can show (other processes, SIGKILL)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gamestream.log import Append, partition_for
from gamestream.log.sqlite import LogPartitionsMismatch, SqliteEventLog
from log_conformance import LogConformance, read_all


class TestSqliteConformance(LogConformance):
    @pytest.fixture
    def open_log(self, tmp_path: Path):
        return lambda partitions: SqliteEventLog(tmp_path / "log", partitions=partitions)


def test_log_is_in_wal_mode_with_full_sync(tmp_path: Path) -> None:
    log = SqliteEventLog(tmp_path / "log", partitions=2)
    try:
        log.append([Append(0, b"{}", 1)])
        connection = log._connection()
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert connection.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert (tmp_path / "log" / "events.sqlite").exists()
    finally:
        log.close()


def test_reopening_with_another_partition_count_is_refused(tmp_path: Path) -> None:
    SqliteEventLog(tmp_path / "log", partitions=4).close()
    with pytest.raises(LogPartitionsMismatch, match="has 4 partitions"):
        SqliteEventLog(tmp_path / "log", partitions=8)


def _append_from_process(directory: str, worker: int, count: int, queue) -> None:
    log = SqliteEventLog(Path(directory), partitions=3)
    acked = []
    for i in range(count):
        (offset,) = log.append([Append(i % 3, f"p{worker}-{i}".encode(), 1)])
        acked.append((i % 3, offset, f"p{worker}-{i}".encode()))
    log.close()
    queue.put(acked)


def test_appenders_in_several_processes_share_one_offset_sequence(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    SqliteEventLog(directory, partitions=3).close()
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_append_from_process, args=(str(directory), w, 200, queue)) for w in range(3)]
    for w in workers:
        w.start()
    acked = [entry for _ in workers for entry in queue.get(timeout=120)]
    for w in workers:
        w.join(timeout=60)
        assert w.exitcode == 0
    log = SqliteEventLog(directory, partitions=3)
    try:
        for partition in range(3):
            expected = sorted((offset, body) for p, offset, body in acked if p == partition)
            assert [(r.offset, r.payload) for r in read_all(log, partition)] == expected
    finally:
        log.close()


_KILLED_WRITER = """
import sys
from pathlib import Path
from gamestream.log import Append
from gamestream.log.sqlite import SqliteEventLog
log = SqliteEventLog(Path(sys.argv[1]), partitions=2)
i = 0
while True:
    batch = [Append(i % 2, b"%d" % (i * 100 + k), 1) for k in range(100)]
    offsets = log.append(batch)
    print(i, offsets[0], offsets[-1], flush=True)  # acknowledged: committed and fsync'd
    i += 1
"""


def test_sigkill_of_a_writer_loses_no_acknowledged_record(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    acked_total = 0
    for attempt in range(5):
        child = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(directory)], stdout=subprocess.PIPE,
                                 text=True)
        acked = []
        deadline = time.monotonic() + 0.3 + attempt * 0.1
        while time.monotonic() < deadline or not acked:
            line = child.stdout.readline()
            if line:
                acked.append(tuple(map(int, line.split())))
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        log = SqliteEventLog(directory, partitions=2)
        try:
            stored = {(p, r.offset) for p in range(2) for r in read_all(log, p, chunk=1000)}
        finally:
            log.close()
        for i, first, last in acked:
            for offset in range(first, last + 1):
                assert (i % 2, offset) in stored
        acked_total += len(acked)
    assert acked_total >= 5


def test_partition_for_is_stable_and_spreads_devices() -> None:
    assert partition_for("device-1", 4) == partition_for("device-1", 4)
    # CRC-32, not Python's per-process hash(): the same in every process, every release
    assert partition_for("device-1", 4) == 3073368697 % 4
    counts = [0] * 4
    for i in range(4000):
        counts[partition_for(f"device-{i}", 4)] += 1
    assert min(counts) > 800


def test_reopening_without_a_partition_count_takes_the_logs_own(tmp_path: Path) -> None:
    SqliteEventLog(tmp_path / "log", partitions=6).close()
    log = SqliteEventLog(tmp_path / "log", partitions=None)
    try:
        assert log.partitions == 6
    finally:
        log.close()
    fresh = SqliteEventLog(tmp_path / "other", partitions=None)
    try:
        assert fresh.partitions == 4
    finally:
        fresh.close()


OLD_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE heads (partition INTEGER PRIMARY KEY, last_offset INTEGER NOT NULL);
CREATE TABLE records (partition INTEGER NOT NULL, offset INTEGER NOT NULL, appended_at REAL NOT NULL,
                      events INTEGER NOT NULL, payload BLOB NOT NULL, PRIMARY KEY (partition, offset));
CREATE TABLE idempotency (key TEXT PRIMARY KEY, response BLOB NOT NULL, created_at REAL NOT NULL);
CREATE TABLE consumers (consumer TEXT NOT NULL, partition INTEGER NOT NULL, committed_offset INTEGER NOT NULL,
                        PRIMARY KEY (consumer, partition));
INSERT INTO meta VALUES ('partitions', '2');
INSERT INTO heads VALUES (0, 2), (1, 0);
INSERT INTO records VALUES (0, 1, 0, 3, x'7b7d'), (0, 2, 0, 4, x'7b7d');
"""


def test_the_backlog_of_a_log_written_before_totals_were_kept_counts_its_old_and_new_records(tmp_path: Path) -> None:
    """The backlog comes from running totals (two lookups, not a sum over the backlog's records); a log from an
    older gamestream gains the columns when opened, and its records without a total are summed."""
    import sqlite3

    (tmp_path / "log").mkdir()
    sqlite3.connect(tmp_path / "log" / "events.sqlite").executescript(OLD_SCHEMA)
    log = SqliteEventLog(tmp_path / "log", partitions=2)
    try:
        assert log.pending_events("c") == 7  # the old records alone
        log.append([Append(0, b"{}", 5), Append(1, b"{}", 6), Append(0, b"{}", 1)])
        assert [log.events_after(0, offset) for offset in range(6)] == [13, 10, 6, 1, 0, 0]
        assert log.pending_events("c") == 19
        log.commit("c", 0, 2)  # the old records read: totals alone from here on
        assert log.pending_events("c") == 12
        log.trim(0.0, now=time.time() + 10)  # committed records deleted: the backlog is unchanged
        assert log.pending_events("c") == 12
        log.commit("c", 0, 4)
        log.commit("c", 1, 1)
        assert log.pending_events("c") == 0
        totals = log._connection().execute("SELECT partition, offset, total FROM records ORDER BY 1, 2").fetchall()
        assert totals[-1] == (1, 1, 6)
    finally:
        log.close()


def test_payloads_are_stored_lz4_compressed_when_that_pays_and_read_back_as_appended(tmp_path: Path) -> None:
    """JSON lines are stored as an LZ4 block (~5x smaller here) with their expanded size; a payload that does
    not shrink by an eighth (random bytes, already compressed) or is small is stored as given. Every way of
    appending stores them so, and every record reads back byte for byte as appended — those of a log written
    before the column existed too (its records as they were)."""
    import os
    import sqlite3

    from gamestream.log import Idempotency

    lines = b"\n".join(b'{"eventId":"%08d","eventName":"level_up","eventParams":{"user_id":"u%d","level":%d}}'
                        % (i, i % 50, i % 7) for i in range(300))
    noise = os.urandom(20_000)
    (tmp_path / "log").mkdir()
    sqlite3.connect(tmp_path / "log" / "events.sqlite").executescript(OLD_SCHEMA)
    log = SqliteEventLog(tmp_path / "log", partitions=2)
    try:
        log.append([Append(0, lines, 300), Append(1, noise, 1), Append(1, b'{"small":1}', 1)])
        log.append_group_now([([Append(0, lines[:5000], 60)], None),
                              ([Append(1, lines[5000:], 240)], Idempotency("key", b"answer"))])
        stored = {(p, o): (size, len(payload)) for p, o, size, payload in log._connection().execute(
            "SELECT partition, offset, lz4_size, payload FROM records")}
        assert stored[0, 1] == stored[0, 2] == (None, 2)  # the old log's records, as they were
        assert stored[0, 3][0] == len(lines) and stored[0, 3][1] * 4 < len(lines)
        assert stored[1, 1] == (None, len(noise)) and stored[1, 2] == (None, len(b'{"small":1}'))
        assert stored[0, 4][0] == 5000 and stored[1, 3][0] == len(lines) - 5000
        assert [r.payload for r in log.read(0, 2, 10)] == [lines, lines[:5000]]
        assert [r.payload for r in log.read(1, 0, 10)] == [noise, b'{"small":1}', lines[5000:]]
        assert [r.payload for r in log.read(0, 0, 2)] == [b"{}", b"{}"]
    finally:
        log.close()


def test_a_group_appended_now_is_one_transaction_here_and_item_by_item_through_submit(tmp_path: Path) -> None:
    """`append_group_now` (the native front's appends): on the embedded log one transaction, its keys stored
    with their records and a used key replayed; the generic way (one submit per item, as on NATS or Kafka) gives
    an item the log refused its error, and stores the others."""
    from gamestream.log import Append, AppendResult, Idempotency
    from gamestream.log.base import LogFeatures

    log = SqliteEventLog(tmp_path / "log", partitions=2)
    try:
        first = log.append_group_now([([Append(0, b'{"a":1}', 1)], None),
                                      ([Append(1, b'{"b":1}', 1)], Idempotency("k", b"answer-1"))])
        assert first == [AppendResult([1]), AppendResult([1])]
        again = log.append_group_now([([Append(1, b'{"b":2}', 1)], Idempotency("k", b"answer-2")),
                                      ([Append(1, b'{"c":1}', 1)], None)])
        assert again == [AppendResult([], replayed=b"answer-1"), AppendResult([2])]
        generic = LogFeatures.append_group_now(log, [([Append(0, b'{"d":1}', 1)], None),
                                                     ([Append(5, b'{"e":1}', 1)], None)])  # no partition 5
        assert generic[0] == AppendResult([2]) and isinstance(generic[1], ValueError)
        assert [r.payload for p in (0, 1) for r in log.read(p, 0, 10)] == [b'{"a":1}', b'{"d":1}', b'{"b":1}',
                                                                           b'{"c":1}']
    finally:
        log.close()

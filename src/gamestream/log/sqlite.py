"""The embedded event log: one SQLite database in WAL mode.

Durability: `synchronous=FULL`, so a commit is fsync'd before `append` returns (in WAL mode NORMAL can lose the
last transactions on power loss). Appends from concurrent threads are group-committed: a writer thread takes
every append waiting in its queue and commits them in one transaction, so the fsync is paid per group, not per
caller. Appenders in other processes (a collector and a `load`, say) are serialised by SQLite's write lock;
each transaction reads and advances the partition heads inside `BEGIN IMMEDIATE`, so offsets stay unique and
growing across processes.

Payloads are stored LZ4-compressed (a raw block, its expanded size in `lz4_size`) when that saves at least an
eighth: JSON lines shrink ~5x, at ~0.4 ns a byte to compress and ~0.1 to expand, so SQLite writes each page
(once to the WAL, once more at the checkpoint) a fifth as often, and the fsync flushes a fifth of the pages.
Records that do not shrink (Arrow with compressed buffers, tiny ones) are stored as given (`lz4_size` NULL), as
is every record of a log written before this column existed. Readers get the payload as appended.

A full disk (SQLITE_FULL) fails the appends of the group that hit it — their callers learn it, the collector
answers 503 — and nothing else: SQLite rolls the transaction back, so no offset of a failed append is ever
visible or reused by a reader, and the writer thread takes the next group as usual, succeeding again as soon
as there is space.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Sequence

import pyarrow as pa

from gamestream.log.base import Append, AppendResult, Idempotency, LogFeatures, LogRecord, check_records

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- total: events ever appended to the partition (a record's total counts its own events too). The backlog past an
-- offset is the head's total less the total before the first record past it: two lookups, not a sum over every
-- record of the backlog (each a page or more of payload), which every collector reads twice a second.
CREATE TABLE IF NOT EXISTS heads (partition INTEGER PRIMARY KEY, last_offset INTEGER NOT NULL,
                                  total INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS records (
    partition INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    appended_at REAL NOT NULL,
    events INTEGER NOT NULL,
    payload BLOB NOT NULL,
    total INTEGER,  -- NULL in a record appended before totals were kept
    lz4_size INTEGER,  -- NULL: payload as appended, else an LZ4 block that expands to this many bytes
    PRIMARY KEY (partition, offset)
);
CREATE TABLE IF NOT EXISTS idempotency (key TEXT PRIMARY KEY, response BLOB NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS consumers (
    consumer TEXT NOT NULL,
    partition INTEGER NOT NULL,
    committed_offset INTEGER NOT NULL,
    PRIMARY KEY (consumer, partition)
);
"""

_INSERT_RECORDS = "INSERT INTO records (partition, offset, appended_at, events, payload, total, lz4_size) VALUES "
_ROW = "(?, ?, ?, ?, ?, ?, ?)"
_ROWS_PER_INSERT = 140  # 980 parameters a statement: under the 999 of SQLite builds before 3.32
_UPDATE_HEADS = "INSERT INTO heads (partition, last_offset, total) VALUES "
_ON_HEAD = " ON CONFLICT (partition) DO UPDATE SET last_offset = excluded.last_offset, total = excluded.total"

_BUSY_TIMEOUT_MS = 60_000
_MAX_GROUP = 512  # appends per group commit
IDEMPOTENCY_MIN_SECONDS = 24 * 3600  # keys are kept at least this long

logger = logging.getLogger(__name__)


_LZ4 = pa.Codec("lz4_raw")
_PACK_FROM_BYTES = 512  # a smaller payload is stored as given


def _packed(payload: bytes) -> tuple[bytes, int | None]:
    """`payload` as stored: an LZ4 block and its expanded size when that saves an eighth or more, else as it is
    with None."""
    if len(payload) >= _PACK_FROM_BYTES:
        packed = _LZ4.compress(payload, asbytes=True)
        if len(packed) * 8 <= len(payload) * 7:
            return packed, len(payload)
    return payload, None


def _unpacked(stored: bytes, size: int | None) -> bytes:
    return bytes(stored) if size is None else _LZ4.decompress(stored, decompressed_size=size, asbytes=True)


def _add_columns(connection: sqlite3.Connection) -> None:
    """Adds the columns a log created by an earlier version lacks (inside the opening transaction): `total`
    (its heads count from 0 and its older records have none: `events_after` sums those) and `lz4_size` (its
    records are as appended)."""
    if "total" not in {row[1] for row in connection.execute("PRAGMA table_info(heads)")}:
        connection.execute("ALTER TABLE heads ADD COLUMN total INTEGER NOT NULL DEFAULT 0")
    columns = {row[1] for row in connection.execute("PRAGMA table_info(records)")}
    if "total" not in columns:
        connection.execute("ALTER TABLE records ADD COLUMN total INTEGER")
    if "lz4_size" not in columns:
        connection.execute("ALTER TABLE records ADD COLUMN lz4_size INTEGER")


class LogPartitionsMismatch(ValueError):
    """The log exists with another partition count; partitions are fixed when the log is created."""


class SqliteEventLog(LogFeatures):
    """`EventLog` on SQLite. Thread-safe; several processes may open the same directory."""

    def __init__(self, directory: Path, *, partitions: int | None) -> None:
        if partitions is not None and partitions < 1:
            raise ValueError("partitions must be >= 1")
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "events.sqlite"
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._partitions = self._initialise(partitions)
        self._queue: queue.Queue[tuple[Sequence[Append], Idempotency | None, Future[AppendResult]] | None] = (
            queue.Queue())
        self._writer: threading.Thread | None = None
        self._writer_lock = threading.Lock()
        self._closed = False
        self.group_commits = 0  # transactions the writer committed (one fsync each), for /metrics

    # ------------------------------------------------------------------------------------------- connections
    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                     check_same_thread=False)
        connection.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")
        with self._connections_lock:
            self._connections.append(connection)
        return connection

    def _connection(self) -> sqlite3.Connection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = self._connect()
        return connection

    def _initialise(self, partitions: int | None) -> int:
        connection = self._connection()
        connection.execute("BEGIN IMMEDIATE")
        try:
            for statement in filter(str.strip, _SCHEMA.split(";")):
                connection.execute(statement)
            _add_columns(connection)
            row = connection.execute("SELECT value FROM meta WHERE key='partitions'").fetchone()
            if row is None:
                from gamestream.log.base import DEFAULT_PARTITIONS

                partitions = partitions or DEFAULT_PARTITIONS
                connection.execute("INSERT INTO meta VALUES ('partitions', ?)", (str(partitions),))
                connection.executemany("INSERT OR IGNORE INTO heads (partition, last_offset) VALUES (?, 0)",
                                       [(p,) for p in range(partitions)])
                existing = partitions
            else:
                existing = int(row[0])
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        if partitions is not None and existing != partitions:
            raise LogPartitionsMismatch(
                f"the log at {self.path} has {existing} partitions, not {partitions}; "
                f"use --partitions {existing} or a new data directory"
            )
        return existing

    @property
    def partitions(self) -> int:
        return self._partitions

    # ------------------------------------------------------------------------------------------------ append
    def append(self, records: Sequence[Append]) -> list[int]:
        """Appends durably; returns the offsets once the group's transaction is committed."""
        return self.submit(records).result().offsets

    def submit(self, records: Sequence[Append], idempotency: Idempotency | None = None) -> Future[AppendResult]:
        done: Future[AppendResult] = Future()
        if not records and idempotency is None:
            done.set_result(AppendResult([]))
            return done
        check_records(records, self._partitions)
        if self._closed:
            raise RuntimeError("the log is closed")
        self._ensure_writer()
        self._queue.put((records, idempotency, done))
        return done

    def append_group_now(self, group: Sequence[tuple[Sequence[Append], Idempotency | None]]
                         ) -> list[AppendResult | Exception]:
        """One transaction on the calling thread's connection (SQLite's write lock orders it with the writer
        thread's groups and other processes), fsync'd before it returns."""
        for records, _ in group:
            check_records(records, self._partitions)
        if self._closed:
            raise RuntimeError("the log is closed")
        if not group:
            return []
        results = self._commit_group(self._connection(), list(group))
        self.group_commits += 1
        return results

    def _ensure_writer(self) -> None:
        if self._writer is None:
            with self._writer_lock:
                if self._writer is None:
                    self._writer = threading.Thread(target=self._write_loop, name="log-writer", daemon=True)
                    self._writer.start()

    def _write_loop(self) -> None:
        """The writer thread: one transaction per group. A group that fails (disk full, …) fails its callers'
        futures and the loop goes on — it must outlive any error, or every later append would hang."""
        connection = self._connect()
        failing = False  # an episode of failed groups: warned about once, its end logged once
        while True:
            first = self._queue.get()
            if first is None:
                return
            group = [first]
            while len(group) < _MAX_GROUP:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)  # stop after this group
                    break
                group.append(item)
            try:
                results = self._commit_group(connection, [(records, key) for records, key, _ in group])
            except BaseException as error:  # every waiter learns of the failure; nothing was committed
                if not failing:
                    logger.warning("log append failed; failing the affected appends until it works again",
                                   extra={"appends": len(group), "error": type(error).__name__,
                                          "reason": str(error)})
                failing = True
                for *_, done in group:
                    done.set_exception(error)
                continue
            self.group_commits += 1
            if failing:
                logger.info("log appends succeed again", extra={"appends": len(group)})
                failing = False
            for (*_, done), result in zip(group, results):
                done.set_result(result)

    @staticmethod
    def _commit_group(connection: sqlite3.Connection,
                      group: list[tuple[Sequence[Append], Idempotency | None]]) -> list[AppendResult]:
        now = time.time()
        # compressed before the write lock is taken (it orders the other threads' and processes' appends)
        packed = [[_packed(record.payload) for record in records] for records, _ in group]
        connection.execute("BEGIN IMMEDIATE")
        try:
            heads = {partition: [offset, total] for partition, offset, total
                     in connection.execute("SELECT partition, last_offset, total FROM heads")}
            rows, keys, results = [], [], []
            seen_keys: dict[str, bytes] = {}
            for (records, idempotency), stored_records in zip(group, packed):
                if idempotency is not None:
                    stored = seen_keys.get(idempotency.key)
                    if stored is None:
                        row = connection.execute("SELECT response FROM idempotency WHERE key = ?",
                                                 (idempotency.key,)).fetchone()
                        stored = bytes(row[0]) if row else None
                    if stored is not None:
                        results.append(AppendResult([], replayed=stored))
                        continue
                    seen_keys[idempotency.key] = idempotency.response
                    keys.append((idempotency.key, idempotency.response, now))
                assigned = []
                for record, (stored, size) in zip(records, stored_records):
                    head = heads[record.partition]
                    head[0] += 1
                    head[1] += record.events
                    rows.append((record.partition, head[0], now, record.events, stored, head[1], size))
                    assigned.append(head[0])
                results.append(AppendResult(assigned))
            # Few statements, each for many rows: the sqlite3 module lets go of the GIL for every step, and an
            # event loop waiting for it takes it each time (two context switches), so a step per row cost more
            # than the rows themselves.
            for start in range(0, len(rows), _ROWS_PER_INSERT):
                chunk = rows[start:start + _ROWS_PER_INSERT]
                connection.execute(_INSERT_RECORDS + ", ".join([_ROW] * len(chunk)),
                                   [value for row in chunk for value in row])
            if keys:
                connection.executemany("INSERT INTO idempotency VALUES (?, ?, ?)", keys)
            appended = {row[0] for row in rows}
            moved = [(partition, offset, total) for partition, (offset, total) in heads.items()
                     if partition in appended]
            if moved:
                connection.execute(_UPDATE_HEADS + ", ".join(["(?, ?, ?)"] * len(moved)) + _ON_HEAD,
                                   [value for head in moved for value in head])
            connection.execute("COMMIT")  # synchronous=FULL: durable when this returns
        except BaseException:
            # On SQLITE_FULL, SQLite may already have rolled the transaction back itself; a second ROLLBACK would
            # fail and hide the error that matters.
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise
        return results

    # -------------------------------------------------------------------------------------------------- read
    def read(self, partition: int, after_offset: int, max_records: int) -> list[LogRecord]:
        rows = self._connection().execute(
            "SELECT offset, payload, lz4_size, events, appended_at FROM records "
            "WHERE partition = ? AND offset > ? ORDER BY offset LIMIT ?",
            (partition, after_offset, max_records),
        )
        return [LogRecord(partition, offset, _unpacked(stored, size), events, appended)
                for offset, stored, size, events, appended in rows]

    def last_offset(self, partition: int) -> int:
        row = self._connection().execute("SELECT last_offset FROM heads WHERE partition = ?", (partition,)).fetchone()
        return row[0] if row else 0

    def last_appended_at(self, partition: int) -> float | None:
        row = self._connection().execute(
            "SELECT appended_at FROM records WHERE partition = ? ORDER BY offset DESC LIMIT 1", (partition,)
        ).fetchone()
        return row[0] if row else None

    def events_after(self, partition: int, after_offset: int) -> int:
        """How many events partition `partition` holds past `after_offset` (the backlog): the head's total less
        the total before the first record past it, in one statement (one snapshot); summed record by record only
        while that record was appended before totals were kept."""
        connection = self._connection()
        row = connection.execute(
            "SELECT (SELECT total FROM heads WHERE partition = ?1) - (total - events) FROM records "
            "WHERE partition = ?1 AND offset > ?2 ORDER BY offset LIMIT 1",
            (partition, after_offset),
        ).fetchone()
        if row is None:
            return 0
        if row[0] is not None:
            return int(row[0])
        row = connection.execute(
            "SELECT COALESCE(SUM(events), 0) FROM records WHERE partition = ? AND offset > ?",
            (partition, after_offset),
        ).fetchone()
        return int(row[0])

    # ------------------------------------------------------------------------------------ consumers and trim
    def commit(self, consumer: str, partition: int, offset: int) -> None:
        # MAX(): a committed position only moves forward, whatever order the calls arrive in.
        self._connection().execute(
            "INSERT INTO consumers VALUES (?, ?, ?) ON CONFLICT (consumer, partition) "
            "DO UPDATE SET committed_offset = MAX(committed_offset, excluded.committed_offset)",
            (consumer, partition, offset),
        )

    def committed(self, consumer: str, partition: int) -> int:
        row = self._connection().execute(
            "SELECT committed_offset FROM consumers WHERE consumer = ? AND partition = ?", (consumer, partition)
        ).fetchone()
        return row[0] if row else 0

    def pending_events(self, consumer: str) -> int:
        return sum(self.pending_events_in(p, consumer) for p in range(self._partitions))

    def pending_events_in(self, partition: int, consumer: str) -> int:
        return self.events_after(partition, self.committed(consumer, partition))

    def trim(self, retention_seconds: float, now: float | None = None) -> int:
        now = time.time() if now is None else now
        cutoff = now - retention_seconds
        connection = self._connection()
        connection.execute("DELETE FROM idempotency WHERE created_at < ?",
                           (now - max(retention_seconds, IDEMPOTENCY_MIN_SECONDS),))
        deleted = 0
        for partition in range(self._partitions):
            row = connection.execute(
                "SELECT MIN(committed_offset), COUNT(*) FROM consumers WHERE partition = ?", (partition,)
            ).fetchone()
            safe_offset, consumers = row
            if not consumers:
                continue  # nobody has committed anything: nothing is safe to delete
            cursor = connection.execute(
                "DELETE FROM records WHERE partition = ? AND offset <= ? AND appended_at < ?",
                (partition, safe_offset, cutoff),
            )
            deleted += cursor.rowcount
        return deleted

    def check_writable(self) -> None:
        """Raises when the log cannot take a write lock (read-only file system, a stuck writer, …)."""
        connection = self._connection()
        connection.execute("BEGIN IMMEDIATE")
        connection.execute("ROLLBACK")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join()
        with self._connections_lock:
            for connection in self._connections:
                connection.close()
            self._connections.clear()

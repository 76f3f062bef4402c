"""Exactly once by event identity: an eventId lands in the events table once per window of arrival.

An Idempotency-Key covers one request; a mobile SDK that retries after a lost answer re-batches its queue under a
new key, `load` may run twice, a week-old queue may be flushed again. So the processor, which already commits
each log record once, also drops an event whose eventId has landed before:

- the same eventId with the same payload (a copy) is dropped and counted (`duplicates`);
- the same eventId with another payload keeps the first and sends the later one to `events_quarantine` with the
  reason `duplicate eventId with a different payload`;
- an eventId not seen in the window (`Settings.dedupe_days`, 7 days of arrival by default) lands.

The payload compared is what the device sent: eventName, eventParams with the device's own event time
(`client_event_time`, or for a `load`ed event without one its eventTime) and the unknown fields. The other times
are not part of it: a copy is received, and may be sent, at another time, and a collector without `sentAt` makes
its eventTime its receive time. Nor is `geo_country`: a copy may come through another network.

State, per log partition, where the device lives (every producer gamestream runs routes a device to one
partition, so a copy arrives on the partition of its first): in memory, sorted arrays of 64-bit id keys (an
eventId written as a UUID gives its own lower 64 bits, any other the lower half of its MD5: both stable across
versions) with a 64-bit fingerprint of the payload and the day of arrival (about 22 bytes an id with the runs'
bucket indexes); durably, the table `event_ids` (partitioned by log partition), appended after each events
commit with a txn per partition = the events version it covers + 1. A processor that gains a partition (or
starts) loads that partition's rows of the window and then reads, from the events table's change data feed,
every events version after the one `event_ids` covers that committed that partition: a crash between the events
commit and the `event_ids` commit loses nothing (the events table is the truth) and lets no copy in. Those
versions may hold other partitions' rows too; their ids are kept as well, which only catches more copies.

The keys and fingerprints come from `gamestream_native` (native/, Rust): the fingerprint is XXH3-64 chained
over the payload's non-null values in a fixed order, specified and stable across versions (an older gamestream
used DuckDB's `hash`: copies of the ids it recorded are quarantined as different payloads). Two different
eventIds whose 64-bit keys collide (about 3·10⁻⁴ expected over a window of 10⁸ ids) make the later one a
"different payload": it is quarantined, not lost.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from dataclasses import dataclass, field

import gamestream_native as native
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import ColumnProperties, WriterProperties

from gamestream.settings import Settings
from gamestream.tables import lake

logger = logging.getLogger(__name__)

TABLE = "event_ids"
CAUGHT_UP = -1  # the `logPartition` of ids a shared state caught up with (other processors' commits)
SERIAL = "identity"  # the txn appId every events commit sets in shared mode (`EventIds`): `<pipeline>-identity`
DIFFERENT_PAYLOAD = "duplicate eventId with a different payload"
SCHEMA = pa.schema([
    pa.field("logPartition", pa.int32()),
    pa.field("idKey", pa.int64()),
    pa.field("fingerprint", pa.int64()),
    pa.field("arrivedOn", pa.date32()),
])
PARTITION_BY = ["logPartition"]
# The keys and fingerprints are random 64-bit values: a Parquet dictionary of them is never smaller, and their
# statistics never skip a file (reads filter by partition and day). Without either, a write of 500,000 ids takes
# 31 ms of CPU instead of 75 ms, and 8.0 MB instead of 10.1 MB.
_RANDOM = ColumnProperties(dictionary_enabled=False, statistics_enabled="NONE")
WRITER = WriterProperties(column_properties={"idKey": _RANDOM, "fingerprint": _RANDOM})
_EPOCH = dt.date(1970, 1, 1)
COMMIT_IDS = 500_000
COMMIT_EVERY_S = 10.0
# The payload columns, in this order (a struct's fields by name, as `<column>.<field>`). The device's own event
# time is `client_event_time` when the collector received the event (it keeps the time as sent there), and
# `eventTime` when `load` read it from a file without one: the fingerprint takes the first that is set, so a copy
# that came the other way still matches. An event the device sent without any time has neither: the collector
# stamped `eventTime` = `receivedAt`, a time of the arrival, not of the event, so it is left out (a copy arriving
# a second later is still a copy).
_PAYLOAD = ["eventName", "eventParams", "eventParams_extra", "event_extra"]
_DEVICE_TIME = "eventParams.client_event_time"

_local = threading.local()
_LARGE_BATCH = 2048  # rows a decoded batch holds on average, from which `identity_keys` takes them as they are


def identity_keys(rows: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: the id key and the payload fingerprint (int64 views of unsigned 64-bit values), and whether the
    row has an eventId at all (one without is never a duplicate). Computed by `gamestream_native` (Rust) over
    the table's Arrow buffers, a record batch at a time."""
    n = rows.num_rows
    keys = np.zeros(n, dtype=np.uint64)
    prints = np.zeros(n, dtype=np.uint64)
    is_uuid = np.zeros(n, dtype=np.uint8)
    has_id = np.zeros(n, dtype=bool)
    start = 0
    received = ["receivedAt"] if "receivedAt" in rows.column_names else []
    table = rows.select(["eventId", "eventTime", *_PAYLOAD, *received])
    chunks = table.column(0).num_chunks
    if chunks > 1 and table.num_rows < _LARGE_BATCH * chunks:
        # small batches (a record of one request each) cost a dozen Arrow calls apiece: copied into one instead;
        # large ones (a `load` chunk each) are taken as they are (a copy of every payload column is dearer)
        table = table.combine_chunks()
    for batch in table.to_batches():
        rows_here = slice(start, start + batch.num_rows)
        start += batch.num_rows
        ids = _strings(batch.column(0))
        has_id[rows_here] = _valid(ids) if ids.null_count else True
        offsets, data = _string_buffers(ids)
        native.uuid_keys(offsets, data, keys[rows_here].view(np.uint8), is_uuid[rows_here])
        native.fingerprints(_payload_columns(batch), prints[rows_here].view(np.uint8))
    others = np.flatnonzero(has_id & (is_uuid == 0))
    if len(others):  # not a UUID: the lower half of its MD5 (DuckDB's md5_number_lower)
        keys[others] = _md5_keys(pc.cast(rows["eventId"], pa.string()).take(pa.array(others)))
    return keys.view(np.int64), prints.view(np.int64), has_id


def _payload_columns(batch: pa.RecordBatch) -> list[tuple]:
    """`gamestream_native.fingerprints`' columns for the payload of `batch`: (name, kind, validity bitmap or None,
    the array's offset, int32 offsets or None, data), the Arrow buffers as numpy byte views, not copied."""
    columns: list[tuple] = []
    event_time = batch.column("eventTime")
    if "receivedAt" in batch.schema.names:  # a time the collector stamped at arrival is no device time
        stamped = pc.fill_null(pc.equal(event_time, batch.column("receivedAt").cast(event_time.type)), False)
        event_time = pc.if_else(stamped, pa.scalar(None, event_time.type), event_time)

    def add(name: str, array: pa.Array) -> None:
        kind = array.type
        if pa.types.is_struct(kind):
            children = array.flatten()  # each field with the struct's own nulls applied
            for index in sorted(range(kind.num_fields), key=lambda i: kind.field(i).name):
                add(f"{name}.{kind.field(index).name}", children[index])
            return
        if name == _DEVICE_TIME:
            array = pc.coalesce(array, event_time.cast(array.type))
        if pa.types.is_null(kind) or array.null_count == len(array):
            return  # no value in any row: skipped, as a null is
        if pa.types.is_large_string(kind) or pa.types.is_large_binary(kind) or pa.types.is_string_view(kind) \
                or pa.types.is_binary_view(kind):
            array, kind = array.cast(pa.string()), pa.string()
        layout = next((code for test, code in _LAYOUTS if test(kind)), None)
        if layout is None:  # any other type: as 8-byte integers, or as text
            try:
                array = array.cast(pa.int64())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                array = array.cast(pa.string())
            add(name, array)
            return
        buffers = array.buffers()
        validity = _bytes(buffers[0]) if array.null_count and buffers[0] is not None else None
        offsets = _bytes(buffers[1]) if layout == _STRING else None
        columns.append((name, layout, validity, array.offset, offsets, _bytes(buffers[-1])))

    for name in _PAYLOAD:
        add(name, batch.column(name))
    return columns


_STRING, _INT64, _INT32, _FLOAT32, _BOOL = range(5)  # gamestream_native's column kinds
_LAYOUTS = [
    (lambda t: pa.types.is_string(t) or pa.types.is_binary(t), _STRING),
    (lambda t: t in (pa.int64(), pa.float64()) or pa.types.is_timestamp(t) or pa.types.is_date64(t), _INT64),
    (lambda t: t == pa.int32() or pa.types.is_date32(t), _INT32),
    (lambda t: t == pa.float32(), _FLOAT32),
    (pa.types.is_boolean, _BOOL),
]


def _bytes(buffer: pa.Buffer | None) -> np.ndarray:
    return np.frombuffer(buffer, dtype=np.uint8) if buffer is not None else np.empty(0, dtype=np.uint8)


def _strings(array: pa.Array) -> pa.StringArray:
    """`array` as a string array with int32 offsets."""
    if pa.types.is_string(array.type):
        return array
    if pa.types.is_binary(array.type) or pa.types.is_large_binary(array.type):
        return array.cast(pa.binary()).view(pa.string()) if pa.types.is_large_binary(array.type) \
            else array.view(pa.string())
    return array.cast(pa.string())


def _string_buffers(array: pa.StringArray) -> tuple[np.ndarray, np.ndarray]:
    """The int32 offsets (from the array's own offset on) and the value buffer of a string array, as bytes."""
    _, offsets, data = array.buffers()
    offsets = np.frombuffer(offsets, dtype=np.int32)[array.offset:array.offset + len(array) + 1]
    return offsets.view(np.uint8), _bytes(data)


def _valid(array: pa.Array) -> np.ndarray:
    return pc.is_valid(array).to_numpy(zero_copy_only=False)


def _md5_keys(ids: pa.StringArray) -> np.ndarray:
    """The lower half of each id's MD5, as DuckDB's md5_number_lower gives it (uint64)."""
    connection = getattr(_local, "duckdb", None)
    if connection is None:
        import duckdb

        connection = _local.duckdb = duckdb.connect()
    connection.register("ids", pa.table({"eventId": ids}))
    try:
        hashed = connection.sql("SELECT md5_number_lower(eventId)::UBIGINT AS k FROM ids").to_arrow_table()["k"]
    finally:
        connection.unregister("ids")
    return hashed.to_numpy()


@dataclass
class PartitionIds:
    """One partition's ids in the window: sorted runs of keys with their fingerprints and days of arrival, largest
    first, merged like a binary counter (a run is merged into the one before it once it is as large, in one pass
    over both: `gamestream_native.merge_runs`), so adding a batch costs O(log n) amortized per id and a lookup
    searches O(log n) runs, each in one bucket of its index. (Merged once a quarter of the size, as before, a
    million ids added in batches of 50,000 cost 45 ms of merging instead of 28.)"""

    events_offset: int | None = None  # the events table's offset of this partition these ids reflect
    events_version: int = 0  # the events table version they reflect
    runs: list[tuple] = field(default_factory=list)  # (keys, prints, days, index bits, bucket starts, fullest)

    def __len__(self) -> int:
        return sum(len(run[0]) for run in self.runs)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for run in self.runs for a in (run[0], run[1], run[2], run[4]))

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each key: whether it is held, and its fingerprint (meaningful where held). Sorted keys are
        searched fastest (see `_search`)."""
        found = np.zeros(len(keys), dtype=bool)
        prints = np.zeros(len(keys), dtype=np.int64)
        for run in self.runs:
            at, hit = _search(run, keys)
            hit &= ~found
            prints[hit] = run[1][at[hit]]
            found |= hit
        return found, prints

    def add(self, keys: np.ndarray, prints: np.ndarray, day: int | np.ndarray, *, unique: bool = False) -> None:
        """Adds ids the caller knows are not held (`judge`'s new ones; a load's rows), the first of each key;
        `unique`: the keys are already sorted and distinct (`judge`'s)."""
        if not len(keys):
            return
        days = np.broadcast_to(np.asarray(day, dtype=np.int32), keys.shape)
        if unique:
            self.runs.append(_run(keys, prints, np.array(days)))
        else:
            keys, first = np.unique(keys, return_index=True)
            self.runs.append(_run(keys, prints[first], days[first]))
        while len(self.runs) > 1 and len(self.runs[-1][0]) >= len(self.runs[-2][0]):
            newer = self.runs.pop()
            self.runs[-1] = _merged(self.runs[-1], newer)

    def expire(self, oldest_day: int) -> None:
        """Forgets ids that arrived before `oldest_day` (days since 1970)."""
        runs = [_run(*(a[run[2] >= oldest_day] for a in run[:3])) for run in self.runs]
        self.runs = sorted((r for r in runs if len(r[0])), key=lambda r: -len(r[0]))


_BUCKET_FILL = 8  # keys per bucket of a run's index, on average


def _run(keys: np.ndarray, prints: np.ndarray, days: np.ndarray) -> tuple:
    """A run (keys, prints, days, bits, bucket starts, fullest bucket) of sorted distinct keys, indexed by 2**bits
    buckets of the keys' top bits: a lookup searches a handful of neighbouring keys, not the whole run (a binary
    search over millions of keys misses the cache ~20 times a key). `gamestream_native` builds the index."""
    keys, prints, days = (np.ascontiguousarray(a) for a in (keys, prints, days.astype(np.int32, copy=False)))
    bits = max(1, min(30, int(np.log2(max(len(keys), 1) / _BUCKET_FILL) + 1)))
    starts = np.empty((1 << bits) + 1, dtype=np.int64)
    fullest = native.bucket_starts(keys.view(np.uint8), bits, starts.view(np.uint8))
    return keys, prints, days, bits, starts, fullest


def _search(run: tuple, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each key would be in `run` and whether it is there (`gamestream_native.find_in_run`: a binary
    search inside each key's bucket)."""
    at = np.empty(len(keys), dtype=np.int64)
    hit = np.empty(len(keys), dtype=np.uint8)
    native.find_in_run(run[0].view(np.uint8), run[3], run[4].view(np.uint8),
                       np.ascontiguousarray(keys, dtype=np.int64).view(np.uint8), at.view(np.uint8), hit)
    return at, hit.view(bool)


def _merged(a: tuple, b: tuple) -> tuple:
    """Runs a and b as one run (`gamestream_native.merge_runs`: one pass over both)."""
    n = len(a[0]) + len(b[0])
    keys, prints, days = np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.int32)
    native.merge_runs(*(x.view(np.uint8) for x in (a[0], a[1], a[2], b[0], b[1], b[2], keys, prints, days)))
    return _run(keys, prints, days)


@dataclass
class Verdict:
    """What deduplication made of one partition's rows: the rows to land, the copies dropped, and the rows that
    reuse an eventId with another payload (to quarantine); `new_*` are the ids to remember once committed."""

    rows: pa.Table
    copies: int
    conflicts: pa.Table
    new_keys: np.ndarray
    new_prints: np.ndarray


def judge(ids: PartitionIds, rows: pa.Table, keys: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
          ) -> Verdict:
    """Splits `rows` (one partition's, in log order) into first arrivals, copies and conflicting reuses, against
    the ids held and against the earlier rows of the same batch. `keys`: `identity_keys(rows)`, when known.

    One sort of the batch's keys does it all: adjacent equal keys are the batch's own repeats (rare: then the
    rows are split the slow way, `_judge_repeats`), the sorted keys are searched in the held runs fastest, and
    the new ones come out sorted and distinct, ready to join the state as a run."""
    keys, prints, has_id = keys if keys is not None else identity_keys(rows)
    rows_with_id = np.flatnonzero(has_id)
    order = rows_with_id[np.argsort(keys[rows_with_id])]
    sorted_keys = keys[order]
    if len(sorted_keys) > 1 and (sorted_keys[1:] == sorted_keys[:-1]).any():
        return _judge_repeats(ids, rows, keys, prints, has_id)
    held, held_prints = ids.find(sorted_keys)
    if not held.any():
        return Verdict(rows, 0, rows.slice(0, 0), sorted_keys, prints[order])
    keep = np.ones(rows.num_rows, dtype=bool)
    keep[order[held]] = False
    conflict = np.zeros(rows.num_rows, dtype=bool)
    conflict[order[held]] = held_prints[held] != prints[order[held]]
    new = order[~held]
    return _verdict(rows, keep, conflict, sorted_keys[~held], prints[new])


def _judge_repeats(ids: PartitionIds, rows: pa.Table, keys: np.ndarray, prints: np.ndarray, has_id: np.ndarray
                   ) -> Verdict:
    """`judge` for a batch that repeats an eventId: the first row of each key not held stands for it; later
    ones are copies or conflicts."""
    n = rows.num_rows
    keep = np.ones(n, dtype=bool)
    conflict = np.zeros(n, dtype=bool)
    held, held_prints = ids.find(keys)
    held &= has_id
    keep[held] = False
    conflict[held] = held_prints[held] != prints[held]
    fresh = np.flatnonzero(has_id & ~held)
    unique, first, inverse = np.unique(keys[fresh], return_index=True, return_inverse=True)
    first_rows = fresh[first]
    later = fresh[fresh != first_rows[inverse]]
    later_first = first_rows[inverse[np.searchsorted(fresh, later)]]
    keep[later] = False
    conflict[later] = prints[later] != prints[later_first]
    return _verdict(rows, keep, conflict, unique, prints[first_rows])


def _verdict(rows: pa.Table, keep: np.ndarray, conflict: np.ndarray, new_keys: np.ndarray, new_prints: np.ndarray
             ) -> Verdict:
    copies = int((~keep & ~conflict).sum())
    return Verdict(rows.filter(pa.array(keep)), copies, rows.filter(pa.array(conflict)), new_keys, new_prints)


def today(now: float | None = None) -> int:
    """Days since 1970 (UTC), the unit of `arrivedOn`."""
    return int((time.time() if now is None else now) // 86400)


class EventIds:
    """The processor's deduplication state: `PartitionIds` per owned partition, backed by the `event_ids` table
    (see the module docstring). Used from the processor's commit thread only.

    `shared`: the stream's producers need not route a device to one partition (Kinesis: the reference Lambda's
    random partition keys), so a copy may arrive on any partition. Then one state holds the ids of every
    partition (`shared_state`): loaded from all of `event_ids`, and before each judgement caught up with every
    events version committed since (`catch_up`: other processors' commits, read from the change data feed). The
    events commits of all processors are serialised by a txn appId they all set (`SERIAL`): of two
    processors committing at once, one conflicts, catches up with the other's commit and judges again."""

    def __init__(self, settings: Settings, *, shared_partitions: int | None = None) -> None:
        """`shared_partitions`: the stream's partition count, for a stream whose copies may arrive on any
        partition (see the class docstring); None: per partition."""
        self.settings = settings
        self.shared_partitions = shared_partitions
        self.shared_state: PartitionIds | None = PartitionIds() if shared_partitions is not None else None
        self._shared_loaded = False
        self.window_days = max(1, int(np.ceil(settings.dedupe_days)))
        self.table = lake.open_or_create(settings.table_uri(TABLE), SCHEMA, PARTITION_BY)
        self.app_ids: dict[int, str] = {}
        self.partitions: dict[int, PartitionIds] = {}
        self.stop: threading.Event | None = None  # ends a commit waiting for disk space (the processor's stop)
        self._pending: list[pa.Table] = []  # ids remembered, not in `event_ids` yet
        self._pending_ids = 0
        self._covered: int | None = None  # the events version the pending ids reach
        self._committed_at = time.monotonic()
        self._expired_day = today()

    def app_id(self, partition: int) -> str:
        if partition not in self.app_ids:
            self.app_ids[partition] = lake.txn_app_id(self.settings.pipeline, partition, TABLE)
        return self.app_ids[partition]

    def oldest_day(self) -> int:
        return today() - self.window_days + 1

    def drop(self, partitions) -> None:
        """Forgets partitions no longer owned (their next owner loads them from the tables)."""
        for partition in partitions:
            self.partitions.pop(partition, None)

    def current(self, partition: int, events_offset: int) -> bool:
        held = self.partitions.get(partition)
        return held is not None and held.events_offset == events_offset

    def _start(self, partitions: list[int], events_version: int) -> None:
        """Marks `partitions` as covered up to `events_version` in `event_ids` (one empty commit with their txns)."""
        ids = [self.app_id(p) for p in partitions]
        lake.commit_exactly_once(
            self.table, ids, lambda versions: lake.Batch(SCHEMA.empty_table(), {
                app_id: events_version + 1 for app_id in ids if versions.get(app_id, 0) <= events_version}) if any(
                versions.get(app_id, 0) <= events_version for app_id in ids) else None,
            partition_by=PARTITION_BY, retries=self.settings.commit_retries, name=TABLE, stop=self.stop)

    def catch_up(self, events, partitions) -> PartitionIds:
        """The shared state (`shared`), loaded once from `event_ids` and then caught up with every version of
        `events` (the DeltaTable about to be committed to, at its snapshot) it does not reflect yet; `partitions`:
        the ones this processor is about to commit."""
        state = self.shared_state
        assert state is not None
        if not self._shared_loaded:
            self._load_shared(events, partitions)
        head = events.version()
        if head > state.events_version:
            rows = _rows_of_versions(events, list(range(state.events_version + 1, head + 1)))
            keys, prints, has_id = identity_keys(rows)
            day = today()
            state.add(keys[has_id], prints[has_id], day)
            # written to `event_ids` with this processor's next commit there (under partition -1: the shared load
            # reads every partition's rows), which moves its partitions' txns past these versions
            self._hold_for_commit(CAUGHT_UP, keys[has_id], prints[has_id], day)
            state.events_version = head
        return state

    def _load_shared(self, events, partitions) -> None:
        """Every partition's `event_ids` rows of the window, then the ids of the events versions after the least
        version those rows cover (a processor's ids not in `event_ids` yet, or lost in a crash).

        In order: this processor's partitions that `event_ids` has never covered are marked covered from the events
        table's version now (their window starts here, as on a first load per partition); then every partition's
        txn is read. A partition with none has had no events commit with deduplication: its owner marks it before
        its first, so one that started after this read commits after the version read here, and is caught up."""
        started = time.perf_counter()
        self.table.update_incremental()
        head = events.version()
        fresh = [p for p in partitions if self.table.transaction_version(self.app_id(p)) is None]
        if fresh:
            self._start(fresh, head)
        self.table.update_incremental()
        txns = [v for v in (self.table.transaction_version(self.app_id(p))
                            for p in range(max(self.shared_partitions or 0, *partitions) + 1)) if v]
        stored = self.table.to_pyarrow_dataset().to_table(
            columns=["idKey", "fingerprint", "arrivedOn"],
            filter=pc.field("arrivedOn") >= pa.scalar(_EPOCH + dt.timedelta(days=self.oldest_day()), pa.date32()))
        state = self.shared_state
        assert state is not None
        days = pc.cast(stored["arrivedOn"], pa.int32()).to_numpy() if stored.num_rows else np.empty(0, np.int32)
        state.add(stored["idKey"].to_numpy(), stored["fingerprint"].to_numpy(), days)
        state.events_version = min(txns) - 1 if txns else head
        self._shared_loaded = True
        logger.info("event ids loaded for the whole stream (partition keys need not follow devices)", extra={
            "ids": len(state), "from_events_version": state.events_version,
            "seconds": round(time.perf_counter() - started, 3)})

    def load(self, offsets: dict[int, int], events_table_uri: str, events_app_ids: dict[int, str]) -> None:
        """Each partition of `offsets` (partition → its offset in the events table) as the tables hold it now: its
        `event_ids` rows of the window, then the ids of the events versions after the one those cover that
        committed the partition (a crash between the two commits). One scan and one pass over the commits for
        all of them."""
        started = time.perf_counter()
        partitions = sorted(offsets)
        self.table.update_incremental()
        txns = {p: self.table.transaction_version(self.app_id(p)) for p in partitions}  # events version covered + 1
        events = lake.open_table(events_table_uri)
        head = events.version()
        first = [p for p, txn in txns.items() if txn is None]
        if first:  # a partition's first load: its window starts here (events before are not known)
            self._start(first, head)
            txns.update({p: head + 1 for p in first})
        covered = {p: txn - 1 for p, txn in txns.items()}  # type: ignore[operator]
        stored = self.table.to_pyarrow_dataset().to_table(
            columns=["logPartition", "idKey", "fingerprint", "arrivedOn"],
            filter=pc.field("logPartition").isin(partitions) & (pc.field("arrivedOn") >= pa.scalar(
                _EPOCH + dt.timedelta(days=self.oldest_day()), pa.date32())))
        owners = stored["logPartition"].to_numpy()
        keys, prints = stored["idKey"].to_numpy(), stored["fingerprint"].to_numpy()
        days = pc.cast(stored["arrivedOn"], pa.int32()).to_numpy() if stored.num_rows else np.empty(0, np.int32)
        since = min(covered.values())
        actions = lake.txn_app_ids_of(events_table_uri, range(since + 1, head + 1)) if since < head else {}
        for partition in partitions:
            held = PartitionIds()
            mine = owners == partition
            held.add(keys[mine], prints[mine], days[mine])
            missed = [v for v, moved in actions.items() if v > covered[partition]
                      and (moved is None or events_app_ids[partition] in moved)]
            caught = 0
            if missed:
                rows = _rows_of_versions(events, missed)
                row_keys, row_prints, has_id = identity_keys(rows)
                held.add(row_keys[has_id], row_prints[has_id], today())
                caught = int(has_id.sum())
                # Kept for `event_ids` too: this processor's next commit there moves the partition's txn past
                # these versions, so ids another processor committed and never wrote there (it was killed, or
                # lost the partition first) must be written with it, or the next owner would not find them.
                self._hold_for_commit(partition, row_keys[has_id], row_prints[has_id], today())
            held.events_offset, held.events_version = offsets[partition], head
            self.partitions[partition] = held
            logger.info("event ids loaded", extra={
                "partition": partition, "ids": len(held), "from_events_versions": len(missed),
                "caught_up_ids": caught, "seconds": round(time.perf_counter() - started, 3)})

    def remember(self, verdicts: dict[int, Verdict], events_version: int, last_offsets: dict[int, int]) -> None:
        """After the events commit `events_version` (which took `last_offsets`): the new ids join each partition's
        state, and wait for the next `commit` to `event_ids`."""
        day = today()
        for partition, verdict in verdicts.items():
            held = self.shared_state if self.shared_state is not None else self.partitions[partition]
            held.add(verdict.new_keys, verdict.new_prints, day, unique=True)
            self._hold_for_commit(partition, verdict.new_keys, verdict.new_prints, day)
        for partition, offset in last_offsets.items():
            if partition in self.partitions:
                self.partitions[partition].events_offset = offset
        for held in self.partitions.values():
            held.events_version = events_version
        if self.shared_state is not None:
            self.shared_state.events_version = events_version
            for partition in verdicts:
                self.partitions[partition] = self.shared_state  # what `commit` names the txns of
        self._covered = events_version

    def _hold_for_commit(self, partition: int, keys: np.ndarray, prints: np.ndarray, day: int) -> None:
        """Ids of `partition` to append to `event_ids` with the next `commit`."""
        if len(keys):
            self._pending.append(pa.table({
                "logPartition": pa.array(np.full(len(keys), partition, dtype=np.int32)),
                "idKey": pa.array(keys), "fingerprint": pa.array(prints),
                "arrivedOn": pa.array(np.full(len(keys), day, dtype=np.int32)).cast(pa.date32()),
            }, schema=SCHEMA))
            self._pending_ids += len(keys)

    def commit_due(self) -> bool:
        """Whether the ids remembered since the last commit should go to `event_ids` now: many of them, or a
        while since. Committing less often costs only a longer catch-up after a crash (from the events table)."""
        return self._covered is not None and (
            self._pending_ids >= COMMIT_IDS or time.monotonic() - self._committed_at >= COMMIT_EVERY_S)

    def commit(self, stop: threading.Event | None = None) -> None:
        """Appends the remembered ids to `event_ids`, with the txn of every partition held = the events version
        they cover (so a later load reads the events table only after it)."""
        version = self._covered
        if version is None:
            return
        rows = pa.concat_tables(self._pending) if self._pending else SCHEMA.empty_table()
        owned = sorted(self.partitions)
        ids = [self.app_id(p) for p in owned]

        def build(versions: dict[str, int]) -> lake.Batch | None:
            behind = {app_id: version + 1 for app_id in ids if versions.get(app_id, 0) < version + 1}
            return lake.Batch(rows, behind) if behind or rows.num_rows else None

        lake.commit_exactly_once(self.table, ids, build, partition_by=PARTITION_BY,
                                 retries=self.settings.commit_retries, name=TABLE, stop=stop,
                                 context={"events_version": version}, writer_properties=WRITER)
        self._pending, self._pending_ids, self._covered = [], 0, None
        self._committed_at = time.monotonic()
        if self._expired_day != today():  # a new day: the ids that left the window leave the memory too
            self.expire()

    def expire(self) -> None:
        """Forgets the ids that arrived before the window (the maintenance deletes their `event_ids` rows)."""
        self._expired_day = today()
        oldest = self.oldest_day()
        shared = [self.shared_state] if self.shared_state is not None else []
        for held in {id(h): h for h in [*self.partitions.values(), *shared]}.values():
            held.expire(oldest)


def _rows_of_versions(events, versions: list[int]) -> pa.Table:
    """The rows versions `versions` of the events table added (their change data feed), the columns the keys
    are made of."""
    columns = ["eventId", "eventTime", *_PAYLOAD]
    target = lake.arrow_schema_of(events)
    parts = []
    for first, last in _runs(versions):
        reader = events.load_cdf(starting_version=first, ending_version=last,
                                 columns=[f'"{c}"' for c in columns] + ["_change_type"])
        table = pa.table(reader.read_all())
        if table.num_rows:  # the change data feed hands out string_view columns: back to the table's types
            plain = pa.table({c: pc.cast(table[c], target.field(c).type) for c in columns})
            parts.append(plain.filter(pc.equal(pc.cast(table["_change_type"], pa.string()), "insert")))
    return pa.concat_tables(parts) if parts else pa.schema([target.field(c) for c in columns]).empty_table()


def _runs(versions: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for version in sorted(versions):
        if runs and version == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], version)
        else:
            runs.append((version, version))
    return runs

"""The processor: log partitions → micro-batches → the Delta `events` table, exactly once.

A processor works on the partitions its `Ownership` gives it (gamestream/log/ownership.py): a fixed set held by lock
files on one machine (all of them by default, or `--only`), or a share of them held by leases on the NATS cluster,
which changes as processors join, stop and die. At the start of each round it follows the changes:

- a partition gained starts from its committed position, read from the events table's txn version (the table is
  the source of truth; whoever owned it before may have committed up to the moment its lease lapsed);
- a partition lost drops the records read but not committed: the new owner re-reads them from that position;
- a partition beyond this processor's fair share (another processor joined) is committed, then released.

Right before a flush, partitions whose lease lapsed meanwhile are dropped as lost.

Each micro-batch is flushed when it holds `batch_max_events` events or its oldest record has waited
`batch_max_wait_s`, and becomes

1. one commit to `events_quarantine` (only when some rows failed validation), carrying txn
   `<pipeline>-events_quarantine-p<p>` = the batch's last offset of p for every partition p in the batch, then
2. one commit to `events` carrying txn `<pipeline>-p<p>` = the batch's last offset of p, for every p — even when
   every row was quarantined, so the position always moves.

I/O and CPU overlap: records are decoded as they are read (`decode_records` per read), and a flush's commits run
on a worker thread (delta-rs releases the GIL while it writes Parquet and the commit), while the loop reads and
decodes the next batch. At most one flush is in flight; its results (positions, statistics, the KPI stage's
rows, the log's bookkeeping) are applied on the loop's thread when it completes, before the next flush starts and
before any change of ownership is acted on — so everything below holds as if flushes were synchronous.

Both commits go through `lake.commit_exactly_once`, which skips the offsets each table already has; a crash
between 1 and 2 replays the batch, and each table takes only what it lacks. The same check fences a stale owner:
a processor paused past its lease that wakes up and flushes before noticing finds the new owner's txn versions
(its commit conflicts with theirs, is retried from a fresh read of the versions) and commits only what is missing
— nothing, if the new owner got there first. The position a restart resumes from is the `events` table's txn
version, read from Delta itself: the log's own record of consumer positions is only used to know what may be
trimmed.

A full disk stops nothing for good: a commit that fails for want of space is retried (`lake.CommitRetries`)
until space is freed, then the same batch is committed — exactly once, because every attempt re-reads the txn
versions first. Meanwhile nothing is acknowledged that is not in the log, and the log keeps every record the
processor has not committed, so a processor stopped while waiting loses nothing either.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import ColumnProperties, DeltaTable, WriterProperties

from gamestream import metrics, schema
from gamestream.errors import OffsetsWentBack, is_out_of_space
from gamestream.log import EventLog, LogRecord, LogUnavailable
from gamestream.log.ownership import (
    Ownership,
    PartitionBusy,
    ProcessLocks,
    open_ownership,
)
from gamestream.process import identity as identity_mod
from gamestream.process.decode import Decoded, decode_records
from gamestream.schema import PARTITION_COLUMN
from gamestream.settings import Settings
from gamestream.shutdown import stop_on_signals
from gamestream.tables import lake
from gamestream.tables.forgotten import ForgottenDevices

_READ_CHUNK = 1000  # records per log read
_TRIM_EVERY_S = 60.0
_LOG_RETRY_S = 0.5  # pause between rounds while the log is unavailable
_LAG_EVERY_S = 1.0  # the per-partition lag gauges cost a query per partition: at most this often

logger = logging.getLogger(__name__)

__all__ = ["PartitionBusy", "ProcessLocks", "Processor", "ProcessorStats"]  # the first two live in ownership


@dataclass
class ProcessorStats:
    events_committed: int = 0
    events_quarantined: int = 0
    duplicates_dropped: int = 0  # copies of an eventId already landed (process/identity.py)
    commits: int = 0
    batches_skipped: int = 0  # flushes that found everything already committed
    positions: dict[int, int] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)


@dataclass
class _Flush:
    """A flush handed to the commit thread: what it covers, and (once done) what it committed."""

    future: Future
    last_offsets: dict[int, int]
    events_read: int
    built: dict[str, int] = field(default_factory=dict)  # rows each table's last attempt built
    built_rows: dict[str, pa.Table] = field(default_factory=dict)
    metadata: dict[str, dict[str, str]] = field(default_factory=dict)  # commitInfo positions each table's last build stamped
    greatest_times: dict[int, int] = field(default_factory=dict)  # partition → greatest eventTime (µs) committed
    quarantine_seconds: float | None = None
    events_version: int | None = None
    events_seconds: float = 0.0
    committed_before: dict[int, int] = field(default_factory=dict)  # each partition's offset before the batch
    verdicts: dict[int, identity_mod.Verdict] = field(default_factory=dict)  # deduplication, as the events build saw it
    duplicates: int = 0  # copies of events already landed, dropped by the events commit
    # (partition, eventId) of the reuses the quarantine commit took (a shared deduplication state); None when
    # this flush made no quarantine build (the table had its offsets already)
    conflicts_quarantined: set[tuple[int, str]] | None = None


class _AppIds(dict):
    """Partition → txn appId of one table, made on first use (a resharded log gains partitions)."""

    def __init__(self, pipeline: str, table: str) -> None:
        super().__init__()
        self.pipeline, self.table = pipeline, table

    def __missing__(self, partition: int) -> str:
        app_id = self[partition] = lake.txn_app_id(self.pipeline, partition, self.table)
        return app_id


EVENTS_WRITER = WriterProperties(column_properties={
    "eventId": ColumnProperties(dictionary_enabled=False, encoding="DELTA_LENGTH_BYTE_ARRAY")})
"""The events table's Parquet writer: eventIds (unique, random) without a dictionary, which never pays for them
(the writer builds one up to its page limit, then falls back): a commit of 100,000 events took ~25 % less CPU
(0.16-0.17 s against 0.22-0.27 s for 300,000 rows in three commits) for files 2.7 % larger, with lengths
delta-encoded (plain: 10.5 % larger). Every Parquet reader here reads the encoding (DuckDB, pyarrow, Spark 3.3+)."""


@dataclass(frozen=True)
class _TableWrite:
    """How a flush writes one of its two tables (quarantine, events): which table and txn appIds, which rows of
    the decoded batch, and how an empty or configuration-older batch is treated."""

    key: str  # the flush's record of this write (`_Flush.built`, `.metadata`)
    name: str  # the table's name, for the commit's retries, logs and metrics
    table: DeltaTable
    app_ids: _AppIds
    positions: lake.TxnPositions
    rows_of: Callable[[Decoded], pa.Table]
    partition_by: list[str] | None
    conforms_rows: bool  # to the table as it is now: it may have columns this configuration lacks
    commits_when_empty: bool  # a commit even with no row: the position moves
    stamps_greatest_times: bool = False  # the commit records each partition's greatest eventTime (the watermark's)
    counts_duplicates: str | None = None  # the pipeline whose copies-dropped counters the commit moves
    writer_properties: WriterProperties | None = None  # the Parquet writer's (None: delta-rs' defaults)

    @property
    def serial_app_id(self) -> str | None:
        """The txn appId every events commit moves when the stream's partitions share one identity state
        (`identity.SERIAL`: concurrent commits then conflict); None for a table that counts no duplicates."""
        return lake.txn_app_id(self.counts_duplicates, stage=identity_mod.SERIAL) if self.counts_duplicates else None

    def should_skip(self, rows: pa.Table) -> bool:
        """A batch with no row for this table makes no commit, unless the commit must move the position."""
        return not self.commits_when_empty and rows.num_rows == 0


class _BatchDecoder:
    """A flush's records decoded after given positions: the whole batch as it was decoded while read, or (a
    table that has part of the batch already) decoded again, once per distinct starting point — normally never.
    Kept per log partition, so a commit can say how far in event time each partition went."""

    def __init__(self, records: list[LogRecord], decoded_as_read: dict[int, list[Decoded]],
                 params: schema.Params, identity: "_Identity | None" = None,
                 events_table: DeltaTable | None = None) -> None:
        """`events_table`: the DeltaTable the events commit writes with (a shared deduplication state is caught
        up with it before judging)."""
        self.records, self.decoded_as_read, self.params = records, decoded_as_read, params
        self.identity = identity
        self.events_table = events_table
        self._decoded: dict[tuple, dict[int, list[Decoded]]] = {}
        self._verdicts: dict[tuple, dict[int, identity_mod.Verdict]] = {}

    def _by_partition(self, after: dict[int, int]) -> dict[int, list[Decoded]]:
        if all(r.offset > after[r.partition] for r in self.records):  # the whole batch: decoded while read
            return self.decoded_as_read
        key = tuple(sorted(after.items()))
        if key not in self._decoded:
            self._decoded.clear()
            self._decoded[key] = {p: [decode_records([r for r in self.records if r.partition == p and
                                                      r.offset > after[p]], params=self.params)]
                                  for p in self.decoded_as_read}
        return self._decoded[key]

    def after(self, after: dict[int, int], expected: dict[int, int] | None = None) -> Decoded:
        """The batch's rows after `after`; with deduplication by eventId, without the copies of events already in
        the events table, and with the reuses of an eventId for another payload among the quarantine rows.
        `expected`: the events table's offset per partition the deduplication state must reflect (`after`
        itself for the events table's own build)."""
        decoded = [d for parts in self._by_partition(after).values() for d in parts]
        quarantine = [q for d in decoded for q in d.quarantine]
        if self.identity is None:
            return Decoded(events=[t for d in decoded for t in d.events], quarantine=quarantine)
        verdicts = self.verdicts(after, expected or after)
        conflicts = [_conflict_row(p, row) for p, v in verdicts.items() if v.conflicts.num_rows
                     for row in v.conflicts.to_pylist()]
        return Decoded(events=[v.rows for v in verdicts.values()], quarantine=quarantine + conflicts)

    def verdicts(self, after: dict[int, int], expected: dict[int, int]) -> dict[int, identity_mod.Verdict]:
        """Per partition, what deduplication makes of its rows after `after` (computed once per starting point,
        and per version of the events table when the state is shared by the stream's partitions: a commit
        retried after another processor's judges again)."""
        assert self.identity is not None
        events = self.events_table if self.identity.ids.shared_state is not None else None
        key = (tuple(sorted(after.items())), tuple(sorted(expected.items())),
               events.version() if events is not None else None)
        if key not in self._verdicts:
            verdicts = {}
            by_partition = self._by_partition(after)
            states = self.identity.states({p: expected[p] for p in by_partition}, events)
            for partition, parts in by_partition.items():
                tables = [t for d in parts for t in d.events]
                rows = pa.concat_tables(tables) if tables else schema.arrow_schema(params=self.params).empty_table()
                keys = None
                if tables and all(d.keys is not None for d in parts):  # computed as read
                    computed = [k for d in parts for k in d.keys]  # type: ignore[union-attr]
                    keys = tuple(np.concatenate([k[i] for k in computed]) for i in range(3))
                verdicts[partition] = identity_mod.judge(states[partition], rows, keys)
            self._verdicts[key] = verdicts
        return self._verdicts[key]

    def greatest_times(self, after: dict[int, int]) -> dict[int, int]:
        """Partition → the greatest eventTime (µs) of its events after `after`: how far each partition went in
        event time, which the KPI stage's watermark takes from the commit rather than guessing a row's partition."""
        greatest: dict[int, int] = {}
        for partition, parts in self._by_partition(after).items():
            times = [pc.max(t["eventTime"]).cast(pa.timestamp("us", tz="UTC")) for d in parts for t in d.events
                     if t.num_rows]
            values = [v.value for v in times if v.is_valid]
            if values:
                greatest[partition] = max(values)
        return greatest


def _conflict_row(partition: int, row: dict) -> dict:
    """A quarantine row for an event whose eventId landed before with another payload."""
    now = dt.datetime.now(dt.timezone.utc)
    return {"quarantinedAt": now, "reason": identity_mod.DIFFERENT_PAYLOAD,
            "payload": _ENCODER.encode(_without_nulls(row)).decode(), "logPartition": partition, "logOffset": None,
            "quarantineDate": now.date()}


_ENCODER = msgspec.json.Encoder()


def _without_nulls(row: dict) -> dict:
    return {k: _without_nulls(v) if isinstance(v, dict) else v for k, v in row.items() if v is not None}


@dataclass
class _Identity:
    """The processor's deduplication state (`identity.EventIds`) with what loading a partition needs."""

    ids: identity_mod.EventIds
    events_uri: str
    app_ids: "_AppIds"

    def states(self, offsets: dict[int, int], events: DeltaTable | None = None
               ) -> dict[int, identity_mod.PartitionIds]:
        """Each partition's ids reflecting the events table at its offset in `offsets`: held, or (those not held,
        or held for another offset) loaded from the tables, together. A stream whose copies may arrive on any
        partition: the one shared state, caught up with `events` (the table at the snapshot to commit to)."""
        if self.ids.shared_state is not None:
            assert events is not None
            state = self.ids.catch_up(events, sorted(offsets))
            return {p: state for p in offsets}
        stale = {p: o for p, o in offsets.items()
                 if (held := self.ids.partitions.get(p)) is None or held.events_offset != o}
        if stale:
            self.ids.load(stale, self.events_uri, {p: self.app_ids[p] for p in stale})
        return {p: self.ids.partitions[p] for p in offsets}


class Processor:
    def __init__(self, settings: Settings, log: EventLog, partitions: list[int] | None = None, *,
                 ownership: Ownership | None = None) -> None:
        """Works on what `ownership` gives it; without one, on `partitions` (all by default) held by lock files,
        or by leases when `settings.log` is a `nats://` URL (`ownership.open_ownership`). An ownership it opened
        itself is closed when `run` returns; one passed in is only released of its partitions (its roles, such
        as the KPI stage's, are the caller's)."""
        self.settings = settings
        self.log = log
        if ownership is not None and partitions is not None:
            raise ValueError("give either partitions or an ownership, not both")
        self._closes_ownership = ownership is None
        self.ownership: Ownership = ownership or open_ownership(settings, log.partitions, partitions)
        try:
            self._open_tables()
        except BaseException:
            if self._closes_ownership:
                self.ownership.close()
            raise
        # events of a forgotten device still in the log are not committed again (`gamestream forget`); asked in
        # each build, on the commit thread, so a build after the forget's registration drops them
        self._forgotten = ForgottenDevices(settings)
        self._quarantine_write, self._events_write = self._table_writes()
        self._drained_parents: set[int] = set()  # closed partitions read to their end (a resharded Kinesis stream)
        self._read_to_end: set[int] = set()  # owned partitions whose latest read found nothing after what was read
        self._full_reads: set[int] = set()  # owned partitions whose latest read took all it asked for (a backlog)
        self._observer_table: DeltaTable | None = None
        self._observed_at = 0.0
        self._parent_checked_at: dict[int, float] = {}
        self.stats = ProcessorStats()
        self._terms: dict[int, int] = {}  # owned partition → the term of ownership its position was read in
        self._pending: dict[int, list[LogRecord]] = {}
        self._decoded: dict[int, list[Decoded]] = {}  # per partition: its pending records, decoded as read
        self._in_flight: _Flush | None = None
        self._landed: dict[int, int] = {}  # partition → the last offset in the events table (the commit thread's)
        self._landing = threading.Condition()  # notified when `_landed` moves
        self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gamestream-commit")
        self._pending_events = 0
        self._pending_since: float | None = None
        self._events_per_record = settings.batch_max_events  # no estimate yet: the first read takes 1 record
        self._last_trim = time.monotonic()
        self._last_lag = 0.0
        self._log_write_failing = False  # an episode of failed writes of log bookkeeping (positions, trim)
        self._log_unavailable_since: float | None = None  # an episode of a log out of reach (LogUnavailable)
        self.stop_requested = threading.Event()
        self.drain_requested = threading.Event()
        if self._identity is not None:
            self._identity.ids.stop = self.stop_requested
        # told (version, rows, greatest eventTime per partition) after each events commit: the KPI stage in the
        # same process folds those rows without reading them back from the table
        self.on_commit: Callable[[int, pa.Table, dict[int, int]], None] | None = None
        # True while the KPI folds of this process are too far behind its commits: read nothing meanwhile
        self.held_back: Callable[[], bool] | None = None
        self._follow_ownership(initial=True)

    def _open_tables(self) -> None:
        settings = self.settings
        self.events_table: DeltaTable = lake.open_events(settings.table_uri("events"), settings.schema_params)
        # Decoded with every promoted field the table has, not only this configuration's: a collector or
        # `load` promoting a parameter this processor's configuration lacks (or lacks since it was removed)
        # still fills the table's typed column; a field the table has no column for goes to the extra columns.
        self.params: schema.Params = schema.effective_params(settings.schema_params,
                                                             lake.arrow_schema_of(self.events_table))
        self.quarantine_table: DeltaTable = lake.open_quarantine(settings.table_uri("events_quarantine"))
        self._app_ids = _AppIds(settings.pipeline, "events")
        self._quarantine_app_ids = _AppIds(settings.pipeline, "events_quarantine")
        # how each table keeps a partition's committed offset: the txn version itself, or (offsets beyond int64,
        # Kinesis) a commit counter with the offset in the same commit (lake.TxnPositions)
        self._positions = lake.positions_for(self.log)
        self._quarantine_positions = lake.positions_for(self.log)
        # deduplication by eventId (process/identity.py); off with dedupe_days = 0
        # a stream whose producers need not route a device to one partition (Kinesis) shares one state
        shared = self.log.partitions if self.log.own_routing else None
        self._identity = _Identity(identity_mod.EventIds(settings, shared_partitions=shared),
                                   settings.table_uri("events"), self._app_ids) if settings.dedupe_days > 0 else None

    def _table_writes(self) -> tuple[_TableWrite, _TableWrite]:
        """The flush's two writes, in commit order: quarantine (only when there is something to quarantine),
        then events (always: the position moves)."""
        quarantine = _TableWrite(
            "quarantine", "events_quarantine", self.quarantine_table, self._quarantine_app_ids,
            self._quarantine_positions, lambda d: self._forgotten.drop_quarantined(d.quarantine_table()),
            partition_by=None, conforms_rows=False, commits_when_empty=False)
        events = _TableWrite(
            "events", "events", self.events_table, self._app_ids, self._positions,
            lambda d: self._forgotten.drop_events(d.events_table()),
            partition_by=[PARTITION_COLUMN], conforms_rows=True, commits_when_empty=True, stamps_greatest_times=True,
            counts_duplicates=self.settings.pipeline, writer_properties=EVENTS_WRITER)
        return quarantine, events

    @property
    def partitions(self) -> list[int]:
        """The partitions this processor works on now (they change with leases)."""
        return sorted(self._terms)

    # ------------------------------------------------------------------------------------------- ownership
    def _follow_ownership(self, *, initial: bool = False) -> None:
        """Brings the partitions worked on in line with the ownership (see the module docstring): lost ones
        dropped, surplus ones committed then released, gained ones started from the table's txn version."""
        if self.log.reshards:
            self.ownership.grow(self.log.partitions)  # a resharded stream has new shards: taken like any gained partition
        owned = self.ownership.owned()
        lost = [p for p, term in self._terms.items() if owned.get(p) != term]
        if lost or (set(owned) - set(self._terms)) or (self.ownership.surplus() & set(owned)):
            self._finish_flush()  # the flush in flight lands (or fails) before ownership changes are acted on
        if lost:
            self._drop(lost, "lost: another processor owns it now")
        surplus = self.ownership.surplus() & set(owned)
        if surplus:
            self.flush()  # what was read of them is committed before another processor takes them
            self.ownership.release(surplus)
            self._drop([p for p in surplus if p in self._terms], "handed over to balance the processors")
            owned = {p: term for p, term in owned.items() if p not in surplus}
        gained = sorted(p for p in owned if p not in self._terms)
        if not gained:
            return
        # the previous owner's last commits; an object store out of reach is waited out (a fleet's processors
        # must not die of a store restart just because a lease moved meanwhile)
        for attempt in lake.CommitRetries("events", stage="processor", conflicts=1, stop=self.stop_requested,
                                          context={"partitions": gained, "step": "reading positions"}):
            with attempt:
                if not initial:
                    self.events_table.update_incremental()
                committed = self._positions.offsets(self.events_table, [self._app_ids[p] for p in gained])
        for partition in gained:
            self._terms[partition] = owned[partition]
            self._pending[partition] = []
            self._decoded[partition] = []
            self.stats.positions[partition] = committed[self._app_ids[partition]]
            metrics.log_position.labels(str(partition)).set(self.stats.positions[partition])
        if not initial:
            logger.info("partitions gained", extra={
                "partitions": gained, "positions": {p: self.stats.positions[p] for p in gained}})
        if self._identity is not None and self._identity.ids.shared_state is None:
            self._load_ids(gained)

    def _load_ids(self, partitions: list[int]) -> None:
        """The deduplication state of partitions just gained, loaded together now (no flush is in flight): one
        scan of `event_ids`, and one commit marking where the window starts for those it never covered, instead
        of one of each per partition as each first commits. A store out of reach leaves it to those commits (the
        state of a partition is loaded whenever a commit finds it missing or stale)."""
        assert self._identity is not None
        try:
            self._identity.ids.load({p: self.stats.positions[p] for p in partitions}, self._identity.events_uri,
                                    {p: self._app_ids[p] for p in partitions})
        except lake.RetryInterrupted:  # a stop requested while its commit waited for disk space
            logger.info("event ids not loaded ahead: stopping", extra={"partitions": partitions})
        except Exception as error:
            if not lake.is_store_unreachable(error):
                raise
            logger.warning("event ids not loaded ahead: the object store is unreachable; each partition's first "
                           "commit loads them", extra={"partitions": partitions})

    def _drop(self, partitions: Iterable[int], why: str) -> None:
        """Forgets partitions this processor no longer owns, with what it read of them and did not commit: the
        log still holds those records, and their new owner reads them from the table's txn version."""
        dropped = {}
        for partition in partitions:
            records = self._pending.pop(partition, [])
            self._decoded.pop(partition, None)
            self._read_to_end.discard(partition)
            self._full_reads.discard(partition)
            self._pending_events -= sum(r.events for r in records)
            dropped[partition] = sum(r.events for r in records)
            self._terms.pop(partition, None)
            self.stats.positions.pop(partition, None)
        if self._identity is not None:  # no flush is in flight here: its state is the loop's to change
            self._identity.ids.drop(dropped)
        if self._pending_events == 0:
            self._pending_since = None
        if dropped:  # (a partition released before this processor started reading it was never its own)
            logger.info("partitions released", extra={"partitions": sorted(dropped), "reason": why,
                                                       "uncommitted_events_dropped": dropped})

    # ------------------------------------------------------------------------------------------------- loop
    def run(self, *, until_idle: bool = False, on_progress: Callable[[ProcessorStats], None] | None = None) -> None:
        """Processes until stopped (`stop_requested`, SIGTERM/SIGINT via `install_signal_handlers`) or, with
        `until_idle`, until every partition it owns is drained (with leases: the ones it owns at that moment).
        Pending events are committed before returning — unless the disk is full when a stop is requested: then
        they stay in the log for the next run. Its partitions are released on the way out, whatever the reason."""
        logger.info("processor started", extra={
            "partitions": self.partitions, "positions": dict(self.stats.positions), "pipeline": self.settings.pipeline,
            "until_idle": until_idle})
        try:
            self._run_until_stopped(until_idle=until_idle, on_progress=on_progress)
            self._record_lag(force=True)
            logger.info("processor stopped", extra={
                "positions": dict(self.stats.positions), "events_committed": self.stats.events_committed,
                "commits": self.stats.commits})
        except BaseException:
            logger.error("processor failed", exc_info=True, extra={"positions": dict(self.stats.positions)})
            raise
        finally:
            self._abandon_flush()
            # released at once, so other processors take the partitions over without waiting for a lease to lapse
            if self._closes_ownership:
                self.ownership.close()
            else:
                self.ownership.release(self.partitions)

    def _run_until_stopped(self, *, until_idle: bool,
                           on_progress: Callable[[ProcessorStats], None] | None) -> None:
        """The rounds, then the last flush; a stop requested while the disk is full leaves the pending events
        in the log."""
        try:
            while not self.stop_requested.is_set():
                if not self._round(until_idle=until_idle, on_progress=on_progress):
                    break
            if self.stop_requested.is_set():
                logger.info("processor stopping: committing what it has read",
                            extra={"pending_events": self._pending_events})
            self.flush()
            if self._identity is not None:  # what a restart would otherwise read back from the events table
                self._identity.ids.commit(self.stop_requested)
            if on_progress:
                on_progress(self.stats)
        except lake.RetryInterrupted:
            logger.warning("processor stopped while the disk was full; the uncommitted events stay in the log "
                           "and are committed by the next run", extra={"pending_events": self._pending_events})

    def _round(self, *, until_idle: bool, on_progress: Callable[[ProcessorStats], None] | None) -> bool:
        """One round: land a finished flush, follow the ownership, read (unless `held_back`: then wait a poll
        interval), flush when due, and wait when there was nothing to read. False once drained (`until_idle`, or a
        drain requested)."""
        if self._in_flight is not None and self._in_flight.future.done():
            if self._finish_flush() and on_progress:
                on_progress(self.stats)
        self._follow_ownership()
        if self.held_back is not None and not self._pending_events and self.held_back():
            started = time.monotonic()
            self.stop_requested.wait(self.settings.poll_interval_s)
            metrics.kpi_backpressure_seconds.inc(time.monotonic() - started)
            return True
        read_any = self._read_round()
        draining = until_idle or self.drain_requested.is_set()
        if self._flush_due(drained=draining and not read_any):
            self._finish_flush()  # at most one in flight
            self._start_flush()
        if read_any:
            return True
        if self._finish_flush() and on_progress:  # nothing else to do meanwhile
            on_progress(self.stats)
        if self._is_drained(draining=draining):
            logger.info("log drained", extra={"positions": dict(self.stats.positions)})
            return False
        self._maybe_trim()
        self.stop_requested.wait(self.settings.poll_interval_s)
        return True

    def _read_round(self) -> bool:
        """Reads what the owned partitions have; False when nothing was read, or the log is unavailable: a
        distributed log between leaders, or out of reach — what was read stays pending, and reading resumes
        from there (a flush that is due still happens)."""
        try:
            read_any = self._read_available()
        except LogUnavailable as error:
            self._log_unavailable(error)
            return False
        self._log_available()
        return read_any

    def _is_drained(self, *, draining: bool) -> bool:
        """Draining, and nothing read is left to commit."""
        return draining and self._pending_events == 0

    def stop(self, *, drain: bool) -> None:
        """Asks `run` to return: at once after committing what it has read, or (`drain`) once the log is empty —
        what a shutdown wants after the collector has stopped taking events."""
        (self.drain_requested if drain else self.stop_requested).set()

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT stop the loop after committing what has been read (acknowledged events included)."""
        stop_on_signals(self.stop_requested)

    def _read_available(self) -> bool:
        read_any = False
        for partition in self.partitions:
            if not self._parents_drained(partition):
                continue  # a child shard waits until its parents are read to their end: a device's order holds
            while self._pending_events < self.settings.batch_max_events:
                pending = self._pending[partition]
                after = pending[-1].offset if pending else self._read_through(partition)
                # Records hold whole batches (one request, one chunk of a file): read about as many as fit
                # in what is left of the micro-batch, judged by the size of the records seen so far.
                room = self.settings.batch_max_events - self._pending_events
                limit = max(1, min(_READ_CHUNK, room // self._events_per_record))
                records = self.log.read(partition, after, limit)
                if not records:
                    self._read_to_end.add(partition)
                    self._full_reads.discard(partition)
                    break
                self._read_to_end.discard(partition)
                read_any = True
                pending.extend(records)
                decoded = decode_records(records, params=self.params)  # while a flush may be writing
                if self._identity is not None:  # the identity keys too, off the commit thread
                    decoded.keys = [identity_mod.identity_keys(t) for t in decoded.events]
                self._decoded[partition].append(decoded)
                events = sum(r.events for r in records)
                self._pending_events += events
                self._events_per_record = max(1, events // len(records))
                if self._pending_since is None:
                    self._pending_since = time.monotonic()
                if len(records) < limit:
                    self._full_reads.discard(partition)
                    break
                self._full_reads.add(partition)
        return read_any

    @property
    def _observer(self) -> DeltaTable:
        """The events table as other processors commit to it (for parents this processor does not own)."""
        if self._observer_table is None:
            self._observer_table = lake.open_table(self.settings.table_uri("events"))
            self._observed_at = time.monotonic()
        return self._observer_table

    def _parents_drained(self, partition: int) -> bool:
        """Whether every parent of `partition` (a log that reshards: Kinesis) is closed and read to its end —
        by this processor (read, pending or in flight: committed in this commit or an earlier one than the
        child's first records), or, for a parent it does not own, committed by whoever does."""
        for parent in self.log.parents(partition):
            if parent in self._drained_parents:
                continue
            if not self.log.is_closed(parent):
                return False
            if parent in self._terms:
                # ours: its own latest read (earlier in this round: parents have lower numbers) found its end —
                # no extra read (Kinesis allows 5 GetRecords a second per shard)
                if parent not in self._read_to_end:
                    return False
            else:  # another processor's: what it committed, seen through a table object of our own (not the
                # commit thread's); asked at most once a second
                if time.monotonic() - self._parent_checked_at.get(parent, 0.0) < 1.0:
                    return False
                self._parent_checked_at[parent] = time.monotonic()
                if time.monotonic() - self._observed_at >= 1.0:
                    self._observer.update_incremental()
                    self._observed_at = time.monotonic()
                app_id = self._app_ids[parent]
                if self.log.read(parent, self._positions.offsets(self._observer, [app_id])[app_id], 1):
                    return False
            self._drained_parents.add(parent)
        return True

    def _flush_due(self, *, drained: bool) -> bool:
        """Due at `batch_max_events`, after `batch_max_wait_s`, (draining until idle) when the log is empty — or
        at a quarter of `batch_max_events` once every partition has been read to its end: a burst's tail is
        committed at once rather than after `batch_max_wait_s` (the HTTP path of benchmarks/run.py: its last
        commit landed ~0.55 s after the last acknowledgement, the timer's wait). Only a log that brings more than
        that within `batch_max_wait_s` (50,000 events/s by default) makes commits smaller than the timer would."""
        if self._pending_since is None:
            return False
        return (
            drained
            or self._pending_events >= self.settings.batch_max_events
            or time.monotonic() - self._pending_since >= self.settings.batch_max_wait_s
            or (4 * self._pending_events >= self.settings.batch_max_events and self._all_read_to_end())
        )

    # ------------------------------------------------------------------------------------------------ flush
    def _read_through(self, partition: int) -> int:
        """The last offset of `partition` read and no longer pending: committed, or in the flush in flight."""
        if self._in_flight is not None and partition in self._in_flight.last_offsets:
            return self._in_flight.last_offsets[partition]
        return self.stats.positions[partition]

    def caught_up(self) -> bool:
        """Every partition it owns was read to its end at the last look, and nothing read is left uncommitted
        (a flush may still be landing): what the log held is in, or about to be in, the events table."""
        return not self._pending_events and self._all_read_to_end()

    def _all_read_to_end(self) -> bool:
        """Every partition it owns (one at least) was read to its end at the last look."""
        owned = set(self.partitions)
        return bool(owned) and owned <= self._read_to_end

    def landed_all_read(self) -> bool:
        """`caught_up`, and the flush in flight (if any) has landed: everything read is in the events table, and
        handed to `on_commit`."""
        flush = self._in_flight
        return self.caught_up() and (flush is None or flush.future.done())

    def reading_backlog(self) -> bool:
        """Some partition it owns gave, at its latest read, all that read asked for: there is more to read than
        one read takes (a backlog), as opposed to a live log whose reads find what arrived since the last."""
        return bool(self._full_reads & set(self.partitions))

    def wait_until_read_is_committed(self, timeout: float) -> None:
        """Waits (up to `timeout` seconds) until the records this processor has read by now are in the events
        table: the flush in flight and the records pending for the next. For another thread that wants this
        processor's latest commits (records read later do not extend the wait)."""
        targets = {p: records[-1].offset for p, records in list(self._pending.items()) if records}
        flush = self._in_flight
        if flush is not None:
            for partition, offset in flush.last_offsets.items():
                targets[partition] = max(offset, targets.get(partition, offset))
        with self._landing:
            self._landing.wait_for(lambda: all(self._landed.get(p, -1) >= o for p, o in targets.items()),
                                   timeout=timeout)

    def flush(self) -> None:
        """Commits every pending record of the partitions still owned, and returns once it is committed:
        quarantine first, then events (see the module docstring)."""
        self._finish_flush()
        self._start_flush()
        self._finish_flush()

    def _start_flush(self) -> None:
        """Hands the pending records to the commit thread (the previous flush must have finished)."""
        assert self._in_flight is None, "one flush at a time"
        lapsed = [p for p in self.partitions if not self.ownership.owns(p)]
        if lapsed:
            self._drop(lapsed, "lease lapsed before the flush")
        records = [r for p in self.partitions for r in self._pending[p]]
        if not records:
            return
        last_offsets = {p: self._pending[p][-1].offset for p in self.partitions if self._pending[p]}
        decoded_as_read = {p: list(self._decoded[p]) for p in self.partitions if self._pending[p]}
        flush = _Flush(Future(), last_offsets, self._pending_events,
                       committed_before={p: self.stats.positions[p] for p in last_offsets})
        # in flight before the records leave `_pending`: another thread asking (`landed_all_read`,
        # `wait_until_read_is_committed`) never finds them in neither
        self._in_flight = flush
        for partition in last_offsets:
            self._pending[partition] = []
            self._decoded[partition] = []
        self._pending_events = 0
        self._pending_since = None
        flush.future = self._committer.submit(self._commit, flush, records, decoded_as_read)

    def _commit(self, flush: _Flush, records: list[LogRecord], decoded_as_read: dict[int, list[Decoded]]) -> None:
        """The commit thread's part of a flush: both commits. Touches no processor state but `flush` (`on_commit`,
        the KPI stage's `offer`, takes the rows under the stage's own lock).

        1. quarantine (only when there is something to quarantine), then
        2. events (always: the position moves); then the committed rows are offered to the KPI stage
        (`on_commit`, called on this thread) and the ids that landed join the deduplication state."""
        decoder = _BatchDecoder(records, decoded_as_read, self.params, self._identity, self.events_table)
        # Step 1
        started = time.perf_counter()
        if self._commit_write(self._quarantine_write, flush, decoder) is not None:
            flush.quarantine_seconds = time.perf_counter() - started
        # Step 2
        started = time.perf_counter()
        flush.events_version = self._commit_write(self._events_write, flush, decoder)
        flush.events_seconds = time.perf_counter() - started
        if flush.events_version is not None:
            self._quarantine_late_conflicts(flush)
            # Step 3: the rows go to the KPI stage at once, before it can see the new version in the table and
            # read it back from the change data feed (the ids' bookkeeping below, and the read loop's thread that
            # would otherwise hand them over, can take longer than the folding thread's next look)
            if self.on_commit:
                self.on_commit(flush.events_version, flush.built_rows["events"], flush.greatest_times)
        with self._landing:  # (the records were in the table already when no version was made)
            self._landed.update(flush.last_offsets)
            self._landing.notify_all()
        # Step 4: the ids that landed join the deduplication state (and, now and then, the event_ids table)
        if self._identity is not None:
            ids = self._identity.ids
            if flush.events_version is None:  # it was all in the table already: reload the state when next used
                for partition in flush.last_offsets:
                    ids.drop([partition])
            else:
                ids.remember(flush.verdicts, flush.events_version, flush.last_offsets)
            if ids.commit_due():
                ids.commit(self.stop_requested)

    def _quarantine_late_conflicts(self, flush: _Flush) -> None:
        """With a deduplication state shared by the stream's partitions (Kinesis), another processor may commit
        an eventId between this flush's quarantine commit and its events commit: the events commit, retried,
        judges again and keeps the reuse out of the events table, after the quarantine commit was made without
        it. Those reuses are quarantined here, in a commit of their own (txn `<pipeline>-late-conflicts-p<N>` =
        the events version for each partition of the flush, once). A crash between the two commits loses them
        (they are in neither table): the window is one commit long."""
        if flush.conflicts_quarantined is None or not flush.verdicts:
            return
        late = [_conflict_row(p, row) for p, verdict in flush.verdicts.items() if verdict.conflicts.num_rows
                for row in verdict.conflicts.to_pylist()
                if (p, row.get("eventId")) not in flush.conflicts_quarantined]
        if not late:
            return
        write = self._quarantine_write
        rows = write.rows_of(Decoded(events=[], quarantine=late))
        if write.conforms_rows:
            rows = lake.conform_to(write.table, rows)
        app_ids = [lake.txn_app_id(self.settings.pipeline, p, table="late-conflicts") for p in flush.last_offsets]
        version: int = flush.events_version  # type: ignore[assignment]

        def build(versions: dict[str, int]) -> lake.Batch | None:
            if all(versions.get(app_id, 0) >= version for app_id in app_ids):
                return None
            return lake.Batch(rows, {app_id: version for app_id in app_ids})

        if lake.commit_exactly_once(write.table, app_ids, build, partition_by=write.partition_by,
                                    retries=self.settings.commit_retries, name=write.name, stop=self.stop_requested,
                                    context={"late_conflicts": len(late)}) is not None:
            flush.built["quarantine"] = flush.built.get("quarantine", 0) + rows.num_rows
            if flush.quarantine_seconds is None:
                flush.quarantine_seconds = 0.0
            logger.info("eventIds reused with another payload, committed by another processor meanwhile, "
                        "quarantined", extra={"events": rows.num_rows})

    def _commit_write(self, write: _TableWrite, flush: _Flush, decoder: _BatchDecoder) -> int | None:
        """One table's commit of the flush, exactly once (`lake.commit_exactly_once`); the version committed, or
        None when the table had everything already (or nothing was to be committed)."""
        last_offsets = flush.last_offsets
        # a stream sharing one identity state: every events commit moves the serial txn (read with the others);
        # the copies-dropped counters are read in `_build`, only when the batch has copies
        serial = [write.serial_app_id] if write.counts_duplicates and decoder.identity is not None and \
            decoder.identity.ids.shared_state is not None else []
        version = lake.commit_exactly_once(
            write.table, [write.app_ids[p] for p in last_offsets] + serial,  # type: ignore[list-item]
            lambda versions: self._build(write, flush, decoder, versions),
            partition_by=write.partition_by, retries=self.settings.commit_retries, name=write.name,
            stop=self.stop_requested, context={"partitions": sorted(last_offsets), "offsets": dict(last_offsets)},
            writer_properties=write.writer_properties,
        )
        if version is not None:
            write.positions.remember(flush.metadata.get(write.key))
        return version

    @staticmethod
    def _build(write: _TableWrite, flush: _Flush, decoder: _BatchDecoder,
               versions: dict[str, int]) -> lake.Batch | None:
        """What `write` commits given the table's txn versions now (`lake.commit_exactly_once` asks on every
        attempt): the records after what the table has, or None when it has them all."""
        app_ids, positions = write.app_ids, write.positions
        after = {p: positions.offset_at(write.table, app_ids[p], versions[app_ids[p]]) for p in flush.last_offsets}
        todo = {app_ids[p]: offset for p, offset in flush.last_offsets.items() if offset > after[p]}
        if not todo:
            return None
        expected = after if write.key == "events" else flush.committed_before
        rows = write.rows_of(decoder.after(after, expected))
        if write.key != "events" and decoder.identity is not None and decoder.identity.ids.shared_state is not None:
            flush.conflicts_quarantined = {(p, row.get("eventId")) for p, v in decoder.verdicts(after, expected).items()
                                           if v.conflicts.num_rows for row in v.conflicts.to_pylist()}
        if write.key == "events" and decoder.identity is not None:
            flush.verdicts = decoder.verdicts(after, expected)
            flush.duplicates = sum(v.copies for v in flush.verdicts.values())
        if write.conforms_rows:
            rows = lake.conform_to(write.table, rows)
        if write.should_skip(rows):
            return None
        flush.built[write.key] = rows.num_rows
        flush.built_rows[write.key] = rows
        txn_versions, metadata = positions.stamp(versions, todo)
        serial = write.serial_app_id
        if serial in versions:  # shared identity: every events commit moves it, so concurrent ones conflict
            txn_versions = {**txn_versions, serial: versions[serial] + 1}
        if flush.duplicates and write.counts_duplicates:  # per partition, in the same commit (`status` reads it)
            txn_versions = dict(txn_versions)
            # read here, from the same snapshot as `versions`, and only for a batch with copies: each txn read
            # costs delta-rs a look through the table's log (about 1 ms)
            counters = {p: lake.duplicates_app_id(write.counts_duplicates, p)
                        for p, verdict in flush.verdicts.items() if verdict.copies}
            counted = lake.committed_versions(write.table, list(counters.values()))
            for partition, counter in counters.items():
                txn_versions[counter] = counted[counter] + flush.verdicts[partition].copies
        if write.stamps_greatest_times:
            flush.greatest_times = decoder.greatest_times(after)
            metadata = {**metadata, **lake.stamp_greatest_times(flush.greatest_times)}
        flush.metadata[write.key] = metadata
        return lake.Batch(rows, txn_versions, metadata)

    def _finish_flush(self) -> bool:
        """Waits for the flush in flight, if any, and applies what it committed (re-raising its error); True
        when there was one."""
        flush, self._in_flight = self._in_flight, None
        if flush is None:
            return False
        flush.future.result()
        if flush.quarantine_seconds is not None:
            self.stats.events_quarantined += flush.built["quarantine"]
            metrics.events_quarantined.inc(flush.built["quarantine"])
            metrics.commits.labels("events_quarantine").inc()
            metrics.commit_seconds.labels("events_quarantine").observe(flush.quarantine_seconds)
        if flush.events_version is None:
            self.stats.batches_skipped += 1
        else:
            self.stats.commits += 1
            self.stats.events_committed += flush.built["events"]
            metrics.events_committed.inc(flush.built["events"])
            if flush.duplicates:
                self.stats.duplicates_dropped += flush.duplicates
                metrics.events_duplicates.inc(flush.duplicates)
            metrics.commits.labels("events").inc()
            metrics.commit_seconds.labels("events").observe(flush.events_seconds)
        metrics.batch_events.observe(flush.events_read)
        for partition, offset in flush.last_offsets.items():
            if partition not in self._terms:  # dropped while in flight: its next owner starts from the table
                continue
            # Offsets only grow: the batch was read after the position, so its last offset is above it.
            if offset <= self.stats.positions[partition]:
                raise OffsetsWentBack(f"partition {partition} would go from {self.stats.positions[partition]} "
                                     f"back to {offset}")
            self.stats.positions[partition] = offset
            metrics.log_position.labels(str(partition)).set(offset)
        committed = {p: o for p, o in flush.last_offsets.items() if p in self._terms}
        self._write_log_bookkeeping(lambda: [self.log.commit(self.settings.pipeline, partition, offset)
                                             for partition, offset in committed.items()])
        self._record_lag()
        return True

    def _abandon_flush(self) -> None:
        """On the way out after an error: lets a flush in flight end (its commit is whole or absent either way)
        before the partitions are released, without raising its outcome again."""
        flush, self._in_flight = self._in_flight, None
        if flush is not None:
            try:
                flush.future.result()
            except BaseException:
                pass

    def _log_unavailable(self, error: LogUnavailable) -> None:
        """One warning per episode, then a pause before the next round (stop-aware)."""
        metrics.stage_errors.labels("processor").inc()
        if self._log_unavailable_since is None:
            self._log_unavailable_since = time.monotonic()
            logger.warning("the log is unavailable; retrying until it answers",
                           extra={"error": str(error), "partitions": self.partitions})
        self.stop_requested.wait(_LOG_RETRY_S)

    def _log_available(self) -> None:
        if self._log_unavailable_since is not None:
            logger.info("the log answers again", extra={
                "unavailable_s": round(time.monotonic() - self._log_unavailable_since, 3)})
            self._log_unavailable_since = None

    def _write_log_bookkeeping(self, write: Callable[[], object]) -> None:
        """Runs a write of the log's bookkeeping (the consumer position, the trim). Only used to know what may
        be trimmed — the position a restart resumes from is the table's txn version — so a full disk, or a log
        out of reach, only postpones it: the next flush writes a later position (positions never move back)."""
        try:
            write()
        except LogUnavailable as error:
            self._log_unavailable(error)
            return
        except Exception as error:
            if not is_out_of_space(error):
                raise
            metrics.stage_errors.labels("processor").inc()
            if not self._log_write_failing:
                logger.warning("disk full: cannot write the log's bookkeeping (consumer position, trim); retrying "
                               "at the next flush", extra={"error": type(error).__name__})
            self._log_write_failing = True
        else:
            if self._log_write_failing:
                logger.info("log bookkeeping written again")
            self._log_write_failing = False

    def _record_lag(self, *, force: bool = False) -> None:
        """Sets the per-partition lag gauges (events in the log not yet committed), at most every `_LAG_EVERY_S`."""
        if not force and time.monotonic() - self._last_lag < _LAG_EVERY_S:
            return
        self._last_lag = time.monotonic()
        try:
            by_partition = getattr(self.log, "pending_events_by_partition", None)  # a log that asks them at once
            if by_partition is not None:
                for partition, pending in by_partition(self.settings.pipeline, list(self.partitions)).items():
                    metrics.log_lag_events.labels(str(partition)).set(pending)
                return
            for partition in self.partitions:
                metrics.log_lag_events.labels(str(partition)).set(
                    self.log.pending_events_in(partition, self.settings.pipeline))
        except LogUnavailable:
            pass  # a gauge can wait for the next round; the read loop reports the episode

    def _maybe_trim(self) -> None:
        if time.monotonic() - self._last_trim >= _TRIM_EVERY_S:
            self._last_trim = time.monotonic()
            self._write_log_bookkeeping(lambda: self.log.trim(self.settings.log_retention_h * 3600))

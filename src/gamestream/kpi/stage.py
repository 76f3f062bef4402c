"""The KPI stage: the events table's new versions → the KPI tables, exactly once.

Delta is the streaming source: the stage reads what each commit of `events` added through the change data feed
(OPTIMIZE's rewrites carry no data change and are skipped), in commit order, and folds it into the tables
`kpi.tables` lists: hourly windows, daily game KPIs, retention cohorts, top events, and two state tables
(activity per day and device, first days per device) the daily and cohort figures are counted from.

Event time and watermark, as Flink does it: the watermark is the minimum over log partitions of the greatest
eventTime folded from that partition, minus the delay (180 minutes, the seed's `withWatermark`). A partition
with no records at all, or fully consumed and idle past `partition_idle_s`, does not hold it back. The
watermark only moves forward and is advanced after each events-table version, so the result does not depend on
how versions are grouped into folds. A window whose end is at or below the watermark is final; an event that
arrives for a final window is still counted (the KPI stays exact, unlike Spark, which drops it) and is counted
in that window's `late_events`.

A fold, in order:

1. Read the rows versions first..last added (handed over by our own processor, or the change data feed). A
   version that deleted rows (`gamestream forget`) is folded on its own (`_fold_forget`).
2. Per version: hourly window deltas, the greatest eventTime per partition (→ watermark), events per (day, name),
   and the days' exact state (`days.DayState`: devices, payers, bookings, sessions) for the days not final yet;
   a final day a late event touches is recomputed from the events table.
   While the processor reads a backlog, step 2 runs ahead for the versions it hands over, as they land
   (`prefold`); the next fold commits them with its own.
3. Commit, each table with txn `<pipeline>-kpi` = `last` and the stage's state in its commit metadata:
   hourly and top-event deltas (additive MERGEs taking only the versions above the table's own txn), the
   (day, device) pairs and first days (idempotent upserts), then the daily and cohort rows the fold affected,
   computed as absolute values from the state tables just committed. Commits that nothing orders run at once
   (`_commit_fold`).

Exactly once: every commit first re-reads the table's txn and does nothing when `last` is in already. A restart
resumes from the least advanced table, with that table's state; the idempotent and absolute tables give the same
answer when re-folded, the additive ones skip what they have. The daily and cohort rows depend on which first
days moved — unknown once `kpi_devices` has the version — so a restart that finds them behind the state tables
re-derives every day and cohort once.

Incremental: a fold recomputes only the days and cohorts it touched — the days of its events, the 7 and 30 days
after a day that gained a device (WAU/MAU), the install days that gained or lost a device, and the cohorts 1, 7
and 30 days before a day that gained a device.

The stage's parts, one concern each: `state` (what the stage keeps in commit metadata), `rows` (the rows the
KPIs read), `fold` (what one version adds), `watermark`, `recovery` (reading the tables back at start-up),
`forget` (revisions for deleted rows), `commits` (one table's commit, exactly once), `increments` (the additive
and state tables) and `derived` (the daily and cohort rows). This module holds the stage's loop: reading the
versions, folding each, committing the fold.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from deltalake import write_deltalake

from gamestream import metrics
from gamestream.kpi import tables as kt
from gamestream.kpi.days import PURCHASE, DayState
from gamestream.kpi.derived import DerivedCommits
from gamestream.kpi.fold import (
    Fold,
    event_times,
    name_counts,
    note_first_days,
    first_rows,
    note_greatest_times,
    note_recorded_times,
    window_deltas,
)
from gamestream.kpi.forget import ForgetRevisions
from gamestream.kpi.increments import IncrementalCommits
from gamestream.kpi.parts import RouteDataset, insert_rows, keep_part, kpi_partitioned, rows_schema, version_needs
from gamestream.kpi.recovery import StageRecovery
from gamestream.kpi.rows import day_rows, event_columns, from_us, normalise
from gamestream.kpi.segments import SegmentCommits
from gamestream.kpi.state import STATE_KEY, KpiStageSuperseded, StageState
from gamestream.kpi.watermark import advanced, committed_offsets, day_is_final, holding_partitions
from gamestream.log import EventLog, connect, partition_for
from gamestream.settings import Settings
from gamestream.tables import lake

__all__ = ["STATE_KEY", "KpiStage", "KpiStageSuperseded", "StageState", "fold_once"]

logger = logging.getLogger(__name__)

LATE_DAYS_KEPT = 4  # final days a fold touched that stay in memory for the late rows of the next folds


def rows_by_version(changes: pa.Table) -> dict[int, pa.Table]:
    """The rows of each `_commit_version` of `changes`, in their order. The change data feed gives a version's
    rows in runs (a file's rows together, the files in no set order): each version's runs, sliced and put
    together without copying, instead of a filter over every row per version; rows interleaved more finely than
    that are filtered. (A `take` in version order cost ~0.4 s for a million rows, ten filters' worth.)"""
    if not changes.num_rows:
        return {}
    versions = changes["_commit_version"].to_numpy()
    cuts = [0, *(np.flatnonzero(np.diff(versions)) + 1).tolist(), len(versions)]
    runs: dict[int, list[pa.Table]] = {}
    for start, end in zip(cuts, cuts[1:]):
        runs.setdefault(int(versions[start]), []).append(changes.slice(start, end - start))
    if (len(cuts) - 1) * 256 > len(versions):  # finely interleaved (runs of under 256 rows on average)
        column = changes["_commit_version"]
        return {version: changes.filter(pc.equal(column, version)) for version in runs}
    return {version: parts[0] if len(parts) == 1 else pa.concat_tables(parts) for version, parts in runs.items()}


def _all_of(futures: list[Future]) -> None:
    """Waits for every one of `futures`, then raises the first one's failure, if any."""
    wait(futures)
    for future in futures:
        future.result()


class KpiStage(StageRecovery, ForgetRevisions, IncrementalCommits, DerivedCommits, SegmentCommits):
    """The KPI stage (see the module docstring). Its parts are the classes it is made of, one module each:
    recovery at start-up, forget revisions, the commits of the additive and state tables and of the derived
    tables (both on `commits.ExactlyOnceCommits`); this class reads the versions, folds them and commits."""

    def __init__(self, settings: Settings, log: EventLog, *, stop: threading.Event | None = None,
                 part: int | None = None) -> None:
        """`stop`, once set, makes a commit waiting for disk space give up (`lake.RetryInterrupted`) instead of
        waiting on: the pipeline shares its processor's stop request. `part`: fold only log partition `part`'s
        devices, into its own copy of the KPI tables (`parts`; `merge.KpiMerge` sums the copies)."""
        self.settings = settings
        self.log = log
        self.stop = stop
        self.part = part
        self.dimensions = settings.segment_dimensions  # the breakdowns (`segments`)
        self._known_segments: dict[tuple[str, str], tuple[int, str]] = {}  # kpi_device_segments rows read lately
        self.window_us = settings.window_minutes * 60 * 1_000_000
        self.delay_us = settings.watermark_delay_minutes * 60 * 1_000_000
        self.app_id = lake.txn_app_id(settings.pipeline, stage="kpi")
        self.events = lake.open_events(settings.table_uri("events"))
        self._positions = lake.positions_for(log)  # the processor's committed offsets, however they are kept
        self._committed_offsets: tuple[int | None, dict[int, int]] = (None, {})  # (events version, offsets)
        self._holding: tuple[int, float, list[int]] | None = None  # (events version, when, partitions holding)
        existed = {name: lake.table_exists(self._uri(name)) for name in kt.TABLES}
        self.tables = {name: self._open(name) for name in kt.TABLES}
        self.folded = {name: table.transaction_version(self.app_id) or 0 for name, table in self.tables.items()}
        # KPI tables a data directory from an older gamestream lacks: built from the events table as it is at
        # the other tables' version, not by re-folding its whole history (which VACUUM may have removed)
        missing = [n for n in self.tables if not existed[n]]
        present = [v for n, v in self.folded.items() if n not in missing]
        bootstrap = missing if present and min(present) > 0 else []
        start = min(present) if bootstrap else min(self.folded.values())
        self.state = self._read_state(start)
        # non-final windows per hourly table (to mark them final when the watermark passes them)
        self.open_windows: dict[str, set[int]] = {name: self._read_open_windows(name) for name in
                                                  ("kpi_events_hourly", "kpi_bookings_hourly")}
        self.days: dict[dt.date, DayState] = self._read_open_days(start)
        # Which first days moved in a fold is only known before `kpi_devices` takes it: when the derived tables
        # are behind the state tables (a crash between a fold's commits), the next fold re-derives them all.
        derived = min(self.folded["kpi_daily"], self.folded["kpi_retention"])
        self._derive_all = derived < max(self.folded["kpi_activity"], self.folded["kpi_devices"])
        self._known_devices: dict[str, tuple[dt.date, dt.date | None]] = {}  # kpi_devices rows read lately
        if bootstrap:
            self._bootstrap(bootstrap, start)
        self._rows_per_version = 1
        self._ahead: tuple[Fold, int, int] | None = None  # `prefold`'s fold: (fold, last version in it, rows)
        self._committed_here: dict[int, pa.Table] = {}  # version → rows it added, offered by our processor
        self._offered_times: dict[int, dict[int, int] | None] = {}  # version → greatest eventTime per partition
        self._committed_here_lock = threading.Lock()
        # version → the greatest eventTime per log partition its commit recorded (None: it recorded none)
        self._greatest_times: dict[int, dict[int, int] | None] = {}
        self._history_times: dict[int, dict[int, int] | None] = {}  # the same, read from the history ahead
        # a process may hold a part stage per partition: together they hold at most the one bound
        self.offered_max_bytes = settings.kpi_offered_max_bytes // (1 if part is None else max(1, log.partitions))
        if self.state.watermark is not None:
            metrics.watermark.set(self.state.watermark / 1e6)
        logger.info("KPI stage started", extra={
            "version": start, "watermark": from_us(self.state.watermark).isoformat() if self.state.watermark
            is not None else None, "open_days": len(self.days)})

    def _uri(self, name: str) -> str:
        """Where this stage's KPI table `name` lives: the one users read, or its partition's own copy."""
        return self.settings.table_uri(name) if self.part is None else self.settings.kpi_part_uri(self.part, name)

    def _events_dataset(self, version: int) -> ds.Dataset | RouteDataset:
        dataset = lake.open_table(self.settings.table_uri("events"), version=version).to_pyarrow_dataset()
        return dataset if self.part is None else RouteDataset(dataset, self.part, self.log.partitions)

    # ------------------------------------------------------------------------------------------- watermark
    def _day_is_final(self, day: dt.date) -> bool:
        return day_is_final(day, self.state.watermark)

    def _advance_watermark(self) -> None:
        version = self.events.version()
        if self._committed_offsets[0] != version:  # the events table moved on since (each fold reads it anew)
            self._committed_offsets = (version, committed_offsets(self.settings, self.log, self._positions,
                                                                  self.events))
        # Which partitions hold the watermark back, asked of the log (a round trip per partition on NATS) at
        # most once a second per events version: a part stage advances it after every version, also those that
        # added none of its rows, and idleness is judged in seconds anyway.
        now = time.monotonic()
        if self._holding is None or self._holding[0] != version or now - self._holding[1] > 1.0:
            self._holding = (version, now, holding_partitions(self.settings, self.log, self._committed_offsets[1]))
        holding = self._holding[2]
        self.state.watermark = advanced(self.state.watermark, self.state.max_seen, holding, self.delay_us)

    # ---------------------------------------------------------------------------------------------- reading
    def offer(self, version: int, rows: pa.Table, greatest_times: dict[int, int] | None = None) -> None:
        """The rows that events-table `version` added, and the greatest eventTime per log partition its commit
        recorded, from the processor that committed them in this process: a fold whose versions are all offered
        uses them instead of reading the change data feed back."""
        # only the columns the KPIs read (~75 bytes a row): the rest of eventParams is freed with the batch
        normalised = normalise(rows.select(event_columns(self.dimensions, rows.column_names)), self.dimensions)
        if self.part is not None:
            normalised = keep_part(normalised, self.part, self.log.partitions)
        self.hold(version, normalised, greatest_times)

    def hold(self, version: int, normalised: pa.Table, greatest_times: dict[int, int] | None = None) -> None:
        """`offer` of rows normalised already (`rows.normalise`), and kept to this stage's devices."""
        with self._committed_here_lock:
            # Bounded: a stage that falls far behind (a slow store, a long catch-up) holds at most
            # `kpi_offered_max_bytes`; the versions it was not handed are read back from the change data feed.
            held = sum(t.nbytes for t in self._committed_here.values())
            if held + normalised.nbytes <= self.offered_max_bytes:
                self._committed_here[version] = normalised
                self._offered_times[version] = greatest_times

    def backlog_rows(self) -> int:
        """Rows handed to this stage (`offer`, `hold`) for versions it has not folded yet."""
        with self._committed_here_lock:
            return sum(rows.num_rows for version, rows in self._committed_here.items()
                       if version > self.state.version)

    def backlog_bytes(self) -> int:
        """The bytes of the rows `backlog_rows` counts."""
        with self._committed_here_lock:
            return sum(rows.nbytes for version, rows in self._committed_here.items() if version > self.state.version)

    def _offered(self, first: int, last: int) -> pa.Table | None:
        """The rows offered for versions first..last, with `_commit_version`; None unless every one was offered."""
        table, versions = self._offered_some(first, last)
        return table if len(versions) == last - first + 1 else None

    def _offered_some(self, first: int, last: int) -> tuple[pa.Table | None, set[int]]:
        """The rows offered for those of versions first..last that were, with `_commit_version`, and which."""
        with self._committed_here_lock:
            for version in [v for v in self._committed_here if v < first]:
                del self._committed_here[version]  # folded already
                self._offered_times.pop(version, None)
            versions = {v for v in self._committed_here if first <= v <= last}
            parts = [self._committed_here[v].append_column(
                "_commit_version", pa.array([v] * self._committed_here[v].num_rows, pa.int64()))
                for v in sorted(versions)]
        return (pa.concat_tables(parts) if parts else None), versions

    def _changes(self, first: int, last: int) -> tuple[pa.Table, list[int]]:
        """The rows versions first..last inserted, and the versions among them that deleted rows; the greatest
        eventTime per partition each version's commit recorded goes to `_greatest_times`."""
        if self.part is not None:
            return self._part_changes(first, last)
        offered = self._offered(first, last)
        if offered is not None:
            with self._committed_here_lock:
                self._greatest_times = {v: self._offered_times.get(v) for v in range(first, last + 1)}
            return offered, []
        self._greatest_times = self._recorded_times(first, last)
        reader = self.events.load_cdf(starting_version=first, ending_version=last, columns=self._cdf_columns())
        raw = pa.table(reader.read_all())
        changes = normalise(raw, self.dimensions)
        if not changes.num_rows:
            return changes, []
        kinds = pc.cast(raw["_change_type"], pa.string())
        deletes = sorted(pc.unique(changes["_commit_version"].filter(pc.equal(kinds, "delete"))).to_pylist())
        # delta-rs 1.6.3 lists every row of a file a DELETE rewrote as deleted, not only the rows it removed:
        # a delete is folded from its own metadata (`_fold_forget`), never from these rows
        inserts = pc.equal(kinds, "insert")
        if pc.all(inserts).as_py():  # the usual case: no copy of every row
            return changes, deletes
        return changes.filter(inserts), deletes

    def _part_changes(self, first: int, last: int) -> tuple[pa.Table, list[int]]:
        """`_changes` for a part stage: the rows of its devices versions first..last inserted — offered, or read
        from the change data feed for the versions whose commit may hold some (`parts.version_needs`) — and
        the versions among them that deleted rows (`gamestream forget`), from their commits' actions."""
        actions = lake.commit_actions(self.settings.table_uri("events"), range(first, last + 1))
        self._greatest_times = {}
        deletes = []
        for version, acts in actions.items():
            info = lake.commit_info_of(acts) if acts is not None else None
            self._greatest_times[version] = lake.greatest_times_of(info) if info is not None else None
            if info is not None and info.get("operation") == "DELETE":
                deletes.append(version)
        offered, have = self._offered_some(first, last)
        own = lake.txn_app_id(self.settings.pipeline, self.part)
        prefix = lake.txn_app_id(self.settings.pipeline, 0)[:-1]
        needed = {v for v, acts in actions.items()
                  if v not in have and v not in deletes and version_needs(acts, own, prefix)}
        tables = [offered] if offered is not None else []
        if needed:
            reader = self.events.load_cdf(starting_version=min(needed), ending_version=max(needed),
                                          columns=self._cdf_columns())
            read = keep_part(insert_rows(pa.table(reader.read_all()), needed, self.dimensions), self.part,
                             self.log.partitions)
            tables.append(read)
        schema = rows_schema(self.dimensions)
        if not tables:
            return schema.empty_table(), deletes
        return pa.concat_tables([t.select(schema.names).cast(schema) for t in tables]), deletes

    def _cdf_columns(self) -> list[str]:
        """The columns read from the events table's change data feed (names quoted: delta-rs plans the read with
        DataFusion, which lower-cases unquoted identifiers)."""
        available = [f.name for f in self.events.schema().fields]
        return [f'"{c}"' for c in event_columns(self.dimensions, available)] + ["_change_type", "_commit_version"]

    def _recorded_times(self, first: int, last: int) -> dict[int, dict[int, int] | None]:
        """Version → the greatest eventTime per log partition its commit recorded (`lake.GREATEST_TIMES_KEY`),
        for versions first..last, read from their commit files (`lake.commit_infos`) once each."""
        for version in [v for v in self._history_times if v < first]:
            del self._history_times[version]  # folded already
        wanted = [v for v in range(first, last + 1) if v not in self._history_times]
        for version, info in lake.commit_infos(self.settings.table_uri("events"), wanted).items():
            self._history_times[version] = lake.greatest_times_of(info) if info is not None else None
        return {v: self._history_times.get(v) for v in range(first, last + 1)}

    # ---------------------------------------------------------------------------------------------- folding
    def fold(self) -> int:
        """Folds every events-table version not yet in the KPI tables; returns how many versions it folded.

        A fold updates the in-memory state (greatest eventTime per partition, open days) before its commits:
        after `fold` raised (`lake.RetryInterrupted`, `lake.CommitGaveUp`, …) this stage must not fold again;
        a new `KpiStage` recovers the state from the tables."""
        self.events.update_incremental()
        latest = self.events.version()
        folded = 0
        if self._ahead is not None:  # `prefold` began this fold: the versions handed over since join it
            self._fold_ahead(latest)
            fold, last, rows = self._ahead
            self._ahead = None
            self._finish_fold(fold, self.state.version + 1, last, rows)
            folded += last - self.state.version
            self.state.version = last
        while self.state.version < latest:
            first = self.state.version + 1
            # about `kpi_rows_per_fold` rows per fold (bounded memory), judged by the versions seen so far
            by_rows = max(1, self.settings.kpi_rows_per_fold // self._rows_per_version)
            upto = min(latest, self.state.version + min(self.settings.kpi_versions_per_fold, by_rows))
            changes, deletes = self._changes(first, upto)
            if deletes and deletes[0] == first:
                self._fold_forget(first)
                upto = first
            else:
                if deletes:
                    upto = deletes[0] - 1
                    changes = changes.filter(pc.less_equal(changes["_commit_version"], upto))
                self._fold_range(first, upto, changes)
            folded += upto - self.state.version
            self.state.version = upto
        return folded

    def prefold(self) -> int:
        """Folds the versions our processor handed over (`offer`) after those folded, in version order, into the
        next fold without committing it: for the pipeline while its processor reads a backlog and a fold — a
        commit to every KPI table, ~0.4 s whatever its size — is not due. Each version's rows leave memory once
        folded, and the next `fold` commits them with the versions after them, so a backlog's KPIs are folded
        as it is read rather than all at its end. Stops at the first version not handed over (another
        process's commit, a DELETE, an OPTIMIZE; `fold` reads those) and at `kpi_versions_per_fold`. Returns
        how many versions it folded. As with `fold`, the state in memory runs ahead of the tables until that
        commit: after either raised, this stage must not fold again. A part stage does not fold ahead."""
        if self.part is not None:
            return 0
        self.events.update_incremental()
        return self._fold_ahead(self.events.version())

    @property
    def folding_ahead(self) -> bool:
        """`prefold` has folded versions that no fold has committed yet."""
        return self._ahead is not None

    def _fold_ahead(self, latest: int) -> int:
        """`prefold` up to events version `latest`, also for `fold` to take the versions handed over since."""
        fold, last, rows = self._ahead or (Fold(), self.state.version, 0)
        bound = min(latest, self.state.version + self.settings.kpi_versions_per_fold)
        started = last
        while last < bound:
            with self._committed_here_lock:
                offered = self._committed_here.pop(last + 1, None)
                times = self._offered_times.pop(last + 1, None)
            if offered is None:
                break
            last += 1
            self._greatest_times = {last: times}
            self._fold_version(last, offered, fold)
            rows += offered.num_rows
        if last > started:
            self._ahead = (fold, last, rows)
        return last - started

    def _fold_range(self, first: int, last: int, changes: pa.Table) -> None:
        fold = Fold()
        by_version = rows_by_version(changes)
        for version in range(first, last + 1):
            if version in by_version:
                self._fold_version(version, by_version[version], fold)
            elif self._greatest_times.get(version):
                # a version that added none of this stage's rows (a part stage: other partitions' devices): the
                # greatest eventTimes its commit recorded still move the watermark, in version order
                note_recorded_times(self.state.max_seen, self._greatest_times[version])
                self._advance_watermark()
        self._finish_fold(fold, first, last, changes.num_rows)

    def _finish_fold(self, fold: Fold, first: int, last: int, rows: int) -> None:
        """Commits `fold`, which holds versions first..last (`rows` rows)."""
        self._rows_per_version = max(1, rows // (last - first + 1))
        self._advance_watermark()  # partitions may have gone idle meanwhile
        self._commit_fold(fold, last)
        metrics.late_events.inc(sum(d.late for windows in fold.windows.values() for d in windows.values()))
        logger.debug("KPI fold committed", extra={"version": last, "rows": rows})

    def _partitions_of(self, devices: pa.Array) -> pa.Array:
        """The log partition of each row, from its device id (the rule of gamestream's producers on SQLite and
        NATS): only for a version whose commit recorded no greatest eventTimes (written by an older gamestream)."""
        encoded = pc.dictionary_encode(devices)
        if isinstance(encoded, pa.ChunkedArray):
            encoded = encoded.combine_chunks()
        partitions = pa.array([partition_for(d, self.log.partitions) if d is not None else 0
                               for d in encoded.dictionary.to_pylist()], pa.int32())
        return pc.take(partitions, encoded.indices)

    def _fold_version(self, version: int, rows: pa.Table, fold: Fold) -> None:
        """Folds the rows one events-table version added into `fold` and the stage's state:

        1. the hourly window deltas (late when their window is final already);
        2. the events per (day, name);
        3. the greatest eventTime per log partition, as the version's commit recorded it;
        4. the first day and first purchase day per device;
        5. the days' exact state, for the days not final yet (a final day is recomputed from the table);
        6. the watermark, advanced."""
        times = event_times(rows)
        purchase = pc.fill_null(pc.equal(rows["eventName"], PURCHASE), False)
        # Step 1
        fold.windows[version] = window_deltas(times, purchase, pc.fill_null(rows["amount"], 0.0),
                                              self.state.watermark, self.window_us)
        # Step 2
        fold.names[version] = name_counts(rows)
        # Step 3: from the commit's record of its partitions; a row does not keep its log partition
        recorded = self._greatest_times.get(version)
        if recorded is not None:
            note_recorded_times(self.state.max_seen, recorded)
        else:
            note_greatest_times(self.state.max_seen, self._partitions_of(rows["device_id"]), times)
        # Step 4
        note_first_days(fold, rows, purchase)
        if self.dimensions:
            fold.first_segments.append(first_rows(rows, times, self.dimensions))
        # Step 5
        self._fold_days(version, rows, fold)
        # Step 6
        self._advance_watermark()

    def _fold_days(self, version: int, rows: pa.Table, fold: Fold) -> None:
        """The days' exact state (`DayState`) of the days not final yet, and the (day, device) pairs they gained;
        a final day a late event touches is marked for recomputing from the table."""
        state_rows = day_rows(rows)
        day_column = rows["eventDate"]
        for day in pc.unique(day_column).to_pylist():
            fold.touched_days.add(day)
            mask = pc.equal(day_column, day)
            if self._is_late_for_final_day(day):
                fold.recompute_days.add(day)  # a late event for a final day
                late = set(pc.unique(rows["device_id"].filter(mask)).to_pylist()) - {None}
                fold.late_pairs[day] |= late
                fold.pairs[day] |= late
                continue
            new = self.days.setdefault(day, DayState()).add(state_rows.filter(mask))
            fold.new_pairs.setdefault(version, {})[day] = new
            fold.pairs[day] |= new

    def _is_late_for_final_day(self, day: dt.date) -> bool:
        """Whether rows of `day` come after the day was final (and left memory)."""
        return day not in self.days and self._day_is_final(day)

    # --------------------------------------------------------------------------------------------- commits
    def _commit_fold(self, fold: Fold, version: int) -> None:
        """The fold's commits, a MERGE or append per table, several at once where nothing orders them (delta-rs
        releases the GIL while it plans and writes; ~0.4 s of commits one after another for a fold of
        `benchmarks/run.py`). What orders them: `kpi_activity` reads `kpi_devices` as it was before this fold;
        `kpi_devices` sets the fold's new devices, which the breakdowns and the derived tables read; the derived
        tables read the state tables (and `kpi_daily_segments` and `kpi_retention` read `kpi_daily`); and
        `kpi_retention` comes last, alone, because recovery judges a fold's derived commits complete by it
        (`_derive_all`). The hourly and top-event deltas depend on nothing of it: they run beside the rest.
        Each step's commits touch their own tables and fold fields; every commit is waited for before a failure
        is raised, so none is left running behind a stage that stops."""
        state_json = StageState(version, dict(self.state.max_seen), self.state.watermark).to_json()
        steps = [
            [lambda: self._commit_activity(fold, version, state_json)],
            [lambda: self._commit_devices(fold, version, state_json)],
            [lambda: self._commit_device_segments(fold, version, state_json),
             lambda: self._commit_daily(fold, version, state_json)],
            [lambda: self._commit_daily_segments(fold, version, state_json),
             lambda: self._commit_retention_segments(fold, version, state_json)],
            [lambda: self._commit_retention(fold, version, state_json)],
        ]

        def additive() -> None:
            for name in ("kpi_events_hourly", "kpi_bookings_hourly"):
                self._commit_hourly(name, fold.windows, version, state_json)
            self._commit_names(fold.names, version, state_json)

        with ThreadPoolExecutor(max_workers=3, thread_name_prefix="kpi-commit") as pool:
            beside = pool.submit(additive)
            try:
                for step in steps:
                    _all_of([pool.submit(commit) for commit in step])
            except BaseException:
                wait([beside])  # the first failure is the one raised
                raise
            _all_of([beside])
        if self.part is not None:
            # A part's retention table always takes the version (an empty commit when nothing changed): its txn
            # and state are where the merge reads how far the part has folded, and its watermark.
            self._commit("kpi_retention", version, state_json, lambda table, properties: write_deltalake(
                table, kt.RETENTION.empty_table(), mode="append", commit_properties=properties))
        for name in self.folded:  # a table with nothing to change made no commit; it has the version all the same
            self.folded[name] = max(self.folded[name], version)
        self._derive_all = False
        # Final days leave memory, except the latest few this fold touched: a backfill (or a flood of offline
        # devices) sends late rows for the same final days fold after fold, and each would recompute the whole
        # day from the events table; kept, its state (exact: recomputed or folded up to this version) takes them.
        final = [d for d in self.days if self._day_is_final(d)]
        kept = set(sorted((d for d in final if d in fold.touched_days), reverse=True)[:LATE_DAYS_KEPT])
        for day in final:
            if day in kept:
                continue
            del self.days[day]
            self._known_devices.clear()  # bounded: the devices of the days still open come back as they play
            self._known_segments.clear()
        metrics.kpi_commits.inc()
        if self.state.watermark is not None:
            metrics.watermark.set(self.state.watermark / 1e6)


def fold_once(settings: Settings) -> None:
    """Folds everything the events table holds into the KPI tables, once, in this process, then returns. For
    a caller that holds the KPI role and needs the tables current now (`forget --purge` when no KPI stage runs:
    `gamestream.tables.forget` takes it as its `fold_kpi`)."""
    log = connect(settings)
    try:
        if kpi_partitioned(settings, log):  # every partition's part stage, then the merge
            from gamestream.kpi.merge import KpiMerge

            for part in range(log.partitions):
                KpiStage(settings, log, stop=threading.Event(), part=part).fold()
            KpiMerge(settings, log).merge()
        else:
            KpiStage(settings, log, stop=threading.Event()).fold()
    finally:
        log.close()

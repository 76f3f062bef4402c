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
3. Commit, each table with txn `<pipeline>-kpi` = `last` and the stage's state in its commit metadata:
   hourly and top-event deltas (additive MERGEs taking only the versions above the table's own txn), the
   (day, device) pairs and first days (idempotent upserts), then the daily and cohort rows the fold affected,
   computed as absolute values from the state tables just committed.

Exactly once: every commit first re-reads the table's txn and does nothing when `last` is in already. A restart
resumes from the least advanced table, with that table's state; the idempotent and absolute tables give the same
answer when re-folded, the additive ones skip what they have. The daily and cohort rows depend on which first
days moved — unknown once `kpi_devices` has the version — so a restart that finds them behind the state tables
re-derives every day and cohort once.

Incremental: a fold recomputes only the days and cohorts it touched — the days of its events, the 7 and 30 days
after a day that gained a device (WAU/MAU), the install days that gained or lost a device, and the cohorts 1, 7
and 30 days before a day that gained a device.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake

from gamestream import metrics
from gamestream.kpi import tables as kt
from gamestream.kpi.days import PURCHASE, DayState
from gamestream.log import EventLog, connect, partition_for
from gamestream.settings import Settings
from gamestream.tables import forgotten, lake
from gamestream.tables.forgotten import FORGET_KEY

UTC = dt.timezone.utc
TS = kt.TS
STATE_KEY = "gamestream.kpi"
DAY = dt.timedelta(days=1)

logger = logging.getLogger(__name__)


def _us(moment: dt.datetime) -> int:
    return int(moment.timestamp() * 1_000_000) if moment.tzinfo else int(moment.replace(tzinfo=UTC).timestamp() * 1e6)


def _from_us(value: int) -> dt.datetime:
    return dt.datetime(1970, 1, 1, tzinfo=UTC) + dt.timedelta(microseconds=value)


class KpiStageSuperseded(RuntimeError):
    """Another KPI stage committed to a KPI table since this one last did (this process lost the KPI role, e.g.
    it was paused past its lease, and another one took over). This stage's in-memory state is stale and its
    additive MERGEs would count versions twice: it must stop; a new `KpiStage` recovers from the tables."""


@dataclass
class StageState:
    version: int = 0  # events-table version folded in; 0 is the table's creation (no rows)
    max_seen: dict[int, int] = field(default_factory=dict)  # log partition → greatest eventTime folded (µs)
    watermark: int | None = None  # µs; only moves forward

    def to_json(self) -> str:
        return json.dumps({"version": self.version, "watermark": self.watermark,
                           "max_seen": {str(p): v for p, v in self.max_seen.items()}})

    @classmethod
    def from_json(cls, text: str) -> "StageState":
        raw = json.loads(text)
        return cls(raw["version"], {int(p): v for p, v in raw["max_seen"].items()}, raw["watermark"])


@dataclass
class _WindowDelta:
    events: int = 0
    late: int = 0
    purchases: int = 0
    bookings: float = 0.0
    late_purchases: int = 0


@dataclass
class _Fold:
    """What one fold changes, gathered before its commits."""
    windows: dict[int, dict[int, _WindowDelta]] = field(default_factory=dict)  # version → window start → delta
    names: dict[int, dict[tuple[dt.date, str], int]] = field(default_factory=dict)  # version → (day, name) → n
    touched_days: set[dt.date] = field(default_factory=set)  # days whose own rows changed
    recompute_days: set[dt.date] = field(default_factory=set)  # … of which those recomputed from the table
    pairs: dict[dt.date, set[str]] = field(default_factory=lambda: defaultdict(set))  # (day, device) maybe new
    new_pairs: dict[int, dict[dt.date, set[str]]] = field(default_factory=dict)  # version → pairs surely new
    late_pairs: dict[dt.date, set[str]] = field(default_factory=lambda: defaultdict(set))  # of final days: maybe
    first_day: dict[str, dt.date] = field(default_factory=dict)  # device → least day in this fold
    first_purchase: dict[str, dt.date] = field(default_factory=dict)
    forgotten: list[str] = field(default_factory=list)  # device ids whose every row this fold deletes
    forgotten_hashes: list[str] = field(default_factory=list)
    daily_days: set[dt.date] = field(default_factory=set)  # kpi_daily rows to re-derive
    cohorts: set[dt.date] = field(default_factory=set)  # kpi_retention rows to re-derive


def _normalise(table: pa.Table) -> pa.Table:
    """eventTime, eventName, eventDate and the two parameters the KPIs read, with plain types (the change data
    feed hands out string_view columns; the events table's eventParams may have promoted fields)."""
    params = table["eventParams"]
    columns = {
        "eventTime": pc.cast(table["eventTime"], TS),
        "eventName": pc.cast(table["eventName"], pa.string()),
        "device_id": pc.cast(pc.struct_field(params, "device_id"), pa.string()),
        "amount": pc.cast(pc.struct_field(params, "amount"), pa.float64()),
        "eventDate": pc.cast(table["eventDate"], pa.date32()),
    }
    if "_commit_version" in table.column_names:
        columns["_commit_version"] = pc.cast(table["_commit_version"], pa.int64())
    return pa.table(columns)


def _rows_in(dataset: ds.Dataset, column: str, values, columns: list[str] | None = None,
             where: ds.Expression | None = None) -> pa.Table:
    """The rows of `dataset` whose string `column` is in `values`. Filtered after reading, not by the scan:
    files delta-rs' MERGE wrote declare string_view columns, which pyarrow's scan filter cannot compare with a
    string value set."""
    rows = dataset.to_table(columns=columns, filter=where)
    return rows.filter(pc.is_in(pc.cast(rows[column], pa.string()), pa.array(list(values), pa.string())))


def _day_rows(rows: pa.Table) -> pa.Table:
    """The columns `DayState.add` folds."""
    purchase = pc.fill_null(pc.equal(rows["eventName"], PURCHASE), False)
    return pa.table({
        "device_id": rows["device_id"],
        "t": pc.cast(pc.cast(rows["eventTime"], pa.timestamp("us")), pa.int64()),
        "purchase": purchase,
        "amount": pc.fill_null(rows["amount"], 0.0),
    })


class KpiStage:
    def __init__(self, settings: Settings, log: EventLog, *, stop: threading.Event | None = None) -> None:
        """`stop`, once set, makes a commit waiting for disk space give up (`lake.RetryInterrupted`) instead of
        waiting on: the pipeline shares its processor's stop request."""
        self.settings = settings
        self.log = log
        self.stop = stop
        self.window_us = settings.window_minutes * 60 * 1_000_000
        self.delay_us = settings.watermark_delay_minutes * 60 * 1_000_000
        self.app_id = lake.txn_app_id(settings.pipeline, stage="kpi")
        self.events = lake.open_events(settings.table_uri("events"))
        self._positions = lake.positions_for(log)  # the processor's committed offsets, however they are kept
        existed = {name: lake.table_exists(settings.table_uri(name)) for name in kt.TABLES}
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
        self._duckdb: duckdb.DuckDBPyConnection | None = None
        if bootstrap:
            self._bootstrap(bootstrap, start)
        self._rows_per_version = 1
        self._committed_here: dict[int, pa.Table] = {}  # version → rows it added, offered by our processor
        self._committed_here_lock = threading.Lock()
        self.offered_max_bytes = settings.kpi_offered_max_bytes
        if self.state.watermark is not None:
            metrics.watermark.set(self.state.watermark / 1e6)
        logger.info("KPI stage started", extra={
            "version": start, "watermark": _from_us(self.state.watermark).isoformat() if self.state.watermark
            is not None else None, "open_days": len(self.days)})

    def _open(self, name: str) -> DeltaTable:
        schema, partition_by, configuration = kt.TABLES[name]
        table = lake.open_or_create(self.settings.table_uri(name), schema, partition_by, configuration)
        if configuration:
            lake.ensure_properties(table, configuration)
        have = {f.name for f in table.schema().fields}
        missing = [f for f in schema if f.name not in have]
        if missing:  # a table an older gamestream created: the new columns read null in its old rows
            from deltalake.schema import Field as DeltaField

            table.alter.add_columns([DeltaField.from_arrow(f) for f in missing])
        return table

    # ------------------------------------------------------------------------------------------- restart
    def _read_state(self, version: int) -> StageState:
        if version == 0:
            return StageState()
        for table in self.tables.values():
            if (table.transaction_version(self.app_id) or 0) != version:
                continue
            for commit in table.history():
                text = commit.get(STATE_KEY)
                if text:
                    state = StageState.from_json(text)
                    if state.version == version:
                        return state
        raise RuntimeError(f"no KPI state for events version {version} in the KPI tables' history")

    def _read_open_windows(self, name: str) -> set[int]:
        table = self.tables[name]
        if table.version() == 0:
            return set()
        rows = table.to_pyarrow_table(columns=["window_start", "final"])
        open_rows = rows.filter(pc.invert(rows["final"]))
        return {_us(w) for w in open_rows["window_start"].to_pylist()}

    def _day_is_final(self, day: dt.date) -> bool:
        end = _us(dt.datetime.combine(day + DAY, dt.time(), UTC))
        return self.state.watermark is not None and end <= self.state.watermark

    def _events_dataset(self, version: int) -> ds.Dataset:
        return lake.open_table(self.settings.table_uri("events"), version=version).to_pyarrow_dataset()

    def _read_open_days(self, version: int) -> dict[dt.date, DayState]:
        if version == 0:
            return {}
        dataset = self._events_dataset(version)
        dates = set(pc.unique(dataset.to_table(columns=["eventDate"])["eventDate"]).to_pylist())
        return {day: self._day_from_table(dataset, day) for day in sorted(dates) if not self._day_is_final(day)}

    @staticmethod
    def _day_from_table(dataset: ds.Dataset, day: dt.date) -> DayState:
        rows = dataset.to_table(filter=ds.field("eventDate") == day,
                                columns=["eventTime", "eventName", "eventParams", "eventDate"])
        state = DayState()
        state.add(_day_rows(_normalise(rows)))
        return state

    def _bootstrap(self, names: list[str], version: int) -> None:
        """Fills the KPI tables in `names` (created just now, beside older ones that have `version` folded in) from
        the events table at `version`, then re-derives every daily and cohort row, all with txn `version`."""
        logger.info("KPI tables added to an existing data directory: building them", extra={
            "tables": names, "version": version})
        rows = _normalise(self._events_dataset(version).to_table(
            columns=["eventTime", "eventName", "eventParams", "eventDate"]))
        purchase = pc.fill_null(pc.equal(rows["eventName"], PURCHASE), False)
        state_json = StageState(version, dict(self.state.max_seen), self.state.watermark).to_json()
        names_count = rows.group_by(["eventDate", "eventName"]).aggregate([("eventName", "count")])
        pairs = rows.group_by(["eventDate", "device_id"]).aggregate([])
        firsts = pa.table({"device_id": rows["device_id"], "day": rows["eventDate"],
                           "pday": pc.if_else(purchase, rows["eventDate"], None)}).group_by("device_id").aggregate(
            [("day", "min"), ("pday", "min")])
        built = {
            "kpi_top_events": pa.table({"eventDate": names_count["eventDate"], "eventName": names_count["eventName"],
                                        "events": names_count["eventName_count"]}, schema=kt.TOP_EVENTS),
            "kpi_activity": pa.table({"eventDate": pairs["eventDate"], "device_id": pairs["device_id"]},
                                     schema=kt.ACTIVITY),
            "kpi_devices": pa.table({"device_id": firsts["device_id"], "first_day": firsts["day_min"],
                                     "first_purchase_day": firsts["pday_min"]}, schema=kt.DEVICES),
        }
        for name in names:
            if name in built and built[name].num_rows:
                data = built[name]
                self._commit(name, version, state_json, lambda table, properties, data=data: write_deltalake(
                    table, data, mode="append", commit_properties=properties))
            elif name in ("kpi_events_hourly", "kpi_bookings_hourly"):
                raise RuntimeError(f"{name} is missing beside KPI tables that have events version {version}: "
                                   "move the KPI tables aside to rebuild them all from the events table")
        self._derive_all = True
        self._commit_daily(_Fold(), version, state_json, force=True)
        self._commit_retention(_Fold(), version, state_json, force=True)
        self._derive_all = False
        for name in self.folded:
            self.folded[name] = max(self.folded[name], version)

    # ---------------------------------------------------------------------------------------------- reading
    def offer(self, version: int, rows: pa.Table) -> None:
        """The rows that events-table `version` added, from the processor that committed them in this process:
        a fold whose versions are all offered uses them instead of reading the change data feed back."""
        # only the columns the KPIs read (~75 bytes a row): the rest of eventParams is freed with the batch
        normalised = _normalise(rows.select(["eventTime", "eventName", "eventParams", "eventDate"]))
        with self._committed_here_lock:
            # Bounded: a stage that falls far behind (a slow store, a long catch-up) holds at most
            # `kpi_offered_max_bytes`; the versions it was not handed are read back from the change data feed.
            held = sum(t.nbytes for t in self._committed_here.values())
            if held + normalised.nbytes <= self.offered_max_bytes:
                self._committed_here[version] = normalised

    def _offered(self, first: int, last: int) -> pa.Table | None:
        with self._committed_here_lock:
            for version in [v for v in self._committed_here if v < first]:
                del self._committed_here[version]  # folded already
            if not all(v in self._committed_here for v in range(first, last + 1)):
                return None
            parts = [t.append_column("_commit_version", pa.array([v] * t.num_rows, pa.int64()))
                     for v, t in sorted(self._committed_here.items()) if first <= v <= last]
        return pa.concat_tables(parts)

    def _changes(self, first: int, last: int) -> tuple[pa.Table, list[int]]:
        """The rows versions first..last inserted, and the versions among them that deleted rows."""
        offered = self._offered(first, last)
        if offered is not None:
            return offered, []
        # names quoted: delta-rs plans this with DataFusion, which lower-cases unquoted identifiers
        reader = self.events.load_cdf(starting_version=first, ending_version=last, columns=[
            '"eventTime"', '"eventName"', '"eventParams"', '"eventDate"', "_change_type", "_commit_version"])
        raw = pa.table(reader.read_all())
        changes = _normalise(raw)
        if not changes.num_rows:
            return changes, []
        kinds = pc.cast(raw["_change_type"], pa.string())
        deletes = sorted(pc.unique(changes["_commit_version"].filter(pc.equal(kinds, "delete"))).to_pylist())
        # delta-rs 1.6.3 lists every row of a file a DELETE rewrote as deleted, not only the rows it removed:
        # a delete is folded from its own metadata (`_fold_forget`), never from these rows
        return changes.filter(pc.equal(kinds, "insert")), deletes

    # ---------------------------------------------------------------------------------------------- folding
    def fold(self) -> int:
        """Folds every events-table version not yet in the KPI tables; returns how many versions it folded.

        A fold updates the in-memory state (greatest eventTime per partition, open days) before its commits:
        after `fold` raised (`lake.RetryInterrupted`, `lake.CommitGaveUp`, …) this stage must not fold again;
        a new `KpiStage` recovers the state from the tables."""
        self.events.update_incremental()
        latest = self.events.version()
        folded = 0
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

    def _fold_range(self, first: int, last: int, changes: pa.Table) -> None:
        self._rows_per_version = max(1, changes.num_rows // (last - first + 1))
        fold = _Fold()
        versions = sorted(pc.unique(changes["_commit_version"]).to_pylist()) if changes.num_rows else []
        for version in versions:
            self._fold_version(version, changes.filter(pc.equal(changes["_commit_version"], version)), fold)
        self._advance_watermark()  # partitions may have gone idle meanwhile
        self._commit_fold(fold, last)
        metrics.late_events.inc(sum(d.late for windows in fold.windows.values() for d in windows.values()))
        logger.debug("KPI fold committed", extra={"version": last, "rows": changes.num_rows})

    def _partitions_of(self, devices: pa.Array) -> pa.Array:
        """The log partition of each row, from its device id (the producers' own rule)."""
        encoded = pc.dictionary_encode(devices)
        if isinstance(encoded, pa.ChunkedArray):
            encoded = encoded.combine_chunks()
        partitions = pa.array([partition_for(d, self.log.partitions) if d is not None else 0
                               for d in encoded.dictionary.to_pylist()], pa.int32())
        return pc.take(partitions, encoded.indices)

    def _fold_version(self, version: int, rows: pa.Table, fold: _Fold) -> None:
        """Folds the rows one events-table version added, then advances the watermark."""
        watermark = self.state.watermark
        times = pc.cast(pc.cast(rows["eventTime"], pa.timestamp("us")), pa.int64())
        starts = pc.subtract(times, pc.modulo(times, self.window_us))
        late = (pc.less_equal(pc.add(starts, self.window_us), watermark) if watermark is not None
                else pa.array([False] * rows.num_rows))
        purchase = pc.fill_null(pc.equal(rows["eventName"], PURCHASE), False)
        amount = pc.fill_null(rows["amount"], 0.0)
        frame = pa.table({
            "start": starts, "late": pc.cast(late, pa.int64()), "purchase": pc.cast(purchase, pa.int64()),
            "bookings": pc.if_else(purchase, amount, 0.0),
            "late_purchase": pc.cast(pc.and_(late, purchase), pa.int64()),
        })
        grouped = frame.group_by("start").aggregate([("start", "count"), ("late", "sum"), ("purchase", "sum"),
                                                     ("bookings", "sum"), ("late_purchase", "sum")])
        fold.windows[version] = {
            start: _WindowDelta(events, late_sum, purchases, bookings, late_purchases)
            for start, events, late_sum, purchases, bookings, late_purchases in zip(
                *(grouped[c].to_pylist() for c in ("start", "start_count", "late_sum", "purchase_sum",
                                                   "bookings_sum", "late_purchase_sum")))
        }
        names = rows.group_by(["eventDate", "eventName"]).aggregate([("eventName", "count")])
        fold.names[version] = {(d, n): c for d, n, c in zip(names["eventDate"].to_pylist(),
                                                             names["eventName"].to_pylist(),
                                                             names["eventName_count"].to_pylist())}
        # greatest eventTime per log partition
        devices = rows["device_id"]
        seen = pa.table({"partition": self._partitions_of(devices), "t": times}).group_by("partition").aggregate(
            [("t", "max")])
        for partition, greatest in zip(seen["partition"].to_pylist(), seen["t_max"].to_pylist()):
            if greatest > self.state.max_seen.get(partition, -(1 << 62)):
                self.state.max_seen[partition] = greatest
        # first day and first purchase day per device, in this version
        firsts = pa.table({"d": devices, "day": rows["eventDate"],
                           "pday": pc.if_else(purchase, rows["eventDate"], None)}).group_by("d").aggregate(
            [("day", "min"), ("pday", "min")])
        for device, day, pday in zip(*(firsts[c].to_pylist() for c in ("d", "day_min", "pday_min"))):
            if device is None:
                continue
            if device not in fold.first_day or day < fold.first_day[device]:
                fold.first_day[device] = day
            if pday is not None and (device not in fold.first_purchase or pday < fold.first_purchase[device]):
                fold.first_purchase[device] = pday
        # days: exact state of the days not yet final; a final day is recomputed from the table
        day_rows = _day_rows(rows)
        day_column = rows["eventDate"]
        for day in pc.unique(day_column).to_pylist():
            fold.touched_days.add(day)
            mask = pc.equal(day_column, day)
            if day not in self.days and self._day_is_final(day):
                fold.recompute_days.add(day)  # a late event for a final day
                late = set(pc.unique(devices.filter(mask)).to_pylist()) - {None}
                fold.late_pairs[day] |= late
                fold.pairs[day] |= late
                continue
            new = self.days.setdefault(day, DayState()).add(day_rows.filter(mask))
            fold.new_pairs.setdefault(version, {})[day] = new
            fold.pairs[day] |= new
        self._advance_watermark()

    def _fold_forget(self, version: int) -> None:
        """Folds a version that deleted a device's rows (`gamestream forget`): the rows it deleted are read from
        the version before, and every KPI they counted in is revised — hourly and top-event counts by
        subtraction, the days they fell on recomputed from the table, and the devices leave the state tables
        (then the WAU/MAU of the 30 days after each of their active days, and their cohorts, are re-derived)."""
        fold = _Fold()
        metadata = self._commit_metadata(version)
        hashes = sorted(set(json.loads(metadata[FORGET_KEY])["hashes"])) if FORGET_KEY in metadata else []
        if not hashes:
            logger.warning("events version %d deleted rows outside `gamestream forget`: the KPI tables still count "
                           "them", version)
        else:
            salt = forgotten.read_salt(self.settings)
            devices = self.tables["kpi_devices"]
            devices.update_incremental()
            known = set(devices.to_pyarrow_table(columns=["device_id"])["device_id"].to_pylist()) | {
                d for state in self.days.values() for d in state.devices}
            wanted = set(hashes)
            ids = sorted(d for d in known if forgotten.device_hash(salt, d) in wanted)
            fold.forgotten, fold.forgotten_hashes = ids, hashes
            if ids:
                self._revise_for_deleted(version, ids, fold)
        self._advance_watermark()
        self._commit_fold(fold, version)
        logger.info("KPI tables revised for a forget", extra={"version": version, "devices": len(fold.forgotten)})

    def _revise_for_deleted(self, version: int, ids: list[str], fold: _Fold) -> None:
        activity = self.tables["kpi_activity"]
        activity.update_incremental()
        active = _rows_in(activity.to_pyarrow_dataset(), "device_id", ids)
        days = sorted(set(active["eventDate"].to_pylist()))
        before = self._events_dataset(version - 1)
        deleted = _normalise(before.to_table(filter=ds.field("eventDate").isin(days), columns=[
            "eventTime", "eventName", "eventParams", "eventDate"])) if days else None
        if deleted is not None:
            deleted = deleted.filter(pc.is_in(deleted["device_id"], pa.array(ids, pa.string())))
        if deleted is not None and deleted.num_rows:
            times = pc.cast(pc.cast(deleted["eventTime"], pa.timestamp("us")), pa.int64())
            purchase = pc.fill_null(pc.equal(deleted["eventName"], PURCHASE), False)
            frame = pa.table({"start": pc.subtract(times, pc.modulo(times, self.window_us)),
                              "purchase": pc.cast(purchase, pa.int64()),
                              "bookings": pc.if_else(purchase, pc.fill_null(deleted["amount"], 0.0), 0.0)})
            grouped = frame.group_by("start").aggregate([("start", "count"), ("purchase", "sum"), ("bookings", "sum")])
            fold.windows[version] = {s: _WindowDelta(events=-n, purchases=-p, bookings=-b) for s, n, p, b in zip(
                *(grouped[c].to_pylist() for c in ("start", "start_count", "purchase_sum", "bookings_sum")))}
            names = deleted.group_by(["eventDate", "eventName"]).aggregate([("eventName", "count")])
            fold.names[version] = {(d, n): -c for d, n, c in zip(names["eventDate"].to_pylist(),
                                                                  names["eventName"].to_pylist(),
                                                                  names["eventName_count"].to_pylist())}
            days = sorted(set(days) | set(deleted["eventDate"].to_pylist()))
        fold.touched_days.update(days)
        fold.recompute_days.update(days)
        first = self._devices_rows(ids)
        for device in ids:
            self._known_devices.pop(device, None)
        fold.daily_days.update(d for row in first.values() for d in row if d is not None)
        fold.cohorts.update(row[0] for row in first.values())
        for day in days:  # WAU/MAU of the days after each active day, and the cohorts they were retained in
            fold.daily_days.update(day + dt.timedelta(days=k) for k in range(kt.MAU_DAYS))

    def _commit_metadata(self, version: int) -> dict:
        latest = self.events.version()
        for commit in self.events.history(limit=latest - version + 1):
            if commit.get("version") == version:
                return commit
        return {}

    # ------------------------------------------------------------------------------------------- watermark
    def _holding_partitions(self) -> list[int]:
        """Log partitions that hold the watermark back: every partition with records, except those that are
        fully consumed and idle past the timeout."""
        now = time.time()
        holding = []
        for p in range(self.log.partitions):
            last = self.log.last_offset(p)
            if last == 0:
                continue
            app_id = lake.txn_app_id(self.settings.pipeline, p)
            consumed = self._positions.offsets(self.events, [app_id])[app_id] >= last
            appended = self.log.last_appended_at(p)
            idle = appended is None or now - appended > self.settings.partition_idle_s
            if consumed and idle:
                continue
            holding.append(p)
        return holding

    def _advance_watermark(self) -> None:
        holding = self._holding_partitions()
        if not holding:
            return
        seen = [self.state.max_seen.get(p) for p in holding]
        if any(s is None for s in seen):
            return  # a partition that has not shown its first event yet holds the watermark at -∞
        candidate = min(seen) - self.delay_us  # type: ignore[type-var]
        if self.state.watermark is None or candidate > self.state.watermark:
            self.state.watermark = candidate

    # --------------------------------------------------------------------------------------------- commits
    def _commit_fold(self, fold: _Fold, version: int) -> None:
        state_json = StageState(version, dict(self.state.max_seen), self.state.watermark).to_json()
        for name in ("kpi_events_hourly", "kpi_bookings_hourly"):
            self._commit_hourly(name, fold.windows, version, state_json)
        self._commit_names(fold.names, version, state_json)
        self._commit_activity(fold, version, state_json)
        self._commit_devices(fold, version, state_json)
        self._commit_daily(fold, version, state_json)
        self._commit_retention(fold, version, state_json)
        for name in self.folded:  # a table with nothing to change made no commit; it has the version all the same
            self.folded[name] = max(self.folded[name], version)
        self._derive_all = False
        for day in [d for d in self.days if self._day_is_final(d)]:
            del self.days[day]  # final days leave memory
            self._known_devices.clear()  # bounded: the devices of the days still open come back as they play
        metrics.kpi_commits.inc()
        if self.state.watermark is not None:
            metrics.watermark.set(self.state.watermark / 1e6)

    def _commit(self, name: str, version: int, state_json: str, operation, *, force: bool = False) -> None:
        """Runs `operation(commit_properties)` — a MERGE or DELETE on table `name` — with txn `<pipeline>-kpi` =
        `version`, once: every attempt first re-reads the table's txn version and does nothing when the table
        already has `version` folded in (an earlier attempt may have committed after all). It raises
        `KpiStageSuperseded` when the table's version lies above what this stage has folded but below `version`:
        another stage has been folding — the fence against a stale KPI stage, which holds in the race too: two
        commits with the same txn appId conflict in delta-rs, and the retry re-reads the version. Conflicts (a
        concurrent OPTIMIZE of a KPI table) and a full disk are retried by `lake.CommitRetries`; a stop
        requested while the disk is full abandons the fold (`lake.RetryInterrupted`), and the next run re-folds
        from the tables' txn versions."""
        table = self.tables[name]
        started = time.perf_counter()
        committed_now = False
        for attempt in lake.CommitRetries(name, stage="kpi", conflicts=self.settings.commit_retries,
                                          stop=self.stop, context={"version": version}):
            with attempt:
                if attempt.num > 1:
                    table.update_incremental()
                # exactly once: nothing to do when this table already has this version folded in
                committed = table.transaction_version(self.app_id) or 0
                if self.folded[name] < committed < version:
                    # Our deltas start after `folded[name]`; the table has more than that, not all of ours: added
                    # on top, they would count versions twice. (Below `folded[name]` is fine: a fold whose MERGE
                    # source was empty makes no commit, so a table's txn version may lag what was folded.)
                    raise KpiStageSuperseded(f"{name} has events version {committed} folded in by another KPI "
                                             f"stage; this one folded up to {self.folded[name]}")
                if committed < version or (force and committed == version):  # force: absolute rows again
                    operation(table, CommitProperties(app_transactions=[Transaction(self.app_id, version)],
                                                      custom_metadata={STATE_KEY: state_json}))
                    committed_now = True
        self.folded[name] = version
        if committed_now:
            metrics.commits.labels(name).inc()
            metrics.commit_seconds.labels(name).observe(time.perf_counter() - started)

    def _merge(self, name: str, source: pa.Table, predicate: str, updates: dict[str, str] | None, version: int,
               state_json: str, *, delete_when: str | None = None, insert_when: str | None = None,
               force: bool = False) -> None:
        if not source.num_rows:
            return  # nothing to change: no commit (the table's txn lags; `_commit_fold` notes the version)

        def merge(table: DeltaTable, properties: CommitProperties) -> None:
            merger = table.merge(source, predicate=predicate, source_alias="s", target_alias="t",
                                 commit_properties=properties)
            if delete_when:
                merger = merger.when_matched_delete(predicate=delete_when)
            merger = merger.when_matched_update(updates) if updates else merger.when_matched_update_all()
            merger.when_not_matched_insert_all(predicate=insert_when).execute()

        self._commit(name, version, state_json, merge, force=force)

    def _commit_hourly(self, name: str, deltas: dict[int, dict[int, _WindowDelta]], version: int,
                       state_json: str) -> None:
        if self.folded[name] >= version:
            return
        totals: dict[int, _WindowDelta] = defaultdict(_WindowDelta)
        for commit_version, windows in deltas.items():
            if commit_version <= self.folded[name]:
                continue  # already in this table (a crash between the commits)
            for start, delta in windows.items():
                total = totals[start]
                total.events += delta.events
                total.late += delta.late
                total.purchases += delta.purchases
                total.bookings += delta.bookings
                total.late_purchases += delta.late_purchases
        bookings = name == "kpi_bookings_hourly"
        if bookings:
            totals = {s: d for s, d in totals.items() if d.purchases}
        watermark = self.state.watermark
        is_final = (lambda start: watermark is not None and start + self.window_us <= watermark)
        open_windows = self.open_windows[name]
        starts = sorted(set(totals) | {s for s in open_windows if is_final(s)})
        columns: dict[str, list] = defaultdict(list)
        for start in starts:
            delta = totals.get(start, _WindowDelta())
            columns["window_start"].append(_from_us(start))
            columns["window_end"].append(_from_us(start + self.window_us))
            if bookings:
                columns["bookings"].append(delta.bookings)
                columns["purchases"].append(delta.purchases)
                columns["late_events"].append(delta.late_purchases)
            else:
                columns["events"].append(delta.events)
                columns["late_events"].append(delta.late)
            columns["final"].append(is_final(start))
        schema = kt.BOOKINGS_HOURLY if bookings else kt.EVENTS_HOURLY
        source = pa.table({f.name: columns[f.name] for f in schema}, schema=schema)
        additive = ["bookings", "purchases", "late_events"] if bookings else ["events", "late_events"]
        updates = {c: f"t.{c} + s.{c}" for c in additive}
        updates["final"] = "s.final OR t.final"
        count = "purchases" if bookings else "events"
        # a window whose every event was forgotten goes, as a recomputation would have no row for it
        self._merge(name, source, "t.window_start = s.window_start", updates, version, state_json,
                    delete_when=f"t.{count} + s.{count} <= 0", insert_when=f"s.{count} > 0")
        for start in starts:
            (open_windows.discard if is_final(start) else open_windows.add)(start)

    def _commit_names(self, deltas: dict[int, dict[tuple[dt.date, str], int]], version: int,
                      state_json: str) -> None:
        name = "kpi_top_events"
        if self.folded[name] >= version:
            return
        totals: dict[tuple[dt.date, str], int] = defaultdict(int)
        for commit_version, counts in deltas.items():
            if commit_version > self.folded[name]:
                for key, count in counts.items():
                    totals[key] += count
        source = pa.table({"eventDate": [k[0] for k in totals], "eventName": [k[1] for k in totals],
                           "events": list(totals.values())}, schema=kt.TOP_EVENTS)
        self._merge(name, source, "t.eventDate = s.eventDate AND t.eventName = s.eventName",
                    {"events": "t.events + s.events"}, version, state_json,
                    delete_when="t.events + s.events <= 0", insert_when="s.events > 0")

    def _commit_activity(self, fold: _Fold, version: int, state_json: str) -> None:
        name = "kpi_activity"
        if fold.forgotten:
            self._delete_devices(name, fold, version, state_json)
            return
        for day, new in fold.pairs.items():
            if new:  # a day that gained a device changes the WAU/MAU of the 30 days from it, and 3 cohorts
                fold.daily_days.update(day + dt.timedelta(days=k) for k in range(kt.MAU_DAYS))
                fold.cohorts.update(day - dt.timedelta(days=n) for n in kt.RETENTION_DAYS)
        if self.folded[name] >= version:
            return
        # Pairs of the days in memory are new for certain (the day's devices are all known), except those of
        # versions the table already has (a re-fold after a crash): appended. A late event's pair may be in the
        # table already: then an insert-only MERGE takes them all.
        pairs: dict[dt.date, set[str]] = defaultdict(set)
        for commit_version, days in fold.new_pairs.items():
            if commit_version > self.folded[name]:
                for day, devices in days.items():
                    pairs[day] |= devices
        for day, devices in fold.late_pairs.items():
            pairs[day] |= devices
        source = pa.table({"eventDate": [d for d, devices in pairs.items() for _ in devices],
                           "device_id": [device for devices in pairs.values() for device in devices]},
                          schema=kt.ACTIVITY)
        if any(fold.late_pairs.values()):
            self._merge_insert_only(name, source, version, state_json)
        elif source.num_rows:
            self._commit(name, version, state_json, lambda table, properties: write_deltalake(
                table, source, mode="append", commit_properties=properties))

    def _merge_insert_only(self, name: str, source: pa.Table, version: int, state_json: str) -> None:
        if not source.num_rows:
            return

        def merge(table: DeltaTable, properties: CommitProperties) -> None:
            table.merge(source, predicate="t.eventDate = s.eventDate AND t.device_id = s.device_id",
                        source_alias="s", target_alias="t", commit_properties=properties
                        ).when_not_matched_insert_all().execute()

        self._commit(name, version, state_json, merge)

    def _delete_devices(self, name: str, fold: _Fold, version: int, state_json: str) -> None:
        predicate = forgotten.hash_predicate(forgotten.read_salt(self.settings), fold.forgotten_hashes,
                                          column='"device_id"')
        self._commit(name, version, state_json, lambda table, properties: table.delete(
            predicate, commit_properties=properties))

    def _devices_rows(self, ids) -> dict[str, tuple[dt.date, dt.date | None]]:
        """kpi_devices' rows of these devices (first day, first purchase day), from memory where known."""
        wanted = [d for d in ids if d not in self._known_devices]
        if wanted:
            table = self.tables["kpi_devices"]
            table.update_incremental()
            rows = _rows_in(table.to_pyarrow_dataset(), "device_id", wanted)
            for device, first, purchase in zip(*(rows[c].to_pylist() for c in kt.DEVICES.names)):
                self._known_devices[device] = (first, purchase)
        return {d: self._known_devices[d] for d in ids if d in self._known_devices}

    def _commit_devices(self, fold: _Fold, version: int, state_json: str) -> None:
        name = "kpi_devices"
        if fold.forgotten:
            self._delete_devices(name, fold, version, state_json)
            return
        if not fold.first_day or self.folded[name] >= version:
            return  # (a re-fold after a crash: the table has this version; `_derive_all` re-derives its effects)
        known = self._devices_rows(fold.first_day)
        changed: dict[str, tuple[dt.date, dt.date | None]] = {}
        for device, day in fold.first_day.items():
            old_first, old_purchase = known.get(device, (None, None))
            first = min(day, old_first) if old_first else day
            new_purchase = fold.first_purchase.get(device)
            purchase = min(p for p in (old_purchase, new_purchase) if p) if (old_purchase or new_purchase) else None
            if (first, purchase) != (old_first, old_purchase):
                changed[device] = (first, purchase)
                fold.daily_days.update(d for d in (first, old_first, purchase, old_purchase) if d)
                if first != old_first:
                    fold.cohorts.update(d for d in (first, old_first) if d)
        if not changed:
            return
        source = pa.table({"device_id": list(changed), "first_day": [v[0] for v in changed.values()],
                           "first_purchase_day": [v[1] for v in changed.values()]}, schema=kt.DEVICES)
        if all(device not in known for device in changed):  # only devices the table does not have: appended
            self._commit(name, version, state_json, lambda table, properties: write_deltalake(
                table, source, mode="append", commit_properties=properties))
        else:
            # the least of the two, whatever this stage believed the row held: the upsert stays idempotent
            earliest = ("CASE WHEN t.{c} IS NULL THEN s.{c} WHEN s.{c} IS NULL THEN t.{c} WHEN t.{c} <= s.{c} "
                        "THEN t.{c} ELSE s.{c} END")
            self._merge(name, source, "t.device_id = s.device_id",
                        {c: earliest.format(c=c) for c in ("first_day", "first_purchase_day")}, version, state_json)
        self._known_devices.update(changed)

    # ------------------------------------------------------------------------------- daily and cohort rows
    def _state_tables(self) -> tuple[ds.Dataset, ds.Dataset]:
        for name in ("kpi_activity", "kpi_devices"):
            self.tables[name].update_incremental()
        return self.tables["kpi_activity"].to_pyarrow_dataset(), self.tables["kpi_devices"].to_pyarrow_dataset()

    def _commit_daily(self, fold: _Fold, version: int, state_json: str, *, force: bool = False) -> None:
        name = "kpi_daily"
        if self.folded[name] >= version and not force:
            return
        table = self.tables[name]
        existing = table.to_pyarrow_table() if table.version() > 0 else kt.DAILY.empty_table()
        existing_days = set(existing["eventDate"].to_pylist())
        wanted = set(fold.daily_days) | fold.touched_days
        if self._derive_all:
            wanted |= existing_days | set(self.days)
        # only days with events have a row (a day emptied by a forget loses it)
        days = sorted(d for d in wanted if d in existing_days or d in fold.touched_days or d in self.days)
        if not days:
            return
        base: dict[dt.date, dict] = {}
        dataset = None
        for day in days:
            state = self.days.get(day) if day not in fold.recompute_days else None
            if state is None and (day in fold.touched_days or self._derive_all):
                if dataset is None:
                    dataset = self._events_dataset(version)
                state = self._day_from_table(dataset, day)
                if day in self.days:
                    self.days[day] = state
            if state is not None:
                row = state.base_row()
                row["avg_session_s"] = row.pop("session_us") / row["sessions"] / 1e6 if row["sessions"] else 0.0
                base[day] = row
        for row in existing.filter(pc.is_in(existing["eventDate"], pa.array(days, pa.date32()))).to_pylist():
            if row["eventDate"] not in base:
                base[row["eventDate"]] = {k: row[k] for k in ("dau", "events", "bookings", "paying_users",
                                                              "sessions", "avg_session_s")}
        activity, devices = self._state_tables()
        windows = self._active_users(activity, days)
        firsts = self._first_counts(devices, days)
        rows = []
        for day in days:
            b = base[day]
            dau, paying, bookings = b["dau"], b["paying_users"], b["bookings"]
            wau, mau = windows.get(day, (0, 0))
            rows.append({
                "eventDate": day, "dau": dau, "events": b["events"], "bookings": bookings, "paying_users": paying,
                "arpdau": bookings / dau if dau else 0.0,
                "new_users": firsts.get(("first_day", day), 0), "wau": wau, "mau": mau,
                "stickiness": dau / mau if mau else 0.0, "arppu": bookings / paying if paying else 0.0,
                "conversion": paying / dau if dau else 0.0,
                "first_purchase_users": firsts.get(("first_purchase_day", day), 0),
                "sessions": b["sessions"] or 0, "avg_session_s": b["avg_session_s"] or 0.0,
            })
        source = pa.Table.from_pylist(rows, schema=kt.DAILY)
        self._merge(name, source, "t.eventDate = s.eventDate", None, version, state_json,
                    delete_when="s.events = 0", insert_when="s.events > 0", force=force)

    def _query(self, sql: str, **tables: pa.Table) -> list[tuple]:
        """Runs DuckDB `sql` over the Arrow `tables` on the stage's one connection (a connection costs ~20 ms)."""
        if self._duckdb is None:
            self._duckdb = duckdb.connect(config={"threads": 1})
        try:
            for name, table in tables.items():
                self._duckdb.register(name, table)
            return self._duckdb.execute(sql).fetchall()
        finally:
            for name in tables:
                self._duckdb.unregister(name)

    def _active_users(self, activity: ds.Dataset, days: list[dt.date]) -> dict[dt.date, tuple[int, int]]:
        """WAU and MAU of each day: distinct devices active in the 7 and 30 days ending that day."""
        low = min(days) - dt.timedelta(days=kt.MAU_DAYS - 1)
        pairs = activity.to_table(filter=(ds.field("eventDate") >= low) & (ds.field("eventDate") <= max(days)))
        targets = pa.table({"day": pa.array(days, pa.date32())})
        result = self._query(pairs=pairs, targets=targets, sql=f"""
                SELECT t.day,
                       count(DISTINCT p.device_id) FILTER (WHERE p.eventDate > t.day - {kt.WAU_DAYS}) AS wau,
                       count(DISTINCT p.device_id) AS mau
                FROM targets t JOIN pairs p
                  ON p.eventDate <= t.day AND p.eventDate > t.day - {kt.MAU_DAYS}
                GROUP BY t.day""")
        return {day: (wau, mau) for day, wau, mau in result}

    @staticmethod
    def _first_counts(devices: ds.Dataset, days: list[dt.date]) -> dict[tuple[str, dt.date], int]:
        """New users (first day) and first purchases per day."""
        counts: dict[tuple[str, dt.date], int] = {}
        wanted = pa.array(days, pa.date32())
        for column in ("first_day", "first_purchase_day"):
            rows = devices.to_table(columns=[column], filter=ds.field(column).isin(wanted))
            grouped = rows.group_by(column).aggregate([(column, "count")])
            counts.update({(column, d): n for d, n in zip(grouped[column].to_pylist(),
                                                         grouped[f"{column}_count"].to_pylist())})
        return counts

    def _commit_retention(self, fold: _Fold, version: int, state_json: str, *, force: bool = False) -> None:
        name = "kpi_retention"
        if self.folded[name] >= version and not force:
            return
        activity, devices = self._state_tables()
        daily = self.tables["kpi_daily"]
        daily.update_incremental()
        days = daily.to_pyarrow_table(columns=["eventDate"])["eventDate"] if daily.version() > 0 else pa.array(
            [], pa.date32())
        last_day = pc.max(days).as_py()
        cohorts = set(fold.cohorts)
        table = self.tables[name]
        if self._derive_all:
            cohorts |= set(table.to_pyarrow_table(columns=["cohort_day"])["cohort_day"].to_pylist()) if (
                table.version() > 0) else set()
            cohorts |= set(pc.unique(devices.to_table(columns=["first_day"])["first_day"]).to_pylist())
        cohorts.discard(None)
        if not cohorts:
            return
        cohorts_array = pa.array(sorted(cohorts), pa.date32())
        members = devices.to_table(columns=["device_id", "first_day"], filter=ds.field("first_day").isin(
            cohorts_array))
        later = sorted({c + dt.timedelta(days=n) for c in cohorts for n in kt.RETENTION_DAYS})
        returns = activity.to_table(filter=ds.field("eventDate").isin(pa.array(later, pa.date32())))
        sizes = {c: (0, 0, 0, 0) for c in cohorts}
        for row in self._query(members=members, returns=returns, sql="""
                SELECT m.first_day, count(DISTINCT m.device_id),
                       count(DISTINCT CASE WHEN r.eventDate = m.first_day + 1 THEN m.device_id END),
                       count(DISTINCT CASE WHEN r.eventDate = m.first_day + 7 THEN m.device_id END),
                       count(DISTINCT CASE WHEN r.eventDate = m.first_day + 30 THEN m.device_id END)
                FROM members m LEFT JOIN returns r ON r.device_id = m.device_id
                GROUP BY m.first_day"""):
            sizes[row[0]] = tuple(row[1:])
        rows = []
        for cohort, (size, *retained) in sorted(sizes.items()):
            row: dict = {"cohort_day": cohort, "cohort_size": size}
            for n, users in zip(kt.RETENTION_DAYS, retained):
                measurable = last_day is not None and cohort + dt.timedelta(days=n) <= last_day
                row[f"d{n}_users"] = users if measurable else None
                row[f"d{n}"] = (users / size if size else 0.0) if measurable else None
            rows.append(row)
        source = pa.Table.from_pylist(rows, schema=kt.RETENTION)
        self._merge(name, source, "t.cohort_day = s.cohort_day", None, version, state_json,
                    delete_when="s.cohort_size = 0", insert_when="s.cohort_size > 0", force=force)


def fold_once(settings: Settings) -> None:
    """Folds everything the events table holds into the KPI tables, once, in this process, then returns. For
    a caller that holds the KPI role and needs the tables current now (`forget --purge` when no KPI stage runs:
    `gamestream.tables.forget` takes it as its `fold_kpi`)."""
    log = connect(settings)
    try:
        KpiStage(settings, log, stop=threading.Event()).fold()
    finally:
        log.close()

"""The KPI stage: the events table's new versions → hourly and daily KPI tables, exactly once.

Delta is the streaming source: the stage reads what each commit of `events` added through the change data feed
(OPTIMIZE's rewrites carry no data change and are skipped), in commit order, and folds it into

- `kpi_events_hourly`   (window_start, window_end, events, final, late_events)
- `kpi_bookings_hourly` (window_start, window_end, bookings, purchases, final, late_events)
- `kpi_daily`           (eventDate, dau, events, bookings, paying_users, arpdau)

Event time and watermark, as Flink does it: the watermark is the minimum over log partitions of the greatest
eventTime folded from that partition, minus the delay (180 minutes, the seed's `withWatermark`). A partition
with no records at all, or fully consumed and idle past `partition_idle_s`, does not hold it back. The
watermark only moves forward and is advanced after each events-table version, so the result does not depend on
how versions are grouped into folds. A window whose end is at or below the watermark is final; an event that
arrives for a final window is still counted (the KPI stays exact, unlike Spark, which drops it) and is counted
in that window's `late_events`.

Exactly once: every KPI commit carries txn `<pipeline>-kpi` = the events-table version folded in, plus the
stage's state (watermark, greatest eventTime per partition) in its commit metadata. Hourly windows are
upserted with additive MERGEs that take only the versions above the table's own txn version, so a crash
between the three commits re-folds each table from where it is. Daily rows are absolute values (exact distinct
device counts) computed from the distinct devices of the days not yet final, which are the only state held in
memory; a late event for a final day recomputes that day from the events table.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import CommitProperties, DeltaTable, Transaction

from gamestream import lake, metrics, schema
from gamestream.log import EventLog, partition_for
from gamestream.settings import Settings

UTC = dt.timezone.utc
TS = pa.timestamp("us", tz="UTC")
STATE_KEY = "gamestream.kpi"

EVENTS_HOURLY = pa.schema([("window_start", TS), ("window_end", TS), ("events", pa.int64()), ("final", pa.bool_()),
                           ("late_events", pa.int64())])
BOOKINGS_HOURLY = pa.schema([("window_start", TS), ("window_end", TS), ("bookings", pa.float64()),
                             ("purchases", pa.int64()), ("final", pa.bool_()), ("late_events", pa.int64())])
DAILY = pa.schema([("eventDate", pa.date32()), ("dau", pa.int64()), ("events", pa.int64()),
                   ("bookings", pa.float64()), ("paying_users", pa.int64()), ("arpdau", pa.float64())])
PURCHASE = "purchaseEvent"

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
class _Day:
    devices: set[str] = field(default_factory=set)
    payers: set[str] = field(default_factory=set)
    events: int = 0
    bookings: float = 0.0


@dataclass
class _WindowDelta:
    events: int = 0
    late: int = 0
    purchases: int = 0
    bookings: float = 0.0
    late_purchases: int = 0


class KpiStage:
    def __init__(self, settings: Settings, log: EventLog, *, stop: threading.Event | None = None) -> None:
        """`stop`, once set, makes a commit waiting for disk space give up (`lake.RetryInterrupted`) instead of
        waiting on: the pipeline shares its processor's stop request."""
        self.settings = settings
        self.log = log
        self.stop = stop
        self.window_us = settings.window_minutes * 60 * 1_000_000
        self.delay_us = settings.watermark_delay_minutes * 60 * 1_000_000
        self.app_id = f"{settings.pipeline}-kpi"
        self.events = lake.open_events(settings.table_uri("events"))
        self._positions = lake.positions_for(log)  # the processor's committed offsets, however they are kept
        self.tables = {
            "kpi_events_hourly": lake.open_or_create(settings.table_uri("kpi_events_hourly"), EVENTS_HOURLY, None),
            "kpi_bookings_hourly": lake.open_or_create(settings.table_uri("kpi_bookings_hourly"), BOOKINGS_HOURLY,
                                                       None),
            "kpi_daily": lake.open_or_create(settings.table_uri("kpi_daily"), DAILY, None),
        }
        self.folded = {name: table.transaction_version(self.app_id) or 0 for name, table in self.tables.items()}
        start = min(self.folded.values())
        self.state = self._read_state(start)
        # non-final windows per hourly table (to mark them final when the watermark passes them)
        self.open_windows: dict[str, set[int]] = {name: self._read_open_windows(name) for name in
                                                  ("kpi_events_hourly", "kpi_bookings_hourly")}
        self.days: dict[dt.date, _Day] = self._read_open_days(start)
        self._rows_per_version = 1
        self._committed_here: dict[int, pa.Table] = {}  # version → rows it added, offered by our processor
        self._committed_here_lock = threading.Lock()
        if self.state.watermark is not None:
            metrics.watermark.set(self.state.watermark / 1e6)
        logger.info("KPI stage started", extra={
            "version": start, "watermark": _from_us(self.state.watermark).isoformat() if self.state.watermark
            is not None else None, "open_days": len(self.days)})

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
        end = _us(dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), UTC))
        return self.state.watermark is not None and end <= self.state.watermark

    def _read_open_days(self, version: int) -> dict[dt.date, _Day]:
        if version == 0:
            return {}
        dataset = lake.open_table(self.settings.table_uri("events"), version=version).to_pyarrow_dataset()
        days: dict[dt.date, _Day] = {}
        for day in sorted(self._event_dates(dataset)):
            if not self._day_is_final(day):
                days[day] = self._day_from_table(dataset, day)
        return days

    @staticmethod
    def _event_dates(dataset) -> set[dt.date]:
        table = dataset.to_table(columns=["eventDate"])
        return set(pc.unique(table["eventDate"]).to_pylist())

    @staticmethod
    def _day_from_table(dataset, day: dt.date) -> _Day:
        import pyarrow.dataset as ds

        rows = dataset.to_table(filter=ds.field("eventDate") == day, columns=["eventName", "eventParams"])
        devices = pc.struct_field(rows["eventParams"], "device_id")
        purchase = pc.equal(rows["eventName"], PURCHASE)
        amount = pc.struct_field(rows["eventParams"], "amount")
        bookings = pc.sum(pc.if_else(purchase, amount, None)).as_py() or 0.0
        return _Day(devices=set(pc.unique(devices).to_pylist()) - {None},
                    payers=set(pc.unique(devices.filter(pc.fill_null(purchase, False))).to_pylist()) - {None},
                    events=rows.num_rows, bookings=bookings)

    # ---------------------------------------------------------------------------------------------- folding
    def offer(self, version: int, rows: pa.Table) -> None:
        """The rows that events-table `version` added, from the processor that committed them in this process:
        a fold whose versions are all offered uses them instead of reading the change data feed back."""
        with self._committed_here_lock:
            self._committed_here[version] = rows.select(["eventTime", "eventName", "eventParams", "eventDate"])

    def _offered(self, first: int, last: int) -> pa.Table | None:
        with self._committed_here_lock:
            for version in [v for v in self._committed_here if v < first]:
                del self._committed_here[version]  # folded already
            if not all(v in self._committed_here for v in range(first, last + 1)):
                return None
            parts = [t.append_column("_commit_version", pa.array([v] * t.num_rows, pa.int64()))
                     for v, t in sorted(self._committed_here.items()) if first <= v <= last]
        return pa.concat_tables(parts)

    def fold(self) -> int:
        """Folds every events-table version not yet in the KPI tables; returns how many versions it folded.

        A fold updates the in-memory state (greatest eventTime per partition, open days) before its commits:
        after `fold` raised (`lake.RetryInterrupted`, `lake.CommitGaveUp`, …) this stage must not fold again;
        a new `KpiStage` recovers the state from the tables."""
        self.events.update_incremental()
        latest = self.events.version()
        folded = 0
        while self.state.version < latest:
            # about `kpi_rows_per_fold` rows per fold (bounded memory), judged by the versions seen so far
            by_rows = max(1, self.settings.kpi_rows_per_fold // self._rows_per_version)
            upto = min(latest, self.state.version + min(self.settings.kpi_versions_per_fold, by_rows))
            self._fold_range(self.state.version + 1, upto)
            folded += upto - self.state.version
            self.state.version = upto
        return folded

    def _changes(self, first: int, last: int) -> pa.Table:
        """The rows versions first..last added: offered by our processor, or read from the change data feed."""
        offered = self._offered(first, last)
        if offered is not None:
            return offered
        # names quoted: delta-rs plans this with DataFusion, which lower-cases unquoted identifiers
        reader = self.events.load_cdf(starting_version=first, ending_version=last, columns=[
            '"eventTime"', '"eventName"', '"eventParams"', '"eventDate"', "_change_type", "_commit_version"])
        changes = pa.table(reader.read_all())
        # delta-rs hands out string_view columns; cast to the table's own schema for pyarrow's kernels
        events_schema = schema.arrow_schema()
        changes = changes.cast(pa.schema([events_schema.field(n) if n in events_schema.names
                                          else pa.field(n, pa.string() if n == "_change_type" else pa.int64())
                                          for n in changes.column_names]))
        if changes.num_rows:
            changes = changes.filter(pc.equal(changes["_change_type"], "insert"))
        return changes.drop_columns(["_change_type"])

    def _fold_range(self, first: int, last: int) -> None:
        changes = self._changes(first, last)
        self._rows_per_version = max(1, changes.num_rows // (last - first + 1))
        deltas: dict[int, dict[int, _WindowDelta]] = {}  # version → window start → delta
        touched_days: set[dt.date] = set()
        recompute_days: set[dt.date] = set()
        versions = sorted(pc.unique(changes["_commit_version"]).to_pylist()) if changes.num_rows else []
        for version in versions:
            rows = changes.filter(pc.equal(changes["_commit_version"], version))
            deltas[version] = self._fold_version(rows, touched_days, recompute_days)
        self._advance_watermark()  # partitions may have gone idle meanwhile
        state_json = StageState(last, dict(self.state.max_seen), self.state.watermark).to_json()
        for name in ("kpi_events_hourly", "kpi_bookings_hourly"):
            self._commit_hourly(name, deltas, last, state_json)
        self._commit_daily(touched_days, recompute_days, last, state_json)
        for day in [d for d in self.days if self._day_is_final(d)]:
            del self.days[day]  # final days leave memory
        metrics.kpi_commits.inc()
        metrics.late_events.inc(sum(d.late for windows in deltas.values() for d in windows.values()))
        if self.state.watermark is not None:
            metrics.watermark.set(self.state.watermark / 1e6)
        logger.debug("KPI fold committed", extra={"version": last, "rows": changes.num_rows})

    def _partitions_of(self, devices: pa.Array) -> pa.Array:
        """The log partition of each row, from its device id (the producers' own rule)."""
        encoded = pc.dictionary_encode(devices).combine_chunks() if isinstance(devices, pa.ChunkedArray) else (
            pc.dictionary_encode(devices))
        partitions = pa.array([partition_for(d, self.log.partitions) if d is not None else 0
                               for d in encoded.dictionary.to_pylist()], pa.int32())
        return pc.take(partitions, encoded.indices)

    def _fold_version(self, rows: pa.Table, touched_days: set[dt.date],
                      recompute_days: set[dt.date]) -> dict[int, _WindowDelta]:
        """Folds the rows one events-table version added, then advances the watermark."""
        watermark = self.state.watermark
        times = pc.cast(pc.cast(rows["eventTime"], pa.timestamp("us")), pa.int64())
        starts = pc.subtract(times, pc.modulo(times, self.window_us))
        late = (pc.less_equal(pc.add(starts, self.window_us), watermark) if watermark is not None
                else pa.array([False] * rows.num_rows))
        purchase = pc.fill_null(pc.equal(rows["eventName"], PURCHASE), False)
        devices = pc.struct_field(rows["eventParams"], "device_id")
        amount = pc.fill_null(pc.struct_field(rows["eventParams"], "amount"), 0.0)
        frame = pa.table({
            "start": starts, "late": pc.cast(late, pa.int64()), "purchase": pc.cast(purchase, pa.int64()),
            "bookings": pc.if_else(purchase, amount, 0.0),
            "late_purchase": pc.cast(pc.and_(late, purchase), pa.int64()),
        })
        grouped = frame.group_by("start").aggregate([("start", "count"), ("late", "sum"), ("purchase", "sum"),
                                                     ("bookings", "sum"), ("late_purchase", "sum")])
        windows = {
            start: _WindowDelta(events, late_sum, purchases, bookings, late_purchases)
            for start, events, late_sum, purchases, bookings, late_purchases in zip(
                *(grouped[c].to_pylist() for c in ("start", "start_count", "late_sum", "purchase_sum",
                                                   "bookings_sum", "late_purchase_sum")))
        }
        # greatest eventTime per log partition
        seen = pa.table({"partition": self._partitions_of(devices), "t": times}).group_by("partition").aggregate(
            [("t", "max")])
        for partition, greatest in zip(seen["partition"].to_pylist(), seen["t_max"].to_pylist()):
            if greatest > self.state.max_seen.get(partition, -(1 << 62)):
                self.state.max_seen[partition] = greatest
        # days: distinct devices and payers of the days not yet final; a final day is recomputed
        day_column = rows["eventDate"]
        for day in pc.unique(day_column).to_pylist():
            touched_days.add(day)
            if day not in self.days and self._day_is_final(day):
                recompute_days.add(day)  # a late event for a final day
                continue
            mask = pc.equal(day_column, day)
            state = self.days.setdefault(day, _Day())
            day_devices = devices.filter(mask)
            day_purchase = purchase.filter(mask)
            state.devices.update(pc.unique(day_devices).to_pylist())
            state.payers.update(pc.unique(day_devices.filter(day_purchase)).to_pylist())
            state.events += len(day_devices)
            state.bookings += pc.sum(pc.if_else(day_purchase, amount.filter(mask), 0.0)).as_py() or 0.0
        self._advance_watermark()
        return windows

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
    def _commit(self, name: str, source: pa.Table, predicate: str, updates: dict[str, str] | None, version: int,
                state_json: str) -> None:
        """MERGEs `source` into table `name` with txn `<pipeline>-kpi` = `version`, once: every attempt first
        re-reads the table's txn version and does nothing when the table already has `version` folded in (an
        earlier attempt may have committed after all). It raises `KpiStageSuperseded` when the table's version lies
        above what this stage has folded but below `version`: another stage has been folding — the fence against
        a stale KPI stage, which holds in the race too: two MERGEs with the same txn appId conflict in delta-rs,
        and the retry re-reads the version. Conflicts (a concurrent OPTIMIZE of a KPI table) and a
        full disk are retried by `lake.CommitRetries`; a stop requested while the disk is full abandons the fold
        (`lake.RetryInterrupted`), and the next run re-folds from the tables' txn versions."""
        table = self.tables[name]
        started = time.perf_counter()
        merged = False
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
                if committed < version:
                    merge = table.merge(source, predicate=predicate, source_alias="s", target_alias="t",
                                        commit_properties=CommitProperties(
                                            app_transactions=[Transaction(self.app_id, version)],
                                            custom_metadata={STATE_KEY: state_json}))
                    merge = merge.when_matched_update(updates) if updates else merge.when_matched_update_all()
                    merge.when_not_matched_insert_all().execute()
                    merged = True
        self.folded[name] = version
        if merged:
            metrics.commits.labels(name).inc()
            metrics.commit_seconds.labels(name).observe(time.perf_counter() - started)

    def _commit_hourly(self, name: str, deltas: dict[int, dict[int, _WindowDelta]], version: int,
                       state_json: str) -> None:
        if self.folded[name] >= version:
            return
        totals: dict[int, _WindowDelta] = defaultdict(_WindowDelta)
        for commit_version, windows in deltas.items():
            if commit_version <= self.folded[name]:
                continue  # already in this table (a crash between the three commits)
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
        schema = BOOKINGS_HOURLY if bookings else EVENTS_HOURLY
        source = pa.table({f.name: columns[f.name] for f in schema}, schema=schema)
        additive = ["bookings", "purchases", "late_events"] if bookings else ["events", "late_events"]
        updates = {c: f"t.{c} + s.{c}" for c in additive}
        updates["final"] = "s.final OR t.final"
        self._commit(name, source, "t.window_start = s.window_start", updates, version, state_json)
        for start in starts:
            (open_windows.discard if is_final(start) else open_windows.add)(start)

    def _commit_daily(self, touched: set[dt.date], recompute: set[dt.date], version: int, state_json: str) -> None:
        if self.folded["kpi_daily"] >= version:
            return
        rows = []
        dataset = None
        for day in sorted(touched):
            state = self.days.get(day)
            if state is None or day in recompute:
                if dataset is None:
                    dataset = lake.open_table(self.settings.table_uri("events"), version=version).to_pyarrow_dataset()
                state = self._day_from_table(dataset, day)
                if day in self.days:
                    self.days[day] = state
            dau = len(state.devices)
            rows.append({"eventDate": day, "dau": dau, "events": state.events, "bookings": state.bookings,
                         "paying_users": len(state.payers), "arpdau": state.bookings / dau if dau else 0.0})
        source = pa.Table.from_pylist(rows, schema=DAILY)
        self._commit("kpi_daily", source, "t.eventDate = s.eventDate", None, version, state_json)

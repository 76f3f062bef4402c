"""The merge of partitioned KPIs: each log partition's copy of the KPI tables (written by its part stage, a
`KpiStage` with `part`, in the process that owns the partition) summed into the tables users read.

A device's events all lie in one partition, so every KPI is a sum over partitions: DAU, WAU, MAU, new users,
events, bookings, payers, first purchases, sessions, a cohort's size and returning users, a window's or a day's
events. The ratios (ARPDAU, stickiness, ARPPU, conversion, D1/D7/D30, the mean session) are computed from the
sums. Per table the merge keeps, in its commits' metadata (`MERGE_KEY`), which version of each partition's copy
it has summed; a round reads what the copies' newer versions changed (their change data feed: which windows,
days or cohorts) and writes those rows again as absolute values, so a merge repeated after a crash writes the
same rows. Its cost follows the windows, days and cohorts touched, not the events.

What only the whole can say is decided here:
- a window is `final` once its end is at or below the least watermark of the partitions (each part stage
  computes the same global watermark from the events commits; the least is the slowest part's view);
- a cohort's D1/D7/D30 are measurable once the latest day with events, over all partitions, is that far on;
- the tables' txn `<pipeline>-kpi` is the least events version every partition has folded: the KPI tables are
  complete up to it (what `forget --purge` and the benchmarks wait for).

One merge runs at a time, in the process holding the `kpi` role; a merge that finds a table merged beyond what
it read (another process held the role meanwhile) stops (`KpiStageSuperseded`).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake

from gamestream import metrics
from gamestream.kpi import segments
from gamestream.kpi import tables as kt
from gamestream.kpi.rows import us
from gamestream.kpi.state import STATE_KEY, KpiStageSuperseded, StageState
from gamestream.log import EventLog
from gamestream.settings import Settings
from gamestream.tables import lake

logger = logging.getLogger(__name__)

MERGE_KEY = "gamestream.kpi_merge"
KEYS = {"kpi_events_hourly": "window_start", "kpi_bookings_hourly": "window_start", "kpi_top_events": "eventDate",
        "kpi_daily": "eventDate", "kpi_retention": "cohort_day", "kpi_daily_segments": "eventDate",
        "kpi_retention_segments": "cohort_day"}
_DAILY_SUMS = ("dau", "events", "bookings", "paying_users", "new_users", "wau", "mau", "first_purchase_users",
               "sessions")


class KpiMerge:
    """Sums the partitions' copies of the KPI tables into the tables users read (see the module docstring)."""

    def __init__(self, settings: Settings, log: EventLog, *, stop: threading.Event | None = None) -> None:
        self.settings = settings
        self.partitions = log.partitions
        self.stop = stop
        self.app_id = lake.txn_app_id(settings.pipeline, stage="kpi")
        self.window_us = settings.window_minutes * 60 * 1_000_000
        self.tables = {name: lake.open_or_create(settings.table_uri(name), *kt.TABLES[name][:2])
                       for name in kt.MERGED}
        self.states = {name: self._read_state(name) for name in kt.MERGED}
        self._parts: dict[tuple[int, str], DeltaTable] = {}
        # (part, table) → the version of the part's retention copy when that copy was last brought up to date:
        # every part fold commits its retention copy last, so a copy whose part's retention has not moved since
        # has not changed either, and is not listed again (56 directory listings a round become 8 while idle)
        self._fresh_at: dict[tuple[int, str], int] = {}
        # (part, table) → (version, the copy's rows at that version): a copy is small (a row per window, day or
        # cohort), and between two rounds most copies do not change; a changed one is read whole and compared
        self._copies: dict[tuple[int, str], tuple[int, pa.Table]] = {}

    # ------------------------------------------------------------------------------------------------ state
    def _read_state(self, name: str) -> dict:
        """The merge state of table `name` from its latest commit that has one: {"parts": {part: version of its
        copy summed}, "watermark": µs | None, "last_day": ISO day | None}; empty for a table never merged."""
        for info in _latest_commit_infos(self.settings.table_uri(name), self.tables[name].version(), 50):
            raw = info.get(MERGE_KEY)
            if raw:
                state = json.loads(raw)
                state["parts"] = {int(p): v for p, v in state["parts"].items()}
                return state
        return {"parts": {}, "watermark": None, "last_day": None}

    def _part(self, part: int, name: str) -> DeltaTable | None:
        """Partition `part`'s copy of table `name`, brought up to date; None while it does not exist."""
        table = self._parts.get((part, name))
        retention = self._parts.get((part, "kpi_retention"))
        moved = None if name == "kpi_retention" or retention is None else retention.version()
        if table is None:
            uri = self.settings.kpi_part_uri(part, name)
            if not lake.table_exists(uri):
                return None
            table = self._parts[(part, name)] = lake.open_table(uri)
        elif moved is None or self._fresh_at.get((part, name)) != moved:
            table.update_incremental()
        if moved is not None:
            self._fresh_at[(part, name)] = moved
        return table

    def progress(self) -> tuple[int, int | None, dict[int, tuple[int, int | None]]]:
        """(the least events version every partition has folded, the least of their watermarks, and per
        partition (version, watermark)); a partition whose part stage never ran counts as version 0 and no
        watermark."""
        seen = {part: _part_progress(self.settings, self._part(part, "kpi_retention"), part)
                for part in range(self.partitions)}
        versions = [v for v, _ in seen.values()]
        marks = [w for _, w in seen.values()]
        least = min(versions) if versions else 0
        watermark = None if any(w is None for w in marks) or not marks else min(marks)  # type: ignore[type-var]
        return least, watermark, seen

    # ---------------------------------------------------------------------------------------------- merging
    def merge(self) -> int:
        """One round: every merged table brought up to its partitions' copies; returns how many rows it wrote."""
        version, watermark, _ = self.progress()
        written = 0
        for name in kt.MERGED:
            written += self._merge_table(name, version, watermark)
        return written

    def _copy(self, part: int, name: str, table: DeltaTable) -> pa.Table:
        """The rows of a copy at its current version (cached while it stays at that version)."""
        version = table.version()
        cached = self._copies.get((part, name))
        if cached is not None and cached[0] == version:
            return cached[1]
        schema = kt.TABLES[name][0]
        rows = table.to_pyarrow_table().select(schema.names).cast(schema) if version > 0 else schema.empty_table()
        self._copies[(part, name)] = (version, rows)
        return rows

    def _touched(self, name: str) -> tuple[set, dict[int, int]]:
        """The keys (window starts, days, cohorts) the partitions' copies of `name` changed since the merge last
        read them, and each copy's version now. A copy this merge holds in memory at the version it last summed
        is compared with its new rows; any other (the first round in this process) is read from its change data
        feed."""
        key = KEYS[name]
        keys: set = set()
        versions: dict[int, int] = {}
        merged = self.states[name]["parts"]
        for part in range(self.partitions):
            table = self._part(part, name)
            if table is None:
                continue
            now = versions[part] = table.version()
            since = merged.get(part, 0)
            if now <= since:
                continue
            cached = self._copies.get((part, name))
            if cached is not None and cached[0] == since:
                keys.update(_changed_keys(cached[1], self._copy(part, name, table), key))
                continue
            try:
                changes = pa.table(table.load_cdf(starting_version=since + 1, ending_version=now,
                                                  columns=[f'"{key}"']).read_all()) if since > 0 else None
            except Exception:  # a copy without its change data for that range (vacuumed): all its keys
                changes = None
            if changes is None:
                changes = table.to_pyarrow_table(columns=[key])
            keys.update(changes[key].to_pylist())
        keys.discard(None)
        return keys, versions

    def _merge_table(self, name: str, version: int, watermark: int | None) -> int:
        keys, versions = self._touched(name)
        state = self.states[name]
        table = self.tables[name]
        table.update_incremental()
        last_day = state.get("last_day")
        if name in ("kpi_events_hourly", "kpi_bookings_hourly"):
            keys |= self._newly_final(table, watermark)
        if name in ("kpi_retention", "kpi_retention_segments"):
            last_day = self._last_day()
            keys |= _newly_measurable(state.get("last_day"), last_day)
        committed = table.transaction_version(self.app_id) or 0
        if not keys and version <= committed and versions == state["parts"]:
            return 0
        source = self._source(name, sorted(keys), watermark, last_day)
        new_state = {"parts": {str(p): v for p, v in versions.items()}, "watermark": watermark, "last_day": last_day}
        properties = CommitProperties(app_transactions=[Transaction(self.app_id, max(version, committed))],
                                      custom_metadata={MERGE_KEY: json.dumps(new_state)})
        self._check_not_superseded(name, versions)
        for attempt in lake.CommitRetries(name, stage="kpi", conflicts=self.settings.commit_retries,
                                          stop=self.stop, context={"version": version}):
            with attempt:
                if attempt.num > 1:
                    table.update_incremental()
                if source.num_rows:
                    key = KEYS[name]
                    match = f"t.{key} = s.{key}" + (" AND t.eventName = s.eventName" if name == "kpi_top_events"
                                                    else _SEGMENT_MATCH if name in _SEGMENT_TABLES else "")
                    count = _COUNT[name]
                    table.merge(source, predicate=match, source_alias="s", target_alias="t",
                                commit_properties=properties).when_matched_delete(
                        predicate=f"s.{count} <= 0").when_matched_update_all().when_not_matched_insert_all(
                        predicate=f"s.{count} > 0").execute()
                else:  # nothing to write: the txn and the state still move
                    write_deltalake(table, kt.TABLES[name][0].empty_table(), mode="append",
                                    commit_properties=properties)
        self.states[name] = {"parts": dict(versions), "watermark": watermark, "last_day": last_day}
        metrics.commits.labels(name).inc()
        return source.num_rows

    def _check_not_superseded(self, name: str, versions: dict[int, int]) -> None:
        current = self._read_state(name)["parts"]
        ahead = [p for p, v in current.items() if v > versions.get(p, 0)]
        if ahead:
            raise KpiStageSuperseded(f"{name} was merged from newer copies of partitions {ahead} by another process")

    def _newly_final(self, table: DeltaTable, watermark: int | None) -> set:
        """The windows not final in the merged table whose end the watermark has now reached."""
        if watermark is None or table.version() == 0:
            return set()
        rows = table.to_pyarrow_table(columns=["window_start", "final"])
        open_starts = rows.filter(pc.invert(rows["final"]))["window_start"].to_pylist()
        return {s for s in open_starts if us(s) + self.window_us <= watermark}

    def _last_day(self) -> str | None:
        """The latest day with events over all partitions (the merged kpi_daily, written just before)."""
        daily = self.tables["kpi_daily"]
        daily.update_incremental()
        if daily.version() == 0:
            return None
        day = pc.max(daily.to_pyarrow_table(columns=["eventDate"])["eventDate"]).as_py()
        return day.isoformat() if day else None

    def _rows(self, name: str, keys: list) -> pa.Table:
        """Every partition's rows of `name` for `keys`."""
        key = KEYS[name]
        schema = kt.TABLES[name][0]
        wanted = pa.array(keys, schema.field(key).type)
        parts = []
        for part in range(self.partitions):
            table = self._parts.get((part, name))  # brought up to date by `_touched` this round
            if table is not None and table.version() > 0:
                rows = self._copy(part, name, table)
                parts.append(rows.filter(pc.is_in(rows[key], wanted)))
        return pa.concat_tables(parts) if parts else schema.empty_table()

    def _source(self, name: str, keys: list, watermark: int | None, last_day: str | None) -> pa.Table:
        """The merged rows of `keys`, as absolute values; a key no partition has any more gets a row of zeros (the
        MERGE deletes it)."""
        if not keys:
            return kt.TABLES[name][0].empty_table()
        rows = self._rows(name, keys)
        if name in ("kpi_events_hourly", "kpi_bookings_hourly"):
            return self._hourly(name, keys, rows, watermark)
        if name == "kpi_top_events":
            return self._top_events(keys, rows)
        if name == "kpi_daily":
            return _daily(keys, rows)
        if name in _SEGMENT_TABLES:
            return self._segments(name, keys, rows, dt.date.fromisoformat(last_day) if last_day else None)
        return _retention(keys, rows, dt.date.fromisoformat(last_day) if last_day else None)

    def _hourly(self, name: str, keys: list, rows: pa.Table, watermark: int | None) -> pa.Table:
        sums = ["bookings", "purchases", "late_events"] if name == "kpi_bookings_hourly" else ["events", "late_events"]
        totals = _sums(rows, "window_start", sums)
        out = []
        for start in keys:
            values = totals.get(start, {c: 0 for c in sums})
            end = start + dt.timedelta(microseconds=self.window_us)
            out.append({"window_start": start, "window_end": end, **values,
                        "final": watermark is not None and us(end) <= watermark})
        return pa.Table.from_pylist(out, schema=kt.TABLES[name][0])

    def _top_events(self, days: list, rows: pa.Table) -> pa.Table:
        grouped = rows.group_by(["eventDate", "eventName"]).aggregate([("events", "sum")])
        counts = {(d, n): e for d, n, e in zip(*(grouped[c].to_pylist() for c in
                                                  ("eventDate", "eventName", "events_sum")))}
        merged = self.tables["kpi_top_events"]
        if merged.version() > 0:  # names a day no longer has in any partition (a forget) get a zero: deleted
            existing = merged.to_pyarrow_dataset().to_table(
                columns=["eventDate", "eventName"], filter=ds.field("eventDate").isin(pa.array(days, pa.date32())))
            for d, n in zip(existing["eventDate"].to_pylist(), existing["eventName"].to_pylist()):
                counts.setdefault((d, n), 0)
        return pa.table({"eventDate": pa.array([k[0] for k in counts], pa.date32()),
                         "eventName": pa.array([k[1] for k in counts], pa.string()),
                         "events": pa.array(list(counts.values()), pa.int64())}, schema=kt.TOP_EVENTS)


    def _segments(self, name: str, keys: list, rows: pa.Table, last_day: dt.date | None) -> pa.Table:
        """The breakdown rows of `keys` (days, cohorts): the partitions' counts summed per (key, dimension, value),
        then cut to the top values (`segments.cut_daily`, `segments.retention_rows`); a row the merged table has
        and the sums no longer do gets zeros (the MERGE deletes it)."""
        key = KEYS[name]
        daily = name == "kpi_daily_segments"
        counts = segments.DAILY_COUNTS if daily else segments.RETENTION_COUNTS
        summed: list[dict] = []
        if rows.num_rows:
            grouped = rows.group_by([key, "dimension", "value"]).aggregate([(c, "sum") for c in counts])
            for values in zip(*(grouped[c].to_pylist() for c in (key, "dimension", "value",
                                                                 *(f"{c}_sum" for c in counts)))):
                summed.append({key: values[0], "dimension": values[1], "value": values[2],
                               **{c: v or 0 for c, v in zip(counts, values[3:])}})
        top = self.settings.kpi_top_values
        out = segments.cut_daily(summed, top) if daily else segments.retention_rows(summed, top, last_day)
        schema = kt.TABLES[name][0]
        return segments.with_zeros(out, segments.existing_keys(self.tables[name], key, keys),
                                   (key, "dimension", "value"), schema)


_SEGMENT_TABLES = ("kpi_daily_segments", "kpi_retention_segments")
_SEGMENT_MATCH = " AND t.dimension = s.dimension AND t.value = s.value"
_COUNT = {"kpi_events_hourly": "events", "kpi_bookings_hourly": "purchases", "kpi_top_events": "events",
          "kpi_daily": "events", "kpi_retention": "cohort_size", "kpi_daily_segments": "events",
          "kpi_retention_segments": "cohort_size"}


def _changed_keys(before: pa.Table, after: pa.Table, key: str) -> set:
    """The keys whose rows differ between two versions of a copy (added, removed or changed)."""
    def by_key(rows: pa.Table) -> dict:
        at = rows.column_names.index(key)
        grouped: dict = {}
        for row in zip(*(rows[c].to_pylist() for c in rows.column_names)):
            grouped.setdefault(row[at], []).append(row)
        return {k: sorted(v, key=repr) if len(v) > 1 else v for k, v in grouped.items()}

    old, new = by_key(before), by_key(after)
    return {k for k in old.keys() | new.keys() if old.get(k) != new.get(k)}


def _sums(rows: pa.Table, key: str, columns: list[str]) -> dict:
    """key → {column: sum over the partitions' rows}."""
    if not rows.num_rows:
        return {}
    grouped = rows.group_by(key).aggregate([(c, "sum") for c in columns])
    names = [f"{c}_sum" for c in columns]
    return {k: {c: (v if v is not None else 0) for c, v in zip(columns, values)}
            for k, *values in zip(grouped[key].to_pylist(), *(grouped[n].to_pylist() for n in names))}


def _daily(days: list, rows: pa.Table) -> pa.Table:
    """kpi_daily's rows: the partitions' counts summed, the ratios of the sums; a day's mean session from the
    partitions' session seconds (mean × count)."""
    seconds = pc.multiply(pc.fill_null(rows["avg_session_s"], 0.0), pc.cast(pc.fill_null(rows["sessions"], 0),
                                                                           pa.float64()))
    totals = _sums(rows.append_column("session_s", seconds), "eventDate", [*_DAILY_SUMS, "session_s"])
    out = []
    for day in days:
        t = totals.get(day) or {c: 0 for c in (*_DAILY_SUMS, "session_s")}
        dau, paying, bookings, mau, sessions = t["dau"], t["paying_users"], t["bookings"], t["mau"], t["sessions"]
        out.append({**{c: t[c] for c in _DAILY_SUMS}, "eventDate": day,
                    "arpdau": bookings / dau if dau else 0.0, "stickiness": dau / mau if mau else 0.0,
                    "arppu": bookings / paying if paying else 0.0, "conversion": paying / dau if dau else 0.0,
                    "avg_session_s": t["session_s"] / sessions if sessions else 0.0})
    return pa.Table.from_pylist(out, schema=kt.DAILY)


def _retention(cohorts: list, rows: pa.Table, last_day: dt.date | None) -> pa.Table:
    """kpi_retention's rows: cohort sizes and returning users summed; D1/D7/D30 where the latest day with events
    has reached them (as the single stage decides), else NULL."""
    counts = ["cohort_size", *(f"d{n}_users" for n in kt.RETENTION_DAYS)]
    totals = _sums(rows, "cohort_day", counts)
    out = []
    for cohort in cohorts:
        t = totals.get(cohort) or {c: 0 for c in counts}
        size = t["cohort_size"]
        row: dict = {"cohort_day": cohort, "cohort_size": size}
        for n in kt.RETENTION_DAYS:
            measurable = last_day is not None and cohort + dt.timedelta(days=n) <= last_day
            row[f"d{n}_users"] = t[f"d{n}_users"] if measurable else None
            row[f"d{n}"] = (t[f"d{n}_users"] / size if size else 0.0) if measurable else None
        out.append(row)
    return pa.Table.from_pylist(out, schema=kt.RETENTION)


def _newly_measurable(before: str | None, after: str | None) -> set:
    """The cohorts whose D1, D7 or D30 the latest day's move from `before` to `after` made measurable."""
    if after is None or before == after:
        return set()
    low = dt.date.fromisoformat(before) if before else None
    high = dt.date.fromisoformat(after)
    if low is None:
        return set()  # never merged: every cohort is a touched key already
    days = [low + dt.timedelta(days=k) for k in range(1, (high - low).days + 1)]
    return {d - dt.timedelta(days=n) for d in days for n in kt.RETENTION_DAYS}


def _part_progress(settings: Settings, table: DeltaTable | None, part: int) -> tuple[int, int | None]:
    """(events version folded, watermark) of a partition's copy, from its retention table (every part fold
    commits to it last, with its txn and state); (0, None) while it does not exist."""
    if table is None:
        return 0, None
    folded = table.transaction_version(lake.txn_app_id(settings.pipeline, stage="kpi")) or 0
    return folded, _part_watermark(settings.kpi_part_uri(part, "kpi_retention"), table, folded)


def partition_progress(settings: Settings, partitions: int) -> dict[int, tuple[int, int | None]]:
    """Per partition: (events version its copy of the KPI tables has folded, its watermark) — for `status`."""
    progress = {}
    for part in range(partitions):
        uri = settings.kpi_part_uri(part, "kpi_retention")
        progress[part] = _part_progress(settings, lake.open_table(uri) if lake.table_exists(uri) else None, part)
    return progress


def _part_watermark(uri: str, table: DeltaTable, folded: int) -> int | None:
    """A part stage's watermark as of events version `folded`, from its retention table's latest commits (each
    part fold ends with one there, carrying the stage's state)."""
    for info in _latest_commit_infos(uri, table.version(), 10):
        text = info.get(STATE_KEY)
        if text:
            state = StageState.from_json(text)
            if state.version == folded:
                return state.watermark
    return None


def _latest_commit_infos(uri: str, latest: int, most: int) -> Iterator[dict]:
    """The commitInfo of a table's versions from `latest` back, at most `most` of them, read one commit file at a
    time (the one wanted is usually the latest); {} for a commit file gone."""
    for version in range(latest, max(-1, latest - most), -1):
        yield lake.commit_infos(uri, [version])[version] or {}


def merged_up_to(settings: Settings) -> int:
    """The least events version every partition had folded when the KPI tables were last merged (their txn)."""
    uri = settings.table_uri("kpi_daily")
    if not lake.table_exists(uri):
        return 0
    return lake.open_table(uri).transaction_version(lake.txn_app_id(settings.pipeline, stage="kpi")) or 0


def merge_once(settings: Settings, log: EventLog) -> None:
    """One merge round in this process (for a caller holding the `kpi` role)."""
    KpiMerge(settings, log).merge()

"""Breakdowns: the KPIs per segment — per (day, dimension, value) and per (install cohort, dimension, value).

Dimensions: `platform` and `app_version` (eventParams), `country` (`geo_country`) and the promoted parameters
`[kpi] dimensions` names (`Settings.segment_dimensions`). An event without the dimension counts under `(not set)`.

- `kpi_daily_segments`: a day's own figures over the events that carry the value (`days.DayState.segments`):
  devices with at least one such event (so a device counts under every value it sent that day, and a
  dimension's values may sum above the day's DAU), their events, purchases' bookings, paying devices (a purchase
  with the value), and the day's sessions of those devices; `new_users`: devices whose first event — the one
  their install cohort is counted from — was that day and carried the value.
- `kpi_retention_segments`: a cohort split by the value of its devices' first event (`kpi_device_segments`
  keeps it per device and dimension, with its time: a late event earlier than the first one moves it), with the
  strict D1/D7/D30 of `kpi_retention`.

Per day (cohort) and dimension, the values past the top `kpi_top_values` by DAU (cohort size) are summed into one
row valued `(other)`; its ratios are those of the sums. Partitioned KPIs: a part's copy keeps every value, and the
merge sums the copies before it cuts (`cut_daily`, `cut_retention`).

Exactly once and exact like the totals: the rows of the days and cohorts a fold touched are derived as absolute
values — from the open days' state in memory, or the events table for a day recomputed — and written with the
fold's txn; a re-fold after a crash gives the same rows (`_derive_all` re-derives them all).
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from deltalake import write_deltalake

from gamestream.kpi import tables as kt
from gamestream.kpi.commits import ExactlyOnceCommits
from gamestream.kpi.days import DayState
from gamestream.kpi.derived import retention_counts
from gamestream.kpi.fold import Fold, device_segment_rows, merge_first_rows
from gamestream.kpi.rows import day_from_table, rows_in

DAILY_COUNTS = ("dau", "new_users", "events", "bookings", "paying_users", "sessions")
RETENTION_COUNTS = ("cohort_size", *(f"d{n}_users" for n in kt.RETENTION_DAYS))
DAILY_KEY = "t.eventDate = s.eventDate AND t.dimension = s.dimension AND t.value = s.value"
_EPOCH, _DAY_US = dt.date(1970, 1, 1), 86_400_000_000
RETENTION_KEY = "t.cohort_day = s.cohort_day AND t.dimension = s.dimension AND t.value = s.value"


class SegmentCommits(ExactlyOnceCommits):
    """`KpiStage`'s commits of the breakdown tables (a part of the stage, not a stage of its own)."""

    # --------------------------------------------------------------------------------- kpi_device_segments
    def _segment_rows_of(self, keys) -> dict[tuple[str, str], tuple[int, str]]:
        """kpi_device_segments' rows of these (device, dimension) keys, from memory where known."""
        wanted = {device for device, _ in keys if (device, _) not in self._known_segments}
        if wanted:
            table = self._read_own("kpi_device_segments")
            if table.version() > 0:
                rows = rows_in(table.to_pyarrow_dataset(), "device_id", wanted)
                times = pc.cast(pc.cast(rows["first_time"], pa.timestamp("us")), pa.int64())
                for device, dimension, t, value in zip(rows["device_id"].to_pylist(),
                                                       pc.cast(rows["dimension"], pa.string()).to_pylist(),
                                                       times.to_pylist(),
                                                       pc.cast(rows["value"], pa.string()).to_pylist()):
                    self._known_segments[(device, dimension)] = (t, value)
        return {k: self._known_segments[k] for k in keys if k in self._known_segments}

    def _commit_device_segments(self, fold: Fold, version: int, state_json: str) -> None:
        if not self.dimensions:
            return  # breakdowns off (`kpi_segments`): the tables keep what they had
        name = "kpi_device_segments"
        if fold.forgotten:
            self._delete_devices(name, fold, version, state_json)
            return
        if not fold.first_segments or self.folded[name] >= version:
            return  # (a re-fold after a crash: the table has this version; `_derive_all` re-derives its effects)
        firsts = merge_first_rows(fold.first_segments, self.dimensions)
        if fold.segment_candidates is not None:  # (None: `_commit_devices` did not say: every device may move)
            firsts = firsts.filter(pc.is_in(firsts["d"], pa.array(list(fold.segment_candidates), pa.string())))
        if not firsts.num_rows:
            return
        # A device kpi_devices did not have before this fold has no row here either (committed after it): its
        # rows are new, built without looking (most devices a fold adds).
        new = pc.is_in(firsts["d"], pa.array(list(fold.new_devices), pa.string()))
        fresh, others = firsts.filter(new), firsts.filter(pc.invert(new))
        parts = [device_segment_rows(fresh, self.dimensions)] if fresh.num_rows else []
        for t in pc.unique(pc.divide(fresh["t"], _DAY_US)).to_pylist() if fresh.num_rows else []:
            day = _EPOCH + dt.timedelta(days=t)
            fold.segment_days.add(day)
            fold.segment_cohorts.add(day)
        cached = self._known_segments
        devices, times = fresh["d"].to_pylist(), fresh["t"].to_pylist()
        for dimension in self.dimensions:  # remembered: a later fold today finds them here, not in the table
            cached.update(((d, dimension), (t, v)) for d, t, v in zip(devices, times,
                                                                      fresh[f"d:{dimension}"].to_pylist()))
        # The others (first seen today, say, or after a restart) are compared with what the table holds.
        keys = {(d, dimension): (t, v)
                for d, t, *values in zip(*(others[c].to_pylist() for c in others.column_names))
                for dimension, v in zip(self.dimensions, values)}
        known = self._segment_rows_of(list(keys)) if keys else {}
        changed: dict[tuple[str, str], tuple[int, str]] = {}
        for key, first in keys.items():
            old = known.get(key)
            if old is None or first < old:
                changed[key] = first
                for t in (first[0], old[0] if old else None):
                    if t is not None:
                        day = _EPOCH + dt.timedelta(days=t // _DAY_US)
                        fold.segment_days.add(day)
                        fold.segment_cohorts.add(day)
        if changed:
            parts.append(pa.table({
                "device_id": [k[0] for k in changed], "dimension": [k[1] for k in changed],
                "first_time": pa.array([v[0] for v in changed.values()], pa.int64()).cast(kt.TS),
                "value": [v[1] for v in changed.values()]}, schema=kt.DEVICE_SEGMENTS))
        if not parts:
            return
        source = pa.concat_tables(parts)
        if all(key not in known for key in changed):  # none the table has: appended
            self._commit(name, version, state_json, lambda table, properties: write_deltalake(
                table, source, mode="append", commit_properties=properties))
        else:  # the earlier of the two (then the least value), whatever this stage believed: idempotent
            self._merge(name, source, "t.device_id = s.device_id AND t.dimension = s.dimension",
                        None, version, state_json,
                        update_when="s.first_time < t.first_time OR (s.first_time = t.first_time AND "
                                    "s.value < t.value)")
        self._known_segments.update(changed)

    # ---------------------------------------------------------------------------------- kpi_daily_segments
    def _commit_daily_segments(self, fold: Fold, version: int, state_json: str, *, force: bool = False) -> None:
        if not self.dimensions:
            return  # breakdowns off (`kpi_segments`): the tables keep what they had
        name = "kpi_daily_segments"
        if self.folded[name] >= version and not force:
            return
        table = self.tables[name]
        days = set(fold.touched_days) | fold.recompute_days | fold.segment_days
        if self._derive_all:  # every day with events (kpi_daily, committed before), and every day with rows
            days |= set(self.days)
            daily = self._read_own("kpi_daily")
            for source in (daily, table):
                if source.version() > 0:
                    days |= set(pc.unique(source.to_pyarrow_table(columns=["eventDate"])["eventDate"]).to_pylist())
        days.discard(None)
        if not days:
            return
        wanted = sorted(days)
        figures = self._segment_figures(fold, version, wanted)
        new_users = self._segment_new_users(wanted)
        rows = []
        for day in wanted:
            for (dimension, value), base in figures.get(day, {}).items():
                rows.append({"eventDate": day, "dimension": dimension, "value": value,
                             "dau": base["dau"], "new_users": new_users.get((day, dimension, value), 0),
                             "events": base["events"], "bookings": base["bookings"],
                             "paying_users": base["paying_users"], "sessions": base["sessions"]})
        rows = with_ratios(rows) if self.part is not None else cut_daily(rows, self.settings.kpi_top_values)
        existing = existing_keys(table, "eventDate", wanted)
        source = with_zeros(rows, existing, ("eventDate", "dimension", "value"), kt.DAILY_SEGMENTS)
        self._merge(name, source, DAILY_KEY, None, version, state_json, delete_when="s.events <= 0",
                    insert_when="s.events > 0", force=force)

    def _segment_figures(self, fold: Fold, version: int, days: list[dt.date]) -> dict[dt.date, dict]:
        """Each day's own figures per (dimension, value): from its state in memory, else from the events table
        (recomputed once per fold: `_commit_daily` may have done it already)."""
        figures: dict[dt.date, dict] = {}
        dataset = None
        for day in days:
            state: DayState | None = fold.recomputed.get(day)
            if state is None and day not in fold.recompute_days:
                state = self.days.get(day)
            if state is None:
                if dataset is None:
                    dataset = self._events_dataset(version)
                state = fold.recomputed[day] = day_from_table(dataset, day, self.dimensions)
                if day in self.days or day in fold.recompute_days:  # kept: later late rows are added to it
                    self.days[day] = state
            figures[day] = state.segment_rows()
        return figures

    def _segment_new_users(self, days: list[dt.date]) -> dict[tuple[dt.date, str, str], int]:
        """(day, dimension, value) → devices whose first event was that day and carried the value."""
        members = self._cohort_members(days)
        if not members.num_rows:
            return {}
        grouped = members.group_by(["cohort", "dimension", "value"]).aggregate([("device_id", "count")])
        return {(c, d, v): n for c, d, v, n in zip(*(grouped[k].to_pylist() for k in (
            "cohort", "dimension", "value", "device_id_count")))}

    def _cohort_members(self, cohorts: list[dt.date]) -> pa.Table:
        """kpi_device_segments' rows whose first event fell on one of `cohorts`: device_id, dimension, value and
        the day (`cohort`)."""
        table = self._read_own("kpi_device_segments")
        schema = pa.schema([("device_id", pa.string()), ("dimension", pa.string()), ("value", pa.string()),
                            ("cohort", pa.date32())])
        if table.version() == 0 or not cohorts:
            return schema.empty_table()
        low = dt.datetime.combine(min(cohorts), dt.time(), dt.timezone.utc)
        high = dt.datetime.combine(max(cohorts) + dt.timedelta(days=1), dt.time(), dt.timezone.utc)
        rows = table.to_pyarrow_dataset().to_table(
            columns=["device_id", "dimension", "value", "first_time"],
            filter=(ds.field("first_time") >= pa.scalar(low, kt.TS))
            & (ds.field("first_time") < pa.scalar(high, kt.TS)))
        day = pc.cast(pc.cast(rows["first_time"], pa.timestamp("us")), pa.date32())
        members = pa.table({"device_id": pc.cast(rows["device_id"], pa.string()),
                            "dimension": pc.cast(rows["dimension"], pa.string()),
                            "value": pc.cast(rows["value"], pa.string()), "cohort": day}, schema=schema)
        return members.filter(pc.is_in(members["cohort"], pa.array(cohorts, pa.date32())))

    # ------------------------------------------------------------------------------ kpi_retention_segments
    def _commit_retention_segments(self, fold: Fold, version: int, state_json: str, *, force: bool = False) -> None:
        if not self.dimensions:
            return  # breakdowns off (`kpi_segments`): the tables keep what they had
        name = "kpi_retention_segments"
        if self.folded[name] >= version and not force:
            return
        table = self.tables[name]
        cohorts = set(fold.cohorts) | fold.segment_cohorts
        if self._derive_all:
            if table.version() > 0:
                cohorts |= set(table.to_pyarrow_table(columns=["cohort_day"])["cohort_day"].to_pylist())
            devices = self._read_own("kpi_devices")
            if devices.version() > 0:
                cohorts |= set(pc.unique(devices.to_pyarrow_table(columns=["first_day"])["first_day"]).to_pylist())
        cohorts.discard(None)
        if not cohorts:
            return
        wanted = sorted(cohorts)
        members = self._cohort_members(wanted)
        later = sorted({c + dt.timedelta(days=n) for c in wanted for n in kt.RETENTION_DAYS})
        activity = self._read_own("kpi_activity").to_pyarrow_dataset()
        returns = activity.to_table(filter=ds.field("eventDate").isin(pa.array(later, pa.date32())))
        last_day = self._last_day() if self.part is None else None
        rows = []
        for (cohort, dimension, value), (size, *retained) in retention_counts(
                members, returns, ["dimension", "value"]).items():
            row = {"cohort_day": cohort, "dimension": dimension, "value": value, "cohort_size": size}
            row.update({f"d{n}_users": users for n, users in zip(kt.RETENTION_DAYS, retained)})
            rows.append(row)
        # a part's counts are kept whatever its own last day: the merge judges by every part's
        rows = retention_rows(rows, None if self.part is not None else self.settings.kpi_top_values, last_day,
                              measure=self.part is None)
        existing = existing_keys(table, "cohort_day", wanted)
        source = with_zeros(rows, existing, ("cohort_day", "dimension", "value"), kt.RETENTION_SEGMENTS)
        self._merge(name, source, RETENTION_KEY, None, version, state_json, delete_when="s.cohort_size <= 0",
                    insert_when="s.cohort_size > 0", force=force)

    def _last_day(self) -> dt.date | None:
        """The latest day with events (kpi_daily, committed before): how far D1/D7/D30 are measurable."""
        daily = self._read_own("kpi_daily")
        if daily.version() == 0:
            return None
        return pc.max(daily.to_pyarrow_table(columns=["eventDate"])["eventDate"]).as_py()


# -------------------------------------------------------------------------------------- shared with the merge
def with_ratios(rows: list[dict]) -> list[dict]:
    """kpi_daily_segments rows with their ratios (ARPPU, conversion) computed from their counts."""
    for row in rows:
        dau, paying, bookings = row["dau"], row["paying_users"], row["bookings"]
        row["arppu"] = bookings / paying if paying else 0.0
        row["conversion"] = paying / dau if dau else 0.0
    return rows


def _cut(rows: list[dict], key: str, rank: str, counts: tuple[str, ...], top: int | None) -> list[dict]:
    """Per (key, dimension), the `top` values by `rank` (then by value) kept, the rest summed into `(other)`."""
    if top is None:
        return rows
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row[key], row["dimension"])].append(row)
    out = []
    for (at, dimension), members in groups.items():
        members.sort(key=lambda r: (-r[rank], r["value"]))
        kept, rest = members[:top], members[top:]
        out.extend(r for r in kept if r["value"] != kt.OTHER)
        rest += [r for r in kept if r["value"] == kt.OTHER]  # a value spelled "(other)" joins the sum
        if rest:
            other = {key: at, "dimension": dimension, "value": kt.OTHER}
            for column in counts:
                present = [r[column] for r in rest if r[column] is not None]
                other[column] = sum(present) if present else None
            out.append(other)
    return out


def cut_daily(rows: list[dict], top: int | None) -> list[dict]:
    """kpi_daily_segments' rows of whole days cut to the top values per dimension (by DAU), with ratios."""
    return with_ratios(_cut(rows, "eventDate", "dau", DAILY_COUNTS, top))


def retention_rows(rows: list[dict], top: int | None, last_day: dt.date | None, *, measure: bool = True
                   ) -> list[dict]:
    """kpi_retention_segments' rows cut to the top values per cohort and dimension (by size), with D1/D7/D30
    where the latest day with events has reached them (`measure`; else the counts are kept as they are)."""
    out = _cut(rows, "cohort_day", "cohort_size", RETENTION_COUNTS, top)
    for row in out:
        size = row["cohort_size"]
        for n in kt.RETENTION_DAYS:
            measurable = not measure or (last_day is not None and row["cohort_day"] + dt.timedelta(days=n)
                                         <= last_day)
            users = row.get(f"d{n}_users")
            row[f"d{n}_users"] = users if measurable else None
            row[f"d{n}"] = ((users or 0) / size if size else 0.0) if measurable else None
    return out


def existing_keys(table, key: str, wanted: list[dt.date]) -> list[tuple]:
    """The (key, dimension, value) rows table has for the days or cohorts `wanted`."""
    if table.version() == 0:
        return []
    rows = table.to_pyarrow_dataset().to_table(columns=[key, "dimension", "value"],
                                               filter=ds.field(key).isin(pa.array(wanted, pa.date32())))
    return list(zip(rows[key].to_pylist(), pc.cast(rows["dimension"], pa.string()).to_pylist(),
                    pc.cast(rows["value"], pa.string()).to_pylist()))


def with_zeros(rows: list[dict], existing: list[tuple], key: tuple[str, str, str], schema: pa.Schema) -> pa.Table:
    """`rows` as a table, with a row of zeros for each existing key they no longer have (the MERGE deletes it)."""
    have = {tuple(r[k] for k in key) for r in rows}
    zeros = [dict(zip(key, k)) for k in existing if k not in have]
    for row in zeros:
        for f in schema:
            if f.name not in key:
                row[f.name] = 0 if pa.types.is_integer(f.type) else 0.0
    return pa.Table.from_pylist(rows + zeros, schema=schema)

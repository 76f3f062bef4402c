"""The commits of the derived tables: the daily and cohort rows a fold affected, computed as absolute values from
the state tables just committed (so a re-fold gives the same rows)."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from gamestream.kpi import tables as kt
from gamestream.kpi.commits import ExactlyOnceCommits
from gamestream.kpi.fold import Fold
from gamestream.kpi.rows import day_from_table


class DerivedCommits(ExactlyOnceCommits):
    """`KpiStage`'s commits of kpi_daily and kpi_retention (a part of the stage, not a stage of its own)."""

    def _state_tables(self) -> tuple[ds.Dataset, ds.Dataset]:
        return self._read_own("kpi_activity").to_pyarrow_dataset(), self._read_own("kpi_devices").to_pyarrow_dataset()

    def _commit_daily(self, fold: Fold, version: int, state_json: str, *, force: bool = False) -> None:
        name = "kpi_daily"
        if self.folded[name] >= version and not force:
            return
        table = self.tables[name]
        existing = table.to_pyarrow_table() if table.version() > 0 else kt.DAILY.empty_table()
        days = self._daily_days(fold, set(existing["eventDate"].to_pylist()))
        if not days:
            return
        base = self._daily_base(fold, version, days, existing)
        activity, devices = self._state_tables()
        for day in days:  # a part's day without events of its own (only in a WAU/MAU window)
            base.setdefault(day, {"dau": 0, "events": 0, "bookings": 0.0, "paying_users": 0, "sessions": 0,
                                  "avg_session_s": 0.0})
        rows = _daily_rows(days, base, self._active_users(activity, days), self._first_counts(devices, days))
        source = pa.Table.from_pylist(rows, schema=kt.DAILY)
        # A part keeps a row for each day its devices count in: with events, or in the WAU/MAU of a day (a day
        # another partition has events on sums this part's WAU and MAU too).
        kept = "s.events > 0 OR s.mau > 0" if self.part is not None else "s.events > 0"
        self._merge(name, source, "t.eventDate = s.eventDate", None, version, state_json,
                    delete_when=f"NOT ({kept})", insert_when=kept, force=force)

    def _daily_days(self, fold: Fold, existing_days: set[dt.date]) -> list[dt.date]:
        """The kpi_daily rows the fold re-derives."""
        wanted = set(fold.daily_days) | fold.touched_days
        if self._derive_all:
            wanted |= existing_days | set(self.days)
        if self.part is not None:
            return sorted(wanted)  # also the days only in a WAU/MAU window (`_commit_daily`)
        # only days with events have a row (a day emptied by a forget loses it)
        return sorted(d for d in wanted if d in existing_days or d in fold.touched_days or d in self.days)

    def _daily_base(self, fold: Fold, version: int, days: list[dt.date], existing: pa.Table) -> dict[dt.date, dict]:
        """Each day's own figures (devices, events, bookings, payers, sessions): from its state in memory, from
        the events table when the fold recomputes it, else from its row in kpi_daily."""
        base: dict[dt.date, dict] = {}
        dataset = None
        for day in days:
            state = self.days.get(day) if day not in fold.recompute_days else None
            if state is None and (day in fold.touched_days or self._derive_all):
                if dataset is None:
                    dataset = self._events_dataset(version)
                state = fold.recomputed[day] = day_from_table(dataset, day, self.dimensions)
                if day in self.days or day in fold.recompute_days:  # kept: later late rows are added to it
                    self.days[day] = state
            if state is not None:
                row = state.base_row()
                row["avg_session_s"] = row.pop("session_us") / row["sessions"] / 1e6 if row["sessions"] else 0.0
                base[day] = row
        for row in existing.filter(pc.is_in(existing["eventDate"], pa.array(days, pa.date32()))).to_pylist():
            if row["eventDate"] not in base:
                base[row["eventDate"]] = {k: row[k] for k in ("dau", "events", "bookings", "paying_users",
                                                              "sessions", "avg_session_s")}
        return base

    def _active_users(self, activity: ds.Dataset, days: list[dt.date]) -> dict[dt.date, tuple[int, int]]:
        """WAU and MAU of each day: distinct devices active in the 7 and 30 days ending that day."""
        low = min(days) - dt.timedelta(days=kt.MAU_DAYS - 1)
        pairs = activity.to_table(filter=(ds.field("eventDate") >= low) & (ds.field("eventDate") <= max(days)))
        return active_users(pairs, days)

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

    def _commit_retention(self, fold: Fold, version: int, state_json: str, *, force: bool = False) -> None:
        name = "kpi_retention"
        if self.folded[name] >= version and not force:
            return
        activity, devices = self._state_tables()
        daily = self._read_own("kpi_daily")
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
        members = pa.table({"device_id": pc.cast(members["device_id"], pa.string()), "cohort": members["first_day"]})
        for (cohort,), counts in retention_counts(members, returns, []).items():
            sizes[cohort] = counts
        rows = []
        for cohort, (size, *retained) in sorted(sizes.items()):
            row: dict = {"cohort_day": cohort, "cohort_size": size}
            for n, users in zip(kt.RETENTION_DAYS, retained):
                # a part's counts are kept whatever its own last day: the merge judges by every part's
                measurable = self.part is not None or (last_day is not None
                                                       and cohort + dt.timedelta(days=n) <= last_day)
                row[f"d{n}_users"] = users if measurable else None
                row[f"d{n}"] = (users / size if size else 0.0) if measurable else None
            rows.append(row)
        source = pa.Table.from_pylist(rows, schema=kt.RETENTION)
        self._merge(name, source, "t.cohort_day = s.cohort_day", None, version, state_json,
                    delete_when="s.cohort_size = 0", insert_when="s.cohort_size > 0", force=force)


def retention_counts(members: pa.Table, returns: pa.Table, keys: list[str]) -> dict[tuple, tuple[int, ...]]:
    """(cohort, *keys) → (cohort size, devices active exactly 1, 7 and 30 days after the cohort day), from the
    cohorts' `members` (device_id, cohort, *keys; one row per device and key) and the (eventDate, device_id) pairs
    of those later days (`returns`). Hash joins in Arrow (DuckDB's planning cost ~40 ms a query for a handful of
    rows)."""
    group = ["cohort", *keys]
    if not members.num_rows:
        return {}
    sizes = members.group_by(group).aggregate([("device_id", "count_distinct")])
    found = {tuple(k): [n, 0, 0, 0] for *k, n in zip(*(sizes[c].to_pylist() for c in group),
                                                     sizes["device_id_count_distinct"].to_pylist())}
    if returns.num_rows:
        back = pa.table({"device_id": pc.cast(returns["device_id"], pa.string()),
                         "day": pc.cast(returns["eventDate"], pa.date32())})
        cohort_days = pc.cast(pc.cast(members["cohort"], pa.date32()), pa.int32())
        for index, n in enumerate(kt.RETENTION_DAYS, start=1):
            later = members.append_column("day", pc.cast(pc.cast(pc.add(cohort_days, n), pa.int32()), pa.date32()))
            hits = later.join(back, keys=["device_id", "day"], join_type="inner")
            if not hits.num_rows:
                continue
            counted = hits.group_by(group).aggregate([("device_id", "count_distinct")])
            for *k, count in zip(*(counted[c].to_pylist() for c in group),
                                 counted["device_id_count_distinct"].to_pylist()):
                found[tuple(k)][index] = count
    return {k: tuple(v) for k, v in found.items()}


def active_users(pairs: pa.Table, days: list[dt.date]) -> dict[dt.date, tuple[int, int]]:
    """WAU and MAU of each of `days` from (eventDate, device_id) pairs: the distinct devices with a pair in the 7
    (30) days ending that day. Per device, its active days' windows [d, d + N - 1] are joined where they touch, so
    the device covers each day at most once; a difference array over the days summed up counts the devices. (One
    sort, in numpy: a join of every day with its 30 days of pairs cost DuckDB ~40 ms even for a few thousand.)"""
    if not days:
        return {}
    first = np.datetime64(min(days), "D").astype(np.int64)
    span = (np.datetime64(max(days), "D").astype(np.int64) - first) + 1
    wanted = np.array([np.datetime64(d, "D").astype(np.int64) - first for d in days], np.int64)
    if not pairs.num_rows:
        return {d: (0, 0) for d in days}
    encoded = pc.dictionary_encode(pc.cast(pairs["device_id"], pa.string())).combine_chunks()
    devices = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    at = pc.cast(pairs["eventDate"], pa.date32()).combine_chunks().to_numpy(zero_copy_only=False).astype(
        "datetime64[D]").astype(np.int64) - first
    order = np.lexsort((at, devices))
    devices, at = devices[order], at[order]
    counts = []
    for window in (kt.WAU_DAYS, kt.MAU_DAYS):
        # a new stretch where the device changes or its next active day is past the window of the last one
        starts = np.ones(len(at), bool)
        starts[1:] = (devices[1:] != devices[:-1]) | (at[1:] - at[:-1] > window)
        begin = at[starts]
        ends = np.append(np.flatnonzero(starts)[1:], len(at)) - 1
        finish = at[ends] + window - 1
        begin, finish = np.clip(begin, 0, span), np.clip(finish, -1, span - 1)
        keep = begin <= finish
        change = np.zeros(span + 1, np.int64)
        np.add.at(change, begin[keep], 1)
        np.add.at(change, finish[keep] + 1, -1)
        counts.append(np.cumsum(change)[:span][wanted])
    return {d: (int(w), int(m)) for d, w, m in zip(days, counts[0], counts[1])}


def _daily_rows(days: list[dt.date], base: dict[dt.date, dict], windows: dict[dt.date, tuple[int, int]],
                firsts: dict[tuple[str, dt.date], int]) -> list[dict]:
    """kpi_daily's rows: each day's own figures, its WAU and MAU, new users and first purchases, and the ratios."""
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
    return rows

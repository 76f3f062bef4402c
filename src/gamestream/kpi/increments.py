"""The commits of the tables a fold adds to: hourly windows and top events (additive MERGEs that take only the
versions above the table's own txn), the (day, device) pairs and first days (idempotent upserts)."""

from __future__ import annotations

import datetime as dt
from collections import defaultdict

import pyarrow as pa
from deltalake import write_deltalake

from gamestream.kpi import tables as kt
from gamestream.kpi.commits import ExactlyOnceCommits
from gamestream.kpi.fold import Fold, WindowDelta
from gamestream.kpi.rows import from_us, rows_in


class IncrementalCommits(ExactlyOnceCommits):
    """`KpiStage`'s commits of the additive and state tables (a part of the stage, not a stage of its own)."""

    def _commit_hourly(self, name: str, deltas: dict[int, dict[int, WindowDelta]], version: int,
                       state_json: str) -> None:
        if self.folded[name] >= version:
            return
        totals: dict[int, WindowDelta] = defaultdict(WindowDelta)
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
        # (a partition's copy: its windows' `final` is the merge's to decide, so no MERGE only to flag them)
        starts = sorted(set(totals) | ({s for s in open_windows if is_final(s)} if self.part is None else set()))
        columns: dict[str, list] = defaultdict(list)
        for start in starts:
            delta = totals.get(start, WindowDelta())
            columns["window_start"].append(from_us(start))
            columns["window_end"].append(from_us(start + self.window_us))
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

    def _commit_activity(self, fold: Fold, version: int, state_json: str) -> None:
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

    def _devices_rows(self, ids) -> dict[str, tuple[dt.date, dt.date | None]]:
        """kpi_devices' rows of these devices (first day, first purchase day), from memory where known."""
        wanted = [d for d in ids if d not in self._known_devices]
        if wanted:
            table = self._read_own("kpi_devices")
            rows = rows_in(table.to_pyarrow_dataset(), "device_id", wanted)
            for device, first, purchase in zip(*(rows[c].to_pylist() for c in kt.DEVICES.names)):
                self._known_devices[device] = (first, purchase)
        return {d: self._known_devices[d] for d in ids if d in self._known_devices}

    def _commit_devices(self, fold: Fold, version: int, state_json: str) -> None:
        name = "kpi_devices"
        if fold.forgotten:
            self._delete_devices(name, fold, version, state_json)
            return
        if not fold.first_day or self.folded[name] >= version:
            return  # (a re-fold after a crash: the table has this version; `_derive_all` re-derives its effects)
        known = self._devices_rows(fold.first_day)
        fold.new_devices = {d for d in fold.first_day if d not in known}
        # the devices whose first event may be in this fold: new ones, and those first seen on or after the
        # day of their earliest row here (the others' install cohort, and its breakdown values, cannot move)
        candidates = fold.segment_candidates = set()
        changed: dict[str, tuple[dt.date, dt.date | None]] = {}
        for device, day in fold.first_day.items():
            old_first, old_purchase = known.get(device, (None, None))
            if old_first is None or old_first >= day:
                candidates.add(device)
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

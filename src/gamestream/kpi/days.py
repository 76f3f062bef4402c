"""One UTC day's exact per-device state: distinct devices and payers, events, bookings, and sessions.

A day that is not final yet (its end is above the watermark) is held in memory and updated as versions are
folded; a final day leaves memory, and a late event for it recomputes it from the events table
(`KpiStage._day_from_table`). Both paths go through `DayState.add`, so they cannot disagree.

Sessions: a device's session ends after 30 minutes without events (`SESSION_GAP_US`), and at midnight UTC — as
Google Analytics ends sessions at midnight — so a day's sessions depend on that day's events only and a late
event never revises another day. A session's length is its last event's time minus its first (a single event is
a session of length 0). Events may arrive in any order: each device's sessions of the day are kept as sorted
[start, end] intervals and an arrival merges every interval it comes within 30 minutes of.

Breakdowns (`kpi_daily_segments`): rows with value columns (`rows.segment_column`) also fold into one `DayState`
per (dimension, value) (`segments`), over that value's events alone: a device counts under every value it sent
that day, its events and purchases under the value they carry. A value's sessions are the day's sessions of the
devices counted under it (a device that updated its app at noon counts all its sessions of the day under both
versions): a value's own state keeps no session intervals, which would cost the whole session bookkeeping again
per dimension.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gamestream.schema import PURCHASE as PURCHASE  # the KPI modules' name for it

SESSION_GAP_US = 30 * 60 * 1_000_000


@dataclass
class DayState:
    devices: set[str] = field(default_factory=set)
    payers: set[str] = field(default_factory=set)
    events: int = 0
    bookings: float = 0.0
    sessions: dict[str, list[list[int]]] = field(default_factory=dict)  # device → sorted [start_us, end_us]
    session_count: int = 0
    session_us: int = 0
    segments: dict[tuple[str, str], "DayState"] = field(default_factory=dict)  # (dimension, value) → its state
    own_sessions: bool = True  # False: a value's state (its sessions are counted from the day's, `segment_rows`)

    def add(self, rows: pa.Table) -> set[str]:
        """Folds rows of this day (columns device_id, t (µs), purchase (bool), amount, and each breakdown's
        `d:<dimension>` values); returns the devices that had no event this day before (new (day, device)
        pairs).

        The devices are encoded once (`_Devices`): the day's sets, its sessions and every breakdown work on their
        codes and take the device ids, each made a Python string once, only for the distinct devices."""
        devices = _Devices(rows["device_id"])
        purchase = pc.fill_null(rows["purchase"], False)
        paid = pc.if_else(purchase, pc.fill_null(rows["amount"], 0.0), 0.0)
        purchase_np, paid_np = purchase.to_numpy(), paid.to_numpy()
        for column in (c for c in rows.column_names if c.startswith("d:")):
            self._add_values(column[2:], rows[column], devices, purchase_np, paid_np)
        distinct = set(devices.names)
        new = distinct - self.devices
        self.devices |= distinct
        self.payers.update(devices.distinct(purchase_np))
        self.events += rows.num_rows
        self.bookings += float(paid_np.sum())
        if self.own_sessions:
            self._add_sessions(devices, rows["t"])
        return new

    def _add_values(self, dimension: str, values: pa.ChunkedArray | pa.Array, devices: "_Devices",
                    purchase: np.ndarray, paid: np.ndarray) -> None:
        """The states of `dimension`'s values (strings, no nulls) gain what `add` of each value's rows alone would
        give a value's state (devices, payers, events, bookings): counted per value code over all the rows at
        once, not by splitting the rows by value (a sort and a copy of every row per dimension)."""
        encoded = pc.dictionary_encode(values)
        if isinstance(encoded, pa.ChunkedArray):
            encoded = encoded.combine_chunks()
        labels = encoded.dictionary.to_pylist()
        codes = encoded.indices.to_numpy(zero_copy_only=False)
        events = np.bincount(codes, minlength=len(labels))
        bookings = np.bincount(codes, weights=paid, minlength=len(labels))
        players = devices.by_group(codes, len(labels))
        payers = devices.by_group(codes, len(labels), purchase)
        for code in sorted(range(len(labels)), key=labels.__getitem__):
            state = self.segments.get((dimension, labels[code]))
            if state is None:
                state = self.segments[(dimension, labels[code])] = DayState(own_sessions=False)
            state.devices.update(players[code])
            state.payers.update(payers[code])
            state.events += int(events[code])
            state.bookings += float(bookings[code])

    def _add_sessions(self, devices: "_Devices", times: pa.ChunkedArray | pa.Array) -> None:
        if not len(devices.codes):
            return
        names = devices.names
        # sorted by device (its code: integers sort faster than strings), then time
        ordered = pa.table({"d": devices.indices, "t": times}).sort_by([("d", "ascending"), ("t", "ascending")])
        d = ordered["d"].combine_chunks()
        t = ordered["t"].combine_chunks()
        # runs of this batch: a new run at each device change or gap of 30 minutes or more
        breaks = pc.or_(pc.not_equal(d[1:], d[:-1]), pc.greater_equal(pc.subtract(t[1:], t[:-1]), SESSION_GAP_US))
        starts = pa.concat_arrays([pa.array([True]), pc.fill_null(breaks, True)])
        first = pc.cast(pc.indices_nonzero(starts), pa.int64())
        last = pa.concat_arrays([pc.subtract(first[1:], 1), pa.array([len(t) - 1], pa.int64())])
        sessions = self.sessions
        added_count = added_us = 0
        for index, start, end in zip(d.take(first).to_pylist(), t.take(first).to_pylist(), t.take(last).to_pylist()):
            name = names[index] if index is not None else None
            if name is None:
                continue
            intervals = sessions.get(name)
            if intervals is None:  # the device's first session of the day: nothing to merge with
                sessions[name] = [[start, end]]
                added_count += 1
                added_us += end - start
                continue
            latest = intervals[-1]
            if start >= latest[0]:  # in order, the usual case: after (or inside) the device's latest session
                if start - latest[1] >= SESSION_GAP_US:
                    intervals.append([start, end])
                    added_count += 1
                    added_us += end - start
                    continue
                if end > latest[1]:
                    added_us += end - latest[1]
                    latest[1] = end
                continue
            self._merge(intervals, start, end)
        self.session_count += added_count
        self.session_us += added_us

    def _merge(self, intervals: list[list[int]], start: int, end: int) -> None:
        """Merges the run [start, end] into a device's sorted, disjoint intervals (each 30 minutes or more from
        the next): the intervals less than 30 minutes from the run join it (their events and the run's then
        have no 30-minute gap between them); the day's totals follow the difference."""
        at = bisect.bisect_left(intervals, start, key=lambda interval: interval[0])
        low = at
        while low > 0 and start - intervals[low - 1][1] < SESSION_GAP_US:
            low -= 1
        high = at
        while high < len(intervals) and intervals[high][0] - end < SESSION_GAP_US:
            high += 1
        joined = intervals[low:high]
        merged = [min([start, *(i[0] for i in joined)]), max([end, *(i[1] for i in joined)])]
        intervals[low:high] = [merged]
        self.session_count += 1 - len(joined)
        self.session_us += (merged[1] - merged[0]) - sum(b - a for a, b in joined)

    def segment_rows(self) -> dict[tuple[str, str], dict]:
        """(dimension, value) → that value's own figures of the day (`base_row`), its sessions those of its
        devices."""
        rows = {}
        sessions = self.sessions
        for key, state in self.segments.items():
            row = state.base_row()
            row["sessions"] = sum(len(sessions.get(device, ())) for device in state.devices)
            rows[key] = row
        return rows

    def base_row(self) -> dict:
        return {"dau": len(self.devices), "events": self.events, "bookings": self.bookings,
                "paying_users": len(self.payers), "sessions": self.session_count,
                "session_us": self.session_us}



class _Devices:
    """A batch's device ids, encoded once: `codes` (numpy, -1 for a null id), `indices` (Arrow, null for a null
    id) and `names`, the distinct ids as Python strings, in code order."""

    def __init__(self, ids: pa.ChunkedArray | pa.Array) -> None:
        encoded = pc.dictionary_encode(ids)
        if isinstance(encoded, pa.ChunkedArray):
            encoded = encoded.combine_chunks()
        self.indices = encoded.indices
        self.codes = pc.fill_null(encoded.indices, -1).to_numpy().astype(np.int64)
        self.names: list[str] = encoded.dictionary.to_pylist()

    def distinct(self, mask: np.ndarray) -> list[str]:
        """The distinct ids of the rows where `mask` holds."""
        codes = np.unique(self.codes[mask])
        return [self.names[c] for c in codes[codes >= 0].tolist()]

    def by_group(self, groups: np.ndarray, count: int, mask: np.ndarray | None = None) -> list[list[str]]:
        """Per group code (0 … count-1), the distinct ids of its rows (where `mask` holds)."""
        keep = self.codes >= 0 if mask is None else (self.codes >= 0) & mask
        pairs = groups[keep].astype(np.int64) * len(self.names) + self.codes[keep]
        if count * len(self.names) <= 8 * len(self.codes):  # a bitmap of the (group, id) pairs: no sort
            seen = np.zeros(count * len(self.names), dtype=bool)
            seen[pairs] = True
            pairs = np.flatnonzero(seen)
        else:  # many groups (values) and ids: sorted
            pairs = np.unique(pairs)
        bounds = np.searchsorted(pairs, np.arange(count + 1, dtype=np.int64) * len(self.names))
        devices = (pairs % max(len(self.names), 1)).tolist()
        names = self.names
        return [[names[c] for c in devices[bounds[g]:bounds[g + 1]]] for g in range(count)]

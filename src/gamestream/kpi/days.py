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
        pairs)."""
        values = [c for c in rows.column_names if c.startswith("d:")]
        if values:
            base = rows.select(["device_id", "t", "purchase", "amount"])
            for column in values:
                for value, part in _by_value(base, rows[column]):
                    key = (column[2:], value)
                    state = self.segments.get(key)
                    if state is None:
                        state = self.segments[key] = DayState(own_sessions=False)
                    state.add(part)
            rows = base
        devices = rows["device_id"]
        purchase = rows["purchase"]
        distinct = set(pc.unique(devices).to_pylist()) - {None}
        new = distinct - self.devices
        self.devices |= distinct
        self.payers.update(pc.unique(devices.filter(purchase)).to_pylist())
        self.payers.discard(None)
        self.events += rows.num_rows
        self.bookings += pc.sum(pc.if_else(purchase, rows["amount"], 0.0)).as_py() or 0.0
        if self.own_sessions:
            self._add_sessions(devices, rows["t"])
        return new

    def _add_sessions(self, devices: pa.ChunkedArray | pa.Array, times: pa.ChunkedArray | pa.Array) -> None:
        if len(devices) == 0:
            return
        encoded = pc.dictionary_encode(devices)
        if isinstance(encoded, pa.ChunkedArray):
            encoded = encoded.combine_chunks()
        names = encoded.dictionary.to_pylist()
        # sorted by device (its dictionary index: integers sort faster than strings), then time
        ordered = pa.table({"d": encoded.indices, "t": times}).sort_by([("d", "ascending"), ("t", "ascending")])
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



def _by_value(rows: pa.Table, values: pa.ChunkedArray | pa.Array) -> list[tuple[str, pa.Table]]:
    """The rows split by their value (strings, no nulls): one slice per value, from one stable sort."""
    counts = pc.value_counts(values)
    found = counts.field("values").to_pylist()
    if len(found) == 1:
        return [(found[0], rows)]
    ordered = rows.take(pc.sort_indices(values))
    slices, offset = [], 0
    for value, count in sorted(zip(found, counts.field("counts").to_pylist())):
        slices.append((value, ordered.slice(offset, count)))
        offset += count
    return slices

"""One UTC day's exact per-device state: distinct devices and payers, events, bookings, and sessions.

A day that is not final yet (its end is above the watermark) is held in memory and updated as versions are
folded; a final day leaves memory, and a late event for it recomputes it from the events table
(`day_from_rows`). Both paths go through `DayState.add`, so they cannot disagree.

Sessions: a device's session ends after 30 minutes without events (`SESSION_GAP_US`), and at midnight UTC — as
Google Analytics ends sessions at midnight — so a day's sessions depend on that day's events only and a late
event never revises another day. A session's length is its last event's time minus its first (a single event is
a session of length 0). Events may arrive in any order: each device's sessions of the day are kept as sorted
[start, end] intervals and an arrival merges every interval it comes within 30 minutes of.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

SESSION_GAP_US = 30 * 60 * 1_000_000
PURCHASE = "purchaseEvent"


@dataclass
class DayState:
    devices: set[str] = field(default_factory=set)
    payers: set[str] = field(default_factory=set)
    events: int = 0
    bookings: float = 0.0
    sessions: dict[str, list[list[int]]] = field(default_factory=dict)  # device → sorted [start_us, end_us]
    session_count: int = 0
    session_us: int = 0

    def add(self, rows: pa.Table) -> set[str]:
        """Folds rows of this day (columns device_id, t (µs), purchase (bool), amount); returns the devices that
        had no event this day before (new (day, device) pairs)."""
        devices = rows["device_id"]
        purchase = rows["purchase"]
        distinct = set(pc.unique(devices).to_pylist()) - {None}
        new = distinct - self.devices
        self.devices |= distinct
        self.payers.update(pc.unique(devices.filter(purchase)).to_pylist())
        self.payers.discard(None)
        self.events += rows.num_rows
        self.bookings += pc.sum(pc.if_else(purchase, rows["amount"], 0.0)).as_py() or 0.0
        self._add_sessions(devices, rows["t"])
        return new

    def _add_sessions(self, devices: pa.ChunkedArray | pa.Array, times: pa.ChunkedArray | pa.Array) -> None:
        if len(devices) == 0:
            return
        ordered = pa.table({"d": devices, "t": times}).sort_by([("d", "ascending"), ("t", "ascending")])
        d = ordered["d"].combine_chunks()
        t = ordered["t"].combine_chunks()
        # runs of this batch: a new run at each device change or gap of 30 minutes or more
        breaks = pc.or_(pc.not_equal(d[1:], d[:-1]), pc.greater_equal(pc.subtract(t[1:], t[:-1]), SESSION_GAP_US))
        starts = pa.concat_arrays([pa.array([True]), pc.fill_null(breaks, True)])
        first = pc.cast(pc.indices_nonzero(starts), pa.int64())
        last = pa.concat_arrays([pc.subtract(first[1:], 1), pa.array([len(t) - 1], pa.int64())])
        for name, start, end in zip(d.take(first).to_pylist(), t.take(first).to_pylist(), t.take(last).to_pylist()):
            if name is not None:
                self._merge(self.sessions.setdefault(name, []), start, end)

    def _merge(self, intervals: list[list[int]], start: int, end: int) -> None:
        """Merges the run [start, end] into a device's sorted intervals: intervals less than 30 minutes apart
        join (their events then have no 30-minute gap between them); the day's totals follow the difference."""
        before_count = len(intervals)
        before_us = sum(b - a for a, b in intervals)
        merged = _coalesce(sorted([*intervals, [start, end]]))
        intervals[:] = merged
        self.session_count += len(merged) - before_count
        self.session_us += sum(b - a for a, b in merged) - before_us

    def base_row(self) -> dict:
        return {"dau": len(self.devices), "events": self.events, "bookings": self.bookings,
                "paying_users": len(self.payers), "sessions": self.session_count,
                "session_us": self.session_us}


def _coalesce(intervals: list[list[int]]) -> list[list[int]]:
    out: list[list[int]] = []
    for interval in intervals:
        if out and interval[0] - out[-1][1] < SESSION_GAP_US:
            out[-1][1] = max(out[-1][1], interval[1])
        else:
            out.append(list(interval))
    return out

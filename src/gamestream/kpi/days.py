"""One UTC day's exact per-device state: distinct devices and payers, events, bookings, and sessions.

A day that is not final yet (its end is above the watermark) is held in memory and updated as versions are
folded; a final day leaves memory, and a late event for it recomputes it from the events table
(`KpiStage._day_from_table`). Both paths go through `DayState.add`, so they cannot disagree.

Sessions: a device's session ends after 30 minutes without events (`SESSION_GAP_US`), and at midnight UTC — as
Google Analytics ends sessions at midnight — so a day's sessions depend on that day's events only and a late
event never revises another day. A session's length is its last event's time minus its first (a single event is
a session of length 0). Events may arrive in any order: the day's sessions are kept as [start, end] intervals
(numpy arrays: device, start, end), and a batch's events are joined with the intervals of the devices they
belong to and cut into sessions again at every gap of 30 minutes, all devices at once (`_add_sessions`).

Breakdowns (`kpi_daily_segments`): rows with value columns (`rows.segment_column`) also fold into one `DayState`
per (dimension, value) (`segments`), over that value's events alone: a device counts under every value it sent
that day, its events and purchases under the value they carry. A value's sessions are the day's sessions of the
devices counted under it (a device that updated its app at noon counts all its sessions of the day under both
versions): a value's own state keeps no session intervals, which would cost the whole session bookkeeping again
per dimension.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gamestream.schema import PURCHASE as PURCHASE  # the KPI modules' name for it

SESSION_GAP_US = 30 * 60 * 1_000_000
_KEY_LIMIT = 2**62  # `_add_sessions`' sort keys stay below it


@dataclass
class DayState:
    devices: set[str] = field(default_factory=set)
    payers: set[str] = field(default_factory=set)
    events: int = 0
    bookings: float = 0.0
    session_ids: dict[str, int] = field(default_factory=dict)  # device → its number in the day's intervals
    # the day's sessions, one interval each (in no particular order): the device's number, first and last µs
    session_device: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    session_start: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    session_end: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
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
        """The batch's events joined with the day's sessions of their devices, and cut into sessions again:
        sorted by (device, time) as one integer key — the device's rank in the batch times a width wider than
        the times' span plus 30 minutes, plus the time — so that a running maximum of the ends never crosses from
        one device to the next, and a session starts wherever a start is 30 minutes or more past the ends before
        it. The day's totals follow the difference (those devices' sessions before, and after)."""
        keep = devices.codes >= 0
        if not keep.any():
            return
        ids = self.session_ids
        batch_ids = np.fromiter((ids.setdefault(name, len(ids)) for name in devices.names), np.int64,
                                len(devices.names))
        rank = np.full(len(ids), -1, dtype=np.int64)
        rank[batch_ids] = np.arange(len(batch_ids))  # each device of the batch, by its code
        times_np = pc.cast(times, pa.int64()).to_numpy() if isinstance(times, pa.Array) else \
            pc.cast(times, pa.int64()).combine_chunks().to_numpy(zero_copy_only=False)
        event_times = times_np[keep]
        held = rank[self.session_device] >= 0  # the day's sessions of the batch's devices: joined again
        old_start, old_end = self.session_start[held], self.session_end[held]
        ranks = np.concatenate([rank[self.session_device[held]], devices.codes[keep]])
        starts = np.concatenate([old_start, event_times])
        ends = np.concatenate([old_end, event_times])
        low = int(starts.min())
        width = int(ends.max()) - low + SESSION_GAP_US + 1
        chunk = max(1, _KEY_LIMIT // width)  # devices a pass, so that rank × width fits in an int64 (all, for a day)
        new_device, new_start, new_end = [], [], []
        for first in range(0, len(batch_ids), chunk):
            part = slice(None) if chunk >= len(batch_ids) else (ranks >= first) & (ranks < first + chunk)
            offset = (ranks[part] - first) * width - low
            order = np.argsort(starts[part] + offset)
            key_start = (starts[part] + offset)[order]
            key_end = np.maximum.accumulate((ends[part] + offset)[order])
            opens = np.empty(len(order), dtype=bool)
            opens[0] = True
            np.greater_equal(key_start[1:] - key_end[:-1], SESSION_GAP_US, out=opens[1:])
            begin = np.flatnonzero(opens)
            finish = np.append(begin[1:] - 1, len(order) - 1)
            session_rank = key_start[begin] // width
            new_device.append(batch_ids[session_rank + first])
            new_start.append(key_start[begin] - session_rank * width + low)
            new_end.append(key_end[finish] - session_rank * width + low)
        added_start, added_end = np.concatenate(new_start), np.concatenate(new_end)
        self.session_count += len(added_start) - len(old_start)
        self.session_us += int((added_end - added_start).sum()) - int((old_end - old_start).sum())
        rest = ~held
        self.session_device = np.concatenate([self.session_device[rest], *new_device])
        self.session_start = np.concatenate([self.session_start[rest], added_start])
        self.session_end = np.concatenate([self.session_end[rest], added_end])

    def segment_rows(self) -> dict[tuple[str, str], dict]:
        """(dimension, value) → that value's own figures of the day (`base_row`), its sessions those of its
        devices."""
        rows = {}
        per_device = np.bincount(self.session_device, minlength=len(self.session_ids)).tolist()
        ids = self.session_ids
        for key, state in self.segments.items():
            row = state.base_row()
            row["sessions"] = sum(per_device[ids[device]] for device in state.devices if device in ids)
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

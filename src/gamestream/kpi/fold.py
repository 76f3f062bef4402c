"""What a fold gathers before its commits (`Fold`), and the steps that fold the rows of one events-table version
into it: hourly window deltas, events per (day, name), the greatest eventTime per log partition, first days per
device. (The days' exact state and the watermark are the stage's: `KpiStage._fold_version`.)"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from gamestream.kpi import tables as kt


@dataclass
class WindowDelta:
    """What a version adds to one hourly window."""

    events: int = 0
    late: int = 0
    purchases: int = 0
    bookings: float = 0.0
    late_purchases: int = 0


@dataclass
class Fold:
    """What one fold changes, gathered before its commits."""
    windows: dict[int, dict[int, WindowDelta]] = field(default_factory=dict)  # version → window start → delta
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
    # breakdowns: (device, dimension) → (time µs, value) of the device's earliest event in this fold
    first_segments: list = field(default_factory=list)  # per version, its devices' `first_rows`
    segment_candidates: set[str] | None = None  # devices whose first event may be in this fold (None: any)
    new_devices: set[str] = field(default_factory=set)  # devices kpi_devices did not have before this fold
    segment_days: set[dt.date] = field(default_factory=set)  # kpi_daily_segments days whose new users moved
    segment_cohorts: set[dt.date] = field(default_factory=set)  # kpi_retention_segments cohorts whose members moved
    recomputed: dict = field(default_factory=dict)  # day → its DayState recomputed from the table in this fold


def event_times(rows: pa.Table) -> pa.Array:
    """Each row's eventTime in µs."""
    return pc.cast(pc.cast(rows["eventTime"], pa.timestamp("us")), pa.int64())


def window_deltas(times: pa.Array, purchase: pa.Array, amount: pa.Array, watermark: int | None,
                  window_us: int) -> dict[int, WindowDelta]:
    """Window start → what the rows add to that hourly window; a row is late when its window is final already
    (its end at or below the watermark)."""
    starts = pc.subtract(times, pc.modulo(times, window_us))
    late = (pc.less_equal(pc.add(starts, window_us), watermark) if watermark is not None
            else pa.array([False] * len(times)))
    frame = pa.table({
        "start": starts, "late": pc.cast(late, pa.int64()), "purchase": pc.cast(purchase, pa.int64()),
        "bookings": pc.if_else(purchase, amount, 0.0),
        "late_purchase": pc.cast(pc.and_(late, purchase), pa.int64()),
    })
    grouped = frame.group_by("start").aggregate([("start", "count"), ("late", "sum"), ("purchase", "sum"),
                                                 ("bookings", "sum"), ("late_purchase", "sum")])
    return {
        start: WindowDelta(events, late_sum, purchases, bookings, late_purchases)
        for start, events, late_sum, purchases, bookings, late_purchases in zip(
            *(grouped[c].to_pylist() for c in ("start", "start_count", "late_sum", "purchase_sum",
                                               "bookings_sum", "late_purchase_sum")))
    }


def name_counts(rows: pa.Table, *, sign: int = 1) -> dict[tuple[dt.date, str], int]:
    """(day, eventName) → events of the rows (negated with `sign=-1`: rows a forget deleted)."""
    names = rows.group_by(["eventDate", "eventName"]).aggregate([("eventName", "count")])
    return {(d, n): sign * c for d, n, c in zip(names["eventDate"].to_pylist(), names["eventName"].to_pylist(),
                                                names["eventName_count"].to_pylist())}


def note_greatest_times(max_seen: dict[int, int], partitions: pa.Array, times: pa.Array) -> None:
    """Raises `max_seen` (log partition → greatest eventTime folded, µs) to the rows' greatest per partition."""
    seen = pa.table({"partition": partitions, "t": times}).group_by("partition").aggregate([("t", "max")])
    for partition, greatest in zip(seen["partition"].to_pylist(), seen["t_max"].to_pylist()):
        if greatest > max_seen.get(partition, -(1 << 62)):
            max_seen[partition] = greatest


def note_recorded_times(max_seen: dict[int, int], recorded: dict[int, int]) -> None:
    """Raises `max_seen` to the greatest eventTime per partition an events commit recorded."""
    for partition, greatest in recorded.items():
        if greatest > max_seen.get(partition, -(1 << 62)):
            max_seen[partition] = greatest


def note_first_days(fold: Fold, rows: pa.Table, purchase: pa.Array) -> None:
    """Lowers the fold's first day and first purchase day per device to the rows' least."""
    firsts = pa.table({"d": rows["device_id"], "day": rows["eventDate"],
                       "pday": pc.if_else(purchase, rows["eventDate"], None)}).group_by("d").aggregate(
        [("day", "min"), ("pday", "min")])
    for device, day, pday in zip(*(firsts[c].to_pylist() for c in ("d", "day_min", "pday_min"))):
        if device is None:
            continue
        if device not in fold.first_day or day < fold.first_day[device]:
            fold.first_day[device] = day
        if pday is not None and (device not in fold.first_purchase or pday < fold.first_purchase[device]):
            fold.first_purchase[device] = pday


def first_rows(rows: pa.Table, times: pa.Array, dimensions: tuple[str, ...]) -> pa.Table:
    """Each device's earliest row (`d`, `t` µs, and per dimension the least value among its rows at that
    microsecond, `d:<dimension>`): the values its install cohort would take. Vectorized: the least time per
    device, the rows at that time, the least value of each column among them."""
    columns = [f"d:{d}" for d in dimensions]
    frame = pa.table({"d": rows["device_id"], "t": times, **{c: rows[c] for c in columns}})
    return _earliest(frame.filter(pc.is_valid(frame["d"])), columns)


def _earliest(frame: pa.Table, columns: list[str]) -> pa.Table:
    if not frame.num_rows:
        return frame
    least = frame.group_by("d").aggregate([("t", "min")]).rename_columns(["d", "t"])
    at_least = frame.join(least, keys=["d", "t"], join_type="inner")
    grouped = at_least.group_by(["d", "t"]).aggregate([(c, "min") for c in columns])
    return grouped.rename_columns(["d", "t", *columns]).select(["d", "t", *columns])


def device_segment_rows(firsts: pa.Table, dimensions: tuple[str, ...]) -> pa.Table:
    """`first_rows` as `kpi_device_segments` rows: one per device and dimension."""
    return pa.concat_tables([pa.table({
        "device_id": firsts["d"], "dimension": pa.array([d] * firsts.num_rows, pa.string()),
        "first_time": firsts["t"].cast(kt.TS), "value": firsts[f"d:{d}"]}, schema=kt.DEVICE_SEGMENTS)
        for d in dimensions])


def merge_first_rows(tables: list[pa.Table], dimensions: tuple[str, ...]) -> pa.Table | None:
    """`first_rows` of several versions' rows reduced to one row per device, as `first_rows` of them all."""
    if not tables:
        return None
    return _earliest(pa.concat_tables(tables), [f"d:{d}" for d in dimensions])

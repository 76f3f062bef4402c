"""Breakdowns on the dashboard (issue 27): the `segments` object of `GET /v1/dashboard?dimension=NAME`.

Read from the KPI stage's `kpi_daily_segments` (one row per day, dimension and value) and
`kpi_retention_segments` (one row per install cohort, dimension and value of the device's first event). Either
table may be missing (an older data directory, a stage that has not written yet): the answer is then empty, and the
page says "no data yet".

What the page draws is kept legible by folding: of a dimension's values, the SERIES_SHOWN with the most DAU summed
over the days shown are series of their own (ties by name); every other value — and the stage's own `(other)`, the
values past its top `[kpi] top_values` (50) of a day — is summed into one `(other)` series. A folded figure is the
sum of its values' figures (DAU, new users, events, bookings, paying users, sessions; a device that sent two folded
values that day counts under both, as it does in the table), and its ARPPU and conversion are computed from those
sums, as the KPI stage computes them (0.0 over a zero). The retention table folds the same way, ranked by installs
over the cohorts shown; there the sums are exact, since a device's install cohort takes the one value of its first
event. The latest day's rows are shown as stored, unfolded.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from gamestream.api.dashboard.figures import number
from gamestream.kpi.tables import OTHER
from gamestream.settings import BUILTIN_DIMENSIONS

SERIES_SHOWN = 8
"""Values drawn as series of their own: more lines than this on one chart no longer read apart."""
ADDITIVE = ("dau", "new_users", "events", "bookings", "paying_users", "sessions")
"""kpi_daily_segments' columns that sum across values (for the `(other)` series); ARPPU and conversion don't."""
DAY_COLUMNS = (*ADDITIVE, "arppu", "conversion")

__all__ = ["OTHER", "SERIES_SHOWN", "SegmentRows", "UnknownDimension", "breakdown", "known_dimensions",
           "listed_dimensions", "read_cohorts", "read_days"]


class UnknownDimension(ValueError):
    """`?dimension=` names a dimension neither configured nor in the segment tables: answered 400 with the known
    ones."""

    def __init__(self, dimension: str, known: list[str]) -> None:
        self.dimension, self.known = dimension, known
        super().__init__(f"unknown dimension {dimension!r}: " + (
            f"the dimensions are {', '.join(known)} (or none, for the totals)" if known
            else "the KPIs are not broken down ([kpi] segments = false)"))


@dataclass(frozen=True)
class SegmentRows:
    """One read of the two segment tables, for every dimension: what any `?dimension=` answer is built from, so
    the dashboard's cache serves them all from one read."""

    days: list[dict] = field(default_factory=list)
    """kpi_daily_segments' rows of the days shown (see `read_days`)."""
    cohorts: list[dict] = field(default_factory=list)
    """kpi_retention_segments' rows of the cohorts shown (see `read_cohorts`)."""

    @property
    def present(self) -> set[str]:
        """The dimensions the rows hold."""
        return {r["dimension"] for r in self.days} | {r["dimension"] for r in self.cohorts}


def ordered(first: Iterable[str], dimensions: Iterable[str]) -> list[str]:
    """`dimensions`, those in `first` first in its order, the others by name."""
    dimensions, first = set(dimensions), list(dict.fromkeys(first))
    return [d for d in first if d in dimensions] + sorted(dimensions.difference(first))


def listed_dimensions(rows: SegmentRows, configured: Iterable[str]) -> list[str]:
    """What the page's selector lists: the dimensions the tables hold, in the configured order
    (`Settings.segment_dimensions`), then any other (kept under an earlier configuration) by name."""
    return ordered([*BUILTIN_DIMENSIONS, *configured], rows.present)


def known_dimensions(rows: SegmentRows, configured: Iterable[str]) -> list[str]:
    """The dimensions `?dimension=` accepts: those the KPI stage is configured to keep
    (`Settings.segment_dimensions`: the built-in ones, then `[kpi] dimensions`), in that order, then any other the
    tables hold (kept under an earlier configuration). A known dimension without rows is answered empty ("no data
    yet"), not refused: the KPI stage may simply not have written it yet."""
    configured = list(configured)
    return ordered(configured, [*configured, *rows.present])


# ----------------------------------------------------------------------------------------------------- reading
def read_days(dataset: ds.Dataset | None, days_shown: int) -> list[dict]:
    """kpi_daily_segments' rows of the `days_shown` days up to its newest day (two reads: the dates, then the rows
    of those days, which the files' statistics prune)."""
    if dataset is None:
        return []
    newest = pc.max(dataset.to_table(columns=["eventDate"]).column("eventDate")).as_py()
    if newest is None:
        return []
    since = newest - dt.timedelta(days=days_shown - 1)
    return dataset.to_table(filter=ds.field("eventDate") >= pa.scalar(since, pa.date32())).to_pylist()


def read_cohorts(dataset: ds.Dataset | None, cohorts_shown: int) -> list[dict]:
    """kpi_retention_segments' rows of its `cohorts_shown` newest install days (as the totals' table shows)."""
    if dataset is None:
        return []
    days = sorted(pc.unique(dataset.to_table(columns=["cohort_day"]).column("cohort_day")).to_pylist(), reverse=True)
    if not days:
        return []
    since = days[:cohorts_shown][-1]
    return dataset.to_table(filter=ds.field("cohort_day") >= pa.scalar(since, pa.date32())).to_pylist()


# ---------------------------------------------------------------------------------------------------- folding
def top_values(rows: list[dict], weight: str) -> list[str]:
    """The SERIES_SHOWN values with the largest sum of `weight` over `rows` (ties by name), never the table's own
    OTHER: what the charts and the retention table show as values of their own."""
    totals: dict[str, float] = {}
    for r in rows:
        if r["value"] != OTHER:
            totals[r["value"]] = totals.get(r["value"], 0) + (r[weight] or 0)
    return sorted(totals, key=lambda value: (-totals[value], value))[:SERIES_SHOWN]


def fold(rows: list[dict], top: list[str]) -> dict[str, list[dict]]:
    """The rows by series: each top value's own rows, every other row under OTHER."""
    series: dict[str, list[dict]] = {value: [] for value in top}
    for r in rows:
        series.setdefault(r["value"] if r["value"] in top else OTHER, []).append(r)
    return {value: grouped for value, grouped in series.items() if grouped}


def day_figures(rows: list[dict]) -> dict[str, Any]:
    """One series' figures of one day: a single row as stored; several (a folded OTHER) summed, with ARPPU and
    conversion computed from the sums as the KPI stage computes them (0.0 over a zero)."""
    if len(rows) == 1:
        only = rows[0]
        figures = {name: only.get(name) for name in DAY_COLUMNS}
    else:
        figures = {name: sum(r.get(name) or 0 for r in rows) for name in ADDITIVE}
        dau, paying, bookings = figures["dau"], figures["paying_users"], figures["bookings"]
        figures["arppu"] = bookings / paying if paying else 0.0
        figures["conversion"] = paying / dau if dau else 0.0
    return {**figures, "bookings": number(figures["bookings"], 2), "arppu": number(figures["arppu"], 2),
            "conversion": number(figures["conversion"])}


def cohort_figures(rows: list[dict]) -> dict[str, Any]:
    """One series' retention of one cohort: a single row as stored; several (a folded OTHER) summed — exact, as
    each device is in one value of its cohort. A rate not measurable yet is None in every row of a cohort alike."""
    if len(rows) == 1:
        only = rows[0]
        return {"cohort_size": only["cohort_size"], **{f"d{n}": number(only.get(f"d{n}")) for n in (1, 7, 30)},
                **{f"d{n}_users": only.get(f"d{n}_users") for n in (1, 7, 30)}}
    size = sum(r["cohort_size"] for r in rows)
    figures: dict[str, Any] = {"cohort_size": size}
    for n in (1, 7, 30):
        users = [r.get(f"d{n}_users") for r in rows]
        total = None if any(u is None for u in users) else sum(users)
        figures[f"d{n}_users"] = total
        figures[f"d{n}"] = number(total / size) if total is not None and size else None
    return figures


def series_order(top: list[str], series: Iterable[str]) -> list[str]:
    present = set(series)
    return [value for value in top if value in present] + ([OTHER] if OTHER in present else [])


# ----------------------------------------------------------------------------------------------------- answer
def breakdown(rows: SegmentRows, dimension: str, listed: list[str]) -> dict[str, Any]:
    """The `segments` object for `dimension` (`listed`: the selector's dimensions, `listed_dimensions`):

    - `series`: the values drawn, top first, then `(other)` when anything was folded into it;
    - `days`: per day (oldest first) and series, `{eventDate, value, dau, new_users, events, bookings,
      paying_users, arppu, conversion, sessions}`;
    - `latest`: `{eventDate, rows}` — every stored row of the newest day, by DAU, `(other)` last — or None;
    - `retention`: per cohort (newest first) and series (in the retention's own top order), `{cohort_day, value,
      cohort_size, d1, d7, d30, d1_users, d7_users, d30_users}`, a rate None while not measurable yet.
    """
    days = [r for r in rows.days if r["dimension"] == dimension]
    cohorts = [r for r in rows.cohorts if r["dimension"] == dimension]
    top = top_values(days, "dau")
    by_day: dict[dt.date, list[dict]] = {}
    for r in days:
        by_day.setdefault(r["eventDate"], []).append(r)
    day_rows, drawn = [], set()
    for day in sorted(by_day):
        folded = fold(by_day[day], top)
        drawn.update(folded)
        day_rows += [{"eventDate": day.isoformat(), "value": value, **day_figures(folded[value])}
                     for value in series_order(top, folded)]
    latest = None
    if by_day:
        newest = max(by_day)
        ranked = sorted(by_day[newest], key=lambda r: (r["value"] == OTHER, -(r["dau"] or 0), r["value"]))
        latest = {"eventDate": newest.isoformat(),
                  "rows": [{"value": r["value"], **day_figures([r])} for r in ranked]}
    cohort_top = top_values(cohorts, "cohort_size")
    by_cohort: dict[dt.date, list[dict]] = {}
    for r in cohorts:
        by_cohort.setdefault(r["cohort_day"], []).append(r)
    retention = []
    for day in sorted(by_cohort, reverse=True):
        folded = fold(by_cohort[day], cohort_top)
        retention += [{"cohort_day": day.isoformat(), "value": value, **cohort_figures(folded[value])}
                      for value in series_order(cohort_top, folded)]
    return {"dimension": dimension, "dimensions": listed, "series": series_order(top, drawn),
            "days": day_rows, "latest": latest, "retention": retention}

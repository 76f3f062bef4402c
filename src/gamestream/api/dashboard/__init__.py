"""The live dashboard: a page at `/` and the small JSON API it polls, `GET /v1/dashboard`.

The page (static/index.html, app.js, style.css, with uPlot vendored under static/vendor/) asks for
`/v1/dashboard` every second and redraws: events per hourly window (bars; provisional windows marked),
bookings per hourly window (line, with purchases), today's DAU, ARPDAU and paying users (UTC), incoming events/s,
processing lag (log backlog, freshness = now − newest committed eventTime), the quarantine with its latest
reasons, and the events table's health (files per partition, average file size, small files — under
`Settings.small_file_bytes`, returned with them so the page names the threshold it counts — last OPTIMIZE and VACUUM).
From the KPI tables of issue 16 it also shows the latest day's engagement and monetization (WAU, MAU, stickiness,
new users, ARPPU, conversion, sessions, average session length; DAU/WAU/MAU per day as a chart), the retention
cohorts (D1, D7, D30) and the latest day's top events. A table or column the KPI stage has not written yet (a
data directory from an older version) is shown as "no data yet": each figure it would give is None or empty here.

Breakdowns (issue 27, `segments.py`): a dimension selector ("Total", then each dimension in kpi_daily_segments)
splits the daily chart (DAU per day per value), the latest day's figures (a row per value) and the retention table
(a row per cohort and value). The answer always carries `segments.dimensions` (what the selector lists); with
`?dimension=NAME` also the split itself (`segments.breakdown`), built from one cached read of kpi_daily_segments
and kpi_retention_segments that serves every dimension. A name neither configured (`Settings.segment_dimensions`)
nor in the tables is refused (`UnknownDimension`, a 400 naming the known ones); a known one without rows, or
missing tables, gives an empty split ("no data yet").
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from deltalake import DeltaTable

from gamestream.api.dashboard import segments
from gamestream.api.dashboard.figures import number as _number
from gamestream.api.dashboard.segments import SegmentRows, UnknownDimension
from gamestream.settings import Settings
from gamestream.tables import lake
from gamestream.tables.maintenance import file_stats, last_operations

UTC = dt.timezone.utc
HOURS_SHOWN = 48  # the charts show the windows of the last 48 hours of event time
DAYS_SHOWN = 30  # the daily active-users chart: the last 30 days of kpi_daily
# The retention table: the 37 newest install days. Only a cohort at least 30 days old has its D30, so the 30 newest
# alone would never show one; seven more give the D30 of a week of cohorts.
COHORTS_SHOWN = 37
TOP_EVENTS_SHOWN = 10

# kpi_daily's columns of the latest day that the page shows as tiles, and the decimals each is rounded to (None:
# as stored; rates stay exact, so the page rounds them once, for display). Tables written before issue 16 lack
# most of them; a missing one is None in the answer.
ACTIVITY_COLUMNS = {"dau": None, "wau": None, "mau": None, "stickiness": None, "new_users": None, "paying_users": None,
                    "first_purchase_users": None, "bookings": 2, "arppu": 2, "conversion": None, "sessions": None,
                    "avg_session_s": 1}


def _iso(value: dt.datetime | dt.date | None) -> str | None:
    return value.isoformat() if value is not None else None


def activity(daily: list[dict]) -> tuple[dict | None, list[dict]]:
    """From kpi_daily's rows: the latest day's figures (None without rows) and DAU, WAU, MAU and stickiness per
    day over the DAYS_SHOWN days up to it, oldest first."""
    if not daily:
        return None, []
    daily = sorted(daily, key=lambda r: r["eventDate"])
    latest = daily[-1]
    figures = {"eventDate": latest["eventDate"].isoformat(),
               **{name: _number(latest.get(name), decimals) for name, decimals in ACTIVITY_COLUMNS.items()}}
    since = latest["eventDate"] - dt.timedelta(days=DAYS_SHOWN - 1)
    days = [{"eventDate": r["eventDate"].isoformat(), "dau": r.get("dau"), "wau": r.get("wau"),
             "mau": r.get("mau"), "stickiness": _number(r.get("stickiness"))}
            for r in daily if r["eventDate"] >= since]
    return figures, days


def retention(cohorts: list[dict]) -> list[dict]:
    """kpi_retention's COHORTS_SHOWN newest cohorts, newest first. A rate (and its user count) is None while the
    day it measures is still to come, as the table holds it."""
    newest = sorted(cohorts, key=lambda r: r["cohort_day"], reverse=True)[:COHORTS_SHOWN]
    return [{"cohort_day": r["cohort_day"].isoformat(), "cohort_size": r["cohort_size"],
             **{f"d{n}": _number(r.get(f"d{n}")) for n in (1, 7, 30)},
             **{f"d{n}_users": r.get(f"d{n}_users") for n in (1, 7, 30)}}
            for r in newest]


def top_events(rows: list[dict]) -> dict | None:
    """kpi_top_events' TOP_EVENTS_SHOWN most frequent events of its latest day (None without rows)."""
    if not rows:
        return None
    latest = max(r["eventDate"] for r in rows)
    ranked = sorted((r for r in rows if r["eventDate"] == latest), key=lambda r: (-r["events"], r["eventName"]))
    return {"eventDate": latest.isoformat(),
            "events": [{"eventName": r["eventName"], "events": r["events"]} for r in ranked[:TOP_EVENTS_SHOWN]]}


@dataclass
class IngestRate:
    """Events accepted per second over the last few seconds, from samples of a running total."""

    window_s: float = 5.0
    samples: deque = field(default_factory=lambda: deque(maxlen=64))

    def sample(self, total: float, now: float | None = None) -> None:
        self.samples.append((time.monotonic() if now is None else now, total))

    def per_second(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        newest_t, newest = self.samples[-1]
        oldest_t, oldest = next(((t, v) for t, v in self.samples if newest_t - t <= self.window_s),
                                self.samples[0])
        return (newest - oldest) / (newest_t - oldest_t) if newest_t > oldest_t else 0.0


@dataclass(frozen=True)
class _Cached:
    """One read of the tables: when (monotonic), what the answer shows of them, and the newest committed
    eventTime, kept apart because freshness is measured from it at each request, not at the read; likewise the
    segment tables' rows, which each request splits by the dimension it asks for."""

    read_at: float
    tables: dict[str, Any]
    newest_event_time: dt.datetime | None
    segments: SegmentRows


class DashboardData:
    """Builds the `/v1/dashboard` answer from the Delta tables (cached for `ttl_s`, rebuilt in a thread)."""

    def __init__(self, settings: Settings, ttl_s: float = 0.5) -> None:
        self.settings = settings
        self.ttl_s = ttl_s
        self._cached: _Cached | None = None
        self._lock = threading.Lock()
        self._tables = lake.TableCache()  # used under self._lock only

    def snapshot(self, *, backlog: int | None, events_per_second: float,
                 dimension: str | None = None) -> dict[str, Any]:
        """The `/v1/dashboard` answer, split by `dimension` when one is given (`segments`); raises
        `UnknownDimension` for a name `known_dimensions` does not hold. The cached tables are shared by every
        request within `ttl_s` (several open pages, or one page polling faster than the cache expires), so nothing
        here may change them: freshness is computed anew from the cached newest eventTime each time, which keeps
        it right on every cache hit, and the split is built anew from the cached segment rows."""
        with self._lock:
            if self._cached and time.monotonic() - self._cached.read_at < self.ttl_s:
                cached = self._cached
            else:
                tables, newest = self._read_tables()
                cached = self._cached = _Cached(time.monotonic(), tables, newest, self._read_segments())
        listed = segments.listed_dimensions(cached.segments, self.settings.segment_dimensions)
        split: dict[str, Any] = {"dimension": None, "dimensions": listed}
        if dimension is not None:
            known = self.known_dimensions(cached.segments)
            if dimension not in known:
                raise UnknownDimension(dimension, known)
            split = segments.breakdown(cached.segments, dimension, listed)
        now = dt.datetime.now(UTC)
        newest = cached.newest_event_time
        return {
            "generated_at": now.isoformat(),
            **cached.tables,
            "segments": split,
            "ingest": {"events_per_second": round(events_per_second, 1)},
            "lag": {"backlog_events": backlog,
                    "newest_event_time": _iso(newest),
                    "freshness_seconds": round((now - newest).total_seconds(), 1) if newest else None},
        }

    def known_dimensions(self, rows: SegmentRows) -> list[str]:
        """What `?dimension=` takes: the dimensions the KPI stage is configured to keep, and any in the tables."""
        return segments.known_dimensions(rows, self.settings.segment_dimensions)

    def _table(self, name: str) -> DeltaTable | None:
        return self._tables.latest(self.settings.table_uri(name))

    def _read_segments(self) -> SegmentRows:
        """The segment tables' rows of the days and cohorts shown (none while a table is missing)."""
        return SegmentRows(
            days=segments.read_days(self._tables.dataset(self.settings.table_uri("kpi_daily_segments")), DAYS_SHOWN),
            cohorts=segments.read_cohorts(self._tables.dataset(self.settings.table_uri("kpi_retention_segments")),
                                          COHORTS_SHOWN))

    def _rows(self, name: str) -> list[dict]:
        """All rows of a small KPI table (one read), or none when the table does not exist yet."""
        table = self._table(name)
        return [] if table is None else table.to_pyarrow_table().to_pylist()

    def _recent_windows(self, name: str) -> list[dict]:
        """The table's windows within HOURS_SHOWN of its newest one, oldest first."""
        table = self._table(name)
        if table is None:
            return []
        rows = sorted(table.to_pyarrow_table().to_pylist(), key=lambda r: r["window_start"])
        if not rows:
            return []
        since = rows[-1]["window_start"] - dt.timedelta(hours=HOURS_SHOWN - 1)
        return [r for r in rows if r["window_start"] >= since]

    def _read_tables(self) -> tuple[dict[str, Any], dt.datetime | None]:
        result: dict[str, Any] = {"hourly": [], "bookings": [], "today": None, "quarantine": {"count": 0,
                                                                                             "latest": []}}
        hourly = self._recent_windows("kpi_events_hourly")
        result["hourly"] = [{**r, "window_start": _iso(r["window_start"]), "window_end": _iso(r["window_end"])}
                            for r in hourly]
        if hourly:
            since = hourly[0]["window_start"]
            bookings = [r for r in self._recent_windows("kpi_bookings_hourly") if r["window_start"] >= since]
            result["bookings"] = [{**r, "window_start": _iso(r["window_start"]),
                                   "window_end": _iso(r["window_end"]), "bookings": round(r["bookings"], 2)}
                                  for r in bookings]
        today = dt.datetime.now(UTC).date()
        result["today"] = {"eventDate": today.isoformat(), "dau": 0, "events": 0, "bookings": 0.0,
                           "paying_users": 0, "arpdau": 0.0}
        daily = self._rows("kpi_daily")
        for row in daily:
            if row["eventDate"] == today:
                result["today"] = {"eventDate": today.isoformat(), "dau": row["dau"], "events": row["events"],
                                   "bookings": round(row["bookings"], 2), "paying_users": row["paying_users"],
                                   "arpdau": round(row["arpdau"], 4)}
        result["activity"], result["activity_days"] = activity(daily)
        result["retention"] = retention(self._rows("kpi_retention"))
        result["top_events"] = top_events(self._rows("kpi_top_events"))
        quarantine = self._table("events_quarantine")
        if quarantine is not None:
            actions = quarantine.get_add_actions(flatten=True)
            if actions.num_rows:
                result["quarantine"]["count"] = sum(actions.column("num_records").to_pylist())
                rows = quarantine.to_pyarrow_table(columns=["quarantinedAt", "reason"]).to_pylist()
                rows.sort(key=lambda r: r["quarantinedAt"], reverse=True)
                result["quarantine"]["latest"] = [{"at": _iso(r["quarantinedAt"]), "reason": r["reason"]}
                                                  for r in rows[:5]]
        result["tables"], newest = self._events_health()
        return result, newest

    def _events_health(self) -> tuple[dict[str, Any], dt.datetime | None]:
        events = self._table("events")
        if events is None:
            return {}, None
        stats = file_stats(events, small_under=self.settings.small_file_bytes)
        actions = events.get_add_actions(flatten=True)
        newest = None
        if actions.num_rows and "max.eventTime" in actions.column_names:
            values = [v for v in actions.column("max.eventTime").to_pylist() if v is not None]
            newest = max(values) if values else None
            if newest is not None and newest.tzinfo is None:
                newest = newest.replace(tzinfo=UTC)
        last = last_operations(events)
        health = {"events": {
            "version": events.version(),
            "files": stats.files,
            "partitions": len(stats.partitions),
            "files_per_partition": round(stats.files / len(stats.partitions), 1) if stats.partitions else 0,
            "max_files_in_a_partition": max((files for files, _ in stats.partitions.values()), default=0),
            "average_file_bytes": stats.average_bytes,
            "small_files": stats.small,
            "small_file_bytes": self.settings.small_file_bytes,
            "last_optimize": last["OPTIMIZE"],
            "last_vacuum": last["VACUUM"],
        }}
        return health, newest

"""The live dashboard: a page at `/` and the small JSON API it polls, `GET /v1/dashboard`.

The page (static/index.html, app.js, style.css, with uPlot vendored under static/vendor/) asks for
`/v1/dashboard` every second and redraws: events per hourly window (bars; provisional windows marked),
bookings per hourly window (line, with purchases), today's DAU, ARPDAU and paying users (UTC), incoming events/s,
processing lag (log backlog, freshness = now − newest committed eventTime), the quarantine with its latest
reasons, and the events table's health (files per partition, average file size, small files — under
`Settings.small_file_bytes`, returned with them so the page names the threshold it counts — last OPTIMIZE and VACUUM).
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from deltalake import DeltaTable

from gamestream import lake
from gamestream.maintenance import file_stats, last_operations
from gamestream.settings import Settings

UTC = dt.timezone.utc
HOURS_SHOWN = 48  # the charts show the windows of the last 48 hours of event time


def _iso(value: dt.datetime | dt.date | None) -> str | None:
    return value.isoformat() if value is not None else None


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
    eventTime, kept apart because freshness is measured from it at each request, not at the read."""

    read_at: float
    tables: dict[str, Any]
    newest_event_time: dt.datetime | None


class DashboardData:
    """Builds the `/v1/dashboard` answer from the Delta tables (cached for `ttl_s`, rebuilt in a thread)."""

    def __init__(self, settings: Settings, ttl_s: float = 0.5) -> None:
        self.settings = settings
        self.ttl_s = ttl_s
        self._cached: _Cached | None = None
        self._lock = threading.Lock()
        self._tables = lake.TableCache()  # used under self._lock only

    def snapshot(self, *, backlog: int | None, events_per_second: float) -> dict[str, Any]:
        """The `/v1/dashboard` answer. The cached tables are shared by every request within `ttl_s` (several open
        pages, or one page polling faster than the cache expires), so nothing here may change them: freshness is
        computed anew from the cached newest eventTime each time, which keeps it right on every cache hit."""
        with self._lock:
            if self._cached and time.monotonic() - self._cached.read_at < self.ttl_s:
                cached = self._cached
            else:
                tables, newest = self._read_tables()
                cached = self._cached = _Cached(time.monotonic(), tables, newest)
        now = dt.datetime.now(UTC)
        newest = cached.newest_event_time
        return {
            "generated_at": now.isoformat(),
            **cached.tables,
            "ingest": {"events_per_second": round(events_per_second, 1)},
            "lag": {"backlog_events": backlog,
                    "newest_event_time": _iso(newest),
                    "freshness_seconds": round((now - newest).total_seconds(), 1) if newest else None},
        }

    def _table(self, name: str) -> DeltaTable | None:
        return self._tables.latest(self.settings.table_uri(name))

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
        daily = self._table("kpi_daily")
        if daily is not None:
            for row in daily.to_pyarrow_table().to_pylist():
                if row["eventDate"] == today:
                    result["today"] = {**row, "eventDate": today.isoformat(), "bookings": round(row["bookings"], 2),
                                       "arpdau": round(row["arpdau"], 4)}
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

"""The KPI tables: their schemas, and the keys they are upserted by.

Outputs (what the dashboard and SQL read):

- `kpi_events_hourly`   (window_start, window_end, events, final, late_events)
- `kpi_bookings_hourly` (window_start, window_end, bookings, purchases, final, late_events)
- `kpi_daily`           one row per UTC day with events: the seed's dau/events/bookings, and the game KPIs
                        (new users, WAU, MAU, stickiness, ARPPU, conversion, first purchases, sessions)
- `kpi_retention`       one row per install cohort: strict D1/D7/D30 retention
- `kpi_top_events`      events per (day, eventName)
- `kpi_daily_segments`  kpi_daily's own-day figures per (day, dimension, value): platform, app_version, country
                        and `[kpi] dimensions`; a device counts under every value it sent that day
- `kpi_retention_segments` kpi_retention per (install cohort, dimension, the value of the device's first event)

State tables (what the outputs are derived from, kept by the same folds, exactly once like them):

- `kpi_activity`  one row per (day, device) with at least one event that day: WAU/MAU and retention are counts
                  over it. Partitioned by day, so a 30-day window reads 30 partitions.
- `kpi_devices`   one row per device: its first day (install cohort) and first purchase day.
- `kpi_device_segments` one row per (device, dimension): the value of the device's first event and its time
                  (the segment of its install cohort).

Both state tables hold device ids, so their Delta file statistics leave `device_id` out (see
`lake.EVENTS_STATS_COLUMNS` for why): `gamestream forget` must be able to remove every copy of an id.
"""

from __future__ import annotations

import pyarrow as pa

TS = pa.timestamp("us", tz="UTC")

EVENTS_HOURLY = pa.schema([("window_start", TS), ("window_end", TS), ("events", pa.int64()), ("final", pa.bool_()),
                           ("late_events", pa.int64())])
BOOKINGS_HOURLY = pa.schema([("window_start", TS), ("window_end", TS), ("bookings", pa.float64()),
                             ("purchases", pa.int64()), ("final", pa.bool_()), ("late_events", pa.int64())])
DAILY = pa.schema([
    ("eventDate", pa.date32()), ("dau", pa.int64()), ("events", pa.int64()), ("bookings", pa.float64()),
    ("paying_users", pa.int64()), ("arpdau", pa.float64()),
    # the game KPIs (issue 16); columns added to an older table on open
    ("new_users", pa.int64()), ("wau", pa.int64()), ("mau", pa.int64()), ("stickiness", pa.float64()),
    ("arppu", pa.float64()), ("conversion", pa.float64()), ("first_purchase_users", pa.int64()),
    ("sessions", pa.int64()), ("avg_session_s", pa.float64()),
])
RETENTION = pa.schema([
    ("cohort_day", pa.date32()), ("cohort_size", pa.int64()),
    ("d1_users", pa.int64()), ("d7_users", pa.int64()), ("d30_users", pa.int64()),
    ("d1", pa.float64()), ("d7", pa.float64()), ("d30", pa.float64()),
])
# Breakdowns (issue 27): per (day, dimension, value). Values past the top `kpi_top_values` of a dimension on a day
# (by DAU; of a cohort, by size) are summed into one row valued OTHER; events without the dimension count as
# NOT_SET.
DAILY_SEGMENTS = pa.schema([
    ("eventDate", pa.date32()), ("dimension", pa.string()), ("value", pa.string()),
    ("dau", pa.int64()), ("new_users", pa.int64()), ("events", pa.int64()), ("bookings", pa.float64()),
    ("paying_users", pa.int64()), ("arppu", pa.float64()), ("conversion", pa.float64()), ("sessions", pa.int64()),
])
RETENTION_SEGMENTS = pa.schema([
    ("cohort_day", pa.date32()), ("dimension", pa.string()), ("value", pa.string()), ("cohort_size", pa.int64()),
    ("d1_users", pa.int64()), ("d7_users", pa.int64()), ("d30_users", pa.int64()),
    ("d1", pa.float64()), ("d7", pa.float64()), ("d30", pa.float64()),
])
OTHER, NOT_SET = "(other)", "(not set)"
TOP_EVENTS = pa.schema([("eventDate", pa.date32()), ("eventName", pa.string()), ("events", pa.int64())])
ACTIVITY = pa.schema([("eventDate", pa.date32()), ("device_id", pa.string())])
DEVICES = pa.schema([("device_id", pa.string()), ("first_day", pa.date32()), ("first_purchase_day", pa.date32())])
DEVICE_SEGMENTS = pa.schema([("device_id", pa.string()), ("dimension", pa.string()), ("first_time", TS),
                             ("value", pa.string())])

RETENTION_DAYS = (1, 7, 30)  # strict: active exactly N days after the install day
WAU_DAYS, MAU_DAYS = 7, 30

# name → (schema, partition columns, table properties)
TABLES: dict[str, tuple[pa.Schema, list[str] | None, dict[str, str]]] = {
    "kpi_events_hourly": (EVENTS_HOURLY, None, {}),
    "kpi_bookings_hourly": (BOOKINGS_HOURLY, None, {}),
    "kpi_top_events": (TOP_EVENTS, None, {}),
    "kpi_activity": (ACTIVITY, ["eventDate"], {"delta.dataSkippingStatsColumns": "eventDate"}),
    "kpi_devices": (DEVICES, None, {"delta.dataSkippingStatsColumns": "first_day,first_purchase_day"}),
    "kpi_device_segments": (DEVICE_SEGMENTS, None, {"delta.dataSkippingStatsColumns": "dimension,first_time"}),
    "kpi_daily": (DAILY, None, {}),
    "kpi_daily_segments": (DAILY_SEGMENTS, None, {}),
    "kpi_retention_segments": (RETENTION_SEGMENTS, None, {}),
    "kpi_retention": (RETENTION, None, {}),
}
# The tables users read, which partitioned KPIs keep per partition and merge (`merge.KpiMerge`); the state tables
# stay in the partitions' copies.
MERGED = ("kpi_events_hourly", "kpi_bookings_hourly", "kpi_top_events", "kpi_daily", "kpi_retention",
          "kpi_daily_segments", "kpi_retention_segments")
# The order of a fold's commits (a part's retention table last: `merge` reads a part's progress there). Outputs
# derived from the state tables (daily, retention) come after them, so a
# crash between commits re-derives them from state that already holds the version being re-folded.
COMMIT_ORDER = tuple(TABLES)

"""The game KPIs computed in plain Python from raw events: the independent answer the KPI tables are checked
against. Definitions (docs/kpi.md): all days UTC, a user is `eventParams.device_id`."""

from __future__ import annotations

import datetime as dt
from collections import defaultdict

UTC = dt.timezone.utc
GAP = dt.timedelta(minutes=30)
DAY = dt.timedelta(days=1)


def parse(ts: str) -> dt.datetime:
    return dt.datetime.fromisoformat(ts.replace("Z", "+00:00")).astimezone(UTC)


def daily_and_cohorts(events: list[dict]) -> tuple[dict, dict, dict]:
    """(kpi_daily rows by day, kpi_retention rows by cohort day, kpi_top_events counts by (day, name))."""
    active: dict[dt.date, set[str]] = defaultdict(set)
    payers: dict[dt.date, set[str]] = defaultdict(set)
    counts: dict[dt.date, int] = defaultdict(int)
    bookings: dict[dt.date, float] = defaultdict(float)
    names: dict[tuple[dt.date, str], int] = defaultdict(int)
    times: dict[tuple[dt.date, str], list[dt.datetime]] = defaultdict(list)
    first_day: dict[str, dt.date] = {}
    first_purchase: dict[str, dt.date] = {}
    for e in events:
        t = parse(e["eventTime"])
        day, device = t.date(), e["eventParams"]["device_id"]
        active[day].add(device)
        counts[day] += 1
        names[(day, e["eventName"])] += 1
        times[(day, device)].append(t)
        first_day[device] = min(first_day.get(device, day), day)
        if e["eventName"] == "purchaseEvent":
            payers[day].add(device)
            bookings[day] += e["eventParams"].get("amount") or 0.0
            first_purchase[device] = min(first_purchase.get(device, day), day)
    sessions: dict[dt.date, list[float]] = defaultdict(list)
    for (day, _), moments in times.items():
        moments.sort()
        start = previous = moments[0]
        for t in moments[1:]:
            if t - previous >= GAP:  # 30 minutes without events end a session
                sessions[day].append((previous - start).total_seconds())
                start = t
            previous = t
        sessions[day].append((previous - start).total_seconds())
    daily = {}
    for day in active:
        dau, paying = len(active[day]), len(payers[day])
        wau = len(set().union(*(active.get(day - k * DAY, set()) for k in range(7))))
        mau = len(set().union(*(active.get(day - k * DAY, set()) for k in range(30))))
        daily[day] = {
            "dau": dau, "events": counts[day], "bookings": bookings[day], "paying_users": paying,
            "arpdau": bookings[day] / dau, "new_users": sum(1 for d in first_day.values() if d == day),
            "wau": wau, "mau": mau, "stickiness": dau / mau, "arppu": bookings[day] / paying if paying else 0.0,
            "conversion": paying / dau, "first_purchase_users": sum(1 for d in first_purchase.values() if d == day),
            "sessions": len(sessions[day]), "avg_session_s": sum(sessions[day]) / len(sessions[day]),
        }
    last_day = max(active)
    cohorts = {}
    for cohort in set(first_day.values()):
        members = {d for d, f in first_day.items() if f == cohort}
        row: dict = {"cohort_size": len(members)}
        for n in (1, 7, 30):
            later = cohort + n * DAY
            if later <= last_day:
                users = len(members & active.get(later, set()))
                row[f"d{n}_users"], row[f"d{n}"] = users, users / len(members)
            else:
                row[f"d{n}_users"] = row[f"d{n}"] = None
        cohorts[cohort] = row
    return daily, cohorts, dict(names)


NOT_SET, OTHER = "(not set)", "(other)"


def segment_value(event: dict, dimension: str) -> str:
    """An event's value of a breakdown dimension, as the KPI stage spells it (docs/kpi.md, "Breakdowns")."""
    raw = event.get("geo_country") if dimension == "country" else event["eventParams"].get(dimension)
    if raw is None:
        return NOT_SET
    return ("true" if raw else "false") if isinstance(raw, bool) else str(raw)


def segments(events: list[dict], dimensions: tuple[str, ...], top: int) -> tuple[dict, dict]:
    """(kpi_daily_segments rows by (day, dimension, value), kpi_retention_segments rows by (cohort, dimension,
    value)), computed from the definitions: a segment's daily figures are the daily KPIs over the events that
    carry the value, but its sessions are the day's sessions of the devices counted under it; a device's install
    cohort takes the value of its first event (the least value among events at the same microsecond); past the
    top `top` values of a day (by DAU) or cohort (by size), rows are summed into (other)."""
    devices: dict[tuple, set[str]] = defaultdict(set)
    payers: dict[tuple, set[str]] = defaultdict(set)
    counts: dict[tuple, int] = defaultdict(int)
    bookings: dict[tuple, float] = defaultdict(float)
    day_times: dict[tuple[dt.date, str], list[dt.datetime]] = defaultdict(list)
    first: dict[tuple[str, str], tuple[dt.datetime, str]] = {}
    active: dict[dt.date, set[str]] = defaultdict(set)
    for e in events:
        t = parse(e["eventTime"])
        device = e["eventParams"]["device_id"]
        active[t.date()].add(device)
        day_times[(t.date(), device)].append(t)
        for dimension in dimensions:
            value = segment_value(e, dimension)
            key = (t.date(), dimension, value)
            devices[key].add(device)
            counts[key] += 1
            if e["eventName"] == "purchaseEvent":
                payers[key].add(device)
                bookings[key] += e["eventParams"].get("amount") or 0.0
            if (device, dimension) not in first or (t, value) < first[(device, dimension)]:
                first[(device, dimension)] = (t, value)
    day_sessions: dict[tuple[dt.date, str], int] = {}  # (day, device) → its sessions that day, all its events
    for (day, device), moments in day_times.items():
        moments.sort()
        day_sessions[(day, device)] = 1 + sum(1 for a, b in zip(moments, moments[1:]) if b - a >= GAP)
    # a value's sessions: the day's sessions of the devices counted under it
    sessions = {key: sum(day_sessions[(key[0], d)] for d in group) for key, group in devices.items()}
    new_users: dict[tuple, int] = defaultdict(int)
    members: dict[tuple, set[str]] = defaultdict(set)
    for (device, dimension), (t, value) in first.items():
        new_users[(t.date(), dimension, value)] += 1
        members[(t.date(), dimension, value)].add(device)
    daily_rows = [{"eventDate": k[0], "dimension": k[1], "value": k[2], "dau": len(devices[k]),
                   "new_users": new_users[k], "events": counts[k], "bookings": bookings[k],
                   "paying_users": len(payers[k]), "sessions": sessions[k]} for k in devices]
    last_day = max(active)
    cohort_rows = []
    for (cohort, dimension, value), group in members.items():
        row = {"cohort_day": cohort, "dimension": dimension, "value": value, "cohort_size": len(group)}
        for n in (1, 7, 30):
            row[f"d{n}_users"] = len(group & active.get(cohort + n * DAY, set()))
        cohort_rows.append(row)
    daily = {}
    for row in _top(daily_rows, "eventDate", "dau", ("dau", "new_users", "events", "bookings", "paying_users",
                                                      "sessions"), top):
        row["arppu"] = row["bookings"] / row["paying_users"] if row["paying_users"] else 0.0
        row["conversion"] = row["paying_users"] / row["dau"] if row["dau"] else 0.0
        daily[(row.pop("eventDate"), row.pop("dimension"), row.pop("value"))] = row
    cohorts = {}
    for row in _top(cohort_rows, "cohort_day", "cohort_size", ("cohort_size", "d1_users", "d7_users", "d30_users"),
                    top):
        for n in (1, 7, 30):
            if row["cohort_day"] + n * DAY <= last_day:
                row[f"d{n}"] = row[f"d{n}_users"] / row["cohort_size"]
            else:
                row[f"d{n}_users"] = row[f"d{n}"] = None
        cohorts[(row.pop("cohort_day"), row.pop("dimension"), row.pop("value"))] = row
    return daily, cohorts


def _top(rows: list[dict], key: str, rank: str, sums: tuple[str, ...], top: int) -> list[dict]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row[key], row["dimension"])].append(row)
    out = []
    for (at, dimension), group in groups.items():
        group.sort(key=lambda r: (-r[rank], r["value"]))
        out.extend(group[:top])
        if group[top:]:
            out.append({key: at, "dimension": dimension, "value": OTHER,
                        **{c: sum(r[c] for r in group[top:]) for c in sums}})
    return out

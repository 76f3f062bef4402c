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

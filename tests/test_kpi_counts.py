"""The KPI stage's counting kernels against plain Python."""

from __future__ import annotations

import datetime as dt
import random

import pyarrow as pa

from gamestream.kpi.derived import active_users


def test_wau_and_mau_equal_distinct_devices_over_the_7_and_30_days_ending_each_day() -> None:
    rng = random.Random(5)
    start = dt.date(2026, 1, 1)
    for trial in range(40):
        devices = [f"d{i}" for i in range(rng.randint(1, 60))]
        pairs = {(start + dt.timedelta(days=rng.randint(0, 90)), rng.choice(devices))
                 for _ in range(rng.randint(0, 400))}
        days = sorted({start + dt.timedelta(days=rng.randint(-5, 130)) for _ in range(rng.randint(1, 40))})
        table = pa.table({"eventDate": pa.array([p[0] for p in pairs], pa.date32()),
                          "device_id": pa.array([p[1] for p in pairs], pa.string())})
        want = {}
        for day in days:
            wau = {d for when, d in pairs if day - dt.timedelta(days=7) < when <= day}
            mau = {d for when, d in pairs if day - dt.timedelta(days=30) < when <= day}
            want[day] = (len(wau), len(mau))
        assert active_users(table, days) == want, trial
    assert active_users(pa.table({"eventDate": pa.array([], pa.date32()), "device_id": pa.array([], pa.string())}),
                        [start]) == {start: (0, 0)}


def test_retention_counts_equal_the_devices_active_exactly_1_7_and_30_days_after_their_cohort() -> None:
    from gamestream.kpi.derived import retention_counts

    rng = random.Random(9)
    start = dt.date(2026, 1, 1)
    for trial in range(30):
        devices = [f"d{i}" for i in range(rng.randint(1, 80))]
        cohort_of = {d: start + dt.timedelta(days=rng.randint(0, 20)) for d in devices}
        value_of = {d: rng.choice(["ios", "android", "(not set)"]) for d in devices}
        active = {(cohort_of[d] + dt.timedelta(days=rng.choice([1, 2, 7, 8, 30, 31])), d)
                  for d in devices for _ in range(rng.randint(0, 4))}
        members = pa.table({"device_id": devices, "cohort": pa.array([cohort_of[d] for d in devices], pa.date32()),
                            "value": [value_of[d] for d in devices]})
        returns = pa.table({"eventDate": pa.array([a[0] for a in active], pa.date32()),
                            "device_id": [a[1] for a in active]})
        want: dict = {}
        for d in devices:
            row = want.setdefault((cohort_of[d], value_of[d]), [0, 0, 0, 0])
            row[0] += 1
            for index, n in enumerate((1, 7, 30), start=1):
                row[index] += (cohort_of[d] + dt.timedelta(days=n), d) in active
        assert retention_counts(members, returns, ["value"]) == {k: tuple(v) for k, v in want.items()}, trial

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

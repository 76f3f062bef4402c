"""Breakdowns (`kpi_daily_segments`, `kpi_retention_segments`) against the plain-Python reference
(`kpi_reference.segments`): weeks of generated play with platforms, app versions (devices upgrading mid-day),
countries and a promoted parameter, events without a platform, late events earlier than devices' first events
(their install cohort's value moves), and a forget — folded globally and per partition with partitions moving."""

from __future__ import annotations

import datetime as dt
import random
from pathlib import Path

import pytest

from conftest import gamestream, table_rows, write_ndjson
from kpi_reference import OTHER, NOT_SET, segments
from gamestream.demo.generator import simulate
from test_kpi_partitioned import PARTITIONED, process_with

UTC = dt.timezone.utc
START = dt.datetime(2026, 10, 1, tzinfo=UTC)
DIMENSIONS = ("platform", "app_version", "country", "level")
TOP = 4
CONFIG = f"""
[schema.params]
level = "int"

[kpi]
dimensions = ["level"]
top_values = {TOP}
"""
COUNTRIES = ["BR", "DE", "US", "JP", "IN", "FR"]


def stamp(ts: dt.datetime) -> str:
    return ts.isoformat().replace("+00:00", "Z")


def parse(ts: str) -> dt.datetime:
    return dt.datetime.fromisoformat(ts.replace("Z", "+00:00")).astimezone(UTC)


def play(seed: int, *, events: int, users: int, start: dt.datetime, days: float) -> list[dict]:
    """Generated play, varied: every event a level (1-9), one in ten without a platform, each device a country
    (one event in twenty from another, one in twenty-five from none), every fifth device upgrading its app
    version half-way through its events (mid-day, so it sends two versions that day)."""
    rng = random.Random(seed)
    out = list(simulate(events=events, users=users, seed=seed, start=start, days=days))
    by_device: dict[str, list[dict]] = {}
    for e in out:
        by_device.setdefault(e["eventParams"]["device_id"], []).append(e)
    for number, (device, own) in enumerate(sorted(by_device.items())):
        home = COUNTRIES[number % len(COUNTRIES)]
        for i, e in enumerate(own):
            params = e["eventParams"]
            params["level"] = rng.randint(1, 9)
            if rng.random() < 0.1:
                del params["platform"]
            roll = rng.random()
            if roll >= 0.09:
                e["geo_country"] = home
            elif roll >= 0.04:
                e["geo_country"] = rng.choice(COUNTRIES)
            if number % 5 == 0 and i >= len(own) // 2:
                params["app_version"] = "9.9.9"
    return out


def earlier_firsts(events: list[dict]) -> list[dict]:
    """Late events before devices' first events, with other values: for 20 devices first seen after day 3, one
    on day 1 (long final; the cohort moves to day 1); for 10 others, one a minute before their first event (the
    cohort keeps its day, its value changes)."""
    first: dict[str, dict] = {}
    for e in sorted(events, key=lambda e: e["eventTime"]):
        first.setdefault(e["eventParams"]["device_id"], e)
    late_comers = sorted(d for d, e in first.items() if parse(e["eventTime"]) >= START + dt.timedelta(days=3))
    others = sorted(d for d in first if d not in late_comers[:20])
    out = []
    for i, device in enumerate(late_comers[:20]):
        out.append({"eventId": f"late-first-{i}", "eventName": "levelStart",
                    "eventTime": stamp(START + dt.timedelta(hours=2, minutes=i)), "geo_country": "NZ",
                    "eventParams": {"device_id": device, "platform": "webgl", "app_version": "0.1.0", "level": 1}})
    for i, device in enumerate(others[:10]):
        at = parse(first[device]["eventTime"]) - dt.timedelta(minutes=1)
        if at.date() != parse(first[device]["eventTime"]).date():
            continue
        out.append({"eventId": f"late-same-day-{i}", "eventName": "purchaseEvent", "eventTime": stamp(at),
                    "eventParams": {"device_id": device, "app_version": "0.0.1", "level": 9, "amount": 2.5}})
    return out


def rounded(rows: dict) -> dict:
    return {k: {c: round(v, 6) if isinstance(v, float) else v for c, v in r.items()} for k, r in rows.items()}


def segment_tables(data: Path) -> tuple[dict, dict]:
    daily = {(r.pop("eventDate"), r.pop("dimension"), r.pop("value")): r
             for r in table_rows(data / "tables" / "kpi_daily_segments")}
    cohorts = {(r.pop("cohort_day"), r.pop("dimension"), r.pop("value")): r
               for r in table_rows(data / "tables" / "kpi_retention_segments")}
    return daily, cohorts


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["global", "partitioned"])
def test_segment_kpis_equal_the_reference_with_late_events_and_a_forget(tmp_path: Path, mode: str) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "gamestream.toml").write_text(CONFIG)
    on_time = play(31, events=12_000, users=250, start=START, days=35)
    late = earlier_firsts(on_time)
    later = play(32, events=1500, users=250, start=START + dt.timedelta(days=35), days=0.5)
    phases = [on_time, late, later]
    env = PARTITIONED if mode == "partitioned" else {}
    groups = (["0,1", "2,3"], ["0,1,2,3"], ["0", "1", "2", "3"])
    for i, phase in enumerate(phases):
        path = write_ndjson(tmp_path / f"phase{i}.ndjson", phase)
        gamestream("load", str(path), data_dir=data, env=env)
        if mode == "partitioned":
            process_with(data, groups[i])
        else:
            gamestream("process", "--until-idle", data_dir=data)
    events = [e for phase in phases for e in phase]
    want_daily, want_cohorts = segments(events, DIMENSIONS, TOP)
    got_daily, got_cohorts = segment_tables(data)
    assert rounded(got_daily) == rounded(want_daily)
    assert rounded(got_cohorts) == rounded(want_cohorts)

    # the data exercise what they claim to
    assert len(late) >= 25
    assert {k[1] for k in want_daily} == set(DIMENSIONS)
    assert any(k[2] == OTHER for k in want_daily) and any(k[2] == NOT_SET for k in want_daily)
    assert any(k[2] == OTHER for k in want_cohorts)
    day_one = START.date()
    assert want_cohorts[(day_one, "platform", "webgl")]["cohort_size"] == 20  # the late first events moved them
    assert any(r["d30"] is not None and r["d30_users"] for r in want_cohorts.values())
    assert any(r["d1"] is None for r in want_cohorts.values())  # the newest cohorts: not measurable yet
    upgrade_days = [k for k in want_daily if k[1] == "app_version" and k[2] == "9.9.9"]
    assert upgrade_days  # devices counted under two versions on their upgrade day
    totals = {r["eventDate"]: r for r in table_rows(data / "tables" / "kpi_daily")}
    assert any(sum(r["dau"] for k, r in got_daily.items() if k[0] == day and k[1] == "app_version")
               > totals[day]["dau"] for day in totals)

    # a forget revises every segment the device counted in
    forgotten = sorted({e["eventParams"]["device_id"] for e in late if e["eventId"].startswith("late-first")})[0]
    gamestream("forget", "--device-id", forgotten, data_dir=data)
    if mode == "partitioned":
        process_with(data, ["0,1,2,3"])
    else:
        gamestream("process", "--until-idle", data_dir=data)
    remaining = [e for e in events if e["eventParams"]["device_id"] != forgotten]
    want_daily, want_cohorts = segments(remaining, DIMENSIONS, TOP)
    got_daily, got_cohorts = segment_tables(data)
    assert want_cohorts[(day_one, "platform", "webgl")]["cohort_size"] == 19
    assert rounded(got_daily) == rounded(want_daily)
    assert rounded(got_cohorts) == rounded(want_cohorts)
    copies = [data / "tables" / "kpi_device_segments"] if mode == "global" else sorted(
        (data / "tables" / "kpi_parts").glob("p*/kpi_device_segments"))
    assert copies and all(forgotten not in {r["device_id"] for r in table_rows(c)} for c in copies)

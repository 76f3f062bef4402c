"""Breakdowns (`kpi_daily_segments`, `kpi_retention_segments`) against the plain-Python reference
(`kpi_reference.segments`): weeks of generated play with platforms, app versions (devices upgrading mid-day),
countries and a promoted parameter, events without a platform, late events earlier than devices' first events
(their install cohort's value moves), and a forget — folded globally and per partition with partitions moving."""

from __future__ import annotations

import datetime as dt
import json
import random
from pathlib import Path

import pytest

from conftest import gamestream, kill_catch_ups, table_rows, write_ndjson
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


@pytest.mark.parametrize(("text", "message"), [
    ('[kpi]\ndimensions = ["level"]\n', "kpi dimensions: 'level' is not a promoted parameter"),
    ('[schema.params]\nseen = "timestamp"\n[kpi]\ndimensions = ["seen"]\n', "'seen' is promoted as timestamp"),
    ('[kpi]\ntop_values = 0\n', "kpi.top_values must be a whole number of at least 1"),
    ('[kpi]\ndimension = ["platform"]\n', "unknown key kpi.dimension"),
])
def test_a_bad_kpi_section_stops_a_command_with_the_reason(tmp_path: Path, text: str, message: str) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "gamestream.toml").write_text(text)
    failed = gamestream("process", "--until-idle", data_dir=data, check=False)
    assert failed.returncode != 0
    assert message in failed.stderr and "Traceback" not in failed.stderr


def test_the_segment_tables_answer_sql_and_follow_top_values(tmp_path: Path) -> None:
    """`gamestream sql` reads the breakdowns; with `top_values = 1` each day keeps one value per dimension and
    sums the rest into (other), whose DAU is the sum of theirs."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "gamestream.toml").write_text("[kpi]\ntop_values = 1\n")
    events = play(41, events=2000, users=60, start=START, days=2)
    gamestream("load", str(write_ndjson(tmp_path / "e.ndjson", events)), data_dir=data)
    gamestream("process", "--until-idle", data_dir=data)
    want, _ = segments(events, ("platform", "app_version", "country"), 1)
    answer = gamestream("sql", "select eventDate, dimension, value, dau from kpi_daily_segments", "--format", "json",
                        data_dir=data)
    got = {(dt.date.fromisoformat(r["eventDate"]), r["dimension"], r["value"]): r["dau"]
           for r in json.loads(answer.stdout)}
    assert got == {k: r["dau"] for k, r in want.items()}
    assert OTHER in {k[2] for k in got if k[1] == "country"}
    assert all(sum(1 for k in got if k[0] == day and k[1] == "platform") == 2 for day in {k[0] for k in got})


def test_an_alert_rule_reads_one_segment_of_yesterday(tmp_path: Path) -> None:
    """`segment = "platform=android"` on a kpi_daily rule reads that value's row of kpi_daily_segments."""
    data = tmp_path / "data"
    data.mkdir()
    yesterday = dt.datetime.combine(dt.datetime.now(UTC).date() - dt.timedelta(days=1), dt.time(), UTC)
    events = play(51, events=1500, users=80, start=yesterday, days=0.9)
    gamestream("load", str(write_ndjson(tmp_path / "e.ndjson", events)), data_dir=data)
    gamestream("process", "--until-idle", data_dir=data)
    (data / "gamestream.toml").write_text("""
[alerting.pipeline]
backlog_growing = false
freshness = false
quarantine_rate = false
commit_errors = false

[[alerts]]
name = "android"
kpi = "kpi_daily.dau"
segment = "platform=android"
below = 1000

[[alerts]]
name = "brazil buyers"
kpi = "kpi_daily.paying_users"
segment = "country=BR"
above = 1000
""")
    want, _ = segments(events, ("platform", "country"), 50)
    rows = {r["name"]: r for r in json.loads(gamestream("alerts", "--format", "json", data_dir=data).stdout)}
    assert rows["android"]["value_now"] == want[(yesterday.date(), "platform", "android")]["dau"] > 0
    assert rows["android"]["breach_now"] is True
    assert rows["brazil buyers"]["value_now"] == want[(yesterday.date(), "country", "BR")]["paying_users"]
    assert rows["brazil buyers"]["breach_now"] is False
    assert "where platform = android" in gamestream("alerts", data_dir=data).stdout


@pytest.mark.slow
def test_a_kpi_stage_killed_mid_catch_up_ends_with_the_reference_breakdowns(tmp_path: Path) -> None:
    """SIGKILLs while the stage catches up one events version per fold (so between any two of a fold's ten
    commits): the breakdown tables end equal to the plain-Python reference."""
    data = tmp_path / "data"
    events = play(61, events=6000, users=200, start=START, days=3) + earlier_firsts(
        play(61, events=6000, users=200, start=START, days=3))
    # ~130 small events versions, no KPI yet: far more one-version folds than the killed runs live to finish
    gamestream("load", str(write_ndjson(tmp_path / "e.ndjson", events)), "--chunk-lines", "100", data_dir=data)
    gamestream("process", "--until-idle", "--no-kpi", "--max-batch-events", "100", data_dir=data)
    kills = kill_catch_ups(data, runs=6, pause=(0.2, 1.0), seed=6, env={"GAMESTREAM_KPI_VERSIONS_PER_FOLD": "1"})
    assert kills >= 4
    from deltalake import DeltaTable

    folded = DeltaTable(str(data / "tables" / "kpi_daily_segments")).transaction_version("gamestream-kpi") or 0
    assert 0 < folded < DeltaTable(str(data / "tables" / "events")).version()  # the kills interrupted it
    gamestream("process", "--until-idle", data_dir=data, env={"GAMESTREAM_KPI_VERSIONS_PER_FOLD": "1"})
    want_daily, want_cohorts = segments(events, ("platform", "app_version", "country"), 50)
    got_daily, got_cohorts = segment_tables(data)
    assert rounded(got_daily) == rounded(want_daily)
    assert rounded(got_cohorts) == rounded(want_cohorts)

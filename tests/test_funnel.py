"""Funnels (`gamestream funnel`, `POST /v1/funnel`) equal a plain-Python reference of their definition, on generated
play and on hand-made devices whose every case is counted by hand: ties in eventTime, a window that cuts an
attempt, an attempt across midnight, repeated step-1 events, a device on two platforms, a promoted param."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections import defaultdict
from pathlib import Path

import httpx
import pytest

from collector_server import ServeProcess
from conftest import gamestream, write_ndjson
from gamestream.api import funnel as funnels
from gamestream.demo.generator import simulate
from gamestream.settings import Settings

UTC = dt.UTC
GENERATED_START = dt.datetime(2026, 11, 1, tzinfo=UTC)  # three days of play: Nov 1-3
HAND_DAY = dt.date(2026, 11, 5)  # the hand-made devices play on Nov 5 (and just after midnight, Nov 6)
CONFIG = '[schema.params]\nlevel = "int"\n'


def at(day: dt.date, clock: str) -> str:
    return f"{day.isoformat()}T{clock}Z"


def hand_made() -> list[dict]:
    """Devices whose funnel sessionStart → levelStart → levelEnd within 1h is counted by hand (HAND_EXPECTED)."""
    day, next_day = HAND_DAY, HAND_DAY + dt.timedelta(days=1)
    plays = {
        # a levelStart at the very instant of the sessionStart does not follow it
        "tie": [("sessionStart", at(day, "10:00:00")), ("levelStart", at(day, "10:00:00"))],
        # ... a later one does; and the levelEnd at the levelStart's instant does not follow it, the next one does
        "tie-then-later": [("sessionStart", at(day, "10:00:00")), ("levelStart", at(day, "10:00:00")),
                           ("levelStart", at(day, "10:00:01")), ("levelEnd", at(day, "10:00:01")),
                           ("levelEnd", at(day, "10:00:02"))],
        # the window (1h from the sessionStart) ends before the levelEnd
        "cut": [("sessionStart", at(day, "12:00:00")), ("levelStart", at(day, "12:50:00")),
                ("levelEnd", at(day, "13:10:00"))],
        # across midnight: counted on the day of its sessionStart
        "midnight": [("sessionStart", at(day, "23:50:00")), ("levelStart", at(next_day, "00:10:00")),
                     ("levelEnd", at(next_day, "00:20:00"))],
        # two sessionStarts: the first leads nowhere within the hour, the second all the way
        "repeated": [("sessionStart", at(day, "08:00:00")), ("sessionStart", at(day, "15:00:00")),
                     ("levelStart", at(day, "15:01:00")), ("levelEnd", at(day, "15:02:00"))],
        # a levelEnd then a levelStart: out of order, so only step 2
        "out-of-order": [("sessionStart", at(day, "16:00:00")), ("levelEnd", at(day, "16:01:00")),
                         ("levelStart", at(day, "16:02:00"))],
        # plays only on the next day: not in a Nov 5 funnel
        "next-day": [("sessionStart", at(next_day, "01:00:00")), ("levelStart", at(next_day, "01:01:00"))],
    }
    events = [{"eventName": name, "eventTime": time, "eventParams": {"device_id": device, "platform": "ios"}}
              for device, play in plays.items() for name, time in play]
    # on ios in the morning (two steps), on android in the evening (three)
    for name, clock, platform in [("sessionStart", "09:00:00", "ios"), ("levelStart", "09:01:00", "ios"),
                                  ("sessionStart", "18:00:00", "android"), ("levelStart", "18:01:00", "android"),
                                  ("levelEnd", "18:02:00", "android")]:
        events.append({"eventName": name, "eventTime": at(day, clock),
                       "eventParams": {"device_id": "two-platforms", "platform": platform}})
    # a promoted param: level 2 then level 3
    for name, clock, level in [("sessionStart", "14:00:00", None), ("levelStart", "14:01:00", None),
                               ("levelEnd", "14:02:00", 2), ("levelEnd", "14:03:00", 3)]:
        params = {"device_id": "levels", "platform": "ios", **({"level": level} if level is not None else {})}
        events.append({"eventName": name, "eventTime": at(day, clock), "eventParams": params})
    return events


HAND_STEPS = ["sessionStart", "levelStart", "levelEnd"]
# step_1: every device of Nov 5; step_2: all but "tie"; step_3: tie-then-later, midnight, repeated, two-platforms,
# levels
HAND_EXPECTED = {"day": "2026-11-05", "step_1": 8, "step_2": 7, "step_3": 5}


def generated() -> list[dict]:
    """Three days of simulated play; levelStart and levelEnd carry a promoted `level` (1 to 3, so a device's
    step-1 events of a day carry several)."""
    events = list(simulate(events=6000, users=120, days=3, start=GENERATED_START, seed=27))
    for index, event in enumerate(events):
        if event["eventName"] in ("levelStart", "levelEnd"):
            event["eventParams"]["level"] = 1 + index % 3
    return events


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """One data directory for the module: three days of generated play, the hand-made devices, and `level`
    promoted to a column."""
    tmp = tmp_path_factory.mktemp("funnel")
    data_dir = tmp / "data"
    data_dir.mkdir()
    (data_dir / "gamestream.toml").write_text(CONFIG, encoding="utf-8")
    events = generated() + hand_made()
    write_ndjson(tmp / "events.ndjson", events)
    gamestream("load", str(tmp / "events.ndjson"), data_dir=data_dir)
    gamestream("process", "--until-idle", data_dir=data_dir)
    return data_dir, events


# ----------------------------------------------------------------------------------------- the reference
def parse_time(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).astimezone(UTC)


def as_text(value: object) -> str | None:
    """A param as text, as `CAST(… AS VARCHAR)` writes it (ints and strings here)."""
    return None if value is None else str(value)


def matches(event: dict, step: funnels.Step) -> bool:
    return event["eventName"] == step.event and all(
        as_text(event["eventParams"].get(param)) == value for param, value in step.where)


def reference(events: list[dict], steps: list[str], within: dt.timedelta, first: dt.date, last: dt.date,
              by: str | None = None) -> list[dict]:
    """The definition (docs/kpi.md, Funnels), event by event."""
    parsed = [funnels.parse_step(step) for step in steps]
    by_device: dict[str, list[tuple[dt.datetime, dict]]] = defaultdict(list)
    for event in events:
        by_device[event["eventParams"]["device_id"]].append((parse_time(event["eventTime"]), event))
    depths: dict[tuple[dt.date, str | None], dict[str, int]] = defaultdict(dict)
    for device, played in by_device.items():
        played.sort(key=lambda pair: pair[0])
        for t1, first_event in played:
            if not matches(first_event, parsed[0]) or not first <= t1.date() <= last:
                continue
            depth, matched = 1, t1
            for step in parsed[1:]:
                following = next((t for t, event in played if t > matched and matches(event, step)), None)
                if following is None or following > t1 + within:
                    break
                depth, matched = depth + 1, following
            key = (t1.date(), as_text(first_event["eventParams"].get(by)) if by else None)
            depths[key][device] = max(depths[key].get(device, 0), depth)
    n = len(steps)

    def row(day: str, value: str | None, counts: list[int]) -> dict:
        rates = [counts[k] / counts[k - 1] if counts[k - 1] else None for k in range(1, n)]
        return {"day": day, **({by: value} if by else {}), **{f"step_{k + 1}": c for k, c in enumerate(counts)},
                **{f"step_{k + 1}_rate": r for k, r in enumerate(rates, start=1)},
                "conversion": counts[-1] / counts[0] if counts[0] else None}

    rows, totals = [], defaultdict(lambda: [0] * n)
    for (day, value) in sorted(depths, key=lambda key: (key[0], key[1] is None, key[1] or "")):
        counts = [sum(1 for depth in depths[(day, value)].values() if depth >= k) for k in range(1, n + 1)]
        rows.append(row(day.isoformat(), value, counts))
        totals[value] = [a + b for a, b in zip(totals[value], counts)]
    for value in sorted(totals, key=lambda v: (v is None, v or "")):
        rows.append(row(funnels.TOTAL, value, totals[value]))
    return rows


def computed(data_dir: Path, steps: list[str], within: str, first: str, last: str, by: str | None = None):
    funnel = funnels.Funnel.of([funnels.parse_step(s) for s in steps], within=within, first_day=first,
                               last_day=last, by=by)
    return funnels.run(Settings.from_env(data_dir=data_dir), funnel).to_pylist()


CASES = [
    # window cuts attempts; a filtered last step on a built-in int param
    (["sessionStart", "levelStart", "levelEnd", "scoreAdjustment[scoreAdjustment=250]"], "10m", None),
    # a filtered middle step on a string param; split by platform
    (["sessionStart", "levelStart[game_keyword=space-miner]", "levelEnd", "purchaseEvent"], "1h", "platform"),
    # the same event twice in a row: the second strictly after the first
    (["levelStart", "levelStart", "levelEnd"], "2m", None),
    # filters on a promoted param; split by it (a device's levelStarts of a day carry several levels)
    (["levelStart", "scoreAdjustment", "levelEnd[level=3]"], "5m", "level"),
    (["sessionStart", "levelStart[level=2]", "levelEnd[level=2,platform=android]"], "30m", None),
    (["sessionStart", "levelEnd", "sessionEnd"], "7d", "app_version"),
]


@pytest.mark.parametrize(("steps", "within", "by"), CASES, ids=[" → ".join(c[0]) + f" /{c[1]}" for c in CASES])
def test_the_funnel_equals_the_reference_on_generated_and_hand_made_play(data, steps, within, by) -> None:
    data_dir, events = data
    # Nov 2-5: Nov 1 starts are left out, Nov 3's later steps reach into Nov 4's files, Nov 5 is the hand-made day
    want = reference(events, steps, funnels.parse_within(within), dt.date(2026, 11, 2), HAND_DAY, by)
    got = computed(data_dir, steps, within, "2026-11-02", "2026-11-05", by)
    assert got == want
    assert len([row for row in got if row["day"] != funnels.TOTAL]) >= 3


def test_hand_made_devices_count_as_the_definition_says(data) -> None:
    data_dir, events = data
    got = computed(data_dir, HAND_STEPS, "1h", "2026-11-05", "2026-11-05")
    day = {key: got[0][key] for key in HAND_EXPECTED}
    assert day == HAND_EXPECTED
    assert got[0]["conversion"] == 5 / 8 and got[0]["step_2_rate"] == 7 / 8 and got[0]["step_3_rate"] == 5 / 7
    assert got[1]["day"] == funnels.TOTAL and got[1]["step_1"] == 8  # one day: the total is that day
    assert got == reference(events, HAND_STEPS, dt.timedelta(hours=1), HAND_DAY, HAND_DAY)
    # the device on two platforms counts under each, at that platform's best attempt
    split = computed(data_dir, HAND_STEPS, "1h", "2026-11-05", "2026-11-05", by="platform")
    counts = {row["platform"]: [row["step_1"], row["step_2"], row["step_3"]] for row in split if row["day"] != "total"}
    assert counts == {"android": [1, 1, 1], "ios": [8, 7, 4]}
    # a filter on the promoted param: only level 3 ends the funnel
    levels = computed(data_dir, ["sessionStart", "levelStart", "levelEnd[level=3]"], "1h", "2026-11-05",
                      "2026-11-05")
    assert [levels[0]["step_1"], levels[0]["step_2"], levels[0]["step_3"]] == [8, 7, 1]
    # 90 s cuts more: step 2 within 90 s for tie-then-later, repeated, two-platforms and levels; step 3 only for
    # tie-then-later (the others' levelEnd comes 120 s after their sessionStart)
    short = computed(data_dir, HAND_STEPS, "90s", "2026-11-05", "2026-11-05")
    assert [short[0]["step_1"], short[0]["step_2"], short[0]["step_3"]] == [8, 4, 1]
    assert short == reference(events, HAND_STEPS, dt.timedelta(seconds=90), HAND_DAY, HAND_DAY)


def test_only_the_days_of_the_funnel_and_the_steps_events_are_read(data) -> None:
    """The scan of the events table carries the eventDate range [from, to + ceil(within)] and the steps' names."""
    data_dir, _ = data
    funnel = funnels.Funnel.of([funnels.parse_step("sessionStart"), funnels.parse_step("levelEnd")],
                               within="25h", first_day="2026-11-02", last_day="2026-11-02")
    assert funnel.read_until == dt.date(2026, 11, 4)
    plan = funnels.plan(Settings.from_env(data_dir=data_dir), funnel)
    assert "DATE '2026-11-02'" in plan and "DATE '2026-11-04'" in plan, plan
    assert "'sessionStart'" in plan and "'levelEnd'" in plan, plan


def test_no_step_1_event_in_the_range_gives_no_rows(data) -> None:
    data_dir, _ = data
    assert computed(data_dir, HAND_STEPS, "1h", "2026-10-01", "2026-10-05") == []
    assert computed(data_dir, HAND_STEPS, "1h", "2026-11-05", "2026-11-01") == []  # from after to: no days


# --------------------------------------------------------------------------------------------------- CLI
CLI_STEPS = ["sessionStart", "levelStart[game_keyword=space-miner]", "levelEnd"]


def cli_args(output: str) -> list[str]:
    return ["funnel", *(arg for step in CLI_STEPS for arg in ("--step", step)), "--within", "1h",
            "--from", "2026-11-01", "--to", "2026-11-05", "--by", "platform", "--format", output]


def test_the_command_prints_the_funnel_as_json_csv_and_a_table(data) -> None:
    data_dir, events = data
    want = reference(events, CLI_STEPS, dt.timedelta(hours=1), dt.date(2026, 11, 1), HAND_DAY, "platform")
    assert json.loads(gamestream(*cli_args("json"), data_dir=data_dir).stdout) == want

    rows = list(csv.DictReader(io.StringIO(gamestream(*cli_args("csv"), data_dir=data_dir).stdout)))
    assert [row["day"] for row in rows] == [row["day"] for row in want]
    for row, expected in zip(rows, want):
        assert row["platform"] == expected["platform"]
        assert [int(row[f"step_{k}"]) for k in (1, 2, 3)] == [expected[f"step_{k}"] for k in (1, 2, 3)]
        assert float(row["conversion"]) == pytest.approx(expected["conversion"], abs=1e-6)

    table = gamestream(*cli_args("table"), data_dir=data_dir).stdout
    assert "1. sessionStart → 2. levelStart[game_keyword=space-miner] → 3. levelEnd, within 1h" in table
    total = next(row for row in want if row["day"] == "total" and row["platform"] == "ios")
    assert any(line.split("│")[1:6] and [cell.strip() for cell in line.split("│")[1:6]] == [
        "total", "ios", str(total["step_1"]), str(total["step_2"]), str(total["step_3"])]
        for line in table.splitlines()), table
    assert f"{len(want)} rows" in table


@pytest.mark.parametrize(("args", "reason"), [
    (["--step", "sessionStart"], "2 to 10 steps"),
    (["--step", "sessionStart", "--step", "levelEnd[score=3]"], ("unknown param 'score'; the params of eventParams"
                                                                  " are game_keyword, app_name, scoreAdjustment")),
    (["--step", "a", "--step", "b", "--within", "2 hours"], "within '2 hours'"),
])
def test_the_command_refuses_a_bad_funnel_with_the_reason(data, args, reason) -> None:
    data_dir, _ = data
    refused = gamestream("funnel", *args, data_dir=data_dir, check=False)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert reason in " ".join((refused.stdout + refused.stderr).split())


# --------------------------------------------------------------------------------------------------- HTTP
@pytest.fixture(scope="module")
def server(data):
    data_dir, _ = data
    process = ServeProcess(data_dir, "--api-key", "writer", "--admin-key", "boss")
    yield process
    assert process.stop() == 0


BOSS = {"Authorization": "Bearer boss"}


def test_post_v1_funnel_needs_the_admin_key_and_answers_the_reference(data, server) -> None:
    _, events = data
    url = server.url + "/v1/funnel"
    request = {"steps": ["sessionStart", {"event": "levelStart", "where": {"game_keyword": "space-miner"}},
                         "levelEnd"], "within": "1h", "from": "2026-11-01", "to": "2026-11-05", "by": "platform"}
    assert httpx.post(url, json=request).status_code == 401
    assert httpx.post(url, json=request, headers={"Authorization": "Bearer writer"}).status_code == 401
    assert httpx.post(url, json=request, headers={"X-API-Key": "nope"}).status_code == 401
    answer = httpx.post(url, json=request, headers=BOSS, timeout=30)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["rows"] == reference(events, CLI_STEPS, dt.timedelta(hours=1), dt.date(2026, 11, 1), HAND_DAY,
                                     "platform")
    assert body["steps"] == CLI_STEPS and body["within"] == "1h" and body["by"] == "platform"
    assert body["columns"] == ["day", "platform", "step_1", "step_2", "step_3", "step_2_rate", "step_3_rate",
                               "conversion"]
    assert "/v1/funnel" in httpx.get(server.url + "/openapi.json").json()["paths"]


@pytest.mark.parametrize(("request_body", "reason"), [
    ({"steps": ["sessionStart", "levelEnd[score=3]"]}, "unknown param 'score'; the params of eventParams are"),
    ({"steps": ["sessionStart", {"event": "levelEnd", "where": {"lvl": "3"}}]}, "unknown param 'lvl'"),
    ({"steps": ["sessionStart"]}, "a funnel has 2 to 10 steps, not 1"),
    ({"steps": ["a", "b"], "within": "1 hour"}, "within '1 hour': give a duration such as 30m"),
    ({"steps": ["a", "b"], "within": "0m"}, "within '0m'"),
    ({"steps": ["a", "b"], "from": "yesterday"}, "from 'yesterday': give a day as YYYY-MM-DD"),
    ({"steps": ["a", "b"], "to": "2026-02-30"}, "to '2026-02-30'"),
    ({"steps": ["a", "b"], "by": "shoe_size"}, ("unknown dimension 'shoe_size'; dimensions are platform, "
                                                "app_version, level")),
    ({"steps": ["a", "b[platform]"]}, "a filter is param=value"),
    ({"steps": ["a", {"event": "b", "where": {"level": 3}}]}, "the values strings"),
    ({"steps": "a,b"}, "send {"),
    ({"steps": ["a", "b"], "limit": 3}, "unknown field limit"),
])
def test_post_v1_funnel_answers_a_bad_request_with_400_and_the_reason(server, request_body, reason) -> None:
    answer = httpx.post(server.url + "/v1/funnel", json=request_body, headers=BOSS, timeout=30)
    assert answer.status_code == 400, answer.text
    assert reason in answer.json()["error"]


def test_post_v1_funnel_splits_by_country_from_the_geo_country_column(server) -> None:
    """`by: country` reads `geo_country` (the collector's lookup; null for events `load`ed without one)."""
    answer = httpx.post(server.url + "/v1/funnel", json={"steps": CLI_STEPS, "within": "1h", "from": "2026-11-01",
                                                          "to": "2026-11-05", "by": "country"}, headers=BOSS, timeout=30)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["by"] == "country" and body["columns"][:2] == ["day", "country"]
    assert body["rows"] and all(row["country"] is None for row in body["rows"])  # loaded without a country


def test_post_v1_funnel_refuses_a_body_that_is_not_json(server) -> None:
    answer = httpx.post(server.url + "/v1/funnel", content=b"{steps", headers=BOSS)
    assert answer.status_code == 400 and "not JSON" in answer.json()["error"]


def test_the_dashboards_funnel_panel_draws_the_totals_as_bars(data, server) -> None:
    """The panel in a real Chromium: steps typed one a line, the total of each step shown and drawn against step
    1's; a refused funnel shows the server's reason."""
    from browser import chromium

    _, events = data
    want = reference(events, CLI_STEPS, dt.timedelta(hours=1), dt.date(2026, 11, 1), HAND_DAY)
    total = next(row for row in want if row["day"] == "total")
    with chromium() as browser:
        page = browser.new_page()
        page.goto(server.url + "/?key=boss")
        page.fill("[data-testid=funnel-steps]", "\n".join(CLI_STEPS))
        page.fill("[data-testid=funnel-within]", "1h")
        page.fill("[data-testid=funnel-from]", "2026-11-01")
        page.fill("[data-testid=funnel-to]", "2026-11-05")
        page.click("[data-testid=funnel-run]")
        page.wait_for_selector("[data-testid=funnel-step]", timeout=30_000)
        counts = page.eval_on_selector_all("[data-testid=funnel-step]", "rows => rows.map(r => [r.dataset.step, "
                                           "r.querySelector('[data-field=count]').textContent, "
                                           "r.querySelector('.funnel-bar').style.width])")
        assert [(step, int(count.replace(",", ""))) for step, count, _ in counts] == [
            (str(k), total[f"step_{k}"]) for k in (1, 2, 3)]
        assert [float(width.rstrip("%")) for _, _, width in counts] == [
            pytest.approx(100 * total[f"step_{k}"] / total["step_1"], abs=0.01) for k in (1, 2, 3)]
        days = page.eval_on_selector_all("[data-testid=funnel-days] tbody tr", "rows => rows.map(r => r.dataset.day)")
        assert days == [row["day"] for row in want if row["day"] != "total"]

        page.fill("[data-testid=funnel-steps]", "sessionStart\nlevelEnd[lvl=3]")
        page.click("[data-testid=funnel-run]")
        page.wait_for_selector("[data-testid=funnel-status].error", timeout=30_000)
        assert "unknown param 'lvl'" in page.inner_text("[data-testid=funnel-status]")
        assert page.query_selector("[data-testid=funnel-step]") is None


# ---------------------------------------------------------------------------------------- the step syntax
def test_steps_are_read_exactly_as_written() -> None:
    assert funnels.parse_step("levelEnd[level=3,platform=ios]") == funnels.Step(
        "levelEnd", (("level", "3"), ("platform", "ios")))
    assert funnels.parse_step("a=b,c") == funnels.Step("a=b,c")
    assert funnels.parse_step("x[platform=a=b]").where == (("platform", "a=b"),)
    assert funnels.parse_step("x[platform=]").where == (("platform", ""),)
    for bad in ("x[]", "x[platform=1]y", "[platform=1]", "x[platform=1", ""):
        with pytest.raises(funnels.FunnelError):
            funnels.parse_step(bad)
    assert [funnels.parse_within(text) for text in ("90s", "30m", "1h", "7d", "90d")] == [
        dt.timedelta(seconds=90), dt.timedelta(minutes=30), dt.timedelta(hours=1), dt.timedelta(days=7),
        dt.timedelta(days=90)]
    for bad in ("0m", "91d", "1000h", "1H", " 1h", "1.5h", "1w"):
        with pytest.raises(funnels.FunnelError):
            funnels.parse_within(bad)


def test_before_the_events_table_exists_a_funnel_has_no_rows_and_its_names_are_still_checked(tmp_path) -> None:
    settings = Settings.from_env(data_dir=tmp_path)
    steps = [funnels.parse_step("sessionStart"), funnels.parse_step("levelEnd[platform=ios]")]
    assert funnels.run(settings, funnels.Funnel.of(steps)).num_rows == 0
    with pytest.raises(funnels.FunnelError, match="unknown param 'level'"):
        funnels.run(settings, funnels.Funnel.of([steps[0], funnels.parse_step("levelEnd[level=3]")]))
    with pytest.raises(funnels.FunnelError, match="unknown dimension 'level'"):
        funnels.run(settings, funnels.Funnel.of(steps, by="level"))

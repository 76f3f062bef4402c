"""The dashboard in a real headless Chromium: the numbers shown are the KPI tables', and they update live."""

from __future__ import annotations

import datetime as dt
import json
import re
import sys
from pathlib import Path
from typing import Iterator

import httpx
import pyarrow as pa
import pytest

from browser import chromium
from collector_server import ServeProcess
from conftest import gamestream, table_rows, write_ndjson
from gamestream.api.dashboard import DashboardData
from gamestream.demo.generator import live_events, simulate
from gamestream.settings import Settings

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
UTC = dt.timezone.utc


def kpis(data: Path) -> tuple[dict, dict, dict]:
    today = dt.datetime.now(UTC).date()
    daily = {r["eventDate"]: r for r in table_rows(data / "tables" / "kpi_daily")}
    hourly = {r["window_start"].isoformat(): r for r in table_rows(data / "tables" / "kpi_events_hourly")}
    bookings = {r["window_start"].isoformat(): r for r in table_rows(data / "tables" / "kpi_bookings_hourly")}
    return daily[today], hourly, bookings


def shown_number(page, testid: str) -> float:
    return float(page.inner_text(f"[data-testid={testid}]").replace(",", ""))


def shown_windows(page, testid: str, field: str) -> dict[str, tuple[str, str]]:
    """window start → (the field's text, "final" or "provisional"), as the page shows them."""
    shown = page.eval_on_selector_all(
        f"[data-testid={testid}] tr",
        f"rows => Object.fromEntries(rows.map(r => [r.dataset.window, "
        f"[r.querySelector('[data-field={field}]').textContent, r.querySelector('[data-field=status]').textContent]]))")
    return {window: tuple(values) for window, values in shown.items()}


@pytest.fixture
def history(tmp_path: Path) -> Path:
    """Two days of events up to now, one bad event in quarantine, all processed."""
    data = tmp_path / "data"
    now = dt.datetime.now(UTC)
    events = list(simulate(events=8000, users=300, seed=31, start=now - dt.timedelta(days=2), days=2))
    events = [e for e in events if dt.datetime.fromisoformat(e["eventTime"].replace("Z", "+00:00")) <= now]
    events.append({"eventName": "purchaseEvent", "eventTime": None, "eventParams": {"device_id": "d", "amount": 1}})
    write_ndjson(tmp_path / "history.ndjson", events)
    gamestream("load", str(tmp_path / "history.ndjson"), data_dir=data)
    gamestream("process", "--until-idle", data_dir=data)
    return data


@pytest.mark.slow
def test_dashboard_shows_the_kpi_tables_and_updates_without_a_reload(history: Path) -> None:
    server = ServeProcess(history)
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        with chromium() as browser:
            page = browser.new_page()
            page.goto(server.url + "/")
            page.wait_for_selector("[data-testid=events-rows] tr", state="attached", timeout=30_000)
            page.wait_for_selector("[data-testid=events-chart] canvas", timeout=30_000)
            page.wait_for_selector("[data-testid=bookings-chart] canvas", timeout=30_000)

            today, hourly, bookings = kpis(history)
            assert shown_number(page, "dau") == today["dau"]
            assert shown_number(page, "paying-users") == today["paying_users"]
            assert shown_number(page, "arpdau") == round(today["arpdau"], 4)
            assert shown_number(page, "bookings-today") == round(today["bookings"], 2)
            assert shown_number(page, "quarantined") == 1
            assert "eventTime: null" in page.inner_text("[data-testid=reasons]")
            windows = shown_windows(page, "events-rows", "events")
            assert windows and all(
                (str(hourly[w]["events"]), "final" if hourly[w]["final"] else "provisional") == shown
                for w, shown in windows.items())
            assert any(status == "provisional" for _, status in windows.values())  # marked as such
            assert any(status == "final" for _, status in windows.values())
            shown_bookings = shown_windows(page, "bookings-rows", "purchases")
            assert all(str(bookings[w]["purchases"]) == shown for w, (shown, _) in shown_bookings.items())
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

            # more events arrive and are processed: the open page changes by itself
            page.evaluate("window.__not_reloaded = true")
            newest = max(windows)
            before = int(windows[newest][0])
            batch = "\n".join(json.dumps({"eventName": "levelStart", "eventParams": {"device_id": f"new-{i}"}})
                              for i in range(50))
            answer = httpx.post(server.url + "/v1/events", content=batch,
                                headers={"Content-Type": "application/x-ndjson"})
            assert answer.json()["accepted"] == 50
            gamestream("process", "--until-idle", data_dir=history)
            today, hourly, _ = kpis(history)
            current = max(hourly)
            page.wait_for_function(
                f"() => document.querySelector('[data-testid=dau]').textContent.replace(/,/g, '') == "
                f"'{today['dau']}'", timeout=10_000)
            assert page.evaluate("window.__not_reloaded") is True
            windows = shown_windows(page, "events-rows", "events")
            assert int(windows[current][0]) == hourly[current]["events"]
            assert current != newest or int(windows[current][0]) == before + 50

            page.set_viewport_size({"width": 390, "height": 844})  # a phone
            page.emulate_media(color_scheme="dark")
            page.wait_for_timeout(500)
            assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing wider than the screen
            background = page.evaluate("getComputedStyle(document.body).backgroundColor")
            assert background == "rgb(15, 17, 21)"  # the dark palette
            page.screenshot(path=str(ARTIFACTS / "dashboard-phone-dark.png"), full_page=True)
    finally:
        server.stop()


def post_live_events(server: ServeProcess, count: int, seed: int) -> None:
    """Posts what `gamestream demo`'s generator posts: simulated players' events, eventTime stamped by the
    collector on arrival (now), plus a few purchases so that the bookings line has a window."""
    events = list(live_events(users=40, seed=seed, limit=count))
    events += [{"eventName": "purchaseEvent", "eventParams": {"device_id": f"buyer-{seed}-{i}", "amount": 4.99}}
               for i in range(3)]
    answer = httpx.post(server.url + "/v1/events", content="\n".join(json.dumps(e) for e in events),
                        headers={"Content-Type": "application/x-ndjson"})
    assert answer.json()["accepted"] == len(events)


@pytest.fixture
def first_minute(tmp_path: Path) -> Iterator[ServeProcess]:
    """A new user's first minute of `gamestream demo`: a collector on an empty data directory, a few hundred
    events of now, processed in two batches (so the events table has two files) and then OPTIMIZEd, as the
    processor's automatic maintenance would. The KPI tables hold one hourly window (two if the hour turned)."""
    data = tmp_path / "data"
    server = ServeProcess(data)
    try:
        for seed in (1, 2):
            post_live_events(server, 150, seed)
            gamestream("process", "--until-idle", data_dir=data)
        gamestream("optimize", data_dir=data)
        yield server
    finally:
        server.stop()


def x_scale(page, chart: str) -> dict:
    """The chart's time axis as uPlot plots it, and the x values of its data, in seconds."""
    return page.evaluate(f"""() => {{
        const u = window.gamestream.plots.{chart};
        return {{min: u.scales.x.min, max: u.scales.x.max, xs: Array.from(u.data[0]), ys: Array.from(u.data[1]),
                 plotted: u.series.slice(1).map((s, i) => s.points.show(u, i + 1))}};
    }}""")


@pytest.mark.slow
def test_dashboard_first_minute_of_the_demo_reads_well(first_minute: ServeProcess) -> None:
    server = first_minute
    api = httpx.get(server.url + "/v1/dashboard").json()
    assert 1 <= len(api["hourly"]) <= 2 and api["bookings"]
    events_health = api["tables"]["events"]
    ARTIFACTS.mkdir(exist_ok=True)
    with chromium() as browser:
        page = browser.new_page()
        page.goto(server.url + "/")
        page.wait_for_function("() => window.gamestream.polls >= 1 && window.gamestream.plots.bookings",
                               timeout=30_000)

        # the time axis: hours around the window, not years with the bar squeezed against an edge
        events = x_scale(page, "events")
        assert 0 < events["max"] - events["min"] <= 3 * 86400
        assert len(events["xs"]) == len(api["hourly"])
        for x in events["xs"]:  # each bar (drawn at its window's middle) wholly inside, away from the edges
            assert events["min"] + 1800 < x - 1800 and x + 1800 < events["max"] - 1800
        bookings = x_scale(page, "bookings")
        assert (bookings["min"], bookings["max"]) == (events["min"], events["max"])  # the charts line up
        assert bookings["xs"] and all(bookings["min"] < x < bookings["max"] for x in bookings["xs"])
        assert bookings["ys"][-1] > 0 and bookings["plotted"] == [True, True]  # a lone window is a visible dot

        # freshness is shown, and still on later polls and on answers from the dashboard's cache (two pages
        # polling at once: requests within the cache's lifetime share one read of the tables)
        together = page.evaluate("() => Promise.all([1, 2, 3].map(() => fetch('/v1/dashboard').then(r => r.json())))")
        assert all(answer["lag"]["freshness_seconds"] is not None for answer in together)
        polls = page.evaluate("window.gamestream.polls")
        for _ in range(3):
            assert re.fullmatch(r"[\d,]+\.\d s", page.inner_text("[data-testid=freshness]"))
            polls += 1
            page.wait_for_function(f"() => window.gamestream.polls >= {polls}", timeout=10_000)

        # table health: human times with the exact one on hover, and the threshold of a small file named
        health = page.eval_on_selector_all(
            "[data-testid=health] dt", "dts => Object.fromEntries(dts.map(dt => [dt.textContent, "
            "[dt.nextElementSibling.textContent, dt.nextElementSibling.title]]))")
        for operation in ("OPTIMIZE", "VACUUM"):
            iso = events_health["last_" + operation.lower()]
            text, title = health["last " + operation]
            if iso is None:
                assert (text, title) == ("never", "")
            else:
                assert re.fullmatch(r"\d+ (s|min|h|d) ago", text) and title == iso
        assert events_health["last_optimize"] is not None  # two files in today's partition were compacted
        assert events_health["small_file_bytes"] == 256 * 1024 * 1024
        assert health["small files (< 256 MiB)"][0] == str(events_health["small_files"])
        page.screenshot(path=str(ARTIFACTS / "dashboard-first-minute.png"), full_page=True)


def test_freshness_is_measured_again_on_every_answer_from_the_cache(first_minute: ServeProcess) -> None:
    dashboard = DashboardData(Settings.from_env(data_dir=first_minute.data_dir), ttl_s=3600)
    answers = [dashboard.snapshot(backlog=0, events_per_second=0.0) for _ in range(3)]
    assert answers[0]["tables"] == answers[2]["tables"]  # one read of the tables, cached
    newest = {answer["lag"]["newest_event_time"] for answer in answers}
    assert len(newest) == 1 and None not in newest
    freshness = [answer["lag"]["freshness_seconds"] for answer in answers]
    assert freshness == sorted(freshness) and freshness[0] >= 0  # from the cached eventTime to each answer's now


def test_dashboard_needs_the_admin_key_when_keys_are_configured(history: Path) -> None:
    server = ServeProcess(history, "--api-key", "writer", "--admin-key", "boss")
    try:
        assert httpx.get(server.url + "/").status_code == 401
        assert httpx.get(server.url + "/v1/dashboard").status_code == 401
        assert httpx.get(server.url + "/v1/dashboard", headers={"X-API-Key": "writer"}).status_code == 401
        assert httpx.get(server.url + "/?key=boss").status_code == 200
        data = httpx.get(server.url + "/v1/dashboard", headers={"Authorization": "Bearer boss"}).json()
        assert data["quarantine"]["count"] == 1 and data["hourly"]
        assert httpx.get(server.url + "/static/vendor/uplot-1.6.32/uPlot.iife.min.js").status_code == 200
    finally:
        server.stop()


def test_dashboard_api_is_in_the_openapi_description(history: Path) -> None:
    server = ServeProcess(history)
    try:
        spec = httpx.get(server.url + "/openapi.json").json()
        assert "/v1/dashboard" in spec["paths"]
    finally:
        server.stop()


# ------------------------------------------------------------------ issue 16: engagement, retention, top events
LAST_DAY = dt.date(2026, 11, 30)  # the newest day with events in the tables written below

KPI_DAILY = pa.schema([("eventDate", pa.date32()), ("dau", pa.int64()), ("events", pa.int64()),
                       ("bookings", pa.float64()), ("paying_users", pa.int64()), ("arpdau", pa.float64()),
                       ("new_users", pa.int64()), ("wau", pa.int64()), ("mau", pa.int64()),
                       ("stickiness", pa.float64()), ("arppu", pa.float64()), ("conversion", pa.float64()),
                       ("first_purchase_users", pa.int64()), ("sessions", pa.int64()),
                       ("avg_session_s", pa.float64())])
KPI_DAILY_BEFORE_ISSUE_16 = pa.schema(list(KPI_DAILY)[:6])
KPI_RETENTION = pa.schema([("cohort_day", pa.date32()), ("cohort_size", pa.int64()), ("d1_users", pa.int64()),
                           ("d7_users", pa.int64()), ("d30_users", pa.int64()), ("d1", pa.float64()),
                           ("d7", pa.float64()), ("d30", pa.float64())])
KPI_TOP_EVENTS = pa.schema([("eventDate", pa.date32()), ("eventName", pa.string()), ("events", pa.int64())])


def daily_row(day: dt.date, i: int) -> dict:
    dau, paying = 100 + 10 * i, 3 + i % 4
    bookings = 9.99 * paying + 0.5 * i
    mau = 40 * dau // 10
    return {"eventDate": day, "dau": dau, "events": 25 * dau, "bookings": bookings, "paying_users": paying,
            "arpdau": bookings / dau, "new_users": 20 + i % 7, "wau": 2 * dau + i, "mau": mau,
            "stickiness": dau / mau, "arppu": bookings / paying, "conversion": paying / dau,
            "first_purchase_users": 1 + i % 3, "sessions": 3 * dau + i, "avg_session_s": 125.4 + i}


def cohort_row(day: dt.date, i: int) -> dict:
    """A cohort whose D1/D7/D30 vary with `i`; a rate is NULL while its day is after LAST_DAY, as the KPI stage
    writes it."""
    size = 40 + 3 * i
    row = {"cohort_day": day, "cohort_size": size}
    for n, share in ((1, 0.15 + 0.7 * (i % 5) / 4), (7, 0.05 + 0.3 * (i % 3) / 2), (30, 0.02 + 0.01 * (i % 4))):
        measurable = day + dt.timedelta(days=n) <= LAST_DAY
        users = round(size * share) if measurable else None
        row[f"d{n}_users"], row[f"d{n}"] = users, (users / size if measurable else None)
    return row


def write_kpi_tables(tables: Path, *, issue_16: bool = True) -> dict[str, list[dict]]:
    """KPI tables as the KPI stage of issue 16 keeps them (exactly its schemas): 40 days of kpi_daily up to
    LAST_DAY, 45 retention cohorts (one a day up to LAST_DAY), and the top events of two days, 12 events on the newest. Without `issue_16`,
    what an older data directory holds: kpi_daily with its first six columns, and no retention or top events."""
    from deltalake import write_deltalake

    days = [LAST_DAY - dt.timedelta(days=39 - i) for i in range(40)]
    daily = [daily_row(day, i) for i, day in enumerate(days)]
    if not issue_16:
        daily = [{k: row[k] for k in KPI_DAILY_BEFORE_ISSUE_16.names} for row in daily]
        write_deltalake(str(tables / "kpi_daily"), pa.Table.from_pylist(daily, KPI_DAILY_BEFORE_ISSUE_16))
        return {"kpi_daily": daily}
    cohorts = [cohort_row(LAST_DAY - dt.timedelta(days=44 - i), i) for i in range(45)]
    names = ["levelStart", "levelEnd", "scoreAdjustment", "sessionStart", "sessionEnd", "purchaseEvent", "adView",
             "tutorialStep", "shopOpen", "friendInvite", "achievement", "settingsOpen"]
    top = [{"eventDate": LAST_DAY, "eventName": name, "events": 5000 - 300 * i} for i, name in enumerate(names)]
    top.append({"eventDate": LAST_DAY - dt.timedelta(days=1), "eventName": "yesterdayOnly", "events": 99999})
    write_deltalake(str(tables / "kpi_daily"), pa.Table.from_pylist(daily, KPI_DAILY))
    write_deltalake(str(tables / "kpi_retention"), pa.Table.from_pylist(cohorts, KPI_RETENTION))
    write_deltalake(str(tables / "kpi_top_events"), pa.Table.from_pylist(top, KPI_TOP_EVENTS))
    return {"kpi_daily": daily, "kpi_retention": cohorts, "kpi_top_events": top}


@pytest.fixture
def issue_16_tables(tmp_path: Path) -> tuple[Path, dict[str, list[dict]]]:
    data = tmp_path / "data"
    return data, write_kpi_tables(data / "tables")


def dashboard_answer(data: Path) -> dict:
    return DashboardData(Settings.from_env(data_dir=data)).snapshot(backlog=0, events_per_second=0.0)


def test_dashboard_answer_has_the_latest_days_engagement_retention_and_top_events(issue_16_tables) -> None:
    data, written = issue_16_tables
    answer = dashboard_answer(data)
    json.dumps(answer, allow_nan=False)  # what starlette's JSONResponse requires

    latest = written["kpi_daily"][-1]
    activity = answer["activity"]
    assert activity["eventDate"] == LAST_DAY.isoformat()
    for name in ("dau", "wau", "mau", "new_users", "paying_users", "first_purchase_users", "sessions"):
        assert activity[name] == latest[name], name
    assert activity["stickiness"] == latest["stickiness"] and activity["conversion"] == latest["conversion"]
    assert activity["arppu"] == round(latest["arppu"], 2)
    assert activity["avg_session_s"] == round(latest["avg_session_s"], 1)
    days = answer["activity_days"]
    assert [d["eventDate"] for d in days] == [r["eventDate"].isoformat() for r in written["kpi_daily"][-30:]]
    assert [(d["dau"], d["wau"], d["mau"]) for d in days] == [(r["dau"], r["wau"], r["mau"])
                                                              for r in written["kpi_daily"][-30:]]

    cohorts = answer["retention"]
    newest = sorted(written["kpi_retention"], key=lambda r: r["cohort_day"], reverse=True)[:37]
    assert [c["cohort_day"] for c in cohorts] == [r["cohort_day"].isoformat() for r in newest]
    for shown, row in zip(cohorts, newest):
        assert shown["cohort_size"] == row["cohort_size"]
        for n in (1, 7, 30):
            assert shown[f"d{n}_users"] == row[f"d{n}_users"]
            assert shown[f"d{n}"] == row[f"d{n}"]
    assert cohorts[0]["d1"] is None and cohorts[1]["d1"] is not None  # the newest install day has no day 1 yet
    assert cohorts[6]["d7"] is None and cohorts[7]["d7"] is not None
    # the 37 newest install days: the 30 newest cannot have their D30 yet, the 7 before them have it
    assert [c["d30"] is None for c in cohorts] == [True] * 30 + [False] * 7
    assert answer["top_events"]["eventDate"] == LAST_DAY.isoformat()
    top = answer["top_events"]["events"]
    assert [e["eventName"] for e in top] == ["levelStart", "levelEnd", "scoreAdjustment", "sessionStart",
                                             "sessionEnd", "purchaseEvent", "adView", "tutorialStep", "shopOpen",
                                             "friendInvite"]
    assert top[0]["events"] == 5000 and top[-1]["events"] == 5000 - 300 * 9


def test_dashboard_answer_before_the_kpi_stage_writes_the_new_tables(tmp_path: Path) -> None:
    nothing = dashboard_answer(tmp_path / "empty")
    assert (nothing["activity"], nothing["activity_days"], nothing["retention"], nothing["top_events"]) == (
        None, [], [], None)
    old = tmp_path / "old"
    written = write_kpi_tables(old / "tables", issue_16=False)
    answer = dashboard_answer(old)
    assert answer["activity"]["dau"] == written["kpi_daily"][-1]["dau"]
    assert all(answer["activity"][name] is None for name in ("wau", "mau", "stickiness", "new_users", "arppu",
                                                             "conversion", "sessions", "avg_session_s"))
    assert answer["activity_days"][-1]["wau"] is None
    assert answer["retention"] == [] and answer["top_events"] is None


def background_alpha(color: str) -> float:
    """The alpha of a computed CSS colour: rgba(r, g, b, a) → a, rgb(r, g, b) → 1."""
    parts = re.findall(r"[\d.]+", color)
    return float(parts[3]) if len(parts) == 4 else 1.0


def shown_cohorts(page) -> list[dict]:
    """The cohort table's rows, read in one synchronous evaluation: rows found and their styles read apart could
    straddle a refresh, and a row it has replaced has no computed style ('')."""
    return page.evaluate(
        """() => Array.from(document.querySelectorAll('[data-testid=cohorts] tr')).map(r => ({
             day: r.dataset.cohort, cells: Object.fromEntries(
             Array.from(r.querySelectorAll('[data-field]')).map(td => [td.dataset.field,
               {text: td.textContent, background: getComputedStyle(td).backgroundColor}]))}))""")


@pytest.mark.slow
def test_dashboard_shows_engagement_tiles_a_shaded_cohort_table_and_top_events(issue_16_tables) -> None:
    data, written = issue_16_tables
    server = ServeProcess(data)
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        with chromium() as browser:
            page = browser.new_page()
            page.goto(server.url + "/")
            page.wait_for_selector("[data-testid=cohorts] tr[data-cohort]", timeout=30_000)
            page.wait_for_selector("[data-testid=activity-chart] canvas", timeout=30_000)
            latest = written["kpi_daily"][-1]
            assert shown_number(page, "wau") == latest["wau"]
            assert shown_number(page, "mau") == latest["mau"]
            assert page.inner_text("[data-testid=stickiness]") == f"{latest['stickiness']:.1%}"
            assert shown_number(page, "new-users") == latest["new_users"]
            assert page.inner_text("[data-testid=arppu]") == f"{latest['arppu']:,.2f}"
            assert page.inner_text("[data-testid=conversion]") == f"{latest['conversion']:.1%}"
            assert shown_number(page, "sessions") == latest["sessions"]
            seconds = round(latest["avg_session_s"])
            assert page.inner_text("[data-testid=avg-session]") == f"{seconds // 60}m {seconds % 60:02}s"
            assert LAST_DAY.isoformat() in page.inner_text("[data-testid=activity-day]")
            chart = page.evaluate("Array.from(window.gamestream.plots.activity.data[2])")  # WAU per day
            assert chart == [r["wau"] for r in written["kpi_daily"][-30:]]

            cohorts = shown_cohorts(page)
            newest = sorted(written["kpi_retention"], key=lambda r: r["cohort_day"], reverse=True)[:37]
            assert [c["day"] for c in cohorts] == [r["cohort_day"].isoformat() for r in newest]
            shading = []
            for shown, row in zip(cohorts, newest):
                assert shown["cells"]["cohort_size"]["text"] == str(row["cohort_size"])
                for n in (1, 7, 30):
                    cell, rate = shown["cells"][f"d{n}"], row[f"d{n}"]
                    if rate is None:
                        assert cell["text"] == "—" and background_alpha(cell["background"]) == 0
                    else:
                        assert cell["text"] == f"{rate:.1%}"
                        shading.append((rate, background_alpha(cell["background"])))
            assert len({rate for rate, _ in shading}) >= 5
            shading.sort()
            alphas = [alpha for _, alpha in shading]
            assert alphas == sorted(alphas) and alphas[0] < alphas[-1]  # the higher the rate, the darker
            assert all(abs(alpha - rate) < 0.01 for rate, alpha in shading)  # alpha is the rate itself

            top = page.eval_on_selector_all("[data-testid=top-events] li",
                                            "lis => lis.map(li => [li.dataset.event, li.querySelector('.count')"
                                            ".textContent])")
            expected = sorted((r for r in written["kpi_top_events"] if r["eventDate"] == LAST_DAY),
                              key=lambda r: -r["events"])[:10]
            assert top == [[r["eventName"], f"{r['events']:,}"] for r in expected]
            page.screenshot(path=str(ARTIFACTS / "dashboard-issue-16.png"), full_page=True)

            page.set_viewport_size({"width": 390, "height": 844})  # a phone: the cohort table fits too
            page.wait_for_timeout(300)
            assert page.evaluate("document.documentElement.scrollWidth") <= 390
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.parametrize("issue_16", [False, None], ids=["kpi_daily-before-issue-16", "no-kpi-tables"])
def test_dashboard_without_the_new_kpi_tables_says_no_data_yet(tmp_path: Path, issue_16: bool | None) -> None:
    data = tmp_path / "data"
    if issue_16 is not None:
        write_kpi_tables(data / "tables", issue_16=issue_16)
    server = ServeProcess(data)
    try:
        with chromium() as browser:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(server.url + "/")
            page.wait_for_function("() => window.gamestream.polls >= 2", timeout=30_000)
            assert not errors
            assert page.locator("#pulse.ok").count() == 1
            for testid in ("wau", "mau", "stickiness", "new-users", "arppu", "conversion", "sessions", "avg-session"):
                assert page.inner_text(f"[data-testid={testid}]") == "no data yet", testid
            assert page.inner_text("[data-testid=cohorts]") == "no data yet"
            assert page.inner_text("[data-testid=top-events]") == "no data yet"
            if issue_16 is False:  # the old columns are still drawn: DAU per day, without WAU and MAU
                page.wait_for_selector("[data-testid=activity-chart] canvas", timeout=10_000)
                assert page.evaluate("window.gamestream.plots.activity.data[2].every(v => v == null)")
            else:
                assert page.inner_text("[data-testid=activity-chart]") == "no data yet"
    finally:
        server.stop()


@pytest.mark.slow
def test_dashboard_over_the_kpi_stages_own_tables_of_returning_players(tmp_path: Path) -> None:
    """End to end: players who install on each of 10 days and come back less and less (the data of
    scripts/dashboard_screenshot.py, smaller), through `gamestream load` and `process`; the dashboard shows what
    the KPI stage wrote. Skipped while the KPI stage does not write the tables of issue 16."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from dashboard_screenshot import cohort_events

    data = tmp_path / "data"
    now = dt.datetime.now(UTC)
    write_ndjson(tmp_path / "cohorts.ndjson", list(cohort_events(days=10, cohort_users=15, now=now)))
    gamestream("load", str(tmp_path / "cohorts.ndjson"), data_dir=data)
    gamestream("process", "--until-idle", data_dir=data)
    tables = data / "tables"
    missing = [name for name in ("kpi_retention", "kpi_top_events") if not (tables / name / "_delta_log").exists()]
    if missing:
        pytest.skip(f"the KPI stage does not write {', '.join(missing)} yet (issue 16)")
    daily = sorted(table_rows(tables / "kpi_daily"), key=lambda r: r["eventDate"])
    if "wau" not in daily[-1]:
        pytest.skip("the KPI stage does not write kpi_daily's columns of issue 16 (wau, mau, …) yet")

    answer = dashboard_answer(data)
    latest = daily[-1]
    assert answer["activity"]["eventDate"] == latest["eventDate"].isoformat() == now.date().isoformat()
    for name in ("dau", "wau", "mau", "stickiness", "new_users", "conversion", "sessions"):
        assert answer["activity"][name] == latest[name], name
    assert answer["activity"]["dau"] <= answer["activity"]["wau"] <= answer["activity"]["mau"]
    cohorts = sorted(table_rows(tables / "kpi_retention"), key=lambda r: r["cohort_day"], reverse=True)
    assert [c["cohort_day"] for c in answer["retention"]] == [r["cohort_day"].isoformat() for r in cohorts[:37]]
    assert [(c["cohort_size"], c["d1"], c["d7"]) for c in answer["retention"]] == [
        (r["cohort_size"], r["d1"], r["d7"]) for r in cohorts[:37]]
    assert len(answer["retention"]) == 10 and answer["retention"][0]["d1"] is None  # today's installs: no day 1
    assert all(0 < c["d1"] < 1 for c in answer["retention"][1:])  # players came back, not all of them
    top = [r for r in table_rows(tables / "kpi_top_events") if r["eventDate"] == latest["eventDate"]]
    assert {e["eventName"]: e["events"] for e in answer["top_events"]["events"]} == {
        r["eventName"]: r["events"] for r in sorted(top, key=lambda r: -r["events"])[:10]}

    server = ServeProcess(data)
    try:
        with chromium() as browser:
            page = browser.new_page()
            page.goto(server.url + "/")
            page.wait_for_selector("[data-testid=cohorts] tr[data-cohort]", timeout=30_000)
            assert shown_number(page, "wau") == latest["wau"]
            shown = shown_cohorts(page)
            assert [c["day"] for c in shown] == [c["cohort_day"] for c in answer["retention"]]
            assert shown[0]["cells"]["d1"]["text"] == "—" and shown[1]["cells"]["d1"]["text"].endswith("%")
            page.screenshot(path=str(ARTIFACTS / "dashboard-cohorts.png"), full_page=True)
    finally:
        server.stop()

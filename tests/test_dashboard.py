"""The dashboard in a real headless Chromium: the numbers shown are the KPI tables', and they update live."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from browser import chromium
from collector_server import ServeProcess
from conftest import gamestream, table_rows, write_ndjson
from gamestream.dashboard import DashboardData
from gamestream.generator import live_events, simulate
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

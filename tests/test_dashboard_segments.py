"""Breakdowns on the dashboard (issue 27): the dimension selector splits the daily chart, the latest day's figures
and the retention table by a dimension's values, in a real headless Chromium over a real `gamestream serve`.

The segment tables are written here with the KPI stage's own schemas (`kpi.tables.DAILY_SEGMENTS`,
`RETENTION_SEGMENTS`), so the page is checked against known rows; the last test runs the real pipeline."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pyarrow as pa
import pytest

from browser import chromium
from collector_server import ServeProcess
from conftest import gamestream, table_rows
from gamestream.api.dashboard import COHORTS_SHOWN, DAYS_SHOWN, DashboardData
from gamestream.api.dashboard.segments import SERIES_SHOWN, UnknownDimension
from gamestream.kpi.tables import DAILY_SEGMENTS, NOT_SET, OTHER, RETENTION_SEGMENTS
from gamestream.settings import Settings
from test_dashboard import write_kpi_tables

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
UTC = dt.timezone.utc
LAST_DAY = dt.date(2026, 11, 30)  # the newest day in the tables written below (as test_dashboard's)
DAYS_WRITTEN, COHORTS_WRITTEN = 35, 40  # more than shown: the older ones must not count
VERSIONS = [f"1.{k}" for k in range(11)]  # more than SERIES_SHOWN: three of them fold into (other)
RETIRED = "0.9"  # a version with the most DAU of all, but only on days older than the ones shown
CONFIGURED = ["platform", "app_version", "country", "level_band"]  # the built-in ones, then [kpi] dimensions
DIMENSIONS = [*CONFIGURED, "store"]  # and one only the table still holds


# ------------------------------------------------------------------------------------------ the tables written
def day_row(day: dt.date, dimension: str, value: str, dau: int) -> dict:
    paying = dau // 10
    bookings = round(dau * 0.37, 2)
    return {"eventDate": day, "dimension": dimension, "value": value, "dau": dau, "new_users": dau // 4,
            "events": dau * 7, "bookings": bookings, "paying_users": paying,
            "arppu": bookings / paying if paying else 0.0, "conversion": paying / dau if dau else 0.0,
            "sessions": dau * 2}


def daily_segments() -> list[dict]:
    """platform (two values and devices without one), app_version (eleven versions, the stage's own (other), and
    a retired version before the days shown), country, `level_band` (a promoted parameter of `[kpi] dimensions`)
    and `store`, which the configuration no longer lists but the table still holds."""
    rows = []
    for i in range(DAYS_WRITTEN):
        day = LAST_DAY - dt.timedelta(days=DAYS_WRITTEN - 1 - i)
        rows += [day_row(day, "platform", "android", 100 + i), day_row(day, "platform", "ios", 60 + 2 * i),
                 day_row(day, "platform", NOT_SET, 5)]
        rows += [day_row(day, "app_version", version, 50 - 4 * k + i % 3) for k, version in enumerate(VERSIONS)]
        rows.append(day_row(day, "app_version", OTHER, 7))
        if i < DAYS_WRITTEN - DAYS_SHOWN:
            rows.append(day_row(day, "app_version", RETIRED, 1000))
        rows += [day_row(day, "country", country, dau) for country, dau in (("US", 90), ("BR", 70 + i), ("DE", 30))]
        rows += [day_row(day, "level_band", band, 40 - 10 * b) for b, band in enumerate(("1-10", "11-20"))]
        if i >= DAYS_WRITTEN - 3:
            rows += [day_row(day, "store", store, 20) for store in ("google", "apple")]
    return rows


def cohort_segment(day: dt.date, dimension: str, value: str, size: int) -> dict:
    row = {"cohort_day": day, "dimension": dimension, "value": value, "cohort_size": size}
    for n, share in ((1, 0.4), (7, 0.15), (30, 0.05)):
        measurable = day + dt.timedelta(days=n) <= LAST_DAY
        users = round(size * share) if measurable else None
        row[f"d{n}_users"], row[f"d{n}"] = users, (users / size if measurable else None)
    return row


def retention_segments() -> list[dict]:
    rows = []
    for i in range(COHORTS_WRITTEN):
        day = LAST_DAY - dt.timedelta(days=COHORTS_WRITTEN - 1 - i)
        rows += [cohort_segment(day, "platform", "android", 30 + i), cohort_segment(day, "platform", "ios", 20 + i),
                 cohort_segment(day, "platform", NOT_SET, 2)]
        rows += [cohort_segment(day, "app_version", version, 20 - k) for k, version in enumerate(VERSIONS)]
        rows.append(cohort_segment(day, "app_version", OTHER, 3))
    return rows


def write_segment_tables(tables: Path) -> dict[str, list[dict]]:
    from deltalake import write_deltalake

    written = {"kpi_daily_segments": daily_segments(), "kpi_retention_segments": retention_segments()}
    for name, schema in (("kpi_daily_segments", DAILY_SEGMENTS), ("kpi_retention_segments", RETENTION_SEGMENTS)):
        write_deltalake(str(tables / name), pa.Table.from_pylist(written[name], schema))
    return written


# ------------------------------------------------------------------------------ the reference: what is shown
def shown_days(rows: list[dict], dimension: str) -> list[dict]:
    mine = [r for r in rows if r["dimension"] == dimension]
    newest = max(r["eventDate"] for r in mine)
    return [r for r in mine if r["eventDate"] > newest - dt.timedelta(days=DAYS_SHOWN)]


def expected_series(rows: list[dict], dimension: str) -> list[str]:
    """The values drawn: the SERIES_SHOWN with the most DAU over the days shown (the stage's (other) is never one
    of them), then (other) when anything is left over."""
    totals: dict[str, int] = {}
    for r in shown_days(rows, dimension):
        totals[r["value"]] = totals.get(r["value"], 0) + r["dau"]
    ranked = sorted((v for v in totals if v != OTHER), key=lambda v: (-totals[v], v))
    return ranked[:SERIES_SHOWN] + ([OTHER] if len(ranked) > SERIES_SHOWN or OTHER in totals else [])


def expected_dau(rows: list[dict], dimension: str) -> dict[str, dict[str, int]]:
    """series → day → DAU, a folded (other) the sum of its values' DAU."""
    series = expected_series(rows, dimension)
    dau: dict[str, dict[str, int]] = {}
    for r in shown_days(rows, dimension):
        name = r["value"] if r["value"] in series and r["value"] != OTHER else OTHER
        days = dau.setdefault(name, {})
        days[r["eventDate"].isoformat()] = days.get(r["eventDate"].isoformat(), 0) + r["dau"]
    return dau


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def segment_data(tmp_path_factory) -> tuple[Path, dict[str, list[dict]]]:
    data = tmp_path_factory.mktemp("segments") / "data"
    write_kpi_tables(data / "tables")  # the totals of test_dashboard, up to the same LAST_DAY
    (data / "gamestream.toml").write_text('[schema.params]\nlevel_band = "string"\n\n[kpi]\ndimensions = ["level_band"]\n',
                                          encoding="utf-8")
    return data, write_segment_tables(data / "tables")


@pytest.fixture(scope="module")
def server(segment_data) -> Iterator[ServeProcess]:
    served = ServeProcess(segment_data[0])
    try:
        yield served
    finally:
        served.stop()


def answer(data: Path, dimension: str | None = None) -> dict:
    result = DashboardData(Settings.from_env(data_dir=data)).snapshot(backlog=0, events_per_second=0.0,
                                                                       dimension=dimension)
    json.dumps(result, allow_nan=False)  # what starlette's JSONResponse requires
    return result


# ------------------------------------------------------------------------------------------------ the answer
def test_the_answer_lists_the_dimensions_and_splits_nothing_without_one(segment_data) -> None:
    data, _ = segment_data
    assert answer(data)["segments"] == {"dimension": None,
                                        "dimensions": DIMENSIONS}


def test_the_answer_splits_the_days_shown_by_platform(segment_data) -> None:
    data, written = segment_data
    rows = written["kpi_daily_segments"]
    split = answer(data, "platform")["segments"]
    assert split["series"] == expected_series(rows, "platform") == ["android", "ios", NOT_SET]
    stored = {(r["eventDate"].isoformat(), r["value"]): r for r in shown_days(rows, "platform")}
    assert {(r["eventDate"], r["value"]) for r in split["days"]} == set(stored)  # the 30 days shown, no older
    assert len({r["eventDate"] for r in split["days"]}) == DAYS_SHOWN
    for shown in split["days"]:
        row = stored[shown["eventDate"], shown["value"]]
        for name in ("dau", "new_users", "events", "paying_users", "sessions", "conversion"):
            assert shown[name] == row[name], name
        assert shown["bookings"] == round(row["bookings"], 2) and shown["arppu"] == round(row["arppu"], 2)
    assert [d["eventDate"] for d in split["days"]] == sorted(d["eventDate"] for d in split["days"])  # oldest first


def test_values_past_the_top_eight_are_summed_into_other(segment_data) -> None:
    data, written = segment_data
    rows = written["kpi_daily_segments"]
    split = answer(data, "app_version")["segments"]
    series = expected_series(rows, "app_version")
    assert split["series"] == series == [*VERSIONS[:SERIES_SHOWN], OTHER]
    assert RETIRED not in {r["value"] for r in split["days"]}  # its days are not shown
    dau = expected_dau(rows, "app_version")
    assert {(r["value"], r["eventDate"]): r["dau"] for r in split["days"]} == {
        (value, day): n for value, days in dau.items() for day, n in days.items()}
    # (other)'s figures: sums of its rows (1.8, 1.9, 1.10 and the stage's own (other)); its rates from the sums
    latest = [r for r in rows if r["dimension"] == "app_version" and r["eventDate"] == LAST_DAY
              and r["value"] in (*VERSIONS[SERIES_SHOWN:], OTHER)]
    other = next(r for r in split["days"] if r["value"] == OTHER and r["eventDate"] == LAST_DAY.isoformat())
    for name in ("dau", "new_users", "events", "paying_users", "sessions"):
        assert other[name] == sum(r[name] for r in latest), name
    bookings = sum(r["bookings"] for r in latest)
    assert other["bookings"] == round(bookings, 2)
    assert other["arppu"] == round(bookings / other["paying_users"], 2)
    assert other["conversion"] == other["paying_users"] / other["dau"]


def test_the_latest_day_shows_every_stored_value_by_dau(segment_data) -> None:
    data, written = segment_data
    latest = answer(data, "app_version")["segments"]["latest"]
    assert latest["eventDate"] == LAST_DAY.isoformat()
    stored = [r for r in written["kpi_daily_segments"] if r["dimension"] == "app_version" and r["eventDate"] == LAST_DAY]
    ranked = sorted(stored, key=lambda r: (r["value"] == OTHER, -r["dau"], r["value"]))
    assert [r["value"] for r in latest["rows"]] == [r["value"] for r in ranked]  # unfolded, (other) last
    assert [r["dau"] for r in latest["rows"]] == [r["dau"] for r in ranked]


def test_retention_is_split_per_cohort_and_value_with_other_summed_exactly(segment_data) -> None:
    data, written = segment_data
    rows = written["kpi_retention_segments"]
    retention = answer(data, "app_version")["segments"]["retention"]
    cohorts = sorted({r["cohort_day"] for r in rows}, reverse=True)[:COHORTS_SHOWN]
    assert [c for c in dict.fromkeys(r["cohort_day"] for r in retention)] == [c.isoformat() for c in cohorts]
    newest = [r for r in retention if r["cohort_day"] == cohorts[0].isoformat()]
    assert [r["value"] for r in newest] == [*VERSIONS[:SERIES_SHOWN], OTHER]  # by installs over the cohorts
    oldest = cohorts[-1]
    folded = [r for r in rows if r["dimension"] == "app_version" and r["cohort_day"] == oldest
              and r["value"] in (*VERSIONS[SERIES_SHOWN:], OTHER)]
    other = next(r for r in retention if r["cohort_day"] == oldest.isoformat() and r["value"] == OTHER)
    assert other["cohort_size"] == sum(r["cohort_size"] for r in folded)
    for n in (1, 7, 30):
        users = sum(r[f"d{n}_users"] for r in folded)
        assert (other[f"d{n}_users"], other[f"d{n}"]) == (users, users / other["cohort_size"])
    own = next(r for r in rows if r["dimension"] == "app_version" and r["cohort_day"] == oldest
               and r["value"] == "1.0")
    shown = next(r for r in retention if r["cohort_day"] == oldest.isoformat() and r["value"] == "1.0")
    assert {k: shown[k] for k in ("cohort_size", "d1", "d7", "d30")} == {k: own[k] for k in ("cohort_size", "d1",
                                                                                              "d7", "d30")}
    assert all(r["d1"] is None and r["d30"] is None for r in newest)  # not measurable yet
    assert all(r["d30"] is None for r in retention if r["cohort_day"] > (LAST_DAY - dt.timedelta(30)).isoformat())


def test_a_known_dimension_without_rows_is_empty_and_an_unknown_one_is_refused(segment_data, tmp_path) -> None:
    data, _ = segment_data
    assert answer(data, "country")["segments"]["retention"] == []  # the stage wrote no country cohorts
    empty = answer(tmp_path / "none", "platform")["segments"]  # no segment tables at all
    assert empty == {"dimension": "platform", "dimensions": [], "series": [], "days": [], "latest": None,
                     "retention": []}
    with pytest.raises(UnknownDimension) as refused:
        answer(data, "planet")
    assert refused.value.known == DIMENSIONS


def test_an_unknown_dimension_gets_a_400_naming_the_known_ones(server: ServeProcess) -> None:
    for bad in ("planet", "", "Platform", "platform'; drop table x; --", "\u00e9\u0000"):
        reply = httpx.get(server.url + "/v1/dashboard", params={"dimension": bad})
        assert reply.status_code == 400, bad
        body = reply.json()
        assert body["dimensions"] == DIMENSIONS
        assert "unknown dimension" in body["error"] and "platform, app_version, country" in body["error"]
        assert "Traceback" not in reply.text
    for known in ("level_band", "store"):
        assert httpx.get(server.url + "/v1/dashboard", params={"dimension": known}).status_code == 200
    spec = httpx.get(server.url + "/openapi.json").json()["paths"]["/v1/dashboard"]["get"]
    parameter = next(p for p in spec["parameters"] if p["name"] == "dimension")
    assert parameter["schema"]["enum"] == CONFIGURED
    assert "400" in spec["responses"]


# ------------------------------------------------------------------------------------------------ the page
def selector(page) -> tuple[list[str], str]:
    return (page.eval_on_selector_all("[data-testid=dimension] option", "os => os.map(o => o.textContent)"),
            page.eval_on_selector("[data-testid=dimension]", "s => s.value"))


def segment_plot(page) -> dict:
    return page.evaluate("""() => { const u = window.gamestream.plots.segments;
        return {labels: u.series.slice(1).map(s => s.label),
                days: Array.from(u.data[0]).map(x => new Date(x * 1000).toISOString().slice(0, 10)),
                values: u.data.slice(1).map(ys => Array.from(ys))}; }""")


def shown_dau(plot: dict) -> dict[str, dict[str, int]]:
    return {label: {day: v for day, v in zip(plot["days"], ys) if v is not None}
            for label, ys in zip(plot["labels"], plot["values"])}


def latest_rows(page) -> dict[str, dict[str, str]]:
    return page.eval_on_selector_all(
        "[data-testid=segment-latest] tr[data-value]",
        """rows => Object.fromEntries(rows.map(r => [r.dataset.value, Object.fromEntries(
             Array.from(r.querySelectorAll('[data-field]')).map(td => [td.dataset.field, td.textContent]))]))""")


def split_cohorts(page) -> list[tuple[str, str, str, str]]:
    """(cohort, value, new devices, D1) per row of the split retention table."""
    return [tuple(row) for row in page.eval_on_selector_all(
        "[data-testid=segment-cohorts] tr[data-value]",
        "rows => rows.map(r => [r.dataset.cohort, r.dataset.value, "
        "r.querySelector('[data-field=cohort_size]').textContent, r.querySelector('[data-field=d1]').textContent])")]


def wait_for_polls(page, more: int) -> None:
    polls = page.evaluate("window.gamestream.polls")
    page.wait_for_function(f"() => window.gamestream.polls >= {polls + more}", timeout=10_000)


@pytest.mark.slow
def test_choosing_a_dimension_splits_the_chart_the_latest_day_and_retention(server, segment_data) -> None:
    _, written = segment_data
    daily, cohorts = written["kpi_daily_segments"], written["kpi_retention_segments"]
    ARTIFACTS.mkdir(exist_ok=True)
    with chromium() as browser:
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(server.url + "/")
        page.wait_for_function("() => window.gamestream.polls >= 1", timeout=30_000)
        assert selector(page) == (["Total", *DIMENSIONS], "")
        assert page.is_hidden("[data-testid=segment-chart-card]") and page.is_visible("[data-testid=cohorts]")

        page.select_option("[data-testid=dimension]", "platform")
        page.wait_for_function("() => window.gamestream.plots.segments", timeout=10_000)
        assert page.url.endswith("/?dimension=platform")
        plot = segment_plot(page)
        assert plot["labels"] == ["android", "ios", NOT_SET]
        assert shown_dau(plot) == expected_dau(daily, "platform")
        latest = latest_rows(page)
        stored = {r["value"]: r for r in daily if r["dimension"] == "platform" and r["eventDate"] == LAST_DAY}
        assert list(latest) == ["android", "ios", NOT_SET]
        for value, row in stored.items():
            assert latest[value]["dau"] == f"{row['dau']:,}" and latest[value]["events"] == f"{row['events']:,}"
            assert latest[value]["bookings"] == f"{row['bookings']:,.2f}"
            assert latest[value]["conversion"] == f"{row['conversion']:.1%}"
        assert LAST_DAY.isoformat() in page.inner_text("[data-testid=segment-latest-day]")
        assert page.is_hidden("[data-testid=cohorts]")
        split = split_cohorts(page)
        newest_cohorts = sorted({r["cohort_day"] for r in cohorts}, reverse=True)[:COHORTS_SHOWN]
        expected = [(r["cohort_day"].isoformat(), r["value"], f"{r['cohort_size']:,}",
                     "—" if r["d1"] is None else f"{r['d1']:.1%}")
                    for day in newest_cohorts
                    for r in sorted((r for r in cohorts if r["dimension"] == "platform" and r["cohort_day"] == day),
                                    key=lambda r: ["android", "ios", NOT_SET].index(r["value"]))]
        assert split == expected
        page.screenshot(path=str(ARTIFACTS / "dashboard-segments.png"), full_page=True)

        # the choice survives the refresh every second, and a reload (it is in the address)
        wait_for_polls(page, 3)
        assert selector(page)[1] == "platform" and segment_plot(page)["labels"] == ["android", "ios", NOT_SET]
        page.reload()
        page.wait_for_function("() => window.gamestream.plots.segments", timeout=30_000)
        assert selector(page)[1] == "platform" and shown_dau(segment_plot(page)) == expected_dau(daily, "platform")

        # eleven versions: the eight with the most DAU, the rest summed as (other), drawn dashed and grey
        page.select_option("[data-testid=dimension]", "app_version")
        page.wait_for_function("() => window.gamestream.plots.segments && "
                               "window.gamestream.plots.segments.series.length == 10", timeout=10_000)
        assert page.url.endswith("/?dimension=app_version")
        plot = segment_plot(page)
        assert plot["labels"] == [*VERSIONS[:SERIES_SHOWN], OTHER]
        assert shown_dau(plot) == expected_dau(daily, "app_version")
        assert list(latest_rows(page))[-1] == OTHER and len(latest_rows(page)) == len(VERSIONS) + 1
        wait_for_polls(page, 2)
        assert segment_plot(page)["labels"] == [*VERSIONS[:SERIES_SHOWN], OTHER]

        # back to the totals
        page.select_option("[data-testid=dimension]", "")
        page.wait_for_function("() => !window.gamestream.plots.segments", timeout=10_000)
        assert page.url == server.url + "/"
        assert page.is_hidden("[data-testid=segment-chart-card]") and page.is_visible("[data-testid=cohorts]")
        wait_for_polls(page, 2)
        assert selector(page)[1] == "" and page.is_hidden("[data-testid=segment-latest-card]")
        assert not errors

        page.set_viewport_size({"width": 390, "height": 844})  # a phone: the split fits too
        page.select_option("[data-testid=dimension]", "app_version")
        page.wait_for_function("() => window.gamestream.plots.segments", timeout=10_000)
        page.wait_for_timeout(300)
        assert page.evaluate("document.documentElement.scrollWidth") <= 390


@pytest.mark.slow
def test_an_unknown_dimension_in_the_address_falls_back_to_the_totals(server) -> None:
    with chromium() as browser:
        page = browser.new_page()
        page.goto(server.url + "/?dimension=planet")
        page.wait_for_function("() => window.gamestream.polls >= 2", timeout=30_000)
        assert page.locator("#pulse.ok").count() == 1
        assert selector(page)[1] == "" and page.url == server.url + "/"
        status = page.inner_text("[data-testid=dimension-status]")
        assert "planet" in status and ", ".join(DIMENSIONS) in status


@pytest.mark.slow
def test_without_the_segment_tables_the_split_says_no_data_yet(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_kpi_tables(data / "tables")  # totals, but no segment tables (a data directory from before issue 27)
    served = ServeProcess(data)
    try:
        with chromium() as browser:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(server_url := served.url + "/?dimension=platform")
            page.wait_for_function("() => window.gamestream.polls >= 2", timeout=30_000)
            assert not errors and page.locator("#pulse.ok").count() == 1
            assert page.url == server_url  # a known dimension, just not written yet
            assert selector(page) == (["Total", "platform"], "platform")
            assert page.inner_text("[data-testid=segment-chart]") == "no data yet"
            assert page.inner_text("[data-testid=segment-latest]") == "no data yet"
            assert page.inner_text("[data-testid=segment-latest-day]") == "no data yet"
            assert page.inner_text("[data-testid=segment-cohorts]") == "no data yet"
            page.select_option("[data-testid=dimension]", "")
            wait_for_polls(page, 1)
            assert page.inner_text("[data-testid=cohorts]") != "no data yet"  # the totals are there
    finally:
        served.stop()


# ------------------------------------------------------------------------------------------ end to end
PLATFORMS = {"android": 12, "ios": 7}  # devices per platform, and two devices that send none


@pytest.mark.slow
def test_events_with_platforms_through_the_pipeline_split_the_page(tmp_path: Path) -> None:
    """Events posted to the collector with their platforms, processed by `gamestream process`: the page's split
    by platform shows each platform's devices as the KPI stage counted them. Skipped while the KPI stage does not
    write kpi_daily_segments."""
    data = tmp_path / "data"
    served = ServeProcess(data)
    try:
        devices = [(f"{platform}-{i}", platform) for platform, n in PLATFORMS.items() for i in range(n)]
        devices += [(f"quiet-{i}", None) for i in range(2)]
        events = []
        for device, platform in devices:
            params = {"device_id": device, **({"platform": platform} if platform else {})}
            events += [{"eventName": name, "eventParams": params} for name in ("sessionStart", "levelStart")]
        reply = httpx.post(served.url + "/v1/events", content="\n".join(json.dumps(e) for e in events),
                           headers={"Content-Type": "application/x-ndjson"})
        assert reply.json()["accepted"] == len(events)
        gamestream("process", "--until-idle", data_dir=data)
        table = data / "tables" / "kpi_daily_segments"
        if not (table / "_delta_log").exists():
            pytest.skip("the KPI stage does not write kpi_daily_segments yet (issue 27)")
        today = dt.datetime.now(UTC).date()
        stored = {r["value"]: r for r in table_rows(table)
                  if r["dimension"] == "platform" and r["eventDate"] == today}
        assert {value: r["dau"] for value, r in stored.items()} == {**PLATFORMS, NOT_SET: 2}

        with chromium() as browser:
            page = browser.new_page()
            page.goto(served.url + "/?dimension=platform")
            page.wait_for_function("() => window.gamestream.plots.segments", timeout=30_000)
            plot = segment_plot(page)
            assert plot["labels"] == ["android", "ios", NOT_SET]
            assert {label: dau[today.isoformat()] for label, dau in shown_dau(plot).items()} == {
                **PLATFORMS, NOT_SET: 2}
            latest = latest_rows(page)
            assert {value: int(row["dau"]) for value, row in latest.items()} == {**PLATFORMS, NOT_SET: 2}
            assert {value: int(row["events"]) for value, row in latest.items()} == {
                value: r["events"] for value, r in stored.items()}
            cohorts = {r["value"]: r["cohort_size"] for r in table_rows(data / "tables" / "kpi_retention_segments")
                       if r["dimension"] == "platform" and r["cohort_day"] == today}
            assert cohorts == {**PLATFORMS, NOT_SET: 2}  # every device installed today, under its first platform
            assert split_cohorts(page) == [(today.isoformat(), value, str(n), "—")  # no day 1 yet
                                           for value, n in (*PLATFORMS.items(), (NOT_SET, 2))]
    finally:
        served.stop()

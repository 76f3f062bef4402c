"""Spark SQL over the Delta tables: the seed's queries as written, read-only, UTC, partition pruning."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from pathlib import Path

import httpx
import pytest

from collector_server import ServeProcess
from conftest import gamestream, write_ndjson
from gamestream.api.query import SqlEngine
from gamestream.settings import Settings

SEED_DAU = ("select count (distinct eventParams.device_id) as DAU from mobile_events_delta_raw "
            "where to_date(eventTime) = current_date;")
UTC = dt.timezone.utc


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """Events of yesterday, today and tomorrow (UTC), around midnight so a local time zone would move them."""
    tmp = tmp_path_factory.mktemp("sql")
    today = dt.datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    events = []
    for i in range(600):
        moment = today + dt.timedelta(hours=-30 + i * 0.1)  # yesterday 18:00 … tomorrow 04:00 (UTC)
        name = "purchaseEvent" if i % 7 == 0 else "levelStart"
        params = {"device_id": f"device-{i % 97}", "amount": 1.99} if name == "purchaseEvent" else {
            "device_id": f"device-{i % 97}"}
        events.append({"eventId": f"e{i}", "eventName": name, "eventTime": moment.isoformat(),
                       "eventParams": params})
    write_ndjson(tmp / "events.ndjson", events)
    gamestream("load", str(tmp / "events.ndjson"), data_dir=tmp / "data")
    gamestream("process", "--until-idle", data_dir=tmp / "data")
    return tmp / "data", events


def sql_json(data_dir: Path, query: str, env: dict | None = None) -> list[dict]:
    return json.loads(gamestream("sql", query, "--format", "json", data_dir=data_dir, env=env).stdout)


@pytest.mark.parametrize("zone", ["UTC", "Pacific/Kiritimati", "America/Los_Angeles"])
def test_the_seeds_dau_query_as_written_counts_todays_devices_in_utc(data, zone: str) -> None:
    data_dir, events = data
    today = dt.datetime.now(UTC).date()
    expected = len({e["eventParams"]["device_id"] for e in events
                    if dt.datetime.fromisoformat(e["eventTime"]).astimezone(UTC).date() == today})
    assert sql_json(data_dir, SEED_DAU, env={"TZ": zone}) == [{"DAU": expected}]


def test_the_seeds_windowed_counts_in_spark_sql_equal_the_kpi_tables(data) -> None:
    """`window(eventTime, '60 minute')`, the seed's groupBy, as Spark SQL: a (start, end) struct per tumbling
    window; the counts and bookings equal kpi_events_hourly and kpi_bookings_hourly, and the windows are aligned
    as Spark aligns them (whole hours; 90-minute windows from the epoch)."""
    data_dir, events = data
    counts = sql_json(data_dir, "select window(eventTime, '60 minute') as window, count(*) as events "
                                "from mobile_events_delta_raw group by window(eventTime, '60 minute')")
    bookings = sql_json(data_dir, "select window.start as start, sum(eventParams.amount) as bookings from "
                                  "(select window(eventTime, '60 minutes') as window, eventParams from events "
                                  "where eventName = 'purchaseEvent') group by window.start")
    hourly = sql_json(data_dir, "select window_start, window_end, events from kpi_events_hourly")
    assert {(r["window"]["start"], r["window"]["end"]): r["events"] for r in counts} == {
        (r["window_start"], r["window_end"]): r["events"] for r in hourly}
    want = sql_json(data_dir, "select window_start, bookings from kpi_bookings_hourly")
    assert {r["start"]: round(r["bookings"], 6) for r in bookings} == {
        r["window_start"]: round(r["bookings"], 6) for r in want}
    ninety = sql_json(data_dir, "select min(window(eventTime, '90 minutes').start) as first from events")
    first = min(dt.datetime.fromisoformat(e["eventTime"]).astimezone(UTC) for e in events)
    epoch_aligned = dt.datetime.fromtimestamp(first.timestamp() // 5400 * 5400, UTC)
    assert dt.datetime.fromisoformat(ninety[0]["first"]) == epoch_aligned
    refused = gamestream("sql", "select window(eventTime, '10 minutes', '5 minutes') from events",
                         data_dir=data_dir, check=False)
    assert refused.returncode == 2 and "sliding windows" in refused.stdout + refused.stderr


def test_to_date_of_event_time_reads_only_the_matching_partition(data) -> None:
    data_dir, _ = data
    plan = SqlEngine(Settings(data_dir=data_dir)).plan(SEED_DAU)
    assert '"eventDate" =' in plan  # the comparison reaches the scan: other days' files are skipped
    assert "eventTime" not in plan


def test_spark_functions_and_every_table_answer(data) -> None:
    data_dir, events = data
    rows = sql_json(data_dir, "select date_format(eventTime, 'yyyy-MM-dd') as day, count(*) as n "
                              "from events group by 1 order by 1")
    per_day: dict[str, int] = {}
    for e in events:
        day = dt.datetime.fromisoformat(e["eventTime"]).astimezone(UTC).date().isoformat()
        per_day[day] = per_day.get(day, 0) + 1
    assert rows == [{"day": d, "n": n} for d, n in sorted(per_day.items())]
    daily = sql_json(data_dir, "select eventDate, dau from kpi_daily order by eventDate")
    assert [r["eventDate"] for r in daily] == sorted(per_day)
    hourly = sql_json(data_dir, "select sum(events) as n from kpi_events_hourly")
    assert hourly == [{"n": len(events)}]
    bookings = sql_json(data_dir, "select sum(purchases) as p from kpi_bookings_hourly")
    assert bookings == [{"p": sum(1 for e in events if e["eventName"] == "purchaseEvent")}]
    assert sql_json(data_dir, "select count(*) as n from events_quarantine") == [{"n": 0}]


@pytest.mark.parametrize("statement", [
    "insert into events select * from events", "delete from events", "update events set eventName = 'x'",
    "drop table events", "create table x as select 1", "truncate table events",
    "merge into events t using events s on t.eventId = s.eventId when matched then delete",
])  # OPTIMIZE and VACUUM are maintenance, taken on purpose: tests/test_maintenance.py
def test_statements_that_would_write_are_refused(data, statement: str) -> None:
    result = gamestream("sql", statement, data_dir=data[0], check=False)
    assert result.returncode == 2
    assert "read-only" in result.stderr


def test_errors_point_at_the_position_in_the_query(data) -> None:
    result = gamestream("sql", "select eventName\nfrom events where", data_dir=data[0], check=False)
    assert result.returncode == 2
    assert "syntax error" in result.stderr
    unknown = gamestream("sql", "select nope from events", data_dir=data[0], check=False)
    assert "nope" in unknown.stderr and "^" in unknown.stderr


def test_output_formats(data) -> None:
    data_dir, _ = data
    query = "select eventName, count(*) as n from events group by 1 order by 1"
    table = gamestream("sql", query, data_dir=data_dir, env={"COLUMNS": "120"}).stdout
    assert "eventName" in table and "levelStart" in table and "rows" in table
    parsed = list(csv.DictReader(io.StringIO(gamestream("sql", query, "--format", "csv", data_dir=data_dir).stdout)))
    assert [row["eventName"] for row in parsed] == ["levelStart", "purchaseEvent"]
    assert sum(int(row["n"]) for row in parsed) == 600


def test_sql_over_http_needs_an_admin_key_when_keys_are_configured(data) -> None:
    data_dir, _ = data
    server = ServeProcess(data_dir, "--api-key", "writer", "--admin-key", "boss")
    try:
        url = server.url + "/v1/sql"
        query = {"query": "select count(*) as n from events"}
        assert httpx.post(url, json=query).status_code == 401
        assert httpx.post(url, json=query, headers={"Authorization": "Bearer writer"}).status_code == 401
        answer = httpx.post(url, json=query, headers={"X-API-Key": "boss"})
        assert answer.status_code == 200 and answer.json() == {"columns": ["n"], "rows": [[600]]}
        refused = httpx.post(url, json={"query": "delete from events"}, headers={"X-API-Key": "boss"})
        assert refused.status_code == 400 and "read-only" in refused.json()["error"]
    finally:
        server.stop()
    open_server = ServeProcess(data_dir)
    try:
        assert httpx.post(open_server.url + "/v1/sql", json={"query": "select 1 as one"}).json() == {
            "columns": ["one"], "rows": [[1]]}
    finally:
        open_server.stop()

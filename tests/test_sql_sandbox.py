"""The SQL surface reads the project's tables and nothing else (issue 11).

Hostile queries — file readers, paths as tables, DuckDB's catalog and settings, statements that write or attach,
second statements hidden behind `;` and comments, maintenance aimed at other directories — are each sent to a
real collector (`POST /v1/sql`) and to the real CLI (`gamestream sql`), and must be refused there (400, exit 2)
without a byte of a canary file's content in any answer. The queries that worked before still do; the time and
row caps stop what the sandbox lets through but should not run unbounded.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import uuid
from pathlib import Path

import httpx
import pyarrow as pa
import pytest

from collector_server import ServeProcess
from conftest import gamestream, write_ndjson
from gamestream.api.query import QueryError, SqlEngine, display_value, to_csv, to_json
from gamestream.settings import Settings

UTC = dt.timezone.utc
SECRET = f"canary-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory outside the data directory, holding files no query may show."""
    directory = tmp_path_factory.mktemp("outside")
    (directory / "canary.csv").write_text(f"secret,n\n{SECRET},1\n")
    (directory / "canary.json").write_text(json.dumps({"secret": SECRET}) + "\n")
    return directory


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory, outside: Path) -> tuple[Path, list[dict]]:
    """Today's events (a third of them purchases of 1.99, whose float sum is not exactly a number of cents),
    processed into the tables; and a symlink in the tables directory that points outside."""
    tmp = tmp_path_factory.mktemp("sandbox")
    now = dt.datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    events = []
    for i in range(300):
        purchase = i % 3 == 0
        params = {"device_id": f"device-{i % 41}", **({"amount": 1.99} if purchase else {})}
        events.append({"eventId": f"e{i}", "eventName": "purchaseEvent" if purchase else "levelStart",
                       "eventTime": (now - dt.timedelta(seconds=i)).isoformat(), "eventParams": params})
    write_ndjson(tmp / "events.ndjson", events)
    gamestream("load", str(tmp / "events.ndjson"), data_dir=tmp / "data")
    gamestream("process", "--until-idle", data_dir=tmp / "data")
    (tmp / "data" / "tables" / "elsewhere").symlink_to(outside, target_is_directory=True)
    return tmp / "data", events


@pytest.fixture(scope="module")
def server(lake) -> ServeProcess:
    serving = ServeProcess(lake[0])
    yield serving
    serving.stop()


def hostile_queries(data_dir: Path, outside: Path) -> list[tuple[str, str]]:
    """(query, a fragment the refusal must contain)."""
    canary, events = outside / "canary.csv", Settings(data_dir=data_dir).table_uri("events")
    escape = f"{events}/../../../{outside.name}"  # `..` out of the tables directory, to the canary's siblings
    return [
        (f"select * from read_csv('{canary}', header=false)", "read_csv"),
        (f"select * from read_csv_auto('{canary}')", "read_csv_auto"),
        (f"select * from read_text('{canary}')", "read_text"),
        (f"select * from read_blob('{canary}')", "read_blob"),
        (f"select * from read_parquet('{canary}')", "read_parquet"),
        (f"select * from read_json('{outside / 'canary.json'}')", "read_json"),
        (f"select * from parquet_scan('{canary}')", "parquet_scan"),
        (f"select * from sniff_csv('{canary}')", "sniff_csv"),
        (f"select * from glob('{outside}/*')", "syntax error"),
        ("select * from read_csv('/etc/passwd', header=false)", "read_csv"),
        (f"select * from '{canary}'", "is not a table"),
        (f'select * from "{canary}"', "is not a table"),
        (f"select * from `{canary}`", "is not a table"),
        ("select * from '/etc/passwd'", "is not a table"),
        (f"select * from csv.`{canary}`", "without a prefix"),
        (f"select * from json.`{outside / 'canary.json'}`", "without a prefix"),
        (f"select * from delta.`{outside}`", "without a prefix"),
        ("select * from main.events", "without a prefix"),
        ("select * from information_schema.tables", "without a prefix"),
        (f"select e.eventId from events e join read_text('{canary}') t on true", "read_text"),
        (f"select (select max(content) from read_text('{canary}')) as c", "read_text"),
        (f"with x as (select * from read_text('{canary}')) select * from x", "read_text"),
        (f"select * from events, lateral (select * from read_csv('{canary}'))", "read_csv"),
        ("select * from query('select 42')", "query"),
        ("select * from duckdb_settings()", "duckdb_settings"),
        ("select * from duckdb_extensions()", "duckdb_extensions"),
        ("select * from duckdb_databases()", "duckdb_databases"),
        ("select * from pragma_version()", "pragma_version"),
        ("select getenv('HOME') as home", "getenv"),
        ("select current_setting('home_directory') as home", "current_setting"),
        (f"attach '{outside}/x.db' as x", "syntax error"),
        ("detach memory", "DETACH"),
        (f"copy events to '{outside}/copy.csv'", "COPY"),
        (f"copy (select 1) to '{outside}/copy.csv'", "COPY"),
        ("install httpfs", "INSTALL"),
        ("load httpfs", "LOAD"),
        ("pragma version", "PRAGMA"),
        ("set enable_external_access = true", "SET"),
        ("reset lock_configuration", "RESET"),
        ("call duckdb_settings()", "CALL"),
        ("checkpoint", "CHECKPOINT"),
        (f"export database '{outside}/db'", "syntax error"),
        (f"import database '{outside}/db'", "syntax error"),
        ("create table x as select 1", "CREATE"),
        ("create view v as select * from events", "CREATE"),
        ("create secret s (type s3, key_id 'a', secret 'b')", "CREATE"),
        ("insert into events select * from events", "INSERT"),
        (f"insert overwrite directory '{outside}' select 1", "INSERT"),
        (f"load data inpath '{canary}' into table events", "LOAD"),
        ("select 1 into x", "INTO"),
        ("update events set eventName = 'x'", "UPDATE"),
        ("delete from events", "DELETE"),
        ("merge into events t using events s on t.eventId = s.eventId when matched then delete", "MERGE"),
        ("truncate table events", "TRUNCATE"),
        ("drop table events", "DROP"),
        ("alter table events add column x int", "ALTER"),
        ("create temp macro m(x) as x", "CREATE"),
        ("prepare p as select 1", "PREPARE"),
        ("begin transaction", "BEGIN"),
        (f"explain select * from read_text('{canary}')", "EXPLAIN"),
        (f"select 1; select * from read_text('{canary}')", "one statement"),
        (f"select 1; -- a comment\n attach '{outside}/x.db' as x", "syntax error"),
        (f"select 1 /* a comment */ ; attach '{outside}/x.db' as x", "syntax error"),
        (f"select 1 /* a */ ; /* b */ copy events to '{outside}/copy.csv'", "one statement"),
        ("/* a */ select 1 as one; /* b */ drop table events", "one statement"),
        (f"select 1 as one;\n/*\n*/ copy events to '{outside}/copy.csv'", "one statement"),
        (f"OPTIMIZE '{outside}'", "is not one of this data directory's tables"),
        (f"VACUUM '{outside}' RETAIN 0 HOURS", "is not one of this data directory's tables"),
        ("OPTIMIZE '/var/lib/other'", "is not one of this data directory's tables"),
        ("VACUUM '/elsewhere' RETAIN 0 HOURS", "is not one of this data directory's tables"),
        (f"OPTIMIZE '{escape}'", "is not one of this data directory's tables"),
        (f"VACUUM '{events}/..' RETAIN 0 HOURS DRY RUN", "is not one of this data directory's tables"),
        (f"VACUUM '{data_dir}/tables/elsewhere' RETAIN 0 HOURS DRY RUN", "is not one of this data directory's"),
        (f"OPTIMIZE 'file://{outside}'", "is not one of this data directory's tables"),
        ("OPTIMIZE 's3://bucket/events'", "is not one of this data directory's tables"),
    ]


def assert_nothing_leaked(*answers: str) -> None:
    for answer in answers:
        assert SECRET not in answer
        assert "root:" not in answer  # the first line of /etc/passwd


def test_the_hostile_corpus_is_large(lake, outside) -> None:
    assert len(hostile_queries(lake[0], outside)) >= 30


@pytest.mark.parametrize("index", range(len(hostile_queries(Path("data"), Path("outside")))))
def test_a_hostile_query_is_refused_over_http_and_in_the_cli_and_shows_no_file(lake, outside, server,
                                                                                 index: int) -> None:
    data_dir, _ = lake
    query, reason = hostile_queries(data_dir, outside)[index]
    answer = httpx.post(server.url + "/v1/sql", json={"query": query}, timeout=60)
    assert answer.status_code == 400, answer.text
    assert reason in answer.json()["error"]
    result = gamestream("sql", query, "--format", "json", data_dir=data_dir, check=False)
    assert result.returncode == 2, result.stdout
    assert reason in " ".join(result.stderr.split())  # the console wraps long lines
    assert_nothing_leaked(answer.text, result.stdout, result.stderr)
    assert not (outside / "copy.csv").exists() and not (outside / "x.db").exists() and not (outside / "db").exists()


def test_a_refusal_names_the_path_and_what_is_allowed(lake) -> None:
    data_dir, _ = lake
    settings = Settings(data_dir=data_dir)
    with pytest.raises(QueryError) as refused:
        SqlEngine(settings).run("VACUUM '/elsewhere' RETAIN 0 HOURS")
    message = str(refused.value)
    assert "'/elsewhere'" in message
    assert all(f"{name} ({settings.table_uri(name)})" in message for name in ("events", "kpi_daily"))


def test_a_second_statement_inside_a_comment_stays_a_comment(lake, outside) -> None:
    query = f"select 1 as one -- */ ; select * from read_text('{outside / 'canary.csv'}') /*"
    result = gamestream("sql", query, "--format", "json", data_dir=lake[0])
    assert json.loads(result.stdout) == [{"one": 1}]
    assert_nothing_leaked(result.stdout, result.stderr)


def test_the_seeds_dau_query_counts_todays_devices(lake, server) -> None:
    data_dir, events = lake
    today = dt.datetime.now(UTC).date()
    expected = len({e["eventParams"]["device_id"] for e in events
                    if dt.datetime.fromisoformat(e["eventTime"]).astimezone(UTC).date() == today})
    seed = ("select count (distinct eventParams.device_id) as DAU from mobile_events_delta_raw "
            "where to_date(eventTime) = current_date;")
    assert json.loads(gamestream("sql", seed, "--format", "json", data_dir=data_dir).stdout) == [{"DAU": expected}]
    assert httpx.post(server.url + "/v1/sql", json={"query": seed}).json() == {"columns": ["DAU"],
                                                                              "rows": [[expected]]}


@pytest.mark.parametrize("query", [
    "select window_start, events, final from kpi_events_hourly order by window_start desc limit 5",
    "select * from kpi_daily order by eventDate",
    "select eventDate, dau, bookings, arpdau from kpi_daily",
    "with d as (select eventDate, count(distinct eventParams.device_id) as dau from events group by 1) "
    "select d.dau, k.dau as kpi_dau from d join kpi_daily k on d.eventDate = k.eventDate",
    "select eventName, n from (select eventName, count(*) as n from events group by 1) t where n > 0",
    "select eventName from events where eventId = 'e0' union select eventName from events where eventId = 'e1'",
    "select eventId, row_number() over (partition by eventName order by eventTime) as rn from events limit 3",
    "select x from (select explode(array(1, 2, 3)) as x)",
    "select count(*) as n from range(10)",
    "select e.eventId from events e where e.eventId in (select eventId from mobile_events_delta_raw) limit 1",
])
def test_queries_over_our_tables_still_run(lake, query: str) -> None:
    assert SqlEngine(Settings(data_dir=lake[0])).run(query).num_rows > 0


def test_the_kpi_tables_agree_with_an_independent_count(lake) -> None:
    data_dir, events = lake
    engine = SqlEngine(Settings(data_dir=data_dir))
    purchases = [e for e in events if e["eventName"] == "purchaseEvent"]
    hourly = engine.run("select sum(purchases) as p, sum(bookings) as b from kpi_bookings_hourly").to_pylist()
    assert hourly[0]["p"] == len(purchases)
    assert hourly[0]["b"] == pytest.approx(sum(e["eventParams"]["amount"] for e in purchases))
    assert engine.run("select sum(events) as n from kpi_events_hourly").to_pylist() == [{"n": len(events)}]


def test_scanning_our_tables_works_with_duckdb_locked_down(lake) -> None:
    """The datasets are read by pyarrow, registered before DuckDB loses its file system; the lock holds."""
    engine = SqlEngine(Settings(data_dir=lake[0]))
    assert engine.run("select count(*) as n from events").to_pylist() == [{"n": 300}]
    assert '"eventDate" =' in engine.plan("select count(*) from events where to_date(eventTime) = current_date")


def test_a_query_running_past_the_time_cap_is_stopped_with_the_reason(lake) -> None:
    engine = SqlEngine(Settings(data_dir=lake[0], sql_timeout_s=0.5))
    with pytest.raises(QueryError, match=r"stopped after 0.5 s \(sql_timeout_s\)"):
        engine.run("select count(*) as n from events a, events b, events c, events d, events e")


def test_the_time_cap_answers_400_over_http(lake) -> None:
    serving = ServeProcess(lake[0], env={"GAMESTREAM_SQL_TIMEOUT_S": "0.5"})
    try:
        answer = httpx.post(serving.url + "/v1/sql", timeout=60, json={
            "query": "select count(*) as n from events a, events b, events c, events d, events e"})
        assert answer.status_code == 400 and "sql_timeout_s" in answer.json()["error"]
        assert httpx.post(serving.url + "/v1/sql", json={"query": "select 1 as one"}).status_code == 200
    finally:
        serving.stop()


def test_a_result_over_the_row_cap_is_refused_and_a_limit_under_it_runs(lake) -> None:
    engine = SqlEngine(Settings(data_dir=lake[0], sql_max_rows=50))
    with pytest.raises(QueryError, match="more than 50 rows .*aggregate or add a LIMIT"):
        engine.run("select eventId from events")
    with pytest.raises(QueryError, match="more than 50 rows"):
        engine.run("select eventId from events limit 1000")
    assert engine.run("select eventId from events limit 50").num_rows == 50
    assert engine.run("select eventName, count(*) as n from events group by 1").num_rows == 2


def test_the_row_cap_answers_400_over_http_and_exit_2_in_the_cli(lake) -> None:
    data_dir, _ = lake
    env = {"GAMESTREAM_SQL_MAX_ROWS": "10"}
    result = gamestream("sql", "select eventId from events", data_dir=data_dir, env=env, check=False)
    assert result.returncode == 2 and "aggregate or add a LIMIT" in result.stderr
    serving = ServeProcess(data_dir, env=env)
    try:
        answer = httpx.post(serving.url + "/v1/sql", json={"query": "select eventId from events"}, timeout=60)
        assert answer.status_code == 400 and "sql_max_rows" in answer.json()["error"]
        limited = httpx.post(serving.url + "/v1/sql", json={"query": "select eventId from events limit 10"},
                             timeout=60)
        assert limited.status_code == 200 and len(limited.json()["rows"]) == 10
    finally:
        serving.stop()


def test_optimize_and_vacuum_take_our_tables_by_name_path_and_url(lake, tmp_path, monkeypatch) -> None:
    data_dir, _ = lake
    settings = Settings(data_dir=data_dir)
    events = settings.table_uri("events")
    engine = SqlEngine(settings)
    for target in ("events", "mobile_events_delta_raw", f"'{events}'", f"'{events}/'", f"'file://{events}'",
                   f"'{data_dir.absolute()}/tables/kpi_daily/'"):
        assert engine.run(f"OPTIMIZE {target}").num_rows == 1, target
        assert engine.run(f"VACUUM {target} RETAIN 168 HOURS DRY RUN").column_names == ["path"]
    monkeypatch.chdir(data_dir)
    optimized = engine.run("OPTIMIZE 'tables/events'").to_pylist()
    assert optimized[0]["path"] == events  # what ran is the table's own location
    (tmp_path / "to-events").symlink_to(events, target_is_directory=True)
    assert engine.run(f"OPTIMIZE '{tmp_path / 'to-events'}'").to_pylist()[0]["path"] == events


def test_a_table_location_may_be_a_url_and_other_urls_are_refused(lake) -> None:
    data_dir, _ = lake
    daily = Settings(data_dir=data_dir).table_uri("kpi_daily")
    engine = SqlEngine(Settings(data_dir=data_dir, tables={"kpi_daily": f"file://{daily}",
                                                          "kpi_events_hourly": "s3://analytics/kpi_events_hourly"}))
    assert engine.run(f"OPTIMIZE '{daily}'").to_pylist()[0]["path"] == f"file://{daily}"
    for other in ("s3://analytics/other", "s3://analytics/kpi_events_hourly/../other", "https://example.com/x"):
        with pytest.raises(QueryError, match="is not one of this data directory's tables"):
            engine.run(f"OPTIMIZE '{other}'")


def test_money_and_other_floats_show_without_binary_noise_in_csv(lake) -> None:
    data_dir, events = lake
    total = sum(e["eventParams"].get("amount", 0.0) for e in events)
    assert repr(total) != f"{total:.2f}"  # the float sum is not a whole number of cents…
    query = "select sum(eventParams.amount) as bookings, sum(eventParams.amount) as total from events"
    rows = list(csv.DictReader(io.StringIO(gamestream("sql", query, "--format", "csv", data_dir=data_dir).stdout)))
    assert rows == [{"bookings": f"{total:.2f}", "total": f"{total:.6f}".rstrip("0").rstrip(".")}]  # …shown so
    exact = json.loads(gamestream("sql", query, "--format", "json", data_dir=data_dir).stdout)
    assert exact[0]["bookings"] == pytest.approx(total, rel=1e-12)  # JSON stays exact


def test_display_value_rounds_floats_and_writes_everything_else_as_is() -> None:
    assert display_value(1436.2100000000005, pa.float64()) == "1436.21"
    assert display_value(1436.2100000000005, pa.float64(), "arpdau") == "1436.21"
    assert display_value(2.0, pa.float64(), "bookings") == "2.00"
    assert display_value(2.0, pa.float64()) == "2"
    assert display_value(1 / 3, pa.float64()) == "0.333333"
    assert display_value(1.5e-9, pa.float64()) == "1.5e-09"
    assert display_value(12, pa.int64()) == "12"
    assert display_value(None, pa.float64()) == ""
    assert display_value(dt.date(2026, 11, 30), pa.date32()) == "2026-11-30"
    assert display_value({"amount": 0.1}, pa.struct([("amount", pa.float64())])) == '{"amount": 0.1}'
    table = pa.table({"bookings": [1436.2100000000005], "n": [3]})
    assert to_csv(table) == "bookings,n\n1436.21,3\n"
    assert json.loads(to_json(table)) == [{"bookings": 1436.2100000000005, "n": 3}]

"""Custom parameters: unknown fields are kept (`eventParams_extra`, `event_extra`), and `[schema.params]` in the
configuration file promotes a parameter to a typed column, evolving the events table. Real parts only: the
`gamestream` command in child processes, a real collector on a loopback port, real Delta tables read back by
delta-rs, DuckDB, Polars and `gamestream sql`."""

from __future__ import annotations

import datetime as dt
import json
import threading
from pathlib import Path

import duckdb
import httpx
import polars
import pyarrow as pa
import pytest

from collector_server import ServeProcess
from conftest import gamestream, table_rows, write_ndjson
from gamestream.tables import lake
from gamestream.log import payload
from gamestream import schema
from gamestream.log import Append
from gamestream.log.sqlite import SqliteEventLog

# Values a game may send in parameters the schema does not know, as raw JSON text: numbers beyond a double's
# precision, trailing zeros, exponents, nesting, unicode (escaped and not), null.
EXTRA_PARAMS = ('"level":12345678901234567890123,"ratio":1.50,"tiny":1e-7,"inventory":{"sword":{"dmg":[1,2.5,'
                '{"x":null}]},"tags":["é","😀"]},"name":"\\u00e9l\\u00e8ve","nothing":null')
EXTRA_TOP = '"sdk":{"v":"2.0"},"ab_test":[true,false]'


def raw_event(event_id: str, params: str = "", top: str = "", time: str = "2026-11-30T10:00:00Z") -> str:
    extra = "," + params if params else ""
    more = "," + top if top else ""
    return (f'{{"eventId":"{event_id}","eventName":"levelEnd","eventTime":"{time}",'
            f'"eventParams":{{"device_id":"dev-{event_id}"{extra}}}{more}}}')


def by_id(rows: list[dict]) -> dict[str, dict]:
    return {row["eventId"]: row for row in rows}


def configure(data_dir: Path, text: str) -> Path:
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "gamestream.toml"
    path.write_text(text)
    return path


def assert_extras_exact(row: dict) -> None:
    """The extra columns hold the unknown keys with their values' text exactly as sent."""
    assert row["eventParams_extra"] == "{" + EXTRA_PARAMS + "}"
    assert json.loads(row["eventParams_extra"])["name"] == "élève"
    assert row["event_extra"] == "{" + EXTRA_TOP + "}"


# ------------------------------------------------------------------------------------------ unknown fields
def test_unknown_fields_survive_into_the_table_through_load(tmp_path: Path) -> None:
    data = tmp_path / "data"
    lines = [raw_event("kept", EXTRA_PARAMS, EXTRA_TOP)] + [raw_event(f"plain-{i}") for i in range(1500)]
    gamestream("load", str(write_ndjson(tmp_path / "in.ndjson", lines)), data_dir=data)
    gamestream("process", "--until-idle", data_dir=data)
    rows = by_id(table_rows(data / "tables" / "events"))
    assert len(rows) == 1501
    assert_extras_exact(rows["kept"])
    assert rows["plain-7"]["eventParams_extra"] is None and rows["plain-7"]["event_extra"] is None


def test_unknown_fields_survive_into_the_table_through_the_collector(tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = ServeProcess(data)
    try:
        body = (raw_event("kept", EXTRA_PARAMS, EXTRA_TOP) + "\n" + raw_event("plain")).encode()
        answer = httpx.post(server.url + "/v1/events", content=body,
                            headers={"Content-Type": "application/x-ndjson"})
        assert answer.status_code == 200 and answer.json()["accepted"] == 2
    finally:
        server.stop()
    gamestream("process", "--until-idle", data_dir=data)
    rows = by_id(table_rows(data / "tables" / "events"))
    assert_extras_exact(rows["kept"])
    assert rows["plain"]["eventParams_extra"] is None


def test_a_table_made_before_the_extra_columns_gains_them_and_old_rows_read_null(tmp_path: Path) -> None:
    data = tmp_path / "data"
    uri = str(data / "tables" / "events")
    old = pa.schema([f for f in schema.arrow_schema() if f.name not in (schema.PARAMS_EXTRA, schema.EVENT_EXTRA)])
    table = lake.open_or_create(uri, old, [schema.PARTITION_COLUMN], lake.EVENTS_TABLE_CONFIGURATION)
    moment = dt.datetime(2026, 11, 30, 9, tzinfo=dt.timezone.utc)
    old_row = pa.Table.from_pylist([{"eventId": "old", "eventName": "x", "eventParams": {"device_id": "d"},
                                     "eventTime": moment, "eventDate": moment.date()}], schema=old)
    from deltalake import write_deltalake

    write_deltalake(table, old_row, mode="append")
    gamestream("load", str(write_ndjson(tmp_path / "in.ndjson", [raw_event("new", '"x":1')])), data_dir=data)
    gamestream("process", "--until-idle", data_dir=data)
    rows = by_id(table_rows(uri))
    assert rows["old"]["eventParams_extra"] is None
    assert rows["new"]["eventParams_extra"] == '{"x":1}'
    assert lake.open_table(uri).metadata().configuration["delta.enableChangeDataFeed"] == "true"


# ------------------------------------------------------------------------------------------------ promotion
def test_promoting_a_parameter_evolves_the_table_and_duckdb_polars_and_sql_read_old_and_new_rows(
        tmp_path: Path) -> None:
    data = tmp_path / "data"
    uri = data / "tables" / "events"
    gamestream("load", str(write_ndjson(tmp_path / "old.ndjson", [raw_event("old", '"level":3')])), data_dir=data)
    gamestream("process", "--until-idle", data_dir=data)
    assert "level" not in lake.arrow_schema_of(lake.open_table(str(uri))).field("eventParams").type.names

    configure(data, '[schema.params]\nlevel = "int"\n')
    new = [raw_event("new", '"level":9007199254740993'), raw_event("none")]
    gamestream("load", str(write_ndjson(tmp_path / "new.ndjson", new)), data_dir=data)
    gamestream("process", "--until-idle", data_dir=data)

    table = lake.open_table(str(uri))
    level = lake.arrow_schema_of(table).field("eventParams").type.field("level")
    assert level.type == pa.int64() and level.nullable
    rows = by_id(table_rows(uri))
    assert rows["old"]["eventParams"]["level"] is None
    assert rows["old"]["eventParams_extra"] == '{"level":3}'  # stored before the promotion: kept where it was
    assert rows["new"]["eventParams"]["level"] == 9007199254740993
    assert rows["new"]["eventParams_extra"] is None  # promoted: typed, not also kept as extra

    dataset = table.to_pyarrow_dataset()  # noqa: F841 - DuckDB reads it by name
    in_duckdb = dict(duckdb.sql("SELECT eventId, eventParams.level FROM dataset").fetchall())
    assert in_duckdb == {"old": None, "new": 9007199254740993, "none": None}
    in_polars = polars.read_delta(str(uri)).select(
        polars.col("eventId"), polars.col("eventParams").struct.field("level"))
    assert dict(in_polars.iter_rows()) == in_duckdb
    answer = gamestream("sql", "select eventId, eventParams.level as level from events order by eventId",
                        "--format", "json", data_dir=data)
    assert {r["eventId"]: r["level"] for r in json.loads(answer.stdout)} == in_duckdb


def test_a_removed_parameter_keeps_its_column_and_new_values_go_to_the_extra_column(tmp_path: Path) -> None:
    data = tmp_path / "data"
    configure(data, '[schema.params]\nlevel = "int"\n')
    gamestream("load", str(write_ndjson(tmp_path / "a.ndjson", [raw_event("typed", '"level":1')])), data_dir=data)
    gamestream("process", "--until-idle", data_dir=data)
    configure(data, "")
    gamestream("load", str(write_ndjson(tmp_path / "b.ndjson", [raw_event("after", '"level":2')])), data_dir=data)
    gamestream("process", "--until-idle", data_dir=data)
    rows = by_id(table_rows(data / "tables" / "events"))
    assert rows["typed"]["eventParams"]["level"] == 1
    assert rows["after"]["eventParams"]["level"] is None and rows["after"]["eventParams_extra"] == '{"level":2}'


def test_processes_evolving_the_table_at_once_agree_on_one_schema(tmp_path: Path) -> None:
    uri = str(tmp_path / "events")
    lake.open_events(uri)
    params = (("level", "int"), ("vip", "bool"))
    errors: list[BaseException] = []

    def open_it() -> None:
        try:
            lake.open_events(uri, params)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    openers = [threading.Thread(target=open_it) for _ in range(4)]
    for opener in openers:
        opener.start()
    for opener in openers:
        opener.join()
    assert not errors
    assert lake.arrow_schema_of(lake.open_table(uri)) == schema.arrow_schema(params=params)


def test_a_promoted_type_that_differs_from_the_tables_is_refused(tmp_path: Path) -> None:
    uri = str(tmp_path / "events")
    lake.open_events(uri, (("level", "int"),))
    with pytest.raises(lake.SchemaConflict, match="eventParams.level is int64 in the table but configured as "
                                                  "string"):
        lake.open_events(uri, (("level", "string"),))


# ----------------------------------------------------------------------------------------- type mismatches
def test_a_mismatching_promoted_parameter_is_rejected_over_http_with_its_reason(tmp_path: Path) -> None:
    config = configure(tmp_path / "conf", '[schema.params]\nlevel = "int"\n')
    server = ServeProcess(tmp_path / "data", env={"GAMESTREAM_CONFIG": str(config)})
    try:
        url = server.url + "/v1/events"
        ok, bad = json.loads(raw_event("ok", '"level":4')), json.loads(raw_event("bad", '"level":"4"'))
        partial = httpx.post(url, json=[ok, bad])
        assert partial.status_code == 200
        assert partial.json() == {"accepted": 1, "rejected": 1, "errors": [
            {"index": 1, "error": "eventParams.level: expected int | null, got str"}]}
        refused = httpx.post(url, json=[bad])
        assert refused.status_code == 400 and refused.json()["errors"][0]["error"].startswith("eventParams.level")
        spec = httpx.get(server.url + "/openapi.json").json()
        level = spec["components"]["schemas"]["EventParams"]["properties"]["level"]
        assert level["anyOf"][0] == {"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1}
        assert spec["components"]["schemas"]["EventParams"]["additionalProperties"] is True
    finally:
        server.stop()
    gamestream("process", "--until-idle", data_dir=tmp_path / "data", env={"GAMESTREAM_CONFIG": str(config)})
    rows = by_id(table_rows(tmp_path / "data" / "tables" / "events"))
    assert list(rows) == ["ok"] and rows["ok"]["eventParams"]["level"] == 4


def test_a_mismatching_promoted_parameter_is_rejected_by_load_and_quarantined_from_the_log(tmp_path: Path) -> None:
    data = tmp_path / "data"
    config = configure(tmp_path / "conf", '[schema.params]\nlevel = "int"\n')
    lines = [raw_event("ok", '"level":4'), raw_event("bad", '"level":4.5')]
    loaded = gamestream("--config", str(config), "load", str(write_ndjson(tmp_path / "in.ndjson", lines)),
                        data_dir=data)
    assert "1 accepted" in loaded.stdout
    assert "line 2: eventParams.level: expected int | null, got float" in loaded.stdout
    # a producer writing to the log directly (not through gamestream's validation)
    log = SqliteEventLog(data / "log", partitions=4)
    try:
        log.append([Append(0, raw_event("foreign", '"level":"high"').encode(), 1)])
    finally:
        log.close()
    gamestream("--config", str(config), "process", "--until-idle", data_dir=data)
    assert set(by_id(table_rows(data / "tables" / "events"))) == {"ok"}
    quarantined = table_rows(data / "tables" / "events_quarantine")
    assert [q["reason"] for q in quarantined] == ["eventParams.level: expected int | null, got str"]
    assert json.loads(quarantined[0]["payload"])["eventId"] == "foreign"


# ---------------------------------------------------------------------------------------------- configuration
@pytest.mark.parametrize(("text", "message"), [
    ('[schema.params]\ndevice_id = "int"\n', "eventParams.device_id is already a field of eventParams"),
    ('[schema.params]\nlevel = "integer"\n', "the type must be one of string, int, int32, double, bool, timestamp"),
    ('[schema.param]\nlevel = "int"\n', "unknown section or key schema.param"),
    ("[schema.params\n", "is not valid TOML"),
])
def test_a_clashing_or_invalid_configuration_stops_a_command_with_the_reason(tmp_path: Path, text: str,
                                                                             message: str) -> None:
    data = tmp_path / "data"
    configure(data, text)
    for command in (["load", str(write_ndjson(tmp_path / "in.ndjson", [raw_event("x")]))],
                    ["process", "--until-idle"]):
        failed = gamestream(*command, data_dir=data, check=False)
        assert failed.returncode != 0
        assert message in failed.stderr and "Traceback" not in failed.stderr


def test_a_missing_config_file_named_by_the_option_is_an_error(tmp_path: Path) -> None:
    failed = gamestream("--config", str(tmp_path / "nowhere.toml"), "schema", data_dir=tmp_path, check=False)
    assert failed.returncode != 0 and "cannot read the configuration file" in failed.stderr


def test_the_schema_command_follows_the_configuration(tmp_path: Path) -> None:
    configure(tmp_path, '[schema.params]\nlevel = "int"\nvip = "bool"\n')
    markdown = gamestream("schema", "--markdown", data_dir=tmp_path).stdout
    assert "| `eventParams.level` | bigint | no |" in markdown and "| `eventParams.vip` | boolean | no |" in markdown
    spark = gamestream("schema", "--spark", data_dir=tmp_path).stdout
    assert "amount: DOUBLE, level: BIGINT, vip: BOOLEAN>" in spark


# ------------------------------------------------------------------- processes configured differently (#16)
# The collector or `load` promotes parameters; the processor may read another configuration (none, one the
# parameter was removed from, one promoting something else). Whatever it reads, a promoted value lands in the
# table's typed column when the table has one, else in eventParams_extra — never lost. Each case goes through
# both kinds of log record: Arrow (a clean `load` chunk) and NDJSON (a chunk holding one bad line, and the
# collector's small batches).
PROMOTED = '[schema.params]\nlevel = "int"\nfirst_seen = "timestamp"\nratio = "double"\n'
PROMOTED_PARAMS = (("level", "int"), ("first_seen", "timestamp"), ("ratio", "double"))
TYPED = '"level":9007199254740993,"first_seen":"2026-11-30T09:30:00.000001+01:00","ratio":0.1'
UNKNOWN = '"x":[1,2.50]'  # sent beside them through the NDJSON paths (an unknown key keeps a chunk off Arrow)
TYPED_VALUES = {"level": 9007199254740993, "ratio": 0.1,
                "first_seen": dt.datetime(2026, 11, 30, 8, 30, 0, 1, tzinfo=dt.timezone.utc)}
# the same values kept as JSON where the table has no column for them, as the canonical line holds them (UTC
# timestamps with a Z), after any unknown key the collector or `load` already kept
TYPED_AS_EXTRA = '"level":9007199254740993,"first_seen":"2026-11-30T08:30:00.000001Z","ratio":0.1'
VIA = ("arrow", "ndjson", "http")
KEPT_BY_THE_SENDER = {"arrow": None, "ndjson": "{" + UNKNOWN + "}", "http": "{" + UNKNOWN + "}"}


def send_promoted(tmp_path: Path, data: Path, config: Path) -> None:
    """Events carrying the promoted parameters into the log under `config`, as Arrow records (a clean file),
    NDJSON records (a file with a bad line) and through the collector."""
    clean = [raw_event("arrow", TYPED)] + [raw_event(f"arrow-{i}") for i in range(3)]
    with_a_bad_line = [raw_event("ndjson", TYPED + "," + UNKNOWN), '{"eventName":"no-params"}']
    for name, lines in (("clean", clean), ("bad", with_a_bad_line)):
        gamestream("--config", str(config), "load", str(write_ndjson(tmp_path / f"{name}.ndjson", lines)),
                   data_dir=data)
    server = ServeProcess(data, env={"GAMESTREAM_CONFIG": str(config)})
    try:
        answer = httpx.post(server.url + "/v1/events", content=raw_event("http", TYPED + "," + UNKNOWN).encode(),
                            headers={"Content-Type": "application/x-ndjson"})
        assert answer.status_code == 200 and answer.json()["accepted"] == 1
    finally:
        server.stop()
    log = SqliteEventLog(data / "log", partitions=None)
    try:
        kinds = {payload.is_arrow(r.payload) for p in range(log.partitions) for r in log.read(p, -1, 1000)}
    finally:
        log.close()
    assert kinds == {True, False}  # both kinds of record are in the log


def test_a_processor_without_the_configuration_fills_the_typed_columns_the_table_has(tmp_path: Path) -> None:
    data = tmp_path / "data"
    uri = str(data / "tables" / "events")
    lake.open_events(uri, PROMOTED_PARAMS)  # evolved by a processor that reads the configuration
    send_promoted(tmp_path, data, configure(tmp_path / "conf", PROMOTED))
    gamestream("process", "--until-idle", data_dir=data)  # no configuration file
    rows = by_id(table_rows(uri))
    for via in VIA:
        assert {k: rows[via]["eventParams"][k] for k in TYPED_VALUES} == TYPED_VALUES, via
        assert rows[via]["eventParams_extra"] == KEPT_BY_THE_SENDER[via], via
    assert len(rows) == 6 and rows["arrow-1"]["eventParams"]["level"] is None


def test_a_value_the_table_has_no_column_for_is_kept_in_eventparams_extra(tmp_path: Path) -> None:
    data = tmp_path / "data"
    send_promoted(tmp_path, data, configure(tmp_path / "conf", PROMOTED))
    gamestream("process", "--until-idle", data_dir=data)  # no configuration file: the table has no such column
    uri = data / "tables" / "events"
    assert not set(TYPED_VALUES) & set(lake.arrow_schema_of(lake.open_table(str(uri))).field("eventParams").type.names)
    rows = by_id(table_rows(uri))
    for via in VIA:
        kept = KEPT_BY_THE_SENDER[via]  # the same text whatever the record kind
        assert rows[via]["eventParams_extra"] == (kept[:-1] + "," if kept else "{") + TYPED_AS_EXTRA + "}", via
    assert rows["arrow-1"]["eventParams_extra"] is None and len(rows) == 6


def test_a_parameter_removed_from_the_configuration_lands_in_the_column_the_table_kept(tmp_path: Path) -> None:
    data = tmp_path / "data"
    uri = str(data / "tables" / "events")
    config = configure(data, PROMOTED)
    lake.open_events(uri, PROMOTED_PARAMS)  # the processor that read this configuration evolved the table
    send_promoted(tmp_path, data, config)
    configure(data, '[schema.params]\nvip = "bool"\n')  # level, first_seen and ratio removed, vip promoted
    gamestream("process", "--until-idle", data_dir=data)
    rows = by_id(table_rows(uri))
    for via in VIA:
        assert {k: rows[via]["eventParams"][k] for k in TYPED_VALUES} == TYPED_VALUES, via
        assert rows[via]["eventParams_extra"] == KEPT_BY_THE_SENDER[via], via
        assert rows[via]["eventParams"]["vip"] is None
    assert lake.arrow_schema_of(lake.open_table(uri)).field("eventParams").type.names[-4:] == [
        "level", "first_seen", "ratio", "vip"]


def test_processes_sharing_the_configuration_store_promoted_values_typed_and_only_unknown_keys_as_extra(
        tmp_path: Path) -> None:
    """The usual case, unchanged (passes before and after the fix above: a guard, not a reproduction)."""
    data = tmp_path / "data"
    config = configure(data, PROMOTED)
    send_promoted(tmp_path, data, config)
    gamestream("process", "--until-idle", data_dir=data)
    rows = by_id(table_rows(data / "tables" / "events"))
    for via in VIA:
        assert {k: rows[via]["eventParams"][k] for k in TYPED_VALUES} == TYPED_VALUES, via
        assert rows[via]["eventParams_extra"] == KEPT_BY_THE_SENDER[via], via
        assert rows[via]["event_extra"] is None
    assert len(rows) == 6


def test_fields_of_a_newer_producer_written_to_the_log_directly_are_kept(tmp_path: Path) -> None:
    """Records holding fields this version's schema lacks, at top level and in eventParams, as NDJSON and as an
    Arrow record, land with those fields in the extra columns."""
    data = tmp_path / "data"
    moment = dt.datetime(2026, 11, 30, 10, tzinfo=dt.timezone.utc)
    newer = pa.schema(list(schema.decode_schema()) + [pa.field("future", pa.struct([("k", pa.int64())]))])
    newer = newer.set(newer.get_field_index("eventParams"), pa.field("eventParams", pa.struct(
        list(schema.decode_schema().field("eventParams").type) + [pa.field("level", pa.int32())])))
    rows = pa.Table.from_pylist([{"eventId": "arrow", "eventName": "x", "eventTime": moment,
                                  "eventParams": {"device_id": "d", "level": 5}, "eventParams_extra": '{"b":1}',
                                  "event_extra": '{"a":1}',
                                  "future": {"k": 2}}], schema=newer)
    sink = pa.BufferOutputStream()
    sink.write(payload.MAGIC)
    with pa.ipc.new_stream(sink, newer) as writer:
        writer.write(rows)
    ndjson = raw_event("ndjson", '"level":5', '"eventParams_extra":"{\\"b\\":1}","event_extra":"{\\"a\\":1}",'
                                              '"future":{"k":2}')
    log = SqliteEventLog(data / "log", partitions=4)
    try:
        log.append([Append(0, sink.getvalue().to_pybytes(), 1), Append(1, ndjson.encode(), 1)])
    finally:
        log.close()
    gamestream("process", "--until-idle", data_dir=data)
    stored = by_id(table_rows(data / "tables" / "events"))
    for via in ("arrow", "ndjson"):
        assert stored[via]["eventParams_extra"] == '{"b":1,"level":5}', via
        assert stored[via]["event_extra"] == '{"a":1,"future":{"k":2}}', via

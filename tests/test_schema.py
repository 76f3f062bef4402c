"""The event schema: one declaration, and what the validator accepts, rejects and stores."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import msgspec
import pyarrow as pa
import pytest

from gamestream import schema
from gamestream.schema import EventValidator, Rejection, ValidEvent

NOW = dt.datetime(2026, 11, 25, 12, 0, 0, 123456, tzinfo=dt.timezone.utc)


def valid(line: str | bytes, mode: str = "input") -> dict:
    result = EventValidator(event_time=mode).validate(line, NOW)  # type: ignore[arg-type]
    assert isinstance(result, ValidEvent), result
    return json.loads(result.line)


def rejected(line: str | bytes, mode: str = "input") -> str:
    result = EventValidator(event_time=mode).validate(line, NOW)  # type: ignore[arg-type]
    assert isinstance(result, Rejection), result
    return str(result)


def event(**fields) -> str:
    base = {"eventName": "levelStart", "eventParams": {"device_id": "d1"}}
    base.update(fields)
    return json.dumps(base)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ('{"eventParams": {"device_id": "d"}}', "eventName: required"),
        ('{"eventName": "", "eventParams": {"device_id": "d"}}', "eventName: expected str of length >= 1"),
        ('{"eventName": 5, "eventParams": {"device_id": "d"}}', "eventName: expected str, got int"),
        ('{"eventName": "x"}', "eventParams: required"),
        ('{"eventName": "x", "eventParams": null}', "eventParams: expected object, got null"),
        ('{"eventName": "x", "eventParams": {}}', "eventParams.device_id: required"),
        ('{"eventName": "x", "eventParams": {"device_id": ""}}', "eventParams.device_id: expected str of length >= 1"),
        ('{"eventName": "x", "eventParams": {"device_id": "d", "scoreAdjustment": "3"}}',
         "eventParams.scoreAdjustment: expected int | null, got str"),
        ('{"eventName": "x", "eventParams": {"device_id": "d", "scoreAdjustment": 2147483648}}',
         "eventParams.scoreAdjustment: expected int <= 2147483647"),
        ('{"eventName": "x", "eventParams": {"device_id": "d", "scoreAdjustment": -2147483649}}',
         "eventParams.scoreAdjustment: expected int >= -2147483648"),
        ('{"eventName": "x", "eventParams": {"device_id": "d", "scoreAdjustment": 1.5}}',
         "eventParams.scoreAdjustment: expected int | null, got float"),
        ('{"eventName": "x", "eventParams": {"device_id": "d", "amount": "4.99"}}',
         "eventParams.amount: expected float | null, got str"),
        ('{"eventName": "x", "eventParams": {"device_id": "d", "client_event_time": "yesterday"}}',
         "eventParams.client_event_time: invalid RFC3339 encoded datetime"),
        ('{"eventName": "x", "eventParams": {"device_id": "d"}, "eventTime": "2026-11-25T10:00:00"}',
         "eventTime: timestamp needs a zone: end it with Z or an offset such as +02:00"),
        ('{"eventName": "x", "eventParams": {"device_id": "d"}, "eventTime": -1}', "eventTime: epoch seconds out of range: -1"),
        ('{"eventName": "x", "eventParams": {"device_id": "d"}, "eventId": ""}', "eventId: expected str of length >= 1"),
        ('[{"eventName": "x"}]', "an event must be a JSON object, got array"),
        ('{"eventName": "x", "eventParams": {"device_id": "d', "invalid JSON: input data was truncated"),
        ("not json", "invalid JSON: invalid character (byte 4)"),
    ],
)
def test_invalid_events_are_rejected_with_a_readable_reason(line: str, reason: str) -> None:
    assert rejected(line).startswith(reason), rejected(line)


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("2026-11-25T10:00:00Z", "2026-11-25T10:00:00Z"),
        ("2026-11-25T10:00:00.5Z", "2026-11-25T10:00:00.500000Z"),
        ("2026-11-25T10:00:00.123456Z", "2026-11-25T10:00:00.123456Z"),
        ("2026-11-25T01:30:00+02:00", "2026-11-24T23:30:00Z"),
        ("2026-11-25T10:00:00-05:30", "2026-11-25T15:30:00Z"),
        (1764064800, "2025-11-25T10:00:00Z"),
        (1764064800.25, "2025-11-25T10:00:00.250000Z"),
    ],
)
def test_timestamps_are_accepted_in_rfc3339_or_epoch_seconds_and_stored_in_utc(given, stored) -> None:
    assert valid(event(eventTime=given))["eventTime"] == stored
    params = {"device_id": "d1", "client_event_time": given}
    assert valid(event(eventParams=params))["eventParams"]["client_event_time"] == stored


def test_load_mode_keeps_event_time_and_id_stamps_absent_ones_and_keeps_explicit_null() -> None:
    kept = valid(event(eventTime="2026-01-01T00:00:00Z", eventId="client-id"))
    assert kept["eventTime"] == "2026-01-01T00:00:00Z" and kept["eventId"] == "client-id"
    stamped = valid(event())
    assert stamped["eventTime"] == "2026-11-25T12:00:00.123456Z"
    assert len(stamped["eventId"]) == 36 and stamped["eventId"][14] == "7"  # a UUIDv7
    assert valid(event(eventTime=None))["eventTime"] is None  # the processor quarantines it


def test_server_mode_stamps_receive_time_and_keeps_client_time_as_client_event_time() -> None:
    stored = valid(event(eventTime="2026-01-01T00:00:00Z"), mode="server")
    assert stored["eventTime"] == "2026-11-25T12:00:00.123456Z"
    assert stored["eventParams"]["client_event_time"] == "2026-01-01T00:00:00Z"
    params = {"device_id": "d1", "client_event_time": "2026-02-02T00:00:00Z"}
    both = valid(event(eventTime="2026-01-01T00:00:00Z", eventParams=params), mode="server")
    assert both["eventParams"]["client_event_time"] == "2026-02-02T00:00:00Z"


def test_canonical_form_keeps_unknown_fields_apart_drops_nulls_and_keeps_every_schema_field() -> None:
    params = {"game_keyword": "g", "app_name": "a", "scoreAdjustment": -7, "platform": "ios", "app_version": "1.0",
              "device_id": "d1", "client_event_time": "2026-01-01T00:00:00Z", "amount": 4, "extra": "x"}
    stored = valid(event(eventParams=params, eventTime="2026-01-01T00:00:00Z", unknown=1, eventId="e"))
    assert stored == {
        "eventName": "levelStart", "eventId": "e", "eventTime": "2026-01-01T00:00:00Z",
        "eventParams": {**{k: v for k, v in params.items() if k != "extra"}, "amount": 4.0},
        "eventParams_extra": '{"extra":"x"}', "event_extra": '{"unknown":1}',
        "receivedAt": "2026-11-25T12:00:00.123456Z",  # `load` stamps its own time where the line has none
    }
    minimal = valid(event(eventParams={"device_id": "d1", "platform": None}, eventId="e", eventTime=0))
    assert minimal["eventParams"] == {"device_id": "d1"}
    assert "eventParams_extra" not in minimal and "event_extra" not in minimal


def test_unknown_values_are_kept_exactly_as_sent_and_a_canonical_line_validates_to_itself() -> None:
    line = ('{"eventName":"x","eventTime":0,"eventId":"e","eventParams":{"device_id":"d","n":1.50,"big":'
            '123456789012345678901234567890,"deep":{"a":[1,{"b":null}]},"s":"\\u00e9😀"},"eventDate":"x"}').encode()
    validator = schema.EventValidator(event_time="input")
    result = validator.validate(line, now=None)
    assert isinstance(result, schema.ValidEvent)
    stored = msgspec.json.decode(result.line)
    assert stored["eventParams_extra"] == ('{"n":1.50,"big":123456789012345678901234567890,"deep":{"a":[1,{"b":null}]},'
                                           '"s":"\\u00e9😀"}')
    assert json.loads(stored["eventParams_extra"])["s"] == "é😀"
    assert stored["event_extra"] == '{"eventDate":"x"}'
    assert validator.validate(result.line, now=None) == result


@pytest.mark.parametrize(("extra", "reason"), [
    ('"eventParams_extra":"[1]"', "eventParams_extra: expected a string holding a JSON object"),
    ('"event_extra":"{"', "event_extra: expected a string holding a JSON object"),
    ('"event_extra":{"a":1}', "event_extra: expected str | null, got object"),
])
def test_a_given_extra_column_must_hold_a_json_object(extra: str, reason: str) -> None:
    line = ('{"eventName":"x","eventParams":{"device_id":"d"},' + extra + "}").encode()
    assert str(schema.EventValidator(event_time="input").validate(line, now=None)) == reason


def test_a_given_extra_column_is_joined_with_the_unknown_keys() -> None:
    line = b'{"eventName":"x","eventParams":{"device_id":"d","b":2},"eventParams_extra":"{\\"a\\": 1}"}'
    result = schema.EventValidator(event_time="input").validate(line, now=None)
    assert isinstance(result, schema.ValidEvent)
    assert msgspec.json.decode(result.line)["eventParams_extra"] == '{"a":1,"b":2}'


PROMOTED = (("level", "int"), ("tier", "int32"), ("ratio", "double"), ("vip", "bool"), ("seen", "timestamp"),
            ("guild", "string"))


@pytest.mark.parametrize(("params", "reason"), [
    ({"level": "7"}, "eventParams.level: expected int | null, got str"),
    ({"level": 1.5}, "eventParams.level: expected int | null, got float"),
    ({"level": 2**63}, "eventParams.level: expected int <= 9223372036854775807"),
    ({"tier": 2**31}, "eventParams.tier: expected int <= 2147483647"),
    ({"ratio": "x"}, "eventParams.ratio: expected float | null, got str"),
    ({"vip": 1}, "eventParams.vip: expected bool | null, got int"),
    ({"seen": "2026-01-01T00:00:00"}, "eventParams.seen: timestamp needs a zone: end it with Z or an offset such "
                                      "as +02:00"),
    ({"guild": 5}, "eventParams.guild: expected str | null, got int"),
])
def test_a_promoted_parameter_of_another_type_is_rejected_with_its_path(params: dict, reason: str) -> None:
    line = event(eventParams={"device_id": "d", **params})
    assert str(schema.EventValidator(event_time="input", params=PROMOTED).validate(line, now=NOW)) == reason


def test_a_valid_promoted_parameter_is_typed_and_not_kept_as_extra() -> None:
    params = {"device_id": "d", "level": -(2**63), "tier": 3, "ratio": 1, "vip": False, "seen": 1.5,
              "guild": "", "other": 1}
    line = event(eventParams=params)
    result = schema.EventValidator(event_time="input", params=PROMOTED).validate(line, now=NOW)
    assert isinstance(result, schema.ValidEvent)
    stored = msgspec.json.decode(result.line)
    assert stored["eventParams"] == {"device_id": "d", "level": -(2**63), "tier": 3, "ratio": 1.0, "vip": False,
                                     "seen": "1970-01-01T00:00:01.500000Z", "guild": ""}
    assert stored["eventParams_extra"] == '{"other":1}'
    unpromoted = schema.EventValidator(event_time="input").validate(line, now=NOW)
    assert json.loads(msgspec.json.decode(unpromoted.line)["eventParams_extra"])["level"] == -(2**63)  # type: ignore[union-attr]


@pytest.mark.parametrize(("params", "message"), [
    ((("device_id", "int"),), "eventParams.device_id is already a field of eventParams"),
    ((("level", "float"),), "the type must be one of string, int, int32, double, bool, timestamp"),
    ((("level", "int"), ("level", "string")), "eventParams.level is given twice"),
    ((("a.b", "int"),), "a parameter name must be letters, digits and _"),
])
def test_a_clashing_or_unknown_promotion_is_refused(params: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        schema.check_params(params)


def test_promoted_parameters_appear_in_arrow_spark_and_markdown() -> None:
    params = (("level", "int"), ("vip", "bool"))
    event_params = schema.arrow_schema(params=params).field("eventParams").type
    assert event_params.field("level").type == pa.int64() and event_params.field("vip").type == pa.bool_()
    assert "amount: DOUBLE, level: BIGINT, vip: BOOLEAN>" in schema.spark_ddl(params)
    assert "| `eventParams.level` | bigint | no |" in schema.markdown_reference(params)
    assert "| `eventParams.level`" not in schema.markdown_reference()


def test_arrow_schema_is_time_zone_aware_microseconds_and_matches_the_declaration() -> None:
    arrow = schema.arrow_schema()
    assert arrow.names == ["eventId", "eventName", "eventTime", "eventParams", "eventParams_extra", "event_extra",
                           "sentAt", "receivedAt", "geo_country", "eventDate"]
    assert arrow.field("sentAt").type == arrow.field("receivedAt").type == pa.timestamp("us", tz="UTC")
    assert arrow.field("eventTime").type == pa.timestamp("us", tz="UTC")
    params = arrow.field("eventParams").type
    assert [params.field(i).name for i in range(params.num_fields)] == [
        "game_keyword", "app_name", "scoreAdjustment", "platform", "app_version", "device_id",
        "client_event_time", "amount"]
    assert params.field("scoreAdjustment").type == pa.int32()
    assert params.field("client_event_time").type == pa.timestamp("us", tz="UTC")
    assert arrow.field("eventDate").type == pa.date32()
    assert arrow.field("eventParams_extra").type == arrow.field("event_extra").type == pa.string()
    assert "eventDate" not in schema.decode_schema().names


def test_spark_ddl_is_the_seeds_schema_with_the_extra_columns_and_the_devices_times() -> None:
    assert schema.spark_ddl() == (
        "eventId STRING, eventName STRING, eventTime TIMESTAMP, eventParams STRUCT<game_keyword: STRING, "
        "app_name: STRING, scoreAdjustment: INT, platform: STRING, app_version: STRING, device_id: STRING, "
        "client_event_time: TIMESTAMP, amount: DOUBLE>, eventParams_extra STRING, event_extra STRING, "
        "sentAt TIMESTAMP, receivedAt TIMESTAMP, geo_country STRING, eventDate DATE"
    )


def test_docs_schema_page_is_generated_from_the_declaration() -> None:
    page = Path(__file__).resolve().parents[1] / "docs" / "schema.md"
    assert page.read_text() == schema.markdown_reference(), "run: ./dev gamestream schema --markdown > docs/schema.md"


def test_docstring_examples_run() -> None:
    import doctest

    assert doctest.testmod(schema).failed == 0

"""The event schema: one declaration, and what the validator accepts, rejects and stores."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

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


def test_canonical_form_drops_unknown_fields_and_nulls_and_keeps_every_schema_field() -> None:
    params = {"game_keyword": "g", "app_name": "a", "scoreAdjustment": -7, "platform": "ios", "app_version": "1.0",
              "device_id": "d1", "client_event_time": "2026-01-01T00:00:00Z", "amount": 4, "extra": "x"}
    stored = valid(event(eventParams=params, eventTime="2026-01-01T00:00:00Z", unknown=1, eventId="e"))
    assert stored == {
        "eventName": "levelStart", "eventId": "e", "eventTime": "2026-01-01T00:00:00Z",
        "eventParams": {**{k: v for k, v in params.items() if k != "extra"}, "amount": 4.0},
    }
    minimal = valid(event(eventParams={"device_id": "d1", "platform": None}, eventId="e", eventTime=0))
    assert minimal["eventParams"] == {"device_id": "d1"}


def test_arrow_schema_is_time_zone_aware_microseconds_and_matches_the_declaration() -> None:
    arrow = schema.arrow_schema()
    assert arrow.names == ["eventId", "eventName", "eventTime", "eventParams", "eventDate"]
    assert arrow.field("eventTime").type == pa.timestamp("us", tz="UTC")
    params = arrow.field("eventParams").type
    assert [params.field(i).name for i in range(params.num_fields)] == [
        "game_keyword", "app_name", "scoreAdjustment", "platform", "app_version", "device_id",
        "client_event_time", "amount"]
    assert params.field("scoreAdjustment").type == pa.int32()
    assert params.field("client_event_time").type == pa.timestamp("us", tz="UTC")
    assert arrow.field("eventDate").type == pa.date32()
    assert "eventDate" not in schema.decode_schema().names


def test_spark_ddl_is_the_seeds_schema() -> None:
    assert schema.spark_ddl() == (
        "eventId STRING, eventName STRING, eventTime TIMESTAMP, eventParams STRUCT<game_keyword: STRING, "
        "app_name: STRING, scoreAdjustment: INT, platform: STRING, app_version: STRING, device_id: STRING, "
        "client_event_time: TIMESTAMP, amount: DOUBLE>, eventDate DATE"
    )


def test_docs_schema_page_is_generated_from_the_declaration() -> None:
    page = Path(__file__).resolve().parents[1] / "docs" / "schema.md"
    assert page.read_text() == schema.markdown_reference(), "run: ./dev gamestream schema --markdown > docs/schema.md"


def test_docstring_examples_run() -> None:
    import doctest

    assert doctest.testmod(schema).failed == 0

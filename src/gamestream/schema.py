"""The event schema, declared once.

Everything else is derived from `EVENT_FIELDS`: the validator (msgspec types), the Arrow schema of the Delta
table, the Spark SQL DDL and the Markdown reference in docs/schema.md (`gamestream schema --markdown`).

An event goes through two steps here:

1. `EventValidator.validate(line)` checks one JSON object against the schema and returns either a
   `ValidEvent` (canonical NDJSON bytes plus the device id that picks its log partition) or a `Rejection`
   with a reason a sender can read, such as ``eventParams.scoreAdjustment: expected int <= 2147483647``.
2. The processor decodes batches of canonical lines with `arrow_schema()` (pyarrow's JSON reader) and derives
   `eventDate`, the UTC date of `eventTime`, which partitions the table.

Canonical form: UTC timestamps as RFC 3339 strings with a ``Z`` (microseconds when non-zero), null and
absent fields omitted, unknown fields dropped (as Spark's ``from_json`` with a schema drops them).
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec
import uuid_utils

if TYPE_CHECKING:
    import pyarrow as pa

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
# Epoch seconds accepted for timestamps: 1970-01-01 up to the end of year 9999.
EPOCH_MAX = 253_402_300_799
EVENT_ID_MAX = 128

Kind = Literal["string", "timestamp", "int32", "double", "date", "struct"]


@dataclass(frozen=True)
class Field:
    name: str
    kind: Kind
    doc: str
    required: bool = False
    derived: bool = False  # set by gamestream, never read from input (eventDate)
    children: tuple["Field", ...] = ()


EVENT_PARAMS = Field(
    "eventParams",
    "struct",
    "What happened, as the game reports it.",
    required=True,
    children=(
        Field("game_keyword", "string", "Game identifier, e.g. `dragon-quest`."),
        Field("app_name", "string", "Application name."),
        Field("scoreAdjustment", "int32", "Score change carried by score events (32-bit signed)."),
        Field("platform", "string", "`ios`, `android`, …"),
        Field("app_version", "string", "Client application version."),
        Field("device_id", "string", "The player's device; picks the log partition.", required=True),
        Field("client_event_time", "timestamp", "When the client says the event happened."),
        Field("amount", "double", "Purchase amount (bookings) on `purchaseEvent`."),
    ),
)

EVENT_FIELDS: tuple[Field, ...] = (
    Field("eventId", "string", "Unique id: the client's, or a UUIDv7 assigned on arrival."),
    Field("eventName", "string", "Event type, e.g. `purchaseEvent`, `levelStart`.", required=True),
    Field(
        "eventTime",
        "timestamp",
        "Server receive time (UTC, µs), stamped by the collector; `gamestream load` keeps the file's own.",
    ),
    EVENT_PARAMS,
    Field("eventDate", "date", "UTC date of `eventTime`; the table's partition column.", derived=True),
)

PARTITION_COLUMN = "eventDate"


# --------------------------------------------------------------------------------------------------- Arrow / SQL
# pyarrow is imported where the Arrow schemas are made, not with this module: the Lambda handler validates with
# this module alone, and its deployment zip then needs no pyarrow (~140 MB unzipped).
def _arrow_type(field: Field) -> "pa.DataType":
    import pyarrow as pa

    if field.kind == "struct":
        return pa.struct([pa.field(c.name, _arrow_type(c), nullable=True) for c in field.children])
    return {
        "string": pa.string(),
        # Time-zone aware on purpose: a naive timestamp turns the Delta table into timestampNtz (reader 3 /
        # writer 7), which many readers cannot open.
        "timestamp": pa.timestamp("us", tz="UTC"),
        "int32": pa.int32(),
        "double": pa.float64(),
        "date": pa.date32(),
    }[field.kind]


def arrow_schema(*, with_derived: bool = True) -> "pa.Schema":
    import pyarrow as pa

    """The events table's Arrow schema (nullable fields, as in the seed's Spark schema)."""
    return pa.schema(
        [pa.field(f.name, _arrow_type(f), nullable=True) for f in EVENT_FIELDS if with_derived or not f.derived]
    )


def decode_schema() -> "pa.Schema":
    """The schema pyarrow's JSON reader decodes canonical lines with (no derived columns)."""
    return arrow_schema(with_derived=False)


def _quarantine_schema() -> "pa.Schema":
    import pyarrow as pa

    return pa.schema(
        [
            pa.field("quarantinedAt", pa.timestamp("us", tz="UTC")),
            pa.field("reason", pa.string()),
            pa.field("payload", pa.string()),
            pa.field("logPartition", pa.int32()),
            pa.field("logOffset", pa.int64()),
            pa.field("quarantineDate", pa.date32()),
        ]
    )


def __getattr__(name: str) -> object:
    """`QUARANTINE_SCHEMA`, made (with pyarrow) on first use."""
    if name == "QUARANTINE_SCHEMA":
        value = globals()["QUARANTINE_SCHEMA"] = _quarantine_schema()
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _spark_type(field: Field) -> str:
    if field.kind == "struct":
        return "STRUCT<" + ", ".join(f"{c.name}: {_spark_type(c)}" for c in field.children) + ">"
    return {"string": "STRING", "timestamp": "TIMESTAMP", "int32": "INT", "double": "DOUBLE", "date": "DATE"}[
        field.kind
    ]


def spark_ddl() -> str:
    """The schema as Spark SQL DDL, e.g. for `spark.read.schema(...)`."""
    return ", ".join(f"{f.name} {_spark_type(f)}" for f in EVENT_FIELDS)


def markdown_reference() -> str:
    """The schema as a Markdown table (docs/schema.md is this text; a test keeps the two equal)."""
    lines = [
        "# Event schema",
        "",
        "Generated from `src/gamestream/schema.py` by `gamestream schema --markdown`; do not edit by hand.",
        "",
        "| field | type | required | meaning |",
        "| --- | --- | --- | --- |",
    ]

    def add(field: Field, prefix: str = "") -> None:
        required = "derived" if field.derived else ("yes" if field.required else "no")
        type_name = "struct" if field.kind == "struct" else _spark_type(field).lower()
        lines.append(f"| `{prefix}{field.name}` | {type_name} | {required} | {field.doc} |")
        for child in field.children:
            add(child, prefix=f"{field.name}.")

    for f in EVENT_FIELDS:
        add(f)
    lines += [
        "",
        "Spark DDL:",
        "",
        "```",
        spark_ddl(),
        "```",
        "",
        "Timestamps are accepted as RFC 3339 (with or without fractional seconds, with `Z` or an offset) or as",
        "epoch seconds (int or float), and stored in UTC with microsecond precision. A timestamp without a zone is",
        "rejected: its meaning would depend on the sender's clock settings. Integers must fit in 32 bits. Unknown",
        "fields are ignored. `eventName` and `eventParams.device_id` must be non-empty strings; every other field",
        "may be absent or null.",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- validation
_TIMESTAMP_INPUT = dt.datetime | int | float | None


def _input_type(field: Field) -> Any:
    if field.kind == "struct":
        return _input_struct(field.name[:1].upper() + field.name[1:], field.children)
    if field.name == "eventId":
        return Annotated[str, msgspec.Meta(min_length=1, max_length=EVENT_ID_MAX)] | None
    base: Any = {
        "string": Annotated[str, msgspec.Meta(min_length=1)] if field.required else str,
        "timestamp": _TIMESTAMP_INPUT,
        "int32": Annotated[int, msgspec.Meta(ge=INT32_MIN, le=INT32_MAX)],
        "double": float,
    }[field.kind]
    return base if field.required else base | None


def _input_struct(name: str, fields: tuple[Field, ...]) -> type:
    specs: list[Any] = []
    for f in fields:
        if f.derived:
            continue
        if f.required:
            specs.append((f.name, _input_type(f)))
        elif f.name == "eventTime":
            # Absent and null differ: absent is stamped, an explicit null is quarantined (the seed's
            # `eventTime.isNotNull()` filter, without losing the row).
            specs.append((f.name, _input_type(f) | msgspec.UnsetType, msgspec.UNSET))
        else:
            specs.append((f.name, _input_type(f), None))
    # required fields first: msgspec wants fields without defaults before those with defaults
    specs.sort(key=lambda s: len(s) != 2)
    return msgspec.defstruct(name, specs, omit_defaults=True)


InputEvent = _input_struct("Event", EVENT_FIELDS)
_TIMESTAMP_PATHS = [f.name for f in EVENT_FIELDS if f.kind == "timestamp"] + [
    f"eventParams.{c.name}" for c in EVENT_PARAMS.children if c.kind == "timestamp"
]


class ValidEvent(msgspec.Struct, frozen=True):
    device_id: str
    line: bytes  # canonical NDJSON line, without the trailing newline


class Rejection(msgspec.Struct, frozen=True):
    field: str  # dotted path, or "" for the whole event
    reason: str

    def __str__(self) -> str:
        return f"{self.field}: {self.reason}" if self.field else self.reason


class _Invalid(Exception):
    def __init__(self, field: str, reason: str) -> None:
        self.rejection = Rejection(field, reason)


_AT_PATH = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_MISSING = re.compile(r"^Object missing required field `(?P<name>[^`]+)`$")


def _rejection_from_msgspec(error: msgspec.DecodeError) -> Rejection:
    message = str(error)
    if not isinstance(error, msgspec.ValidationError):
        message = message.removeprefix("JSON is malformed: ")
        return Rejection("", f"invalid JSON: {message[:1].lower()}{message[1:]}")
    path = ""
    match = _AT_PATH.search(message)
    if match:
        path = match["path"].lstrip(".")
        message = message[: match.start()]
    missing = _MISSING.match(message)
    if missing:
        return Rejection(f"{path}.{missing['name']}" if path else missing["name"], "required")
    reason = message.replace("`", "")
    reason = reason[:1].lower() + reason[1:]
    if reason.startswith("expected object, got") and not path:
        reason = "an event must be a JSON " + reason.removeprefix("expected ")
    return Rejection(path, reason)


def _to_utc(value: dt.datetime | int | float, path: str) -> dt.datetime:
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            raise _Invalid(path, "timestamp needs a zone: end it with Z or an offset such as +02:00")
        try:
            return value.astimezone(dt.timezone.utc)
        except OverflowError:  # 9999-12-31T23:59:59-01:00 is in year 10000 in UTC
            raise _Invalid(path, "timestamp out of range: in UTC it must fall within years 1 to 9999") from None
    if isinstance(value, bool) or not (0 <= value <= EPOCH_MAX):
        raise _Invalid(path, f"epoch seconds out of range: {value!r}")
    return dt.datetime.fromtimestamp(value, dt.timezone.utc)


def new_event_id() -> str:
    """A UUIDv7: time-ordered, so ids assigned together sort together."""
    return str(uuid_utils.uuid7())


class EventValidator:
    """Validates single JSON events and renders them canonical.

    `event_time="server"` (the collector): eventTime is the receive time passed to `validate`; a client's own
    eventTime is kept as `eventParams.client_event_time` when that is absent, as the seed's Lambda does.
    `event_time="input"` (`gamestream load`): the event's own eventTime is kept; absent is stamped with `now`,
    explicit null stays null (the processor quarantines it).

    >>> v = EventValidator(event_time="input")
    >>> v.validate(b'{"eventName":"x","eventParams":{"device_id":"d1"},"eventTime":0,"eventId":"e1"}', now=None)
    ValidEvent(device_id='d1', line=b'{"eventName":"x","eventParams":{"device_id":"d1"},"eventId":"e1","eventTime":"1970-01-01T00:00:00Z"}')
    """

    def __init__(self, *, event_time: Literal["server", "input"]) -> None:
        self._decoder = msgspec.json.Decoder(InputEvent)
        self._encoder = msgspec.json.Encoder()
        self._server_time = event_time == "server"

    def validate(self, line: bytes | str, now: dt.datetime | None) -> ValidEvent | Rejection:
        """Checks one event; `now` (UTC) stamps eventTime where the mode says so."""
        try:
            event = self._decoder.decode(line)
            return self._normalise(event, now)
        except msgspec.DecodeError as error:
            return _rejection_from_msgspec(error)
        except _Invalid as invalid:
            return invalid.rejection
        # msgspec raises these two outside its DecodeError: bytes that are not UTF-8 inside a string, and
        # nesting deeper than it follows (inside an unknown field, which is otherwise skipped).
        except UnicodeDecodeError:
            return Rejection("", "invalid JSON: a string is not valid UTF-8")
        except RecursionError:
            return Rejection("", "invalid JSON: nested too deeply")

    def _normalise(self, event: Any, now: dt.datetime | None) -> ValidEvent:
        params = event.eventParams
        if params.client_event_time is not None:
            params.client_event_time = _to_utc(params.client_event_time, "eventParams.client_event_time")
        if self._server_time:
            if params.client_event_time is None and event.eventTime not in (None, msgspec.UNSET):
                params.client_event_time = _to_utc(event.eventTime, "eventTime")
            event.eventTime = now
        elif event.eventTime is msgspec.UNSET:
            event.eventTime = now
        elif event.eventTime is not None:
            event.eventTime = _to_utc(event.eventTime, "eventTime")
        if event.eventId is None:
            event.eventId = new_event_id()
        # An explicit null eventTime is encoded as null (its default is UNSET, so omit_defaults keeps it).
        return ValidEvent(device_id=params.device_id, line=self._encoder.encode(event))

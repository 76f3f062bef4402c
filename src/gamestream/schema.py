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
absent fields omitted. Nothing a game sends is lost: unknown keys inside ``eventParams`` are kept, with their
JSON values exactly as sent, as one JSON object in the string column ``eventParams_extra``, and unknown top-level
keys in ``event_extra`` (Auto Loader's "rescued data"). An operator promotes a parameter to a typed column of its
own with ``[schema.params]`` in the configuration file (`settings.Settings.schema_params`): every function below
that describes the schema takes those ``params`` (none by default), so validation, Arrow, Spark DDL, the
OpenAPI document and docs/schema.md follow the configuration.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec
import uuid_utils

if TYPE_CHECKING:
    import pyarrow as pa

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
# Epoch seconds accepted for timestamps: 1970-01-01 up to the end of year 9999.
EPOCH_MAX = 253_402_300_799
EVENT_ID_MAX = 128

Kind = Literal["string", "timestamp", "int32", "int64", "double", "boolean", "date", "json", "struct"]
# `[schema.params]` type names → field kinds
PARAM_TYPES: dict[str, Kind] = {"string": "string", "int": "int64", "int32": "int32", "double": "double",
                                "bool": "boolean", "timestamp": "timestamp"}
Params = tuple[tuple[str, str], ...]
"""Promoted parameters: (name, `PARAM_TYPES` key) pairs, in the configuration's order."""
_PARAM_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


@dataclass(frozen=True)
class Field:
    name: str
    kind: Kind
    doc: str
    required: bool = False
    derived: bool = False  # set by gamestream, never read from input (eventDate)
    promoted: bool = False  # a custom parameter promoted by the configuration (`[schema.params]`)
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

PARAMS_EXTRA = "eventParams_extra"
PURCHASE = "purchaseEvent"  # the eventName whose eventParams.amount the KPIs count as bookings
EVENT_EXTRA = "event_extra"
SENT_AT = "sentAt"
RECEIVED_AT = "receivedAt"
GEO_COUNTRY = "geo_country"
_ALPHA2 = re.compile(r"^[A-Z]{2}$")
MAX_FUTURE = dt.timedelta(hours=1)
"""How far past its receive time an event's clock-corrected time may lie (Mixpanel's rule); later is rejected."""
# The two "rescued data" columns come before eventDate: a table made before they existed gains them there (a
# delta-rs schema merge puts the partition column last), so old and new tables have the same column order.
EVENT_FIELDS: tuple[Field, ...] = (
    Field("eventId", "string", "Unique id: the client's, or a UUIDv7 assigned on arrival."),
    Field("eventName", "string", "Event type, e.g. `purchaseEvent`, `levelStart`.", required=True),
    Field(
        "eventTime",
        "timestamp",
        "The event's time (UTC, µs), which eventDate, windows and every KPI use: the collector's receive time; "
        "when the device sends `sentAt`, its own event time corrected for its clock, `eventParams.client_event_time "
        "+ (receivedAt − sentAt)`. `gamestream load` keeps the file's own.",
    ),
    EVENT_PARAMS,
    Field(PARAMS_EXTRA, "json", "Unknown keys of `eventParams`, values exactly as sent, as one JSON object in a "
                                "string; null when there were none."),
    Field(EVENT_EXTRA, "json", "Unknown top-level keys of the event, the same way."),
    Field(SENT_AT, "timestamp", "When the device sent the event, by the device's clock (optional: a field of the "
                                "event, or the request's `Sent-At` header for all its events)."),
    Field(RECEIVED_AT, "timestamp", "When gamestream received the event (UTC, µs): stamped by the collector and "
                                    "the Lambda handler; `gamestream load` keeps the file's own, else the load's "
                                    "time."),
    Field(GEO_COUNTRY, "string", "The country of the client's address when the event was received (ISO 3166-1 "
                                 "alpha-2, e.g. `DE`): stamped by the collector and the Lambda handler from an "
                                 "offline lookup, replacing any value the client sent; null for a private or "
                                 "unknown address, or with the lookup off. The address itself is kept nowhere "
                                 "(docs/privacy.md). `gamestream load` keeps the file's own code (two capital "
                                 "letters)."),
    Field("eventDate", "date", "UTC date of `eventTime`; the table's partition column.", derived=True),
)

PARTITION_COLUMN = "eventDate"


def check_params(params: Params | list | tuple) -> Params:
    """`params` as a `Params` tuple, or `ValueError` naming what is wrong: a name that is not a plain identifier,
    one that is already a field of `eventParams` (or given twice), an unknown type."""
    checked: list[tuple[str, str]] = []
    taken = {c.name for c in EVENT_PARAMS.children}
    for item in params:
        name, type_name = item
        if not isinstance(name, str) or not _PARAM_NAME.match(name):
            raise ValueError(f"[schema.params] {name!r}: a parameter name must be letters, digits and _ "
                             "(not starting with a digit), at most 128 characters")
        if name in taken:
            what = "is given twice" if name in dict(checked) else "is already a field of eventParams"
            raise ValueError(f"[schema.params] {name}: eventParams.{name} {what}; promote another name")
        if type_name not in PARAM_TYPES:
            raise ValueError(f"[schema.params] {name} = {type_name!r}: the type must be one of "
                             f"{', '.join(PARAM_TYPES)}")
        taken.add(name)
        checked.append((name, type_name))
    return tuple(checked)


@lru_cache(maxsize=None)
def event_fields(params: Params = ()) -> tuple[Field, ...]:
    """`EVENT_FIELDS` with the promoted `params` as nullable fields at the end of `eventParams`."""
    if not params:
        return EVENT_FIELDS
    promoted = tuple(Field(name, PARAM_TYPES[type_name],
                           f"Custom parameter, promoted by `[schema.params] {name} = \"{type_name}\"`.",
                           promoted=True)
                     for name, type_name in check_params(params))
    event_params = replace(EVENT_PARAMS, children=EVENT_PARAMS.children + promoted)
    return tuple(event_params if f.name == EVENT_PARAMS.name else f for f in EVENT_FIELDS)


def params_field(params: Params = ()) -> Field:
    """The `eventParams` field with the promoted `params`."""
    return next(f for f in event_fields(params) if f.name == EVENT_PARAMS.name)


# --------------------------------------------------------------------------------------------------- Arrow / SQL
# pyarrow is imported where the Arrow schemas are made, not with this module: the Lambda handler validates with
# this module alone, and its deployment zip then needs no pyarrow (~140 MB unzipped).
def _arrow_type(field: Field) -> "pa.DataType":
    import pyarrow as pa

    if field.kind == "struct":
        return pa.struct([pa.field(c.name, _arrow_type(c), nullable=True) for c in field.children])
    return {
        "string": pa.string(),
        "json": pa.string(),
        # Time-zone aware on purpose: a naive timestamp turns the Delta table into timestampNtz (reader 3 /
        # writer 7), which many readers cannot open.
        "timestamp": pa.timestamp("us", tz="UTC"),
        "int32": pa.int32(),
        "int64": pa.int64(),
        "double": pa.float64(),
        "boolean": pa.bool_(),
        "date": pa.date32(),
    }[field.kind]


@lru_cache(maxsize=None)
def arrow_schema(*, with_derived: bool = True, params: Params = ()) -> "pa.Schema":
    """The events table's Arrow schema (nullable fields, as in the seed's Spark schema), with the promoted
    `params` inside `eventParams`."""
    import pyarrow as pa

    return pa.schema([pa.field(f.name, _arrow_type(f), nullable=True) for f in event_fields(params)
                      if with_derived or not f.derived])


def decode_schema(params: Params = ()) -> "pa.Schema":
    """The schema of canonical lines and Arrow log records: the table's without its derived column."""
    return arrow_schema(with_derived=False, params=params)


def param_type(arrow_type: "pa.DataType") -> str | None:
    """The `[schema.params]` type whose column has `arrow_type` (the inverse of `PARAM_TYPES` through the Arrow
    types), or None when no parameter type makes that column."""
    for type_name, kind in PARAM_TYPES.items():
        if _arrow_type(Field("", kind, "")) == arrow_type:
            return type_name
    return None


def table_params(table_schema: "pa.Schema") -> Params:
    """The promoted parameters an events table holds: the fields of its `eventParams` beyond the built-in ones
    (added by any process's `[schema.params]`, including parameters since removed from it), in the table's
    order, with their types mapped back to parameter types; a field no parameter type makes is left out."""
    import pyarrow as pa

    if EVENT_PARAMS.name not in table_schema.names:
        return ()
    struct = table_schema.field(EVENT_PARAMS.name).type
    if not pa.types.is_struct(struct):
        return ()
    built_in = {c.name for c in EVENT_PARAMS.children}
    found = []
    for child in struct:
        type_name = param_type(child.type)
        if child.name not in built_in and type_name is not None and _PARAM_NAME.match(child.name):
            found.append((child.name, type_name))
    return tuple(found)


def effective_params(configured: Params, table_schema: "pa.Schema") -> Params:
    """The parameters a processor decodes with: those the events table has (`table_params`), in its order, then
    the `configured` ones it lacks. A processor whose configuration differs from the collector's, or from the
    one a parameter was removed from, thus still fills every typed column the table has; a value with no column
    is kept in the extra columns (`conform`, `EventValidator`). A configured type that differs from the table's
    is not taken here: `lake.open_events` refuses it first."""
    have = table_params(table_schema)
    names = {name for name, _ in have}
    return check_params(have + tuple(p for p in check_params(configured) if p[0] not in names))


def conform(table: "pa.Table", target: "pa.Schema") -> "pa.Table":
    """`table` with exactly `target`'s columns, in its order: a column (or a field inside a struct) that `table`
    lacks is added as nulls, others are cast. What lets rows written under one configuration meet a table
    evolved under another (a record from before a parameter was promoted, a table that kept the column of a
    parameter no longer configured). Free when the schemas are already equal.

    Nothing is dropped: a field of `eventParams` that `target` lacks, or holds with a type the value does not
    convert to exactly (another integer width aside), goes into `eventParams_extra`, and a top-level column
    `target` lacks into `event_extra` — merged with what those already hold, as the JSON the per-event path
    (`EventValidator`) writes for the same value. Only rows where such a value is non-null are touched."""
    import pyarrow as pa

    if table.schema == target:
        return table
    rescued: dict[str, list[tuple[str, pa.ChunkedArray]]] = {PARAMS_EXTRA: [], EVENT_EXTRA: []}
    columns: dict[str, pa.ChunkedArray | pa.Array] = {}
    for f in target:
        if f.name not in table.column_names:
            columns[f.name] = pa.nulls(table.num_rows, f.type)
        elif f.name == EVENT_PARAMS.name and pa.types.is_struct(f.type) \
                and pa.types.is_struct(table.schema.field(f.name).type):
            columns[f.name], dropped = _conform_params(table.column(f.name), f.type)
            rescued[PARAMS_EXTRA] += dropped
        else:
            columns[f.name] = _conform_column(table.column(f.name), f.type)
    rescued[EVENT_EXTRA] += [(name, table.column(name)) for name in table.column_names if name not in target.names]
    for extra, dropped in rescued.items():
        if dropped and extra in columns:
            columns[extra] = _rescue(columns[extra], dropped, extra)
    return pa.Table.from_arrays([columns[f.name] for f in target], schema=target)


def _conform_column(column: "pa.ChunkedArray", target: "pa.DataType") -> "pa.ChunkedArray":
    import pyarrow as pa

    if column.type == target:
        return column
    if pa.types.is_struct(target) and pa.types.is_struct(column.type):
        return pa.chunked_array([_conform_struct(chunk, target) for chunk in column.chunks], target)
    return column.cast(target)


def _conform_params(column: "pa.ChunkedArray", target: "pa.StructType"
                    ) -> tuple["pa.ChunkedArray", list[tuple[str, "pa.ChunkedArray"]]]:
    """`eventParams` as `target`, and the children it cannot hold (named, with the parent's nulls applied)."""
    import pyarrow as pa

    if column.type == target:
        return column, []
    have = {column.type.field(i).name: column.type.field(i).type for i in range(column.type.num_fields)}
    wanted = {f.name: f.type for f in target}
    keep = {name for name, kind in have.items() if name in wanted and _converts(column, name, kind, wanted[name])}
    dropped = [name for name in have if name not in keep]
    conformed = pa.chunked_array([_conform_struct(chunk, target, keep) for chunk in column.chunks], target)
    if not dropped:
        return conformed, []
    flat = [dict(zip(have, chunk.flatten())) for chunk in column.chunks]  # flatten applies the parent's nulls
    return conformed, [(name, pa.chunked_array([f[name] for f in flat], have[name])) for name in dropped]


def _converts(column: "pa.ChunkedArray", name: str, have: "pa.DataType", want: "pa.DataType") -> bool:
    """Whether child `name` of the struct `column` goes into a `want` field as it is: the same type, or integers
    that fit the other width. A string into a number, a double into an integer and the like would change the
    value the game sent, so those are kept as sent instead."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if have == want or pa.types.is_null(have):
        return True
    if not (pa.types.is_integer(have) and pa.types.is_integer(want)):
        return False
    try:
        for chunk in column.chunks:
            pc.struct_field(chunk, name).cast(want)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return False
    return True


def _conform_struct(array: "pa.StructArray", target: "pa.StructType",
                    keep: set[str] | None = None) -> "pa.StructArray":
    import pyarrow as pa
    import pyarrow.compute as pc

    names = [array.type.field(i).name for i in range(array.type.num_fields)]
    children = []
    for field in target:
        if field.name in names and (keep is None or field.name in keep):
            child = array.field(field.name)  # the child as its parent's offset and length see it
            if child.type != field.type:
                child = (_conform_struct(child, field.type) if pa.types.is_struct(field.type)
                         and pa.types.is_struct(child.type) else child.cast(field.type))
            children.append(child)
        else:
            children.append(pa.nulls(len(array), field.type))
    return pa.StructArray.from_arrays(children, fields=list(target),
                                      mask=pc.is_null(array) if array.null_count else None)


def _rescue(extra: "pa.ChunkedArray | pa.Array", dropped: list[tuple[str, "pa.ChunkedArray"]],
            path: str) -> "pa.Array":
    """The extra column `extra` with the non-null values of the `dropped` columns added to each row's JSON
    object (after the keys it holds), encoded as `EventValidator` keeps an unknown key of a canonical line."""
    import pyarrow as pa
    import pyarrow.compute as pc

    present = None
    for _, column in dropped:
        valid = pc.is_valid(column)
        present = valid if present is None else pc.or_(present, valid)
    rows = pc.indices_nonzero(present)
    if len(rows) == 0:
        return extra
    extra = pa.chunked_array([extra]) if isinstance(extra, pa.Array) else extra
    given = extra.take(rows).to_pylist()
    values = [(name, column.take(rows).to_pylist()) for name, column in dropped]
    merged = []
    for i, before in enumerate(given):
        captured = {name: msgspec.Raw(_KEY_ENCODER.encode(column[i])) for name, column in values
                    if column[i] is not None}
        try:
            merged.append(_extra_column(before, captured, path))
        except _Invalid as invalid:  # only a record that skipped validation can hold such an extra column
            raise ValueError(str(invalid.rejection)) from None
    mask = pc.is_in(pa.array(range(len(extra)), pa.int64()), value_set=rows.cast(pa.int64()))
    return pc.replace_with_mask(extra.combine_chunks(), mask, pa.array(merged, pa.string()))


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
    return {"string": "STRING", "json": "STRING", "timestamp": "TIMESTAMP", "int32": "INT", "int64": "BIGINT",
            "double": "DOUBLE", "boolean": "BOOLEAN", "date": "DATE"}[field.kind]


def spark_ddl(params: Params = ()) -> str:
    """The schema as Spark SQL DDL, e.g. for `spark.read.schema(...)`."""
    return ", ".join(f"{f.name} {_spark_type(f)}" for f in event_fields(params))


def markdown_reference(params: Params = ()) -> str:
    """The schema as a Markdown table (docs/schema.md is this text for the default configuration, no promoted
    parameter; a test keeps the two equal)."""
    lines = list(_MARKDOWN_HEAD)
    for f in event_fields(params):
        lines += _markdown_rows(f)
    lines += ["", "Spark DDL:", "", "```", spark_ddl(params), "```", *_MARKDOWN_VALUES, *_MARKDOWN_UNKNOWN_FIELDS,
              *_MARKDOWN_PROMOTING]
    return "\n".join(lines)


def _markdown_rows(field: Field, prefix: str = "") -> list[str]:
    """The field's row of the Markdown table, then its children's (named `<field>.<child>`)."""
    required = "derived" if field.derived else ("yes" if field.required else "no")
    type_name = {"struct": "struct", "json": "string (JSON object)"}.get(field.kind) or _spark_type(field).lower()
    rows = [f"| `{prefix}{field.name}` | {type_name} | {required} | {field.doc} |"]
    for child in field.children:
        rows += _markdown_rows(child, prefix=f"{field.name}.")
    return rows


_MARKDOWN_HEAD = (
    "# Event schema",
    "",
    "Generated from `src/gamestream/schema.py` by `gamestream schema --markdown`; do not edit by hand.",
    "",
    "| field | type | required | meaning |",
    "| --- | --- | --- | --- |",
)
_MARKDOWN_VALUES = (
    "",
    "Timestamps are accepted as RFC 3339 (with or without fractional seconds, with `Z` or an offset) or as",
    "epoch seconds (int or float), and stored in UTC with microsecond precision. A timestamp without a zone is",
    "rejected: its meaning would depend on the sender's clock settings. Integers must fit in their type (`int`",
    "32 bits, `bigint` 64). `eventName` and `eventParams.device_id` must be non-empty strings; every other",
    "field may be absent or null.",
)
_MARKDOWN_UNKNOWN_FIELDS = (
    "",
    "## Unknown fields are kept",
    "",
    "Nothing a game sends is dropped. Keys of `eventParams` that the schema does not know are kept, with their",
    "JSON values exactly as sent (numbers digit for digit, nested objects, arrays), as one JSON object in the",
    "string column `eventParams_extra`; unknown top-level keys go to `event_extra` the same way. Both are null",
    "when there was nothing unknown. Read them with a JSON function, e.g. in DuckDB",
    "`json_extract(eventParams_extra, '$.level')`. A producer may send `eventParams_extra` or `event_extra`",
    "itself (gamestream's own canonical lines do): it must be a string holding a JSON object, and unknown keys",
    "are added to it.",
)
_MARKDOWN_PROMOTING = (
    "",
    "## Promoting a parameter to a typed column",
    "",
    "An operator makes a custom parameter a column of its own in the configuration file",
    "([configuration.md](configuration.md)):",
    "",
    "```toml",
    "[schema.params]",
    'level = "int"          # string, int (64-bit), int32, double, bool, timestamp',
    "```",
    "",
    "It becomes the nullable field `eventParams.level`, validated like the fields above (a value of another",
    "type rejects the event: `eventParams.level: expected int | null, got str`), and is no longer copied into",
    "`eventParams_extra`. The events table gains the field on the next start of the processor (a Delta schema",
    "evolution: rows written before read null; Delta readers such as DuckDB, Polars and Spark open the table",
    "as before). Rows stored before the promotion keep the value in `eventParams_extra`. A parameter removed",
    "from the configuration keeps its column (Delta cannot drop a column without column mapping): it reads null",
    "for new rows, whose values go to `eventParams_extra` again. A promoted type cannot change: promote the",
    "parameter under another name. A name that is already a field of `eventParams`, or an unknown type, stops",
    "every command at start with the reason. Run `gamestream schema --markdown` to see this page for the",
    "configuration in use.",
    "",
)


# ------------------------------------------------------------------------------------------------- validation
_TIMESTAMP_INPUT = dt.datetime | int | float | None


def _input_type(field: Field, forbid_unknown: bool) -> Any:
    if field.kind == "struct":
        return _input_struct(field.name[:1].upper() + field.name[1:], field.children, forbid_unknown)
    if field.name == "eventId":
        return Annotated[str, msgspec.Meta(min_length=1, max_length=EVENT_ID_MAX)] | None
    if field.name == GEO_COUNTRY:  # two letters; capitals checked by EventValidator where a given code is kept
        return Annotated[str, msgspec.Meta(min_length=2, max_length=2)] | None
    base: Any = {
        "string": Annotated[str, msgspec.Meta(min_length=1)] if field.required else str,
        "json": str,  # a JSON object in a string, checked by EventValidator
        "timestamp": _TIMESTAMP_INPUT,
        "int32": Annotated[int, msgspec.Meta(ge=INT32_MIN, le=INT32_MAX)],
        "int64": Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)],
        "double": float,
        "boolean": bool,
    }[field.kind]
    return base if field.required else base | None


def _input_struct(name: str, fields: tuple[Field, ...], forbid_unknown: bool = False) -> type:
    specs: list[Any] = []
    for f in fields:
        if f.derived:
            continue
        if f.required:
            specs.append((f.name, _input_type(f, forbid_unknown)))
        elif f.name == "eventTime":
            # Absent and null differ: absent is stamped, an explicit null is quarantined (the seed's
            # `eventTime.isNotNull()` filter, without losing the row).
            specs.append((f.name, _input_type(f, forbid_unknown) | msgspec.UnsetType, msgspec.UNSET))
        else:
            specs.append((f.name, _input_type(f, forbid_unknown), None))
    # required fields first: msgspec wants fields without defaults before those with defaults
    specs.sort(key=lambda s: len(s) != 2)
    return msgspec.defstruct(name, specs, omit_defaults=True, forbid_unknown_fields=forbid_unknown)


@lru_cache(maxsize=None)
def input_event(params: Params = (), *, forbid_unknown: bool = False) -> type:
    """The msgspec struct an event is decoded into (and the OpenAPI document describes). `forbid_unknown`: the
    variant that refuses unknown keys, which tells `EventValidator` in one decode that none needs keeping."""
    return _input_struct("Event", event_fields(params), forbid_unknown)


InputEvent = input_event()


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


def parse_timestamp(text: str, path: str) -> dt.datetime:
    """A timestamp given as text (an HTTP header such as Sent-At): RFC 3339 with a zone, or epoch seconds, as in
    an event; `ValueError` naming `path` and the rule when it is neither."""
    raw = text.strip()
    try:
        if raw.replace(".", "", 1).isdigit():
            return _to_utc(float(raw), path)
        return _to_utc(msgspec.json.decode(msgspec.json.encode(raw), type=dt.datetime), path)
    except _Invalid as invalid:
        raise ValueError(str(invalid.rejection)) from None
    except (msgspec.DecodeError, ValueError, OverflowError):
        raise ValueError(f"{path}: expected an RFC 3339 timestamp with a zone (2026-12-04T10:00:00Z) or epoch "
                         "seconds") from None


def corrected_time(device_time: dt.datetime | None, sent_at: dt.datetime | None,
                   received: dt.datetime | None) -> dt.datetime | None:
    """An event's time as the collector keeps it: the receive time, or, when the device said when it sent the
    event by its own clock (`sent_at`), the device's event time moved by the clock's error, `device_time +
    (received − sent_at)`. One still more than `MAX_FUTURE` after the receive time is refused (`_Invalid`)."""
    if device_time is None or sent_at is None or received is None:
        return received
    try:
        corrected = device_time + (received - sent_at)
    except OverflowError:
        raise _Invalid("eventTime", "out of range once corrected by the device clock's error "
                                    "(receivedAt − sentAt)") from None
    if corrected > received + MAX_FUTURE:
        ahead = (corrected - received).total_seconds() / 3600
        raise _Invalid("eventTime", f"{ahead:.1f} hours after it was received, even corrected by the device clock's "
                                    "error (receivedAt − sentAt): at most 1 hour is accepted")
    return corrected


def new_event_id() -> str:
    """A UUIDv7: time-ordered, so ids assigned together sort together."""
    return str(uuid_utils.uuid7())


_RAW_OBJECT = msgspec.json.Decoder(dict[str, msgspec.Raw])
_KEY_ENCODER = msgspec.json.Encoder()
_UNKNOWN_FIELD = "Object contains unknown field"


def _extra_column(given: str | None, captured: dict[str, msgspec.Raw], path: str) -> str | None:
    """The JSON object of an extra column: the keys of a `given` one (a producer's, or a canonical line read
    again), then the `captured` unknown keys, values as sent; None when there are none. Applied to its own
    output it returns it unchanged, so a canonical line validates to itself."""
    items: dict[str, msgspec.Raw] = {}
    if given is not None:
        try:
            items = _RAW_OBJECT.decode(given)
        except msgspec.DecodeError:
            raise _Invalid(path, "expected a string holding a JSON object") from None
    items.update(captured)
    if not items:
        return None
    parts = [_KEY_ENCODER.encode(key) + b":" + bytes(value) for key, value in items.items()]
    return (b"{" + b",".join(parts) + b"}").decode("utf-8")  # UnicodeDecodeError: bytes that are not UTF-8


class EventValidator:
    """Validates single JSON events and renders them canonical.

    `event_time="server"` (the collector): eventTime is the receive time passed to `validate`; a client's own
    eventTime is kept as `eventParams.client_event_time` when that is absent, as the seed's Lambda does.
    `event_time="input"` (`gamestream load`): the event's own eventTime is kept; absent is stamped with `now`,
    explicit null stays null (the processor quarantines it).
    geo_country: in "server" mode the `country` given to `validate` replaces whatever the event says (a given
    value must still be a string of two characters, as a given receivedAt must be a time); in "input" mode the
    event's own code is kept, and must be two capital letters.

    >>> v = EventValidator(event_time="input")
    >>> v.validate(b'{"eventName":"x","eventParams":{"device_id":"d1"},"eventTime":0,"eventId":"e1"}', now=None)
    ValidEvent(device_id='d1', line=b'{"eventName":"x","eventParams":{"device_id":"d1"},"eventId":"e1","eventTime":"1970-01-01T00:00:00Z"}')
    """

    def __init__(self, *, event_time: Literal["server", "input"], params: Params = ()) -> None:
        params = check_params(params)
        # Two decoders: the one that refuses unknown keys answers for the usual event in one pass; an event it
        # refuses for an unknown key (only for that) is decoded again by the one that skips them, and its
        # unknown keys are picked out of the raw object. Every other error comes first in document order in
        # both, so the reason is the same either way.
        self._decoder = msgspec.json.Decoder(input_event(params, forbid_unknown=True))
        self._lenient = msgspec.json.Decoder(input_event(params))
        self._encoder = msgspec.json.Encoder()
        self._server_time = event_time == "server"
        fields = event_fields(params)
        self._known = frozenset(f.name for f in fields if not f.derived)
        self._known_params = frozenset(c.name for c in params_field(params).children)
        self._param_times = tuple(c.name for c in params_field(params).children
                                  if c.kind == "timestamp" and c.name != "client_event_time")

    def validate(self, line: bytes | str, now: dt.datetime | None,
                 sent_at: dt.datetime | None = None, country: str | None = None) -> ValidEvent | Rejection:
        """Checks one event; `now` (UTC) stamps eventTime and receivedAt where the mode says so; `sent_at` (the
        request's Sent-At header) is the sentAt of an event that gives none; `country` (server mode: the
        client's country, `ingest.geo`) is its geo_country, whatever the event says."""
        try:
            try:
                event = self._decoder.decode(line)
                has_unknown = False
            except msgspec.ValidationError as error:
                if not str(error).startswith(_UNKNOWN_FIELD):
                    raise
                event = self._lenient.decode(line)
                has_unknown = True
            return self._normalise(event, now, line if has_unknown else None, sent_at, country)
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

    def _keep_unknown(self, event: Any, line: bytes | str | None) -> None:
        """Fills the extra columns: unknown keys of `line` (None: it has none) joined to any given ones."""
        captured: dict[str, msgspec.Raw] = {}
        captured_params: dict[str, msgspec.Raw] = {}
        if line is not None:
            raw = _RAW_OBJECT.decode(line)
            captured = {k: v for k, v in raw.items() if k not in self._known}
            captured_params = {k: v for k, v in _RAW_OBJECT.decode(raw["eventParams"]).items()
                               if k not in self._known_params}
        event.eventParams_extra = _extra_column(event.eventParams_extra, captured_params, PARAMS_EXTRA)
        event.event_extra = _extra_column(event.event_extra, captured, EVENT_EXTRA)

    def _normalise(self, event: Any, now: dt.datetime | None, unknown: bytes | str | None,
                   sent_at: dt.datetime | None = None, country: str | None = None) -> ValidEvent:
        params = event.eventParams
        if unknown is not None or event.eventParams_extra is not None or event.event_extra is not None:
            self._keep_unknown(event, unknown)
        for name in self._param_times:
            value = getattr(params, name)
            if value is not None:
                setattr(params, name, _to_utc(value, f"eventParams.{name}"))
        if params.client_event_time is not None:
            params.client_event_time = _to_utc(params.client_event_time, "eventParams.client_event_time")
        event.sentAt = _to_utc(event.sentAt, SENT_AT) if event.sentAt is not None else sent_at
        if self._server_time:
            if params.client_event_time is None and event.eventTime not in (None, msgspec.UNSET):
                params.client_event_time = _to_utc(event.eventTime, "eventTime")
            if event.receivedAt is not None:  # the server's own time replaces it, but it must be a time
                _to_utc(event.receivedAt, RECEIVED_AT)
            event.receivedAt = now
            event.eventTime = corrected_time(params.client_event_time, event.sentAt, now)
            event.geo_country = country  # the server's lookup, never the client's word
        else:
            if event.geo_country is not None and not _ALPHA2.match(event.geo_country):
                raise _Invalid(GEO_COUNTRY, "expected an ISO 3166-1 alpha-2 country code in capitals, such as US")
            event.receivedAt = _to_utc(event.receivedAt, RECEIVED_AT) if event.receivedAt is not None else now
            if event.eventTime is msgspec.UNSET:
                event.eventTime = now
            elif event.eventTime is not None:
                event.eventTime = _to_utc(event.eventTime, "eventTime")
        if event.eventId is None:
            event.eventId = new_event_id()
        # An explicit null eventTime is encoded as null (its default is UNSET, so omit_defaults keeps it).
        return ValidEvent(device_id=params.device_id, line=self._encoder.encode(event))

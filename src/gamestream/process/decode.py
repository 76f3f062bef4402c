"""Turning log records into Arrow rows for the events table, and quarantine rows for what does not fit.

Arrow records (`gamestream.log.payload`: what the collector and `load` write when a whole batch passed the
vectorised checks) are read as they are and concatenated; only their rows' required fields are checked again.

Records the log could not read as events (`LogRecord.refused`: a foreign producer's Kafka message that is empty,
not UTF-8 or not JSON) are quarantined whole, with the log's reason, which names where the message sits.

Records holding one API Gateway proxy event (the seed's Lambda wrote those) are unwrapped first
(`gamestream.log.envelope.unwrap`): their body's events, validated and given ids derived from the record's place in
the log, join the NDJSON records; what fails is quarantined with the whole record as its payload.

NDJSON records (the native front's, older versions, batches that held a bad event, foreign producers). Fast path:
the records' canonical NDJSON is decoded in one call — natively (`gamestream_native.decode_lines`) when every line
is one it reads exactly as pyarrow's JSON reader would, else by that reader — with the explicit schema, then
checked column-wise
(eventTime, eventName, device_id present). The reader refuses a field the schema lacks instead of skipping it:
records it cannot decode so (written under a configuration that promotes a parameter this one does not, or by a
foreign producer) are read again one by one, and a record that still fails falls back to the line-by-line
validator, which keeps unknown fields in the extra columns and quarantines what is invalid — so one bad line
costs its own row, never its batch's, and no value is skipped.

Everything is decoded with the processor's schema (`params`: `schema.effective_params`, the parameters the
events table has plus those its configuration promotes); an Arrow record written under another configuration
is conformed to it (`schema.conform`, which keeps what the schema lacks in the extra columns).
"""

from __future__ import annotations

import bisect
import datetime as dt
import itertools
from dataclasses import dataclass, field
from functools import lru_cache

import gamestream_native
import msgspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

from gamestream import schema
from gamestream.log import LogRecord, envelope, payload

_READ_OPTIONS = pj.ReadOptions(block_size=8 << 20)


@dataclass(frozen=True)
class _Codec:
    """One configuration's decoding: its schemas, the JSON reader's options, the per-event validator."""

    params: schema.Params
    decode_schema: pa.Schema
    table_schema: pa.Schema
    parse_options: pj.ParseOptions
    validator: schema.EventValidator
    native_fields: list | None  # `gamestream_native.decode_lines`' description of decode_schema (None: pyarrow's)


_NATIVE_KINDS = {pa.string(): 0, pa.int32(): 1, pa.int64(): 2, pa.float64(): 3, pa.bool_(): 4,
                 pa.timestamp("us", tz="UTC"): 5}


def _native_fields(fields) -> list | None:
    """`gamestream_native.decode_lines`' description of a schema's fields: (name, kind, children); None when a
    type is one it does not read."""
    described = []
    for one in fields:
        if pa.types.is_struct(one.type):
            children = _native_fields(list(one.type))
            if not children:
                return None
            described.append((one.name, 6, children))
        elif one.type in _NATIVE_KINDS:
            described.append((one.name, _NATIVE_KINDS[one.type], []))
        else:
            return None
    return described


def _native_table(payloads: list[bytes], codec: _Codec) -> pa.Table | None:
    """The payloads' lines as `gamestream_native.decode_lines` reads them, or None where it hands them back."""
    if codec.native_fields is None:
        return None
    decoded = gamestream_native.decode_lines(payloads, codec.native_fields)
    if decoded is None:
        return None
    rows, columns = decoded
    return pa.Table.from_arrays([_native_array(f.type, rows, c) for f, c in zip(codec.decode_schema, columns)],
                                schema=codec.decode_schema)


def _native_array(kind: pa.DataType, rows: int, column: tuple) -> pa.Array:
    """An array of `decode_lines`' buffers (validity bitmap or None, then offsets and data, values, or a struct's
    children)."""
    validity, *buffers = column
    validity = pa.py_buffer(validity) if validity is not None else None
    if pa.types.is_struct(kind):
        children = [_native_array(child.type, rows, part) for child, part in zip(kind, buffers[0])]
        return pa.Array.from_buffers(kind, rows, [validity], children=children)
    return pa.Array.from_buffers(kind, rows, [validity, *map(pa.py_buffer, buffers)])


@lru_cache(maxsize=None)
def _codec(params: schema.Params) -> _Codec:
    decode_schema = schema.decode_schema(params)
    return _Codec(params, decode_schema, schema.arrow_schema(params=params),
                  # "error", not "ignore": a field the schema lacks must reach the validator, which keeps it
                  pj.ParseOptions(explicit_schema=decode_schema, unexpected_field_behavior="error"),
                  # now=None when validating: an event that reached the log without eventTime is not stamped
                  # here, it is quarantined
                  schema.EventValidator(event_time="input", params=params), _native_fields(list(decode_schema)))


@dataclass
class Decoded:
    events: list[pa.Table] = field(default_factory=list)
    quarantine: list[dict] = field(default_factory=list)
    params: schema.Params = ()
    keys: list[tuple] | None = None  # per events table, its identity keys when computed as read (process/identity.py)

    def events_table(self) -> pa.Table:
        """The event rows, with `schema.arrow_schema(params=...)`."""
        if not self.events:
            return schema.arrow_schema(params=self.params).empty_table()
        return pa.concat_tables(self.events)

    def quarantine_table(self) -> pa.Table:
        return pa.Table.from_pylist(self.quarantine, schema=schema.QUARANTINE_SCHEMA)


def _read_json(payloads: list[bytes], codec: _Codec) -> pa.Table:
    """The payloads' lines (as if joined by newlines) as a table of `codec.decode_schema`: read natively when
    `gamestream_native.decode_lines` proves it reads them as pyarrow's JSON reader would (canonical lines: ~2.5x
    less CPU, and no joined copy), else by that reader, whose errors (`pa.ArrowInvalid`) the callers act on."""
    table = _native_table(payloads, codec)
    if table is not None:
        return table
    # the bytes as an Arrow buffer, not a Python file object (io.BytesIO), which the reader copied out of in
    # pieces: `process --until-idle` over the HTTP path's million events peaked at 530-546 MB against 727-782 MB
    payload = payloads[0] if len(payloads) == 1 else b"\n".join(payloads)
    return pj.read_json(pa.BufferReader(payload), read_options=_READ_OPTIONS, parse_options=codec.parse_options)


def _lines(payload: bytes) -> list[bytes]:
    return [line for line in payload.split(b"\n") if line.strip()]


def decode_records(records: list[LogRecord], now: dt.datetime | None = None, *,
                   params: schema.Params = ()) -> Decoded:
    """Decodes `records` (any partitions) into event rows with `eventDate` (`schema.arrow_schema(params=params)`),
    and quarantine rows with reasons."""
    now = now or dt.datetime.now(dt.timezone.utc)
    codec = _codec(params)
    out = Decoded(params=codec.params)
    if not records:
        return out
    json_records = []
    arrow_records = []
    for record in records:
        if record.refused is not None:  # a foreign message the log could not read as events: quarantined whole
            out.quarantine.append(_quarantine_row(record, record.payload, record.refused, now))
        elif payload.is_arrow(record.payload):
            arrow_records.append(record)
        elif (unwrapped := envelope.unwrap(record)) is not None:  # an API Gateway proxy event (the seed's Lambda)
            out.quarantine += [_quarantine_row(record, record.payload, why, now) for why in unwrapped.rejected]
            if unwrapped.record is not None:
                json_records.append(unwrapped.record)
        else:
            json_records.append(record)
    if arrow_records:
        _decode_arrow(arrow_records, out, now, codec)
    if json_records:
        _decode_json(json_records, out, now, codec)
    return out


def _decode_arrow(records: list[LogRecord], out: Decoded, now: dt.datetime, codec: _Codec) -> None:
    """Arrow records: read back, concatenated, checked and given eventDate in one pass."""
    tables, owners = [], []
    for record in records:
        try:
            tables.append(payload.decode(record.payload, codec.params))
            owners.append(record)
        except ValueError as error:
            out.quarantine.append(_quarantine_row(record, b"", f"{error} ({len(record.payload)} bytes)", now))
    if not tables:
        return
    table = pa.concat_tables(tables)
    invalid = pc.fill_null(_invalid_mask(table), True)
    if not pc.any(invalid).as_py():
        out.events.append(_with_event_date(table, codec))
        return
    out.events.append(_with_event_date(table.filter(pc.invert(invalid)), codec))
    starts = list(itertools.accumulate((t.num_rows for t in tables), initial=0))
    for i in pc.indices_nonzero(invalid).to_pylist():
        record = owners[bisect.bisect_right(starts, i) - 1]
        row = table.slice(i, 1).to_pylist()[0]
        line = _ENCODER.encode(_without_nulls(row))  # the canonical line the per-event path would have written
        out.quarantine.append(_quarantine_row(record, line, _reason(row), now))


_ENCODER = msgspec.json.Encoder()


def _without_nulls(row: dict) -> dict:
    """Canonical form omits null fields, except an explicit null eventTime (kept, so it is quarantined)."""
    return {k: _without_nulls(v) if isinstance(v, dict) else v for k, v in row.items()
            if v is not None or k == "eventTime"}


def _decode_json(records: list[LogRecord], out: Decoded, now: dt.datetime, codec: _Codec) -> None:
    """The records in one read when the reader takes them all; else each record alone, and a record the reader
    refuses (an unknown field, a foreign producer's line) line by line through the validator."""
    try:
        table = _read_json([r.payload for r in records], codec)
        line_counts = [len(_lines(r.payload)) for r in records] if _needs_line_map(table) else None
        if line_counts is not None and sum(line_counts) != table.num_rows:
            raise ValueError("lines and rows disagree")
    except (pa.ArrowInvalid, ValueError):
        for record in records:
            if len(records) > 1:
                _decode_json([record], out, now, codec)
            else:
                _decode_record_slowly(record, out, now, codec)
        return
    _check_and_split(table, records, line_counts, out, now, codec)


def _needs_line_map(table: pa.Table) -> bool:
    return bool(pc.any(_invalid_mask(table)).as_py())


def _invalid_mask(table: pa.Table) -> pa.ChunkedArray:
    name = table["eventName"]
    device = pc.struct_field(table["eventParams"], "device_id")
    return pc.or_(
        pc.or_(pc.is_null(table["eventTime"]), pc.is_null(table["eventParams"])),
        pc.or_(pc.fill_null(pc.equal(name, ""), True), pc.fill_null(pc.equal(device, ""), True)),
    )


def _reason(row: dict) -> str:
    if row["eventTime"] is None:
        return "eventTime: null (the seed's eventTime.isNotNull() filter)"
    if not row["eventName"]:
        return "eventName: required"
    return "eventParams.device_id: required"


def _check_and_split(table: pa.Table, records: list[LogRecord], line_counts: list[int] | None, out: Decoded,
                     now: dt.datetime, codec: _Codec) -> None:
    if line_counts is None:  # every row is good
        out.events.append(_with_event_date(table, codec))
        return
    invalid = _invalid_mask(table)
    out.events.append(_with_event_date(table.filter(pc.invert(invalid)), codec))
    bad_rows = pc.indices_nonzero(pc.fill_null(invalid, True)).to_pylist()
    bad = set(bad_rows)
    row = 0
    for record, count in zip(records, line_counts):
        if any(row <= i < row + count for i in bad_rows):
            for i, line in enumerate(_lines(record.payload), start=row):
                if i in bad:
                    out.quarantine.append(_quarantine_row(record, line, _reason(table.slice(i, 1).to_pylist()[0]), now))
        row += count


def _decode_record_slowly(record: LogRecord, out: Decoded, now: dt.datetime, codec: _Codec) -> None:
    good: list[bytes] = []
    for line in _lines(record.payload):
        result = codec.validator.validate(line, now=None)
        if isinstance(result, schema.Rejection):
            out.quarantine.append(_quarantine_row(record, line, str(result), now))
        else:
            good.append(result.line)
    if good:
        canonical = LogRecord(record.partition, record.offset, b"\n".join(good), len(good), record.appended_at)
        table = _read_json([canonical.payload], codec)
        _check_and_split(table, [canonical], [len(good)] if _needs_line_map(table) else None, out, now, codec)


def _with_event_date(table: pa.Table, codec: _Codec) -> pa.Table:
    """`table` (decode schema) with eventDate, as `codec.table_schema` (the columns in the table's order)."""
    # UTC values, so dropping the zone first gives the same dates without a per-chunk time-zone lookup (~18x)
    event_date = table["eventTime"].cast(pa.timestamp("us")).cast(pa.date32())
    columns = [event_date if f.name == schema.PARTITION_COLUMN else table[f.name] for f in codec.table_schema]
    return pa.Table.from_arrays(columns, schema=codec.table_schema)


_INT64_MAX = 2**63 - 1


def _quarantine_row(record: LogRecord, line: bytes, reason: str, now: dt.datetime) -> dict:
    fits = record.offset <= _INT64_MAX  # a Kinesis sequence number has up to 56 digits: then it goes in the reason
    return {
        "quarantinedAt": now,
        "reason": reason if fits else f"{reason} (log position {record.offset})",
        "payload": line.decode("utf-8", errors="replace"),
        "logPartition": record.partition,
        "logOffset": record.offset if fits else None,
        "quarantineDate": now.date(),
    }

"""Validating a whole batch of events at once, column-wise (the fast path in front of `schema.EventValidator`).

`validate_batch(events, ...)` either proves that *every* event in the batch is valid under exactly the rules of
`schema.EventValidator.validate` and returns the events as Arrow tables per log partition, with the values the
per-event path would have produced; or it returns None, and the caller runs the per-event path over the same
list (so which events are rejected, and why, never depends on this module). None is always safe: anything this
module is not sure about goes there.

Why pyarrow's JSON reader and not msgspec (measured on 100k `generator.simulate` events, ~340 bytes each, in
chunks of 5000, on the 2-core development machine while other jobs used it; best of several runs):
`pyarrow.json.read_json` with an explicit schema parses a chunk into columns in ~1.35 µs/event on one thread
(~0.95 µs/event of wall time with its threads on 256 KiB blocks); msgspec decoding the same chunk into a list
of `schema.InputEvent` structs in one call takes ~2.0 µs/event *before* any column exists, and building Arrow
columns from structs needs per-event Python (another µs or more). The whole of `validate_batch` then costs
~1.8-2.3 µs/event of wall time against ~1.6-1.8 µs/event for `EventValidator.validate` alone (~2.0-2.3 with
the grouping by partition), so the gain is downstream: the processor gets Arrow instead of parsing JSON again.
A call has a fixed cost of ~1-1.5 ms (see `MIN_BATCH_EVENTS`), so small batches are better off event by event.
The reader is laxer than msgspec in a few places, closed here:

- It accepts ``NaN``/``Infinity`` literals, invalid UTF-8 inside strings, a UTF-8 BOM at the start, values
  nested deeper than msgspec follows, and ``-0`` as -0.0 for a double (msgspec: 0.0). So: the buffer is
  checked as UTF-8, and the read refuses unknown fields (then the only doubles are known columns, checked
  finite and not -0.0). A batch holding an unknown field goes to the per-event path, which keeps such fields
  in the extra columns (`schema.PARAMS_EXTRA`, `schema.EVENT_EXTRA`) with their values exactly as sent —
  the reader cannot hand out a value's raw text — as does one that gives an extra column itself.
- Its JSON parser takes a stream of values, not one per line, and a first value ``null`` crashes the process
  (segfault, pyarrow 26). So every event must start with ``{`` and end with ``}`` (checked at the offsets of the
  joined buffer, see `_framed`), and the table must have exactly n rows, each with an eventParams object: then
  row i is event i.
- Its timestamp parser is laxer than RFC 3339 (``+02``, no seconds); timestamps are read as strings, must match
  a strict pattern, then are cast to ``timestamp("us", tz="UTC")``, which refuses a string without a zone. A
  column of epoch numbers is read again as float64 and converted with CPython's rounding (half-even µs).
- Duplicate keys, floats or out-of-range integers for int32, bools or numbers for strings, non-object events,
  trailing garbage: the reader raises, hence None.

Promoted parameters (`params`, from `[schema.params]`) are columns of the read schema with their own types
and the same checks as the fields of that type (doubles finite and not -0.0, timestamps as above).

Unsupported here (None, the per-event path decides): str items (already known bad), events over
`max_event_bytes`, a column mixing string and numeric timestamps, fractional seconds beyond µs, and any of the
above. In "input" mode a null eventTime is absent (stamped with `now`) or an explicit null (kept, quarantined by
the processor); the column cannot tell, so those few events' own bytes are probed.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Literal, Sequence

import gamestream_native
import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

from gamestream import schema

_TS = pa.timestamp("us", tz="UTC")
# RFC 3339 as msgspec takes it, narrowed to what Arrow's cast parses the same way: seconds required, at most
# six fractional digits, a zone required (Z or ±hh:mm).
_RFC3339 = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?(Z|[+-][0-9]{2}:[0-9]{2})$"
_MIN_US = int((dt.datetime(1, 1, 1, tzinfo=dt.timezone.utc) - dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc))
              / dt.timedelta(microseconds=1))
_MAX_US = schema.EPOCH_MAX * 1_000_000 + 999_999
_NEGATIVE_ZERO_BITS = -(2**63)
_BLOCK = 256 << 10  # the reader's block size when it may use threads
MIN_BATCH_EVENTS = 1000
"""Below this many events a batch is cheaper per event (`EventValidator`, ~2 µs/event here) than through
`validate_batch`, whose fixed cost is ~1-1.5 ms a call (pyarrow's JSON reader alone ~0.2-0.45 ms, each of ~40
compute calls ~10 µs, an RE2 compile per timestamp column ~60 µs). Callers with small batches (the collector:
at most `max_events_per_request`, 500 by default) skip it below this."""
_STRING_TO_NUMBER = re.compile(r"Column\((?P<path>/[^)]*)\) changed from string to number")


@dataclass(frozen=True)
class _Layout:
    """What the checks need to know of one configuration's schema."""

    out: pa.Schema  # schema.decode_schema(params): what validate_batch returns
    params_type: pa.StructType
    time_paths: frozenset[str]  # reader paths of timestamp columns, e.g. /eventParams/client_event_time
    double_params: tuple[str, ...]  # eventParams children of type double


@lru_cache(maxsize=None)
def _layout(params: schema.Params) -> _Layout:
    out = schema.decode_schema(params)
    fields = schema.params_field(params).children
    return _Layout(out, out.field("eventParams").type,
                   frozenset([f"/{f.name}" for f in out if f.type == _TS]
                             + [f"/eventParams/{c.name}" for c in fields if c.kind == "timestamp"]),
                   tuple(c.name for c in fields if c.kind == "double"))


@lru_cache(maxsize=None)
def _read_schema(params: schema.Params, numeric: frozenset[str]) -> pa.Schema:
    """The layout's output schema with timestamps read as strings, or as float64 at the `numeric` paths."""
    def ts(path: str) -> pa.DataType:
        return pa.float64() if path in numeric else pa.string()

    layout = _layout(params)
    event_params = pa.struct([pa.field(f.name, ts(f"/eventParams/{f.name}") if f.type == _TS else f.type)
                              for f in layout.params_type])
    return pa.schema([pa.field(f.name, ts(f"/{f.name}") if f.type == _TS
                               else event_params if f.name == "eventParams" else f.type) for f in layout.out])


READER_THREADS = True
"""Whether the JSON reader may parse a large buffer on Arrow's threads: not in a process that is one of several
validating at once (each of `load`'s workers, `loader.load_pool`), where the cores are busy already — there,
the threads' hand-offs cost more than they bring (8 files of 125k events: 1.87–2.0 s against 1.99–2.07 s)."""


def _read(joined: bytes, events: int, params: schema.Params, *, split_at_newlines: bool = False) -> pa.Table | None:
    """The buffer as a table with every field of the event schema (timestamps as strings, or float64 where a
    column held numbers), or None; None too when an event has a field the schema does not know.
    `split_at_newlines`: the events were cut at the buffer's newlines (`Lines`), so none holds one."""
    time_paths = _layout(params).time_paths
    numeric: frozenset[str] = frozenset()
    if READER_THREADS and len(joined) >= 2 * _BLOCK and (split_at_newlines or joined.count(b"\n") == events - 1):
        # Lines are events (none holds a newline), so the reader may cut the buffer into blocks at newlines and
        # parse them on its threads (2 cores: ~1.5x faster on 5000 generator events).
        read_options = pj.ReadOptions(block_size=_BLOCK, use_threads=True)
    else:
        read_options = pj.ReadOptions(block_size=len(joined) + 1, use_threads=False)
    for _ in range(len(time_paths) + 1):
        parse_options = pj.ParseOptions(explicit_schema=_read_schema(params, numeric),
                                        unexpected_field_behavior="error")
        try:
            return pj.read_json(pa.BufferReader(joined), read_options=read_options, parse_options=parse_options)
        except pa.ArrowInvalid as error:
            switch = _STRING_TO_NUMBER.search(str(error))
            if not switch or switch["path"] not in time_paths or switch["path"] in numeric:
                return None  # an unknown field (kept by the per-event path), or any other refusal
            numeric = numeric | {switch["path"]}
        except Exception:  # anything else the reader may raise: the per-event path decides
            return None
    return None


def _all(mask: pa.Array | pa.ChunkedArray) -> bool:
    """True when every value is true (nulls count as true)."""
    return bool(pc.all(mask).as_py() is not False)


def _string_times(column: pa.Array) -> pa.Array | None:
    """RFC 3339 strings with a zone → UTC µs timestamps (null stays null), or None when any is not one the
    validator takes in exactly this way."""
    if column.null_count == len(column):
        return pa.nulls(len(column), _TS)
    if not _all(pc.match_substring_regex(column, _RFC3339)):
        return None
    try:
        times = column.cast(_TS)  # refuses a string without a zone, impossible dates, year 0
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    micros = times.cast(pa.int64())
    low, high = pc.min_max(micros).values()
    if low.as_py() < _MIN_US or high.as_py() > _MAX_US:  # years 1..9999 in UTC, as astimezone allows
        return None
    return times


def _epoch_times(column: pa.Array) -> pa.Array | None:
    """Epoch seconds (float64; ints are exact there) → UTC µs timestamps as `dt.datetime.fromtimestamp` makes
    them (integral part, plus the fraction in µs rounded half to even), or None when any is out of range."""
    if column.null_count == len(column):
        return pa.nulls(len(column), _TS)
    if not _all(pc.and_(pc.is_finite(column), pc.and_(pc.greater_equal(column, 0.0),
                                                      pc.less_equal(column, float(schema.EPOCH_MAX))))):
        return None
    whole = pc.trunc(column)
    fraction = pc.round(pc.multiply(pc.subtract(column, whole), 1e6), 0, round_mode="half_to_even")
    micros = pc.add(pc.multiply(whole.cast(pa.int64()), 1_000_000), fraction.cast(pa.int64()))
    if pc.max(micros).as_py() > _MAX_US:  # 253402300799.9999999 rounds into year 10000: fromtimestamp raises
        return None
    return micros.cast(_TS)


def _times(column: pa.Array) -> pa.Array | None:
    if pa.types.is_floating(column.type):
        return _epoch_times(column)
    return _string_times(column)


def _non_empty(column: pa.Array) -> bool:
    return column.null_count == 0 and pc.min(pc.binary_length(column)).as_py() > 0


def _partition_of(device_id: pa.Array, partitions: int, route: Callable[[str], int] | None) -> pa.Array:
    """`log.partition_for` (or the log's own `route`) for every row: once per distinct device id, then a
    lookup."""
    encoded = device_id.dictionary_encode()
    if route is not None:
        return pc.take(pa.array([route(d) for d in encoded.dictionary.to_pylist()], pa.int32()), encoded.indices)
    names = encoded.dictionary.cast(pa.string())
    _, offsets, data = names.buffers()
    crcs = np.empty(len(names), dtype=np.int32)  # zlib's CRC-32, natively (a Python call per device before)
    gamestream_native.crc32_partitions(
        np.frombuffer(offsets, dtype=np.int32)[names.offset:names.offset + len(names) + 1].view(np.uint8),
        np.frombuffer(data, dtype=np.uint8) if data is not None else np.empty(0, np.uint8), partitions,
        crcs.view(np.uint8))
    return pc.take(pa.Array.from_buffers(pa.int32(), len(crcs), [None, pa.py_buffer(crcs)]), encoded.indices)


def _framed(lengths: pa.Array, joined: bytes, max_event_bytes: int) -> bool:
    """Whether every event is within `max_event_bytes`, starts with ``{`` and ends with ``}``, and the buffer
    is UTF-8. With the separators being newlines, a ``}`` then ``{`` across a separator means the event before
    it closed all its values (inside a value, ``}`` is followed by ``,``, ``}`` or ``]``; a string cannot hold
    a raw newline) and the one after starts with an object: each event then yields at least one row, so n rows
    means exactly one object per event, row i being event i. This also keeps a leading ``null`` (which crashes
    pyarrow's reader) and a UTF-8 BOM away from the reader."""
    shortest, longest = pc.min_max(lengths).values()
    if shortest.as_py() < 2 or longest.as_py() > max_event_bytes:
        return False
    data = pa.Array.from_buffers(pa.uint8(), len(joined), [None, pa.py_buffer(joined)])
    ends = pc.add(pc.cumulative_sum(lengths), pa.array(range(len(lengths)), pa.int64()))  # exclusive, in joined
    first = data.take(pc.subtract(ends, lengths))
    last = data.take(pc.subtract(ends, 1))
    if not (pc.all(pc.equal(first, ord("{"))).as_py() and pc.all(pc.equal(last, ord("}"))).as_py()):
        return False
    try:  # UTF-8 (the reader does not check it)
        pa.Array.from_buffers(pa.large_string(), 1, [None, pa.array([0, len(joined)], pa.int64()).buffers()[1],
                                               data.buffers()[1]]).validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True


class _EventTimeProbe(msgspec.Struct):
    """Only whether an event has the key eventTime (its value is already known to be null)."""

    eventTime: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET  # noqa: N815 - the event's own name


_PROBE = msgspec.json.Decoder(_EventTimeProbe)


def _stamp_absent(event_time: pa.Array, events: Sequence[bytes | str], now: dt.datetime | None) -> pa.Array:
    """Input mode: a null eventTime of an event without the key is stamped with `now` (as `EventValidator` does);
    an explicit ``"eventTime": null`` stays null (the processor quarantines it, the seed's isNotNull filter).
    Decodes only those events (parsed before: valid JSON, no duplicate keys)."""
    nulls = pc.indices_nonzero(pc.is_null(event_time)).to_pylist()
    absent = [i for i in nulls if _PROBE.decode(events[i]).eventTime is msgspec.UNSET]
    if not absent or now is None:
        return event_time
    mask = pc.is_in(pa.array(range(len(event_time)), pa.int64()), value_set=pa.array(absent, pa.int64()))
    return pc.if_else(mask, pa.scalar(now, _TS), event_time)


class Lines(Sequence[bytes]):
    """The lines of a block of NDJSON (one event per line, the last newline optional) as `validate_batch`'s
    events, without a Python object per line: their lengths come from the newlines' positions, and a line is
    made a bytes object only when asked for (`_stamp_absent` probes a few). A blank line, a CR or any padding
    makes `validate_batch` None, as for the lines as they are."""

    def __init__(self, block: bytes) -> None:
        self.joined = block[:-1] if block.endswith(b"\n") else block
        after_newlines, _ = gamestream_native.newline_cuts(self.joined, 1, 0)  # natively: numpy's scan is 5× slower
        self.ends = np.append(np.array(after_newlines, dtype=np.int64) - 1, len(self.joined))
        lengths = np.diff(self.ends, prepend=-1) - 1
        # (from the buffer: `pa.array` of a numpy array would import pandas, when installed, in every worker)
        self.lengths = pa.Array.from_buffers(pa.int64(), len(lengths), [None, pa.py_buffer(lengths)])

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, index):  # type: ignore[override]
        start = int(self.ends[index - 1]) + 1 if index > 0 else 0
        return self.joined[start:int(self.ends[index])]


def validate_batch(events: Sequence[bytes | str], *, now: dt.datetime | None, mode: Literal["server", "input"],
                   partitions: int, max_event_bytes: int, route: Callable[[str], int] | None = None,
                   params: schema.Params = (), sent_at: dt.datetime | None = None,
                   country: str | None = None) -> dict[int, pa.Table] | None:
    """`events` (raw JSON objects, one per item) as `{log partition: table with schema.decode_schema(params)}`,
    rows in input order within a partition; None unless every event is provably valid (see the module
    docstring). `sent_at` is the sentAt of the events that give none (the request's Sent-At); `country`, in
    "server" mode, every event's geo_country (the client's, `ingest.geo`)."""
    if isinstance(events, Lines):  # a block of NDJSON: joined already
        joined, lengths = events.joined, events.lengths
    else:
        joined = _joined(events)
        if joined is None:
            return None
        lengths = pa.array(list(map(len, events)), pa.int64())
    count = len(lengths)
    if not _framed(lengths, joined, max_event_bytes):
        return None
    layout = _layout(params)
    table = _read(joined, count, params, split_at_newlines=isinstance(events, Lines))
    if table is None or table.num_rows != count:
        return None
    table = table.combine_chunks()
    columns = {name: table.column(name).chunk(0) for name in table.column_names}
    if not _only_read_columns(columns, count):
        return None
    children = dict(zip([f.name for f in columns["eventParams"].type], columns["eventParams"].flatten()))
    device_id = children["device_id"]
    if not _non_empty(columns["eventName"]) or not _non_empty(device_id):
        return None
    event_id = columns["eventId"]
    if not _event_ids_fit(event_id, count) or not _doubles_as_msgspec_reads(children, layout.double_params, count):
        return None
    default_sent_at = sent_at
    event_time, sent_at, received = (_times(columns[name]) for name in ("eventTime", schema.SENT_AT,
                                                                          schema.RECEIVED_AT))
    if event_time is None or sent_at is None or received is None:
        return None
    if default_sent_at is not None and sent_at.null_count:
        sent_at = pc.coalesce(sent_at, pa.scalar(default_sent_at, _TS))
    param_times = _param_times(children, layout)
    if param_times is None:
        return None
    children.update(param_times)
    times = _times_for_mode(mode, event_time, children["client_event_time"], sent_at, received, events, now)
    if times is None:
        return None
    event_time, children["client_event_time"], received = times
    geo_country = _geo_country(columns[schema.GEO_COUNTRY], mode, country)
    if geo_country is None:
        return None
    out = _output_table(layout, columns, _with_fresh_ids(event_id), event_time, children, sent_at, received,
                        geo_country)
    part = _partition_of(device_id, partitions, route)
    if partitions == 1 and route is None:
        return {0: out}
    return _split_by_partition(out, part)


def _joined(events: Sequence[bytes | str]) -> bytes | None:
    """The events joined by newlines; None for no event, or for a str item (already known bad)."""
    if not events:
        return None
    try:
        return b"\n".join(events)  # type: ignore[arg-type]
    except TypeError:
        return None


def _only_read_columns(columns: dict[str, pa.Array], count: int) -> bool:
    """Whether every event has an eventParams object and none gives an extra column itself (given extra columns
    are checked and joined by the per-event path)."""
    if columns["eventParams"].null_count:
        return False
    return not (columns[schema.PARAMS_EXTRA].null_count < count or columns[schema.EVENT_EXTRA].null_count < count)


def _event_ids_fit(event_id: pa.Array, count: int) -> bool:
    """Whether every given eventId is 1 to `schema.EVENT_ID_MAX` characters long."""
    if event_id.null_count < count:
        lengths = pc.utf8_length(event_id)
        low, high = pc.min_max(lengths).values()
        if low.as_py() < 1 or high.as_py() > schema.EVENT_ID_MAX:
            return False
    return True


def _doubles_as_msgspec_reads(children: dict[str, pa.Array], double_params: tuple[str, ...], count: int) -> bool:
    """Whether every double parameter holds what msgspec would read: finite, and not -0.0."""
    for name in double_params:
        amount = children[name]
        if amount.null_count < count:
            if not _all(pc.is_finite(amount)):  # NaN/Infinity literals, 1e999 as an integer literal
                return False
            # msgspec reads the integer literal -0 as 0.0, the reader as -0.0; a float literal -0.0 is -0.0 in
            # both
            if not _all(pc.not_equal(amount.view(pa.int64()), _NEGATIVE_ZERO_BITS)):
                return False
    return True


def _param_times(children: dict[str, pa.Array], layout: _Layout) -> dict[str, pa.Array] | None:
    """The eventParams timestamp columns as UTC µs timestamps, or None when any holds a value `_times` refuses."""
    converted = {}
    for field in layout.params_type:
        if field.type == _TS:
            times = _times(children[field.name])
            if times is None:
                return None
            converted[field.name] = times
    return converted


def _times_for_mode(mode: Literal["server", "input"], event_time: pa.Array, client_time: pa.Array,
                    sent_at: pa.Array, received: pa.Array, events: Sequence[bytes | str],
                    now: dt.datetime | None) -> tuple[pa.Array, pa.Array, pa.Array] | None:
    """(eventTime, client_event_time, receivedAt) as the validator sets them (`schema.corrected_time`): in
    "server" mode receivedAt is `now`, the client's time falls back on the eventTime it sent, and eventTime is
    `now` or, with sentAt, the client's time corrected by (now − sentAt); in "input" mode an absent eventTime and
    receivedAt are stamped with `now`. None when a corrected time lies too far ahead (the per-event path
    rejects it with its reason), or before year 1."""
    count = len(event_time)
    stamp = pa.nulls(count, _TS) if now is None else pa.repeat(pa.scalar(now, _TS), count)
    if mode == "server":
        client_time = pc.coalesce(client_time, event_time)
        event_time = stamp
        if now is not None and sent_at.null_count < count:
            error = pc.subtract(pa.scalar(now, _TS), sent_at)  # the device clock's error, null without sentAt
            corrected = pc.add(client_time, error)
            if pc.any(pc.greater(corrected, pa.scalar(now + schema.MAX_FUTURE, _TS))).as_py():
                return None
            # before year 1 (a sentAt thousands of years ahead): a datetime cannot hold it, and the per-event path
            # rejects the event as out of range
            if pc.any(pc.less(pc.cast(corrected, pa.int64()), _MIN_US)).as_py():
                return None
            event_time = pc.coalesce(corrected, stamp)
        return event_time, client_time, stamp
    if event_time.null_count:  # absent (stamped with now) or explicit null (kept): the column cannot tell,
        event_time = _stamp_absent(event_time, events, now)  # the few events' own bytes can
    return event_time, client_time, pc.coalesce(received, stamp)


def _geo_country(given: pa.Array, mode: Literal["server", "input"], country: str | None) -> pa.Array | None:
    """The geo_country column as `EventValidator` sets it: in "server" mode `country` for every row (a given
    value must be two characters long, and is replaced); in "input" mode the given codes, each two capital
    letters. None when a given value breaks that rule (the per-event path rejects the event with its reason)."""
    if given.null_count < len(given):
        rule = (pc.equal(pc.utf8_length(given), 2) if mode == "server"
                else pc.match_substring_regex(given, "^[A-Z]{2}$"))
        if not _all(rule):
            return None
    if mode == "input":
        return given
    return pa.repeat(pa.scalar(country, pa.string()), len(given)) if country is not None \
        else pa.nulls(len(given), pa.string())


def _with_fresh_ids(event_id: pa.Array) -> pa.Array:
    """The eventId column with a new id (`schema.new_event_id`) wherever the event gave none."""
    if not event_id.null_count:
        return event_id
    fresh = iter([schema.new_event_id() for _ in range(event_id.null_count)])
    return pa.array([value if value is not None else next(fresh) for value in event_id.to_pylist()], pa.string())


def _output_table(layout: _Layout, columns: dict[str, pa.Array], event_id: pa.Array, event_time: pa.Array,
                  children: dict[str, pa.Array], sent_at: pa.Array, received: pa.Array,
                  geo_country: pa.Array) -> pa.Table:
    out_params = pa.StructArray.from_arrays([children[f.name] for f in layout.params_type],
                                            fields=list(layout.params_type))
    return pa.Table.from_arrays([event_id, columns["eventName"], event_time, out_params,
                                 columns[schema.PARAMS_EXTRA], columns[schema.EVENT_EXTRA], sent_at, received,
                                 geo_country], schema=layout.out)


def _split_by_partition(out: pa.Table, part: pa.Array) -> dict[int, pa.Table]:
    """`out`'s rows grouped by their partition in `part`, keeping their order within a partition."""
    order = pc.sort_indices(part)  # stable: rows keep their order within a partition
    ordered = out.take(order)
    result: dict[int, pa.Table] = {}
    start = 0
    counts = pc.value_counts(part)
    for value, n in sorted(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist())):
        result[value] = ordered.slice(start, n)
        start += n
    return result

"""The collector's per-event validation in native code: "prove valid, or hand back", event by event.

`validate_native(events, received, sent_at, partitions, max_event_bytes=..., params=...)` runs
`gamestream_native.Validator` (native/src/validate.rs, Rust, GIL released) over one request's events and gives,
for each event, either ``(canonical line, partition)`` or None. What it proves: an event it answers for is one
`schema.EventValidator(event_time="server").validate(event, received, sent_at)` accepts, and the line parses
(`json.loads`) to what the validator's line parses to, keys in the same order — except a new eventId, which is
a UUIDv7 made in Rust at the receive time's millisecond (the validator's `schema.new_event_id` takes the clock
of the moment); the partition is `log.partition_for(device_id, partitions)`. None means "not sure": the caller
runs the Python validator on that event, which accepts it or says why not, so which events are rejected, and
the words, never depend on this module (as with `batch.validate_batch`, which does the same for a whole batch).

The schema is not written in Rust: `describe(params)` reads it here from `schema.input_event(params)` — the very
msgspec types the validator decodes with (`msgspec.inspect`): each field's name, in the order msgspec writes
it; its kind (string, int, double, boolean, timestamp, the eventParams object); whether it is required or may
be null; its limits (string lengths in code points, integer bounds); and its part in the time rules, named by
`schema`'s own constants (eventTime, sentAt, receivedAt, geo_country, client_event_time, the extra columns,
device_id). A type the kernel does not know makes `describe` raise, and `validate_native` then returns None: no
kernel (so does a role an older build of native/ does not know: the constructor refuses it).

Handed back (None) besides every invalid event: a str item (already a rejection), an event over
`max_event_bytes`, an unknown key at the top level or in eventParams (the validator keeps it, value exactly as
sent, in an extra column), an extra column given by the sender, a duplicate key (msgspec keeps the last), a
timestamp outside ``YYYY-MM-DDTHH:MM:SS[.f{1,6}](Z|±HH:MM)`` or epoch seconds (msgspec also takes a space or a
lower-case ``t``, ``+HHMM`` and more fractional digits, which it rounds), a double written ``-0.0`` (serde_json
reads it as it reads ``-0``, which msgspec takes as 0.0), an integer literal beyond ±2^53 for a double,
non-finite numbers, a lone surrogate escape, invalid UTF-8.

How the line may differ from msgspec's bytes (never in `json.loads`): doubles are written by Rust's shortest
round-trip formatting (ryu), which picks the same digits as msgspec but may place the exponent differently for
very small or large values; everything else — strings (escapes, raw UTF-8), integers, timestamps as
``2026-12-05T01:02:03.456000Z`` (six digits when the µs are not zero, none otherwise), key order — as msgspec
writes it.

Two readers inside: a scanner for the usual event (known keys, strings without escapes, integers of up to 18
digits, true/false/null, no whitespace), and serde_json for every other event; both apply the same checks.

Why: per-event validation in Python (~2-5 µs an event) was the largest single cost of the collector at small
requests (issue 25). Measured on the 2-core development machine while other jobs ran (generator events, ~290
bytes): the kernel ~2.1 µs of CPU an event in 100-event lists and ~2.4 in 10-event lists, against ~4.3 for
`EventValidator.validate` alone and ~5.2-5.4 with `log.partition_for`. On a quiet machine (2026-12-05): 0.75 µs an
event in 100-event lists, then 0.52 once moving a checked value no longer stalled (a word-sized tag for `Slot`),
and 0.49 for a whole 100-event body through `validate_body` (split, checked, grouped and joined, no Python object
per event).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from functools import lru_cache

import msgspec.inspect as mi

from gamestream import schema

try:
    from gamestream_native import Validator as _Kernel
except ImportError:  # an older build of native/, or none: every event goes to the Python validator
    _Kernel = None

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
_US = dt.timedelta(microseconds=1)
_ZERO = dt.timedelta(0)

FieldRow = tuple[str, str, bool, bool, "int | None", "int | None", str]
"""One field for the kernel: (path, kind, required, nullable, min, max, role); a child's path is
``eventParams.<name>``."""

# The fields the time rules of `EventValidator._normalise` (server mode) and `schema.corrected_time` name.
_ROLES = {
    "eventId": "event_id",
    "eventTime": "event_time",
    schema.SENT_AT: "sent_at",
    schema.RECEIVED_AT: "received_at",
    schema.GEO_COUNTRY: "country",  # replaced by the request's country, as receivedAt by its receive time
    f"{schema.EVENT_PARAMS.name}.client_event_time": "client_time",
    f"{schema.EVENT_PARAMS.name}.device_id": "partition_key",  # "picks the log partition" (log.partition_for)
}


def _kind(info: mi.Type, path: str) -> tuple[str, bool, int | None, int | None]:
    """(kind, nullable, min, max) of a msgspec type the validator decodes a field with."""
    types = info.types if isinstance(info, mi.UnionType) else (info,)
    nullable = any(isinstance(t, mi.NoneType) for t in types)
    rest = tuple(t for t in types if not isinstance(t, mi.NoneType))
    if any(isinstance(t, mi.DateTimeType) for t in rest):
        # `schema._TIMESTAMP_INPUT`: RFC 3339 text or epoch seconds (int or float), checked by `schema._to_utc`
        if sorted(type(t).__name__ for t in rest) == ["DateTimeType", "FloatType", "IntType"] and all(
                getattr(t, name, None) is None for t in rest for name in ("gt", "ge", "lt", "le", "multiple_of")):
            return "timestamp", nullable, None, None
    elif len(rest) == 1:
        (t,) = rest
        if isinstance(t, mi.StrType) and t.pattern is None:
            return "string", nullable, t.min_length, t.max_length
        if isinstance(t, mi.IntType) and t.ge is not None and t.le is not None and t.gt is None \
                and t.lt is None and t.multiple_of is None:
            return "int", nullable, t.ge, t.le
        if isinstance(t, mi.FloatType) and (t.gt, t.ge, t.lt, t.le, t.multiple_of) == (None,) * 5:
            return "double", nullable, None, None
        if isinstance(t, mi.BoolType):
            return "boolean", nullable, None, None
        if isinstance(t, mi.StructType) and t.forbid_unknown_fields and not t.array_like:
            return "struct", nullable, None, None
    raise ValueError(f"{path}: the native validator does not know the type {info}")


def describe(params: schema.Params = ()) -> list[FieldRow]:
    """The schema as the kernel takes it, read from `schema.input_event(params)` (see the module docstring);
    `ValueError` for a type it does not know."""
    event_type = schema.input_event(params, forbid_unknown=True)
    if not event_type.__struct_config__.omit_defaults:
        raise ValueError("the native validator writes the canonical form, which omits null fields")
    extras = {f.name for f in schema.event_fields(params) if f.kind == "json"}
    extras |= {f"{schema.EVENT_PARAMS.name}.{c.name}" for c in schema.params_field(params).children
               if c.kind == "json"}
    rows: list[FieldRow] = []

    def add(fields: tuple[mi.Field, ...], prefix: str) -> None:
        for field in fields:
            path = prefix + field.encode_name
            kind, nullable, low, high = _kind(field.type, path)
            role = "extra" if path in extras else _ROLES.get(path, "value")
            rows.append((path, kind, field.required, nullable, low, high, role))
            if kind == "struct":
                add(field.type.fields, path + ".")

    add(mi.type_info(event_type).fields, "")
    return rows


class NativeValidator:
    """The kernel for one configuration (`params`, from `[schema.params]`) and event size limit."""

    def __init__(self, params: schema.Params = (), *, max_event_bytes: int) -> None:
        if _Kernel is None:
            raise RuntimeError("gamestream_native has no Validator: rebuild native/ (./dev does)")
        self.params = schema.check_params(params)
        self._kernel = _Kernel(describe(self.params), max_event_bytes=max_event_bytes,
                               epoch_max=schema.EPOCH_MAX, max_future_us=schema.MAX_FUTURE // _US)

    def validate(self, events: Sequence[bytes | str], received: dt.datetime, sent_at: dt.datetime | None,
                 partitions: int | None, country: str | None = None
                 ) -> list[tuple[bytes, int] | tuple[bytes, str] | None] | None:
        """See `validate_native`."""
        times = _request_micros(received, sent_at)
        if times is None:
            return None
        received_us, sent_at_us = times
        return self._kernel.validate(events if isinstance(events, list) else list(events), received_us,
                                     sent_at_us, partitions, country)

    def validate_body(self, body: bytes, kind: str, received: dt.datetime, sent_at: dt.datetime | None,
                      partitions: int | None, country: str | None, *, max_events: int
                      ) -> tuple[int, list[tuple[int, bytes, int]]] | None:
        """See `validate_body`."""
        times = _request_micros(received, sent_at)
        if times is None:
            return None
        received_us, sent_at_us = times
        return self._kernel.validate_body(body, kind != "json", received_us, sent_at_us, partitions, country,
                                          max_events=max_events)


def _request_micros(received: dt.datetime, sent_at: dt.datetime | None) -> tuple[int, int | None] | None:
    """A request's receive time and Sent-At as the kernel takes them (µs since 1970, UTC); None when either is
    not a UTC datetime, or the receive time is before 1970: then every event goes to the Python validator."""
    received_us = _utc_micros(received)
    sent_at_us = _utc_micros(sent_at) if sent_at is not None else None
    if received_us is None or received_us < 0 or (sent_at is not None and sent_at_us is None):
        return None
    return received_us, sent_at_us


def _utc_micros(moment: dt.datetime) -> int | None:
    """µs since 1970 of a UTC datetime; None for another zone or none (the validator would write its offset,
    or refuse it)."""
    if moment.utcoffset() != _ZERO:
        return None
    return (moment - _EPOCH) // _US


@lru_cache(maxsize=None)
def native_validator(params: schema.Params = (), max_event_bytes: int = 32 * 1024) -> NativeValidator | None:
    """The kernel for `params` and `max_event_bytes`, built once; None without one (native/ not rebuilt, or a
    schema type it does not know)."""
    if _Kernel is None:
        return None
    try:
        return NativeValidator(schema.check_params(params), max_event_bytes=max_event_bytes)
    except ValueError:
        return None


def validate_native(events: Sequence[bytes | str], received: dt.datetime, sent_at: dt.datetime | None,
                    partitions: int | None, *, max_event_bytes: int, params: schema.Params = (),
                    country: str | None = None) -> list[tuple[bytes, int] | tuple[bytes, str] | None] | None:
    """For each of `events` (`envelope.split`'s items for one request), `(canonical line, partition)` when the
    event is provably valid, else None (run `schema.EventValidator(event_time="server").validate` on it);
    `received`, `sent_at` (the request's Sent-At) and `country` (its geo_country) as that validator takes them,
    UTC. The partition is
    `log.partition_for(device_id, partitions)`; with `partitions=None` (a log with its own routing) the
    device_id is given in its place, for `log.route`. None overall when there is no kernel (gamestream_native
    without `Validator`), or the times are not UTC datetimes: then every event goes to the Python validator.

    >>> validate_native([b'{"eventName":"x","eventId":"e","eventParams":{"device_id":"d1"}}', "not JSON"],
    ...                 dt.datetime(2026, 12, 5, tzinfo=dt.timezone.utc), None, 4, max_event_bytes=1024)
    [(b'{"eventName":"x","eventParams":{"device_id":"d1"},"eventId":"e","eventTime":"2026-12-05T00:00:00Z","receivedAt":"2026-12-05T00:00:00Z"}', 2), None]
    """
    validator = native_validator(params, max_event_bytes)
    if validator is None:
        return None
    return validator.validate(events, received, sent_at, partitions, country)


def validate_body(body: bytes, kind: str, received: dt.datetime, sent_at: dt.datetime | None,
                  partitions: int | None, *, max_event_bytes: int, max_events: int, params: schema.Params = (),
                  country: str | None = None) -> tuple[int, list[tuple[int, bytes, int]]] | None:
    """A whole request body (`kind` as `envelope.body_kind` gives it), when the kernel takes every event in it:
    ``(events, [(partition, record, count), ...])`` — each partition's canonical lines joined by newlines in the
    order sent, partitions in order of first appearance: what `validate_native` over `envelope.split(body, kind)`
    gives, grouped as the collector groups it, with no Python object per event. None when any event is handed
    back, the body is one `envelope.split` gives a reason for or cuts as a JSON array, it holds more than
    `max_events` events, the log routes by key (`partitions` None) or there is no kernel: then split the body
    and take the per-event path, which decides as before.

    >>> validate_body(b'{"eventName":"x","eventId":"e","eventParams":{"device_id":"d1"}}\\n\\n', "ndjson",
    ...               dt.datetime(2026, 12, 5, tzinfo=dt.timezone.utc), None, 4, max_event_bytes=1024, max_events=10)
    (1, [(2, b'{"eventName":"x","eventParams":{"device_id":"d1"},"eventId":"e","eventTime":"2026-12-05T00:00:00Z","receivedAt":"2026-12-05T00:00:00Z"}', 1)])
    """
    validator = native_validator(params, max_event_bytes)
    if validator is None:
        return None
    return validator.validate_body(body, kind, received, sent_at, partitions, country, max_events=max_events)

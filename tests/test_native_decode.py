"""`gamestream_native.decode_lines` (native/src/decode.rs), the processor's native read of NDJSON records, against
pyarrow's JSON reader with the same explicit schema — the oracle it must equal whenever it reads a buffer at all
(otherwise it gives None and pyarrow reads it, as before): hypothesis over the validator tests' corpus of odd
events, and the canonical lines the collectors write, which it must always read."""

from __future__ import annotations

import json
import math

import gamestream_native
import pyarrow as pa
import pyarrow.json as pj
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gamestream import schema
from gamestream.demo.generator import live_events, simulate
from gamestream.process import decode
from test_native_validate import NOW, PROMOTED, PROPERTY, mutated, python_results, random_events

PARAMS = [(), PROMOTED]


def pyarrow_read(data: bytes, codec) -> pa.Table | None:
    """The oracle: pyarrow's reader as the processor calls it; None when it refuses the buffer."""
    try:
        return pj.read_json(pa.BufferReader(data), read_options=decode._READ_OPTIONS,
                            parse_options=codec.parse_options)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None


def native_read(data: bytes | list[bytes], codec) -> pa.Table | None:
    return decode._native_table(data if isinstance(data, list) else [data], codec)


def strict(table: pa.Table) -> list[dict]:
    """The rows, a float as (value, sign) so that -0.0 and 0.0 differ."""
    def exact(value):
        if isinstance(value, float):
            return value, math.copysign(1.0, value)
        if isinstance(value, dict):
            return {k: exact(v) for k, v in value.items()}
        return value
    return [exact(row) for row in table.to_pylist()]


def assert_same(data: bytes, params: schema.Params) -> pa.Table | None:
    codec = decode._codec(params)
    native = native_read(data, codec)
    if native is not None:
        native.validate(full=True)
        oracle = pyarrow_read(data, codec)
        assert oracle is not None, data
        assert native.schema == oracle.schema
        assert strict(native) == strict(oracle), data
    return native


@pytest.mark.parametrize("params", PARAMS, ids=["default", "promoted"])
@PROPERTY
@given(events=st.lists(st.one_of(mutated(), mutated(weird=0.05), random_events()), min_size=1, max_size=12))
def test_what_it_reads_it_reads_as_pyarrow_does(events: list[bytes | str], params: schema.Params) -> None:
    raws = [e for e in events if isinstance(e, bytes)]
    assert_same(b"\n".join(raws), params)  # the raw events, odd ones and all
    lines = [v.line for v in python_results(raws, None, params) if v is not None]
    if lines:  # the canonical lines of those the validator takes: always read natively
        codec = decode._codec(params)
        assert assert_same(b"\n".join(lines), params) is not None, [
            line for line in lines if gamestream_native.decode_lines([line], codec.native_fields) is None]


@pytest.mark.parametrize("params", PARAMS, ids=["default", "promoted"])
def test_the_collectors_canonical_lines_are_read_natively(params: schema.Params) -> None:
    """Generator events with every parameter type, Unicode and escapes, through the validator (as the
    collectors write them): read natively, equal to pyarrow's, with empty lines between them, and as several
    records' payloads."""
    events = [e for e in simulate(events=300, users=20, seed=9)] + list(live_events(users=10, seed=2, limit=100))
    for i, event in enumerate(events):
        event["eventParams"]["note"] = ["é😀", 'quote " and \\ back', "tab\there", "\u2028"][i % 4]
        if params and i % 3 == 0:
            event["eventParams"].update(level=-(2**62) + i, tier=i, ratio=i / 7, vip=i % 2 == 0,
                                        seen="2026-11-01T10:00:00.25+02:00", guild="g\u00e9")
    raws = [json.dumps(e).encode() for e in events]
    lines = [v.line for v in python_results(raws, None, params) if v is not None]
    assert len(lines) == len(events)
    data = b"\n".join(lines[:200]) + b"\n\n" + b"\n".join(lines[200:]) + b"\n"
    table = assert_same(data, params)
    assert table is not None and table.num_rows == len(events)
    # records' payloads, read as if joined by newlines (one ends with a newline, one without)
    parts = [b"\n".join(lines[:150]) + b"\n", b"\n".join(lines[150:320]), b"\n".join(lines[320:])]
    assert strict(native_read(parts, decode._codec(params))) == strict(table)


@pytest.mark.parametrize(("line", "why"), [
    (b'{"eventName":"a", "eventId":"x"}', "whitespace"),
    (b'{"eventName":"a","eventName":"b"}', "a duplicate key"),
    (b'{"eventName":"a","unknown":1}', "a key the schema lacks"),
    (b'{"eventName":5}', "a number for a string"),
    (b'{"eventTime":"2026-11-01T10:00:00+02:00"}', "a time with an offset"),
    (b'{"eventTime":"2026-11-01T10:00:00.1234567Z"}', "more than 6 fractional digits"),
    (b'{"eventTime":1700000000}', "a number for a time"),
    (b'{"eventParams":{"amount":1e400}}', "an overflow"),
    (b'{"eventParams":{"amount":1.7976931348623159e308}}', "rounded to infinity"),
    (b'{"eventParams":{"amount":0e999}}', "an exponent pyarrow calls too big"),
    (b'{"eventParams":{"amount":1e-00001}}', "an exponent of 5 digits"),
    (b'{"eventParams":{"scoreAdjustment":2147483648}}', "past int32"),
    (b'{"eventParams":{"scoreAdjustment":1.0}}', "a fraction for an integer"),
    (b'{"eventParams":[]}', "an array for the struct"),
    (b'{"eventName":"\\ud800"}', "a lone surrogate"),
    (b'{"eventName":"a\tb"}', "a raw control character"),
    (b'{"eventName":"\xff"}', "invalid UTF-8"),
    (b"", "no line at all"),
])
def test_what_it_hands_back_to_pyarrow(line: bytes, why: str) -> None:
    assert gamestream_native.decode_lines([line], decode._codec(()).native_fields) is None, why


def test_the_processor_reads_canonical_records_natively(monkeypatch: pytest.MonkeyPatch) -> None:
    """`decode_records` of NDJSON records takes the native read (pyarrow's reader is not called) and gives the
    rows pyarrow's would."""
    from gamestream.log import LogRecord

    events = [json.dumps(e).encode() for e in simulate(events=500, users=20, seed=1)]
    lines = [v.line for v in python_results(events, None, ()) if v is not None]
    records = [LogRecord(0, i, b"\n".join(lines[i * 100:(i + 1) * 100]), 100, NOW) for i in range(5)]
    with monkeypatch.context() as patched:
        patched.setattr(gamestream_native, "decode_lines", lambda data, fields: None)
        want = decode.decode_records(records, NOW).events_table()  # pyarrow's reader
    read_json, called = pj.read_json, []
    monkeypatch.setattr(pj, "read_json", lambda *a, **k: called.append(1) or read_json(*a, **k))
    got = decode.decode_records(records, NOW).events_table()
    assert not called and got.num_rows == 500
    assert strict(got) == strict(want)

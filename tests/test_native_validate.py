"""The native per-event validator (`native_validate.validate_native`, native/src/validate.rs) against the Python
one it stands in front of (`schema.EventValidator(event_time="server")`).

The rule: for every event, the kernel either hands it back (None), or the Python validator accepts it too and
writes the same line — byte for byte, key order included; a new eventId aside, which must then be a UUIDv7 at
the receive time's millisecond — with the partition `log.partition_for` gives. A differential property test
checks the rule over generator events, mutated ones and random JSON; other tests pin that the generator's
ordinary events are taken (else the kernel is useless), that promoted parameters of every type are, and what is
handed back.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import re
import uuid

import msgspec
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gamestream import schema
from gamestream.demo.generator import live_events, simulate
from gamestream.ingest import native_validate
from gamestream.ingest.native_validate import describe, validate_native
from gamestream.log import envelope, partition_for

UTC = dt.timezone.utc
NOW = dt.datetime(2026, 12, 5, 12, 0, 0, 123456, tzinfo=UTC)
MAX = 32 * 1024
PARTITIONS = 8
PROPERTY = settings(max_examples=500, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
UUID7 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
PROMOTED = schema.check_params((("level", "int"), ("tier", "int32"), ("ratio", "double"), ("vip", "bool"),
                                ("seen", "timestamp"), ("guild", "string")))
"""Parameters promoted by a `[schema.params]` table: one of each type."""

pytestmark = pytest.mark.skipif(native_validate.native_validator() is None,
                                reason="gamestream_native has no Validator (rebuild native/)")


# ------------------------------------------------------------------------------------------------- the oracle
def python_results(events: list[bytes | str], sent_at: dt.datetime | None, params: schema.Params,
                   country: str | None = None, now: dt.datetime = NOW) -> list[schema.ValidEvent | None]:
    """What the collector's per-event path makes of each event: its ValidEvent, or None when rejected."""
    validator = schema.EventValidator(event_time="server", params=params)
    results: list[schema.ValidEvent | None] = []
    for event in events:
        if isinstance(event, str) or len(event) > MAX:
            results.append(None)
            continue
        try:
            result = validator.validate(event, now, sent_at, country)
        except Exception:  # whatever the validator cannot handle, the kernel must not take either
            result = None
        results.append(result if isinstance(result, schema.ValidEvent) else None)
    return results


def ordered(line: bytes) -> object:
    """A line parsed with its keys' order kept and doubles told apart by their bits (-0.0 is not 0.0)."""
    return json.loads(line, object_pairs_hook=list, parse_float=lambda text: ("double", float(text).hex()))


def given_id(event: bytes) -> bool:
    try:
        return isinstance(msgspec.json.decode(event).get("eventId"), str)
    except Exception:
        return False


def with_id(line: bytes, event_id: str) -> bytes:
    decoded = json.loads(line, object_pairs_hook=dict)
    decoded["eventId"] = event_id
    return msgspec.json.encode(decoded)


def assert_kernel_agrees(events: list[bytes | str], sent_at: dt.datetime | None, params: schema.Params,
                         partitions: int | None = PARTITIONS, country: str | None = None,
                         now: dt.datetime = NOW) -> list[bool]:
    """The rule of the module docstring, for each event; returns which events the kernel took."""
    fast = validate_native(events, now, sent_at, partitions, max_event_bytes=MAX, params=params, country=country)
    assert fast is not None and len(fast) == len(events)
    slow = python_results(events, sent_at, params, country, now)
    for event, mine, theirs in zip(events, fast, slow):
        if mine is None:
            continue
        assert theirs is not None, f"the kernel accepted what the validator rejects: {event!r}"
        line, route = mine
        expected = theirs.line
        if not given_id(event):  # type: ignore[arg-type]
            new_id = json.loads(line)["eventId"]
            assert UUID7.match(new_id), new_id
            assert uuid.UUID(new_id).int >> 80 == (NOW - dt.datetime(1970, 1, 1, tzinfo=UTC)) // dt.timedelta(
                milliseconds=1)
            expected = with_id(expected, new_id)
            assert ordered(line) == ordered(expected)
        else:
            assert ordered(line) == ordered(expected), event
            assert line == expected, event  # not needed by readers, but true: msgspec's very bytes
        assert route == (partition_for(theirs.device_id, partitions) if partitions else theirs.device_id)
    return [mine is not None for mine in fast]


# ------------------------------------------------------------------------------------------------ the corpus
RAW = object()  # marks a raw JSON fragment: (RAW, b"...")
MISSING = object()


class Obj(list):
    """A JSON object to splice, as (key, value) pairs (keys may repeat)."""


def encode(value: object, ascii_only: bool) -> bytes:
    if isinstance(value, tuple) and value and value[0] is RAW:
        return value[1]  # type: ignore[return-value]
    if isinstance(value, Obj):
        return b"{" + b",".join(json.dumps(k, ensure_ascii=ascii_only).encode() + b":" + encode(v, ascii_only)
                                for k, v in value if v is not MISSING) + b"}"
    return json.dumps(value, ensure_ascii=ascii_only).encode()


def as_obj(value: object) -> object:
    if isinstance(value, dict):
        return Obj((k, as_obj(v)) for k, v in value.items())
    return value


def iso(moment: dt.datetime, offset_minutes: int, digits: int, style: int = 0) -> str:
    zone = dt.timezone(dt.timedelta(minutes=offset_minutes))
    text = moment.astimezone(zone).strftime("%Y-%m-%dT%H:%M:%S")
    if digits:
        text += "." + f"{moment.microsecond:06d}{moment.microsecond % 1000:03d}"[:digits]
    if offset_minutes == 0 and style == 0:
        return text + "Z"
    sign = "+" if offset_minutes >= 0 else "-"
    return text + f"{sign}{abs(offset_minutes) // 60:02d}:{abs(offset_minutes) % 60:02d}"


moments = st.datetimes(min_value=dt.datetime(1, 1, 2), max_value=dt.datetime(9999, 12, 30), timezones=st.just(UTC))
near = st.datetimes(min_value=dt.datetime(2026, 12, 4), max_value=dt.datetime(2026, 12, 6), timezones=st.just(UTC))
good_times = st.one_of(
    st.builds(iso, st.one_of(moments, near), st.integers(-23 * 60 - 59, 23 * 60 + 59), st.integers(0, 6),
              st.integers(0, 1)),
    st.integers(0, schema.EPOCH_MAX),
    st.floats(0, schema.EPOCH_MAX, allow_nan=False),
    st.sampled_from(["2026-12-05T11:59:07.160251Z", "2026-12-05T12:00:00.1Z", "2026-12-05T13:00:00+01:00",
                     1_764_936_000, 1_764_936_000.5, 0, 0.0000005, 0.0000015, 0.0000025, schema.EPOCH_MAX,
                     "9999-12-31T23:59:59.999999Z", "0001-01-01T00:00:00Z", "2024-02-29T00:00:00Z",
                     "2026-12-05T12:00:00-00:00"]),
)
weird_times = st.one_of(
    st.builds(iso, moments, st.integers(-23 * 60 - 59, 23 * 60 + 59), st.integers(7, 9)),
    st.sampled_from(["2026-11-01T00:00:07", "2026-11-01 00:00:07Z", "2026-11-01t00:00:07z", "2026-11-01T00:00Z",
                     "2026-11-01T00:00:07+02", "2026-11-01T00:00:07+0200", "2026-02-29T00:00:00Z",
                     "2100-02-29T00:00:00Z", "9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00+01:00",
                     "0000-01-01T00:00:00Z", "2026-11-01T24:00:00Z", "2026-11-01T23:59:60Z", "2026-13-01T00:00:00Z",
                     "2026-11-01T00:00:07.Z", "2026-11-01T00:00:07+24:00", "2026-11-01T00:00:07+01:60", "",
                     "１９７０-01-01T00:00:00Z", "2026-11-01T00:00:07.1234567Z", -1, schema.EPOCH_MAX + 1,
                     -0.0, 253402300799.9999999, True, 1e300, None, [], {}]),
    st.sampled_from([(RAW, b"NaN"), (RAW, b"-Infinity"), (RAW, b"1e400"), (RAW, b"-0"), (RAW, b"1E2"),
                     (RAW, b"99999999999999999999999"), (RAW, b'"2026-11-01T00:00:07\\u005a"')]),
)
times = st.one_of(good_times, weird_times)
int_edges = [schema.INT32_MAX, schema.INT32_MAX + 1, schema.INT32_MIN, schema.INT32_MIN - 1, 2**53, 2**53 + 1,
             -(2**53) - 1, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64, 10**30, 0]
numbers = st.one_of(st.integers(-2**70, 2**70), st.sampled_from(int_edges), st.floats(), st.floats(-1e6, 1e6),
                    st.sampled_from([(RAW, b"-0"), (RAW, b"-0.0"), (RAW, b"0.0"), (RAW, b"1e2"), (RAW, b"1E-2"),
                                     (RAW, b"3.0"), (RAW, b"1e400"), (RAW, b"-1e-400"), (RAW, b"1" + b"0" * 309),
                                     (RAW, b"01"), (RAW, b"1."), (RAW, b".5"), (RAW, b"+1")]))
texts = st.one_of(st.text(max_size=12), st.text(st.characters(codec="ascii"), max_size=6),
                  st.sampled_from(["", "a\x00b", "\u2028", "😀", "é", '"\\/', "\x7f", "\t\n\r\b\f", "x" * 128,
                                   "x" * 129, "é" * 128, "😀" * 129]))
escaped = st.sampled_from([(RAW, b'"\\ud800"'), (RAW, b'"\\ud83d\\ude00"'), (RAW, b'"\\u00e9\\u0000"'),
                           (RAW, b'"\\/\\b"'), (RAW, b'"\xff"'), (RAW, b'"\xed\xa0\x80"'), (RAW, b'"a\tb"')])
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                           lambda children: st.lists(children, max_size=3)
                           | st.dictionaries(st.text(max_size=3), children, max_size=3), max_leaves=6)
anything = st.one_of(texts, escaped, numbers, times, st.booleans(), st.none(), json_values,
                     st.just((RAW, b"[" * 1200 + b"]" * 1200)))

GENERATED = ([e for e in simulate(events=200, users=30, seed=3, with_event_time=True)]
             + [e for e in simulate(events=200, users=30, seed=4, with_event_time=False)]
             + [e for e in live_events(users=30, seed=5, limit=200)])
PARAM_NAMES = [c.name for c in schema.params_field(PROMOTED).children] + ["extra", "Device_id"]
TOP_NAMES = [f.name for f in schema.event_fields() if not f.derived] + ["extra", "eventname", "eventParams "]
promoted_values = {"level": st.integers(-2**63, 2**63 - 1), "tier": st.integers(schema.INT32_MIN, schema.INT32_MAX),
                   "ratio": st.floats(allow_nan=False, allow_infinity=False), "vip": st.booleans(),
                   "seen": good_times, "guild": texts}


def put(target: list, name: str, value: object) -> None:
    """Sets key `name` of the object `target` (no duplicate)."""
    target[:] = [(k, v) for k, v in target if k != name] + [(name, value)]


@st.composite
def mutated(draw, weird: float = 0.5, promote: bool = True) -> bytes:
    """A generator event, with promoted parameters now and then (unknown keys unless the test promotes them),
    and a few mutations: a field dropped, set to null or to anything, an unknown key, a duplicate one, a sentAt
    or receivedAt of its own, then odd bytes."""
    event = as_obj(copy.deepcopy(draw(st.sampled_from(GENERATED))))
    params = next((v for k, v in event if k == "eventParams"), None)
    if promote and draw(st.booleans()):
        for name, values in promoted_values.items():
            if draw(st.floats(0, 1)) < 0.4:
                params.append((name, draw(values | st.none())))
    for name, odds in ((schema.SENT_AT, 0.3), (schema.RECEIVED_AT, 0.1)):
        if draw(st.floats(0, 1)) < odds:
            put(event, name, draw(good_times if draw(st.floats(0, 1)) > weird else times))
    if draw(st.floats(0, 1)) < 0.2:
        put(event, *(("eventId", None) if draw(st.booleans()) else ("eventTime", draw(good_times))))
    for _ in range(draw(st.integers(0, 3)) if draw(st.floats(0, 1)) < weird else 0):
        target = params if draw(st.booleans()) else event
        name = draw(st.sampled_from(PARAM_NAMES if target is params else TOP_NAMES))
        action = draw(st.sampled_from(["drop", "null", "set", "set", "add"]))
        if action == "drop":
            target[:] = [(k, v) for k, v in target if k != name]
        elif action == "null":
            put(target, name, None)
        elif action == "set":
            put(target, name, draw(anything))
        else:  # a second value for a key (a duplicate when it was there)
            target.append((name, draw(anything)))
    if draw(st.booleans()):
        event[:] = draw(st.permutations(event))
    raw = encode(event, draw(st.booleans()))
    if draw(st.floats(0, 1)) < weird / 5:
        raw = draw(st.sampled_from([b"\xef\xbb\xbf" + raw, raw + b" x", raw + raw, b"null", b"[" + raw + b"]",
                                    raw.replace(b":", b" : ", 1), raw[:-1], b"  " + raw + b"\n ", b"",
                                    raw.replace(b"e", b"\xff", 1), raw + b"\n" + raw, b" ", b"{}",
                                    raw[:-1] + b',"pad":"' + b"x" * MAX + b'"}']))
    return raw


@st.composite
def random_events(draw) -> bytes | str:
    """Random JSON, mostly objects with some of the schema's keys."""
    kind = draw(st.integers(0, 4))
    if kind == 0:
        return encode(draw(json_values), True)
    if kind == 1:
        return draw(st.text(max_size=10))  # a str item: already a rejection
    params = Obj([("device_id", draw(texts | st.none()))] + [(draw(st.sampled_from(PARAM_NAMES)), draw(anything))
                                                                for _ in range(draw(st.integers(0, 4)))])
    top = Obj([("eventName", draw(texts)), ("eventParams", params)]
              + [(draw(st.sampled_from(TOP_NAMES)), draw(anything)) for _ in range(draw(st.integers(0, 3)))])
    return encode(Obj(draw(st.permutations(top))), draw(st.booleans()))


corpus = st.lists(st.one_of(mutated(), mutated(weird=0.05), random_events()), min_size=1, max_size=12)
request_sent_at = st.one_of(st.none(), st.sampled_from([NOW - dt.timedelta(minutes=5), NOW + dt.timedelta(hours=3),
                                                        dt.datetime(1, 1, 2, tzinfo=UTC),
                                                        dt.datetime(9999, 12, 30, tzinfo=UTC)]),
                            st.builds(lambda m: m, near))


# --------------------------------------------------------------------------------------------------- property
@pytest.mark.parametrize("params", [(), PROMOTED], ids=["default", "promoted"])
@PROPERTY
@given(events=corpus, sent_at=request_sent_at, country=st.sampled_from([None, "DE"]))
@example(events=[b'{"eventName":"x","eventParams":{"device_id":"d","amount":-0}}'], sent_at=None, country="DE")
@example(events=[b'{"eventName":"x","eventParams":{"device_id":"d","client_event_time":0},'
                 b'"sentAt":"3996-01-01T00:00:00Z"}'], sent_at=None, country=None)
@example(events=[b'{"eventName":"x","eventTime":0.0000005,"eventParams":{"device_id":"d"},"sentAt":0}'],
         sent_at=None, country=None)
@example(events=[b'{"eventName":"x","eventParams":{"device_id":"d"},"eventName":"y"}'], sent_at=None, country=None)
def test_the_kernel_takes_only_what_the_validator_accepts_and_writes_its_line(
        params: schema.Params, events: list[bytes | str], sent_at: dt.datetime | None,
        country: str | None) -> None:
    assert_kernel_agrees(events, sent_at, params, country=country)


@pytest.mark.parametrize("params", [(), PROMOTED], ids=["default", "promoted"])
def test_the_property_test_does_reach_the_kernels_acceptance(params: schema.Params) -> None:
    """Guards the property test against a corpus that only goes back to Python: most of the events the
    validator accepts, mutated ones and promoted parameters among them, are taken."""
    taken: list[bool] = []
    accepted: list[bool] = []

    @settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
    @given(events=st.lists(mutated(weird=0.2, promote=bool(params)), min_size=1, max_size=8),
           sent_at=request_sent_at)
    def run(events: list[bytes | str], sent_at: dt.datetime | None) -> None:
        taken.extend(assert_kernel_agrees(events, sent_at, params))
        accepted.extend(result is not None for result in python_results(events, sent_at, params))

    run()
    assert sum(taken) > 100 and sum(taken) > 0.75 * sum(accepted), (sum(taken), sum(accepted), len(taken))


# ------------------------------------------------------------------------------------------ generator events
@pytest.mark.parametrize("sent_before", [None, dt.timedelta(seconds=2)], ids=["no-sent-at", "sent-at"])
@pytest.mark.parametrize("source", ["live", "simulated", "simulated-with-event-time"])
def test_the_generators_ordinary_events_are_all_taken(source: str, sent_before: dt.timedelta | None) -> None:
    """Otherwise the kernel is useless: every event a game sends in the ordinary way is answered natively, with
    the validator's very line. Live events carry the wall clock's time, so they are received at the wall clock's
    now (at the fixed NOW they would lie in the future, and be refused, on any other day)."""
    if source == "live":
        evs = list(live_events(users=100, seed=11, limit=1000))
        now = dt.datetime.now(UTC)
    else:
        evs = list(simulate(events=1000, users=100, seed=11, with_event_time=source.endswith("event-time")))
        now = NOW
    sent_at = now - sent_before if sent_before is not None else None
    events: list[bytes | str] = [msgspec.json.encode(e) for e in evs]
    assert all(assert_kernel_agrees(events, sent_at, (), now=now))
    assert all(assert_kernel_agrees(events, sent_at, PROMOTED, now=now))  # promoted but absent


def test_generated_event_ids_are_uuid7_at_the_receive_millisecond() -> None:
    events: list[bytes | str] = [b'{"eventName":"x","eventParams":{"device_id":"d"}}'] * 50
    assert all(assert_kernel_agrees(events, None, ()))
    ids = [json.loads(line)["eventId"] for line, _ in validate_native(events, NOW, None, 4,  # type: ignore[union-attr]
                                                                      max_event_bytes=MAX)]
    assert len(set(ids)) == 50


# ---------------------------------------------------------------------------------------- promoted parameters
def test_promoted_parameters_of_every_type_are_taken() -> None:
    base = {"eventName": "levelEnd", "eventId": "e1", "eventParams": {"device_id": "d1"}}
    values = [{"level": 2**63 - 1, "tier": schema.INT32_MIN, "ratio": 0.25, "vip": True,
               "seen": "2026-12-05T13:00:00.5+01:00", "guild": "ünïcode \u2028 \"q\""},
              {"level": -(2**63), "tier": 7, "ratio": -1.5e-300, "vip": False, "seen": 1_764_936_000.25, "guild": ""},
              {"level": None, "tier": None, "ratio": 3, "vip": None, "seen": 1_764_936_000, "guild": None}]
    events: list[bytes | str] = [msgspec.json.encode({**base, "eventParams": {**base["eventParams"], **v}})
                                 for v in values]
    assert all(assert_kernel_agrees(events, None, PROMOTED))
    # without the promotion they are unknown keys, kept in eventParams_extra by Python: handed back
    assert validate_native(events, NOW, None, 4, max_event_bytes=MAX) == [None, None, None]
    # out of their type's range: handed back (Python says why)
    wrong = [msgspec.json.encode({**base, "eventParams": {**base["eventParams"], name: value}})
             for name, value in (("level", 2**63), ("tier", 2**31), ("ratio", "1"), ("vip", 1), ("seen", -1),
                                 ("guild", 5))]
    assert validate_native(wrong, NOW, None, 4, max_event_bytes=MAX, params=PROMOTED) == [None] * len(wrong)
    assert python_results(wrong, None, PROMOTED) == [None] * len(wrong)


def test_the_description_is_the_schemas() -> None:
    """Every field the validator reads is described, with the kind `schema` gives it, in msgspec's order."""
    rows = {path: (kind, role) for path, kind, _, _, _, _, role in describe(PROMOTED)}
    kinds = {"string": "string", "json": "string", "int32": "int", "int64": "int", "double": "double",
             "boolean": "boolean", "timestamp": "timestamp", "struct": "struct"}
    expected = {}
    for field in schema.event_fields(PROMOTED):
        if field.derived:
            continue
        expected[field.name] = kinds[field.kind]
        for child in field.children:
            expected[f"{field.name}.{child.name}"] = kinds[child.kind]
    assert {path: kind for path, (kind, _) in rows.items()} == expected
    assert [path for path in rows if "." not in path] == list(schema.input_event(PROMOTED).__struct_fields__)
    assert {role for _, role in rows.values()} == {"value", "event_id", "event_time", "sent_at", "received_at",
                                                    "country", "client_time", "extra", "partition_key"}


# ------------------------------------------------------------------------------------------ what goes back
GOOD = b'{"eventName":"x","eventId":"e","eventParams":{"device_id":"d"}}'


def with_param(fragment: bytes) -> bytes:
    return GOOD.replace(b'"device_id":"d"', b'"device_id":"d",' + fragment)


def with_top(fragment: bytes) -> bytes:
    return GOOD[:-1] + b"," + fragment + b"}"


HANDED_BACK = {
    "a str item (already a rejection)": "not JSON",
    "over max_event_bytes": with_top(b'"pad":"' + b"x" * MAX + b'"'),
    "an unknown top-level key": with_top(b'"u":1'),
    "an unknown parameter": with_param(b'"u":1'),
    "an extra column given": with_top(b'"event_extra":"{\\"a\\":1}"'),
    "a duplicate key": with_top(b'"eventName":"y"'),
    "a space before T": with_top(b'"sentAt":"2026-12-05 12:00:00Z"'),
    "a lower-case t": with_top(b'"sentAt":"2026-12-05t12:00:00Z"'),
    "+HHMM": with_top(b'"sentAt":"2026-12-05T12:00:00+0100"'),
    "seven fractional digits": with_top(b'"sentAt":"2026-12-05T12:00:00.1234567Z"'),
    "an integer beyond 2^53 for a double": with_param(b'"amount":9007199254740993'),
    "-0.0 for a double (serde_json reads -0 the same way)": with_param(b'"amount":-0.0'),
    "a BOM": b"\xef\xbb\xbf" + GOOD,
    "a lone surrogate": GOOD.replace(b'"x"', b'"\\ud800"'),
    "invalid UTF-8": GOOD.replace(b'"x"', b'"\xff"'),
}


@pytest.mark.parametrize("event", list(HANDED_BACK.values()), ids=list(HANDED_BACK))
def test_what_the_kernel_hands_back(event: bytes | str) -> None:
    assert validate_native([event, GOOD], NOW, None, 4, max_event_bytes=MAX)[0] is None  # type: ignore[index]
    assert_kernel_agrees([event], None, ())


TAKEN = {
    "an offset and a fraction": with_param(b'"client_event_time":"2026-12-05T14:00:00.5+02:00"'),
    "-00:00": with_param(b'"client_event_time":"2026-12-05T12:00:00-00:00"'),
    "epoch seconds": with_param(b'"client_event_time":1764936000'),
    "epoch seconds, half a µs (to even)": with_param(b'"client_event_time":0.0000005'),
    "epoch seconds, 1.5 µs (to even)": with_param(b'"client_event_time":0.0000015'),
    "eventTime as the client's time": with_top(b'"eventTime":"2026-12-05T11:00:00Z","sentAt":"2026-12-05T11:59:00Z"'),
    "escapes and unicode": GOOD.replace(b'"x"', b'"\\u00e9\\n\\"\xf0\x9f\x98\x80\\ud83d\\ude00\\/"'),
    "an escaped key": GOOD.replace(b'"eventName"', b'"event\\u004eame"'),
    "null optional fields": with_param(b'"amount":null,"platform":null').replace(b'"eventId":"e"', b'"eventId":null'),
    "whitespace": b' {"eventName" : "x" ,\n"eventParams":{ "device_id":"d" } } ',
    "an integer for a double": with_param(b'"amount":100'),
    "-0 for a double (0.0, as msgspec reads it)": with_param(b'"amount":-0'),
    "an exponent for a double": with_param(b'"amount":1E-7'),
}


@pytest.mark.parametrize("event", list(TAKEN.values()), ids=list(TAKEN))
def test_what_the_kernel_takes(event: bytes) -> None:
    assert assert_kernel_agrees([event], NOW - dt.timedelta(seconds=30), ()) == [True]


def test_a_log_with_its_own_routing_gets_the_device_id() -> None:
    assert_kernel_agrees([GOOD, with_param(b'"platform":"ios"')], None, (), partitions=None)
    assert validate_native([GOOD], NOW, None, None, max_event_bytes=MAX)[0][1] == "d"  # type: ignore[index]


def test_times_not_in_utc_leave_every_event_to_python() -> None:
    paris = dt.timezone(dt.timedelta(hours=1))
    assert validate_native([GOOD], NOW.astimezone(paris), None, 4, max_event_bytes=MAX) is None
    assert validate_native([GOOD], NOW, NOW.astimezone(paris), 4, max_event_bytes=MAX) is None


# ------------------------------------------------------------------------------------------ a whole body at once
SEPARATORS = [b"\n", b"\r\n", b"\n\n", b" \n\t", b"\n \x0b", b"\n\x0c\n"]


@st.composite
def bodies(draw) -> tuple[bytes, str]:
    """A request body of corpus events (NDJSON with odd separators and padding, a JSON array, or one event) and
    the kind its Content-Type gives (`envelope.body_kind`)."""
    events = [e for e in draw(corpus) if isinstance(e, bytes)] or [b"{}"]
    form = draw(st.sampled_from(["lines", "lines", "lines", "array", "one"]))
    if form == "array":
        body = b"[" + b",".join(events) + b"]"
    elif form == "one":
        body = events[0]
    else:
        body = events[0]
        for event in events[1:]:
            body += draw(st.sampled_from(SEPARATORS)) + event
    pad = st.sampled_from([b"", b" ", b"\n", b"\r\n", b"\t \n"])
    return draw(pad) + body + draw(pad), draw(st.sampled_from(["ndjson", "sniff", "json"]))


def expected_groups(events: list[bytes | str], sent_at: dt.datetime | None, params: schema.Params,
                    country: str | None) -> list[tuple[int, list[bytes], list[bool]]] | None:
    """What the collector's per-event path makes of a body's events, grouped by partition in order of first
    appearance (each line, and whether its eventId was given); None when it rejects any."""
    results = python_results(events, sent_at, params, country)
    if not events or any(result is None for result in results):
        return None
    groups: dict[int, tuple[list[bytes], list[bool]]] = {}
    for event, result in zip(events, results):
        lines, given = groups.setdefault(partition_for(result.device_id, PARTITIONS), ([], []))
        lines.append(result.line)
        given.append(given_id(event))  # type: ignore[arg-type]
    return [(partition, lines, given) for partition, (lines, given) in groups.items()]


@pytest.mark.parametrize("params", [(), PROMOTED], ids=["default", "promoted"])
@PROPERTY
@given(body=bodies(), sent_at=request_sent_at, country=st.sampled_from([None, "DE"]))
def test_a_whole_body_is_taken_only_when_every_event_in_it_is_and_gives_the_per_event_paths_records(
        params: schema.Params, body: tuple[bytes, str], sent_at: dt.datetime | None, country: str | None) -> None:
    """`native_validate.validate_body` (the collector's `plan_body`) against `envelope.split` and the Python
    validator, grouped as the collector's per-event path groups the lines: the body is taken only when the
    validator accepts every event `split` gives, and then its records are those lines, joined by newlines in
    the order sent, per partition in order of first appearance, with the count."""
    raw, kind = body
    try:
        events = envelope.split(raw, kind)
    except envelope.BodyError:
        events = []
    taken = native_validate.validate_body(raw, kind, NOW, sent_at, PARTITIONS, max_event_bytes=MAX,
                                          max_events=999, params=params, country=country)
    expected = expected_groups(events, sent_at, params, country)
    if taken is None:
        return  # the per-event path decides (a body it takes is checked by the property test above)
    assert expected is not None, f"the kernel took a body with an event the validator rejects: {raw!r}"
    count, groups = taken
    assert count == len(events)
    assert [p for p, _, _ in groups] == [p for p, _, _ in expected]
    for (_, record, n), (_, lines, ids_given) in zip(groups, expected):
        mine = record.split(b"\n")
        assert n == len(mine) == len(lines)
        for line, theirs, was_given in zip(mine, lines, ids_given):
            if was_given:
                assert line == theirs
            else:
                new_id = json.loads(line)["eventId"]
                assert UUID7.match(new_id), new_id
                assert ordered(line) == ordered(with_id(theirs, new_id))


def test_the_body_property_test_does_reach_the_kernels_acceptance() -> None:
    """Guards the body test against a corpus the kernel never takes whole."""
    taken = 0

    @settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
    @given(events=st.lists(mutated(weird=0.0, promote=False), min_size=1, max_size=4),
           separator=st.sampled_from(SEPARATORS))
    def run(events: list[bytes | str], separator: bytes) -> None:
        nonlocal taken
        raw = separator.join(e for e in events if isinstance(e, bytes))
        taken += native_validate.validate_body(raw, "ndjson", NOW, None, PARTITIONS, max_event_bytes=MAX,
                                               max_events=999) is not None

    run()
    assert taken > 50, taken


def test_a_body_over_its_event_limit_or_routed_by_key_is_left_to_the_per_event_path() -> None:
    lines = [json.dumps(e, separators=(",", ":")).encode() for e in simulate(events=20, seed=5)]
    raw = b"\n".join(lines)
    args = dict(max_event_bytes=MAX, params=())
    assert native_validate.validate_body(raw, "ndjson", NOW, None, 4, max_events=20, **args)[0] == 20
    assert native_validate.validate_body(raw, "ndjson", NOW, None, 4, max_events=19, **args) is None
    assert native_validate.validate_body(raw, "ndjson", NOW, None, None, max_events=20, **args) is None
    assert native_validate.validate_body(b" \n ", "ndjson", NOW, None, 4, max_events=20, **args) is None
    assert native_validate.validate_body(raw, "json", NOW, None, 4, max_events=20, **args) is None  # one event
    assert native_validate.validate_body(lines[0], "json", NOW, None, 4, max_events=20, **args)[0] == 1

"""Fuzzing: hostile input is accepted or refused with a readable reason — never an exception, never a 5xx.

Property-based (hypothesis) over the event validator and the body parsers, and schema-driven (schemathesis) from
the OpenAPI document of a real collector on a loopback port. Example counts are modest and generation is
derandomized, so a run is reproducible and quick. Each bug the fuzzers found is kept as an `@example`.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import subprocess
import sys
from pathlib import Path

import httpx
import msgspec
import pytest
import schemathesis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from schemathesis.specs.openapi.checks import positive_data_acceptance

from collector_server import ServeProcess
from gamestream import schema
from gamestream.api.refusals import Refuse
from gamestream.api.routes.events import gunzip, split_events

NOW = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.timezone.utc)
FUZZ = settings(max_examples=300, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Hostile fragments: numbers beyond every range, non-JSON literals, bad encodings, deep nesting.
NASTY_VALUES = [b"1e400", b"-1e400", b"2" + b"0" * 70, b"1180591620717411303424", b"-0", b"-0.0", b"NaN",
                b"Infinity", b"-Infinity", b'"\\ud800"', b'"\\udc00\\ud800"', b'"\xff\xfe"', b'"\xed\xa0\x80"',
                b'"\xef\xbb\xbf"', b"[" * 10_000 + b"]" * 10_000, b'{"a":' * 5_000 + b"1" + b"}" * 5_000,
                b"[" + b"0," * 10_000 + b"0]", b'"' + b"x" * 200_000 + b'"', b"true", b"null", b"{}", b"[]",
                b'"9999-12-31T23:59:59-01:00"', b'"0001-01-01T00:00:00+01:00"', b'"2026-02-30T00:00:00Z"',
                b'"2026-11-30T12:00:00"', b"253402300800", b"1e-400"]
FIELDS = [b"eventId", b"eventName", b"eventTime", b"eventParams", b"device_id", b"client_event_time",
          b"scoreAdjustment", b"amount", b"platform", b"unknown"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)
nasty = st.sampled_from(NASTY_VALUES)
scalar = st.one_of(nasty, json_values.map(lambda v: json.dumps(v).encode()))


@st.composite
def event_like(draw) -> bytes:
    """Objects shaped like events — the right field names, often the wrong or extreme values, duplicate keys
    and BOMs — spliced as raw bytes, so that invalid JSON gets through to the validator too."""
    params = [b'"%s":%s' % (draw(st.sampled_from(FIELDS)), draw(scalar)) for _ in range(draw(st.integers(0, 4)))]
    if draw(st.booleans()):
        params.append(b'"device_id":' + draw(st.sampled_from([b'"d1"', b'""', b'"\\ud800"', b'"\xc3\x28"', b"1"])))
    top = [b'"eventParams":{%s}' % b",".join(params)]
    top += [b'"%s":%s' % (draw(st.sampled_from(FIELDS)), draw(scalar)) for _ in range(draw(st.integers(0, 4)))]
    if draw(st.booleans()):
        top.append(b'"eventName":"levelStart"')
    body = b"{" + b",".join(draw(st.permutations(top))) + b"}"
    return draw(st.sampled_from([b"", b"\xef\xbb\xbf", b" "])) + body


any_line = st.one_of(st.binary(max_size=300), scalar, event_like())


def assert_readable(result: object) -> None:
    if isinstance(result, schema.Rejection):
        assert str(result)
    else:
        assert isinstance(result, schema.ValidEvent)
        assert result.device_id
        decoded = msgspec.json.decode(result.line)  # canonical form is valid UTF-8 JSON
        assert decoded["eventName"] and decoded["eventParams"]["device_id"] == result.device_id


# ------------------------------------------------------------------------------------------------- validator
@pytest.mark.parametrize("mode", ["server", "input"])
@FUZZ
@given(line=any_line)
@example(line=b'{"eventName":"x","eventTime":"9999-12-31T23:59:59-01:00","eventParams":{"device_id":"d"}}')
@example(line=b'{"eventName":"x","eventTime":"0001-01-01T00:00:00+01:00","eventParams":{"device_id":"d"}}')
@example(line=b'{"eventName":"x\xff","eventParams":{"device_id":"d"}}')
@example(line=b'{"eventName":"x","eventParams":{"device_id":"d"},"z":' + b"[" * 10_000 + b"]" * 10_000 + b"}")
def test_the_validator_accepts_or_rejects_any_line_with_a_reason(mode: str, line: bytes) -> None:
    validator = schema.EventValidator(event_time=mode)  # type: ignore[arg-type]
    assert_readable(validator.validate(line, NOW))


# --------------------------------------------------------------------------------------------- body parsers
@FUZZ
@given(body=st.one_of(st.binary(max_size=500), st.lists(any_line, max_size=20).map(b"\n".join),
                      st.lists(any_line, max_size=20).map(lambda lines: b"[" + b",".join(lines) + b"]")),
       kind=st.sampled_from(["json", "ndjson", "sniff"]))
@example(body=b"[" * 10_000 + b"]" * 10_000, kind="json")
def test_the_body_splitter_returns_events_or_refuses_with_400(body: bytes, kind: str) -> None:
    try:
        events = split_events(body, kind)
    except Refuse as refusal:
        assert refusal.status == 400 and refusal.message
    else:
        assert all(isinstance(e, (bytes, str)) and e for e in events)  # [] is answered 400 by ingest


@FUZZ
@given(body=st.one_of(st.binary(max_size=300), st.binary(max_size=2000).map(gzip.compress),
                      st.binary(min_size=1, max_size=2000).map(lambda b: gzip.compress(b)[:-3]),
                      st.binary(max_size=200).map(lambda b: gzip.compress(b) + b"trailing")))
@example(body=gzip.compress(b'{"eventName":"x","eventParams":{"device_id":"d"}}\n' * 2)[:-10])
@example(body=gzip.compress(b"\0" * (2 * 1024 * 1024)))
def test_gunzip_inflates_or_refuses_with_a_4xx(body: bytes) -> None:
    try:
        inflated = gunzip(body, 1024 * 1024)
    except Refuse as refusal:
        assert refusal.status in (400, 413) and refusal.message
    else:
        assert gzip.decompress(body) == inflated


# ------------------------------------------------------------------------------------- the whole POST path
@pytest.fixture(scope="module")
def collector(tmp_path_factory: pytest.TempPathFactory):
    server = ServeProcess(tmp_path_factory.mktemp("fuzz") / "data")
    yield server
    server.stop()


def events_sent(body: bytes, content_type: str) -> int:
    """How many events the body holds, as the collector counts them (for the 200 answer's invariant)."""
    stripped = body.strip()
    if content_type == "application/json" or (content_type == "" and stripped[:1] == b"["):
        value = msgspec.json.decode(stripped)
        return len(value) if isinstance(value, list) else 1
    return sum(1 for line in stripped.split(b"\n") if line.strip())


@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(lines=st.lists(any_line, max_size=12),
       shape=st.sampled_from(["ndjson", "array", "sniff", "gzip"]),
       content_type=st.sampled_from(["application/json", "application/x-ndjson", "", "text/plain; charset=utf-8"]))
@example(lines=[b'{"eventName":"x","eventTime":"9999-12-31T23:59:59-01:00","eventParams":{"device_id":"d"}}'],
         shape="ndjson", content_type="application/x-ndjson")
@example(lines=[b'{"eventName":"\xff","eventParams":{"device_id":"d"}}'], shape="array",
         content_type="application/json")
@example(lines=[b"[" * 10_000 + b"]" * 10_000], shape="array", content_type="application/json")
def test_post_events_answers_every_body_with_a_4xx_or_a_consistent_200(collector, lines, shape, content_type):
    body = b"[" + b",".join(lines) + b"]" if shape == "array" else b"\n".join(lines)
    headers = {"Content-Type": content_type} if content_type else {}
    sent = body
    if shape == "gzip":
        sent, headers = gzip.compress(body), {**headers, "Content-Encoding": "gzip"}
    response = httpx.post(collector.url + "/v1/events", content=sent, headers=headers, timeout=30)
    assert response.status_code < 500, response.text
    answer = response.json()
    if response.status_code == 200:
        assert answer["accepted"] >= 1
        assert answer["accepted"] + answer["rejected"] == events_sent(body, content_type)
        assert [e["index"] for e in answer["errors"]] == sorted({e["index"] for e in answer["errors"]})
    else:
        assert answer["error"]


# ------------------------------------------------------------------------------ schema-driven (schemathesis)
@schemathesis.serializer("application/x-ndjson")
def _ndjson(ctx, value) -> bytes:  # the document says: a string, one event per line
    return value.encode("utf-8", "surrogatepass") if isinstance(value, str) else json.dumps(value).encode()


@pytest.fixture(scope="module")
def api(collector):
    return schemathesis.openapi.from_url(collector.url + "/openapi.json")


def counts_add_up(ctx, response, case) -> None:
    """A 200 from POST /v1/events accounts for every event sent: accepted + rejected = events in the body."""
    if case.path != "/v1/events" or response.status_code != 200:
        return
    if response.headers.get("idempotent-replayed"):  # the answer to the key's first request, stored with it
        return
    body = case.body
    if isinstance(body, str):
        count = sum(1 for line in body.encode("utf-8", "surrogatepass").strip().split(b"\n") if line.strip())
    else:
        count = len(body) if isinstance(body, list) else 1
    answer = response.json()
    assert answer["accepted"] + answer["rejected"] == count, (answer, count)


FOUND = {
    # sqlglot's TokenError escaped query.translate (it catches ParseError only): a 500
    "/v1/sql": [{"query": "o=;\u0003O\u009auW0~\u00f0'\u0016\u00ba\u00bb\u00b1\u0097\b\U00100fff"}],
    # an empty array was schema-valid (the array had no minItems), yet it is answered 400
    "/v1/events": [[]],
}
"""JSON bodies on which schemathesis found a bug, kept as examples of their operation."""


POSITIVE, NEGATIVE = schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE
OPERATIONS = [("/v1/events", "POST"), ("/v1/sql", "POST"), ("/v1/dashboard", "GET"), ("/healthz", "GET"),
              ("/metrics", "GET")]
WITH_INPUT = {"/v1/events", "/v1/sql", "/v1/dashboard"}  # the others have nothing to send outside the document
RUNS = [pytest.param(path, method, mode, id=f"{method} {path}, {label}")
        for path, method in OPERATIONS
        for mode, label in [(POSITIVE, "documented input"), (NEGATIVE, "input outside the document")]
        if mode is POSITIVE or path in WITH_INPUT]


# Each operation's cases come from its strategy rather than `schemathesis.pytest.from_fixture(...).parametrize()`,
# which fails under pytest 9 (it reads `request.node._nodeid`, gone from pytest's nodes).
@pytest.mark.parametrize(("path", "method", "mode"), RUNS)
def test_every_documented_operation_answers_as_documented_and_never_with_a_5xx(api, path, method, mode) -> None:
    operation = api[path][method]

    @settings(max_examples=100 if path == "/v1/sql" else 150, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def answers_as_documented(case) -> None:
        # Acceptance of documented input is not promised where JSON Schema cannot say what is accepted: a query
        # (not every string is SQL), NDJSON (not every string is lines of events), and events, whose integers
        # are JSON Schema integers — 5.0 included — while the validator takes 5 only, as Spark's reader does.
        loose = path in ("/v1/sql", "/v1/events")
        case.call_and_validate(additional_checks=[counts_add_up],
                               excluded_checks=[positive_data_acceptance] if loose else [], timeout=30)

    for body in FOUND.get(path, []) if mode is POSITIVE else []:
        answers_as_documented = example(case=operation.Case(body=body, media_type="application/json"))(
            answers_as_documented)
    answers_as_documented()


# ----------------------------------------------------------------------- the schemathesis CLI, every check on
CHECKER_CONFIG = """
# A body over maxItems (more events than max_events_per_request) is refused with 413 Content Too Large, the answer
# HTTP has for it and the document declares; schemathesis' default list of rejections lacks 413.
[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]

# positive_data_acceptance, for these two operations only: JSON Schema cannot say what they accept. Not every
# string is a Spark SQL query (answered 400 with the line and column); an event's integers are JSON Schema
# integers (5.0 included) while the validator takes 5 only, as Spark's reader does, and event_extra /
# eventParams_extra must be strings holding a JSON object. A 400 with the reason is their documented refusal.
[[operations]]
include-path-regex = "^/v1/(events|sql)$"
checks.positive_data_acceptance.expected-statuses = ["2xx", "3xx", "400", "401", "403", "404", "409", "429", "5xx"]

# Each forget holds its request ~3.5 s by design (it reads back what a concurrent flush committed: forget.GRACE_S
# + batch_max_wait_s), so random forgets are fewer; the coverage and stateful phases still send theirs.
[[operations]]
include-path = "/v1/forget"
generation.max-examples = 1
"""
CHECKER_KEY = "checker-key"


@pytest.mark.slow
def test_the_server_passes_schemathesis_run_with_all_checks(tmp_path: Path) -> None:
    """`schemathesis run <url>/openapi.json --checks all` against a real server with keys configured (one key
    both writes and administers, so every operation is reachable), every phase, derandomized."""
    config = tmp_path / "schemathesis.toml"
    config.write_text(CHECKER_CONFIG, encoding="utf-8")
    server = ServeProcess(tmp_path / "data", "--api-key", CHECKER_KEY, "--admin-key", CHECKER_KEY,
                          env={"GAMESTREAM_SQL_TIMEOUT_S": "1"})  # a purge waits sql_timeout_s: keep it short
    try:
        run = subprocess.run(
            [str(Path(sys.executable).with_name("schemathesis")), "--config-file", str(config), "run",
             server.url + "/openapi.json", "--checks", "all", "-H", f"Authorization: Bearer {CHECKER_KEY}",
             "--max-examples", "5", "--generation-deterministic", "--request-timeout", "15", "--no-color"],
            capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False)
    finally:
        assert server.stop() == 0
    assert run.returncode == 0, run.stdout[-20_000:] + run.stderr[-5_000:]

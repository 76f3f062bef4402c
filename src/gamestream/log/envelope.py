"""What wraps events on their way in: an HTTP request body, and API Gateway's Lambda proxy event.

Two parts, both pure (no I/O, no pyarrow of their own):

- **Request bodies**, the collector's contract (one object, a JSON array or NDJSON; gzip; the 400/413/415
  reasons): `body_kind`, `gunzip` and `split`. The collector (`gamestream.api.routes.events`) and the Lambda handler
  (`gamestream.integrations.aws`) both use them, so the two answer the same body with the same words. They raise
  `BodyError(status, message)`; each caller turns that into its own HTTP answer.
- **API Gateway proxy events** (REST API payload 1.0 and HTTP API payload 2.0): `header` and `raw_body` read a
  request out of one (the Lambda's input). `unwrap` reads a log record written by the seed's Lambda, which put
  the whole proxy event on the stream with its `body` replaced by the parsed event plus an int `eventTime`::

      {"resource": "/events", "httpMethod": "POST", "headers": {...}, "requestContext": {...},
       "body": {"eventName": "levelStart", "eventParams": {...}, "eventTime": 1767225600}, ...}

  The body may also still be the JSON text (possibly base64, `isBase64Encoded`), an array of events, or NDJSON.
  Each event is validated with the one schema (`event_time="input"`); one without `eventId` gets
  ``kinesis-<partition>-<offset>`` (``-<index>`` added when the body holds several events): derived from where
  the record sits in the log, so decoding the record again, after a crash or a replay, gives the same ids.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import zlib
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from gamestream import schema
from gamestream.log.base import LogRecord

# ------------------------------------------------------------------------------------------------ request bodies
JSON_TYPES = {"application/json"}
NDJSON_TYPES = {"application/x-ndjson", "application/ndjson", "application/jsonl", "application/x-jsonlines",
                "application/jsonlines"}
BodyKind = Literal["json", "ndjson", "sniff"]

_raw_list = msgspec.json.Decoder(list[msgspec.Raw])

MAX_IDEMPOTENCY_KEY = 200
"""The longest Idempotency-Key the collector and the Lambda handler take (characters)."""


class BodyError(Exception):
    """A request body that cannot be taken: `status` (400, 413 or 415) and a reason the sender can read."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def body_kind(content_type: str | None) -> BodyKind:
    """How to read a body sent with this Content-Type header (415 for one not taken)."""
    media_type = (content_type or "").split(";")[0].strip().lower()
    if media_type in JSON_TYPES:
        return "json"
    if media_type in NDJSON_TYPES:
        return "ndjson"
    if media_type == "":
        return "sniff"
    raise BodyError(415, f"content type {media_type!r} is not taken; send application/json (one event or an "
                         "array) or application/x-ndjson (one event per line)")


def content_encoding(header: str | None) -> Literal["identity", "gzip"]:
    """The Content-Encoding header's value, if taken (415 otherwise)."""
    encoding = (header if header is not None else "identity").strip().lower()
    if encoding not in ("identity", "gzip"):
        raise BodyError(415, f"content encoding {encoding!r} is not taken; use gzip or none")
    return encoding  # type: ignore[return-value]


def gunzip(body: bytes, limit: int) -> bytes:
    """Inflates one gzip member, never past `limit` + 1 bytes (a gzip bomb costs at most that much)."""
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        inflated = inflater.decompress(body, limit + 1)
    except zlib.error as error:
        raise BodyError(400, f"body is not valid gzip: {error}") from None
    if len(inflated) > limit or inflater.unconsumed_tail:
        raise BodyError(413, f"decompressed body is over the {limit:,}-byte limit")
    if not inflater.eof:  # a cut-off upload would otherwise be taken as the events before the cut
        raise BodyError(400, "body is not valid gzip: the compressed data is truncated")
    if inflater.unused_data:
        raise BodyError(400, "body is not valid gzip: data after the end of the compressed stream "
                             "(send one gzip member)")
    return inflated


def split(body: bytes, kind: BodyKind) -> list[bytes | str]:
    """The body's events, each as raw JSON bytes, or as a reason string when it is already known bad."""
    stripped = body.strip()
    if not stripped:
        raise BodyError(400, "the body is empty; send one event, an array of events or NDJSON")
    if kind == "sniff":
        kind = "json" if stripped[:1] == b"[" else "ndjson"
    if kind == "json":
        if stripped[:1] == b"[":
            try:
                return [bytes(raw) for raw in _raw_list.decode(stripped)]
            except msgspec.DecodeError as error:
                raise BodyError(400, f"the body is not a valid JSON array: {error}") from None
            except RecursionError:  # msgspec's answer to nesting deeper than it will follow
                raise BodyError(400, "the body is not a valid JSON array: nested too deeply") from None
        return [stripped]
    events: list[bytes | str] = []
    for line in stripped.split(b"\n"):
        line = line.strip()
        if line:
            events.append(line)
    return events


# ------------------------------------------------------------------------------------- API Gateway proxy events
def header(event: dict, name: str) -> str | None:
    """A request header of a proxy event, by case-insensitive name. Payload 2.0 gives lower-case names with
    repeated headers joined by commas; 1.0 gives them as sent (`headers` holds the last of repeated ones,
    `multiValueHeaders` all of them, which are joined here the 2.0 way)."""
    name = name.lower()
    multi = event.get("multiValueHeaders") or {}
    for key, values in multi.items():
        if key.lower() == name and values:
            return ",".join(str(v) for v in values)
    for key, value in (event.get("headers") or {}).items():
        if key.lower() == name:
            return None if value is None else str(value)
    return None


def raw_body(event: dict) -> bytes:
    """A proxy event's body as bytes: base64-decoded when `isBase64Encoded` (API Gateway does so for binary
    media types, and the HTTP API for any body it does not take as text), else the text in UTF-8. A body already
    parsed into JSON (the seed's records) is encoded back to JSON text."""
    body = event.get("body")
    if body is None:
        return b""
    if not isinstance(body, str):
        return msgspec.json.encode(body)
    if _is_true(event.get("isBase64Encoded")):
        try:
            return base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            raise BodyError(400, "body is not valid base64 (isBase64Encoded is true)") from None
    return body.encode("utf-8", errors="surrogateescape")


def _is_true(value: Any) -> bool:
    # the seed's Spark schema reads isBase64Encoded as a string; a record may carry "true"
    return value is True or (isinstance(value, str) and value.strip().lower() == "true")


_ENVELOPE_KEYS = (b'"requestContext"', b'"httpMethod"', b'"routeKey"')
_BODY_KEY = (b'"body":', b'"body" :')
_CANONICAL_START = b'{"eventName":'  # a canonical line's first key (`schema`'s field order)  # as a key: a string value is followed by `,`, `}` or `]`, never `:`
_ANY = msgspec.json.Decoder()
_ENCODE = msgspec.json.Encoder().encode
_VALIDATOR = schema.EventValidator(event_time="input")


def looks_like_envelope(payload: bytes) -> bool:
    """A cheap test on a log record's bytes before any parsing: a JSON object naming `body` and one of the keys
    only a proxy event has. Canonical NDJSON (gamestream's own records) drops unknown fields, so never passes;
    and it starts with its first event's `eventName`, which no proxy event has at the top: such a record is
    told apart by its first bytes, not by searching all of it (a collector's record is up to ~1 MB; the
    searches cost the processor a tenth of its time behind a busy collector)."""
    if payload.startswith(_CANONICAL_START):
        return False
    return (payload.lstrip()[:1] == b"{" and any(key in payload for key in _BODY_KEY)
            and any(key in payload for key in _ENVELOPE_KEYS))


def is_envelope(value: Any) -> bool:
    """Whether a parsed JSON value is an API Gateway proxy event (1.0 or 2.0), not an event of its own."""
    if not isinstance(value, dict) or "body" not in value or "eventParams" in value or "eventName" in value:
        return False
    return isinstance(value.get("requestContext"), dict) or "httpMethod" in value or "routeKey" in value


@dataclass
class Unwrapped:
    """What `unwrap` made of one record: the valid events as a canonical NDJSON record (same partition and
    offset, None when there is none), and a reason for each event (or the whole body) that failed."""

    record: LogRecord | None
    rejected: list[str] = field(default_factory=list)


def unwrap(record: LogRecord) -> Unwrapped | None:
    """The events of a record that holds one API Gateway proxy event (the seed's Lambda wrote such records);
    None when the record is something else (it is then read the usual way)."""
    if not looks_like_envelope(record.payload):
        return None
    try:
        envelope = _ANY.decode(record.payload)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None  # NDJSON of several lines, or not JSON: not one proxy event
    if not is_envelope(envelope):
        return None
    try:
        events = _body_events(envelope)
    except BodyError as error:
        return Unwrapped(None, [f"{error.message} (API Gateway event body)"])
    received = _request_time(envelope)
    prefix = f"kinesis-{record.partition}-{record.offset}"
    several = len(events) > 1
    lines: list[bytes] = []
    rejected: list[str] = []
    for index, event in enumerate(events):
        where = f"body[{index}]" if several else "body"
        if isinstance(event, str):  # a line known bad before parsing
            rejected.append(f"{event} (API Gateway event {where})")
            continue
        if isinstance(event, bytes):
            try:
                event = _ANY.decode(event)
            except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
                pass  # the validator words the reason
        if isinstance(event, dict):
            if event.get("eventId") is None:
                event = {**event, "eventId": f"{prefix}-{index}" if several else prefix}
            raw = _ENCODE(event)
        else:
            raw = event if isinstance(event, bytes) else _ENCODE(event)
        result = _VALIDATOR.validate(raw, now=received)
        if isinstance(result, schema.Rejection):
            rejected.append(f"{result} (API Gateway event {where})")
        elif b'"eventTime":null' in result.line:  # canonical JSON: only the top-level eventTime can read so
            rejected.append(f"eventTime: null, which the seed's eventTime.isNotNull() filter drops "
                            f"(API Gateway event {where})")
        else:
            lines.append(result.line)
    canonical = None
    if lines:
        canonical = LogRecord(record.partition, record.offset, b"\n".join(lines), len(lines), record.appended_at)
    return Unwrapped(canonical, rejected)


def _body_events(envelope: dict) -> list[Any]:
    """The body's events: parsed dicts when the body is already JSON (the seed's form), else raw JSON bytes per
    event from the text (or a reason string for an NDJSON line known bad)."""
    body = envelope.get("body")
    if isinstance(body, dict):
        return [body]
    if isinstance(body, list):
        if not body:
            raise BodyError(400, "no events in the body")
        return list(body)
    if not isinstance(body, str):
        raise BodyError(400, f"body is {type(body).__name__ if body is not None else 'null'}, not events")
    data = raw_body(envelope)
    if (header(envelope, "content-encoding") or "").strip().lower() == "gzip":
        data = gunzip(data, 16 * 1024 * 1024)
    try:
        kind = body_kind(header(envelope, "content-type"))
    except BodyError:  # the record is already in the log: read what is there rather than refuse it
        kind = "sniff"
    return split(data, kind)  # type: ignore[return-value]


def _request_time(envelope: dict) -> dt.datetime | None:
    """When API Gateway received the request (epoch seconds), from requestContext.requestTimeEpoch (1.0) or
    timeEpoch (2.0), both in milliseconds: stamps an event whose body had no eventTime of its own."""
    context = envelope.get("requestContext")
    if not isinstance(context, dict):
        return None
    for key in ("timeEpoch", "requestTimeEpoch"):
        value = context.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            try:
                return dt.datetime.fromtimestamp(value / 1000, dt.timezone.utc)
            except (OverflowError, OSError, ValueError):
                return None
    return None

"""Segment's HTTP tracking API, as Segment's own SDKs send it: a studio points its Segment client's API host at
gamestream and changes nothing else (docs/compat.md).

The endpoints, all `POST` (and `OPTIONS`, for a browser's preflight):

- a batch, `{"batch": [message, …], "sentAt": …, "writeKey": …, "context": …}`: `/v1/batch` (the server
  libraries: analytics-python, -node, -go, …), `/v1/b` (analytics-kotlin, analytics-swift, Analytics-CSharp for
  Unity, analytics.js' batching strategy) and `/v1/import` (the old name);
- one message, its type named by the path: `/v1/track`, `/v1/screen`, `/v1/page`, `/v1/identify`, `/v1/group`,
  `/v1/alias`, and the one-letter paths analytics.js sends each call to (`/v1/t`, `/v1/s`, `/v1/p`, `/v1/i`,
  `/v1/g`, `/v1/a`).

Whatever the Content-Type (Segment's mobile and web SDKs send `text/plain`, to spare a browser its preflight), the
body is JSON, gzip'd when `Content-Encoding: gzip` says so.

The write key: the user name of `Authorization: Basic base64(<key>:)` when the request has one (the server
libraries), else the body's `writeKey` (the mobile and web SDKs send no header). With write keys configured
(`--api-key`) it must be one of them, else 401; it is never logged, stored or echoed.

A message becomes a gamestream event (`gamestream.compat.gamestream_event`, mapping `[compat.segment]`):

- eventId: `messageId` (an SDK's retry sends the same one, so it lands once);
- eventName: a track's `event`; `screen:<name>` / `page:<name>` for a screen or page call (`screen` / `page`
  without a name); `identify`, `group`, `alias` for those calls; `purchaseEvent` for a name listed in
  `purchases` (by default `Order Completed`, …), with its amount from `revenue`, `total`, … among its properties;
- eventParams.device_id: `anonymousId` (player = "device", the default) or `userId` (player = "user"), else the
  other one;
- eventParams.client_event_time: `timestamp` (else `originalTimestamp`); sentAt: the message's `sentAt`, else the
  batch's, so the event's time is corrected for the device's clock; receivedAt: the collector's;
- eventParams: `properties` (a schema field or promoted parameter typed, any other kept in eventParams_extra),
  then `context.os.name` (else `context.device.type`) lower-cased as platform, `context.app.version` as
  app_version, `context.app.name` as app_name;
- event_extra: every other key of the message as sent (`type`, `userId`, `anonymousId`, `context` merged over the
  batch's, `traits`, `integrations`, `groupId`, `previousId`, `category`, …) and `vendor: "segment"`; not the
  write key, nor what changes between an SDK's retries of one message (`sentAt`, `_metadata`, `receivedAt`),
  which would make the retry a "different payload" to deduplication.

The answers, Segment's shapes (its SDKs read `code` and `message` from an error):

- 200 `{"success": true}`: every message is durable in the log;
- 200 `{"success": true, "accepted": n, "rejected": m, "errors": [{"index": i, "error": reason}]}`: some messages
  could not be events (no id, no name, a field of the wrong type, …); the others are durable. The SDKs drop a
  batch answered 4xx, and would drop the good messages with the bad; a retry would not make a bad one good;
- 400 `{"success": false, "code": "invalid_request", "message": …}`: a body that is not JSON, not a batch, or
  holds no valid message (then with the counts and errors);
- 401 (`unauthorized`) without a valid write key; 413 (`payload_too_large`) over the body size or the
  event-count limit; 415 for a Content-Encoding other than gzip;
- 503 (`unavailable`) with Retry-After while the unprocessed backlog is over its bound or the log cannot take
  writes: every Segment SDK keeps the batch and retries it (analytics-python waits the Retry-After, then retries).

Every answer carries `Access-Control-Allow-Origin: *`, so analytics.js in a browser can read it.
"""

from __future__ import annotations

import base64
import binascii
import functools
from collections.abc import Callable

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from gamestream import compat, schema
from gamestream.api.refusals import Refuse
from gamestream.api.compat import http
from gamestream.ingest.collector import IngestAnswer

VENDOR = "segment"
TYPES = ("track", "screen", "page", "identify", "group", "alias")
BATCH_PATHS = ("/v1/batch", "/v1/b", "/v1/import")
# `/v1/<type>` for the server libraries and curl, `/v1/<first letter>` for analytics.js' standard dispatcher.
SINGLE_PATHS = {path: kind for kind in TYPES for path in (f"/v1/{kind}", f"/v1/{kind[0]}")}

# Keys of a message that are not kept in event_extra: those mapped to a field, the write key, and those an SDK
# changes between retries of one message (kept, they would make the retry a different payload to deduplication).
_MAPPED = {"messageId", "event", "properties", "timestamp", "originalTimestamp"}
_NOT_KEPT = {"writeKey", "sentAt", "receivedAt", "_metadata"}
_GAMESTREAM_FIELDS = {field.name for field in schema.EVENT_FIELDS}  # never overwritten by a message's keys

CODES = {400: "invalid_request", 401: "unauthorized", 408: "request_timeout", 413: "payload_too_large",
         415: "unsupported_media_type", 429: "rate_limited", 503: "unavailable"}
CORS = {"Access-Control-Allow-Origin": "*"}
PREFLIGHT = {**CORS, "Access-Control-Allow-Methods": "POST, OPTIONS",
             "Access-Control-Allow-Headers": "Content-Type, Content-Encoding, Authorization, X-Retry-Count",
             "Access-Control-Max-Age": "86400"}
JSON = "application/json"
_encode = msgspec.json.Encoder().encode


# ------------------------------------------------------------------------------------------------ endpoints
async def post_batch(request: Request) -> Response:
    """`{"batch": [messages], "sentAt": …, "context": …, "integrations": …}`; the batch's context and
    integrations are merged under each message's own (Segment's rule)."""
    if request.method == "OPTIONS":
        return Response(status_code=204, headers=PREFLIGHT)
    body = await _authorised_body(request)
    messages = body.get("batch")
    if not isinstance(messages, list):
        raise Refuse(400, 'a batch is {"batch": [message, …]}; this body has no "batch" list')
    if not messages:
        raise Refuse(400, "the batch holds no message")
    shared = {key: body[key] for key in ("context", "integrations") if isinstance(body.get(key), dict)}
    events = [segment_event(_mapping_of(request), message, None, body.get("sentAt"), shared)
              for message in messages]
    return _answer(await http.ingest(request, events))


def single(kind: str) -> Callable:
    """The endpoint of one message of type `kind` (the path names it, whatever the body's `type` says)."""

    async def post_single(request: Request) -> Response:
        if request.method == "OPTIONS":
            return Response(status_code=204, headers=PREFLIGHT)
        message = await _authorised_body(request)
        event = segment_event(_mapping_of(request), message, kind, None, {})
        return _answer(await http.ingest(request, [event]))

    post_single.__name__ = f"post_{kind}"
    return post_single


async def _authorised_body(request: Request) -> dict:
    """The body as a JSON object, once the write key is known good: the Basic user name, checked before the body
    is read, else the body's `writeKey` (401 `Refuse` otherwise; 400 for a body that is not a JSON object)."""
    collector = http.collector_of(request)
    basic = basic_auth_key(request)
    if basic is not None and not http.authorised(collector, basic):
        raise Refuse(401, "invalid write key (the user name of the Basic authorization)")
    raw = await http.read_body(request)
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError as error:
        raise Refuse(400, f"the body is not JSON: {error}") from None
    if not isinstance(body, dict):
        raise Refuse(400, "the body must be a JSON object")
    if basic is None and not http.authorised(collector, _text(body.get("writeKey"))):
        raise Refuse(401, "missing or invalid write key: send it as the user name of HTTP Basic authorization "
                          "(empty password) or as \"writeKey\" in the body")
    return body


def basic_auth_key(request: Request) -> str | None:
    """The user name of `Authorization: Basic base64(user:password)` (Segment's write key); None without one. A
    header that cannot be decoded gives "" (no key, so refused when keys are configured)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return ""
    return decoded.partition(":")[0]


@functools.lru_cache(maxsize=8)
def _cached_mapping(compat_settings: tuple) -> compat.Mapping:
    return compat.mapping(compat_settings, VENDOR)


def _mapping_of(request: Request) -> compat.Mapping:
    return _cached_mapping(http.collector_of(request).settings.compat)


# ------------------------------------------------------------------------------------------------- mapping
def segment_event(mapping: compat.Mapping, message: object, kind: str | None, batch_sent_at: object,
                  shared: dict) -> dict | str:
    """One Segment message as a gamestream event (see the module docstring), or the reason it cannot be one.
    `kind`: the type the path names (None in a batch: the message's `type`); `shared`: the batch's context and
    integrations."""
    if not isinstance(message, dict):
        return "a message must be a JSON object"
    kind = kind or message.get("type")
    if kind not in TYPES:
        return f"unknown message type {kind!r}; Segment's types are {', '.join(TYPES)}"
    properties = message.get("properties")
    if properties is not None and not isinstance(properties, dict):
        return "properties must be a JSON object"
    if kind == "track" and not (isinstance(message.get("event"), str) and message["event"]):
        return 'a track message needs "event", the name of the event'
    message = _merged(message, shared)
    try:
        return compat.gamestream_event(
            mapping, name=event_name(kind, message), event_id=message.get("messageId"),
            device_id=message.get("anonymousId"), user_id=message.get("userId"),
            client_time=message.get("timestamp", message.get("originalTimestamp")),
            sent_at=message.get("sentAt", batch_sent_at), properties=properties,
            fields=context_fields(message.get("context")), extra=kept_keys(message, kind))
    except compat.Reject as error:
        return str(error)


def _merged(message: dict, shared: dict) -> dict:
    """`message` with the batch's context and integrations under its own (its own keys win)."""
    merged = dict(message)
    for key, value in shared.items():
        own = message.get(key) or {}
        if isinstance(own, dict):
            merged[key] = {**value, **own}
    return merged


def event_name(kind: str, message: dict) -> object:
    """A track's `event`; `screen:<name>` / `page:<name>` (`screen` / `page` without a name); the call's type for
    identify, group and alias."""
    if kind == "track":
        return message.get("event")
    if kind in ("screen", "page"):
        name = message.get("name")
        return f"{kind}:{name}" if isinstance(name, str) and name else kind
    return kind


def context_fields(context: object) -> dict:
    """The schema's own fields from Segment's `context`: platform (`os.name`, else `device.type`, lower-cased),
    app_version and app_name (`app.version`, `app.name`)."""
    if not isinstance(context, dict):
        return {}
    os_name = _text(_at(context, "os", "name")) or _text(_at(context, "device", "type"))
    return {"platform": os_name.lower() if os_name else None,
            "app_version": _text(_at(context, "app", "version")),
            "app_name": _text(_at(context, "app", "name"))}


def kept_keys(message: dict, kind: str) -> dict:
    """What event_extra keeps of a message: every key not mapped to a field, as sent (empty ones left out), but
    not the write key, nor the keys an SDK changes between retries, nor a name of gamestream's own fields."""
    mapped = _MAPPED | ({"name"} if kind in ("screen", "page") else set())
    kept = {key: value for key, value in message.items()
            if key not in mapped and key not in _NOT_KEPT and key not in _GAMESTREAM_FIELDS
            and value not in (None, {}, [], "")}
    kept["type"] = kind
    kept["vendor"] = VENDOR
    return kept


def _at(tree: dict, *path: str) -> object:
    for key in path:
        if not isinstance(tree, dict):
            return None
        tree = tree.get(key)
    return tree


def _text(value: object) -> str | None:
    """A non-empty string, numbers written out (an app version sent as 1.2); None otherwise."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return str(value)
    return value if isinstance(value, str) and value else None


# ------------------------------------------------------------------------------------------------- answers
def _answer(answer: IngestAnswer) -> Response:
    if answer.accepted == 0:
        body = {"success": False, "code": CODES[400], "message": "no valid message in the body",
                **msgspec.structs.asdict(answer)}
        return Response(_encode(body), status_code=400, media_type=JSON, headers=CORS)
    if answer.rejected == 0:
        return Response(b'{"success":true}', media_type=JSON, headers=CORS)
    return Response(_encode({"success": True, **msgspec.structs.asdict(answer)}), media_type=JSON, headers=CORS)


def refused(error: Refuse) -> Response:
    """A refusal in Segment's shape: `{"success": false, "code": …, "message": …}`, its headers (Retry-After,
    Connection: close) kept."""
    body = {"success": False, "code": CODES.get(error.status, "error"), "message": error.message}
    return Response(_encode(body), status_code=error.status, media_type=JSON, headers={**error.headers, **CORS})


ROUTES: list[BaseRoute] = [
    *(Route(path, http.counted(path, post_batch, refused), methods=["POST", "OPTIONS"]) for path in BATCH_PATHS),
    *(Route(path, http.counted(path, single(kind), refused), methods=["POST", "OPTIONS"])
      for path, kind in SINGLE_PATHS.items()),
]

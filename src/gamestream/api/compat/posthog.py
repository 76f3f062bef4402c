"""PostHog's capture protocol, as PostHog's SDKs speak it (posthog-python 7.x, posthog-js 1.x, posthog-android,
posthog-ios), so a game moves to gamestream by pointing its PostHog client's `host` / `api_host` at the collector
(docs/compat.md).

The protocol:
- `POST /batch/` (the server SDKs: `{"api_key", "batch": [event, …], "sent_at"}`), `/e/` and `/i/v0/e/`
  (posthog-js: the same envelope, or an array of events, or one event), `/capture/`, `/track/`, `/engage/`
  (one event, or an envelope), each also without its trailing slash — except `/batch`, which is Amplitude's.
- An event: `{"event", "distinct_id", "uuid", "timestamp", "properties": {…, "token", "$device_id", "$os",
  "$lib", "$app_version"}, "$set", "$set_once", "offset"}`; posthog-js sends `distinct_id` inside `properties`.
- Bodies: JSON; gzip by `Content-Encoding: gzip` (posthog-python's `gzip=True`) or without it (posthog-js's
  `compression=gzip-js`, a `text/plain` gzip body — recent posthog-js drops the query parameter, so a body that
  starts with gzip's magic bytes is inflated too); `compression=base64` or any form-encoded body: `data=<base64 of
  the JSON>` (posthog-js on `sendBeacon`). `compression=lz64` (posthog-js before 1.x's fflate) is refused with
  the reason: no release that gamestream tests sends it.
- The API key: `api_key` or `token` of the envelope, else of the first event or its `properties.token`; with
  write keys configured, it and every event's own token must be one of them (else 401). The key is removed from
  the stored properties and never echoed.
- Start-up calls of posthog-js and the mobile SDKs: `/flags/` and `/decide/` answer "no feature flags",
  `/array/<token>/config` and `config.js` a remote config with nothing enabled (no recording, surveys, heatmaps,
  site apps) and gzip as the compression to use.
- CORS: every route here answers a preflight and allows any origin, as PostHog does (posthog-js runs on the
  game's own web origin).

The mapping (`gamestream.compat.gamestream_event`, `[compat.posthog]`):
- eventName ← `event` (`$pageview`, `$identify`, `$set`, `$groupidentify`, `$autocapture`, … keep their names;
  a name in `purchases` becomes purchaseEvent with its amount);
- eventId ← `uuid`, so an SDK's retries land once;
- eventParams.device_id ← `properties.$device_id` (player = "device", the default: posthog-js's anonymous device
  id survives `identify`), else `distinct_id` (top-level, else `properties.distinct_id`); player = "user":
  `distinct_id`, else `$device_id`;
- eventParams.client_event_time ← `timestamp` (else `sent_at` − `offset` ms); sentAt ← the event's or the
  envelope's `sent_at` (none when the event sets `$ignore_sent_at`, PostHog's own switch);
- eventParams.platform ← `web` for posthog-js (`$lib` = web), else `$os` in lower case (`android`, `ios`), else
  `$lib`; eventParams.app_version ← `$app_version`; a `platform` / `app_version` property the game sends wins
  (posthog-python stamps the server's own `$os` over the caller's); the other properties as sent, but `token`;
- event_extra ← vendor "posthog", `distinct_id`, `$set`, `$set_once` (the top-level forms; inside `properties`
  they stay in eventParams_extra).

The answers, in PostHog's shapes (the SDKs read `detail`): 200 `{"status": 1, "accepted", "rejected", "errors"}`
(exactly 200: posthog-js retries any other 2xx); 400 `{"type": "validation_error", "code", "detail"}` for a body
that cannot be read or has no valid event (neither SDK retries a 4xx but 408/429, so a batch that cannot be
stored is not resent forever); 401 without a valid key; 413 over the limits; 503 with Retry-After for the backlog
or a log that cannot take writes — 503, not 429: posthog-python retries both, posthog-js only 5xx.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import math
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from gamestream import compat
from gamestream.api.refusals import Refuse
from gamestream.api.routes.events import gunzip
from gamestream.api.compat.http import authorised, collector_of, counted, ingest, read_body

VENDOR = "posthog"
GZIP_MAGIC = b"\x1f\x8b"
ANY_ORIGIN = {"Access-Control-Allow-Origin": "*"}

CAPTURE_PATHS = ("/batch/", "/e/", "/e", "/i/v0/e/", "/i/v0/e", "/capture/", "/capture", "/track/", "/track",
                 "/engage/", "/engage")
"""Where PostHog's SDKs send events. `/batch` (no slash: posthog-android's and posthog-ios's) is Amplitude's batch
endpoint in this collector; `payload_is_posthog` lets that route tell a PostHog body apart."""

FLAGS_PATHS = ("/flags/", "/flags", "/decide/", "/decide")

_decode = msgspec.json.Decoder().decode

# What the SDKs read at start-up: nothing switched on, so posthog-js loads no recorder, surveys or site apps and
# asks for no flags; gzip-js stays its compression (posthog-js drops to none when the config names none).
REMOTE_CONFIG: dict[str, Any] = {
    "supportedCompression": ["gzip", "gzip-js"], "hasFeatureFlags": False, "sessionRecording": False,
    "heatmaps": False, "surveys": False, "productTours": False, "autocaptureExceptions": False,
    "capturePerformance": False, "captureDeadClicks": False, "defaultIdentifiedOnly": True, "siteApps": [],
    "elementsChainAsString": True, "isAuthenticated": False, "toolbarParams": {}, "config": {
        "enable_collect_everything": True}}
NO_FLAGS: dict[str, Any] = {**REMOTE_CONFIG, "featureFlags": {}, "featureFlagPayloads": {}, "flags": {},
                            "errorsWhileComputingFlags": False, "quotaLimited": []}


# ----------------------------------------------------------------------------------------------------- capture
async def capture(request: Request) -> Response:
    """One capture request: the body read and decoded, the key checked, each event mapped, the valid ones durable
    in the log before the answer."""
    return await answer_body(request, await read_body(request))


async def answer_body(request: Request, body: bytes) -> Response:
    """The answer to a capture body already read within the size limit (inflated when it came with
    `Content-Encoding: gzip`): the route above, or another vendor's route that was sent a PostHog body."""
    collector = collector_of(request)
    payload = decode_payload(body, request.query_params.get("compression"), request.headers.get("content-type"),
                             collector.settings.max_body_bytes)
    raw_events, envelope = split_payload(payload)
    if not raw_events:
        raise Refuse(400, "no events in the body")
    _refuse_unless_authorised(collector, envelope, raw_events)
    mapping = compat.mapping(collector.settings.compat, VENDOR)
    events = [to_gamestream(mapping, event, envelope) for event in raw_events]
    answer = await ingest(request, events)
    errors = [{"index": e.index, "error": e.error} for e in answer.errors]
    counts = {"accepted": answer.accepted, "rejected": answer.rejected, "errors": errors}
    if answer.accepted == 0:
        detail = "no valid event in the body: " + "; ".join(f"event {e['index']}: {e['error']}" for e in errors[:5])
        return _error(400, "invalid_payload", detail, extra=counts)
    return JSONResponse({"status": 1, **counts}, headers=ANY_ORIGIN)


def decode_payload(body: bytes, compression: str | None, content_type: str | None, limit: int) -> object:
    """The JSON a capture body carries, whichever of posthog-js's encodings it came in (400 / 413 as `Refuse`)."""
    compression = (compression or "").lower()
    if compression == "lz64":
        raise Refuse(400, "compression=lz64 is not supported (posthog-js releases before fflate sent it); "
                          "upgrade posthog-js, or initialise it with disable_compression: true")
    if compression in ("gzip-js", "gzip") or body[:2] == GZIP_MAGIC:
        body = gunzip(body, limit)
    if (content_type or "").split(";")[0].strip().lower() == "application/x-www-form-urlencoded" \
            or body[:5] == b"data=":
        body = _form_data(body, base64_encoded=compression == "base64")
    if not body.strip():
        raise Refuse(400, "the body is empty; send an event, an array of events or {\"batch\": [...]}")
    try:
        return _decode(body)
    except (msgspec.DecodeError, RecursionError) as error:
        raise Refuse(400, f"the body is not valid JSON: {error}") from None


def _form_data(body: bytes, *, base64_encoded: bool) -> bytes:
    """The `data` field of a form-encoded body: base64 of the JSON (`compression=base64`), or the JSON itself."""
    try:
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError:
        raise Refuse(400, "the form-encoded body is not UTF-8") from None
    data = (fields.get("data") or [""])[0].strip()
    if not data:
        raise Refuse(400, "the form-encoded body has no data field")
    if base64_encoded or data[:1] not in ("{", "["):
        try:
            return base64.b64decode(data + "=" * (-len(data) % 4), validate=False)
        except (binascii.Error, ValueError):
            raise Refuse(400, "the data field is not base64") from None
    return data.encode()


def split_payload(payload: object) -> tuple[list[object], dict]:
    """(the events, the envelope's other keys): `{"batch": [...]}`, an array of events, or one event."""
    if isinstance(payload, list):
        return payload, {}
    if not isinstance(payload, dict):
        raise Refuse(400, "the body must be an event, an array of events or {\"batch\": [...]}")
    if "batch" in payload:
        batch = payload["batch"]
        if not isinstance(batch, list):
            raise Refuse(400, "batch must be an array of events")
        return batch, {k: v for k, v in payload.items() if k != "batch"}
    if "data" in payload and isinstance(payload["data"], (list, dict)):  # `{"data": …}`: an older posthog-js
        events, envelope = split_payload(payload["data"])
        return events, {**{k: v for k, v in payload.items() if k != "data"}, **envelope}
    return [payload], {}


def payload_is_posthog(payload: object) -> bool:
    """Whether a decoded JSON body is PostHog's (`{"batch": [...]}` of events with `distinct_id`), for a route
    that shares a path with another vendor (Amplitude's batch is `{"events": [...]}`)."""
    return isinstance(payload, dict) and isinstance(payload.get("batch"), list) and "events" not in payload


# ---------------------------------------------------------------------------------------------------- the key
def request_key(envelope: dict, events: list[object]) -> str | None:
    """The API key the SDK sent: the envelope's `api_key` / `token`, else the first event's (or its
    `properties.token`, posthog-js's place)."""
    key = _key_of(envelope)
    if key is None and events:
        key = _key_of(events[0])
    return key


def _key_of(item: object) -> str | None:
    if not isinstance(item, dict):
        return None
    properties = item.get("properties")
    for value in (item.get("api_key"), item.get("token"),
                  properties.get("token") if isinstance(properties, dict) else None):
        if isinstance(value, str) and value:
            return value
    return None


def _refuse_unless_authorised(collector, envelope: dict, events: list[object]) -> None:
    """With write keys configured, the request's key and every key an event carries must be one of them."""
    if not collector.keys:
        return
    keys = {request_key(envelope, events)} | {key for key in map(_key_of, events) if key is not None}
    if not all(authorised(collector, key) for key in keys):
        raise Refuse(401, "missing or invalid API key: send the project API key gamestream was given "
                          "(--api-key / GAMESTREAM_API_KEYS) as the PostHog client's api key")


# -------------------------------------------------------------------------------------------------- the mapping
def to_gamestream(mapping: compat.Mapping, event: object, envelope: dict) -> dict | str:
    """A PostHog event as a gamestream event, or the reason it cannot be one (module docstring: the mapping)."""
    if not isinstance(event, dict):
        return "the event is not a JSON object"
    properties = event.get("properties")
    if properties is None:
        properties = {}
    if not isinstance(properties, dict):
        return "properties must be a JSON object"
    properties = {k: v for k, v in properties.items() if k != "token"}  # the API key is not an event's data
    sent_at = event.get("sent_at", envelope.get("sent_at"))
    client_time = event.get("timestamp")
    if client_time is None:
        client_time = _minus_offset(sent_at, event.get("offset"))
    if properties.get("$ignore_sent_at") is True:
        sent_at = None
    distinct_id = event.get("distinct_id", properties.get("distinct_id"))  # posthog-js: in properties only
    extra = {"vendor": VENDOR, "distinct_id": distinct_id, "$set": event.get("$set"),
             "$set_once": event.get("$set_once")}
    try:
        return compat.gamestream_event(
            mapping, name=event.get("event"), event_id=event.get("uuid"),
            device_id=properties.get("$device_id"), user_id=distinct_id,
            client_time=client_time, sent_at=sent_at, properties=properties,
            fields=_fields(properties),
            extra=extra)
    except compat.Reject as reason:
        return str(reason)


def _fields(properties: dict) -> dict[str, str | None]:
    """platform and app_version from PostHog's own properties, unless the game sends `platform` / `app_version`
    itself (posthog-python stamps the server's `$os` over the caller's: a game server names the player's)."""
    return {"platform": None if "platform" in properties else _platform(properties),
            "app_version": None if "app_version" in properties else _text(properties.get("$app_version"))}


def _platform(properties: dict) -> str | None:
    """`web` for posthog-js (a browser game is a web game whatever the desktop's OS), else `$os` in lower case
    (`android`, `ios` from the mobile SDKs and Unity), else the SDK (`$lib`)."""
    lib = _text(properties.get("$lib"))
    if lib == "web":
        return lib
    os_name = _text(properties.get("$os"))
    return os_name.lower() if os_name else lib


def _text(value: object) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def _minus_offset(sent_at: object, offset: object) -> str | None:
    """`sent_at` − `offset` milliseconds (older posthog-js sends an offset instead of a timestamp); None when
    either is missing or unreadable (the event then takes the receive time)."""
    if not isinstance(sent_at, str) or isinstance(offset, bool) or not isinstance(offset, (int, float)) \
            or not math.isfinite(offset):
        return None
    try:
        moment = dt.datetime.fromisoformat(sent_at.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        return None
    return (moment - dt.timedelta(milliseconds=offset)).isoformat()


# -------------------------------------------------------------------------------------------- start-up calls
async def flags(request: Request) -> Response:
    """`/flags/` and `/decide/`: no feature flags, nothing switched on (`NO_FLAGS`)."""
    return JSONResponse(NO_FLAGS, headers=ANY_ORIGIN)


async def remote_config(request: Request) -> Response:
    """`/array/<token>/config`: posthog-js's remote config as JSON (`REMOTE_CONFIG`)."""
    return JSONResponse(REMOTE_CONFIG, headers=ANY_ORIGIN)


async def remote_config_js(request: Request) -> Response:
    """`/array/<token>/config.js`: the remote config as the script the full bundle loads. It files the config
    under the token it reads from its own URL, so the answer does not carry the key."""
    script = ("(function(){var w=window,s=document.currentScript,m=s&&/\\/array\\/([^/?#]+)\\/config\\.js/"
              ".exec(s.src);w._POSTHOG_REMOTE_CONFIG=w._POSTHOG_REMOTE_CONFIG||{};"
              "if(m){w._POSTHOG_REMOTE_CONFIG[decodeURIComponent(m[1])]={config:"
              + msgspec.json.encode(REMOTE_CONFIG).decode() + ",siteApps:[]};}})();\n")
    return Response(script, media_type="application/javascript", headers=ANY_ORIGIN)


# --------------------------------------------------------------------------------------------- answers, CORS
def _error(status: int, code: str, detail: str, headers: dict[str, str] | None = None,
           extra: dict | None = None) -> JSONResponse:
    kind = {401: "authentication_error", 503: "server_error"}.get(status, "validation_error")
    return JSONResponse({"type": kind, "code": code, "detail": detail, "attr": None, **(extra or {})},
                        status_code=status, headers={**ANY_ORIGIN, **(headers or {})})


def refused(error: Refuse) -> Response:
    """A `Refuse` in PostHog's error shape (`detail` is what posthog-python raises with)."""
    code = {400: "invalid_payload", 401: "invalid_api_key", 408: "timeout", 413: "payload_too_large",
            415: "unsupported_encoding", 503: "try_later"}.get(error.status, "refused")
    return _error(error.status, code, error.message, error.headers)


async def preflight(request: Request) -> Response:
    """A CORS preflight: any origin, the methods and headers it asks for, for a day."""
    asked = request.headers.get("access-control-request-headers")
    return Response(status_code=204, headers={
        **ANY_ORIGIN, "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
        "Access-Control-Allow-Headers": asked or "Content-Type", "Access-Control-Max-Age": "86400"})


def _route(path: str, handler: Callable[[Request], Awaitable[Response]], methods: list[str]) -> Route:
    """`handler` at `path`, counted under it, its refusals in PostHog's shape; OPTIONS answered as a preflight."""
    answered = counted(path, handler, refused=refused)

    async def endpoint(request: Request) -> Response:
        if request.method == "OPTIONS":
            return await preflight(request)
        return await answered(request)

    endpoint.__name__ = f"posthog_{handler.__name__}"
    return Route(path, endpoint, methods=[*methods, "OPTIONS"])


ROUTES: list[BaseRoute] = [
    *(_route(path, capture, ["POST"]) for path in CAPTURE_PATHS),
    *(_route(path, flags, ["GET", "POST"]) for path in FLAGS_PATHS),
    _route("/array/{token}/config", remote_config, ["GET"]),
    _route("/array/{token}/config.js", remote_config_js, ["GET"]),
]

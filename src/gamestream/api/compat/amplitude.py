"""Amplitude's HTTP API v2, as Amplitude's own SDKs speak it: `POST /2/httpapi` and `POST /batch`.

A studio points its Amplitude SDK's server URL at gamestream (docs/compat.md); nothing else changes.

The request (both paths, the same body; gzip'd when `Content-Encoding: gzip`, any Content-Type, since the
browser SDK's beacon sends text/plain):

    {"api_key": "<key>", "client_upload_time": "2026-12-04T10:00:00.000Z",  # Kotlin, Swift, browser SDKs
     "events": [{"event_type": "level_up", "device_id": "…", "user_id": "…", "time": 1764842400000,
                 "insert_id": "…", "event_properties": {…}, "user_properties": {…}, "platform": "Android", …}],
     "options": {"min_id_length": 5}}

Each event becomes a gamestream event (`compat.gamestream_event`, `[compat.amplitude]` in gamestream.toml):

| Amplitude                         | gamestream                                                              |
|-----------------------------------|-------------------------------------------------------------------------|
| event_type                        | eventName (`purchaseEvent` for a purchase, its own name in vendor_event)|
| insert_id                         | eventId: an SDK's retry of the event lands once                         |
| device_id / user_id               | eventParams.device_id (`player`: "device" by default, else "user")      |
| time (epoch ms)                   | eventParams.client_event_time                                           |
| client_upload_time (request)      | sentAt: eventTime is then the device's time corrected for its clock     |
| event_properties                  | eventParams (schema fields typed, the rest in eventParams_extra)        |
| platform, app_version/version_name| eventParams.platform, eventParams.app_version                           |
| revenue, or price × quantity      | eventParams.amount of a purchase (also $revenue, $price × $quantity in  |
|                                   | event_properties, as the SDKs' Revenue API sends them)                  |
| everything else (user_id,         | event_extra, as sent (a key named like a gamestream top-level field is  |
| device_id, user_properties, groups| kept as `amplitude_<key>`), with `vendor: "amplitude"`                  |
| os_name, country, session_id, …)  |                                                                         |

A purchase is an event whose event_type is in `purchases` (by default `revenue_amount`, the event of the SDKs'
Revenue API, and `purchase`, `Purchase`, `purchaseEvent`). Its amount is Amplitude's own revenue — `price ×
quantity` (quantity 1 when absent) when a price is given, else `revenue`; top-level fields first, then
`$price`/`$quantity`/`$revenue` in event_properties — else the first of `amount` found in event_properties.
`$identify` and `$groupidentify` events are stored as events under their own names (their user_properties /
group_properties in event_extra); like any event they need a device or user id.

The answers, in Amplitude's shapes, so the SDK's own retry logic does the right thing:

- 200 `{"code": 200, "events_ingested": n, "payload_size_bytes": b, "server_upload_time": ms}`: every event is
  durable in the log.
- 400 with `events_with_missing_fields` / `events_with_invalid_fields` (`{field: [indexes]}`), a readable `error`
  and gamestream's `errors` (`[{"index", "error"}]`): when any event is invalid NOTHING is stored, as Amplitude
  does; the SDK drops the events named and resends the others.
- 400 `{"missing_field": "api_key"}` / `{"error": "Invalid API key: …"}`: write keys are configured and the body
  has none, or one that is not among them (the SDK drops the batch; the key is never echoed nor logged).
- 400 `{"missing_field": "events"}` / `{"error": "Invalid JSON request body"}`: a body that is no upload.
- 413 `{"code": 413, "error": …}`: over the body size or the event-count limit (the SDK splits its batch).
- 429 with every event in `throttled_events` and Retry-After: the collector's backlog is over its bound (the
  SDKs wait, then resend); 503 `{"code": 503, …}` with Retry-After: the log cannot take writes (the SDK retries).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from gamestream import compat, schema
from gamestream.api.collector import Collector
from gamestream.api.compat import posthog
from gamestream.api.compat.http import Handler, authorised, collector_of, counted, ingest, read_body
from gamestream.api.refusals import Refuse
from gamestream.api.routes.events import retry_after
from gamestream.ingest.collector import ErrorItem, IngestAnswer

VENDOR = "amplitude"

_decode = msgspec.json.Decoder().decode

# Keys of an Amplitude event that become gamestream fields; every other key is kept in event_extra.
_MAPPED = frozenset({"event_type", "insert_id", "time", "event_properties", "platform", "app_version"})
# gamestream's own top-level names: an Amplitude key spelled like one is kept as `amplitude_<key>`, never read
# as the gamestream field.
_RESERVED = frozenset(f.name for f in schema.EVENT_FIELDS) | {"vendor"}
# A gamestream field named in a rejection → the Amplitude field the sender sent it in.
_FIELD_OF = {"eventId": "insert_id", "eventName": "event_type", "eventTime": "time",
             "eventParams.client_event_time": "time", "eventParams.device_id": "device_id",
             "eventParams.amount": "revenue", "eventParams.platform": "platform",
             "eventParams.app_version": "app_version", "sentAt": "client_upload_time"}
_MISSING, _INVALID = "events_with_missing_fields", "events_with_invalid_fields"


# ---------------------------------------------------------------------------------------------------- route
async def post_upload(request: Request) -> Response:
    """One upload: 1. the body, 2. the api_key, 3. the backlog, 4. the events mapped, 5. all appended durably
    or none (any invalid), 6. the answer."""
    collector = collector_of(request)
    body = await read_body(request)  # 1.
    if request.url.path == "/batch" and _is_posthog(body):  # PostHog's mobile SDKs post to /batch too
        try:
            return await posthog.answer_body(request, body)
        except Refuse as error:
            return posthog.refused(error)
    upload = parse_upload(body)
    if isinstance(upload, Response):
        return upload
    if refusal := key_refusal(collector, upload.api_key):  # 2.
        return refusal
    if collector.backlog_over_bound():  # 3.
        return throttled(len(upload.events), f"backlog of {collector.backlog:,} unprocessed events is over the "
                                             f"bound of {collector.settings.max_backlog_events:,}; retry later",
                         retry_after(collector.settings))
    mapping = compat.mapping(collector.settings.compat, VENDOR)
    converted = [to_gamestream(mapping, event) for event in upload.events]  # 4.
    # 5. one invalid event and nothing is appended: Amplitude answers 400 for the whole request and the SDK
    # resends the valid events, so appending them now would store them before their resend
    answer = await ingest(request, [c.event for c in converted], sent_at=upload.sent_at, all_or_nothing=True,
                          check_backlog=False)
    if answer.rejected:  # 6.
        return invalid_events(answer, converted)
    return answer_json(200, {"events_ingested": answer.accepted, "payload_size_bytes": len(body),
                             "server_upload_time": _epoch_ms(upload.received)})


def refused(error: Refuse) -> Response:
    """A refusal of the shared code (body too big, gzip, the event-count limit, the log) in Amplitude's shape."""
    return answer_json(error.status, {"error": error.message}, error.headers)


# Browsers (the web SDK, a WebGL build) post from the game's own origin, as they post to api2.amplitude.com,
# which allows any origin: the key is in the body and is public in the game's code anyway.
CORS = {"Access-Control-Allow-Origin": "*"}
PREFLIGHT = {**CORS, "Access-Control-Allow-Methods": "POST, OPTIONS", "Access-Control-Max-Age": "86400",
             "Access-Control-Allow-Headers": "Content-Type, Content-Encoding, Accept"}


def cross_origin(endpoint: Handler) -> Handler:
    """`endpoint` for browsers too: a CORS preflight (OPTIONS) is answered 204, every answer allows any
    origin."""

    async def answered(request: Request) -> Response:
        if request.method == "OPTIONS":
            return Response(status_code=204, headers=PREFLIGHT)
        response = await endpoint(request)
        response.headers.update(CORS)
        return response

    answered.__name__ = endpoint.__name__
    return answered


ROUTES: list[BaseRoute] = [
    Route(path, cross_origin(counted(path, post_upload, refused=refused)), methods=["POST", "OPTIONS"])
    for path in ("/2/httpapi", "/batch")
]


# ------------------------------------------------------------------------------------------------- the body
@dataclass(frozen=True)
class Upload:
    api_key: object
    events: list
    sent_at: dt.datetime | None  # client_upload_time, when the SDK sends one that reads as a time
    received: dt.datetime


def _is_posthog(body: bytes) -> bool:
    """Whether `body` is a PostHog batch (`{"api_key", "batch": [...]}`, never Amplitude's `events`): PostHog's
    Unity, Android and iOS SDKs post it to `{host}/batch`, the path of Amplitude's batch API."""
    try:
        return posthog.payload_is_posthog(_decode(body))
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return False


def parse_upload(body: bytes) -> Upload | Response:
    """The upload in `body`, or the 400 Amplitude answers for a body that is not one."""
    received = dt.datetime.now(dt.timezone.utc)
    try:
        payload = _decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return answer_json(400, {"error": "Invalid JSON request body"})
    if not isinstance(payload, dict):
        return answer_json(400, {"error": "Invalid JSON request body: expected an object with api_key and events"})
    events = payload.get("events")
    if not isinstance(events, list) or not events:
        return answer_json(400, {"error": "Request missing required field: events (a non-empty list of events)",
                                 "missing_field": "events"})
    return Upload(payload.get("api_key"), events, _upload_time(payload.get("client_upload_time")), received)


def _upload_time(value: object) -> dt.datetime | None:
    """client_upload_time as the request's sentAt; one that is not a time is ignored (eventTime is then the
    receive time), rather than refusing events Amplitude would take."""
    if not isinstance(value, str):
        return None
    try:
        return schema.parse_timestamp(value, "client_upload_time")
    except ValueError:
        return None


def key_refusal(collector: Collector, api_key: object) -> Response | None:
    """Amplitude's answer for a missing or unknown api_key when write keys are configured; None when it may
    pass. The key is never part of the answer (Amplitude echoes it; gamestream does not)."""
    if not collector.keys:
        return None
    if api_key is None or api_key == "":
        return answer_json(400, {"error": "Request missing required field: api_key", "missing_field": "api_key"})
    if not isinstance(api_key, str) or not authorised(collector, api_key):
        # "Invalid API key:" is the prefix the SDKs read as a key they must not retry with.
        return answer_json(400, {"error": "Invalid API key: the api_key is not one of this collector's write keys "
                                          "(--api-key / GAMESTREAM_API_KEYS)"})
    return None


# ----------------------------------------------------------------------------------------------- the events
@dataclass(frozen=True)
class Converted:
    """One Amplitude event as a gamestream event, or the reason it cannot be one (`event` is then that reason,
    as `plan_appends` takes it) with the Amplitude field and how it is wrong (`_MISSING` / `_INVALID`)."""

    event: dict | str
    field: str = ""
    problem: str = ""


def to_gamestream(mapping: compat.Mapping, event: object) -> Converted:
    """One Amplitude event as a gamestream event (the table in the module's docstring)."""
    if not isinstance(event, dict):
        return Converted("event: expected an object", "event", _INVALID)
    name = event.get("event_type")
    if not isinstance(name, str) or not name:
        return Converted("event_type: required (a non-empty string)", "event_type", _MISSING)
    if not (_present(event.get("device_id")) or _present(event.get("user_id"))):
        return Converted("device_id / user_id: required, one of them", "device_id", _MISSING)
    properties = event.get("event_properties")
    if properties is not None and not isinstance(properties, dict):
        return Converted("event_properties: expected an object", "event_properties", _INVALID)
    client_time = compat.epoch_ms(event.get("time"))
    if event.get("time") is not None and client_time is None:
        return Converted("time: expected epoch milliseconds", "time", _INVALID)
    try:
        converted = compat.gamestream_event(
            mapping, name=name, event_id=event.get("insert_id"), device_id=event.get("device_id"),
            user_id=event.get("user_id"), client_time=client_time, properties=properties,
            fields={"platform": event.get("platform"),
                    "app_version": event.get("app_version") or event.get("version_name")},
            extra=_extra(event))
    except compat.Reject as reject:
        return Converted(str(reject), "event", _INVALID)
    revenue = amplitude_revenue(event, properties or {})
    if converted["eventName"] == schema.PURCHASE and revenue is not None:
        converted["eventParams"]["amount"] = revenue
    return Converted(converted)


def amplitude_revenue(event: dict, properties: dict) -> float | None:
    """The revenue Amplitude counts for an event: `price × quantity` (quantity 1 when absent) when a price is
    given, else `revenue`; the top-level fields first, then the Revenue API's `$price`, `$quantity`, `$revenue`
    in event_properties. None when the event carries none."""
    for price, quantity, revenue in ((event.get("price"), event.get("quantity"), event.get("revenue")),
                                     (properties.get("$price"), properties.get("$quantity"),
                                      properties.get("$revenue"))):
        if (unit := compat.number(price)) is not None:
            count = compat.number(quantity)
            return unit * (count if count is not None else 1.0)
        if (total := compat.number(revenue)) is not None:
            return total
    return None


def _extra(event: dict) -> dict:
    """The event's keys that are no gamestream field, kept in event_extra (a reserved name prefixed)."""
    extra = {"vendor": VENDOR}
    for key, value in event.items():
        if key not in _MAPPED:
            extra[f"amplitude_{key}" if key in _RESERVED else key] = value
    return extra


def _present(value: object) -> bool:
    return value is not None and str(value) != ""


# ------------------------------------------------------------------------------------------------ the answers
def answer_json(status: int, body: dict, headers: dict[str, str] | None = None) -> Response:
    """Amplitude's answers all carry `code`, the status: the SDKs read it from the body."""
    return JSONResponse({"code": status, **body}, status_code=status, headers=headers)


def invalid_events(answer: IngestAnswer, converted: list[Converted]) -> Response:
    """400 naming every invalid event by the Amplitude field at fault, the way the SDKs read it (they drop the
    indexes named and resend the rest); nothing was stored."""
    named: dict[str, dict[str, list[int]]] = {_MISSING: {}, _INVALID: {}}
    for item in answer.errors:
        problem, field = _fault(item, converted[item.index])
        named[problem].setdefault(field, []).append(item.index)
    first = "; ".join(f"event {item.index}: {item.error}" for item in answer.errors[:3])
    more = f" (and {len(answer.errors) - 3} more)" if len(answer.errors) > 3 else ""
    error = (f"{answer.rejected} of {len(converted)} events are invalid and nothing was stored; resend the others: "
             f"{first}{more}")
    return answer_json(400, {"error": error, **{k: v for k, v in named.items() if v},
                             "errors": [msgspec.structs.asdict(item) for item in answer.errors]})


def _fault(item: ErrorItem, converted: Converted) -> tuple[str, str]:
    """(missing or invalid, Amplitude field) of one rejected event: its own when the mapping refused it, else the
    field gamestream's validator names ("eventParams.level: expected int" → event_properties)."""
    if converted.field:
        return converted.problem, converted.field
    field, _, reason = item.error.partition(": ")
    problem = _MISSING if reason == "required" else _INVALID
    if field in _FIELD_OF:
        return problem, _FIELD_OF[field]
    if field.startswith("eventParams."):
        return problem, "event_properties"
    return problem, "event"


def throttled(events: int, reason: str, headers: dict[str, str]) -> Response:
    """429 with every event throttled: the SDKs hold throttled events back (the Python SDK 30 s) and resend them,
    rather than retrying at once; no quota is exceeded, so none is dropped."""
    return answer_json(429, {"error": reason, "throttled_events": list(range(events)), "throttled_devices": {},
                             "throttled_users": {}, "exceeded_daily_quota_users": {},
                             "exceeded_daily_quota_devices": {}}, headers)


def _epoch_ms(moment: dt.datetime) -> int:
    return int(moment.timestamp() * 1000)

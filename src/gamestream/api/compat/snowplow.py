"""Snowplow's tracker protocol, as its official trackers (Python, JavaScript, Android, iOS, Unity, …) send it.

Routes (docs/compat.md):
- `POST /com.snowplowanalytics.snowplow/tp2`: a payload_data envelope, `{"schema": "iglu:com.snowplowanalytics.
  snowplow/payload_data/jsonschema/1-0-4", "data": [{…}, …]}`, each element one event as a map of tracker-protocol
  parameters (string values: `e`, `eid`, `dtm`, `stm`, `se_ac`, `ue_px`, `cx`, …). Answered like `POST /v1/events`:
  200 `{"accepted", "rejected", "errors": [{"index", "error"}]}` when at least one event was stored, 400 with the
  same counts when none was.
- `GET /i`: one event in the query string (a tracker's GET method, or an `<img>` pixel); answered with a 1x1
  transparent GIF once the event is stored, 400 `{"error": reason}` when it cannot be.
- `OPTIONS /com.snowplowanalytics.snowplow/tp2`: the browser's CORS preflight for the JavaScript tracker's POST.
  Every answer to a request with an `Origin` echoes it with `Access-Control-Allow-Credentials: true` (the web
  tracker sends its requests with credentials, so `*` would not do).

The other answers are gamestream's own (`compat.http`): 401 without a valid write key when keys are configured
(Snowplow trackers send none of their own: the key goes in `X-API-Key` or `Authorization: Bearer`, set on the
tracker's HTTP client or by a proxy in front), 413 over the body or event-count limits, 503 with Retry-After over
the backlog bound or when the log cannot take writes. The trackers retry every failure but 400, 401, 403, 410 and
422 with their own backoff (they ignore Retry-After), and a 2xx is success; a retried batch lands once, because the
eventId is the tracker's `eid`.

The mapping of one event (`tracker_event`; `[compat.snowplow]` in gamestream.toml overrides `DEFAULTS["snowplow"]`):
- eventName by `e`: `se` → its action `se_ac`; `ue` → the name in its self-describing schema
  (`iglu:com.acme/level_up/jsonschema/1-0-0` → `level_up`; a mobile screen view → `screen_view`); `pv` →
  `page_view`; `pp` → `page_ping`; `tr` → `transaction`; `ti` → `transaction_item`. A name in the mapping's
  `purchases` (by default `transaction`, `purchase`, …) makes it a `purchaseEvent` with the amount from the first of
  the mapping's `amount` properties found (`value` of a structured event is its `se_va`; `tr_tt` of a transaction;
  `revenue`, `total`, … of a self-describing event's data). Transaction items are not purchases: their
  transaction already carries the total.
- eventParams: a structured event's `category`, `label`, `property`, `value` (se_ca, se_la, se_pr, se_va); a
  self-describing event's data fields; a page view's `url`, `title`, `referrer`; a transaction's and an item's own
  tr_* / ti_* parameters (amounts as numbers). Fields of the schema are typed by the validator, others kept in
  eventParams_extra.
- eventId: `eid`. eventParams.client_event_time: `ttm` (the true timestamp, when set), else `dtm`; sentAt: `stm`,
  so the event time is corrected for the device's clock.
- eventParams.device_id, by `player`: "device" → `duid`, else the session context's `userId`, else the mobile
  context's `appleIdfv`, `androidIdfa`, `appleIdfa`, else `tnuid`, `nuid`; "user" → `uid`. Either falls back to
  the other.
- platform: the mobile context's `osType` (`ios`, `android`), else `p` (`mob`, `web`, `pc`, …); app_version: the
  application context's `version`, else the mobile context's `appVersion`; app_name: `aid`.
- event_extra: `vendor` ("snowplow"), `schema` (a self-describing event's), `contexts` (the decoded `co`/`cx`
  entities, as sent), and `snowplow`: every other tracker-protocol parameter by its own name (uid, duid, p, tna,
  tv, res, lang, …).
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from gamestream import compat
from gamestream.api.access import BEARER, presented_key
from gamestream.api.refusals import Refuse
from gamestream.api.compat.http import Handler, authorised, collector_of, counted, ingest, read_body
from gamestream.ingest.collector import IngestAnswer, encode

TP2 = "/com.snowplowanalytics.snowplow/tp2"
PIXEL_PATH = "/i"
VENDOR = "snowplow"
JSON = "application/json"
PAYLOAD_DATA = "iglu:com.snowplowanalytics.snowplow/payload_data/jsonschema/1-0-"
"""Any 1-0-x revision of the envelope: the trackers have sent 1-0-0 to 1-0-4, all a list of parameter maps."""

PIXEL = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
"""The 1x1 transparent GIF a Snowplow collector answers `GET /i` with (an `<img>` pixel must get an image)."""

EVENT_NAMES = {"pv": "page_view", "pp": "page_ping", "tr": "transaction", "ti": "transaction_item"}
STRUCTURED = {"se_ca": "category", "se_la": "label", "se_pr": "property", "se_va": "value"}
PAGE = {"url": "url", "page": "title", "refr": "referrer"}
PAGE_PING = {**PAGE, "pp_mix": "pp_mix", "pp_max": "pp_max", "pp_miy": "pp_miy", "pp_may": "pp_may"}
DECIMALS = {"se_va", "tr_tt", "tr_tx", "tr_sh", "ti_pr"}
COUNTS = {"ti_qu", "pp_mix", "pp_max", "pp_miy", "pp_may"}
"""Parameters that are numbers in the protocol (the trackers send them as text): stored as numbers when numeric."""

MOBILE_CONTEXT = "mobile_context"
SESSION_CONTEXT = "client_session"
APPLICATION_CONTEXT = "application"
DEVICE_IDS_IN_MOBILE_CONTEXT = ("appleIdfv", "androidIdfa", "appleIdfa")
ALWAYS_CONSUMED = {"e", "eid", "stm", "ue_pr", "ue_px", "co", "cx", "aid"}

CORS_PREFLIGHT = {
    "Access-Control-Allow-Methods": "POST, GET, OPTIONS",
    "Access-Control-Allow-Headers": "Content-Type, SP-Anonymous, X-API-Key, Authorization",
    "Access-Control-Max-Age": "3600",
}


# -------------------------------------------------------------------------------------------------- endpoints
async def post_tp2(request: Request) -> Response:
    """The steps: 1. the key, 2. the body (size, gzip) and its envelope, 3. each parameter map as a gamestream
    event (or the reason it cannot be one), 4. validation and the durable append (`ingest`: the backlog, the
    event count), 5. the answer."""
    _refuse_unless_authorised(request)  # 1.
    parameter_maps = payload_data(await read_body(request))  # 2.
    mapping = _mapping(request)
    events = [tracker_event(mapping, parameters) for parameters in parameter_maps]  # 3.
    answer = await ingest(request, events)  # 4.
    if answer.accepted == 0:  # 5.
        message = "no events in the body" if not events else "no valid event in the body"
        return Response(encode({"error": message, **_counts(answer)}), status_code=400, media_type=JSON)
    return Response(encode(_counts(answer)), media_type=JSON)


async def get_pixel(request: Request) -> Response:
    """One event from the query string; the pixel once it is durable in the log."""
    _refuse_unless_authorised(request)
    parameters = dict(request.query_params)
    if not parameters:
        raise Refuse(400, "no event in the query string: GET /i takes one event's tracker-protocol parameters "
                          "(e, eid, dtm, …)")
    answer = await ingest(request, [tracker_event(_mapping(request), parameters)])
    if answer.accepted == 0:
        reason = answer.errors[0].error if answer.errors else "the event was not accepted"
        raise Refuse(400, reason)
    return Response(PIXEL, media_type="image/gif", headers={"Cache-Control": "no-cache, no-store"})


async def preflight(request: Request) -> Response:
    """The CORS preflight of a browser's POST (its JSON Content-Type is not a "simple" one)."""
    return Response(status_code=200, headers=CORS_PREFLIGHT)


def _refuse_unless_authorised(request: Request) -> None:
    if not authorised(collector_of(request), presented_key(request)):
        raise Refuse(401, "missing or invalid API key: this collector has write keys, and Snowplow trackers send "
                          "none of their own; add 'X-API-Key: <key>' or 'Authorization: Bearer <key>' to the "
                          "tracker's requests (its HTTP client's headers, or a proxy in front)", BEARER)


def _mapping(request: Request) -> compat.Mapping:
    return compat.mapping(collector_of(request).settings.compat, VENDOR)


def _counts(answer: IngestAnswer) -> dict[str, Any]:
    return {"accepted": answer.accepted, "rejected": answer.rejected, "errors": answer.errors}


def with_cors(handler: Handler) -> Handler:
    """`handler` with the request's Origin allowed on its answer, credentials included: the web tracker sends
    cookies (`withCredentials`), and a browser hides an answer without these headers from it, so the tracker would
    see a failure and send the batch again."""

    async def endpoint(request: Request) -> Response:
        response = await handler(request)
        origin = request.headers.get("origin")
        if origin:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Allow-Credentials"] = "true"
            response.headers["Vary"] = "Origin"
        return response

    endpoint.__name__ = getattr(handler, "__name__", "endpoint")
    return endpoint


# ------------------------------------------------------------------------------------------------ the envelope
def payload_data(body: bytes) -> list[object]:
    """The parameter maps of a tp2 body (`{"schema": "iglu:…/payload_data/jsonschema/1-0-x", "data": […]}`), or
    `Refuse(400)` saying what is wrong with the envelope. An element that is not a map is kept: it is rejected by
    index, with its reason, like any other bad event."""
    try:
        envelope = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise Refuse(400, f"the body is not JSON ({error}); POST {TP2} takes a payload_data envelope: "
                          f'{{"schema": "{PAYLOAD_DATA}4", "data": [{{…}}, …]}}') from None
    if not isinstance(envelope, dict) or not isinstance(envelope.get("data"), list):
        raise Refuse(400, f'the body must be a payload_data envelope {{"schema": "{PAYLOAD_DATA}4", '
                          '"data": [<one map of tracker-protocol parameters per event>]}')
    schema = envelope.get("schema")
    if not (isinstance(schema, str) and schema.startswith(PAYLOAD_DATA)):
        raise Refuse(400, f"the envelope's schema must be {PAYLOAD_DATA}<n>, not {str(schema)[:200]!r}")
    return envelope["data"]


# ------------------------------------------------------------------------------------------------ one event
def tracker_event(mapping: compat.Mapping, parameters: object) -> dict | str:
    """One event's tracker-protocol parameters as a gamestream event (module docstring: the mapping), or the
    reason it cannot be one (which `ingest` reports by the event's index)."""
    try:
        return _tracker_event(mapping, parameters)
    except compat.Reject as reason:
        return str(reason)


def _tracker_event(mapping: compat.Mapping, parameters: object) -> dict:
    if not isinstance(parameters, dict):
        raise compat.Reject(f"an event must be a map of tracker-protocol parameters, not {type(parameters).__name__}")
    params = {str(k): _text(v) for k, v in parameters.items() if _text(v) is not None}
    kind = params.get("e")
    contexts = _contexts(params)
    name, properties, consumed, schema = _what_happened(kind, params)
    mobile = _context_data(contexts, MOBILE_CONTEXT)
    session = _context_data(contexts, SESSION_CONTEXT)
    application = _context_data(contexts, APPLICATION_CONTEXT)
    device_id = _first(params.get("duid"), session.get("userId"),
                       *(mobile.get(key) for key in DEVICE_IDS_IN_MOBILE_CONTEXT),
                       params.get("tnuid"), params.get("nuid"))
    time_key = "ttm" if compat.epoch_ms(params.get("ttm")) is not None else "dtm"
    consumed = consumed | ALWAYS_CONSUMED | {time_key}
    leftovers = {k: v for k, v in params.items() if k not in consumed}
    os_type = mobile.get("osType")
    return compat.gamestream_event(
        mapping, name=name, event_id=params.get("eid"), device_id=device_id, user_id=params.get("uid"),
        client_time=compat.epoch_ms(params.get(time_key)), sent_at=compat.epoch_ms(params.get("stm")),
        properties=properties,
        fields={"platform": os_type.lower() if isinstance(os_type, str) and os_type else params.get("p"),
                "app_version": _first(application.get("version"), mobile.get("appVersion")),
                "app_name": params.get("aid")},
        extra={"vendor": VENDOR, "schema": schema, "contexts": contexts or None, VENDOR: leftovers or None})


def _what_happened(kind: str | None, params: dict[str, str]) -> tuple[str, dict, set[str], str | None]:
    """(eventName, properties, the parameters they consumed, the self-describing schema) by the event type `e`."""
    if kind == "se":
        action = params.get("se_ac")
        if not action:
            raise compat.Reject("a structured event (e=se) needs its action, se_ac: it is the event's name")
        return action, _renamed(params, STRUCTURED), {*STRUCTURED, "se_ac"}, None
    if kind == "ue":
        schema, data = _self_describing(params)
        return _schema_name(schema), data, set(), schema
    if kind == "pv":
        return EVENT_NAMES[kind], _renamed(params, PAGE), set(PAGE), None
    if kind == "pp":
        return EVENT_NAMES[kind], _renamed(params, PAGE_PING), set(PAGE_PING), None
    if kind in ("tr", "ti"):
        own = {k: k for k in params if k.startswith(f"{kind}_")}
        return EVENT_NAMES[kind], _renamed(params, own), set(own), None
    if kind is None:
        raise compat.Reject("the event has no type: e is missing (se, ue, pv, pp, tr or ti)")
    raise compat.Reject(f"event type e={kind[:40]!r} is not taken (se, ue, pv, pp, tr or ti)")


def _renamed(params: dict[str, str], names: dict[str, str]) -> dict[str, object]:
    return {new: _typed(old, params[old]) for old, new in names.items() if old in params}


def _typed(key: str, value: str) -> object:
    """A numeric parameter's text as its number (`DECIMALS` as floats, `COUNTS` as ints); others as sent."""
    number = compat.number(value) if key in DECIMALS or key in COUNTS else None
    if number is None:
        return value
    return int(number) if key in COUNTS and number.is_integer() else number


def _self_describing(params: dict[str, str]) -> tuple[str, dict]:
    """The unstruct_event's inner (schema, data), from `ue_pr` (JSON) or `ue_px` (base64url JSON)."""
    envelope = _json_parameter(params, "ue_pr", "ue_px")
    if envelope is None:
        raise compat.Reject("a self-describing event (e=ue) needs ue_pr or ue_px")
    inner = envelope.get("data") if isinstance(envelope, dict) else None
    schema = inner.get("schema") if isinstance(inner, dict) else None
    data = inner.get("data") if isinstance(inner, dict) else None
    if not isinstance(schema, str) or not isinstance(data, dict):
        raise compat.Reject('the self-describing event must be {"schema": "iglu:…/unstruct_event/…", "data": '
                            '{"schema": "iglu:<vendor>/<name>/jsonschema/<version>", "data": {…}}}')
    return schema, data


def _schema_name(schema: str) -> str:
    """`iglu:com.acme/level_up/jsonschema/1-0-0` → `level_up`."""
    parts = schema.split("/")
    if not schema.startswith("iglu:") or len(parts) != 4 or not parts[1]:
        raise compat.Reject(f"the self-describing event's schema must be iglu:<vendor>/<name>/jsonschema/"
                            f"<version>, not {schema[:200]!r}")
    return parts[1]


def _contexts(params: dict[str, str]) -> list[dict]:
    """The entities of `co` (JSON) or `cx` (base64url JSON): [{"schema", "data"}, …]; [] when none."""
    envelope = _json_parameter(params, "co", "cx")
    if envelope is None:
        return []
    entities = envelope.get("data") if isinstance(envelope, dict) else None
    if not isinstance(entities, list):
        raise compat.Reject('the contexts (co/cx) must be {"schema": "iglu:…/contexts/…", "data": [{"schema": …, '
                            '"data": {…}}, …]}')
    return [entity for entity in entities if isinstance(entity, dict)]


def _context_data(contexts: list[dict], name: str) -> dict:
    """The data of the first context entity whose schema is named `name` (any vendor, any version)."""
    for entity in contexts:
        schema = entity.get("schema")
        if isinstance(schema, str) and len(parts := schema.split("/")) == 4 and parts[1] == name:
            data = entity.get("data")
            return data if isinstance(data, dict) else {}
    return {}


def _json_parameter(params: dict[str, str], plain: str, encoded: str) -> Any:
    """The JSON value of parameter `plain`, else of `encoded` (base64url, padded or not); None when neither is
    given; `Reject` naming the parameter when it does not decode."""
    if plain in params:
        try:
            return json.loads(params[plain])
        except json.JSONDecodeError as error:
            raise compat.Reject(f"{plain} is not JSON ({error})") from None
    if encoded in params:
        text = params[encoded].strip().replace("+", "-").replace("/", "_")
        try:
            return json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        except (binascii.Error, ValueError) as error:
            raise compat.Reject(f"{encoded} is not base64url-encoded JSON ({error})") from None
    return None


def _text(value: object) -> str | None:
    """A parameter's value as the protocol's string (the trackers send strings; a number is taken as its text);
    None for an empty or structured value."""
    if value is None or isinstance(value, (dict, list)) or value == "":
        return None
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def _first(*values: object) -> str | None:
    return next((str(v) for v in values if v is not None and not isinstance(v, (dict, list)) and str(v) != ""),
                None)


ROUTES: list[BaseRoute] = [
    Route(TP2, with_cors(counted(TP2, post_tp2)), methods=["POST"]),
    Route(TP2, with_cors(preflight), methods=["OPTIONS"]),
    Route(PIXEL_PATH, with_cors(counted(PIXEL_PATH, get_pixel)), methods=["GET"]),
]

"""`POST /v1/funnel {"steps": [...], "within": "1h", "from": "YYYY-MM-DD", "to": "YYYY-MM-DD", "by": "platform"}`
→ `{"steps", "within", "from", "to", "by", "columns", "rows": [{...}, ...]}` (admin key; the definition:
`gamestream.api.funnel`). Anything wrong with the request is a 400 with the reason, never a 5xx."""

from __future__ import annotations

import asyncio

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gamestream.api.access import BEARER, admin_key_needed, is_admin
from gamestream.api.refusals import Refuse, answers_refusals, read_capped_body
from gamestream.settings import Settings

USAGE = ('send {"steps": ["NAME", "NAME[param=value]", {"event": "NAME", "where": {"param": "value"}}, ...], '
         '"within": "1h", "from": "YYYY-MM-DD", "to": "YYYY-MM-DD", "by": "platform"} as JSON (steps required)')
FIELDS = {"steps", "within", "from", "to", "by"}


@answers_refusals
async def post_funnel(request: Request) -> Response:
    from gamestream.api.funnel import Funnel, FunnelError, run, step_from_json
    from gamestream.api.query import to_json

    settings: Settings = request.app.state.settings
    if not is_admin(request):
        raise Refuse(401, admin_key_needed("POST /v1/funnel"), BEARER)
    body = _body_in(await read_capped_body(request, settings.max_body_bytes))
    try:
        funnel = Funnel.of([step_from_json(step) for step in body["steps"]], within=body.get("within"),
                           first_day=body.get("from"), last_day=body.get("to"), by=body.get("by"))
        table = await asyncio.to_thread(run, settings, funnel)
    except FunnelError as error:
        raise Refuse(400, str(error)) from None
    return JSONResponse({**funnel.describe(), "columns": table.column_names,
                         "rows": msgspec.json.decode(to_json(table))})


def _body_in(raw: bytes) -> dict:
    """The request's object, its fields of the right JSON types, or 400 with the usage."""
    try:
        body = msgspec.json.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        raise Refuse(400, f"the body is not JSON; {USAGE}") from None
    if not isinstance(body, dict) or not isinstance(body.get("steps"), list):
        raise Refuse(400, USAGE)
    unknown = set(body) - FIELDS
    if unknown:
        raise Refuse(400, f"unknown field {', '.join(sorted(unknown))}; {USAGE}")
    for name in ("within", "from", "to", "by"):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise Refuse(400, f"{name} is a string; {USAGE}")
    return body

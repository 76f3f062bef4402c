"""`POST /v1/forget {"device_ids": [...], "purge": false}` and `GET /v1/forget/{entry}` (admin key; docs/privacy.md).

Without purge the rows are deleted before the answer: 200 with the audit entry (`gamestream.tables.forget`).
With purge the rows are deleted, then the purge runs in the background (`api.purge_jobs`): 202 Accepted with
`Location: /v1/forget/<entry>`, where a poll answers the job's state — running, done (the report says purged)
or failed (with the reason).
"""

from __future__ import annotations

import asyncio

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gamestream.api.access import BEARER, admin_key_needed, is_admin, presented_key
from gamestream.api.purge_jobs import PurgeJobs
from gamestream.api.refusals import Refuse, answers_refusals, read_capped_body
from gamestream.ingest import geo
from gamestream.settings import Settings
from gamestream.tables import forget as forgetting

FORGET_MAX_DEVICES = 10_000
"""POST /v1/forget: more device ids in one request gets 400 (send several requests)."""
USAGE = 'send {"device_ids": ["<id>", ...], "purge": false} as JSON'
FIELDS = {"device_ids", "purge"}


def job_url(entry: str) -> str:
    return f"/v1/forget/{entry}"


@answers_refusals
async def post_forget(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    _refuse_unless_admin(request, "POST /v1/forget")
    ids, purge = _forget_request(await read_capped_body(request, settings.max_body_bytes))
    try:
        report = await asyncio.to_thread(forgetting.forget, settings, ids, requested_by=_requested_by(request),
                                         purge=False)
    except forgetting.ForgetError as error:
        raise Refuse(400, f"{error}; {USAGE}") from None
    jobs: PurgeJobs = request.app.state.purge_jobs
    if not purge:
        jobs.record_done(report)
        return JSONResponse({**report.to_dict(), "message": report.retention_message(settings)})
    job = jobs.start(report)
    return JSONResponse(job.answer(settings), status_code=202, headers={"Location": job_url(job.entry)})


@answers_refusals
async def get_forget(request: Request) -> Response:
    """The state of the forget `POST /v1/forget` answered with this entry: running while its purge runs."""
    _refuse_unless_admin(request, "GET /v1/forget")
    entry = request.path_params["entry"]
    jobs: PurgeJobs = request.app.state.purge_jobs
    job = jobs.get(entry)
    if job is None:
        raise Refuse(404, f"no forget {entry!r} in this process (a job is kept by the server that took its request, "
                          "for a while; the audit table holds every entry)")
    return JSONResponse(job.answer(request.app.state.settings))


def _refuse_unless_admin(request: Request, operation: str) -> None:
    if not is_admin(request):
        raise Refuse(401, admin_key_needed(operation), BEARER)


def _forget_request(raw: bytes) -> tuple[list, bool]:
    """The device ids and whether to purge, or 400 with the usage."""
    try:
        body = msgspec.json.decode(raw)
        ids, purge = body["device_ids"], body.get("purge", False)
        if not isinstance(ids, list) or not isinstance(purge, bool) or set(body) - FIELDS:
            raise TypeError
    except (msgspec.DecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError, RecursionError):
        raise Refuse(400, USAGE) from None
    if len(ids) > FORGET_MAX_DEVICES:
        raise Refuse(400, f"{len(ids)} device ids in one request; the limit is {FORGET_MAX_DEVICES}")
    return ids, purge


def _requested_by(request: Request) -> str:
    """Who the audit says asked: the admin key's fingerprint (never the key), and from where."""
    settings: Settings = request.app.state.settings
    who = (forgetting.key_fingerprint(presented_key(request) or "") if settings.keys_configured
           else "open server (no keys configured)")
    # from where: the peer, or the client a trusted proxy names (`geo_trusted_proxies`, as for geo_country)
    address = geo.client_address_of_scope(request.scope, geo.trusted_proxies(tuple(settings.geo_trusted_proxies)),
                                          settings.geo_forwarded_header)
    return who + f" from {address or 'unknown'}"

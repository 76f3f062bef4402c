"""`POST /v1/events`: validate → stamp → durable log append → answer.

Stateless apart from the log: any number can run behind a load balancer. A request is answered only once its
accepted events are durable in the log (group-committed and fsync'd), so a 200 means "will be in the table".

Answers:
- 200 `{"accepted": n, "rejected": m, "errors": [{"index": i, "error": "<field>: <reason>"}]}`; a batch may
  partly succeed; indices count from 0 in the order sent.
- 400 when the body cannot be parsed at all or nothing in it is valid; 401 without a valid key (when keys are
  set); 413 over the body / event-count limits (with `Connection: close` when over the body limit); 415 for a
  content type or encoding it does not take; 503 with Retry-After when the unprocessed backlog passes its bound,
  or the log cannot take writes.
- No input earns a 5xx: whatever a client sends is answered with a 4xx and a readable reason. The connection-level
  answers (408 slow body, 431 oversized head, 503 too many connections) come from `http_guard`.
- `Idempotency-Key`: the first answer is stored with the events in the same log transaction; a retry with the
  key gets that answer again and appends nothing.

The steps of `post_events`, in order: 1. the key, 2. the backlog, 3. the Idempotency-Key, 4. the body (kind,
size, gzip, split into events), 5. the event count, 6. validation into appends (`ingest.collector`: the whole
body in one native call when every event in it is provably valid, else split and event by event), with the
client's country looked up once (`ingest.geo`: the address is not kept), 7. the durable append, 8. the answer.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time

import msgspec
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from gamestream.api.access import BEARER
from gamestream.api.collector import Collector
from gamestream.api.refusals import CLOSE, Refuse, answer_refusal
from gamestream.ingest.collector import IngestAnswer, encode, plan_appends, plan_body
from gamestream import schema
from gamestream.log import AppendResult, Idempotency, envelope
from gamestream.settings import Settings

JSON = "application/json"


async def post_events(request: Request) -> Response:
    """Every answer is counted by status in `gamestream_http_requests`, and timed."""
    collector: Collector = request.app.state.collector
    started = time.perf_counter()
    try:
        response = await _ingest(request, collector)
    except (Refuse, ClientDisconnect) as error:
        response = answer_refusal(error)
    collector.count_request(response.status_code)
    collector.metrics.latency.observe(time.perf_counter() - started)
    return response


async def _ingest(request: Request, collector: Collector) -> Response:
    received = dt.datetime.now(dt.timezone.utc)
    settings = collector.settings
    _refuse_unless_authorised(request, collector)  # 1.
    refuse_over_backlog(collector)  # 2.
    idempotency_key = _idempotency_key(request)  # 3.
    sent_at = _sent_at(request)
    kind = body_kind(request)  # 4.
    body = await read_body(request, settings.max_body_bytes)
    country = collector.country_of(request)
    plan = plan_body(body, kind, received, settings=settings, log=collector.log, sent_at=sent_at, country=country)
    if plan is None:  # an event the native kernel is not sure of, or a body it does not cut: event by event
        events = split_events(body, kind)
        refuse_too_many(events, settings)  # 5.
        plan = plan_appends(events, received, settings=settings, log=collector.log,  # 6.
                            validator=collector.validator, sent_at=sent_at, country=country)
        collector.metrics.rejected.inc(plan.answer.rejected)
        if plan.nothing_valid():
            return _nothing_valid(events, plan.answer)
    encoded = encode(plan.answer)
    result = await append(collector, plan.appends, idempotency_key and Idempotency(idempotency_key, encoded))  # 7.
    if was_replayed(result):  # 8.
        return Response(result.replayed, media_type=JSON, headers={"Idempotent-Replayed": "true"})
    collector.count_accepted(plan.accepted)
    return Response(encoded, media_type=JSON)


# -------------------------------------------------------------------------------------------- refusals first
def _refuse_unless_authorised(request: Request, collector: Collector) -> None:
    if not collector.authorised(request):
        raise Refuse(401, "missing or invalid API key: send 'Authorization: Bearer <key>' or 'X-API-Key'", BEARER)


def refuse_over_backlog(collector: Collector) -> None:
    if collector.backlog_over_bound():
        raise Refuse(503, f"backlog of {collector.backlog:,} unprocessed events is over the bound of "
                          f"{collector.settings.max_backlog_events:,}; retry later", retry_after(collector.settings))


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is not None and not 0 < len(key) <= envelope.MAX_IDEMPOTENCY_KEY:
        raise Refuse(400, f"Idempotency-Key must be 1 to {envelope.MAX_IDEMPOTENCY_KEY} characters")
    return key


def _sent_at(request: Request) -> dt.datetime | None:
    """The request's Sent-At header: when the device sent it, by its own clock (the sentAt of events that give
    none); 400 when it is not a timestamp."""
    value = request.headers.get("sent-at")
    if value is None:
        return None
    try:
        return schema.parse_timestamp(value, "Sent-At")
    except ValueError as error:
        raise Refuse(400, str(error)) from None


def refuse_too_many(events: list[bytes | str], settings: Settings) -> None:
    if len(events) > settings.max_events_per_request:
        raise Refuse(413, f"{len(events)} events in one request; the limit is {settings.max_events_per_request}")


def retry_after(settings: Settings) -> dict[str, str]:
    return {"Retry-After": str(settings.retry_after_s)}


# ------------------------------------------------------------------------------------------------- the body
def body_kind(request: Request) -> str:
    """json, ndjson or sniff, from the Content-Type (`envelope.body_kind`); 415 for one it does not take."""
    try:
        return envelope.body_kind(request.headers.get("content-type"))
    except envelope.BodyError as error:
        raise Refuse(error.status, error.message) from None


def declared_over(request: Request, limit: int) -> int | None:
    """The Content-Length, when it declares more than `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        return int(declared)
    return None


async def read_body(request: Request, limit: int) -> bytes:
    """The body, inflated when gzip'd, never more than `limit` bytes either way."""
    try:
        encoding = envelope.content_encoding(request.headers.get("content-encoding"))
    except envelope.BodyError as error:
        raise Refuse(error.status, error.message) from None
    if (declared := declared_over(request, limit)) is not None:
        # Answered before reading (with Expect: 100-continue the client has not sent the body at all).
        raise Refuse(413, f"body of {declared:,} bytes is over the {limit:,}-byte limit", CLOSE)
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Refuse(413, f"body is over the {limit:,}-byte limit", CLOSE)
        chunks.append(chunk)
    body = b"".join(chunks)
    return gunzip(body, limit) if encoding == "gzip" else body


def gunzip(body: bytes, limit: int) -> bytes:
    """Inflates one gzip member, never past `limit` + 1 bytes (`envelope.gunzip`)."""
    try:
        return envelope.gunzip(body, limit)
    except envelope.BodyError as error:
        raise Refuse(error.status, error.message, CLOSE if error.status == 413 else None) from None


def split_events(body: bytes, kind: str) -> list[bytes | str]:
    """The body's events, each as raw JSON bytes, or as a reason string when it is already known bad
    (`envelope.split`)."""
    try:
        return envelope.split(body, kind)  # type: ignore[arg-type]
    except envelope.BodyError as error:
        raise Refuse(error.status, error.message) from None


# ----------------------------------------------------------------------------------------- append and answer
def _nothing_valid(events: list[bytes | str], answer: IngestAnswer) -> Response:
    message = "no events in the body" if not events else "no valid event in the body"
    return Response(encode({"error": message, **msgspec.structs.asdict(answer)}), status_code=400, media_type=JSON)


async def append(collector: Collector, appends: list, idempotency: Idempotency | None = None) -> AppendResult:
    """`appends` durable in the log (with the first answer, under its key, when `idempotency` is given); 503 with
    Retry-After as `Refuse` when the log cannot take writes (nothing was stored). Offsets are not reported."""
    try:
        if idempotency is None:  # with the other requests of this loop turn (`api.coalesce`)
            await collector.coalescer.append(appends)
            return AppendResult([])
        return await asyncio.wrap_future(collector.log.submit(appends, idempotency))
    except Exception as error:  # the log cannot take writes (disk full, locked): nothing was stored
        raise Refuse(503, f"the event log cannot take writes right now ({type(error).__name__}); "
                          "nothing was stored, retry later", retry_after(collector.settings)) from None


def was_replayed(result: AppendResult) -> bool:
    """The key was used before: the answer is the first request's, and nothing was appended."""
    return result.replayed is not None

"""What every vendor endpoint shares with `POST /v1/events`: the write key, the backlog bound, the event-count
limit, validation with a reason per rejected event, the client's country (`geo_country`), and the durable append
before the answer.

A vendor route reads its body (`read_body`: the size limit, gzip), turns it into gamestream events
(`gamestream.compat.gamestream_event`; a `Reject`'s reason in place of an event that cannot be one) and calls
`ingest`, which answers with the counts and the per-index errors — or raises `Refuse` (503 with Retry-After for
the backlog or a log that cannot take writes, 413 over the event-count limit), which the route answers in its
vendor's shape. `counted` times and counts every answer in `gamestream_http_requests` under the route's path.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Awaitable, Callable

import msgspec
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from gamestream.api.collector import Collector
from gamestream.api.refusals import Refuse, answer_refusal
from gamestream.api.routes import events as events_route
from gamestream.ingest.auth import key_matches
from gamestream.ingest.collector import IngestAnswer, plan_appends

_encode = msgspec.json.Encoder().encode


def collector_of(request: Request) -> Collector:
    return request.app.state.collector


def authorised(collector: Collector, key: str | None) -> bool:
    """Whether `key` (the vendor's API key / write key, however its SDK sends it) is one of the write keys, or no
    write key is configured; compared in constant time."""
    return not collector.keys or key_matches(key, collector.keys)


async def read_body(request: Request) -> bytes:
    """The body within `max_body_bytes`, inflated when `Content-Encoding: gzip` (413 / 415 as `Refuse`)."""
    return await events_route.read_body(request, collector_of(request).settings.max_body_bytes)


async def ingest(request: Request, events: list[dict | str], *, sent_at: dt.datetime | None = None,
                 received: dt.datetime | None = None, all_or_nothing: bool = False,
                 check_backlog: bool = True) -> IngestAnswer:
    """Validates `events` (gamestream events as dicts; a string is the reason an event was already rejected) and
    appends the valid ones durably; the answer counts every event, errors by index. Nothing valid — or, with
    `all_or_nothing` (a vendor whose SDK resends the valid events of a refused request), anything invalid:
    nothing appended, the answer says which (accepted counts the valid ones). Raises `Refuse` for the backlog
    (503; `check_backlog=False` for a route that answers it its own way), the event-count limit (413) and a log
    that cannot take writes (503)."""
    collector = collector_of(request)
    received = received or dt.datetime.now(dt.timezone.utc)
    if check_backlog:
        events_route.refuse_over_backlog(collector)
    events_route.refuse_too_many(events, collector.settings)
    raw = [event if isinstance(event, str) else _encode(event) for event in events]
    plan = plan_appends(raw, received, settings=collector.settings, log=collector.log,
                        validator=collector.validator, sent_at=sent_at, country=collector.country_of(request))
    collector.metrics.rejected.inc(plan.answer.rejected)
    if plan.nothing_valid() or (all_or_nothing and plan.answer.rejected):
        return plan.answer
    await events_route.append(collector, plan.appends)
    collector.count_accepted(plan.accepted)
    return plan.answer


Handler = Callable[[Request], Awaitable[Response]]


def counted(path: str, handler: Handler, refused: Callable[[Refuse], Response] | None = None) -> Handler:
    """`handler` with every answer counted and timed under `path`; a `Refuse` (or a client gone mid-body) it
    raises is answered by `refused` (the vendor's shape), else as `{"error": …}` with its status."""

    async def endpoint(request: Request) -> Response:
        collector = collector_of(request)
        started = time.perf_counter()
        try:
            response = await handler(request)
        except Refuse as error:
            response = refused(error) if refused is not None else answer_refusal(error)
        except ClientDisconnect as error:
            response = answer_refusal(error)
        collector.metrics.requests.labels(path, str(response.status_code)).inc()
        collector.metrics.latency.observe(time.perf_counter() - started)
        return response

    endpoint.__name__ = getattr(handler, "__name__", "endpoint")
    return endpoint

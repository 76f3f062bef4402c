"""From a request's events to the log's appends and the answer: the part of `POST /v1/events` that needs no HTTP.

The route (`gamestream.api.routes.events`) reads the body; `plan_body` first offers it whole to the native kernel,
which takes it when every event in it is provably valid (most requests: the common case costs no Python object
per event). Otherwise the route splits it (`gamestream.log.envelope`), and here the events are validated and
grouped by log partition, in one of two ways that give the same answer:

1. the whole batch at once into Arrow records (`batch.validate_batch`), when it is big enough to repay the call
   (`should_validate_as_batch`) and every event in it is provably valid;
2. else event by event: the native kernel (`native_validate`) proves the usual event valid and renders its line
   in Rust; any event it is not sure about goes to `schema.EventValidator`, which accepts it or says why not.

Either way the answer counts every event sent: `accepted + rejected == len(events)`, errors in index order.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec

from gamestream import schema
from gamestream.ingest import batch, native_validate
from gamestream.ingest.loader import arrow_records
from gamestream.log import Append, EventLog, router
from gamestream.settings import Settings


class ErrorItem(msgspec.Struct):
    index: int
    error: str


class IngestAnswer(msgspec.Struct):
    accepted: int
    rejected: int
    errors: list[ErrorItem]


@dataclass
class IngestPlan:
    """What to append for one request, and what to answer once it is durable."""

    appends: list[Append]
    answer: IngestAnswer

    @property
    def accepted(self) -> int:
        return self.answer.accepted

    def nothing_valid(self) -> bool:
        """No event to append: the request is answered 400 with the counts."""
        return self.answer.accepted == 0


encode = msgspec.json.Encoder().encode


def should_validate_as_batch(events: Sequence[bytes | str]) -> bool:
    """Whether the whole-batch path is worth its fixed cost (~1-1.5 ms a call): smaller requests are cheaper
    event by event (`batch.MIN_BATCH_EVENTS`)."""
    return len(events) >= batch.MIN_BATCH_EVENTS


def oversized(event: bytes, settings: Settings) -> bool:
    return len(event) > settings.max_event_bytes


def plan_appends(events: Sequence[bytes | str], received: dt.datetime, *, settings: Settings, log: EventLog,
                 validator: schema.EventValidator, sent_at: dt.datetime | None = None,
                 country: str | None = None) -> IngestPlan:
    """The appends and the answer for `events` received at `received` (eventTime and receivedAt are stamped by
    the server); `sent_at`, the request's Sent-At, is the sentAt of the events that give none; `country`, the
    client's (`geo.CountryResolver`, looked up once for the request), is every event's geo_country."""
    if should_validate_as_batch(events):
        plan = _plan_as_arrow(events, received, settings, log, sent_at, country)
        if plan is not None:
            return plan
    return _plan_event_by_event(events, received, settings, log, validator, sent_at, country)


def plan_body(body: bytes, kind: str, received: dt.datetime, *, settings: Settings, log: EventLog,
              sent_at: dt.datetime | None = None, country: str | None = None) -> IngestPlan | None:
    """The plan for a whole body in one native call (`native_validate.validate_body`) when every event in it is
    provably valid and there are fewer than the whole-batch path's `batch.MIN_BATCH_EVENTS` (and no more than
    the request limit): the same appends and answer as `plan_appends` over `envelope.split(body, kind)`, without
    splitting the body into objects. None: split the body and `plan_appends` (rejections, their reasons, the
    body's own refusals and the limits are decided there)."""
    if log.own_routing:
        return None
    taken = native_validate.validate_body(
        body, kind, received, sent_at, log.partitions, max_event_bytes=settings.max_event_bytes,
        max_events=min(settings.max_events_per_request, batch.MIN_BATCH_EVENTS - 1), params=settings.schema_params,
        country=country)
    if taken is None:
        return None
    events, groups = taken
    return IngestPlan([Append(partition, record, count) for partition, record, count in groups],
                      IngestAnswer(accepted=events, rejected=0, errors=[]))


def _plan_as_arrow(events: Sequence[bytes | str], received: dt.datetime, settings: Settings,
                   log: EventLog, sent_at: dt.datetime | None, country: str | None) -> IngestPlan | None:
    """Every event provably valid: Arrow records per partition, no per-event work. None: let the per-event path
    decide (`batch.validate_batch`)."""
    tables = batch.validate_batch(events, now=received, mode="server", partitions=log.partitions, sent_at=sent_at,
                                  route=log.route if log.own_routing else None,
                                  max_event_bytes=settings.max_event_bytes, params=settings.schema_params,
                                  country=country)
    if tables is None:
        return None
    limit = log.max_record_bytes  # a log of messages (NATS, Kinesis) caps a record's size
    appends = [Append(partition, data, rows) for partition, table in tables.items()
               for data, rows in arrow_records(table, limit, settings.record_compression)]
    return IngestPlan(appends, IngestAnswer(accepted=len(events), rejected=0, errors=[]))


def _plan_event_by_event(events: Sequence[bytes | str], received: dt.datetime, settings: Settings, log: EventLog,
                         validator: schema.EventValidator, sent_at: dt.datetime | None,
                         country: str | None) -> IngestPlan:
    """Which events are rejected, and why; the valid ones as NDJSON lines, one record per partition."""
    by_partition: dict[int, list[bytes]] = {}
    route = router(log)
    errors: list[ErrorItem] = []
    proven = native_validate.validate_native(events, received, sent_at, None if log.own_routing else log.partitions,
                                             max_event_bytes=settings.max_event_bytes, params=settings.schema_params,
                                             country=country)
    for index, event in enumerate(events):
        if proven is not None and (valid := proven[index]) is not None:  # the native kernel proved it valid
            line, where = valid
            by_partition.setdefault(route(where) if isinstance(where, str) else where, []).append(line)
            continue
        if isinstance(event, str):  # already known bad (an NDJSON line that is not JSON is one event)
            errors.append(ErrorItem(index, event))
            continue
        if oversized(event, settings):
            errors.append(ErrorItem(index, f"event is {len(event)} bytes, over the "
                                           f"{settings.max_event_bytes}-byte limit"))
            continue
        result = validator.validate(event, received, sent_at, country)
        if isinstance(result, schema.Rejection):
            errors.append(ErrorItem(index, str(result)))
            continue
        by_partition.setdefault(route(result.device_id), []).append(result.line)
    accepted = len(events) - len(errors)
    appends = [Append(partition, b"\n".join(lines), len(lines)) for partition, lines in by_partition.items()]
    return IngestPlan(appends, IngestAnswer(accepted=accepted, rejected=len(errors), errors=errors))

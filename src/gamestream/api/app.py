"""The HTTP collector: `POST /v1/events` → validate → stamp → durable log append → answer.

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
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from gamestream import schema
from gamestream.api.dashboard import DashboardData, IngestRate
from gamestream.ingest import batch
from gamestream.ingest.auth import key_matches
from gamestream.ingest.http_guard import MAX_HEADER_LINES
from gamestream.ingest.loader import arrow_records
from gamestream.log import Append, EventLog, Idempotency, describe, envelope, router
from gamestream.log.envelope import JSON_TYPES, NDJSON_TYPES  # noqa: F401  (the body rules live in envelope)
from gamestream.settings import Settings

MAX_IDEMPOTENCY_KEY = 200
FORGET_MAX_DEVICES = 10_000
"""POST /v1/forget: more device ids in one request gets 400 (send several requests)."""
CLOSE = {"Connection": "close"}
"""On a 413 over the body size: the rest of the body is not wanted (http_guard drains it before closing)."""
logger = logging.getLogger(__name__)


class ErrorItem(msgspec.Struct):
    index: int
    error: str


class IngestAnswer(msgspec.Struct):
    accepted: int
    rejected: int
    errors: list[ErrorItem]


_encode = msgspec.json.Encoder().encode


def _presented_key_in(request: Request, keys: list[bytes]) -> bool:
    """Whether the request carries one of `keys` as `Authorization: Bearer <key>` or `X-API-Key: <key>`
    (compared in constant time: auth.key_matches)."""
    given = request.headers.get("x-api-key")
    if given is None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else None
    return key_matches(given, keys)


class _Refuse(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        self.status, self.message, self.headers = status, message, headers or {}


@dataclass
class _Metrics:
    registry: CollectorRegistry
    requests: Counter
    accepted: Counter
    rejected: Counter
    latency: Histogram
    backlog: Gauge
    log_reachable: Gauge

    @classmethod
    def create(cls, log_description: str) -> "_Metrics":
        registry = CollectorRegistry()
        log_reachable = Gauge("gamestream_log_reachable", "1 when the event log answered the last check (a backlog "
                              "read every 0.5 s, or /healthz), 0 when it did not; labelled with where it is",
                              ["log"], registry=registry)
        return cls(
            registry=registry,
            requests=Counter("gamestream_http_requests", "HTTP requests by path and status", ["path", "status"],
                             registry=registry),
            accepted=Counter("gamestream_events_accepted", "Events accepted into the log", registry=registry),
            rejected=Counter("gamestream_events_rejected", "Events rejected with a reason", registry=registry),
            latency=Histogram("gamestream_ingest_latency_seconds", "POST /v1/events from request to answer",
                              buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5),
                              registry=registry),
            backlog=Gauge("gamestream_log_backlog_events", "Events in the log not yet committed to the table",
                          registry=registry),
            log_reachable=log_reachable.labels(log_description),  # type: ignore[arg-type]
        )


class Collector:
    """The ingest endpoint's logic, bound to a log and the settings' limits."""

    def __init__(self, settings: Settings, log: EventLog) -> None:
        self.settings = settings
        self.log = log
        self.keys = [key.encode() for key in settings.api_keys]
        self.validator = schema.EventValidator(event_time="server", params=settings.schema_params)
        self.log_description = describe(settings)
        self.metrics = _Metrics.create(self.log_description)
        self.backlog = 0
        self.accepted_total = 0
        self.ingest_rate = IngestRate()
        self._backlog_task: asyncio.Task | None = None

    # ----------------------------------------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        try:
            await self._refresh_backlog()
        except Exception:  # a log server still starting or away: serve anyway; ingest answers 503 until it is back
            logger.warning("cannot read the log backlog at start; retrying every 0.5 s",
                           extra={"log": self.log_description}, exc_info=True)
            self.metrics.log_reachable.set(0)
        self._backlog_task = asyncio.create_task(self._watch_backlog())

    async def stop(self) -> None:
        if self._backlog_task:
            self._backlog_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._backlog_task

    async def _refresh_backlog(self) -> None:
        if self.log.positions_scope == "process":
            # the log cannot see the processor's commits (Kinesis: positions live in the tables), so it has no
            # backlog to bound here; the stream's own retention and shard limits are the back-pressure
            self.metrics.log_reachable.set(1)
            return
        self.backlog = await asyncio.to_thread(self.log.pending_events, self.settings.pipeline)
        self.metrics.backlog.set(self.backlog)
        self.metrics.log_reachable.set(1)

    async def _watch_backlog(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(0.5)
            self.ingest_rate.sample(self.accepted_total)
            try:
                await self._refresh_backlog()
            except Exception:  # a busy log must not kill the watcher; the next round retries
                self.metrics.log_reachable.set(0)
                if not failing:  # once per episode, not twice a second
                    logger.warning("cannot read the log backlog; retrying every 0.5 s", exc_info=True)
                failing = True
            else:
                if failing:
                    logger.info("log backlog readable again", extra={"backlog_events": self.backlog})
                failing = False

    # -------------------------------------------------------------------------------------------------- ingest
    def authorised(self, request: Request) -> bool:
        if not self.keys:
            return True
        return _presented_key_in(request, self.keys)

    async def ingest(self, request: Request) -> Response:
        started = time.perf_counter()
        try:
            response = await self._ingest(request)
        except _Refuse as refusal:
            response = JSONResponse({"error": refusal.message}, status_code=refusal.status, headers=refusal.headers)
        except ClientDisconnect:  # gone, or cut off by the body timer (http_guard answered 408): nobody to answer
            response = Response(status_code=408)
        self.metrics.requests.labels("/v1/events", str(response.status_code)).inc()
        self.metrics.latency.observe(time.perf_counter() - started)
        return response

    async def _ingest(self, request: Request) -> Response:
        received = dt.datetime.now(dt.timezone.utc)
        if not self.authorised(request):
            raise _Refuse(401, "missing or invalid API key: send 'Authorization: Bearer <key>' or 'X-API-Key'",
                          {"WWW-Authenticate": "Bearer"})
        if self.backlog > self.settings.max_backlog_events:
            raise _Refuse(503, f"backlog of {self.backlog:,} unprocessed events is over the bound of "
                               f"{self.settings.max_backlog_events:,}; retry later",
                          {"Retry-After": str(self.settings.retry_after_s)})
        idempotency_key = request.headers.get("idempotency-key")
        if idempotency_key is not None and not 0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY:
            raise _Refuse(400, f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters")
        kind = self._body_kind(request)
        body = await self._read_body(request)
        events = self._split(body, kind)
        if len(events) > self.settings.max_events_per_request:
            raise _Refuse(413, f"{len(events)} events in one request; the limit is "
                               f"{self.settings.max_events_per_request}")

        limit = self.log.max_record_bytes  # a log of messages (NATS, Kinesis) caps a record's size
        tables = None
        if len(events) >= batch.MIN_BATCH_EVENTS:  # smaller requests are cheaper event by event
            tables = batch.validate_batch(events, now=received, mode="server", partitions=self.log.partitions,
                                          route=self.log.route if self.log.own_routing else None,
                                          max_event_bytes=self.settings.max_event_bytes,
                                          params=self.settings.schema_params)
        if tables is not None:  # every event provably valid: Arrow records, no per-event work
            accepted = len(events)
            answer = IngestAnswer(accepted=accepted, rejected=0, errors=[])
            appends = [Append(p, data, rows) for p, table in tables.items()
                       for data, rows in arrow_records(table, limit, self.settings.record_compression)]
        else:  # the per-event path: which events are rejected, and why
            by_partition: dict[int, list[bytes]] = {}
            route = router(self.log)
            errors: list[ErrorItem] = []
            for index, event in enumerate(events):
                if isinstance(event, str):  # already known bad (an NDJSON line that is not JSON is one event)
                    errors.append(ErrorItem(index, event))
                    continue
                if len(event) > self.settings.max_event_bytes:
                    errors.append(ErrorItem(index, f"event is {len(event)} bytes, over the "
                                                   f"{self.settings.max_event_bytes}-byte limit"))
                    continue
                result = self.validator.validate(event, received)
                if isinstance(result, schema.Rejection):
                    errors.append(ErrorItem(index, str(result)))
                    continue
                partition = route(result.device_id)
                by_partition.setdefault(partition, []).append(result.line)
            accepted = len(events) - len(errors)
            self.metrics.rejected.inc(len(errors))
            answer = IngestAnswer(accepted=accepted, rejected=len(errors), errors=errors)
            if accepted == 0:
                message = "no events in the body" if not events else "no valid event in the body"
                return Response(_encode({"error": message, **msgspec.structs.asdict(answer)}), status_code=400,
                                media_type="application/json")
            appends = [Append(p, b"\n".join(lines), len(lines)) for p, lines in by_partition.items()]
        encoded = _encode(answer)
        try:
            result = await asyncio.wrap_future(self.log.submit(
                appends, Idempotency(idempotency_key, encoded) if idempotency_key else None))
        except Exception as error:  # the log cannot take writes (disk full, locked): nothing was stored
            raise _Refuse(503, f"the event log cannot take writes right now ({type(error).__name__}); "
                               "nothing was stored, retry later", {"Retry-After": str(self.settings.retry_after_s)})
        if result.replayed is not None:
            return Response(result.replayed, media_type="application/json", headers={"Idempotent-Replayed": "true"})
        self.metrics.accepted.inc(accepted)
        self.accepted_total += accepted
        return Response(encoded, media_type="application/json")

    @staticmethod
    def _body_kind(request: Request) -> str:
        try:
            return envelope.body_kind(request.headers.get("content-type"))
        except envelope.BodyError as error:
            raise _Refuse(error.status, error.message) from None

    async def _read_body(self, request: Request) -> bytes:
        limit = self.settings.max_body_bytes
        try:
            encoding = envelope.content_encoding(request.headers.get("content-encoding"))
        except envelope.BodyError as error:
            raise _Refuse(error.status, error.message) from None
        declared = request.headers.get("content-length", "")
        if declared.isascii() and declared.isdigit() and int(declared) > limit:
            # Answered before reading (with Expect: 100-continue the client has not sent the body at all).
            raise _Refuse(413, f"body of {int(declared):,} bytes is over the {limit:,}-byte limit", CLOSE)
        chunks = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _Refuse(413, f"body is over the {limit:,}-byte limit", CLOSE)
            chunks.append(chunk)
        body = b"".join(chunks)
        if encoding == "gzip":
            body = self._gunzip(body, limit)
        return body

    @staticmethod
    def _gunzip(body: bytes, limit: int) -> bytes:
        """Inflates one gzip member, never past `limit` + 1 bytes (`envelope.gunzip`)."""
        try:
            return envelope.gunzip(body, limit)
        except envelope.BodyError as error:
            raise _Refuse(error.status, error.message, CLOSE if error.status == 413 else None) from None

    def _split(self, body: bytes, kind: str) -> list[bytes | str]:
        """The body's events, each as raw JSON bytes, or as a reason string when it is already known bad
        (`envelope.split`)."""
        try:
            return envelope.split(body, kind)  # type: ignore[arg-type]
        except envelope.BodyError as error:
            raise _Refuse(error.status, error.message) from None


# ------------------------------------------------------------------------------------------------------ the app
def _describe_fields(components: dict[str, Any], params: schema.Params) -> None:
    """The event's fields in the document as the validator takes them: timestamps (msgspec only says "a string
    or a number") as RFC 3339 with a zone or epoch seconds from 0 to the end of year 9999; each field's meaning
    from the schema; unknown keys allowed, and where they are kept."""
    timestamp = {"anyOf": [{"type": "string", "format": "date-time"},
                           {"type": "integer", "minimum": 0, "maximum": schema.EPOCH_MAX},
                           {"type": "number", "minimum": 0, "maximum": schema.EPOCH_MAX}, {"type": "null"}]}
    fields_by_struct = {"Event": schema.event_fields(params), "EventParams": schema.params_field(params).children}
    kept_in = {"Event": schema.EVENT_EXTRA, "EventParams": schema.PARAMS_EXTRA}
    for struct, fields in fields_by_struct.items():
        properties = components[struct]["properties"]
        for field in fields:
            if field.name not in properties:
                continue
            properties[field.name] = {**properties[field.name], "description": field.doc}
            if field.kind == "timestamp":
                properties[field.name] = {**properties[field.name], **timestamp}
        components[struct]["additionalProperties"] = True
        components[struct]["description"] = (f"Unknown keys are accepted and kept, values as sent, in the "
                                             f"{kept_in[struct]} column.")


def openapi(settings: Settings) -> dict[str, Any]:
    """The OpenAPI description, with the event schema taken from `schema.input_event` for the configured
    promoted parameters."""
    (event_schema,), components = msgspec.json.schema_components([schema.input_event(settings.schema_params)],
                                                                 ref_template="#/components/schemas/{name}")
    _describe_fields(components, settings.schema_params)
    error = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string", "minLength": 1}}}
    counts = {
        "accepted": {"type": "integer", "minimum": 0}, "rejected": {"type": "integer", "minimum": 0},
        "errors": {"type": "array", "items": {"type": "object", "required": ["index", "error"], "properties": {
            "index": {"type": "integer", "minimum": 0, "description": "0-based position in the request"},
            "error": {"type": "string", "minLength": 1, "description": "<field>: <reason>"}},
            "additionalProperties": False}}}
    answer = {"type": "object", "required": ["accepted", "rejected", "errors"], "properties": counts,
              "additionalProperties": False}
    # A 400 carries the counts when the body was read as events and none was valid; not when it was unreadable.
    unusable = {"type": "object", "required": ["error"], "properties": {**error["properties"], **counts},
                "additionalProperties": False}

    def reply(description: str, body: dict) -> dict:
        return {"description": description, "content": {"application/json": {"schema": body}}}

    retry = {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}
    # Answered by http_guard before any route sees the request, so every operation can get them.
    connection_limits = {
        "431": reply(f"Request line and headers over {settings.max_header_bytes} bytes, or over "
                     f"{MAX_HEADER_LINES} header lines; the connection is closed", error),
        "503": {**reply(f"More than {settings.max_connections} connections open: retry after; the connection is "
                        "closed", error), "headers": retry},
    }
    slow_body = {"408": reply(f"The body did not arrive within {settings.body_timeout_s:g} s; the connection is "
                              "closed", error)}
    return {
        "openapi": "3.1.0",
        "info": {"title": "gamestream collector", "version": "1",
                 "description": "Mobile-game events in; durable before answered. eventTime is stamped by the "
                                "server; the client's time belongs in eventParams.client_event_time."},
        "paths": {
            "/v1/events": {"post": {
                "summary": "Send events",
                "parameters": [{"name": "Idempotency-Key", "in": "header", "required": False,
                                "schema": {"type": "string", "minLength": 1, "maxLength": MAX_IDEMPOTENCY_KEY},
                                "description": "A retry with the same key gets the first answer and stores "
                                               "nothing (kept at least 24 h)."}],
                "security": [{"bearer": []}, {"apiKey": []}, {}],
                "requestBody": {"required": True, "content": {
                    "application/json": {"schema": {"oneOf": [event_schema,
                                                              {"type": "array", "items": event_schema, "minItems": 1,
                                                               "maxItems": settings.max_events_per_request}]}},
                    "application/x-ndjson": {"schema": {"type": "string",
                                                        "description": "one Event per line"}},
                }},
                "responses": {
                    **connection_limits, **slow_body,
                    "200": {**reply("Accepted events are durable in the log; a batch may partly succeed", answer),
                            "headers": {"Idempotent-Replayed": {
                                "schema": {"type": "string", "enum": ["true"]},
                                "description": "present when this is the stored answer to an earlier request "
                                               "with the same Idempotency-Key"}}},
                    "400": reply("Nothing in the body is usable: unreadable (error only), or no valid event "
                                 "(error with the counts and each event's reason)", unusable),
                    "401": reply("Missing or invalid API key", error),
                    "413": reply(f"Body over {settings.max_body_bytes} bytes (also once decompressed; then with "
                                 f"Connection: close) or over {settings.max_events_per_request} events", error),
                    "415": reply("Content type or encoding not taken", error),
                    "503": {**reply("Backlog over its bound, log unavailable, or too many connections: retry "
                                    "after", error), "headers": retry},
                },
            }},
            "/v1/sql": {"post": {
                "summary": "Run a read-only Spark SQL query over the tables (DuckDB underneath; dates in UTC)",
                "security": [{"bearer": []}, {"apiKey": []}, {}],
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["query"], "properties": {"query": {"type": "string"}}}}}},
                "responses": {
                    **connection_limits, **slow_body,
                    "200": reply("Result", {"type": "object", "properties": {
                        "columns": {"type": "array", "items": {"type": "string"}},
                        "rows": {"type": "array", "items": {"type": "array"}}}}),
                    "400": reply("Refused (not a read-only query over the project's tables), failed, or over "
                                 "the time or row cap: error, line, column", error),
                    "401": reply("Keys are configured and no admin key was given", error),
                    "413": reply(f"Body over {settings.max_body_bytes} bytes", error),
                },
            }},
            "/v1/forget": {"post": {
                "summary": "Delete devices' rows from the events and quarantine tables (and, through the KPI stage, "
                           "the KPIs), audited by a salted hash of each id; purge also deletes the old files "
                           "(docs/privacy.md)",
                "security": [{"bearer": []}, {"apiKey": []}, {}],
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["device_ids"], "additionalProperties": False, "properties": {
                        "device_ids": {"type": "array", "minItems": 1, "maxItems": FORGET_MAX_DEVICES,
                                       "items": {"type": "string", "minLength": 1}},
                        "purge": {"type": "boolean", "default": False}}}}}},
                "responses": {
                    **connection_limits, **slow_body,
                    "200": reply("The audit entry: entry, requested_by, at, devices, hashes, events_deleted, "
                                 "quarantine_deleted, versions, files_gone_by, purged, status, message "
                                 "(purge_error when the purge could not run yet)", {"type": "object"}),
                    "400": reply("Not a list of non-empty device ids (error says why)", error),
                    "401": reply("Keys are configured and no admin key was given", error),
                    "413": reply(f"Body over {settings.max_body_bytes} bytes", error),
                },
            }},
            "/v1/dashboard": {"get": {
                "summary": "What the dashboard at / shows, as JSON (the page polls it every second)",
                "parameters": [{"name": "key", "in": "query", "required": False, "schema": {"type": "string"},
                                "description": "admin key, when keys are configured (or a header)"}],
                "responses": {**connection_limits, "200": reply("KPIs, lag, quarantine and table health", {
                    "type": "object", "properties": {
                        "generated_at": {"type": "string", "format": "date-time"},
                        "hourly": {"type": "array", "description": "last 48 windows of kpi_events_hourly"},
                        "bookings": {"type": "array", "description": "last 48 windows of kpi_bookings_hourly"},
                        "today": {"type": "object", "description": "kpi_daily's row for today (UTC)"},
                        "activity": {"type": ["object", "null"], "description": "the latest day's game KPIs from "
                                     "kpi_daily (DAU, WAU, MAU, stickiness, new users, ARPPU, conversion, "
                                     "sessions); null before the KPI stage wrote it"},
                        "activity_days": {"type": "array", "description": "DAU, WAU, MAU and stickiness of the "
                                          "last 30 days"},
                        "retention": {"type": "array", "description": "kpi_retention's newest install cohorts, "
                                      "newest first (D1/D7/D30 null until measurable)"},
                        "top_events": {"type": ["object", "null"], "description": "the latest day's 10 most "
                                       "frequent eventNames (kpi_top_events)"},
                        "ingest": {"type": "object", "properties": {"events_per_second": {"type": "number"}}},
                        "lag": {"type": "object", "properties": {
                            "backlog_events": {"type": "integer"},
                            "newest_event_time": {"type": ["string", "null"]},
                            "freshness_seconds": {"type": ["number", "null"]}}},
                        "quarantine": {"type": "object", "properties": {"count": {"type": "integer"},
                                                                         "latest": {"type": "array"}}},
                        "tables": {"type": "object", "properties": {"events": {
                            "type": "object", "description": "events table health (current version)",
                            "properties": {
                                "version": {"type": "integer"}, "files": {"type": "integer"},
                                "partitions": {"type": "integer"}, "files_per_partition": {"type": "number"},
                                "max_files_in_a_partition": {"type": "integer"},
                                "average_file_bytes": {"type": "integer"},
                                "small_files": {"type": "integer",
                                                "description": "files under small_file_bytes"},
                                "small_file_bytes": {"type": "integer",
                                                     "description": "a quarter of OPTIMIZE's target size"},
                                "last_optimize": {"type": ["string", "null"], "format": "date-time"},
                                "last_vacuum": {"type": ["string", "null"], "format": "date-time"}}}}}}}),
                    "401": reply("Keys are configured and no admin key was given", error)},
            }},
            "/healthz": {"get": {"summary": "Log writable (and which log: log_url), disk space, this process's pid",
                                 "responses": {**connection_limits, "200": {"description": "healthy"},
                                               "503": {"description": "unhealthy, or too many connections"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics",
                                 "responses": {**connection_limits,
                                               "200": {"description": "text exposition format"}}}},
        },
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"},
                                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}},
        },
    }


def create_app(settings: Settings, log: EventLog | None = None) -> Starlette:
    """The collector as an ASGI app. Opens the log the settings name (`log.connect`: `--log URL`, else the
    embedded one) when `log` is not given, and closes it on exit."""
    from gamestream.log import connect

    own_log = log is None
    the_log = log if log is not None else connect(settings)
    collector = Collector(settings, the_log)

    def check_log() -> None:
        """Whether the log takes writes: the backend's own check when it has one (the embedded log takes its
        write lock), else a read of partition 0's head, which needs the log's servers to answer."""
        the_log.check_writable()

    async def healthz(request: Request) -> Response:
        # `pid` tells the processes of `serve --workers N` apart; `log_url` says which log this one writes to
        checks: dict[str, Any] = {"pid": os.getpid(), "log_url": collector.log_description}
        healthy = True
        free = shutil.disk_usage(settings.data_dir).free
        checks["disk_free_bytes"] = free
        if free < settings.min_free_disk_bytes:
            healthy = False
            checks["disk"] = f"under {settings.min_free_disk_bytes:,} bytes free"
        try:
            await asyncio.to_thread(check_log)
            checks["log"] = "writable"
            collector.metrics.log_reachable.set(1)
        except Exception as error:
            healthy = False
            checks["log"] = f"not writable: {type(error).__name__}: {error}"
            collector.metrics.log_reachable.set(0)
        checks["backlog_events"] = collector.backlog
        checks["status"] = "ok" if healthy else "unhealthy"
        collector.metrics.requests.labels("/healthz", "200" if healthy else "503").inc()
        return JSONResponse(checks, status_code=200 if healthy else 503)

    async def metrics(request: Request) -> Response:
        from gamestream.metrics import (
            REGISTRY as stages,  # the processor's figures, when it runs in this process
        )

        return Response(generate_latest(collector.metrics.registry) + generate_latest(stages),
                        media_type=CONTENT_TYPE_LATEST)

    async def openapi_json(request: Request) -> Response:
        return JSONResponse(openapi(settings))

    admin_keys = [key.encode() for key in settings.admin_keys]
    dashboard = DashboardData(settings)
    static = Path(__file__).parent / "dashboard" / "static"

    def admin(request: Request) -> bool:
        if not settings.keys_configured:
            return True
        if _presented_key_in(request, admin_keys):
            return True
        return key_matches(request.query_params.get("key"), admin_keys)

    async def page(request: Request) -> Response:
        if not admin(request):
            return HTMLResponse("<!doctype html><title>gamestream</title><h1>401: admin key needed</h1>"
                                "<p>Open this page as <code>/?key=&lt;admin key&gt;</code>.</p>", status_code=401)
        return FileResponse(static / "index.html", headers={"Cache-Control": "no-store"})

    async def dashboard_json(request: Request) -> Response:
        if not admin(request):
            return JSONResponse({"error": "the dashboard needs an admin key"}, status_code=401)
        data = await asyncio.to_thread(dashboard.snapshot, backlog=collector.backlog,
                                       events_per_second=collector.ingest_rate.per_second())
        return JSONResponse(data, headers={"Cache-Control": "no-store"})

    async def sql(request: Request) -> Response:
        """POST /v1/sql {"query": "<Spark SQL>"} → {"columns": [...], "rows": [[...], ...]}."""
        import sqlglot

        from gamestream.api.query import QueryError, SqlEngine, to_json

        if settings.keys_configured and not _presented_key_in(request, admin_keys):
            return JSONResponse({"error": "POST /v1/sql needs an admin key ('Authorization: Bearer <key>' or "
                                          "'X-API-Key')"}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        raw = bytearray()
        try:
            async for chunk in request.stream():  # a query is small: the ingest body limit bounds it too
                raw += chunk
                if len(raw) > settings.max_body_bytes:
                    return JSONResponse({"error": f"body is over the {settings.max_body_bytes:,}-byte limit"},
                                        status_code=413, headers={"Connection": "close"})
        except ClientDisconnect:  # gone, or cut off by the body timer (http_guard answered 408)
            return Response(status_code=408)
        try:
            body = msgspec.json.decode(raw)
            query = body["query"]
            if not isinstance(query, str):
                raise TypeError
        except (msgspec.DecodeError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
            return JSONResponse({"error": 'send {"query": "<Spark SQL>"} as JSON'}, status_code=400)
        try:
            table = await asyncio.to_thread(SqlEngine(settings).run, query)
        except QueryError as error:
            return JSONResponse({"error": str(error), "line": error.line, "column": error.column,
                                 "detail": error.pointed()}, status_code=400)
        except sqlglot.errors.SqlglotError as error:  # a query sqlglot cannot even tokenize: still the sender's
            return JSONResponse({"error": f"syntax error: {error}", "line": None, "column": None,
                                 "detail": str(error)}, status_code=400)
        rows = msgspec.json.decode(to_json(table))
        return JSONResponse({"columns": table.column_names, "rows": [list(r.values()) for r in rows]})

    async def forget(request: Request) -> Response:
        """POST /v1/forget {"device_ids": [...], "purge": false} → the audit entry (`gamestream.tables.forget`)."""
        from gamestream.kpi import fold_once
        from gamestream.tables import forget as forgetting

        if settings.keys_configured and not _presented_key_in(request, admin_keys):
            return JSONResponse({"error": "POST /v1/forget needs an admin key ('Authorization: Bearer <key>' or "
                                          "'X-API-Key')"}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        raw = bytearray()
        try:
            async for chunk in request.stream():
                raw += chunk
                if len(raw) > settings.max_body_bytes:
                    return JSONResponse({"error": f"body is over the {settings.max_body_bytes:,}-byte limit"},
                                        status_code=413, headers={"Connection": "close"})
        except ClientDisconnect:
            return Response(status_code=408)
        usage = 'send {"device_ids": ["<id>", ...], "purge": false} as JSON'
        try:
            body = msgspec.json.decode(raw)
            ids, purge = body["device_ids"], body.get("purge", False)
            if not isinstance(ids, list) or not isinstance(purge, bool) or set(body) - {"device_ids", "purge"}:
                raise TypeError
        except (msgspec.DecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError, RecursionError):
            return JSONResponse({"error": usage}, status_code=400)
        if len(ids) > FORGET_MAX_DEVICES:
            return JSONResponse({"error": f"{len(ids)} device ids in one request; the limit is "
                                          f"{FORGET_MAX_DEVICES}"}, status_code=400)
        given = request.headers.get("x-api-key") or request.headers.get("authorization", "").partition(" ")[2].strip()
        who = forgetting.key_fingerprint(given) if settings.keys_configured else "open server (no keys configured)"
        who += f" from {request.client.host if request.client else 'unknown'}"
        try:
            report = await asyncio.to_thread(forgetting.forget, settings, ids, requested_by=who, purge=False)
        except forgetting.ForgetError as error:
            return JSONResponse({"error": f"{error}; {usage}"}, status_code=400)
        purge_error = {}
        if purge:  # waits for the KPI stage and sql_timeout_s (docs/privacy.md): an answer after half a minute
            try:
                await asyncio.to_thread(forgetting.purge_forgotten, settings, report, fold_kpi=fold_once)
            except forgetting.PurgeNotPossible as error:
                purge_error = {"purge_error": str(error)}
        return JSONResponse({**report.to_dict(), **purge_error, "message": report.retention_message(settings)})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        await collector.start()
        try:
            yield
        finally:
            await collector.stop()
            if own_log:
                await asyncio.to_thread(the_log.close)

    app = Starlette(routes=[
        Route("/v1/events", collector.ingest, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/openapi.json", openapi_json, methods=["GET"]),
        Route("/v1/sql", sql, methods=["POST"]),
        Route("/v1/forget", forget, methods=["POST"]),
        Route("/", page, methods=["GET"]),
        Route("/v1/dashboard", dashboard_json, methods=["GET"]),
        Mount("/static", app=StaticFiles(directory=static), name="static"),
    ], lifespan=lifespan)
    app.state.collector = collector
    return app

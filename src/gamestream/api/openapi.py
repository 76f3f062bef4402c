"""The OpenAPI document served at `/openapi.json`, built from the pieces below: the event schema from
`schema.input_event` for the configured promoted parameters, one function per path, shared answers once.

It is checked from outside by `schemathesis run <url>/openapi.json --checks all` (tests/test_fuzz.py): every
status, header and body the server can answer is declared here, and every input the document calls valid is
taken.
"""

from __future__ import annotations

from typing import Any

import msgspec

from gamestream import schema
from gamestream.log.envelope import MAX_IDEMPOTENCY_KEY
from gamestream.api import funnel as funnels
from gamestream.api.dashboard import segments
from gamestream.api.routes.forget import FORGET_MAX_DEVICES
from gamestream.ingest.http_guard import MAX_HEADER_LINES
from gamestream.settings import Settings

Json = dict[str, Any]

ERROR: Json = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string", "minLength": 1}}}
COUNTS: Json = {
    "accepted": {"type": "integer", "minimum": 0}, "rejected": {"type": "integer", "minimum": 0},
    "errors": {"type": "array", "items": {"type": "object", "required": ["index", "error"], "properties": {
        "index": {"type": "integer", "minimum": 0, "description": "0-based position in the request"},
        "error": {"type": "string", "minLength": 1, "description": "<field>: <reason>"}},
        "additionalProperties": False}}}
ANSWER: Json = {"type": "object", "required": ["accepted", "rejected", "errors"], "properties": COUNTS,
                "additionalProperties": False}
UNUSABLE: Json = {"type": "object", "required": ["error"], "properties": {**ERROR["properties"], **COUNTS},
                  "additionalProperties": False}
"""A 400 carries the counts when the body was read as events and none was valid; not when it was unreadable."""
RETRY: Json = {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}
KEYED: list[Json] = [{"bearer": []}, {"apiKey": []}, {}]
"""A key in either header, or none when no key is configured."""
SECURITY_SCHEMES: Json = {"bearer": {"type": "http", "scheme": "bearer"},
                          "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}}
NO_ADMIN_KEY = "Keys are configured and no admin key was given"
TIMESTAMP: Json = {"anyOf": [{"type": "string", "format": "date-time"},
                             {"type": "integer", "minimum": 0, "maximum": schema.EPOCH_MAX},
                             {"type": "number", "minimum": 0, "maximum": schema.EPOCH_MAX}, {"type": "null"}]}
"""Timestamps as the validator takes them (msgspec only says "a string or a number"): RFC 3339 with a zone, or
epoch seconds from 0 to the end of year 9999."""

REPORT_FIELDS: Json = {
    "entry": {"type": "string", "minLength": 1}, "requested_by": {"type": "string"},
    "at": {"type": "string", "format": "date-time"}, "devices": {"type": "integer", "minimum": 0},
    "hashes": {"type": "array", "items": {"type": "string"}},
    "events_deleted": {"type": "integer", "minimum": 0}, "quarantine_deleted": {"type": "integer", "minimum": 0},
    "versions": {"type": "object"}, "files_gone_by": {"type": ["string", "null"]}, "purged": {"type": "boolean"},
    "status": {"type": "string", "description": "registered, deleted or purged"},
    "message": {"type": "string", "description": "when the rows are physically gone"}}
FORGET_REPORT: Json = {"type": "object", "required": list(REPORT_FIELDS), "properties": REPORT_FIELDS,
                       "description": "The audit entry (`gamestream.tables.forget.ForgetReport`) and a message"}
PURGE_JOB: Json = {"type": "object", "required": ["state", *REPORT_FIELDS], "properties": {
    "state": {"type": "string", "enum": ["running", "done", "failed"]},
    "reason": {"type": "string", "description": "why the purge failed (present when state is failed)"},
    **REPORT_FIELDS}, "description": "A background purge: its state, and the audit entry as it stands"}
DASHBOARD: Json = {"type": "object", "properties": {
    "generated_at": {"type": "string", "format": "date-time"},
    "hourly": {"type": "array", "description": "last 48 windows of kpi_events_hourly"},
    "bookings": {"type": "array", "description": "last 48 windows of kpi_bookings_hourly"},
    "today": {"type": "object", "description": "kpi_daily's row for today (UTC)"},
    "activity": {"type": ["object", "null"], "description": "the latest day's game KPIs from kpi_daily (DAU, WAU, "
                 "MAU, stickiness, new users, ARPPU, conversion, sessions); null before the KPI stage wrote it"},
    "activity_days": {"type": "array", "description": "DAU, WAU, MAU and stickiness of the last 30 days"},
    "retention": {"type": "array", "description": "kpi_retention's newest install cohorts, newest first "
                  "(D1/D7/D30 null until measurable)"},
    "top_events": {"type": ["object", "null"], "description": "the latest day's 10 most frequent eventNames "
                   "(kpi_top_events)"},
    "segments": {"type": "object", "required": ["dimension", "dimensions"], "description": (
        "Breakdowns (kpi_daily_segments, kpi_retention_segments): `dimensions` always; the rest with "
        f"?dimension=. Of the dimension's values, the {segments.SERIES_SHOWN} with the most DAU over the days shown "
        "(for retention: the most installs over the cohorts shown) are series of their own; every other value, "
        "and the KPI stage's own `(other)`, is summed into `(other)` (its ARPPU and conversion computed from the "
        "sums). Empty while the tables are missing"), "properties": {
        "dimension": {"type": ["string", "null"], "description": "the dimension asked for; null: the totals"},
        "dimensions": {"type": "array", "items": {"type": "string"},
                       "description": "the dimensions present in the segment tables (the page's selector)"},
        "series": {"type": "array", "items": {"type": "string"}, "description": "the values drawn, top first, "
                   "then `(other)` when anything was folded into it"},
        "days": {"type": "array", "description": "per day (oldest first, the last 30 days) and series: eventDate, "
                 "value, dau, new_users, events, bookings, paying_users, arppu, conversion, sessions"},
        "latest": {"type": ["object", "null"], "description": "{eventDate, rows}: the newest day's rows as stored "
                   "(every value; by DAU, `(other)` last), each with the figures of `days`"},
        "retention": {"type": "array", "description": "per install cohort (the 37 newest, newest first) and "
                      "series: cohort_day, value, cohort_size, d1, d7, d30 (null until measurable), d1_users, "
                      "d7_users, d30_users"}}},
    "ingest": {"type": "object", "properties": {"events_per_second": {"type": "number"}}},
    "lag": {"type": "object", "properties": {
        "backlog_events": {"type": "integer"},
        "newest_event_time": {"type": ["string", "null"]},
        "freshness_seconds": {"type": ["number", "null"]}}},
    "quarantine": {"type": "object", "properties": {"count": {"type": "integer"}, "latest": {"type": "array"}}},
    "tables": {"type": "object", "properties": {"events": {
        "type": "object", "description": "events table health (current version)",
        "properties": {
            "version": {"type": "integer"}, "files": {"type": "integer"},
            "partitions": {"type": "integer"}, "files_per_partition": {"type": "number"},
            "max_files_in_a_partition": {"type": "integer"},
            "average_file_bytes": {"type": "integer"},
            "small_files": {"type": "integer", "description": "files under small_file_bytes"},
            "small_file_bytes": {"type": "integer", "description": "a quarter of OPTIMIZE's target size"},
            "last_optimize": {"type": ["string", "null"], "format": "date-time"},
            "last_vacuum": {"type": ["string", "null"], "format": "date-time"}}}}}}}


DIMENSION_ERROR: Json = {"type": "object", "required": ["error", "dimensions"], "properties": {
    **ERROR["properties"], "dimensions": {"type": "array", "items": {"type": "string"}}}}


def reply(description: str, body: Json) -> Json:
    return {"description": description, "content": {"application/json": {"schema": body}}}


def json_body(body: Json) -> Json:
    return {"required": True, "content": {"application/json": {"schema": body}}}


# --------------------------------------------------------------------------------------------- shared answers
def connection_limits(settings: Settings) -> Json:
    """Answered by http_guard before any route sees the request, so every operation can get them."""
    return {
        "431": reply(f"Request line and headers over {settings.max_header_bytes} bytes, or over "
                     f"{MAX_HEADER_LINES} header lines; the connection is closed", ERROR),
        "503": {**reply(f"More than {settings.max_connections} connections open: retry after; the connection is "
                        "closed", ERROR), "headers": RETRY},
    }


def slow_body(settings: Settings) -> Json:
    return {"408": reply(f"The body did not arrive within {settings.body_timeout_s:g} s; the connection is "
                         "closed", ERROR)}


def body_limits(settings: Settings) -> Json:
    """What every operation with a body can answer before its route reads it."""
    return {**connection_limits(settings), **slow_body(settings),
            "413": reply(f"Body over {settings.max_body_bytes} bytes", ERROR)}


# ----------------------------------------------------------------------------------------------------- events
def event_schemas(settings: Settings) -> tuple[Json, Json]:
    """The event's schema and the components it refers to."""
    (event, ), components = msgspec.json.schema_components([schema.input_event(settings.schema_params)],
                                                           ref_template="#/components/schemas/{name}")
    describe_fields(components, settings.schema_params)
    return event, components


def describe_fields(components: Json, params: schema.Params) -> None:
    """The event's fields in the document as the validator takes them: timestamps as `TIMESTAMP`; each field's
    meaning from the schema; unknown keys allowed, and where they are kept."""
    fields_by_struct = {"Event": schema.event_fields(params), "EventParams": schema.params_field(params).children}
    kept_in = {"Event": schema.EVENT_EXTRA, "EventParams": schema.PARAMS_EXTRA}
    for struct, fields in fields_by_struct.items():
        properties = components[struct]["properties"]
        for field in fields:
            if field.name not in properties:
                continue
            properties[field.name] = {**properties[field.name], "description": field.doc}
            if field.kind == "timestamp":
                properties[field.name] = {**properties[field.name], **TIMESTAMP}
        components[struct]["additionalProperties"] = True
        components[struct]["description"] = (f"Unknown keys are accepted and kept, values as sent, in the "
                                             f"{kept_in[struct]} column.")


def events_path(settings: Settings, event: Json) -> Json:
    idempotency_key = {"name": "Idempotency-Key", "in": "header", "required": False,
                       "schema": {"type": "string", "minLength": 1, "maxLength": MAX_IDEMPOTENCY_KEY},
                       "description": "A retry with the same key gets the first answer and stores nothing (kept at "
                                      "least 24 h)."}
    sent_at = {"name": "Sent-At", "in": "header", "required": False, "schema": {"type": "string"},
               "description": "When the device sent the request, by its own clock (RFC 3339 with a zone, or epoch "
                              "seconds): the sentAt of every event that gives none, so the collector corrects the "
                              "device clock's error (eventTime = the event's own time + receivedAt − sentAt)."}
    batch = {"type": "array", "items": event, "minItems": 1, "maxItems": settings.max_events_per_request}
    replayed = {"Idempotent-Replayed": {"schema": {"type": "string", "enum": ["true"]},
                                        "description": "present when this is the stored answer to an earlier "
                                                       "request with the same Idempotency-Key"}}
    return {"post": {
        "summary": "Send events",
        "parameters": [idempotency_key, sent_at],
        "security": KEYED,
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": {"oneOf": [event, batch]}},
            "application/x-ndjson": {"schema": {"type": "string", "description": "one Event per line"}},
        }},
        "responses": {
            **connection_limits(settings), **slow_body(settings),
            "200": {**reply("Accepted events are durable in the log; a batch may partly succeed", ANSWER),
                    "headers": replayed},
            "400": reply("Nothing in the body is usable: unreadable (error only), or no valid event (error with the "
                         "counts and each event's reason)", UNUSABLE),
            "401": reply("Missing or invalid API key", ERROR),
            "413": reply(f"Body over {settings.max_body_bytes} bytes (also once decompressed; then with "
                         f"Connection: close) or over {settings.max_events_per_request} events", ERROR),
            "415": reply("Content type or encoding not taken", ERROR),
            "503": {**reply("Backlog over its bound, log unavailable, or too many connections: retry after", ERROR),
                    "headers": RETRY},
        },
    }}


# ------------------------------------------------------------------------------------------------ admin API
def sql_path(settings: Settings) -> Json:
    query = {"type": "object", "required": ["query"], "properties": {"query": {"type": "string", "minLength": 1}}}
    result = {"type": "object", "properties": {"columns": {"type": "array", "items": {"type": "string"}},
                                               "rows": {"type": "array", "items": {"type": "array"}}}}
    return {"post": {
        "summary": "Run a read-only Spark SQL query over the tables (DuckDB underneath; dates in UTC)",
        "security": KEYED,
        "requestBody": json_body(query),
        "responses": {
            **body_limits(settings),
            "200": reply("Result", result),
            "400": reply("Refused (not a read-only query over the project's tables), failed, or over the time or "
                         "row cap: error, line, column", ERROR),
            "401": reply(NO_ADMIN_KEY, ERROR),
        },
    }}


def funnel_path(settings: Settings) -> Json:
    params = funnels.param_names(settings)
    where = {"type": "object", "propertyNames": {"enum": params}, "additionalProperties": {"type": "string"},
             "description": "param: value, compared as text"}
    step = {"oneOf": [
        {"type": "string", "pattern": funnels.step_pattern(params), "description": "NAME or NAME[param=value,…]"},
        {"type": "object", "required": ["event"], "additionalProperties": False,
         "properties": {"event": {"type": "string", "minLength": 1}, "where": where}}]}
    request = {"type": "object", "required": ["steps"], "additionalProperties": False, "properties": {
        "steps": {"type": "array", "minItems": funnels.MIN_STEPS, "maxItems": funnels.MAX_STEPS, "items": step},
        "within": {"type": ["string", "null"], "pattern": f"^{funnels.DURATION_PATTERN}$",
                   "description": f"the whole funnel completes within this of step 1 (default "
                                  f"{funnels.DEFAULT_WITHIN}; at most {funnels.MAX_WITHIN.days}d)"},
        "from": {"type": ["string", "null"], "format": "date", "description": "first day of step 1 (UTC)"},
        "to": {"type": ["string", "null"], "format": "date", "description": "last day of step 1 (UTC; default "
                                                                             "today)"},
        "by": {"enum": [*funnels.dimension_names(settings), None], "description": "split by the step-1 event's "
               "value (country: the collector's geo_country)"}}}
    result = {"type": "object", "required": ["steps", "within", "from", "to", "by", "columns", "rows"],
              "properties": {"steps": {"type": "array", "items": {"type": "string"}},
                             "within": {"type": "string"}, "from": {"type": "string", "format": "date"},
                             "to": {"type": "string", "format": "date"}, "by": {"type": ["string", "null"]},
                             "columns": {"type": "array", "items": {"type": "string"}},
                             "rows": {"type": "array", "items": {"type": "object"}, "description": "day (then "
                                      "total), the dimension, step_1…step_n, step_2_rate…step_n_rate, "
                                      "conversion"}}}
    return {"post": {
        "operationId": "funnel",
        "summary": "Devices that did the steps in order within the window, per day of step 1 (docs/kpi.md, Funnels)",
        "security": KEYED,
        "requestBody": json_body(request),
        "responses": {
            **body_limits(settings),
            "200": reply("Rows per day (and value), then the total", result),
            "400": reply("Not a funnel request: error says why (an unknown param or dimension, a bad step, "
                         "duration or day, too few or too many steps)", ERROR),
            "401": reply(NO_ADMIN_KEY, ERROR),
        },
    }}


FORGET_REQUEST: Json = {"type": "object", "required": ["device_ids"], "additionalProperties": False, "properties": {
    "device_ids": {"type": "array", "minItems": 1, "maxItems": FORGET_MAX_DEVICES,
                   "items": {"type": "string", "minLength": 1}},
    "purge": {"type": "boolean", "default": False}}}
POLL_FORGET: Json = {"GetForget": {"operationId": "getForget", "parameters": {"entry": "$response.body#/entry"},
                                   "description": "The forget's state (with purge: until it is done or failed)"}}


def forget_path(settings: Settings) -> Json:
    location = {"Location": {"schema": {"type": "string"}, "required": True,
                             "description": "/v1/forget/<entry>: the purge's state"}}
    return {"post": {
        "operationId": "forget",
        "summary": "Delete devices' rows from the events and quarantine tables (and, through the KPI stage, the "
                   "KPIs), audited by a salted hash of each id; purge also deletes the old files, in the background "
                   "(docs/privacy.md)",
        "security": KEYED,
        "requestBody": json_body(FORGET_REQUEST),
        "responses": {
            **body_limits(settings),
            "200": {**reply("Without purge: the rows are deleted; the audit entry", FORGET_REPORT),
                    "links": POLL_FORGET},
            "202": {**reply("With purge: the rows are deleted and the purge runs; poll Location until its state is "
                            "done or failed", PURGE_JOB), "headers": location, "links": POLL_FORGET},
            "400": reply("Not a list of non-empty device ids (error says why)", ERROR),
            "401": reply(NO_ADMIN_KEY, ERROR),
        },
    }}


def forget_entry_path(settings: Settings) -> Json:
    entry = {"name": "entry", "in": "path", "required": True, "schema": {"type": "string"},
             "description": "the audit entry POST /v1/forget answered"}
    return {"get": {
        "operationId": "getForget",
        "summary": "The state of a forget POST /v1/forget answered: running while its purge runs, done (with purge, "
                   "the audit entry says purged) or failed (reason says why; the rows are deleted all the same)",
        "security": KEYED,
        "parameters": [entry],
        "responses": {
            **connection_limits(settings),
            "200": reply("The forget's state and the audit entry as it stands", PURGE_JOB),
            "401": reply(NO_ADMIN_KEY, ERROR),
            "404": reply("No forget with this entry in this process (a job is kept by the process that took its "
                         "request, for a while; the audit table holds every entry)", ERROR),
        },
    }}


def dashboard_path(settings: Settings) -> Json:
    key = {"name": "key", "in": "query", "required": False, "schema": {"type": "string"},
           "description": "admin key, when keys are configured (or a header)"}
    # the configured dimensions ([kpi] dimensions after the built-in ones); none when [kpi] segments is off
    known = segments.known_dimensions(segments.SegmentRows(), settings.segment_dimensions)
    dimension = {"name": "dimension", "in": "query", "required": False, "schema": {"type": "string", "enum": known},
                 "description": "split the answer's `segments` by this dimension's values (absent: the totals "
                                "only). Also taken: any other dimension present in the segment tables"}
    return {"get": {
        "summary": "What the dashboard at / shows, as JSON (the page polls it every second)",
        "parameters": [key, dimension] if known else [key],
        "responses": {**connection_limits(settings), "200": reply("KPIs, lag, quarantine and table health", DASHBOARD),
                      "400": reply("An unknown dimension; `dimensions` lists the known ones", DIMENSION_ERROR),
                      "401": reply(NO_ADMIN_KEY, ERROR)},
    }}


def health_paths(settings: Settings) -> dict[str, Json]:
    return {
        "/healthz": {"get": {"summary": "Log writable (and which log: log_url), disk space, this process's pid",
                             "responses": {**connection_limits(settings), "200": {"description": "healthy"},
                                           "503": {"description": "unhealthy, or too many connections"}}}},
        "/metrics": {"get": {"summary": "Prometheus metrics",
                             "responses": {**connection_limits(settings),
                                           "200": {"description": "text exposition format"}}}},
    }


# --------------------------------------------------------------------------------------------- the document
def openapi(settings: Settings) -> Json:
    """The OpenAPI description, with the event schema taken from `schema.input_event` for the configured
    promoted parameters."""
    event, components = event_schemas(settings)
    return {
        "openapi": "3.1.0",
        "info": {"title": "gamestream collector", "version": "1",
                 "description": "Mobile-game events in; durable before answered. eventTime is stamped by the "
                                "server; the client's time belongs in eventParams.client_event_time."},
        "paths": {
            "/v1/events": events_path(settings, event),
            "/v1/sql": sql_path(settings),
            "/v1/funnel": funnel_path(settings),
            "/v1/forget": forget_path(settings),
            "/v1/forget/{entry}": forget_entry_path(settings),
            "/v1/dashboard": dashboard_path(settings),
            **health_paths(settings),
        },
        "components": {"schemas": components, "securitySchemes": SECURITY_SCHEMES},
    }

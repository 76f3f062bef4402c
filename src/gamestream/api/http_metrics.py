"""The collector's Prometheus figures, in a registry of its own (`GET /metrics` adds the stages' registry)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5)


@dataclass
class HttpMetrics:
    registry: CollectorRegistry
    requests: Counter
    accepted: Counter
    rejected: Counter
    latency: Histogram
    backlog: Gauge
    log_reachable: Gauge
    group_commits: Gauge
    log_submits: Gauge
    front_requests: Gauge

    @classmethod
    def create(cls, log_description: str) -> HttpMetrics:
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
                              buckets=LATENCY_BUCKETS, registry=registry),
            backlog=Gauge("gamestream_log_backlog_events", "Events in the log not yet committed to the table",
                          registry=registry),
            log_reachable=log_reachable.labels(log_description),  # type: ignore[arg-type]
            group_commits=Gauge("gamestream_log_group_commits", "Transactions the embedded log committed, one "
                                "fsync each, since this process started (appends of concurrent requests share one)",
                                registry=registry),
            log_submits=Gauge("gamestream_log_submits", "Log submits of requests without an Idempotency-Key since "
                              "this process started: one per event-loop turn for all such requests in it",
                              registry=registry),
            front_requests=Gauge("gamestream_front_requests", "With the native front: `POST /v1/events` requests "
                                 "it answered itself (taken), and connections it handed to the app (spliced), since "
                                 "this process started", ["kind"], registry=registry),
        )

"""Prometheus figures of the stages after the log (processor, KPI stage, maintenance), one registry per process.

The collector's `/metrics` exposes this registry next to its own, so `serve`/`demo` show the processor's
figures when it runs in the same process; `gamestream process --metrics-port N` exposes it on its own.
Stages record into the module-level metrics below; nothing here reads a table or the log.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry()

events_committed = Counter("gamestream_events_committed", "Events committed to the events table",
                           registry=REGISTRY)
events_quarantined = Counter("gamestream_events_quarantined",
                             "Events committed to the quarantine table with their reason", registry=REGISTRY)
events_duplicates = Counter("gamestream_events_duplicates",
                            "Copies of an event whose eventId had landed already (the same payload), dropped",
                            registry=REGISTRY)
commits = Counter("gamestream_commits", "Delta commits by table", ["table"], registry=REGISTRY)
commit_retries = Counter("gamestream_commit_retries", "Delta commit attempts retried, by table and reason",
                         ["table", "reason"], registry=REGISTRY)
batch_events = Histogram("gamestream_batch_events", "Events per processor micro-batch",
                         buckets=(1, 10, 100, 1_000, 10_000, 50_000, 100_000, 250_000, 1_000_000),
                         registry=REGISTRY)
commit_seconds = Histogram("gamestream_commit_seconds", "Delta commit latency (write + commit), by table",
                           ["table"], buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30), registry=REGISTRY)
log_lag_events = Gauge("gamestream_log_lag_events", "Events in a log partition not yet committed to the table",
                       ["partition"], registry=REGISTRY)
log_position = Gauge("gamestream_log_committed_offset", "Last log offset committed to the table, per partition",
                     ["partition"], registry=REGISTRY)
watermark = Gauge("gamestream_kpi_watermark_seconds", "KPI watermark (event time, Unix seconds)",
                  registry=REGISTRY)
kpi_backpressure_seconds = Counter(
    "gamestream_kpi_backpressure_seconds", "Time the processor read nothing while its partitions' KPI folds caught "
    "up (partitioned KPIs, `kpi_part_backlog_events`)", registry=REGISTRY)
kpi_commits = Counter("gamestream_kpi_folds", "KPI folds committed", registry=REGISTRY)
late_events = Counter("gamestream_kpi_late_events", "Events that arrived for a window already final",
                      registry=REGISTRY)
stage_errors = Counter("gamestream_stage_errors", "Errors a stage recovered from (then retried), by stage",
                       ["stage"], registry=REGISTRY)

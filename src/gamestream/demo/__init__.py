"""The demo: simulated players (`generator`), local nats-server nodes (`nats_cluster`) and `gamestream demo` on one
machine or as a cluster of processes (`runner`).

May import: core, log, ingest, tables, kpi, process, api
"""

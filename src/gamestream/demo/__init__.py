"""The demo: simulated players (`generator`), local nats-server nodes (`nats_cluster`) or Kafka brokers
(`kafka_cluster`) and `gamestream demo` on one machine or as a cluster of processes (`runner`), kept running by a
`supervisor` (a part that dies is restarted).

May import: core, log, ingest, tables, kpi, process, api
"""

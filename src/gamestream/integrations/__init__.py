"""Integrations with the reference pipeline's cloud and engine.

Owns: the API Gateway → Lambda → Kinesis handler and its packaging (`aws`); Apache Spark as a streaming source
over the log and as the reference job writing the same tables (`spark`, the `gamestream[spark]` extra).

May import: core, log, ingest, tables, kpi, process
"""

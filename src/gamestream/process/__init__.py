"""Processing: the log's records → the events and quarantine tables, exactly once.

Owns: decoding records into Arrow rows and quarantine rows (`decode`), the processor's micro-batches and commits
per partition (`processor`), and the pipeline that runs the processor beside the KPI stage, which it feeds
(`pipeline`), and beside the alert evaluator when the configuration file has alert rules.

May import: core, log, tables, kpi, alerts
"""

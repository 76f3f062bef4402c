"""gamestream: mobile-game events over HTTP → a durable log → Delta Lake tables, exactly once → live KPIs.

The packages follow an event's path; open them in this order:

    ingest/        the HTTP ingest endpoint's work: bodies, validation, keys, the connection guard; `load`
    log/           the event log (Protocol, SQLite, NATS JetStream, Kinesis), record formats, partition ownership
    tables/        Delta Lake access, the exactly-once commit, maintenance, forgetting players
    kpi/           the KPI stage: the events table's versions → KPI tables
    process/       the processor (log → events table) and the pipeline that runs it with the KPI stage
    api/           the HTTP server: the ingest routes, SQL, the dashboard, OpenAPI
    integrations/  AWS (the Lambda handler) and Apache Spark (a streaming source and the reference job)
    demo/          the simulated players, the local NATS cluster and `gamestream demo`
    cli/           the command line

Core modules, importable from everywhere and importing no package: `schema` (the event, declared once),
`settings` (the one settings object), `errors` (exceptions by what the caller can do), `logs`, `metrics`.

Imports go one way: a package imports only the core modules and the packages its own docstring lists under
"May import" (tests/test_layout.py checks it, imports inside functions included, and that there is no cycle).
"""

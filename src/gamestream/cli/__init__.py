"""The `gamestream` command: every command's options, its work and its report.

May import: core, log, ingest, tables, kpi, process, api, integrations, demo, alerts

One module per group of commands, each holding its commands' options, work and report printers: `ingest` (serve,
load), `process`, `tables` (optimize, vacuum, status), `sql`, `funnel`, `schema`, `forget`, `demo` (demo, generate), `spark`
(spark-job), `aws` and `alerts` (alerts, alerts run). They register on the click group in `app`, which also holds `main` (the exit code and the
one-line errors); `common` has what they share (consoles, options, settings, storage checks) and `keys` the API
key options of the servers. Importing this package imports them all, so every command is registered.
"""

from gamestream.cli import (alerts, aws, demo, forget, funnel, ingest, process, schema, spark,  # noqa: F401
                            sql, tables)  # (registration)
from gamestream.cli.app import cli, main

__all__ = ["cli", "main"]

"""The HTTP server: the collector's routes, SQL, the dashboard and the OpenAPI document.

Owns: the Starlette application (`app`: routes, state, lifespan), one module per route or route group
(`routes.events`, `routes.health`, `routes.sql`, `routes.funnel`, `routes.forget`, `routes.dashboard`,
`routes.openapi`), the collector's shared state (`collector`), metrics (`http_metrics`) and cross-request
coalescing (`coalesce`), keys (`access`), refusals (`refusals`), background purges (`purge_jobs`), the OpenAPI
document (`openapi`), uvicorn under the connection guard (`server`), the Spark-SQL-over-DuckDB engine (`query`)
and funnels over it (`funnel`), the dashboard's page and data (`dashboard`) and the vendor SDKs' protocols
(`compat`: Amplitude, Segment, PostHog, Snowplow).

May import: core, log, ingest, tables, kpi
"""

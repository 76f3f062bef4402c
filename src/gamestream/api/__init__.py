"""The HTTP server: the collector's routes, SQL, the dashboard and the OpenAPI document.

Owns: the Starlette application (`app`), uvicorn under the connection guard (`server`), the Spark-SQL-over-DuckDB
engine (`query`) and the dashboard's page and data (`dashboard`).

May import: core, log, ingest, tables, kpi
"""

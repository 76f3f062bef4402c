"""Ingest: what the collector does with a request before the log, and `gamestream load`.

Owns: request bodies' rules are the log's (`gamestream.log.envelope`, shared with the decoder of the seed's
records); here are the validation of a request's events into log appends and its answer (`collector`), the API
keys (`auth`), the connection guard under uvicorn (`http_guard`: head and body timers, 431, drain before a 413),
whole-batch validation into Arrow (`batch`), and the NDJSON backfill (`loader`).
The HTTP routes themselves are mounted by `gamestream.api`.

May import: core, log
"""

"""`POST /v1/sql {"query": "<Spark SQL>"}` → `{"columns": [...], "rows": [[...], ...]}` (admin key)."""

from __future__ import annotations

import asyncio

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gamestream.api.access import BEARER, admin_key_needed, is_admin
from gamestream.api.refusals import Refuse, answers_refusals, read_capped_body
from gamestream.settings import Settings

USAGE = 'send {"query": "<Spark SQL>"} as JSON'


@answers_refusals
async def post_sql(request: Request) -> Response:
    import sqlglot

    from gamestream.api.query import QueryError, SqlEngine, to_json

    settings: Settings = request.app.state.settings
    if not is_admin(request):
        raise Refuse(401, admin_key_needed("POST /v1/sql"), BEARER)
    # a query is small: the ingest body limit bounds it too
    query = _query_in(await read_capped_body(request, settings.max_body_bytes))
    try:
        table = await asyncio.to_thread(SqlEngine(settings).run, query)
    except QueryError as error:
        return JSONResponse({"error": str(error), "line": error.line, "column": error.column,
                             "detail": error.pointed()}, status_code=400)
    except sqlglot.errors.SqlglotError as error:  # a query sqlglot cannot even tokenize: still the sender's
        return JSONResponse({"error": f"syntax error: {error}", "line": None, "column": None,
                             "detail": str(error)}, status_code=400)
    rows = msgspec.json.decode(to_json(table))
    return JSONResponse({"columns": table.column_names, "rows": [list(r.values()) for r in rows]})


def _query_in(raw: bytes) -> str:
    try:
        body = msgspec.json.decode(raw)
        query = body["query"]
        if not isinstance(query, str):
            raise TypeError
    except (msgspec.DecodeError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
        raise Refuse(400, USAGE) from None
    return query

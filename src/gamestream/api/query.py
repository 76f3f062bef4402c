"""SQL over the Delta tables: Spark SQL in (the reference pipeline's dialect), DuckDB underneath, in a sandbox.

1. sqlglot parses the query as Spark SQL; anything but one query (SELECT, WITH, UNION, …) is refused: the SQL
   surface is read-only.
2. The sandbox, on sqlglot's tree: every table named must be one of the project's tables or a CTE of the query
   (no schema prefix, no path, no `csv.`/path`` file table); in FROM position only the generators `range`,
   `generate_series` and `unnest` are taken; functions that reach outside DuckDB (file readers, `getenv`,
   `current_setting`, DuckDB's catalog functions, …) are refused wherever they appear.
3. Rewrites, both exact by the schema's definition of `eventDate` (the UTC date of `eventTime`):
   - `to_date(eventTime)` (also `CAST(eventTime AS DATE)`, `date(eventTime)`) becomes the partition column
     `eventDate`, so DuckDB pushes the comparison into the scan and skips the other days' files (a cast on
     eventTime would read them all);
   - `current_date` becomes today's UTC date as a literal, whatever the machine's time zone;
   - Spark's `window(eventTime, '60 minutes')` becomes the struct (start, end) of its tumbling window, aligned
     to the epoch as Spark aligns it (DuckDB's `time_bucket`).
4. sqlglot writes it as DuckDB SQL without comments (a comment could end early and uncover a second statement);
   DuckDB's own parser must see it as one SELECT with the same tables and functions (`_check_duckdb_tree`).
5. It runs with `TimeZone = 'UTC'` over the tables registered as Arrow datasets
   (`DeltaTable.to_pyarrow_dataset()`): those of `settings.TABLES` that exist — `events` (also under the
   reference pipeline's name `mobile_events_delta_raw`), `events_quarantine`, the KPI tables, `audit`, `alerts`;
   then the connection is locked: no file system, no extensions, no Python replacement scans, configuration
   frozen. Each query is stopped after `sql_timeout_s` and refused beyond `sql_max_rows` result rows.
"""

from __future__ import annotations

import csv
import datetime as dt
import decimal
import io
import json
import logging
import math
import re
import threading
import uuid
import warnings
from dataclasses import dataclass

import duckdb
import pyarrow as pa
import sqlglot
from sqlglot import exp

from gamestream.settings import TABLES, Settings
from gamestream.tables import lake

ALIASES = {"mobile_events_delta_raw": "events"}
QUERYABLE = (*TABLES, *ALIASES)
_TOKEN = re.compile(r"<Token token_type: TokenType\.(\w+), text: (.*?), line: .*?>")
logging.getLogger("sqlglot").setLevel(logging.ERROR)  # "falling back to parsing as a Command": we refuse those
# execute() is chosen for its error positions; the copy it warns about is of a query result, small here
warnings.filterwarnings("ignore", message="Arrow output on a DB-API result", category=UserWarning)

# Generators that read nothing but their arguments: the only functions taken in FROM position.
SAFE_TABLE_FUNCTIONS = frozenset({"range", "generate_series", "unnest", "explode"})
# Functions refused anywhere in a query: they read files, the environment or DuckDB's configuration and catalog
# (which names directories), run SQL given as a string, or write. DuckDB's table functions are refused by name
# too (`_duckdb_table_functions`), since DuckDB would take some of them outside FROM as well.
REFUSED_FUNCTIONS = frozenset({
    "getenv", "current_setting", "which_secret", "write_log", "current_query", "glob",
    "query", "query_table", "json_execute_serialized_sql", "json_serialize_sql", "json_deserialize_sql",
    "checkpoint", "force_checkpoint", "input_file_name", "reflect", "java_method", "sniff_csv",
})
REFUSED_PREFIXES = ("read_", "duckdb_", "pragma_", "parquet_", "sniff_", "iceberg_", "delta_", "sqlite_",
                    "postgres_", "mysql_", "pg_", "arrow_scan", "python_", "pandas_", "test_")
# Nodes of a statement (not a query) that sqlglot may still place inside a query's tree.
_WRITING_NODES = (exp.DDL, exp.DML, exp.Into, exp.Command, exp.Copy, exp.Pragma, exp.Set, exp.Use, exp.Describe,
                  exp.Cache, exp.Uncache, exp.Refresh, exp.Analyze, exp.LoadData, exp.Attach, exp.Detach,
                  exp.Install, exp.Export)
_PLAIN_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class QueryError(ValueError):
    """A query that cannot run, with where in the query it went wrong."""

    def __init__(self, message: str, query: str = "", line: int | None = None, column: int | None = None) -> None:
        self.query, self.line, self.column = query, line, column
        super().__init__(message)

    def pointed(self) -> str:
        """The message, with the query's line and a caret under the column when known."""
        if self.line is None or not self.query:
            return str(self)
        lines = self.query.splitlines() or [""]
        text = lines[min(self.line, len(lines)) - 1]
        caret = " " * max((self.column or 1) - 1, 0) + "^"
        return f"{self}\n  {text}\n  {caret}"


@dataclass
class Translated:
    duckdb_sql: str
    tables: set[str]
    """The project's tables the query reads (names as written: `mobile_events_delta_raw` stays itself)."""


def _is_event_time(node: exp.Expression) -> bool:
    return isinstance(node, exp.Column) and node.name.lower() == "eventtime"


# Spark SQL's `window(timeColumn, 'N minutes')` (the seed's `groupBy(window("eventTime", "60 minute"))`): a
# struct (start, end) of the tumbling window holding the row, aligned to the epoch as Spark aligns it. sqlglot
# reads WINDOW as the keyword of a WINDOW clause, so the function is renamed to this before parsing.
_SPARK_WINDOW = "gamestream_spark_window"
_WINDOW_DURATION = re.compile(r"^\s*(\d+)\s+(second|minute|hour|day|week)s?\s*$", re.IGNORECASE)


def _rename_window_function(query: str) -> str:
    try:
        tokens = sqlglot.tokenize(query, read="spark")
    except sqlglot.errors.TokenError:
        return query  # the parse that follows reports it
    # `window(` is the function; `window.start` a column named window (Spark's default name for it)
    renames = {sqlglot.TokenType.L_PAREN: _SPARK_WINDOW, sqlglot.TokenType.DOT: "`window`"}
    spans = [(token.start, token.end, renames[following.token_type]) for token, following in zip(tokens, tokens[1:])
             if token.token_type == sqlglot.TokenType.WINDOW and following.token_type in renames]
    for start, end, name in reversed(spans):
        query = query[:start] + name + query[end + 1:]
    return query


def _spark_window(node: exp.Anonymous, query: str) -> exp.Expression:
    args = node.expressions
    duration = args[1] if len(args) == 2 else None
    match = _WINDOW_DURATION.match(duration.name) if isinstance(duration, exp.Literal) and duration.is_string else None
    if match is None:
        raise QueryError("window() takes a time column and a duration such as '60 minutes' (tumbling windows; "
                         "sliding windows and start offsets are not supported)", query)
    interval = f"INTERVAL '{match[1]} {match[2].lower()}'"
    column = args[0].sql(dialect="duckdb")
    start = f"time_bucket({interval}, {column}, TIMESTAMPTZ '1970-01-01 00:00:00+00')"
    return sqlglot.parse_one(f"{{'start': {start}, 'end': {start} + {interval}}}", read="duckdb")


def _rewrite(node: exp.Expression, today: dt.date, query: str = "") -> exp.Expression:
    if isinstance(node, exp.Anonymous) and node.name.lower() == _SPARK_WINDOW:
        return _spark_window(node, query)
    if isinstance(node, (exp.TsOrDsToDate, exp.Date, exp.DateStrToDate)) and _is_event_time(node.this):
        return exp.column("eventDate", table=node.this.table or None)
    if isinstance(node, exp.Cast) and node.to.is_type("date") and _is_event_time(node.this):
        return exp.column("eventDate", table=node.this.table or None)
    if isinstance(node, exp.CurrentDate):
        return exp.cast(exp.Literal.string(today.isoformat()), "date")
    return node


_duckdb_table_function_names: frozenset[str] | None = None


def _duckdb_table_functions() -> frozenset[str]:
    """DuckDB's own list of its table and pragma functions (file readers, catalog views, `query`, …), asked once:
    a new DuckDB release that adds one is covered without a change here."""
    global _duckdb_table_function_names
    if _duckdb_table_function_names is None:
        with duckdb.connect() as connection:
            # less the names that are also scalar or aggregate functions (`repeat`, `histogram`): those stay
            # usable as such, and in FROM position only SAFE_TABLE_FUNCTIONS are taken anyway
            rows = connection.execute(
                "SELECT lower(function_name) FROM duckdb_functions() GROUP BY 1 HAVING bool_and("
                "function_type IN ('table', 'table_macro', 'pragma'))").fetchall()
        _duckdb_table_function_names = frozenset(name for (name,) in rows) - SAFE_TABLE_FUNCTIONS
    return _duckdb_table_function_names


def _is_refused_function(name: str) -> bool:
    name = name.lower()
    return (name in REFUSED_FUNCTIONS or name.startswith(REFUSED_PREFIXES)
            or name in _duckdb_table_functions())


def _function_name(node: exp.Func) -> str:
    return (node.name if isinstance(node, exp.Anonymous) else node.sql_name()).lower()


def _tables_allowed() -> str:
    return ", ".join(QUERYABLE)


def _check_sandbox(statement: exp.Expression, query: str) -> set[str]:
    """Refuses anything in a query's tree that would reach past the project's tables; returns the tables read.

    Allowed in FROM/JOIN: a project table (or `mobile_events_delta_raw`) or a CTE of the query, by a bare name;
    a subquery; VALUES; the generators in SAFE_TABLE_FUNCTIONS. Refused: any other table function, a schema- or
    file-format-qualified name (Spark's ``csv.`/path` ``), a quoted path, and the functions of
    `_is_refused_function` wherever they appear. Checked before anything runs, so the error names the culprit.
    """
    for node in statement.walk():
        if isinstance(node, _WRITING_NODES):
            raise QueryError(f"{node.key.upper()} is not allowed here: the SQL interface is read-only "
                             "(SELECT / WITH queries, and the maintenance statements OPTIMIZE and VACUUM).", query)
    ctes = set()
    for cte in statement.find_all(exp.CTE):
        if not _PLAIN_NAME.match(cte.alias_or_name):
            raise QueryError(f"a CTE is named by a plain identifier, not {cte.alias_or_name!r}", query)
        ctes.add(cte.alias_or_name.lower())
    read = set()
    for table in statement.find_all(exp.Table):
        source = table.this
        if isinstance(source, exp.Func):
            name = _function_name(source)
            if name not in SAFE_TABLE_FUNCTIONS:
                raise QueryError(f"table function {name}() is not allowed: SQL reads the project's tables "
                                 f"({_tables_allowed()}) and nothing else (no files, URLs or catalogs)", query)
            continue
        qualifier = ".".join(part.name for part in (table.args.get("catalog"), table.args.get("db")) if part)
        if qualifier:
            raise QueryError(f"{qualifier}.`{table.name}` is not allowed: name a table without a prefix; "
                             f"tables are {_tables_allowed()} (files and other schemas are not readable)", query)
        name = table.name
        if not isinstance(source, exp.Identifier) or not _PLAIN_NAME.match(name):
            raise QueryError(f"{name!r} is not a table: SQL reads the project's tables ({_tables_allowed()}) "
                             "and nothing else (no files, URLs or globs)", query)
        if name.lower() in ctes:
            continue
        if name.lower() not in QUERYABLE:
            raise QueryError(f"unknown table {name}; tables are {_tables_allowed()}", query)
        read.add(name.lower())
    for function in statement.find_all(exp.Func):
        name = _function_name(function)
        if name not in SAFE_TABLE_FUNCTIONS and _is_refused_function(name):
            raise QueryError(f"function {name}() is not allowed: it reaches outside the project's tables "
                             "(files, environment, settings or DuckDB's catalog)", query)
    return read


def _walk_json(node: object):
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk_json(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk_json(value)


def _check_duckdb_tree(connection: duckdb.DuckDBPyConnection, duckdb_sql: str, tables: set[str]) -> None:
    """The same sandbox, judged on DuckDB's own parse of the SQL it is about to run (`json_serialize_sql`):
    exactly one SELECT, whose base tables are the registered ones or its CTEs, whose table functions are the
    safe generators and whose functions are not refused. Guards against sqlglot writing for DuckDB something it
    did not itself see when it parsed the Spark SQL."""
    (serialized,) = connection.execute("SELECT json_serialize_sql($1)", [duckdb_sql]).fetchone()
    tree = json.loads(serialized)
    if tree.get("error"):
        raise QueryError(f"DuckDB does not read this as one SELECT: {tree.get('error_message')}", duckdb_sql)
    if len(tree.get("statements", [])) != 1:
        raise QueryError("one SELECT statement at a time, please: the SQL interface is read-only", duckdb_sql)
    nodes = list(_walk_json(tree["statements"]))
    ctes = {entry["key"].lower() for node in nodes if isinstance(node.get("cte_map"), dict)
            for entry in node["cte_map"].get("map", [])}
    for node in nodes:
        if node.get("type") == "BASE_TABLE":
            name = node.get("table_name", "").lower()
            if node.get("schema_name") or node.get("catalog_name") or name not in tables | ctes:
                raise QueryError(f"{node.get('table_name')!r} is not a table of this project; tables are "
                                 f"{_tables_allowed()}", duckdb_sql)
        elif node.get("type") == "TABLE_FUNCTION":
            name = node.get("function", {}).get("function_name", "").lower()
            if name not in SAFE_TABLE_FUNCTIONS:
                raise QueryError(f"table function {name}() is not allowed", duckdb_sql)
        elif node.get("class") == "FUNCTION":
            name = node.get("function_name", "").lower()
            if node.get("schema") or node.get("catalog") or (
                    name not in SAFE_TABLE_FUNCTIONS and _is_refused_function(name)):
                raise QueryError(f"function {name}() is not allowed", duckdb_sql)


def translate(query: str, today: dt.date | None = None, max_rows: int | None = None) -> Translated:
    """Spark SQL → DuckDB SQL with the rewrites above; raises QueryError for a non-query, a syntax error, or
    anything the sandbox refuses (`_check_sandbox`). With `max_rows`, the query's LIMIT is lowered to
    max_rows + 1 (enough to tell that a result is over the cap, without computing all of it)."""
    today = today or dt.datetime.now(dt.timezone.utc).date()
    try:
        statements = [s for s in sqlglot.parse(_rename_window_function(query), read="spark") if s is not None]
    except sqlglot.errors.ParseError as error:
        first = error.errors[0] if error.errors else {}
        description = _TOKEN.sub(lambda m: "the end of the query" if m[1] == "SENTINEL" else repr(m[2]),
                                 str(first.get("description", error)))
        raise QueryError(f"syntax error: {description}", query, first.get("line"), first.get("col")) from None
    except sqlglot.errors.TokenError as error:  # e.g. an unterminated string: not even tokens
        raise QueryError(f"syntax error: {error}", query) from None
    if len(statements) != 1:
        raise QueryError(f"one statement at a time, please (got {len(statements)})", query)
    (statement,) = statements
    if not isinstance(statement, exp.Query):
        # named by the query's first word: sqlglot reads some statements as something else (`INSTALL httpfs`
        # as a column with an alias, `CHECKPOINT` as a column)
        kind = sqlglot.tokenize(query, read="spark")[0].text.upper()
        raise QueryError(f"{kind} is not allowed here: the SQL interface is read-only (SELECT / WITH queries, "
                         "and the maintenance statements OPTIMIZE and VACUUM).", query, 1, 1)
    tables = _check_sandbox(statement, query)
    rewritten = statement.transform(lambda node: _rewrite(node, today, query))
    if max_rows is not None:
        limit = rewritten.args.get("limit")
        written = limit.expression if isinstance(limit, exp.Limit) else None
        if limit is None or (isinstance(written, exp.Literal) and written.is_int and int(written.this) > max_rows):
            rewritten = rewritten.limit(max_rows + 1)
    # comments=False: a `--` comment holding `*/` would be written back as `/* … */` and end early
    return Translated(rewritten.sql(dialect="duckdb", comments=False), tables)


_OPTIMIZE = re.compile(
    r"^\s*OPTIMIZE\s+(?:'(?P<path>[^']+)'|`?(?P<table>\w+)`?)"
    r"(?:\s+WHERE\s+(?P<where>.+?))?"
    r"(?:\s+ZORDER\s+BY\s*\(?(?P<columns>[^)]+?)\)?)?\s*;?\s*$", re.IGNORECASE | re.DOTALL)
_VACUUM = re.compile(
    r"^\s*VACUUM\s+(?:'(?P<path>[^']+)'|`?(?P<table>\w+)`?)"
    r"(?:\s+RETAIN\s+(?P<hours>\d+(?:\.\d+)?)\s+HOURS?)?(?P<dry>\s+DRY\s+RUN)?\s*;?\s*$",
    re.IGNORECASE | re.DOTALL)
_WHERE_DATE = re.compile(r"^\s*`?eventDate`?\s*(?P<op>=|>=)\s*(?:DATE\s*)?'(?P<date>\d{4}-\d{2}-\d{2})'\s*$",
                         re.IGNORECASE)


def _same_location(written: str, location: str) -> bool:
    return lake.same_location(written, location)


# One cache for every query of this process: the tables stay open between queries and are brought up to date
# incrementally (lake.TableCache), instead of listing the object store on every query.
_TABLES = lake.TableCache()


class SqlEngine:
    """DuckDB over the Delta tables, opened afresh for each query so that it sees their latest versions.

    The reference pipeline's maintenance statements are taken too, and run by `gamestream.tables.maintenance` under its
    lock: `OPTIMIZE '<path>' | <table> [WHERE eventDate = | >= '<date>'] [ZORDER BY (col, …)]` and
    `VACUUM '<path>' | <table> [RETAIN n HOURS] [DRY RUN]` (a retention under the table's minimum is refused,
    as Delta's retentionDurationCheck does; `gamestream vacuum --force` overrides it). A path must be the
    location of one of this data directory's tables: maintenance never touches anything else.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def _maintenance_target(self, match: re.Match, query: str) -> str:
        locations = {name: self.settings.table_uri(name) for name in TABLES}
        if match["path"]:
            for location in locations.values():
                if _same_location(match["path"], location):
                    return location
            allowed = "; ".join(f"{name} ({location})" for name, location in locations.items())
            raise QueryError(f"{match['path']!r} is not one of this data directory's tables: name a table, or "
                             f"quote its location — {allowed}", query, 1, match.start("path") + 1)
        name = ALIASES.get(match["table"].lower(), match["table"].lower())
        if name not in TABLES:
            raise QueryError(f"unknown table {match['table']}; tables are {', '.join(TABLES)}", query, 1,
                             match.start("table") + 1)
        return locations[name]

    def _maintenance(self, query: str) -> pa.Table | None:
        from gamestream.tables import maintenance

        optimize, vacuum = _OPTIMIZE.match(query), _VACUUM.match(query)
        if not optimize and not vacuum:
            return None
        match = optimize or vacuum
        uri = self._maintenance_target(match, query)
        if not lake.table_exists(uri):
            raise QueryError(f"no Delta table at {uri}", query)
        columns = None
        if optimize and optimize["columns"]:
            columns = [c.strip().strip("`") for c in optimize["columns"].split(",")]
            if not all(_PLAIN_NAME.match(c) for c in columns):
                raise QueryError("ZORDER BY takes column names", query, 1, optimize.start("columns") + 1)
        lock = maintenance.MaintenanceLock(self.settings).acquire(wait=True)
        assert lock is not None
        try:
            if optimize:
                partitions = since = None
                if optimize["where"]:
                    where = _WHERE_DATE.match(optimize["where"])
                    if not where:
                        raise QueryError("OPTIMIZE … WHERE takes eventDate = '<date>' or eventDate >= '<date>'",
                                         query, 1, optimize.start("where") + 1)
                    partitions, since = ([where["date"]], None) if where["op"] == "=" else (None, where["date"])
                report = maintenance.optimize(uri, partitions=partitions, since=since, zorder=columns,
                                              target_size=self.settings.target_file_bytes)
                return pa.table({"path": [uri], "partitions_optimized": [report.partitions_optimized],
                                 "files_removed": [report.files_removed], "files_added": [report.files_added],
                                 "files_before": [report.before.files], "files_after": [report.after.files],
                                 "bytes_before": [report.before.bytes], "bytes_after": [report.after.bytes]})
            hours = float(vacuum["hours"]) if vacuum["hours"] else None
            try:
                result = maintenance.vacuum(uri, retention_hours=hours, dry_run=bool(vacuum["dry"]))
            except maintenance.RetentionTooShort as error:
                raise QueryError(f"{error}".replace("run again with --force", "use `gamestream vacuum --force`"),
                                 query) from None
            return pa.table({"path": [f"{uri}/{name}" for name in result.files]}, schema=pa.schema([
                ("path", pa.string())]))
        finally:
            lock.close()

    def connect(self, tables: set[str]) -> duckdb.DuckDBPyConnection:
        """A connection that sees the given tables and nothing else.

        The datasets are registered first (pyarrow, not DuckDB, reads their files, so scanning them keeps
        working), then DuckDB loses the file system, extensions and Python replacement scans, and its
        configuration is locked so that no statement can give them back."""
        connection = duckdb.connect()
        try:
            connection.execute("SET TimeZone = 'UTC'")
            for name in tables:
                dataset = _TABLES.dataset(self.settings.table_uri(ALIASES.get(name, name)))
                if dataset is None:
                    raise QueryError(f"table {name} does not exist yet: run `gamestream process` first")
                connection.register(name, dataset)
            for setting in ("enable_external_access = false", "autoload_known_extensions = false",
                            "autoinstall_known_extensions = false", "allow_community_extensions = false",
                            "python_enable_replacements = false", "lock_configuration = true"):
                connection.execute(f"SET {setting}")
        except BaseException:
            connection.close()
            raise
        return connection

    def _prepared(self, query: str, max_rows: int | None) -> tuple[Translated, duckdb.DuckDBPyConnection]:
        translated = translate(query, max_rows=max_rows)
        connection = self.connect(translated.tables)
        try:
            _check_duckdb_tree(connection, translated.duckdb_sql, translated.tables)
        except BaseException:
            connection.close()
            raise
        return translated, connection

    def run(self, query: str) -> pa.Table:
        """The query's result, or QueryError: refused by the sandbox, failed in DuckDB, stopped after
        `sql_timeout_s`, or over `sql_max_rows` rows."""
        maintained = self._maintenance(query)
        if maintained is not None:
            return maintained
        max_rows, timeout = self.settings.sql_max_rows, self.settings.sql_timeout_s
        translated, connection = self._prepared(query, max_rows)
        stopped = threading.Event()

        def stop() -> None:
            stopped.set()
            connection.interrupt()

        timer = threading.Timer(timeout, stop)
        timer.daemon = True
        timer.start()
        try:
            # execute(), not sql(): its errors carry the "LINE 1: … ^" pointer into the query
            reader = connection.execute(translated.duckdb_sql).to_arrow_reader()
            batches, rows = [], 0
            for batch in reader:
                batches.append(batch)
                rows += batch.num_rows
                if rows > max_rows:
                    raise QueryError(f"the result has more than {max_rows:,} rows (sql_max_rows): aggregate or "
                                     "add a LIMIT", query)
            return pa.Table.from_batches(batches, schema=reader.schema)
        except duckdb.Error as error:
            if stopped.is_set():
                raise QueryError(f"the query was stopped after {timeout:g} s (sql_timeout_s): filter on "
                                 "eventDate, aggregate, or add a LIMIT", query) from None
            raise QueryError(str(error).strip(), translated.duckdb_sql) from None
        finally:
            timer.cancel()
            connection.close()

    def plan(self, query: str) -> str:
        """DuckDB's EXPLAIN of the translated query (shows which filters reach the table scans)."""
        translated, connection = self._prepared(query, None)
        try:
            return "\n".join(row[1] for row in connection.execute("EXPLAIN " + translated.duckdb_sql).fetchall())
        finally:
            connection.close()


# ----------------------------------------------------------------------------------------------------- output
def _plain(value: object) -> object:
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):  # DuckDB's SUM of integers is a HUGEINT/DECIMAL
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, (bytes, uuid.UUID, dt.timedelta)):
        return str(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


MONEY_COLUMNS = re.compile(r"bookings|amount|revenue|arpdau|arppu|price", re.IGNORECASE)


def display_value(value: object, arrow_type: pa.DataType, column: str = "") -> str:
    """A value as text for the table and CSV outputs (JSON stays exact: `to_json`).

    Floating-point values lose the noise of binary sums (1436.2100000000005 → "1436.21"): a column whose name
    says money (MONEY_COLUMNS: bookings, amount, revenue, arpdau, arppu, price) shows two decimals ("2.00");
    any other float shows up to six decimals without trailing zeros ("0.333333", "2"), and a non-zero value too
    small for that shows six significant digits ("1.5e-09") rather than a misleading 0. NULL is the empty
    string; nested values are JSON; everything else is written exactly.

    >>> display_value(1436.2100000000005, pa.float64())
    '1436.21'
    >>> display_value(2.0, pa.float64(), "bookings")
    '2.00'
    """
    if value is None:
        return ""
    if isinstance(value, decimal.Decimal):
        return str(value)  # exact already: DECIMAL columns and DuckDB's SUM of integers
    if isinstance(value, float) and pa.types.is_floating(arrow_type):
        if not math.isfinite(value):
            return str(value)
        if column and MONEY_COLUMNS.search(column):
            return f"{value:.2f}"
        if value != 0 and abs(value) < 5e-7:
            return f"{value:.6g}"
        text = f"{value:.6f}".rstrip("0").rstrip(".")
        return "0" if text in ("-0", "") else text
    if isinstance(value, (dict, list)):
        return json.dumps(_plain(value))
    return str(_plain(value))


def to_json(table: pa.Table) -> str:
    return json.dumps([{k: _plain(v) for k, v in row.items()} for row in table.to_pylist()])


def to_csv(table: pa.Table) -> str:
    """CSV with a header; values as `display_value` writes them (floats without binary noise)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(table.column_names)
    types = [(field.name, field.type) for field in table.schema]
    for row in table.to_pylist():
        writer.writerow([display_value(v, kind, name) for v, (name, kind) in zip(row.values(), types)])
    return buffer.getvalue()

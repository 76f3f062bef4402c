"""SQL over the Delta tables: Spark SQL in (the seed's dialect), DuckDB underneath.

1. sqlglot parses the query as Spark SQL; anything but a query (SELECT, WITH, UNION, …) is refused: the SQL
   surface is read-only.
2. Rewrites, both exact by the schema's definition of `eventDate` (the UTC date of `eventTime`):
   - `to_date(eventTime)` (also `CAST(eventTime AS DATE)`, `date(eventTime)`) becomes the partition column
     `eventDate`, so DuckDB pushes the comparison into the scan and skips the other days' files (a cast on
     eventTime would read them all);
   - `current_date` becomes today's UTC date as a literal, whatever the machine's time zone.
3. sqlglot writes it as DuckDB SQL, which runs with `TimeZone = 'UTC'` over the tables registered as Arrow
   datasets (`DeltaTable.to_pyarrow_dataset()`): `events` (also under the seed's name
   `mobile_events_delta_raw`), `events_quarantine`, `kpi_events_hourly`, `kpi_bookings_hourly`, `kpi_daily`.
"""

from __future__ import annotations

import csv
import datetime as dt
import decimal
import uuid
import io
import json
import logging
import re
import warnings
from dataclasses import dataclass

import duckdb
import pyarrow as pa
import sqlglot
from deltalake import DeltaTable
from sqlglot import exp

from gamestream.settings import TABLES, Settings

ALIASES = {"mobile_events_delta_raw": "events"}
_TOKEN = re.compile(r"<Token token_type: TokenType\.(\w+), text: (.*?), line: .*?>")
logging.getLogger("sqlglot").setLevel(logging.ERROR)  # "falling back to parsing as a Command": we refuse those
# execute() is chosen for its error positions; the copy it warns about is of a query result, small here
warnings.filterwarnings("ignore", message="Arrow output on a DB-API result", category=UserWarning)


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


def _is_event_time(node: exp.Expression) -> bool:
    return isinstance(node, exp.Column) and node.name.lower() == "eventtime"


def _rewrite(node: exp.Expression, today: dt.date) -> exp.Expression:
    if isinstance(node, (exp.TsOrDsToDate, exp.Date, exp.DateStrToDate)) and _is_event_time(node.this):
        return exp.column("eventDate", table=node.this.table or None)
    if isinstance(node, exp.Cast) and node.to.is_type("date") and _is_event_time(node.this):
        return exp.column("eventDate", table=node.this.table or None)
    if isinstance(node, exp.CurrentDate):
        return exp.cast(exp.Literal.string(today.isoformat()), "date")
    return node


def translate(query: str, today: dt.date | None = None) -> Translated:
    """Spark SQL → DuckDB SQL with the rewrites above; raises QueryError for a non-query or a syntax error."""
    today = today or dt.datetime.now(dt.timezone.utc).date()
    try:
        statements = [s for s in sqlglot.parse(query, read="spark") if s is not None]
    except sqlglot.errors.ParseError as error:
        first = error.errors[0] if error.errors else {}
        description = _TOKEN.sub(lambda m: "the end of the query" if m[1] == "SENTINEL" else repr(m[2]),
                                 str(first.get("description", error)))
        raise QueryError(f"syntax error: {description}", query, first.get("line"), first.get("col")) from None
    if len(statements) != 1:
        raise QueryError(f"one statement at a time, please (got {len(statements)})", query)
    (statement,) = statements
    if not isinstance(statement, exp.Query):
        kind = statement.key.upper() if not isinstance(statement, exp.Command) else statement.this.upper()
        raise QueryError(f"{kind} is not allowed here: the SQL interface is read-only (SELECT / WITH queries, "
                         "and the maintenance statements OPTIMIZE and VACUUM).", query, 1, 1)
    rewritten = statement.transform(lambda node: _rewrite(node, today))
    tables = {t.name.lower() for t in rewritten.find_all(exp.Table)}
    return Translated(rewritten.sql(dialect="duckdb"), tables)


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


class SqlEngine:
    """DuckDB over the Delta tables, opened afresh for each query so that it sees their latest versions.

    The seed's maintenance statements are taken too, and run by `gamestream.maintenance` under its lock:
    `OPTIMIZE '<path>' | <table> [WHERE eventDate = | >= '<date>'] [ZORDER BY (col, …)]` and
    `VACUUM '<path>' | <table> [RETAIN n HOURS] [DRY RUN]` (a retention under the table's minimum is refused,
    as the seed's retentionDurationCheck does; `gamestream vacuum --force` overrides it).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def _maintenance_target(self, match: re.Match, query: str) -> str:
        if match["path"]:
            return match["path"]
        name = ALIASES.get(match["table"].lower(), match["table"].lower())
        if name not in TABLES:
            raise QueryError(f"unknown table {match['table']}; tables are {', '.join(TABLES)}", query, 1,
                             match.start("table") + 1)
        return self.settings.table_uri(name)

    def _maintenance(self, query: str) -> pa.Table | None:
        from gamestream import maintenance

        optimize, vacuum = _OPTIMIZE.match(query), _VACUUM.match(query)
        if not optimize and not vacuum:
            return None
        match = optimize or vacuum
        uri = self._maintenance_target(match, query)
        if not DeltaTable.is_deltatable(uri):
            raise QueryError(f"no Delta table at {uri}", query)
        lock = maintenance.MaintenanceLock(self.settings).acquire(wait=True)
        try:
            if optimize:
                partitions = since = None
                if optimize["where"]:
                    where = _WHERE_DATE.match(optimize["where"])
                    if not where:
                        raise QueryError("OPTIMIZE … WHERE takes eventDate = '<date>' or eventDate >= '<date>'",
                                         query, 1, optimize.start("where") + 1)
                    partitions, since = ([where["date"]], None) if where["op"] == "=" else (None, where["date"])
                columns = [c.strip().strip("`") for c in optimize["columns"].split(",")] if optimize["columns"] else None
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

    def _connect(self, tables: set[str]) -> duckdb.DuckDBPyConnection:
        connection = duckdb.connect()
        connection.execute("SET TimeZone = 'UTC'")
        for name in tables:
            target = ALIASES.get(name, name)
            if target not in TABLES:
                continue  # DuckDB will say the table does not exist, with its position
            uri = self.settings.table_uri(target)
            if not DeltaTable.is_deltatable(uri):
                raise QueryError(f"table {name} does not exist yet under {uri}: run `gamestream process` first")
            connection.register(name, DeltaTable(uri).to_pyarrow_dataset())
        return connection

    def run(self, query: str) -> pa.Table:
        maintained = self._maintenance(query)
        if maintained is not None:
            return maintained
        translated = translate(query)
        connection = self._connect(translated.tables)
        try:
            # execute(), not sql(): its errors carry the "LINE 1: … ^" pointer into the query
            return connection.execute(translated.duckdb_sql).to_arrow_reader().read_all()
        except duckdb.Error as error:
            raise QueryError(str(error).strip(), translated.duckdb_sql) from None
        finally:
            connection.close()

    def plan(self, query: str) -> str:
        """DuckDB's EXPLAIN of the translated query (shows which filters reach the table scans)."""
        translated = translate(query)
        connection = self._connect(translated.tables)
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


def to_json(table: pa.Table) -> str:
    return json.dumps([{k: _plain(v) for k, v in row.items()} for row in table.to_pylist()])


def to_csv(table: pa.Table) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(table.column_names)
    for row in table.to_pylist():
        writer.writerow([json.dumps(_plain(v)) if isinstance(v, (dict, list)) else
                         ("" if v is None else _plain(v)) for v in row.values()])
    return buffer.getvalue()

"""Funnels over the events table: of the devices that did step 1, how many then did step 2 within the window, then
step 3, … counted per day of the first step (`gamestream funnel`, `POST /v1/funnel`; docs/kpi.md, "Funnels").

The definition, which `tests/test_funnel.py` checks against a plain-Python reference:

1. A step is an event name, optionally with parameter filters: `NAME[param=value,param2=value2]` (on the command
   line; over HTTP also `{"event": NAME, "where": {"param": "value"}}`). A param is a field of `eventParams` in the
   schema, promoted `[schema.params]` included; it is compared as text (`CAST(eventParams.<param> AS VARCHAR) =
   value`, so `scoreAdjustment=250`, `amount=4.99`, `platform=ios`). 2 to 10 steps.
2. `within` (`30m`, `1h`, `1d`, `7d`; default 1d, at most 90d) bounds the whole funnel, from the step-1 event.
3. For each device, every step-1 event whose eventDate is in [from, to] starts an attempt at its time t1. Step k+1
   is matched to the device's earliest event matching it strictly after step k's matched time (a later
   eventTime: an event at the same instant as step k's does not follow it) and at or before t1 + within. Other
   events may come in between. An attempt's depth is the number of steps it matched.
4. A device counts once per day of its step-1 event (the eventDate of t1, UTC), at the greatest depth of that
   day's attempts. A row per day (days with no step-1 event have none): `step_k` = devices that reached at least
   step k; `step_k_rate` = step_k / step_(k-1) (k ≥ 2); `conversion` = step_n / step_1 (null when a denominator
   is 0).
5. `by` (platform, app_version, country — the `geo_country` column —, or a promoted parameter) splits the rows
   by the value of the device's step-1 event (as text; null when absent). A device whose step-1 events of a day
   carry different values counts under each value, at the greatest depth of that value's attempts.
6. After the days, a `total` row (one per value with `by`) sums the daily counts: a device of two days counts
   twice (device-days), and its rates are those of the sums.

How it runs: one DuckDB query over the events table, registered as an Arrow dataset by the SQL engine's own
sandboxed connection (`query.SqlEngine`), reading only the days [from, to + ceil(within)] (eventDate is the
partition column: the other days' files are skipped) and only rows of the steps' event names. Each further step
is one `ASOF LEFT JOIN … ON device = device AND t_k < t`, which picks the earliest later event of the device.
Names given by the user (params, the dimension) are checked against the table's schema and quoted; every value
is bound as a parameter, never written into the SQL. The query is stopped after `sql_timeout_s` and refused
beyond `sql_max_rows` result rows, as SQL queries are.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from gamestream import schema
from gamestream.settings import Settings
from gamestream.tables import lake

MIN_STEPS, MAX_STEPS = 2, 10
DEFAULT_WITHIN = "1d"
DEFAULT_DAYS = 7
"""Without --from/--to: the last seven UTC days, today included."""
MAX_WITHIN = dt.timedelta(days=90)
# A longer window would make every funnel read a quarter of the table beyond its days; a funnel longer than that
# is a retention question (kpi_retention).
DIMENSIONS = ("platform", "app_version", "country")
"""Dimensions besides the promoted parameters. `country` is the `geo_country` column (`ingest.geo`)."""
PARAMS_DIMENSIONS = ("platform", "app_version")
"""The built-in params that are dimensions (country, once it exists, may be a param or a column)."""
_COUNTRY_COLUMNS = (("eventParams", "country"), (None, "geo_country"), (None, "country"))
TOTAL = "total"
_STEP = re.compile(r"(?P<event>[^\[\]]+)(?:\[(?P<where>[^\[\]]*)\])?")
# The durations taken, all of them up to MAX_WITHIN: 1–99999 seconds or minutes, 1–999 hours, 1–90 days. The
# OpenAPI document declares this same pattern, so that what it calls valid is exactly what is taken.
DURATION_PATTERN = r"(?:[1-9][0-9]{0,4}[sm]|[1-9][0-9]{0,2}h|(?:[1-9]|[1-8][0-9]|90)d)"
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
DEVICE = "device_id"


class FunnelError(ValueError):
    """A funnel that cannot run, with a reason its sender can act on (400 over HTTP, exit 2 on the command line)."""


@dataclass(frozen=True)
class Step:
    """One step: an event name, and parameter filters compared as text."""

    event: str
    where: tuple[tuple[str, str], ...] = ()

    def label(self) -> str:
        """The step as the command line writes it: `levelEnd[level=3]`."""
        if not self.where:
            return self.event
        return f"{self.event}[{','.join(f'{param}={value}' for param, value in self.where)}]"


def parse_step(text: str) -> Step:
    """`NAME` or `NAME[param=value,param2=value2]`, taken exactly as written (no spaces trimmed): the name holds
    no `[` or `]`, a value no `,`, `[` or `]` (the JSON form `{"event": …, "where": {…}}` takes any)."""
    match = _STEP.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise FunnelError(f"step {text!r}: write NAME or NAME[param=value,param2=value2]")
    where = []
    for part in (match["where"].split(",") if match["where"] is not None else ()):
        param, equals, value = part.partition("=")
        if not equals or not param:
            raise FunnelError(f"step {text!r}: a filter is param=value, not {part!r}")
        where.append((param, value))
    return Step(match["event"], tuple(where))


def step_pattern(params: Sequence[str]) -> str:
    """The steps `parse_step` takes whose params are `params`, as a regular expression (for the OpenAPI
    document)."""
    param = "(?:" + "|".join(re.escape(name) for name in params) + ")"
    return rf"^[^\[\]]+(?:\[{param}=[^,\[\]]*(?:,{param}=[^,\[\]]*)*\])?$"


def step_from_json(given: object) -> Step:
    """A step of a JSON request: the command line's string, or `{"event": NAME, "where": {"param": "value"}}`
    (the name and values taken exactly; values are strings, compared with the param as text)."""
    if isinstance(given, str):
        return parse_step(given)
    usage = 'a step is "NAME[param=value]" or {"event": "NAME", "where": {"param": "value"}}'
    if not isinstance(given, dict) or set(given) - {"event", "where"}:
        raise FunnelError(f"{usage}, not {given!r}")
    event, where = given.get("event"), given.get("where", {})
    if not isinstance(event, str) or not event:
        raise FunnelError(f"{usage}: event is a non-empty string, not {event!r}")
    if not isinstance(where, dict) or not all(isinstance(value, str) for value in where.values()):
        raise FunnelError(f"step {event!r}: where is an object of param: value, the values strings (\"250\")")
    return Step(event, tuple(where.items()))


def parse_within(text: str) -> dt.timedelta:
    """`30m`, `1h`, `1d`, `7d`: a whole number and a unit (s, m, h, d), from 1s up to MAX_WITHIN (90d; at most
    five digits of seconds or minutes, three of hours: DURATION_PATTERN)."""
    if not isinstance(text, str) or not re.fullmatch(DURATION_PATTERN, text):
        raise FunnelError(f"within {text!r}: give a duration such as 30m, 1h, 1d or 7d (a whole number of s, m, h "
                          f"or d, at most 99999s, 99999m, 999h, {MAX_WITHIN.days}d)")
    return dt.timedelta(**{_UNITS[text[-1]]: int(text[:-1])})


def parse_day(text: str, what: str) -> dt.date:
    """A UTC day written YYYY-MM-DD."""
    try:
        if not isinstance(text, str) or not re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", text):
            raise ValueError
        return dt.date.fromisoformat(text)
    except ValueError:
        raise FunnelError(f"{what} {text!r}: give a day as YYYY-MM-DD (UTC)") from None


@dataclass(frozen=True)
class Funnel:
    """A checked funnel request (`Funnel.of` checks it; the schema's names are checked when it runs)."""

    steps: tuple[Step, ...]
    within: dt.timedelta
    first_day: dt.date
    last_day: dt.date
    by: str | None = None

    @classmethod
    def of(cls, steps: Sequence[Step], *, within: str | None = None, first_day: str | None = None,
           last_day: str | None = None, by: str | None = None, today: dt.date | None = None) -> Funnel:
        """The funnel of the options as given: `within` default 1d; without days, the last DEFAULT_DAYS UTC
        days up to `to` (default today); `from` after `to` is an empty range (no rows)."""
        if not MIN_STEPS <= len(steps) <= MAX_STEPS:
            raise FunnelError(f"a funnel has {MIN_STEPS} to {MAX_STEPS} steps, not {len(steps)}")
        today = today or dt.datetime.now(dt.UTC).date()
        last = parse_day(last_day, "to") if last_day is not None else None
        first = parse_day(first_day, "from") if first_day is not None else None
        if last is None:
            last = max(today, first) if first is not None else today
        if first is None:
            first = last - min(dt.timedelta(days=DEFAULT_DAYS - 1), last - dt.date.min)
        if by is not None and (not isinstance(by, str) or not by):
            raise FunnelError("by names a dimension: platform, app_version, country or a promoted parameter")
        return cls(tuple(steps), parse_within(within if within is not None else DEFAULT_WITHIN), first, last, by)

    @property
    def read_until(self) -> dt.date:
        """The last day read: an attempt starting late on `last_day` may end ceil(within) days later."""
        days = math.ceil(self.within / dt.timedelta(days=1))
        return self.last_day + min(dt.timedelta(days=days), dt.date.max - self.last_day)

    def describe(self) -> dict[str, Any]:
        """The request as understood, for the HTTP answer."""
        return {"steps": [step.label() for step in self.steps], "within": _duration_text(self.within),
                "from": self.first_day.isoformat(), "to": self.last_day.isoformat(), "by": self.by}


def _duration_text(within: dt.timedelta) -> str:
    seconds = int(within.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


# ------------------------------------------------------------------------------------------- names → SQL
def param_names(settings: Settings) -> list[str]:
    """The params a step may filter on by the settings: the fields of `eventParams`, the promoted ones included
    (an events table holding params from an earlier configuration takes those too)."""
    return [field.name for field in schema.params_field(settings.schema_params).children]


def dimension_names(settings: Settings) -> list[str]:
    """The dimensions by the settings: platform, app_version, country (`geo_country`) and the promoted params."""
    built_in = {field.name for field in schema.EVENT_PARAMS.children}
    return [*PARAMS_DIMENSIONS, "country",
            *(name for name in param_names(settings) if name not in built_in and name != "country")]


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _params_of(table_schema: pa.Schema, settings: Settings) -> dict[str, bool]:
    """The params a step may filter on: name → whether the table has the column (a configured param the table
    does not hold yet is null in every row)."""
    names: dict[str, bool] = {}
    if schema.EVENT_PARAMS.name in table_schema.names:
        struct = table_schema.field(schema.EVENT_PARAMS.name).type
        names.update({child.name: True for child in struct} if pa.types.is_struct(struct) else {})
    for field in schema.params_field(settings.schema_params).children:
        names.setdefault(field.name, False)
    return names


def _param_sql(param: str, params: dict[str, bool]) -> str:
    if param not in params:
        raise FunnelError(f"unknown param {param!r}; the params of eventParams are {', '.join(params)}")
    if not params[param]:
        return "CAST(NULL AS VARCHAR)"
    return f"CAST({_quote(schema.EVENT_PARAMS.name)}.{_quote(param)} AS VARCHAR)"


def _dimension_sql(by: str, table_schema: pa.Schema, params: dict[str, bool]) -> str:
    """The SQL of dimension `by`, as text, or FunnelError naming the dimensions there are."""
    built_in = {field.name for field in schema.EVENT_PARAMS.children}
    promoted = [name for name in params if name not in built_in and name not in DIMENSIONS]
    if by == "country":
        for struct, column in _COUNTRY_COLUMNS:
            if struct is None and column in table_schema.names:
                return f"CAST({_quote(column)} AS VARCHAR)"
            if struct is not None and column in params:
                return _param_sql(column, params)
        raise FunnelError("dimension country is unknown: the events table has no geo_country column yet (a "
                          "processor adds it when it next starts)")
    if by in PARAMS_DIMENSIONS or by in promoted:
        return _param_sql(by, params)
    raise FunnelError(f"unknown dimension {by!r}; dimensions are {', '.join([*PARAMS_DIMENSIONS, *promoted])}"
                      " and country")


def _step_sql(index: int, step: Step, params: dict[str, bool], values: dict[str, object]) -> str:
    """The condition of step `index` on an events row, its values added to `values` as named parameters."""
    values[f"event_{index}"] = step.event
    conditions = [f"{_quote('eventName')} = $event_{index}"]
    for number, (param, value) in enumerate(step.where):
        values[f"value_{index}_{number}"] = value
        conditions.append(f"{_param_sql(param, params)} = $value_{index}_{number}")
    return "(" + " AND ".join(conditions) + ")"


def funnel_sql(funnel: Funnel, table_schema: pa.Schema, settings: Settings) -> tuple[str, dict[str, object]]:
    """The DuckDB query of `funnel` over the registered table `events` and its parameters.

    `ev` reads the steps' rows of the days [first_day, read_until]; `j1` holds the attempts (step-1 rows of
    [first_day, last_day]) with their deadline t1 + within; `jk` adds step k's time: the earliest later event of
    the device (ASOF), kept when it is at or before the deadline, else null (and so are the steps after it: the
    ASOF join finds nothing after a null time). A device's depth on a day (and value) is its best attempt's.
    """
    params = _params_of(table_schema, settings)
    values: dict[str, object] = {"read_from": funnel.first_day, "read_until": funnel.read_until,
                                 "first_day": funnel.first_day, "last_day": funnel.last_day,
                                 "within_us": funnel.within // dt.timedelta(microseconds=1)}
    steps = [_step_sql(k, step, params, values) for k, step in enumerate(funnel.steps, start=1)]
    names = ", ".join(f"$event_{k}" for k in range(1, len(steps) + 1))
    value = _dimension_sql(funnel.by, table_schema, params) if funnel.by else "CAST(NULL AS VARCHAR)"
    device = f"{_quote(schema.EVENT_PARAMS.name)}.{_quote(DEVICE)}"
    flags = ", ".join(f"{condition} AS s{k}" for k, condition in enumerate(steps, start=1))
    parts = [
        (f"ev AS (SELECT {device} AS device, {_quote('eventTime')} AS t, {_quote('eventDate')} AS day, "
         f"{value} AS value, {flags} FROM events WHERE {_quote('eventDate')} BETWEEN $read_from AND $read_until "
         f"AND {_quote('eventName')} IN ({names}))"),
        ("j1 AS (SELECT device, day, value, t AS t1, t + to_microseconds($within_us) AS deadline FROM ev "
         "WHERE s1 AND day BETWEEN $first_day AND $last_day)"),
    ]
    for k in range(2, len(steps) + 1):
        parts.append(f"s{k}_rows AS (SELECT device, t FROM ev WHERE s{k})")
        parts.append(f"j{k} AS (SELECT j.*, CASE WHEN s.t <= j.deadline THEN s.t END AS t{k} FROM j{k - 1} j "
                     f"ASOF LEFT JOIN s{k}_rows s ON j.device = s.device AND j.t{k - 1} < s.t)")
    depth = " + ".join(["1", *(f"CAST(t{k} IS NOT NULL AS INTEGER)" for k in range(2, len(steps) + 1))])
    parts.append(f"devices AS (SELECT day, value, device, max({depth}) AS depth FROM j{len(steps)} "
                 "GROUP BY day, value, device)")
    counts = ", ".join(f"count(*) FILTER (WHERE depth >= {k}) AS step_{k}" for k in range(1, len(steps) + 1))
    sql = ("WITH " + ",\n".join(parts) + f"\nSELECT day, value, {counts} FROM devices GROUP BY day, value "
           "ORDER BY day, value NULLS LAST")
    return sql, values


# ------------------------------------------------------------------------------------------------- running
def _prepared(settings: Settings, funnel: Funnel):
    """The SQL engine's sandboxed connection with `events` registered, and the funnel's query and values; None
    for the connection when there is no events table yet (the names are checked all the same)."""
    from gamestream.api.query import SqlEngine

    if not lake.table_exists(settings.table_uri("events")):
        return None, *funnel_sql(funnel, schema.arrow_schema(params=settings.schema_params), settings)
    connection = SqlEngine(settings).connect({"events"})
    try:
        table_schema = connection.execute("SELECT * FROM events LIMIT 0").to_arrow_reader().schema
        sql, values = funnel_sql(funnel, table_schema, settings)
    except BaseException:
        connection.close()
        raise
    return connection, sql, values


def run(settings: Settings, funnel: Funnel) -> pa.Table:
    """The funnel's rows (the module's docstring says what they count): `day` (YYYY-MM-DD, then `total`), the
    dimension's column when `by`, `step_1` … `step_n`, `step_2_rate` … `step_n_rate`, `conversion`.
    FunnelError for an unknown param or dimension, a missing events table, or a query over the SQL limits."""
    import duckdb

    connection, sql, values = _prepared(settings, funnel)
    if connection is None:  # no events table yet: no events, no devices
        return _result(funnel, [])
    stopped = threading.Event()

    def stop() -> None:
        stopped.set()
        connection.interrupt()

    timer = threading.Timer(settings.sql_timeout_s, stop)
    timer.daemon = True
    timer.start()
    try:
        rows = connection.execute(sql, values).fetchall()
    except duckdb.Error as error:
        if stopped.is_set():
            raise FunnelError(f"the funnel was stopped after {settings.sql_timeout_s:g} s (sql_timeout_s): "
                              "ask for fewer days") from None
        raise FunnelError(str(error).strip()) from None
    finally:
        timer.cancel()
        connection.close()
    if len(rows) > settings.sql_max_rows:
        raise FunnelError(f"the funnel has more than {settings.sql_max_rows:,} rows (sql_max_rows): ask for fewer "
                          "days, or a dimension with fewer values")
    return _result(funnel, rows)


def plan(settings: Settings, funnel: Funnel) -> str:
    """DuckDB's EXPLAIN of the funnel's query: the scan of `events` shows the eventDate and eventName filters
    it was given (the files of other days are not read)."""
    connection, sql, values = _prepared(settings, funnel)
    if connection is None:
        return "no events table yet: nothing is read"
    try:
        return "\n".join(row[1] for row in connection.execute("EXPLAIN " + sql, values).fetchall())
    finally:
        connection.close()


def _rates(counts: Sequence[int]) -> list[float | None]:
    """step_2_rate … step_n_rate, then conversion."""
    rates = [counts[k] / counts[k - 1] if counts[k - 1] else None for k in range(1, len(counts))]
    return [*rates, counts[-1] / counts[0] if counts[0] else None]


def _result(funnel: Funnel, rows: list[tuple]) -> pa.Table:
    n = len(funnel.steps)
    counted = [*(f"step_{k}" for k in range(1, n + 1)), *(f"step_{k}_rate" for k in range(2, n + 1)), "conversion"]
    # the dimension's column is named after it, unless a promoted param's name is taken by another column
    by = [] if not funnel.by else [f"by_{funnel.by}" if funnel.by in ("day", *counted) else funnel.by]
    columns = ["day", *by, *counted]
    out: list[list] = []
    totals: dict[str | None, list[int]] = {}
    for day, value, *counts in rows:
        out.append([day.isoformat(), *([value] if by else []), *counts, *_rates(counts)])
        summed = totals.setdefault(value, [0] * n)
        totals[value] = [a + b for a, b in zip(summed, counts)]
    order = sorted(totals, key=lambda v: (v is None, v or ""))
    for value in order if rows else ():
        out.append([TOTAL, *([value] if by else []), *totals[value], *_rates(totals[value])])
    types = [pa.string(), *([pa.string()] if by else []), *([pa.int64()] * n), *([pa.float64()] * n)]
    fields = pa.schema([pa.field(name, kind) for name, kind in zip(columns, types)])
    return pa.table({name: [row[i] for row in out] for i, name in enumerate(columns)}, schema=fields)

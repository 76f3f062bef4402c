"""What a rule reads, now: a KPI column, a SQL query's one number, or one of the pipeline's own signals.

A `Reading` is a value (None: no data, with the reason in `note`) and what its condition compares it with — the
same window a week earlier (`baseline`), the same window on previous days or weeks (`history`), or the value at
the previous evaluation (`baseline`, for the growing backlog).

Growths over a trailing duration (a KPI column's `over`, the quarantine rate, commit errors) are differences of
totals the evaluator sampled itself (`Growth`): the KPI tables hold windows of event time, not a history of when
rows arrived, so "purchases in the last 15 minutes" is the table's total now less its total 15 minutes ago. Such a
rule has a value once the evaluator has watched for that long (after a start or a takeover).
"""

from __future__ import annotations

import datetime as dt
import decimal
import time
from collections import deque
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from gamestream.alerts.configuration import ADDITIVE, KPI_WINDOWS, Rule, format_duration
from gamestream.settings import Settings
from gamestream.tables import lake

UTC = dt.timezone.utc
DAY_S = 86_400
WEEK_S = 7 * DAY_S


@dataclass(frozen=True)
class Reading:
    value: float | None
    note: str = ""
    """Why there is no value, or what the value is of ("window 2026-12-05 10:00")."""
    baseline: float | None = None
    history: tuple[float, ...] = ()
    failed: bool = False
    """The read itself failed (a query error, a table that cannot be opened), as opposed to no data yet."""


class Growth:
    """Samples of a total over time (monotonic seconds); `over(span)` is the total now less the total `span`
    ago, from the newest sample at least that old (None until the samples reach back that far)."""

    def __init__(self) -> None:
        self.samples: deque[tuple[float, float]] = deque()

    def add(self, at: float, total: float) -> None:
        self.samples.append((at, total))

    def over(self, span: float, now: float) -> tuple[float, float] | None:
        """(growth, seconds it spans), or None while no sample is `span` old. Samples older than the one used
        are dropped: they will never be needed again."""
        while len(self.samples) >= 2 and self.samples[1][0] <= now - span:
            self.samples.popleft()
        first_at, first = self.samples[0]
        if first_at > now - span or len(self.samples) < 2:
            return None
        last_at, last = self.samples[-1]
        return last - first, last_at - first_at


class Signals:
    """Reads rules' values for one evaluator. `log`: the event log (for the backlog and freshness; None leaves
    them without data). `in_process`: whether this process runs the processor whose commit errors it counts."""

    def __init__(self, settings: Settings, log=None, *, in_process: bool = False) -> None:
        self.settings = settings
        self.log = log
        self.in_process = in_process
        self.tables = lake.TableCache()
        self.growths: dict[str, Growth] = {}
        self.previous: dict[str, float] = {}

    def read(self, rule: Rule, now: float | None = None) -> Reading:
        """The rule's reading at wall-clock `now` (Unix seconds); a failure to read is a Reading with
        `failed=True`, never an exception (one rule must not stop the others)."""
        now = time.time() if now is None else now
        try:
            if rule.source == "kpi":
                return self._kpi(rule, now)
            if rule.source == "sql":
                return self._sql(rule)
            return getattr(self, f"_{rule.signal}")(rule, now)
        except Exception as error:
            return Reading(None, f"cannot read: {type(error).__name__}: {_first_line(error)}", failed=True)

    def forget(self) -> None:
        """Drops every sample (a takeover starts watching afresh)."""
        self.growths.clear()
        self.previous.clear()

    def _growth(self, rule: Rule, total: float, span: float) -> tuple[float, float] | None:
        growth = self.growths.setdefault(rule.name, Growth())
        now = time.monotonic()
        growth.add(now, total)
        return growth.over(span, now)

    # ------------------------------------------------------------------------------------------------- KPIs
    def _kpi(self, rule: Rule, now: float) -> Reading:
        assert rule.table and rule.column
        name = "kpi_daily_segments" if rule.segment else rule.table
        table = self.tables.latest(self.settings.table_uri(name))
        if table is None:
            return Reading(None, f"{name} does not exist yet")
        key = KPI_WINDOWS[rule.table]
        if rule.column not in lake.arrow_schema_of(table).names:
            return Reading(None, f"{name} has no column {rule.column} yet")
        if rule.segment:  # the value's rows (a day it was not among the day's top values has none: 0 of a count)
            # (filtered after the read: MERGE-written files declare string_view columns a scan filter cannot take)
            dimension, value = rule.segment
            rows = table.to_pyarrow_table(columns=[key, rule.column, "dimension", "value"])
            rows = rows.filter(pc.and_(pc.equal(pc.cast(rows["dimension"], pa.string()), dimension),
                                       pc.equal(pc.cast(rows["value"], pa.string()), value)))
        else:
            rows = table.to_pyarrow_table(columns=[key, rule.column])
        if rule.over_s:
            total = pc.sum(rows[rule.column]).as_py() or 0
            grown = self._growth(rule, float(total), rule.over_s)
            if grown is None:
                return Reading(None, f"watching: a value once {format_duration(rule.over_s)} of samples are in")
            return Reading(grown[0], f"measured over {grown[1]:.1f}s")
        return self._windows(rule, rows, key, now)

    def _windows(self, rule: Rule, rows: pa.Table, key: str, now: float) -> Reading:
        size = DAY_S if key == "eventDate" else self.settings.window_minutes * 60
        season = WEEK_S if key == "eventDate" else DAY_S  # same hour of previous days; same weekday of weeks
        starts = rows[key].to_pylist()
        values = dict(zip((_epoch(s) for s in starts), rows[rule.column].to_pylist()))
        earliest = min(values, default=None)
        additive = rule.column in ADDITIVE

        def at(start: int) -> float | None:
            if start in values:
                value = values[start]
                return None if value is None else float(value)
            # no row: nothing happened in that window (0 of a count), once the table has rows from before it
            return 0.0 if additive and earliest is not None and start >= earliest else None

        current = int(now // size * size)
        start = current if rule.window == "current" else current - size
        label = f"window {_label(start, key)}"
        value = at(start)
        condition = rule.condition
        if condition.kind == "change":
            return Reading(value, label, baseline=at(start - WEEK_S))
        if condition.kind == "band":
            past = [at(start - k * season) for k in range(1, condition.samples + 1)]
            return Reading(value, label, history=tuple(v for v in past if v is not None))
        if value is None:
            return Reading(None, f"no value for {label}")
        return Reading(value, label)

    # -------------------------------------------------------------------------------------------------- SQL
    def _sql(self, rule: Rule) -> Reading:
        from gamestream.api.query import QueryError, SqlEngine

        try:
            result = SqlEngine(self.settings).run(rule.sql or "")
        except QueryError as error:
            return Reading(None, f"query failed: {_first_line(error)}", failed=True)
        if result.num_columns != 1 or result.num_rows > 1:
            return Reading(None, f"the query returned {result.num_rows} rows × {result.num_columns} columns; a "
                                 "rule's query must return one number", failed=True)
        if result.num_rows == 0:
            return Reading(None, "the query returned no row")
        value = result.column(0)[0].as_py()
        if value is None:
            return Reading(None, "the query returned NULL")
        if isinstance(value, bool) or not isinstance(value, (int, float, decimal.Decimal)):
            return Reading(None, f"the query returned {type(value).__name__}, not a number", failed=True)
        return Reading(float(value))

    # --------------------------------------------------------------------------------------------- pipeline
    def _backlog(self) -> int | None:
        return None if self.log is None else int(self.log.pending_events(self.settings.pipeline))

    def _backlog_growing(self, rule: Rule, now: float) -> Reading:
        backlog = self._backlog()
        if backlog is None:
            return Reading(None, "no event log open here")
        previous = self.previous.get(rule.name)
        self.previous[rule.name] = backlog
        return Reading(float(backlog), "events not yet committed", baseline=previous)

    def _freshness(self, rule: Rule, now: float) -> Reading:
        backlog = self._backlog()
        if backlog is None:
            return Reading(None, "no event log open here")
        if backlog == 0:
            return Reading(0.0, "every event in the log is committed")
        events = self.tables.latest(self.settings.table_uri("events"))
        newest = _newest_event_time(events) if events is not None else None
        if newest is None:
            return Reading(None, f"{backlog:,} events wait; none committed yet")
        return Reading(max(0.0, now - newest), f"{backlog:,} events wait")

    def _quarantine_rate(self, rule: Rule, now: float) -> Reading:
        landed = self._rows("events") + (quarantined := self._rows("events_quarantine"))
        pair = self.growths.setdefault(rule.name + "#quarantined", Growth())
        pair.add(time.monotonic(), float(quarantined))
        grown = self._growth(rule, float(landed), rule.over_s or 300.0)
        bad = pair.over(rule.over_s or 300.0, time.monotonic())
        if grown is None or bad is None:
            return Reading(None, f"watching: a value once {format_duration(rule.over_s or 300)} of samples are in")
        if grown[0] < max(rule.min_events, 1):
            return Reading(None, f"{grown[0]:,.0f} events landed in {grown[1]:.0f}s, under min_events "
                                 f"({rule.min_events:,})")
        return Reading(bad[0] / grown[0], f"{bad[0]:,.0f} of {grown[0]:,.0f} events quarantined in {grown[1]:.0f}s")

    def _commit_errors(self, rule: Rule, now: float) -> Reading:
        if not self.in_process:
            return Reading(None, "counted where the processor runs (the evaluator inside gamestream process)")
        from gamestream import metrics

        total = 0.0
        for family in metrics.commit_retries.collect():
            total += sum(s.value for s in family.samples
                         if s.name.endswith("_total") and s.labels.get("reason") != "conflict")
        grown = self._growth(rule, total, rule.over_s or 300.0)
        if grown is None:
            return Reading(None, f"watching: a value once {format_duration(rule.over_s or 300)} of samples are in")
        return Reading(grown[0], f"failed commit attempts in {grown[1]:.0f}s")

    def _rows(self, name: str) -> int:
        table = self.tables.latest(self.settings.table_uri(name))
        if table is None:
            return 0
        actions = table.get_add_actions(flatten=True)  # an arro3 table: read as Python values
        return sum(n or 0 for n in actions.column("num_records").to_pylist()) if actions.num_rows else 0


def _newest_event_time(events) -> float | None:
    """The newest eventTime committed (Unix seconds), from the files' statistics (no data file is read)."""
    actions = events.get_add_actions(flatten=True)
    if not actions.num_rows or "max.eventTime" not in actions.column_names:
        return None
    values = [v for v in actions.column("max.eventTime").to_pylist() if v is not None]
    if not values:
        return None
    newest = max(values)
    if newest.tzinfo is None:
        newest = newest.replace(tzinfo=UTC)
    return newest.timestamp()


def _epoch(value: object) -> int:
    if isinstance(value, dt.datetime):
        return int((value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp())
    if isinstance(value, dt.date):
        return int(dt.datetime(value.year, value.month, value.day, tzinfo=UTC).timestamp())
    raise TypeError(f"not a window start: {value!r}")


def _label(start: int, key: str) -> str:
    moment = dt.datetime.fromtimestamp(start, UTC)
    return moment.date().isoformat() if key == "eventDate" else moment.strftime("%Y-%m-%d %H:%M")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


"""The alert rules of gamestream.toml, parsed and checked when a command starts.

    [alerting]                       # defaults for every rule, the receivers, the built-in rules
    webhook = "https://hooks.slack.com/services/…"   # or webhook_env = "SLACK_WEBHOOK_URL"
    format = "slack"                 # slack ({"text": …}) or json (rule, state, value, condition, times)
    interval = "30s"                 # how often each rule is evaluated (a rule may set its own)

    [[alerts]]
    name = "purchases stopped"
    kpi = "kpi_bookings_hourly.purchases"
    over = "15m"                     # the column's growth over the last 15 minutes
    below = 1
    for = "5m"                       # the condition must hold this long before the rule fires

Every mistake is an `AlertConfigError` naming the file, the rule and the key, raised before anything runs.
docs/alerts.md documents every key with its default.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

from gamestream.errors import TerminalError

if TYPE_CHECKING:
    from gamestream.settings import Settings


class AlertConfigError(TerminalError, ValueError):
    """The alerting configuration cannot be used as written; the message names the file, the rule and the key."""


# ------------------------------------------------------------------------------------------------- durations
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0, None: 1.0}


def parse_duration(value: object, what: str) -> float:
    """Seconds from "500ms", "30s", "5m", "1h", "1d", "1w" or a number of seconds; `ValueError` otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a duration such as \"30s\", \"5m\" or \"1h\", not {value!r}")
    if isinstance(value, (int, float)) and math.isfinite(value) and value >= 0:
        return float(value)
    match = _DURATION.match(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"{what} must be a duration such as \"30s\", \"5m\" or \"1h\", not {value!r}")
    return float(match[1]) * _UNIT_S[match[2]]


def format_duration(seconds: float) -> str:
    """The shortest exact spelling: 90 → "90s", 300 → "5m", 3600 → "1h", 0.5 → "500ms"."""
    if seconds == 0:
        return "0s"
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"


# -------------------------------------------------------------------------------------------------- webhooks
FORMATS = ("slack", "json")


@dataclass(frozen=True)
class Webhook:
    """Where a rule's notifications go. The URL usually carries a token (Slack's does, in its path): it is
    never logged, printed or put in an error whole — `redacted` is what may be shown."""

    url: str = field(repr=False)
    format: Literal["slack", "json"] = "slack"

    @property
    def redacted(self) -> str:
        return redact_url(self.url)

    def __repr__(self) -> str:  # a rule printed in a traceback must not leak the token either
        return f"Webhook({self.redacted!r}, format={self.format!r})"


def redact_url(url: str) -> str:
    """`https://hooks.slack.com/services/T0/B0/XXXX?x=1` → `https://hooks.slack.com/…`: scheme and host only
    (user info, path and query may hold a token)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<webhook>"
    return f"{parts.scheme or '?'}://{host}{port}/…"


# ------------------------------------------------------------------------------------------------- conditions
ConditionKind = Literal["threshold", "change", "band", "growing"]


@dataclass(frozen=True)
class Condition:
    """When a rule's value is a breach.

    - `threshold`: above `above` and/or below `below` (both given: outside [below, above]);
    - `change`: against the same window a week earlier, down by more than `drop_pct` % and/or up by more than
      `rise_pct` %;
    - `band`: outside the band of the same window on the `samples` previous days (hourly tables) or weeks (daily
      tables): mean ± `sigmas`·stddev, or their min..max with `band = "minmax"`;
    - `growing` (the backlog rule): the value grew since the previous evaluation and is at least `above`.
    """

    kind: ConditionKind
    above: float | None = None
    below: float | None = None
    drop_pct: float | None = None
    rise_pct: float | None = None
    samples: int = 0
    band: Literal["stddev", "minmax"] = "stddev"
    sigmas: float = 3.0

    def describe(self) -> str:
        if self.kind == "threshold":
            parts = [f"above {self.above:g}" if self.above is not None else "",
                     f"below {self.below:g}" if self.below is not None else ""]
            return " or ".join(p for p in parts if p)
        if self.kind == "change":
            parts = [f"down more than {self.drop_pct:g}%" if self.drop_pct is not None else "",
                     f"up more than {self.rise_pct:g}%" if self.rise_pct is not None else ""]
            return " or ".join(p for p in parts if p) + " vs a week earlier"
        if self.kind == "band":
            band = "min..max" if self.band == "minmax" else f"mean ± {self.sigmas:g}σ"
            return f"outside {band} of the last {self.samples} same-window values"
        return f"growing, at least {self.above:g}"

    @property
    def threshold(self) -> float | None:
        """The one number a notification names as the threshold (None for bands and changes)."""
        if self.kind in ("threshold", "growing"):
            return self.above if self.above is not None else self.below
        return None


# ------------------------------------------------------------------------------------------------------ rules
Source = Literal["kpi", "sql", "pipeline"]
Severity = Literal["critical", "warning", "info"]
SEVERITIES = ("critical", "warning", "info")


@dataclass(frozen=True)
class Rule:
    """One alert rule, checked. `source` says what it reads: `kpi` (`table`.`column`, one `window` or the growth
    `over` a trailing duration), `sql` (a query returning one number) or `pipeline` (a built-in `signal`)."""

    name: str
    source: Source
    condition: Condition
    interval_s: float
    for_s: float = 0.0
    table: str | None = None
    column: str | None = None
    window: Literal["current", "last"] = "last"
    over_s: float | None = None
    sql: str | None = None
    signal: str | None = None
    min_events: int = 0
    webhook: Webhook | None = None
    severity: Severity = "warning"
    summary: str = ""
    segment: tuple[str, str] | None = None  # (dimension, value): the rule reads kpi_daily_segments' row of it

    @property
    def reads(self) -> str:
        """What the rule reads, in words, for listings and messages."""
        if self.source == "kpi":
            span = f"growth over {format_duration(self.over_s)}" if self.over_s else f"{self.window} window"
            where = f" where {self.segment[0]} = {self.segment[1]}" if self.segment else ""
            return f"{self.table}.{self.column}{where} ({span})"
        if self.source == "sql":
            one_line = " ".join((self.sql or "").split())
            return f"sql: {one_line[:80]}{'…' if len(one_line) > 80 else ''}"
        return f"pipeline: {PIPELINE_SIGNALS[self.signal or '']}"


@dataclass(frozen=True)
class AlertingConfig:
    """Every rule (the built-in pipeline rules first, then `[[alerts]]` in file order) and the delivery
    settings. `enabled=False` (`[alerting] enabled = false`) keeps the rules listed but never evaluated."""

    rules: tuple[Rule, ...]
    path: Path
    enabled: bool = True
    retry_for_s: float = 3600.0
    """A notification that cannot be delivered is retried for this long, then dropped with an error logged."""
    retry_max_wait_s: float = 60.0
    """The backoff between delivery attempts grows up to this."""
    queue_size: int = 1000
    """Notifications waiting per webhook; beyond it the oldest is dropped (with an error logged)."""
    timeout_s: float = 10.0
    """One delivery attempt's HTTP timeout."""

    @property
    def webhooks(self) -> list[Webhook]:
        found: dict[tuple[str, str], Webhook] = {}
        for rule in self.rules:
            if rule.webhook is not None:
                found.setdefault((rule.webhook.url, rule.webhook.format), rule.webhook)
        return list(found.values())

    def rule(self, name: str) -> Rule:
        return next(rule for rule in self.rules if rule.name == name)


# ------------------------------------------------------------------------------------------------ KPI columns
# The KPI tables a rule may read, by how their windows are keyed; retention and top events are read with `sql`.
KPI_WINDOWS = {"kpi_events_hourly": "window_start", "kpi_bookings_hourly": "window_start", "kpi_daily": "eventDate"}
# Columns that are sums over events or devices of a window: a window with no row holds 0 of them, and their growth
# over a trailing duration (`over`) means something. The others are ratios or distinct counts over several days.
ADDITIVE = frozenset({"events", "bookings", "purchases", "late_events", "dau", "paying_users", "new_users",
                      "first_purchase_users", "sessions"})


def _kpi_columns(table: str) -> list[str]:
    from gamestream.kpi import tables as kt

    schema = kt.TABLES[table][0]
    return [f.name for f in schema if f.name not in ("window_start", "window_end", "eventDate", "final")]


# ------------------------------------------------------------------------------------------- built-in rules
PIPELINE_SIGNALS = {
    "backlog_growing": "events in the log not yet committed, growing at every evaluation",
    "freshness": "seconds since the newest committed eventTime, while events wait in the log",
    "quarantine_rate": "share of the events landing in the quarantine table",
    "commit_errors": "failed Delta commit attempts (disk full, store unreachable) in this process",
}
# name → (condition, for, over, min_events): values a studio can start with, each explained in docs/alerts.md
PIPELINE_DEFAULTS: dict[str, dict[str, object]] = {
    "backlog_growing": {"above": 10_000, "for": "5m"},
    "freshness": {"above": 300, "for": "1m"},
    "quarantine_rate": {"above": 0.05, "over": "5m", "min_events": 100, "for": "5m"},
    "commit_errors": {"above": 0, "over": "5m", "for": "0s"},
}
PIPELINE_PREFIX = "pipeline."

# ---------------------------------------------------------------------------------------------------- parsing
_ALERTING_KEYS = {"enabled", "webhook", "webhook_env", "format", "interval", "for", "severity", "retry_for",
                  "retry_max_wait", "queue_size", "timeout", "pipeline"}
_RULE_KEYS = {"name", "kpi", "sql", "segment", "window", "over", "above", "below", "drop_pct", "rise_pct",
              "outside_band", "band", "sigmas", "interval", "for", "webhook", "webhook_env", "format",
              "severity", "summary", "enabled"}
_PIPELINE_RULE_KEYS = {"above", "for", "over", "min_events", "interval", "webhook", "webhook_env", "format",
                       "severity", "enabled"}
DEFAULT_INTERVAL = "1m"


def declares_alerting(document: dict) -> bool:
    """Whether a configuration file asks for alerting at all (an `[alerting]` table or an `[[alerts]]` rule)."""
    return "alerting" in document or "alerts" in document


def load_alerting(settings: "Settings") -> AlertingConfig | None:
    """The alerting configuration of the settings' configuration file (`--config`, GAMESTREAM_CONFIG, else
    `<data_dir>/gamestream.toml` when it exists); None when there is no file or it declares no alerting.
    `AlertConfigError` for a mistake, before anything runs."""
    from gamestream.settings import CONFIG_FILE, load_config

    path = settings.config or settings.data_dir / CONFIG_FILE
    if settings.config is None and not Path(path).is_file():
        return None
    try:
        document = load_config(Path(path))
    except ValueError as error:
        raise AlertConfigError(str(error)) from None
    if not declares_alerting(document):
        return None
    return parse_alerting(document, Path(path))


def parse_alerting(document: dict, path: Path) -> AlertingConfig:
    """The checked rules of a parsed configuration file (`settings.load_config`)."""
    where = f"configuration file {path}"
    defaults = document.get("alerting", {})
    if not isinstance(defaults, dict):
        raise AlertConfigError(f"{where}: [alerting] must be a table")
    _unknown(defaults, _ALERTING_KEYS, f"{where}: [alerting]")
    ctx = _Context(where=f"{where}: [alerting]")
    enabled = ctx.boolean(defaults, "enabled", True)
    interval = ctx.duration(defaults, "interval", DEFAULT_INTERVAL, positive=True)
    for_s = ctx.duration(defaults, "for", "0s")
    severity = ctx.severity(defaults, "warning")
    webhook = ctx.webhook(defaults, None)
    config = AlertingConfig(
        rules=(), path=path, enabled=enabled,
        retry_for_s=ctx.duration(defaults, "retry_for", "1h", positive=True),
        retry_max_wait_s=ctx.duration(defaults, "retry_max_wait", "60s", positive=True),
        queue_size=ctx.integer(defaults, "queue_size", 1000, minimum=1),
        timeout_s=ctx.duration(defaults, "timeout", "10s", positive=True))
    base = _Base(interval=interval, for_s=for_s, severity=severity, webhook=webhook)
    rules = [*_pipeline_rules(defaults.get("pipeline", {}), base, where),
             *_user_rules(document.get("alerts", []), base, where)]
    names = [rule.name for rule in rules]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise AlertConfigError(f"{where}: [[alerts]] names must be unique; repeated: {', '.join(repeated)}")
    return replace(config, rules=tuple(rules))


@dataclass(frozen=True)
class _Base:
    interval: float
    for_s: float
    severity: Severity
    webhook: Webhook | None


@dataclass(frozen=True)
class _Context:
    """Reads one table of the file, each mistake an `AlertConfigError` prefixed with `where`."""

    where: str

    def fail(self, message: str) -> AlertConfigError:
        return AlertConfigError(f"{self.where}: {message}")

    def duration(self, table: dict, key: str, default: object, *, positive: bool = False) -> float:
        try:
            seconds = parse_duration(table.get(key, default), key)
        except ValueError as error:
            raise self.fail(str(error)) from None
        if positive and seconds <= 0:
            raise self.fail(f"{key} must be more than 0")
        return seconds

    def number(self, table: dict, key: str) -> float | None:
        value = table.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(f"{key} must be a number, not {value!r}")
        return float(value)

    def integer(self, table: dict, key: str, default: int, *, minimum: int = 0) -> int:
        value = table.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(f"{key} must be a whole number of at least {minimum}, not {value!r}")
        return value

    def boolean(self, table: dict, key: str, default: bool) -> bool:
        value = table.get(key, default)
        if not isinstance(value, bool):
            raise self.fail(f"{key} must be true or false, not {value!r}")
        return value

    def text(self, table: dict, key: str, default: str | None = None) -> str | None:
        value = table.get(key, default)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise self.fail(f"{key} must be a non-empty string")
        return value

    def severity(self, table: dict, default: Severity) -> Severity:
        value = table.get("severity", default)
        if value not in SEVERITIES:
            raise self.fail(f"severity must be one of {', '.join(SEVERITIES)}, not {value!r}")
        return value  # type: ignore[return-value]

    def webhook(self, table: dict, inherited: Webhook | None) -> Webhook | None:
        """`webhook` (a URL) or `webhook_env` (the variable holding it), and `format`; else the inherited one,
        with this table's `format` if it gives one. An error never quotes the URL."""
        url = table.get("webhook")
        variable = table.get("webhook_env")
        if url is not None and variable is not None:
            raise self.fail("give webhook or webhook_env, not both")
        if variable is not None:
            if not isinstance(variable, str) or not variable:
                raise self.fail("webhook_env must name an environment variable")
            url = os.environ.get(variable)
            if not url:
                raise self.fail(f"webhook_env: the environment variable {variable} is not set")
        fmt = table.get("format")
        if fmt is not None and fmt not in FORMATS:
            raise self.fail(f"format must be slack or json, not {fmt!r}")
        if url is None:
            if inherited is None:
                return None
            return Webhook(inherited.url, fmt or inherited.format)
        if url is False:
            return None  # webhook = false: this rule only records its firings in the alerts table
        if not isinstance(url, str):
            raise self.fail("webhook must be an http(s) URL (or false for none)")
        try:
            parts = urlsplit(url)
            valid = parts.scheme in ("http", "https") and bool(parts.hostname)
        except ValueError:
            valid = False
        if not valid:
            raise self.fail(f"webhook must be an http:// or https:// URL (given: {redact_url(url)})")
        return Webhook(url, fmt or (inherited.format if inherited else "slack"))


def _unknown(table: dict, known: set[str], where: str) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise AlertConfigError(f"{where}: unknown key {', '.join(unknown)} (known: {', '.join(sorted(known))})")


def _pipeline_rules(section: object, base: _Base, where: str) -> list[Rule]:
    """The built-in rules, on by default: `[alerting.pipeline] <name> = false` turns one off, a table changes
    its settings (`above`, `for`, `over`, `min_events`, `interval`, the webhook)."""
    if not isinstance(section, dict):
        raise AlertConfigError(f"{where}: [alerting.pipeline] must be a table")
    _unknown(section, set(PIPELINE_SIGNALS), f"{where}: [alerting.pipeline]")
    rules = []
    for signal, defaults in PIPELINE_DEFAULTS.items():
        given = section.get(signal, {})
        if given is False:
            continue
        if given is True:
            given = {}
        ctx = _Context(where=f"{where}: [alerting.pipeline.{signal}]")
        if not isinstance(given, dict):
            raise ctx.fail("must be a table of settings, or false to turn the rule off")
        _unknown(given, _PIPELINE_RULE_KEYS, ctx.where)
        if not ctx.boolean(given, "enabled", True):
            continue
        merged = {**defaults, **given}
        above = ctx.number(merged, "above")
        over = ctx.duration(merged, "over", "0s") if "over" in merged else None
        if "over" in given and signal not in ("quarantine_rate", "commit_errors"):
            raise ctx.fail("over applies to quarantine_rate and commit_errors only")
        if "min_events" in given and signal != "quarantine_rate":
            raise ctx.fail("min_events applies to quarantine_rate only")
        if signal == "quarantine_rate" and not 0 <= (above or 0) < 1:
            raise ctx.fail("above is a share of events between 0 and 1 (0.05 = 5 %)")
        kind: ConditionKind = "growing" if signal == "backlog_growing" else "threshold"
        rules.append(Rule(
            name=PIPELINE_PREFIX + signal, source="pipeline", signal=signal,
            condition=Condition(kind, above=above),
            interval_s=ctx.duration(given, "interval", base.interval, positive=True),
            for_s=ctx.duration(merged, "for", base.for_s),
            over_s=over if over else None,
            min_events=ctx.integer(merged, "min_events", 0),
            webhook=ctx.webhook(given, base.webhook),
            severity=ctx.severity(given, base.severity),
        ))
    return rules


def _user_rules(entries: object, base: _Base, where: str) -> list[Rule]:
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise AlertConfigError(f"{where}: alerts must be written as [[alerts]] tables")
    rules = []
    for number, entry in enumerate(entries, start=1):
        name = entry.get("name")
        label = f"[[alerts]] #{number}" + (f" ({name!r})" if isinstance(name, str) and name else "")
        ctx = _Context(where=f"{where}: {label}")
        _unknown(entry, _RULE_KEYS, ctx.where)
        if not isinstance(name, str) or not name.strip():
            raise ctx.fail("every rule needs a name")
        if name.startswith(PIPELINE_PREFIX):
            raise ctx.fail(f"names starting with {PIPELINE_PREFIX!r} are the built-in rules' "
                           "(set those under [alerting.pipeline])")
        if not ctx.boolean(entry, "enabled", True):
            continue
        rules.append(_user_rule(entry, name.strip(), base, ctx))
    return rules


def _user_rule(entry: dict, name: str, base: _Base, ctx: _Context) -> Rule:
    kpi, sql = entry.get("kpi"), entry.get("sql")
    if (kpi is None) == (sql is None):
        raise ctx.fail("give what the rule reads: kpi = \"<table>.<column>\" or sql = \"SELECT …\" (one of them)")
    condition = _condition(entry, ctx)
    common = {"name": name, "condition": condition,
              "interval_s": ctx.duration(entry, "interval", base.interval, positive=True),
              "for_s": ctx.duration(entry, "for", base.for_s),
              "webhook": ctx.webhook(entry, base.webhook), "severity": ctx.severity(entry, base.severity),
              "summary": ctx.text(entry, "summary") or ""}
    if sql is not None:
        return Rule(source="sql", sql=_checked_sql(sql, condition, entry, ctx), **common)
    table, column = _kpi_target(kpi, ctx)
    segment = _segment(entry, table, column, ctx) if "segment" in entry else None
    window = entry.get("window", "last")
    if window not in ("current", "last"):
        raise ctx.fail(f"window must be \"current\" (the window under way) or \"last\" (the last complete one), "
                       f"not {window!r}")
    over = ctx.duration(entry, "over", 0, positive=True) if "over" in entry else None
    if over is not None:
        if "window" in entry:
            raise ctx.fail("give window or over, not both")
        if column not in ADDITIVE:
            raise ctx.fail(f"over needs a column that adds up over time ({', '.join(sorted(ADDITIVE))}); "
                           f"{column} is a ratio or a distinct count")
        if condition.kind != "threshold":
            raise ctx.fail("over takes above/below; changes and bands compare whole windows (use window)")
    elif condition.kind in ("change", "band") and window == "current":
        raise ctx.fail("changes and bands compare whole windows: use window = \"last\" (the default)")
    return Rule(source="kpi", table=table, column=column, window=window, over_s=over, segment=segment, **common)


_DIMENSION = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


def _segment(entry: dict, table: str, column: str, ctx: _Context) -> tuple[str, str]:
    """A rule's `segment = "<dimension>=<value>"`: it reads that value's row of kpi_daily_segments."""
    from gamestream.kpi import tables as kt

    raw = entry["segment"]
    dimension, _, value = raw.partition("=") if isinstance(raw, str) else ("", "", "")
    dimension, value = dimension.strip(), value.strip()
    if not _DIMENSION.match(dimension) or not value:
        raise ctx.fail(f"segment must be \"<dimension>=<value>\", e.g. \"platform=android\" or \"country=BR\", "
                       f"not {raw!r}")
    if table != "kpi_daily":
        raise ctx.fail("segment applies to kpi_daily's columns (the breakdowns are per day: kpi_daily_segments)")
    columns = [f.name for f in kt.DAILY_SEGMENTS if f.name not in ("eventDate", "dimension", "value")]
    if column not in columns:
        raise ctx.fail(f"segment: kpi_daily_segments has no column {column!r}; its columns are {', '.join(columns)}")
    return dimension, value


def _kpi_target(kpi: object, ctx: _Context) -> tuple[str, str]:
    if not isinstance(kpi, str) or kpi.count(".") != 1:
        raise ctx.fail(f"kpi must be \"<table>.<column>\", e.g. \"kpi_bookings_hourly.purchases\", not {kpi!r}")
    table, column = kpi.split(".")
    if table not in KPI_WINDOWS:
        raise ctx.fail(f"kpi: unknown table {table!r}; a rule reads {', '.join(KPI_WINDOWS)} (other tables "
                       "through sql)")
    columns = _kpi_columns(table)
    if column not in columns:
        raise ctx.fail(f"kpi: {table} has no column {column!r}; its columns are {', '.join(columns)}")
    return table, column


def _condition(entry: dict, ctx: _Context) -> Condition:
    above, below = ctx.number(entry, "above"), ctx.number(entry, "below")
    drop, rise = ctx.number(entry, "drop_pct"), ctx.number(entry, "rise_pct")
    band_given = "outside_band" in entry
    families = [name for name, given in (("above/below", above is not None or below is not None),
                                         ("drop_pct/rise_pct", drop is not None or rise is not None),
                                         ("outside_band", band_given)) if given]
    if len(families) != 1:
        raise ctx.fail("give one condition: above and/or below (a threshold), drop_pct and/or rise_pct (a change "
                       "against the same window a week earlier) or outside_band = N (the band of the last N "
                       f"same-window values){'; given: ' + ', '.join(families) if families else ''}")
    for key in ("band", "sigmas"):
        if key in entry and not band_given:
            raise ctx.fail(f"{key} applies to outside_band only")
    if above is not None and below is not None and below > above:
        raise ctx.fail(f"below ({below:g}) is over above ({above:g}): the rule would always fire")
    if families[0] == "above/below":
        return Condition("threshold", above=above, below=below)
    if families[0] == "drop_pct/rise_pct":
        for key, value in (("drop_pct", drop), ("rise_pct", rise)):
            if value is not None and value <= 0:
                raise ctx.fail(f"{key} is a percentage over 0 (drop_pct = 30: more than 30 % down)")
        return Condition("change", drop_pct=drop, rise_pct=rise)
    samples = entry["outside_band"]
    if isinstance(samples, bool) or not isinstance(samples, int) or not 2 <= samples <= 60:
        raise ctx.fail(f"outside_band is how many past same-window values make the band, 2 to 60, "
                       f"not {samples!r}")
    band = entry.get("band", "stddev")
    if band not in ("stddev", "minmax"):
        raise ctx.fail(f"band must be \"stddev\" (mean ± sigmas·stddev) or \"minmax\", not {band!r}")
    sigmas = ctx.number(entry, "sigmas")
    if sigmas is not None and sigmas <= 0:
        raise ctx.fail("sigmas must be more than 0")
    return Condition("band", samples=samples, band=band, sigmas=3.0 if sigmas is None else sigmas)


def _checked_sql(sql: object, condition: Condition, entry: dict, ctx: _Context) -> str:
    """The query, checked by the SQL sandbox now (a typo or a write is an error at start, not at 3 a.m.)."""
    from gamestream.api.query import QueryError, translate

    if not isinstance(sql, str) or not sql.strip() or sql.split()[0].upper() in ("OPTIMIZE", "VACUUM"):
        raise ctx.fail("sql must be a query (SELECT or WITH) returning one number")
    if condition.kind != "threshold":
        raise ctx.fail("a sql rule takes above/below; compute a change or a band inside the query")
    for key in ("window", "over"):
        if key in entry:
            raise ctx.fail(f"{key} applies to kpi rules; a sql rule says its time range in the query")
    try:
        translate(sql)
    except QueryError as error:
        raise ctx.fail(f"sql: {error}") from None
    return sql

"""`gamestream alerts`: the alert rules with their state and their value now; `alerts run`, the evaluator on its
own (when no `gamestream process` runs it); `alerts history`, the firings and resolves recorded."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from gamestream.cli.app import cli
from gamestream.cli.common import (
    check_storage,
    command_settings,
    console,
    data_dir_option,
    log_option,
    open_log,
    out,
    tables_option,
    with_options,
)
from gamestream.settings import Settings
from gamestream.shutdown import stop_on_signals

format_option = click.option("--format", "output", type=click.Choice(["table", "json"]), default="table",
                             show_default=True)
_COMMON = [data_dir_option, log_option, tables_option]


def _configuration(settings: Settings):
    from gamestream.alerts import load_alerting
    from gamestream.settings import CONFIG_FILE

    config = load_alerting(settings)
    if config is None:
        path = settings.config or settings.data_dir / CONFIG_FILE
        console.print(f"no alerting configured: add an [alerting] table or [[alerts]] rules to {path} "
                      "(docs/alerts.md)", highlight=False, markup=False)
    return config


@cli.group(invoke_without_command=True)
@with_options(_COMMON)
@format_option
@click.pass_context
def alerts(context: click.Context, data_dir: Path | None, log_url: str | None, tables_uri: str | None,
           output: str) -> None:
    """Lists the alert rules (the built-in pipeline rules and [[alerts]] of gamestream.toml) with their state —
    firing since when, or ok — the last firing or resolve recorded, and the value each reads now."""
    if context.invoked_subcommand is not None:
        return
    settings = command_settings(data_dir=data_dir, log=log_url, tables_uri=tables_uri)
    config = _configuration(settings)
    if config is None:
        if output == "json":
            out.out("[]")
        return
    rows = _rule_rows(settings, config)
    if output == "json":
        out.out(json.dumps(rows, default=_json_value))
        return
    _print_rules(rows, enabled=config.enabled)


def _rule_rows(settings: Settings, config) -> list[dict]:
    """Per rule: what it reads and checks, where it notifies, its recorded state, and its reading now."""
    from gamestream.alerts import table as alerts_table
    from gamestream.alerts.configuration import format_duration
    from gamestream.alerts.signals import Signals
    from gamestream.alerts.state import breached, describe_reading

    latest = alerts_table.latest(settings)
    log = _log_if_there(settings)
    try:
        signals = Signals(settings, log, in_process=False)
        rows = []
        for rule in config.rules:
            reading = signals.read(rule)
            recorded = latest.get(rule.name)
            firing = recorded is not None and recorded["state"] == "firing"
            rows.append({
                "name": rule.name, "source": rule.source, "reads": rule.reads,
                "condition": rule.condition.describe(), "interval": format_duration(rule.interval_s),
                "for": format_duration(rule.for_s), "severity": rule.severity,
                "webhook": rule.webhook.redacted if rule.webhook else None,
                "format": rule.webhook.format if rule.webhook else None,
                "state": "firing" if firing else "ok",
                "since": recorded["since"] if firing else None,
                "firing_id": recorded["firing_id"] if firing else None,
                "last_change": recorded["at"] if recorded else None,
                "last_change_state": recorded["state"] if recorded else None,
                "value_now": reading.value,
                "breach_now": breached(rule.condition, reading),
                "note": describe_reading(rule.condition, reading),
            })
        return rows
    finally:
        if log is not None:
            log.close()


def _log_if_there(settings: Settings):
    """The log, to read the backlog; None when the embedded one does not exist yet or cannot be opened (the
    rules that read it show no value)."""
    if not settings.log and not (settings.data_dir / "log" / "events.sqlite").exists():
        return None
    try:
        return open_log(settings)
    except Exception:
        return None


def _when(value: object) -> str:
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    return "—" if value is None else str(value)


def _json_value(value: object) -> str:
    return _when(value) if isinstance(value, dt.datetime) else str(value)


def _print_rules(rows: list[dict], *, enabled: bool) -> None:
    table = Table(title="alert rules" + ("" if enabled else escape(" (evaluation off: [alerting] enabled = false)")))
    for column in ("rule", "reads", "condition", "every / for", "webhook", "state", "last change", "now"):
        table.add_column(column)
    for row in rows:
        state = f"[red]FIRING[/] since {_when(row['since'])}" if row["state"] == "firing" else "[green]ok[/]"
        last = (f"{row['last_change_state']} {_when(row['last_change'])}" if row["last_change"] else "never fired")
        value = "—" if row["value_now"] is None else f"{row['value_now']:,.6g}"
        if row["breach_now"]:
            value += " [red](breach)[/]"
        now = value + (f"\n[dim]{escape(row['note'])}[/]" if row["note"] else "")
        webhook = f"{row['webhook']} ({row['format']})" if row["webhook"] else "none (table only)"
        table.add_row(escape(row["name"]), escape(row["reads"]), row["condition"],
                      f"{row['interval']} / {row['for']}", escape(webhook), state, last, now)
    out.print(table)


@alerts.command("run")
@with_options(_COMMON)
def run(data_dir: Path | None, log_url: str | None, tables_uri: str | None) -> None:
    """Evaluates the alert rules until stopped, when this process holds the alerts role (one evaluator at a
    time: `gamestream process` runs one too; this one stands by while another holds the role)."""
    from gamestream.alerts import Evaluator
    from gamestream.log.ownership import open_roles

    settings = command_settings(data_dir=data_dir, log=log_url, tables_uri=tables_uri)
    config = _configuration(settings)
    if config is None:
        raise SystemExit(2)
    if not config.enabled:
        console.print("alerting is turned off ([alerting] enabled = false)", markup=False)
        raise SystemExit(2)
    check_storage(settings)
    log = open_log(settings)
    ownership = open_roles(settings)
    evaluator = Evaluator(settings, config, ownership, log=log, in_process=False)
    stop_on_signals(evaluator.stop_requested)
    console.print(f"evaluating {len(config.rules)} alert rule(s) until stopped (Ctrl-C)", highlight=False)
    try:
        evaluator.run()
    finally:
        evaluator.stop()
        ownership.close()
        log.close()
    console.print("alert evaluation stopped")


@alerts.command("history")
@with_options([data_dir_option, tables_option])
@format_option
@click.option("--rule", default=None, help="Only this rule.")
@click.option("--limit", type=int, default=50, show_default=True, help="The newest this many rows.")
def history(data_dir: Path | None, tables_uri: str | None, output: str, rule: str | None, limit: int) -> None:
    """The firings and resolves recorded in the alerts table, newest first."""
    from gamestream.alerts import table as alerts_table

    settings = command_settings(data_dir=data_dir, tables_uri=tables_uri)
    rows = [r for r in alerts_table.read(settings).to_pylist() if rule is None or r["rule"] == rule]
    rows = rows[::-1][:max(limit, 0)]
    if output == "json":
        out.out(json.dumps(rows, default=_json_value))
        return
    table = Table(title="alerts (newest first)")
    for column in ("at", "rule", "state", "value", "condition", "since", "severity"):
        table.add_column(column)
    for r in rows:
        table.add_row(_when(r["at"]), escape(r["rule"]), r["state"],
                      "—" if r["value"] is None else f"{r['value']:,.6g}",
                      r["condition"], _when(r["since"]), r["severity"])
    out.print(table)

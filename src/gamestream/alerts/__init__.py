"""Alerts: rules over the KPI tables, SQL and the pipeline's own health, evaluated by one process at a time, with
firings and resolves recorded in the `alerts` table and sent to webhooks.

May import: core, log, tables, kpi, api

One module per concept, in the order a firing travels:

- `configuration`: the `[alerting]` table and the `[[alerts]]` rules of gamestream.toml, parsed and checked at
  start (`AlertConfigError` says which rule and key is wrong), plus the built-in pipeline rules.
- `signals`: what a rule reads — a KPI column (a window's value, or its growth over a trailing duration), a SQL
  query returning one number, or one of the pipeline's signals (backlog, freshness, quarantine rate, commit
  errors) — as a `Reading`.
- `state`: the per-rule state machine ok → pending → firing → resolved, and the condition checks.
- `table`: the `alerts` Delta table of firings and resolves, and the states recovered from it.
- `notify`: webhook delivery (Slack-compatible or generic JSON bodies) on background threads, retried with
  backoff, bounded, never blocking the evaluator or ingest; webhook URLs carry tokens and are only ever shown
  redacted.
- `evaluator`: the loop, run under the `alerts` role of the ownership (one evaluator at a time), inside
  `gamestream process` or on its own (`gamestream alerts run`).
"""

from gamestream.alerts.configuration import AlertConfigError, AlertingConfig, Rule, load_alerting
from gamestream.alerts.evaluator import ALERTS_ROLE, Evaluator, for_pipeline

__all__ = ["ALERTS_ROLE", "AlertConfigError", "AlertingConfig", "Evaluator", "Rule", "for_pipeline", "load_alerting"]

"""The `alerts` table: one row per firing and per resolve, appended by the evaluator holding the `alerts` role.

It is the record of what fired (readable with `gamestream sql "SELECT * FROM alerts"`, by Spark, DuckDB…) and
where an evaluator that takes over picks up: a rule whose latest row says `firing` is still firing, so the new
evaluator does not announce it again, and announces its resolve once it resolves.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import write_deltalake

from gamestream.alerts.state import Transition
from gamestream.settings import Settings
from gamestream.tables import lake

logger = logging.getLogger(__name__)

NAME = "alerts"
TS = pa.timestamp("us", tz="UTC")
SCHEMA = pa.schema([
    ("at", TS),                    # when the transition happened
    ("rule", pa.string()),
    ("state", pa.string()),        # firing | resolved
    ("severity", pa.string()),
    ("value", pa.float64()),       # the value that fired or resolved the rule (null: none)
    ("threshold", pa.float64()),   # the condition's number, when it has one
    ("condition", pa.string()),    # the condition in words ("below 1", "down more than 30% vs a week earlier")
    ("since", TS),                 # when the breach began (a resolve: when the firing it ends began)
    ("firing_id", pa.string()),    # the episode: a firing and its resolve share it
    ("message", pa.string()),
    ("evaluator", pa.string()),    # host and pid of the process that evaluated it
])


def evaluator_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def append(settings: Settings, transitions: list[Transition]) -> None:
    """Appends the transitions (a blind append: it never conflicts with another writer's)."""
    if not transitions:
        return
    uri = settings.table_uri(NAME)
    table = lake.open_or_create(uri, SCHEMA, None)
    name = evaluator_name()
    rows = pa.Table.from_pylist([{
        "at": t.at, "rule": t.rule.name, "state": t.state, "severity": t.rule.severity, "value": t.value,
        "threshold": t.rule.condition.threshold, "condition": t.rule.condition.describe(), "since": t.since,
        "firing_id": t.firing_id, "message": t.message, "evaluator": name} for t in transitions], schema=SCHEMA)
    write_deltalake(table, rows, mode="append")


def read(settings: Settings) -> pa.Table:
    """Every row, oldest first (empty when no rule ever fired)."""
    uri = settings.table_uri(NAME)
    if not lake.table_exists(uri):
        return SCHEMA.empty_table()
    rows = lake.open_table(uri).to_pyarrow_table()
    return rows.sort_by([("at", "ascending")]) if rows.num_rows else rows


def latest(settings: Settings) -> dict[str, dict]:
    """Per rule, its latest row (the state it was left in)."""
    rows = read(settings)
    found: dict[str, dict] = {}
    for row in rows.to_pylist():
        found[row["rule"]] = row  # oldest first: the last one wins
    return found


def firing_episodes(settings: Settings) -> dict[str, tuple[str, dt.datetime]]:
    """Rules left firing: rule → (firing_id, since)."""
    return {rule: (row["firing_id"], row["since"]) for rule, row in latest(settings).items()
            if row["state"] == "firing"}


def count(settings: Settings, rule: str, state: str) -> int:
    rows = read(settings)
    if not rows.num_rows:
        return 0
    return int(pc.sum(pc.and_(pc.equal(rows["rule"], rule), pc.equal(rows["state"], state))).as_py() or 0)

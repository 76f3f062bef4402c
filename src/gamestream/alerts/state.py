"""A rule's state machine, and whether a reading breaches its condition.

    ok ──breach──▶ pending ──breach held `for`──▶ firing ──no breach──▶ ok   (the "resolved" transition)
     ▲               │
     └──no breach────┘   (or no data: a pending rule is not confirmed)

Exactly two transitions are announced: `firing` (once per episode) and `resolved` (once, when a firing rule's
value no longer breaches). No data (a table not there yet, a failed query, samples still being gathered) keeps
a firing rule firing — it resolves on a value, never on silence — and sends a pending rule back to ok.
"""

from __future__ import annotations

import datetime as dt
import statistics
import uuid
from dataclasses import dataclass
from typing import Literal

from gamestream.alerts.configuration import Condition, Rule
from gamestream.alerts.signals import Reading

UTC = dt.timezone.utc
Status = Literal["ok", "pending", "firing"]


@dataclass
class RuleState:
    status: Status = "ok"
    since: float | None = None
    """Unix seconds: when the current breach began (pending or firing)."""
    firing_id: str | None = None
    """Names the firing episode; its resolve carries the same id."""
    reading: Reading | None = None
    breach: bool | None = None
    evaluated_at: float | None = None


@dataclass(frozen=True)
class Transition:
    rule: Rule
    state: Literal["firing", "resolved"]
    value: float | None
    at: dt.datetime
    since: dt.datetime
    firing_id: str
    detail: str

    @property
    def message(self) -> str:
        """One line for a person: what fired or resolved, its value against the condition, what it reads."""
        value = "no value" if self.value is None else f"{self.value:,.6g}"
        verb = "FIRING" if self.state == "firing" else "RESOLVED"
        text = (f"[{verb}] {self.rule.name}: {value} ({self.rule.condition.describe()}) — {self.rule.reads}"
                f"{'; ' + self.detail if self.detail else ''}")
        if self.state == "resolved":
            text += f"; was firing since {self.since.isoformat(timespec='seconds')}"
        return text + (f" — {self.rule.summary}" if self.rule.summary else "")


def breached(condition: Condition, reading: Reading) -> bool | None:
    """Whether the reading breaches the condition; None when it cannot tell (no value, no baseline, too little
    history)."""
    value = reading.value
    if value is None:
        return None
    if condition.kind == "threshold":
        return ((condition.above is not None and value > condition.above)
                or (condition.below is not None and value < condition.below))
    if condition.kind == "growing":
        if reading.baseline is None:
            return None
        return value > reading.baseline and value >= (condition.above or 0)
    if condition.kind == "change":
        change = change_pct(value, reading.baseline)
        if change is None:
            return None
        return ((condition.drop_pct is not None and change < -condition.drop_pct)
                or (condition.rise_pct is not None and change > condition.rise_pct))
    low_high = band(condition, reading.history)
    if low_high is None:
        return None
    return not low_high[0] <= value <= low_high[1]


def change_pct(value: float, baseline: float | None) -> float | None:
    """The change from `baseline` in percent; None without a baseline, or from 0 (no percentage of nothing)."""
    if baseline is None or baseline == 0:
        return None
    return (value - baseline) / abs(baseline) * 100.0


def band(condition: Condition, history: tuple[float, ...]) -> tuple[float, float] | None:
    """The band of normal values: mean ± sigmas·stddev (sample standard deviation) or min..max of `history`;
    None under two values."""
    if len(history) < 2:
        return None
    if condition.band == "minmax":
        return min(history), max(history)
    mean, spread = statistics.fmean(history), statistics.stdev(history)
    return mean - condition.sigmas * spread, mean + condition.sigmas * spread


def describe_reading(condition: Condition, reading: Reading) -> str:
    """What the value was compared with, for messages: the baseline's change, or the band."""
    parts = [reading.note] if reading.note else []
    if condition.kind == "change" and reading.value is not None:
        change = change_pct(reading.value, reading.baseline)
        if reading.baseline is None:
            parts.append("no value a week earlier")
        elif change is None:
            parts.append("a week earlier was 0")
        else:
            parts.append(f"{change:+.1f}% vs {reading.baseline:,.6g} a week earlier")
    if condition.kind == "band":
        low_high = band(condition, reading.history)
        parts.append(f"band {low_high[0]:,.6g}..{low_high[1]:,.6g} of {len(reading.history)} values" if low_high
                     else f"{len(reading.history)} past value(s): too few for a band")
    return "; ".join(parts)


def step(rule: Rule, state: RuleState, reading: Reading, now: float) -> Transition | None:
    """Moves `state` on by one evaluation at Unix time `now`; the transition to announce, if any."""
    breach = breached(rule.condition, reading)
    state.reading, state.breach, state.evaluated_at = reading, breach, now
    if breach:
        if state.status == "ok":
            state.status, state.since = "pending", now
        if state.status == "pending" and now - (state.since or now) >= rule.for_s:
            state.status, state.firing_id = "firing", str(uuid.uuid4())
            return _transition(rule, state, "firing", reading, now)
        return None
    if state.status == "pending":
        state.status, state.since = "ok", None
    elif state.status == "firing" and breach is False:
        transition = _transition(rule, state, "resolved", reading, now)
        state.status, state.since, state.firing_id = "ok", None, None
        return transition
    return None


def _transition(rule: Rule, state: RuleState, kind: Literal["firing", "resolved"], reading: Reading,
                now: float) -> Transition:
    return Transition(rule=rule, state=kind, value=reading.value, at=dt.datetime.fromtimestamp(now, UTC),
                      since=dt.datetime.fromtimestamp(state.since or now, UTC), firing_id=state.firing_id or "",
                      detail=describe_reading(rule.condition, reading))

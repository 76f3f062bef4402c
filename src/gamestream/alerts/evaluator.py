"""The evaluator: every rule read at its interval, stepped through its state machine, its transitions recorded and
announced — by one process at a time.

One round of the loop:
1. Hold the `alerts` role (`ALERTS_ROLE`): claim it when free; on taking it, recover the rules left firing from
   the `alerts` table, so a takeover neither announces a firing again nor forgets to announce its resolve. While
   another process holds it, wait and try again (it may die).
2. For each rule that is due: read it (`Signals.read`), step its state (`state.step`).
3. For a transition: check the role is still held (a process paused past its lease must not announce what the new
   holder announces), append it to the `alerts` table, log it, and hand it to the notifier (which never blocks).

Nothing here may stop ingest: a round that fails is logged and counted (`gamestream_stage_errors{stage="alerts"}`)
and the next round runs; the evaluator runs on its own thread in `gamestream process`.
"""

from __future__ import annotations

import logging
import threading
import time

from prometheus_client import Gauge

from gamestream import metrics
from gamestream.alerts import table as alerts_table
from gamestream.alerts.configuration import AlertingConfig, Rule, load_alerting
from gamestream.alerts.notify import Notifier
from gamestream.alerts.signals import Signals
from gamestream.alerts.state import RuleState, Transition, step
from gamestream.settings import Settings

logger = logging.getLogger(__name__)

ALERTS_ROLE = "alerts"
"""The singleton role the evaluator holds (a flock in the data directory, a NATS lease, a Kafka group)."""
firing_gauge = Gauge("gamestream_alert_firing", "1 while an alert rule is firing (in the evaluating process)",
                     ["rule"], registry=metrics.REGISTRY)


class Evaluator:
    """Evaluates `config`'s rules under the `alerts` role of `ownership`. `log`: the event log (the backlog and
    freshness rules read it). `in_process`: this process runs the processor (the commit-errors rule counts its
    failed commits)."""

    def __init__(self, settings: Settings, config: AlertingConfig, ownership, *, log=None,
                 in_process: bool = False) -> None:
        self.settings = settings
        self.config = config
        self.ownership = ownership
        self.signals = Signals(settings, log, in_process=in_process)
        self.notifier = Notifier(config, settings.pipeline)
        self.states: dict[str, RuleState] = {}
        self.active = False
        self.stop_requested = threading.Event()
        self.thread: threading.Thread | None = None
        self.failed_rounds = 0
        self._standby_logged = False
        self._failing: set[str] = set()  # rules whose last read failed (logged once per episode)

    # ---------------------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """The loop on a daemon thread (inside `gamestream process`)."""
        self.thread = threading.Thread(target=self.run, name="alerts", daemon=True)
        self.thread.start()

    def stop(self, grace_s: float = 5.0) -> None:
        """Ends the loop, gives queued notifications up to `grace_s` to go out, and releases the role."""
        self.stop_requested.set()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join()
        self.notifier.close(grace_s)
        if self.active:
            self._deactivate()

    def run(self) -> None:
        """The loop, in this thread, until `stop_requested` is set."""
        due = {rule.name: 0.0 for rule in self.config.rules}
        shortest = min((rule.interval_s for rule in self.config.rules), default=60.0)
        logger.info("alert evaluator starting", extra={"rules": len(self.config.rules)})
        while not self.stop_requested.is_set():
            try:
                if not self._hold_role():
                    self.stop_requested.wait(max(shortest, 1.0))
                    continue
                for rule in self.config.rules:
                    if self.stop_requested.is_set() or not self.active:
                        break
                    if due[rule.name] <= time.monotonic():
                        due[rule.name] = time.monotonic() + rule.interval_s
                        self.evaluate(rule)
            except Exception:  # alerting must never take ingest down; the next round tries again
                self.failed_rounds += 1
                metrics.stage_errors.labels("alerts").inc()
                logger.exception("alert round failed; the next round retries",
                                 extra={"failed_rounds": self.failed_rounds})
                self.stop_requested.wait(1.0)
                continue
            wait = min(due.values(), default=time.monotonic() + shortest) - time.monotonic()
            self.stop_requested.wait(min(max(wait, 0.05), shortest))

    # ---------------------------------------------------------------------------------------------- the role
    def _hold_role(self) -> bool:
        """Step 1: True while this process holds the role (taking it, and recovering, when it is free)."""
        if self.active:
            if self.ownership.holds(ALERTS_ROLE):
                return True
            logger.warning("alert evaluation stops here: the alerts role lapsed (this process was paused or cut "
                           "off); another process takes it over")
            self._deactivate(release=False)
            return False
        if not self.ownership.claim(ALERTS_ROLE):
            if not self._standby_logged:
                logger.info("another process evaluates the alerts; standing by")
                self._standby_logged = True
            return False
        try:
            self._recover()
        except Exception as error:
            logger.warning("cannot read the alerts table to take over; trying again later",
                           extra={"error": f"{type(error).__name__}: {str(error)[:200]}"})
            self.ownership.release_role(ALERTS_ROLE)
            return False
        self.active, self._standby_logged = True, False
        logger.info("alert evaluation runs here", extra={
            "rules": len(self.config.rules), "firing": sorted(n for n, s in self.states.items() if s.status == "firing")})
        return True

    def _recover(self) -> None:
        """The rules the `alerts` table shows firing are firing here too, with their episode and start."""
        configured = {rule.name for rule in self.config.rules}
        self.states = {}
        self.signals.forget()
        for name, (firing_id, since) in alerts_table.firing_episodes(self.settings).items():
            if name in configured:
                self.states[name] = RuleState(status="firing", since=since.timestamp(), firing_id=firing_id)
                firing_gauge.labels(name).set(1)

    def _deactivate(self, *, release: bool = True) -> None:
        self.active = False
        self.states = {}
        self.signals.forget()
        if release:
            self.ownership.release_role(ALERTS_ROLE)

    # ------------------------------------------------------------------------------------------- evaluating
    def evaluate(self, rule: Rule) -> Transition | None:
        """Step 2: one rule read and stepped; its transition announced (step 3)."""
        reading = self.signals.read(rule)
        if reading.failed and rule.name not in self._failing:
            logger.warning("alert rule cannot be read: %s", reading.note, extra={"rule": rule.name})
            self._failing.add(rule.name)
        elif not reading.failed and rule.name in self._failing:
            logger.info("alert rule can be read again", extra={"rule": rule.name})
            self._failing.discard(rule.name)
        state = self.states.setdefault(rule.name, RuleState())
        transition = step(rule, state, reading, time.time())
        if transition is not None:
            self._announce(transition)
        return transition

    def _announce(self, transition: Transition) -> None:
        """Step 3: fenced by the role, recorded, logged, handed to the notifier."""
        if not self.ownership.holds(ALERTS_ROLE):
            logger.warning("alert transition not announced: the alerts role lapsed", extra={
                "rule": transition.rule.name, "state": transition.state})
            self._deactivate(release=False)
            return
        try:
            alerts_table.append(self.settings, [transition])
        except Exception as error:  # the notification still goes out; the table misses this row
            metrics.stage_errors.labels("alerts").inc()
            logger.error("cannot record the alert in the alerts table", extra={
                "rule": transition.rule.name, "state": transition.state,
                "error": f"{type(error).__name__}: {str(error)[:200]}"})
        firing_gauge.labels(transition.rule.name).set(1 if transition.state == "firing" else 0)
        log = logger.warning if transition.state == "firing" else logger.info
        log(transition.message, extra={"rule": transition.rule.name, "state": transition.state,
                                       "firing_id": transition.firing_id})
        self.notifier.send(transition)


def for_pipeline(settings: Settings, log, ownership) -> Evaluator | None:
    """The evaluator `gamestream process` runs beside the processor when the configuration file declares
    alerting (and does not turn it off); None otherwise. A configuration mistake raises `AlertConfigError` here,
    before anything starts."""
    config = load_alerting(settings)
    if config is None or not config.enabled or not config.rules:
        return None
    return Evaluator(settings, config, ownership, log=log, in_process=True)

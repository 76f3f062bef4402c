"""Webhook delivery: a Slack-compatible body (`{"text": …}`) or a generic JSON one, sent from background threads.

Invariants:
- `Notifier.send` never blocks and never raises: the evaluator (and the ingest that may share its process) must not
  wait on a receiver. Each webhook has its own queue and thread, so a receiver that is down delays only its own
  messages, and a webhook's messages stay in order (a rule's resolve never arrives before its firing).
- A message is retried with exponential backoff and jitter (stamina) on a connection failure, a timeout, 429 or
  a 5xx, for up to `retry_for_s`; then, or at once on another 4xx (a wrong URL will not heal), it is dropped with
  an error logged. A full queue drops its oldest message, with an error logged.
- The URL is never logged: it carries the token. Records name the webhook by `redact_url`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import httpx
import stamina
from prometheus_client import Counter

from gamestream import metrics
from gamestream.alerts.configuration import AlertingConfig, Webhook
from gamestream.alerts.state import Transition

logger = logging.getLogger(__name__)
# httpx logs every request with its URL at INFO, and a webhook's URL holds its token: only its warnings are kept
logging.getLogger("httpx").setLevel(logging.WARNING)

notifications = Counter("gamestream_alert_notifications", "Alert notifications by outcome (sent, retried, "
                        "dropped)", ["outcome"], registry=metrics.REGISTRY)

RETRY_INITIAL_S = 1.0
"""The first wait after a failed delivery; doubled (with jitter) each attempt up to `retry_max_wait_s`."""
_STOP = object()


class RetryableDelivery(Exception):
    """The receiver did not take the message but may later (no connection, a timeout, 429, 5xx)."""


def body(transition: Transition, webhook: Webhook, pipeline: str) -> dict:
    """The request body for the webhook's format."""
    if webhook.format == "slack":
        icon = ":rotating_light:" if transition.state == "firing" else ":white_check_mark:"
        return {"text": f"{icon} {transition.message} [{transition.rule.severity}, {pipeline}]"}
    return {
        "rule": transition.rule.name,
        "state": transition.state,
        "severity": transition.rule.severity,
        "value": transition.value,
        "threshold": transition.rule.condition.threshold,
        "condition": transition.rule.condition.describe(),
        "reads": transition.rule.reads,
        "since": transition.since.isoformat(),
        "at": transition.at.isoformat(),
        "firing_id": transition.firing_id,
        "detail": transition.detail,
        "summary": transition.rule.summary,
        "message": transition.message,
        "pipeline": pipeline,
    }


class Notifier:
    """One `_Sender` (queue + thread) per webhook, started on its first message."""

    def __init__(self, config: AlertingConfig, pipeline: str) -> None:
        self.config = config
        self.pipeline = pipeline
        self._senders: dict[tuple[str, str], _Sender] = {}
        self._lock = threading.Lock()

    def send(self, transition: Transition) -> None:
        webhook = transition.rule.webhook
        if webhook is None:
            return
        with self._lock:
            sender = self._senders.get((webhook.url, webhook.format))
            if sender is None:
                sender = self._senders[(webhook.url, webhook.format)] = _Sender(webhook, self.config)
        sender.put(body(transition, webhook, self.pipeline), transition)

    def close(self, grace_s: float = 5.0) -> None:
        """Gives the queued messages up to `grace_s` in all to go out, then stops (what is left is logged)."""
        deadline = time.monotonic() + grace_s
        with self._lock:
            senders = list(self._senders.values())
        for sender in senders:
            sender.close(max(0.0, deadline - time.monotonic()))


class _Sender:
    def __init__(self, webhook: Webhook, config: AlertingConfig) -> None:
        self.webhook = webhook
        self.config = config
        self.queue: queue.Queue = queue.Queue(maxsize=config.queue_size)
        self.stopping = threading.Event()
        self.client = httpx.Client(timeout=config.timeout_s, follow_redirects=False)
        self.thread = threading.Thread(target=self._run, name="alerts-webhook", daemon=True)
        self.thread.start()

    def put(self, payload: dict, transition: Transition) -> None:
        item = (payload, transition)
        while True:
            try:
                self.queue.put_nowait(item)
                return
            except queue.Full:
                try:
                    _, dropped = self.queue.get_nowait()
                except queue.Empty:
                    continue
                notifications.labels("dropped").inc()
                logger.error("alert notification dropped: the webhook's queue is full", extra={
                    "webhook": self.webhook.redacted, "rule": dropped.rule.name, "state": dropped.state})

    def close(self, grace_s: float) -> None:
        self.stopping.set()
        try:
            self.queue.put_nowait(_STOP)
        except queue.Full:
            pass
        self.thread.join(grace_s)
        left = self.queue.qsize()
        if self.thread.is_alive() and left:
            logger.warning("stopping with alert notifications not delivered", extra={
                "webhook": self.webhook.redacted, "messages": left})

    def _run(self) -> None:
        try:
            while True:
                item = self.queue.get()
                if item is _STOP:
                    return
                self._deliver(*item)
        finally:
            self.client.close()

    def _deliver(self, payload: dict, transition: Transition) -> None:
        context = {"webhook": self.webhook.redacted, "rule": transition.rule.name, "state": transition.state}
        attempts = 0
        try:
            for attempt in stamina.retry_context(
                    on=self._retryable, attempts=None, timeout=self.config.retry_for_s,
                    wait_initial=RETRY_INITIAL_S, wait_max=self.config.retry_max_wait_s,
                    wait_jitter=RETRY_INITIAL_S):
                with attempt:
                    attempts += 1
                    self._post(payload)
        except RetryableDelivery as error:
            notifications.labels("dropped").inc()
            logger.error("alert notification dropped after retrying for %s s: %s", f"{self.config.retry_for_s:g}",
                         error, extra={**context, "attempts": attempts})
            return
        except httpx.HTTPStatusError as error:
            notifications.labels("dropped").inc()
            logger.error("alert notification refused by the webhook (HTTP %d); not retried",
                         error.response.status_code, extra=context)
            return
        notifications.labels("sent").inc()
        log = logger.info if attempts == 1 else logger.warning
        log("alert notification delivered", extra={**context, "attempts": attempts})

    def _retryable(self, error: Exception) -> bool:
        if isinstance(error, RetryableDelivery):
            notifications.labels("retried").inc()
            logger.warning("alert notification not delivered; retrying: %s", error,
                           extra={"webhook": self.webhook.redacted})
            return True
        return False

    def _post(self, payload: dict) -> None:
        try:
            answer = self.client.post(self.webhook.url, json=payload)
        except httpx.HTTPError as error:  # no connection, a timeout, a broken answer: the URL stays out of it
            raise RetryableDelivery(type(error).__name__) from None
        if answer.status_code == 429 or answer.status_code >= 500:
            raise RetryableDelivery(f"HTTP {answer.status_code}")
        if answer.status_code >= 300:
            raise httpx.HTTPStatusError(f"HTTP {answer.status_code}", request=answer.request, response=answer)

"""The collector's state shared by its routes: the log, the write keys, the validator, the country lookup, the
metrics and the log's backlog, watched every 0.5 s so that `POST /v1/events` can answer 503 before the backlog
passes its bound."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from starlette.requests import Request

from gamestream import schema
from gamestream.api.access import presented_key_in
from gamestream.api.coalesce import Coalescer
from gamestream.api.dashboard import IngestRate
from gamestream.api.http_metrics import HttpMetrics
from gamestream.ingest import geo
from gamestream.log import EventLog, describe
from gamestream.settings import Settings

BACKLOG_EVERY_S = 0.5
COUNTRIES_KEPT = 4096  # clients' countries remembered at most (`Collector.country_of`)
COUNTRIES_KEPT_S = 1.0  # … and for at most this long
_UNKNOWN = object()
logger = logging.getLogger(__name__)


class Collector:
    """The ingest endpoint's state, bound to a log and the settings' limits."""

    def __init__(self, settings: Settings, log: EventLog) -> None:
        self.settings = settings
        self.log = log
        self.keys = [key.encode() for key in settings.api_keys]
        self.validator = schema.EventValidator(event_time="server", params=settings.schema_params)
        self.geo = geo.resolver_for(settings)  # GeoDataError here, at start, for a MaxMind DB file that won't open
        self._countries: dict[tuple[str | None, str | None], str | None] = {}
        self._countries_until = 0.0
        self._request_counters: dict[int, Any] = {}
        self.log_description = describe(settings)
        self.metrics = HttpMetrics.create(self.log_description)
        if hasattr(log, "group_commits"):  # the embedded log: its fsync'd group commits
            self.metrics.group_commits.set_function(lambda: log.group_commits)
        self.coalescer = Coalescer(log)
        self.metrics.log_submits.set_function(lambda: self.coalescer.groups)
        self.backlog = 0
        self.accepted_total = 0
        self.ingest_rate = IngestRate()
        self._backlog_task: asyncio.Task | None = None
        self.front: Any = None  # the native front serving this app (`api.front`), if any

    # ----------------------------------------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        try:
            await self._refresh_backlog()
        except Exception:  # a log server still starting or away: serve anyway; ingest answers 503 until it is back
            logger.warning("cannot read the log backlog at start; retrying every 0.5 s",
                           extra={"log": self.log_description}, exc_info=True)
            self.metrics.log_reachable.set(0)
        self._backlog_task = asyncio.create_task(self._watch_backlog())

    async def stop(self) -> None:
        if self._backlog_task:
            self._backlog_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._backlog_task

    async def _refresh_backlog(self) -> None:
        if self.log.positions_scope == "process":
            # the log cannot see the processor's commits (Kinesis: positions live in the tables), so it has no
            # backlog to bound here; the stream's own retention and shard limits are the back-pressure
            self.metrics.log_reachable.set(1)
            return
        self.backlog = await asyncio.to_thread(self.log.pending_events, self.settings.pipeline)
        if self.front is not None:  # over the bound, the native front takes nothing: the route answers 503
            self.front.set_refusing(self.backlog_over_bound())
        self.metrics.backlog.set(self.backlog)
        self.metrics.log_reachable.set(1)

    async def _watch_backlog(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(BACKLOG_EVERY_S)
            self.ingest_rate.sample(self.accepted_total)
            try:
                await self._refresh_backlog()
            except Exception:  # a busy log must not kill the watcher; the next round retries
                self.metrics.log_reachable.set(0)
                if not failing:  # once per episode, not twice a second
                    logger.warning("cannot read the log backlog; retrying every 0.5 s", exc_info=True)
                failing = True
            else:
                if failing:
                    logger.info("log backlog readable again", extra={"backlog_events": self.backlog})
                failing = False

    # -------------------------------------------------------------------------------------------------- ingest
    def authorised(self, request: Request) -> bool:
        """A write key in a header, or no write key configured."""
        return not self.keys or presented_key_in(request, self.keys)

    def country_of(self, request: Request) -> str | None:
        """The request's client's country (`geo.CountryResolver`), None when the lookup is off or finds none.
        Only the country goes on; the answers of the last second are kept in memory (a phone sends request after
        request from one address: parsing it and looking it up cost more than the rest of a small request's
        routing), never written anywhere, and forgotten each second, so a replaced MaxMind DB file counts within
        a second of being opened again."""
        if self.geo is None:
            return None
        peer = self.geo.peer_of_scope(request.scope)
        now = time.monotonic()
        if now >= self._countries_until or len(self._countries) >= COUNTRIES_KEPT:
            self._countries.clear()
            self._countries_until = now + COUNTRIES_KEPT_S
        country = self._countries.get(peer, _UNKNOWN)
        if country is _UNKNOWN:
            country = self._countries[peer] = self.geo.country(*peer)
        return country  # type: ignore[return-value]

    def country_for(self, address: str, forwarded: bytes | None) -> str | None:
        """`country_of` for a client the native front serves: its address and its forwarding header's values
        joined (None without one)."""
        if self.geo is None:
            return None
        headers = [] if forwarded is None else [(self.geo.header.encode(), forwarded)]
        return self.geo.country(*self.geo.peer_of_scope({"client": (address, 0), "headers": headers}))

    def backlog_over_bound(self) -> bool:
        return self.backlog > self.settings.max_backlog_events

    def count_request(self, status: int, requests: int = 1) -> None:
        """`requests` of `POST /v1/events` answered with `status` (`gamestream_http_requests`; each status's child
        kept)."""
        counter = self._request_counters.get(status)
        if counter is None:
            counter = self._request_counters[status] = self.metrics.requests.labels("/v1/events", str(status))
        counter.inc(requests)

    def count_accepted(self, events: int) -> None:
        self.metrics.accepted.inc(events)
        self.accepted_total += events

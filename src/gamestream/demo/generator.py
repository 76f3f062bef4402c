"""Simulated players: a seeded, realistic stream of mobile-game events.

Devices on iOS and Android with a few app versions play sessions: a session start, level starts and ends, score
adjustments (`scoreAdjustment`), now and then a purchase (`purchaseEvent` with `amount`) — most players never
pay, a few pay a lot — and a session end. The same seed gives the same events.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

if TYPE_CHECKING:
    import asyncio

    import httpx

GAMES = (("dragon-quest", "Dragon Quest Mobile"), ("space-miner", "Space Miner"), ("puzzle-pop", "Puzzle Pop"))
PLATFORMS = (("ios", ("3.2.0", "3.2.1", "3.3.0")), ("android", ("3.1.4", "3.2.0", "3.3.0")))
PRICES = (0.99, 1.99, 4.99, 9.99, 19.99, 49.99, 99.99)


@dataclass(frozen=True)
class Player:
    device_id: str
    platform: str
    app_version: str
    game: tuple[str, str]
    spender: float  # chance that a session holds a purchase; 0 for most players
    whale: bool


def make_players(count: int, rng: random.Random) -> list[Player]:
    players = []
    for _ in range(count):
        platform, versions = rng.choice(PLATFORMS)
        kind = rng.random()
        spender = 0.0 if kind < 0.9 else (0.6 if kind > 0.99 else 0.15)  # ~90 % never pay; ~1 % are whales
        players.append(Player(
            device_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            platform=platform,
            app_version=rng.choice(versions),
            game=rng.choice(GAMES),
            spender=spender,
            whale=kind > 0.99,
        ))
    return players


def _session(player: Player, start: dt.datetime, rng: random.Random) -> Iterator[tuple[dt.datetime, str, dict]]:
    t = start
    yield t, "sessionStart", {}
    for level in range(rng.randint(1, 6)):
        t += dt.timedelta(seconds=rng.uniform(2, 30))
        yield t, "levelStart", {}
        for _ in range(rng.randint(0, 4)):
            t += dt.timedelta(seconds=rng.uniform(1, 20))
            yield t, "scoreAdjustment", {"scoreAdjustment": rng.choice((-50, -10, 10, 25, 50, 100, 250))}
        t += dt.timedelta(seconds=rng.uniform(5, 60))
        yield t, "levelEnd", {}
        if player.spender and rng.random() < player.spender / 2:
            t += dt.timedelta(seconds=rng.uniform(1, 10))
            price = rng.choice(PRICES[3:] if player.whale else PRICES[:4])
            yield t, "purchaseEvent", {"amount": price}
    t += dt.timedelta(seconds=rng.uniform(1, 30))
    yield t, "sessionEnd", {}


def simulate(*, events: int, users: int = 1000, seed: int = 7, start: dt.datetime | None = None,
             days: float = 1.0, with_event_time: bool = True) -> Iterator[dict]:
    """Yields `events` events of `users` players whose sessions start evenly over `days` days from `start`.

    With `with_event_time`, each event carries eventTime (what `load` keeps); without, the client's time goes
    to `eventParams.client_event_time` only, as a game posting to the collector would send it.
    """
    rng = random.Random(seed)
    players = make_players(users, rng)
    start = start or dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)
    span = days * 86400
    produced = 0
    session_number = 0
    while produced < events:
        # sessions start in time order, so the stream is roughly ordered by time, as a live one is
        session_start = start + dt.timedelta(seconds=span * min(produced / events, 1.0) + rng.uniform(0, 60))
        player = players[rng.randrange(len(players))]
        session_number += 1
        for moment, name, extra in _session(player, session_start, rng):
            if produced >= events:
                return
            params = {
                "game_keyword": player.game[0],
                "app_name": player.game[1],
                "platform": player.platform,
                "app_version": player.app_version,
                "device_id": player.device_id,
                "client_event_time": moment.isoformat().replace("+00:00", "Z"),
                **extra,
            }
            event: dict = {"eventName": name, "eventParams": params}
            if with_event_time:
                event["eventTime"] = params["client_event_time"]
                event["eventId"] = str(uuid.UUID(int=rng.getrandbits(128), version=4))
            produced += 1
            yield event


# ------------------------------------------------------------------------------------------------ sending (HTTP)
@dataclass
class SendStats:
    """What a sender saw: `accepted` counts only events the collector acknowledged (200)."""

    requests: int = 0
    events_sent: int = 0
    accepted: int = 0
    rejected: int = 0
    retries: int = 0
    failed_events: int = 0  # given up after every retry
    latencies: list[float] | None = None
    started: float = 0.0
    finished: float = 0.0

    @property
    def rate(self) -> float:
        import time

        end = self.finished or time.monotonic()
        return self.events_sent / max(end - self.started, 1e-9)


COUNTED = ("requests", "events_sent", "accepted", "rejected", "retries", "failed_events")


class AckedFile:
    """`generate --acked FILE`: the eventId of every event a collector acknowledged, appended to FILE as each
    answer arrives (written through to the OS at once, so a generator killed with SIGKILL leaves every id it had
    been answered for), and the counts so far in FILE.counts, replaced whole each time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.counts = path.with_name(path.name + ".counts")
        self.handle = open(path, "a", buffering=1)

    def add(self, events: list[dict], answer: dict) -> None:
        refused = {error.get("index") for error in answer.get("errors") or []}
        self.handle.write("".join(f"{event['eventId']}\n" for index, event in enumerate(events)
                                  if index not in refused))
        self.handle.flush()

    def write_counts(self, stats: SendStats) -> None:
        partial = self.counts.with_name(self.counts.name + ".part")
        partial.write_text(json.dumps({name: getattr(stats, name) for name in COUNTED}))
        partial.replace(self.counts)

    def close(self) -> None:
        self.handle.close()

    @staticmethod
    def read_counts(path: Path) -> dict[str, int]:
        """The counts a generator last wrote for `--acked path` (zeros when none yet)."""
        try:
            counts = json.loads(path.with_name(path.name + ".counts").read_text())
        except (OSError, ValueError):
            counts = {}
        return {name: int(counts.get(name, 0)) for name in COUNTED}


def live_events(*, users: int, seed: int, limit: int | None = None) -> Iterator[dict]:
    """Simulated events for posting now: client_event_time is the moment the event is drawn, and each event
    carries a client eventId (so a test can follow every event into the table)."""
    rng = random.Random(seed)
    sessions = simulate(events=limit if limit is not None else 10**12, users=users, seed=seed,
                        with_event_time=False)
    for event in sessions:
        event["eventParams"]["client_event_time"] = dt.datetime.now(dt.timezone.utc).isoformat().replace(
            "+00:00", "Z")
        event["eventId"] = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        yield event


RETRIED_STATUSES = (429, 500, 502, 503, 504)


class _RetryableAnswer(Exception):
    """A 429 or 5xx answer: the request may succeed later (after `retry_after` seconds when the server said)."""

    def __init__(self, status: int, retry_after: float | None) -> None:
        super().__init__(f"HTTP {status}")
        self.status, self.retry_after = status, retry_after


async def send(
    target: str,
    events: Iterator[dict],
    *,
    batch: int = 100,
    concurrency: int = 4,
    rate: float | None = None,
    duration: float | None = None,
    api_key: str | None = None,
    max_retries: int = 20,
    timeout: float = 10.0,
    stop: "asyncio.Event | None" = None,
    on_ack: "Callable[[list[dict], dict], None] | None" = None,
    record_latency: bool = False,
    stats: SendStats | None = None,
) -> SendStats:
    """Posts `events` to `target` (the collector's base URL) in batches over keep-alive connections.

    `rate` (events/s) paces the sending, `duration` (s) ends it, `stop` ends it from outside. A timeout, a
    connection error, a 429 or a 5xx is retried with the same Idempotency-Key, so a retry never duplicates.
    `on_ack(events, answer)` is called for every acknowledged batch. Pass `stats` to watch it while it runs.
    """
    import asyncio

    import httpx

    stats = stats or SendStats()
    stats.started = time.monotonic()
    if record_latency:
        stats.latencies = []
    sender = _Sender(target, events, batch=batch, rate=rate, api_key=api_key, max_retries=max_retries, stop=stop,
                     on_ack=on_ack, stats=stats, deadline=stats.started + duration if duration else None)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        await asyncio.gather(*(sender.worker(client) for _ in range(concurrency)))
    stats.finished = time.monotonic()
    return stats


class _Sender:
    """One `send`: the events left to take, the pace, and how a batch is posted, retried and counted; shared by
    its `concurrency` workers."""

    def __init__(self, target: str, events: Iterator[dict], *, batch: int, rate: float | None,
                 deadline: float | None, api_key: str | None, max_retries: int, stop: asyncio.Event | None,
                 on_ack: Callable[[list[dict], dict], None] | None, stats: SendStats) -> None:
        import httpx
        import msgspec

        self.encoder = msgspec.json.Encoder()
        self.events, self.batch, self.rate, self.deadline = events, batch, rate, deadline
        self.max_retries, self.stop, self.on_ack, self.stats = max_retries, stop, on_ack, stats
        self.url = target.rstrip("/") + "/v1/events"
        self.headers = {"Content-Type": "application/x-ndjson" if batch > 1 else "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.exhausted = False
        self.transient = (_RetryableAnswer, httpx.TimeoutException, httpx.TransportError)

    async def worker(self, client: httpx.AsyncClient) -> None:
        """Takes and posts batches, paced to `rate`, until the events run out, the deadline passes or `stop`."""
        import asyncio

        while not self.should_stop():
            if self.past_deadline():
                return
            if self.rate:
                ahead = self.seconds_ahead_of_rate()
                if ahead > 0:
                    await asyncio.sleep(min(ahead, 0.5))
                    continue
            chunk = self.next_batch()
            if not chunk:
                return
            self.stats.events_sent += len(chunk)
            self.stats.requests += 1
            await self.post(client, chunk)

    def should_stop(self) -> bool:
        """No events left, or stopped from outside."""
        return self.exhausted or bool(self.stop and self.stop.is_set())

    def past_deadline(self) -> bool:
        return bool(self.deadline and time.monotonic() >= self.deadline)

    def seconds_ahead_of_rate(self) -> float:
        """How far the events sent so far are ahead of `rate` (> 0: wait before sending more)."""
        return self.stats.events_sent / self.rate - (time.monotonic() - self.stats.started)  # type: ignore[operator]

    def next_batch(self) -> list[dict]:
        taken = []
        for event in self.events:
            taken.append(event)
            if len(taken) >= self.batch:
                break
        else:
            self.exhausted = True
        return taken

    def retry_wait(self, error: Exception) -> bool | float:
        """Retry timeouts, connection errors, 429 and 5xx; wait what the server's Retry-After says when it
        says one, else stamina's exponential backoff."""
        if isinstance(error, _RetryableAnswer) and error.retry_after is not None:
            return error.retry_after
        return isinstance(error, self.transient)

    async def post(self, client: httpx.AsyncClient, chunk: list[dict]) -> None:
        """Posts one batch (retried while a retry may help) and counts its answer."""
        try:
            response, sent_at = await self.post_with_retries(client, chunk)
        except self.transient:
            self.stats.failed_events += len(chunk)
            return
        if response.status_code != 200:
            self.stats.rejected += len(chunk)  # 4xx: the request itself is wrong; retrying will not help
            return
        answer = response.json()
        self.stats.accepted += answer["accepted"]
        self.stats.rejected += answer["rejected"]
        if self.stats.latencies is not None:
            self.stats.latencies.append(time.perf_counter() - sent_at)
        if self.on_ack:
            self.on_ack(chunk, answer)

    async def post_with_retries(self, client: httpx.AsyncClient,
                                chunk: list[dict]) -> tuple[httpx.Response, float]:
        """The answer that is not retried (or the last error once retries run out), and when its request was
        sent (`time.perf_counter`)."""
        import stamina

        body = (b"\n".join(self.encoder.encode(e) for e in chunk) if self.batch > 1
                else self.encoder.encode(chunk[0]))
        # the same key on every attempt: a retry of a request that did land is answered from the log, not
        # stored twice
        request_headers = {**self.headers, "Idempotency-Key": str(uuid.uuid4())}
        async for attempt in stamina.retry_context(on=self.retry_wait, attempts=self.max_retries + 1, timeout=None,
                                                   wait_initial=0.05, wait_max=2.0, wait_jitter=0.05):
            with attempt:
                if attempt.num > 1:
                    self.stats.retries += 1
                sent_at = time.perf_counter()
                response = await client.post(self.url, content=body, headers=request_headers)
                if response.status_code in RETRIED_STATUSES:
                    retry_after = response.headers.get("retry-after", "")
                    raise _RetryableAnswer(response.status_code,
                                           float(retry_after) if retry_after.isdigit() else None)
        return response, sent_at

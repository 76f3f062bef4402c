"""Simulated players: a seeded, realistic stream of mobile-game events.

Devices on iOS and Android with a few app versions play sessions: a session start, level starts and ends, score
adjustments (`scoreAdjustment`), now and then a purchase (`purchaseEvent` with `amount`) — most players never
pay, a few pay a lot — and a session end. The same seed gives the same events.
"""

from __future__ import annotations

import datetime as dt
import random
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

if TYPE_CHECKING:
    import asyncio

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
    import time

    import httpx
    import msgspec
    import stamina

    encoder = msgspec.json.Encoder()
    stats = stats or SendStats()
    stats.started = time.monotonic()
    if record_latency:
        stats.latencies = []
    deadline = stats.started + duration if duration else None
    url = target.rstrip("/") + "/v1/events"
    headers = {"Content-Type": "application/x-ndjson" if batch > 1 else "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    exhausted = False

    def next_batch() -> list[dict]:
        nonlocal exhausted
        taken = []
        for event in events:
            taken.append(event)
            if len(taken) >= batch:
                break
        else:
            exhausted = True
        return taken

    transient = (_RetryableAnswer, httpx.TimeoutException, httpx.TransportError)

    def backoff(error: Exception) -> bool | float:
        """Retry timeouts, connection errors, 429 and 5xx; wait what the server's Retry-After says when it
        says one, else stamina's exponential backoff."""
        if isinstance(error, _RetryableAnswer) and error.retry_after is not None:
            return error.retry_after
        return isinstance(error, transient)

    async def post(client: httpx.AsyncClient, chunk: list[dict]) -> None:
        body = (b"\n".join(encoder.encode(e) for e in chunk) if batch > 1 else encoder.encode(chunk[0]))
        # the same key on every attempt: a retry of a request that did land is answered from the log, not
        # stored twice
        request_headers = {**headers, "Idempotency-Key": str(uuid.uuid4())}
        try:
            async for attempt in stamina.retry_context(on=backoff, attempts=max_retries + 1, timeout=None,
                                                       wait_initial=0.05, wait_max=2.0, wait_jitter=0.05):
                with attempt:
                    if attempt.num > 1:
                        stats.retries += 1
                    sent_at = time.perf_counter()
                    response = await client.post(url, content=body, headers=request_headers)
                    if response.status_code in RETRIED_STATUSES:
                        retry_after = response.headers.get("retry-after", "")
                        raise _RetryableAnswer(response.status_code,
                                               float(retry_after) if retry_after.isdigit() else None)
        except transient:
            stats.failed_events += len(chunk)
            return
        if response.status_code != 200:
            stats.rejected += len(chunk)  # 4xx: the request itself is wrong; retrying will not help
            return
        answer = response.json()
        stats.accepted += answer["accepted"]
        stats.rejected += answer["rejected"]
        if stats.latencies is not None:
            stats.latencies.append(time.perf_counter() - sent_at)
        if on_ack:
            on_ack(chunk, answer)

    async def worker(client: httpx.AsyncClient) -> None:
        while not exhausted and not (stop and stop.is_set()):
            if deadline and time.monotonic() >= deadline:
                return
            if rate:
                ahead = stats.events_sent / rate - (time.monotonic() - stats.started)
                if ahead > 0:
                    await asyncio.sleep(min(ahead, 0.5))
                    continue
            chunk = next_batch()
            if not chunk:
                return
            stats.events_sent += len(chunk)
            stats.requests += 1
            await post(client, chunk)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    stats.finished = time.monotonic()
    return stats

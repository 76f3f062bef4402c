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
from typing import Iterator

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

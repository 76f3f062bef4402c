"""The protocols of the analytics SDKs studios already ship — Amplitude, Segment, PostHog, Snowplow — spoken by the
collector, so a game moves to gamestream by changing its SDK's server URL.

Each vendor module (`amplitude`, `segment`, `posthog`, `snowplow`) reads its wire format and turns every event
into a gamestream event with `gamestream_event` (one mapping for all: which id is the player, which events are
purchases and where their amount is, which properties are renamed), then hands the events to `http.ingest`,
which gives them the guarantees of `POST /v1/events` (the write keys, the backlog bound, validation with a reason
per rejected event, durable in the log before the answer) and answers in the vendor's own shapes, so the SDK's
retry logic behaves. The vendor's event id (Amplitude's insert_id, Segment's messageId, PostHog's uuid,
Snowplow's eid) becomes the eventId: an SDK's retries land once (deduplication by eventId, process/identity.py).

The mapping comes from `[compat.<vendor>]` in gamestream.toml (docs/compat.md):

    [compat.amplitude]
    player = "user"                       # "device" (default) or "user": which id is eventParams.device_id
    purchases = ["purchase", "IAP"]       # event names that are purchases: stored as purchaseEvent
    amount = ["revenue", "price"]         # the properties holding a purchase's amount, first found wins
    rename = { lvl = "level" }            # property → eventParams field (e.g. a promoted parameter)
"""

from __future__ import annotations

import functools

import datetime as dt
import math
from dataclasses import dataclass, field
from typing import Any

from gamestream.schema import PURCHASE

VENDORS = ("amplitude", "segment", "posthog", "snowplow")
PLAYERS = ("device", "user")
VENDOR_EVENT = "vendor_event"  # the eventParams key that keeps a purchase's own event name


@dataclass(frozen=True)
class Mapping:
    """How one vendor's events become gamestream events."""

    vendor: str
    player: str = "device"
    purchases: frozenset[str] = frozenset()
    amount: tuple[str, ...] = ()
    rename: dict[str, str] = field(default_factory=dict)


# The vendors' own conventions, overridden key by key by [compat.<vendor>].
DEFAULTS: dict[str, dict[str, Any]] = {
    "amplitude": {"purchases": ["revenue_amount", "purchase", "Purchase", "purchaseEvent"],
                  "amount": ["revenue", "$revenue", "price", "amount"]},
    "segment": {"purchases": ["Order Completed", "purchase", "Purchase", "purchaseEvent"],
                "amount": ["revenue", "total", "value", "price", "amount"]},
    "posthog": {"purchases": ["purchase", "Purchase", "$purchase", "purchaseEvent"],
                "amount": ["revenue", "$revenue", "price", "amount", "value"]},
    "snowplow": {"purchases": ["transaction", "purchase", "Purchase", "purchaseEvent"],
                 "amount": ["revenue", "total", "tr_tt", "value", "price", "amount"]},
}
_KEYS = {"player", "purchases", "amount", "rename"}


def check_config(section: object) -> tuple[tuple[str, tuple[tuple[str, object], ...]], ...]:
    """`[compat]` of the configuration file, checked: ((vendor, ((key, value), …)), …); `ValueError` saying what is
    wrong (an unknown vendor or key, a value of the wrong kind)."""
    if not isinstance(section, dict):
        raise ValueError("[compat] must hold one table per vendor: [compat.amplitude], [compat.segment], …")
    checked = []
    for vendor, table in section.items():
        if vendor not in VENDORS:
            raise ValueError(f"unknown vendor [compat.{vendor}] (known: {', '.join(VENDORS)})")
        if not isinstance(table, dict):
            raise ValueError(f"[compat.{vendor}] must be a table")
        if unknown := set(table) - _KEYS:
            raise ValueError(f"[compat.{vendor}]: unknown key {', '.join(sorted(unknown))} (known: "
                             f"{', '.join(sorted(_KEYS))})")
        if "player" in table and table["player"] not in PLAYERS:
            raise ValueError(f"[compat.{vendor}] player must be \"device\" or \"user\", not {table['player']!r}")
        for key in ("purchases", "amount"):
            value = table.get(key, [])
            if not (isinstance(value, list) and all(isinstance(v, str) and v for v in value)):
                raise ValueError(f"[compat.{vendor}] {key} must be a list of names")
        rename = table.get("rename", {})
        if not (isinstance(rename, dict) and all(isinstance(v, str) and v for v in rename.values())):
            raise ValueError(f"[compat.{vendor}] rename must be a table of property = \"eventParams field\"")
        checked.append((vendor, tuple(sorted((k, _frozen(v)) for k, v in table.items()))))
    return tuple(checked)


def _frozen(value: object) -> object:
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, dict):
        return tuple(sorted(value.items()))
    return value


@functools.lru_cache(maxsize=64)
def mapping(compat: tuple, vendor: str) -> Mapping:
    """The mapping of `vendor`: its defaults, then its `[compat.<vendor>]` keys (`Settings.compat`); built once
    per configuration (the routes ask for it on every request). Not to be changed by the caller."""
    values: dict[str, Any] = dict(DEFAULTS[vendor])
    for name, items in compat:
        if name == vendor:
            values.update({k: (dict(v) if k == "rename" else list(v) if isinstance(v, tuple) else v)
                           for k, v in items})
    return Mapping(vendor=vendor, player=values.get("player", "device"),
                   purchases=frozenset(values.get("purchases", ())), amount=tuple(values.get("amount", ())),
                   rename=dict(values.get("rename", {})))


class Reject(ValueError):
    """An event that cannot become a gamestream event; the message is the reason the sender reads."""


def gamestream_event(mapping: Mapping, *, name: object, event_id: object = None, device_id: object = None,
                     user_id: object = None, client_time: object = None, sent_at: object = None,
                     properties: dict | None = None, fields: dict | None = None,
                     extra: dict | None = None) -> dict:
    """One vendor event as a gamestream event (a dict for `EventValidator`, which still checks every field):

    - eventName: `name`, or `purchaseEvent` when the mapping says it is a purchase (its own name kept in
      `eventParams.vendor_event`, its amount from the first of `mapping.amount` found in `properties`);
    - eventId: the vendor's event id; eventParams.device_id: the player (`mapping.player`'s id, else the other);
    - eventParams.client_event_time: the device's time of the event; sentAt: the device's time of sending;
    - eventParams: `properties` (renamed by `mapping.rename`; unknown ones land in eventParams_extra) and
      `fields` (the schema's own: platform, app_version, …) over them; `extra`: top-level keys kept in
      event_extra (the vendor, the user id, …).
    Raises `Reject` with the reason for an event without a name or a player."""
    if not isinstance(name, str) or not name:
        raise Reject("the event has no name")
    ids = {"device": device_id, "user": user_id}
    player = ids[mapping.player] if _present(ids[mapping.player]) else ids[_other(mapping.player)]
    if not _present(player):
        raise Reject(f"the event has neither a device id nor a user id ({mapping.vendor} sends one of them)")
    params: dict[str, Any] = {}
    for key, value in (properties or {}).items():
        params[mapping.rename.get(key, key)] = value
    params.update({k: v for k, v in (fields or {}).items() if v is not None})
    params["device_id"] = str(player)
    if client_time is not None:
        params["client_event_time"] = client_time
    event_name = name
    if name in mapping.purchases:
        event_name = PURCHASE
        params[VENDOR_EVENT] = name
        amount = next((a for a in (number((properties or {}).get(k)) for k in mapping.amount) if a is not None),
                      None)
        if amount is not None:
            params["amount"] = amount
    event: dict[str, Any] = {"eventName": event_name, "eventParams": params}
    if _present(event_id):
        event["eventId"] = str(event_id)
    if sent_at is not None:
        event["sentAt"] = sent_at
    event.update({k: v for k, v in (extra or {}).items() if v is not None})
    return event


def _present(value: object) -> bool:
    return value is not None and str(value) != ""


def _other(player: str) -> str:
    return "user" if player == "device" else "device"


def number(value: object) -> float | None:
    """A finite amount from a number or a numeric string; None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def epoch_ms(value: object) -> str | None:
    """Epoch milliseconds (Amplitude's `time`, Snowplow's dtm/stm) as an RFC 3339 UTC timestamp; None when absent
    or not a number (the event is then stamped with the receive time)."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    try:
        moment = dt.datetime.fromtimestamp(value / 1000, dt.timezone.utc)
    except (OverflowError, OSError, ValueError):
        return None
    return moment.isoformat().replace("+00:00", "Z")

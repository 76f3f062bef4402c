"""The watermark, as Flink keeps it: the minimum over log partitions of the greatest eventTime folded from that
partition, minus the delay. A partition with no records at all, or fully consumed and idle past
`partition_idle_s`, does not hold it back; one that has not shown its first event yet holds it at -∞. It only
moves forward. A window (a day) whose end is at or below it is final."""

from __future__ import annotations

import datetime as dt
import time

from deltalake import DeltaTable

from gamestream.kpi.rows import DAY, UTC, us
from gamestream.log import EventLog
from gamestream.settings import Settings
from gamestream.tables import lake


def committed_offsets(settings: Settings, log: EventLog, positions: lake.TxnPositions,
                      events: DeltaTable) -> dict[int, int]:
    """Each log partition's offset committed to the events table as `events` sees it (a txn lookup per
    partition, ~5 ms each: the stage asks once per events-table version, not once per fold step)."""
    app_ids = {p: lake.txn_app_id(settings.pipeline, p) for p in range(log.partitions)}
    offsets = positions.offsets(events, list(app_ids.values()))
    return {p: offsets[app_id] for p, app_id in app_ids.items()}


def holding_partitions(settings: Settings, log: EventLog, committed: dict[int, int]) -> list[int]:
    """Log partitions that hold the watermark back: every partition with records, except those that are
    fully consumed (`committed`: offsets in the events table) and idle past the timeout."""
    now = time.time()
    holding = []
    tails = getattr(log, "partition_tails", None)  # a log that asks for every partition at once (Kafka)
    known = tails() if tails is not None else {}
    for p in range(log.partitions):
        last = known[p][0] if p in known else log.last_offset(p)
        if last == 0:
            continue
        consumed = committed.get(p, 0) >= last
        appended = known[p][1] if p in known else log.last_appended_at(p)
        idle = appended is None or now - appended > settings.partition_idle_s
        if consumed and idle:
            continue
        holding.append(p)
    return holding


def advanced(watermark: int | None, max_seen: dict[int, int], holding: list[int], delay_us: int) -> int | None:
    """The watermark after folding what `max_seen` holds: the least greatest eventTime of the `holding`
    partitions minus the delay, if that is above `watermark`; else `watermark` unchanged."""
    if not holding:
        return watermark
    seen = [max_seen.get(p) for p in holding]
    if any(s is None for s in seen):
        return watermark  # a partition that has not shown its first event yet holds the watermark at -∞
    candidate = min(seen) - delay_us  # type: ignore[type-var]
    if watermark is None or candidate > watermark:
        return candidate
    return watermark


def day_is_final(day: dt.date, watermark: int | None) -> bool:
    """Whether the day's end is at or below the watermark."""
    end = us(dt.datetime.combine(day + DAY, dt.time(), UTC))
    return watermark is not None and end <= watermark

"""Reading a shard: the iterator a read ends with, kept for the next read of the partition (`CachedIterator`),
and the records of a GetRecords answer."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from gamestream.log.base import LogRecord
from gamestream.log.kinesis.events import events_in


@dataclass
class CachedIterator:
    after: int  # the iterator returns records after this sequence
    iterator: str
    obtained: float  # monotonic

    def continues(self, after: int, max_age: float) -> bool:
        """Whether a read after `after` may go on with this iterator: it starts there, and is younger than
        `max_age` seconds (a shard iterator expires after 5 minutes)."""
        return self.after == after and time.monotonic() - self.obtained <= max_age


def records_of(partition: int, answer: dict[str, Any], after_offset: int) -> list[LogRecord]:
    """The records of a GetRecords answer after `after_offset` (one read from TRIM_HORIZON also returns those at
    or below it)."""
    records = []
    for item in answer.get("Records", []):
        offset = int(item["SequenceNumber"])
        if offset <= after_offset:
            continue
        data = bytes(item["Data"])
        stamp = item.get("ApproximateArrivalTimestamp")
        appended_at = stamp.timestamp() if stamp is not None else time.time()
        records.append(LogRecord(partition, offset, data, events_in(data), appended_at))
    return records


def ends_with_page(records: list[LogRecord], answer: dict[str, Any]) -> bool:
    """Whether `records` end with the answer's last record: then the answer's NextShardIterator continues right
    after them (not so when `max_records` cut the page short)."""
    return records[-1].offset == int(answer["Records"][-1]["SequenceNumber"])


def behind_latest(answer: dict[str, Any]) -> bool:
    """Kinesis says the iterator is behind the shard's tip (MillisBehindLatest > 0): an empty page is not the end."""
    return answer.get("MillisBehindLatest", 0) > 0

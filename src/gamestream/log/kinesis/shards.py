"""The stream's shards: their numbers (partition = shard number), hash-key ranges and lineage, read by ListShards
and cached (`ShardMap`), and routing by Kinesis' own rule (MD5 of the partition key within a hash-key range)."""

from __future__ import annotations

import hashlib
import threading
import time
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def shard_number(shard_id: str) -> int:
    """`shardId-000000000007` → 7."""
    return int(shard_id.rsplit("-", 1)[1])


def shard_id(partition: int) -> str:
    return f"shardId-{partition:012d}"


def hash_key(device_id: str) -> int:
    """Kinesis' hash of a partition key: MD5 as a 128-bit integer."""
    return int(hashlib.md5(device_id.encode()).hexdigest(), 16)


@dataclass(frozen=True, slots=True)
class Shard:
    number: int
    starting_hash: int
    ending_hash: int
    parents: tuple[int, ...]
    ending_sequence: int | None  # set once the shard is closed (split or merged)

    @property
    def closed(self) -> bool:
        return self.ending_sequence is not None


class ShardMap:
    """The stream's shards by number (ListShards, all pages, closed shards included), and the hash-key ranges of
    the open ones; read again when older than the `max_age` a caller gives, or when asked to refresh."""

    def __init__(self, list_shards: Callable[..., dict[str, Any]]) -> None:
        """`list_shards(**kwargs)` is one ListShards call (the caller's retries around it)."""
        self._list_shards = list_shards
        self.shards: dict[int, Shard] = {}
        self.open_ranges: list[tuple[int, int, int]] = []  # (starting hash, ending hash, number), sorted
        self._read_at = float("-inf")
        self._lock = threading.Lock()

    def _is_fresh(self, max_age: float) -> bool:
        return time.monotonic() - self._read_at < max_age

    def get(self, *, refresh: bool, max_age: float, stream: str) -> dict[int, Shard]:
        if not refresh and self._is_fresh(max_age):
            return self.shards
        with self._lock:
            if not refresh and self._is_fresh(max_age):
                return self.shards
            shards = self._read(stream)
            self.shards = shards
            self.open_ranges = sorted((s.starting_hash, s.ending_hash, s.number)
                                      for s in shards.values() if not s.closed)
            self._read_at = time.monotonic()
            return shards

    def _read(self, stream: str) -> dict[int, Shard]:
        shards: dict[int, Shard] = {}
        kwargs: dict[str, Any] = {"StreamName": stream}
        while True:
            answer = self._list_shards(**kwargs)
            for item in answer.get("Shards", []):
                shard = _shard_of(item)
                shards[shard.number] = shard
            token = answer.get("NextToken")
            if not token:
                return shards
            kwargs = {"NextToken": token}

    def expire(self) -> None:
        self._read_at = float("-inf")

    def open_shard_holding(self, key: int) -> int | None:
        """The open shard whose hash-key range holds `key`, as last read; None when none does."""
        ranges = self.open_ranges
        index = bisect_right(ranges, (key, float("inf"), 0)) - 1
        if index >= 0 and ranges[index][0] <= key <= ranges[index][1]:
            return ranges[index][2]
        return None


def _shard_of(item: dict[str, Any]) -> Shard:
    """A shard from ListShards' description of it."""
    parents = tuple(shard_number(item[key]) for key in ("ParentShardId", "AdjacentParentShardId") if item.get(key))
    ending = item.get("SequenceNumberRange", {}).get("EndingSequenceNumber")
    return Shard(shard_number(item["ShardId"]), int(item["HashKeyRange"]["StartingHashKey"]),
                 int(item["HashKeyRange"]["EndingHashKey"]), parents, int(ending) if ending is not None else None)

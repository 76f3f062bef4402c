"""Cross-request coalescing (`gamestream.api.coalesce`) on the real embedded log: the appends of one event-loop
turn go to the log as one submit, each request is answered once that is durable, failures reach every request."""

from __future__ import annotations

import asyncio
from pathlib import Path

from gamestream.api.coalesce import Coalescer, merge
from gamestream.log import Append, payload
from gamestream.log.sqlite import SqliteEventLog


def lines(tag: str, n: int) -> bytes:
    return b"\n".join(f'{{"eventName":"{tag}-{i}"}}'.encode() for i in range(n))


def test_merge_joins_each_partitions_ndjson_records_within_the_limit_and_keeps_arrow_records() -> None:
    arrow = Append(1, payload.MAGIC + b"x" * 10, 5)  # payload.is_arrow looks at the magic bytes
    groups = [[Append(0, b"a", 1), Append(1, b"b", 1)], [Append(0, b"cc", 2), arrow], [Append(0, b"d" * 6, 3)]]
    merged = merge(groups, limit=None)
    assert Append(0, b"a\ncc\n" + b"d" * 6, 6) in merged and Append(1, b"b", 1) in merged and arrow in merged
    assert len(merged) == 3
    bounded = merge(groups, limit=5)  # "a\ncc" is 4 bytes; adding the 6-byte record would pass 5
    assert [r for r in bounded if r.partition == 0] == [Append(0, b"a\ncc", 3), Append(0, b"d" * 6, 3)]
    assert merge([groups[0]], limit=None) == groups[0]  # one request: its records as they are


def test_requests_of_one_loop_turn_are_one_submit_and_all_answered_when_durable(tmp_path: Path) -> None:
    log = SqliteEventLog(tmp_path / "log", partitions=2)
    coalescer = Coalescer(log)

    async def requests() -> None:
        await asyncio.gather(*(coalescer.append([Append(i % 2, lines(f"r{i}", 3), 3)]) for i in range(40)))
        await coalescer.append([Append(0, lines("late", 1), 1)])

    try:
        asyncio.run(requests())
        assert (coalescer.groups, coalescer.requests) == (2, 41)
        assert log.group_commits == 2
        records = [r for p in range(2) for r in log.read(p, 0, 100)]
        assert sorted(r.events for r in records) == [1, 60, 60]  # one record per partition per group
        names = b"\n".join(r.payload for r in records).split(b"\n")
        assert len(names) == len(set(names)) == 121
    finally:
        log.close()


def test_a_group_the_log_refuses_fails_every_request_in_it(tmp_path: Path) -> None:
    log = SqliteEventLog(tmp_path / "log", partitions=2)
    log.close()  # a closed log refuses every submit
    coalescer = Coalescer(log)

    async def requests() -> list:
        return await asyncio.gather(*(coalescer.append([Append(0, lines("x", 1), 1)]) for _ in range(5)),
                                    return_exceptions=True)

    outcomes = asyncio.run(requests())
    assert len(outcomes) == 5 and all(isinstance(o, RuntimeError) for o in outcomes)


def test_after_a_group_the_log_refused_the_next_group_is_appended(tmp_path: Path) -> None:
    log = SqliteEventLog(tmp_path / "log", partitions=2)
    coalescer = Coalescer(log)

    async def group(partition: int) -> list:
        return await asyncio.gather(*(coalescer.append([Append(partition, lines("x", 1), 1)]) for _ in range(3)),
                                    return_exceptions=True)

    try:
        failed = asyncio.run(group(7))  # outside 0..1: the log refuses the whole submit
        assert all(isinstance(o, ValueError) for o in failed) and log.last_offset(0) == 0
        assert asyncio.run(group(1)) == [None, None, None]
        assert sum(r.events for r in log.read(1, 0, 10)) == 3
    finally:
        log.close()


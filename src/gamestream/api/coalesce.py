"""Cross-request coalescing: the appends of every request that reaches the log in one turn of the event loop go
to the log as one submit, with one wake-up when it is durable.

Without it, each request pays its own log submit (a queue hand-off to the log's writer, a future, a wake-up of
the event loop from the writer thread) and leaves its own records: a 10-event request split over 4 partitions
made 4 records of ~2 events, each a row (SQLite) or a message (NATS, Kinesis) for the processor to read. Here,
the requests' NDJSON records bound for one partition are joined into one record (within the log's record size
limit), Arrow records are passed as they are, and each request is answered once the whole group is durable —
durable before acknowledged, as before. A group that fails fails every request in it (503, nothing stored): the
log takes or refuses a submit as a whole.

Requests with an Idempotency-Key are not coalesced: the key is stored in the same log transaction as that
request's own records, and a replay must append none of them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from gamestream.log import Append, EventLog, payload


class Coalescer:
    """One log submit per event-loop turn for the requests that append in it (see the module docstring)."""

    def __init__(self, log: EventLog) -> None:
        self.log = log
        self.limit = log.max_record_bytes
        self._pending: list[tuple[Sequence[Append], asyncio.Future[None]]] = []
        self.groups = 0  # submits made, for the metrics
        self.requests = 0  # requests they carried

    async def append(self, appends: Sequence[Append]) -> None:
        """Returns once `appends` are durable in the log; raises what the log's submit raised."""
        loop = asyncio.get_running_loop()
        if not self._pending:
            loop.call_soon(self._flush, loop)
        done: asyncio.Future[None] = loop.create_future()
        self._pending.append((appends, done))
        await done

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        pending, self._pending = self._pending, []
        if not pending:
            return
        self.groups += 1
        self.requests += len(pending)
        try:
            submitted = self.log.submit(merge([appends for appends, _ in pending], self.limit), None)
        except Exception as error:  # refused before anything was written (closed, a partition out of range)
            _settle(pending, error)
            return
        def durable(future) -> None:
            loop.call_soon_threadsafe(_settle, pending, future.exception())

        submitted.add_done_callback(durable)


def _settle(pending: list[tuple[Sequence[Append], asyncio.Future[None]]], error: BaseException | None) -> None:
    for _, done in pending:
        if done.done():  # the request was cancelled (its client went away): nothing to tell it
            continue
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)


def merge(groups: Sequence[Sequence[Append]], limit: int | None) -> list[Append]:
    """The records of several requests as few records: NDJSON records of one partition joined (a record within
    `limit` bytes; None: no limit), Arrow records as they are; partitions in order of first appearance."""
    if len(groups) == 1:
        return list(groups[0])
    lines: dict[int, list[Append]] = {}
    out: list[Append] = []
    for appends in groups:
        for record in appends:
            if payload.is_arrow(record.payload):
                out.append(record)
            else:
                lines.setdefault(record.partition, []).append(record)
    for partition, records in lines.items():
        run: list[Append] = []
        size = 0
        for record in records:
            if run and limit is not None and size + 1 + len(record.payload) > limit:
                out.append(_joined(partition, run))
                run, size = [], 0
            run.append(record)
            size += len(record.payload) + (1 if size else 0)
        out.append(_joined(partition, run))
    return out


def _joined(partition: int, records: list[Append]) -> Append:
    if len(records) == 1:
        return records[0]
    return Append(partition, b"\n".join(r.payload for r in records), sum(r.events for r in records))

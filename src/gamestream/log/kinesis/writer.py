"""The writer of PutRecords batches: one thread that turns appends into PutRecords calls within Kinesis' limits,
keeping each append's order per shard through partial failures (`Writer`)."""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import stamina

from gamestream.log.base import Append, AppendResult
from gamestream.log.kinesis.errors import STREAM_BUSY_CODES, EntriesFailed, error_code, transient, unavailable
from gamestream.log.kinesis.shards import shard_id, shard_number

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
PUT_MAX_ENTRIES = 500  # PutRecords: entries per call
PUT_MAX_BYTES = 5 * MiB  # PutRecords: data + partition keys per call


@dataclass(eq=False)
class _Submit:
    records: Sequence[Append]
    future: Future
    offsets: list[int]
    queues: dict[int, collections.deque]  # shard → indices of this submit's records not yet stored, in order
    left: int


@dataclass(eq=False)
class _Entry:
    submit: _Submit
    index: int
    request: dict[str, Any]
    size: int


class Writer:
    """One thread that turns submits into PutRecords calls.

    **Order under partial failure.** PutRecords may store entry i+1 and fail entry i (each entry succeeds or fails
    on its own: ProvisionedThroughputExceededException, InternalFailure). If both were records of one append for
    the same shard, re-sending i would store it after i+1: the append's order would be lost; re-sending i and i+1
    would store i+1 twice. So the writer works in rounds, and a round holds at most one record per (submit,
    shard) pair — the first one of that submit for that shard not yet stored. A round is sent as few PutRecords
    calls as the limits allow; entries that fail are re-sent (only they) with backoff until every entry of the
    round has a SequenceNumber, and only then does the next round take the submit's next record for that shard.
    A record is therefore sent only after the previous record of its append for its shard is stored, so it gets
    a higher sequence number. Records of *different* submits share calls freely: concurrent appends promise no
    order between each other. The cost is one round trip per record of an append for one shard — an append of
    n records for one shard takes n calls. Producers of big appends (`load`) write records near 1 MiB, which is
    what a shard takes per second anyway; the collector's many small concurrent appends share rounds.

    A round that cannot be stored within PUT_RETRY_SECONDS fails its submits with LogUnavailable (records of
    those submits stored in earlier rounds stay stored: Kinesis has no transactions). While a round's failed
    entries wait for their retry, the next round waits too: a throttled shard slows every append of this writer
    (the collector then answers 503 once the retries are spent, which is the backpressure Kinesis asks for)."""

    def __init__(self, stream: str, *, put_records: Callable[[list[dict[str, Any]]], dict[str, Any]],
                 starting_hash: Callable[[int], int], on_stored: Callable[[int, int, int, float], None],
                 on_resharded: Callable[[], None], retry_seconds: Callable[[], float]) -> None:
        """`put_records(entries)` is one PutRecords call on `stream`; `starting_hash(shard)` the shard's
        StartingHashKey (raises when the shard map cannot be read or the shard is gone); `on_stored(partition,
        offset, events, appended_at)` is told of every record stored; `on_resharded()` when a record landed in
        another shard than the one it was sent to; `retry_seconds()` how long failed entries are retried (asked
        on each call, so a change of the log's PUT_RETRY_SECONDS takes effect at once)."""
        self._put_records = put_records
        self._starting_hash = starting_hash
        self._on_stored = on_stored
        self._on_resharded = on_resharded
        self._retry_seconds = retry_seconds
        self._lock = threading.Condition()
        self._active: list[_Submit] = []
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"kinesis-writer-{stream}", daemon=True)
        self._thread.start()

    def submit(self, records: Sequence[Append], future: Future) -> None:
        queues: dict[int, collections.deque] = {}
        for index, record in enumerate(records):
            queues.setdefault(record.partition, collections.deque()).append(index)
        with self._lock:
            if self._closed:
                raise RuntimeError("the log is closed")
            self._active.append(_Submit(records, future, [0] * len(records), queues, len(records)))
            self._lock.notify()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._thread.join(timeout=self._retry_seconds() + 30)

    def _heads(self) -> list[tuple[_Submit, int, int]]:
        """(submit, shard, record index) of each submit's first record not yet stored, per shard."""
        return [(submit, shard, queue[0]) for submit in self._active for shard, queue in submit.queues.items()
                if queue]

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._active and not self._closed:
                    self._lock.wait()
                if not self._active:
                    return
                heads = self._heads()
            entries = []
            for submit, shard, index in heads:
                try:
                    starting_hash = self._starting_hash(shard)
                except Exception as error:  # the shard map could not be read, or the shard is gone
                    if not submit.future.done():
                        submit.future.set_exception(error)
                    continue
                record = submit.records[index]
                request = {"Data": record.payload, "PartitionKey": str(shard), "ExplicitHashKey": str(starting_hash)}
                entries.append(_Entry(submit, index, request, len(record.payload) + len(str(shard))))
            try:
                for call in self._calls(entries):
                    self._put(call)
            except BaseException as error:  # a bug, not the stream: fail the round's appends rather than hang
                logger.exception("the Kinesis writer failed a round")
                for entry in entries:
                    if not entry.submit.future.done():
                        entry.submit.future.set_exception(error)
            self._finish()

    @staticmethod
    def _calls(entries: list[_Entry]) -> list[list[_Entry]]:
        calls: list[list[_Entry]] = [[]]
        size = 0
        for entry in entries:
            if calls[-1] and (len(calls[-1]) >= PUT_MAX_ENTRIES or size + entry.size > PUT_MAX_BYTES):
                calls.append([])
                size = 0
            calls[-1].append(entry)
            size += entry.size
        return [call for call in calls if call]

    def _put(self, call: list[_Entry]) -> None:
        pending = [entry for entry in call if not entry.submit.future.done()]
        try:
            for attempt in stamina.retry_context(on=transient, attempts=None, timeout=self._retry_seconds(),
                                                 wait_initial=0.05, wait_max=2.0, wait_jitter=0.1):
                with attempt:
                    if not pending:
                        return
                    answer = self._put_records([e.request for e in pending])
                    failed, codes = [], collections.Counter()
                    for entry, result in zip(pending, answer["Records"]):
                        if result.get("SequenceNumber") and not result.get("ErrorCode"):
                            self._stored(entry, result)
                        else:
                            failed.append(entry)
                            codes[result.get("ErrorCode") or "no SequenceNumber"] += 1
                    pending = failed
                    if pending:
                        logger.debug("PutRecords: %d of %d entries failed (%s); re-sending them",
                                     len(failed), len(answer["Records"]), dict(codes))
                        raise EntriesFailed(codes)
        except Exception as error:
            problem: BaseException = unavailable(error, "PutRecords") if _is_unavailable(error) else error
            for entry in pending:
                if not entry.submit.future.done():
                    entry.submit.future.set_exception(problem)

    def _stored(self, entry: _Entry, result: dict[str, Any]) -> None:
        submit = entry.submit
        record = submit.records[entry.index]
        offset = int(result["SequenceNumber"])
        partition = shard_number(result.get("ShardId") or shard_id(record.partition))
        if partition != record.partition:
            logger.warning("a record for shard %d was stored in shard %d: the stream was resharded meanwhile",
                           record.partition, partition)
            self._on_resharded()
        submit.offsets[entry.index] = offset
        submit.left -= 1
        self._on_stored(partition, offset, record.events, time.time())

    def _finish(self) -> None:
        with self._lock:
            still = []
            for submit in self._active:
                if submit.future.done():  # failed
                    continue
                if submit.left == 0:
                    submit.future.set_result(AppendResult(submit.offsets))
                    continue
                for shard, queue in submit.queues.items():  # drop the heads that were stored
                    while queue and submit.offsets[queue[0]]:
                        queue.popleft()
                still.append(submit)
            self._active = still


def _is_unavailable(error: BaseException) -> bool:
    """The stream, not the request: throttled or unreachable past the retries, or being created or updated."""
    return transient(error) or error_code(error) in STREAM_BUSY_CODES

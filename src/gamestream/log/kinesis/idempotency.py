"""Idempotency keys honoured within this process only (`idempotency_scope = "process"`): an in-memory LRU of
IDEMPOTENCY_MAX_KEYS keys for IDEMPOTENCY_SECONDS. Across collector processes, or after a restart, a retried
request may append twice."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from gamestream.log.base import IDEMPOTENCY_SECONDS, Append, AppendResult, Idempotency

IDEMPOTENCY_MAX_KEYS = 100_000


@dataclass
class _Idem:
    future: Future
    response: bytes
    at: float


class ProcessIdempotency:
    """The appends of this process by idempotency key: the first append with a key is made (`enqueue`), the
    others replay its response."""

    def __init__(self, enqueue: Callable[[list[Append]], Future[AppendResult]]) -> None:
        self._enqueue = enqueue
        self._keys: collections.OrderedDict[str, _Idem] = collections.OrderedDict()
        self._lock = threading.Lock()

    def submit(self, records: list[Append], idempotency: Idempotency) -> Future[AppendResult]:
        """Checked and filled under one lock: of concurrent submits with one key, the first appends, the others
        wait for it and replay its response (or, if it failed, try again themselves)."""
        now = time.time()
        with self._lock:
            self._expire(now)
            known = self._keys.get(idempotency.key)
            if known is None:
                return self._first(records, idempotency, now)
        return self._replay(known, records, idempotency)

    def _expire(self, now: float) -> None:
        """The oldest first: those past IDEMPOTENCY_SECONDS, and beyond IDEMPOTENCY_MAX_KEYS (under the lock)."""
        while self._keys:
            oldest = next(iter(self._keys.values()))
            if now - oldest.at < IDEMPOTENCY_SECONDS and len(self._keys) < IDEMPOTENCY_MAX_KEYS:
                break
            self._keys.popitem(last=False)

    def _first(self, records: list[Append], idempotency: Idempotency, now: float) -> Future[AppendResult]:
        """The append of a key not seen yet (under the lock); a failed one frees its key."""
        first = self._enqueue(records)
        entry = _Idem(first, idempotency.response, now)
        self._keys[idempotency.key] = entry

        def forget_on_failure(done: Future, key: str = idempotency.key, entry: _Idem = entry) -> None:
            if done.exception() is not None:
                with self._lock:
                    if self._keys.get(key) is entry:
                        del self._keys[key]

        first.add_done_callback(forget_on_failure)
        return first

    def _replay(self, known: _Idem, records: list[Append], idempotency: Idempotency) -> Future[AppendResult]:
        """The response of the append already made with this key, once it is done."""
        result: Future[AppendResult] = Future()

        def replay(done: Future) -> None:
            if done.exception() is None:
                result.set_result(AppendResult([], replayed=known.response))
                return
            try:  # the first append failed: its key is free again, and this request tries itself
                again = self.submit(records, idempotency)
            except BaseException as error:
                result.set_exception(error)
                return
            again.add_done_callback(lambda f: result.set_exception(f.exception()) if f.exception() is not None
                                    else result.set_result(f.result()))

        known.future.add_done_callback(replay)
        return result

"""SIGTERM and SIGINT turned into a `threading.Event`, without a lock in the signal handler.

A Python signal handler runs in the main thread between two bytecodes — possibly while that very thread holds
the event's internal lock inside `event.wait(timeout)`. `Event.set()` from the handler then waits for that lock
forever: the process ignores every later SIGTERM and has to be killed (the Python documentation warns against
locks in handlers; seen as a processor that did not stop within 30 s of a SIGTERM). So the handler only writes a
byte to a pipe (a system call, no lock), and a thread of its own reads the pipe and sets the event.

    >>> import os, signal, threading
    >>> stop = threading.Event()
    >>> restore = stop_on_signals(stop)
    >>> os.kill(os.getpid(), signal.SIGTERM)
    >>> stop.wait(5)
    True
    >>> restore()
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def stop_on_signals(event: threading.Event, signals: tuple[int, ...] = SIGNALS) -> Callable[[], None]:
    """Sets `event` when one of `signals` arrives (from the main thread only, as `signal.signal` requires).
    Returns a function that puts the previous handlers back and ends the watcher thread."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)

    def handler(signum: int, frame: object) -> None:
        with contextlib.suppress(BlockingIOError):  # a full pipe already holds a wake-up
            os.write(write_end, b"s")

    previous = {sig: signal.signal(sig, handler) for sig in signals}
    watcher = threading.Thread(target=_watch, args=(read_end, event), name="stop-signals", daemon=True)
    watcher.start()

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)
        os.close(write_end)  # the watcher reads end-of-file and returns
        watcher.join()
        os.close(read_end)

    return restore


def _watch(read_end: int, event: threading.Event) -> None:
    """Sets `event` for each wake-up the handler writes; returns when the write end is closed."""
    while True:
        chunk = os.read(read_end, 64)
        if not chunk:
            return
        event.set()

"""SIGTERM and SIGINT reach the stop event even when they arrive while the main thread holds the event's lock.

A processor once ignored a SIGTERM for 30 s and had to be killed (CI, `test_ownership`): its main loop waits on
`stop_requested.wait(poll)`, and a handler calling `stop_requested.set()` ran inside that wait, in the same
thread, and waited forever for the lock the wait held. The child below reproduces that interleaving on purpose:
it holds the event's internal lock (what `Event.wait` does between its checks) while the signal is handled."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

CHILD = """
import os, signal, sys, threading, time
from gamestream.shutdown import stop_on_signals

stop = threading.Event()
if sys.argv[1] == "set-in-handler":
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
else:
    restore = stop_on_signals(stop)
with stop._cond:  # where the main thread is inside `stop.wait(timeout)` when the signal comes
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)  # the Python-level handler runs here, in this thread, with the lock held
print("stopped" if stop.wait(5) else "not stopped", flush=True)
if sys.argv[1] != "set-in-handler":
    restore()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
"""


def run_child(mode: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_setting_the_event_in_the_handler_hangs_where_the_pipe_and_thread_stop_at_once() -> None:
    naive = run_child("set-in-handler")
    try:
        with pytest.raises(subprocess.TimeoutExpired):  # the fault is real: the naive handler never returns
            naive.wait(timeout=3)
    finally:
        naive.kill()
        naive.wait()

    child = run_child("stop-on-signals")
    out, err = child.communicate(timeout=30)
    assert child.returncode == 0, err
    assert out.strip() == "stopped"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_processor_stops_on_the_signal_while_its_loop_polls_an_empty_log(tmp_path, sig) -> None:
    script = """
import sys
from pathlib import Path
from gamestream.log import open_log
from gamestream.process.processor import Processor
from gamestream.settings import Settings

settings = Settings(data_dir=Path(sys.argv[1]), partitions=2, poll_interval_s=0.001)
processor = Processor(settings, open_log(settings.data_dir, partitions=2))
processor.install_signal_handlers()
print("ready", flush=True)
processor.run()
print("ended", flush=True)
"""
    child = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "data")], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    child.send_signal(sig)
    out, err = child.communicate(timeout=30)
    assert child.returncode == 0, err
    assert out.strip() == "ended"

"""Crash safety of the processor: SIGKILL at random moments, restart, and every event is in the table once."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import gamestream, table_rows, write_ndjson
from gamestream.demo.generator import simulate

EVENTS = 200_000
KILLS = 20


def _wait_for_a_commit_after(events: Path, version: int, child: subprocess.Popen, timeout: float = 60) -> None:
    from gamestream.tables import lake

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and child.poll() is None:
        if lake.table_exists(str(events)) and lake.open_table(str(events)).version() > version:
            return
        time.sleep(0.01)


@pytest.mark.slow
def test_processor_killed_at_random_moments_leaves_every_event_exactly_once(tmp_path: Path) -> None:
    data = tmp_path / "data"
    rng = random.Random(20261125)
    events = list(simulate(events=EVENTS, users=2000, seed=3, days=2))
    nulls = [{"eventName": "levelEnd", "eventId": f"null-{i}", "eventTime": None,
              "eventParams": {"device_id": f"dev-{i}"}} for i in range(60)]
    lines = events + nulls
    rng.shuffle(lines)
    write_ndjson(tmp_path / "events.ndjson", lines)
    # records of 500 lines: 400 commits, so a kill lands in every phase and after-commit kills leave work to do
    # two worker processes validate the chunks (the pool `load` takes for big files), appended in order
    gamestream("load", str(tmp_path / "events.ndjson"), "--chunk-lines", "500", "--jobs", "2", data_dir=data)

    # Small batches make many commits, so a kill lands in every phase: decoding, writing Parquet files,
    # between the quarantine and the events commit, right after a commit.
    command = [sys.executable, "-m", "gamestream", "process", "--until-idle", "--data-dir", str(data),
               "--max-batch-events", "500", "--max-batch-wait", "0.05"]
    kills = 0
    finished_early = 0
    window = 0.12  # kills land up to this long after draining starts
    while kills < KILLS:
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        child.stderr.readline()  # "processing partitions …": the tables are open, draining starts now
        if kills == 0:  # the first run is killed right after its first commit; it says how long one takes here
            started = time.monotonic()
            from gamestream.tables import lake

            before = lake.open_table(str(data / "tables" / "events")).version()  # the processor made the table
            _wait_for_a_commit_after(data / "tables" / "events", before, child)
            # a quarter of the time to a first commit: 0.12 s on a quiet 2-core machine (0.5 s to the first commit),
            # wider when the machine is busy (the suite runs files in parallel), so kills still land mid-drain
            window = max(window, (time.monotonic() - started) / 4)
        elif kills % 2:  # every other run is killed a random moment after a commit of its own, so the drain
            # advances however busy the machine is (kills timed from the start alone may all land before one)
            from gamestream.tables import lake

            _wait_for_a_commit_after(data / "tables" / "events",
                                     lake.open_table(str(data / "tables" / "events")).version(), child)
        time.sleep(rng.uniform(0.0, window))
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            kills += 1
        else:
            finished_early += 1
            assert child.returncode == 0
            break
        child.wait()
        child.stderr.close()
    assert kills >= KILLS, f"the drain finished after only {kills} kills; make the batches smaller"

    # the kills interrupted a drain in progress: some batches were committed by the killed runs, not all
    from deltalake import DeltaTable

    committed_while_killing = DeltaTable(str(data / "tables" / "events")).version()
    assert committed_while_killing >= 10
    gamestream("process", "--until-idle", data_dir=data)  # the last restart drains the rest
    stored = Counter(row["eventId"] for row in table_rows(data / "tables" / "events", ["eventId"]))
    duplicates = {event_id: n for event_id, n in stored.items() if n > 1}
    assert not duplicates, f"{len(duplicates)} events written twice"
    assert set(stored) == {e["eventId"] for e in events}
    quarantined = Counter(json.loads(row["payload"])["eventId"]
                          for row in table_rows(data / "tables" / "events_quarantine", ["payload"]))
    assert quarantined == Counter(n["eventId"] for n in nulls)

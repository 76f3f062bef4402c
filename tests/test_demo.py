"""`gamestream demo`, run as a user runs it, for 30 seconds."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from conftest import gamestream, table_rows


@pytest.mark.slow
def test_demo_runs_for_30_seconds_and_the_table_holds_exactly_what_was_accepted(tmp_path: Path) -> None:
    data = tmp_path / "data"
    result = gamestream("demo", "--port", "0", "--duration", "30", "--rate", "1000", "--seed", "1", data_dir=data,
                        timeout=180)
    assert re.search(r"collector http://127\.0\.0\.1:\d+/v1/events", result.stdout)
    assert re.search(r"sent [\d,]+ · accepted [\d,]+ · rejected 0 · committed [\d,]+", result.stdout)
    accepted = int(re.search(r"generator accepted ([\d,]+) events", result.stdout)[1].replace(",", ""))
    committed = int(re.search(r"table committed ([\d,]+)", result.stdout)[1].replace(",", ""))
    assert accepted > 10_000  # ~1,000 events/s for 30 s
    ids = Counter(r["eventId"] for r in table_rows(data / "tables" / "events", ["eventId"]))
    assert sum(ids.values()) == len(ids) == accepted == committed

"""The generator: realistic, seeded events, written to a file or posted to a real collector."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from collector_server import ServeProcess
from conftest import gamestream, table_rows
from gamestream.demo.generator import simulate
from gamestream.schema import EventValidator, ValidEvent


def test_the_same_seed_gives_the_same_events_and_every_event_is_valid() -> None:
    first = list(simulate(events=3000, users=300, seed=4))
    assert first == list(simulate(events=3000, users=300, seed=4))
    assert first != list(simulate(events=3000, users=300, seed=5))
    validator = EventValidator(event_time="input")
    assert all(isinstance(validator.validate(json.dumps(e), None), ValidEvent) for e in first)


def test_the_event_mix_looks_like_a_game() -> None:
    events = list(simulate(events=50_000, users=2000, seed=1))
    names = Counter(e["eventName"] for e in events)
    assert {"sessionStart", "sessionEnd", "levelStart", "levelEnd", "scoreAdjustment", "purchaseEvent"} <= set(names)
    purchases = [e for e in events if e["eventName"] == "purchaseEvent"]
    assert all(e["eventParams"]["amount"] > 0 for e in purchases)
    assert all("scoreAdjustment" in e["eventParams"] for e in events if e["eventName"] == "scoreAdjustment")
    players = {e["eventParams"]["device_id"] for e in events}
    payers = {e["eventParams"]["device_id"] for e in purchases}
    assert 0 < len(payers) < 0.2 * len(players)  # most players never pay
    spend = Counter()
    for e in purchases:
        spend[e["eventParams"]["device_id"]] += e["eventParams"]["amount"]
    top = sorted(spend.values(), reverse=True)
    assert sum(top[: max(1, len(top) // 10)]) > 0.3 * sum(top)  # a few pay a lot
    assert {e["eventParams"]["platform"] for e in events} == {"ios", "android"}


def test_generate_posts_to_a_collector_and_reports_what_was_accepted(tmp_path: Path) -> None:
    server = ServeProcess(tmp_path / "data")
    try:
        result = gamestream("generate", "--target", server.url, "--events", "2500", "--batch", "50",
                            "--concurrency", "3", data_dir=tmp_path / "unused", env={"COLUMNS": "200"})
    finally:
        server.stop()
    assert re.search(r"sent 2,500 events in 50 requests .*: 2,500 accepted, 0 rejected, 0 retries, 0 failed",
                     result.stdout), result.stdout
    gamestream("process", "--until-idle", data_dir=tmp_path / "data")
    assert len(table_rows(tmp_path / "data" / "tables" / "events", ["eventId"])) == 2500


def test_generate_stopped_by_sigterm_has_recorded_every_event_it_was_answered_for(tmp_path: Path) -> None:
    """`--acked FILE`: what the demo's supervisor relies on. SIGTERM stops it once the requests in flight are
    answered; the file then lists exactly the events the collector acknowledged, which the table holds."""
    server = ServeProcess(tmp_path / "data")
    acked = tmp_path / "g.acked"
    try:
        generator = subprocess.Popen(
            [sys.executable, "-m", "gamestream", "generate", "--target", server.url, "--duration", "120",
             "--rate", "2000", "--batch", "20", "--concurrency", "4", "--acked", str(acked)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 60
        while (not acked.exists() or acked.read_text().count("\n") < 500) and time.monotonic() < deadline:
            assert generator.poll() is None, generator.stdout.read() if generator.stdout else ""
            time.sleep(0.1)
        generator.send_signal(signal.SIGTERM)
        output, _ = generator.communicate(timeout=60)
    finally:
        server.stop()
    assert generator.returncode == 0, output
    ids = acked.read_text().splitlines()
    counts = json.loads((tmp_path / "g.acked.counts").read_text())
    assert len(ids) >= 500 and counts["accepted"] == len(ids) == len(set(ids))
    assert counts["events_sent"] == len(ids) and counts["failed_events"] == 0  # every request sent was answered
    gamestream("process", "--until-idle", data_dir=tmp_path / "data")
    assert sorted(row["eventId"] for row in table_rows(tmp_path / "data" / "tables" / "events", ["eventId"])) \
        == sorted(ids)


def test_generate_out_writes_ndjson(tmp_path: Path) -> None:
    out = tmp_path / "e.ndjson"
    gamestream("generate", "--out", str(out), "--events", "100", "--days", "2", "--start", "2026-01-01",
               data_dir=tmp_path / "unused")
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 100 and lines[0]["eventTime"].startswith("2026-01-01")


def test_generate_to_log_appends_straight_to_the_log(tmp_path: Path) -> None:
    result = gamestream("generate", "--to-log", "--events", "1234", "--seed", "9", data_dir=tmp_path / "data")
    assert "1,234 accepted" in result.stdout
    gamestream("process", "--until-idle", data_dir=tmp_path / "data")
    expected = {e["eventId"] for e in simulate(events=1234, seed=9)}
    assert {r["eventId"] for r in table_rows(tmp_path / "data" / "tables" / "events", ["eventId"])} == expected

"""The commands on a NATS log (`--log nats://…`), end to end against a real nats-server: load and generate
append to the stream, status reads it, process drains it into the same tables as with the embedded log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import gamestream, table_rows, write_ndjson
from gamestream.ingest.loader import _split_by_size
from gamestream.demo.nats_cluster import NatsCluster


@pytest.fixture(scope="module")
def nats_url(tmp_path_factory: pytest.TempPathFactory):
    cluster = NatsCluster(tmp_path_factory.mktemp("nats"), nodes=1).start()
    yield cluster.url
    cluster.stop()


def test_a_partitions_lines_are_split_into_records_under_the_size_limit() -> None:
    lines = [b"x" * 100] * 25
    runs = list(_split_by_size(lines, 1000))
    assert [len(r) for r in runs] == [9, 9, 7]  # 9 lines of 101 bytes fit in 1,000
    assert all(len(b"\n".join(r)) <= 1000 for r in runs)
    assert [line for run in runs for line in run] == lines
    assert list(_split_by_size(lines, None)) == [lines]


def test_load_generate_status_and_process_on_a_nats_log(tmp_path: Path, nats_url: str) -> None:
    url = f"{nats_url}?stream=cli{tmp_path.name[-12:].replace('-', '_')}"
    data = tmp_path / "data"
    events = [{"eventId": f"e{i}", "eventName": "levelStart",
               "eventParams": {"device_id": f"d{i % 37}", "scoreAdjustment": i}} for i in range(3000)]
    events.append({"eventName": "levelStart", "eventParams": {"device_id": 7}})  # rejected with its reason
    loaded = gamestream("load", str(write_ndjson(tmp_path / "e.ndjson", events)), "--log", url,
                        "--partitions", "3", data_dir=data)
    assert "3,000 accepted" in loaded.stdout and "1 rejected" in loaded.stdout
    generated = gamestream("generate", "--to-log", "--events", "500", "--log", url, data_dir=data)
    assert "500 accepted" in generated.stdout
    status = gamestream("status", "--log", url, data_dir=data)
    assert "event log (nats://" in status.stdout and "disconnected" not in status.stderr
    log_part = status.stdout.split("tables")[0]
    # partition, appended, committed, not yet committed, duplicates dropped
    backlog = [int(cells[3].replace(",", "")) for line in log_part.splitlines()
               if len(cells := [c.strip() for c in line.split("│") if c.strip()]) == 5 and cells[0].isdigit()]
    assert len(backlog) == 3 and sum(backlog) == 3500  # every partition shown, nothing committed yet
    processed = gamestream("process", "--until-idle", "--log", url, data_dir=data, timeout=300)
    assert "committed 3,500 events" in processed.stdout, processed.stdout + processed.stderr
    rows = table_rows(data / "tables" / "events", ["eventId"])
    ids = [r["eventId"] for r in rows]
    assert len(ids) == 3500 == len(set(ids))
    assert {f"e{i}" for i in range(3000)} <= set(ids)
    again = gamestream("process", "--until-idle", "--log", url, data_dir=data, timeout=300)
    assert "committed 0 events" in again.stdout  # drained: the txn positions hold across runs
    counted = json.loads(gamestream("sql", "select count(*) as n from events", "--format", "json",
                                    data_dir=data).stdout)
    assert counted == [{"n": 3500}]

"""OPTIMIZE, VACUUM and automatic maintenance on real Delta tables, also while the processor appends."""

from __future__ import annotations

import json
import re
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from deltalake import DeltaTable

from conftest import gamestream, table_rows
from gamestream.tables import maintenance
from gamestream.log import Append, open_log
from gamestream.process.processor import Processor
from gamestream.settings import Settings


def event_line(event_id: str, day: int) -> bytes:
    return json.dumps({"eventId": event_id, "eventName": "levelStart", "eventTime": f"2026-11-0{day}T10:00:00Z",
                       "eventParams": {"device_id": f"d-{event_id}", "scoreAdjustment": 1}}).encode()


def append_records(settings: Settings, records: int, per_record: int = 10, prefix: str = "e") -> list[str]:
    """`records` log records of `per_record` events, spread over three days."""
    log = open_log(settings.data_dir, partitions=settings.partitions)
    ids = []
    try:
        for r in range(records):
            lines = []
            for i in range(per_record):
                ids.append(f"{prefix}{r}-{i}")
                lines.append(event_line(ids[-1], 1 + r % 3))
            log.append([Append(r % settings.partitions, b"\n".join(lines), per_record)])
    finally:
        log.close()
    return ids


def all_rows(uri: str) -> list[tuple]:
    rows = table_rows(uri)
    return sorted((r["eventId"], r["eventTime"], r["eventDate"], json.dumps(r["eventParams"], default=str))
                  for r in rows)


def referenced(uri: str) -> set[str]:
    """The files the table's current version references (paths relative to the table)."""
    return set(DeltaTable(uri).get_add_actions(flatten=True).column("path").to_pylist())


def files_on_disk(uri: str) -> set[str]:
    root = Path(uri)
    return {str(p.relative_to(root)) for p in root.rglob("*.parquet") if "_delta_log" not in p.parts}


@pytest.fixture(scope="module")
def small_files_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An events table made of 510 small commits (one record, one file per commit), built once."""
    settings = Settings(data_dir=tmp_path_factory.mktemp("small") / "data", partitions=2, batch_max_events=10)
    append_records(settings, 510)
    log = open_log(settings.data_dir, partitions=2)
    try:
        Processor(settings, log).run(until_idle=True)
    finally:
        log.close()
    assert DeltaTable(settings.table_uri("events")).version() >= 500
    return settings.data_dir


@pytest.fixture
def small_files(small_files_template: Path, tmp_path: Path) -> Settings:
    """A fresh copy of the 510-commit table for each test."""
    shutil.copytree(small_files_template, tmp_path / "data")
    return Settings(data_dir=tmp_path / "data", partitions=2)


def test_optimize_leaves_one_file_per_partition_with_the_same_rows_and_vacuum_removes_exactly_the_old_files(
        small_files: Settings) -> None:
    uri = small_files.table_uri("events")
    rows_before = all_rows(uri)
    referenced_before = referenced(uri)
    assert len(referenced_before) >= 500

    result = gamestream("optimize", data_dir=small_files.data_dir)
    assert re.search(r"3 partition\(s\) compacted \(\d+ files rewritten into 3\)", result.stdout)
    assert re.search(r"before\s+│\s+[\d,]+", result.stdout) and re.search(r"after\s+│\s+3 ", result.stdout)
    table = DeltaTable(uri)
    stats = maintenance.file_stats(table)
    assert all(files == 1 for files, _ in stats.partitions.values()) and len(stats.partitions) == 3
    assert all_rows(uri) == rows_before  # compared row by row, not counted
    unreferenced = referenced_before - referenced(uri)
    assert unreferenced == referenced_before  # every small file was rewritten

    # default retention (7 days): the rewritten files are younger, nothing goes
    kept = gamestream("vacuum", data_dir=small_files.data_dir)
    assert "deleted 0 unreferenced file(s)" in kept.stdout
    # a zero retention is refused without --force, with the reason
    refused = gamestream("vacuum", "--retain", "0h", data_dir=small_files.data_dir, check=False)
    assert refused.returncode == 2 and "time travel" in refused.stderr and "--force" in refused.stderr
    # dry run: lists exactly the unreferenced files, deletes nothing
    disk_before = files_on_disk(uri)
    dry = gamestream("vacuum", "--retain", "0h", "--force", "--dry-run", data_dir=small_files.data_dir)
    assert f"would delete {len(unreferenced):,} unreferenced file(s)" in dry.stdout
    assert files_on_disk(uri) == disk_before
    report = maintenance.vacuum(uri, retention_hours=0, force=True, dry_run=True)
    assert set(report.files) == unreferenced
    # the real thing: exactly those files go, the referenced ones stay, the rows are intact
    done = gamestream("vacuum", "--retain", "0h", "--force", data_dir=small_files.data_dir)
    assert f"deleted {len(unreferenced):,} unreferenced file(s)" in done.stdout
    assert files_on_disk(uri) == disk_before - unreferenced == referenced(uri)
    assert all_rows(uri) == rows_before
    status = gamestream("status", data_dir=small_files.data_dir).stdout
    assert re.search(r"events\s+│\s+\d+\s+│\s+5,100\s+│\s+3\s+│", status)
    assert "never" in status and re.search(r"│ 20\d\d-\d\d-\d\dT", status)  # last OPTIMIZE / VACUUM times


def test_two_optimize_runs_at_the_same_moment_leave_the_rows_unchanged(small_files: Settings) -> None:
    uri = small_files.table_uri("events")
    rows_before = all_rows(uri)
    command = [sys.executable, "-m", "gamestream", "optimize", "--data-dir", str(small_files.data_dir)]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    assert all_rows(uri) == rows_before
    # the library call without the lock: delta-rs 1.6.3 rejects the loser, which reloads and finds nothing to do
    results = []
    threads = [threading.Thread(target=lambda: results.append(maintenance.optimize(uri, zorder=["eventName"])))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and all_rows(uri) == rows_before


def test_the_seeds_sql_forms_of_optimize_and_vacuum(small_files: Settings) -> None:
    uri = small_files.table_uri("events")
    rows_before = all_rows(uri)
    data = small_files.data_dir
    one_day = json.loads(gamestream("sql", "OPTIMIZE events WHERE eventDate = '2026-11-01'", "--format", "json",
                                    data_dir=data).stdout)
    assert one_day[0]["partitions_optimized"] == 1 and one_day[0]["files_after"] == one_day[0]["files_before"] - (
        one_day[0]["files_removed"] - 1)
    by_path = json.loads(gamestream("sql", f"OPTIMIZE '{uri}' ZORDER BY (eventName)", "--format", "json",
                                    data_dir=data).stdout)
    assert by_path[0]["files_after"] == 3
    assert all_rows(uri) == rows_before
    refused = gamestream("sql", "VACUUM events RETAIN 12 HOURS", data_dir=data, check=False)
    assert refused.returncode == 2 and "under this table's minimum of 168 hours" in refused.stderr
    dry = json.loads(gamestream("sql", f"VACUUM '{uri}' RETAIN 168 HOURS DRY RUN", "--format", "json",
                                data_dir=data).stdout)
    assert dry == []  # nothing is a week old


def test_automatic_maintenance_compacts_crowded_partitions_and_checkpoints(small_files: Settings) -> None:
    settings = small_files.with_(compact_small_files=20, checkpoint_every=50)
    uri = settings.table_uri("events")
    rows_before = all_rows(uri)
    auto = maintenance.AutoMaintenance(settings, ["events"])
    assert auto.run_once()
    stats = maintenance.file_stats(DeltaTable(uri))
    assert max(files for files, _ in stats.partitions.values()) == 1
    assert all_rows(uri) == rows_before
    assert list((Path(uri) / "_delta_log").glob("*.checkpoint.parquet"))
    # one compactor at a time: while another process holds the lock, a round is skipped
    handle = maintenance.MaintenanceLock(settings).acquire(wait=True)
    try:
        code = ("from gamestream.tables import maintenance; from gamestream.settings import Settings; "
                f"from pathlib import Path; import os; s = Settings(data_dir=Path({str(settings.data_dir)!r})); "
                "print(maintenance.AutoMaintenance(s, ['events']).run_once()); os._exit(0)")
        skipped = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert skipped.stdout.strip() == "False"
    finally:
        handle.close()


@pytest.mark.slow
def test_optimize_and_vacuum_while_the_processor_appends_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", partitions=2)
    sent: list[str] = []
    stop = threading.Event()

    def producer() -> None:
        round_ = 0
        while not stop.is_set():
            sent.extend(append_records(settings, 20, per_record=25, prefix=f"r{round_}-"))
            round_ += 1
            time.sleep(0.05)

    append_records(settings, 1, prefix="first-")  # the log exists before the processor opens it
    sent.extend(f"first-0-{i}" for i in range(10))
    env = {**os.environ, "GAMESTREAM_BATCH_MAX_WAIT_S": "0.05"}
    processor = subprocess.Popen([sys.executable, "-m", "gamestream", "process", "--data-dir",
                                  str(settings.data_dir), "--partitions", "2"], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True, env=env)
    producing = threading.Thread(target=producer)
    producing.start()
    try:
        deadline = time.monotonic() + 30
        while not DeltaTable.is_deltatable(settings.table_uri("events")) and time.monotonic() < deadline:
            time.sleep(0.1)
        for _ in range(4):
            time.sleep(1.0)
            gamestream("optimize", data_dir=settings.data_dir)
            gamestream("vacuum", data_dir=settings.data_dir)
            gamestream("sql", "OPTIMIZE events", data_dir=settings.data_dir)
        assert processor.poll() is None, processor.stderr.read()
    finally:
        stop.set()
        producing.join()
        processor.send_signal(signal.SIGTERM)
        assert processor.wait(timeout=120) == 0, processor.stderr.read()
        processor.stderr.close()
    gamestream("process", "--until-idle", "--partitions", "2", data_dir=settings.data_dir)
    stored = Counter(r["eventId"] for r in table_rows(settings.table_uri("events"), ["eventId"]))
    assert [i for i, n in stored.items() if n > 1] == []
    assert set(stored) == set(sent)
    history = [c["operation"] for c in DeltaTable(settings.table_uri("events")).history()]
    assert history.count("OPTIMIZE") >= 4 and history.count("WRITE") > 20

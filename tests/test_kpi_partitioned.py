"""Partitioned KPIs (`kpi_mode = partitioned`): each partition's devices folded by the process that owns the
partition, the copies merged. The KPI tables must equal the plain-Python reference and the global stage's, with
1, 2 and 4 processors, partitions moving between processes, and a processor SIGKILLed in the middle of its folds."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from deltalake import DeltaTable

from conftest import gamestream, table_rows, write_ndjson
from gamestream.demo.generator import simulate
from gamestream.kpi import KpiStage, KpiStageSuperseded
from gamestream.log import connect
from gamestream.settings import Settings
from test_kpi import expected_kpis, kpi_tables, late_events, rounded_rows

UTC = dt.timezone.utc
PARTITIONED = {"GAMESTREAM_KPI_MODE": "partitioned"}
MERGED = ("kpi_events_hourly", "kpi_bookings_hourly", "kpi_daily", "kpi_retention", "kpi_top_events")


def process_with(data: Path, groups: list[str], env: dict | None = None) -> None:
    """`process --until-idle` in one process per partition group (`--only`), all at once."""
    children = [subprocess.Popen([sys.executable, "-m", "gamestream", "process", "--until-idle", "--only", only,
                                  "--data-dir", str(data)], env={**os.environ, **PARTITIONED, **(env or {})},
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for only in groups]
    for child in children:
        out, err = child.communicate(timeout=300)
        assert child.returncode == 0, f"{child.args} exited {child.returncode}:\n{out}\n{err}"


def kpi_txn(data: Path, name: str) -> int:
    return DeltaTable(str(data / "tables" / name)).transaction_version("gamestream-kpi") or 0


def test_partitioned_kpis_equal_the_reference_with_1_2_and_4_processors_and_partitions_moving(tmp_path: Path) -> None:
    """The reference test of test_kpi (five weeks, a late phase for day 1, a later phase), each phase processed
    by another number of processes, so every partition changes hands between phases: 2 processors, then 1, then
    4. Every KPI table equals the plain-Python answer."""
    data = tmp_path / "data"
    start = dt.datetime(2026, 10, 1, tzinfo=UTC)
    on_time = list(simulate(events=40_000, users=700, seed=21, start=start, days=35))
    late = late_events(start, 300, seed=1)
    later = list(simulate(events=3000, users=700, seed=22, start=start + dt.timedelta(days=35), days=0.5))
    phases = [on_time, late, later]
    for i, (phase, groups) in enumerate(zip(phases, (["0,1", "2,3"], ["0,1,2,3"], ["0", "1", "2", "3"]))):
        write_ndjson(tmp_path / f"phase{i}.ndjson", phase)
        gamestream("load", str(tmp_path / f"phase{i}.ndjson"), data_dir=data, env=PARTITIONED)
        process_with(data, groups)

    want_hourly, want_bookings, want_daily, want_cohorts, want_names = expected_kpis(phases)
    got_hourly, got_bookings, got_daily, got_cohorts, got_names = kpi_tables(data)
    assert sum(r["late_events"] for r in want_hourly.values()) == 300
    assert got_hourly == want_hourly
    assert rounded_rows(got_bookings) == rounded_rows(want_bookings)
    assert rounded_rows(got_daily) == rounded_rows(want_daily)
    assert rounded_rows(got_cohorts) == rounded_rows(want_cohorts)
    assert got_names == want_names
    # the partitioned path ran: every partition has its own copy, the global state tables were never written,
    # and the merged tables say they are complete up to the events table's last version
    tables = data / "tables"
    assert sorted(p.name for p in (tables / "kpi_parts").iterdir()) == ["p0", "p1", "p2", "p3"]
    assert all(table_rows(tables / "kpi_parts" / f"p{p}" / "kpi_devices") for p in range(4))
    assert not (tables / "kpi_activity").exists()
    events_version = DeltaTable(str(tables / "events")).version()
    assert {name: kpi_txn(data, name) for name in MERGED} == {name: events_version for name in MERGED}


def test_two_stages_folding_one_partition_at_once_never_leave_a_wrong_copy(tmp_path: Path) -> None:
    """Two part stages of one partition fold the same versions at once (two processes' final folds). Here one
    runs whole between the other's kpi_daily and kpi_retention commits — the interleaving that once left the
    partition's copy without the cohort of its newest devices (the late stage found them in kpi_devices already,
    so it saw no first day move). The late stage is fenced off; the copy's cohorts are its devices' first days."""
    data = tmp_path / "data"
    write_ndjson(tmp_path / "events.ndjson", list(simulate(events=4000, users=200, seed=3, days=3)))
    gamestream("load", str(tmp_path / "events.ndjson"), data_dir=data, env=PARTITIONED)
    gamestream("process", "--until-idle", "--no-kpi", data_dir=data, env=PARTITIONED)
    settings = Settings(data_dir=data, kpi_mode="partitioned")
    log = connect(settings)
    try:
        first, second = (KpiStage(settings, log, stop=threading.Event(), part=0) for _ in range(2))
        raised: list[BaseException] = []
        commit_retention = first._commit_retention

        def second_folds_first(*args, **kwargs):
            try:
                second.fold()
            except KpiStageSuperseded as error:
                raised.append(error)
            return commit_retention(*args, **kwargs)

        first._commit_retention = second_folds_first  # type: ignore[method-assign]
        first.fold()
    finally:
        log.close()
    assert len(raised) == 1, "the second stage folded over the first one's commits"
    copy = data / "tables" / "kpi_parts" / "p0"
    firsts = Counter(r["first_day"] for r in table_rows(copy / "kpi_devices"))
    assert len(firsts) >= 3
    assert {r["cohort_day"]: r["cohort_size"] for r in table_rows(copy / "kpi_retention")} == firsts


def tables_of(data: Path) -> dict[str, list[dict]]:
    def key(row: dict) -> tuple:  # the table's key: its first column (and the event name of top events)
        return next(iter(row.values())), row.get("eventName")

    return {name: rounded_rows({key(r): r for r in table_rows(data / "tables" / name)}) for name in MERGED}


@pytest.mark.slow
def test_a_processor_killed_in_the_middle_of_its_part_folds_ends_with_the_global_stages_tables(
        tmp_path: Path) -> None:
    """A processor folding partitioned KPIs in small versions is SIGKILLed once its partitions' copies have
    taken a few folds and before the merged tables are complete; a second run finishes. The KPI tables equal
    those the global stage computes from the same events."""
    events = list(simulate(events=30_000, users=400, seed=5, days=3))
    source = write_ndjson(tmp_path / "events.ndjson", events)
    small = {"GAMESTREAM_BATCH_MAX_EVENTS": "1500", "GAMESTREAM_KPI_VERSIONS_PER_FOLD": "2",
             "GAMESTREAM_KPI_INTERVAL_S": "0.2"}
    reference, data = tmp_path / "global", tmp_path / "partitioned"
    gamestream("load", str(source), data_dir=reference)
    gamestream("process", "--until-idle", data_dir=reference, env={"GAMESTREAM_KPI_MODE": "global"})

    gamestream("load", str(source), data_dir=data)
    child = subprocess.Popen([sys.executable, "-m", "gamestream", "process", "--data-dir", str(data)],
                             env={**os.environ, **PARTITIONED, **small}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    copy = data / "tables" / "kpi_parts" / "p0" / "kpi_retention"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            # version 3 committed (its log file there): opening the table while it is being created can fail
            if (copy / "_delta_log" / f"{3:020d}.json").exists():
                break
            time.sleep(0.05)
        else:
            pytest.fail("the partition's copy never took three folds")
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
    # the fault hit the middle of the folding: the merged tables were not complete when the process died
    events_version = DeltaTable(str(data / "tables" / "events")).version()
    merged = data / "tables" / "kpi_daily"  # (a table killed while being created has a directory, no commit)
    assert not (merged / "_delta_log" / f"{0:020d}.json").exists() or kpi_txn(data, "kpi_daily") < events_version

    gamestream("process", "--until-idle", data_dir=data, env={**PARTITIONED, **small})
    assert tables_of(data) == tables_of(reference)
    events_version = DeltaTable(str(data / "tables" / "events")).version()
    assert kpi_txn(data, "kpi_daily") == events_version


@pytest.mark.parametrize("backlog", [2000, 0], ids=["held-back", "never-waits"])
def test_a_processor_reads_no_further_while_its_part_folds_are_a_backlog_behind(tmp_path: Path, backlog: int) -> None:
    """`kpi_part_backlog_events`: the processor stops reading while its part stages hold that many committed
    events per partition they have not folded, and wakes their folds. The folding thread's own rounds are an hour
    apart here, so only that wake-up folds anything before the end: with the bound, no commit finds more than the
    bound plus the one flush that may be in flight unfolded; without it (0), the backlog grows to nearly every
    event. Either way the KPI tables end complete and exact."""
    import json

    from gamestream import metrics
    from gamestream.log import Append, open_log, partition_for
    from gamestream.process.pipeline import Pipeline

    data = tmp_path / "data"
    events = list(simulate(events=24_000, users=400, seed=5, start=dt.datetime(2026, 10, 1, tzinfo=UTC), days=2))
    settings = Settings(data_dir=data, partitions=4, kpi_mode="partitioned", batch_max_events=2000,
                        kpi_part_backlog_events=backlog, kpi_interval_s=3600, kpi_part_interval_s=3600)
    waited = metrics.REGISTRY.get_sample_value("gamestream_kpi_backpressure_seconds_total") or 0.0
    log = open_log(data, partitions=4)
    try:
        by_partition: dict[int, list[bytes]] = {}
        for event in events:
            by_partition.setdefault(partition_for(event["eventParams"]["device_id"], 4), []).append(
                json.dumps(event).encode())
        log.append([Append(p, b"\n".join(lines[i:i + 100]), len(lines[i:i + 100]))
                    for p, lines in by_partition.items() for i in range(0, len(lines), 100)])
        pipeline = Pipeline(settings, log)
        unfolded: list[int] = []  # the part stages' backlog as each commit lands
        offer = pipeline.processor.on_commit

        def recording(version, rows, greatest_times) -> None:
            unfolded.append(sum(stage.backlog_rows() for stage in dict(pipeline.part_stages).values()))
            offer(version, rows, greatest_times)

        pipeline.processor.on_commit = recording
        pipeline.run(until_idle=True)
    finally:
        log.close()
    waited = (metrics.REGISTRY.get_sample_value("gamestream_kpi_backpressure_seconds_total") or 0.0) - waited
    assert len(unfolded) >= 12  # 24,000 events in batches of about 2,000
    if backlog:
        assert waited > 0
        assert max(unfolded) <= 4 * backlog + settings.batch_max_events, unfolded
    else:
        assert waited == 0
        assert max(unfolded) >= 20_000, unfolded
    daily = DeltaTable(str(data / "tables" / "kpi_daily")).to_pyarrow_table().to_pylist()
    assert sum(row["events"] for row in daily) == len(events)
    assert {name: kpi_txn(data, name) for name in MERGED} == {
        name: DeltaTable(str(data / "tables" / "events")).version() for name in MERGED}


def test_a_busy_processor_merges_at_most_every_part_interval_then_at_once_when_it_has_read_everything(
        tmp_path: Path) -> None:
    """While its processor commits and has more to read, the process holding the KPI role merges at most every
    `kpi_part_interval_s` (here an hour), however often its part folds move a copy (here often: the backlog bound
    is 1,000 events a partition, the batches 500 events); once it has read everything it merges at once, and the
    KPI tables equal the reference."""
    data = tmp_path / "data"
    start = dt.datetime(2026, 10, 1, tzinfo=UTC)
    events = list(simulate(events=30_000, users=300, seed=7, start=start, days=3))
    write_ndjson(tmp_path / "events.ndjson", events)
    gamestream("load", str(tmp_path / "events.ndjson"), "--partitions", "2", "--chunk-lines", "500", data_dir=data,
               env=PARTITIONED)
    env = {"GAMESTREAM_KPI_PART_INTERVAL_S": "3600", "GAMESTREAM_KPI_BACKLOG_INTERVAL_S": "3600",
           "GAMESTREAM_KPI_PART_BACKLOG_EVENTS": "1000",
           "GAMESTREAM_KPI_INTERVAL_S": "0.1"}
    gamestream("process", "--until-idle", "--max-batch-events", "500", data_dir=data, env={**PARTITIONED, **env})

    tables = data / "tables"
    events_version = DeltaTable(str(tables / "events")).version()
    part_folds = sum(DeltaTable(str(tables / "kpi_parts" / f"p{p}" / "kpi_retention")).version() for p in (0, 1))
    merges = DeltaTable(str(tables / "kpi_daily")).version()  # one commit a merge round that changed something
    assert events_version >= 40 and part_folds >= 20, (events_version, part_folds)  # busy for many rounds
    # at most one merge while busy (the first round, on a host up for more than the interval), then the rounds
    # after the last commit and the final fold's
    assert merges <= 4, f"{merges} merges for {part_folds} part folds"
    assert kpi_txn(data, "kpi_daily") == events_version
    want_hourly, _, want_daily, _, _ = expected_kpis([events])
    got_hourly, _, got_daily, _, _ = kpi_tables(data)
    assert got_hourly == want_hourly
    assert rounded_rows(got_daily) == rounded_rows(want_daily)


@pytest.mark.parametrize("mode", ["partitioned", "global"])
def test_a_live_processor_folds_and_merges_every_round_whatever_the_backlog_interval(tmp_path: Path, mode: str
                                                                                     ) -> None:
    """The other side of the KPIs' cadence: a processor on a live log (each read finds what arrived since the
    last, less than it asks for) merges (partitioned) or folds (global) every round, so the KPI tables follow
    each `load` within a few rounds, with `kpi_backlog_interval_s` (and `kpi_part_interval_s`) at an hour."""
    data = tmp_path / "data"
    start = dt.datetime(2026, 10, 1, tzinfo=UTC)
    env = {"GAMESTREAM_KPI_MODE": mode, "GAMESTREAM_KPI_PART_INTERVAL_S": "3600",
           "GAMESTREAM_KPI_BACKLOG_INTERVAL_S": "3600", "GAMESTREAM_KPI_INTERVAL_S": "0.2",
           "GAMESTREAM_BATCH_MAX_WAIT_S": "0.2"}
    gamestream("load", str(write_ndjson(tmp_path / "first.ndjson", list(simulate(
        events=300, users=50, seed=31, start=start, days=1)))), "--partitions", "2", data_dir=data, env=env)
    child = subprocess.Popen([sys.executable, "-m", "gamestream", "process", "--data-dir", str(data)],
                             env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    events_table = data / "tables" / "events"
    lags = []
    try:
        for round_ in range(3):
            batch = list(simulate(events=300, users=50, seed=40 + round_, start=start + dt.timedelta(days=round_),
                                  days=1))
            gamestream("load", str(write_ndjson(tmp_path / f"live{round_}.ndjson", batch)), data_dir=data, env=env)
            wanted = 300 * (round_ + 2)
            deadline = time.monotonic() + 60
            while not (events_table / "_delta_log").exists() or len(table_rows(events_table, ["eventId"])) < wanted:
                assert child.poll() is None, child.stderr.read()
                assert time.monotonic() < deadline, f"the events table never held {wanted} rows"
                time.sleep(0.05)
            landed = time.monotonic()
            version = DeltaTable(str(events_table)).version()
            while not (data / "tables" / "kpi_daily").exists() or kpi_txn(data, "kpi_daily") < version:
                assert time.monotonic() - landed < 30, "the KPI tables did not follow the live log"
                time.sleep(0.05)
            lags.append(time.monotonic() - landed)
    finally:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()
    # every round's events were merged within a few rounds of landing, not after the hour a backlog would wait
    assert max(lags) < 10, lags

"""KPI tables against answers computed independently, in plain Python, from the NDJSON that was loaded."""

from __future__ import annotations

import datetime as dt
import random
import shutil
from collections import defaultdict
from pathlib import Path

import pytest

from conftest import gamestream, kill_catch_ups, table_rows, write_ndjson
from kpi_reference import daily_and_cohorts
from gamestream.demo.generator import simulate
from gamestream.log import partition_for

UTC = dt.timezone.utc
HOUR = dt.timedelta(hours=1)
DELAY = dt.timedelta(minutes=180)


def parse(ts: str) -> dt.datetime:
    return dt.datetime.fromisoformat(ts.replace("Z", "+00:00")).astimezone(UTC)


def window_of(moment: dt.datetime) -> dt.datetime:
    return moment.replace(minute=0, second=0, microsecond=0)


def watermark(events: list[dict]) -> dt.datetime:
    """min over log partitions of the greatest eventTime seen in it, minus 180 minutes."""
    greatest: dict[int, dt.datetime] = {}
    for e in events:
        p = partition_for(e["eventParams"]["device_id"], 4)
        greatest[p] = max(greatest.get(p, parse(e["eventTime"])), parse(e["eventTime"]))
    return min(greatest.values()) - DELAY


def late_events(start: dt.datetime, count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    events = []
    for i in range(count):
        moment = start + dt.timedelta(seconds=rng.uniform(0, 18 * 3600))
        purchase = rng.random() < 0.3
        params = {"device_id": f"late-device-{rng.randrange(40)}", "platform": "ios"}
        if purchase:
            params["amount"] = rng.choice([0.99, 4.99, 19.99])
        events.append({"eventId": f"late-{seed}-{i}", "eventName": "purchaseEvent" if purchase else "levelEnd",
                       "eventTime": moment.isoformat().replace("+00:00", "Z"), "eventParams": params})
    return events


def expected_kpis(phases: list[list[dict]]) -> tuple[dict, dict, dict, dict, dict]:
    hourly: dict = defaultdict(lambda: {"events": 0, "late_events": 0})
    bookings: dict = defaultdict(lambda: {"bookings": 0.0, "purchases": 0, "late_events": 0})
    days: dict = defaultdict(lambda: {"devices": set(), "payers": set(), "events": 0, "bookings": 0.0})
    seen: list[dict] = []
    for phase in phases:  # each phase is loaded and processed before the next: one events-table version
        wm = watermark(seen) if seen else None
        for e in phase:
            t = parse(e["eventTime"])
            w = window_of(t)
            late = wm is not None and w + HOUR <= wm
            hourly[w]["events"] += 1
            hourly[w]["late_events"] += late
            day = days[t.date()]
            day["devices"].add(e["eventParams"]["device_id"])
            day["events"] += 1
            if e["eventName"] == "purchaseEvent":
                amount = e["eventParams"].get("amount") or 0.0
                bookings[w]["bookings"] += amount
                bookings[w]["purchases"] += 1
                bookings[w]["late_events"] += late
                day["payers"].add(e["eventParams"]["device_id"])
                day["bookings"] += amount
        seen += phase
    final_wm = watermark(seen)
    for table in (hourly, bookings):
        for w, row in table.items():
            row["window_end"] = w + HOUR
            row["final"] = w + HOUR <= final_wm
    daily, cohorts, names = daily_and_cohorts(seen)
    return dict(hourly), dict(bookings), daily, cohorts, names


def rounded(row: dict) -> dict:
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()}


def kpi_tables(data: Path) -> tuple[dict, dict, dict, dict, dict]:
    hourly = {r.pop("window_start"): r for r in table_rows(data / "tables" / "kpi_events_hourly")}
    bookings = {r.pop("window_start"): r for r in table_rows(data / "tables" / "kpi_bookings_hourly")}
    daily = {r.pop("eventDate"): r for r in table_rows(data / "tables" / "kpi_daily")}
    cohorts = {r.pop("cohort_day"): r for r in table_rows(data / "tables" / "kpi_retention")}
    names = {(r["eventDate"], r["eventName"]): r["events"] for r in table_rows(data / "tables" / "kpi_top_events")}
    return hourly, bookings, daily, cohorts, names


def rounded_rows(rows: dict) -> dict:
    return {k: rounded(r) for k, r in rows.items()}


def load_and_process(tmp_path: Path, data: Path, events: list[dict], name: str) -> None:
    write_ndjson(tmp_path / f"{name}.ndjson", events)
    gamestream("load", str(tmp_path / f"{name}.ndjson"), data_dir=data)
    gamestream("process", "--until-idle", data_dir=data)


def test_kpi_tables_equal_independent_answers_including_late_events_after_the_watermark(tmp_path: Path) -> None:
    """Five weeks of play (so D30 is measurable for the first cohorts), a late phase for day 1 long after it
    was final, and a later phase: every KPI table equals the plain-Python answer over the raw events."""
    data = tmp_path / "data"
    start = dt.datetime(2026, 10, 1, tzinfo=UTC)
    on_time = list(simulate(events=40_000, users=700, seed=21, start=start, days=35))
    late = late_events(start, 300, seed=1)  # all of day 1: long final by then
    later = list(simulate(events=3000, users=700, seed=22, start=start + dt.timedelta(days=35), days=0.5))
    phases = [on_time, late, later]
    for i, phase in enumerate(phases):
        load_and_process(tmp_path, data, phase, f"phase{i}")

    want_hourly, want_bookings, want_daily, want_cohorts, want_names = expected_kpis(phases)
    got_hourly, got_bookings, got_daily, got_cohorts, got_names = kpi_tables(data)
    assert sum(r["late_events"] for r in want_hourly.values()) == 300  # the late phase is entirely late
    assert any(not r["final"] for r in want_hourly.values()) and any(r["final"] for r in want_hourly.values())
    assert got_hourly == want_hourly
    assert rounded_rows(got_bookings) == rounded_rows(want_bookings)
    assert rounded_rows(got_daily) == rounded_rows(want_daily)
    assert rounded_rows(got_cohorts) == rounded_rows(want_cohorts)
    assert got_names == want_names
    # the data exercise what they claim to: cohorts retained at D1, D7 and D30, sessions that merge
    assert all(any((r[f"d{n}_users"] or 0) > 0 for r in want_cohorts.values()) for n in (1, 7, 30))
    assert any(r["d30"] is None for r in want_cohorts.values())  # the later cohorts: not measurable yet
    assert len(want_daily) >= 35 and sum(r["new_users"] for r in want_daily.values()) == len(
        {e["eventParams"]["device_id"] for phase in phases for e in phase})
    # windows are upserted, never duplicated
    assert len(table_rows(data / "tables" / "kpi_events_hourly")) == len(want_hourly)


def test_processing_again_changes_no_kpi_table(tmp_path: Path) -> None:
    from deltalake import DeltaTable

    data = tmp_path / "data"
    load_and_process(tmp_path, data, list(simulate(events=3000, users=100, seed=3, days=1)), "a")
    names = ("kpi_events_hourly", "kpi_bookings_hourly", "kpi_daily", "kpi_retention", "kpi_top_events",
             "kpi_activity", "kpi_devices")
    versions = [DeltaTable(str(data / "tables" / n)).version() for n in names]
    gamestream("process", "--until-idle", data_dir=data)
    assert [DeltaTable(str(data / "tables" / n)).version() for n in names] == versions


@pytest.mark.slow
def test_kpi_stage_killed_during_catch_up_ends_with_the_same_tables(tmp_path: Path) -> None:
    ingested = tmp_path / "ingested"
    start = dt.datetime(2026, 11, 1, tzinfo=UTC)
    events = list(simulate(events=30_000, users=1000, seed=8, start=start, days=4))
    events += late_events(start, 200, seed=2)  # in the same load: late only if the watermark passed them
    write_ndjson(tmp_path / "all.ndjson", events)
    gamestream("load", str(tmp_path / "all.ndjson"), "--chunk-lines", "2500", data_dir=ingested)  # many records
    # many small events-table versions (~100), no KPI yet: the KPI stage will have to catch up, one version per
    # fold, for far longer than the 8 runs below live before their kills
    gamestream("process", "--until-idle", "--no-kpi", "--max-batch-events", "300", data_dir=ingested)
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    shutil.copytree(ingested, reference)
    shutil.copytree(ingested, killed)
    env = {"GAMESTREAM_KPI_VERSIONS_PER_FOLD": "1"}
    gamestream("process", "--until-idle", data_dir=reference, env=env)

    kills = kill_catch_ups(killed, runs=8, pause=(0.1, 0.8), seed=4, env=env)
    assert kills >= 5
    from deltalake import DeltaTable

    folded = [DeltaTable(str(killed / "tables" / name)).transaction_version("gamestream-kpi") or 0
              for name in ("kpi_events_hourly", "kpi_daily", "kpi_retention")]
    events_version = DeltaTable(str(killed / "tables" / "events")).version()
    assert 0 < max(folded) < events_version, (folded, events_version)  # the kills interrupted a catch-up
    gamestream("process", "--until-idle", data_dir=killed, env=env)

    def normalised(data: Path) -> list[dict]:
        return [{k: {key: rounded(row) if isinstance(row, dict) else row for key, row in table.items()}}
                for k, table in zip(("hourly", "bookings", "daily", "retention", "names"), kpi_tables(data))]

    assert normalised(killed) == normalised(reference)
    hourly = kpi_tables(reference)[0]
    assert sum(r["late_events"] for r in hourly.values()) > 0  # the late rows did count as late


def test_kpi_metrics_show_the_folds_the_watermark_and_the_late_events(tmp_path: Path) -> None:
    import json

    from gamestream import metrics
    from gamestream.log import Append, open_log
    from gamestream.process.pipeline import Pipeline
    from gamestream.settings import Settings

    def sample(name: str, **labels: str) -> float:
        return metrics.REGISTRY.get_sample_value(name, labels) or 0.0

    def record(*times: str) -> Append:
        lines = [json.dumps({"eventId": f"m-{t}", "eventName": "levelEnd", "eventTime": t,
                             "eventParams": {"device_id": "d1"}}).encode() for t in times]
        return Append(0, b"\n".join(lines), len(lines))

    settings = Settings(data_dir=tmp_path / "data", partitions=1)
    folds, late = sample("gamestream_kpi_folds_total"), sample("gamestream_kpi_late_events_total")
    merges = sample("gamestream_commits_total", table="kpi_events_hourly")
    log = open_log(settings.data_dir, partitions=1)
    try:
        log.append([record("2026-11-01T10:00:00Z", "2026-11-01T20:30:00Z")])
        Pipeline(settings, log).run(until_idle=True)
        # 20:30 − 180 minutes: the window 12:00–13:00 is final, so an event for it is late
        assert sample("gamestream_kpi_watermark_seconds") == dt.datetime(2026, 11, 1, 17, 30, tzinfo=UTC).timestamp()
        log.append([record("2026-11-01T12:15:00Z")])
        Pipeline(settings, log).run(until_idle=True)
    finally:
        log.close()
    assert sample("gamestream_kpi_late_events_total") - late == 1
    assert sum(r["late_events"] for r in table_rows(settings.table_uri("kpi_events_hourly"))) == 1
    assert sample("gamestream_kpi_folds_total") - folds == 2
    assert sample("gamestream_commits_total", table="kpi_events_hourly") - merges == 2


@pytest.mark.parametrize("path", ["offered", "change data feed"])
def test_the_watermark_follows_the_partitions_rows_came_from_not_their_devices(tmp_path: Path, path: str) -> None:
    """A producer that does not route by device (the reference Lambda's random Kinesis keys): the device of
    partition 0's late rows hashes to partition 1. The watermark is taken from what each commit recorded, so
    partition 0 holds it at 12:00 − 180 min; a partition guessed from the device would have left partition 0
    unseen and the watermark at −∞, and no window would be final."""
    import json

    from deltalake import DeltaTable

    from gamestream.kpi import fold_once
    from gamestream.log import Append, open_log
    from gamestream.process.pipeline import Pipeline
    from gamestream.settings import Settings
    from gamestream.tables import lake

    device = next(f"dev-{i}" for i in range(100) if partition_for(f"dev-{i}", 2) == 1)

    def record(partition: int, *times: str) -> Append:
        lines = [json.dumps({"eventId": f"w-{partition}-{t}", "eventName": "levelEnd", "eventTime": t,
                             "eventParams": {"device_id": device}}).encode() for t in times]
        return Append(partition, b"\n".join(lines), len(lines))

    settings = Settings(data_dir=tmp_path / "data", partitions=2)
    log = open_log(settings.data_dir, partitions=2)
    try:
        log.append([record(0, "2026-11-01T07:10:00Z", "2026-11-01T12:00:00Z"), record(1, "2026-11-01T20:00:00Z")])
        Pipeline(settings, log, kpi=path == "offered").run(until_idle=True)
        if path == "change data feed":
            fold_once(settings)
    finally:
        log.close()
    commits = DeltaTable(settings.table_uri("events")).history()
    recorded = [lake.greatest_times_of(c) for c in commits if lake.greatest_times_of(c)]
    assert {p: t for r in recorded for p, t in r.items()} == {
        0: int(dt.datetime(2026, 11, 1, 12, tzinfo=UTC).timestamp() * 1e6),
        1: int(dt.datetime(2026, 11, 1, 20, tzinfo=UTC).timestamp() * 1e6)}
    final = {r["window_start"].hour: r["final"] for r in table_rows(settings.table_uri("kpi_events_hourly"))}
    # the watermark is 09:00: the 07:00 window is final, the 12:00 and 20:00 ones are not
    assert final == {7: True, 12: False, 20: False}


def test_a_data_directory_from_before_the_game_kpis_gains_them_without_replaying_history(tmp_path: Path) -> None:
    """A data directory written by a gamestream without the game KPIs has kpi_daily with the seed's six columns
    and no kpi_retention, kpi_top_events, kpi_activity or kpi_devices; its old events files may be vacuumed
    away. The next start builds the new tables from the events table as it is, and they equal the reference."""
    import pyarrow as pa
    from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake

    data = tmp_path / "data"
    start = dt.datetime(2026, 10, 1, tzinfo=UTC)
    first = list(simulate(events=8000, users=200, seed=31, start=start, days=9))
    second = list(simulate(events=2000, users=200, seed=32, start=start + dt.timedelta(days=9), days=1))
    load_and_process(tmp_path, data, first, "first")
    tables = data / "tables"
    folded = DeltaTable(str(tables / "kpi_daily")).transaction_version("gamestream-kpi")
    old_daily = pa.table(DeltaTable(str(tables / "kpi_daily")).to_pyarrow_table()).select(
        ["eventDate", "dau", "events", "bookings", "paying_users", "arpdau"])
    for name in ("kpi_daily", "kpi_retention", "kpi_top_events", "kpi_activity", "kpi_devices"):
        shutil.rmtree(tables / name)
    write_deltalake(str(tables / "kpi_daily"), old_daily, commit_properties=CommitProperties(
        app_transactions=[Transaction("gamestream-kpi", folded)]))
    # the history a replay would need is gone: compacted, and the old files vacuumed
    gamestream("optimize", "--table", "events", data_dir=data)
    gamestream("vacuum", "--table", "events", "--retain", "0h", "--force", data_dir=data)

    gamestream("process", "--until-idle", data_dir=data)  # no new event: the start alone builds them
    want = expected_kpis([first])
    got = kpi_tables(data)
    assert rounded_rows(got[2]) == rounded_rows(want[2])  # kpi_daily, every column
    assert rounded_rows(got[3]) == rounded_rows(want[3]) and got[4] == want[4]

    load_and_process(tmp_path, data, second, "second")
    want, got = expected_kpis([first, second]), kpi_tables(data)
    assert rounded_rows(got[2]) == rounded_rows(want[2])
    assert rounded_rows(got[3]) == rounded_rows(want[3]) and got[4] == want[4]


def test_a_busy_processor_folds_its_kpis_at_most_every_backlog_interval_then_at_once_when_it_has_read_everything(
        tmp_path: Path) -> None:
    """While the processor reads a backlog (its reads take all they ask for), the KPI stage folds at most every
    `kpi_backlog_interval_s` (here an hour), however short its rounds (here 0.05 s): a fold costs a commit per KPI
    table whatever its size. Once the processor has read everything, the stage folds at once, and the KPI tables
    equal the reference. (The other side, a live log folded every round: test_kpi_partitioned's
    `test_a_live_processor_folds_and_merges_every_round_whatever_the_backlog_interval`.)"""
    from deltalake import DeltaTable

    data = tmp_path / "data"
    events = list(simulate(events=30_000, users=300, seed=7, start=dt.datetime(2026, 10, 1, tzinfo=UTC), days=3))
    write_ndjson(tmp_path / "events.ndjson", events)
    gamestream("load", str(tmp_path / "events.ndjson"), "--partitions", "2", "--chunk-lines", "250", data_dir=data)
    env = {"GAMESTREAM_KPI_BACKLOG_INTERVAL_S": "3600", "GAMESTREAM_KPI_INTERVAL_S": "0.05"}
    gamestream("process", "--until-idle", "--max-batch-events", "250", data_dir=data, env=env)

    tables = data / "tables"
    events_version = DeltaTable(str(tables / "events")).version()
    assert events_version >= 80, events_version  # busy for many rounds of 0.05 s
    # The read that finds the end comes while the last commits are under way (the processor reads ahead of its
    # flush), and the fold after it waits for them only up to a round: on a slow machine it may land between the
    # last two. Before the one ahead of those, the processor was still reading its backlog.
    commits = sorted(c["timestamp"] for c in DeltaTable(str(tables / "events")).history())
    folds = [c for c in DeltaTable(str(tables / "kpi_daily")).history() if c["version"] > 0]  # 0 created it
    while_busy = [c for c in folds if c["timestamp"] < commits[-3]]
    assert folds and not while_busy, f"{len(while_busy)} folds while the processor committed {events_version} times"
    assert DeltaTable(str(tables / "kpi_daily")).transaction_version("gamestream-kpi") == events_version
    want, got = expected_kpis([events]), kpi_tables(data)
    assert got[0] == want[0]
    assert rounded_rows(got[2]) == rounded_rows(want[2])


def test_a_backlog_is_folded_ahead_as_it_is_committed_and_committed_by_one_fold_at_its_end(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While the processor reads a backlog and no fold is due, the KPI stage folds each version handed over to
    it as it lands (`KpiStage.prefold`) and commits nothing: at the backlog's end, one fold commits them all,
    with the few versions not folded yet (or two, around the last commit). The tables equal the reference, as
    when the fold comes at the end."""
    from gamestream.kpi.stage import KpiStage
    from gamestream.log import open_log
    from gamestream.process.pipeline import Pipeline
    from gamestream.settings import Settings

    data = tmp_path / "data"
    events = list(simulate(events=12_000, users=300, seed=11, start=dt.datetime(2026, 10, 1, tzinfo=UTC), days=3))
    write_ndjson(tmp_path / "events.ndjson", events)
    gamestream("load", str(tmp_path / "events.ndjson"), "--chunk-lines", "250", data_dir=data)

    folded: list[tuple[int, int]] = []  # (version folded, events-table versions committed by then)
    commits: list[int] = []  # the versions the folds committed
    pipelines: list[Pipeline] = []
    fold_version, commit_fold = KpiStage._fold_version, KpiStage._commit_fold

    def spy_fold_version(stage: KpiStage, version: int, rows, fold) -> None:
        folded.append((version, pipelines[0].processor.stats.commits))
        fold_version(stage, version, rows, fold)

    def spy_commit_fold(stage: KpiStage, fold, version: int) -> None:
        commits.append(version)
        commit_fold(stage, fold, version)

    monkeypatch.setattr(KpiStage, "_fold_version", spy_fold_version)
    monkeypatch.setattr(KpiStage, "_commit_fold", spy_commit_fold)
    settings = Settings(data_dir=data, batch_max_events=250, kpi_interval_s=0.05, kpi_backlog_interval_s=3600)
    log = open_log(settings.data_dir, partitions=4)
    try:
        pipelines.append(Pipeline(settings, log))
        pipelines[0].run(until_idle=True)
    finally:
        log.close()
    last = pipelines[0].processor.stats.commits
    assert last >= 30, last  # a backlog of many versions
    assert [v for v, _ in folded] == list(range(1, last + 1))  # each version once, in order
    ahead = [v for v, committed in folded if committed < last]
    assert len(ahead) >= last // 2, f"{len(ahead)} of {last} versions folded while the processor committed"
    # one fold committed the backlog; the read that finds the end comes while the last commits are under way,
    # and a fold then may land just before the last one (as in the test above): never while the processor was busy
    assert commits[-1] == last and len(commits) <= 2 and commits[0] >= last - 2, commits
    want, got = expected_kpis([events]), kpi_tables(data)
    assert got[0] == want[0] and got[1] == want[1]
    assert rounded_rows(got[2]) == rounded_rows(want[2]) and rounded_rows(got[3]) == rounded_rows(want[3])
    assert got[4] == want[4]


def test_a_folds_commits_run_at_once_where_nothing_orders_them_and_in_order_where_something_does(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`KpiStage._commit_fold`: activity before devices (it reads kpi_devices as it was), devices before the
    breakdowns and the derived rows (they read its new devices), kpi_daily before what reads it, kpi_retention
    last and alone (recovery's sign that a fold's derived commits are in); the hourly and top-event deltas
    beside the rest. Checked on when each commit ran, and the tables equal the reference."""
    import threading
    import time

    from gamestream.kpi.stage import KpiStage

    data = tmp_path / "data"
    events = list(simulate(events=6_000, users=200, seed=13, start=dt.datetime(2026, 10, 1, tzinfo=UTC), days=3))
    write_ndjson(tmp_path / "events.ndjson", events)
    gamestream("load", str(tmp_path / "events.ndjson"), data_dir=data)
    spans: dict[str, list[tuple[float, float]]] = defaultdict(list)
    lock = threading.Lock()

    def spied(name: str):
        method = getattr(KpiStage, name)

        def run(*args, **kwargs):
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                with lock:
                    spans[name.removeprefix("_commit_")].append((started, time.perf_counter()))
        return run

    for name in ("_commit_hourly", "_commit_names", "_commit_activity", "_commit_devices", "_commit_device_segments",
                 "_commit_daily", "_commit_daily_segments", "_commit_retention_segments", "_commit_retention"):
        monkeypatch.setattr(KpiStage, name, spied(name))
    from gamestream.log import open_log
    from gamestream.process.pipeline import Pipeline
    from gamestream.settings import Settings

    settings = Settings(data_dir=data)
    log = open_log(settings.data_dir, partitions=4)
    try:
        Pipeline(settings, log).run(until_idle=True)
    finally:
        log.close()
    assert len(spans["retention"]) == 1  # one fold
    span = {name: runs[0] if name != "hourly" else (runs[0][0], runs[1][1]) for name, runs in spans.items()}

    def before(first: str, then: str) -> bool:
        return span[first][1] <= span[then][0]

    def overlap(one: str, other: str) -> bool:
        return span[one][0] < span[other][1] and span[other][0] < span[one][1]

    assert before("activity", "devices")
    for then in ("device_segments", "daily", "daily_segments", "retention_segments"):
        assert before("devices", then), then
    assert before("daily", "daily_segments") and before("device_segments", "daily_segments")
    assert before("device_segments", "retention_segments") and before("daily", "retention_segments")
    for first in ("hourly", "names", "activity", "devices", "device_segments", "daily", "daily_segments",
                  "retention_segments"):
        assert before(first, "retention"), first
    assert overlap("hourly", "activity") or overlap("hourly", "devices")  # beside the rest
    assert overlap("device_segments", "daily") and overlap("daily_segments", "retention_segments")
    want, got = expected_kpis([events]), kpi_tables(data)
    assert got[0] == want[0] and got[1] == want[1]
    assert rounded_rows(got[2]) == rounded_rows(want[2]) and rounded_rows(got[3]) == rounded_rows(want[3])
    assert got[4] == want[4]


def test_a_kpi_stage_behind_its_processor_reads_back_what_it_was_not_handed(tmp_path: Path) -> None:
    """The processor hands its commits' rows to the KPI stage up to `kpi_offered_max_bytes` held (memory stays
    bounded however far behind the stage falls); the rest comes from the change data feed. A small bound and
    small folds make the stage switch between the two: the tables still equal the reference."""
    data = tmp_path / "data"
    events = list(simulate(events=12_000, users=300, seed=41, start=dt.datetime(2026, 10, 1, tzinfo=UTC), days=21))
    write_ndjson(tmp_path / "e.ndjson", events)
    gamestream("load", str(tmp_path / "e.ndjson"), "--chunk-lines", "500", data_dir=data)
    gamestream("process", "--until-idle", "--max-batch-events", "400", data_dir=data,
               env={"GAMESTREAM_KPI_ROWS_PER_FOLD": "300", "GAMESTREAM_KPI_OFFERED_MAX_BYTES": "60000"})
    want, got = expected_kpis([events]), kpi_tables(data)
    assert got[0] == want[0]
    assert rounded_rows(got[2]) == rounded_rows(want[2]) and rounded_rows(got[3]) == rounded_rows(want[3])
    assert got[4] == want[4]


@pytest.mark.parametrize("layout", ["in order", "runs out of order", "interleaved row by row"])
def test_rows_by_version_gives_each_versions_rows_in_their_order(layout: str) -> None:
    """The fold's split of a range's rows by commit version (`kpi.stage.rows_by_version`): runs of a version
    put together without copying, rows interleaved finely filtered; either way each version's rows in order."""
    import numpy as np
    import pyarrow as pa

    from gamestream.kpi.stage import rows_by_version

    versions = np.repeat(np.arange(5, 10), 600)  # 5 versions of 600 rows, in order
    if layout == "runs out of order":
        runs = np.split(versions, 10)  # runs of 300, shuffled
        random.Random(1).shuffle(runs)
        versions = np.concatenate(runs)
    elif layout == "interleaved row by row":
        versions = np.tile(np.arange(5, 10), 600)
    rows = pa.table({"_commit_version": versions, "n": np.arange(len(versions))})
    split = rows_by_version(rows)
    assert sorted(split) == [5, 6, 7, 8, 9]
    for version, table in split.items():
        assert table["n"].to_pylist() == np.flatnonzero(versions == version).tolist()
    assert rows_by_version(rows.slice(0, 0)) == {}

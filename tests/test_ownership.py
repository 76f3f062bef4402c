"""Who works on which partition: NATS KV leases (one holder, renewal, lapse, release), processors sharing the
partitions by themselves, the KPI stage's failover, and the Delta txn fence that keeps a stale owner from
writing anything twice — on a real nats-server, real Delta tables and the embedded SQLite log."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable

import pytest

from conftest import table_rows
from gamestream.demo.generator import simulate
from gamestream.kpi import KpiStage, KpiStageSuperseded
from gamestream.log import Append, open_log, partition_for
from gamestream.demo.nats_cluster import NatsCluster
from gamestream.log.ownership import KPI_ROLE, LeaseOwnership, LocalOwnership, bucket_name
from gamestream.process.processor import Processor
from gamestream.settings import Settings

TTL = 2
PARTITIONS = 4


@pytest.fixture(scope="module")
def nats_url(tmp_path_factory: pytest.TempPathFactory):
    cluster = NatsCluster(tmp_path_factory.mktemp("nats"), nodes=1).start()
    try:
        yield cluster.url
    finally:
        cluster.stop()


@pytest.fixture
def pipeline_name(request: pytest.FixtureRequest) -> str:
    """A pipeline (so a lease bucket) per test: one test's leftover leases never meet another's processors."""
    return "t" + str(abs(hash(request.node.name)) % 10**8)


def leases(url: str, pipeline: str, partitions: int = PARTITIONS) -> LeaseOwnership:
    return LeaseOwnership(url, pipeline=pipeline, partitions=partitions, ttl_s=TTL)


def holders(url: str, pipeline: str) -> dict[str, int]:
    """Key → pid of its holder, as the bucket itself says (not as any process believes)."""
    import nats

    async def read() -> dict[str, int]:
        connection = await nats.connect(url)
        try:
            js = connection.jetstream()
            bucket = bucket_name(pipeline)
            info = await js.stream_info(f"KV_{bucket}", subjects_filter=f"$KV.{bucket}.>")
            kv = await js.key_value(bucket)
            found = {}
            for subject in info.state.subjects or {}:
                key = subject.removeprefix(f"$KV.{bucket}.")
                try:
                    found[key] = json.loads((await kv.get(key)).value)["pid"]
                except Exception:
                    pass  # expired between the two reads
            return found
        finally:
            await connection.close()

    return asyncio.run(read())


def eventually(check: Callable[[], bool], within: float, what: str) -> float:
    """Waits until `check()` holds; returns how long it took."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > within:
            raise AssertionError(f"not within {within}s: {what}")
        time.sleep(0.1)
    return time.monotonic() - started


def settings_for(data: Path, pipeline: str = "gamestream") -> Settings:
    return Settings(data_dir=data, partitions=PARTITIONS, lease_ttl_s=TTL, pipeline=pipeline,
                    batch_max_wait_s=0.1, kpi_interval_s=0.2)


def append_events(log, events: list[dict], per_record: int = 20) -> None:
    by_partition: dict[int, list[dict]] = defaultdict(list)
    for event in events:
        by_partition[partition_for(event["eventParams"]["device_id"], PARTITIONS)].append(event)
    appends = []
    for partition, chunk in by_partition.items():
        for i in range(0, len(chunk), per_record):
            lines = chunk[i:i + per_record]
            appends.append(Append(partition, "\n".join(json.dumps(e) for e in lines).encode(), len(lines)))
    log.append(appends)


# A processor process with leases, on the embedded log: what `gamestream process --log nats://…` runs, with the
# SQLite log standing in for the NATS one (it is local, so all processes share one data directory here).
RUNNER = """
import os, sys
from pathlib import Path
from gamestream import logs
from gamestream.log import open_log
from gamestream.log.ownership import LeaseOwnership
from gamestream.process.pipeline import Pipeline
from gamestream.settings import Settings

logs.setup("json")
url, data, pipeline_name, kpi = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "kpi"
settings = Settings(data_dir=Path(data), partitions=4, lease_ttl_s=2, pipeline=pipeline_name,
                    batch_max_wait_s=0.1, kpi_interval_s=0.2, kpi_mode=sys.argv[5])
log = open_log(settings.data_dir, partitions=4)
ownership = LeaseOwnership(url, pipeline=pipeline_name, partitions=4, ttl_s=2)
pipeline = Pipeline(settings, log, kpi=kpi, ownership=ownership)
pipeline.install_signal_handlers()
print("ready", flush=True)
pipeline.run()
log.close()
sys.stdout.flush()
os._exit(0)
"""


def start_processor(url: str, data: Path, pipeline: str, *, kpi: bool = False,
                    kpi_mode: str = "global") -> subprocess.Popen:
    """A processor process; its log lines go to `<data>/../processor-<pid>.log` (read them when a test fails)."""
    with open(data.parent / f"processor-{time.monotonic_ns()}.log", "w") as log_file:
        child = subprocess.Popen([sys.executable, "-c", RUNNER, url, str(data), pipeline, "kpi" if kpi else "no-kpi",
                                  kpi_mode], stdout=subprocess.PIPE, stderr=log_file, text=True)
    assert child.stdout.readline().strip() == "ready"
    return child


def partitions_held_by(url: str, pipeline: str, pid: int) -> set[int]:
    return {int(key.removeprefix("partitions.")) for key, holder in holders(url, pipeline).items()
            if holder == pid and key.startswith("partitions.")}


def end(child: subprocess.Popen) -> None:
    if child.poll() is None:
        child.send_signal(signal.SIGCONT)
        child.kill()
    child.wait()


# ------------------------------------------------------------------------------------------- lease semantics
def test_a_lease_has_one_holder_is_kept_by_renewal_and_freed_at_once_by_release(nats_url: str,
                                                                                pipeline_name: str) -> None:
    first, second = leases(nats_url, pipeline_name), leases(nats_url, pipeline_name)
    try:
        assert first.claim(KPI_ROLE)
        assert not second.claim(KPI_ROLE)
        time.sleep(2.5 * TTL)  # well past the TTL: only renewals keep it
        assert first.holds(KPI_ROLE) and not second.claim(KPI_ROLE)
        assert holders(nats_url, pipeline_name)["roles.kpi"] == os.getpid()
        first.release_role(KPI_ROLE)
        assert not first.holds(KPI_ROLE)
        assert second.claim(KPI_ROLE)  # at once, no TTL to wait for
    finally:
        first.close()
        second.close()


HOLDER = """
import sys, time
from gamestream.log.ownership import LeaseOwnership
ownership = LeaseOwnership(sys.argv[1], pipeline=sys.argv[2], partitions=4, ttl_s=2)
assert ownership.claim("kpi")
while True:
    print("held" if ownership.holds("kpi") else "lost", flush=True)
    time.sleep(0.05)
"""


def test_a_holder_that_stops_renewing_loses_the_lease_after_the_ttl_and_knows_it_when_resumed(
        nats_url: str, pipeline_name: str) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, nats_url, pipeline_name], stdout=subprocess.PIPE,
                              text=True)
    other = leases(nats_url, pipeline_name)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert not other.claim(KPI_ROLE)
        holder.send_signal(signal.SIGSTOP)  # no renewals from here
        paused = time.monotonic()
        took = eventually(lambda: other.claim(KPI_ROLE), within=TTL + 3, what="the lease lapses")
        assert took >= TTL - 1 - 0.3  # not before the TTL (less the renewal interval it had already used)
        assert holders(nats_url, pipeline_name)["roles.kpi"] == os.getpid()
        assert time.monotonic() - paused < TTL + 3
        holder.send_signal(signal.SIGCONT)
        time.sleep(1.0)
        holder.send_signal(signal.SIGSTOP)
        # lines written while it was paused were "held"; once resumed it says "lost" and never "held" again
        os.set_blocking(holder.stdout.fileno(), False)
        lines = [line.strip() for line in holder.stdout.read().splitlines()]
        assert "lost" in lines
        assert "held" not in lines[lines.index("lost"):]
        assert other.holds(KPI_ROLE) and holders(nats_url, pipeline_name)["roles.kpi"] == os.getpid()
    finally:
        end(holder)
        other.close()


# ------------------------------------------------------------------------------------------------ balancing
def test_partitions_move_at_once_when_a_member_joins_or_leaves_not_at_the_next_round(
        nats_url: str, pipeline_name: str) -> None:
    """With a TTL of 30 s a member's own rounds come every 10 s; the nudges of a member joining and of a release
    make the others balance at once (each step here within 2 s, far below a round's interval)."""
    first = LeaseOwnership(nats_url, pipeline=pipeline_name, partitions=8, ttl_s=30)
    second = None
    try:
        assert first.interval == 10 and sorted(first.owned()) == list(range(8)) and not first.surplus()
        second = LeaseOwnership(nats_url, pipeline=pipeline_name, partitions=8, ttl_s=30)
        assert not second.owned()  # every partition is held: it must wait for the first to hand some over
        eventually(lambda: len(first.surplus()) == 4, within=2, what="the first member sees the second join")
        first.release(first.surplus())  # what a processor does once it has committed what it read of them
        eventually(lambda: len(second.owned()) == 4, within=2, what="the second takes the released partitions")
        assert not set(first.owned()) & set(second.owned())
        first.close()
        eventually(lambda: len(second.owned()) == 8, within=2, what="the second takes over a leaving member's")
    finally:
        first.close()
        if second is not None:
            second.close()


def run_in_thread(processor: Processor) -> threading.Thread:
    thread = threading.Thread(target=processor.run, daemon=True)
    thread.start()
    return thread


def test_processors_share_the_partitions_fairly_and_take_over_when_one_stops_or_dies(
        tmp_path: Path, nats_url: str, pipeline_name: str) -> None:
    settings = settings_for(tmp_path / "data", pipeline_name)
    log = open_log(settings.data_dir, partitions=PARTITIONS)
    first = Processor(settings, log, ownership=leases(nats_url, pipeline_name))
    second = None
    child = None
    try:
        assert first.partitions == [0, 1, 2, 3]  # alone: everything, from the first round
        first_thread = run_in_thread(first)
        second = Processor(settings, log, ownership=leases(nats_url, pipeline_name))
        second_thread = run_in_thread(second)

        def halves() -> bool:
            a, b = set(first.ownership.owned()), set(second.ownership.owned())
            return len(a) == 2 and len(b) == 2 and not a & b

        eventually(halves, within=3 * TTL, what="a joining processor gets half the partitions")
        assert sorted(holders(nats_url, pipeline_name)[f"partitions.{p}"] for p in range(4)) == [os.getpid()] * 4

        second.stop(drain=False)  # a clean stop releases at once
        second_thread.join(timeout=30)
        second.ownership.close()  # what a pipeline does when it returns: its member key goes too
        took = eventually(lambda: first.partitions == [0, 1, 2, 3], within=2 * TTL,
                          what="the remaining processor takes every partition back")
        assert took < TTL  # not waiting for leases to lapse

        child = start_processor(nats_url, settings.data_dir, pipeline_name)
        eventually(lambda: len(partitions_held_by(nats_url, pipeline_name, child.pid)) == 2, within=3 * TTL,
                   what="the child takes its half")
        assert len(first.partitions) == 2 and len(partitions_held_by(nats_url, pipeline_name, os.getpid())) == 2
        child.kill()
        killed = time.monotonic()
        eventually(lambda: first.partitions == [0, 1, 2, 3], within=TTL + 3, what="the killed child's partitions move")
        assert time.monotonic() - killed >= 0.5  # it did wait for the leases to lapse: nothing released them
        owners = holders(nats_url, pipeline_name)
        assert [owners[f"partitions.{p}"] for p in range(4)] == [os.getpid()] * 4
        first.stop(drain=False)
        first_thread.join(timeout=30)
        first.ownership.close()
        eventually(lambda: not any(k.startswith("partitions.") for k in holders(nats_url, pipeline_name)),
                   within=1, what="a clean stop releases every lease")
    finally:
        for processor in (first, second):
            if processor is not None:
                processor.stop(drain=False)
                processor.ownership.close()
        if child is not None:
            end(child)
        log.close()


# ------------------------------------------------------------------------------------------- the txn fence
def test_two_processors_that_both_believe_they_own_a_partition_commit_each_row_once(tmp_path: Path) -> None:
    """Split brain, made on purpose: two lock directories, so each processor holds "its" locks for the same
    partitions. Both read the same records; the second to flush finds them committed by the first."""
    settings = settings_for(tmp_path / "data")
    log = open_log(settings.data_dir, partitions=PARTITIONS)
    events = list(simulate(events=400, users=50, seed=5, days=0.2))
    later = list(simulate(events=60, users=10, seed=6, days=0.1))
    try:
        append_events(log, events)
        stale = Processor(settings, log, ownership=LocalOwnership(tmp_path / "locks-a", PARTITIONS))
        current = Processor(settings, log, ownership=LocalOwnership(tmp_path / "locks-b", PARTITIONS))
        stale._read_available()  # read, then "paused" before its flush
        current.run(until_idle=True)
        stale.flush()  # its table snapshot predates the other's commit: the commit conflicts, the retry skips
        assert stale.stats.events_committed == 0 and stale.stats.batches_skipped == 1
        append_events(log, later)
        both = [threading.Thread(target=p.run, kwargs={"until_idle": True}) for p in (stale, current)]
        for thread in both:  # both read and commit the new records at the same time
            thread.start()
        for thread in both:
            thread.join()
    finally:
        log.close()
    stored = Counter(row["eventId"] for row in table_rows(settings.table_uri("events"), ["eventId"]))
    expected = {e["eventId"] for e in events + later}
    assert set(stored) == expected and set(stored.values()) == {1}


def kpis_from_events(settings: Settings) -> dict[str, list[tuple]]:
    """The additive KPI columns, recomputed from the events table with plain Python."""
    hourly: dict = defaultdict(int)
    bookings: dict = defaultdict(lambda: [0.0, 0])
    daily: dict = defaultdict(lambda: [set(), 0, 0.0, set()])
    for row in table_rows(settings.table_uri("events"), ["eventTime", "eventName", "eventParams", "eventDate"]):
        window = row["eventTime"].replace(minute=0, second=0, microsecond=0)
        hourly[window] += 1
        day = daily[row["eventDate"]]
        day[0].add(row["eventParams"]["device_id"])
        day[1] += 1
        if row["eventName"] == "purchaseEvent":
            amount = row["eventParams"]["amount"] or 0.0
            bookings[window][0] += amount
            bookings[window][1] += 1
            day[2] += amount
            day[3].add(row["eventParams"]["device_id"])
    return {
        "kpi_events_hourly": sorted(hourly.items()),
        "kpi_bookings_hourly": sorted((w, round(b, 6), n) for w, (b, n) in bookings.items()),
        "kpi_daily": sorted((d, len(devices), n, round(b, 6), len(payers))
                            for d, (devices, n, b, payers) in daily.items()),
    }


def kpi_tables(settings: Settings) -> dict[str, list[tuple]]:
    hourly = table_rows(settings.table_uri("kpi_events_hourly"))
    bookings = table_rows(settings.table_uri("kpi_bookings_hourly"))
    daily = table_rows(settings.table_uri("kpi_daily"))
    return {
        "kpi_events_hourly": sorted((r["window_start"], r["events"]) for r in hourly),
        "kpi_bookings_hourly": sorted((r["window_start"], round(r["bookings"], 6), r["purchases"])
                                      for r in bookings),
        "kpi_daily": sorted((r["eventDate"], r["dau"], r["events"], round(r["bookings"], 6), r["paying_users"])
                            for r in daily),
    }


def test_a_superseded_kpi_stage_stops_instead_of_folding_versions_twice(tmp_path: Path) -> None:
    settings = settings_for(tmp_path / "data")
    log = open_log(settings.data_dir, partitions=PARTITIONS)
    batches = [list(simulate(events=300, users=40, seed=10 + i, days=0.3)) for i in range(4)]

    def commit(batch: list[dict]) -> None:
        append_events(log, batch)
        Processor(settings, log).run(until_idle=True)

    try:
        commit(batches[0])
        paused = KpiStage(settings, log)
        paused.fold()  # events version 1 folded in
        taken_over = KpiStage(settings, log)  # recovers from the KPI tables: version 1
        commit(batches[1])
        commit(batches[2])
        taken_over.fold()
        commit(batches[3])
        before = kpi_tables(settings)
        with pytest.raises(KpiStageSuperseded):
            paused.fold()  # its deltas start after version 1; the tables are at 3: it would count 2 and 3 twice
        assert kpi_tables(settings) == before
        taken_over.fold()
    finally:
        log.close()
    assert kpi_tables(settings) == kpis_from_events(settings)


# ----------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_processors_started_stopped_killed_and_paused_past_their_lease_store_every_event_once_copies_too(
        tmp_path: Path, nats_url: str, pipeline_name: str) -> None:
    data = tmp_path / "data"
    settings = settings_for(data, pipeline_name)
    log = open_log(data, partitions=PARTITIONS)
    appended: list[str] = []
    sent: list[dict] = []
    stop_appending = threading.Event()
    copies = random.Random(3)

    def appender() -> None:  # new events, and copies of earlier ones (an SDK's retries): each must land once
        seed = 100
        while not stop_appending.is_set():
            batch = list(simulate(events=200, users=30, seed=seed, days=0.05))
            again = copies.sample(sent, min(len(sent), 40))
            append_events(log, batch + again, per_record=5)
            appended.extend(e["eventId"] for e in batch + again)
            sent.extend(batch)
            seed += 1
            time.sleep(0.05)

    appending = threading.Thread(target=appender, daemon=True)
    appending.start()
    children: list[subprocess.Popen] = []
    try:
        children = [start_processor(nats_url, data, pipeline_name) for _ in range(2)]
        time.sleep(1.5)
        children.append(start_processor(nats_url, data, pipeline_name))  # joins: shares are recomputed
        time.sleep(1.5)
        children[0].send_signal(signal.SIGTERM)  # a clean stop: releases at once
        assert children[0].wait(timeout=30) == 0
        time.sleep(1.0)
        children[1].kill()  # its leases lapse after the TTL
        time.sleep(1.0)
        children.append(start_processor(nats_url, data, pipeline_name))
        time.sleep(1.0)
        paused = children[2]
        eventually(lambda: partitions_held_by(nats_url, pipeline_name, paused.pid) != set(), within=3 * TTL,
                   what="the processor to pause owns partitions")
        paused.send_signal(signal.SIGSTOP)  # paused past its TTL, with records read and not committed
        time.sleep(TTL + 2.5)
        # its partitions moved to the last processor alive meanwhile
        assert partitions_held_by(nats_url, pipeline_name, paused.pid) == set()
        assert partitions_held_by(nats_url, pipeline_name, children[3].pid) == {0, 1, 2, 3}
        paused.send_signal(signal.SIGCONT)  # wakes up believing, for an instant, that it owns partitions
        time.sleep(2.0)
        stop_appending.set()
        appending.join()
        expected = set(appended)
        survivors = [c for c in children if c.poll() is None]
        assert len(survivors) == 2

        def all_stored() -> bool:
            return len(table_rows(settings.table_uri("events"), ["eventId"])) >= len(expected)

        eventually(all_stored, within=30, what="the survivors commit every appended event")
        for child in survivors:
            child.send_signal(signal.SIGTERM)
            assert child.wait(timeout=30) == 0
    finally:
        stop_appending.set()
        for child in children:
            end(child)
        log.close()
    stored = Counter(row["eventId"] for row in table_rows(settings.table_uri("events"), ["eventId"]))
    duplicates = {event_id: n for event_id, n in stored.items() if n > 1}
    assert not duplicates, f"{len(duplicates)} events written more than once"
    assert set(stored) == expected and sum(stored.values()) == len(expected) < len(appended)


@pytest.mark.slow
@pytest.mark.parametrize("kpi_mode", ["global", "partitioned"])
def test_when_the_kpi_stage_holder_dies_another_processor_runs_it_and_the_kpis_stay_exact(
        tmp_path: Path, nats_url: str, pipeline_name: str, kpi_mode: str) -> None:
    """Two processors on NATS leases; the one holding the KPI role is SIGKILLed while events keep coming. The
    other takes the role over and the KPIs stay exact. Partitioned: the killed processor's partitions (and its
    part stages' copies) move to the survivor mid-run too, and the survivor merges."""
    data = tmp_path / "data"
    settings = settings_for(data, pipeline_name)
    log = open_log(data, partitions=PARTITIONS)
    children: list[subprocess.Popen] = []
    try:
        append_events(log, list(simulate(events=3000, users=200, seed=40, days=1)))
        children = [start_processor(nats_url, data, pipeline_name, kpi=True, kpi_mode=kpi_mode) for _ in range(2)]
        eventually(lambda: "roles.kpi" in holders(nats_url, pipeline_name), within=10, what="a KPI stage starts")
        holder = next(c for c in children if c.pid == holders(nats_url, pipeline_name)["roles.kpi"])
        survivor = next(c for c in children if c is not holder)
        eventually(lambda: os.path.exists(settings.table_uri("kpi_daily")) and table_rows(
            settings.table_uri("kpi_daily")) != [], within=20, what="the first KPI stage commits")
        append_events(log, list(simulate(events=3000, users=200, seed=41, days=1)))
        holder.kill()
        killed = time.monotonic()
        eventually(lambda: holders(nats_url, pipeline_name).get("roles.kpi") == survivor.pid, within=TTL + 4,
                   what="the surviving processor takes the KPI stage over")
        assert time.monotonic() - killed < TTL + 4
        append_events(log, list(simulate(events=3000, users=200, seed=42, days=1)))

        def caught_up() -> bool:
            return kpi_tables(settings) == kpis_from_events(settings) and len(
                table_rows(settings.table_uri("events"), ["eventId"])) == 9000

        eventually(caught_up, within=40, what="the new KPI stage folds everything, each version once")
        if kpi_mode == "partitioned":  # the killed processor's partitions moved, with their copies
            assert partitions_held_by(nats_url, pipeline_name, survivor.pid) == set(range(PARTITIONS))
            assert not os.path.exists(settings.table_uri("kpi_activity"))
            assert all(table_rows(settings.kpi_part_uri(p, "kpi_devices")) for p in range(PARTITIONS))
        survivor.send_signal(signal.SIGTERM)
        assert survivor.wait(timeout=30) == 0
    finally:
        for child in children:
            end(child)
        log.close()
    assert kpi_tables(settings) == kpis_from_events(settings)


def test_processors_starting_together_on_a_fresh_three_node_cluster_both_hold_leases(tmp_path: Path) -> None:
    """The lease bucket is created by whichever starts first and answers nothing until its replicas elected a
    leader: a member starting in that moment waits for it instead of failing."""
    import concurrent.futures

    for round_ in range(3):
        cluster = NatsCluster(tmp_path / f"nats{round_}", nodes=3).start()
        try:
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                started = list(pool.map(lambda _: LeaseOwnership(cluster.url, pipeline="together", partitions=4,
                                                                 ttl_s=2), range(2)))
            try:
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline and sorted(
                        p for o in started for p in o.owned()) != [0, 1, 2, 3]:
                    time.sleep(0.1)
                assert sorted(p for o in started for p in o.owned()) == [0, 1, 2, 3]  # each once
            finally:
                for ownership in started:
                    ownership.close()
        finally:
            cluster.stop()

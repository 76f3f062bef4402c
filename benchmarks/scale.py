"""Scale-out figures on this machine: the log's append rate, and processing throughput with M processors on P
partitions of a NATS JetStream log, single node and a 3-node R3 cluster (every node `sync_interval: always`).

    .venv/bin/python benchmarks/scale.py [--events 600000] [--quick] [--kafka]

1. appends: records of 100 events (what one collector request of 100 events to one partition makes), kept
   `c` in flight through `EventLog.submit` as concurrent collector requests do, for a few seconds each, into
   the embedded SQLite log (the peer), a single NATS node and a 3-node R3 cluster; records/s, events/s and the
   per-record latency;
2. processing: `gamestream generate --out` writes N events once; for each topology and P, `gamestream load`
   pre-fills a stream of P partitions (timed too: validate → NATS); then for each M, M `gamestream process
   --log …` processes (KPI stage on, as in production) on one fresh data directory, timed from launch until the
   events table holds all N rows (the sum of `num_records` of its add actions, polled) and until the KPI
   tables have folded the last events-table version. The processors' own Prometheus figures give the mean
   flush size, the mean Delta commit latency and the commit retries (conflicts between processors);
3. Delta commit cost: sequential commits of one 100-event batch with a txn action to a local events table — the
   per-commit cost that bounds one table's commit rate (on this disk; object storage is slower).

With `--quota CORES` (as root) every processor runs in a cgroup of its own limited to CORES of CPU (cgroup v1
`cpu.cfs_quota_us`, v2 `cpu.max`; benchmarks/cpu_quota.py) and the single nats-server node in another
(`--nats-quota`, 1 core), so that M processors behave like M small machines on this 2-core box instead of
sharing its cores: only section 4 runs, on one node, and it adds each processor's CPU seconds, the throttled
periods, how long after the events table the KPI tables were complete, and the efficiency rate(M) / (M ×
rate(1)), both for the events table alone and counted to the moment the KPI tables are complete. The
processors start as on a machine installed from the runtime pins (`installed_like_a_machine`): gamestream's
bytecode compiled, and the test pins this venv adds (pandas) hidden from them.

    .venv/bin/python benchmarks/scale.py --quota 0.2 --events 3000000 --partitions 8 --processors 1,2,4

With `--kafka` the local 3-broker Kafka cluster (gamestream/demo/kafka_cluster.py: KRaft, replication factor 3,
`min.insync.replicas` 2, every appended batch fsync'd, as the NATS nodes' `sync_interval: always`; the producer
idempotent with acks=all) is a topology too, measured after the NATS runs so that no idle JVM sits beside them,
with one broker start for all its runs: its data in a fresh directory under the work directory, the jars from
the usual cache (fetched from Maven Central once; Java 17+ needed). It is added to section 1 (the same
appends into a topic of 4 partitions) and to sections 3–4 (`gamestream load` into a topic of P partitions, then
the M processors on a fresh data directory per run; the partitions are shared by Kafka's consumer group
`<pipeline>.<topic>.processors`, a fresh pipeline name per run), and a section 5 sets Kafka's figures over
NATS' of the same run (R3 against R3, and against the single node). The brokers are stopped at the end, also
on an error, Ctrl-C or SIGTERM. With `--quota … --kafka` the same processor runs (and collector runs) follow
on Kafka once the NATS node is stopped: each processor and collector in its own budget, the three brokers
together in one budget of their own, `--kafka-quota` (default: the NATS node's `--nats-quota`, so the log gets
the same CPU whichever it is; 0 leaves the brokers outside any budget).

    .venv/bin/python benchmarks/scale.py --kafka
    .venv/bin/python benchmarks/scale.py --kafka --quota 0.2 --events 3000000 --partitions 8 --processors 1,2,4

Figures are printed with ratios against a peer measured in the same run; nothing asserts speed. On a 2-core
machine, processors beyond 2 (sharing the cores with nats-server, the KPI stage and this script's poller)
cannot add throughput: the table shows what happens, docs/scaling.md explains it.
Ends with `RESULT sqlite_append_eps=… nats1_append_eps=… r3_append_eps=… process_eps_best_1=…
process_eps_best_r3=… …`, with `--kafka` followed by `kafka_append_eps=… kafka_vs_r3_append=…
kafka_append_p50_ms=… kafka_load_eps_best=… kafka_vs_r3_load=… process_eps_best_kafka=… kafka_vs_r3_process=…`
(the quota mode's RESULT lines by `kafka_eff_P…_M…`, `kafka_eps_P…_M…`, `kafka_vs_nats_P…_M…`, and
`kafka_collector_…`, `kafka_vs_nats_collector_N…`).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import itertools
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import cpu_quota  # noqa: E402  (benchmarks/cpu_quota.py, beside this file)
from machine import installed_like_a_machine  # noqa: E402  (benchmarks/machine.py)

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
UTC = dt.timezone.utc
KAFKA = "kafka-r3"  # the topology name of the local 3-broker Kafka cluster in the tables and RESULT lines
# What the first processor logs once it owns partitions: NATS' lease bucket, Kafka's consumer group
STARTED_LINES = {"nats": "leases started", "kafka": "consumer group joined"}


def gamestream(*args: str) -> list[str]:
    return [PYTHON, "-m", "gamestream", *args]


def run(command: list[str], env: dict | None = None) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return time.perf_counter() - started, done.stdout


# ------------------------------------------------------------------------------------------------- appends
def append_rate(log, bodies: list[bytes], *, in_flight: int, seconds: float) -> dict:
    """Keeps `in_flight` one-record appends of 100 events outstanding for `seconds`; records/s and latency."""
    from gamestream.log import Append

    partitions = log.partitions
    latencies: list[float] = []
    futures: dict = {}
    sent = 0
    started = time.perf_counter()
    deadline = started + seconds
    while True:
        now = time.perf_counter()
        while len(futures) < in_flight and now < deadline:
            body = bodies[sent % len(bodies)]
            futures[log.submit([Append(sent % partitions, body, body.count(b"\n") + 1)])] = time.perf_counter()
            sent += 1
        if not futures:
            break
        done, _ = concurrent.futures.wait(list(futures), return_when=concurrent.futures.FIRST_COMPLETED)
        finished = time.perf_counter()
        for future in done:
            future.result()
            latencies.append(finished - futures.pop(future))
    elapsed = time.perf_counter() - started
    latencies.sort()
    events = sum(bodies[i % len(bodies)].count(b"\n") + 1 for i in range(sent))
    return {"records": sent, "records_s": sent / elapsed, "events_s": events / elapsed,
            "p50_ms": latencies[len(latencies) // 2] * 1000,
            "p99_ms": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1000}


def append_levels(work: Path, name: str, url: str | None, bodies: list[bytes], seconds: float,
                  levels: list[int], results: dict) -> None:
    """`append_rate` at each level into the log `url` (4 partitions; None: the embedded SQLite log), after a
    warm-up at that level; into `results[(name, level)]`."""
    from gamestream.log import connect
    from gamestream.settings import Settings

    try:
        log = connect(Settings(data_dir=work / f"append-{name}-data", partitions=4, log=url))
        try:
            for level in levels:
                print(f"  appends: {name}, {level} in flight …", flush=True)
                append_rate(log, bodies, in_flight=level, seconds=min(1.0, seconds / 4))  # warm-up
                results[(name, level)] = append_rate(log, bodies, in_flight=level, seconds=seconds)
        finally:
            log.close()
    finally:
        shutil.rmtree(work / f"append-{name}-data", ignore_errors=True)


def append_benchmarks(work: Path, bodies: list[bytes], seconds: float, levels: list[int]) -> dict:
    from gamestream.demo.nats_cluster import NatsCluster

    results: dict[tuple[str, int], dict] = {}
    backends = [("sqlite", None), ("nats-1", 1), ("nats-r3", 3)]
    for name, nodes in backends:
        cluster = NatsCluster(work / f"append-{name}", nodes=nodes).start() if nodes else None
        try:
            append_levels(work, name, f"{cluster.url}?stream=appends" if cluster else None, bodies, seconds, levels,
                          results)
        finally:
            if cluster:
                cluster.stop()
            shutil.rmtree(work / f"append-{name}", ignore_errors=True)
    return results


# ------------------------------------------------------------------------------------------------------ kafka
@contextlib.contextmanager
def kafka_brokers(work: Path, budget: cpu_quota.CpuQuota | None = None):
    """The local 3-broker KRaft cluster of `gamestream.demo.kafka_cluster` (replication factor 3,
    min.insync.replicas 2, every appended batch fsync'd), its data in a fresh directory under `work`, the jars
    from the usual cache (fetched once). With `budget`, the three broker JVMs are moved into that one cgroup once
    started (and warmed up). Yields the cluster; stops every broker at the end, also on an error or Ctrl-C: the
    brokers run in sessions of their own, so nothing else would stop them."""
    from gamestream.demo.kafka_cluster import KafkaCluster

    cluster = KafkaCluster(Path(tempfile.mkdtemp(prefix="kafka-", dir=work)), brokers=3)
    try:
        print(f"{KAFKA}: starting 3 Kafka brokers (data in {cluster.directory}) …", flush=True)
        started = time.perf_counter()
        cluster.start()
        warm_up_kafka(work, cluster.bootstrap)
        print(f"  started and warmed up in {time.perf_counter() - started:.0f}s: {cluster.bootstrap}", flush=True)
        if budget:
            for broker in cluster.members:
                budget.add(broker.pid)
        yield cluster
    finally:
        interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave brokers behind
        try:
            cluster.stop()
        finally:
            signal.signal(signal.SIGINT, interrupt)


def kafka_preflight() -> str | None:
    """Why the Kafka cluster could not start here (no Java; jars neither cached nor fetchable), checked before
    the NATS runs rather than after them; None when it can. Fetches the jars into the cache if they are not yet
    there (once)."""
    from gamestream.demo.kafka_cluster import fetch

    if shutil.which("java") is None:
        return "--kafka needs Java 17 or later on the PATH (Debian: apt-get install default-jre-headless)"
    try:
        fetch()
    except RuntimeError as error:
        return str(error)
    return None


def warm_up_kafka(work: Path, bootstrap: str) -> None:
    """What a new cluster makes once, on its first use, made before anything is timed — else the first timed run
    pays for it: the group coordinator's `__consumer_offsets` topic (a position committed), an idempotent
    producer's id (one append), and the singleton roles' coordination topic with a first role group (`kpi`
    claimed and let go)."""
    from gamestream.log import Append, connect
    from gamestream.log.ownership import open_ownership
    from gamestream.settings import Settings

    settings = Settings(data_dir=work / "kafka-warm-up", partitions=1, log=f"kafka://{bootstrap}/warm-up",
                        pipeline="scalewarmup")
    log = connect(settings)
    try:
        log.append([Append(0, b"{}", 1)])
        log.commit(settings.pipeline, 0, 1)
        ownership = open_ownership(settings, log.partitions)
        try:
            deadline = time.monotonic() + 60
            while not ownership.claim("kpi") and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            ownership.close()
    finally:
        log.close()
        shutil.rmtree(work / "kafka-warm-up", ignore_errors=True)


# ---------------------------------------------------------------------------------------------- processing
def free_port() -> int:
    from gamestream.demo.nats_cluster import free_port as pick

    return pick()


def scrape(port: int) -> dict[str, float]:
    """The processor's Prometheus figures we use (sums over label sets of the events table)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
    except OSError:
        return {}
    found: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(r'(gamestream_[a-z_]+)(\{[^}]*\})? ([0-9.e+-]+)$', line)
        if not match:
            continue
        name, labels, value = match[1], match[2] or "", float(match[3])
        if name.startswith("gamestream_commit_seconds") and 'table="events"' not in labels:
            continue
        if name.startswith("gamestream_commit_retries") and 'table="events"' not in labels:
            continue
        found[name] = found.get(name, 0.0) + value
    return found


class TablePoller:
    """Rows of the events table (sum of num_records of its add actions) and the KPI stage's folded version,
    read incrementally from the Delta log: nothing reads the Parquet files."""

    def __init__(self, data: Path, pipeline: str) -> None:
        self.data = data
        self.pipeline = pipeline
        self.events = None
        self.kpi = {}

    def rows(self) -> tuple[int, int]:
        from deltalake import DeltaTable

        uri = str(self.data / "tables" / "events")
        if self.events is None:
            if not DeltaTable.is_deltatable(uri):
                return 0, 0
            self.events = DeltaTable(uri)
        else:
            self.events.update_incremental()
        actions = self.events.get_add_actions(flatten=True)
        rows = sum(actions.column("num_records").to_pylist()) if actions.num_rows else 0
        return rows, self.events.version()

    def kpi_folded(self) -> int:
        from deltalake import DeltaTable

        folded = 0
        for name in ("kpi_events_hourly", "kpi_bookings_hourly", "kpi_daily"):
            uri = str(self.data / "tables" / name)
            if name not in self.kpi:
                if not DeltaTable.is_deltatable(uri):
                    continue
                self.kpi[name] = DeltaTable(uri)
            else:
                self.kpi[name].update_incremental()
            folded = max(folded, self.kpi[name].transaction_version(f"{self.pipeline}-kpi") or 0)
        return folded

    def history(self) -> list[tuple[float, int]]:
        """(commit time in s, rows added) of every data commit of the events table, oldest first."""
        commits = []
        for entry in self.events.history():
            metrics = entry.get("operationMetrics") or {}
            rows = int(metrics.get("num_added_rows", 0) or 0)
            if entry.get("operation") == "WRITE" and rows:
                commits.append((entry["timestamp"] / 1000, rows))
        return sorted(commits)


def process_run(work: Path, url: str, events: int, partitions: int, processors: int, label: str,
                timeout: float, quota: float | None = None) -> dict:
    """M `gamestream process` on one fresh data directory, timed until the events table holds every event and
    until the KPI stage has folded the last version. With `quota`, each in its own budget, started as on a
    machine (`installed_like_a_machine`)."""
    data = work / f"data-{label}"
    pipeline = re.sub(r"[^a-z0-9]", "", label.lower())
    env = {**os.environ, "GAMESTREAM_PIPELINE": pipeline, **(installed_like_a_machine(work) if quota else {})}
    ports = [free_port() for _ in range(processors)]
    logs = [open(work / f"process-{label}-{i}.log", "w") for i in range(processors)]
    poller = TablePoller(data, pipeline)
    groups = [cpu_quota.CpuQuota(f"{pipeline}-{i}", quota) for i in range(processors)] if quota else []
    started = time.perf_counter()
    launch = lambda i: subprocess.Popen(  # noqa: E731
        gamestream("process", "--log", url, "--data-dir", str(data), "--metrics-port", str(ports[i])),
        stdout=logs[i], stderr=subprocess.STDOUT, env=env, preexec_fn=groups[i].preexec if groups else None)
    # All M at once, as M machines started together on a backlog: the first to come up creates the lease bucket
    # (NATS) or the consumer group (Kafka) and takes every partition, and hands the others' shares over as they
    # join (a commit of what it read, then a release that nudges them).
    procs = [launch(i) for i in range(processors)]
    started_line = STARTED_LINES[url.split("://", 1)[0]]
    try:
        for i, proc in enumerate(procs):
            log_i = work / f"process-{label}-{i}.log"
            while started_line not in log_i.read_text():
                if proc.poll() is not None or time.perf_counter() - started > 60:
                    raise RuntimeError(f"{label}: processor {i} did not start; see {log_i}")
                time.sleep(0.05)
        rows = version = 0
        first_rows_at = None
        while rows < events:
            if time.perf_counter() - started > timeout:
                raise TimeoutError(f"{label}: {rows:,} of {events:,} rows after {timeout:.0f}s")
            dead = [p.args for p in procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{label}: a processor exited early; see {work}/process-{label}-*.log")
            time.sleep(0.2)
            rows, version = poller.rows()
            if rows and first_rows_at is None:
                first_rows_at = time.perf_counter()
        done = time.perf_counter()
        figures = [scrape(port) for port in ports]
        while poller.kpi_folded() < version and time.perf_counter() - done < 120:
            time.sleep(0.2)
        kpi_done = time.perf_counter() if poller.kpi_folded() >= version else None
        commits = poller.history()
        cpu_s = [group.cpu_seconds() for group in groups]
        throttled = sum(group.throttled_periods() for group in groups)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for handle in logs:
            handle.close()
        for group in groups:
            group.close()
    if rows != events:
        raise RuntimeError(f"{label}: the events table holds {rows:,} rows, expected {events:,}")
    total = lambda name: sum(f.get(name, 0.0) for f in figures)  # noqa: E731
    steady = None
    if len(commits) >= 3:
        # from the first data commit to the last: the rate once every processor is up and reading
        span = commits[-1][0] - commits[0][0]
        steady = (sum(r for _, r in commits[1:]) / span) if span > 0 else None
    shutil.rmtree(data, ignore_errors=True)
    commit_count = total("gamestream_commit_seconds_count")
    return {
        "P": partitions, "M": processors, "wall_s": done - started, "eps": events / (done - started),
        "first_rows_s": (first_rows_at or done) - started,
        "steady_eps": steady,
        "kpi_s": (kpi_done - started) if kpi_done else None,
        "commits": len(commits),
        "mean_flush": events / len(commits) if commits else 0,
        "commit_ms": 1000 * total("gamestream_commit_seconds_sum") / commit_count if commit_count else None,
        "retries": int(total("gamestream_commit_retries_total")),
        "cpu_s": sum(cpu_s) if groups else None,
        "throttled": throttled if groups else None,
    }


def commit_cost(work: Path, lines: list[bytes], commits: int) -> dict:
    """Sequential appends of one 100-event batch, each with a txn action, to a local events table: the fixed
    cost of a Delta commit (Parquet write + log entry) that a table's commit rate is bounded by."""
    from deltalake import CommitProperties, Transaction, write_deltalake

    from gamestream import schema
    from gamestream.log import LogRecord
    from gamestream.process.decode import decode_records
    from gamestream.tables import lake

    validator = schema.EventValidator(event_time="input")
    now = dt.datetime.now(UTC)
    canonical = [validator.validate(line, now).line for line in lines[:100]]
    rows = decode_records([LogRecord(0, 1, b"\n".join(canonical), len(canonical), 0.0)]).events_table()
    table = lake.open_events(str(work / "commit-cost" / "events"))
    seconds = []
    for version in range(1, commits + 1):
        started = time.perf_counter()
        write_deltalake(table, rows, mode="append", partition_by=[schema.PARTITION_COLUMN],
                        commit_properties=CommitProperties(app_transactions=[Transaction("bench-p0", version)]))
        seconds.append(time.perf_counter() - started)
    shutil.rmtree(work / "commit-cost", ignore_errors=True)
    return {"commits": commits, "mean_ms": statistics.mean(seconds) * 1000,
            "p50_ms": statistics.median(seconds) * 1000, "files": len(set(rows.column("eventDate").to_pylist()))}


# ------------------------------------------------------------------------------------------------------ main
def main() -> int:
    # SIGTERM ends the run as Ctrl-C does: through the `finally`s that stop the children and remove the cgroups
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=600_000, help="events pre-filled per stream")
    parser.add_argument("--quick", action="store_true", help="a small smoke run (seconds, not minutes)")
    parser.add_argument("--partitions", default=None, help="comma-separated P values (default 4,8,16)")
    parser.add_argument("--processors", default=None, help="comma-separated M values (default 1,2,4)")
    parser.add_argument("--append-seconds", type=float, default=None)
    parser.add_argument("--keep", type=Path, default=None, help="work in this directory and keep it")
    parser.add_argument("--quota", type=float, default=None, metavar="CORES",
                        help="each processor in its own cgroup with this much CPU (needs root); section 4 only")
    parser.add_argument("--nats-quota", type=float, default=1.0, metavar="CORES",
                        help="with --quota: the nats-server node's own budget (default 1 core)")
    parser.add_argument("--collectors", default=None, metavar="N,N",
                        help="with --quota: also N `gamestream serve` processes, each in its own budget, under a "
                             "load client outside the budgets (default 1,2,4; 0 skips)")
    parser.add_argument("--collector-seconds", type=float, default=None, help="with --collectors: per run")
    parser.add_argument("--kafka", action="store_true",
                        help="also the local 3-broker Kafka cluster (replication 3, min.insync.replicas 2), after "
                             "the NATS runs, with ratios against NATS; needs Java 17+ (and Maven the first time)")
    parser.add_argument("--kafka-quota", type=float, default=None, metavar="CORES",
                        help="with --quota --kafka: the three brokers' one budget together (default: the same "
                             "as --nats-quota; 0 leaves them outside any budget)")
    args = parser.parse_args()
    if args.kafka and (problem := kafka_preflight()):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.quota is not None:
        try:
            cpu_quota.check_available()
        except cpu_quota.QuotaUnavailable as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        return quota_main(args)
    if args.quick:
        n = min(args.events, 30_000) if "--events" in sys.argv else 30_000
        partitions = [int(p) for p in (args.partitions or "4,16").split(",")]
        processors = [int(m) for m in (args.processors or "1,2").split(",")]
        append_seconds = args.append_seconds or 1.0
    else:
        n = args.events
        partitions = [int(p) for p in (args.partitions or "4,8,16").split(",")]
        processors = [int(m) for m in (args.processors or "1,2,4").split(",")]
        append_seconds = args.append_seconds or 4.0
    levels = [1, 64]
    work = args.keep or Path(tempfile.mkdtemp(prefix="gamestream-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    begun = time.perf_counter()
    from gamestream.demo.nats_cluster import NatsCluster

    try:
        print(f"workload: {n:,} events …", flush=True)
        source = work / "events.ndjson"
        run(gamestream("generate", "--out", str(source), "--events", str(n), "--users", str(max(2000, n // 100)),
                       "--days", "3", "--seed", "2026", "--start", "2026-11-01"))
        lines = source.read_bytes().splitlines()
        bodies = [b"\n".join(lines[i:i + 100]) for i in range(0, min(len(lines), 100_000), 100)]

        print("appends: 100-event records into each log …", flush=True)
        appends = append_benchmarks(work, bodies, append_seconds, levels)

        print("delta: commit cost …", flush=True)
        cost = commit_cost(work, lines, 10 if args.quick else 40)

        loads: dict[tuple[str, int], float] = {}
        runs: list[dict] = []
        for topology, nodes in (("nats-1", 1), ("nats-r3", 3)):
            cluster = NatsCluster(work / f"cluster-{topology}", nodes=nodes).start()
            try:
                processing(work, topology, lambda p: f"{cluster.url}?stream=scale{p}", source, n, partitions,
                           processors, loads, runs)
            finally:
                cluster.stop()
                shutil.rmtree(work / f"cluster-{topology}", ignore_errors=True)

        if args.kafka:
            # last, alone on the machine: no idle JVMs beside the NATS runs, one broker start for both sections
            with kafka_brokers(work) as brokers:
                print("appends: 100-event records into Kafka …", flush=True)
                append_levels(work, KAFKA, f"kafka://{brokers.bootstrap}/appends", bodies, append_seconds, levels,
                              appends)
                processing(work, KAFKA, lambda p: f"kafka://{brokers.bootstrap}/scale{p}", source, n, partitions,
                           processors, loads, runs)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    total_s = time.perf_counter() - begun
    report(n, appends, levels, cost, loads, runs, total_s, quick=args.quick)
    return 0


def processing(work: Path, topology: str, url_for, source: Path, n: int, partitions: list[int],
               processors: list[int], loads: dict, runs: list[dict], *, timeout: float = 300,
               quota: float | None = None) -> None:
    """For each P: `gamestream load` into the log `url_for(P)` (a stream or topic of P partitions, timed into
    `loads`), then for each M a `process_run` (into `runs`)."""
    for p in partitions:
        url = url_for(p)
        print(f"{topology}: load {n:,} events into {p} partitions …", flush=True)
        seconds, _ = run(gamestream("load", str(source), "--log", url, "--partitions", str(p)))
        loads[(topology, p)] = seconds
        for m in processors:
            if quota:
                print(f"quota {quota:g} core each: {topology} P={p} M={m} …", flush=True)
            else:
                print(f"{topology}: P={p} M={m} …", flush=True)
            label = f"{'quota-' if quota else ''}{topology}-P{p}-M{m}"
            result = process_run(work, url, n, p, m, label, timeout=timeout, quota=quota)
            result["topology"] = topology
            runs.append(result)
            print(f"  {result['eps']:,.0f} events/s (wall), KPI {'complete' if quota else 'caught up'} at "
                  f"{result['kpi_s'] or float('nan'):.1f}s", flush=True)


def quota_main(args: argparse.Namespace) -> int:
    """Section 4 only, one NATS node in a budget of its own, each processor in its own CPU budget."""
    from gamestream.demo.nats_cluster import NatsCluster

    n = min(args.events, 30_000) if args.quick and "--events" not in sys.argv else args.events
    partitions = [int(p) for p in (args.partitions or ("4" if args.quick else "8")).split(",")]
    processors = [int(m) for m in (args.processors or ("1,2" if args.quick else "1,2,4")).split(",")]
    work = args.keep or Path(tempfile.mkdtemp(prefix="gamestream-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    begun = time.perf_counter()
    runs: list[dict] = []
    served: list[dict] = []
    brokers_cpu = None
    try:
        print(f"workload: {n:,} events …", flush=True)
        source = work / "events.ndjson"
        run(gamestream("generate", "--out", str(source), "--events", str(n), "--users", str(max(2000, n // 100)),
                       "--days", "3", "--seed", "2026", "--start", "2026-11-01"))
        with open(source, "rb") as handle:
            lines = [line.rstrip(b"\n") for _, line in zip(range(20_000), handle)]
        cluster = NatsCluster(work / "cluster", nodes=1).start()
        nats_group = cpu_quota.CpuQuota("nats", args.nats_quota)
        try:
            for node in cluster.members:
                nats_group.add(node.process.pid)
            for p in partitions:
                url = f"{cluster.url}?stream=quota{p}"
                print(f"nats-1: load {n:,} events into {p} partitions …", flush=True)
                run(gamestream("load", str(source), "--log", url, "--partitions", str(p)))
                for m in processors:
                    print(f"quota {args.quota:g} core each: P={p} M={m} …", flush=True)
                    result = process_run(work, url, n, p, m, f"quota-P{p}-M{m}", timeout=1800, quota=args.quota)
                    result["topology"] = "nats-1"
                    runs.append(result)
                    print(f"  {result['eps']:,.0f} events/s (wall), KPI complete at "
                          f"{result['kpi_s'] or float('nan'):.1f}s", flush=True)
            counts = [int(c) for c in (args.collectors or ("1,2" if args.quick else "1,2,4")).split(",") if int(c)]
            seconds = args.collector_seconds or (3.0 if args.quick else 15.0)
            for c in counts:
                print(f"quota {args.quota:g} core each: {c} collector(s), {seconds:g}s …", flush=True)
                served.append(collector_run(work, f"{cluster.url}?stream=collect{c}", c, args.quota, seconds, lines))
                print(f"  {served[-1]['eps']:,.0f} acknowledged events/s", flush=True)
        finally:
            cluster.stop()
            nats_group.close()

        kafka_quota = args.nats_quota if args.kafka_quota is None else args.kafka_quota
        if args.kafka:
            # after NATS is stopped: the brokers share one budget of their own (the same CPU as the NATS node by
            # default), each processor and collector its own, as on NATS
            kafka_group = cpu_quota.CpuQuota("kafka", kafka_quota) if kafka_quota else None
            try:
                kafka_runs(work, args, kafka_group, source, n, partitions, processors, counts, seconds, lines, runs,
                           served)
                if kafka_group:
                    brokers_cpu = (kafka_group.cpu_seconds(), kafka_group.throttled_periods())
            finally:
                if kafka_group:
                    kafka_group.close()
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    quota_report(n, args.quota, args.nats_quota, runs, time.perf_counter() - begun, quick=args.quick,
                 kafka_quota=kafka_quota if args.kafka else None, brokers_cpu=brokers_cpu)
    collector_report(args.quota, served)
    return 0


def kafka_runs(work: Path, args: argparse.Namespace, budget: cpu_quota.CpuQuota | None, source: Path, n: int,
               partitions: list[int], processors: list[int], counts: list[int], seconds: float, lines: list[bytes],
               runs: list[dict], served: list[dict]) -> None:
    """The quota mode's processor and collector runs on the local Kafka cluster, its brokers in `budget`."""
    with kafka_brokers(work, budget) as brokers:
        processing(work, KAFKA, lambda p: f"kafka://{brokers.bootstrap}/quota{p}", source, n, partitions,
                   processors, {}, runs, timeout=1800, quota=args.quota)
        for c in counts:
            print(f"quota {args.quota:g} core each: {KAFKA}, {c} collector(s), {seconds:g}s …", flush=True)
            result = collector_run(work, f"kafka://{brokers.bootstrap}/collect{c}", c, args.quota, seconds, lines,
                                   name=f"kafka-serve-{c}")
            result["topology"] = KAFKA
            served.append(result)
            print(f"  {result['eps']:,.0f} acknowledged events/s", flush=True)


COLLECT_PARTITIONS = 4  # the collector runs' log


def one_partition_bodies(lines: list[bytes], partitions: int, size: int) -> list[bytes]:
    """NDJSON bodies of `size` events each, every body's events of devices in one log partition."""
    import json

    from gamestream.log import partition_for

    by_partition: dict[int, list[bytes]] = {}
    for line in lines:
        by_partition.setdefault(partition_for(json.loads(line)["eventParams"]["device_id"], partitions), []
                                ).append(line)
    chunks = [[b"\n".join(group[i:i + size]) for i in range(0, len(group) - size + 1, size)]
              for group in by_partition.values()]
    # interleaved, so that requests sent together go to every partition, not one after the other
    return [body for turn in itertools.zip_longest(*chunks) for body in turn if body is not None]


def collector_run(work: Path, url: str, count: int, quota: float, seconds: float, lines: list[bytes],
                  name: str | None = None) -> dict:
    """`count` `gamestream serve --log url` processes, each in a CPU budget of its own, posted 100-event NDJSON
    requests by a client outside the budgets (8 keep-alive connections per collector) for `seconds`. `name`
    (default `serve-<count>`) names their data directories and cgroups.

    Each request's events lie in one log partition, so a request is one record, as a phone's request (one
    device's events) is: requests mixing every partition's devices would make each request COLLECT_PARTITIONS
    records, and the log's per-record appends (an fsync each on NATS), not the collectors, would bind."""
    from collector import load  # benchmarks/collector.py's raw asyncio HTTP/1.1 client

    name = name or f"serve-{count}"
    bodies = one_partition_bodies(lines, COLLECT_PARTITIONS, 100)
    groups = [cpu_quota.CpuQuota(f"{name}-{i}", quota) for i in range(count)]
    servers, urls = [], []
    try:
        for i, group in enumerate(groups):
            data = work / f"{name}-{i}"
            server = subprocess.Popen(gamestream("serve", "--log", url, "--data-dir", str(data), "--port", "0",
                                                 "--partitions", str(COLLECT_PARTITIONS)),
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                      preexec_fn=group.preexec)
            servers.append(server)
            while True:
                line = server.stderr.readline()
                if not line:
                    raise RuntimeError(f"collector {i} did not start")
                if found := re.search(r"listening on (http://[\d.]+:\d+)", line):
                    urls.append(found[1])
                    break
        before = [group.cpu_seconds() for group in groups]

        async def all_collectors():
            return await asyncio.gather(*(load(u, bodies, "Content-Type: application/x-ndjson\r\n", seconds, 8)
                                          for u in urls))

        results = asyncio.run(all_collectors())
        cpu_s = sum(group.cpu_seconds() for group in groups) - sum(before)
        throttled = sum(group.throttled_periods() for group in groups)
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            server.wait()
        for group in groups:
            group.close()
    statuses: dict[int, int] = {}
    for _, answered, _ in results:
        for status, n in answered.items():
            statuses[status] = statuses.get(status, 0) + n
    elapsed = max(s for _, _, s in results)
    acknowledged = statuses.get(200, 0) * 100
    latencies = sorted(x for lat, _, _ in results for x in lat)
    return {"N": count, "eps": acknowledged / elapsed, "statuses": statuses, "cpu_s": cpu_s,
            "us_per_event": 1e6 * cpu_s / acknowledged if acknowledged else float("nan"),
            "p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else float("nan"),
            "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)] if latencies else float("nan"),
            "throttled": throttled}


def collector_report(quota: float, served: list[dict]) -> None:
    if not served:
        return
    nats = [s for s in served if "topology" not in s]
    kafka = [s for s in served if s.get("topology") == KAFKA]
    fields = collector_table(quota, nats, "") if nats else []
    if kafka:
        fields += collector_table(quota, kafka, f"{KAFKA}: ")
        print(f"{KAFKA} against NATS (one node), acknowledged events/s: " + ", ".join(
            f"N={s['N']}: {ratio(s['eps'], other['eps']):.2f}×" for s in kafka
            for other in nats if other["N"] == s["N"]))
        fields += [f"kafka_vs_nats_collector_N{s['N']}={ratio(s['eps'], other['eps']):.2f}" for s in kafka
                   for other in nats if other["N"] == s["N"]]
    print(f"RESULT quota={quota:g} " + " ".join(fields), flush=True)


def collector_table(quota: float, served: list[dict], title: str) -> list[str]:
    """Prints one log's collector runs; the RESULT fields (prefixed `kafka_` for Kafka's)."""
    print()
    print(f"{title}collectors, each {quota:g} core, 100-event requests, 8 connections each, the client outside the "
          "budgets")
    head = (f"| {'N':>2} | {'ack events/s':>12} | {'eff.':>5} | {'µs CPU/event':>12} | {'p50 ms':>7} | "
            f"{'p99 ms':>7} | {'throttled':>9} | {'answers':<16} |")
    print(head)
    print("|" + "-" * (len(head) - 2) + "|")
    one = next((s for s in served if s["N"] == 1), None)
    prefix = "kafka_" if title else ""
    fields = []
    for s in served:
        eff = s["eps"] / (s["N"] * one["eps"]) if one and one["eps"] else float("nan")
        fields.append(f"{prefix}collector_eff_N{s['N']}={eff:.2f} {prefix}collector_eps_N{s['N']}={s['eps']:.0f}")
        answers = ",".join(f"{k}:{v}" for k, v in sorted(s["statuses"].items()))
        print(f"| {s['N']:>2} | {s['eps']:>12,.0f} | {eff:>5.2f} | {s['us_per_event']:>12.1f} | {s['p50_ms']:>7.1f} | "
              f"{s['p99_ms']:>7.1f} | {s['throttled']:>9} | {answers:<16} |")
    return fields


def ratio(a: float | None, b: float | None) -> float:
    return a / b if a and b else float("nan")


def quota_report(n: int, quota: float, nats_quota: float, runs: list[dict], total_s: float, *, quick: bool,
                 kafka_quota: float | None = None, brokers_cpu: tuple[float, int] | None = None) -> None:
    print()
    print(f"scaling with a CPU budget per process: {n:,} events; each processor {quota:g} core, nats-server "
          f"{nats_quota:g} core (cgroup v{cpu_quota.version()}); machine: {os.cpu_count()} cores, "
          f"{platform.platform()}; {dt.datetime.now(UTC):%Y-%m-%d %H:%M} UTC; benchmark took {total_s:.0f}s")
    nats = [r for r in runs if r["topology"] != KAFKA]
    kafka = [r for r in runs if r["topology"] == KAFKA]
    fields, lags = quota_table(nats, "")
    print("eff. = events/s(M) / (M × events/s(1)); eff. to KPI counts to the moment the KPI tables are complete."
          + ("  (--quick: smoke run)" if quick else ""))
    if kafka_quota is not None:
        print()
        brokers = f"the 3 brokers {kafka_quota:g} core together" if kafka_quota else "the 3 brokers outside any budget"
        print(f"{KAFKA}: the same, on the local 3-broker Kafka cluster (replication 3, min.insync.replicas 2); "
              f"each processor {quota:g} core, {brokers}")
        kafka_fields, kafka_lags = quota_table(kafka, "kafka_")
        if brokers_cpu:
            print(f"the brokers' budget, over every Kafka run (collectors too): {brokers_cpu[0]:.1f} CPU s, "
                  f"throttled in {brokers_cpu[1]} periods")
        fields, lags = f"{fields} {kafka_fields}", f"{lags} {kafka_lags}"
        against = {(r["P"], r["M"]): r for r in nats}
        pairs = [(r, against[(r["P"], r["M"])]) for r in kafka if (r["P"], r["M"]) in against]
        print(f"{KAFKA} against NATS (one node), events/s to the events table and time to complete KPI tables: "
              + ", ".join(f"P={k['P']} M={k['M']}: {ratio(k['eps'], o['eps']):.2f}× events/s, KPI "
                          f"{k['kpi_s'] or float('nan'):.1f}s vs {o['kpi_s'] or float('nan'):.1f}s" for k, o in pairs))
        fields += " " + " ".join(f"kafka_eps_P{k['P']}_M{k['M']}={k['eps']:.0f} "
                                 f"kafka_vs_nats_P{k['P']}_M{k['M']}={ratio(k['eps'], o['eps']):.2f}"
                                 for k, o in pairs)
    print(f"RESULT quota={quota:g} {fields} {lags}", flush=True)


def quota_table(runs: list[dict], prefix: str) -> tuple[str, str]:
    """Prints one log's runs of the quota mode; its RESULT fields (efficiencies, KPI lags) with `prefix`."""
    head = (f"| {'P':>3} | {'M':>2} | {'events s':>8} | {'events/s':>9} | {'steady ev/s':>11} | {'eff.':>5} | "
            f"{'KPI done s':>10} | {'KPI lag s':>9} | {'eff. to KPI':>11} | {'CPU s':>6} | {'throttled':>9} | "
            f"{'retries':>7} |")
    print(head)
    print("|" + "-" * (len(head) - 2) + "|")
    base = {r["P"]: r for r in runs if r["M"] == 1}
    efficiency = {}
    for r in runs:
        one = base.get(r["P"])
        eff = r["eps"] / (r["M"] * one["eps"]) if one else float("nan")
        to_kpi = (one["kpi_s"] * 1 / (r["M"] * r["kpi_s"])) if one and one["kpi_s"] and r["kpi_s"] else float("nan")
        efficiency[(r["P"], r["M"])] = (eff, to_kpi)
        steady = f"{r['steady_eps']:,.0f}" if r["steady_eps"] else "—"
        kpi = f"{r['kpi_s']:.1f}" if r["kpi_s"] else "—"
        lag = f"{r['kpi_s'] - r['wall_s']:.1f}" if r["kpi_s"] else "—"
        print(f"| {r['P']:>3} | {r['M']:>2} | {r['wall_s']:>8.1f} | {r['eps']:>9,.0f} | {steady:>11} | "
              f"{eff:>5.2f} | {kpi:>10} | {lag:>9} | {to_kpi:>11.2f} | {r['cpu_s']:>6.1f} | {r['throttled']:>9} | "
              f"{r['retries']:>7} |")
    fields = " ".join(f"{prefix}eff_P{p}_M{m}={e:.2f} {prefix}eff_kpi_P{p}_M{m}={k:.2f}"
                      for (p, m), (e, k) in efficiency.items())
    lags = " ".join(f"{prefix}kpi_lag_P{r['P']}_M{r['M']}={r['kpi_s'] - r['wall_s']:.1f}" for r in runs if r["kpi_s"])
    return fields, lags


def report(n: int, appends: dict, levels: list[int], cost: dict, loads: dict, runs: list[dict], total_s: float,
           *, quick: bool) -> None:
    kafka = any(r["topology"] == KAFKA for r in runs)
    print()
    print(f"scale-out figures: {n:,} events; machine: {os.cpu_count()} cores, {platform.platform()}, "
          f"python {platform.python_version()}; {dt.datetime.now(UTC):%Y-%m-%d %H:%M} UTC; "
          f"benchmark took {total_s:.0f}s")
    print()
    print("1. log appends: one record = 100 events, kept N in flight (EventLog.submit)")
    head = (f"| {'log':<28} | {'in flight':>9} | {'records/s':>10} | {'events/s':>10} | {'p50 ms':>7} | "
            f"{'p99 ms':>7} | {'vs SQLite':>9} |")
    print(head)
    print("|" + "-" * (len(head) - 2) + "|")
    names = {"sqlite": "SQLite (embedded, FULL)", "nats-1": "NATS 1 node, sync always",
             "nats-r3": "NATS 3 nodes R3, sync always", KAFKA: "Kafka 3 brokers R3, fsync"}
    logs = ("sqlite", "nats-1", "nats-r3") + ((KAFKA,) if kafka else ())
    for level in levels:
        for name in logs:
            a = appends[(name, level)]
            ratio = a["events_s"] / appends[("sqlite", level)]["events_s"]
            print(f"| {names[name]:<28} | {level:>9} | {a['records_s']:>10,.0f} | {a['events_s']:>10,.0f} | "
                  f"{a['p50_ms']:>7.1f} | {a['p99_ms']:>7.1f} | {ratio:>8.2f}× |")
    print()
    print(f"2. Delta commit cost, local disk: {cost['commits']} sequential commits of 100 events "
          f"({cost['files']} Parquet files each) with a txn: mean {cost['mean_ms']:.1f} ms, "
          f"p50 {cost['p50_ms']:.1f} ms "
          f"→ at most ~{1000 / cost['mean_ms']:.0f} commits/s for one table from one writer")
    print()
    in_order = sorted(loads.items(), key=lambda item: (item[0][0] == KAFKA, item[0]))  # NATS' first, Kafka's last
    print("3. load (validate → log): " + ", ".join(f"{t} P={p}: {n / s:,.0f} events/s" for (t, p), s in in_order))
    print()
    print("4. processing: M `gamestream process` (KPI on) draining N pre-filled events from P partitions")
    head = (f"| {'log':<8} | {'P':>3} | {'M':>2} | {'wall s':>7} | {'events/s':>9} | {'steady ev/s':>11} | "
            f"{'/partition':>10} | {'/processor':>10} | {'vs M=1':>6} | {'commits':>7} | {'flush ev':>8} | "
            f"{'commit ms':>9} | {'retries':>7} | {'KPI done s':>10} |")
    print(head)
    print("|" + "-" * (len(head) - 2) + "|")
    base = {(r["topology"], r["P"]): r["eps"] for r in runs if r["M"] == 1}
    for r in runs:
        ratio = r["eps"] / base[(r["topology"], r["P"])] if (r["topology"], r["P"]) in base else float("nan")
        steady = f"{r['steady_eps']:,.0f}" if r["steady_eps"] else "—"
        commit_ms = f"{r['commit_ms']:.0f}" if r["commit_ms"] else "—"
        kpi = f"{r['kpi_s']:.1f}" if r["kpi_s"] else "—"
        print(f"| {r['topology']:<8} | {r['P']:>3} | {r['M']:>2} | {r['wall_s']:>7.1f} | {r['eps']:>9,.0f} | "
              f"{steady:>11} | {r['eps'] / r['P']:>10,.0f} | {r['eps'] / r['M']:>10,.0f} | {ratio:>5.2f}× | "
              f"{r['commits']:>7} | {r['mean_flush']:>8,.0f} | {commit_ms:>9} | {r['retries']:>7} | {kpi:>10} |")
    print()
    best = lambda topology: max((r for r in runs if r["topology"] == topology), key=lambda r: r["eps"])  # noqa: E731
    b1, b3 = best("nats-1"), best("nats-r3")
    nats_runs = [r for r in runs if r["topology"] != KAFKA]  # the NATS figures as without --kafka
    mean_flush = statistics.mean(r["mean_flush"] for r in nats_runs)
    commit_ms = statistics.mean(r["commit_ms"] for r in nats_runs if r["commit_ms"])
    print(f"best: single node {b1['eps']:,.0f} events/s (P={b1['P']}, M={b1['M']}); R3 {b3['eps']:,.0f} events/s "
          f"(P={b3['P']}, M={b3['M']}); mean flush {mean_flush:,.0f} events per commit, mean flush commit "
          f"{commit_ms:.0f} ms")
    print(f"note: {os.cpu_count()} cores — nats-server, M processors, the KPI stage and the poller share them; "
          "more processors than cores cannot add throughput here." + ("  (--quick: smoke run)" if quick else ""))
    extra = kafka_report(n, appends, levels, loads, runs, b3) if kafka else ""
    top = {name: appends[(name, levels[-1])]["events_s"] for name in ("sqlite", "nats-1", "nats-r3")}
    print(f"RESULT sqlite_append_eps={appends[('sqlite', levels[-1])]['events_s']:.0f} "
          f"nats1_append_eps={appends[('nats-1', levels[-1])]['events_s']:.0f} "
          f"r3_append_eps={appends[('nats-r3', levels[-1])]['events_s']:.0f} "
          f"r3_vs_sqlite_append={top['nats-r3'] / top['sqlite']:.2f} "
          f"process_eps_best_1={b1['eps']:.0f} process_eps_best_r3={b3['eps']:.0f} "
          f"flush_events={mean_flush:.0f} flush_commit_ms={commit_ms:.0f} delta_commit_ms={cost['mean_ms']:.1f}"
          f"{extra}", flush=True)


def kafka_report(n: int, appends: dict, levels: list[int], loads: dict, runs: list[dict], best_r3: dict) -> str:
    """Section 5: Kafka's figures over NATS' of the same run (R3 against R3: both replicate each record to three
    nodes and fsync it before the acknowledgement; the single NATS node for scale). The RESULT fields."""
    print()
    print("5. Kafka (3 brokers, replication 3, min.insync.replicas 2, acks=all, fsync each batch) beside NATS, "
          "same run: Kafka's figure / NATS'")
    print("appends, events/s: " + "; ".join(
        f"{level} in flight {appends[(KAFKA, level)]['events_s']:,.0f} = "
        f"{ratio(appends[(KAFKA, level)]['events_s'], appends[('nats-r3', level)]['events_s']):.2f}× R3, "
        f"{ratio(appends[(KAFKA, level)]['events_s'], appends[('nats-1', level)]['events_s']):.2f}× one node "
        f"(p50 {appends[(KAFKA, level)]['p50_ms']:.1f} vs {appends[('nats-r3', level)]['p50_ms']:.1f} ms R3)"
        for level in levels))
    partitions = sorted({p for (t, p) in loads if t == KAFKA})
    print("load, events/s: " + "; ".join(
        f"P={p} {n / loads[(KAFKA, p)]:,.0f} = {ratio(loads[('nats-r3', p)], loads[(KAFKA, p)]):.2f}× R3, "
        f"{ratio(loads[('nats-1', p)], loads[(KAFKA, p)]):.2f}× one node" for p in partitions))
    head = (f"| {'P':>3} | {'M':>2} | {'Kafka ev/s':>10} | {'vs R3':>6} | {'vs 1 node':>9} | {'Kafka KPI s':>11} | "
            f"{'R3 KPI s':>8} |")
    print(head)
    print("|" + "-" * (len(head) - 2) + "|")
    by = {(r["topology"], r["P"], r["M"]): r for r in runs}
    for r in (r for r in runs if r["topology"] == KAFKA):
        r3, one = by.get(("nats-r3", r["P"], r["M"])), by.get(("nats-1", r["P"], r["M"]))
        kpi = f"{r['kpi_s']:.1f}" if r["kpi_s"] else "—"
        kpi_r3 = f"{r3['kpi_s']:.1f}" if r3 and r3["kpi_s"] else "—"
        print(f"| {r['P']:>3} | {r['M']:>2} | {r['eps']:>10,.0f} | {ratio(r['eps'], r3 and r3['eps']):>5.2f}× | "
              f"{ratio(r['eps'], one and one['eps']):>8.2f}× | {kpi:>11} | {kpi_r3:>8} |")
    bk = max((r for r in runs if r["topology"] == KAFKA), key=lambda r: r["eps"])
    print(f"best: Kafka {bk['eps']:,.0f} events/s (P={bk['P']}, M={bk['M']}), "
          f"{ratio(bk['eps'], best_r3['eps']):.2f}× NATS R3's best")
    top = levels[-1]
    best_load = max(n / seconds for (t, _), seconds in loads.items() if t == KAFKA)
    best_load_r3 = max(n / seconds for (t, _), seconds in loads.items() if t == "nats-r3")
    return (f" kafka_append_eps={appends[(KAFKA, top)]['events_s']:.0f} "
            f"kafka_vs_r3_append={ratio(appends[(KAFKA, top)]['events_s'], appends[('nats-r3', top)]['events_s']):.2f} "
            f"kafka_append_p50_ms={appends[(KAFKA, top)]['p50_ms']:.1f} "
            f"kafka_load_eps_best={best_load:.0f} kafka_vs_r3_load={ratio(best_load, best_load_r3):.2f} "
            f"process_eps_best_kafka={bk['eps']:.0f} kafka_vs_r3_process={ratio(bk['eps'], best_r3['eps']):.2f}")


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)  # deltalake 1.6.3 may abort at interpreter exit; the figures are printed

"""The Spark job (`gamestream spark-job`: readStream.format("gamestream") + the reference pipeline + Delta sinks)
writes the tables the embedded processor writes, on local[2] (reading a NATS JetStream log) and on a standalone
cluster (reading the embedded SQLite log), and a SIGKILL mid-run followed by a restart leaves every event exactly
once.

Real parts only: the `gamestream` command in child processes, real SQLite logs, real Delta tables, a real Spark
master and worker. The input is on time (sorted by eventTime, loaded in order), since Spark drops late rows and
the embedded KPI stage counts them; and every log partition ends with an event at the input's last eventTime, a
purchase, so that the embedded watermark (least over partitions of the greatest eventTime) and Spark's (greatest
eventTime of the query's rows — purchases only for bookings, whose filter Spark pushes below the watermark) are
the same instant, and both pipelines mark the same windows final.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import gamestream, write_ndjson

pyspark = pytest.importorskip("pyspark", reason="the Spark job needs PySpark (./dev test installs it)")
if shutil.which("java") is None:
    pytest.skip("the Spark job needs Java (./dev test installs it)", allow_module_level=True)

SPARK_HOME = Path(pyspark.__file__).parent
# the embedded KPI stage lets a consumed partition stop holding the watermark after this long; the test's
# partitions must all hold it, however slow the machine
ENV = {"GAMESTREAM_PARTITION_IDLE_S": "1000000", "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable}
KPI_TABLES = {"kpi_events_hourly": "window_start", "kpi_bookings_hourly": "window_start", "kpi_daily": "eventDate"}
DAILY_COLUMNS = ["eventDate", "dau", "events", "bookings", "paying_users", "arpdau"]
EVENTS = 3000


def _on_time_events(path: Path) -> list[dict]:
    """Generated events sorted by eventTime, and one purchase per log partition at the last eventTime."""
    from gamestream.log import DEFAULT_PARTITIONS, partition_for

    generated = path.with_suffix(".generated")
    gamestream("generate", "--out", str(generated), "--events", str(EVENTS), "--days", "1", "--start",
               "2026-01-05", "--seed", "11", data_dir=path.parent / "unused")
    events = [json.loads(line) for line in generated.read_text().splitlines()]
    events.sort(key=lambda e: e["eventTime"])
    last = events[-1]["eventTime"]
    closers: dict[int, str] = {}
    n = 0
    while len(closers) < DEFAULT_PARTITIONS:
        device = f"closer-{n}"
        closers.setdefault(partition_for(device, DEFAULT_PARTITIONS), device)
        n += 1
    for partition, device in sorted(closers.items()):
        events.append({"eventId": f"closer-{partition}", "eventName": "purchaseEvent", "eventTime": last,
                       "eventParams": {"device_id": device, "game_keyword": "space-miner", "amount": 1.99}})
    return events


def _rows(tables: Path, name: str, key: str, columns: list[str] | None = None) -> list[dict]:
    from deltalake import DeltaTable

    rows = DeltaTable(str(tables / name)).to_pyarrow_table(columns=columns).to_pylist()
    rows.sort(key=lambda row: row[key])
    return [{k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()} for row in rows]


def _tables(data_dir: Path) -> dict[str, list[dict]]:
    tables = data_dir / "tables"
    out = {"events": _rows(tables, "events", "eventId")}
    for name, key in KPI_TABLES.items():
        out[name] = _rows(tables, name, key, DAILY_COLUMNS if name == "kpi_daily" else None)
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[dict]]]:
    """The on-time input as NDJSON, and the tables `gamestream process --until-idle` makes of it."""
    root = tmp_path_factory.mktemp("spark-reference")
    source = write_ndjson(root / "events.ndjson", _on_time_events(root / "events.ndjson"))
    embedded = root / "embedded"
    gamestream("load", str(source), "--chunk-lines", "500", data_dir=embedded)
    gamestream("process", "--until-idle", data_dir=embedded, env=ENV)
    tables = _tables(embedded)
    assert len(tables["events"]) == EVENTS + 4
    assert any(row["final"] for row in tables["kpi_events_hourly"])  # the watermark moved: finals are compared
    assert any(not row["final"] for row in tables["kpi_bookings_hourly"])
    return source, tables


# short runs on 2 cores: the JVMs start faster without the C2 compiler; few shuffle partitions for hourly windows
FAST = ("--shuffle-partitions", "2",
        "--conf", "spark.driver.extraJavaOptions=-XX:TieredStopAtLevel=1 -XX:+UseSerialGC",
        "--conf", "spark.executor.extraJavaOptions=-XX:TieredStopAtLevel=1 -XX:+UseSerialGC")


def _without_received_at(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "receivedAt"} for row in rows]


def _spark_job(data_dir: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return gamestream("spark-job", "--until-idle", *FAST, *args, data_dir=data_dir, env=ENV, timeout=timeout)


def _assert_same_tables(expected: dict[str, list[dict]], data_dir: Path) -> None:
    actual = _tables(data_dir)
    assert len(actual["events"]) == len(expected["events"])
    # receivedAt is when each run's `load` took the events in: set, and otherwise the same rows
    assert all(row["receivedAt"] is not None for row in actual["events"] + expected["events"])
    assert _without_received_at(actual["events"]) == _without_received_at(expected["events"])
    for name in KPI_TABLES:
        assert actual[name] == expected[name], name


def test_spark_job_on_local_reading_a_nats_log_writes_the_tables_the_embedded_processor_writes(
        reference, tmp_path: Path) -> None:
    """The same input in a NATS JetStream log (the cluster and kill tests read the embedded SQLite log)."""
    from gamestream.demo.nats_cluster import NatsCluster

    source, expected = reference
    data = tmp_path / "spark"
    with NatsCluster(tmp_path / "nats", nodes=1) as nats:
        log = f"{nats.url}?stream=sparkjob"
        gamestream("load", str(source), "--chunk-lines", "500", "--log", log, "--partitions", "4", data_dir=data)
        started = time.monotonic()
        completed = _spark_job(data, "--master", "local[2]", "--log", log)
        print(f"spark job on local[2] over NATS: {time.monotonic() - started:.1f}s")
    assert f"committed {EVENTS + 4:,} events" in completed.stdout, completed.stdout + completed.stderr
    _assert_same_tables(expected, data)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@contextmanager
def standalone_cluster(folder: Path):
    """A Spark standalone master and one worker (2 cores) on loopback; yields the master URL."""
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **ENV, "SPARK_HOME": str(SPARK_HOME), "SPARK_LOG_DIR": str(folder / "logs"),
           "SPARK_WORKER_DIR": str(folder / "work"), "SPARK_NO_DAEMONIZE": "1"}
    port, ui = _free_port(), _free_port()
    spark_class = str(SPARK_HOME / "bin" / "spark-class")
    processes: list[subprocess.Popen] = []
    try:
        with open(folder / "master.log", "wb") as log:
            processes.append(subprocess.Popen(
                [spark_class, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(port),
                 "--webui-port", str(ui)], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True))
        with open(folder / "worker.log", "wb") as log:
            processes.append(subprocess.Popen(
                [spark_class, "org.apache.spark.deploy.worker.Worker", f"spark://127.0.0.1:{port}",
                 "--host", "127.0.0.1", "--cores", "2", "--memory", "2g", "--webui-port", str(_free_port()),
                 "--work-dir", str(folder / "work")],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True))
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{ui}/json/", timeout=2) as answer:
                    state = json.load(answer)
                if state.get("aliveworkers", 0) >= 1:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
                logs = "\n".join((folder / f).read_text(errors="replace")[-3000:] for f in ("master.log", "worker.log"))
                raise AssertionError(f"the Spark master and worker did not come up:\n{logs}")
            time.sleep(0.5)
        yield f"spark://127.0.0.1:{port}"
    finally:
        for process in reversed(processes):
            _stop(process)


@pytest.mark.slow
def test_spark_job_on_a_standalone_cluster_writes_the_same_tables(reference, tmp_path: Path) -> None:
    source, expected = reference
    data = tmp_path / "spark"
    gamestream("load", str(source), "--chunk-lines", "500", data_dir=data)
    with standalone_cluster(tmp_path / "cluster") as master:
        started = time.monotonic()
        completed = _spark_job(data, "--master", master, "--conf", "spark.executor.memory=1g",
                               "--conf", "spark.cores.max=2")
        print(f"spark job on {master}: {time.monotonic() - started:.1f}s")
        # the tasks ran in the worker's executor, not in the driver
        assert any((tmp_path / "cluster" / "work").glob("app-*/*/stderr")), "no executor ran on the worker"
    assert f"committed {EVENTS + 4:,} events" in completed.stdout
    _assert_same_tables(expected, data)


@pytest.mark.slow
def test_spark_job_killed_mid_run_and_restarted_leaves_every_event_once(reference, tmp_path: Path) -> None:
    from deltalake import DeltaTable

    source, expected = reference
    data = tmp_path / "spark"
    # small records and micro-batches of 2 records per partition: many batches, so the kill lands mid-run
    gamestream("load", str(source), "--chunk-lines", "100", data_dir=data)
    events = data / "tables" / "events"
    job = subprocess.Popen(
        [sys.executable, "-m", "gamestream", "spark-job", "--until-idle", *FAST, "--max-records-per-partition", "2",
         "--data-dir", str(data)], env={**os.environ, **ENV}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        committed = 0
        while time.monotonic() < deadline and job.poll() is None:
            if DeltaTable.is_deltatable(str(events)):
                committed = DeltaTable(str(events)).to_pyarrow_table(columns=["eventId"]).num_rows
                if committed >= 600:
                    break
            time.sleep(0.2)
        assert job.poll() is None, f"the job ended before it could be killed:\n{job.stdout.read().decode()}"
        os.killpg(job.pid, signal.SIGKILL)  # the driver and its JVM, mid-run
        job.wait()
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    partial = DeltaTable(str(events)).to_pyarrow_table(columns=["eventId"]).num_rows
    assert 0 < partial < EVENTS + 4, f"killed with {partial} events in the table: not mid-run"

    # the same checkpoint: Spark replays the batch it was running, the txn skips what is in. The restart's first
    # Python worker exits at once (a worker that cannot start, as on a starved machine): the failed query is
    # restarted from its checkpoint, and the job still ends with every event once
    flaky = tmp_path / "flaky-python"
    flaky.write_text(f'#!/bin/sh\necho "$@" >> "{tmp_path / "workers"}"\n'
                     f'case "$*" in *python_streaming_source_runner*)\n'
                     f'  if mkdir "{tmp_path / "failed-once"}" 2>/dev/null; then exit 3; fi;;\nesac\n'
                     f'exec "{sys.executable}" "$@"\n')
    flaky.chmod(0o755)
    completed = gamestream("spark-job", "--until-idle", *FAST, data_dir=data, env={**ENV, "PYSPARK_PYTHON": str(flaky)},
                           timeout=300)
    assert (tmp_path / "failed-once").is_dir(), (tmp_path / "workers").read_text()
    assert "; restarting it from its checkpoint in 2s (restart 1 of 3)" in completed.stderr, completed.stderr[-6000:]
    # (Spark's own Python daemon may print a traceback for the worker that died; none comes from gamestream)
    assert "/gamestream/" not in completed.stderr.partition("Traceback")[2]
    ids = DeltaTable(str(events)).to_pyarrow_table(columns=["eventId"])["eventId"].to_pylist()
    assert len(ids) == len(set(ids)) == EVENTS + 4
    _assert_same_tables(expected, data)
    print(f"killed with {partial} of {EVENTS + 4} events committed; after the restart every event is there once")


def test_a_fresh_checkpoint_for_tables_a_spark_job_wrote_is_refused(tmp_path: Path) -> None:
    """Its batch ids would restart at 0 and every batch would be skipped as committed: refused, in one line."""
    from deltalake import CommitProperties, Transaction, write_deltalake

    from gamestream.tables import lake
    from gamestream import schema

    data = tmp_path / "data"
    table = lake.open_events(str(data / "tables" / "events"))
    write_deltalake(table, schema.arrow_schema().empty_table(), mode="append",
                    commit_properties=CommitProperties(app_transactions=[Transaction("gamestream-spark", 3)]))
    completed = gamestream("spark-job", "--until-idle", data_dir=data, check=False)
    assert completed.returncode != 0
    assert "holds 3 micro-batches of a Spark job" in completed.stderr
    assert "Traceback" not in completed.stderr

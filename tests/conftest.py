"""Shared test helpers: run the real `gamestream` command, read real Delta tables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def gamestream(*args: str, data_dir: Path, check: bool = True, timeout: float = 300,
               env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs `python -m gamestream <args> --data-dir <data_dir>` in a child process, as a user would."""
    completed = subprocess.run(
        [sys.executable, "-m", "gamestream", *args, "--data-dir", str(data_dir)],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )
    if check and completed.returncode != 0:
        raise AssertionError(f"gamestream {' '.join(args)} exited {completed.returncode}:\n"
                             f"{completed.stdout}\n{completed.stderr}")
    return completed


def kill_catch_ups(data_dir: Path, runs: int, pause: tuple[float, float], seed: int, env: dict) -> int:
    """Starts `gamestream process --until-idle` on `data_dir` `runs` times, SIGKILLs each after its first line
    and a random pause in `pause` (seconds) if it is still running; returns how many it killed."""
    import random
    import signal
    import time

    rng = random.Random(seed)
    kills = 0
    for _ in range(runs):
        child = subprocess.Popen([sys.executable, "-m", "gamestream", "process", "--until-idle", "--data-dir",
                                  str(data_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, **env})
        child.stderr.readline()
        time.sleep(rng.uniform(*pause))
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            kills += 1
        child.wait()
        child.stderr.close()
    return kills


def write_ndjson(path: Path, events: list) -> Path:
    """Writes events (dicts, or raw strings taken as lines) as NDJSON."""
    with open(path, "w") as handle:
        for event in events:
            handle.write(event if isinstance(event, str) else json.dumps(event))
            handle.write("\n")
    return path


def table_rows(uri: str | Path, columns: list[str] | None = None) -> list[dict]:
    from deltalake import DeltaTable

    return DeltaTable(str(uri)).to_pyarrow_table(columns=columns).to_pylist()


# The suite runs in parallel (pytest-xdist, `--dist loadgroup`): each file is one group, so a file's tests share
# its fixtures on one worker; the files that start JVMs and Python workers for Spark share one group, so they run
# one after the other — Spark gives a Python worker 10 s to connect back to its JVM, which a machine busy with two
# Spark runs at once can miss.
SERIAL_GROUPS = {"test_spark.py": "spark", "test_benchmark_smoke.py": "spark"}

# The groups that take longest (about one worker's seconds each, measured in a run of the whole suite on a 2-core
# machine), handed out first, so that no long group starts late and holds the run while the other workers idle;
# every other group follows in collection order. A file missing here only starts later: that costs time, not a test.
LONGEST_GROUPS_FIRST = [
    "spark",                      # ~490 s: three Spark jobs, one after another, and the benchmark smoke test
    "test_sql_sandbox.py",        # ~280 s: ~80 hostile queries, each over HTTP and through the CLI
    "test_kafka_processors.py",   # ~210 s
    "test_fuzz.py",               # ~185 s
    "test_tables_s3.py",          # ~145 s
    "test_maintenance.py",        # ~140 s
    "test_cluster_demo.py",       # ~140 s
    "test_log_kafka.py",          # ~135 s
    "test_kpi.py",                # ~115 s
    "test_sql.py",                # ~115 s
    "test_kinesis_pipeline.py",   # ~115 s
    "test_readme.py",             # ~110 s
    "test_forget.py",             # ~100 s
    "test_dashboard.py",          # ~90 s
    "test_ownership.py",          # ~85 s
    "test_faults_nats.py",        # ~80 s
    "test_faults_kafka.py",       # ~110 s with its cluster (added after the measuring run)
    "test_kpi_segments.py",       # ~90 s (added after the measuring run)
    "test_dashboard_segments.py", # ~40 s (added after the measuring run)
]


def xdist_group_of(nodeid: str) -> str:
    """A test's group: its file's name, or the shared group of the Spark files."""
    file = nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
    return SERIAL_GROUPS.get(file, file)


@pytest.hookimpl(optionalhook=True)  # a hook of xdist's: without xdist, never called
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """`--dist loadgroup` with the groups of `xdist_group_of`. (xdist 3.8 tells its loadgroup scheduler a test's
    `xdist_group` marker by setting `item._nodeid`, which pytest 9 no longer reads: it saw one group per test,
    spread each file over every worker, built each module-scoped fixture — Kafka clusters, tables, servers — once
    per worker, and ran the Spark tests side by side.)"""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class FileGroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_group_of(nodeid)

    return FileGroupScheduling(config, log)


@pytest.hookimpl(trylast=True)  # after pytest's own reordering, whose order within a file this keeps
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # the longest groups first: xdist hands the groups out in this order (pyproject.toml passes
    # --no-loadscope-reorder); the sort is stable, so a group's tests stay together and in their order
    rank = {group: i for i, group in enumerate(LONGEST_GROUPS_FIRST)}
    items.sort(key=lambda item: rank.get(xdist_group_of(item.nodeid), len(rank)))


_exit_status: list[int] = []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _exit_status.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    # deltalake 1.6.3 aborts the interpreter at exit in about half the runs after a table was read ("terminate
    # called without an active exception", exit 134). Everything pytest reports has been written by now, so
    # end the process with pytest's own status instead of letting that abort replace it.
    if _exit_status:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status[-1])

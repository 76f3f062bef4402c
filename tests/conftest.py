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


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(SERIAL_GROUPS.get(item.path.name, item.path.name)))


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

"""benchmarks/scale.py's quota mode runs: every processor in a CPU budget of its own, and refused without root.

A small run that checks the mode works end to end (the figures come from the full run on a quiet machine, in
docs/scaling.md; nothing here asserts speed)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCALE = REPO / "benchmarks" / "scale.py"
sys.path.insert(0, str(REPO / "benchmarks"))

import cpu_quota  # noqa: E402

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="cgroups need root (CI runs as root)")


@pytest.mark.slow
@needs_root
def test_the_quota_mode_runs_each_processor_and_collector_in_its_own_budget_and_leaves_no_cgroup() -> None:
    completed = subprocess.run([sys.executable, str(SCALE), "--quota", "0.5", "--quick", "--events", "20000",
                                "--partitions", "4", "--processors", "1,2", "--collectors", "1,2",
                                "--collector-seconds", "2"],
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    rows = re.findall(r"^\|\s+4 \|\s+(\d) \|.*\|\s+([\d.]+) \|\s+(\d+) \|\s+(\d+) \|$", completed.stdout, re.MULTILINE)
    assert [m for m, *_ in rows] == ["1", "2"], completed.stdout
    # the budget really held the processors: they used CPU, and the kernel throttled them at their quota
    assert all(float(cpu) > 0 for _, cpu, _, _ in rows)
    assert sum(int(throttled) for _, _, throttled, _ in rows) > 0, completed.stdout
    assert re.search(r"^RESULT quota=0.5 .*eff_P4_M2=[\d.]+ .*kpi_lag_P4_M2=[\d.]+", completed.stdout, re.MULTILINE)
    collectors = re.findall(r"^\|\s+(\d) \|\s+([\d,]+) \|.*\| (200:\d+)\s*\|$", completed.stdout, re.MULTILINE)
    assert [n for n, *_ in collectors] == ["1", "2"], completed.stdout
    assert re.search(r"^RESULT quota=0.5 collector_eff_N1=1.00 collector_eps_N1=\d+ collector_eff_N2=[\d.]+",
                     completed.stdout, re.MULTILINE)
    assert cpu_quota.leftover_groups() == []


@needs_root
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) drops root for the check")
def test_the_quota_mode_without_root_is_refused_in_one_line() -> None:
    completed = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
                                str(SCALE), "--quota", "0.2", "--quick"],
                               capture_output=True, text=True, timeout=60, cwd="/tmp")
    assert completed.returncode == 2, completed.stdout + completed.stderr
    assert completed.stderr.strip().splitlines() == [
        "error: a CPU budget per process needs root (it creates cgroups); run as root or without --quota"]

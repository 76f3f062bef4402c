"""A tiny run of the side-by-side benchmark: it works end to end and both sides agree (no speed asserted)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmark_runs_both_sides_and_they_agree(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--events", "5000",
                          "--rate", "1000", "--freshness-seconds", "3", "--results", str(results)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "same rows per eventDate, same hourly counts and bookings on both sides" in run.stdout
    last = run.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"RESULT processor_speedup=[\d.]+ e2e_speedup=[\d.]+ memory_ratio=[\d.]+ "
                        r"freshness_p99_s=[\d.]+ limit_ratio=[\d.]+ load_eps=\d+", last), last
    text = results.read_text()
    assert "limit: Arrow → one write_deltalake" in text and "Spark: seed pipeline" in text and "pyspark 4.3.0" in text and "RESULT" in text

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


def test_the_collector_breakdown_runs_every_layer_and_counts_the_collectors_fsyncs(tmp_path: Path) -> None:
    results = tmp_path / "COLLECTOR_RESULTS.md"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "collector.py"), "--seconds", "0.5",
                          "--sizes", "1,10", "--encodings", "plain,gzip", "--results", str(results)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert re.fullmatch(r"RESULT collector_us_per_event_1=[\d.]+ collector_us_per_event_10=[\d.]+",
                        run.stdout.strip().splitlines()[-1])
    rows = [line.split(" | ") for line in results.read_text().splitlines() if line.startswith("| ")][1:]
    servers = {"noop-starlette", "noop-asgi", "stubbed-python", "collector-python", "stubbed", "collector"}
    assert {row[0].lstrip("| ") for row in rows} == servers
    assert len(rows) == len(servers) * 2 * 2
    collector_fsyncs = [float(row[-1].rstrip(" |").replace(",", "")) for row in rows
                        if row[0] in ("| collector", "| collector-python")]
    assert len(collector_fsyncs) == 8 and all(f > 0 for f in collector_fsyncs)  # every answer waited for a commit


@pytest.mark.slow
def test_the_fronts_benchmark_runs_both_fronts_to_the_table(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fronts.py"), "--events", "3000",
                          "--rounds", "1"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = [line.split() for line in run.stdout.splitlines() if line.startswith(("python ", "native "))]
    assert [row[0] for row in rows] == ["python", "native"]
    assert all(float(value) > 0 for row in rows for value in row[1:])
    assert re.fullmatch(r"RESULT end_to_end_ratio=[\d.]+ serve_cpu_ratio=[\d.]+", run.stdout.strip().splitlines()[-1])

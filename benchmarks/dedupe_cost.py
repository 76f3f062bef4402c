"""Deduplication by eventId: what it costs the processor (issue "Exactly once by event identity": within 10% of
its throughput, peak memory within 20%).

`benchmarks/run.py`'s workload (1M generated events by default) is loaded into a fresh data directory, then
`gamestream process --until-idle` drains it, without deduplication (`GAMESTREAM_DEDUPE_DAYS=0`, the peer) and
with it (the default), alternating, `--rounds` times: wall time, CPU time (the child's user + system) and peak
RSS of each, and the ratios; the figure is their median (one run on a 2-core machine differs from the next by up
to a fifth).

    .venv/bin/python benchmarks/dedupe_cost.py [--events 1000000] [--rounds 6]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from run import make_workload  # benchmarks/run.py, beside this file

PYTHON = sys.executable


def drain(files: list[Path], data: Path, env: dict[str, str]) -> tuple[float, float, float]:
    """(wall s, CPU s, peak RSS GB) of `process --until-idle` over `files` loaded into a fresh `data`."""
    shutil.rmtree(data, ignore_errors=True)
    subprocess.run([PYTHON, "-m", "gamestream", "load", *map(str, files), "--data-dir", str(data)], check=True,
                   capture_output=True)
    started = time.perf_counter()
    child = subprocess.Popen([PYTHON, "-m", "gamestream", "process", "--until-idle", "--data-dir", str(data)],
                             env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)  # this child's own CPU time and peak RSS (KiB)
    wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise RuntimeError(f"gamestream process exited {child.returncode} ({data})")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=6,
                        help="alternating pairs; the ratios' median is the figure (a 2-core machine's runs vary by "
                             "up to a fifth from one to the next)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gamestream-dedupe-"))
    try:
        files, _ = make_workload(work / "workload", args.events)
        print(f"{args.events:,} events, {args.rounds} rounds", flush=True)
        walls, cpus = [], []
        for round_ in range(1, args.rounds + 1):
            off = drain(files, work / "off", {"GAMESTREAM_DEDUPE_DAYS": "0"})
            on = drain(files, work / "on", {})
            walls.append(on[0] / off[0])
            cpus.append(on[1] / off[1])
            print(f"round {round_}: without {off[0]:.2f} s wall, {off[1]:.2f} s CPU, {off[2]:.2f} GB | with "
                  f"{on[0]:.2f} s wall, {on[1]:.2f} s CPU, {on[2]:.2f} GB | wall {walls[-1]:.2f}×, CPU "
                  f"{cpus[-1]:.2f}×, peak RSS {on[2] / off[2]:.2f}×", flush=True)
        print(f"RESULT dedupe_wall_ratio_median={statistics.median(walls):.2f} dedupe_wall_ratio_min={min(walls):.2f} "
              f"dedupe_wall_ratio_max={max(walls):.2f} dedupe_cpu_ratio_median={statistics.median(cpus):.2f} "
              f"dedupe_cpu_ratio_min={min(cpus):.2f} dedupe_cpu_ratio_max={max(cpus):.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The collector's two fronts on run.py's HTTP path, alternating: the native front (`serve`'s default) against
`serve --front python`, on the same events, the same machine, in one run.

    .venv/bin/python benchmarks/fronts.py [--events 1000000] [--rounds 2]

Each round, for each front: a fresh data directory, `gamestream serve` and `gamestream process` as run.py starts
them, the events posted in 100-event NDJSON requests over 8 keep-alive connections (run.py's client), until
every event is in the events table. Per run: seconds until acknowledged and until in the table, and the CPU
(utime + stime, /proc) of `serve` and of `process`. The machine's speed moves from minute to minute here, so
the fronts alternate and the ratio is of medians. The last line:
`RESULT end_to_end_ratio=<python s / native s> serve_cpu_ratio=<python / native>`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

import run  # benchmarks/run.py, beside this file
from machine import installed_like_a_machine


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_run(work: Path, lines: list[bytes], front: str) -> dict:
    data = work / f"{front}-{time.monotonic_ns()}"
    bodies = [b"\n".join(lines[i:i + 100]) for i in range(0, len(lines), 100)]
    serving = run.Serving(data, env={"GAMESTREAM_FRONT": front})
    try:
        serve_before, process_before = cpu_seconds(serving.serve.pid), cpu_seconds(serving.process.pid)
        started = time.perf_counter()
        asyncio.run(run.post_batches(serving.url, bodies, connections=8))
        acked = time.perf_counter() - started
        while run.committed_rows(data) < len(lines):
            time.sleep(0.05)
        seconds = time.perf_counter() - started
        serve_cpu = cpu_seconds(serving.serve.pid) - serve_before
        process_cpu = cpu_seconds(serving.process.pid) - process_before
    finally:
        serving.stop()
    return {"front": front, "acked": acked, "seconds": seconds, "serve_cpu": serve_cpu, "process_cpu": process_cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gamestream-fronts-"))
    run.GAMESTREAM_ENV.update(installed_like_a_machine(work))
    files, _ = run.make_workload(work / "input", args.events)
    lines = [line for f in files for line in f.read_bytes().splitlines() if b'"eventTime":null' not in line]
    rows = []
    print(f"{'front':<8}{'acked s':>9}{'in table s':>12}{'serve CPU s':>13}{'process CPU s':>15}")
    for _ in range(args.rounds):
        for front in ("python", "native"):
            row = one_run(work, lines, front)
            rows.append(row)
            print(f"{front:<8}{row['acked']:>9.2f}{row['seconds']:>12.2f}{row['serve_cpu']:>13.2f}"
                  f"{row['process_cpu']:>15.2f}", flush=True)

    def median(front: str, key: str) -> float:
        return statistics.median(r[key] for r in rows if r["front"] == front)

    print(f"{len(lines):,} events a run; medians, python / native: in the table "
          f"{median('python', 'seconds') / median('native', 'seconds'):.2f}×, serve CPU "
          f"{median('python', 'serve_cpu') / median('native', 'serve_cpu'):.2f}×")
    print(f"RESULT end_to_end_ratio={median('python', 'seconds') / median('native', 'seconds'):.2f} "
          f"serve_cpu_ratio={median('python', 'serve_cpu') / median('native', 'serve_cpu'):.2f}")


if __name__ == "__main__":
    main()

"""Commit latency of the events table on an S3-compatible server against local disk.

    .venv/bin/python benchmarks/s3_commits.py [--commits 100] [--events-per-commit 500]

Starts moto's S3 server (`pip install 'moto[server]'`, pinned in requirements-test.lock) on a loopback port, then
makes the same exactly-once commits (`lake.commit_exactly_once`, one txn per commit, as the processor does) to
an events table on local disk and on `s3://` through the standard AWS environment, and prints the latency
percentiles of a commit and of opening the table (cold, and brought up to date with `update_incremental`). A
loopback server measures the protocol's round trips, not a network: on a real bucket add its latency per
request (a commit is ~6 requests: the Parquet PUT, the conditional PUT of `_delta_log/N.json`, and the reads
of the versions that landed meanwhile).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.json as pj

from gamestream import lake, schema
from gamestream.generator import simulate


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rows(count: int, seed: int) -> pa.Table:
    events = list(simulate(events=count, users=500, seed=seed, days=1))
    raw = "\n".join(json.dumps(e) for e in events).encode()
    return pj.read_json(io.BytesIO(raw), parse_options=pj.ParseOptions(explicit_schema=schema.arrow_schema(),
                                                                    unexpected_field_behavior="ignore"))


def measure(uri: str, commits: int, rows: pa.Table) -> dict[str, float]:
    table = lake.open_events(uri)
    app_id = lake.txn_app_id("bench", 0)
    latencies = []
    for offset in range(1, commits + 1):
        started = time.perf_counter()
        lake.commit_exactly_once(table, [app_id], lambda versions, o=offset: lake.Batch(rows, {app_id: o}),
                                 partition_by=[schema.PARTITION_COLUMN], retries=5)
        latencies.append(time.perf_counter() - started)
    started = time.perf_counter()
    lake.open_table(uri)
    cold = time.perf_counter() - started
    started = time.perf_counter()
    table.update_incremental()
    warm = time.perf_counter() - started
    latencies.sort()
    return {"p50_ms": 1000 * statistics.median(latencies), "p99_ms": 1000 * latencies[int(0.99 * len(latencies))],
            "open_cold_ms": 1000 * cold, "update_incremental_ms": 1000 * warm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commits", type=int, default=100)
    parser.add_argument("--events-per-commit", type=int, default=500)
    args = parser.parse_args()
    rows = _rows(args.events_per_commit, seed=1)
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1",
                           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ALLOW_HTTP": "true"})
        import boto3

        client = boto3.client("s3")
        deadline = time.monotonic() + 30
        while True:
            try:
                client.create_bucket(Bucket="bench-lake")
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        with tempfile.TemporaryDirectory() as folder:
            local = measure(os.path.join(folder, "events"), args.commits, rows)
        s3 = measure("s3://bench-lake/tables/events", args.commits, rows)
    finally:
        server.kill()
        server.wait()
    print(f"{args.commits} commits of {args.events_per_commit} events each")
    print(f"{'':22}{'local disk':>12}{'S3 (moto)':>12}")
    for key in ("p50_ms", "p99_ms", "open_cold_ms", "update_incremental_ms"):
        print(f"{key:22}{local[key]:12.1f}{s3[key]:12.1f}")
    print(f"RESULT commit_p50_local_ms={local['p50_ms']:.1f} commit_p50_s3_ms={s3['p50_ms']:.1f} "
          f"commit_p99_s3_ms={s3['p99_ms']:.1f}")
    sys.stdout.flush()
    os._exit(0)  # deltalake 1.6.3 may abort the interpreter at exit (see cli.main)


if __name__ == "__main__":
    main()

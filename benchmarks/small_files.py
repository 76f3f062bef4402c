"""The small-files problem, measured: a query over ~1,000 small files, then after OPTIMIZE.

    .venv/bin/python benchmarks/small_files.py [--commits 1000] [--events-per-commit 200]

Builds an events table the way streaming does (one small file per micro-batch commit, over three days), runs
the same DuckDB queries over it (a daily DAU aggregate, and the seed's DAU query for one day), compacts it with
`gamestream.tables.maintenance.optimize`, runs the queries again, and prints both timings and the speed-up. The peer is
the same table before compaction, in the same process.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.json as pj
from deltalake import DeltaTable, write_deltalake

from gamestream.tables import maintenance
from gamestream import schema
from gamestream.demo.generator import simulate
from gamestream.tables.lake import open_events
from gamestream.api.query import SqlEngine
from gamestream.settings import Settings

QUERIES = {
    "DAU per day": "select eventDate, count(distinct eventParams.device_id) from events group by 1 order by 1",
    "seed DAU, one day": "select count (distinct eventParams.device_id) as DAU from mobile_events_delta_raw "
                         "where to_date(eventTime) = '2026-11-02'",
}


def timed_queries(engine: SqlEngine, repeats: int = 5) -> dict[str, float]:
    result = {}
    for name, query in QUERIES.items():
        engine.run(query)  # warm the file system cache alike for both sides
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            engine.run(query)
            times.append(time.perf_counter() - started)
        result[name] = statistics.median(times)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--commits", type=int, default=1000)
    parser.add_argument("--events-per-commit", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp))
        uri = settings.table_uri("events")
        open_events(uri)
        events = simulate(events=args.commits * args.events_per_commit, users=5000, seed=5,
                          start=dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc), days=3)
        validator = schema.EventValidator(event_time="input")
        started = time.perf_counter()
        for _ in range(args.commits):  # one small file per commit, as a streaming micro-batch writes
            lines = [validator.validate(json.dumps(next(events)), None).line for _ in range(args.events_per_commit)]
            table = pj.read_json(io.BytesIO(b"\n".join(lines)), parse_options=pj.ParseOptions(
                explicit_schema=schema.decode_schema()))
            table = table.append_column("eventDate", table["eventTime"].cast(pa.date32()))
            write_deltalake(uri, table, mode="append", partition_by=["eventDate"])
        build_s = time.perf_counter() - started
        files_before = maintenance.file_stats(DeltaTable(uri)).files
        engine = SqlEngine(settings)
        before = timed_queries(engine)
        report = maintenance.optimize(uri)
        after = timed_queries(engine)
    print(f"{args.commits:,} commits of {args.events_per_commit} events built in {build_s:.1f}s; "
          f"{os.cpu_count()} cores, python {sys.version.split()[0]}")
    print(f"files: {files_before:,} before, {report.after.files:,} after OPTIMIZE ({report.seconds:.1f}s)")
    print(f"{'query':<22}{'small files s':>15}{'optimized s':>13}{'speed-up':>10}")
    for name in QUERIES:
        print(f"{name:<22}{before[name]:>15.3f}{after[name]:>13.3f}{before[name] / after[name]:>9.1f}×")
    print("RESULT " + " ".join(f"{name.split(',')[0].replace(' ', '_').lower()}_speedup={before[name] / after[name]:.1f}"
                               for name in QUERIES) + f" files_before={files_before} files_after={report.after.files}")
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()

"""Core pipeline throughput: `load` (validate → log) and `process` (log → Delta), with a peer for each.

    ./dev gamestream --help >/dev/null; .venv/bin/python benchmarks/pipeline.py [--events 500000]

Peers, run in the same process on the same data so that the ratios mean something on a noisy machine:
- decode: our pyarrow JSON reader with the explicit schema vs the plain-Python way (json.loads per line, then
  pa.Table.from_pylist with the same schema);
- validate: our msgspec validator vs json.loads per line (which checks nothing) — the price of validation.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa

from gamestream import schema
from gamestream.process.decode import decode_records
from gamestream.demo.generator import simulate
from gamestream.ingest.loader import load_file
from gamestream.log import LogRecord, open_log
from gamestream.process.processor import Processor
from gamestream.settings import Settings


def timed(fn):
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=500_000)
    args = parser.parse_args()
    n = args.events
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "events.ndjson"
        with open(source, "w") as handle:
            for event in simulate(events=n, users=5000, seed=11, days=3):
                handle.write(json.dumps(event, separators=(",", ":")) + "\n")
        raw_lines = source.read_bytes().splitlines()

        settings = Settings(data_dir=Path(tmp) / "data")
        log = open_log(settings.data_dir, partitions=settings.partitions)
        report, load_s = timed(lambda: load_file(source, log, max_event_bytes=settings.max_event_bytes))
        assert report.accepted == n

        processor = Processor(settings, log)
        _, process_s = timed(lambda: processor.run(until_idle=True))
        assert processor.stats.events_committed == n
        from gamestream.kpi import KpiStage

        kpi = KpiStage(settings, log)
        _, kpi_s = timed(kpi.fold)
        log.close()

        # decode peers over the canonical lines the log holds
        validator = schema.EventValidator(event_time="input")
        now = dt.datetime.now(dt.timezone.utc)
        canonical, validate_s = timed(lambda: [validator.validate(line, now).line for line in raw_lines])
        _, json_loads_s = timed(lambda: [json.loads(line) for line in raw_lines])
        records = [LogRecord(0, i + 1, b"\n".join(canonical[i:i + 1000]), len(canonical[i:i + 1000]), 0.0)
                   for i in range(0, n, 1000)]
        _, arrow_decode_s = timed(lambda: decode_records(records))

        def python_decode():
            rows = [json.loads(line) for line in canonical]
            for row in rows:  # the timestamp strings must become datetimes for Arrow
                row["eventTime"] = dt.datetime.fromisoformat(row["eventTime"])
                params = row["eventParams"]
                if "client_event_time" in params:
                    params["client_event_time"] = dt.datetime.fromisoformat(params["client_event_time"])
            return pa.Table.from_pylist(rows, schema=schema.decode_schema())

        _, python_decode_s = timed(python_decode)

    print(f"events: {n:,}  (machine: {os.cpu_count()} cores, python {sys.version.split()[0]})")
    print(f"{'stage':<42}{'seconds':>9}{'events/s':>14}")
    rows = [
        ("load: validate + append to SQLite log", load_s),
        ("process: log → Delta (until idle)", process_s),
        ("kpi: fold the events table (catch-up)", kpi_s),
        ("validate only (msgspec)", validate_s),
        ("  peer: json.loads only (no checks)", json_loads_s),
        ("decode to Arrow (pyarrow.json, schema)", arrow_decode_s),
        ("  peer: json.loads + from_pylist", python_decode_s),
    ]
    for name, seconds in rows:
        print(f"{name:<42}{seconds:>9.2f}{n / seconds:>14,.0f}")
    print(f"RESULT load_eps={n / load_s:.0f} process_eps={n / process_s:.0f} kpi_eps={n / kpi_s:.0f} "
          f"decode_speedup_vs_python={python_decode_s / arrow_decode_s:.1f} "
          f"validate_cost_vs_json_loads={validate_s / json_loads_s:.2f}")
    sys.stdout.flush()
    os._exit(0)  # deltalake 1.6.3 may abort at interpreter exit; the figures are printed


if __name__ == "__main__":
    main()

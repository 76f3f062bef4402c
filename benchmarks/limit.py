"""The raw limit of the processor's unavoidable work on this machine: the same events, already in Arrow (an IPC
file, memory-mapped), written to a fresh Delta table partitioned by eventDate in one `write_deltalake` call.

    .venv/bin/python benchmarks/limit.py EVENTS.arrow TARGET_DIR     # prints {"rows": n, "seconds": s}

`benchmarks/run.py` runs it in its own process (no imports in the timing) and reports
`limit_ratio = process events/s ÷ rows/s here`."""

from __future__ import annotations

import json
import sys
import time

import pyarrow as pa
from deltalake import write_deltalake


def main(source: str, target: str) -> None:
    started = time.perf_counter()
    with pa.memory_map(source) as handle:
        table = pa.ipc.open_file(handle).read_all()
    write_deltalake(target, table, partition_by=["eventDate"])
    seconds = time.perf_counter() - started
    print(json.dumps({"rows": table.num_rows, "seconds": seconds}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

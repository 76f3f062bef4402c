"""Deduplication by eventId: the cost of judging a batch against the ids in the window (process/identity.py).

For 1M, 10M and 100M ids held by one partition's state (`identity.PartitionIds`), it times what a flush does per
batch of 20,000 events (a fifth of them copies): look the keys up (`find`) and add the new ones (`add`), and
reports the memory the state takes. The peer, in the same run, is the obvious alternative: a Python `set` of the
eventId strings (up to 10M: at 100M it needs ~10 GB).

    .venv/bin/python benchmarks/dedupe_lookup.py [--sizes 1000000,10000000,100000000] [--batches 50]
"""

from __future__ import annotations

import argparse
import gc
import time
import uuid

import numpy as np

from gamestream.process.identity import PartitionIds

BATCH = 20_000


def held_state(size: int, rng: np.random.Generator) -> tuple[PartitionIds, np.ndarray]:
    keys = rng.integers(-(2**63), 2**63 - 1, size=size, dtype=np.int64)
    prints = rng.integers(-(2**63), 2**63 - 1, size=size, dtype=np.int64)
    state = PartitionIds()
    state.add(keys, prints, 20000)
    return state, keys


def time_state(size: int, batches: int, rng: np.random.Generator) -> tuple[float, float, int]:
    state, keys = held_state(size, rng)
    lookups = adds = 0.0
    for _ in range(batches):
        copies = keys[rng.integers(0, size, size=BATCH // 5)]
        fresh = rng.integers(-(2**63), 2**63 - 1, size=BATCH - len(copies), dtype=np.int64)
        batch = np.concatenate([copies, fresh])
        started = time.perf_counter()
        found, _ = state.find(batch)
        lookups += time.perf_counter() - started
        assert found[:len(copies)].all()
        started = time.perf_counter()
        state.add(batch[~found], np.zeros((~found).sum(), dtype=np.int64), 20000)
        adds += time.perf_counter() - started
    return lookups / (batches * BATCH), adds / (batches * BATCH), state.nbytes


def time_set(size: int, batches: int) -> tuple[float, int]:
    import sys

    ids = {str(uuid.uuid4()) for _ in range(size)}
    held = sys.getsizeof(ids) + sum(sys.getsizeof(i) for i in ids)  # the set and its strings
    sample = list(ids)[:BATCH // 5]
    total = 0.0
    for _ in range(batches):
        batch = sample + [str(uuid.uuid4()) for _ in range(BATCH - len(sample))]
        started = time.perf_counter()
        found = [i in ids for i in batch]
        total += time.perf_counter() - started
        ids.update(i for i, f in zip(batch, found) if not f)
    return total / (batches * BATCH), held


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1000000,10000000,100000000")
    parser.add_argument("--batches", type=int, default=50)
    args = parser.parse_args()
    rng = np.random.default_rng(7)
    print(f"{'ids held':>12} | {'lookup ns/event':>15} | {'add ns/event':>12} | {'state MB':>8} | "
          f"{'set lookup ns':>13} | {'set MB':>7} | memory ratio")
    for size in (int(s) for s in args.sizes.split(",")):
        lookup, add, nbytes = time_state(size, args.batches, rng)
        gc.collect()
        if size <= 10_000_000:
            set_lookup, set_bytes = time_set(size, args.batches)
            peer = f"{set_lookup * 1e9:>13.0f} | {set_bytes / 1e6:>7.0f} | {nbytes / set_bytes:.2f}"
        else:
            peer = f"{'—':>13} | {'—':>7} | —"
        gc.collect()
        print(f"{size:>12,} | {lookup * 1e9:>15.0f} | {add * 1e9:>12.0f} | {nbytes / 1e6:>8.0f} | {peer}", flush=True)


if __name__ == "__main__":
    main()

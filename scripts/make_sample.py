"""Regenerates src/gamestream/data/sample_events.ndjson.gz: 3 days of simulated events plus a few lines that
show what gamestream does with bad input (rejected by `load`, or quarantined by the processor)."""

import datetime as dt
import gzip
import json
from pathlib import Path

from gamestream.demo.generator import simulate

BAD_LINES = [
    '{"eventName": "levelStart", "eventParams": {"device_id": "d-bad-1", "scoreAdjustment": "ten"}}',
    '{"eventName": "levelStart", "eventParams": {"device_id": "d-bad-2", "scoreAdjustment": 3000000000}}',
    '{"eventName": "levelStart", "eventParams": {"platform": "ios"}}',
    '{"eventName": "purchaseEvent", "eventParams": {"device_id": "d-bad-3", "amount": 4.99}, "eventTime": null}',
    '{"eventName": "levelEnd", "eventParams": {"device_id": "d-bad-4"}, "eventTime": "2026-11-02T10:00:00"}',
    '{"eventName": "truncated", "eventParams": {"device_id": "d-b',
]

target = Path(__file__).resolve().parents[1] / "src/gamestream/data/sample_events.ndjson.gz"
start = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)
with gzip.open(target, "wt", compresslevel=9) as handle:
    for i, event in enumerate(simulate(events=20_000, users=500, seed=2026, start=start, days=3)):
        handle.write(json.dumps(event, separators=(",", ":")) + "\n")
        if i % 3000 == 1500:
            handle.write(BAD_LINES[(i // 3000) % len(BAD_LINES)] + "\n")
print(target, target.stat().st_size)

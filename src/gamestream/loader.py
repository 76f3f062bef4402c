"""`gamestream load`: validates an NDJSON file (plain or gzip) and appends it to the log.

Each event keeps its own eventTime and eventId; an absent eventTime is stamped with the time of loading and an
absent eventId gets a UUIDv7. Events are grouped per partition into one record per chunk of the file, and each
chunk's records are appended in one log transaction, so per-record costs are paid per chunk.
"""

from __future__ import annotations

import datetime as dt
import gzip
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator

from gamestream.log import Append, EventLog, partition_for
from gamestream.schema import EventValidator, Rejection

MAX_REPORTED_REJECTIONS = 20


@dataclass
class LoadReport:
    lines: int = 0  # non-blank lines read
    accepted: int = 0
    rejected: int = 0
    first_rejections: list[tuple[int, str]] = field(default_factory=list)  # (line number, "field: reason")
    records: int = 0


def open_events_file(path: Path) -> BinaryIO:
    """Opens NDJSON, transparently gunzipping a gzip file."""
    handle = open(path, "rb")
    if handle.read(2) == b"\x1f\x8b":
        handle.close()
        return gzip.open(path, "rb")  # type: ignore[return-value]
    handle.seek(0)
    return handle


def _chunks(handle: Iterable[bytes], lines_per_chunk: int) -> Iterator[list[tuple[int, bytes]]]:
    chunk: list[tuple[int, bytes]] = []
    for number, line in enumerate(handle, start=1):
        chunk.append((number, line))
        if len(chunk) >= lines_per_chunk:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _split_by_size(lines: list[bytes], limit: int | None) -> Iterator[list[bytes]]:
    """`lines` in runs whose NDJSON record stays within `limit` bytes (one run when there is no limit). Every
    line fits on its own: events are capped far below any record limit (`max_event_bytes`)."""
    if limit is None:
        yield lines
        return
    run: list[bytes] = []
    size = 0
    for line in lines:
        if run and size + len(line) + 1 > limit:
            yield run
            run, size = [], 0
        run.append(line)
        size += len(line) + 1
    if run:
        yield run


def load_file(
    path: Path,
    log: EventLog,
    *,
    max_event_bytes: int,
    lines_per_chunk: int = 5000,
    on_progress: Callable[[int], None] | None = None,
) -> LoadReport:
    """Validates and appends every line of `path`; returns what was accepted and rejected, with reasons.

    `on_progress` receives the number of raw bytes consumed since its last call.
    """
    with open_events_file(path) as handle:
        return load_lines(handle, log, max_event_bytes=max_event_bytes, lines_per_chunk=lines_per_chunk,
                          on_progress=on_progress)


def load_lines(
    lines: Iterable[bytes],
    log: EventLog,
    *,
    max_event_bytes: int,
    lines_per_chunk: int = 5000,
    on_progress: Callable[[int], None] | None = None,
) -> LoadReport:
    """`load_file` for any source of NDJSON lines (the generator writing straight to the log uses it)."""
    validator = EventValidator(event_time="input")
    report = LoadReport()
    for chunk in _chunks(lines, lines_per_chunk):
        now = dt.datetime.now(dt.timezone.utc)
        by_partition: dict[int, list[bytes]] = {}
        consumed = 0
        for number, raw in chunk:
            consumed += len(raw)
            line = raw.strip()
            if not line:
                continue
            report.lines += 1
            if len(line) > max_event_bytes:
                result: object = Rejection("", f"event is {len(line)} bytes, over the {max_event_bytes} limit")
            else:
                result = validator.validate(line, now)
            if isinstance(result, Rejection):
                report.rejected += 1
                if len(report.first_rejections) < MAX_REPORTED_REJECTIONS:
                    report.first_rejections.append((number, str(result)))
                continue
            report.accepted += 1
            by_partition.setdefault(partition_for(result.device_id, log.partitions), []).append(result.line)
        limit = getattr(log, "max_record_bytes", None)  # a log of messages (NATS) caps a record's size
        appends = [Append(p, b"\n".join(part), len(part)) for p, lines in sorted(by_partition.items())
                   for part in _split_by_size(lines, limit)]
        log.append(appends)
        report.records += len(appends)
        if on_progress:
            on_progress(consumed)
    return report

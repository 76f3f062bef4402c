"""`gamestream load`: validates an NDJSON file (plain or gzip) and appends it to the log.

Each event keeps its own eventTime and eventId; an absent eventTime is stamped with the time of loading and an
absent eventId gets a UUIDv7. Events are grouped per partition into one record per chunk of the file, and each
chunk's records are appended in one log transaction, so per-record costs are paid per chunk.

A plain file's chunks are byte ranges of whole lines, found by counting newlines natively (`_ranges`); with a
pool, each worker process reads its own range, validates it as one buffer (`batch.Lines`: no Python object per
line) and encodes it, and this process only appends the results in order — it was the bottleneck when it read
the lines and pickled them to the workers. A gzip file is read here in blocks of lines (`_blocks`).
"""

from __future__ import annotations

import datetime as dt
import functools
import gzip
from collections import deque
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import chain, islice
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator

import gamestream_native
import pyarrow as pa

from gamestream import schema
from gamestream.ingest import batch
from gamestream.ingest.batch import Lines, validate_batch
from gamestream.log import Append, EventLog, partition_for, payload
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


def _chunks(handle: Iterable[bytes], lines_per_chunk: int) -> Iterator[list[bytes]]:
    """The lines, `lines_per_chunk` at a time."""
    lines = iter(handle)
    while chunk := list(islice(lines, lines_per_chunk)):
        yield chunk


READ_BYTES = 4 << 20
"""`_blocks` reads the file this much at a time."""


def _blocks(handle: BinaryIO, lines_per_chunk: int) -> Iterator[bytes]:
    """`lines_per_chunk` lines of the file at a time as one bytes object, each line with its newline (the file's
    last may have none): `_chunks` without a Python object per line (a gzip file, read here)."""
    pending, counted = b"", 0
    while piece := handle.read(READ_BYTES):
        cuts, counted = gamestream_native.newline_cuts(piece, lines_per_chunk, counted)
        start = 0
        for cut in cuts:
            yield pending + piece[start:cut]
            pending, start = b"", cut
        pending += piece[start:]
    if pending:
        yield pending


def _lines_of(block: bytes) -> list[bytes]:
    """A block's lines (without their newlines), as `_chunks` would have handed them, for the slower paths."""
    lines = block.split(b"\n")
    return lines[:-1] if block.endswith(b"\n") else lines


_Range = tuple[str, int, int]  # (path, start, end): a chunk of a plain file, whole lines


def _ranges(path: Path, handle: BinaryIO, lines_per_chunk: int) -> Iterator[_Range]:
    """A plain file as byte ranges of `lines_per_chunk` lines each (the last may hold fewer), found by counting
    newlines natively (`gamestream_native.newline_cuts`, ~9 GB/s); each range is read and validated by a worker
    process (`_read_range`), and this process only appends what comes back."""
    offset = start = counted = 0
    while piece := handle.read(READ_BYTES):
        cuts, counted = gamestream_native.newline_cuts(piece, lines_per_chunk, counted)
        for cut in cuts:
            yield str(path), start, offset + cut
            start = offset + cut
        offset += len(piece)
    if offset > start:
        yield str(path), start, offset


def _read_range(path: str, start: int, end: int) -> bytes:
    """Bytes [start, end) of the file (a `_ranges` chunk: whole lines)."""
    with open(path, "rb") as handle:
        handle.seek(start)
        return handle.read(end - start)


def _stripped(chunk: list[bytes]) -> list[bytes]:
    """The chunk's non-blank lines, stripped, as the per-event path reads them."""
    return [line for line in (raw.strip() for raw in chunk) if line]


def _events_of(chunk: list[bytes]) -> list[bytes] | None:
    """The chunk's lines as events without a Python step per line, in the usual cases: lines that each end with
    one newline (a file), or that hold none (the generator); None otherwise. These are not stripped: when a line
    needs it (CRLF, padding), `validate_batch` refuses them before parsing anything."""
    joined = b"".join(chunk)
    newlines = joined.count(b"\n")
    if newlines == 0:
        return chunk
    if newlines == len(chunk) and joined[-1:] == b"\n":
        events = joined[:-1].split(b"\n")
        # every line is its event plus exactly one newline (so the split kept the lines' boundaries)
        if all(map(int.__eq__, map(len, chunk), map((1).__add__, map(len, events)))):
            return events
    return None


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


def arrow_records(table: pa.Table, limit: int | None,
                  compression: payload.Compression = "zstd") -> Iterator[tuple[bytes, int]]:
    """`table` as Arrow record payloads (`payload.encode`) with their row counts, halved until each fits within
    `limit` bytes (one payload when there is no limit). A single row always fits: events are capped far below
    any record limit."""
    data = payload.encode(table, compression)
    if limit is None or len(data) <= limit or table.num_rows <= 1:
        yield data, table.num_rows
        return
    half = table.num_rows // 2
    yield from arrow_records(table.slice(0, half), limit, compression)
    yield from arrow_records(table.slice(half), limit, compression)


def load_file(
    path: Path,
    log: EventLog,
    *,
    max_event_bytes: int,
    lines_per_chunk: int = 20000,
    on_progress: Callable[[int], None] | None = None,
    compression: payload.Compression = "zstd",
    params: schema.Params = (),
    pool: Executor | None = None,
) -> LoadReport:
    """Validates and appends every line of `path`; returns what was accepted and rejected, with reasons.

    `on_progress` receives the number of raw bytes consumed since its last call. `params`: the parameters the
    configuration promotes (`Settings.schema_params`), validated with their types. `pool`: worker processes
    that validate and encode chunks while this one appends (`load_lines`).
    """
    return load_files([path], log, max_event_bytes=max_event_bytes, lines_per_chunk=lines_per_chunk,
                      on_progress=on_progress, compression=compression, params=params, pool=pool)[0]


def load_files(
    paths: list[Path],
    log: EventLog,
    *,
    max_event_bytes: int,
    lines_per_chunk: int = 20000,
    on_progress: Callable[[int], None] | None = None,
    compression: payload.Compression = "zstd",
    params: schema.Params = (),
    pool: Executor | None = None,
    on_file: Callable[[Path, LoadReport], None] | None = None,
) -> list[LoadReport]:
    """`load_file` of each of `paths`, in order, their chunks one stream: with a `pool`, the workers validate a
    file's first chunks while this process appends the last ones of the file before, instead of the pool
    draining and filling again at every file (8 files of 125k events: ~0.25 s of ~2.1 s). `on_file(path,
    report)` is called once every chunk of that file is appended, in the files' order. A file that cannot be
    read stops the load there, after every chunk before it is appended."""
    def chunks() -> Iterator[bytes | _Range | None]:
        for path in paths:
            with open_events_file(path) as handle:
                # a plain file: each chunk's worker reads its own byte range (`_ranges`); gzip: read here, in blocks
                yield from (_blocks(handle, lines_per_chunk) if isinstance(handle, gzip.GzipFile) else
                            _ranges(path, handle, lines_per_chunk))
            yield None  # the file's end
    reports: list[LoadReport] = []
    for report in _load_stream(chunks(), log, max_event_bytes=max_event_bytes, compression=compression,
                               params=params, on_progress=on_progress, pool=pool):
        if on_file:
            on_file(paths[len(reports)], report)
        reports.append(report)
    return reports


@dataclass
class _Chunk:
    """One chunk, validated and encoded: its appends and its share of the report."""

    appends: list[Append]
    lines: int
    accepted: int
    rejected: int
    rejections: list[tuple[int, str]]  # (line number within the chunk, from 1; reason)
    raw_bytes: int
    physical_lines: int  # the chunk's lines, blank ones too: the next chunk's first line number follows


def load_lines(
    lines: Iterable[bytes],
    log: EventLog,
    *,
    max_event_bytes: int,
    lines_per_chunk: int = 20000,
    on_progress: Callable[[int], None] | None = None,
    compression: payload.Compression = "zstd",
    params: schema.Params = (),
    pool: Executor | None = None,
) -> LoadReport:
    """`load_file` for any source of NDJSON lines (the generator writing straight to the log uses it).

    With a `pool` of worker processes (`load_pool`), chunks are validated and encoded there, a few ahead, while
    this process reads the next chunks and appends the finished ones — in the file's order, one log transaction
    per chunk, as without a pool. A log that routes devices itself (Kinesis) is loaded in this process."""
    return _load_chunks(_chunks(lines, lines_per_chunk), log, max_event_bytes=max_event_bytes,
                        compression=compression, params=params, on_progress=on_progress, pool=pool)


def _load_chunks(chunks: Iterable[list[bytes] | bytes | _Range], log: EventLog, *, max_event_bytes: int,
                 on_progress: Callable[[int], None] | None, compression: payload.Compression, params: schema.Params,
                 pool: Executor | None) -> LoadReport:
    """`load_lines` of chunks: lists of lines, blocks of the file (`_blocks`) or byte ranges of it (`_ranges`)."""
    return next(_load_stream(chain(chunks, [None]), log, max_event_bytes=max_event_bytes, on_progress=on_progress,
                             compression=compression, params=params, pool=pool))


def _load_stream(chunks: Iterable[list[bytes] | bytes | _Range | None], log: EventLog, *, max_event_bytes: int,
                 on_progress: Callable[[int], None] | None, compression: payload.Compression, params: schema.Params,
                 pool: Executor | None) -> Iterator[LoadReport]:
    """Appends the chunks in order and yields a file's report at each None among them (the file's end, once its
    chunks are appended). Each chunk's rejections are numbered within it and renumbered here, in its file's
    order."""
    limit = log.max_record_bytes  # a log of messages (NATS, Kinesis) caps a record's size
    own_route = log.route if log.own_routing else None  # Kinesis routes itself; else crc32 of the device
    prepare = functools.partial(_prepare_chunk, partitions=log.partitions, route=own_route,
                                max_event_bytes=max_event_bytes, params=params, limit=limit,
                                compression=compression)
    stamped = ((chunk, dt.datetime.now(dt.timezone.utc)) for chunk in chunks)
    if pool is None or own_route is not None:
        prepared: Iterable[_Chunk | None] = (None if chunk is None else prepare(chunk, now) for chunk, now in stamped)
    else:
        prepared = _ahead(pool, prepare, stamped, LOAD_AHEAD)
    report = LoadReport()
    before = 0  # the lines of the file's chunks before this one
    for chunk in prepared:
        if chunk is None:
            yield report
            report, before = LoadReport(), 0
            continue
        log.append(chunk.appends)
        report.lines += chunk.lines
        report.accepted += chunk.accepted
        report.rejected += chunk.rejected
        report.first_rejections.extend((before + number, reason) for number, reason in
                                       chunk.rejections[:MAX_REPORTED_REJECTIONS - len(report.first_rejections)])
        before += chunk.physical_lines
        report.records += len(chunk.appends)
        if on_progress:
            on_progress(chunk.raw_bytes)


LOAD_AHEAD = 2
"""Chunks in flight per worker process: enough to keep them busy while this process appends."""


def load_pool(workers: int) -> Executor:
    """Worker processes for `load_lines`: forked, so they start at once with the modules this process has
    imported — create the pool before the log is opened (before this process has threads)."""
    import multiprocessing

    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"), initializer=_in_worker)
    pool.submit(int).result()  # a pool that forks starts every worker at its first task: now, not later
    return pool


def _in_worker() -> None:
    """A `load_pool` worker validates beside the others: its JSON reader keeps to its own thread."""
    batch.READER_THREADS = False


def _ahead(pool: Executor, prepare: Callable[..., _Chunk], chunks: Iterable[tuple[object, dt.datetime]],
           per_worker: int) -> Iterator[_Chunk | None]:
    """`prepare(chunk, now)` of every chunk, run in `pool`, yielded in the chunks' order, at most `per_worker` ×
    workers submitted and not yet yielded; a None chunk (a file's end) is yielded as None in its place. When the
    chunks fail (a file that cannot be read), what was submitted before is yielded first."""
    in_flight: deque[Future[_Chunk | None]] = deque()
    depth = per_worker * max(1, getattr(pool, "_max_workers", 1))
    try:
        for chunk, now in chunks:
            if chunk is None:
                marker: Future[_Chunk | None] = Future()
                marker.set_result(None)
                in_flight.append(marker)
            else:
                in_flight.append(pool.submit(prepare, chunk, now))
            if len(in_flight) >= depth:
                yield in_flight.popleft().result()
    except Exception:
        while in_flight:
            yield in_flight.popleft().result()
        raise
    while in_flight:
        yield in_flight.popleft().result()


def _prepare_chunk(chunk: list[bytes] | bytes | _Range, now: dt.datetime, *, partitions: int,
                   route: Callable[[str], int] | None, max_event_bytes: int, params: schema.Params,
                   limit: int | None, compression: payload.Compression) -> _Chunk:
    """One chunk's appends: Arrow records per partition when every line is valid (`validate_batch`), else the
    per-event path's NDJSON records and the rejections with their line numbers within the chunk (from 1; the
    caller renumbers them). `chunk`: its lines, a block of the file (`_blocks`), or a byte range to read
    (`_ranges`); a block is validated as one buffer first (`batch.Lines`). `route` None: crc32 of the device over
    `partitions` (what a worker process computes)."""
    validated = None
    if isinstance(chunk, tuple):  # a byte range of the file: read here
        chunk = _read_range(*chunk)
    if isinstance(chunk, bytes):
        lines = Lines(chunk)
        physical_lines = len(lines) if chunk else 0
        raw_bytes = len(chunk)
        tables = validate_batch(lines, now=now, mode="input", partitions=partitions, route=route,
                                max_event_bytes=max_event_bytes, params=params)
        if tables is not None:  # then every line is an event
            validated = lines, tables
        chunk = _lines_of(chunk) if tables is None else []
    else:
        raw_bytes = sum(map(len, chunk))
        physical_lines = len(chunk)
    if validated is None:
        validated = _validate_chunk(chunk, now, partitions=partitions, route=route,
                                    max_event_bytes=max_event_bytes, params=params)
    if validated is not None:  # every line valid: Arrow records, no per-event work
        events, tables = validated
        count = len(events)
        appends = [Append(p, data, rows) for p, table in sorted(tables.items())
                   for data, rows in arrow_records(table, limit, compression)]
        return _Chunk(appends, count, count, 0, [], raw_bytes, physical_lines)
    report = LoadReport()
    appends = _validate_each(chunk, 1, now, _input_validator(params),
                             route or functools.partial(partition_for, partitions=partitions), max_event_bytes,
                             limit, report)
    return _Chunk(appends, report.lines, report.accepted, report.rejected, report.first_rejections, raw_bytes,
                  physical_lines)


@functools.lru_cache(maxsize=8)
def _input_validator(params: schema.Params) -> EventValidator:
    return EventValidator(event_time="input", params=params)


def _validate_chunk(chunk: list[bytes], now: dt.datetime, *, partitions: int, route: Callable[[str], int] | None,
                    max_event_bytes: int, params: schema.Params) -> tuple[list[bytes], dict[int, pa.Table]] | None:
    """The chunk's events and their tables per partition when every line is valid (`validate_batch`), else None.
    Tried on the lines as they are, then, when stripping changes them (blank lines, CRLF, padding), stripped."""
    events = _events_of(chunk)
    tables = None
    if events is not None:
        tables = validate_batch(events, now=now, mode="input", partitions=partitions, route=route,
                                max_event_bytes=max_event_bytes, params=params)
    if tables is None and events != (stripped := _stripped(chunk)):  # blank lines, CRLF, padding
        events = stripped
        tables = validate_batch(events, now=now, mode="input", partitions=partitions, route=route,
                                max_event_bytes=max_event_bytes, params=params)
    if tables is None:
        return None
    return events, tables  # type: ignore[return-value]


def _validate_each(chunk: list[bytes], first_number: int, now: dt.datetime, validator: EventValidator,
                   route: Callable[[str], int], max_event_bytes: int, limit: int | None,
                   report: LoadReport) -> list[Append]:
    """The per-event path: each line validated on its own, counted in `report` (rejections with their line
    numbers), the accepted ones grouped per partition into NDJSON records within `limit`."""
    by_partition: dict[int, list[bytes]] = {}
    for number, raw in enumerate(chunk, start=first_number):
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
        by_partition.setdefault(route(result.device_id), []).append(result.line)
    return [Append(p, b"\n".join(part), len(part)) for p, lines in sorted(by_partition.items())
            for part in _split_by_size(lines, limit)]

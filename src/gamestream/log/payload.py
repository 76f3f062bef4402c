"""What a log record's payload holds, and turning it back into Arrow.

Two formats, told apart by their first bytes (the log backends never look inside a payload):

- **Arrow** (written by this version's collector and `load` when a whole batch passed the vectorised checks):
  ``MAGIC`` followed by an Arrow IPC stream of one or more record batches with the event schema without its
  derived columns (`schema.decode_schema(params)` for the writer's promoted parameters), optionally compressed (LZ4 or ZSTD buffers, a setting). The
  processor concatenates these instead of parsing JSON.
- **NDJSON** (older versions, batches that held a bad event, foreign producers such as the seed's Lambda): one
  JSON event per line. A JSON text never starts with ``MAGIC``.
"""

from __future__ import annotations

from typing import Literal

import pyarrow as pa
import pyarrow.ipc as ipc

from gamestream import schema

MAGIC = b"GSA1"  # "gamestream Arrow, version 1"; followed by the IPC stream
Compression = Literal["none", "lz4", "zstd"]
COMPRESSIONS: tuple[str, ...] = ("none", "lz4", "zstd")

_OPTIONS = {name: ipc.IpcWriteOptions(compression=None if name == "none" else name) for name in COMPRESSIONS}
# The stream starts 4 bytes into the payload, so its buffers, 8-aligned within it, lie 4 bytes off in memory:
# every buffer is copied to 64-byte-aligned memory as it is read. Read in place, they were views of the one
# payload: Acero (the processor's grouping) printed a warning per misaligned buffer (318 lines for 1M events),
# and the few columns the KPI stage keeps of a batch until its fold kept the whole payload alive (1M events:
# `process --until-idle` peaked at 538 MB against 590-596 with the int64 buffers alone copied).
_READ = ipc.IpcReadOptions(ensure_alignment=ipc.Alignment.At64Byte)


def is_arrow(payload: bytes) -> bool:
    return payload[:4] == MAGIC


def encode(table: pa.Table | pa.RecordBatch, compression: Compression = "none") -> bytes:
    """`table` as an Arrow record payload: as it is when it has the columns of `schema.decode_schema()` in that
    order (`validate_batch` makes it so, with the promoted parameters inside eventParams); otherwise conformed to
    `schema.decode_schema()`."""
    if table.schema.names != schema.decode_schema().names:
        table = schema.conform(pa.table(table), schema.decode_schema())
    sink = pa.BufferOutputStream()
    sink.write(MAGIC)
    with ipc.new_stream(sink, table.schema, options=_OPTIONS[compression]) as writer:
        writer.write(table)
    return sink.getvalue().to_pybytes()


def decode(payload: bytes, params: schema.Params = ()) -> pa.Table:
    """An Arrow record payload back as a table with `schema.decode_schema(params)`: a record written under
    another configuration, or before the extra columns existed, is conformed to it (`schema.conform`: missing
    columns null; a promoted parameter `params` lacks, or holds with another type, kept in `eventParams_extra`,
    an unknown top-level column in `event_extra`); `ValueError` when it is not one or cannot be conformed (a
    record from a newer, incompatible version, say)."""
    if not is_arrow(payload):
        raise ValueError("not an Arrow record payload")
    try:
        table = ipc.open_stream(pa.py_buffer(payload)[len(MAGIC):], options=_READ).read_all()
    except (pa.ArrowInvalid, OSError) as error:
        raise ValueError(f"unreadable Arrow record payload: {error}") from None
    target = schema.decode_schema(params)
    if table.schema != target:
        try:
            table = schema.conform(table, target)
        except (KeyError, ValueError, pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
            raise ValueError(f"Arrow record payload with another schema: {error}") from None
    return table

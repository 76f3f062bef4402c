"""How many events a Kinesis record holds, counted from its payload — so records of foreign producers count too."""

from __future__ import annotations

import struct

from gamestream.log import payload as payload_format


def _arrow_rows(data: bytes) -> int:
    """Rows of an Arrow payload from its IPC messages' metadata (the RecordBatch `length` of each record batch
    message, read from the flatbuffer), without decompressing the bodies; `payload.decode` when that fails."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    try:
        total = 0
        for message in ipc.MessageReader.open_stream(pa.py_buffer(data)[len(payload_format.MAGIC):]):
            if message.type != "record batch":
                continue
            meta = message.metadata.to_pybytes()

            def field_at(table: int, index: int) -> int | None:
                vtable = table - struct.unpack_from("<i", meta, table)[0]
                size = struct.unpack_from("<H", meta, vtable)[0]
                if 4 + 2 * index >= size:
                    return None
                offset = struct.unpack_from("<H", meta, vtable + 4 + 2 * index)[0]
                return table + offset if offset else None

            root = struct.unpack_from("<I", meta, 0)[0]
            kind, header = field_at(root, 1), field_at(root, 2)  # Message.header_type, Message.header
            if kind is None or meta[kind] != 3 or header is None:  # 3: MessageHeader.RecordBatch
                raise ValueError("not a record batch header")
            batch = header + struct.unpack_from("<I", meta, header)[0]
            length = field_at(batch, 0)  # RecordBatch.length
            total += struct.unpack_from("<q", meta, length)[0] if length is not None else 0
        return total
    except Exception:
        try:
            return payload_format.decode(data).num_rows
        except ValueError:
            return 0


def events_in(data: bytes) -> int:
    """How many events a payload holds: rows of an Arrow payload, non-blank lines of NDJSON."""
    if payload_format.is_arrow(data):
        return _arrow_rows(data)
    return sum(1 for line in data.split(b"\n") if line.strip())


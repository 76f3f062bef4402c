"""Reading gamestream's tables from your own Python, in a script that exits cleanly.

    from gamestream.tables.read import read_table

    events = read_table("events", data_dir="gamestream-data", columns=["eventName", "eventDate"],
                        filters=[("eventDate", ">=", "2024-05-01")])
    print(events.num_rows, events.group_by("eventName").aggregate([([], "count_all")]))

`read_table(name)` returns a `pyarrow.Table`; `dataset(name)` a lazy `pyarrow.dataset.Dataset` to hand to DuckDB
or Polars (`duckdb.sql("... FROM events")`, `pl.scan_pyarrow_dataset(events)`). Both find the table as every
command does: `data_dir` (else GAMESTREAM_DATA_DIR, else `./gamestream-data`) and `tables` (else
GAMESTREAM_TABLES, e.g. `s3://bucket/prefix`, reached with the standard AWS_* environment, as gamestream does).

Why not `DeltaTable(path).to_pyarrow_table()` (or `.to_pyarrow_dataset()` then a scan)? With deltalake 1.6.3 a
script that does only that ends with exit 134, "terminate called without an active exception", in most runs. The
cause (seen in a core's backtrace): `to_pyarrow_dataset()` reads the Parquet files through a Python filesystem
(`pyarrow.fs.PyFileSystem` over deltalake's `DeltaStorageHandler`), so the bytes it reads are Python objects
(`arrow::py::PyBuffer`). The scan's pre-buffering cache keeps some of them alive on an Arrow I/O thread after the
scan is done; that thread drops them while the interpreter is shutting down, `PyGILState_Ensure` then ends the
thread (`pthread_exit`), the unwinding goes through a C++ destructor and the C++ runtime aborts (delta-rs#2184,
arrow#34314). A finished script, all its output written, so exits 134.

The cure here is to keep Python out of Arrow's threads: the table's log is read by deltalake as usual (which files,
with which partition values), and the files by a native Arrow filesystem (`LocalFileSystem` for a folder,
`S3FileSystem` for `s3://`, configured from the same AWS_* variables). No Python object is then held by an Arrow
thread, nothing has to be released at shutdown, and the script exits with its own status: no `atexit` hook, no
`os._exit` (which would skip the script's own clean-up). Other object stores (gs://, az://) are reached through
`pyarrow.fs.FileSystem.from_uri`, with that filesystem's own configuration.

Like `to_pyarrow_dataset()`, this reads Delta tables of reader version 1 (gamestream's): no deletion vectors or
column mapping.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.fs as pafs

from gamestream.settings import Settings
from gamestream.tables import lake

__all__ = ["dataset", "read_table", "table_uri"]


def table_uri(name: str, *, data_dir: str | Path | None = None, tables: str | None = None) -> str:
    """Where table `name` (events, events_quarantine, kpi_daily, …; `gamestream.settings.TABLES`) lives: the
    folder or object store URL every command would use with the same `--data-dir` and `--tables`."""
    return Settings.from_env(data_dir=data_dir, tables_uri=tables).table_uri(name)


def dataset(name: str, *, data_dir: str | Path | None = None, tables: str | None = None,
            version: int | None = None) -> pds.Dataset:
    """A lazy pyarrow dataset of table `name` at its latest version (or `version`), its files read by a native
    Arrow filesystem (see the module's docstring): scan it with DuckDB, Polars or `to_table()`, and the script
    still exits cleanly. It is a snapshot: commits made after it was built are not in it."""
    uri = table_uri(name, data_dir=data_dir, tables=tables)
    return lake.open_table(uri, version=version).to_pyarrow_dataset(filesystem=_filesystem(uri))


def read_table(name: str, *, data_dir: str | Path | None = None, tables: str | None = None,
               columns: Sequence[str] | None = None, filters: Any = None, version: int | None = None) -> pa.Table:
    """Table `name` as a `pyarrow.Table`: `columns` to read only those, `filters` a `pyarrow.dataset.Expression`
    or DNF tuples as `pyarrow.parquet.read_table` takes them (`[("eventDate", "=", "2024-05-01")]`; a filter on
    `eventDate` skips whole partitions). `data_dir` and `tables` as the commands' `--data-dir` and `--tables`.

    >>> from gamestream.tables.read import read_table
    >>> kpis = read_table("kpi_daily", columns=["eventDate", "dau"])  # doctest: +SKIP
    >>> kpis.sort_by("eventDate").to_pylist()[-1]                      # doctest: +SKIP
    {'eventDate': datetime.date(2024, 5, 3), 'dau': 5}
    """
    if filters is not None and not isinstance(filters, pds.Expression):
        import pyarrow.parquet as pq

        filters = pq.filters_to_expression(filters)
    source = dataset(name, data_dir=data_dir, tables=tables, version=version)
    return source.to_table(columns=list(columns) if columns is not None else None, filter=filters)


def _filesystem(uri: str) -> pafs.FileSystem:
    """A native Arrow filesystem rooted at the table's folder (the dataset's file paths are relative to it)."""
    if not lake.is_object_store(uri):
        return pafs.SubTreeFileSystem(os.path.abspath(uri.removeprefix("file://")), pafs.LocalFileSystem())
    parsed = urlparse(uri)
    if parsed.scheme in ("s3", "s3a"):
        root = f"{parsed.netloc}/{parsed.path.strip('/')}".rstrip("/")
        return pafs.SubTreeFileSystem(root, _s3_filesystem())
    filesystem, path = pafs.FileSystem.from_uri(uri)
    return pafs.SubTreeFileSystem(path, filesystem)


def _s3_filesystem() -> pafs.S3FileSystem:
    """Arrow's S3 client configured from the variables delta-rs reads (`lake.storage_options`): credentials
    (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, or the SDK's usual chain when unset), AWS_REGION
    and, for an S3-compatible server, AWS_ENDPOINT_URL (path-style addressing, http:// when the URL says so)."""
    environ = os.environ
    options: dict[str, Any] = {}
    if environ.get("AWS_ACCESS_KEY_ID") and environ.get("AWS_SECRET_ACCESS_KEY"):
        options.update(access_key=environ["AWS_ACCESS_KEY_ID"], secret_key=environ["AWS_SECRET_ACCESS_KEY"],
                       session_token=environ.get("AWS_SESSION_TOKEN"))
    region = environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION")
    if region:
        options["region"] = region
    endpoint = environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        options.update(endpoint_override=parsed.netloc + parsed.path.rstrip("/"), scheme=parsed.scheme)
    return pafs.S3FileSystem(**options)

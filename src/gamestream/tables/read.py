"""Reading gamestream's tables from your own Python, in a script that exits cleanly.

`read_table(name)` returns a `pyarrow.Table`; `dataset(name)` a lazy `pyarrow.dataset.Dataset` to hand to DuckDB
(`duckdb.sql("SELECT ... FROM events")` finds the variable `events`) or Polars (`pl.scan_pyarrow_dataset`). Both
find the table as every command does: `data_dir` (else GAMESTREAM_DATA_DIR, else `./gamestream-data`) and `tables`
(else GAMESTREAM_TABLES, e.g. `s3://bucket/prefix`, reached with the standard AWS_* environment, as gamestream
does). An example, with the bundled sample:

    gamestream load src/gamestream/data/sample_events.ndjson.gz && gamestream process --until-idle
    python - <<'EOF'
    import datetime
    from gamestream.tables.read import read_table

    daily = read_table("kpi_daily", columns=["eventDate", "dau"]).sort_by("eventDate")
    print(daily.num_rows, "days, DAU", daily.column("dau").to_pylist())
    purchases = read_table("events", columns=["eventTime", "eventParams"],
                           filters=[("eventDate", ">=", datetime.date(2020, 1, 1)),
                                    ("eventName", "=", "purchaseEvent")])
    print(purchases.num_rows, "purchases")
    EOF

Why not `DeltaTable(path).to_pyarrow_table()`? With deltalake 1.6.3 (pyarrow 26, Python 3.11) a script that reads
a table so can do all its work and then end with exit 134, "terminate called without an active exception" (here
from 2 to 10 runs in 10, depending on the machine's load). The cause, in a core's backtrace: deltalake's
`to_pyarrow_dataset()` reads the Parquet files through a filesystem written in Python (`pyarrow.fs.PyFileSystem`
over its `DeltaStorageHandler`), so what it reads are Python bytes (`arrow::py::PyBuffer`). A finished scan's
pre-buffering state, still holding some of them, is released later by an Arrow I/O thread; when that happens
during interpreter shutdown, the thread's `PyGILState_Ensure` ends it (`pthread_exit`), the unwinding crosses a
C++ destructor and the C++ runtime aborts (delta-rs#2184, arrow#34314). `del` and `gc.collect()` do not help: the
reference is held inside Arrow, not by a Python variable.

The cure here is to keep Python out of Arrow's threads: the table's log is read by deltalake as usual (which files,
with which partition values), and the files by a native Arrow filesystem (`LocalFileSystem` for a folder,
`S3FileSystem` for `s3://`, configured from the same AWS_* variables). No Python object is then held by an Arrow
thread, nothing has to be released at shutdown, and the script exits with its own status: no `atexit` hook, no
`os._exit` (which would skip the script's own clean-up). Other object stores (gs://, az://) are reached through
`pyarrow.fs.FileSystem.from_uri`, with that filesystem's own configuration. The price: the files are fetched by
Arrow's clients, not delta-rs', so on an object store only the settings named in `_s3_filesystem` reach them.

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
    """Table `name` as a `pyarrow.Table` (the module's docstring has an example): `columns` to read only those,
    `filters` a `pyarrow.dataset.Expression` or DNF tuples as `pyarrow.parquet.read_table` takes them, with values
    of the column's type (`[("eventDate", ">=", datetime.date(2024, 5, 1))]`; a filter on `eventDate` skips
    whole partitions). `data_dir` and `tables` as the commands' `--data-dir` and `--tables`; `version` a Delta
    version (time travel), else the latest."""
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
        return pafs.SubTreeFileSystem(root, _s3_filesystem(parsed.netloc))
    filesystem, path = pafs.FileSystem.from_uri(uri)
    return pafs.SubTreeFileSystem(path, filesystem)


def _s3_filesystem(bucket: str) -> pafs.S3FileSystem:
    """Arrow's S3 client configured from the variables delta-rs reads (`lake.storage_options`): credentials
    (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, or the SDK's usual chain when unset), AWS_REGION
    (else the bucket's own region, asked of AWS) and, for an S3-compatible server, AWS_ENDPOINT_URL (path-style
    addressing; http:// when the URL says so, whatever AWS_ALLOW_HTTP says)."""
    environ = os.environ
    options: dict[str, Any] = {}
    if environ.get("AWS_ACCESS_KEY_ID") and environ.get("AWS_SECRET_ACCESS_KEY"):
        options.update(access_key=environ["AWS_ACCESS_KEY_ID"], secret_key=environ["AWS_SECRET_ACCESS_KEY"],
                       session_token=environ.get("AWS_SESSION_TOKEN"))
    region = environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION")
    endpoint = environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        options.update(endpoint_override=parsed.netloc + parsed.path.rstrip("/"), scheme=parsed.scheme)
    elif not region:
        region = pafs.resolve_s3_region(bucket)
    if region:
        options["region"] = region
    return pafs.S3FileSystem(**options)

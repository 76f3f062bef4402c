"""Partitioned KPIs: what a part stage (a `KpiStage` folding one log partition's devices) reads of the events table.

On a log whose producers route a device to one partition (`crc32(device_id) % P`: the embedded log and NATS),
every per-device fact — active days, first day, first purchase, sessions — lies in one partition's events, so
each KPI is a sum over partitions. A part stage folds the rows of its partition's devices into its own copy of
the KPI tables (`Settings.kpi_part_uri`), and `merge.KpiMerge` sums the copies into the tables users read.

A part stage reads:
- the rows its processor committed, handed over in-process (`KpiStage.offer`), keeping its devices' rows;
- for a version another processor committed (before an ownership move), the change data feed — but only for
  the versions whose commit names its partition's txn appId (`version_needs`); every other version added no row
  of its devices, and is folded as empty (its commit's recorded greatest eventTimes still advance the watermark);
- a day recomputed from the table, a forget's deleted rows, a bootstrap: the events table, filtered to its
  devices (`RouteDataset`).
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from gamestream.kpi.rows import normalise, segment_column
from gamestream.tables import lake

if TYPE_CHECKING:
    from gamestream.log import EventLog
    from gamestream.settings import Settings

# the rows a part stage folds (`rows.normalise`, with the version that added each)
ROWS = pa.schema([("eventTime", pa.timestamp("us", tz="UTC")), ("eventName", pa.string()), ("device_id", pa.string()),
                  ("amount", pa.float64()), ("eventDate", pa.date32()), ("_commit_version", pa.int64())])


def rows_schema(dimensions: tuple[str, ...]) -> pa.Schema:
    """`ROWS` with each breakdown dimension's value column (`rows.segment_column`)."""
    fields = [*ROWS][:-1] + [pa.field(segment_column(d), pa.string()) for d in dimensions] + [ROWS.field(
        "_commit_version")]
    return pa.schema(fields)

# operations that add no row to the events table (a part stage need not read their change data)
_NO_ROWS = frozenset({"OPTIMIZE", "CREATE TABLE", "ADD COLUMN", "ADD COLUMNS", "SET TBLPROPERTIES", "VACUUM START",
                      "VACUUM END", "ADD CONSTRAINT", "DROP CONSTRAINT", "DELETE"})


def routes_of(devices: pa.Array | pa.ChunkedArray, parts: int) -> pa.Array:
    """Each row's partition by its device (`crc32(device_id) % parts`, `log.partition_for`'s rule), computed once
    per distinct device; a row without a device goes to partition 0, as producers send it."""
    encoded = pc.dictionary_encode(devices)
    if isinstance(encoded, pa.ChunkedArray):
        encoded = encoded.combine_chunks() if encoded.num_chunks else pa.DictionaryArray.from_arrays(
            pa.array([], pa.int32()), pa.array([], pa.string()))
    routes = pa.array([zlib.crc32(d.encode()) % parts if d is not None else 0
                       for d in encoded.dictionary.to_pylist()], pa.int32())
    return pc.fill_null(pc.take(routes, encoded.indices), 0)


def keep_part(rows: pa.Table, part: int, parts: int) -> pa.Table:
    """The rows (normalised: a `device_id` column) of partition `part`'s devices."""
    if not rows.num_rows:
        return rows
    return rows.filter(pc.equal(routes_of(rows["device_id"], parts), part))


class RouteDataset:
    """The events table as one partition's devices see it: `to_table` as `pyarrow.dataset.Dataset.to_table`,
    keeping only the rows of `part`'s devices (read with eventParams, whose device_id decides)."""

    def __init__(self, dataset: ds.Dataset, part: int, parts: int) -> None:
        self.dataset, self.part, self.parts = dataset, part, parts

    @property
    def schema(self) -> pa.Schema:
        return self.dataset.schema

    def to_table(self, columns: list[str] | None = None, filter: ds.Expression | None = None) -> pa.Table:
        wanted = columns or self.dataset.schema.names
        read = list(dict.fromkeys([*wanted, "eventParams"]))
        rows = self.dataset.to_table(columns=read, filter=filter)
        if not rows.num_rows:
            return rows.select(wanted)
        devices = pc.cast(pc.struct_field(rows["eventParams"], "device_id"), pa.string())
        return rows.filter(pc.equal(routes_of(devices, self.parts), self.part)).select(wanted)


def version_needs(actions: list[dict] | None, own_app_id: str, processor_prefix: str) -> bool:
    """Whether an events version may have added rows of a partition's devices, from its commit's actions: it
    names the partition's txn appId; or no processor's (another writer, or a commit file gone — read to be sure);
    or it is no operation that adds none."""
    if actions is None:
        return True
    app_ids = lake.txn_app_ids_in(actions)
    if own_app_id in app_ids:
        return True
    if any(a.startswith(processor_prefix) for a in app_ids):
        return False  # a processor's commit of other partitions: none of this partition's devices
    info = lake.commit_info_of(actions) or {}
    return info.get("operation") not in _NO_ROWS


def insert_rows(changes: pa.Table, versions: set[int], dimensions: tuple[str, ...] = ()) -> pa.Table:
    """The inserted rows of `versions`, normalised (with the breakdowns' `dimensions`), from a change data feed
    read (`_change_type`, `_commit_version`)."""
    kinds = pc.cast(changes["_change_type"], pa.string())
    wanted = pc.and_(pc.equal(kinds, "insert"),
                     pc.is_in(pc.cast(changes["_commit_version"], pa.int64()), pa.array(sorted(versions), pa.int64())))
    # normalised first: the feed's string_view columns cannot be taken
    return normalise(changes, dimensions).filter(wanted)


def kpi_partitioned(settings: "Settings", log: "EventLog") -> bool:
    """Whether the KPIs are folded per partition (`Settings.kpi_mode`; `kpi_mode_choice` says why)."""
    return kpi_mode_choice(settings, log)[0]


def kpi_mode_choice(settings: "Settings", log: "EventLog") -> tuple[bool, str]:
    """(whether the KPIs are folded per partition, why): `auto` chooses it on a log whose producers route a device
    to one partition, unless the data directory's KPI tables were folded globally already (its `kpi_activity`
    has a version folded in and no partition has tables of its own)."""
    mode = settings.kpi_mode
    if mode not in ("auto", "global", "partitioned"):
        raise ValueError(f"kpi_mode must be auto, global or partitioned, not {mode!r}")
    if mode == "global":
        return False, "kpi_mode = global"
    if log.own_routing:
        if mode == "partitioned":
            raise ValueError("partitioned KPIs need a log whose producers route a device to one partition; this "
                             "log routes by its own rule (Kinesis): use kpi_mode = global")
        return False, "kpi_mode = auto, and this log's producers need not route a device to one partition"
    if mode == "partitioned":
        return True, "kpi_mode = partitioned"
    if any(lake.table_exists(settings.kpi_part_uri(p, "kpi_retention")) for p in range(log.partitions)):
        return True, "kpi_mode = auto, and the partitions have KPI tables of their own"
    activity = settings.table_uri("kpi_activity")
    if lake.table_exists(activity) and (lake.open_table(activity).transaction_version(
            lake.txn_app_id(settings.pipeline, stage="kpi")) or 0):
        return False, "kpi_mode = auto, and the KPI tables were folded globally already"
    return True, "kpi_mode = auto, on a log that routes a device to one partition"

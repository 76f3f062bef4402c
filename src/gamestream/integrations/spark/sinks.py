"""The Spark job's Delta sinks: `foreachBatch` functions that write what a micro-batch produced through delta-rs,
exactly once per batch id.

Spark records a micro-batch's offsets in its checkpoint before running it and, after a crash, runs the same batch
id over the same offsets again. Every commit here therefore carries a Delta txn action whose version is
`batch_id + 1` under an appId of the job's own (`<pipeline>-spark`), and a batch whose id the table already has is
skipped — Delta's idempotent writes (`txnAppId`/`txnVersion`), done by hand because Delta's Spark jars are not
used: the Parquet files and the commit come from delta-rs in the driver.

- `EventsSink`: the rows of the batch → `events` (append), then the affected days of `kpi_daily` recomputed
  from the events table (absolute values, so a replayed batch rewrites the same numbers).
- `HourlySink`: the windows Spark's stateful aggregation updated in the batch (output mode "update": their
  totals so far) → `kpi_events_hourly` / `kpi_bookings_hourly` by MERGE on window_start. A window is `final`
  once Spark's watermark has passed its end: Spark has then dropped it from its state and drops any later event
  for it, so it will never change again. The watermark a batch ran with is read from the batch's entry in the
  checkpoint's offset log (`batchWatermarkMs`), which Spark writes before running the batch.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import CommitProperties, DeltaTable, Transaction

from gamestream import schema
from gamestream.kpi import tables as kt
from gamestream.settings import Settings
from gamestream.tables import lake

logger = logging.getLogger(__name__)

# The seed columns of kpi_daily the job keeps; the game KPIs (new users, WAU/MAU, sessions, …) stay null.
DAILY_COLUMNS = ("dau", "events", "bookings", "paying_users", "arpdau")


def app_id(settings: Settings) -> str:
    """The txn appId of the Spark job's commits (any table): distinct from the embedded processor's
    `<pipeline>-p<partition>` and the KPI stage's `<pipeline>-kpi`."""
    return lake.txn_app_id(settings.pipeline, stage="spark")


def open_kpi_table(settings: Settings, name: str) -> DeltaTable:
    table_schema, partition_by, configuration = kt.TABLES[name]
    return lake.open_or_create(settings.table_uri(name), table_schema, partition_by, configuration)


def batch_watermark_us(checkpoint: str | Path, batch_id: int) -> int:
    """The event-time watermark (µs since the epoch) Spark runs micro-batch `batch_id` with, from the batch's
    entry in the checkpoint's offset log (`offsets/<batch_id>`: a version line, then the batch metadata as JSON
    with `batchWatermarkMs`). Spark writes it before running the batch, and a replayed batch reads it back."""
    path = Path(str(checkpoint).removeprefix("file://")) / "offsets" / str(batch_id)
    try:
        lines = path.read_text().splitlines()
        return int(json.loads(lines[1])["batchWatermarkMs"]) * 1000
    except (OSError, IndexError, KeyError, ValueError) as error:
        raise RuntimeError(f"cannot read the watermark of batch {batch_id} from {path} ({error}): the job's "
                           "checkpoint must be a folder the driver can read") from None


def _write_once(table: DeltaTable, rows: pa.Table, app: str, version: int, settings: Settings) -> bool:
    """Appends `rows` with txn (`app`, `version`) unless the table has that version already; True if written."""
    def build(versions: dict[str, int]) -> lake.Batch | None:
        if versions[app] >= version:
            return None  # this batch is in already: Spark replayed it after a crash
        return lake.Batch(lake.conform_to(table, rows), {app: version})

    made = lake.commit_exactly_once(table, [app], build, partition_by=[schema.PARTITION_COLUMN],
                                    retries=settings.commit_retries, name="events", stage="spark",
                                    context={"batch": version - 1})
    return made is not None


def _merge_once(table: DeltaTable, name: str, source: pa.Table, predicate: str, updates: dict[str, str] | None,
                app: str, version: int, settings: Settings) -> bool:
    """MERGEs `source` into `table` with txn (`app`, `version`), unless the table has that version already."""
    written = False
    for attempt in lake.CommitRetries(name, stage="spark", conflicts=settings.commit_retries,
                                      context={"batch": version - 1}):
        with attempt:
            if attempt.num > 1:
                table.update_incremental()
            if (table.transaction_version(app) or 0) >= version:
                return written
            merger = table.merge(source, predicate=predicate, source_alias="s", target_alias="t",
                                 commit_properties=CommitProperties(app_transactions=[Transaction(app, version)]))
            merger = merger.when_matched_update(updates) if updates else merger.when_matched_update_all()
            merger.when_not_matched_insert_all().execute()
            written = True
    return written


def _chunked(values: pa.Array | pa.ChunkedArray) -> pa.ChunkedArray:
    return values if isinstance(values, pa.ChunkedArray) else pa.chunked_array([values])


class EventsSink:
    """foreachBatch of the events stream: rows → `events`, then their days of `kpi_daily`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app_id = app_id(settings)
        self.events = lake.open_events(settings.table_uri("events"), settings.schema_params)
        self.daily = open_kpi_table(settings, "kpi_daily")
        self.committed = 0  # events this process committed

    def __call__(self, batch, batch_id: int) -> None:
        started = time.perf_counter()
        rows = batch.toArrow()
        version = batch_id + 1
        self.events.update_incremental()
        written = _write_once(self.events, rows, self.app_id, version, self.settings)
        if written:
            self.committed += rows.num_rows
        days = pc.unique(rows[schema.PARTITION_COLUMN]).to_pylist() if rows.num_rows else []
        if days:
            self._commit_daily(sorted(d for d in days if d is not None), version)
        logger.info("spark batch committed" if written else "spark batch already committed", extra={
            "table": "events", "batch": batch_id, "rows": rows.num_rows, "days": len(days),
            "seconds": round(time.perf_counter() - started, 3)})

    def _commit_daily(self, days: list, version: int) -> None:
        """The reference pipeline's daily figures of `days`, recomputed from the events table as it is now (so
        the values are absolute: a replayed batch writes the same ones)."""
        import duckdb

        self.events.update_incremental()
        dataset = self.events.to_pyarrow_dataset()
        scanned = dataset.to_table(filter=pc.field(schema.PARTITION_COLUMN).isin(days),
                                   columns=[schema.PARTITION_COLUMN, "eventName", "eventParams"])
        connection = duckdb.connect()
        try:
            connection.register("events", scanned)
            totals = connection.sql("""
                SELECT eventDate,
                       count(DISTINCT eventParams.device_id) AS dau,
                       count(*) AS events,
                       coalesce(sum(eventParams.amount) FILTER (WHERE eventName = 'purchaseEvent'), 0.0) AS bookings,
                       count(DISTINCT eventParams.device_id) FILTER (WHERE eventName = 'purchaseEvent') AS paying_users
                FROM events GROUP BY eventDate ORDER BY eventDate""").to_arrow_table()
        finally:
            connection.close()
        dau = totals["dau"]
        arpdau = pc.if_else(pc.greater(dau, 0), pc.divide(totals["bookings"], pc.cast(dau, pa.float64())), 0.0)
        columns = {"eventDate": totals["eventDate"], "dau": dau, "events": totals["events"],
                   "bookings": totals["bookings"], "paying_users": totals["paying_users"], "arpdau": arpdau}
        source = pa.table({f.name: columns[f.name].cast(f.type) if f.name in columns
                           else pa.nulls(totals.num_rows, f.type) for f in kt.DAILY}, schema=kt.DAILY)
        self.daily.update_incremental()
        _merge_once(self.daily, "kpi_daily", source, "t.eventDate = s.eventDate",
                    {c: f"s.{c}" for c in DAILY_COLUMNS}, self.app_id, version, self.settings)


class HourlySink:
    """foreachBatch of one windowed aggregation (output mode "update") → `kpi_events_hourly` or
    `kpi_bookings_hourly`."""

    def __init__(self, settings: Settings, name: str, checkpoint: str | Path) -> None:
        if name not in ("kpi_events_hourly", "kpi_bookings_hourly"):
            raise ValueError(f"no hourly KPI table {name!r}")
        self.settings = settings
        self.name = name
        self.checkpoint = checkpoint
        self.app_id = app_id(settings)
        self.schema = kt.TABLES[name][0]
        self.table = open_kpi_table(settings, name)

    def __call__(self, batch, batch_id: int) -> None:
        version = batch_id + 1
        self.table.update_incremental()
        if (self.table.transaction_version(self.app_id) or 0) >= version:
            return  # replayed after a crash, and in already
        watermark = pa.scalar(batch_watermark_us(self.checkpoint, batch_id), pa.int64()).cast(kt.TS)
        updated = batch.toArrow()
        window = updated["window"]
        values: dict[str, pa.ChunkedArray | pa.Array] = {
            "window_start": pc.struct_field(window, "start").cast(kt.TS),
            "window_end": pc.struct_field(window, "end").cast(kt.TS),
        }
        if self.name == "kpi_bookings_hourly":
            values["bookings"] = pc.fill_null(updated["bookings"], 0.0)
            values["purchases"] = updated["purchases"]
        else:
            values["events"] = updated["count"]
        values["late_events"] = pa.repeat(pa.scalar(0, pa.int64()), updated.num_rows)  # Spark drops late rows
        values["final"] = pc.less_equal(values["window_end"], watermark)
        emitted = pa.table({f.name: _chunked(values[f.name]).cast(f.type) for f in self.schema}, schema=self.schema)
        # windows the watermark has passed since they were written: Spark will never update them again
        existing = self.table.to_pyarrow_table(filters=[("final", "=", False)])
        passed = existing.filter(pc.less_equal(existing["window_end"], watermark))
        passed = passed.set_column(passed.schema.get_field_index("final"), "final",
                                   pa.repeat(pa.scalar(True), passed.num_rows))
        source = pa.concat_tables([emitted, passed.select(self.schema.names).cast(self.schema)])
        if source.num_rows:
            _merge_once(self.table, self.name, source, "t.window_start = s.window_start", None, self.app_id,
                        version, self.settings)

"""`spark.readStream.format("gamestream")`: the event log as a Spark Structured Streaming source.

    from gamestream.integrations.spark import register
    register(spark)
    events = (spark.readStream.format("gamestream")
              .option("data_dir", "gamestream-data")          # the embedded log under <data_dir>/log
              .option("log", "nats://127.0.0.1:4222")         # or a log URL (nats://…, kinesis://…)
              .option("max_records_per_partition", "100")     # per micro-batch (default: all available)
              .load())

One Spark input partition per log partition that has new records; Spark's offsets are the log's offsets, a
JSON object ``{"<partition>": <last offset read>}``. Spark writes the end offsets of a micro-batch to its
checkpoint before running it and re-reads exactly that range after a crash, so a sink that is idempotent per
batch id (the job's Delta sinks, `gamestream.integrations.spark.sinks`) gets every event exactly once.

The rows are what the embedded processor writes to the events table, less `eventDate` (derived downstream with
`to_date(eventTime)`, as the reference pipeline does): each record is decoded by `gamestream.process.decode`, so Arrow and
NDJSON records, API Gateway envelopes and promoted parameters (`[schema.params]`) all come out the same way.
Rows that fail validation (a null eventTime, a missing device id) are not emitted — the embedded processor puts
them in `events_quarantine`, which this source does not feed. Events of devices erased by `gamestream forget`
are dropped, as the processor drops them. Rows are handed to Spark as Arrow record batches.

Driver and executors both open the log: the driver to learn the newest offsets (`latestOffset`), each task to
read its partition's slice (`read`). On a cluster every executor must reach the log: the same data directory
(shared storage) for the embedded log, the servers for NATS or Kinesis.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pyspark.sql.datasource import DataSource, DataSourceStreamReader, InputPartition
from pyspark.sql.pandas.types import from_arrow_schema
from pyspark.sql.streaming.datasource import (
    ReadAllAvailable,
    ReadLimit,
    ReadMaxRows,
    SupportsTriggerAvailableNow,
)
from pyspark.sql.types import StructType

NAME = "gamestream"
_READ_CHUNK = 200  # log records per read() call inside a task


@dataclass(frozen=True)
class LogSpec:
    """Enough to open the log anywhere (driver or executor): the data directory, the log URL, the configuration
    file. Picklable, unlike an open log."""

    data_dir: str
    log: str | None
    config: str | None

    @classmethod
    def from_options(cls, options) -> "LogSpec":
        data_dir = options.get("data_dir") or options.get("path")
        if not data_dir and not options.get("log"):
            raise ValueError('the gamestream source needs .option("data_dir", DIR) (the embedded log under '
                             '<DIR>/log) or .option("log", URL) (nats://…, kinesis://…)')
        return cls(str(Path(data_dir or "gamestream-data").absolute()), options.get("log") or None,
                   options.get("config") or None)

    def settings(self):
        from gamestream.settings import Settings

        overrides: dict[str, object] = {"data_dir": self.data_dir, "log": self.log}
        if self.config:
            overrides["config"] = Path(self.config)
        return Settings.from_env(**overrides)

    def open(self):
        from gamestream.log import connect

        return connect(self.settings())


@dataclass(frozen=True)
class LogSlice(InputPartition):
    """One task's work: records of `partition` with `start` < offset <= `end`."""

    spec: LogSpec
    params: tuple[tuple[str, str], ...]
    partition: int
    start: int
    end: int


def _offset(value: object) -> int:
    return int(value)  # an int, or a string for offsets beyond what JSON readers keep exactly (Kinesis)


def _encode(offset: int) -> int | str:
    return offset if offset < 2**53 else str(offset)


class GamestreamDataSource(DataSource):
    """The `gamestream` format: a streaming source over the event log (see the module docstring)."""

    @classmethod
    def name(cls) -> str:
        return NAME

    def schema(self) -> StructType:
        from gamestream import schema

        params = _params(LogSpec.from_options(self.options).settings())
        return from_arrow_schema(schema.decode_schema(params), prefer_timestamp_ntz=False)

    def streamReader(self, schema: StructType) -> "GamestreamStreamReader":
        return GamestreamStreamReader(self.options)


def _params(settings) -> tuple:
    """The promoted parameters to decode with: the events table's own (any process's `[schema.params]`), then
    the configured ones it lacks — as the embedded processor decodes (`schema.effective_params`)."""
    from gamestream import schema
    from gamestream.tables import lake

    uri = settings.table_uri("events")
    if not lake.table_exists(uri):
        return schema.check_params(settings.schema_params)
    return schema.effective_params(settings.schema_params, lake.arrow_schema_of(lake.open_table(uri)))


class GamestreamStreamReader(DataSourceStreamReader, SupportsTriggerAvailableNow):
    """Offsets: ``{"<partition>": <last log offset read>}``. Runs on the driver, except `read` (in tasks)."""

    def __init__(self, options) -> None:
        self.spec = LogSpec.from_options(options)
        self.params = _params(self.spec.settings())
        limit = options.get("max_records_per_partition")
        self.max_records = int(limit) if limit else None
        if self.max_records is not None and self.max_records < 1:
            raise ValueError("max_records_per_partition must be at least 1")
        self._log = None
        self._target: dict[str, int] | None = None  # Trigger.AvailableNow: the offsets to stop at

    @property
    def log(self):
        if self._log is None:
            self._log = self.spec.open()
        return self._log

    def initialOffset(self) -> dict:
        return {str(p): 0 for p in range(self.log.partitions)}

    def _newest(self) -> dict[str, int]:
        return {str(p): self.log.last_offset(p) for p in range(self.log.partitions)}

    def prepareForTriggerAvailableNow(self) -> None:
        self._target = self._newest()

    def getDefaultReadLimit(self) -> ReadLimit:
        return ReadMaxRows(self.max_records) if self.max_records else ReadAllAvailable()

    def latestOffset(self, start: dict, limit: ReadLimit) -> dict:
        """Per partition: the newest offset (or the AvailableNow target), or, under a `ReadMaxRows(n)` limit, the
        offset of the n-th record after `start` — n log records per partition, each holding a batch of events.
        Offsets only grow: a partition never goes below its `start`."""
        newest = self._target if self._target is not None else self._newest()
        end: dict = {}
        for key in sorted(set(newest) | set(start), key=int):
            begin = _offset(start.get(key, 0))
            last = max(begin, _offset(newest.get(key, 0)))
            if isinstance(limit, ReadMaxRows) and last > begin and last - begin > limit.max_rows:
                # offsets strictly increase, so at most last - begin records lie between: only read when more
                records = self.log.read(int(key), begin, limit.max_rows)
                last = min(last, records[-1].offset) if records else begin
            end[key] = _encode(last)
        return end

    def reportLatestOffset(self) -> dict | None:
        return {key: _encode(value) for key, value in self._newest().items()}

    def partitions(self, start: dict, end: dict) -> list[LogSlice]:
        slices = []
        for key, value in end.items():
            begin, stop = _offset(start.get(key, 0)), _offset(value)
            if stop > begin:
                slices.append(LogSlice(self.spec, self.params, int(key), begin, stop))
        return slices

    def read(self, partition: LogSlice) -> Iterator:  # type: ignore[override]
        """In a task: the slice's records, decoded as the embedded processor decodes them, as Arrow batches with
        the source's schema."""
        from gamestream import schema
        from gamestream.process.decode import decode_records
        from gamestream.tables.forgotten import ForgottenDevices

        target = schema.decode_schema(partition.params)
        forgotten = ForgottenDevices(partition.spec.settings())
        log = partition.spec.open()
        try:
            after = partition.start
            while after < partition.end:
                records = [r for r in log.read(partition.partition, after, _READ_CHUNK) if r.offset <= partition.end]
                if not records:
                    break  # trimmed below `end`: nothing more to read (the log keeps what consumers need)
                after = records[-1].offset
                events = forgotten.drop_events(decode_records(records, params=partition.params).events_table())
                rows = schema.conform(events.drop_columns([schema.PARTITION_COLUMN]), target)
                yield from rows.to_batches()
        finally:
            log.close()

    def commit(self, end: dict) -> None:
        """Nothing to record: Spark's checkpoint is the job's position. (Not registered as a log consumer, so a
        stopped job never holds back the log's trim; see docs/spark.md.)"""

    def stop(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


"""The reference pipeline as a Spark Structured Streaming job (`gamestream spark-job`), writing the same Delta
tables as the embedded processor and KPI stage.

Its transformations are the reference pipeline's, as written there:

- events: ``filter(eventTime.isNotNull()).withColumn("eventDate", to_date(eventTime))`` → `events`
  (partitioned by eventDate), and the days they touch → `kpi_daily` (dau, events, bookings, paying_users, arpdau);
- ``withWatermark("eventTime", "180 minutes").groupBy(window("eventTime", "60 minutes")).count()``
  → `kpi_events_hourly`;
- the same watermark, ``filter(eventName == 'purchaseEvent')``, the same windows, ``sum(eventParams.amount)``
  (and the purchases counted) → `kpi_bookings_hourly`.

Three streaming queries, as in the reference, each with its own checkpoint under `checkpoint` (`events`,
`kpi_events_hourly`, `kpi_bookings_hourly`) and its own foreachBatch sink (`gamestream.integrations.spark.sinks`), exactly
once by batch id. The window size and the watermark delay are the settings the embedded KPI stage uses.

Run it where the Python that runs the driver also runs the executors' Python workers (`spark.pyspark.python`,
PYSPARK_PYTHON): they import gamestream and pyarrow to read the log.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from gamestream.settings import Settings

logger = logging.getLogger(__name__)

QUERIES = ("events", "kpi_events_hourly", "kpi_bookings_hourly")


@dataclass
class JobOptions:
    master: str = "local[2]"
    checkpoint: Path | None = None  # default <data_dir>/spark-checkpoint
    until_idle: bool = False  # Trigger.AvailableNow: everything in the log now, then stop
    trigger_seconds: float = 5.0  # otherwise: a micro-batch this often
    max_records_per_partition: int | None = None  # log records per partition per micro-batch
    shuffle_partitions: int = 4  # Spark's default 200 is many times slower for hourly windows
    conf: dict[str, str] = field(default_factory=dict)  # further Spark settings (--conf key=value)
    restarts: int = 3  # a failed query is restarted from its checkpoint this many times (backoff 2, 4, 8 … s)

    def checkpoint_dir(self, settings: Settings) -> Path:
        return (self.checkpoint or Path(settings.data_dir) / "spark-checkpoint").absolute()


@dataclass
class JobResult:
    events_committed: int
    batches: dict[str, int]
    seconds: float


class CheckpointMismatch(RuntimeError):
    """The tables hold batches of a Spark job whose checkpoint is not the one given: its batch ids would restart
    at 0 and every batch would be skipped as already committed."""


def session(options: JobOptions, app_name: str = "gamestream"):
    """A SparkSession for the job: UTC (so `to_date` gives the UTC date, as eventDate is everywhere else), the
    executors' Python = this Python (unless PYSPARK_PYTHON says otherwise), the `gamestream` format registered."""
    from pyspark.sql import SparkSession

    from gamestream.integrations.spark import register

    # the driver's own Python workers (the source's planner) take the variable from the JVM's environment,
    # which the JVM inherits from this process; executors take spark.pyspark.python
    python = os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = (SparkSession.builder.master(options.master).appName(app_name)
               .config("spark.sql.session.timeZone", "UTC")
               .config("spark.sql.shuffle.partitions", str(options.shuffle_partitions))
               .config("spark.pyspark.python", python)
               .config("spark.pyspark.driver.python", sys.executable)
               .config("spark.ui.enabled", "false")
               .config("spark.ui.showConsoleProgress", "false"))
    for key, value in options.conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    register(spark)
    return spark


def reference_pipeline(spark, settings: Settings, max_records_per_partition: int | None = None):
    """The reference pipeline's three streaming DataFrames over the log: (events with eventDate, hourly counts,
    hourly bookings)."""
    from pyspark.sql.functions import col, count, to_date, window
    from pyspark.sql.functions import sum as sum_

    reader = spark.readStream.format("gamestream").option("data_dir", str(Path(settings.data_dir).absolute()))
    if settings.log:
        reader = reader.option("log", settings.log)
    if settings.config:
        reader = reader.option("config", str(Path(settings.config).absolute()))
    if max_records_per_partition:
        reader = reader.option("max_records_per_partition", str(max_records_per_partition))
    gamingEventDF = reader.load()  # noqa: N806 - the reference pipeline's names

    delay = f"{settings.watermark_delay_minutes} minutes"
    size = f"{settings.window_minutes} minutes"
    events = gamingEventDF.filter(gamingEventDF.eventTime.isNotNull()).withColumn(
        "eventDate", to_date(gamingEventDF.eventTime))
    counts = gamingEventDF.withWatermark("eventTime", delay).groupBy(window("eventTime", size)).count()
    bookings = (gamingEventDF.withWatermark("eventTime", delay)
                .filter(gamingEventDF.eventName == "purchaseEvent")
                .groupBy(window("eventTime", size))
                .agg(sum_(col("eventParams.amount")).alias("bookings"), count("*").alias("purchases")))
    return events, counts, bookings


def _check_checkpoint(settings: Settings, checkpoint: Path) -> None:
    """Refuses (CheckpointMismatch) a fresh checkpoint for tables that already hold this job's batches."""
    from gamestream.integrations.spark.sinks import app_id
    from gamestream.tables import lake

    commits = checkpoint / "events" / "commits"
    if commits.is_dir() and any(commits.iterdir()):
        return
    uri = settings.table_uri("events")
    if not lake.table_exists(uri):
        return
    done = lake.open_table(uri).transaction_version(app_id(settings)) or 0
    if done:
        raise CheckpointMismatch(
            f"the events table {uri} holds {done} micro-batches of a Spark job (txn {app_id(settings)}), but the "
            f"checkpoint {checkpoint} has none: give that job's --checkpoint, or another pipeline name "
            "(GAMESTREAM_PIPELINE) for a new job")


def run(settings: Settings, options: JobOptions) -> JobResult:
    """Runs the job: until the log is drained (`until_idle`, Trigger.AvailableNow), or until stopped (Ctrl-C,
    SIGTERM), one micro-batch every `trigger_seconds`. A restart with the same checkpoint resumes where Spark's
    checkpoint says, and the tables' txn versions skip any batch that was already committed."""
    from gamestream.integrations.spark.sinks import EventsSink, HourlySink

    started = time.monotonic()
    checkpoint = options.checkpoint_dir(settings)
    _check_checkpoint(settings, checkpoint)
    spark = session(options, app_name=f"gamestream-{settings.pipeline}")
    try:
        events, counts, bookings = reference_pipeline(spark, settings, options.max_records_per_partition)
        sinks = {"events": EventsSink(settings),
                 "kpi_events_hourly": HourlySink(settings, "kpi_events_hourly", checkpoint / "kpi_events_hourly"),
                 "kpi_bookings_hourly": HourlySink(settings, "kpi_bookings_hourly",
                                                   checkpoint / "kpi_bookings_hourly")}
        frames = {"events": (events, "append"), "kpi_events_hourly": (counts, "update"),
                  "kpi_bookings_hourly": (bookings, "update")}
        _run_queries(spark, settings, options, checkpoint, frames, sinks)
        batches = {name: _batches(checkpoint / name) for name in QUERIES}
        return JobResult(sinks["events"].committed, batches, time.monotonic() - started)
    finally:
        spark.stop()


def _run_queries(spark, settings: Settings, options: JobOptions, checkpoint: Path, frames: dict,
                 sinks: dict) -> None:
    """Starts the three queries and waits: until each has drained the log (`until_idle`), or until one ends (an
    error, or a stop). A query that fails is started again from its own checkpoint, up to `options.restarts`
    times in all, after 2, 4, 8 … s; the others run on undisturbed (restarting them too would change where their
    micro-batches end, and with it which windows the last batch marks final). Every query is stopped on the way
    out."""
    queries: dict[str, object] = {}
    restarts = 0

    def start(name: str):
        frame, mode = frames[name]
        writer = (frame.writeStream.queryName(f"{settings.pipeline}-{name}").outputMode(mode)
                  .foreachBatch(sinks[name]).option("checkpointLocation", str(checkpoint / name)))
        writer = (writer.trigger(availableNow=True) if options.until_idle
                  else writer.trigger(processingTime=f"{options.trigger_seconds} seconds"))
        queries[name] = writer.start()

    def restart(name: str, error: BaseException) -> None:
        nonlocal restarts
        if not _query_failed(error) or restarts >= options.restarts:
            raise error
        restarts += 1
        delay = 2.0 ** restarts
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        logger.warning(f"query {name} failed ({first_line[:300]}); restarting it from its checkpoint in "
                       f"{delay:.0f}s (restart {restarts} of {options.restarts})")
        time.sleep(delay)
        start(name)

    try:
        for name in QUERIES:
            start(name)
        logger.info("spark job started", extra={"master": options.master, "checkpoint": str(checkpoint),
                                                 "until_idle": options.until_idle})
        if options.until_idle:
            for name in QUERIES:
                while True:
                    try:
                        queries[name].awaitTermination()  # type: ignore[attr-defined]
                        break
                    except Exception as error:  # noqa: BLE001 - restarted, or raised by `restart`
                        restart(name, error)
        else:
            while True:
                spark.streams.awaitAnyTermination()
                spark.streams.resetTerminated()
                failed = [(n, q.exception()) for n, q in queries.items()  # type: ignore[attr-defined]
                          if not q.isActive and q.exception() is not None]  # type: ignore[attr-defined]
                if not failed:
                    return  # stopped
                for name, error in failed:
                    restart(name, error)
    finally:
        for query in queries.values():
            if query.isActive:  # type: ignore[attr-defined]
                query.stop()  # type: ignore[attr-defined]


def _query_failed(error: BaseException) -> bool:
    """A streaming query ended with an error (a Python worker that did not start in time on a busy machine, an
    executor lost, storage unreachable for a while): worth a restart from the checkpoint, which replays the
    batch in flight, and the txn versions skip what was committed. Errors before any query ran are not."""
    from pyspark.errors import StreamingQueryException

    return isinstance(error, StreamingQueryException)


def _batches(checkpoint: Path) -> int:
    commits = checkpoint / "commits"
    return sum(1 for p in commits.iterdir() if p.name.isdigit()) if commits.is_dir() else 0

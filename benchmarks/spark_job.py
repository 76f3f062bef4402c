"""The seed's pipeline on Spark Structured Streaming: the peer that benchmarks/run.py measures gamestream against.

    python benchmarks/spark_job.py INPUT_DIR OUTPUT_DIR

1. the NDJSON files read as a stream with the seed's schema;
2. `eventTime.isNotNull()`, `eventDate = to_date(eventTime)`, written as Parquet partitioned by eventDate with
   a checkpoint, trigger availableNow (Delta's Spark jars cannot be downloaded here: Parquet stands in);
3. the seed's windowed count, `withWatermark("eventTime", "180 minutes")` and 60-minute windows, and the hourly
   bookings (sum of amount over purchaseEvent), written by foreachBatch as Parquet.

Prints one JSON line with the timings: `startup_s` (SparkSession), `ingest_s`, `kpi_s`.
"""

from __future__ import annotations

import json
import sys
import time

started = time.perf_counter()

from pyspark.sql import SparkSession  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402
from pyspark.sql.types import (  # noqa: E402
    DoubleType, IntegerType, StringType, StructField, StructType, TimestampType)

EVENT_SCHEMA = StructType([  # the seed's eventSchema
    StructField("eventName", StringType(), True),
    StructField("eventTime", TimestampType(), True),
    StructField("eventParams", StructType([
        StructField("game_keyword", StringType(), True),
        StructField("app_name", StringType(), True),
        StructField("scoreAdjustment", IntegerType(), True),
        StructField("platform", StringType(), True),
        StructField("app_version", StringType(), True),
        StructField("device_id", StringType(), True),
        StructField("client_event_time", TimestampType(), True),
        StructField("amount", DoubleType(), True),
    ]), True),
    StructField("eventId", StringType(), True),
])


def main(source: str, target: str) -> None:
    spark = (SparkSession.builder.master("local[2]").appName("seed-pipeline")
             .config("spark.sql.shuffle.partitions", "4")  # the default 200 is ~6x slower on 2 cores
             .config("spark.sql.session.timeZone", "UTC")
             .config("spark.ui.enabled", "false")
             .config("spark.driver.memory", "2g")
             .getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    startup = time.perf_counter() - started

    t0 = time.perf_counter()
    raw = spark.readStream.schema(EVENT_SCHEMA).json(source)
    events = raw.filter(F.col("eventTime").isNotNull()).withColumn("eventDate", F.to_date("eventTime"))
    (events.writeStream.format("parquet").partitionBy("eventDate")
     .option("checkpointLocation", f"{target}/checkpoints/events")
     .trigger(availableNow=True).start(f"{target}/events").awaitTermination())
    ingest = time.perf_counter() - t0

    t1 = time.perf_counter()
    windowed = events.withWatermark("eventTime", "180 minutes")
    counts = windowed.groupBy(F.window("eventTime", "60 minutes")).count()
    bookings = (windowed.filter(F.col("eventName") == "purchaseEvent")
                .groupBy(F.window("eventTime", "60 minutes"))
                .agg(F.sum("eventParams.amount").alias("bookings"), F.count("*").alias("purchases")))

    def sink(name: str):
        def write(batch, batch_id: int) -> None:  # complete mode: each batch is the whole result
            (batch.select(F.col("window.start").alias("window_start"), "*").drop("window")
             .write.mode("overwrite").parquet(f"{target}/{name}"))
        return write

    for name, frame in (("kpi_events_hourly", counts), ("kpi_bookings_hourly", bookings)):
        (frame.writeStream.outputMode("complete").foreachBatch(sink(name))
         .option("checkpointLocation", f"{target}/checkpoints/{name}")
         .trigger(availableNow=True).start().awaitTermination())
    kpi = time.perf_counter() - t1
    print(json.dumps({"startup_s": startup, "ingest_s": ingest, "kpi_s": kpi}), flush=True)
    spark.stop()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

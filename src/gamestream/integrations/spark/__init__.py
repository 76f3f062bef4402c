"""gamestream on Apache Spark (the `gamestream[spark]` extra): the event log as a Structured Streaming source
(`source.GamestreamDataSource`, format "gamestream") and the reference pipeline as a Spark job (`job`) writing
the same Delta tables as the embedded processor (`sinks`). pyspark is imported in this package only."""

from __future__ import annotations

from gamestream.integrations.spark.source import (
    NAME,
    GamestreamDataSource,
    GamestreamStreamReader,
)

__all__ = ["NAME", "GamestreamDataSource", "GamestreamStreamReader", "register"]


def register(spark) -> None:
    """Makes `spark.readStream.format("gamestream")` available in this Spark session."""
    spark.dataSource.register(GamestreamDataSource)

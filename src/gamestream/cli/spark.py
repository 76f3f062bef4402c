"""`gamestream spark-job`: the reference pipeline on Spark (the gamestream[spark] extra; docs/spark.md)."""

from __future__ import annotations

from pathlib import Path

import click

from gamestream.cli.app import cli
from gamestream.cli.common import (
    check_storage,
    command_settings,
    console,
    data_dir_option,
    log_option,
    out,
    tables_option,
)


@cli.command("spark-job")
@data_dir_option
@log_option
@tables_option
@click.option("--master", default="local[2]", show_default=True,
              help="Spark master: local[N], or spark://host:port for a standalone cluster.")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="Spark's checkpoint folder (default <data-dir>/spark-checkpoint); keep it to resume.")
@click.option("--until-idle", is_flag=True, help="Process everything in the log now (Trigger.AvailableNow), exit 0.")
@click.option("--trigger-seconds", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="Without --until-idle: a micro-batch this often.")
@click.option("--max-records-per-partition", type=click.IntRange(min=1), default=None,
              help="Log records per partition per micro-batch (default: all available).")
@click.option("--shuffle-partitions", type=click.IntRange(min=1), default=4, show_default=True,
              help="spark.sql.shuffle.partitions for the windowed aggregations.")
@click.option("--restarts", type=click.IntRange(min=0), default=3, show_default=True,
              help="A query that fails is restarted from its checkpoint this many times (backoff 2, 4, 8 … s).")
@click.option("--conf", "conf", multiple=True, metavar="KEY=VALUE", help="A further Spark setting (repeatable).")
def spark_job(data_dir: Path | None, log_url: str | None, tables_uri: str | None, master: str,
              checkpoint: Path | None, until_idle: bool, trigger_seconds: float,
              max_records_per_partition: int | None, shuffle_partitions: int, restarts: int,
              conf: tuple[str, ...]) -> None:
    """Runs the reference pipeline on Spark (the gamestream[spark] extra; docs/spark.md): the log read with
    readStream.format("gamestream"), written to the same Delta tables as `process`, exactly once."""
    try:
        from gamestream.integrations.spark.job import (
            CheckpointMismatch,
            JobOptions,
            run,
        )
    except ImportError as error:
        raise click.UsageError(f"the Spark job needs PySpark ({error}): pip install 'gamestream[spark]', and Java "
                               "17 or later") from None
    settings = command_settings(data_dir=data_dir, log=log_url, tables_uri=tables_uri)
    check_storage(settings)
    options = JobOptions(master=master, checkpoint=checkpoint, until_idle=until_idle, trigger_seconds=trigger_seconds,
                         max_records_per_partition=max_records_per_partition, shuffle_partitions=shuffle_partitions,
                         restarts=restarts, conf=_spark_conf(conf))
    console.print(f"spark job on {master}, checkpoint {options.checkpoint_dir(settings)}", highlight=False)
    try:
        result = run(settings, options)
    except CheckpointMismatch as error:
        raise click.ClickException(str(error)) from None
    out.print(f"committed {result.events_committed:,} events in {result.seconds:.1f}s; micro-batches "
              + ", ".join(f"{name} {count}" for name, count in result.batches.items()), highlight=False)


def _spark_conf(conf: tuple[str, ...]) -> dict[str, str]:
    """The --conf KEY=VALUE settings as a dict; a usage error for one without '='."""
    pairs = dict(item.split("=", 1) for item in conf if "=" in item)
    if len(pairs) != len(conf):
        raise click.UsageError("--conf takes KEY=VALUE")
    return pairs

"""The `gamestream` command: every command's options, its work and its report.

May import: core, log, ingest, tables, kpi, process, api, integrations, demo
"""

from __future__ import annotations

import asyncio
import datetime as dt
import errno
import json
import os
import sys
import time
from importlib import resources
from pathlib import Path

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from gamestream.settings import TABLES, Settings

console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)  # logs and pipes get wide tables

data_dir_option = click.option(
    "--data-dir", type=click.Path(path_type=Path), default=None,
    help="Data directory (default ./gamestream-data, or GAMESTREAM_DATA_DIR).",
)
partitions_option = click.option(
    "--partitions", "partitions", type=int, default=None,
    help="Log partitions, fixed when the log (or its JetStream stream) is created (default 4, or "
         "GAMESTREAM_PARTITIONS).",
)
log_option = click.option(
    "--log", "log_url", type=str, default=None, metavar="URL",
    help="The event log: nats://host:port[,host:port…][?stream=NAME] for NATS JetStream, kinesis://STREAM for "
         "AWS Kinesis (region, credentials, endpoint from the AWS environment); absent, the embedded SQLite log in "
         "the data directory (or GAMESTREAM_LOG).",
)

tables_option = click.option(
    "--tables", "tables_uri", type=str, default=None, metavar="URI",
    help="Where the tables live: a folder, or s3://bucket/prefix (credentials, region and endpoint from the "
         "standard AWS environment: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL, "
         "AWS_ALLOW_HTTP); default <data-dir>/tables (or GAMESTREAM_TABLES).",
)
unsafe_writes_option = click.option(
    "--unsafe-no-conditional-writes", "unsafe_no_conditional_writes", is_flag=True, default=None,
    help="Start even though the object store failed the conditional-write probe (If-None-Match: *). Safe only "
         "when a single process ever writes the tables.",
)


def _settings(**options: object) -> Settings:
    try:
        return Settings.from_env(**options)
    except ValueError as error:  # a setting out of its range, from the environment: one line, not a traceback
        raise click.UsageError(str(error)) from None


class DataDirUnusable(RuntimeError):
    """The data directory cannot be created or written: one line for the user, not a traceback."""


def _check_writable(path: Path) -> None:
    """Fails early, in one line naming the path and the reason, when a command that writes cannot."""
    probe = path / f".write-probe-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        reason = error.strerror or str(error)
        raise DataDirUnusable(f"cannot write to the data directory {path.absolute()}: {reason} "
                              f"(choose another with --data-dir or GAMESTREAM_DATA_DIR)") from None


class LogUnreachable(RuntimeError):
    """The log URL names a log that cannot be opened (no server answers, a bad URL): one line, not a traceback."""


def _open_log(settings: Settings):
    """The log the settings name (`--log`, GAMESTREAM_LOG, else the embedded one), through `log.connect`, so
    every command reaches the same log the same way."""
    from gamestream.log import connect, describe
    from gamestream.log.sqlite import LogPartitionsMismatch

    try:
        return connect(settings)
    except LogPartitionsMismatch:
        raise
    except Exception as error:
        if not settings.log and _unusable_storage(error):
            raise  # the embedded log's storage problems have their own one-line message (main)
        reason = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
        raise LogUnreachable(f"cannot open the event log {describe(settings)}: {type(error).__name__}"
                             f"{': ' + reason if reason else ''}") from error


def _check_storage(settings: Settings) -> None:
    """Fails early, in one line, when a command that writes cannot: the data directory (when the log, or the
    tables, or the maintenance lock live there), and an object store holding the tables, which must refuse an
    overwrite (`lake.check_conditional_writes`) unless `--unsafe-no-conditional-writes`."""
    import logging

    from gamestream.tables import lake

    if not settings.log or not lake.is_object_store(settings.tables_root):
        _check_writable(settings.data_dir)
    if not lake.is_object_store(settings.tables_root):
        return
    try:
        lake.check_conditional_writes(settings.tables_root)
    except lake.ConditionalWritesUnsupported:
        if not settings.unsafe_no_conditional_writes:
            raise
        logging.getLogger("gamestream.tables.lake").warning(
            "the object store failed the conditional-write probe; going on (--unsafe-no-conditional-writes): "
            "concurrent writers of these tables can lose commits", extra={"tables": settings.tables_root})


def _check_writable_for_log(settings: Settings) -> None:
    """Commands that only append to the log need the data directory only when the log lives there."""
    if not settings.log:
        _check_writable(settings.data_dir)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="gamestream", prog_name="gamestream")
@click.option("--log-format", type=click.Choice(["text", "json"]), default=None,
              help="Log records (errors, retries, start/stop) on stderr as text or JSON lines "
                   "(default text, or GAMESTREAM_LOG_FORMAT).")
@click.option("--config", "config", type=click.Path(path_type=Path), default=None, metavar="PATH",
              help="Configuration file (TOML: [schema.params] promotes custom parameters to typed columns); "
                   "default <data-dir>/gamestream.toml when it exists (or GAMESTREAM_CONFIG).")
def cli(log_format: str | None, config: Path | None) -> None:
    """gamestream: mobile-game events → durable log → Delta Lake, exactly once → live KPIs."""
    from gamestream import logs

    if config is not None:  # through the environment: every command's settings, and processes they start
        os.environ["GAMESTREAM_CONFIG"] = str(config.absolute())
    # schema_params given: the configuration file is read by each command (a bad one fails there, not --help)
    logs.setup(log_format or _settings(schema_params=()).log_format)


# ------------------------------------------------------------------------------------------------------- schema
@cli.command()
@data_dir_option
@click.option("--markdown", is_flag=True, help="The Markdown reference (docs/schema.md).")
@click.option("--spark", is_flag=True, help="Spark SQL DDL.")
def schema(data_dir: Path | None, markdown: bool, spark: bool) -> None:
    """Prints the event schema, with the parameters the configuration promotes."""
    from gamestream import schema as event_schema

    params = _settings(data_dir=data_dir).schema_params
    if markdown:
        out.out(event_schema.markdown_reference(params), end="")
    elif spark:
        out.out(event_schema.spark_ddl(params))
    else:
        out.out(str(event_schema.arrow_schema(params=params)))


# --------------------------------------------------------------------------------------------------------- load
def _print_load_report(report, path: Path, seconds: float) -> None:
    rate = report.lines / seconds if seconds > 0 else 0
    out.print(f"[bold]{path}[/]: {report.lines:,} events read in {seconds:.2f}s ({rate:,.0f}/s) — "
              f"[green]{report.accepted:,} accepted[/], [red]{report.rejected:,} rejected[/]")
    for number, reason in report.first_rejections:
        out.print(f"  line {number}: {reason}", markup=False, highlight=False)
    if report.rejected > len(report.first_rejections):
        out.print(f"  … and {report.rejected - len(report.first_rejections):,} more rejections")


def _load(settings: Settings, path: Path, chunk_lines: int = 20000):
    from gamestream.ingest.loader import load_file

    log = _open_log(settings)
    size = path.stat().st_size
    with Progress(
        TextColumn("loading"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
        console=console, transient=True, disable=size < (4 << 20),
    ) as progress:
        task = progress.add_task("load", total=size)
        started = time.monotonic()
        try:
            report = load_file(path, log, max_event_bytes=settings.max_event_bytes, lines_per_chunk=chunk_lines,
                               compression=settings.record_compression,  # type: ignore[arg-type]
                               params=settings.schema_params,
                               on_progress=lambda n: progress.advance(task, n))
        finally:
            log.close()
    # the progress counts raw bytes; a gzip file's are more than its size, which is fine for a bar
    _print_load_report(report, path, time.monotonic() - started)
    return report


@cli.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@data_dir_option
@partitions_option
@log_option
@click.option("--chunk-lines", type=click.IntRange(min=1), default=20000, show_default=True,
              help="Lines validated and appended together: one log record per partition per chunk. Smaller chunks "
                   "make smaller records (more, smaller processor commits); larger ones are faster.")
def load(files: tuple[Path, ...], data_dir: Path | None, partitions: int | None, log_url: str | None,
         chunk_lines: int) -> None:
    """Validates NDJSON files (or .gz) and appends their events to the log.

    Events keep their own eventTime and eventId; absent ones are stamped now / given a UUIDv7. Rejected lines
    are reported with line number, field and reason; the exit status is non-zero only when loading cannot run.
    """
    settings = _settings(data_dir=data_dir, partitions=partitions, log=log_url)
    _check_writable_for_log(settings)
    for file in files:
        _load(settings, file, chunk_lines)


# ------------------------------------------------------------------------------------------------------ process
def _process(settings: Settings, *, until_idle: bool, only: list[int] | None = None, kpi: bool = True,
             maintenance: bool = False) -> None:
    from gamestream.process.pipeline import Pipeline

    log = _open_log(settings)
    try:
        pipeline = Pipeline(settings, log, only, kpi=kpi, maintenance=maintenance)
        pipeline.install_signal_handlers()
        started = time.monotonic()
        last_print = [0.0]

        def show(stats) -> None:
            now = time.monotonic()
            if now - last_print[0] < 1.0:
                return
            last_print[0] = now
            rate = stats.events_committed / max(now - started, 1e-9)
            console.print(f"processed {stats.events_committed:,} events ({rate:,.0f}/s), "
                          f"{stats.events_quarantined:,} quarantined, {stats.commits:,} commits", highlight=False)

        mode = "until the log is drained" if until_idle else "until stopped (Ctrl-C)"
        kpi_note = "" if pipeline.kpi else " (KPI stage: off or run by another process)"
        from gamestream.log import describe

        console.print(f"processing partitions {pipeline.processor.partitions} of {describe(settings)} "
                      f"{mode}{kpi_note}", highlight=False)
        pipeline.run(until_idle=until_idle, on_progress=show)
        stats = pipeline.stats
        seconds = time.monotonic() - started
        out.print(f"committed {stats.events_committed:,} events in {stats.commits:,} commits "
                  f"({stats.events_committed / max(seconds, 1e-9):,.0f}/s over {seconds:.2f}s); "
                  f"quarantined {stats.events_quarantined:,}; table {settings.table_uri('events')}")
    finally:
        log.close()


@cli.command()
@data_dir_option
@partitions_option
@log_option
@tables_option
@unsafe_writes_option
@click.option("--until-idle", is_flag=True, help="Drain every partition, then exit 0.")
@click.option("--only", "only", type=str, default=None, help="Own only these partitions, e.g. 0,1 (scale-out).")
@click.option("--max-batch-events", type=int, default=None, help="Flush a micro-batch at this many events.")
@click.option("--max-batch-wait", type=float, default=None, help="…or after this many seconds.")
@click.option("--no-kpi", is_flag=True, help="Only ingest; leave the KPI tables to another process.")
@click.option("--maintenance", is_flag=True, help="Compact, checkpoint and vacuum automatically while running.")
@click.option("--metrics-port", type=int, default=None,
              help="Expose the processor's Prometheus metrics on this port (0: a free one).")
@click.option("--metrics-host", default="127.0.0.1", show_default=True, help="Address for --metrics-port.")
def process(data_dir: Path | None, partitions: int | None, log_url: str | None, tables_uri: str | None,
            unsafe_no_conditional_writes: bool | None, until_idle: bool, only: str | None,
            max_batch_events: int | None, max_batch_wait: float | None, no_kpi: bool, maintenance: bool,
            metrics_port: int | None, metrics_host: str) -> None:
    """Streams the log into the events table and the KPI tables, exactly once."""
    settings = _settings(data_dir=data_dir, partitions=partitions, log=log_url, batch_max_events=max_batch_events,
                         batch_max_wait_s=max_batch_wait, tables_uri=tables_uri,
                         unsafe_no_conditional_writes=unsafe_no_conditional_writes)
    _check_storage(settings)
    if metrics_port is not None:
        from prometheus_client import start_http_server

        from gamestream.metrics import REGISTRY

        metrics_server, _ = start_http_server(metrics_port, addr=metrics_host, registry=REGISTRY)
        console.print(f"metrics on http://{metrics_host}:{metrics_server.server_port}/metrics", highlight=False)
    owned = [int(p) for p in only.split(",")] if only else None
    _process(settings, until_idle=until_idle, only=owned, kpi=not no_kpi, maintenance=maintenance)


# ----------------------------------------------------------------------------------------------------- generate
@cli.command()
@data_dir_option
@partitions_option
@log_option
@click.option("--target", type=str, default=None, help="Collector base URL to post to, e.g. http://127.0.0.1:8000.")
@click.option("--to-log", is_flag=True, help="Append straight to the log (--log, else the one in --data-dir), "
                                             "as `load` does.")
@click.option("--out", "out_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write NDJSON to this file instead of posting.")
@click.option("--events", type=int, default=None, help="How many events (default 10,000 with --out).")
@click.option("--duration", type=float, default=None, help="Post for this many seconds.")
@click.option("--rate", type=float, default=None, help="Events per second (default: as fast as it can).")
@click.option("--batch", type=int, default=100, show_default=True, help="Events per request.")
@click.option("--concurrency", type=int, default=4, show_default=True, help="Requests in flight.")
@click.option("--api-key", type=str, default=None, envvar="GAMESTREAM_API_KEY", help="Write key for the collector.")
@click.option("--users", type=int, default=1000, show_default=True)
@click.option("--days", type=float, default=1.0, show_default=True, help="--out: spread sessions over this many days.")
@click.option("--start", type=click.DateTime(["%Y-%m-%d"]), default=None, help="--out: first day (UTC).")
@click.option("--seed", type=int, default=7, show_default=True)
def generate(data_dir: Path | None, partitions: int | None, log_url: str | None, target: str | None, to_log: bool,
             out_file: Path | None, events: int | None, duration: float | None,
             rate: float | None, batch: int, concurrency: int, api_key: str | None, users: int, days: float,
             start: dt.datetime | None, seed: int) -> None:
    """Simulates players: posts their events to a collector (--target), appends them straight to the log
    (--to-log) or writes NDJSON (--out)."""
    from gamestream.demo.generator import simulate

    if sum((target is not None, out_file is not None, to_log)) != 1:
        raise click.UsageError("give exactly one of --target URL, --to-log or --out FILE")
    count = events if events is not None else 10_000
    start_utc = start.replace(tzinfo=dt.timezone.utc) if start else None
    if to_log:
        from gamestream.ingest.loader import load_lines

        settings = _settings(data_dir=data_dir, partitions=partitions, log=log_url)
        _check_writable_for_log(settings)
        log = _open_log(settings)
        try:
            lines = (json.dumps(e, separators=(",", ":")).encode() for e in
                     simulate(events=count, users=users, seed=seed, start=start_utc, days=days))
            started = time.monotonic()
            report = load_lines(lines, log, max_event_bytes=settings.max_event_bytes,
                                compression=settings.record_compression)  # type: ignore[arg-type]
        finally:
            log.close()
        _print_load_report(report, Path("generator"), time.monotonic() - started)
        return
    if out_file is not None:
        with open(out_file, "w") as handle:
            for event in simulate(events=count, users=users, seed=seed, start=start_utc, days=days):
                handle.write(json.dumps(event, separators=(",", ":")))
                handle.write("\n")
        out.print(f"wrote {count:,} events of {users:,} players to {out_file}")
        return
    if events is None and duration is None:
        raise click.UsageError("give --events N or --duration SECONDS to bound the run")
    stats = asyncio.run(_post_with_progress(target, events=events, duration=duration, rate=rate, batch=batch,
                                            concurrency=concurrency, api_key=api_key, users=users, seed=seed))
    _print_send_summary(stats)
    if stats.failed_events:
        raise SystemExit(1)


def _print_send_summary(stats) -> None:
    seconds = stats.finished - stats.started
    out.print(f"sent {stats.events_sent:,} events in {stats.requests:,} requests over {seconds:.1f}s "
              f"({stats.rate:,.0f} events/s): [green]{stats.accepted:,} accepted[/], "
              f"[red]{stats.rejected:,} rejected[/], {stats.retries:,} retries, {stats.failed_events:,} failed")


async def _post_with_progress(target: str, *, events: int | None, duration: float | None, rate: float | None,
                              batch: int, concurrency: int, api_key: str | None, users: int, seed: int,
                              stop: "asyncio.Event | None" = None):
    from gamestream.demo.generator import SendStats, live_events, send

    stats = SendStats()
    with Progress(TextColumn("posting"), BarColumn(), TextColumn("{task.fields[counters]}"), console=console,
                  transient=True) as progress:
        task = progress.add_task("posting", total=events if events is not None else duration, counters="")
        sending = asyncio.ensure_future(send(
            target, live_events(users=users, seed=seed, limit=events), batch=batch, concurrency=concurrency,
            rate=rate, duration=duration, api_key=api_key, stop=stop, stats=stats))
        while not sending.done():
            await asyncio.wait([sending], timeout=0.5)
            done = stats.events_sent if events is not None else time.monotonic() - stats.started
            progress.update(task, completed=done, counters=(
                f"sent {stats.events_sent:,} · accepted {stats.accepted:,} · rejected {stats.rejected:,} · "
                f"{stats.rate:,.0f} events/s"))
        return sending.result()


# ---------------------------------------------------------------------------------------------------- spark-job
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
@click.option("--conf", "conf", multiple=True, metavar="KEY=VALUE", help="A further Spark setting (repeatable).")
def spark_job(data_dir: Path | None, log_url: str | None, tables_uri: str | None, master: str,
              checkpoint: Path | None, until_idle: bool, trigger_seconds: float,
              max_records_per_partition: int | None, shuffle_partitions: int, conf: tuple[str, ...]) -> None:
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
    settings = _settings(data_dir=data_dir, log=log_url, tables_uri=tables_uri)
    _check_storage(settings)
    pairs = dict(item.split("=", 1) for item in conf if "=" in item)
    if len(pairs) != len(conf):
        raise click.UsageError("--conf takes KEY=VALUE")
    options = JobOptions(master=master, checkpoint=checkpoint, until_idle=until_idle, trigger_seconds=trigger_seconds,
                         max_records_per_partition=max_records_per_partition, shuffle_partitions=shuffle_partitions,
                         conf=pairs)
    console.print(f"spark job on {master}, checkpoint {options.checkpoint_dir(settings)}", highlight=False)
    try:
        result = run(settings, options)
    except CheckpointMismatch as error:
        raise click.ClickException(str(error)) from None
    out.print(f"committed {result.events_committed:,} events in {result.seconds:.1f}s; micro-batches "
              + ", ".join(f"{name} {count}" for name, count in result.batches.items()), highlight=False)


# ---------------------------------------------------------------------------------------------------------- sql
@cli.command()
@click.argument("query")
@data_dir_option
@tables_option
@click.option("--format", "output", type=click.Choice(["table", "csv", "json"]), default="table",
              show_default=True)
def sql(query: str, data_dir: Path | None, tables_uri: str | None, output: str) -> None:
    """Runs a read-only Spark SQL query over the tables (events, alias mobile_events_delta_raw,
    events_quarantine, kpi_events_hourly, kpi_bookings_hourly, kpi_daily, kpi_retention, kpi_top_events,
    kpi_activity, kpi_devices, audit). Dates are UTC."""
    from gamestream.api.query import (
        QueryError,
        SqlEngine,
        display_value,
        to_csv,
        to_json,
    )

    try:
        result = SqlEngine(_settings(data_dir=data_dir, tables_uri=tables_uri)).run(query)
    except QueryError as error:
        from rich.text import Text

        console.print(Text.assemble(("error: ", "red"), error.pointed()))
        raise SystemExit(2)
    if output == "csv":
        out.out(to_csv(result), end="")
    elif output == "json":
        out.out(to_json(result))
    else:
        table = Table()
        for name in result.column_names:
            table.add_column(name, justify="right" if pa_is_number(result.schema.field(name).type) else "left")
        types = [(name, result.schema.field(name).type) for name in result.column_names]
        for row in result.slice(0, MAX_TABLE_ROWS).to_pylist():
            # floats rounded for reading (money to cents); --format json keeps them exact
            table.add_row(*("NULL" if v is None else display_value(v, type_, name)
                            for v, (name, type_) in zip(row.values(), types)))
        out.print(table)
        shown = f" (showing the first {MAX_TABLE_ROWS:,}; --format csv or json prints all)" if (
            result.num_rows > MAX_TABLE_ROWS) else ""
        out.print(f"{result.num_rows:,} row{'s' if result.num_rows != 1 else ''}{shown}", highlight=False)


MAX_TABLE_ROWS = 1000


def pa_is_number(type_) -> bool:
    import pyarrow.types as types

    return types.is_integer(type_) or types.is_floating(type_) or types.is_decimal(type_)


# ------------------------------------------------------------------------------------------------- maintenance
table_option = click.option("--table", "table_name", default="events", show_default=True,
                            type=click.Choice(list(TABLES)), help="Which table.")


def _human_bytes(size: int | None) -> str:
    if size is None:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1024
    return str(size)


def _locked(settings: Settings):
    from gamestream.tables.maintenance import MaintenanceLock

    lock = MaintenanceLock(settings)
    handle = lock.acquire(wait=False)
    if handle is None:
        console.print("another compactor holds the maintenance lock; waiting for it…")
        handle = lock.acquire(wait=True)
    return handle


def print_optimize_report(report) -> None:
    before, after = report.before, report.after
    out.print(f"{report.table}: {report.partitions_optimized} partition(s) compacted "
              f"({report.files_removed:,} files rewritten into {report.files_added:,}) in {report.seconds:.1f}s",
              highlight=False)
    table = Table()
    for column in ("", "files", "bytes", "partitions", "most files in a partition", "average file"):
        table.add_column(column, justify="right")
    for label, stats in (("before", before), ("after", after)):
        most = max((files for files, _ in stats.partitions.values()), default=0)
        table.add_row(label, f"{stats.files:,}", _human_bytes(stats.bytes), f"{len(stats.partitions):,}",
                      f"{most:,}", _human_bytes(stats.average_bytes))
    out.print(table)


@cli.command()
@data_dir_option
@tables_option
@unsafe_writes_option
@table_option
@click.option("--partition", "partitions", multiple=True, help="Only this eventDate (YYYY-MM-DD; repeatable).")
@click.option("--since", default=None, help="Only partitions from this eventDate on (YYYY-MM-DD).")
@click.option("--target-size", default=None,
              help="Target file size, e.g. 512MiB (default: the target_file_bytes setting, 1 GiB, or "
                   "GAMESTREAM_TARGET_FILE_BYTES).")
@click.option("--zorder", "zorder", multiple=True, help="Z-order by this column (repeatable).")
def optimize(data_dir: Path | None, tables_uri: str | None, unsafe_no_conditional_writes: bool | None,
             table_name: str, partitions: tuple[str, ...], since: str | None,
             target_size: str | None, zorder: tuple[str, ...]) -> None:
    """Compacts small files (bin-packing per partition, or Z-order); prints files and bytes before and after."""
    from gamestream.tables import maintenance

    if partitions and since:
        raise click.UsageError("give --partition or --since, not both")
    settings = _settings(data_dir=data_dir, tables_uri=tables_uri,
                         unsafe_no_conditional_writes=unsafe_no_conditional_writes,
                         target_file_bytes=maintenance.parse_size(target_size) if target_size else None)
    _check_storage(settings)
    handle = _locked(settings)
    try:
        with Progress(TextColumn("optimizing"), BarColumn(), TextColumn("{task.completed}/{task.total} partitions"),
                      console=console, transient=True) as progress:
            task = progress.add_task("optimize", total=None)
            report = maintenance.optimize(
                settings.table_uri(table_name), partitions=list(partitions) or None, since=since,
                target_size=settings.target_file_bytes, zorder=list(zorder) or None,
                on_partition=lambda key, done, total: progress.update(task, completed=done, total=total))
    finally:
        handle.close()
    print_optimize_report(report)


def print_vacuum_report(report) -> None:
    verb = "would delete" if report.dry_run else "deleted"
    out.print(f"{report.table}: {verb} {len(report.files):,} unreferenced file(s), "
              f"{_human_bytes(report.bytes)}, removed from the table more than {report.retention_hours:g} hours ago",
              highlight=False)
    if report.dry_run:
        for name in report.files[:50]:
            out.print(f"  {name}", highlight=False)
        if len(report.files) > 50:
            out.print(f"  … and {len(report.files) - 50:,} more")


@cli.command()
@data_dir_option
@tables_option
@unsafe_writes_option
@table_option
@click.option("--retain", default=None, help="Retention, e.g. 168h or 7d (default: the table's, 7 days).")
@click.option("--dry-run", is_flag=True, help="List what would be deleted; delete nothing.")
@click.option("--force", is_flag=True, help="Allow a retention under the table's minimum (nothing else may be "
                                            "reading or writing the table).")
def vacuum(data_dir: Path | None, tables_uri: str | None, unsafe_no_conditional_writes: bool | None,
           table_name: str, retain: str | None, dry_run: bool, force: bool) -> None:
    """Deletes files the table no longer references, once removed longer ago than the retention."""
    from gamestream.tables import maintenance

    settings = _settings(data_dir=data_dir, tables_uri=tables_uri,
                         unsafe_no_conditional_writes=unsafe_no_conditional_writes)
    hours = maintenance.parse_hours(retain) if retain else None
    # A dry run only reads: no lock file, no write access needed (a read-only copy of the tables will do).
    handle = None
    if not dry_run:
        _check_storage(settings)
        handle = _locked(settings)
    try:
        report = maintenance.vacuum(settings.table_uri(table_name), retention_hours=hours, dry_run=dry_run,
                                    force=force)
        if table_name == "events" and not dry_run:  # VACUUM leaves change data alone: a forget's goes now
            from gamestream.tables import forgotten
            from gamestream.tables import lake

            retention = hours if hours is not None else maintenance.minimum_retention_hours(
                lake.open_table(settings.table_uri("events")))
            expired = forgotten.expire_change_data(settings, retention_hours=retention)
            if expired:
                console.print(f"deleted {expired} change-data file(s) of forget commits older than the retention")
    except maintenance.RetentionTooShort as error:
        console.print(f"[red]refused:[/] {error}", highlight=False)
        raise SystemExit(2)
    finally:
        if handle is not None:
            handle.close()
    print_vacuum_report(report)


# ------------------------------------------------------------------------------------------------------- forget
@cli.command()
@data_dir_option
@log_option
@tables_option
@unsafe_writes_option
@click.option("--device-id", "device_ids", multiple=True, metavar="ID", help="A device to forget (repeatable).")
@click.option("--from-file", type=click.File("r"), default=None,
              help="Device ids to forget, one per line (blank lines and # comments skipped); - reads stdin.")
@click.option("--purge", is_flag=True,
              help="Also delete the old files that still hold the rows, once no reader can need them (waits for "
                   "the KPI stage and the SQL timeout; docs/privacy.md).")
@click.option("--json", "as_json", is_flag=True, help="Print the audit entry as JSON.")
def forget(data_dir: Path | None, log_url: str | None, tables_uri: str | None,
           unsafe_no_conditional_writes: bool | None, device_ids: tuple[str, ...], from_file, purge: bool,
           as_json: bool) -> None:
    """Deletes devices' rows from the events and quarantine tables (and, through the KPI stage, from the KPIs),
    audited in the `audit` table by a salted hash of each id, never the id; see docs/privacy.md."""
    from gamestream.kpi import fold_once
    from gamestream.tables import forget as forgetting

    ids = list(device_ids)
    if from_file is not None:
        ids += [line.strip() for line in from_file if line.strip() and not line.lstrip().startswith("#")]
    if not ids:
        raise click.UsageError("give --device-id ID (repeatable) or --from-file FILE")
    settings = _settings(data_dir=data_dir, log=log_url, tables_uri=tables_uri,
                         unsafe_no_conditional_writes=unsafe_no_conditional_writes)
    _check_storage(settings)
    try:
        report = forgetting.forget(settings, ids, requested_by=forgetting.who_at_this_terminal(), purge=purge,
                                    fold_kpi=fold_once)
    except forgetting.ForgetError as error:
        raise click.UsageError(str(error)) from None
    except forgetting.PurgeNotPossible as error:
        console.print(f"[red]not purged:[/] {error}", highlight=False)
        raise SystemExit(3)
    if as_json:
        out.out(json.dumps({**report.to_dict(), "message": report.retention_message(settings)}))
        return
    out.print(f"forgot {report.devices} device(s): {report.events_deleted:,} event rows and "
              f"{report.quarantine_deleted:,} quarantine rows deleted; audit entry {report.entry} "
              f"({report.requested_by}, {report.at})", highlight=False)
    events = report.versions["events"]
    out.print(f"events table version {events['before']} → {events['after']}; forget commits "
              f"{events['forget_commits'] or 'none (nothing to delete)'}", highlight=False)
    out.print(report.retention_message(settings), highlight=False)


# ------------------------------------------------------------------------------------------------------- status
@cli.command()
@data_dir_option
@partitions_option
@log_option
@tables_option
def status(data_dir: Path | None, partitions: int | None, log_url: str | None, tables_uri: str | None) -> None:
    """Shows the log backlog per partition, and per table: version, files per partition, average file size,
    small files, last OPTIMIZE and VACUUM."""
    from gamestream.log import describe
    from gamestream.tables import lake
    from gamestream.tables.maintenance import file_stats, last_operations

    settings = _settings(data_dir=data_dir, partitions=partitions, log=log_url, tables_uri=tables_uri)
    # The embedded log is not created by looking at it; a log URL names a log that exists elsewhere.
    embedded_missing = not settings.log and not (settings.data_dir / "log" / "events.sqlite").exists()
    log = None
    if embedded_missing:
        out.print(f"no log at {settings.data_dir / 'log' / 'events.sqlite'}", highlight=False)
    else:
        try:
            log = _open_log(settings)
        except Exception as error:  # a read-only copy, an unreachable server: the tables can still be shown
            if isinstance(error, LogUnreachable):
                out.print(str(error), highlight=False)  # names the log already
            else:
                out.print(f"event log {describe(settings)}: {_unusable_storage(error) or error}", highlight=False)
    if log is not None:
        try:
            table = Table(title=f"event log ({describe(settings)})",
                          caption="offsets are positions in a partition, not event counts; "
                                  "a record holds a batch of events")
            for column in ("partition", "appended up to (offset)", "committed up to (offset)",
                           "events not yet committed"):
                table.add_column(column, justify="right")
            for p in range(log.partitions):
                committed = log.committed(settings.pipeline, p)
                table.add_row(str(p), f"{log.last_offset(p):,}", f"{committed:,}",
                              f"{log.pending_events_in(p, settings.pipeline):,}")
            out.print(table)
        finally:
            log.close()
    table = Table(title=f"tables ({settings.tables_root})")
    for column in ("table", "version", "rows", "files", "partitions", "files/partition (max)", "average file",
                   "small files", "last OPTIMIZE", "last VACUUM"):
        table.add_column(column, justify="right")
    for name in TABLES:
        uri = settings.table_uri(name)
        if not lake.table_exists(uri):
            table.add_row(name, *["—"] * 9)
            continue
        delta = lake.open_table(uri)
        stats = file_stats(delta, settings.small_file_bytes)
        actions = delta.get_add_actions(flatten=True)
        rows = sum(actions.column("num_records").to_pylist()) if actions.num_rows else 0
        most = max((files for files, _ in stats.partitions.values()), default=0)
        per = stats.files / len(stats.partitions) if stats.partitions else 0
        last = last_operations(delta)
        table.add_row(name, str(delta.version()), f"{rows:,}", f"{stats.files:,}", f"{len(stats.partitions):,}",
                      f"{per:,.1f} ({most:,})", _human_bytes(stats.average_bytes), f"{stats.small:,}",
                      (last["OPTIMIZE"] or "never")[:19], (last["VACUUM"] or "never")[:19])
    out.print(table)


# -------------------------------------------------------------------------------------------------------- serve
def _api_keys(api_key: tuple[str, ...], api_keys_file: Path | None) -> tuple[str, ...] | None:
    keys = list(api_key)
    if api_keys_file is not None:
        keys += [line.strip() for line in api_keys_file.read_text().splitlines()
                 if line.strip() and not line.startswith("#")]
    return tuple(keys) or None  # None: fall back on GAMESTREAM_API_KEYS


api_key_options = [
    click.option("--api-key", "api_key", multiple=True, help="A write key (repeatable); or GAMESTREAM_API_KEYS."),
    click.option("--admin-key", "admin_key", multiple=True,
                 help="A key for POST /v1/sql (repeatable); or GAMESTREAM_ADMIN_KEYS."),
    click.option("--api-keys-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
                 help="A file with one write key per line."),
    click.option("--host", default=None, help="Address to listen on (default 127.0.0.1). Any other address "
                                              "needs keys, or --insecure-no-auth."),
    click.option("--insecure-no-auth", is_flag=True, default=None,
                 help="Listen on a non-loopback address with no keys (anyone reaching the port can write and "
                      "read everything); warns at every start."),
]


def _with_options(options):
    def decorate(function):
        for option in reversed(options):
            function = option(function)
        return function
    return decorate


def _refuse_open_exposure(settings: Settings) -> None:
    """Exit 2 before binding when the server would be reachable from elsewhere with no key (auth.py)."""
    from gamestream.ingest.auth import exposure_problem

    problem = exposure_problem(settings)
    if problem:
        from rich.text import Text

        console.print(Text.assemble(("error: ", "red"), problem))
        raise SystemExit(2)


def _announce_keys(settings: Settings) -> None:
    """Says how the server is protected; counts keys, never shows one."""
    import logging

    from gamestream.ingest.auth import is_loopback

    if settings.keys_configured and not settings.admin_keys:
        console.print("no admin key configured: the dashboard and POST /v1/sql are refused (--admin-key)")
    if settings.api_keys:
        console.print(f"write keys: {len(settings.api_keys)} configured; requests need "
                      "'Authorization: Bearer <key>' or 'X-API-Key'")
    elif not is_loopback(settings.host):
        logging.getLogger("gamestream.ingest.auth").warning(
            "listening on %s with no write key (--insecure-no-auth): anyone who can reach the port can send "
            "events%s", settings.host, "" if settings.admin_keys else ", read every table and run maintenance",
            extra={"host": settings.host})
        console.print(f"[bold red]warning:[/] listening on {settings.host} without keys (--insecure-no-auth)",
                      highlight=False)
    else:
        console.print(f"no API keys configured: open to local clients only ({settings.host}); "
                      "--api-key / --admin-key (or GAMESTREAM_API_KEYS / GAMESTREAM_ADMIN_KEYS) protect it",
                      highlight=False)


def _log_format() -> str:
    """The --log-format given to the group (or the setting), for processes this command starts."""
    given = click.get_current_context().find_root().params.get("log_format")
    return given or Settings.from_env().log_format


@cli.command()
@data_dir_option
@partitions_option
@log_option
@tables_option
@unsafe_writes_option
@click.option("--port", type=int, default=None, help="Port (default 8000; 0 picks a free one).")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Collector processes serving the same port (default 1, or GAMESTREAM_WORKERS).")
@_with_options(api_key_options)
def serve(data_dir: Path | None, partitions: int | None, log_url: str | None, tables_uri: str | None,
          unsafe_no_conditional_writes: bool | None, port: int | None,
          workers: int | None, api_key: tuple[str, ...], admin_key: tuple[str, ...], api_keys_file: Path | None,
          host: str | None, insecure_no_auth: bool | None) -> None:
    """Runs the HTTP collector (POST /v1/events, /healthz, /metrics, /openapi.json)."""
    from gamestream.api import server
    from gamestream.api.app import create_app
    from gamestream.log import describe

    settings = _settings(data_dir=data_dir, partitions=partitions, log=log_url, port=port, host=host,
                         workers=workers, api_keys=_api_keys(api_key, api_keys_file),
                         admin_keys=tuple(admin_key) or None, insecure_no_auth=insecure_no_auth,
                         tables_uri=tables_uri, unsafe_no_conditional_writes=unsafe_no_conditional_writes)
    _refuse_open_exposure(settings)
    _check_storage(settings)

    def announce(url: str) -> None:
        _announce_keys(settings)
        processes = f"{settings.workers} worker processes" if settings.workers > 1 else "one process"
        console.print(f"collector listening on {url}/v1/events  (dashboard {url}/, health {url}/healthz, "
                      f"metrics {url}/metrics, API {url}/openapi.json); log {describe(settings)}; {processes}; "
                      "Ctrl-C stops", highlight=False)

    if settings.workers > 1:
        # Opened once here so a wrong URL, an unreachable server or a partition mismatch is one clear error
        # before any worker starts, and a new log gets its partition count from this command.
        _open_log(settings).close()
        sock = server.bind(settings.host, settings.port)
        announce(f"http://{settings.host}:{sock.getsockname()[1]}")
        code = server.serve_workers(settings, sock, log_format=_log_format())
        if code:
            raise SystemExit(code)
        return

    async def main_() -> None:
        log = _open_log(settings)  # opened (and closed) by the app's lifespan when not given; here for the error
        sock = server.bind(settings.host, settings.port)
        stop = asyncio.Event()
        server.install_stop_signals(stop)
        announce(f"http://{settings.host}:{sock.getsockname()[1]}")
        try:
            await server.serve(create_app(settings, log), sock, stop, settings)
        finally:
            await asyncio.to_thread(log.close)

    server.run(main_())


# --------------------------------------------------------------------------------------------------------- demo
@cli.command()
@data_dir_option
@partitions_option
@log_option
@tables_option
@unsafe_writes_option
@click.option("--cluster", is_flag=True,
              help="The scale-out shape on this machine: 3 nats-server nodes, 2 collectors, 2 processors, each "
                   "its own process (not with --log).")
@click.option("--port", type=int, default=None,
              help="Collector port (default 8000; 0 picks a free one); with --cluster, the second collector "
                   "takes the next port.")
@click.option("--rate", type=float, default=500.0, show_default=True, help="Generated events per second.")
@click.option("--users", type=int, default=2000, show_default=True, help="Simulated players.")
@click.option("--duration", type=float, default=None, help="Stop after this many seconds (default: Ctrl-C).")
@click.option("--seed", type=int, default=None, help="Generator seed (default: a new one each run).")
@_with_options(api_key_options)
def demo(data_dir: Path | None, partitions: int | None, log_url: str | None, tables_uri: str | None,
         unsafe_no_conditional_writes: bool | None, cluster: bool, port: int | None,
         rate: float, users: int, duration: float | None, seed: int | None, api_key: tuple[str, ...],
         admin_key: tuple[str, ...], api_keys_file: Path | None, host: str | None,
         insecure_no_auth: bool | None) -> None:
    """Everything at once on the embedded defaults: collector + processor + a generator posting live events.

    Ctrl-C or SIGTERM stops it cleanly: every acknowledged event is committed to the table first.
    """
    import random

    from gamestream.api import server
    from gamestream.demo.runner import run_demo

    if cluster and (log_url or os.environ.get("GAMESTREAM_LOG")):
        raise click.UsageError("--cluster starts its own NATS cluster: give --cluster or --log, not both "
                               "(unset GAMESTREAM_LOG)")
    settings = _settings(data_dir=data_dir, partitions=partitions, log=log_url, port=port, host=host,
                         api_keys=_api_keys(api_key, api_keys_file), admin_keys=tuple(admin_key) or None,
                         insecure_no_auth=insecure_no_auth, tables_uri=tables_uri,
                         unsafe_no_conditional_writes=unsafe_no_conditional_writes)
    _refuse_open_exposure(settings)
    _check_storage(settings)
    if cluster:
        _cluster_demo(settings, rate=rate, users=users, duration=duration,
                      seed=seed if seed is not None else random.randrange(1 << 30))
        return

    def started(url: str) -> None:
        _announce_keys(settings)
        out.print(f"[bold]gamestream demo[/] — dashboard {url}/ · collector {url}/v1/events · "
                  f"metrics {url}/metrics · API {url}/openapi.json", highlight=False)
        out.print(f"tables under {settings.tables_root}; Ctrl-C stops "
                  f"(acknowledged events are committed first)", highlight=False)

    def tick(sent, processed, backlog: int) -> None:
        out.print(f"sent {sent.events_sent:,} · accepted {sent.accepted:,} · rejected {sent.rejected:,} · "
                  f"committed {processed.events_committed:,} · backlog {backlog:,} · "
                  f"{sent.rate:,.0f} events/s", highlight=False)

    summary = server.run(run_demo(settings, port=settings.port, rate=rate, users=users, duration=duration,
                                  seed=seed if seed is not None else random.randrange(1 << 30),
                                  on_started=started, on_tick=tick))
    out.print(f"stopped after {summary.seconds:.1f}s: generator accepted {summary.sent.accepted:,} events; "
              f"table committed {summary.processed.events_committed:,} "
              f"(quarantined {summary.processed.events_quarantined:,}) in {summary.processed.commits:,} commits",
              highlight=False)
    _demo_query(settings)


def _cluster_demo(settings: Settings, *, rate: float, users: int, duration: float | None, seed: int) -> None:
    from gamestream.api import server
    from gamestream.demo.runner import run_cluster_demo

    def started(urls) -> None:
        _announce_keys(settings)
        dashboard = urls.collectors[0]
        out.print(f"[bold]gamestream demo --cluster[/] — dashboard {dashboard}/", highlight=False)
        out.print(f"nats (3 nodes, replicas 3, fsync always): {urls.nats}", highlight=False)
        for index, url in enumerate(urls.collectors, 1):
            out.print(f"collector {index}: {url}/v1/events · health {url}/healthz · metrics {url}/metrics",
                      highlight=False)
        out.print(f"2 processors share the partitions; each process writes to {urls.logs}/<name>.log; tables "
                  f"under {settings.tables_root}; Ctrl-C stops (acknowledged events are committed first)",
                  highlight=False)

    def tick(sent, backlog: int | None) -> None:
        accepted = sum(s.accepted for s in sent)
        per = " + ".join(f"{s.accepted:,}" for s in sent)
        out.print(f"sent {sum(s.events_sent for s in sent):,} · accepted {accepted:,} ({per}) · "
                  f"rejected {sum(s.rejected for s in sent):,} · "
                  f"backlog {'?' if backlog is None else f'{backlog:,}'} · "
                  f"{sum(s.rate for s in sent):,.0f} events/s", highlight=False)

    summary = server.run(run_cluster_demo(settings, port=settings.port, rate=rate, users=users, duration=duration,
                                          seed=seed, log_format=_log_format(), on_started=started, on_tick=tick))
    per = ", ".join(f"{s.accepted:,} via {url}" for s, url in zip(summary.sent, summary.urls.collectors))
    out.print(f"stopped after {summary.seconds:.1f}s: generator accepted {summary.accepted:,} events ({per}); "
              f"table committed {summary.committed:,} (quarantined {summary.quarantined:,})", highlight=False)
    if summary.committed:
        _demo_query(settings)


def _demo_query(settings: Settings) -> None:
    import duckdb

    from gamestream.tables import lake

    events = lake.open_table(settings.table_uri("events")).to_pyarrow_dataset()
    quarantine = lake.open_table(settings.table_uri("events_quarantine")).to_pyarrow_dataset()
    connection = duckdb.connect()
    connection.register("events", events)
    connection.register("events_quarantine", quarantine)
    rows = connection.execute(
        "SELECT eventDate, count(*) AS events, count(DISTINCT eventParams.device_id) AS dau, "
        "round(sum(CASE WHEN eventName = 'purchaseEvent' THEN eventParams.amount END), 2) AS bookings "
        "FROM events GROUP BY eventDate ORDER BY eventDate"
    ).fetchall()
    table = Table(title="events per day")
    for column in ("eventDate", "events", "DAU", "bookings"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*(str(v) for v in row))
    out.print(table)
    for reason, count in connection.execute(
        "SELECT reason, count(*) FROM events_quarantine GROUP BY reason ORDER BY 2 DESC"
    ).fetchall():
        out.print(f"quarantined: {count} × {reason}", markup=False, highlight=False)
    connection.close()


# ---------------------------------------------------------------------------------------------------------- aws
@cli.group("aws")
def aws_group() -> None:
    """The seed's AWS front half: API Gateway → Lambda → Kinesis (docs/aws.md)."""


@aws_group.command("package-lambda")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--python-version", default="3.11", show_default=True, help="The function's runtime (python3.X).")
@click.option("--platform", default="manylinux2014_x86_64", show_default=True,
              help="Wheel platform: manylinux2014_aarch64 for an arm64 function.")
def package_lambda(out: Path, python_version: str, platform: str) -> None:
    """Build OUT (a .zip) for the Lambda Python runtime: handler gamestream.integrations.aws.lambda_handler, its gamestream
    modules and wheels of what they import (not boto3, which the runtime has)."""
    from gamestream.integrations.aws import package_lambda as build

    try:
        package = build(out, python_version=python_version, platform=platform)
    except RuntimeError as error:
        raise click.ClickException(str(error)) from None
    wheels = ", ".join(f"{name} {version}" for name, version in package.distributions.items())
    console.print(f"{package.path}: {package.bytes / 1e6:.1f} MB; handler gamestream.integrations.aws.lambda_handler; "
                  f"{len(package.modules)} gamestream modules; wheels: {wheels or 'none'}", highlight=False)


# --------------------------------------------------------------------------------------------------------- main
_STORAGE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOENT}
_STORAGE_MESSAGES = ("permission denied", "read-only file system", "no space left", "readonly database",
                     "unable to open database file", "disk is full", "disk quota")


def _unusable_storage(error: BaseException) -> str | None:
    """One line for an error that means "this path cannot be read or written" (a read-only or full disk,
    missing permissions), from the OS, SQLite or delta-rs; None for anything else."""
    if isinstance(error, OSError) and error.errno in _STORAGE_ERRNOS:
        where = f" {error.filename}" if error.filename else ""
        return f"cannot use{where}: {error.strerror or error}"
    text = str(error)
    lowered = text.lower()
    if any(message in lowered for message in _STORAGE_MESSAGES):
        first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
        return f"cannot use the data directory ({type(error).__name__}: {first[:300]})"
    return None


def main() -> None:
    """Runs the command, then ends the process deliberately.

    deltalake 1.6.3 can abort the interpreter at exit ("terminate called without an active exception", exit 134)
    after reading a table; a command that succeeded must still exit 0, so we flush and `os._exit`.
    """
    code = 0
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        console.print("aborted")
        code = 130
    except click.ClickException as error:
        error.show()
        code = error.exit_code
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except KeyboardInterrupt:
        code = 130
    except Exception as error:  # a clear line, not a traceback, for errors we know how to explain
        from gamestream.log.ownership import OwnershipUnavailable
        from gamestream.log.sqlite import LogPartitionsMismatch
        from gamestream.process.processor import PartitionBusy
        from gamestream.tables.lake import ConditionalWritesUnsupported, StoreUnreachable, TableMissing

        unusable = None if isinstance(error, (DataDirUnusable, LogUnreachable)) else _unusable_storage(error)
        if isinstance(error, TableMissing):
            unusable = f"{error}; run `gamestream process` first"
        if isinstance(error, (LogPartitionsMismatch, PartitionBusy, DataDirUnusable, LogUnreachable,
                              OwnershipUnavailable, ConditionalWritesUnsupported, StoreUnreachable)) or unusable:
            from rich.text import Text

            console.print(Text.assemble(("error: ", "red"), unusable or str(error)))
            code = 2
        elif isinstance(error, OSError) and error.errno == errno.EADDRINUSE:
            console.print(f"[red]error:[/] the port is already in use ({error}); choose another with --port",
                          highlight=False)
            code = 2
        else:
            console.print_exception()
            code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()

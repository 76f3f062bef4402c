"""`gamestream process`: the log streamed into the events table and the KPI tables, with its progress lines and
its summary."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import click

from gamestream.cli.app import cli
from gamestream.cli.common import (
    check_storage,
    command_settings,
    console,
    data_dir_option,
    log_option,
    open_log,
    out,
    partitions_option,
    tables_option,
    unsafe_writes_option,
)
from gamestream.settings import Settings


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
    settings = command_settings(data_dir=data_dir, partitions=partitions, log=log_url,
                                batch_max_events=max_batch_events, batch_max_wait_s=max_batch_wait,
                                tables_uri=tables_uri, unsafe_no_conditional_writes=unsafe_no_conditional_writes)
    check_storage(settings)
    if metrics_port is not None:
        _serve_metrics(metrics_host, metrics_port)
    owned = [int(p) for p in only.split(",")] if only else None
    _process(settings, until_idle=until_idle, only=owned, kpi=not no_kpi, maintenance=maintenance)


def _serve_metrics(host: str, port: int) -> None:
    from prometheus_client import start_http_server

    from gamestream.metrics import REGISTRY

    metrics_server, _ = start_http_server(port, addr=host, registry=REGISTRY)
    console.print(f"metrics on http://{host}:{metrics_server.server_port}/metrics", highlight=False)


def _process(settings: Settings, *, until_idle: bool, only: list[int] | None = None, kpi: bool = True,
             maintenance: bool = False) -> None:
    from gamestream.log import describe
    from gamestream.process.pipeline import Pipeline

    log = open_log(settings)
    try:
        pipeline = Pipeline(settings, log, only, kpi=kpi, maintenance=maintenance)
        pipeline.install_signal_handlers()
        started = time.monotonic()
        mode = "until the log is drained" if until_idle else "until stopped (Ctrl-C)"
        kpi_note = (" (KPIs folded per partition here, merged by the process holding the KPI role)"
                    if pipeline.partitioned else "" if pipeline.kpi else
                    " (KPI stage: off or run by another process)")
        console.print(f"processing partitions {pipeline.processor.partitions} of {describe(settings)} "
                      f"{mode}{kpi_note}", highlight=False)
        pipeline.run(until_idle=until_idle, on_progress=_progress_printer(started))
        _print_processed(pipeline.stats, time.monotonic() - started, settings)
    finally:
        log.close()


def _progress_printer(started: float) -> Callable[[object], None]:
    """A progress callback that prints the running totals at most once a second."""
    last_print = [0.0]

    def show(stats) -> None:
        now = time.monotonic()
        if now - last_print[0] < 1.0:
            return
        last_print[0] = now
        rate = stats.events_committed / max(now - started, 1e-9)
        console.print(f"processed {stats.events_committed:,} events ({rate:,.0f}/s), "
                      f"{stats.events_quarantined:,} quarantined, {stats.duplicates_dropped:,} duplicates dropped, "
                      f"{stats.commits:,} commits", highlight=False)

    return show


def _print_processed(stats, seconds: float, settings: Settings) -> None:
    out.print(f"committed {stats.events_committed:,} events in {stats.commits:,} commits "
              f"({stats.events_committed / max(seconds, 1e-9):,.0f}/s over {seconds:.2f}s); "
              f"quarantined {stats.events_quarantined:,}; duplicates dropped {stats.duplicates_dropped:,}; "
              f"table {settings.table_uri('events')}")

"""Simulated players: `demo` (everything at once, or the scale-out shape with `--cluster`) with its live lines and
closing query, and `generate` (events posted to a collector, appended to the log or written as NDJSON)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import time
from pathlib import Path

import click
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from gamestream.cli.app import cli
from gamestream.cli.common import (
    check_storage,
    check_writable_for_log,
    command_settings,
    console,
    data_dir_option,
    log_option,
    open_log,
    out,
    partitions_option,
    root_log_format,
    tables_option,
    unsafe_writes_option,
    with_options,
)
from gamestream.cli.ingest import print_load_report
from gamestream.cli.keys import announce_keys, api_key_options, api_keys_from, refuse_open_exposure
from gamestream.settings import Settings


# --------------------------------------------------------------------------------------------------------- demo
@cli.command()
@data_dir_option
@partitions_option
@log_option
@tables_option
@unsafe_writes_option
@click.option("--cluster", is_flag=True,
              help="The scale-out shape on this machine: 3 nats-server nodes, 2 collectors, 2 processors, each "
                   "its own process; with --log kafka, 3 Kafka brokers instead of the NATS nodes (Java 17+; the "
                   "broker jars are fetched from Maven Central once).")
@click.option("--port", type=int, default=None,
              help="Collector port (default 8000; 0 picks a free one); with --cluster, the second collector "
                   "takes the next port.")
@click.option("--rate", type=float, default=500.0, show_default=True, help="Generated events per second.")
@click.option("--users", type=int, default=2000, show_default=True, help="Simulated players.")
@click.option("--duration", type=float, default=None, help="Stop after this many seconds (default: Ctrl-C).")
@click.option("--seed", type=int, default=None, help="Generator seed (default: a new one each run).")
@with_options(api_key_options)
def demo(data_dir: Path | None, partitions: int | None, log_url: str | None, tables_uri: str | None,
         unsafe_no_conditional_writes: bool | None, cluster: bool, port: int | None,
         rate: float, users: int, duration: float | None, seed: int | None, api_key: tuple[str, ...],
         admin_key: tuple[str, ...], api_keys_file: Path | None, host: str | None,
         insecure_no_auth: bool | None) -> None:
    """Everything at once on the embedded defaults: collector + processor + a generator posting live events.

    Ctrl-C or SIGTERM stops it cleanly: every acknowledged event is committed to the table first.
    """
    import random

    log_kind = "nats"
    if cluster:
        if log_url in ("nats", "kafka"):
            log_kind, log_url = log_url, None
        elif log_url or os.environ.get("GAMESTREAM_LOG"):
            raise click.UsageError("--cluster starts its own log's servers: --log may only say which, nats (the "
                                   "default) or kafka (unset GAMESTREAM_LOG)")
    settings = command_settings(data_dir=data_dir, partitions=partitions, log=log_url, port=port, host=host,
                                api_keys=api_keys_from(api_key, api_keys_file), admin_keys=tuple(admin_key) or None,
                                insecure_no_auth=insecure_no_auth, tables_uri=tables_uri,
                                unsafe_no_conditional_writes=unsafe_no_conditional_writes)
    refuse_open_exposure(settings)
    check_storage(settings)
    seed = seed if seed is not None else random.randrange(1 << 30)
    if cluster:
        _cluster_demo(settings, rate=rate, users=users, duration=duration, seed=seed, log_kind=log_kind)
    else:
        _single_process_demo(settings, rate=rate, users=users, duration=duration, seed=seed)


def _single_process_demo(settings: Settings, *, rate: float, users: int, duration: float | None,
                         seed: int) -> None:
    from gamestream.api import server
    from gamestream.demo.runner import DemoError, run_demo

    def started(url: str) -> None:
        announce_keys(settings)
        out.print(f"[bold]gamestream demo[/] — dashboard {url}/ · collector {url}/v1/events · "
                  f"metrics {url}/metrics · API {url}/openapi.json", highlight=False)
        out.print(f"tables under {settings.tables_root}; Ctrl-C stops "
                  f"(acknowledged events are committed first)", highlight=False)

    def tick(sent, processed, backlog: int) -> None:
        out.print(f"sent {sent.events_sent:,} · accepted {sent.accepted:,} · rejected {sent.rejected:,} · "
                  f"committed {processed.events_committed:,} · backlog {backlog:,} · "
                  f"{sent.rate:,.0f} events/s", highlight=False)

    try:
        summary = server.run(run_demo(settings, port=settings.port, rate=rate, users=users, duration=duration,
                                      seed=seed, on_started=started, on_tick=tick, on_news=_news))
    except DemoError as error:
        raise click.ClickException(str(error)) from None
    out.print(f"stopped after {summary.seconds:.1f}s: generator accepted {summary.sent.accepted:,} events; "
              f"table committed {summary.processed.events_committed:,} "
              f"(quarantined {summary.processed.events_quarantined:,}) in {summary.processed.commits:,} commits",
              highlight=False)
    _demo_query(settings)


def _news(line: str) -> None:
    """A supervisor's one line: a part of the demo ended, is restarting, is back, or was given up."""
    out.print(f"[yellow]![/] {escape(line)}", highlight=False)


def _cluster_demo(settings: Settings, *, rate: float, users: int, duration: float | None, seed: int,
                  log_kind: str) -> None:
    from gamestream.api import server
    from gamestream.demo.runner import DemoError, run_cluster_demo

    def started(urls) -> None:
        announce_keys(settings)
        dashboard = urls.collectors[0]
        out.print(f"[bold]gamestream demo --cluster[/] — dashboard {dashboard}/", highlight=False)
        out.print(f"{urls.servers}: {urls.log}", highlight=False)
        for index, url in enumerate(urls.collectors, 1):
            out.print(f"collector {index}: {url}/v1/events · health {url}/healthz · metrics {url}/metrics",
                      highlight=False)
        out.print("pids: " + " · ".join(f"{name} {pid}" for name, pid in urls.pids.items()), highlight=False)
        out.print(f"2 processors share the partitions; each process writes to {urls.logs}/<name>.log; tables "
                  f"under {settings.tables_root}; Ctrl-C stops (acknowledged events are committed first)",
                  highlight=False)
        out.print("supervised: kill -9 any of these pids and it is restarted (a processor's partitions move to "
                  "the other one and back)", highlight=False)

    def tick(now) -> None:
        sent = now.sent
        accepted = sum(s.accepted for s in sent)
        per = " + ".join(f"{s.accepted:,}" for s in sent)
        committed = "?" if now.committed is None else f"{now.committed:,}"
        backlog = "?" if now.backlog is None else f"{now.backlog:,}"
        owners = "?" if now.owners is None else " · ".join(
            f"{name} {','.join(map(str, partitions))}" for name, partitions in sorted(now.owners.items()))
        out.print(f"sent {sum(s.events_sent for s in sent):,} · accepted {accepted:,} ({per}) · "
                  f"rejected {sum(s.rejected for s in sent):,} · committed {committed} · backlog {backlog} · "
                  f"{sum(s.rate for s in sent):,.0f} events/s · "
                  f"partitions: {owners}", highlight=False)

    try:
        summary = server.run(run_cluster_demo(settings, port=settings.port, rate=rate, users=users,
                                              duration=duration, seed=seed, log_format=root_log_format(),
                                              on_started=started, on_tick=tick, on_news=_news,
                                              log_kind=log_kind))
    except DemoError as error:
        raise click.ClickException(str(error)) from None
    per = ", ".join(f"{s.accepted:,} via {url}" for s, url in zip(summary.sent, summary.urls.collectors))
    restarts = (" · restarted: " + ", ".join(f"{name} ×{count}" for name, count in summary.restarts.items())
                if summary.restarts else "")
    out.print(f"stopped after {summary.seconds:.1f}s: generator accepted {summary.accepted:,} events ({per}); "
              f"table committed {summary.committed:,} (quarantined {summary.quarantined:,}){restarts}",
              highlight=False)
    if summary.committed:
        _demo_query(settings)


def _demo_query(settings: Settings) -> None:
    """What the demo wrote, read back: events, DAU and bookings per day, and the quarantine's reasons."""
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
@click.option("--acked", "acked_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="--target: append the eventId of every event the collector acknowledged to this file, one per "
                   "line, as each answer arrives (what a generator killed with SIGKILL had acknowledged survives "
                   "it), and keep the counts so far in FILE.counts (JSON).")
def generate(data_dir: Path | None, partitions: int | None, log_url: str | None, target: str | None, to_log: bool,
             out_file: Path | None, events: int | None, duration: float | None,
             rate: float | None, batch: int, concurrency: int, api_key: str | None, users: int, days: float,
             start: dt.datetime | None, seed: int, acked_file: Path | None) -> None:
    """Simulates players: posts their events to a collector (--target), appends them straight to the log
    (--to-log) or writes NDJSON (--out). Posting, SIGTERM or Ctrl-C stops it once the requests in flight are
    answered."""
    if sum((target is not None, out_file is not None, to_log)) != 1:
        raise click.UsageError("give exactly one of --target URL, --to-log or --out FILE")
    if acked_file is not None and target is None:
        raise click.UsageError("--acked goes with --target")
    count = events if events is not None else 10_000
    start_utc = start.replace(tzinfo=dt.timezone.utc) if start else None
    if to_log:
        settings = command_settings(data_dir=data_dir, partitions=partitions, log=log_url)
        _generate_to_log(settings, count=count, users=users, seed=seed, start=start_utc, days=days)
        return
    if out_file is not None:
        _generate_to_file(out_file, count=count, users=users, seed=seed, start=start_utc, days=days)
        return
    if events is None and duration is None:
        raise click.UsageError("give --events N or --duration SECONDS to bound the run")
    stats = asyncio.run(_post_with_progress(target, events=events, duration=duration, rate=rate, batch=batch,
                                            concurrency=concurrency, api_key=api_key, users=users, seed=seed,
                                            acked=acked_file, stop_on_signals=True))
    _print_send_summary(stats)
    if stats.failed_events:
        raise SystemExit(1)


def _generate_to_log(settings: Settings, *, count: int, users: int, seed: int, start: dt.datetime | None,
                     days: float) -> None:
    """`--to-log`: the simulated events appended as `load` appends a file's, with its report."""
    from gamestream.demo.generator import simulate
    from gamestream.ingest.loader import load_lines

    check_writable_for_log(settings)
    log = open_log(settings)
    try:
        lines = (json.dumps(e, separators=(",", ":")).encode() for e in
                 simulate(events=count, users=users, seed=seed, start=start, days=days))
        started = time.monotonic()
        report = load_lines(lines, log, max_event_bytes=settings.max_event_bytes,
                            compression=settings.record_compression)  # type: ignore[arg-type]
    finally:
        log.close()
    print_load_report(report, Path("generator"), time.monotonic() - started)


def _generate_to_file(out_file: Path, *, count: int, users: int, seed: int, start: dt.datetime | None,
                      days: float) -> None:
    from gamestream.demo.generator import simulate

    with open(out_file, "w") as handle:
        for event in simulate(events=count, users=users, seed=seed, start=start, days=days):
            handle.write(json.dumps(event, separators=(",", ":")))
            handle.write("\n")
    out.print(f"wrote {count:,} events of {users:,} players to {out_file}")


async def _post_with_progress(target: str, *, events: int | None, duration: float | None, rate: float | None,
                              batch: int, concurrency: int, api_key: str | None, users: int, seed: int,
                              stop: "asyncio.Event | None" = None, acked: Path | None = None,
                              stop_on_signals: bool = False):
    import signal

    from gamestream.demo.generator import AckedFile, SendStats, live_events, send

    stats = SendStats()
    if stop_on_signals:  # SIGTERM (a supervisor stopping it) as Ctrl-C: stop sending, let the answers arrive
        stop = stop or asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    record = AckedFile(acked) if acked is not None else None
    with Progress(TextColumn("posting"), BarColumn(), TextColumn("{task.fields[counters]}"), console=console,
                  transient=True) as progress:
        task = progress.add_task("posting", total=events if events is not None else duration, counters="")
        sending = asyncio.ensure_future(send(
            target, live_events(users=users, seed=seed, limit=events), batch=batch, concurrency=concurrency,
            rate=rate, duration=duration, api_key=api_key, stop=stop, stats=stats,
            on_ack=record.add if record else None))
        while not sending.done():
            await asyncio.wait([sending], timeout=0.5)
            if record:
                record.write_counts(stats)
            done = stats.events_sent if events is not None else time.monotonic() - stats.started
            progress.update(task, completed=done, counters=(
                f"sent {stats.events_sent:,} · accepted {stats.accepted:,} · rejected {stats.rejected:,} · "
                f"{stats.rate:,.0f} events/s"))
        if record:
            record.write_counts(stats)
            record.close()
        return sending.result()


def _print_send_summary(stats) -> None:
    seconds = stats.finished - stats.started
    out.print(f"sent {stats.events_sent:,} events in {stats.requests:,} requests over {seconds:.1f}s "
              f"({stats.rate:,.0f} events/s): [green]{stats.accepted:,} accepted[/], "
              f"[red]{stats.rejected:,} rejected[/], {stats.retries:,} retries, {stats.failed_events:,} failed")

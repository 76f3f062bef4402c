"""Getting events into the log: `serve` (the HTTP collector) and `load` (NDJSON files), with the load report."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import click
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

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
from gamestream.cli.keys import announce_keys, api_key_options, api_keys_from, refuse_open_exposure
from gamestream.settings import Settings


# -------------------------------------------------------------------------------------------------------- serve
@cli.command()
@data_dir_option
@partitions_option
@log_option
@tables_option
@unsafe_writes_option
@click.option("--port", type=int, default=None, help="Port (default 8000; 0 picks a free one).")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Collector processes serving the same port (default 1, or GAMESTREAM_WORKERS).")
@click.option("--front", type=click.Choice(["auto", "native", "python"]), default=None,
              help="What serves the socket: native (plain accepted event requests answered in Rust, everything "
                   "else by the app behind it), python (uvicorn alone), or auto (the default, or GAMESTREAM_FRONT): "
                   "native when the native module has it.")
@with_options(api_key_options)
def serve(data_dir: Path | None, partitions: int | None, log_url: str | None, tables_uri: str | None,
          unsafe_no_conditional_writes: bool | None, port: int | None,
          workers: int | None, front: str | None, api_key: tuple[str, ...], admin_key: tuple[str, ...], api_keys_file: Path | None,
          host: str | None, insecure_no_auth: bool | None) -> None:
    """Runs the HTTP collector (POST /v1/events, /healthz, /metrics, /openapi.json)."""
    settings = command_settings(data_dir=data_dir, partitions=partitions, log=log_url, port=port, host=host,
                                workers=workers, front=front, api_keys=api_keys_from(api_key, api_keys_file),
                                admin_keys=tuple(admin_key) or None, insecure_no_auth=insecure_no_auth,
                                tables_uri=tables_uri, unsafe_no_conditional_writes=unsafe_no_conditional_writes)
    refuse_open_exposure(settings)
    check_storage(settings)
    from gamestream.ingest import geo

    geo.resolver_for(settings)  # a MaxMind DB file that cannot be opened: one line (GeoDataError), before binding
    from gamestream.api.front import front_of

    front_of(settings)  # --front native that cannot be had: one line (FrontUnavailable), before binding
    announce = partial(_announce_collector, settings)
    if settings.workers > 1:
        _serve_with_workers(settings, announce)
    else:
        _serve_in_this_process(settings, announce)


def _announce_collector(settings: Settings, url: str) -> None:
    from gamestream.ingest import geo
    from gamestream.log import describe

    announce_keys(settings)
    from gamestream.api.front import front_of

    processes = f"{settings.workers} worker processes" if settings.workers > 1 else "one process"
    console.print(f"collector listening on {url}/v1/events  (dashboard {url}/, health {url}/healthz, "
                  f"metrics {url}/metrics, API {url}/openapi.json); log {describe(settings)}; {processes}, "
                  f"{front_of(settings)} front; Ctrl-C stops", highlight=False)
    console.print(geo.describe(settings), highlight=False)


def _serve_with_workers(settings: Settings, announce: Callable[[str], None]) -> None:
    """`--workers N`: N collector processes accept on one socket bound here; exits with the first failure's code."""
    from gamestream.api import server

    # Opened once here so a wrong URL, an unreachable server or a partition mismatch is one clear error
    # before any worker starts, and a new log gets its partition count from this command.
    open_log(settings).close()
    sock = server.bind(settings.host, settings.port)
    announce(f"http://{settings.host}:{sock.getsockname()[1]}")
    code = server.serve_workers(settings, sock, log_format=root_log_format())
    if code:
        raise SystemExit(code)


def _serve_in_this_process(settings: Settings, announce: Callable[[str], None]) -> None:
    from gamestream.api import server
    from gamestream.api.app import create_app

    async def serve_until_stopped() -> None:
        log = open_log(settings)  # opened (and closed) by the app's lifespan when not given; here for the error
        sock = server.bind(settings.host, settings.port)
        stop = asyncio.Event()
        server.install_stop_signals(stop)
        announce(f"http://{settings.host}:{sock.getsockname()[1]}")
        try:
            await server.serve(create_app(settings, log), sock, stop, settings)
        finally:
            await asyncio.to_thread(log.close)

    server.run(serve_until_stopped())


# --------------------------------------------------------------------------------------------------------- load
@cli.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@data_dir_option
@partitions_option
@log_option
@click.option("--chunk-lines", type=click.IntRange(min=1), default=20000, show_default=True,
              help="Lines validated and appended together: one log record per partition per chunk. Smaller chunks "
                   "make smaller records (more, smaller processor commits); larger ones are faster.")
@click.option("--jobs", type=click.IntRange(min=0), default=0, show_default="0: one per core for 16 MiB and more",
              help="Worker processes that validate and encode chunks while this one appends them, in order.")
def load(files: tuple[Path, ...], data_dir: Path | None, partitions: int | None, log_url: str | None,
         chunk_lines: int, jobs: int) -> None:
    """Validates NDJSON files (or .gz) and appends their events to the log.

    Events keep their own eventTime and eventId; absent ones are stamped now / given a UUIDv7. Rejected lines
    are reported with line number, field and reason; the exit status is non-zero only when loading cannot run.
    """
    settings = command_settings(data_dir=data_dir, partitions=partitions, log=log_url)
    check_writable_for_log(settings)
    pool = _load_pool(jobs, files)
    try:
        _load(settings, list(files), chunk_lines, pool)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


LOAD_POOL_BYTES = 16 << 20
"""Below this much input, `load` validates in its own process: workers would not repay their start."""


def _load_pool(jobs: int, files: tuple[Path, ...]):
    """The worker processes of `load` (None: validate in this process): `jobs` of them, or with 0 one per
    core when the files hold 16 MiB or more. Made before any log is opened (they are forked)."""
    import os

    from gamestream.ingest.loader import load_pool

    if jobs == 0:
        jobs = (os.cpu_count() or 1) if sum(f.stat().st_size for f in files) >= LOAD_POOL_BYTES else 1
    return load_pool(jobs) if jobs > 1 else None


def _load(settings: Settings, paths: list[Path], chunk_lines: int = 20000, pool=None) -> None:
    """Loads the files, one stream of chunks (`load_files`), and reports each once it is appended: its time is
    counted from the end of the file before (the first's from the start), so the times add up to the load's."""
    from gamestream.ingest.loader import load_files

    log = open_log(settings)
    size = sum(path.stat().st_size for path in paths)
    with Progress(
        TextColumn("loading"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
        console=console, transient=True, disable=size < (4 << 20),
    ) as progress:
        task = progress.add_task("load", total=size)
        last_end = [time.monotonic()]

        def loaded(path: Path, report) -> None:
            now = time.monotonic()
            print_load_report(report, path, now - last_end[0])
            last_end[0] = now

        try:
            load_files(paths, log, max_event_bytes=settings.max_event_bytes, lines_per_chunk=chunk_lines,
                       compression=settings.record_compression,  # type: ignore[arg-type]
                       params=settings.schema_params, pool=pool, on_file=loaded,
                       on_progress=lambda n: progress.advance(task, n))
        finally:
            log.close()
    # the progress counts raw bytes; a gzip file's are more than its size, which is fine for a bar


def print_load_report(report, path: Path, seconds: float) -> None:
    """Events read, accepted and rejected, with the first rejected lines and why."""
    rate = report.lines / seconds if seconds > 0 else 0
    out.print(f"[bold]{path}[/]: {report.lines:,} events read in {seconds:.2f}s ({rate:,.0f}/s) — "
              f"[green]{report.accepted:,} accepted[/], [red]{report.rejected:,} rejected[/]")
    for number, reason in report.first_rejections:
        out.print(f"  line {number}: {reason}", markup=False, highlight=False)
    if report.rejected > len(report.first_rejections):
        out.print(f"  … and {report.rejected - len(report.first_rejections):,} more rejections")

"""Looking after the tables: `optimize` and `vacuum` (under the maintenance lock) with their reports, and
`status` (the log's backlog and each table's files)."""

from __future__ import annotations

from pathlib import Path

import click
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from gamestream.cli.app import cli
from gamestream.cli.common import (
    LogUnreachable,
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
    unusable_storage,
)
from gamestream.settings import TABLES, Settings

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
    """The maintenance lock, held; says so when another compactor has it and waits for it."""
    from gamestream.tables.maintenance import MaintenanceLock

    lock = MaintenanceLock(settings)
    handle = lock.acquire(wait=False)
    if handle is None:
        console.print("another compactor holds the maintenance lock; waiting for it…")
        handle = lock.acquire(wait=True)
    return handle


# ----------------------------------------------------------------------------------------------------- optimize
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
    settings = command_settings(data_dir=data_dir, tables_uri=tables_uri,
                                unsafe_no_conditional_writes=unsafe_no_conditional_writes,
                                target_file_bytes=maintenance.parse_size(target_size) if target_size else None)
    check_storage(settings)
    handle = _locked(settings)
    try:
        report = _optimize_with_progress(settings, table_name, partitions=list(partitions) or None, since=since,
                                         zorder=list(zorder) or None)
    finally:
        handle.close()
    print_optimize_report(report)


def _optimize_with_progress(settings: Settings, table_name: str, *, partitions: list[str] | None,
                            since: str | None, zorder: list[str] | None):
    from gamestream.tables import maintenance

    with Progress(TextColumn("optimizing"), BarColumn(), TextColumn("{task.completed}/{task.total} partitions"),
                  console=console, transient=True) as progress:
        task = progress.add_task("optimize", total=None)
        return maintenance.optimize(
            settings.table_uri(table_name), partitions=partitions, since=since,
            target_size=settings.target_file_bytes, zorder=zorder,
            on_partition=lambda key, done, total: progress.update(task, completed=done, total=total))


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


# ------------------------------------------------------------------------------------------------------- vacuum
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

    settings = command_settings(data_dir=data_dir, tables_uri=tables_uri,
                                unsafe_no_conditional_writes=unsafe_no_conditional_writes)
    hours = maintenance.parse_hours(retain) if retain else None
    # A dry run only reads: no lock file, no write access needed (a read-only copy of the tables will do).
    handle = None
    if not dry_run:
        check_storage(settings)
        handle = _locked(settings)
    try:
        report = maintenance.vacuum(settings.table_uri(table_name), retention_hours=hours, dry_run=dry_run,
                                    force=force)
        if table_name == "events" and not dry_run:  # VACUUM leaves change data alone: a forget's goes now
            _expire_forget_change_data(settings, hours)
    except maintenance.RetentionTooShort as error:
        console.print(f"[red]refused:[/] {error}", highlight=False)
        raise SystemExit(2)
    finally:
        if handle is not None:
            handle.close()
    print_vacuum_report(report)


def _expire_forget_change_data(settings: Settings, hours: float | None) -> None:
    """Deletes the change-data files of forget commits older than the retention (the events table's, unless
    --retain gave one)."""
    from gamestream.tables import forgotten, lake, maintenance

    retention = hours if hours is not None else maintenance.minimum_retention_hours(
        lake.open_table(settings.table_uri("events")))
    expired = forgotten.expire_change_data(settings, retention_hours=retention)
    if expired:
        console.print(f"deleted {expired} change-data file(s) of forget commits older than the retention")


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


# ------------------------------------------------------------------------------------------------------- status
@cli.command()
@data_dir_option
@partitions_option
@log_option
@tables_option
def status(data_dir: Path | None, partitions: int | None, log_url: str | None, tables_uri: str | None) -> None:
    """Shows the log backlog per partition, and per table: version, files per partition, average file size,
    small files, last OPTIMIZE and VACUUM."""
    settings = command_settings(data_dir=data_dir, partitions=partitions, log=log_url, tables_uri=tables_uri)
    log = _open_log_to_look_at(settings)
    if log is not None:
        try:
            _print_log_backlog(settings, log)
            _print_kpi_folding(settings, log)
        finally:
            log.close()
    _print_tables(settings)


def _open_log_to_look_at(settings: Settings):
    """The log, or None after a line saying why it cannot be shown: the tables are shown all the same. The
    embedded log is not created by looking at it; a log URL names a log that exists elsewhere."""
    from gamestream.log import describe

    embedded = settings.data_dir / "log" / "events.sqlite"
    if not settings.log and not embedded.exists():
        out.print(f"no log at {embedded}", highlight=False)
        return None
    try:
        return open_log(settings)
    except Exception as error:  # a read-only copy, an unreachable server: the tables can still be shown
        if isinstance(error, LogUnreachable):
            out.print(str(error), highlight=False)  # names the log already
        else:
            out.print(f"event log {describe(settings)}: {unusable_storage(error) or error}", highlight=False)
        return None


def _print_log_backlog(settings: Settings, log) -> None:
    from gamestream.log import describe

    table = Table(title=f"event log ({describe(settings)})",
                  caption="offsets are positions in a partition, not event counts; "
                          "a record holds a batch of events")
    for column in ("partition", "appended up to (offset)", "committed up to (offset)",
                   "events not yet committed", "duplicates dropped"):
        table.add_column(column, justify="right")
    dropped = _duplicates_dropped(settings, log.partitions)
    for p in range(log.partitions):
        committed = log.committed(settings.pipeline, p)
        table.add_row(str(p), f"{log.last_offset(p):,}", f"{committed:,}",
                      f"{log.pending_events_in(p, settings.pipeline):,}", f"{dropped.get(p, 0):,}")
    out.print(table)
    if dropped:
        out.print(f"duplicates dropped: {sum(dropped.values()):,} copies of events already in the table (same "
                  "eventId and payload; another payload with a known eventId is quarantined instead)",
                  highlight=False)


def _duplicates_dropped(settings: Settings, partitions: int) -> dict[int, int]:
    """Per log partition, the copies of already-landed eventIds the processor dropped (a counter the events
    table's commits keep: `lake.duplicates_app_id`)."""
    from gamestream.tables import lake

    uri = settings.table_uri("events")
    if not lake.table_exists(uri):
        return {}
    events = lake.open_table(uri)
    counts = {p: events.transaction_version(lake.duplicates_app_id(settings.pipeline, p)) or 0
              for p in range(partitions)}
    return {p: n for p, n in counts.items() if n}


def _print_kpi_folding(settings: Settings, log) -> None:
    """How the KPIs are folded (`kpi_mode`): globally, or per partition — then how far each partition's copy has
    folded the events table, its watermark, and how far the merged tables are complete."""
    from gamestream.kpi.merge import partition_progress
    from gamestream.kpi.parts import kpi_mode_choice
    from gamestream.kpi.rows import from_us

    try:
        partitioned, why = kpi_mode_choice(settings, log)
    except ValueError as error:
        out.print(f"KPIs: {error}", highlight=False)
        return
    out.print(f"KPIs folded {'per partition' if partitioned else 'globally'} ({why})", highlight=False)
    if not partitioned:
        return
    table = Table(title="KPIs per partition", caption="the KPI tables are complete up to the least version")
    for column in ("partition", "events version folded", "watermark"):
        table.add_column(column, justify="right")
    for part, (version, watermark) in sorted(partition_progress(settings, log.partitions).items()):
        table.add_row(str(part), f"{version:,}" if version else "not started",
                      from_us(watermark).isoformat()[:19] if watermark is not None else "—")
    out.print(table)


def _print_tables(settings: Settings) -> None:
    table = Table(title=f"tables ({settings.tables_root})")
    for column in ("table", "version", "rows", "files", "partitions", "files/partition (max)", "average file",
                   "small files", "last OPTIMIZE", "last VACUUM"):
        table.add_column(column, justify="right")
    for name in TABLES:
        table.add_row(*_table_status(settings, name))
    out.print(table)


def _table_status(settings: Settings, name: str) -> list[str]:
    """One row of the tables' status: version, rows, files and their spread, last OPTIMIZE and VACUUM; dashes
    for a table not yet created."""
    from gamestream.tables import lake
    from gamestream.tables.maintenance import file_stats, last_operations

    uri = settings.table_uri(name)
    if not lake.table_exists(uri):
        return [name, *["—"] * 9]
    delta = lake.open_table(uri)
    stats = file_stats(delta, settings.small_file_bytes)
    actions = delta.get_add_actions(flatten=True)
    rows = sum(actions.column("num_records").to_pylist()) if actions.num_rows else 0
    most = max((files for files, _ in stats.partitions.values()), default=0)
    per = stats.files / len(stats.partitions) if stats.partitions else 0
    last = last_operations(delta)
    return [name, str(delta.version()), f"{rows:,}", f"{stats.files:,}", f"{len(stats.partitions):,}",
            f"{per:,.1f} ({most:,})", _human_bytes(stats.average_bytes), f"{stats.small:,}",
            (last["OPTIMIZE"] or "never")[:19], (last["VACUUM"] or "never")[:19]]

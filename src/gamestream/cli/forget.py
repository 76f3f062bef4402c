"""`gamestream forget`: devices' rows deleted from the tables, audited by a salted hash (docs/privacy.md)."""

from __future__ import annotations

import json
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
    unsafe_writes_option,
)
from gamestream.settings import Settings


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

    ids = _device_ids(device_ids, from_file)
    settings = command_settings(data_dir=data_dir, log=log_url, tables_uri=tables_uri,
                                unsafe_no_conditional_writes=unsafe_no_conditional_writes)
    check_storage(settings)
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
    else:
        print_forget_report(report, settings)


def _device_ids(device_ids: tuple[str, ...], from_file) -> list[str]:
    """The ids given by --device-id and --from-file (blank lines and # comments skipped); a usage error for none."""
    ids = list(device_ids)
    if from_file is not None:
        ids += [line.strip() for line in from_file if line.strip() and not line.lstrip().startswith("#")]
    if not ids:
        raise click.UsageError("give --device-id ID (repeatable) or --from-file FILE")
    return ids


def print_forget_report(report, settings: Settings) -> None:
    out.print(f"forgot {report.devices} device(s): {report.events_deleted:,} event rows and "
              f"{report.quarantine_deleted:,} quarantine rows deleted; audit entry {report.entry} "
              f"({report.requested_by}, {report.at})", highlight=False)
    events = report.versions["events"]
    out.print(f"events table version {events['before']} → {events['after']}; forget commits "
              f"{events['forget_commits'] or 'none (nothing to delete)'}", highlight=False)
    out.print(report.retention_message(settings), highlight=False)

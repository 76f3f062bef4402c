"""`gamestream funnel`: an ordered funnel over the events table, per day of its first step, printed as a table,
CSV or JSON (the definition: `gamestream.api.funnel`, docs/kpi.md "Funnels")."""

from __future__ import annotations

from pathlib import Path

import click

from gamestream.cli.app import cli
from gamestream.cli.common import command_settings, data_dir_option, tables_option


@cli.command()
@click.option("--step", "steps", multiple=True, required=True, metavar="NAME[param=value,…]",
              help="A step, in order (2 to 10): an event name, optionally with parameter filters compared as text, "
                   "e.g. --step sessionStart --step 'levelEnd[game_keyword=space-miner]' --step purchaseEvent.")
@click.option("--within", default=None, metavar="DURATION",
              help="The whole funnel completes within this of the step-1 event: 30m, 1h, 1d, 7d (default 1d).")
@click.option("--from", "first_day", default=None, metavar="YYYY-MM-DD",
              help="First day of step-1 events (UTC; default six days before --to).")
@click.option("--to", "last_day", default=None, metavar="YYYY-MM-DD",
              help="Last day of step-1 events (UTC; default today).")
@click.option("--by", default=None, metavar="DIMENSION",
              help="Split by the step-1 event's platform, app_version, country (once the table has it) or a promoted "
                   "parameter.")
@data_dir_option
@tables_option
@click.option("--format", "output", type=click.Choice(["table", "csv", "json"]), default="table",
              show_default=True)
def funnel(steps: tuple[str, ...], within: str | None, first_day: str | None, last_day: str | None,
           by: str | None, data_dir: Path | None, tables_uri: str | None, output: str) -> None:
    """Counts the devices that did the steps in order, each step after the one before and all within --within of
    the first, per day of the first step (then a total row summing the days)."""
    from gamestream.api.funnel import Funnel, FunnelError, parse_step, run
    from gamestream.cli.sql import fail, print_result

    try:
        asked = Funnel.of([parse_step(step) for step in steps], within=within, first_day=first_day,
                          last_day=last_day, by=by)
        result = run(command_settings(data_dir=data_dir, tables_uri=tables_uri), asked)
    except FunnelError as error:
        fail(str(error))
    legend = " → ".join(f"{k}. {step.label()}" for k, step in enumerate(asked.steps, start=1))
    print_result(result, output,
                 heading=f"{legend}, within {asked.describe()['within']}, {asked.first_day} to {asked.last_day}")

"""`gamestream sql`: a read-only Spark SQL query over the tables, printed as a table, CSV or JSON."""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import click
from rich.table import Table

from gamestream.cli.app import cli
from gamestream.cli.common import command_settings, console, data_dir_option, out, tables_option

MAX_TABLE_ROWS = 1000


@cli.command()
@click.argument("query")
@data_dir_option
@tables_option
@click.option("--format", "output", type=click.Choice(["table", "csv", "json"]), default="table",
              show_default=True)
def sql(query: str, data_dir: Path | None, tables_uri: str | None, output: str) -> None:
    """Runs a read-only Spark SQL query over the tables (events, alias mobile_events_delta_raw,
    events_quarantine, kpi_events_hourly, kpi_bookings_hourly, kpi_daily, kpi_retention, kpi_top_events,
    kpi_activity, kpi_devices, kpi_daily_segments, kpi_retention_segments, kpi_device_segments, audit, alerts).
    Dates are UTC."""
    from gamestream.api.query import QueryError, SqlEngine

    try:
        result = SqlEngine(command_settings(data_dir=data_dir, tables_uri=tables_uri)).run(query)
    except QueryError as error:
        fail(error.pointed())
    print_result(result, output)


def fail(message: str) -> NoReturn:
    """A user's mistake: one red line on stderr, exit status 2."""
    from rich.text import Text

    console.print(Text.assemble(("error: ", "red"), message))
    raise SystemExit(2)


def print_result(result, output: str, *, heading: str | None = None) -> None:
    """An Arrow table as `output` (table, csv or json); `heading` goes above a table."""
    from gamestream.api.query import to_csv, to_json

    if output == "csv":
        out.out(to_csv(result), end="")
    elif output == "json":
        out.out(to_json(result))
    else:
        if heading:
            out.print(heading, highlight=False, markup=False)
        print_result_table(result)


def print_result_table(result) -> None:
    """The first MAX_TABLE_ROWS rows of an Arrow table, numbers right-aligned, then the row count."""
    from gamestream.api.query import display_value

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


def pa_is_number(type_) -> bool:
    import pyarrow.types as types

    return types.is_integer(type_) or types.is_floating(type_) or types.is_decimal(type_)

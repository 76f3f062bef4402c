"""`gamestream schema`: the event schema, as Arrow, Markdown or Spark DDL."""

from __future__ import annotations

from pathlib import Path

import click

from gamestream.cli.app import cli
from gamestream.cli.common import command_settings, data_dir_option, out


@cli.command()
@data_dir_option
@click.option("--markdown", is_flag=True, help="The Markdown reference (docs/schema.md).")
@click.option("--spark", is_flag=True, help="Spark SQL DDL.")
def schema(data_dir: Path | None, markdown: bool, spark: bool) -> None:
    """Prints the event schema, with the parameters the configuration promotes."""
    from gamestream import schema as event_schema

    params = command_settings(data_dir=data_dir).schema_params
    if markdown:
        out.out(event_schema.markdown_reference(params), end="")
    elif spark:
        out.out(event_schema.spark_ddl(params))
    else:
        out.out(str(event_schema.arrow_schema(params=params)))

"""`gamestream aws …`: the seed's AWS front half (docs/aws.md)."""

from __future__ import annotations

from pathlib import Path

import click

from gamestream.cli.app import cli
from gamestream.cli.common import console


@cli.group("aws")
def aws_group() -> None:
    """The seed's AWS front half: API Gateway → Lambda → Kinesis (docs/aws.md)."""


@aws_group.command("package-lambda")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--python-version", default="3.11", show_default=True, help="The function's runtime (python3.X).")
@click.option("--platform", default="manylinux2014_x86_64", show_default=True,
              help="Wheel platform: manylinux2014_aarch64 for an arm64 function.")
def package_lambda(out: Path, python_version: str, platform: str) -> None:
    """Build OUT (a .zip) for the Lambda Python runtime: handler gamestream.integrations.aws.lambda_handler, its
    gamestream modules and wheels of what they import (not boto3, which the runtime has)."""
    from gamestream.integrations.aws import package_lambda as build

    try:
        package = build(out, python_version=python_version, platform=platform)
    except RuntimeError as error:
        raise click.ClickException(str(error)) from None
    wheels = ", ".join(f"{name} {version}" for name, version in package.distributions.items())
    console.print(f"{package.path}: {package.bytes / 1e6:.1f} MB; handler gamestream.integrations.aws.lambda_handler; "
                  f"{len(package.modules)} gamestream modules; wheels: {wheels or 'none'}", highlight=False)

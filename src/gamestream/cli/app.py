"""The `gamestream` click group with its global options, and `main`: how the process ends (the exit code, and one
line rather than a traceback for the errors we know how to explain). The commands register on `cli` from their
own modules, which `gamestream.cli` imports."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import click

from gamestream.cli.common import (
    DataDirUnusable,
    LogUnreachable,
    command_settings,
    console,
    unusable_storage,
)


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
    logs.setup(log_format or command_settings(schema_params=()).log_format)


def main() -> None:
    """Runs the command, then ends the process deliberately.

    deltalake 1.6.3 can abort the interpreter at exit ("terminate called without an active exception", exit 134)
    after reading a table; a command that succeeded must still exit 0, so we flush and `os._exit`.
    """
    code = 0
    # Arrow's buffers from the C library's allocator rather than its default mimalloc (before pyarrow is imported;
    # an ARROW_DEFAULT_MEMORY_POOL of the user's own wins, and the processes a command starts inherit it). Measured
    # (1M events, 2026-12-06, alternating): `process --until-idle` peaked at 578-583 MB and read its log in
    # 2.70-2.80 s, against 685-722 MB and 2.95-3.19 s on mimalloc, whose fresh regions the kernel zeroed as huge
    # pages (14 % of the live processor's CPU, perf); `load` 140 against 191-197 MB at the same speed.
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
    # numpy's OpenBLAS without threads of its own (before numpy is imported; a user's setting wins): gamestream
    # does no linear algebra, and OpenBLAS's threads, started at import, spin idle for a while — ~0.09 s of CPU
    # in every process (each of `load`'s workers too), 3 % of `process --until-idle`'s CPU on 1M events (perf).
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
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
        code = _report_failure(error)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _report_failure(error: Exception) -> int:
    """Prints a command's unexpected exception and returns the exit code: 2 with one line for an error we can
    explain, 1 with the traceback for anything else. Called while the exception is being handled (the traceback
    is read from there)."""
    explained = _explain(error)
    if explained is not None:
        from rich.text import Text

        console.print(Text.assemble(("error: ", "red"), explained))
        return 2
    if isinstance(error, OSError) and error.errno == errno.EADDRINUSE:
        console.print(f"[red]error:[/] the port is already in use ({error}); choose another with --port",
                      highlight=False)
        return 2
    console.print_exception()
    return 1


def _explain(error: Exception) -> str | None:
    """The one line for an error the user can act on (a busy partition, an unusable data directory, a missing
    table, an object store without conditional writes…); None for an error we cannot explain."""
    from gamestream.alerts import AlertConfigError
    from gamestream.api.front import FrontUnavailable
    from gamestream.ingest.geo import GeoDataError
    from gamestream.log.ownership import OwnershipUnavailable
    from gamestream.log.sqlite import LogPartitionsMismatch
    from gamestream.process.processor import PartitionBusy
    from gamestream.tables.lake import ConditionalWritesUnsupported, StoreUnreachable, TableMissing

    unusable = None if isinstance(error, (DataDirUnusable, LogUnreachable)) else unusable_storage(error)
    if isinstance(error, TableMissing):
        unusable = f"{error}; run `gamestream process` first"
    if isinstance(error, (LogPartitionsMismatch, PartitionBusy, DataDirUnusable, LogUnreachable,
                          OwnershipUnavailable, ConditionalWritesUnsupported, StoreUnreachable,
                          GeoDataError, AlertConfigError, FrontUnavailable)) or unusable:
        return unusable or str(error)
    return None

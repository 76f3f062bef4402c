"""What every command shares: the two consoles, the options several commands take, their settings, and the early
checks that turn an unusable data directory, log or object store into one line instead of a traceback."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import click
from rich.console import Console

from gamestream.settings import Settings

console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)  # logs and pipes get wide tables

data_dir_option = click.option(
    "--data-dir", type=click.Path(path_type=Path), default=None,
    help="Data directory (default ./gamestream-data, or GAMESTREAM_DATA_DIR).",
)
partitions_option = click.option(
    "--partitions", "partitions", type=int, default=None,
    help="Log partitions, fixed when the log (or its JetStream stream) is created (default 4, or "
         "GAMESTREAM_PARTITIONS).",
)
log_option = click.option(
    "--log", "log_url", type=str, default=None, metavar="URL",
    help="The event log: nats://host:port[,host:port…][?stream=NAME] for NATS JetStream, kinesis://STREAM for "
         "AWS Kinesis (region, credentials, endpoint from the AWS environment), kafka://host:port[,host:port…]/TOPIC for "
         "Apache Kafka (security settings from the environment: docs/kafka.md); absent, the embedded SQLite log in "
         "the data directory (or GAMESTREAM_LOG).",
)

tables_option = click.option(
    "--tables", "tables_uri", type=str, default=None, metavar="URI",
    help="Where the tables live: a folder, or s3://bucket/prefix (credentials, region and endpoint from the "
         "standard AWS environment: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL, "
         "AWS_ALLOW_HTTP); default <data-dir>/tables (or GAMESTREAM_TABLES).",
)
unsafe_writes_option = click.option(
    "--unsafe-no-conditional-writes", "unsafe_no_conditional_writes", is_flag=True, default=None,
    help="Start even though the object store failed the conditional-write probe (If-None-Match: *). Safe only "
         "when a single process ever writes the tables.",
)


def with_options(options):
    """Applies a list of click options as one decorator, in the order listed."""
    def decorate(function):
        for option in reversed(options):
            function = option(function)
        return function
    return decorate


def command_settings(**options: object) -> Settings:
    """The settings for a command: its options over the environment (None: not given)."""
    try:
        return Settings.from_env(**options)
    except ValueError as error:  # a setting out of its range, from the environment: one line, not a traceback
        raise click.UsageError(str(error)) from None


def root_log_format() -> str:
    """The --log-format given to the group (or the setting), for processes this command starts."""
    given = click.get_current_context().find_root().params.get("log_format")
    return given or Settings.from_env().log_format


class DataDirUnusable(RuntimeError):
    """The data directory cannot be created or written: one line for the user, not a traceback."""


def _check_writable(path: Path) -> None:
    """Fails early, in one line naming the path and the reason, when a command that writes cannot."""
    probe = path / f".write-probe-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        reason = error.strerror or str(error)
        raise DataDirUnusable(f"cannot write to the data directory {path.absolute()}: {reason} "
                              f"(choose another with --data-dir or GAMESTREAM_DATA_DIR)") from None


class LogUnreachable(RuntimeError):
    """The log URL names a log that cannot be opened (no server answers, a bad URL): one line, not a traceback."""


def open_log(settings: Settings):
    """The log the settings name (`--log`, GAMESTREAM_LOG, else the embedded one), through `log.connect`, so
    every command reaches the same log the same way."""
    from gamestream.log import connect, describe
    from gamestream.log.sqlite import LogPartitionsMismatch

    try:
        return connect(settings)
    except LogPartitionsMismatch:
        raise
    except Exception as error:
        if not settings.log and unusable_storage(error):
            raise  # the embedded log's storage problems have their own one-line message (main)
        reason = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
        raise LogUnreachable(f"cannot open the event log {describe(settings)}: {type(error).__name__}"
                             f"{': ' + reason if reason else ''}") from error


def check_storage(settings: Settings) -> None:
    """Fails early, in one line, when a command that writes cannot: the data directory (when the log, or the
    tables, or the maintenance lock live there), and an object store holding the tables, which must refuse an
    overwrite (`lake.check_conditional_writes`) unless `--unsafe-no-conditional-writes`."""
    import logging

    from gamestream.tables import lake

    if not settings.log or not lake.is_object_store(settings.tables_root):
        _check_writable(settings.data_dir)
    if not lake.is_object_store(settings.tables_root):
        return
    try:
        lake.check_conditional_writes(settings.tables_root)
    except lake.ConditionalWritesUnsupported:
        if not settings.unsafe_no_conditional_writes:
            raise
        logging.getLogger("gamestream.tables.lake").warning(
            "the object store failed the conditional-write probe; going on (--unsafe-no-conditional-writes): "
            "concurrent writers of these tables can lose commits", extra={"tables": settings.tables_root})


def check_writable_for_log(settings: Settings) -> None:
    """Commands that only append to the log need the data directory only when the log lives there."""
    if not settings.log:
        _check_writable(settings.data_dir)


_STORAGE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOENT}
_STORAGE_MESSAGES = ("permission denied", "read-only file system", "no space left", "readonly database",
                     "unable to open database file", "disk is full", "disk quota")


def unusable_storage(error: BaseException) -> str | None:
    """One line for an error that means "this path cannot be read or written" (a read-only or full disk,
    missing permissions), from the OS, SQLite or delta-rs; None for anything else."""
    if isinstance(error, OSError) and error.errno in _STORAGE_ERRNOS:
        where = f" {error.filename}" if error.filename else ""
        return f"cannot use{where}: {error.strerror or error}"
    text = str(error)
    lowered = text.lower()
    if any(message in lowered for message in _STORAGE_MESSAGES):
        first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
        return f"cannot use the data directory ({type(error).__name__}: {first[:300]})"
    return None

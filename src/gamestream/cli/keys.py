"""The keys a server takes (`serve`, `demo`): their options, and what the server says and refuses about them.
Keys are counted, never shown."""

from __future__ import annotations

from pathlib import Path

import click

from gamestream.cli.common import console
from gamestream.settings import Settings

api_key_options = [
    click.option("--api-key", "api_key", multiple=True, help="A write key (repeatable); or GAMESTREAM_API_KEYS."),
    click.option("--admin-key", "admin_key", multiple=True,
                 help="A key for POST /v1/sql (repeatable); or GAMESTREAM_ADMIN_KEYS."),
    click.option("--api-keys-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
                 help="A file with one write key per line."),
    click.option("--host", default=None, help="Address to listen on (default 127.0.0.1). Any other address "
                                              "needs keys, or --insecure-no-auth."),
    click.option("--insecure-no-auth", is_flag=True, default=None,
                 help="Listen on a non-loopback address with no keys (anyone reaching the port can write and "
                      "read everything); warns at every start."),
]


def api_keys_from(api_key: tuple[str, ...], api_keys_file: Path | None) -> tuple[str, ...] | None:
    """The write keys given by --api-key and --api-keys-file (blank lines and # comments skipped)."""
    keys = list(api_key)
    if api_keys_file is not None:
        keys += [line.strip() for line in api_keys_file.read_text().splitlines()
                 if line.strip() and not line.startswith("#")]
    return tuple(keys) or None  # None: fall back on GAMESTREAM_API_KEYS


def refuse_open_exposure(settings: Settings) -> None:
    """Exit 2 before binding when the server would be reachable from elsewhere with no key (auth.py)."""
    from gamestream.ingest.auth import exposure_problem

    problem = exposure_problem(settings)
    if problem:
        from rich.text import Text

        console.print(Text.assemble(("error: ", "red"), problem))
        raise SystemExit(2)


def announce_keys(settings: Settings) -> None:
    """Says how the server is protected; counts keys, never shows one."""
    import logging

    from gamestream.ingest.auth import is_loopback

    if settings.keys_configured and not settings.admin_keys:
        console.print("no admin key configured: the dashboard and POST /v1/sql are refused (--admin-key)")
    if settings.api_keys:
        console.print(f"write keys: {len(settings.api_keys)} configured; requests need "
                      "'Authorization: Bearer <key>' or 'X-API-Key'")
    elif not is_loopback(settings.host):
        logging.getLogger("gamestream.ingest.auth").warning(
            "listening on %s with no write key (--insecure-no-auth): anyone who can reach the port can send "
            "events%s", settings.host, "" if settings.admin_keys else ", read every table and run maintenance",
            extra={"host": settings.host})
        console.print(f"[bold red]warning:[/] listening on {settings.host} without keys (--insecure-no-auth)",
                      highlight=False)
    else:
        console.print(f"no API keys configured: open to local clients only ({settings.host}); "
                      "--api-key / --admin-key (or GAMESTREAM_API_KEYS / GAMESTREAM_ADMIN_KEYS) protect it",
                      highlight=False)

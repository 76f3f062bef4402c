"""Who may do what, and the rule that keeps an open server off the network.

Two kinds of keys (docs/security.md): write keys let a client send events; admin keys let it read (dashboard,
SQL) and maintain. With no key of either kind configured everything is open — acceptable only while the
server listens on a loopback address, so `exposure_problem` refuses any other address unless the operator
says `--insecure-no-auth`. Keys are compared in constant time and never logged or echoed.
"""

from __future__ import annotations

import hmac
import ipaddress
import socket

from gamestream.settings import Settings


def is_loopback(host: str) -> bool:
    """Whether every address `host` stands for is a loopback address (127.0.0.0/8, ::1, `localhost`).
    The wildcard addresses (0.0.0.0, ::, "") are not: they listen on every interface."""
    host = host.strip().strip("[]")
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def exposure_problem(settings: Settings) -> str | None:
    """Why the collector must not start as configured, or None. An open server (no write key, no admin key)
    is allowed on loopback only, or with the explicit `insecure_no_auth`."""
    if settings.keys_configured or settings.insecure_no_auth or is_loopback(settings.host):
        return None
    return (f"refusing to listen on {settings.host} with no keys configured: anyone who can reach this port "
            "could send events, read every table through SQL and the dashboard, and run maintenance.\n"
            "Set keys:  --api-key KEY (write events) and --admin-key KEY (dashboard, SQL), or the environment "
            "variables GAMESTREAM_API_KEYS / GAMESTREAM_ADMIN_KEYS (comma-separated), or --api-keys-file FILE.\n"
            "To run open anyway (a trusted network only), pass --insecure-no-auth.")


def key_matches(presented: str | None, keys: list[bytes] | tuple[bytes, ...]) -> bool:
    """Whether `presented` is one of `keys`, compared in constant time (every key is compared, so the time
    taken does not tell which key nearly matched)."""
    if not presented:
        return False
    given = presented.encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key)
    return matched

"""The country of an event, from the client's address — without keeping the address.

The collector (`POST /v1/events` and the vendor routes) and the Lambda handler ask `CountryResolver.country`
once per request, with the address the request came from and its `X-Forwarded-For` header, and stamp the answer
on every event of the request as `geo_country` (`schema.GEO_COUNTRY`, an ISO 3166-1 alpha-2 code, or null). The
address is held only while the request is handled: it is not written to the log, a table, a log line, an error
message or a metric, and no cache keeps it (docs/privacy.md).

Which address is the client's (`CountryResolver.client_address`):

1. the direct peer (the TCP connection's address; the Lambda's `requestContext` source IP);
2. when, and only when, the peer is one of the configured trusted proxies (`Settings.geo_trusted_proxies`:
   addresses or networks), `X-Forwarded-For` (or, with `Settings.geo_forwarded_header = "forwarded"`, the `for=`
   values of RFC 7239's `Forwarded`, and then only those) is walked from the right — the end a trusted proxy
   appended to —
   skipping addresses that are trusted proxies too; the first one that is not is the client. Everything to its
   left was written by the client itself (or by proxies we do not know) and is never believed. A header that
   holds every hop trusted gives its leftmost address;
3. a header that cannot be read (an entry that is not an address, `unknown`, an obfuscated name, more than
   `MAX_FORWARDED_HOPS` trusted hops) is ignored as a whole: the client is the peer. A request is never refused
   for its header.

Which country: an address that is not globally routable (private, loopback, link-local, carrier-grade NAT,
documentation and reserved ranges; an IPv4-mapped IPv6 address counts as its IPv4 address) has none; any other
is looked up in

- the data bundled with the `iptocc` package (by default): the five Regional Internet Registries' delegation
  files, refreshed with each release of the package — the country a block is *registered* to, which agrees with
  MaxMind's location for ~95 % of IPv4 addresses (the package's own note); or
- the operator's MaxMind DB file (`Settings.geo_mmdb`: GeoLite2 / GeoIP2 Country or City, or any database
  whose records carry `country.iso_code` — DB-IP's and IPinfo's country databases do), read by MaxMind's
  `maxminddb` reader, memory-mapped, and opened again when the file changes (geoipupdate replaces it in place).

A code that is not two ASCII letters is no code (null). A database that cannot be opened is `GeoDataError` at
start, with the path and the reason.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

# Imported here, not where used: the Lambda's deployment zip takes the distributions that importing the handler
# loads (`integrations.aws.package_lambda`).
import iptocc
import maxminddb

from gamestream.errors import TerminalError
from gamestream.settings import Settings, trusted_networks

logger = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_FORWARDED_HOPS = 32
"""Trusted hops walked in one X-Forwarded-For before the header is given up (the peer is the client then): a
real chain of proxies is a handful long, and a header of thousands of trusted-looking entries must not cost a
parse each."""
X_FORWARDED_FOR = "x-forwarded-for"
"""The default forwarding header (`Settings.geo_forwarded_header`; the other is RFC 7239's `forwarded`)."""
RELOAD_CHECK_S = 60.0
"""How often an opened MaxMind DB file is looked at (its mtime, size and inode) to open it again when replaced."""
# MaxMind DB types that hold no country (a GeoLite2-ASN file configured by mistake would stamp nothing, silently)
_NO_COUNTRY_TYPES = ("ASN", "ISP", "Domain", "Connection-Type", "Anonymous", "IP-Risk")


class GeoDataError(TerminalError, ValueError):
    """The configured country data cannot be used (a MaxMind DB file missing, unreadable, not a MaxMind DB, or
    one without countries): fix the path or the file, then start again."""


# ----------------------------------------------------------------------------------------------- the lookups
class CountryLookup(Protocol):
    """Where countries come from: an address (globally routable) → an ISO 3166-1 alpha-2 code, or None."""

    description: str
    """What the start-up line says the countries come from."""

    def country(self, address: IPAddress) -> str | None: ...


def _alpha2(code: object) -> str | None:
    """`code` as an upper-case two-letter code, or None when it is not two ASCII letters."""
    if isinstance(code, str) and len(code) == 2 and code.isascii() and code.isalpha():
        return code.upper()
    return None


class BundledLookup:
    """The `iptocc` package's data: RIR delegations, compiled into the package (no file, no network)."""

    def __init__(self) -> None:
        self._country_code = iptocc.country_code
        version = metadata.version("iptocc")
        self.description = (f"iptocc {version} (the Regional Internet Registries' delegation data bundled with the "
                            "package)")

    def country(self, address: IPAddress) -> str | None:
        return _alpha2(self._country_code(_text(address)))


class MmdbLookup:
    """An operator's MaxMind DB file (GeoLite2/GeoIP2 Country or City, or a compatible one), opened again when it
    is replaced (looked at every `RELOAD_CHECK_S`): lookups go on with the old data until the new file opens."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._reader, self._stamp = _open_mmdb(self.path)
        self._next_check = time.monotonic() + RELOAD_CHECK_S
        self.description = _describe_mmdb(self.path, self._reader)

    def country(self, address: IPAddress) -> str | None:
        if time.monotonic() >= self._next_check:
            self._reload_if_replaced()
        try:
            record = self._reader.get(address)
        except ValueError:  # an IPv6 address in an IPv4-only database
            return None
        return _record_country(record)

    def _reload_if_replaced(self) -> None:
        with self._lock:
            if time.monotonic() < self._next_check:
                return  # another thread looked
            self._next_check = time.monotonic() + RELOAD_CHECK_S
            try:
                if _file_stamp(self.path) == self._stamp:
                    return
                reader, stamp = _open_mmdb(self.path)
            except (OSError, GeoDataError) as error:  # being replaced, or broken: keep the data we have
                logger.warning("the MaxMind DB file changed but cannot be opened again; countries come from the "
                               "data opened before", extra={"mmdb": str(self.path), "reason": str(error)})
                return
            self._reader, self._stamp = reader, stamp
            self.description = _describe_mmdb(self.path, reader)
            logger.info("MaxMind DB file opened again", extra={"mmdb": self.description})


def _file_stamp(path: Path) -> tuple[int, int, int]:
    status = os.stat(path)
    return status.st_ino, status.st_size, status.st_mtime_ns


def _open_mmdb(path: Path) -> tuple[Any, tuple[int, int, int]]:
    """A reader of the file at `path` and the file's stamp; `GeoDataError` saying why it cannot be one."""
    where = f"the MaxMind DB file {path} ([geo] mmdb, GAMESTREAM_GEO_MMDB)"
    try:
        stamp = _file_stamp(path)
        reader = maxminddb.open_database(str(path), maxminddb.MODE_AUTO)
    except FileNotFoundError:
        raise GeoDataError(f"{where} does not exist") from None
    except IsADirectoryError:
        raise GeoDataError(f"{where} is a folder, not a file") from None
    except OSError as error:
        raise GeoDataError(f"{where} cannot be read: {error.strerror or error}") from None
    except (maxminddb.InvalidDatabaseError, ValueError) as error:
        raise GeoDataError(f"{where} is not a MaxMind DB file: {error}") from None
    database_type = str(reader.metadata().database_type)
    if any(kind.lower() in database_type.lower() for kind in _NO_COUNTRY_TYPES):
        reader.close()
        raise GeoDataError(f"{where} is a {database_type} database, which holds no countries: give a Country or "
                           "City database (GeoLite2-Country, for instance)")
    return reader, stamp


def _describe_mmdb(path: Path, reader: Any) -> str:
    meta = reader.metadata()
    built = time.strftime("%Y-%m-%d", time.gmtime(meta.build_epoch))
    return f"{path} ({meta.database_type}, built {built})"


def _record_country(record: object) -> str | None:
    """The country of a MaxMind DB record: GeoIP2's `country.iso_code`, else `registered_country.iso_code` (an
    anycast or satellite block with no location), else a flat `country_code` or `country` (IPinfo's and home-made
    databases)."""
    if not isinstance(record, Mapping):
        return None
    for key in ("country", "registered_country"):
        value = record.get(key)
        if isinstance(value, Mapping) and (code := _alpha2(value.get("iso_code"))) is not None:
            return code
    return _alpha2(record.get("country_code")) or _alpha2(record.get("country"))


# ------------------------------------------------------------------------------------------- the addresses
def parse_address(text: str) -> IPAddress | None:
    """An IPv4 or IPv6 address written alone (no port), or None. IPv4 and IPv6 through `inet_pton` (a few times
    faster than `ipaddress` parsing text: this runs once per request)."""
    try:
        return ipaddress.IPv4Address(socket.inet_pton(socket.AF_INET, text))
    except (OSError, ValueError, TypeError):
        pass
    try:
        return ipaddress.IPv6Address(socket.inet_pton(socket.AF_INET6, text))
    except (OSError, ValueError, TypeError):
        pass
    try:  # what inet_pton does not take: an IPv6 zone (fe80::1%eth0)
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _forwarded_hop(entry: str) -> IPAddress | None:
    """One X-Forwarded-For entry as an address: `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1`, `[2001:db8::1]` or
    `[2001:db8::1]:443`, spaces around it allowed; None for anything else (`unknown`, a name, garbage)."""
    entry = entry.strip()
    if entry.startswith("["):
        inside, bracket, port = entry[1:].partition("]")
        if not bracket or (port and not (port[0] == ":" and port[1:].isdigit())):
            return None
        return parse_address(inside)
    if entry.count(":") == 1:  # IPv4 with a port (an IPv6 address has at least two colons)
        host, _, port = entry.partition(":")
        return parse_address(host) if port.isdigit() else None
    return parse_address(entry)


def _unmapped(address: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address (`::ffff:1.2.3.4`, what a dual-stack socket reports) as its IPv4 address."""
    if address.version == 6 and address.ipv4_mapped is not None:  # type: ignore[union-attr]
        return address.ipv4_mapped  # type: ignore[union-attr]
    return address


def _text(address: IPAddress) -> str:
    """The address written as usual (`inet_ntop`: a few times faster than `str`, which runs once a request)."""
    return socket.inet_ntop(socket.AF_INET if address.version == 4 else socket.AF_INET6, address.packed)


class TrustedProxies:
    """The configured proxies (`Settings.geo_trusted_proxies`), as integer ranges per IP version: a membership
    test is a few comparisons (`address in network` costs about a µs per network)."""

    def __init__(self, entries: tuple[str, ...] | list[str] = ()) -> None:
        self.networks: tuple[IPNetwork, ...] = trusted_networks(tuple(entries))
        self._ranges: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
        for network in self.networks:
            self._ranges[network.version].append((int(network.network_address), int(network.broadcast_address)))

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __contains__(self, address: IPAddress) -> bool:
        address = _unmapped(address)
        value = int(address)
        return any(low <= value <= high for low, high in self._ranges[address.version])

    def __str__(self) -> str:
        return ", ".join(map(str, self.networks))


@lru_cache(maxsize=16)
def trusted_proxies(entries: tuple[str, ...] = ()) -> TrustedProxies:
    """`TrustedProxies` of `entries`, made once per configuration; `ValueError` naming an entry that is neither an
    address nor a network."""
    return TrustedProxies(entries)


def _hops(forwarded: str, header: str) -> list[str | None]:
    """The client-side hops a forwarding header lists, in order: X-Forwarded-For's comma-separated entries, or
    the `for=` value of each element of RFC 7239's `Forwarded` (`for=192.0.2.60;proto=http, for="[2001:db8::1]"`,
    quotes and backslash escapes removed); None for an element that names no `for`."""
    if header == X_FORWARDED_FOR:
        return forwarded.split(",")
    hops: list[str | None] = []
    for element in forwarded.split(","):
        value = None
        for pair in element.split(";"):
            name, equals, raw = pair.strip().partition("=")
            if equals and name.strip().lower() == "for":
                raw = raw.strip()
                if len(raw) >= 2 and raw[0] == raw[-1] == '"':
                    raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
                value = raw
        hops.append(value)
    return hops


def client_address(peer: str | None, forwarded_for: str | None, trusted: TrustedProxies,
                   header: str = X_FORWARDED_FOR) -> IPAddress | None:
    """The client's address: the `peer`'s, or — from a peer in `trusted` — the rightmost address of
    `forwarded_for` (all of a request's lines of the forwarding `header` joined by commas, in order: X-Forwarded-For
    or RFC 7239's Forwarded, `_hops`) not in `trusted`; the peer's when that header is absent or cannot be read.
    None without a readable peer address."""
    address = parse_address(peer) if peer else None
    if address is None or not forwarded_for or not trusted or address not in trusted:
        return address
    hops = _hops(forwarded_for, header)
    for walked, entry in enumerate(reversed(hops)):
        hop = _forwarded_hop(entry) if entry is not None else None
        if hop is None or walked >= MAX_FORWARDED_HOPS:
            return address  # a header we cannot read: the proxy we trust is all we know
        if hop not in trusted or walked == len(hops) - 1:
            return hop
    return address


def _scope_peer(scope: Mapping[str, Any], trusted: TrustedProxies,
                header: str = X_FORWARDED_FOR) -> tuple[str | None, str | None]:
    """An ASGI HTTP request's peer address and, when proxies are trusted, its lines of the forwarding `header`
    joined (ASGI header names are lower case)."""
    client = scope.get("client")
    peer = client[0] if client else None
    forwarded_for = None
    if trusted and peer:
        wanted = header.encode()
        values = [value for name, value in scope.get("headers", ()) if name == wanted]
        if values:
            forwarded_for = b",".join(values).decode("latin-1")
    return peer, forwarded_for


def client_address_of_scope(scope: Mapping[str, Any], trusted: TrustedProxies,
                            header: str = X_FORWARDED_FOR) -> IPAddress | None:
    """`client_address` for an ASGI HTTP request (the forget audit's "from where")."""
    return client_address(*_scope_peer(scope, trusted, header), trusted, header)


# ------------------------------------------------------------------------------------------- the resolver
@dataclass(frozen=True)
class CountryResolver:
    """A request's country from its peer and X-Forwarded-For (see the module docstring)."""

    lookup: CountryLookup
    trusted: TrustedProxies = field(default_factory=TrustedProxies)
    header: str = X_FORWARDED_FOR  # the forwarding header the trusted proxies write (`Settings.geo_forwarded_header`)

    def client_address(self, peer: str | None, forwarded_for: str | None = None) -> IPAddress | None:
        """`client_address` with this resolver's trusted proxies and forwarding header."""
        return client_address(peer, forwarded_for, self.trusted, self.header)

    def country(self, peer: str | None, forwarded_for: str | None = None) -> str | None:
        """The client's country (`client_address`), or None for no address, one that is not globally routable,
        or one the data does not place."""
        address = self.client_address(peer, forwarded_for)
        if address is None:
            return None
        address = _unmapped(address)
        if not address.is_global:
            return None
        return self.lookup.country(address)

    def country_of_scope(self, scope: Mapping[str, Any]) -> str | None:
        """`country` for an ASGI HTTP request: its `client` and, from a trusted peer only, its forwarding header's
        lines (the headers are not read otherwise)."""
        return self.country(*self.peer_of_scope(scope))

    def peer_of_scope(self, scope: Mapping[str, Any]) -> tuple[str | None, str | None]:
        """What `country` of an ASGI HTTP request depends on: its peer address and, from a trusted peer only, its
        forwarding header's lines joined."""
        return _scope_peer(scope, self.trusted, self.header)


def resolver_for(settings: Settings) -> CountryResolver | None:
    """The resolver `settings` configure, None when `geo_country` is off; built once per configuration (the
    MaxMind DB file opened once). `GeoDataError` when the configured file cannot be used; `ValueError` for a
    trusted proxy that is not an address or network."""
    if not settings.geo_country:
        return None
    return _resolver(settings.geo_mmdb and Path(settings.geo_mmdb).absolute(), tuple(settings.geo_trusted_proxies),
                     settings.geo_forwarded_header)


@lru_cache(maxsize=8)
def _resolver(mmdb: Path | None, trusted: tuple[str, ...], header: str) -> CountryResolver:
    lookup: CountryLookup = MmdbLookup(mmdb) if mmdb is not None else BundledLookup()
    return CountryResolver(lookup, trusted_proxies(trusted), header)


def describe(settings: Settings) -> str:
    """One line for the start-up message: where countries come from, and which proxies are trusted."""
    resolver = resolver_for(settings)
    if resolver is None:
        return "country lookup off (geo_country stays null)"
    name = "X-Forwarded-For" if resolver.header == X_FORWARDED_FOR else "Forwarded"
    proxies = f"{name} trusted from {resolver.trusted}" if resolver.trusted else f"{name} not trusted"
    return f"country from the client's address: {resolver.lookup.description}; {proxies}"

"""The one settings object. Every command builds it from its options, falling back on GAMESTREAM_* environment
variables, then on the defaults below (docs/configuration.md lists them all)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

if TYPE_CHECKING:
    from ipaddress import IPv4Network, IPv6Network

TABLES = ("events", "events_quarantine", "kpi_events_hourly", "kpi_bookings_hourly", "kpi_daily", "kpi_retention",
          "kpi_top_events", "kpi_activity", "kpi_devices", "kpi_device_segments", "kpi_daily_segments",
          "kpi_retention_segments", "audit", "event_ids", "alerts")

KPI_PARTS = "kpi_parts"
"""The folder under the tables root that holds each log partition's copy of the KPI tables (partitioned KPIs)."""


def kpi_part_table(part: int, name: str) -> str:
    """The name of partition `part`'s copy of KPI table `name`: `kpi_parts/p<part>/<name>`."""
    return f"{KPI_PARTS}/p{part}/{name}"


@dataclass(frozen=True)
class Settings:
    data_dir: Path = Path("gamestream-data")
    """Where the log and the tables live (`--data-dir`, GAMESTREAM_DATA_DIR)."""
    partitions: int | None = None
    """Log partitions; fixed when the log is created (4 unless given). The unit of parallelism for processors.
    None opens an existing log with the count it has."""
    log: str | None = None
    """The event log (`--log`, GAMESTREAM_LOG): None = the embedded SQLite log under `<data_dir>/log`;
    `nats://host:port[,host:port…][?stream=NAME]` = a NATS JetStream stream (default name `gamestream`);
    `kinesis://STREAM` = a Kinesis data stream (AWS settings from the AWS environment);
    `kafka://host:port[,host:port…]/TOPIC` = a Kafka topic (SASL/TLS settings from `GAMESTREAM_KAFKA_CONFIG` or
    the `GAMESTREAM_KAFKA_*` variables, never in the URL: docs/kafka.md)."""
    lease_ttl_s: float = 5.0
    """Scale-out: a processor's ownership of a partition (and the KPI stage's singleton lease) lapses this long
    after its last renewal; another process takes it over then. Whole seconds on NATS."""
    pipeline: str = "gamestream"
    """Names the Delta txn appIds (`<pipeline>-p<partition>`) and the log consumer."""
    batch_max_events: int = 100_000
    """A micro-batch is flushed once it holds this many events…"""
    batch_max_wait_s: float = 0.5
    """…or once its oldest record has waited this long: freshness under load stays under a second."""
    poll_interval_s: float = 0.05
    """How long the processor sleeps when every partition is empty."""
    log_retention_h: float = 24.0
    """Log records are deleted once committed to the table and older than this."""
    commit_retries: int = 20
    """Attempts at a Delta commit that keeps conflicting before the processor gives up."""
    dedupe_days: float = 7.0
    """An eventId lands once per this many days of arrival: a later copy is dropped (the same payload) or
    quarantined (another payload). 0 turns deduplication by eventId off (process/identity.py)."""
    window_minutes: int = 60
    """KPI: tumbling window size on eventTime."""
    watermark_delay_minutes: int = 180
    """KPI: watermark = min over log partitions of (max eventTime seen) minus this (the seed's 180 minutes)."""
    partition_idle_s: float = 300.0
    """KPI: a fully consumed partition with no new record for this long stops holding the watermark back."""
    kpi_interval_s: float = 1.0
    """KPI: how often the stage folds new versions of the events table into the KPI tables."""
    kpi_versions_per_fold: int = 50
    """KPI: at most this many events-table versions are folded per KPI commit…"""
    kpi_rows_per_fold: int = 250_000
    """…and about this many rows (judged by the versions folded so far): bounds a catch-up's memory."""
    kpi_mode: str = "global"
    """KPI: `global` folds every event in one stage (the process holding the `kpi` role); `partitioned` folds
    each log partition's devices where that partition is processed, into tables of its own, and a light merge
    writes the KPI tables (needs a log whose producers route a device to one partition: the embedded log, NATS);
    `auto` chooses partitioned on such a log unless the data directory's KPI tables were folded globally already
    (docs/architecture.md, "KPIs partitioned like the data")."""
    kpi_part_interval_s: float = 5.0
    """KPI, partitioned: while its processor keeps committing, a partition's part stage folds at most this often
    (its fixed cost per fold — a handful of Delta commits — is spread over more rows); once the processor has
    committed nothing for a round, at once."""
    kpi_backlog_interval_s: float = 5.0
    """KPI: while the processor's reads take all they ask for (a backlog), the KPI stage folds (global) or the
    process holding the KPI role merges (partitioned) at most this often, not every `kpi_interval_s`: each fold
    or merge has a fixed cost (a commit per KPI table) that a catch-up would otherwise pay every second. Once a
    read finds the end of the log, every round again."""
    kpi_part_backlog_events: int = 50_000
    """KPI, partitioned: a processor reads no further while the part stages in its process hold this many
    committed events not folded yet per partition it owns; it waits for their folds (which then run at once), so
    the KPI tables stay within about that much of the events table even when the process's CPU is the limit.
    0: never wait."""
    kpi_dimensions: tuple[str, ...] = ()
    """KPI breakdowns (`kpi_daily_segments`, `kpi_retention_segments`): promoted parameters to break the KPIs down
    by, besides the built-in platform, app_version and country. `[kpi] dimensions` in the configuration file."""
    kpi_top_values: int = 50
    """KPI breakdowns: per day (and install cohort) and dimension, the values past this many (by DAU, by cohort
    size) are summed into one `(other)` row. `[kpi] top_values`."""
    kpi_segments: bool = True
    """KPI breakdowns on (False: the stage stops updating the segment tables, saving its CPU). `[kpi] segments`."""
    kpi_offered_max_bytes: int = 256 * 1024 * 1024
    """KPI: the processor hands its commits' rows to the KPI stage in its process up to this much held; beyond
    it (a stage far behind), the stage reads them back from the change data feed."""
    maintenance_interval_s: float = 30.0
    """Automatic maintenance (demo, `process --maintenance`): how often it looks at the tables."""
    target_file_bytes: int = 1024 * 1024 * 1024
    """OPTIMIZE's target file size (1 GiB, as the seed's OPTIMIZE); files under a quarter of it count as small."""
    compact_small_files: int = 16
    """Automatic maintenance compacts a partition once it holds this many small files."""
    checkpoint_every: int = 100
    """Automatic maintenance checkpoints a table every this many versions and cleans up expired log entries."""
    vacuum_every_h: float = 24.0
    """Automatic maintenance vacuums every this many hours…"""
    vacuum_retain_h: float = 168.0
    """…with this retention (7 days, the Delta default)."""
    log_compression: str = "auto"
    """Arrow log records (what `load` and the collector's batch fast path write): `zstd`, `lz4`, `none`, or
    `auto`: none on the embedded log (local disk: bytes are cheap, the processor's CPU is not — decompressing
    ZSTD was ~20 % of `process`; that log stores every payload LZ4-compressed itself), zstd on a NATS or Kinesis
    log (3.5x fewer bytes over the network and in Kinesis' 25 KB payload units)."""
    max_event_bytes: int = 32 * 1024
    """An event over this size is rejected (a whole body may hold many)."""
    max_body_bytes: int = 1024 * 1024
    """Collector: a larger request body (also once gunzipped) gets 413."""
    max_events_per_request: int = 500
    """Collector: more events in one request gets 413."""
    max_backlog_events: int = 5_000_000
    """Collector: above this many unprocessed events in the log, requests get 503 with Retry-After."""
    retry_after_s: int = 1
    """Collector: the Retry-After of a 503."""
    min_free_disk_bytes: int = 100 * 1024 * 1024
    """Collector: /healthz reports unhealthy under this much free disk."""
    api_keys: tuple[str, ...] = ()
    """Collector: write keys (GAMESTREAM_API_KEYS, comma-separated). None: the endpoint is open."""
    admin_keys: tuple[str, ...] = ()
    """Keys for POST /v1/sql (GAMESTREAM_ADMIN_KEYS). With no key of either kind configured, it is open."""
    insecure_no_auth: bool = False
    """Collector: allow a non-loopback --host with no key configured (`--insecure-no-auth`; warns at start)."""
    body_timeout_s: float = 30.0
    """Collector: a request body not received in full within this many seconds gets 408 and the connection
    is closed (a client trickling bytes does not hold a connection for ever)."""
    header_timeout_s: float = 10.0
    """Collector: a connection that has not sent a complete request head within this many seconds of opening
    (or of its previous answer) is closed."""
    max_header_bytes: int = 32 * 1024
    """Collector: a request line plus headers over this size gets 431."""
    max_connections: int = 1024
    """Collector: connections at once; beyond it, requests get 503."""
    drain_max_bytes: int = 64 * 1024 * 1024
    """Collector: an over-limit body is read and discarded up to this size before the 413, so a client that
    writes its whole body before reading gets the answer instead of a connection reset."""
    sql_timeout_s: float = 30.0
    """SQL: a query running longer is interrupted (400 with the reason)."""
    sql_max_rows: int = 100_000
    """SQL: a result with more rows is refused (400 with the reason); aggregate or add a LIMIT."""
    log_format: str = "text"
    """Log lines on stderr: `text` or `json` (one JSON object per line)."""
    workers: int = 1
    """Collector: processes serving the same port (`serve --workers N`)."""
    front: str = "auto"
    """Collector: what serves its socket (`serve --front`, GAMESTREAM_FRONT): `native` (the native front answers
    plain accepted `POST /v1/events` requests in Rust and hands every other request to the app behind it:
    `api.front`, docs/collector.md), `python` (uvicorn alone), or `auto`: native when the native module has it
    (./dev builds it), else python."""
    host: str = "127.0.0.1"
    port: int = 8000
    tables_uri: str | None = None
    """Where all tables live (`--tables`, GAMESTREAM_TABLES): None = `<data_dir>/tables`; a folder; or an object
    store prefix such as `s3://bucket/prefix` (credentials, region and endpoint from the standard AWS
    environment; see `lake.storage_options`)."""
    unsafe_no_conditional_writes: bool = False
    """Start on an object store that failed the conditional-write probe (`--unsafe-no-conditional-writes`): only
    safe when a single process ever writes the tables."""
    tables: dict[str, str] = field(default_factory=dict)
    """Per-table overrides of the location by name (not from the environment); unset ones are
    `<tables_uri>/<name>`."""
    config: Path | None = None
    """The configuration file (`gamestream --config PATH`, GAMESTREAM_CONFIG); None: `<data_dir>/gamestream.toml`
    when that exists. Read by `from_env`."""
    schema_params: tuple[tuple[str, str], ...] = ()
    """Custom parameters promoted to typed columns of `eventParams`: (name, type) pairs from the configuration
    file's `[schema.params]` table, e.g. `level = "int"` (types: `schema.PARAM_TYPES`). Every process that
    validates or writes events (collector, load, processor) must read the same file."""
    compat: tuple[tuple[str, tuple[tuple[str, object], ...]], ...] = ()
    """The vendor protocols' mappings (`[compat.<vendor>]` of the configuration file, `gamestream.compat`):
    (vendor, ((key, value), …)) pairs; a vendor not named maps by its defaults."""
    geo_country: bool = True
    """Collector and Lambda handler: stamp `geo_country` (ISO 3166-1 alpha-2) on each event from the client's
    address, which is never kept (`ingest.geo`, docs/privacy.md); False leaves the column null. `[geo] country`
    in the configuration file, GAMESTREAM_GEO_COUNTRY."""
    geo_mmdb: Path | None = None
    """A MaxMind DB file (GeoLite2/GeoIP2 Country or City) to look countries up in; None: the RIR data bundled
    with the `iptocc` package. `[geo] mmdb` (relative to the configuration file's folder), GAMESTREAM_GEO_MMDB."""
    geo_trusted_proxies: tuple[str, ...] = ()
    """Addresses or networks of the proxies in front of the collector whose X-Forwarded-For is believed (walked
    from the right); from any other peer the header is ignored. `[geo] trusted_proxies`,
    GAMESTREAM_GEO_TRUSTED_PROXIES (comma-separated)."""
    geo_forwarded_header: str = "x-forwarded-for"
    """Which header the trusted proxies append the client's address to: `x-forwarded-for`, or `forwarded`
    (RFC 7239, its `for=` parameters). Only that one is read — the other may hold whatever the client wrote.
    `[geo] forwarded_header`, GAMESTREAM_GEO_FORWARDED_HEADER."""

    def __post_init__(self) -> None:
        if self.log_compression not in ("auto", "none", "lz4", "zstd"):
            raise ValueError(f"log_compression must be auto, zstd, lz4 or none, not {self.log_compression!r}")
        if self.front not in ("auto", "python", "native"):
            raise ValueError(f"front must be auto, native or python, not {self.front!r}")
        from gamestream import schema

        object.__setattr__(self, "schema_params", schema.check_params(self.schema_params))
        trusted_networks(self.geo_trusted_proxies)  # a ValueError naming the entry, at start
        object.__setattr__(self, "geo_forwarded_header", self.geo_forwarded_header.strip().lower())
        if self.geo_forwarded_header not in FORWARDED_HEADERS:
            raise ValueError(f"geo.forwarded_header must be {' or '.join(repr(h) for h in FORWARDED_HEADERS)}, not "
                             f"{self.geo_forwarded_header!r}")
        check_dimensions(self.kpi_dimensions, self.schema_params)
        if self.kpi_top_values < 1:
            raise ValueError(f"kpi top_values must be at least 1, not {self.kpi_top_values}")

    @property
    def segment_dimensions(self) -> tuple[str, ...]:
        """The dimensions the KPIs are broken down by: the built-in ones, then `kpi_dimensions`; none when
        `kpi_segments` is off."""
        if not self.kpi_segments:
            return ()
        return tuple(dict.fromkeys((*BUILTIN_DIMENSIONS, *self.kpi_dimensions)))

    @property
    def record_compression(self) -> str:
        """`log_compression` with `auto` resolved for this log."""
        if self.log_compression != "auto":
            return self.log_compression
        return "zstd" if self.log else "none"

    @classmethod
    def from_env(cls, **overrides: object) -> "Settings":
        """Defaults, then GAMESTREAM_<NAME> variables, then the non-None `overrides` (command-line options)."""
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = os.environ.get(_ENVIRONMENT_NAMES.get(f.name, f"GAMESTREAM_{f.name.upper()}"))
            # per-table overrides come from code (tests), not the env; promoted parameters from the config file
            if raw is None or f.name in ("tables", "schema_params", "compat", "kpi_dimensions"):
                continue
            values[f.name] = _parse(f.type, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "data_dir" in values:
            values["data_dir"] = Path(values["data_dir"])  # type: ignore[arg-type]
        if values.get("config"):
            values["config"] = Path(values["config"])  # type: ignore[arg-type]
        if "schema_params" not in values:
            data_dir = values.get("data_dir", cls.data_dir)
            path = values.get("config") or Path(data_dir) / CONFIG_FILE  # type: ignore[arg-type]
            if values.get("config") or path.is_file():  # type: ignore[union-attr]
                document = load_config(path)  # type: ignore[arg-type]
                values["schema_params"] = config_params(document, path)  # type: ignore[arg-type]
                values.setdefault("compat", config_compat(document, path))  # type: ignore[arg-type]
                for key, value in config_geo(document, path).items():  # the environment's values win
                    values.setdefault(key, value)
                for key, value in config_kpi(document, path).items():
                    values.setdefault(key, value)
        return cls(**values)  # type: ignore[arg-type]

    @property
    def tables_root(self) -> str:
        """The folder or object store prefix that holds every table (absolute when local)."""
        return self.tables_uri or str((self.data_dir / "tables").absolute())

    def table_uri(self, name: str) -> str:
        """Where table `name` lives: its override, else `<tables_root>/<name>` (`table_location`). A partition's
        copy of a KPI table (partitioned KPIs) is named `kpi_parts/p<part>/<name>` (`kpi_part_table`)."""
        if name.startswith(KPI_PARTS + "/"):
            _, part, base = name.split("/", 2)
            if not (part[:1] == "p" and part[1:].isdigit() and base.startswith("kpi_") and base in TABLES):
                raise KeyError(f"unknown table {name!r}")
            return table_location(self.tables_root, name)
        if name not in TABLES:
            raise KeyError(f"unknown table {name!r}; tables are {', '.join(TABLES)}")
        return self.tables.get(name) or table_location(self.tables_root, name)

    def kpi_part_uri(self, part: int, name: str) -> str:
        """Where partition `part`'s own copy of KPI table `name` lives (partitioned KPIs)."""
        return self.table_uri(kpi_part_table(part, name))

    @property
    def small_file_bytes(self) -> int:
        """One definition of a "small" file, for status, the dashboard and automatic compaction: under a
        quarter of OPTIMIZE's target size."""
        return self.target_file_bytes // 4

    @property
    def keys_configured(self) -> bool:
        return bool(self.api_keys or self.admin_keys)

    def with_(self, **changes: object) -> "Settings":
        return replace(self, **changes)  # type: ignore[arg-type]


CONFIG_FILE = "gamestream.toml"
"""The configuration file read from the data directory when no `--config` names one."""


def load_config(path: Path) -> dict:
    """The TOML file at `path`, parsed; `ValueError` saying what is wrong (no such file, not TOML, an unknown
    section or key). The file holds `[schema.params]` (`config_params`) and `[compat.<vendor>]` (`config_compat`)::

        [schema.params]
        level = "int"      # string, int (64-bit), int32, double, bool, timestamp
    """
    import tomllib

    try:
        document = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise ValueError(f"cannot read the configuration file {path}: {error.strerror or error}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"configuration file {path} is not valid TOML: {error}") from None
    unknown = set(document) - {"schema", "compat", "geo", "kpi", "alerting", "alerts"}  # alerts: gamestream.alerts
    section = document.get("schema", {})
    if not unknown and isinstance(section, dict):
        unknown = {f"schema.{key}" for key in set(section) - {"params"}}
    if unknown:
        raise ValueError(f"configuration file {path}: unknown section or key {', '.join(sorted(unknown))} "
                         "(known: [schema.params], [compat.<vendor>], [geo], [kpi], [alerting], [[alerts]])")
    return document


def config_params(document: dict, path: Path) -> tuple[tuple[str, str], ...]:
    """The promoted parameters of a configuration file's `document` (`load_config`); `ValueError` for a
    parameter that clashes with a field of eventParams or an unknown type."""
    from gamestream import schema

    section = document.get("schema", {})
    params = section.get("params", {}) if isinstance(section, dict) else None
    if not isinstance(params, dict):
        raise ValueError(f"configuration file {path}: [schema.params] must be a table of name = \"type\"")
    try:
        return schema.check_params(tuple(params.items()))
    except ValueError as error:
        raise ValueError(f"configuration file {path}: {error}") from None


def config_compat(document: dict, path: Path) -> tuple[tuple[str, tuple[tuple[str, object], ...]], ...]:
    """The `[compat.<vendor>]` tables of a configuration file's `document`, checked by
    `gamestream.compat.check_config`: `ValueError` naming what is wrong."""
    from gamestream import compat

    try:
        return compat.check_config(document.get("compat", {}))
    except ValueError as error:
        raise ValueError(f"configuration file {path}: {error}") from None


def trusted_networks(entries: tuple[str, ...] | list[str]) -> tuple["IPv4Network | IPv6Network", ...]:
    """`geo_trusted_proxies` as networks: each entry an address (`10.0.0.7`, `::1`) or a network (`10.0.0.0/8`);
    `ValueError` naming the entry that is neither."""
    import ipaddress

    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(str(entry).strip(), strict=False))
        except ValueError:
            raise ValueError(f"geo trusted_proxies: {entry!r} is not an IP address or network (such as 10.0.0.0/8 "
                             "or 127.0.0.1)") from None
    return tuple(networks)


BUILTIN_DIMENSIONS = ("platform", "app_version", "country")
"""The KPI breakdowns' built-in dimensions: eventParams.platform, eventParams.app_version and geo_country."""
_SCALAR_PARAM_TYPES = {"string", "int", "int32", "double", "bool"}


def check_dimensions(dimensions: tuple[str, ...], params: tuple[tuple[str, str], ...]) -> None:
    """`ValueError` unless each of `kpi_dimensions` is a built-in dimension or a promoted parameter of a scalar
    type (a breakdown needs one value per event)."""
    types = dict(params)
    for name in dimensions:
        if name in BUILTIN_DIMENSIONS:
            continue
        if name not in types:
            raise ValueError(f"kpi dimensions: {name!r} is not a promoted parameter; promote it in [schema.params] "
                             f"first (promoted: {', '.join(types) or 'none'}), or use one of "
                             f"{', '.join(BUILTIN_DIMENSIONS)}")
        if types[name] not in _SCALAR_PARAM_TYPES:
            raise ValueError(f"kpi dimensions: {name!r} is promoted as {types[name]}; a dimension must be one of "
                             f"{', '.join(sorted(_SCALAR_PARAM_TYPES))}")


_KPI_KEYS = {"dimensions": "kpi_dimensions", "top_values": "kpi_top_values", "segments": "kpi_segments"}


def config_kpi(document: dict, path: Path) -> dict[str, object]:
    """The `[kpi]` table of a configuration file's `document` as Settings values (`dimensions` = ["level"],
    `top_values` = 50, `segments` = true/false); `ValueError` naming what is wrong."""
    section = document.get("kpi", {})
    if not isinstance(section, dict):
        raise ValueError(f"configuration file {path}: [kpi] must be a table")
    unknown = set(section) - set(_KPI_KEYS)
    if unknown:
        raise ValueError(f"configuration file {path}: unknown key {', '.join(f'kpi.{k}' for k in sorted(unknown))} "
                         "(known: dimensions, top_values, segments)")
    values: dict[str, object] = {}
    if "dimensions" in section:
        dimensions = section["dimensions"]
        if not isinstance(dimensions, list) or not all(isinstance(d, str) and d for d in dimensions):
            raise ValueError(f"configuration file {path}: kpi.dimensions must be a list of parameter names, such "
                             'as ["level"]')
        values["kpi_dimensions"] = tuple(dimensions)
    if "top_values" in section:
        top = section["top_values"]
        if not isinstance(top, int) or isinstance(top, bool) or top < 1:
            raise ValueError(f"configuration file {path}: kpi.top_values must be a whole number of at least 1")
        values["kpi_top_values"] = top
    if "segments" in section:
        if not isinstance(section["segments"], bool):
            raise ValueError(f"configuration file {path}: kpi.segments must be true or false")
        values["kpi_segments"] = section["segments"]
    return values


_GEO_KEYS = {"country": "geo_country", "mmdb": "geo_mmdb", "trusted_proxies": "geo_trusted_proxies",
             "forwarded_header": "geo_forwarded_header"}
FORWARDED_HEADERS = ("x-forwarded-for", "forwarded")


def config_geo(document: dict, path: Path) -> dict[str, object]:
    """The `[geo]` table of a configuration file's `document` as Settings values (`country` = true/false,
    `mmdb` = "path" relative to the file's folder, `trusted_proxies` = ["10.0.0.0/8", "127.0.0.1"]);
    `ValueError` naming what is wrong."""
    section = document.get("geo", {})
    if not isinstance(section, dict):
        raise ValueError(f"configuration file {path}: [geo] must be a table")
    unknown = set(section) - set(_GEO_KEYS)
    if unknown:
        raise ValueError(f"configuration file {path}: unknown key {', '.join(f'geo.{k}' for k in sorted(unknown))} "
                         "(known: country, mmdb, trusted_proxies, forwarded_header)")
    values: dict[str, object] = {}
    if "country" in section:
        if not isinstance(section["country"], bool):
            raise ValueError(f"configuration file {path}: geo.country must be true or false")
        values["geo_country"] = section["country"]
    if "mmdb" in section:
        if not isinstance(section["mmdb"], str) or not section["mmdb"]:
            raise ValueError(f"configuration file {path}: geo.mmdb must be the path of a MaxMind DB file")
        values["geo_mmdb"] = Path(path).absolute().parent / Path(section["mmdb"]).expanduser()
    if "trusted_proxies" in section:
        proxies = section["trusted_proxies"]
        if not isinstance(proxies, list) or not all(isinstance(p, str) for p in proxies):
            raise ValueError(f"configuration file {path}: geo.trusted_proxies must be a list of addresses or "
                             'networks, such as ["10.0.0.0/8", "127.0.0.1"]')
        values["geo_trusted_proxies"] = tuple(proxies)
    if "forwarded_header" in section:  # its value is checked with the environment's (`Settings.__post_init__`)
        if not isinstance(section["forwarded_header"], str):
            raise ValueError(f"configuration file {path}: geo.forwarded_header must be the name of a header")
        values["geo_forwarded_header"] = section["forwarded_header"]
    return values


# Settings whose variable is not GAMESTREAM_<FIELD>: the issue and the docs name the tables root GAMESTREAM_TABLES.
_ENVIRONMENT_NAMES = {"tables_uri": "GAMESTREAM_TABLES"}


def _parse(type_name: object, raw: str) -> object:
    kind = str(type_name)
    if kind == "str | None":
        return raw or None
    if kind in ("int", "int | None"):
        return int(raw)
    if kind == "float":
        return float(raw)
    if kind == "bool":
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if kind == "Path":
        return Path(raw)
    if kind == "Path | None":
        return Path(raw) if raw else None
    if kind.startswith("tuple"):
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    return raw


# ------------------------------------------------------------------------------------------- where tables live
def is_object_store(uri: str) -> bool:
    """True for a URL with a scheme other than file:// (s3://, gs://, az://, …): no local path to test, stat or
    lock; reached over the network, with the store's consistency rules."""
    scheme = urlparse(str(uri)).scheme
    return len(scheme) > 1 and scheme != "file"  # a one-letter scheme is a Windows drive, not a URL


def table_location(root: str, name: str) -> str:
    """The URI of table `name` under the tables root `root` (a folder or an object store prefix)."""
    if is_object_store(root):
        return f"{root.rstrip('/')}/{name}"
    return str((Path(str(root).removeprefix("file://")) / name).absolute())

"""What every stage must know of forgotten players, and nothing of how a forget runs (`gamestream.tables.forget`).

- **The hashes**: a device stands for itself only as `sha256(salt + device_id)` (`device_hash`) wherever a forget
  writes; the salt is the `audit` table's property, made once. `hash_predicate` is a Delta predicate on those
  hashes that names no id.
- **The registry**: the `audit` table; `forgotten_hashes` reads every hash ever registered, and
  `ForgottenDevices` is the processor's filter (the events of a forgotten device still in the log are never
  committed again).
- **The KPI stage's view**: a forget's DELETE on `events` carries `FORGET_KEY` in its commit metadata; the KPI
  stage folds that version on its own. `kpi_versions` says how far each KPI table has folded.
- **Change data expiry**: VACUUM leaves a forget's `_change_data` files alone; `expire_change_data` deletes them
  once folded and past the retention (automatic maintenance, `gamestream vacuum`, and a purge call it).

Shared by the processor, the KPI stage, maintenance and the forget operation, so it imports only the tables layer
(`lake`) and the core modules.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import time
from pathlib import Path
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import CommitProperties, DeltaTable
from deltalake.exceptions import CommitFailedError
from prometheus_client import Counter

from gamestream import metrics
from gamestream.settings import KPI_PARTS, TABLES, Settings, is_object_store, kpi_part_table
from gamestream.tables import lake

logger = logging.getLogger(__name__)

SALT_PROPERTY = "gamestream.forget.salt"
FORGET_KEY = "gamestream.forget"
"""Commit metadata of a forget DELETE on `events`: JSON `{"hashes": [...], "audit": "<entry id>"}`."""
DEVICE_COLUMN = "\"eventParams\"['device_id']"
REFRESH_S = 1.0
"""The processor looks for new forgotten devices at most this often (in a flush's build step)."""
AUDIT_STATS_COLUMNS = "entry,step,at"
TS = pa.timestamp("us", tz="UTC")
AUDIT_SCHEMA = pa.schema([
    pa.field("entry", pa.string()),  # one forget request; its steps share it
    pa.field("step", pa.string()),  # registered | deleted | purged
    pa.field("at", TS),
    pa.field("requestedBy", pa.string()),  # user@host, or the admin key's fingerprint; never a key
    pa.field("devices", pa.int32()),
    pa.field("hashes", pa.list_(pa.string())),  # sha256(salt + device_id), hex
    pa.field("eventsDeleted", pa.int64()),
    pa.field("quarantineDeleted", pa.int64()),
    pa.field("versions", pa.string()),  # JSON: per table, version before and after, the forget commits
    pa.field("filesGoneBy", TS),  # when the old files holding the rows are physically gone (at the latest)
])
dropped_events = Counter("gamestream_forgotten_events_dropped",
                         "Events of forgotten devices read from the log and not committed", ["table"],
                         registry=metrics.REGISTRY)


_HEX64 = re.compile(r"^[0-9a-f]{64}$")


# ------------------------------------------------------------------------------------------------ the hashes
def device_hash(salt: str, device_id: str) -> str:
    """The salted hash that stands for a device everywhere a forget writes: `sha256(salt + device_id)`, hex.
    DataFusion computes the same with `encode(sha256(concat(salt, id)), 'hex')` (`hash_predicate`).

    >>> device_hash("00ff", "b")
    'e84f6a88dce41dc29336bd1593bd35a49a79240dc69434c420501a83319c6117'
    """
    return hashlib.sha256((salt + device_id).encode()).hexdigest()


def hash_predicate(salt: str, hashes: list[str], column: str = DEVICE_COLUMN) -> str:
    """A Delta/DataFusion predicate true for the rows whose `column` hashes (with `salt`) to one of `hashes`.
    It names no device id, so it can go into `_delta_log` (a DELETE writes its predicate there in clear).
    A null `column` never matches (an empty id is never forgotten)."""
    if not hashes:
        raise ValueError("no hashes: a predicate over none would match nothing")
    if not re.fullmatch(r"[0-9a-f]+", salt) or not all(_HEX64.match(h) for h in hashes):
        raise ValueError("salt and hashes must be lowercase hex")
    listed = ", ".join(f"'{h}'" for h in sorted(set(hashes)))
    return f"encode(sha256(concat('{salt}', {column})), 'hex') IN ({listed})"


def read_salt(settings: Settings) -> str | None:
    """The deployment's salt (the `audit` table's property), or None while nothing was ever forgotten."""
    uri = settings.table_uri("audit")
    if not lake.table_exists(uri):
        return None
    return lake.open_table(uri).metadata().configuration.get(SALT_PROPERTY)


def open_audit(settings: Settings) -> DeltaTable:
    """The audit table, with its salt: made by whoever first needs it (delta-rs takes only `delta.*` properties
    at creation, so the salt is set by a metadata commit right after; of two racing setters, the one whose commit
    lands is the salt, the other fails its commit and reads it)."""
    table = lake.open_or_create(settings.table_uri("audit"), AUDIT_SCHEMA, None,
                                {"delta.dataSkippingStatsColumns": AUDIT_STATS_COLUMNS})
    for _ in range(10):
        if table.metadata().configuration.get(SALT_PROPERTY):
            return table
        try:
            table.alter.set_table_properties({SALT_PROPERTY: secrets.token_hex(16)}, raise_if_not_exists=False,
                                             commit_properties=CommitProperties(max_commit_retries=0))
        except CommitFailedError:
            pass  # another process set it first
        table.update_incremental()
    raise RuntimeError(f"could not set the salt of {settings.table_uri('audit')}")


def forgotten_hashes(audit: DeltaTable) -> set[str]:
    """Every hash ever registered (a registration counts from step 2: the processor must drop the device's
    events even while the delete is still running, or if it failed and is to be run again)."""
    if audit.version() == 0:
        return set()
    hashes = audit.to_pyarrow_table(columns=["hashes"])["hashes"]
    return set(pc.list_flatten(hashes).to_pylist()) - {None}


# --------------------------------------------------------------------------------------- the processor's filter
class ForgottenDevices:
    """What the processor asks before committing a batch: which of its events belong to forgotten devices.

    Cheap when nothing was forgotten (no audit table: a stat of a folder, or a listing on S3, at most every
    `REFRESH_S`); otherwise the hashes are re-read only when the audit table's version changed, and a batch costs
    one hash per distinct device id in it. Not thread-safe: the processor uses it from its commit thread only.
    """

    def __init__(self, settings: Settings) -> None:
        self.uri = settings.table_uri("audit")
        self._audit: DeltaTable | None = None
        self._salt: str | None = None
        self._version = -1
        self._hashes: frozenset[str] = frozenset()
        self._checked_at = float("-inf")

    def refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked_at < REFRESH_S:
            return
        self._checked_at = now
        if self._audit is None:
            if not lake.table_exists(self.uri):
                return
            self._audit = lake.open_table(self.uri)
        else:
            self._audit.update_incremental()
        if self._salt is None:  # set by the commit right after the table's creation
            self._salt = self._audit.metadata().configuration.get(SALT_PROPERTY)
        if self._audit.version() != self._version:
            self._hashes = frozenset(forgotten_hashes(self._audit))
            self._version = self._audit.version()

    def forgotten_mask(self, device_ids: pa.Array | pa.ChunkedArray) -> pa.Array | None:
        """True where the device is forgotten; None when none is (the common case: nothing to filter)."""
        if not self._hashes or self._salt is None or len(device_ids) == 0:
            return None
        distinct = pc.unique(device_ids).to_pylist()
        gone = [d for d in distinct if d is not None and device_hash(self._salt, d) in self._hashes]
        if not gone:
            return None
        return pc.fill_null(pc.is_in(device_ids, value_set=pa.array(gone, pa.string())), False)

    def drop_events(self, rows: pa.Table) -> pa.Table:
        """`rows` (events-table rows) less those of forgotten devices; the dropped ones are counted, not named."""
        self.refresh()
        if not self._hashes:
            return rows
        mask = self.forgotten_mask(pc.struct_field(rows["eventParams"], "device_id"))
        if mask is None:
            return rows
        kept = rows.filter(pc.invert(mask))
        dropped = rows.num_rows - kept.num_rows
        dropped_events.labels("events").inc(dropped)
        logger.info("events of forgotten devices dropped", extra={"dropped": dropped})
        return kept

    def drop_quarantined(self, rows: pa.Table) -> pa.Table:
        """Quarantine rows less those whose payload parses as an event of a forgotten device (a payload that does
        not parse cannot be matched by a hash: `forget` finds those by the id itself)."""
        self.refresh()
        if not self._hashes or rows.num_rows == 0:
            return rows
        devices = pa.array([payload_device(p) for p in rows["payload"].to_pylist()], pa.string())
        mask = self.forgotten_mask(devices)
        if mask is None:
            return rows
        kept = rows.filter(pc.invert(mask))
        dropped_events.labels("events_quarantine").inc(rows.num_rows - kept.num_rows)
        logger.info("quarantine rows of forgotten devices dropped", extra={"dropped": rows.num_rows - kept.num_rows})
        return kept


def payload_device(text: str | None) -> str | None:
    try:
        event = json.loads(text) if text else None
        device = event["eventParams"]["device_id"]  # type: ignore[index]
    except (ValueError, TypeError, KeyError):
        return None
    return device if isinstance(device, str) else None


def kpi_versions(settings: Settings) -> dict[str, tuple[int, int]]:
    """Per existing KPI table: (its version, the events version folded in: its `<pipeline>-kpi` txn)."""
    app_id = lake.txn_app_id(settings.pipeline, stage="kpi")
    found = {}
    for name in [n for n in TABLES if n.startswith("kpi_")] + kpi_part_tables(settings):
        uri = settings.table_uri(name)
        if lake.table_exists(uri):
            table = lake.open_table(uri)
            found[name] = (table.version(), table.transaction_version(app_id) or 0)
    return found


def kpi_part_tables(settings: Settings, names: tuple[str, ...] | None = None) -> list[str]:
    """The partitions' copies of the KPI tables (partitioned KPIs) that exist: `kpi_parts/p<part>/<name>`, for
    the KPI tables `names` (all by default)."""
    wanted = names or tuple(n for n in TABLES if n.startswith("kpi_"))
    root = settings.tables_root
    if is_object_store(root):
        parts = [p for p in range(settings.partitions or 64)
                 if lake.table_exists(settings.kpi_part_uri(p, "kpi_retention"))]
    else:
        folder = Path(root.removeprefix("file://")) / KPI_PARTS
        parts = sorted(int(d.name[1:]) for d in folder.iterdir()
                       if d.name[:1] == "p" and d.name[1:].isdigit()) if folder.is_dir() else []
    return [kpi_part_table(p, n) for p in parts for n in wanted]



def delete_change_data(events: DeltaTable, uri: str, *, up_to: int) -> int:
    """Deletes the `_change_data` files of every forget commit at or below `up_to` (read from the commits' own
    `cdc` actions); returns how many were there to delete."""
    paths: list[str] = []
    for commit in events.history():
        version = commit.get("version")
        if FORGET_KEY not in commit or version is None or version > up_to:
            continue
        raw = _read_file(uri, f"_delta_log/{version:020d}.json")
        if raw is None:
            continue  # the commit file was cleaned up (log retention); its change data went with VACUUMs since
        for line in raw.splitlines():
            if line.strip():
                cdc = json.loads(line).get("cdc")
                if cdc:
                    paths.append(cdc["path"])
    for path in paths:
        _delete_file(uri, path)
    return len(paths)


def expire_change_data(settings: Settings, *, retention_hours: float, now: float | None = None) -> int:
    """Deletes the `_change_data` files of the forget commits older than `retention_hours` that the KPI stage has
    folded (what `--purge` does at once): VACUUM leaves change data alone, so without this the rows a forget
    rewrote would stay in them for ever. Automatic maintenance and `gamestream vacuum --table events` call it
    with their retention. Returns how many files there were to delete."""
    uri = settings.table_uri("events")
    if not lake.table_exists(uri):
        return 0
    events = lake.open_table(uri)
    folded = max((txn for _, txn in kpi_versions(settings).values()), default=0)
    cutoff = (time.time() if now is None else now) - retention_hours * 3600
    up_to = 0
    for commit in events.history():
        version = commit.get("version")
        if FORGET_KEY in commit and version is not None and version <= folded and (
                commit.get("timestamp", 0) / 1000 <= cutoff):
            up_to = max(up_to, version)
    return delete_change_data(events, uri, up_to=up_to) if up_to else 0


def _read_file(uri: str, key: str) -> bytes | None:
    if lake.is_object_store(uri):
        import obstore
        from obstore.store import from_url

        try:
            return bytes(obstore.get(from_url(uri.rstrip("/") + "/"), key).bytes())
        except FileNotFoundError:
            return None
    path = Path(uri.removeprefix("file://")) / key
    return path.read_bytes() if path.exists() else None


def _delete_file(uri: str, key: str) -> None:
    key = unquote(key)
    if lake.is_object_store(uri):
        import obstore
        from obstore.store import from_url

        obstore.delete(from_url(uri.rstrip("/") + "/"), key)
        return
    (Path(uri.removeprefix("file://")) / key).unlink(missing_ok=True)

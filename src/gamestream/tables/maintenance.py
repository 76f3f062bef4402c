"""Table maintenance against the small-files problem: OPTIMIZE (bin-packing, Z-order), VACUUM, checkpoints —
safe while the processor streams.

- OPTIMIZE rewrites a partition's small files into files of up to `target_size` (1 GiB by default) in a commit
  that changes no data (dataChange=false): readers, the KPI stage (which reads the change data feed) and the
  processor's exactly-once checks are unaffected. It runs partition by partition, so each commit is small and a
  conflict with a concurrent append costs one partition's retry, never blocks ingest.
- VACUUM deletes the files that the table no longer references once their removal is older than the retention
  (7 days by default, the table's `delta.deletedFileRetentionDuration`). A shorter retention is refused unless
  forced, because a reader still running on an older version, or time travel to it, would find its files gone.
- One compactor at a time (`MaintenanceLock`): a lock file (`log/maintenance.lock`) when every writer shares this
  machine; the `maintenance` lease in the NATS key-value bucket when the tables are on object storage and the log
  is NATS, so processes on every machine see it.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import pyarrow as pa
import pyarrow.compute as pc
import stamina
from deltalake import DeltaTable
from deltalake.exceptions import CommitFailedError

from gamestream.settings import Settings
from gamestream.tables import forgotten, lake

if TYPE_CHECKING:
    from gamestream.log.ownership import Ownership

GiB = 1 << 30
DEFAULT_TARGET_SIZE = GiB
DEFAULT_RETENTION_HOURS = 168
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(h|hours?|d|days?)?\s*$", re.IGNORECASE)
_INTERVAL = re.compile(r"interval\s+(\d+)\s+(\w+)", re.IGNORECASE)
logger = logging.getLogger(__name__)


class RetentionTooShort(ValueError):
    """VACUUM with a retention under the table's minimum, without --force."""


def parse_size(text: str) -> int:
    """'1GiB', '512MB', '1048576' → bytes."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (try 1GiB, 256MiB, 134217728)")
    number, unit = float(match[1]), (match[2] or "").upper().rstrip("B").rstrip("I")
    return int(number * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[unit])


def parse_hours(text: str) -> float:
    """'168h', '7d', '12' (hours) → hours."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"not a duration: {text!r} (try 168h or 7d)")
    unit = (match[2] or "h").lower()
    return float(match[1]) * (24 if unit.startswith("d") else 1)


@dataclass
class FileStats:
    files: int = 0
    bytes: int = 0
    partitions: dict[str, tuple[int, int]] = field(default_factory=dict)  # partition → (files, bytes)

    small: int = 0  # files under file_stats' `small_under`

    @property
    def average_bytes(self) -> int:
        return self.bytes // self.files if self.files else 0


def files_by_partition(table: DeltaTable) -> list[tuple[str, int]]:
    """(partition key, size) of every file in the table's current version; the key is the partition values
    joined by '/' (the eventDate for the events table), '' for an unpartitioned table."""
    actions = table.get_add_actions(flatten=True)
    if not actions.num_rows:
        return []
    sizes = actions.column("size_bytes").to_pylist()
    partition_columns = [c for c in actions.column_names if c.startswith("partition.")]
    if not partition_columns:
        return [("", size) for size in sizes]
    keys = ["/".join(str(v) for v in values) for values in zip(*(actions.column(c).to_pylist()
                                                                  for c in partition_columns))]
    return list(zip(keys, sizes))


def file_stats(table: DeltaTable, small_under: int = 0) -> FileStats:
    """Files and bytes in the table's current version, per partition; files under `small_under` bytes count as
    small (pass `Settings.small_file_bytes`, the one definition of "small"; 0 counts none)."""
    stats = FileStats()
    for key, size in files_by_partition(table):
        stats.files += 1
        stats.bytes += size
        stats.small += size < small_under
        files, total = stats.partitions.get(key, (0, 0))
        stats.partitions[key] = (files + 1, total + size)
    return stats


class MaintenanceLock:
    """The one-compactor-at-a-time lock. Two compactors would not corrupt a table (Delta's commit check refuses
    the loser), but they would rewrite the same files twice and fight over every partition.

    - Tables in a local folder, or an embedded log: a flock on `<data_dir>/log/maintenance.lock`; every process
      that can write these tables runs on this machine.
    - Tables on object storage with a NATS or Kafka log (`ownership.shared_across_machines`): processes on any
      machine write them, so a file lock would protect nothing; the lock is the `maintenance` role — a lease in
      the NATS key-value bucket (`LeaseOwnership.claim`), renewed by the ownership's own thread while held,
      lapsing when its holder dies; on Kafka, partition 0 of the role's consumer group (`KafkaGroupOwnership`).
      A pipeline passes its own `ownership`; a command without one (`optimize`, `vacuum`) opens one that holds
      no partition, only the role (`ownership.open_roles`).

    `acquire` returns a handle to `close()` (None when not waiting and another holds the lock).
    """

    def __init__(self, settings: Settings, ownership: "Ownership | None" = None) -> None:
        from gamestream.log.ownership import shared_across_machines

        self.settings = settings
        self.path = settings.data_dir / "log" / "maintenance.lock"
        self.ownership = ownership
        self.uses_lease = lake.is_object_store(settings.tables_root) and shared_across_machines(settings)

    def acquire(self, *, wait: bool) -> object | None:
        if self.uses_lease:
            return self._acquire_lease(wait=wait)
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            handle.close()
            return None
        return handle

    def _acquire_lease(self, *, wait: bool) -> "_LeaseHandle | None":
        from gamestream.log.ownership import MAINTENANCE_ROLE, open_roles

        ownership, opened = self.ownership, False
        if ownership is None:
            ownership = open_roles(self.settings)
            opened = True
        while not ownership.claim(MAINTENANCE_ROLE):
            if not wait:
                if opened:
                    ownership.close()
                return None
            time.sleep(max(self.settings.lease_ttl_s / 3, 0.2))
        return _LeaseHandle(ownership, opened)


class _LeaseHandle:
    """The held `maintenance` lease; `close()` releases it (and the ownership opened for it)."""

    def __init__(self, ownership: "Ownership", opened: bool) -> None:
        self.ownership = ownership
        self.opened = opened

    def close(self) -> None:
        from gamestream.log.ownership import MAINTENANCE_ROLE

        if self.opened:
            self.ownership.close()
        else:
            self.ownership.release_role(MAINTENANCE_ROLE)


# --------------------------------------------------------------------------------------------------- OPTIMIZE
@dataclass
class OptimizeReport:
    table: str
    before: FileStats
    after: FileStats
    partitions_optimized: int
    files_removed: int
    files_added: int
    seconds: float


def _partition_filter(table: DeltaTable, key: str) -> list[tuple[str, str, str]] | None:
    columns = table.metadata().partition_columns
    if not columns:
        return None
    return [(column, "=", value) for column, value in zip(columns, key.split("/"))]


def optimize(
    uri: str,
    *,
    partitions: list[str] | None = None,
    since: str | None = None,
    target_size: int = DEFAULT_TARGET_SIZE,
    zorder: list[str] | None = None,
    retries: int = 20,
    on_partition: Callable[[str, int, int], None] | None = None,
    only_with_at_least: int = 2,
) -> OptimizeReport:
    """Compacts (or Z-orders) the table one partition at a time; returns files and bytes before and after.

    `partitions` / `since` choose partitions by their value (eventDate, YYYY-MM-DD). Partitions already made of
    fewer than `only_with_at_least` files are left alone (bin-packing one file gains nothing) unless Z-ordering.
    `on_partition(key, done, total)` reports progress.
    """
    started = time.monotonic()
    table = lake.open_table(uri)
    before = file_stats(table)
    chosen = [key for key in sorted(before.partitions)
              if _should_optimize(key, before.partitions[key][0], partitions=partitions, since=since, zorder=zorder,
                                  only_with_at_least=only_with_at_least)]
    removed = added = optimized = 0
    for number, key in enumerate(chosen, start=1):
        metrics = _optimize_partition(table, uri, key, target_size=target_size, zorder=zorder, retries=retries)
        removed += metrics["numFilesRemoved"]
        added += metrics["numFilesAdded"]
        optimized += 1 if metrics["numFilesRemoved"] else 0
        if on_partition:
            on_partition(key, number, len(chosen))
    table.update_incremental()
    return OptimizeReport(uri, before, file_stats(table), optimized, removed, added, time.monotonic() - started)


def _should_optimize(key: str, files: int, *, partitions: list[str] | None, since: str | None,
                     zorder: list[str] | None, only_with_at_least: int) -> bool:
    """Whether `optimize` takes the partition `key` of `files` files: chosen by `partitions` / `since`, and worth
    rewriting (Z-ordering, or at least `only_with_at_least` files to bin-pack)."""
    return bool((partitions is None or key in partitions) and (since is None or key >= since)
                and (zorder or files >= only_with_at_least))


def _optimize_partition(table: DeltaTable, uri: str, key: str, *, target_size: int, zorder: list[str] | None,
                        retries: int) -> dict:
    """One partition compacted (or Z-ordered) in one commit; its metrics (`numFilesRemoved`, `numFilesAdded`).
    Raises CommitFailedError when it still conflicts after `retries` attempts."""
    try:
        # an append or another compactor committed first: reload and redo this partition
        for attempt in stamina.retry_context(on=CommitFailedError, attempts=retries, timeout=None,
                                             wait_initial=0.05, wait_max=2.0):
            with attempt:
                if attempt.num > 1:
                    logger.info("OPTIMIZE conflicted with another commit; retrying the partition",
                                extra={"table": uri, "partition": key, "attempt": attempt.num})
                    table.update_incremental()
                filters = _partition_filter(table, key)
                if zorder:
                    metrics = table.optimize.z_order(zorder, partition_filters=filters, target_size=target_size)
                else:
                    metrics = table.optimize.compact(partition_filters=filters, target_size=target_size)
    except CommitFailedError as error:
        raise CommitFailedError(f"OPTIMIZE of partition {key} kept conflicting after {retries} attempts: "
                                f"{error}") from None
    return metrics


# ----------------------------------------------------------------------------------------------------- VACUUM
@dataclass
class VacuumReport:
    table: str
    retention_hours: float
    dry_run: bool
    files: list[str]
    bytes: int | None  # None when the files' sizes cannot be read (object stores)


def minimum_retention_hours(table: DeltaTable) -> float:
    """The table's `delta.deletedFileRetentionDuration` (e.g. 'interval 7 days'), in hours; 168 by default."""
    value = table.metadata().configuration.get("delta.deletedFileRetentionDuration")
    if not value:
        return DEFAULT_RETENTION_HOURS
    match = _INTERVAL.search(value)
    if not match:
        return DEFAULT_RETENTION_HOURS
    amount, unit = int(match[1]), match[2].lower()
    per_unit = {"hour": 1, "hours": 1, "day": 24, "days": 24, "week": 168, "weeks": 168, "minute": 1 / 60,
                "minutes": 1 / 60}
    return amount * per_unit.get(unit, 1)


def vacuum(uri: str, *, retention_hours: float | None = None, dry_run: bool = False,
           force: bool = False) -> VacuumReport:
    """Deletes the files no longer referenced whose removal is older than the retention.

    Refuses (RetentionTooShort) a retention under the table's minimum unless `force`: files a running reader
    or a time-travel query still needs could go. With `dry_run`, lists what would go and deletes nothing.
    """
    table = lake.open_table(uri)
    minimum = minimum_retention_hours(table)
    hours = minimum if retention_hours is None else retention_hours
    if hours < minimum and not force:
        raise RetentionTooShort(
            f"a retention of {hours:g} hours is under this table's minimum of {minimum:g} hours "
            "(delta.deletedFileRetentionDuration). Files removed from the table more recently than that may "
            "still be read: by a query or a stream that started on an older version, or by time travel to it; "
            "deleting them makes those fail. If nothing else reads or writes the table, run again with --force "
            "(the seed's retentionDurationCheck).")
    if hours != int(hours):
        raise ValueError("delta-rs takes whole hours for the retention")
    candidates = table.vacuum(retention_hours=int(hours), dry_run=True, enforce_retention_duration=False)
    size = _local_sizes(uri, candidates)
    if not dry_run and candidates:
        table.vacuum(retention_hours=int(hours), dry_run=False, enforce_retention_duration=False)
    return VacuumReport(uri, hours, dry_run, sorted(candidates), size)


def _local_sizes(uri: str, files: list[str]) -> int | None:
    """The bytes VACUUM frees, from the files themselves; None on an object store (a HEAD per file would cost
    more than the number is worth)."""
    if lake.is_object_store(uri):
        return None
    root = Path(uri.removeprefix("file://"))
    total = 0
    for name in files:
        path = Path(name) if os.path.isabs(name) else root / name
        try:
            total += path.stat().st_size
        except FileNotFoundError:
            pass
    return total


# ------------------------------------------------------------------------------------------ while streaming
class AutoMaintenance:
    """Background maintenance while streaming (on in the demo, `process --maintenance`):

    every `maintenance_interval_s`, under the maintenance lock (skipped when another process holds it),
    1. compact each partition of each table whose small files (under `Settings.small_file_bytes`, a quarter of the target size) reach
       `compact_small_files` — one partition per commit, so ingest waits at most one partition's compaction;
    2. checkpoint a table once `checkpoint_every` versions passed since the last one, and clean up log entries
       older than the table's log retention;
    3. vacuum with the configured retention every `vacuum_every_h` hours.
    """

    def __init__(self, settings: Settings, tables: list[str], ownership: "Ownership | None" = None) -> None:
        self.settings = settings
        self.tables = tables
        self.lock = MaintenanceLock(settings, ownership)
        self.stop_requested = threading.Event()
        self.thread: threading.Thread | None = None
        self.last_checkpoint: dict[str, int] = {}
        self.last_vacuum = time.monotonic()
        self.runs = 0
        self.failed_rounds = 0

    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="maintenance", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stop_requested.set()
        if self.thread:
            self.thread.join()

    def _loop(self) -> None:
        from gamestream import metrics

        logger.info("automatic maintenance started", extra={"interval_s": self.settings.maintenance_interval_s})
        while not self.stop_requested.wait(self.settings.maintenance_interval_s):
            try:
                self.run_once()
            except Exception:  # maintenance must never take ingest down; it retries next round
                self.failed_rounds += 1
                metrics.stage_errors.labels("maintenance").inc()
                logger.exception("maintenance round failed; the next round retries",
                                 extra={"failed_rounds": self.failed_rounds})

    def run_once(self) -> bool:
        """One round; False when another process held the lock."""
        handle = self.lock.acquire(wait=False)
        if handle is None:
            return False
        try:
            small = max(self.settings.small_file_bytes, 1)
            for name in self.tables:
                uri = self.settings.table_uri(name)
                if not lake.table_exists(uri):
                    continue
                table = lake.open_table(uri)
                crowded = self._crowded_partitions(table, small)
                if crowded:
                    report = optimize(uri, partitions=crowded, target_size=self.settings.target_file_bytes)
                    logger.info("compacted %d partition(s)", report.partitions_optimized,
                                extra={"table": name, "files_removed": report.files_removed,
                                       "files_added": report.files_added})
                    table.update_incremental()
                version = table.version()
                if version - self.last_checkpoint.get(name, 0) >= self.settings.checkpoint_every:
                    table.create_checkpoint()
                    table.cleanup_metadata()
                    self.last_checkpoint[name] = version
            if time.monotonic() - self.last_vacuum >= self.settings.vacuum_every_h * 3600:
                if "event_ids" in self.tables:
                    expire_event_ids(self.settings)
                for name in self.tables:
                    uri = self.settings.table_uri(name)
                    if lake.table_exists(uri):
                        swept = vacuum(uri, retention_hours=self.settings.vacuum_retain_h)
                        logger.info("vacuumed %d file(s)", len(swept.files), extra={"table": name})
                        if name == "events":
                            expired = forgotten.expire_change_data(self.settings,
                                                                retention_hours=self.settings.vacuum_retain_h)
                            if expired:
                                logger.info("deleted %d change-data file(s) of forget commits", expired)
                self.last_vacuum = time.monotonic()
            self.runs += 1
            return True
        finally:
            handle.close()

    def _crowded_partitions(self, table: DeltaTable, small: int) -> list[str]:
        counts: dict[str, int] = {}
        for key, size in files_by_partition(table):
            if size < small:
                counts[key] = counts.get(key, 0) + 1
        return [key for key, count in counts.items() if count >= self.settings.compact_small_files]


def expire_event_ids(settings: Settings) -> int:
    """Deletes the rows of `event_ids` (deduplication by eventId, process/identity.py) that arrived before the
    window of `dedupe_days`; the number deleted. VACUUM then removes their files."""
    import math

    uri = settings.table_uri("event_ids")
    if settings.dedupe_days <= 0 or not lake.table_exists(uri):
        return 0
    oldest = dt.datetime.now(dt.timezone.utc).date() - dt.timedelta(days=math.ceil(settings.dedupe_days) - 1)
    table = lake.open_table(uri)
    if not table.to_pyarrow_dataset().count_rows(filter=pc.field("arrivedOn") < pa.scalar(oldest, pa.date32())):
        return 0
    metrics = table.delete(f"arrivedOn < '{oldest.isoformat()}'")
    deleted = int(metrics.get("num_deleted_rows", 0))
    logger.info("deleted %d event id(s) older than the deduplication window", deleted, extra={"oldest": str(oldest)})
    return deleted


def last_operations(table: DeltaTable, limit: int = 1000) -> dict[str, str | None]:
    """When the table was last OPTIMIZEd and VACUUMed (ISO time, UTC), from its history."""
    last: dict[str, str | None] = {"OPTIMIZE": None, "VACUUM": None}
    for commit in table.history(limit=limit):
        operation = str(commit.get("operation", ""))
        for kind in last:
            if last[kind] is None and operation.startswith(kind):
                last[kind] = dt.datetime.fromtimestamp(commit["timestamp"] / 1000, dt.timezone.utc).isoformat()
    return last

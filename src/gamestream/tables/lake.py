"""Delta Lake access: where the tables live, creating them, committing exactly once, and the one retry policy of
every commit.

The one place that knows
- where a table is and how it is reached (`table_location`, `open_table`, `table_exists`, `is_object_store`):
  a local folder, or an object store URL such as `s3://bucket/prefix/events`. Every other module opens tables
  through these, never with a string test of its own;
- whether an object store can be committed to safely (`check_conditional_writes`);
- how a log partition maps to a Delta `txn` appId (`txn_app_id`), and how its committed offset is kept
  (`TxnPositions`: the txn version itself, or a commit counter plus the offset in the same commit);
- which errors of a commit are worth retrying (`CommitRetries`): a conflict with another writer, a bounded number
  of times; a full disk and an unreachable object store, for as long as they last;
- what delta-rs' and object_store's errors mean: they are read here, once (`is_store_unreachable`, `open_table`'s
  `TableMissing`), and surface above this module as `gamestream.errors` classes (`TransientError` when waiting can
  help, `TerminalError` when it cannot, `OffsetsWentBack` for a txn version that would not grow).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping
from urllib.parse import unquote, urlparse

import pyarrow as pa
import stamina
from deltalake import CommitProperties, DeltaTable, Transaction, WriterProperties, write_deltalake
from deltalake.exceptions import CommitFailedError, DeltaError, TableNotFoundError

from gamestream import metrics, schema
from gamestream.errors import (
    OffsetsWentBack,
    TerminalError,
    TransientError,
    is_out_of_space,
)
from gamestream.settings import is_object_store, table_location  # noqa: F401  (defined with Settings)

logger = logging.getLogger(__name__)

# Checkpoint every 100 commits (delta-rs' default too, written down so that it is a decision). The change data
# feed lets the KPI stage read what each commit added (Delta as a streaming source) while skipping OPTIMIZE's
# rewrites; it sets writer version 4, readable by every Delta reader (reader version stays 1).
#
# File statistics (min/max per column in the Delta log) are kept only for columns that cannot hold a player's
# identity: a min/max of `eventParams.device_id` or of a quarantined payload would copy a device id into the
# `_delta_log`, where `gamestream forget` cannot delete it (log entries are never rewritten). Data skipping on
# eventTime (and partition pruning on eventDate) is what queries use.
EVENTS_STATS_COLUMNS = "eventId,eventName,eventTime,eventDate"
QUARANTINE_STATS_COLUMNS = "quarantinedAt,reason,logPartition,logOffset,quarantineDate"
EVENTS_TABLE_CONFIGURATION = {"delta.checkpointInterval": "100", "delta.enableChangeDataFeed": "true",
                              "delta.dataSkippingStatsColumns": EVENTS_STATS_COLUMNS}
QUARANTINE_TABLE_CONFIGURATION = {"delta.dataSkippingStatsColumns": QUARANTINE_STATS_COLUMNS}


# ------------------------------------------------------------------------------------------- where tables live
def storage_options(uri: str) -> dict[str, str] | None:
    """What delta-rs is told about the store besides the URI: nothing. deltalake 1.6.3 (object_store underneath)
    reads the standard AWS environment itself — AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN,
    AWS_REGION, AWS_ENDPOINT_URL, AWS_ALLOW_HTTP — as obstore (the conditional-write probe) does, so the
    commands, the probe and other readers (DuckDB, Polars, Spark; see the README) are configured the same way
    and gamestream keeps no secret of its own. Kept as a function so that, should a store need an option,
    it is added here, once. delta-rs 1.x commits to S3 with a conditional PUT (If-None-Match: *) on
    `_delta_log/N.json`: no DynamoDB lock and no AWS_S3_ALLOW_UNSAFE_RENAME."""
    return None


class TableMissing(TerminalError, LookupError):
    """No Delta table at the location yet (delta-rs' TableNotFoundError, translated here): a processor creates the
    tables on its first run."""


def open_table(uri: str, version: int | None = None) -> DeltaTable:
    """The table at `uri` (a local folder or an object store URL), at `version` or the latest; `TableMissing`
    when there is none."""
    try:
        return DeltaTable(uri, version=version, storage_options=storage_options(uri))
    except TableNotFoundError as error:
        raise TableMissing(f"no Delta table at {uri} ({_first_line(error)})") from None


def table_exists(uri: str) -> bool:
    """Whether a Delta table is at `uri`, without creating anything (a local folder is not made by looking)."""
    if not is_object_store(uri) and not os.path.isdir(str(uri).removeprefix("file://")):
        return False
    return DeltaTable.is_deltatable(uri, storage_options=storage_options(uri))


def same_location(written: str, location: str) -> bool:
    """Whether a path or URL someone wrote (OPTIMIZE '<path>') names the table location `location`: local paths
    (and file:// URLs) are compared resolved — `..` and symlinks followed, a trailing slash ignored, relative to
    the working directory — object store URLs (s3://…) as written, less a trailing slash."""
    def local(text: str) -> str | None:
        if text.lower().startswith("file://"):
            return os.path.realpath(unquote(urlparse(text).path))
        return None if is_object_store(text) else os.path.realpath(text)

    mine, theirs = local(written), local(location)
    if mine is None or theirs is None:
        return mine is None and theirs is None and written.rstrip("/") == location.rstrip("/")
    return mine == theirs


class TableCache:
    """Tables kept open between reads, for the readers that ask again and again (the dashboard every second, each
    SQL query). Opening a table lists `_delta_log/` and reads the last checkpoint and the commits after it; on
    object storage that is a LIST and several GETs per table per read. A cached table is brought up to date
    with `update_incremental()`, which reads only the commits after the version it has (a listing that starts
    after it). Thread-safe: one lock around each update and what is read from the table under it."""

    def __init__(self) -> None:
        self._tables: dict[str, DeltaTable] = {}
        self._lock = threading.Lock()

    def latest(self, uri: str) -> DeltaTable | None:
        """The table at its latest version, or None when there is no table at `uri` yet. The object is shared:
        the caller must serialize its use with other callers of the same cache (or use `dataset`)."""
        with self._lock:
            return self._latest(uri)

    def dataset(self, uri: str):
        """A pyarrow dataset of the table's latest version (independent of later updates), or None."""
        with self._lock:
            table = self._latest(uri)
            return None if table is None else table.to_pyarrow_dataset()

    def _latest(self, uri: str) -> DeltaTable | None:
        table = self._tables.get(uri)
        if table is not None:
            table.update_incremental()
            return table
        if not table_exists(uri):
            return None
        table = self._tables[uri] = open_table(uri)
        return table


class ConditionalWritesUnsupported(TerminalError, RuntimeError):
    """The object store accepted a second create-only PUT of the same key (or refused the first): two writers
    could both write `_delta_log/N.json`, and one commit would silently replace the other."""


class StoreUnreachable(TransientError, RuntimeError):
    """The object store could not be reached (or refused the credentials) at start-up."""


def check_conditional_writes(root: str) -> None:
    """Refuses (ConditionalWritesUnsupported) an object store that cannot refuse an overwrite.

    Delta's commit on object storage is a PUT of `_delta_log/N.json` with `If-None-Match: *`: the store must
    answer 412 to the second writer of N, or two processors committing the same version lose one commit (rows
    and txn offsets with it: not exactly once). Probe: PUT a fresh key under the prefix twice, create-only; the
    first must succeed, the second must fail with "already exists" (412); then delete the key. Through obstore,
    which is object_store as delta-rs uses it, configured from the same environment. A local folder passes.
    """
    if not is_object_store(root):
        return
    import obstore
    from obstore.exceptions import AlreadyExistsError
    from obstore.store import from_url

    store = from_url(root.rstrip("/") + "/")
    key = f"_gamestream_probe/{uuid.uuid4().hex}"
    try:
        obstore.put(store, key, b"conditional write probe", mode="create")
    except Exception as error:
        raise StoreUnreachable(f"cannot write to {root}: {_first_line(error)} (credentials, region and endpoint "
                               "come from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, "
                               "AWS_ENDPOINT_URL, AWS_ALLOW_HTTP)") from None
    try:
        try:
            obstore.put(store, key, b"conditional write probe", mode="create")
        except AlreadyExistsError:
            return  # 412: the store refuses a second creator
        except Exception as error:
            raise ConditionalWritesUnsupported(
                f"{root} did not answer a conditional PUT (If-None-Match: *) as it must: {_first_line(error)}") \
                from None
        raise ConditionalWritesUnsupported(
            f"{root} accepted a second PUT with If-None-Match: * on the same key: it cannot refuse an "
            "overwrite, so two writers of one Delta version would lose a commit. Use a store with conditional "
            "writes (AWS S3, MinIO, SeaweedFS, R2, …), or, if only one process ever writes these tables, "
            "--unsafe-no-conditional-writes")
    finally:
        try:
            obstore.delete(store, key)
        except Exception:  # a probe key left behind is harmless
            pass


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:300]


def txn_app_id(pipeline: str, partition: int | None = None, table: str = "events", *,
               stage: str = "processor") -> str:
    """The Delta txn appId under which a writer records how far it got; every appId is made here.

    - the processor, per log partition: `<pipeline>-p<partition>` on the events table; other tables that commit
      per partition (the quarantine) prefix their own name so the ids never collide;
    - the KPI stage (`stage="kpi"`), one per table: `<pipeline>-kpi`, version = the events version folded in;
    - the Spark job (`stage="spark"`), one per table: `<pipeline>-spark`, version = Spark's batch id + 1;
    - `stage="identity"`: `<pipeline>-identity` on the events table, moved by every events commit when the
      deduplication state is shared by the stream's partitions (process/identity.py), so concurrent ones conflict.

    The writers' ids differ, so one set of tables is written by the processor or by the Spark job, never both."""
    if stage != "processor":
        if stage not in ("kpi", "spark", "identity"):
            raise ValueError(f"unknown writer stage {stage!r}")
        return f"{pipeline}-{stage}"
    if partition is None:
        raise ValueError("the processor's appId names a partition")
    base = f"{pipeline}-p{partition}"
    return base if table == "events" else f"{pipeline}-{table}-p{partition}"


def duplicates_app_id(pipeline: str, partition: int) -> str:
    """The txn appId whose version counts the copies of already-landed eventIds the processor dropped from log
    partition `partition` (`<pipeline>-duplicates-p<partition>` on the events table): a counter committed with the
    rows it concerns, so it is exact after any crash and costs `status` one lookup per partition."""
    return f"{pipeline}-duplicates-p{partition}"


def open_or_create(uri: str, arrow_schema: pa.Schema, partition_by: list[str] | None,
                   configuration: Mapping[str, str] | None = None) -> DeltaTable:
    """Opens the table, creating it (empty, with the schema) when it does not exist yet.

    Two processes may race to create it: the loser finds the winner's table and opens that.
    """
    for _ in range(5):
        try:
            return open_table(uri)
        except TableMissing:
            pass
        try:
            # max_commit_retries=0: the loser of a creation race must fail and open the winner's table, not
            # "retry" its create as a second metadata commit on top of the winner's.
            return DeltaTable.create(uri, schema=arrow_schema, partition_by=partition_by, mode="error",
                                     configuration=dict(configuration or {}),
                                     storage_options=storage_options(uri),
                                     commit_properties=CommitProperties(max_commit_retries=0))
        except DeltaError as error:
            if is_out_of_space(error) or is_store_unreachable(error):
                raise  # not a race: nothing can be created until space is freed
            time.sleep(0.05)  # the other creator's commit is landing; open it on the next round
    return open_table(uri)


def ensure_properties(table: DeltaTable, configuration: Mapping[str, str]) -> DeltaTable:
    """Sets table properties a table created by an older gamestream lacks (a metadata-only commit, once)."""
    present = table.metadata().configuration
    missing = {k: v for k, v in configuration.items() if present.get(k) != v}
    if missing:
        try:
            table.alter.set_table_properties(missing, raise_if_not_exists=False)
        except CommitFailedError:
            table.update_incremental()  # another process set them first
    return table


def open_events(uri: str, params: schema.Params = ()) -> DeltaTable:
    """The events table, created with the configured schema (the promoted `params` inside eventParams), or an
    existing one evolved to hold every column of it (`evolve`): a table made by an older gamestream gains the
    extra columns, one made before a parameter was promoted gains its field."""
    target = schema.arrow_schema(params=params)
    table = open_or_create(uri, target, [schema.PARTITION_COLUMN], EVENTS_TABLE_CONFIGURATION)
    table = ensure_properties(table, {"delta.dataSkippingStatsColumns": EVENTS_STATS_COLUMNS})
    return evolve(table, target, [schema.PARTITION_COLUMN])


class SchemaConflict(TerminalError, ValueError):
    """A configured column is in the table with another type: Delta cannot change a column's type in place."""


def arrow_schema_of(table: DeltaTable) -> pa.Schema:
    """The table's current schema as a pyarrow schema."""
    return pa.schema(table.schema().to_arrow())


def _missing(current: pa.Schema | pa.StructType, target: pa.Schema | pa.StructType, prefix: str = "") -> list[str]:
    """Dotted names of `target`'s fields (nested in structs too) that `current` lacks; `SchemaConflict` for one
    it has with another type."""
    have = {f.name: f.type for f in current}
    missing = []
    for field in target:
        name = prefix + field.name
        if field.name not in have:
            missing.append(name)
        elif pa.types.is_struct(field.type) and pa.types.is_struct(have[field.name]):
            missing += _missing(have[field.name], field.type, name + ".")
        elif have[field.name] != field.type:
            raise SchemaConflict(f"column {name} is {have[field.name]} in the table but configured as {field.type}; "
                                 "a column's type cannot change: promote the parameter under another name")
    return missing


def evolve(table: DeltaTable, target: pa.Schema, partition_by: list[str] | None, attempts: int = 10) -> DeltaTable:
    """Adds to `table` every field of `target` it lacks (top-level columns, and fields inside structs such as a
    promoted `eventParams.level`), nullable: rows written before read null. Never drops or changes a column: a
    field the table has and `target` lacks stays (Delta cannot drop a column without column mapping, and old
    rows may hold values in it).

    How: an append of no rows with `schema_mode="merge"` — a commit that only changes the table's schema (a WRITE
    of 0 files in the history; nothing in the change data feed), which every Delta reader understands (no
    column mapping, no new reader or writer version). Safe when several processes open the table at once: a
    schema change conflicts with a concurrent one, and the loser re-reads the table and finds the fields there
    (or adds what is still missing) — never a second, diverging schema.
    """
    for _ in range(attempts):
        if not _missing(arrow_schema_of(table), target):
            return table
        try:
            write_deltalake(table, target.empty_table(), mode="append", schema_mode="merge",
                            partition_by=partition_by)
        except CommitFailedError:
            time.sleep(0.05)  # another process changed the table first: look again
        table.update_incremental()
    if _missing(arrow_schema_of(table), target):
        raise CommitGaveUp(f"could not add {', '.join(_missing(arrow_schema_of(table), target))} to "
                           f"{table.table_uri} after {attempts} attempts")
    return table


def conform_to(table: DeltaTable, rows: pa.Table) -> pa.Table:
    """`rows` with exactly the columns of `table` as it is now, in its order (`schema.conform`): the table may
    hold columns this process's configuration does not (a parameter promoted elsewhere, or since removed), and
    a table evolved by another process must still take this process's rows. A field the table lacks is not
    dropped: it goes into the extra columns."""
    return schema.conform(rows, arrow_schema_of(table))


def open_quarantine(uri: str) -> DeltaTable:
    table = open_or_create(uri, schema.QUARANTINE_SCHEMA, None, QUARANTINE_TABLE_CONFIGURATION)
    return ensure_properties(table, QUARANTINE_TABLE_CONFIGURATION)


class CommitGaveUp(TransientError, RuntimeError):
    """A commit kept conflicting with other writers past the retry budget."""


class RetryInterrupted(TransientError, RuntimeError):
    """A stop was requested while a commit waited for disk space: it was abandoned, not made. What it would have
    committed is still in the durable log (or, for the KPI stage, still in the events table) and is committed by
    the next run. An object whose commit was interrupted must not be used again: build a new one, which
    recovers its position from the tables."""


# --------------------------------------------------------------------------------------------- retry policy
# Conflicts: another writer committed first; a reload and a new attempt soon after usually win.
CONFLICT_WAIT_INITIAL_S = 0.01
CONFLICT_WAIT_MAX_S = 1.0
# A full disk: wait for an operator (or VACUUM, or the log's trim) to free space, without hammering the disk and
# without making a stop wait long (the wait between attempts is not interruptible).
OUT_OF_SPACE_WAIT_INITIAL_S = 0.1
OUT_OF_SPACE_WAIT_MAX_S = 2.0
OUT_OF_SPACE_REMIND_S = 60.0  # while the disk stays full, a warning this often, not one per attempt

# What object_store (inside delta-rs) says once its own retries (10, a few seconds) gave up on a store that does
# not answer: refused or reset connections, timeouts, a 5xx. A commit that failed so either left nothing visible
# or landed whole (a lost answer to the PUT of N.json): step 1 of `commit_exactly_once` re-reads the txn
# versions, so retrying is safe either way.
_UNREACHABLE_TEXTS = ("error sending request", "connection refused", "connection reset", "operation timed out",
                      "tcp connect error", "dns error", "broken pipe", "service unavailable",
                      "server returned non-2xx status code: 5", "internal error", "slow down")


_OUTAGE_TEXT = {"out_of_space": "the disk is full", "store_unreachable": "the object store is unreachable"}
_OUTAGE_DONE = {"out_of_space": "the disk was full", "store_unreachable": "the object store was unreachable"}


def is_store_unreachable(error: BaseException) -> bool:
    """True for a failure to reach an object store (not for a refusal such as a missing bucket or bad
    credentials, which waiting does not cure)."""
    if isinstance(error, StoreUnreachable):
        return True
    if isinstance(error, (OSError, DeltaError)) and not isinstance(error, CommitFailedError):
        text = str(error).lower()
        return any(marker in text for marker in _UNREACHABLE_TEXTS)
    return False


class CommitRetries:
    """The retry policy of a commit to one table, on stamina: iterate, and run the attempt inside `with attempt:`.

        for attempt in CommitRetries("events", stage="processor", conflicts=20):
            with attempt:
                ...  # re-read the txn versions, build, write

    - `CommitFailedError` (a concurrent writer won): retried with a short exponential backoff, at most
      `conflicts` attempts in all; then `CommitGaveUp`.
    - Out of space (`is_out_of_space`) or an object store that does not answer (`is_store_unreachable`: a
      restart, a network cut): retried for as long as it lasts, backing off to one attempt every
      `OUT_OF_SPACE_WAIT_MAX_S`, until `stop` is set; then `RetryInterrupted`.
    - Anything else propagates at once.

    Every retry counts in `gamestream_commit_retries{table,reason}` and `gamestream_stage_errors{stage}` and is
    logged: a conflict at INFO; a full disk at WARNING once per episode (and every `OUT_OF_SPACE_REMIND_S` while
    it lasts), each further attempt at DEBUG, and the recovery at INFO. `context` (partitions, offsets, version)
    goes into every record; never a row.
    """

    def __init__(self, table: str, *, stage: str, conflicts: int, stop: threading.Event | None = None,
                 context: Mapping[str, object] | None = None) -> None:
        self.table = table
        self.stage = stage
        self.max_conflicts = max(1, conflicts)
        self.stop = stop
        self.context = dict(context or {})
        self.conflicts = 0
        self.out_of_space = 0
        self._episode_started: float | None = None
        self._outage_reason: str | None = None  # the kind of the latest outage waited out
        self._last_warning = 0.0

    def __iter__(self) -> Iterator[stamina.Attempt]:
        try:
            for attempt in stamina.retry_context(
                on=self._retry_after, attempts=None, timeout=None, wait_initial=CONFLICT_WAIT_INITIAL_S,
                wait_max=CONFLICT_WAIT_MAX_S, wait_jitter=CONFLICT_WAIT_INITIAL_S,
            ):
                yield attempt
        except CommitFailedError as error:
            logger.error("commit kept conflicting; giving up", extra=self._extra(attempt=self.conflicts))
            raise CommitGaveUp(f"gave up after {self.conflicts} conflicting commit attempts on "
                               f"{self.table}") from error
        except BaseException as error:
            reason = _outage(error)
            if reason and self.stop is not None and self.stop.is_set():
                logger.warning("stop requested while %s: commit abandoned, to be made by the next run",
                               _OUTAGE_TEXT[reason], extra=self._extra(attempt=self.out_of_space))
                raise RetryInterrupted(f"stopped while {_OUTAGE_TEXT[reason]}, before committing to "
                                       f"{self.table}") from error
            raise
        if self._episode_started is not None:
            logger.info("commit made after %s", _OUTAGE_DONE[self._outage_reason or "out_of_space"],
                        extra=self._extra(attempts=self.out_of_space + 1,
                                          waited_s=round(time.monotonic() - self._episode_started, 3)))

    def _retry_after(self, error: Exception) -> bool | float:
        """stamina's hook: False to give up, True for the conflict backoff, seconds for a full disk's."""
        if isinstance(error, CommitFailedError):
            self.conflicts += 1
            if self.conflicts >= self.max_conflicts:
                return False
            self._count("conflict")
            logger.info("commit conflict; reloading and retrying",
                        extra=self._extra(attempt=self.conflicts, error=type(error).__name__))
            return True
        reason = _outage(error)
        if reason is None or (self.stop is not None and self.stop.is_set()):
            return False
        self.out_of_space += 1
        self._outage_reason = reason
        self._count(reason)
        now = time.monotonic()
        what = "disk full" if reason == "out_of_space" else "object store unreachable"
        extra = self._extra(attempt=self.out_of_space, error=type(error).__name__, reason=reason)
        if self._episode_started is None:
            self._episode_started = self._last_warning = now
            logger.warning("%s: commit failed, retrying until it is back", what, extra=extra)
        elif now - self._last_warning >= OUT_OF_SPACE_REMIND_S:
            self._last_warning = now
            logger.warning("%s still: commit still failing", what,
                           extra={**extra, "waited_s": round(now - self._episode_started, 1)})
        else:
            logger.debug("%s: commit retry", what, extra=extra)
        # the exponent is capped: an outage of hours must not overflow the float
        return min(OUT_OF_SPACE_WAIT_INITIAL_S * 2 ** min(self.out_of_space - 1, 16), OUT_OF_SPACE_WAIT_MAX_S)

    def _count(self, reason: str) -> None:  # noqa: D401 - reason: conflict, out_of_space, store_unreachable
        metrics.commit_retries.labels(self.table, reason).inc()
        metrics.stage_errors.labels(self.stage).inc()

    def _extra(self, **fields: object) -> dict[str, object]:
        return {"table": self.table, **self.context, **fields}


def _outage(error: BaseException) -> str | None:
    """The kind of outage that a wait cures, or None: "out_of_space" or "store_unreachable"."""
    if is_out_of_space(error):
        return "out_of_space"
    if is_store_unreachable(error):
        return "store_unreachable"
    return None


@dataclass(frozen=True)
class Batch:
    """What to commit: rows, the txn versions the commit records per appId, and commitInfo metadata that
    becomes visible with them (`TxnPositions`)."""

    rows: pa.Table
    versions: dict[str, int]
    metadata: dict[str, str] | None = None


POSITIONS_KEY = "gamestream.positions"
TXN_VERSION_MAX = 2**63 - 1
# An events commit's greatest eventTime (µs) per log partition it took rows from, as
# ``"gamestream.greatest_event_time": {"<partition>": <µs>}``: the KPI stage's watermark reads a row's real log
# partition from it (a row does not keep its partition, and producers need not route a device to one partition).
GREATEST_TIMES_KEY = "gamestream.greatest_event_time"


def commit_actions(uri: str, versions: Iterable[int]) -> dict[int, list[dict] | None]:
    """The actions of each of `versions` (commitInfo, txn, add, remove, …), read from its
    `_delta_log/<version>.json`; None when that file is gone (cleaned up after a checkpoint). Not
    `DeltaTable.history()`: deltalake 1.6.3 lists the newest commits in the store but numbers them from the
    snapshot's own version, so on a table another process has committed to since it was loaded, its entries carry
    the wrong versions."""
    from deltalake.fs import DeltaStorageHandler

    handler = DeltaStorageHandler(uri, storage_options(uri))
    found: dict[int, list[dict] | None] = {}
    for version in versions:
        try:
            data = handler.open_input_file(f"_delta_log/{version:020d}.json").read()
        except FileNotFoundError:
            found[version] = None
            continue
        found[version] = [json.loads(line) for line in data.splitlines() if line.strip()]
    return found


def commit_info_of(actions: list[dict]) -> dict | None:
    """The commitInfo among a commit's actions (`commit_actions`)."""
    return next((a["commitInfo"] for a in actions if "commitInfo" in a), None)


def txn_app_ids_in(actions: list[dict]) -> set[str]:
    """The txn appIds a commit's actions set (which log partitions a processor's commit moved)."""
    return {a["txn"]["appId"] for a in actions if "txn" in a}


def commit_infos(uri: str, versions: Iterable[int]) -> dict[int, dict | None]:
    """The commitInfo of each of `versions` (None when its commit file is gone), from `commit_actions`."""
    return {v: commit_info_of(actions) if actions is not None else None
            for v, actions in commit_actions(uri, versions).items()}


def txn_app_ids_of(uri: str, versions: Iterable[int]) -> dict[int, set[str] | None]:
    """The txn appIds each of `versions` set (None when its commit file is gone), from `commit_actions`."""
    return {v: txn_app_ids_in(actions) if actions is not None else None
            for v, actions in commit_actions(uri, versions).items()}


def stamp_greatest_times(greatest: dict[int, int]) -> dict[str, str]:
    """The commitInfo metadata recording `greatest` (partition → greatest eventTime, µs)."""
    return {GREATEST_TIMES_KEY: json.dumps({str(p): t for p, t in sorted(greatest.items())}, separators=(",", ":"))}


def greatest_times_of(commit: dict) -> dict[int, int] | None:
    """The greatest eventTime per partition a commit (a `DeltaTable.history()` entry) recorded; None for a commit
    that recorded none (one by an older gamestream, or by another writer)."""
    raw = commit.get(GREATEST_TIMES_KEY)
    if raw is None:
        return None
    try:
        entries = json.loads(raw) if isinstance(raw, str) else raw
        return {int(p): int(t) for p, t in entries.items()}
    except (ValueError, TypeError, AttributeError):
        return None  # not ours


class TxnPositions:
    """Where a table keeps each log partition's committed offset.

    Offsets that fit a Delta txn version (int64: the SQLite and NATS logs) *are* the version. Longer ones cannot:
    a Kinesis sequence number has up to 56 digits. For those (`counted=True`) the txn version counts the
    partition's commits, and the offset rides in the same commit's commitInfo, as
    ``"gamestream.positions": {"<appId>": [<version>, "<offset>"]}``. Both are in one `_delta_log/N.json`, so
    they become visible together or not at all: a crash between any two steps neither loses nor duplicates, and
    a writer still checks the version it read before committing, exactly as with plain offsets.

    Reading an offset back (`offset_at`) looks up the commit that set that version: in this object's memory
    when it made it, else in the table's history, newest first. The history must still hold that commit:
    Delta keeps commit files for `delta.logRetentionDuration` (30 days) after a checkpoint — a partition not
    committed to for longer than that cannot be resumed, and says so (a closed Kinesis shard is drained by then).
    """

    def __init__(self, *, counted: bool) -> None:
        self.counted = counted
        self._known: dict[tuple[str, int], int] = {}  # (appId, version) → offset
        self._lock = threading.Lock()

    def offsets(self, table: DeltaTable, app_ids: list[str]) -> dict[str, int]:
        """The committed offset per appId as `table` sees it (0 when never committed)."""
        versions = committed_versions(table, app_ids)
        return {app_id: self.offset_at(table, app_id, version) for app_id, version in versions.items()}

    def offset_at(self, table: DeltaTable, app_id: str, version: int) -> int:
        if not self.counted or version == 0:
            return version
        with self._lock:
            if (app_id, version) in self._known:
                return self._known[(app_id, version)]
        seen = 0
        for limit in (100, 1000, None):
            commits = table.history(limit)
            for commit in commits[seen:]:
                self._learn(commit.get(POSITIONS_KEY))
            with self._lock:
                if (app_id, version) in self._known:
                    return self._known[(app_id, version)]
            if limit is None or len(commits) < limit:
                break
            seen = len(commits)
        raise RuntimeError(f"txn {app_id} is at commit {version} on {table.table_uri}, but no commit in the "
                           "table's history records its log position (the commit files were cleaned up: the "
                           "partition was idle longer than delta.logRetentionDuration)")

    def stamp(self, versions: dict[str, int], offsets: dict[str, int]) -> tuple[dict[str, int], dict[str, str]]:
        """The txn versions and commitInfo metadata of a commit that moves each appId of `offsets` there from
        the committed `versions`."""
        if not self.counted:
            for app_id, offset in offsets.items():
                if offset > TXN_VERSION_MAX:
                    raise ValueError(f"log offset {offset} of {app_id} does not fit a Delta txn version: this log "
                                     "needs counted positions (TxnPositions(counted=True))")
            return dict(offsets), {}
        new = {app_id: versions.get(app_id, 0) + 1 for app_id in offsets}
        return new, {POSITIONS_KEY: json.dumps({a: [new[a], str(o)] for a, o in offsets.items()},
                                               separators=(",", ":"))}

    def remember(self, metadata: dict[str, str] | None) -> None:
        """After a commit with `metadata` succeeded: its positions need no history lookup."""
        if metadata:
            self._learn(metadata.get(POSITIONS_KEY))

    def _learn(self, raw: object) -> None:
        if not raw:
            return
        try:
            entries = json.loads(raw) if isinstance(raw, str) else raw
            learned = {(str(a), int(v)): int(o) for a, (v, o) in entries.items()}
        except (ValueError, TypeError, AttributeError):
            return  # not ours
        with self._lock:
            self._known.update(learned)


def positions_for(log: object) -> TxnPositions:
    """Plain offsets, or counted ones for a log whose offsets can exceed int64 (`long_offsets`, Kinesis)."""
    return TxnPositions(counted=log.long_offsets)


def committed_versions(table: DeltaTable, app_ids: list[str]) -> dict[str, int]:
    """The txn version per appId as `table` sees it (0 when the appId never committed)."""
    return {app_id: table.transaction_version(app_id) or 0 for app_id in app_ids}


def commit_exactly_once(
    table: DeltaTable,
    app_ids: list[str],
    build: Callable[[dict[str, int]], Batch | None],
    *,
    partition_by: list[str] | None,
    retries: int,
    name: str | None = None,
    stage: str = "processor",
    stop: threading.Event | None = None,
    context: Mapping[str, object] | None = None,
    writer_properties: WriterProperties | None = None,
) -> int | None:
    """Appends what `build` makes of the not-yet-committed input, once, and returns the new table version
    (None when everything was already committed). `writer_properties`: the Parquet writer's (delta-rs'
    defaults when None).

    Steps, in order, on every attempt:
    1. Read `transaction_version(appId)` from `table`, the same DeltaTable object that writes in step 3.
    2. `build(versions)` returns only rows whose log offsets are above those versions, and the new versions.
       delta-rs accepts a repeated or lower txn version without complaint: this check is what makes it once.
    3. Write the rows with a txn action per appId in the same commit: the rows and the offsets that produced
       them become visible together, or not at all.
    4. On a commit conflict (at most `retries` attempts) or a full disk (until space is freed, or `stop` is set),
       reload the table and go back to step 1: another writer may have committed some of the same offsets
       meanwhile, and a failed attempt may have committed after all (its post-commit checkpoint failed).

    What a failed attempt leaves behind is harmless: Parquet files that no commit references (VACUUM deletes
    them), and at most a temporary commit file; `_delta_log/N.json` appears whole or not at all (delta-rs writes
    a temporary file and links it into place only if N is still free), so readers never see half a commit.
    The policy (`CommitRetries`) names the table `name` in metrics and logs (default: the URI's last part).
    """
    label = name or table.table_uri.rstrip("/").rsplit("/", 1)[-1]
    made: int | None = None
    for attempt in CommitRetries(label, stage=stage, conflicts=retries, stop=stop, context=context):
        with attempt:
            if attempt.num > 1:
                table.update_incremental()  # step 4
            made = _attempt_commit(table, app_ids, build, partition_by, writer_properties)
    return made


def _attempt_commit(table: DeltaTable, app_ids: list[str], build: Callable[[dict[str, int]], Batch | None],
                    partition_by: list[str] | None, writer_properties: WriterProperties | None = None
                    ) -> int | None:
    """Steps 1 to 3 of `commit_exactly_once`, once."""
    versions = committed_versions(table, app_ids)  # step 1
    batch = build(versions)  # step 2
    if batch is None:
        return None
    for app_id, version in batch.versions.items():
        # Offsets only grow: a version at or below the committed one means step 2 was wrong.
        if version <= versions.get(app_id, 0):
            raise OffsetsWentBack(f"txn {app_id} would go from {versions.get(app_id, 0)} to {version}")
    write_deltalake(  # step 3
        table,
        batch.rows,
        mode="append",
        partition_by=partition_by,
        commit_properties=CommitProperties(
            app_transactions=[Transaction(app_id, version) for app_id, version in batch.versions.items()],
            custom_metadata=batch.metadata or None,
        ),
        writer_properties=writer_properties,
    )
    return table.version()

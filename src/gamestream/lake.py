"""Delta Lake access: creating the tables, committing exactly once, and the one retry policy of every commit.

The one place that knows how a log partition maps to a Delta `txn` appId (`txn_app_id`), and which errors of a
commit are worth retrying (`CommitRetries`): a conflict with another writer, a bounded number of times, and a
full disk, for as long as it lasts.
"""

from __future__ import annotations

import errno
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import pyarrow as pa
import stamina
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake
from deltalake.exceptions import CommitFailedError, DeltaError, TableNotFoundError

from gamestream import metrics, schema

logger = logging.getLogger(__name__)

# Checkpoint every 100 commits (delta-rs' default too, written down so that it is a decision). The change data
# feed lets the KPI stage read what each commit added (Delta as a streaming source) while skipping OPTIMIZE's
# rewrites; it sets writer version 4, readable by every Delta reader (reader version stays 1).
EVENTS_TABLE_CONFIGURATION = {"delta.checkpointInterval": "100", "delta.enableChangeDataFeed": "true"}


def txn_app_id(pipeline: str, partition: int, table: str = "events") -> str:
    """The Delta txn appId of one log partition: `<pipeline>-p<partition>` on the events table; other tables
    that commit per partition (the quarantine) prefix their own name so the ids never collide."""
    base = f"{pipeline}-p{partition}"
    return base if table == "events" else f"{pipeline}-{table}-p{partition}"


def open_or_create(uri: str, arrow_schema: pa.Schema, partition_by: list[str] | None,
                   configuration: Mapping[str, str] | None = None) -> DeltaTable:
    """Opens the table, creating it (empty, with the schema) when it does not exist yet.

    Two processes may race to create it: the loser finds the winner's table and opens that.
    """
    for _ in range(5):
        try:
            return DeltaTable(uri)
        except TableNotFoundError:
            pass
        try:
            # max_commit_retries=0: the loser of a creation race must fail and open the winner's table, not
            # "retry" its create as a second metadata commit on top of the winner's.
            return DeltaTable.create(uri, schema=arrow_schema, partition_by=partition_by, mode="error",
                                     configuration=dict(configuration or {}),
                                     commit_properties=CommitProperties(max_commit_retries=0))
        except DeltaError as error:
            if is_out_of_space(error):
                raise  # not a race: nothing can be created until space is freed
            time.sleep(0.05)  # the other creator's commit is landing; open it on the next round
    return DeltaTable(uri)


def open_events(uri: str) -> DeltaTable:
    return open_or_create(uri, schema.arrow_schema(), [schema.PARTITION_COLUMN], EVENTS_TABLE_CONFIGURATION)


def open_quarantine(uri: str) -> DeltaTable:
    return open_or_create(uri, schema.QUARANTINE_SCHEMA, None)


class CommitGaveUp(RuntimeError):
    """A commit kept conflicting with other writers past the retry budget."""


class RetryInterrupted(RuntimeError):
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

_OUT_OF_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_OUT_OF_SPACE_TEXTS = ("no space left on device", "disk quota exceeded", "database or disk is full",
                       f"os error {errno.ENOSPC})", f"os error {errno.EDQUOT})")


def is_out_of_space(error: BaseException) -> bool:
    """True for a write that failed because the file system is full (or over quota): Python's OSError, delta-rs'
    DeltaError ("… No space left on device (os error 28)"), SQLite's SQLITE_FULL. Such a write left nothing
    visible behind (see `commit_exactly_once`), and the same write succeeds once space is freed."""
    if isinstance(error, OSError) and error.errno in _OUT_OF_SPACE_ERRNOS:
        return True
    if isinstance(error, sqlite3.Error) and getattr(error, "sqlite_errorname", None) == "SQLITE_FULL":
        return True
    if isinstance(error, (OSError, DeltaError, sqlite3.Error)):
        text = str(error).lower()
        return any(marker in text for marker in _OUT_OF_SPACE_TEXTS)
    return False


class CommitRetries:
    """The retry policy of a commit to one table, on stamina: iterate, and run the attempt inside `with attempt:`.

        for attempt in CommitRetries("events", stage="processor", conflicts=20):
            with attempt:
                ...  # re-read the txn versions, build, write

    - `CommitFailedError` (a concurrent writer won): retried with a short exponential backoff, at most
      `conflicts` attempts in all; then `CommitGaveUp`.
    - Out of space (`is_out_of_space`): retried for as long as it lasts, backing off to one attempt every
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
            if is_out_of_space(error) and self.stop is not None and self.stop.is_set():
                logger.warning("stop requested while the disk is full: commit abandoned, to be made by the "
                               "next run", extra=self._extra(attempt=self.out_of_space))
                raise RetryInterrupted(f"stopped while waiting for disk space to commit to {self.table}") \
                    from error
            raise
        if self._episode_started is not None:
            logger.info("commit made after the disk was full", extra=self._extra(
                attempts=self.out_of_space + 1, waited_s=round(time.monotonic() - self._episode_started, 3)))

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
        if not is_out_of_space(error) or (self.stop is not None and self.stop.is_set()):
            return False
        self.out_of_space += 1
        self._count("out_of_space")
        now = time.monotonic()
        extra = self._extra(attempt=self.out_of_space, error=type(error).__name__)
        if self._episode_started is None:
            self._episode_started = self._last_warning = now
            logger.warning("disk full: commit failed, retrying until space is freed", extra=extra)
        elif now - self._last_warning >= OUT_OF_SPACE_REMIND_S:
            self._last_warning = now
            logger.warning("disk still full: commit still failing",
                           extra={**extra, "waited_s": round(now - self._episode_started, 1)})
        else:
            logger.debug("disk full: commit retry", extra=extra)
        # the exponent is capped: an outage of hours must not overflow the float
        return min(OUT_OF_SPACE_WAIT_INITIAL_S * 2 ** min(self.out_of_space - 1, 16), OUT_OF_SPACE_WAIT_MAX_S)

    def _count(self, reason: str) -> None:
        metrics.commit_retries.labels(self.table, reason).inc()
        metrics.stage_errors.labels(self.stage).inc()

    def _extra(self, **fields: object) -> dict[str, object]:
        return {"table": self.table, **self.context, **fields}


@dataclass(frozen=True)
class Batch:
    """What to commit: rows, and the txn versions (log offsets) the commit records per appId."""

    rows: pa.Table
    versions: dict[str, int]


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
) -> int | None:
    """Appends what `build` makes of the not-yet-committed input, once, and returns the new table version
    (None when everything was already committed).

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
            made = _attempt_commit(table, app_ids, build, partition_by)
    return made


def _attempt_commit(table: DeltaTable, app_ids: list[str], build: Callable[[dict[str, int]], Batch | None],
                    partition_by: list[str] | None) -> int | None:
    """Steps 1 to 3 of `commit_exactly_once`, once."""
    versions = committed_versions(table, app_ids)  # step 1
    batch = build(versions)  # step 2
    if batch is None:
        return None
    for app_id, version in batch.versions.items():
        # Offsets only grow: a version at or below the committed one means step 2 was wrong.
        if version <= versions.get(app_id, 0):
            raise AssertionError(f"txn {app_id} would go from {versions.get(app_id, 0)} to {version}")
    write_deltalake(  # step 3
        table,
        batch.rows,
        mode="append",
        partition_by=partition_by,
        commit_properties=CommitProperties(
            app_transactions=[Transaction(app_id, version) for app_id, version in batch.versions.items()]
        ),
    )
    return table.version()

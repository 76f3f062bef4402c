"""Delta Lake access: creating the tables and committing exactly once.

The one place that knows how a log partition maps to a Delta `txn` appId (`txn_app_id`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Mapping

import pyarrow as pa
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake
from deltalake.exceptions import CommitFailedError, DeltaError, TableNotFoundError

from gamestream import schema

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
        except DeltaError:
            time.sleep(0.05)  # the other creator's commit is landing; open it on the next round
    return DeltaTable(uri)


def open_events(uri: str) -> DeltaTable:
    return open_or_create(uri, schema.arrow_schema(), [schema.PARTITION_COLUMN], EVENTS_TABLE_CONFIGURATION)


def open_quarantine(uri: str) -> DeltaTable:
    return open_or_create(uri, schema.QUARANTINE_SCHEMA, None)


class CommitGaveUp(RuntimeError):
    """A commit kept conflicting with other writers past the retry budget."""


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
) -> int | None:
    """Appends what `build` makes of the not-yet-committed input, once, and returns the new table version
    (None when everything was already committed).

    Steps, in order, on every attempt:
    1. Read `transaction_version(appId)` from `table`, the same DeltaTable object that writes in step 3.
    2. `build(versions)` returns only rows whose log offsets are above those versions, and the new versions.
       delta-rs accepts a repeated or lower txn version without complaint: this check is what makes it once.
    3. Write the rows with a txn action per appId in the same commit: the rows and the offsets that produced
       them become visible together, or not at all.
    4. On a commit conflict or exhausted retries ("Failed to commit transaction: 15"), reload the table and go
       back to step 1: another writer may have committed some of the same offsets meanwhile.
    """
    for attempt in range(retries):
        versions = committed_versions(table, app_ids)  # step 1
        batch = build(versions)  # step 2
        if batch is None:
            return None
        for app_id, version in batch.versions.items():
            # Offsets only grow: a version at or below the committed one means step 2 was wrong.
            if version <= versions.get(app_id, 0):
                raise AssertionError(f"txn {app_id} would go from {versions.get(app_id, 0)} to {version}")
        try:
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
        except CommitFailedError:
            time.sleep(min(0.01 * 2**attempt, 1.0))  # step 4
            table.update_incremental()
    raise CommitGaveUp(f"gave up after {retries} conflicting commit attempts on {table.table_uri}")

"""The KPI tables' commits, exactly once: each with txn `<pipeline>-kpi` = the events version folded in and the
stage's state in its commit metadata, fenced against a stale stage (`KpiStageSuperseded`)."""

from __future__ import annotations

import time

import pyarrow as pa
from deltalake import CommitProperties, DeltaTable, Transaction

from gamestream import metrics
from gamestream.kpi.fold import Fold
from gamestream.kpi.state import STATE_KEY, KpiStageSuperseded
from gamestream.tables import forgotten, lake


class ExactlyOnceCommits:
    """`KpiStage`'s commit of one table (a part of the stage, not a stage of its own)."""

    def _commit(self, name: str, version: int, state_json: str, operation, *, force: bool = False) -> None:
        """Runs `operation(commit_properties)` — a MERGE or DELETE on table `name` — with txn `<pipeline>-kpi` =
        `version`, once: every attempt first re-reads the table's txn version and does nothing when the table
        already has `version` folded in (an earlier attempt may have committed after all). It raises
        `KpiStageSuperseded` when the table's version lies above what this stage has folded (at or above
        `version` too, unless an earlier attempt of this commit may have made it): another stage has been folding
        — the fence against a stale KPI stage, which holds in the race too: two commits with the same txn appId
        conflict in delta-rs, and the retry re-reads the version. (Two stages folding the same versions at once
        — two processes' final folds — would each skip the other's commits while deriving rows from what it
        read before or after them.) Conflicts (a
        concurrent OPTIMIZE of a KPI table) and a full disk are retried by `lake.CommitRetries`; a stop
        requested while the disk is full abandons the fold (`lake.RetryInterrupted`), and the next run re-folds
        from the tables' txn versions."""
        table = self.tables[name]
        started = time.perf_counter()
        committed_now = False
        for attempt in lake.CommitRetries(name, stage="kpi", conflicts=self.settings.commit_retries,
                                          stop=self.stop, context={"version": version}):
            with attempt:
                if attempt.num > 1:
                    table.update_incremental()
                # exactly once: nothing to do when this table already has this version folded in
                committed = table.transaction_version(self.app_id) or 0
                if self.folded[name] < committed and (committed < version or attempt.num == 1):
                    # Our deltas start after `folded[name]`; the table has more than that, not all of ours: added
                    # on top, they would count versions twice; skipped, the rows this stage derives next would
                    # mix its own view with another stage's. (Below `folded[name]` is fine: a fold whose MERGE
                    # source was empty makes no commit, so a table's txn version may lag what was folded.)
                    raise KpiStageSuperseded(f"{name} has events version {committed} folded in by another KPI "
                                             f"stage; this one folded up to {self.folded[name]}")
                if committed < version or (force and committed == version):  # force: absolute rows again
                    operation(table, CommitProperties(app_transactions=[Transaction(self.app_id, version)],
                                                      custom_metadata={STATE_KEY: state_json}))
                    committed_now = True
        self.folded[name] = max(self.folded[name], version)  # (a re-fold skips what a table has)
        if committed_now:
            metrics.commits.labels(name).inc()
            metrics.commit_seconds.labels(name).observe(time.perf_counter() - started)

    def _read_own(self, name: str) -> DeltaTable:
        """Table `name` brought up to date, to read what this stage has committed to it: `KpiStageSuperseded`
        when another stage has committed to it since (its rows are not what this stage's fold builds on)."""
        table = self.tables[name]
        table.update_incremental()
        committed = table.transaction_version(self.app_id) or 0
        if committed > self.folded[name]:
            raise KpiStageSuperseded(f"{name} has events version {committed} folded in by another KPI stage; "
                                     f"this one folded up to {self.folded[name]}")
        return table

    def _merge(self, name: str, source: pa.Table, predicate: str, updates: dict[str, str] | None, version: int,
               state_json: str, *, delete_when: str | None = None, insert_when: str | None = None,
               update_when: str | None = None, force: bool = False) -> None:
        if not source.num_rows:
            return  # nothing to change: no commit (the table's txn lags; `_commit_fold` notes the version)

        def merge(table: DeltaTable, properties: CommitProperties) -> None:
            merger = table.merge(source, predicate=predicate, source_alias="s", target_alias="t",
                                 commit_properties=properties)
            if delete_when:
                merger = merger.when_matched_delete(predicate=delete_when)
            merger = (merger.when_matched_update(updates, predicate=update_when) if updates
                      else merger.when_matched_update_all(predicate=update_when))
            merger.when_not_matched_insert_all(predicate=insert_when).execute()

        self._commit(name, version, state_json, merge, force=force)

    def _merge_insert_only(self, name: str, source: pa.Table, version: int, state_json: str) -> None:
        if not source.num_rows:
            return

        def merge(table: DeltaTable, properties: CommitProperties) -> None:
            table.merge(source, predicate="t.eventDate = s.eventDate AND t.device_id = s.device_id",
                        source_alias="s", target_alias="t", commit_properties=properties
                        ).when_not_matched_insert_all().execute()

        self._commit(name, version, state_json, merge)

    def _delete_devices(self, name: str, fold: Fold, version: int, state_json: str) -> None:
        predicate = forgotten.hash_predicate(forgotten.read_salt(self.settings), fold.forgotten_hashes,
                                          column='"device_id"')
        self._commit(name, version, state_json, lambda table, properties: table.delete(
            predicate, commit_properties=properties))

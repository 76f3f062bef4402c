"""The stages after the log, wired together: processor (log → events) then KPI (events → kpi_*).

The KPI stage runs in one process at a time: the one holding the `kpi` role of the ownership (a lease on NATS,
a lock file on one machine). Every pipeline that does not hold it tries to take it every `kpi_interval_s`, so when
the holder dies another one starts the stage within seconds (a lease's TTL, or at once for a lock file); the new
stage recovers its state from the KPI tables' commit metadata. A stage that loses the role, or finds that another
stage has committed since it last did (`KpiStageSuperseded`), stops and drops its in-memory state.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Callable

import pyarrow.compute as pc

from gamestream.alerts.evaluator import for_pipeline as alert_evaluator
from gamestream.kpi import KpiStage, KpiStageSuperseded
from gamestream.kpi.merge import KpiMerge, merged_up_to
from gamestream.kpi.parts import kpi_partitioned, routes_of
from gamestream.kpi.rows import event_columns, normalise
from gamestream.kpi.tables import TABLES as KPI_TABLES
from gamestream.log import EventLog, LogUnavailable
from gamestream.log.ownership import KPI_ROLE, Ownership, open_ownership
from gamestream.process.processor import Processor, ProcessorStats
from gamestream.settings import TABLES, Settings, kpi_part_table
from gamestream.tables import lake
from gamestream.tables.maintenance import AutoMaintenance

logger = logging.getLogger(__name__)


class Pipeline:
    """Runs the processor and the KPI stage, which folds what the processor committed; `run(until_idle=True)`
    returns only once the KPI tables reflect everything committed."""

    def __init__(self, settings: Settings, log: EventLog, partitions: list[int] | None = None, *,
                 kpi: bool = True, maintenance: bool = False, ownership: Ownership | None = None) -> None:
        """`ownership` defaults to `open_ownership` (leases when `settings.log` is `nats://…`, else lock files on
        `partitions`); the pipeline closes it when `run` returns, also one passed in."""
        self.settings = settings
        self.log = log
        if ownership is not None and partitions is not None:
            raise ValueError("give either partitions or an ownership, not both")
        self.ownership: Ownership = ownership or open_ownership(settings, log.partitions, partitions)
        try:
            self.processor = Processor(settings, log, ownership=self.ownership)
            self.processor.on_commit = self._offer
            self.kpi_enabled = kpi
            self.kpi: KpiStage | None = None  # the running KPI stage, when this process holds the role
            # Partitioned KPIs: a part stage per partition this process owns, and the merge with the role
            self.partitioned = kpi and kpi_partitioned(settings, log)
            # the partitions' copies of the KPI tables are compacted, checkpointed and vacuumed like the others
            copies = [kpi_part_table(p, n) for p in range(log.partitions) for n in KPI_TABLES] if (
                self.partitioned) else []
            self.maintenance = AutoMaintenance(settings, [*TABLES, *copies], self.ownership) if maintenance else None
            # the alert rules of the configuration file, if it has any, under the `alerts` role (gamestream.alerts)
            self.alerts = alert_evaluator(settings, log, self.ownership)
            self.part_stages: dict[int, KpiStage] = {}
            self._folded_at: dict[int, float] = {}  # partition → when its part stage last folded (monotonic)
            self._commits_seen = -1  # the processor's commits at the last round
            self._last_part_fold = 0.0  # when any part stage last folded (monotonic)
            self._last_merge = 0.0  # when this process last merged (monotonic)
            self._last_fold = time.monotonic()  # when the (global) KPI stage last folded, or the pipeline started
            self.merger: KpiMerge | None = None
            self.fold_soon = threading.Event()  # wakes the folding thread before its interval is up
            if self.partitioned and settings.kpi_part_backlog_events > 0:
                self.processor.held_back = self._folds_behind
            if kpi and not self.partitioned:
                self._take_kpi()
        except BaseException:
            self.ownership.close()
            raise

    def _take_kpi(self) -> bool:
        """Starts the KPI stage here if the role is free (or already ours). The stage recovers its state from
        the KPI tables, so it picks up wherever the previous holder committed."""
        if not self.ownership.claim(KPI_ROLE):
            return False
        try:
            # a stop request also ends the KPI stage's wait for disk space, so a SIGTERM is never stuck
            self.kpi = KpiStage(self.settings, self.log, stop=self.processor.stop_requested)
        except BaseException:
            self.ownership.release_role(KPI_ROLE)
            raise
        return True

    def _drop_kpi(self, why: str) -> None:
        logger.warning("KPI stage stops here: %s", why, extra={
            "version": self.kpi.state.version if self.kpi else None})
        self.kpi = None
        self.ownership.release_role(KPI_ROLE)

    def _offer(self, version: int, rows, greatest_times: dict[int, int]) -> None:
        stage = self.kpi
        if stage is not None:
            stage.offer(version, rows, greatest_times)
            if self.processor.reading_backlog():
                self.fold_soon.set()  # folded ahead at once (`KpiStage.prefold`), while the processor reads on
        stages = dict(self.part_stages)
        if stages:  # each part stage is handed its devices' rows, routed once here
            dimensions = self.settings.segment_dimensions
            held = normalise(rows.select(event_columns(dimensions, rows.column_names)), dimensions)
            routes = routes_of(held["device_id"], self.log.partitions)
            for part, part_stage in stages.items():
                part_stage.hold(version, held.filter(pc.equal(routes, part)), greatest_times)
            if self.processor.caught_up():
                self.fold_soon.set()  # the last commit of a backlog: its folds need not wait for the interval

    # ------------------------------------------------------------------------------------ partitioned KPIs
    def _backlog_full(self) -> bool:
        """The part stages here hold `kpi_part_backlog_events` or more committed events per partition (per
        stage) that they have not folded: the same fold size per partition however many a process owns."""
        stages = list(dict(self.part_stages).values())
        return bool(stages) and sum(stage.backlog_rows() for stage in stages) >= (
            self.settings.kpi_part_backlog_events * len(stages))

    def _folds_behind(self) -> bool:
        """The processor's `held_back`: True (and the folds woken) while the part stages' backlog is full. The
        processor then reads nothing, so a process whose CPU is the limit spends it on folding what it committed
        instead of running ahead of its KPIs: they stay within about `kpi_part_backlog_events` per partition of
        its commits."""
        if not self._backlog_full():
            return False
        self.fold_soon.set()
        return True

    def _start_part_stages(self, owned: set[int], *, final: bool = False) -> None:
        """Drops the part stages of partitions not in `owned` and starts those missing (each recovers from its
        partition's tables)."""
        for part in [p for p in self.part_stages if p not in owned]:
            logger.info("KPI part stage stops here: its partition moved", extra={"partition": part})
            del self.part_stages[part]
        for part in sorted(owned - set(self.part_stages)):
            if not final and (not self.ownership.owns(part) or part in self.ownership.surplus()):
                continue  # handed over while the stages before it started
            self.part_stages[part] = KpiStage(self.settings, self.log, stop=self.processor.stop_requested, part=part)

    def _fold_parts(self, *, final: bool = False, every: bool = True) -> None:
        """Folds the partitions this process owns, each in its part stage (started for a partition gained, which
        recovers from that partition's tables; dropped for one lost, whose new owner folds it).

        `final`: the fold after the processor has finished (and released its partitions) folds every partition:
        those another process worked on are caught up over the versions committed since that process last
        folded them (most add none of their devices, and cost a commit file read each), so the process that
        finishes last leaves the KPI tables complete. A process still folding one of them too is fenced off by
        the tables' txn (`KpiStageSuperseded`: its stage starts afresh, at once in a final fold, so the process
        finishing last does leave them complete). `every=False` (a final fold on SIGTERM):
        only the partitions it worked on."""
        if final:
            owned = set(range(self.log.partitions)) if every else set(self.part_stages) | set(
                self.processor.partitions)
        else:
            # not the surplus a processor is about to hand over (many, when it started first and others join)
            owned = set(self.ownership.owned()) - self.ownership.surplus()
        self._start_part_stages(owned, final=final)
        commits = self.processor.stats.commits
        # nothing committed here since the last round, or the processor waits for these folds
        quiet = final or commits == self._commits_seen or self.processor.caught_up() or (
            self.settings.kpi_part_backlog_events > 0 and self._backlog_full())
        self._commits_seen = commits
        now = time.monotonic()
        due = list(self.part_stages.items())
        if not quiet:
            # Busy: one part fold per `kpi_part_interval_s`, the partition folded longest ago. A fold has a fixed
            # cost (a MERGE per KPI table, ~50 ms of CPU), so a process's folds cost the same share of its CPU
            # however many partitions it owns; each partition is folded every interval × partitions owned.
            if now - self._last_part_fold < self.settings.kpi_part_interval_s:
                return
            due = [min(due, key=lambda item: self._folded_at.get(item[0], 0.0))] if due else []
        for part, stage in due:
            self._folded_at[part] = self._last_part_fold = now
            for attempt in range(1, _FINAL_ATTEMPTS + 1):
                try:
                    stage.fold()
                    break
                except KpiStageSuperseded as error:
                    self.part_stages.pop(part, None)
                    if not final or attempt == _FINAL_ATTEMPTS or self.processor.stop_requested.is_set():
                        logger.warning("KPI part stage stops here: %s", error, extra={"partition": part})
                        break
                    # another process's final fold is folding this partition too: start afresh from the tables
                    # (the versions that one committed are skipped, a half-done fold re-derived), after a pause
                    # that makes a second race unlikely
                    logger.info("KPI part stage starts afresh: %s", error, extra={"partition": part})
                    self.processor.stop_requested.wait(random.uniform(0.05, 0.5) * attempt)
                    stage = self.part_stages[part] = KpiStage(self.settings, self.log,
                                                              stop=self.processor.stop_requested, part=part)

    def _merge(self, *, wait_s: float = 0.0) -> bool:
        """The merge round, when this process holds the `kpi` role (taken if free); False when another process
        holds it. `wait_s`: while another process holds it, wait up to this long for the role — or until the KPI
        tables show that process merged everything this one folded (their txn reached it)."""
        deadline = time.monotonic() + wait_s
        folded = min((stage.state.version for stage in self.part_stages.values()), default=0)
        while self.merger is None:
            if self.ownership.claim(KPI_ROLE):
                self.merger = KpiMerge(self.settings, self.log, stop=self.processor.stop_requested)
                break
            if wait_s and merged_up_to(self.settings) >= folded:
                return False  # the holder merged after this process's last folds
            if time.monotonic() >= deadline or self.processor.stop_requested.wait(0.2):
                if wait_s:
                    logger.warning("the KPI role stayed with another process: it merges what this one folded",
                                   extra={"waited_s": wait_s})
                return False
        if not self.ownership.holds(KPI_ROLE):
            self._drop_merger("its lease lapsed (this process was paused or cut off from NATS)")
            return False
        try:
            self.merger.merge()
        except KpiStageSuperseded as error:
            self._drop_merger(str(error))
            return False
        return True

    def _merge_round(self) -> None:
        """The folding thread's merge: every round, except while this process's processor reads a backlog
        (`Processor.reading_backlog`: its reads take all they ask for), when at most every `kpi_backlog_interval_s`.
        A merge round costs the process holding the role a MERGE per KPI table, and while a backlog is read every
        process's part folds move something each round: merging them all at once every few seconds keeps that
        process reading at the others' pace. A live log's reads find less than they ask for: merged every round.
        The read that finds the end of the backlog makes the next round merge."""
        now = time.monotonic()
        if self.processor.reading_backlog() and now - self._last_merge < self.settings.kpi_backlog_interval_s:
            return
        self._last_merge = now
        self._merge()

    def _fold_due(self) -> bool:
        """The global KPI stage's cadence: every round, except while the processor reads a backlog, when at most
        every `kpi_backlog_interval_s` (counted from the pipeline's start) — unless the rows handed to the stage
        fill half its bound (`kpi_offered_max_bytes`), past which it would read them back from the change data
        feed. A fold costs a commit per KPI table whatever its size: a catch-up folded every second pays that
        for KPIs that are behind anyway, and a backlog read within the interval is folded once, at its end.
        A fold waits (up to a round) for what the processor has read to be committed."""
        now = time.monotonic()
        # the end of a backlog folded ahead (`KpiStage.prefold`): until its last commit has landed, not a fold
        # now and another for the last versions at once
        backlog = self.processor.reading_backlog() or (
            self.kpi.folding_ahead and not self.processor.landed_all_read())  # type: ignore[union-attr]
        if backlog and now - self._last_fold < self.settings.kpi_backlog_interval_s \
                and 2 * self.kpi.backlog_bytes() < self.settings.kpi_offered_max_bytes:  # type: ignore[union-attr]
            return False
        # what the processor has read is waited for (up to a round): the commits under way and next would be the
        # next fold's (a backlog's last, a live log's latest) — a fold now would be followed by another at once
        self.processor.wait_until_read_is_committed(self.settings.kpi_interval_s)
        self._last_fold = time.monotonic()
        return True

    def _drop_merger(self, why: str) -> None:
        logger.warning("KPI merge stops here: %s", why)
        self.merger = None
        self.ownership.release_role(KPI_ROLE)

    def _drop_partitioned(self) -> None:
        """Drops every part stage and the merge (their memory may be ahead of their tables after a failure half-way):
        the next round starts them afresh from the tables."""
        self.part_stages.clear()
        if self.merger is not None:
            self.merger = None
            self.ownership.release_role(KPI_ROLE)

    def run(self, *, until_idle: bool = False,
            on_progress: Callable[[ProcessorStats], None] | None = None) -> None:
        """The processor in this thread; the KPI stage in another, folding every `kpi_interval_s` (its work is
        mostly in Arrow and delta-rs, which release the GIL, so the two overlap on two cores), and once more
        after the processor has finished.

        A KPI fold that fails stops the pipeline and is raised here (KPIs must not silently fall behind); one
        abandoned because a stop was requested while the disk was full is not a failure: the next run re-folds
        from the KPI tables' txn versions. Without the KPI role, the same thread tries to take it each interval.
        Every partition and role is released when this returns, so other processes take them over at once."""
        folding = _FoldingThread(self) if self.kpi_enabled else None
        if self.maintenance:
            self.maintenance.start()
        if self.alerts:
            self.alerts.start()
        try:
            if self.partitioned:
                self._first_part_stages()
            if folding:
                folding.start()
            self.processor.run(until_idle=until_idle, on_progress=on_progress)
            if folding:
                folding.finish()  # raises the fold's failure
            if self._should_fold_finally(folding):
                self._final_fold(until_idle=until_idle)
            if self.kpi:
                logger.info("KPI stage stopped", extra={"version": self.kpi.state.version})
        finally:
            if folding:
                folding.done.set()
                self.fold_soon.set()
            if self.maintenance:
                self.maintenance.stop()
            if self.alerts:
                self.alerts.stop()
            self.ownership.close()

    def _first_part_stages(self) -> None:
        """The part stages of the partitions owned at the start, started before the processor reads, so that
        its first commits' rows are handed to them (not read back from the change data feed) and count towards
        `kpi_part_backlog_events`. A log or store out of reach leaves it to the folding rounds."""
        try:
            self._start_part_stages(set(self.ownership.owned()) - self.ownership.surplus())
        except Exception as error:
            if not (isinstance(error, LogUnavailable) or lake.is_store_unreachable(error)):
                raise
            self._drop_partitioned()

    def _should_fold_finally(self, folding: _FoldingThread | None) -> bool:
        """A final fold is due when this process runs the KPI stage, still holds the role, and the folding was
        not abandoned for a stop requested while the disk was full."""
        interrupted = folding is not None and folding.interrupted
        if self.partitioned:
            return not interrupted
        return bool(self.kpi) and not interrupted and self.ownership.holds(KPI_ROLE)

    def _fold_round(self) -> None:
        """One round of the folding thread: takes the KPI role when free (another process may have died), checks
        it is still held, and folds. A stage superseded, a log unavailable or an object store out of reach stops
        the stage here; the next round starts it afresh from the KPI tables."""
        if self.partitioned:
            try:
                self._fold_parts()
                self._merge_round()
            except Exception as error:
                # a log or object store out of reach: start afresh from the tables once it answers
                if not (isinstance(error, LogUnavailable) or lake.is_store_unreachable(error)):
                    raise
                logger.warning("KPI part stages restart from their tables: the log or the object store is "
                               "unreachable", extra={"error": type(error).__name__})
                self._drop_partitioned()
            return
        try:
            if self.kpi is None:
                if not self._take_kpi():
                    return  # another process runs the KPI stage; try again next time (it may die)
                logger.info("KPI stage taken over", extra={"version": self.kpi.state.version})  # type: ignore
            if not self.ownership.holds(KPI_ROLE):
                self._drop_kpi("its lease lapsed (this process was paused or cut off from NATS)")
                return
            if self._fold_due():
                self.kpi.fold()  # type: ignore[union-attr]
            else:  # a backlog: its versions folded as they are committed, their commits made by the next fold
                self.kpi.prefold()  # type: ignore[union-attr]
        except KpiStageSuperseded as error:
            self._drop_kpi(str(error))
        except LogUnavailable as error:
            # A fold interrupted half-way leaves the stage's memory ahead of its tables: start it afresh
            # from the KPI tables' commit metadata once the log answers again (the next round).
            if self.kpi is not None:
                self._drop_kpi(f"the log is unavailable ({error}); restarting from the KPI tables")
            else:
                self.ownership.release_role(KPI_ROLE)
        except Exception as error:
            # The same for an object store out of reach (its reads — the change data feed, a table's new
            # versions — fail outside the commits' retries): start afresh once it answers again.
            if not lake.is_store_unreachable(error):
                raise
            if self.kpi is not None:
                self._drop_kpi("the object store holding the tables is unreachable; restarting from the "
                               "KPI tables once it answers")
            else:
                self.ownership.release_role(KPI_ROLE)
                logger.debug("KPI stage cannot start: the object store is unreachable")

    def _final_fold(self, *, until_idle: bool = True) -> None:
        """The fold after the processor has finished, which makes the KPI tables reflect everything committed
        (what `run(until_idle=True)` promises). A log or object store out of reach is waited out — the stage is
        started afresh from its tables after each failed attempt, as the folding thread does — until it answers
        or a stop is requested (then the next run folds it)."""
        waiting = False
        while True:
            try:
                if self.partitioned:
                    if until_idle:  # every partition, and the merge: the last process to finish completes them
                        self._fold_parts(final=True)
                        self._merge(wait_s=max(120.0, 3 * self.settings.lease_ttl_s))
                    else:  # stopped (SIGTERM): its own partitions; the merge only if the role is free or here
                        self._fold_parts(final=True, every=False)
                        self._merge()
                    return
                if self.kpi is None and not self._take_kpi():
                    return  # another process took the KPI stage meanwhile: it folds
                self.kpi.fold()  # type: ignore[union-attr]
                if waiting:
                    logger.info("final KPI fold made once the tables' store answered again")
                return
            except lake.RetryInterrupted:
                return  # logged by the retry policy; the next run folds it
            except KpiStageSuperseded as error:
                self._drop_kpi(str(error))
                return
            except Exception as error:
                if not (isinstance(error, LogUnavailable) or lake.is_store_unreachable(error)):
                    raise
                if self.processor.stop_requested.is_set():
                    logger.warning("stop requested while the final KPI fold waited for the log or the object "
                                   "store; the next run folds it")
                    return
                if not waiting:
                    logger.warning("final KPI fold: log or object store unreachable; retrying until it answers",
                                   extra={"error": type(error).__name__})
                waiting = True
                self._drop_partitioned()
                if self.kpi is not None:  # a fold stopped half-way: start afresh from the KPI tables
                    self.kpi = None
                    self.ownership.release_role(KPI_ROLE)
                self.processor.stop_requested.wait(1.0)

    def stop(self, *, drain: bool) -> None:
        self.processor.stop(drain=drain)

    def install_signal_handlers(self) -> None:
        self.processor.install_signal_handlers()

    @property
    def stats(self) -> ProcessorStats:
        return self.processor.stats


_FINAL_ATTEMPTS = 8  # a final fold's part stage, started afresh each time another process's fold supersedes it


class _FoldingThread:
    """The pipeline's KPI thread: a fold round (`Pipeline._fold_round`) every `kpi_interval_s` until `finish`.
    A fold abandoned for a stop requested while the disk was full sets `interrupted`; any other failure stops
    the processor (KPIs must not silently fall behind) and is raised by `finish`."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.done = threading.Event()
        self.interrupted = False
        self.failures: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, name="kpi", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def finish(self) -> None:
        """Ends the rounds, waits for the one under way, and raises the failure that stopped them, if any."""
        self.done.set()
        self.pipeline.fold_soon.set()
        self.thread.join()
        if self.failures:
            raise self.failures[0]

    def _run(self) -> None:
        pipeline = self.pipeline
        try:
            while True:
                pipeline.fold_soon.wait(pipeline.settings.kpi_interval_s)  # or sooner, for a processor waiting
                pipeline.fold_soon.clear()
                if self.done.is_set():
                    break
                pipeline._fold_round()
        except lake.RetryInterrupted:
            self.interrupted = True
        except BaseException as error:  # the pipeline stops: KPIs must not silently fall behind
            logger.error("KPI stage failed; stopping the pipeline", exc_info=True)
            self.failures.append(error)
            pipeline.processor.stop(drain=False)

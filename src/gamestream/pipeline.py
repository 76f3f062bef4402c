"""The stages after the log, wired together: processor (log → events) then KPI (events → kpi_*)."""

from __future__ import annotations

import logging
import threading
from typing import Callable

from gamestream import lake
from gamestream.kpi import KpiStage
from gamestream.log import EventLog
from gamestream.processor import PartitionBusy, ProcessLocks, Processor, ProcessorStats
from gamestream.maintenance import AutoMaintenance
from gamestream.settings import TABLES, Settings

logger = logging.getLogger(__name__)


class Pipeline:
    """Runs the processor and the KPI stage, which folds what the processor committed; `run(until_idle=True)`
    returns only once the KPI tables reflect everything committed."""

    def __init__(self, settings: Settings, log: EventLog, partitions: list[int] | None = None, *,
                 kpi: bool = True, maintenance: bool = False) -> None:
        self.settings = settings
        self.processor = Processor(settings, log, partitions)
        self.maintenance = AutoMaintenance(settings, list(TABLES)) if maintenance else None
        # One KPI stage per data directory: with several processors (scale-out) the first one to take the lock
        # runs it; the others only ingest.
        self.kpi: KpiStage | None = None
        self._kpi_lock: ProcessLocks | None = None
        if kpi:
            try:
                self._kpi_lock = ProcessLocks(settings.data_dir / "log", ["kpi"], lambda _: "the KPI stage")
                # a stop request also ends the KPI stage's wait for disk space, so a SIGTERM is never stuck
                self.kpi = KpiStage(settings, log, stop=self.processor.stop_requested)
                self.processor.on_commit = self.kpi.offer
            except PartitionBusy:
                self.kpi = None

    def run(self, *, until_idle: bool = False,
            on_progress: Callable[[ProcessorStats], None] | None = None) -> None:
        """The processor in this thread; the KPI stage in another, folding every `kpi_interval_s` (its work is
        mostly in Arrow and delta-rs, which release the GIL, so the two overlap on two cores), and once more
        after the processor has finished.

        A KPI fold that fails stops the pipeline and is raised here (KPIs must not silently fall behind); one
        abandoned because a stop was requested while the disk was full is not a failure: the next run re-folds
        from the KPI tables' txn versions."""
        failures: list[BaseException] = []
        done = threading.Event()
        interrupted = False

        def fold_until_done() -> None:
            nonlocal interrupted
            try:
                while not done.wait(self.settings.kpi_interval_s):
                    self.kpi.fold()  # type: ignore[union-attr]
            except lake.RetryInterrupted:
                interrupted = True
            except BaseException as error:  # the pipeline stops: KPIs must not silently fall behind
                logger.error("KPI stage failed; stopping the pipeline", exc_info=True)
                failures.append(error)
                self.processor.stop(drain=False)

        folding = threading.Thread(target=fold_until_done, name="kpi", daemon=True) if self.kpi else None
        if self.maintenance:
            self.maintenance.start()
        if folding:
            folding.start()
        try:
            self.processor.run(until_idle=until_idle, on_progress=on_progress)
            done.set()
            if folding:
                folding.join()
            if failures:
                raise failures[0]
            if self.kpi and not interrupted:
                try:
                    self.kpi.fold()
                except lake.RetryInterrupted:
                    pass  # logged by the retry policy; the next run folds it
            if self.kpi:
                logger.info("KPI stage stopped", extra={"version": self.kpi.state.version})
        finally:
            done.set()
            if self.maintenance:
                self.maintenance.stop()
            if self._kpi_lock:
                self._kpi_lock.release()

    def stop(self, *, drain: bool) -> None:
        self.processor.stop(drain=drain)

    def install_signal_handlers(self) -> None:
        self.processor.install_signal_handlers()

    @property
    def stats(self) -> ProcessorStats:
        return self.processor.stats

"""The stages after the log, wired together: processor (log → events) then KPI (events → kpi_*)."""

from __future__ import annotations

import time
from typing import Callable

from gamestream.kpi import KpiStage
from gamestream.log import EventLog
from gamestream.processor import PartitionBusy, ProcessLocks, Processor, ProcessorStats
from gamestream.maintenance import AutoMaintenance
from gamestream.settings import TABLES, Settings


class Pipeline:
    """Runs the processor and, every `kpi_interval_s` after a commit and once more at the end, the KPI stage,
    in one thread: the KPI stage reads what the processor committed, so `run(until_idle=True)` returns only once
    the KPI tables reflect everything committed."""

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
                self.kpi = KpiStage(settings, log)
                self.processor.on_commit = self.kpi.offer
            except PartitionBusy:
                self.kpi = None
        self._last_fold = 0.0

    def run(self, *, until_idle: bool = False,
            on_progress: Callable[[ProcessorStats], None] | None = None) -> None:
        def after_flush(stats: ProcessorStats) -> None:
            if self.kpi and time.monotonic() - self._last_fold >= self.settings.kpi_interval_s:
                self.kpi.fold()
                self._last_fold = time.monotonic()
            if on_progress:
                on_progress(stats)

        if self.maintenance:
            self.maintenance.start()
        try:
            self.processor.run(until_idle=until_idle, on_progress=after_flush)
            if self.kpi:
                self.kpi.fold()
        finally:
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

"""Purges running in the background for `POST /v1/forget` with `"purge": true`, polled at `GET /v1/forget/<entry>`.

A purge waits for the KPI stage to fold the forget commit and for `sql_timeout_s` (docs/privacy.md): half a
minute or more, longer than a client should hold a request. So the request answers 202 Accepted once the rows are
deleted, and the purge runs in a thread of this process; its state is one of `JobState`.

A forget without purge is kept as a job already done, so every entry this process answered can be polled.
A job lives in the process that took the request (the last `KEPT` of them): behind `serve --workers N` a poll can
reach another worker, which answers 404; the audit table holds the outcome either way.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from gamestream.settings import Settings
from gamestream.tables import forget as forgetting

JobState = Literal["running", "done", "failed"]
"""running: the purge has not finished; done: the report says purged; failed: `reason` says why (the rows are
deleted all the same, and `gamestream forget --purge` can be run again)."""
KEPT = 1_000
"""Finished jobs kept for polling, the oldest forgotten first: a poll comes within seconds of the end."""
logger = logging.getLogger(__name__)

Purge = Callable[[Settings, forgetting.ForgetReport], None]


@dataclass
class PurgeJob:
    report: forgetting.ForgetReport
    state: JobState = "running"
    reason: str | None = None

    @property
    def entry(self) -> str:
        return self.report.entry

    def answer(self, settings: Settings) -> dict[str, Any]:
        """The job's state with the audit entry as it stands, and the reason when it failed."""
        reason = {"reason": self.reason} if self.reason is not None else {}
        return {"state": self.state, **self.report.to_dict(), **reason,
                "message": self.report.retention_message(settings)}


class PurgeJobs:
    """The background purges of this process, by audit entry."""

    def __init__(self, settings: Settings, purge: Purge) -> None:
        self.settings = settings
        self._purge = purge
        self._jobs: OrderedDict[str, PurgeJob] = OrderedDict()
        self._lock = threading.Lock()

    def start(self, report: forgetting.ForgetReport) -> PurgeJob:
        """Starts purging what `report` deleted. The thread is not a daemon: a server told to stop finishes the
        purge first, as it finished a request's before."""
        job = PurgeJob(report)
        with self._lock:
            self._jobs[job.entry] = job
            self._forget_oldest_finished()
        threading.Thread(target=self._run, args=(job,), name=f"gamestream-purge-{job.entry}").start()
        return job

    def record_done(self, report: forgetting.ForgetReport) -> PurgeJob:
        """A forget without purge, finished before its answer: kept so that its entry answers a poll as well."""
        job = PurgeJob(report, state="done")
        with self._lock:
            self._jobs[job.entry] = job
            self._forget_oldest_finished()
        return job

    def get(self, entry: str) -> PurgeJob | None:
        with self._lock:
            return self._jobs.get(entry)

    def _run(self, job: PurgeJob) -> None:
        try:
            self._purge(self.settings, job.report)
        except forgetting.PurgeNotPossible as error:
            job.reason, job.state = str(error), "failed"
        except Exception as error:  # a job must end in a state the client can read, whatever happened
            logger.exception("forget purge failed", extra={"entry": job.entry})
            job.reason, job.state = f"{type(error).__name__}: {error}", "failed"
        else:
            job.state = "done"

    def _forget_oldest_finished(self) -> None:
        finished = [entry for entry, job in self._jobs.items() if job.state != "running"]
        for entry in finished[:max(0, len(self._jobs) - KEPT)]:
            del self._jobs[entry]


def purge_with_kpi_fold(settings: Settings, report: forgetting.ForgetReport) -> None:
    """`forget.purge_forgotten`, folding the forget into the KPIs here when no KPI stage runs elsewhere."""
    from gamestream.kpi import fold_once

    forgetting.purge_forgotten(settings, report, fold_kpi=fold_once)

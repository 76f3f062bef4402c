"""Forget revisions: a version of the events table that deleted a device's rows (`gamestream forget`) revises
every KPI those rows counted in."""

from __future__ import annotations

import datetime as dt
import json
import logging

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from gamestream.kpi import tables as kt
from gamestream.kpi.days import PURCHASE
from gamestream.kpi.fold import Fold, WindowDelta, name_counts
from gamestream.kpi.rows import normalise, rows_in
from gamestream.tables import forgotten
from gamestream.tables.forgotten import FORGET_KEY

logger = logging.getLogger(__name__)


class ForgetRevisions:
    """`KpiStage`'s folding of a forget (a part of the stage, not a stage of its own)."""

    def _fold_forget(self, version: int) -> None:
        """Folds a version that deleted a device's rows (`gamestream forget`): the rows it deleted are read from
        the version before, and every KPI they counted in is revised — hourly and top-event counts by
        subtraction, the days they fell on recomputed from the table, and the devices leave the state tables
        (then the WAU/MAU of the 30 days after each of their active days, and their cohorts, are re-derived)."""
        fold = Fold()
        metadata = self._commit_metadata(version)
        hashes = sorted(set(json.loads(metadata[FORGET_KEY])["hashes"])) if FORGET_KEY in metadata else []
        if not hashes:
            logger.warning("events version %d deleted rows outside `gamestream forget`: the KPI tables still count "
                           "them", version)
        else:
            salt = forgotten.read_salt(self.settings)
            devices = self._read_own("kpi_devices")
            known = set(devices.to_pyarrow_table(columns=["device_id"])["device_id"].to_pylist()) | {
                d for state in self.days.values() for d in state.devices}
            wanted = set(hashes)
            ids = sorted(d for d in known if forgotten.device_hash(salt, d) in wanted)
            fold.forgotten, fold.forgotten_hashes = ids, hashes
            if ids:
                self._revise_for_deleted(version, ids, fold)
        self._advance_watermark()
        self._commit_fold(fold, version)
        logger.info("KPI tables revised for a forget", extra={"version": version, "devices": len(fold.forgotten)})

    def _revise_for_deleted(self, version: int, ids: list[str], fold: Fold) -> None:
        activity = self._read_own("kpi_activity")
        active = rows_in(activity.to_pyarrow_dataset(), "device_id", ids)
        days = sorted(set(active["eventDate"].to_pylist()))
        before = self._events_dataset(version - 1)
        deleted = normalise(before.to_table(filter=ds.field("eventDate").isin(days), columns=[
            "eventTime", "eventName", "eventParams", "eventDate"])) if days else None
        if deleted is not None:
            deleted = deleted.filter(pc.is_in(deleted["device_id"], pa.array(ids, pa.string())))
        if deleted is not None and deleted.num_rows:
            times = pc.cast(pc.cast(deleted["eventTime"], pa.timestamp("us")), pa.int64())
            purchase = pc.fill_null(pc.equal(deleted["eventName"], PURCHASE), False)
            frame = pa.table({"start": pc.subtract(times, pc.modulo(times, self.window_us)),
                              "purchase": pc.cast(purchase, pa.int64()),
                              "bookings": pc.if_else(purchase, pc.fill_null(deleted["amount"], 0.0), 0.0)})
            grouped = frame.group_by("start").aggregate([("start", "count"), ("purchase", "sum"), ("bookings", "sum")])
            fold.windows[version] = {s: WindowDelta(events=-n, purchases=-p, bookings=-b) for s, n, p, b in zip(
                *(grouped[c].to_pylist() for c in ("start", "start_count", "purchase_sum", "bookings_sum")))}
            fold.names[version] = name_counts(deleted, sign=-1)
            days = sorted(set(days) | set(deleted["eventDate"].to_pylist()))
        fold.touched_days.update(days)
        fold.recompute_days.update(days)
        first = self._devices_rows(ids)
        for device in ids:
            self._known_devices.pop(device, None)
        fold.daily_days.update(d for row in first.values() for d in row if d is not None)
        fold.cohorts.update(row[0] for row in first.values())
        fold.segment_days.update(row[0] for row in first.values())  # their first events' values lose a new user
        for day in days:  # WAU/MAU of the days after each active day, and the cohorts they were retained in
            fold.daily_days.update(day + dt.timedelta(days=k) for k in range(kt.MAU_DAYS))

    def _commit_metadata(self, version: int) -> dict:
        latest = self.events.version()
        for commit in self.events.history(limit=latest - version + 1):
            if commit.get("version") == version:
                return commit
        return {}

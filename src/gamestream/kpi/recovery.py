"""Recovery: a starting KPI stage's tables, state and open days, read back from the KPI tables (their txn versions
and commit metadata) and the events table; and KPI tables new beside older ones, built from the events table."""

from __future__ import annotations

import datetime as dt
import logging

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable, write_deltalake

from gamestream.kpi import tables as kt
from gamestream.kpi.days import PURCHASE, DayState
from gamestream.kpi.fold import Fold, device_segment_rows, event_times, first_rows
from gamestream.kpi.rows import day_from_table, event_columns, normalise, us
from gamestream.kpi.state import STATE_KEY, StageState
from gamestream.tables import lake

logger = logging.getLogger(__name__)


class StageRecovery:
    """`KpiStage`'s reading of its tables at start-up (a part of the stage, not a stage of its own)."""

    def _open(self, name: str) -> DeltaTable:
        schema, partition_by, configuration = kt.TABLES[name]
        if self.part is not None and name in kt.MERGED:  # the merge reads which keys a part's commits changed
            configuration = {**configuration, "delta.enableChangeDataFeed": "true"}
        table = lake.open_or_create(self._uri(name), schema, partition_by, configuration)
        if configuration:
            lake.ensure_properties(table, configuration)
        have = {f.name for f in table.schema().fields}
        missing = [f for f in schema if f.name not in have]
        if missing:  # a table an older gamestream created: the new columns read null in its old rows
            from deltalake.schema import Field as DeltaField

            table.alter.add_columns([DeltaField.from_arrow(f) for f in missing])
        return table

    def _read_state(self, version: int) -> StageState:
        if version == 0:
            return StageState()
        for table in self.tables.values():
            if (table.transaction_version(self.app_id) or 0) != version:
                continue
            for commit in table.history():
                text = commit.get(STATE_KEY)
                if text:
                    state = StageState.from_json(text)
                    if state.version == version:
                        return state
        raise RuntimeError(f"no KPI state for events version {version} in the KPI tables' history")

    def _read_open_windows(self, name: str) -> set[int]:
        table = self.tables[name]
        if table.version() == 0:
            return set()
        rows = table.to_pyarrow_table(columns=["window_start", "final"])
        open_rows = rows.filter(pc.invert(rows["final"]))
        return {us(w) for w in open_rows["window_start"].to_pylist()}

    def _read_open_days(self, version: int) -> dict[dt.date, DayState]:
        if version == 0:
            return {}
        dataset = self._events_dataset(version)
        dates = set(pc.unique(dataset.to_table(columns=["eventDate"])["eventDate"]).to_pylist())
        return {day: day_from_table(dataset, day, self.dimensions) for day in sorted(dates)
                if not self._day_is_final(day)}

    def _bootstrap(self, names: list[str], version: int) -> None:
        """Fills the KPI tables in `names` (created just now, beside older ones that have `version` folded in) from
        the events table at `version`, then re-derives every daily and cohort row, all with txn `version`."""
        logger.info("KPI tables added to an existing data directory: building them", extra={
            "tables": names, "version": version})
        dataset = self._events_dataset(version)
        rows = normalise(dataset.to_table(columns=event_columns(self.dimensions, dataset.schema.names)),
                         self.dimensions)
        purchase = pc.fill_null(pc.equal(rows["eventName"], PURCHASE), False)
        state_json = StageState(version, dict(self.state.max_seen), self.state.watermark).to_json()
        names_count = rows.group_by(["eventDate", "eventName"]).aggregate([("eventName", "count")])
        pairs = rows.group_by(["eventDate", "device_id"]).aggregate([])
        firsts = pa.table({"device_id": rows["device_id"], "day": rows["eventDate"],
                           "pday": pc.if_else(purchase, rows["eventDate"], None)}).group_by("device_id").aggregate(
            [("day", "min"), ("pday", "min")])
        built = {
            "kpi_top_events": pa.table({"eventDate": names_count["eventDate"], "eventName": names_count["eventName"],
                                        "events": names_count["eventName_count"]}, schema=kt.TOP_EVENTS),
            "kpi_activity": pa.table({"eventDate": pairs["eventDate"], "device_id": pairs["device_id"]},
                                     schema=kt.ACTIVITY),
            "kpi_devices": pa.table({"device_id": firsts["device_id"], "first_day": firsts["day_min"],
                                     "first_purchase_day": firsts["pday_min"]}, schema=kt.DEVICES),
        }
        if self.dimensions:
            firsts = first_rows(rows, event_times(rows), self.dimensions)
            built["kpi_device_segments"] = device_segment_rows(firsts, self.dimensions)
        for name in names:
            if name in built and built[name].num_rows:
                data = built[name]
                self._commit(name, version, state_json, lambda table, properties, data=data: write_deltalake(
                    table, data, mode="append", commit_properties=properties))
            elif name in ("kpi_events_hourly", "kpi_bookings_hourly"):
                raise RuntimeError(f"{name} is missing beside KPI tables that have events version {version}: "
                                   "move the KPI tables aside to rebuild them all from the events table")
        self._derive_all = True
        self._commit_daily(Fold(), version, state_json, force=True)
        self._commit_daily_segments(Fold(), version, state_json, force=True)
        self._commit_retention_segments(Fold(), version, state_json, force=True)
        self._commit_retention(Fold(), version, state_json, force=True)
        self._derive_all = False
        for name in self.folded:
            self.folded[name] = max(self.folded[name], version)

"""The events' rows as the KPIs read them: times in µs, the columns the stage folds, and a day read back from
the events table."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from gamestream.kpi import tables as kt
from gamestream.kpi.days import PURCHASE, DayState

UTC = dt.timezone.utc
TS = kt.TS
DAY = dt.timedelta(days=1)


def us(moment: dt.datetime) -> int:
    return int(moment.timestamp() * 1_000_000) if moment.tzinfo else int(moment.replace(tzinfo=UTC).timestamp() * 1e6)


def from_us(value: int) -> dt.datetime:
    return dt.datetime(1970, 1, 1, tzinfo=UTC) + dt.timedelta(microseconds=value)


def normalise(table: pa.Table) -> pa.Table:
    """eventTime, eventName, eventDate and the two parameters the KPIs read, with plain types (the change data
    feed hands out string_view columns; the events table's eventParams may have promoted fields)."""
    params = table["eventParams"]
    columns = {
        "eventTime": pc.cast(table["eventTime"], TS),
        "eventName": pc.cast(table["eventName"], pa.string()),
        "device_id": pc.cast(pc.struct_field(params, "device_id"), pa.string()),
        "amount": pc.cast(pc.struct_field(params, "amount"), pa.float64()),
        "eventDate": pc.cast(table["eventDate"], pa.date32()),
    }
    if "_commit_version" in table.column_names:
        columns["_commit_version"] = pc.cast(table["_commit_version"], pa.int64())
    return pa.table(columns)


def rows_in(dataset: ds.Dataset, column: str, values, columns: list[str] | None = None,
             where: ds.Expression | None = None) -> pa.Table:
    """The rows of `dataset` whose string `column` is in `values`. Filtered after reading, not by the scan:
    files delta-rs' MERGE wrote declare string_view columns, which pyarrow's scan filter cannot compare with a
    string value set."""
    rows = dataset.to_table(columns=columns, filter=where)
    return rows.filter(pc.is_in(pc.cast(rows[column], pa.string()), pa.array(list(values), pa.string())))


def day_rows(rows: pa.Table) -> pa.Table:
    """The columns `DayState.add` folds."""
    purchase = pc.fill_null(pc.equal(rows["eventName"], PURCHASE), False)
    return pa.table({
        "device_id": rows["device_id"],
        "t": pc.cast(pc.cast(rows["eventTime"], pa.timestamp("us")), pa.int64()),
        "purchase": purchase,
        "amount": pc.fill_null(rows["amount"], 0.0),
    })


def day_from_table(dataset: ds.Dataset, day: dt.date) -> DayState:
    """The day's exact state, recomputed from the events table."""
    rows = dataset.to_table(filter=ds.field("eventDate") == day,
                            columns=["eventTime", "eventName", "eventParams", "eventDate"])
    state = DayState()
    state.add(day_rows(normalise(rows)))
    return state

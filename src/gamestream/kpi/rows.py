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


EVENT_COLUMNS = ["eventTime", "eventName", "eventParams", "eventDate"]
COUNTRY_COLUMN = "geo_country"


def event_columns(dimensions: tuple[str, ...] = (), available: list[str] | None = None) -> list[str]:
    """The events table's columns `normalise` reads: the four every KPI needs, and `geo_country` when the
    breakdowns include the country and the table has the column (`available`; None: assume it has)."""
    if "country" in dimensions and (available is None or COUNTRY_COLUMN in available):
        return [*EVENT_COLUMNS, COUNTRY_COLUMN]
    return list(EVENT_COLUMNS)


def segment_column(dimension: str) -> str:
    """The column of a normalised row that holds its value of a breakdown `dimension`."""
    return f"d:{dimension}"


def normalise(table: pa.Table, dimensions: tuple[str, ...] = ()) -> pa.Table:
    """eventTime, eventName, eventDate and the two parameters the KPIs read, with plain types (the change data
    feed hands out string_view columns; the events table's eventParams may have promoted fields); and each
    breakdown dimension's value as a string (`segment_column`), `(not set)` where an event has none."""
    params = table["eventParams"]
    columns = {
        "eventTime": pc.cast(table["eventTime"], TS),
        "eventName": pc.cast(table["eventName"], pa.string()),
        "device_id": pc.cast(pc.struct_field(params, "device_id"), pa.string()),
        "amount": pc.cast(pc.struct_field(params, "amount"), pa.float64()),
        "eventDate": pc.cast(table["eventDate"], pa.date32()),
    }
    if dimensions:
        names = {params.type.field(i).name for i in range(params.type.num_fields)}
        for dimension in dimensions:
            if dimension == "country":
                values = table[COUNTRY_COLUMN] if COUNTRY_COLUMN in table.column_names else None
            else:
                values = pc.struct_field(params, dimension) if dimension in names else None
            if values is None:
                column = pa.array([kt.NOT_SET] * table.num_rows, pa.string())
            else:
                column = pc.fill_null(pc.cast(values, pa.string()), kt.NOT_SET)
            columns[segment_column(dimension)] = column
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
    """The columns `DayState.add` folds (with the breakdowns' value columns, when the rows have them)."""
    purchase = pc.fill_null(pc.equal(rows["eventName"], PURCHASE), False)
    columns = {
        "device_id": rows["device_id"],
        "t": pc.cast(pc.cast(rows["eventTime"], pa.timestamp("us")), pa.int64()),
        "purchase": purchase,
        "amount": pc.fill_null(rows["amount"], 0.0),
    }
    columns.update({c: rows[c] for c in rows.column_names if c.startswith("d:")})
    return pa.table(columns)


def day_from_table(dataset: ds.Dataset, day: dt.date, dimensions: tuple[str, ...] = ()) -> DayState:
    """The day's exact state (and its breakdowns by `dimensions`), recomputed from the events table."""
    rows = dataset.to_table(filter=ds.field("eventDate") == day,
                            columns=event_columns(dimensions, dataset.schema.names))
    state = DayState()
    state.add(day_rows(normalise(rows, dimensions)))
    return state

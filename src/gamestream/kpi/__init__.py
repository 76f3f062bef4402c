"""The KPI stage (`stage.KpiStage`): the events table's versions → KPI tables (`tables`), exactly once.

`days` holds one day's exact state (devices, payers, sessions); `tables` the schemas; `stage` the folding,
watermark, recovery and commits.

May import: core, log, tables
"""

from gamestream.kpi.stage import (
           STATE_KEY,
           KpiStage,
           KpiStageSuperseded,
           StageState,
           fold_once,
)
from gamestream.kpi.tables import (
           BOOKINGS_HOURLY,
           DAILY,
           EVENTS_HOURLY,
           RETENTION,
           TOP_EVENTS,
)

__all__ = ["BOOKINGS_HOURLY", "DAILY", "EVENTS_HOURLY", "RETENTION", "STATE_KEY", "TOP_EVENTS", "KpiStage",
           "KpiStageSuperseded", "StageState", "fold_once"]

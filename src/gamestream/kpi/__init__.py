"""The KPI stage (`stage.KpiStage`): the events table's versions → KPI tables (`tables`), exactly once.

`days` holds one day's exact state (devices, payers, sessions); `tables` the schemas; `stage` the stage's loop
(versions read, folded, committed), with its parts beside it: `state`, `rows`, `fold` (one version),
`watermark`, `recovery`, `forget` (revisions for deleted rows), `commits` (exactly once), `increments` (additive
and state tables) and `derived` (daily and cohort rows).

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

"""What the KPI stage keeps of itself in the KPI tables' commit metadata (`STATE_KEY`), and the error that tells
a stage another one has committed since it last did."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

STATE_KEY = "gamestream.kpi"


class KpiStageSuperseded(RuntimeError):
    """Another KPI stage committed to a KPI table since this one last did (this process lost the KPI role, e.g.
    it was paused past its lease, and another one took over). This stage's in-memory state is stale and its
    additive MERGEs would count versions twice: it must stop; a new `KpiStage` recovers from the tables."""


@dataclass
class StageState:
    version: int = 0  # events-table version folded in; 0 is the table's creation (no rows)
    max_seen: dict[int, int] = field(default_factory=dict)  # log partition → greatest eventTime folded (µs)
    watermark: int | None = None  # µs; only moves forward

    def to_json(self) -> str:
        return json.dumps({"version": self.version, "watermark": self.watermark,
                           "max_seen": {str(p): v for p, v in self.max_seen.items()}})

    @classmethod
    def from_json(cls, text: str) -> "StageState":
        raw = json.loads(text)
        return cls(raw["version"], {int(p): v for p, v in raw["max_seen"].items()}, raw["watermark"])


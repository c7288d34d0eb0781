"""The per-item outcome that travels from the test to the controller on the TestReport."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .config import BASELINE_STAGE
from .stats import item_score


@dataclass(frozen=True)
class ItemOutcome:
    """Baseline and candidate results of one benchmark item. Builtin types only (xdist transport)."""

    task: str
    doc_id: int
    item_id: str
    metric: str
    gold: int
    chance: float
    sides: Mapping[str, Mapping[str, Any]]
    worker: str
    loads: Mapping[str, int]
    notes: tuple[str, ...] = ()  # what went wrong with this process's result cache so far

    @property
    def candidates(self) -> list[str]:
        """The roles other than the baseline."""
        return [role for role in self.sides if role != BASELINE_STAGE]

    def score(self, role: str) -> float:
        """The gating metric of ``role`` on this item."""
        return item_score(self.sides[role], self.metric)

    @property
    def regressed(self) -> bool:
        """Some candidate got it wrong where the baseline got it right."""
        if BASELINE_STAGE not in self.sides:
            return False
        return any(self.score(role) < self.score(BASELINE_STAGE) for role in self.candidates)

    @property
    def improved(self) -> bool:
        """No candidate regressed and some candidate got it right where the baseline did not."""
        if BASELINE_STAGE not in self.sides or self.regressed:
            return False
        return any(self.score(role) > self.score(BASELINE_STAGE) for role in self.candidates)

    @property
    def status(self) -> str:
        """'regressed', 'improved' or 'same'."""
        return "regressed" if self.regressed else "improved" if self.improved else "same"

    def as_dict(self) -> dict[str, Any]:
        """Builtin-typed form for ``report.llmgate``."""
        return {
            "task": self.task, "doc_id": int(self.doc_id), "id": self.item_id, "metric": self.metric,
            "gold": int(self.gold), "chance": float(self.chance), "status": self.status,
            "sides": {role: dict(side) for role, side in self.sides.items()},
            "worker": self.worker, "loads": dict(self.loads), "notes": list(self.notes),
        }

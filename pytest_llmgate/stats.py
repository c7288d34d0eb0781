"""Pure statistics over item outcomes: scores, retention, wins/losses/ties. No I/O."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TaskStats:
    """Per-task figures for every model role of a run, all recomputable from the items."""

    task: str
    metric: str
    n: int
    scores: Mapping[str, float]
    chance: float
    # role -> (wins, losses, ties) against the baseline; wins = candidate right where baseline was wrong.
    wlt: Mapping[str, tuple[int, int, int]]

    def retention(self, role: str, reference: str = "baseline") -> float | None:
        """score(role) / score(reference), or None when the reference scores 0."""
        base = self.scores.get(reference)
        if base is None or role not in self.scores or base <= 0:
            return None
        return self.scores[role] / base


def item_score(side: Mapping[str, Any], metric: str) -> float:
    """The gating metric's score of one side of one item."""
    return float(side["scores"][metric])


def mean(values: Iterable[float]) -> float:
    """Arithmetic mean; 0.0 for no values."""
    values = list(values)
    return sum(values) / len(values) if values else 0.0


@dataclass
class Tally:
    """Outcomes collected on the controller, in whatever order xdist delivers them."""

    outcomes: dict[str, dict[str, Any]] = field(default_factory=dict)

    def add(self, outcome: Mapping[str, Any]) -> None:
        """Record one item's outcome (a later report of the same item replaces the earlier one)."""
        self.outcomes[f"{outcome['task']}/{outcome['id']}"] = dict(outcome)

    def ordered(self) -> list[dict[str, Any]]:
        """Outcomes sorted by task then row, so statistics do not depend on arrival order."""
        return sorted(self.outcomes.values(), key=lambda o: (o["task"], o["doc_id"], o["id"]))

    def task_stats(self) -> dict[str, TaskStats]:
        """Per-task statistics over every role present on all of the task's items."""
        by_task: dict[str, list[dict[str, Any]]] = {}
        for outcome in self.ordered():
            by_task.setdefault(outcome["task"], []).append(outcome)
        result = {}
        for task, outcomes in by_task.items():
            metric = outcomes[0]["metric"]
            roles = set.intersection(*(set(o["sides"]) for o in outcomes))
            scores = {role: mean(item_score(o["sides"][role], metric) for o in outcomes) for role in sorted(roles)}
            wlt = {}
            if "baseline" in roles:
                for role in sorted(roles - {"baseline"}):
                    wins = losses = 0
                    for o in outcomes:
                        base = item_score(o["sides"]["baseline"], metric)
                        cand = item_score(o["sides"][role], metric)
                        wins += cand > base
                        losses += cand < base
                    wlt[role] = (wins, losses, len(outcomes) - wins - losses)
            result[task] = TaskStats(
                task=task, metric=metric, n=len(outcomes), scores=scores,
                chance=mean(o["chance"] for o in outcomes), wlt=wlt)
        return result

"""The per-item outcome that travels from the test to the controller, and the controller's tally of them.

An ``ItemOutcome`` is built by the worker, rides on the call report as builtin types (``as_dict``: xdist
transport), and is rebuilt on the controller (``from_dict``). The ``Tally`` turns outcomes into per-task
statistics, whatever order xdist delivers them in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .config import BASELINE_STAGE
from .stats import TaskStats, mean, mean_interval


def item_score(side: Mapping[str, Any], metric: str) -> float:
    """The gating metric's score of one side of one item."""
    return float(side["scores"][metric])


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
    worker: str = "main"
    loads: Mapping[str, int] = field(default_factory=dict)
    notes: tuple[str, ...] = ()  # what went wrong with this process's result cache so far
    # The gated stage whose regressions the status counts; None: any candidate (baseline runs, --stage=all).
    # A step rule also evaluates the previous rung, whose regressions are not the gated stage's.
    stage: str | None = None
    prompt: str = ""  # the first request's context (plain text; a chat's messages flattened), for reading
    choices: tuple[str, ...] = ()  # the answer choices (empty for generation tasks)

    @property
    def key(self) -> str:
        """The item's identity in a run: its task and id."""
        return f"{self.task}/{self.item_id}"

    @property
    def candidates(self) -> list[str]:
        """The roles whose regressions count: the gated stage, or every role but the baseline."""
        if self.stage is not None and self.stage in self.sides:
            return [self.stage]
        return [role for role in self.sides if role != BASELINE_STAGE]

    def score(self, role: str) -> float:
        """The gating metric of ``role`` on this item."""
        return item_score(self.sides[role], self.metric)

    @property
    def regressed(self) -> bool:
        """A counted candidate got it wrong where the baseline got it right."""
        if BASELINE_STAGE not in self.sides:
            return False
        return any(self.score(role) < self.score(BASELINE_STAGE) for role in self.candidates)

    @property
    def improved(self) -> bool:
        """No counted candidate regressed and one got it right where the baseline did not."""
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
            "task": self.task,
            "doc_id": int(self.doc_id),
            "id": self.item_id,
            "metric": self.metric,
            "gold": int(self.gold),
            "chance": float(self.chance),
            "status": self.status,
            "sides": {role: dict(side) for role, side in self.sides.items()},
            "worker": self.worker,
            "loads": dict(self.loads),
            "notes": list(self.notes),
            "stage": self.stage,
            "prompt": self.prompt,
            "choices": list(self.choices),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ItemOutcome:
        """The outcome ``as_dict`` wrote (``status`` is derived, so it is not read back)."""
        return cls(
            task=str(data["task"]),
            doc_id=int(data["doc_id"]),
            item_id=str(data["id"]),
            metric=str(data["metric"]),
            gold=int(data.get("gold", -1)),
            chance=float(data["chance"]),
            sides={role: dict(side) for role, side in data["sides"].items()},
            worker=str(data.get("worker", "main")),
            loads=dict(data.get("loads", {})),
            notes=tuple(data.get("notes", ())),
            stage=data.get("stage"),
            prompt=str(data.get("prompt", "")),
            choices=tuple(data.get("choices", ())),
        )


@dataclass
class Tally:
    """Outcomes collected on the controller, in whatever order xdist delivers them."""

    outcomes: dict[str, ItemOutcome] = field(default_factory=dict)

    def add(self, outcome: ItemOutcome | Mapping[str, Any]) -> ItemOutcome:
        """Record one item's outcome (a later report of the same item replaces the earlier one)."""
        typed = outcome if isinstance(outcome, ItemOutcome) else ItemOutcome.from_dict(outcome)
        self.outcomes[typed.key] = typed
        return typed

    def ordered(self) -> list[ItemOutcome]:
        """Outcomes sorted by task then row, so statistics do not depend on arrival order."""
        return sorted(self.outcomes.values(), key=lambda o: (o.task, o.doc_id, o.item_id))

    def task_stats(
        self, confidence: float = 0.95, metric: Callable[[str, str], str] | None = None
    ) -> dict[str, TaskStats]:
        """Per-task statistics over every role present on all of the task's items.

        ``metric(task, gating metric)``: the score to take instead of the gating metric (e.g. ``consistency`` of a
        task with repeats); roles whose items lack it, and tasks left with none, are left out.
        """
        by_task: dict[str, list[ItemOutcome]] = {}
        for outcome in self.ordered():
            by_task.setdefault(outcome.task, []).append(outcome)
        result = {}
        for task, outcomes in by_task.items():
            metric_name = outcomes[0].metric if metric is None else metric(task, outcomes[0].metric)
            roles = set.intersection(*(set(o.sides) for o in outcomes))
            roles = {r for r in roles if all(metric_name in o.sides[r].get("scores", {}) for o in outcomes)}
            if not roles:
                continue
            items = {role: tuple(item_score(o.sides[role], metric_name) for o in outcomes) for role in sorted(roles)}
            scores = {role: mean(values) for role, values in items.items()}
            wlt = {}
            if BASELINE_STAGE in roles:
                for role in sorted(roles - {BASELINE_STAGE}):
                    pairs = list(zip(items[BASELINE_STAGE], items[role], strict=True))
                    wins = sum(cand > base for base, cand in pairs)
                    losses = sum(cand < base for base, cand in pairs)
                    wlt[role] = (wins, losses, len(outcomes) - wins - losses)
            clusters = tuple(o.item_id.rpartition("-")[0] for o in outcomes)
            clustered = clusters if len(set(clusters)) > 1 else None
            result[task] = TaskStats(
                task=task,
                metric=metric_name,
                n=len(outcomes),
                scores=scores,
                chance=mean(o.chance for o in outcomes),
                wlt=wlt,
                items=items,
                clusters=clusters,
                intervals={role: mean_interval(values, confidence, clustered) for role, values in items.items()},
            )
        return result


REPEAT_FIGURES = ("greedy", "mean", "self_consistency", "pass", "consistency")


def repeat_figures(tally: Tally, confidence: float = 0.95) -> dict[str, dict[str, Any]]:
    """Per task with repeats (``tasks/repeats.py``), per role: the greedy score, its mean over the repeats, the
    majority vote's score (self-consistency), pass@repeats and the consistency rate, each with its interval over
    items (an item's repeats are one cluster: the interval is clustered by item)."""
    found: dict[str, dict[str, Any]] = {}
    for outcome in tally.ordered():
        if outcome.task in found:
            continue
        side = next(iter(outcome.sides.values()), {})
        if "repeats" in side:
            base = outcome.metric.split("@", 1)[0]
            found[outcome.task] = {"repeats": len(side["repeats"]), "metric": base}
    if not found:
        return {}
    names = {
        "greedy": lambda base, n: base,
        "mean": lambda base, n: f"{base}@mean",
        "self_consistency": lambda base, n: f"{base}@majority",
        "pass": lambda base, n: f"{base}@pass{n}",
        "consistency": lambda base, n: "consistency",
    }
    for figure in REPEAT_FIGURES:

        def metric(task: str, gating: str, figure: str = figure) -> str:
            info = found.get(task)
            return names[figure](info["metric"], info["repeats"]) if info else gating

        for task, st in tally.task_stats(confidence, metric=metric).items():
            if task not in found:
                continue
            roles = found[task].setdefault("roles", {})
            for role, score in st.scores.items():
                lo, hi = st.intervals[role]
                roles.setdefault(role, {})[figure] = {"score": score, "ci": [lo, hi]}
    return found

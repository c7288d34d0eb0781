"""What every task is made of: items, requests and per-item scoring. No pytest, no models."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .data import DatasetRef, load_split


@dataclass(frozen=True)
class LoglikelihoodRequest:
    """Score ``continuation`` given ``context``: the model's summed log-probability of it."""

    context: str
    continuation: str


@dataclass(frozen=True)
class TaskItem:
    """One benchmark item: what to ask every model and how to score the answers."""

    task: str
    doc_id: int
    group: str
    requests: tuple[LoglikelihoodRequest, ...]
    gold: int
    choices: tuple[str, ...]
    error: str | None = None  # a bad data row: the item's test errors, the rest still run
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def item_id(self) -> str:
        """The readable id, also the pytest parameter id: ``<group>-<doc_id>``."""
        return f"{self.group}-{self.doc_id}"

    @property
    def qualified_id(self) -> str:
        """``<task>/<item_id>``: unique across tasks, the item's name in the cache and the engine."""
        return f"{self.task}/{self.item_id}"

    def prompt_hash(self) -> str:
        """Hash of exactly what is sent to the model, part of every cache key."""
        payload = json.dumps([[r.context, r.continuation] for r in self.requests], ensure_ascii=False)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


class MultipleChoiceTask:
    """A log-likelihood multiple-choice task scored like lm-evaluation-harness 0.4.

    ``acc`` picks the choice with the highest summed log-likelihood; ``acc_norm`` divides each
    by the choice's length in characters (lm-eval's behaviour, not bytes or tokens).
    Ties go to the first choice, as numpy's argmax does in lm-eval.
    """

    name: ClassVar[str]
    dataset: ClassVar[DatasetRef]
    metrics: ClassVar[tuple[str, ...]] = ("acc", "acc_norm")
    default_metric: ClassVar[str] = "acc_norm"
    target_delimiter: ClassVar[str] = " "
    # Bump when prompt building changes: it is part of the task version, so the cache misses.
    format_version: ClassVar[str] = "1"
    reference: ClassVar[str] = ""

    def build(self, doc: dict[str, Any]) -> tuple[str, list[str], int]:
        """(context, choice texts, gold index) for one row of the evaluation split."""
        raise NotImplementedError

    def group_of(self, doc: dict[str, Any]) -> str:
        """The id's group part: the split name unless a task has subjects."""
        return self.dataset.split

    def load(self, data_dir: Path | None, limit: int | None = None) -> tuple[list[TaskItem], str]:
        """Items of the evaluation split (the first ``limit`` rows, as lm-eval's --limit) and the task version."""
        loaded = load_split(self.dataset, data_dir)
        rows = loaded.rows if limit is None else loaded.rows[:limit]
        version = f"{self.name}/v{self.format_version}/{loaded.content_hash}"
        return [self.item(doc_id, doc) for doc_id, doc in enumerate(rows)], version

    def item(self, doc_id: int, doc: dict[str, Any]) -> TaskItem:
        """One TaskItem; a row that cannot be built becomes an item carrying the error."""
        try:
            group = self.group_of(doc)
        except Exception:
            group = self.dataset.split
        try:
            context, choices, gold = self.build(doc)
            if not choices or not 0 <= gold < len(choices):
                raise ValueError(f"gold index {gold} outside the {len(choices)} choices")
        except Exception as error:
            return TaskItem(self.name, doc_id, group, (), -1, (),
                            error=f"bad data row {doc_id} of {self.dataset.hub_path}: "
                                  f"{type(error).__name__}: {error}")
        return TaskItem(self.name, doc_id, group, self.requests_for(context, choices), gold, tuple(choices))

    def requests_for(self, context: str, choices: list[str]) -> tuple[LoglikelihoodRequest, ...]:
        """One request per choice: the choice, after the target delimiter, continues the context."""
        return tuple(LoglikelihoodRequest(context, self.target_delimiter + c) for c in choices)

    def score(self, item: TaskItem, results: Sequence[Sequence[Any]]) -> dict[str, Any]:
        """Per-side record from per-choice (loglikelihood, is_greedy) pairs: raw values, predictions, scores."""
        lls = [float(r[0]) for r in results]
        if len(lls) != len(item.choices) or any(math.isnan(v) for v in lls):
            raise ValueError(
                f"{item.task} {item.item_id}: the model returned {len(lls)} log-likelihoods "
                f"for {len(item.choices)} choices (or NaN): {lls}"
            )
        normed = [ll / len(choice) if choice else ll for ll, choice in zip(lls, item.choices, strict=True)]
        prediction = max(range(len(lls)), key=lambda i: (lls[i], -i))
        prediction_norm = max(range(len(normed)), key=lambda i: (normed[i], -i))
        return {
            "loglikelihoods": lls,
            "is_greedy": [bool(r[1]) for r in results],
            "prediction": prediction,
            "prediction_norm": prediction_norm,
            "scores": {
                name: value for name, value in (
                    ("acc", 1.0 if prediction == item.gold else 0.0),
                    ("acc_norm", 1.0 if prediction_norm == item.gold else 0.0),
                ) if name in self.metrics
            },
        }

    def chance(self, item: TaskItem) -> float:
        """Expected score of a uniform random guess on this item."""
        return 1.0 / len(item.choices) if item.choices else 0.0

"""Repeats of a generation task: N sampled answers per item beside the greedy one (``repeats = N``).

Compression often shows first as instability: a quantized model that still knows the answer gives it less
reliably under sampling. With ``repeats``, each item asks every model for its greedy answer (the task's own
request, so the task's metrics keep lm-eval's meaning) and for N more drawn with ``temperature`` / ``top_p``,
repeat r from a generator seeded ``seed + r`` (reproducible; each repeat is a request of its own in the batched
engine and in the cache). Per item the side record gains:

- ``repeats``: each repeat's completion, answer and scores;
- ``answers``: the distinct answers and how many repeats gave each; ``majority``: the most frequent (ties go to
  the one given first); ``consistency``: the share of repeats that gave the majority answer;
- scores ``{metric}@mean`` (the metric averaged over the repeats), ``{metric}@majority`` (self-consistency: the
  majority answer's score), ``{metric}@pass{N}`` (a repeat got it right) and ``consistency``.

Answers are what the metric compares (``GenerationTask.answer``: GSM8K's extracted number, a suite's extracted
text), so two completions that reason differently but land on the same number agree. ``consistency`` and
``answers`` use the task's default metric's answers.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from typing import Any

from ..config import RepeatSettings, repeat_metrics
from .base import GenerationRequest, GenerationTask, Task, TaskItem


def base_metric(metric: str) -> str:
    """The task's own metric behind a repeat metric: ``exact_match@majority`` -> ``exact_match``."""
    return metric.split("@", 1)[0]


def majority(answers: Sequence[str]) -> tuple[str, float]:
    """The most frequent answer (ties: the one given first) and the share of answers equal to it."""
    if not answers:
        raise ValueError("majority of no answers")
    counts = Counter(answers)
    top = max(counts.values())
    winner = next(a for a in answers if counts[a] == top)
    return winner, top / len(answers)


class _Repeated(GenerationTask):
    """Mixed in before a generation task's class by ``with_repeats`` (its MRO puts that class next)."""

    repeat: RepeatSettings

    def item_for(self, doc_id: int, group: str, doc: dict[str, Any], shots: Sequence[dict[str, Any]]) -> TaskItem:
        item = super().item_for(doc_id, group, doc, shots)
        (greedy,) = item.requests
        assert isinstance(greedy, GenerationRequest)
        settings = self.repeat
        sampled = tuple(
            dataclasses.replace(
                greedy, temperature=settings.temperature, top_p=settings.top_p, samples=1, seed=settings.seed + r
            )
            for r in range(settings.repeats)
        )
        return dataclasses.replace(item, requests=(greedy, *sampled))

    def score(self, item: TaskItem, results: Sequence[Any]) -> dict[str, Any]:
        settings = self.repeat
        if len(results) != 1 + settings.repeats:
            raise ValueError(
                f"{item.task} {item.item_id}: expected the greedy answer and {settings.repeats} repeats, "
                f"got {len(results)} results"
            )
        one = dataclasses.replace(item, requests=item.requests[:1])
        greedy = super().score(one, results[:1])
        runs = [super(_Repeated, self).score(one, [result]) for result in results[1:]]
        metrics = list(greedy["scores"])
        default = self.default_metric if self.default_metric in metrics else metrics[0]
        answer = self.answer
        scores = dict(greedy["scores"])
        for metric in metrics:
            values = [float(run["scores"][metric]) for run in runs]
            answers = [answer(run, metric) for run in runs]
            winner, _ = majority(answers)
            scores[f"{metric}@mean"] = sum(values) / len(values)
            scores[f"{metric}@majority"] = values[answers.index(winner)]
            scores[f"{metric}@pass{settings.repeats}"] = max(values)
        answers = [answer(run, default) for run in runs]
        winner, agreement = majority(answers)
        scores["consistency"] = agreement
        return {
            **greedy,
            "repeats": [
                {"completion": run.get("completion"), "answer": a, "scores": run["scores"]}
                for run, a in zip(runs, answers, strict=True)
            ],
            "answers": dict(Counter(answers).most_common()),
            "majority": winner,
            "consistency": agreement,
            "scores": scores,
        }


def with_repeats(task: Task, settings: RepeatSettings) -> Task:
    """A copy of ``task`` that asks for ``settings.repeats`` sampled answers per item beside the greedy one."""
    if not getattr(task, "supports_repeats", False):
        raise ValueError(f"task {task.name} does not support repeats (a generation task with one answer per item)")
    cls = type(task)
    repeated = type(f"Repeated{cls.__name__}", (_Repeated, cls), {"__module__": cls.__module__})
    copy: Any = object.__new__(repeated)
    copy.__dict__.update(task.__dict__)
    base = tuple(task.metrics)  # a suite's metrics are its own (an instance attribute)
    copy.metrics = (*base, *repeat_metrics(base, settings.repeats))
    copy.repeat = settings
    return copy

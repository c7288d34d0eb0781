"""Benchmark tasks: one module each, registered here by name."""

from __future__ import annotations

from .arc import ArcChallenge
from .base import LoglikelihoodRequest, MultipleChoiceTask, TaskItem
from .data import DatasetError, DatasetRef
from .hellaswag import HellaSwag
from .truthfulqa import TruthfulQAMC1, TruthfulQAMC2
from .winogrande import WinoGrande

TASKS: dict[str, MultipleChoiceTask] = {
    task.name: task
    for task in (ArcChallenge(), HellaSwag(), WinoGrande(), TruthfulQAMC1(), TruthfulQAMC2())
}

__all__ = ["TASKS", "DatasetError", "DatasetRef", "LoglikelihoodRequest", "MultipleChoiceTask", "TaskItem"]

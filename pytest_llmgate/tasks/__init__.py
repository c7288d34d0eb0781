"""Benchmark tasks: one module each, registered here by name, plus the custom suites of a config."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .arc import ArcChallenge
from .base import (
    GenerationRequest,
    GenerationTask,
    LoglikelihoodRequest,
    MultipleChoiceTask,
    Task,
    TaskItem,
    TaskOptions,
)
from .data import DatasetError, DatasetRef, LoadedSplit
from .fewshot import FewShotSource
from .gsm8k import GSM8K, GSM8KCoT
from .hellaswag import HellaSwag
from .humaneval import HumanEval, HumanEvalSampled
from .mbpp import MBPP
from .mmlu import MMLU
from .suites import SuiteError, completion, jsonl_split, merge_tasks, suite_tasks
from .truthfulqa import TruthfulQAMC1, TruthfulQAMC2
from .winogrande import WinoGrande

TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        ArcChallenge(),
        HellaSwag(),
        WinoGrande(),
        TruthfulQAMC1(),
        TruthfulQAMC2(),
        MMLU(),
        HumanEval(),
        HumanEvalSampled(),
        MBPP(),
        GSM8K(),
        GSM8KCoT(),
    )
}


def available_tasks(raw: Mapping[str, Any], base: Path) -> dict[str, Task]:
    """The built-in tasks and the custom suites declared in a raw ``[tool.llmgate]`` table.

    Suite paths are relative to ``base`` (the config file's folder); a mistake raises SuiteError.
    """
    return {**TASKS, **suite_tasks(raw, base, TASKS)}


__all__ = [
    "TASKS",
    "DatasetError",
    "DatasetRef",
    "FewShotSource",
    "GenerationRequest",
    "GenerationTask",
    "LoadedSplit",
    "LoglikelihoodRequest",
    "MultipleChoiceTask",
    "SuiteError",
    "Task",
    "TaskItem",
    "TaskOptions",
    "available_tasks",
    "completion",
    "jsonl_split",
    "merge_tasks",
]

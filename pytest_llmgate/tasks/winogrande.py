"""WinoGrande, as lm-evaluation-harness 0.4's ``winogrande`` task (0-shot, winogrande_xl validation)."""

from __future__ import annotations

from typing import Any

from .base import LoglikelihoodRequest, MultipleChoiceTask
from .data import DatasetRef


class WinoGrande(MultipleChoiceTask):
    """Partial evaluation: each option fills the blank in the prefix; the shared suffix is scored."""

    name = "winogrande"
    dataset = DatasetRef("allenai/winogrande", "winogrande_xl", "validation", "winogrande")
    metrics = ("acc",)
    default_metric = "acc"
    reference = "lm-eval 0.4 tasks/winogrande/default.yaml + preprocess_winogrande.py"

    def build(self, doc: dict[str, Any]) -> tuple[str, list[str], int]:
        """(the suffix after the blank, the option-filled prefixes, gold): lm-eval's doc_to_target/choice/text."""
        blank = doc["sentence"].index("_")
        prefixes = [doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"])]
        return doc["sentence"][blank + 1:].strip(), prefixes, {"1": 0, "2": 1}[doc["answer"]]

    def requests_for(self, context: str, choices: list[str]) -> tuple[LoglikelihoodRequest, ...]:
        """lm-eval's multiple-input form: each filled prefix is a context, the suffix the continuation."""
        return tuple(LoglikelihoodRequest(prefix, self.target_delimiter + context) for prefix in choices)

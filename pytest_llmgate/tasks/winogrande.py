"""WinoGrande, as lm-evaluation-harness 0.4's ``winogrande`` task (winogrande_xl validation)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .base import LoglikelihoodRequest, MultipleChoiceTask
from .data import DatasetRef
from .fewshot import FewShotSource


class WinoGrande(MultipleChoiceTask):
    """Partial evaluation: each option fills the blank in the prefix; the shared suffix is scored."""

    name = "winogrande"
    dataset = DatasetRef("allenai/winogrande", "winogrande_xl", "validation", "winogrande")
    metrics = ("acc",)
    default_metric = "acc"
    reference = "lm-eval 0.4 tasks/winogrande/default.yaml + preprocess_winogrande.py"
    # Examples come from winogrande_xl train (40,398 rows). A local folder needs the whole split
    # as winogrande/train_xl.jsonl: a shorter file would change every random draw.
    fewshot = FewShotSource(
        DatasetRef("allenai/winogrande", "winogrande_xl", "train", "winogrande", local_split="train_xl"),
        exclude_eval_doc=True,
    )

    def build(self, doc: dict[str, Any]) -> tuple[str, list[str], int]:
        """(the suffix after the blank, the option-filled prefixes, gold): lm-eval's doc_to_target/choice/text."""
        blank = doc["sentence"].index("_")
        prefixes = [doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"])]
        return doc["sentence"][blank + 1 :].strip(), prefixes, {"1": 0, "2": 1}[doc["answer"]]

    def fewshot_pair(self, doc: dict[str, Any]) -> tuple[str, str]:
        """A worked example is the sentence with the right option filled in: prefix, then suffix."""
        suffix, prefixes, gold = self.build(doc)
        return prefixes[gold], suffix

    def requests_for(
        self, doc: dict[str, Any], shots: Sequence[dict[str, Any]], question: str, choices: list[str]
    ) -> tuple[LoglikelihoodRequest, ...]:
        """lm-eval's multiple-input form: each filled prefix ends a context, the suffix is the continuation."""
        delimiter = self.continuation_delimiter()
        requests = []
        for prefix in choices:
            context, chat = self.render(self.prompt(doc, shots, prefix))
            requests.append(LoglikelihoodRequest(context, delimiter + question, chat))
        return tuple(requests)

"""MMLU, as lm-evaluation-harness 0.4's ``mmlu`` group (57 subject tasks, default template).

Per subject: the description line, then the first five dev questions of the subject as
examples (lm-eval's ``first_n`` sampler), then the test question; the choices are the letters
`` A``..`` D`` and the metric is ``acc``. The task's accuracy is the micro average over all
items (lm-eval's ``weight_by_size``); each subject is the items' group (``test_mmlu[anatomy-3]``),
so the report breaks it down by subject and ``-k anatomy`` selects one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .base import MultipleChoiceTask
from .data import DatasetRef
from .fewshot import FewShotSource

# lm-eval's four MMLU categories (the ``tag`` of each subject's YAML).
CATEGORIES: dict[str, tuple[str, ...]] = {
    "stem": (
        "abstract_algebra",
        "anatomy",
        "astronomy",
        "college_biology",
        "college_chemistry",
        "college_computer_science",
        "college_mathematics",
        "college_physics",
        "computer_security",
        "conceptual_physics",
        "electrical_engineering",
        "elementary_mathematics",
        "high_school_biology",
        "high_school_chemistry",
        "high_school_computer_science",
        "high_school_mathematics",
        "high_school_physics",
        "high_school_statistics",
        "machine_learning",
    ),
    "other": (
        "business_ethics",
        "clinical_knowledge",
        "college_medicine",
        "global_facts",
        "human_aging",
        "management",
        "marketing",
        "medical_genetics",
        "miscellaneous",
        "nutrition",
        "professional_accounting",
        "professional_medicine",
        "virology",
    ),
    "social_sciences": (
        "econometrics",
        "high_school_geography",
        "high_school_government_and_politics",
        "high_school_macroeconomics",
        "high_school_microeconomics",
        "high_school_psychology",
        "human_sexuality",
        "professional_psychology",
        "public_relations",
        "security_studies",
        "sociology",
        "us_foreign_policy",
    ),
    "humanities": (
        "formal_logic",
        "high_school_european_history",
        "high_school_us_history",
        "high_school_world_history",
        "international_law",
        "jurisprudence",
        "logical_fallacies",
        "moral_disputes",
        "moral_scenarios",
        "philosophy",
        "prehistory",
        "professional_law",
        "world_religions",
    ),
}
SUBJECTS: tuple[str, ...] = tuple(sorted(s for members in CATEGORIES.values() for s in members))
CATEGORY_OF: dict[str, str] = {s: c for c, members in CATEGORIES.items() for s in members}
LETTERS = ("A", "B", "C", "D")


def stratified(subjects: Sequence[str], limit: int) -> list[int]:
    """Row indices of a ``limit``-row sample stratified by subject, in data order.

    Each subject gets its share of ``limit`` in proportion to its size (largest remainders
    break the rounding, ties to the subject that comes first), taken from its first rows,
    so the sample is deterministic and grows by adding rows, never by swapping them.
    """
    positions: dict[str, list[int]] = {}
    for index, subject in enumerate(subjects):
        positions.setdefault(subject, []).append(index)
    total = len(subjects)
    if limit >= total:
        return list(range(total))
    exact = {s: limit * len(rows) / total for s, rows in positions.items()}
    share = {s: int(v) for s, v in exact.items()}
    order = sorted(positions, key=lambda s: (-(exact[s] - share[s]), list(positions).index(s)))
    for subject in order[: limit - sum(share.values())]:
        share[subject] += 1
    return sorted(i for s, rows in positions.items() for i in rows[: share[s]])


class MMLU(MultipleChoiceTask):
    """``{question.strip()}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:`` followed by `` {letter}``."""

    name = "mmlu"
    dataset = DatasetRef("cais/mmlu", "all", "test", "mmlu")
    metrics = ("acc",)
    default_metric = "acc"
    default_num_fewshot = 5  # lm-eval's YAML says 0; MMLU is reported 5-shot (--num_fewshot 5)
    fewshot = FewShotSource(DatasetRef("cais/mmlu", "all", "dev", "mmlu"), sampler="first_n")
    reference = "lm-eval 0.4 tasks/mmlu/default/_default_template_yaml + mmlu_<subject>.yaml, --num_fewshot 5"

    def __init__(self) -> None:
        self._pools: dict[tuple[int, str], list[dict[str, Any]]] = {}

    def build(self, doc: dict[str, Any]) -> tuple[str, list[str], int]:
        """lm-eval's doc_to_text; the choices are the four letters, gold the ``answer`` index."""
        choices = doc["choices"]
        if len(choices) != 4:
            raise ValueError(f"expected 4 choices, got {len(choices)}")
        lines = [doc["question"].strip()] + [f"{letter}. {text}" for letter, text in zip(LETTERS, choices, strict=True)]
        return "\n".join(lines) + "\nAnswer:", list(LETTERS), int(doc["answer"])

    def group_of(self, doc: dict[str, Any]) -> str:
        """The subject."""
        return str(doc["subject"])

    def description(self, doc: dict[str, Any]) -> str:
        """The subject line of lm-eval's per-subject YAML."""
        subject = doc["subject"].replace("_", " ")
        return f"The following are multiple choice questions (with answers) about {subject}.\n\n"

    def doc_ids(self, rows: Sequence[dict[str, Any]]) -> list[int]:
        """Index within the subject: lm-eval evaluates each subject as its own task."""
        seen: dict[str, int] = {}
        ids = []
        for row in rows:
            subject = str(row.get("subject"))
            ids.append(seen.get(subject, 0))
            seen[subject] = ids[-1] + 1
        return ids

    def select(self, rows: Sequence[dict[str, Any]], limit: int | None) -> list[int]:
        """Every row, or a sample of ``limit`` rows stratified by subject."""
        if limit is None:
            return list(range(len(rows)))
        return stratified([str(row.get("subject")) for row in rows], limit)

    def fewshot_pool(self, pool: Sequence[dict[str, Any]], doc: dict[str, Any]) -> Sequence[dict[str, Any]]:
        """The dev rows of the row's subject, in file order."""
        key = (id(pool), doc["subject"])
        if key not in self._pools:
            self._pools[key] = [row for row in pool if row.get("subject") == doc["subject"]]
        return self._pools[key]

"""GSM8K, as lm-evaluation-harness 0.4's ``gsm8k`` (5-shot) and ``gsm8k_cot`` (8 fixed exemplars).

Both generate greedily until a stop string and score ``exact_match`` under lm-eval's two filters:
``strict-match`` (the answer in the format the examples teach) and ``flexible-extract`` (the last
number of the completion). exact_match is lm-eval's reimplementation of the HF metric: the
``regexes_to_ignore`` are removed from prediction and reference alike, both are lower-cased, and
the strings must be equal.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, ClassVar

from .base import GenerationTask, TaskItem
from .data import DatasetRef
from .fewshot import FewShotSource

TEST = DatasetRef("openai/gsm8k", "main", "test", "gsm8k")
TRAIN = DatasetRef("openai/gsm8k", "main", "train", "gsm8k")

FALLBACK = "[invalid]"  # lm-eval's RegexFilter output when nothing matches
# metric_list of gsm8k.yaml and gsm8k-cot.yaml: ignore_case true, ignore_punctuation false.
IGNORED = (re.compile(","), re.compile(r"\$"), re.compile(r"(?s).*#### "), re.compile(r"\.$"))
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")  # flexible-extract, group_select -1

# gsm8k-cot.yaml's fewshot_config.samples, in order (lm-eval's first_n sampler takes them as listed).
COT_EXEMPLARS: tuple[dict[str, str], ...] = tuple(
    {"question": q, "target": t}
    for q, t in (
        (
            "There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, "
            "there will be 21 trees. How many trees did the grove workers plant today?",
            "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have "
            "been 21 - 15 = 6. The answer is 6.",
        ),
        (
            "If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
            "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5.",
        ),
        (
            "Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
            "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. "
            "After eating 35, they had 74 - 35 = 39. The answer is 39.",
        ),
        (
            "Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did "
            "Jason give to Denny?",
            "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. "
            "The answer is 8.",
        ),
        (
            "Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have "
            "now?",
            "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. "
            "5 + 4 = 9. The answer is 9.",
        ),
        (
            "There were nine computers in the server room. Five more computers were installed each day, from monday to "
            "thursday. How many computers are now in the server room?",
            "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 "
            "computers were added. 9 + 20 is 29. The answer is 29.",
        ),
        (
            "Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf "
            "balls did he have at the end of wednesday?",
            "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, "
            "he had 35 - 2 = 33 golf balls. The answer is 33.",
        ),
        (
            "Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
            "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars "
            "left. 23 - 15 is 8. The answer is 8.",
        ),
    )
)


def extract(pattern: re.Pattern[str], text: str, select: int) -> str:
    """lm-eval's RegexFilter: match ``select`` of findall; of a tuple, its first non-empty group; stripped."""
    found = pattern.findall(text)
    if not found:
        return FALLBACK
    match = found[select]
    if isinstance(match, tuple):
        groups = [g for g in match if g]
        if not groups:
            return FALLBACK
        match = groups[0]
    return str(match).strip()


def normalize(text: str) -> str:
    """exact_match's view of a string: ignored regexes removed in order, lower-cased.

    numpy (which lm-eval's metric compares with) drops trailing NUL characters of its strings.
    """
    for pattern in IGNORED:
        text = pattern.sub("", text)
    return text.lower().rstrip("\x00")


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when prediction and reference agree after ``normalize``."""
    return 1.0 if normalize(prediction) == normalize(reference) else 0.0


class GSM8K(GenerationTask):
    """``Question: {question}\\nAnswer:``, 5 examples from train with their full worked answers."""

    name = "gsm8k"
    dataset = TEST
    reference = "lm-eval 0.4 tasks/gsm8k/gsm8k.yaml"
    # fewshot_split train differs from test_split: lm-eval draws n examples per item, none excluded.
    fewshot = FewShotSource(TRAIN)
    default_num_fewshot = 5
    until = ("Question:", "</s>", "<|im_end|>")
    metrics = ("exact_match_strict", "exact_match_flexible")
    default_metric = "exact_match_strict"  # the Open LLM Leaderboard reports strict-match
    strict: ClassVar[re.Pattern[str]] = re.compile(r"#### (\-?[0-9\.\,]+)")

    def build(self, doc: dict[str, Any]) -> tuple[str, str]:
        """The question, and the full answer text as the reference (``doc_to_target: {{answer}}``)."""
        return f"Question: {doc['question']}\nAnswer:", str(doc["answer"])

    def fewshot_pair(self, doc: dict[str, Any]) -> tuple[str, str]:
        """A worked example: the question and its whole answer, reasoning and ``#### n`` included."""
        return self.build(doc)

    def answer(self, record: dict[str, Any], metric: str) -> str:
        """The number the metric's filter extracted (strict or flexible)."""
        return str(record["extracted_strict" if metric.endswith("strict") else "extracted_flexible"])

    def score(self, item: TaskItem, results: Sequence[Any]) -> dict[str, Any]:
        """Both filters' answers and their exact_match against the reference."""
        if len(results) != 1 or not results[0] or not isinstance(results[0][0], str):
            raise ValueError(f"{item.task} {item.item_id}: expected one completion, got {results!r}")
        completion = results[0][0]
        reference = str(item.extra["reference"])
        strict = extract(self.strict, completion, 0)
        flexible = extract(FLEXIBLE, completion, -1)
        return {
            "completion": completion,
            "extracted_strict": strict,
            "extracted_flexible": flexible,
            "reference": reference,
            "scores": {
                "exact_match_strict": exact_match(strict, reference),
                "exact_match_flexible": exact_match(flexible, reference),
            },
        }


class GSM8KCoT(GSM8K):
    """``Q: {question}\\nA:``, the eight chain-of-thought exemplars of Wei et al. before every question."""

    name = "gsm8k_cot"
    reference = "lm-eval 0.4 tasks/gsm8k/gsm8k-cot.yaml"
    fewshot = FewShotSource(None, sampler="first_n", samples=COT_EXEMPLARS)
    default_num_fewshot = 8
    until = ("Q:", "</s>", "<|im_end|>")
    strict = re.compile(r"The answer is (\-?[0-9\.\,]+).")

    def build(self, doc: dict[str, Any]) -> tuple[str, str]:
        """The question, and the number after ``####`` as the reference."""
        return f"Q: {doc['question']}\nA:", self.target(doc)

    @staticmethod
    def target(doc: dict[str, Any]) -> str:
        """lm-eval's ``answer.split('####')[-1].strip() if answer is defined else target``."""
        return str(doc["answer"]).split("####")[-1].strip() if "answer" in doc else str(doc["target"])

    def fewshot_pair(self, doc: dict[str, Any]) -> tuple[str, str]:
        """An exemplar: its question and its worked target."""
        return f"Q: {doc['question']}\nA:", self.target(doc)

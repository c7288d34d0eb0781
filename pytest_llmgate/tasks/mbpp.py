"""MBPP, as lm-evaluation-harness 0.4's ``mbpp`` (3-shot, greedy, pass@1).

Each prompt is three worked examples, then the task::

    You are an expert Python programmer, and here is your task: {text} Your code should pass these tests:

    {test_list[0]}
    {test_list[1]}
    {test_list[2]}
    [BEGIN]

An example's answer is its ``code`` followed by ``\\n[DONE]``, directly after ``[BEGIN]\\n`` (the target
delimiter is empty), examples separated by a blank line. Generation stops at ``[DONE]``. The program run in
the sandbox is ``completion + "\\n" + the three tests`` joined by newlines; lm-eval uses neither
``test_setup_code`` (non-empty only for task 367 of the test split) nor ``challenge_test_list``.

The examples are lm-eval's fixed ``list_fewshot_samples``: the prompt split's task ids 2, 3 and 4, taken
in that order (``first_n`` over those three, never the evaluated row), not the first rows of the prompt split.
"""

from __future__ import annotations

from typing import Any, ClassVar

from .coding import CodeTask
from .data import DatasetRef
from .fewshot import FewShotSource

# lm-eval's utils.list_fewshot_samples (rows of the ``prompt`` split, with their \r\n line ends).
FEWSHOT_SAMPLES: tuple[dict[str, Any], ...] = (
    {
        "task_id": 2,
        "text": "Write a function to find the similar elements from the given two tuple lists.",
        "code": "def similar_elements(test_tup1, test_tup2):\r\n  res = tuple(set(test_tup1) & set(test_tup2))\r\n"
        "  return (res) ",
        "test_list": [
            "assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)",
            "assert similar_elements((1, 2, 3, 4),(5, 4, 3, 7)) == (3, 4)",
            "assert similar_elements((11, 12, 14, 13),(17, 15, 14, 13)) == (13, 14)",
        ],
    },
    {
        "task_id": 3,
        "text": "Write a python function to identify non-prime numbers.",
        "code": "import math\r\ndef is_not_prime(n):\r\n    result = False\r\n"
        "    for i in range(2,int(math.sqrt(n)) + 1):\r\n        if n % i == 0:\r\n"
        "            result = True\r\n    return result",
        "test_list": [
            "assert is_not_prime(2) == False",
            "assert is_not_prime(10) == True",
            "assert is_not_prime(35) == True",
        ],
    },
    {
        "task_id": 4,
        "text": "Write a function to find the largest integers from a given list of numbers using heap queue "
        "algorithm.",
        "code": "import heapq as hq\r\ndef heap_queue_largest(nums,n):\r\n  largest_nums = hq.nlargest(n, nums)\r\n"
        "  return largest_nums",
        "test_list": [
            "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],3)==[85, 75, 65] ",
            "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],2)==[85, 75] ",
            "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],5)==[85, 75, 65, 58, 35]",
        ],
    },
)


def tests_of(doc: dict[str, Any]) -> list[str]:
    """The first three of ``test_list``: the ones lm-eval's templates name."""
    tests = doc["test_list"]
    if not isinstance(tests, list) or len(tests) < 3 or not all(isinstance(t, str) for t in tests[:3]):
        raise ValueError("test_list must hold at least three test strings")
    return tests[:3]


class MBPP(CodeTask):
    """3-shot from lm-eval's fixed examples, greedy, pass@1 against the row's three tests."""

    name = "mbpp"
    dataset = DatasetRef("google-research-datasets/mbpp", "full", "test", "mbpp")
    target_delimiter: ClassVar[str] = ""
    default_num_fewshot: ClassVar[int] = 3
    fewshot = FewShotSource(None, sampler="first_n", samples=FEWSHOT_SAMPLES)
    until: ClassVar[tuple[str, ...]] = ("[DONE]",)
    reference = "lm-eval 0.4 tasks/mbpp/mbpp.yaml + utils.py (list_fewshot_samples, pass_at_1 via code_eval)"

    def question(self, doc: dict[str, Any]) -> str:
        """lm-eval's ``doc_to_text``."""
        first, second, third = tests_of(doc)
        return (
            f"You are an expert Python programmer, and here is your task: {doc['text']} "
            f"Your code should pass these tests:\n\n{first}\n{second}\n{third}\n[BEGIN]\n"
        )

    def build(self, doc: dict[str, Any]) -> tuple[str, str]:
        """(the task text, lm-eval's ``doc_to_target`` of an evaluated row: the three tests)."""
        return self.question(doc), "\n".join(tests_of(doc))

    def fewshot_pair(self, doc: dict[str, Any]) -> tuple[str, str]:
        """A worked example: the task text, and its code closed by ``[DONE]``."""
        return self.question(doc), f"{doc['code']}\n[DONE]"

"""The expert suite: knowledge (MMLU), grade-school maths (GSM8K) and code (HumanEval, MBPP).

Maths and code are generation tasks; code runs only through the sandbox (docs/code-tasks.md).
``tasks`` in the configuration picks what runs; the compression-ladder preset's critical rule
"MMLU + GSM8K combined drop" needs both MMLU and GSM8K.
"""

import pytest


@pytest.mark.llmgate("mmlu")
def test_mmlu(llmgate_outcome):
    """MMLU test split, 5-shot, acc, one subject per id group (lm-eval 0.4's mmlu, --num_fewshot 5)."""


@pytest.mark.llmgate("gsm8k")
def test_gsm8k(llmgate_outcome):
    """GSM8K test split, 5-shot, greedy, strict-match exact_match (lm-eval 0.4's gsm8k)."""


@pytest.mark.llmgate("gsm8k_cot")
def test_gsm8k_cot(llmgate_outcome):
    """GSM8K with 8 fixed chain-of-thought exemplars (lm-eval 0.4's gsm8k_cot)."""


@pytest.mark.llmgate("humaneval")
def test_humaneval(llmgate_outcome):
    """HumanEval, greedy, pass@1 (lm-eval 0.4's humaneval)."""


@pytest.mark.llmgate("humaneval_64")
def test_humaneval_64(llmgate_outcome):
    """HumanEval, 64 samples at T=0.2, pass@1 (also pass@2..64) (lm-eval 0.4's humaneval_64)."""


@pytest.mark.llmgate("mbpp")
def test_mbpp(llmgate_outcome):
    """MBPP test split, 3-shot, pass@1 (lm-eval 0.4's mbpp)."""

"""The core suite: commonsense and truthfulness, one test per benchmark item.

The ``llmgate_outcome`` fixture evaluates the item on the baseline and the stage's model(s) and
records the outcome; a regression is tallied, not failed. Add assertions to a function below to
make particular items hard failures (for example ``assert not llmgate_outcome.regressed``).

Every built-in task has a function in ``benchmarks/``; ``tasks`` in the configuration picks what runs
(a task left out is one skipped placeholder, and its data is never read).
"""

import pytest


@pytest.mark.llmgate("arc_challenge")
def test_arc_challenge(llmgate_outcome):
    """ARC-Challenge test split, 0-shot, acc_norm (lm-eval 0.4's arc_challenge)."""


@pytest.mark.llmgate("hellaswag")
def test_hellaswag(llmgate_outcome):
    """HellaSwag validation split, 0-shot, acc_norm (lm-eval 0.4's hellaswag)."""


@pytest.mark.llmgate("winogrande")
def test_winogrande(llmgate_outcome):
    """WinoGrande (xl) validation split, 0-shot partial evaluation, acc (lm-eval 0.4's winogrande)."""


@pytest.mark.llmgate("truthfulqa_mc1")
def test_truthfulqa_mc1(llmgate_outcome):
    """TruthfulQA multiple choice, one true answer, acc (lm-eval 0.4's truthfulqa_mc1)."""


@pytest.mark.llmgate("truthfulqa_mc2")
def test_truthfulqa_mc2(llmgate_outcome):
    """TruthfulQA multiple choice, probability mass on the true answers (lm-eval 0.4's truthfulqa_mc2)."""

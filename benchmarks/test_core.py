"""The core suite: every item of ARC-Challenge and HellaSwag is one test.

The ``llmgate_outcome`` fixture evaluates the item on the baseline and the stage's model(s) and
records the outcome; a regression is tallied, not failed. Add assertions to a function below to
make particular items hard failures (for example ``assert not llmgate_outcome.regressed``).
"""

import pytest


@pytest.mark.llmgate("arc_challenge")
def test_arc_challenge(llmgate_outcome):
    """ARC-Challenge test split, 0-shot, acc_norm (lm-eval 0.4's arc_challenge)."""


@pytest.mark.llmgate("hellaswag")
def test_hellaswag(llmgate_outcome):
    """HellaSwag validation split, 0-shot, acc_norm (lm-eval 0.4's hellaswag)."""

"""The example's two suites: every row is a test."""

import pytest


@pytest.mark.llmgate("sums")
def test_sums(llmgate_outcome):
    """A sum, answered greedily and eight times sampled, and judged against the baseline's answer."""


@pytest.mark.llmgate("advice")
def test_advice(llmgate_outcome):
    """An open-ended request, judged against the baseline's answer in both orders."""

"""The GPU kit's tests: HellaSwag items through the gate, and the serving probe (speed and memory)."""

import pytest


@pytest.mark.llmgate("hellaswag")
def test_hellaswag(llmgate_outcome):
    """HellaSwag validation split, 0-shot, acc_norm (the first 40 rows, carried in .gpukit/datasets)."""


def test_speed(llmgate_probe, benchmark):
    """Latency (batch 1) and throughput (concurrency requests) of every model of the run."""
    llmgate_probe.run(benchmark)

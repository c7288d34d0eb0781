"""Speed: the serving probe of every model of the run, timed by pytest-benchmark.

One test, parametrized by llmgate with one case per model and measurement: batch-1 latency in blocks
interleaved across the models, then throughput with ``[tool.llmgate.speed] concurrency`` requests at once.
pytest-benchmark runs and keeps the rounds (``--benchmark-autosave``, ``--benchmark-compare``,
``--benchmark-json`` work as usual); llmgate reads them into each model's ``speed`` and the stages' speed
rules (``max_latency_ratio`` ...). Skipped with ``--llmgate-no-speed``, and under xdist (``-n``), where
pytest-benchmark does not time. See docs/efficiency.md.
"""


def test_speed(llmgate_probe, benchmark):
    llmgate_probe.run(benchmark)

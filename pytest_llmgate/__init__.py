"""pytest-llmgate: LLM benchmarks as pytest tests, with release gates for compressed models."""

from __future__ import annotations

__version__ = "0.1.0"

# Exit codes: pytest's own are 0-5; these two are the gate's.
EXIT_BREACH = 10
EXIT_CRITICAL = 11

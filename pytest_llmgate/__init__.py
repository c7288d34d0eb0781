"""pytest-llmgate: LLM benchmarks as pytest tests, with release gates for compressed models."""

from __future__ import annotations

__version__ = "0.1.0"

# Exit codes: pytest's own are 0-5; these are the gate's.
EXIT_BREACH = 10
EXIT_CRITICAL = 11
# Tests ran but the gate could not check every configured rule on a non-empty set of items: nothing is
# decided, so nothing may ship (no benchmark item ran, or a task a rule needs had none).
EXIT_UNCHECKED = 12

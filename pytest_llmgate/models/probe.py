"""The serving probe's unit of work: a few greedy requests served at once, each timed.

A backend that can time its own requests has ``probe(prompts, max_tokens) -> list[ProbeTiming]``: the prompts
are served together as the runtime serves concurrent requests (one batch in transformers, concurrent HTTP
requests to a server, one after another in llama-cpp-python, which runs one sequence at a time), each as a
new request (no key/value cache kept from an earlier one), greedy, generating exactly ``max_tokens`` tokens
(end-of-sequence tokens do not stop it, so every model decodes the same number of tokens) unless the context
window ends first. Batch-1 latency is ``probe([prompt])``.

A backend without ``probe`` (a custom one) is timed through ``generate``: end-to-end latency only, no time to
first token, and its token count is unknown.

The timing statistics themselves are pytest-benchmark's: the probe only says what one round does.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ProbeTiming:
    """One request of a probe round, timed from the round's start."""

    ttft_s: float | None  # to the first generated token (None: the backend cannot tell)
    tokens: int | None  # tokens generated (None: unknown)
    seconds: float  # to the request's last token

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens after the first, per second after the first: the decode rate without the prompt's prefill."""
        if self.ttft_s is None or self.tokens is None or self.tokens < 2 or self.seconds <= self.ttft_s:
            return None
        return (self.tokens - 1) / (self.seconds - self.ttft_s)

    def as_dict(self) -> dict[str, Any]:
        return {"ttft_s": self.ttft_s, "tokens": self.tokens, "seconds": self.seconds}


def run_probe(backend: Any, prompts: Sequence[str], max_tokens: int) -> list[ProbeTiming]:
    """``backend.probe`` when it has one, else ``generate`` timed end to end."""
    probe = getattr(backend, "probe", None)
    if probe is not None:
        timings = list(probe(list(prompts), max_tokens))
        if len(timings) != len(prompts):
            name = type(backend).__name__
            raise ValueError(f"{name}.probe returned {len(timings)} timings for {len(prompts)} prompts")
        return timings
    from ..tasks.base import GenerationRequest

    start = time.perf_counter()
    backend.generate([GenerationRequest(context=p, until=(), max_gen_toks=max_tokens) for p in prompts])
    seconds = time.perf_counter() - start
    return [ProbeTiming(None, None, seconds) for _ in prompts]

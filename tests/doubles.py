"""A deterministic test-double backend, for unit and mechanics tests only (never the demo).

Its "weights" are a small JSON file: ``skill`` is the probability that it prefers the choice
containing the word RIGHT (decided per context by a hash, so reproducible), ``seed`` varies the
noise. Changing the file changes the fingerprint, like changing a weight of a real model.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

LOADS_ENV = "LLMGATE_TEST_LOADS"
# "model-name:N:FLAG": the first process to pass N requests of that model creates FLAG and hard-exits.
CRASH_ENV = "LLMGATE_TEST_CRASH_AFTER"
# "model-name:TEXT": that model raises KeyboardInterrupt (as Ctrl-C would) on a request whose context holds TEXT.
INTERRUPT_ENV = "LLMGATE_TEST_INTERRUPT"


def _unit(*parts: str) -> float:
    digest = hashlib.sha256("\x00".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class SkillBackend:
    """Prefers the RIGHT choice with probability ``skill``; otherwise scores by hash noise."""

    def __init__(self, spec, device: str) -> None:
        self.weights = json.loads(Path(spec.path).read_text())
        self.name = spec.name
        # Each load appends a line, so tests can count loads per process.
        if os.environ.get(LOADS_ENV):
            with open(os.environ[LOADS_ENV], "a") as handle:
                handle.write(f"{os.getpid()} {spec.name}\n")
        self.requests_seen = 0

    @classmethod
    def fingerprint(cls, spec) -> str:
        """Hash of the weights file: one changed value misses the cache."""
        return hashlib.sha256(Path(spec.path).read_bytes()).hexdigest()

    def loglikelihood(self, requests: Sequence) -> list[tuple[float, bool]]:
        """Deterministic per (weights, context, continuation), independent of batching and order."""
        crash_model, crash_count, crash_flag = [*os.environ.get(CRASH_ENV, "").split(":"), "", ""][:3]
        crash_after = int(crash_count) if crash_model == self.name else None
        fail_on = self.weights.get("fail_on")
        out = []
        for request in requests:
            self.requests_seen += 1
            if crash_after is not None and self.requests_seen > crash_after and not os.path.exists(crash_flag):
                Path(crash_flag).touch()
                os._exit(3)  # a hard crash, as a segfaulting CUDA kernel would
            if fail_on and fail_on in request.context:
                raise RuntimeError(f"simulated model failure on {fail_on!r}")
            interrupt_model, _, interrupt_on = os.environ.get(INTERRUPT_ENV, "").partition(":")
            if interrupt_model == self.name and interrupt_on in request.context:
                raise KeyboardInterrupt  # as Ctrl-C in the middle of a forward pass
            if self.weights.get("nan_on") and self.weights["nan_on"] in request.context:
                out.append((float("nan"), False))  # as a float16 overflow would
                continue
            seed = str(self.weights.get("seed", 0))
            knows = _unit(seed, "skill", request.context) < float(self.weights.get("skill", 1.0))
            if "RIGHT" in request.continuation and knows:
                out.append((-0.5, True))
            else:
                out.append((-5.0 - 20.0 * _unit(seed, request.context, request.continuation), False))
        return out

    def generate(self, requests: Sequence) -> list[list[str]]:
        """A GSM8K-style worked answer, deterministic per (weights, context, sample).

        The right answer is the number after ``RIGHT=`` in the last question of the context; the double
        gives it with probability ``skill`` and a wrong number otherwise. Text after the answer starts
        a new ``Question:``, so the stop strings are exercised.
        """
        fail_on = self.weights.get("fail_on")
        seed = str(self.weights.get("seed", 0))
        out = []
        for request in requests:
            if fail_on and fail_on in request.context:
                raise RuntimeError(f"simulated model failure on {fail_on!r}")
            hint = re.findall(r"RIGHT=(-?\d+)", request.context)
            right = int(hint[-1]) if hint else 0
            completions = []
            for k in range(request.samples if request.temperature > 0 else 1):
                # A sample depends on its request's seed, as a seeded sampler's does ("seeded" weights only, so
                # the draws of earlier tests stay as they were).
                draw = f"{k}/{request.seed}" if request.temperature > 0 and self.weights.get("seeded") else str(k)
                knows = _unit(seed, "skill", request.context, draw) < float(self.weights.get("skill", 1.0))
                answer = right if knows else right + 1 + int(9 * _unit(seed, "wrong", request.context, draw))
                text = f" The total is {answer}.\n#### {answer}\n\nQuestion: something else"
                for stop in request.until:
                    if stop:
                        text = text.split(stop)[0]
                completions.append(text)
            out.append(completions)
        return out

    def close(self) -> None:
        """Nothing to free."""


class JudgeBackend:
    """A judge double: of two answers to a ``RIGHT=<n>`` question, prefers the one that ends in ``#### n``.

    Weights: ``bias`` "A" or "B" answers that letter whatever it reads (a position-biased judge);
    ``reply`` answers that text instead (e.g. an unparseable one); ``fail`` raises, as a judge server that is down.
    """

    def __init__(self, spec, device: str) -> None:
        self.weights = json.loads(Path(spec.path).read_text())
        if os.environ.get(LOADS_ENV):
            with open(os.environ[LOADS_ENV], "a") as handle:
                handle.write(f"{os.getpid()} {spec.name}\n")

    @classmethod
    def fingerprint(cls, spec) -> str:
        return hashlib.sha256(Path(spec.path).read_bytes()).hexdigest()

    def generate(self, requests: Sequence) -> list[list[str]]:
        if self.weights.get("fail"):
            raise RuntimeError("the judge server answered 503")
        out = []
        for request in requests:
            if "reply" in self.weights:
                out.append([self.weights["reply"]])
                continue
            if "bias" in self.weights:
                out.append([f" {self.weights['bias']}"])
                continue
            right = re.findall(r"RIGHT=(-?\d+)", request.context)[0]
            a = request.context.split("Answer A:")[1].split("Answer B:")[0]
            b = request.context.split("Answer B:")[1].split("Reply with")[0]
            good_a, good_b = f"#### {right}\n" in a + "\n", f"#### {right}\n" in b + "\n"
            out.append([" A" if good_a and not good_b else " B" if good_b and not good_a else " tie"])
        return out

    def close(self) -> None:
        """Nothing to free."""

"""Few-shot example selection, replaying lm-evaluation-harness 0.4's samplers draw for draw.

lm-eval seeds one ``random.Random(1234)`` per task and draws the examples of each evaluated
document in turn, so the examples of document *i* depend on the draws made for documents
0..i-1. We replay that sequence over the whole evaluation split: item *i* always gets the
examples lm-eval gives it in a full run (or any ``--limit`` run), whatever subset we evaluate,
and an item's prompt (and so its cache key) does not change with ``limit``.

``random.Random.sample`` only looks at the population's length, so drawing indices from
``range(len(pool))`` picks exactly the documents lm-eval picks from the list itself.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .data import DatasetRef

DEFAULT_FEWSHOT_SEED = 1234  # lm-eval's DEFAULT_OTHER_SEED / --fewshot_random_seed


@dataclass(frozen=True)
class FewShotSource:
    """Where a task's examples come from and how lm-eval picks them.

    ``split`` is the examples' split (None: fixed ``samples`` written in the task).
    ``exclude_eval_doc`` mirrors lm-eval's test ``fewshot_split == test_split``, which is also
    true when a task sets neither (HellaSwag, WinoGrande, TruthfulQA): lm-eval then draws
    ``n + 1`` documents and drops any equal to the evaluated one. It changes the random
    sequence, so it must be copied exactly, not inferred.
    """

    split: DatasetRef | None
    sampler: Literal["default", "first_n"] = "default"
    exclude_eval_doc: bool = False
    samples: tuple[dict[str, Any], ...] = ()


def first_n(pool: Sequence[Any], n: int, eval_doc: Any = None) -> list[int]:
    """lm-eval's FirstNSampler: the first ``n`` of the pool (without the evaluated doc)."""
    indices = [i for i, doc in enumerate(pool) if eval_doc is None or doc != eval_doc]
    if n > len(indices):
        raise ValueError(f"{n} few-shot examples requested but the few-shot split holds only {len(indices)}")
    return indices[:n]


def replay_default(
    pool: Sequence[Any], eval_docs: Sequence[Any], n: int, *, seed: int, exclude_eval_doc: bool
) -> list[list[int]]:
    """Indices into ``pool`` of each evaluated doc's examples, in lm-eval's order of draws."""
    if n > len(pool):
        raise ValueError(f"{n} few-shot examples requested but the few-shot split holds only {len(pool)}")
    rnd = random.Random(seed)
    everything = range(len(pool))
    drawn = []
    for doc in eval_docs:
        if not exclude_eval_doc:
            drawn.append(rnd.sample(everything, n))
            continue
        picked = [i for i in rnd.sample(everything, n + 1) if pool[i] != doc][:n]
        if len(picked) < n:
            # lm-eval's fallback when copies of the evaluated doc were drawn: resample without them.
            others = [i for i in everything if pool[i] != doc]
            picked = [others[k] for k in rnd.sample(range(len(others)), n)]
        drawn.append(picked)
    return drawn

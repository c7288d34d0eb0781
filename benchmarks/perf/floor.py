"""The compute floor of a log-likelihood workload: forward time of exactly the tokens the task needs.

Definition (the issue's): every token the requests need goes through the model once and only once —
a prefix shared by all contexts of a shard (few-shot examples) once, each item's context once, each
choice's tokens once (``(context + continuation)[:-1]``, merged in a token trie per item, so WinoGrande's
words before the blank count once) — plus the output head over the positions that predict continuation
tokens. Those tokens are forwarded in the engine's batch geometry: shards of ``shard_size`` consecutive
items of one group as the engine sends them, the shard's shared prefix once with its keys and values
reused, each item's tokens as one sequence, sequences concatenated into rows as wide as the shard's longest
item (at least 128 tokens, as the packed scorer lays them out), ``BatchSizer``'s rows and tokens per pass
(64 / 2048 on the CPU), and plain causal attention with no mask at all. No padding but at the end of the
last rows and no mask is the cheapest shape for those tokens (attention across the items packed in a row
costs a little more than the tree mask's, which the floor counts in its own favour only on the matmuls),
so the floor does not depend on how our scorer lays them out.

The floor is measured in the calling process with the model already loaded (no start-up, no tokenizing,
no harness): ``wall / floor`` of an end-to-end run is then everything the run costs above the
irreducible forward passes. Run it in the same session as the wall times it is compared with.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Floor:
    seconds: float
    tokens: int  # unique tokens forwarded
    scored: int  # positions through the output head
    passes: int


def item_rows(encoded: Sequence[tuple[list[int], list[int]]], shared: int) -> tuple[list[int], int]:
    """(one item's unique tokens after ``shared`` as one sequence in trie order, number of distinct positions
    that predict a continuation token)."""
    from pytest_llmgate.models.packed_scoring import TokenTree

    tree = TokenTree()
    scored: set[int] = set()
    for context, continuation in encoded:
        nodes = tree.insert(list(context[shared:]) + list(continuation[:-1]))
        rest = len(context) - shared
        scored.update(nodes[rest - 1 : rest - 1 + len(continuation)])
    return tree.tokens, len(scored)


def pack(rows: list[tuple[list[int], int]], min_width: int = 128) -> list[tuple[list[int], int]]:
    """Item rows concatenated, longest first, into rows as wide as the longest (at least ``min_width``): the
    unique tokens with next to no padding. (tokens, scored positions) per packed row."""
    rows = sorted(rows, key=lambda r: -len(r[0]))
    width = max([min_width, *(len(r[0]) for r in rows)])
    packed: list[tuple[list[int], int]] = []
    for tokens, scored in rows:
        for i, (have, count) in enumerate(packed):
            if len(have) + len(tokens) <= width:
                packed[i] = (have + tokens, count + scored)
                break
        else:
            packed.append((list(tokens), scored))
    return sorted(packed, key=lambda r: -len(r[0]))


def measure_floor(backend: Any, shards: Sequence[Sequence[Sequence[Any]]]) -> Floor:
    """Forward time of the unique tokens of ``shards`` (each a list of items, each item its loglikelihood
    requests) on a loaded ``TransformersBackend``."""
    import torch

    from pytest_llmgate.models.batching import BatchSizer
    from pytest_llmgate.models.kv_scoring import cache_argument, layered_cache, returned_cache, shared_prefix

    model = backend.model
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    sizer = BatchSizer(backend.spec.batch_size, backend.device)
    prepared = []
    for shard in shards:
        items = [[backend.encode_pair(backend._context_text(r), r.continuation) for r in item] for item in shard]
        contexts = list({tuple(c): None for item in items for c, _ in item})
        shared = shared_prefix(contexts)
        prepared.append((list(contexts[0][:shared]), pack([item_rows(item, shared) for item in items])))
    tokens = scored_total = passes = 0
    seconds = 0.0
    cache_arg = cache_argument(decoder.forward)
    with torch.inference_mode():
        for prefix, rows in prepared:
            start = time.perf_counter()
            past = None
            if prefix:
                out = decoder(input_ids=torch.tensor([prefix]), use_cache=True)
                past = [(layer.keys, layer.values) for layer in returned_cache(out, cache_arg).layers]
            begin = 0
            while begin < len(rows):
                count = sizer.take([len(r[0]) for r in rows[begin : begin + sizer.rows]])
                batch = rows[begin : begin + count]
                width = len(batch[0][0])
                ids = torch.zeros((len(batch), width), dtype=torch.long)
                for r, (row, _) in enumerate(batch):
                    ids[r, : len(row)] = torch.tensor(row)
                kwargs: dict[str, Any] = {}
                if past is not None:
                    cache = layered_cache(
                        model.config,
                        [(k.expand(len(batch), -1, -1, -1), v.expand(len(batch), -1, -1, -1)) for k, v in past],
                    )
                    kwargs = {cache_arg: cache, "use_cache": True}
                positions = (len(prefix) + torch.arange(width))[None].expand(len(batch), -1)
                # No mask: plain causal attention, the cheapest form (padding only at the end of the last rows).
                hidden = decoder(input_ids=ids, position_ids=positions, **kwargs).last_hidden_state
                # The output head over as many positions as the batch scores.
                picked = torch.cat([hidden[r, : min(s, width)] for r, (_, s) in enumerate(batch)])
                torch.log_softmax(head(picked), dim=-1)
                tokens += sum(len(row) for row, _ in batch)
                scored_total += sum(s for _, s in batch)
                passes += 1
                begin += count
            seconds += time.perf_counter() - start
            tokens += len(prefix)
    return Floor(seconds, tokens, scored_total, passes)


def main(argv: Sequence[str] | None = None) -> int:
    """Our scoring of each workload against its floor in this one process, interleaved round by round (the
    fastest of each counts): ``scoring / floor`` without start-up, free of the drift between separate runs."""
    import argparse
    import warnings
    from pathlib import Path

    from pytest_llmgate.config import BUILTIN_SMOLLM2, ModelSpec
    from pytest_llmgate.models import load_backend
    from pytest_llmgate.tasks import TASKS, TaskOptions

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--model", default=BUILTIN_SMOLLM2, help="a model path (default: the built-in SmolLM2)")
    parser.add_argument("--workload", action="append", required=True, help="task:shots:items")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    backend = load_backend(ModelSpec(name="m", path=args.model), device="cpu", work_dir=Path("/tmp/llmgate-floor"),
                           fingerprint="floor")
    print("| workload | items | unique tokens | floor s (min) | ours s (min) | ours / floor | rounds |")
    print("|---|---|---|---|---|---|---|")
    for text in args.workload:
        name, shots, count = text.split(":")
        items, _ = TASKS[name].configured(TaskOptions(num_fewshot=int(shots))).load(args.data_dir, int(count))
        shards: dict[tuple[str, int], list[list[Any]]] = {}
        for item in items:
            shards.setdefault((item.group, item.doc_id // 32), []).append(list(item.requests))
        floors, ours = [], []
        floor = None
        for _ in range(args.rounds):
            floor = measure_floor(backend, list(shards.values()))
            floors.append(floor.seconds)
            start = time.perf_counter()
            for shard in shards.values():
                backend.loglikelihood([r for item in shard for r in item])
            ours.append(time.perf_counter() - start)
        assert floor is not None
        print(f"| {name} {shots}-shot | {len(items)} | {floor.tokens} | {min(floors):.1f} | {min(ours):.1f} | "
              f"{min(ours) / min(floors):.2f} | {args.rounds} |", flush=True)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())

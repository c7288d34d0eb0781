"""Log-likelihoods with key/value-cache reuse: each context computed once, shared few-shot prefixes once.

lm-evaluation-harness runs ``(context + continuation)[:-1]`` through the model for every choice of
every item. Here, for the requests of one call (the engine passes a shard: items of one task and
one group, e.g. one MMLU subject):

1. the longest token prefix shared by all contexts (the description and few-shot examples) runs
   once and its keys and values are reused by every item;
2. each distinct context (one per item) runs once after that prefix; the logits at its last
   position score the first token of every choice, so one-token choices (MMLU's letters) need
   no further forward pass;
3. the remaining tokens of longer choices run on a copy of their item's cache.

Tokens are exactly lm-eval's (``encode_pair``); only the order of the arithmetic differs from one
full forward pass, so log-likelihoods agree to float rounding (tests pin the tolerance).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from typing import Any

from .batching import BatchSizer, is_out_of_memory

MIN_SHARED_PREFIX = 8  # tokens; shorter shared prefixes are not worth a separate pass


def common_prefix(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix shared by every sequence."""
    if not sequences:
        return 0
    first = sequences[0]
    length = min(len(s) for s in sequences)
    for s in sequences[1:]:
        n = 0
        while n < length and s[n] == first[n]:
            n += 1
        length = n
        if length == 0:
            break
    return length


def shared_prefix(sequences: Sequence[Sequence[int]]) -> int:
    """How many leading tokens every one of ``sequences`` shares and is worth computing once: the common prefix,
    leaving each sequence at least one token of its own (its last position is the one read), and 0 when that is
    under :data:`MIN_SHARED_PREFIX` tokens or there is only one sequence."""
    if len(sequences) < 2:
        return 0
    shared = min(common_prefix(sequences), min(len(s) for s in sequences) - 1)
    return shared if shared >= MIN_SHARED_PREFIX else 0


# The output head runs over at most this many bytes of logits a pass (and as many of log-probabilities): vocabulary-wide
# rows of a few thousand positions are hundreds of MB, which the CPU allocator maps afresh (and faults in) on every
# call, while blocks up to 32 MiB are reused from its heap (``memory.keep_freed_memory``).
HEAD_PASS_BYTES = 24 << 20
# ... and at least this many positions a pass: fewer rows take another matrix-product kernel on the CPU (rounding
# differs in the last bits), so passes of 64 or more keep the values of one pass over all positions.
MIN_HEAD_ROWS = 64


def head_passes(count: int, vocabulary: int, itemsize: int = 4) -> list[slice]:
    """``count`` positions cut into output-head passes of even size, each within :data:`HEAD_PASS_BYTES` of logits
    where that leaves at least :data:`MIN_HEAD_ROWS` positions a pass (one pass when there are fewer)."""
    most = max(MIN_HEAD_ROWS, HEAD_PASS_BYTES // max(1, vocabulary * itemsize))
    passes = max(1, min(-(-count // most), count // MIN_HEAD_ROWS))
    bounds = [count * k // passes for k in range(passes + 1)]
    return [slice(bounds[k], bounds[k + 1]) for k in range(passes)]


def token_scores(head: Any, hidden: Any, rows: Any, targets: Any) -> tuple[Any, Any]:
    """For each ``(rows[j], targets[j])``: the log-probability of token ``targets[j]`` after ``hidden[rows[j]]`` and
    whether it is the greedy token. Each row of ``hidden`` goes through the output head once (rows may repeat in
    ``rows``: the choices of an item all read their first token at the context's last position), in
    :func:`head_passes`; log_softmax in the logits' dtype, as lm-eval."""
    import torch

    picked = torch.empty(len(targets), dtype=hidden.dtype, device=hidden.device)
    greedy = torch.empty(len(targets), dtype=torch.bool, device=hidden.device)
    vocabulary = int(getattr(head, "out_features", 0) or head.weight.shape[0])
    for part in head_passes(len(hidden), vocabulary, hidden.element_size()):
        logprobs = torch.log_softmax(head(hidden[part]), dim=-1)
        inside = ((rows >= part.start) & (rows < part.stop)).nonzero().squeeze(1)
        local = rows[inside] - part.start
        picked[inside] = logprobs[local, targets[inside]]
        greedy[inside] = logprobs.argmax(dim=-1)[local] == targets[inside]
    return picked, greedy


def span_scores(head: Any, spans: Sequence[Any], targets: Sequence[Any]) -> list[tuple[float, bool]]:
    """(summed log-probability, all greedy) of each target token row, from the hidden states that
    predict it (:func:`token_scores`)."""
    import torch

    hidden = torch.cat(list(spans))
    every = torch.arange(len(hidden), device=hidden.device)
    picked, greedy = token_scores(head, hidden, every, torch.cat(list(targets)))
    out = []
    offset = 0
    for t in targets:
        n = len(t)
        out.append((float(picked[offset : offset + n].sum()), bool(greedy[offset : offset + n].all())))
        offset += n
    return out


def cache_argument(forward: Any) -> str:
    """The name of the cache argument of a model's (or decoder's) ``forward``: ``cache`` in transformers 5 and on the
    native Llama, ``past_key_values`` in transformers 4.x."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def returned_cache(out: Any, argument: str) -> Any:
    """The cache a forward pass called with ``argument`` (:func:`cache_argument`) returned: transformers 5 and the
    native Llama return ``cache`` (reading ``past_key_values`` logs a deprecation in 5), 4.x ``past_key_values``."""
    return getattr(out, "cache", None) if argument == "cache" else out.past_key_values


def layered_cache(config: Any, layers: Iterable[tuple[Any, Any]]) -> Any:
    """A transformers ``DynamicCache`` holding each layer's (keys, values), in order; empty for none."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    for index, (keys, values) in enumerate(layers):
        cache.update(keys, values, index)
    return cache


class DecoderScorer:
    """What the log-likelihood scorers share: a decoder-only transformers model's decoder and output head, the
    batch sizer, and running tokens with a cache of plain per-layer (keys, values) tensors."""

    def __init__(self, model: Any, device: str, sizer: BatchSizer | None = None) -> None:
        import torch

        self.torch = torch
        self.model = model
        self.decoder = model.get_decoder()
        self.head = model.get_output_embeddings()
        self.device = device
        self.dtype = next(model.parameters()).dtype
        # Rows and cached tokens (rows x length) per pass: bounds peak memory, backs off on out-of-memory.
        self.sizer = sizer or BatchSizer("auto", device)
        self.cache_arg = cache_argument(self.decoder.forward)

    @property
    def config(self) -> Any:
        """The model's transformers configuration, read when a cache is built (``native_llama`` builds it then)."""
        return self.model.config

    def _run(self, ids: Any, mask: Any, positions: Any, past: list[tuple[Any, Any]] | None) -> tuple[Any, Any]:
        cache = layered_cache(self.config, past or ())
        out = self.decoder(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **{self.cache_arg: cache}
        )
        state = returned_cache(out, self.cache_arg)
        assert state is not None, "the decoder returned no cache although use_cache=True"
        return out.last_hidden_state, [(layer.keys, layer.values) for layer in state.layers]

    def _prefix(self, contexts: Sequence[Sequence[int]]) -> tuple[int, list[tuple[Any, Any]] | None]:
        """(tokens every context shares, ``shared_prefix``; their keys and values, computed once, or None)."""
        torch = self.torch
        shared = shared_prefix(contexts)
        if not shared:
            return 0, None
        ids = torch.tensor([list(contexts[0][:shared])], device=self.device)
        _, past = self._run(ids, torch.ones_like(ids), torch.arange(shared, device=self.device)[None], None)
        return shared, past


class KVScorer(DecoderScorer):
    """Scores (context tokens, continuation tokens) pairs on a decoder-only transformers model."""

    @staticmethod
    def _rows(past: list[tuple[Any, Any]], index: Any) -> list[tuple[Any, Any]]:
        return [(k.index_select(0, index), v.index_select(0, index)) for k, v in past]

    def score(self, encoded: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(summed log-probability, greedy) per (context, continuation) pair."""
        results: list[tuple[float, bool] | None] = [None] * len(encoded)
        by_context: dict[tuple[int, ...], list[int]] = {}
        for i, (context, _) in enumerate(encoded):
            by_context.setdefault(tuple(context), []).append(i)
        contexts = list(by_context)
        shared, prefix_past = self._prefix(contexts)
        # Longest remaining context first: batches of similar length waste little padding.
        contexts.sort(key=lambda c: -len(c))

        def step(batch: Sequence[tuple[int, ...]]) -> Sequence[tuple[int, ...]]:
            self._score_batch(list(batch), by_context, encoded, shared, len(batch[0]) - shared, prefix_past, results)
            return batch

        self.sizer.run(contexts, len, step)
        return [r if r is not None else (float("nan"), False) for r in results]

    def _score_batch(
        self,
        batch: list[tuple[int, ...]],
        by_context: dict[tuple[int, ...], list[int]],
        encoded: Sequence[tuple[list[int], list[int]]],
        shared: int,
        width: int,
        prefix_past: list[tuple[Any, Any]] | None,
        results: list[tuple[float, bool] | None],
    ) -> None:
        torch = self.torch
        device = self.device
        n = len(batch)
        ids = torch.zeros((n, width), dtype=torch.long)
        mask = torch.zeros((n, shared + width), dtype=torch.long)
        mask[:, :shared] = 1
        lengths = []
        for r, context in enumerate(batch):
            rest = context[shared:]
            ids[r, : len(rest)] = torch.tensor(rest)
            mask[r, shared : shared + len(rest)] = 1
            lengths.append(len(rest))
        past = None
        if prefix_past is not None:
            past = [(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in prefix_past]
        positions = (shared + torch.arange(width))[None].expand(n, -1)
        hidden, cache = self._run(ids.to(device), mask.to(device), positions.to(device), past)
        last = hidden[torch.arange(n, device=hidden.device), torch.tensor(lengths, device=hidden.device) - 1]
        first = torch.log_softmax(self.head(last), dim=-1)  # as lm-eval: in the logits' dtype
        first_greedy = first.argmax(dim=-1)
        longer: list[tuple[int, int]] = []  # (batch row, request index) of choices longer than a token
        partial: dict[int, tuple[float, bool]] = {}
        for r, context in enumerate(batch):
            for i in by_context[context]:
                continuation = encoded[i][1]
                partial[i] = (float(first[r, continuation[0]]), bool(first_greedy[r] == continuation[0]))
                if len(continuation) > 1:
                    longer.append((r, i))
                else:
                    results[i] = partial[i]
        if not longer:
            return
        cached = shared + width
        widest = cached + max(len(encoded[i][1]) for _, i in longer)
        begin = 0
        while begin < len(longer):
            chunk = longer[begin : begin + self.sizer.take([widest] * (len(longer) - begin))]
            try:
                out = self._continue(chunk, encoded, mask, cache, shared, lengths)
            except Exception as error:  # out of memory: fewer choices per pass (one choice: the caller's turn)
                if not is_out_of_memory(error):
                    raise
                self.sizer.shrink(len(chunk), widest, error)
                continue
            spans, targets = [], []
            for c, (_, i) in enumerate(chunk):
                continuation = encoded[i][1]
                spans.append(out[c, : len(continuation) - 1])
                targets.append(torch.tensor(continuation[1:], device=device))
            for (_, i), (tail_ll, tail_greedy) in zip(chunk, span_scores(self.head, spans, targets), strict=True):
                head_ll, head_greedy = partial[i]
                results[i] = (head_ll + tail_ll, head_greedy and tail_greedy)
            begin += len(chunk)

    def _continue(
        self,
        chunk: Sequence[tuple[int, int]],
        encoded: Sequence[tuple[list[int], list[int]]],
        mask: Any,
        cache: list[tuple[Any, Any]],
        shared: int,
        lengths: Sequence[int],
    ) -> Any:
        """Hidden states of each (batch row, request) continuation's tokens but its last, run on a copy of its
        row's context cache."""
        torch = self.torch
        cached = mask.shape[1]
        tail = max(len(encoded[i][1]) - 1 for _, i in chunk)
        tokens = torch.zeros((len(chunk), tail), dtype=torch.long)
        chunk_mask = torch.zeros((len(chunk), cached + tail), dtype=torch.long)
        chunk_positions = torch.zeros((len(chunk), tail), dtype=torch.long)
        for c, (r, i) in enumerate(chunk):
            rest = encoded[i][1][:-1]
            tokens[c, : len(rest)] = torch.tensor(rest)
            chunk_mask[c, :cached] = mask[r]
            chunk_mask[c, cached : cached + len(rest)] = 1
            chunk_positions[c] = shared + lengths[r] + torch.arange(tail)
        rows = torch.tensor([r for r, _ in chunk], device=cache[0][0].device)
        out, _ = self._run(
            tokens.to(self.device), chunk_mask.to(self.device), chunk_positions.to(self.device), self._rows(cache, rows)
        )
        return out

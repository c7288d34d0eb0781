"""Log-likelihoods in one forward pass per item: context and every choice together, a tree attention mask.

The key/value scorer (``kv_scoring``) runs each context once and then each choice's tokens on a copy
of the context's cache: two passes, and a cache copy per choice. Here every token the requests of a
call need is computed exactly once, in one pass:

1. the longest token prefix shared by all contexts (few-shot examples) runs once, as in ``kv_scoring``,
   and its keys and values are reused by every row;
2. the remaining input tokens of the requests (``(context + continuation)[:-1]`` after that prefix)
   are merged into a token tree (a trie): a context shared by the choices of a multiple-choice item is
   one branch with a sub-branch per choice; WinoGrande's two contexts, which differ only from the
   blank on, share the words before it. Contexts are merged when they share at least
   :data:`MIN_MERGED_PREFIX` tokens, so unrelated items do not grow one row without bound;
3. each tree is laid out as one sequence in which a token attends only to its ancestors (a 4-D mask)
   and carries its depth as its position, so it sees exactly what it would see in its own plain
   sequence; short trees are packed side by side into one row (block-diagonal), so rows need little
   padding;
4. the hidden states that predict each continuation token go through the output head once each.

Tokens are exactly lm-eval's (``encode_pair``); only the shape of the arithmetic differs from one plain
forward pass per request, so log-likelihoods agree to float rounding (tests pin the tolerance).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .kv_scoring import DecoderScorer, common_prefix, layered_cache, token_scores

# Two contexts share one tree when their tokens after the call's shared prefix agree on at least this
# many tokens (WinoGrande's words before the blank); below it the trees are only packed side by side.
MIN_MERGED_PREFIX = 4
# A row holds packed trees up to the longest tree of the call, and at least this many tokens.
MIN_ROW_TOKENS = 128


@dataclass
class TokenTree:
    """A trie of token sequences laid out flat: node order is insertion order, so parents come first."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)  # -1: a root
    depths: list[int] = field(default_factory=list)
    children: dict[tuple[int, int], int] = field(default_factory=dict)  # (parent, token) -> node

    def insert(self, sequence: Sequence[int]) -> list[int]:
        """Add ``sequence``; the node of each of its tokens."""
        nodes = []
        parent = -1
        for token in sequence:
            node = self.children.get((parent, token))
            if node is None:
                node = len(self.tokens)
                self.children[(parent, token)] = node
                self.tokens.append(token)
                self.parents.append(parent)
                self.depths.append(0 if parent < 0 else self.depths[parent] + 1)
            nodes.append(node)
            parent = node
        return nodes

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class PackedRow:
    """Trees side by side in one sequence, and where each request's scored positions lie in it."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)
    # request index -> row positions whose hidden states predict its continuation tokens
    scored: dict[int, list[int]] = field(default_factory=dict)

    def add(self, tree: TokenTree, scored: dict[int, list[int]]) -> None:
        offset = len(self.tokens)
        self.tokens += tree.tokens
        self.parents += [p + offset if p >= 0 else -1 for p in tree.parents]
        self.depths += tree.depths
        for request, nodes in scored.items():
            self.scored[request] = [n + offset for n in nodes]


def group_contexts(contexts: Sequence[tuple[int, ...]], min_merged: int = MIN_MERGED_PREFIX) -> list[list[int]]:
    """Indices of ``contexts`` (token tuples) in groups whose members share a prefix of ``min_merged`` tokens
    with the group's first member; groups in sorted order of their contexts, so the result is deterministic."""
    order = sorted(range(len(contexts)), key=lambda i: contexts[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and common_prefix([contexts[groups[-1][0]], contexts[i]]) >= min_merged:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def build_rows(
    encoded: Sequence[tuple[Sequence[int], Sequence[int]]], shared: int, min_merged: int = MIN_MERGED_PREFIX
) -> list[PackedRow]:
    """The rows of packed token trees that score every (context, continuation) pair after ``shared`` tokens."""
    by_context: dict[tuple[int, ...], list[int]] = {}
    for i, (context, _) in enumerate(encoded):
        by_context.setdefault(tuple(context[shared:]), []).append(i)
    contexts = list(by_context)
    trees: list[tuple[TokenTree, dict[int, list[int]]]] = []
    for group in group_contexts(contexts, min_merged):
        tree = TokenTree()
        scored: dict[int, list[int]] = {}
        for g in group:
            for i in by_context[contexts[g]]:
                context, continuation = encoded[i]
                rest = len(context) - shared
                nodes = tree.insert(list(context[shared:]) + list(continuation[:-1]))
                # The hidden state of the context's last token predicts the first continuation token, and so on.
                scored[i] = nodes[rest - 1 : rest - 1 + len(continuation)]
        trees.append((tree, scored))
    # First fit, longest tree first, into rows as wide as the longest tree: packing adds no padding.
    trees.sort(key=lambda t: -len(t[0]))
    capacity = max(MIN_ROW_TOKENS, len(trees[0][0])) if trees else 0
    rows: list[PackedRow] = []
    for tree, scored in trees:
        for row in rows:
            if len(row.tokens) + len(tree) <= capacity:
                row.add(tree, scored)
                break
        else:
            rows.append(PackedRow())
            rows[-1].add(tree, scored)
    rows.sort(key=lambda r: -len(r.tokens))
    return rows


class PackedScorer(DecoderScorer):
    """Scores (context tokens, continuation tokens) pairs on a decoder-only transformers model, every needed
    token once: the shared prefix once (its cache reused), then packed token trees with a tree attention mask."""

    def score(self, encoded: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(summed log-probability, greedy) per (context, continuation) pair."""
        if not encoded:
            return []
        shared, prefix_past = self._prefix(list({tuple(c): None for c, _ in encoded}))
        rows = build_rows(encoded, shared)
        results: list[tuple[float, bool] | None] = [None] * len(encoded)

        def step(batch: Sequence[PackedRow]) -> Sequence[PackedRow]:
            self._score_rows(batch, encoded, shared, prefix_past, results)
            return batch

        self.sizer.run(rows, lambda r: len(r.tokens), step)
        return [r if r is not None else (float("nan"), False) for r in results]

    def _mask(self, batch: Sequence[PackedRow], shared: int, width: int) -> Any:
        """(rows, 1, width, shared + width) additive mask: each token sees the shared prefix and its ancestors;
        a padding position sees only itself (a row of nothing but -inf would give NaN)."""
        import numpy as np

        torch = self.torch
        allowed = np.zeros((len(batch), width, shared + width), dtype=bool)
        allowed[:, :, :shared] = True
        for r, row in enumerate(batch):
            visible = allowed[r, :, shared:]
            for node, parent in enumerate(row.parents):
                if parent >= 0:
                    visible[node] = visible[parent]
                visible[node, node] = True
            for pad in range(len(row.tokens), width):
                visible[pad, pad] = True
        allowed = torch.from_numpy(allowed)
        mask = torch.zeros(allowed.shape, dtype=self.dtype)
        mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)
        return mask[:, None].to(self.device)

    def _score_rows(
        self,
        batch: Sequence[PackedRow],
        encoded: Sequence[tuple[list[int], list[int]]],
        shared: int,
        prefix_past: list[tuple[Any, Any]] | None,
        results: list[tuple[float, bool] | None],
    ) -> None:
        torch = self.torch
        n = len(batch)
        width = max(len(row.tokens) for row in batch)
        ids = torch.zeros((n, width), dtype=torch.long)
        positions = torch.zeros((n, width), dtype=torch.long)
        for r, row in enumerate(batch):
            ids[r, : len(row.tokens)] = torch.tensor(row.tokens)
            positions[r, : len(row.depths)] = torch.tensor(row.depths) + shared
        kwargs: dict[str, Any] = {}
        if prefix_past is not None:
            kwargs[self.cache_arg] = layered_cache(
                self.config, [(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in prefix_past]
            )
        hidden = self.decoder(
            input_ids=ids.to(self.device),
            attention_mask=self._mask(batch, shared, width),
            position_ids=positions.to(self.device),
            use_cache=prefix_past is not None,
            **kwargs,
        ).last_hidden_state
        # Each scored position once through the output head (a multiple-choice item's choices all read their first
        # token's distribution at the context's last token).
        where: dict[int, int] = {}
        rows: list[int] = []
        targets: list[int] = []
        spans: list[tuple[int, int, int]] = []  # (request, first pair, pairs)
        for r, row in enumerate(batch):
            for i, nodes in row.scored.items():
                spans.append((i, len(rows), len(nodes)))
                for node in nodes:
                    rows.append(where.setdefault(r * width + node, len(where)))
                targets += encoded[i][1]
        device = hidden.device
        flat = hidden.reshape(n * width, -1)[torch.tensor(list(where), device=device)]
        picked, greedy = token_scores(
            self.head, flat, torch.tensor(rows, device=device), torch.tensor(targets, device=device)
        )
        for i, first, count in spans:
            results[i] = (float(picked[first : first + count].sum()), bool(greedy[first : first + count].all()))

"""Decoding with a prefix every row shares held once, not once per row: attention in two parts.

A fixed-shot generation task (GSM8K chain-of-thought's eight examples) starts every prompt with the same few
hundred tokens. ``generation.Decoder`` computes their keys and values once, but a transformers cache holds a tensor
per layer with the batch as its first dimension: the prefix sits in the cache once per row, and every decoding step
reads each row's copy. With 30 rows and an 800-token prefix that copy is most of a step's memory traffic and most of
the cache's memory, so fewer rows fit the decoding budget and the task needs more steps.

Here the running batch's cache holds each row's own tokens only, and the prefix travels with the forward pass (the
``shared_prefix`` keyword, which transformers hands through its layers to the attention function). Attention then
runs in two parts: every row's queries against the one copy of the prefix's keys (per key/value head, a single
matrix product for all rows and the query heads that share the key/value head), and against the row's own keys as
usual (with its mask); one softmax over both parts' scores, and the two weighted sums of values added. That is
attention over the concatenated keys, computed in a different order: the results equal SDPA's to float rounding.

The prompts' prefill passes (each row's own tokens after the prefix) and the decoding steps both take this path, so
no row's cache ever holds the prefix; a prefill pass materializes its scores (queries x heads x keys), which
``Decoder`` bounds by cutting the passes (``generation.PREFIX_SCORES_BYTES``). It applies to models on transformers'
"sdpa" attention whose cache layers are plain ``DynamicLayer`` s (``Decoder`` checks both): within
:func:`prefix_attention` the model's config names this module's attention function, which is SDPA's own whenever no
prefix is passed. The native Llama (``native_llama``) calls :func:`attention` itself when a prefix is passed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

ATTENTION = "llmgate_shared_prefix"


@dataclass(frozen=True)
class SharedPrefix:
    """Each layer's (keys, values) of the prefix, shape (1, key/value heads, prefix tokens, head size)."""

    layers: Sequence[tuple[Any, Any]]

    @property
    def length(self) -> int:
        return int(self.layers[0][0].shape[-2])


def attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """transformers' attention-function signature: SDPA's attention without ``shared_prefix``; with it, attention
    over the prefix's keys and values followed by ``key``/``value`` (each row's own), as one softmax.

    Shapes: query (rows, heads, queries, head size), key and value (rows, key/value heads, own keys, head size),
    ``attention_mask`` None (causal within the own keys, aligned to their end) or a boolean (allowed) or additive
    mask (rows, 1, queries, own keys). Returns (rows, queries, heads, head size), as SDPA's function does."""
    import torch

    prefix: SharedPrefix | None = kwargs.pop("shared_prefix", None)
    if prefix is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    prefix_keys, prefix_values = prefix.layers[module.layer_idx]
    rows, heads, queries, size = query.shape
    kv_heads, own = key.shape[1], key.shape[2]
    group = heads // kv_heads
    scale = scaling if scaling is not None else size**-0.5
    # Query head h reads key/value head h // group (transformers' repeat_kv): group the query heads by the
    # key/value head they read, with their queries, as the rows of one matrix product per key/value head.
    grouped = query.reshape(rows, kv_heads, group * queries, size)
    across = grouped.transpose(0, 1).reshape(kv_heads, rows * group * queries, size)
    on_prefix = torch.matmul(across, prefix_keys[0].transpose(-1, -2))  # (kv heads, rows*group*queries, prefix)
    on_prefix = on_prefix.reshape(kv_heads, rows, group * queries, -1).transpose(0, 1)
    on_own = torch.matmul(grouped, key.transpose(-1, -2))  # (rows, kv heads, group*queries, own)
    if attention_mask is None:
        allowed = torch.ones((queries, own), dtype=torch.bool, device=query.device).tril(own - queries)
        on_own = on_own.masked_fill(~allowed.repeat(group, 1), float("-inf"))
    else:
        mask = attention_mask.expand(rows, 1, queries, own).repeat(1, 1, group, 1)
        on_own = on_own.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else on_own + mask
    scores = torch.cat([on_prefix, on_own], dim=-1).float() * scale
    weights = torch.softmax(scores, dim=-1).to(value.dtype)
    length = prefix.length
    from_prefix = torch.matmul(
        weights[..., :length].transpose(0, 1).reshape(kv_heads, rows * group * queries, length), prefix_values[0]
    )
    out = from_prefix.reshape(kv_heads, rows, group * queries, size).transpose(0, 1)
    out = out + torch.matmul(weights[..., length:], value)
    return out.reshape(rows, heads, queries, size).transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(ATTENTION, attention)
    AttentionMaskInterface.register(ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


@contextmanager
def prefix_attention(model: Any) -> Iterator[bool]:
    """Within: ``model`` attends through :func:`attention` and yields True, when it runs on SDPA attention;
    otherwise nothing changes and it yields False. A model that calls :func:`attention` itself for ``shared_prefix``
    (``native_llama``, flagged ``attends_shared_prefix``) needs no switch, and transformers' attention registry is
    not imported for it."""
    if getattr(model, "attends_shared_prefix", False):
        yield True
        return
    config = model.config
    if getattr(config, "_attn_implementation", None) != "sdpa":
        yield False
        return
    _register()
    config._attn_implementation = ATTENTION
    try:
        yield True
    finally:
        config._attn_implementation = "sdpa"

"""Text generation as lm-evaluation-harness 0.4's ``HFLM.generate_until``, batched with a key/value cache.

What lm-eval does, and so what this does, per request:

- the context is encoded with the tokenizer's own special-token rule (no extra BOS when the text
  already starts with it), left-truncated to ``max_length - max_gen_toks`` tokens;
- at most ``max_gen_toks`` new tokens; the model's EOS token(s) end the generation, and the decoded
  EOS text joins the stop strings (``handle_stop_sequences``);
- the new tokens are decoded without special tokens and cut at each stop string in turn
  (``postprocess_generated_text``: ``text.split(term)[0]`` for every non-empty term).

lm-eval runs ``model.generate``, which keeps computing rows that are already done; here each row
stops as soon as its decoded text holds a stop string (the cut text is the same: lm-eval cuts at
the first occurrence too) or it emits EOS, and finished rows leave the batch. Inputs match what
``generate`` feeds the model step by step: left padding, the attention mask (dropped when nothing is
padded, as ``generate`` drops it), position ids counted from the first real token, a prefill with only
the last position's logits, then one token per step on the cache. The prefill runs the batch's rows in
groups of at most ``prefill_tokens`` tokens (on the CPU, the log-likelihood pass size) whose caches are
joined for decoding: a prefill's transient attention and MLP tensors grow with its tokens, the cache
only with the rows, so decoding keeps its large batch without a large prefill peak. A prefix every prompt
shares (fixed few-shot examples) is computed once and, on SDPA attention with plain cache layers, held once for all
rows (``prefix_attention``) instead of in every row's cache.

Sampling (``temperature > 0``) warps the logits as transformers' sampling does with lm-eval's
arguments: temperature, then top-k 50 (``generate``'s default, which lm-eval leaves in place), then
``top_p``. Each sample draws from its own CPU ``torch.Generator`` seeded from the request's seed and
the sample's index, so a request's samples do not depend on batching or on the other requests.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

from .batching import BatchSizer, is_out_of_memory
from .kv_scoring import cache_argument, layered_cache, returned_cache, shared_prefix
from .prefix_attention import SharedPrefix, prefix_attention

HF_DEFAULT_TOP_K = 50  # transformers' GenerationConfig default, active whenever lm-eval samples
# generation_config fields with which transformers' generate (so lm-eval) would change greedy choices, and
# their neutral values; a model that sets one is decoded without it, and the log says so.
_UNSUPPORTED_SETTINGS = {
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "min_length": 0,
    "min_new_tokens": None,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "sequence_bias": None,
    "encoder_repetition_penalty": 1.0,
    "exponential_decay_length_penalty": None,
    "num_beams": 1,
}

log = logging.getLogger("pytest_llmgate")


class ChatTemplateMissing(ValueError):
    """A request asks for a chat template the tokenizer does not have."""


@dataclass(frozen=True)
class DecodeRow:
    """One sequence to generate: prompt tokens, its limits, and how to pick each next token."""

    prompt: tuple[int, ...]
    max_new_tokens: int
    stops: tuple[str, ...]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


def stop_strings(until: Sequence[str], eos_text: str | None) -> tuple[str, ...]:
    """lm-eval's handle_stop_sequences: the request's stop strings plus the decoded EOS token."""
    stops = list(until)
    if eos_text is not None and eos_text not in stops:
        stops.append(eos_text)
    return tuple(stops)


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """lm-eval's postprocess_generated_text: cut at each non-empty stop string in turn."""
    for term in stops:
        if term:
            text = text.split(term)[0]
    return text


def sample_seed(seed: int, index: int) -> int:
    """The generator seed of sample ``index`` of a request seeded with ``seed`` (63 bits)."""
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def render_chat(tokenizer: Any, chat: Sequence[tuple[str, str]]) -> str:
    """The chat template's text for ``chat``, ending with the generation prompt.

    As lm-eval's ``HFLM.apply_chat_template``: a template that raises a jinja2 TemplateError (many
    refuse a system message) is applied again without the system messages.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ChatTemplateMissing(
            "the request uses a chat template but the tokenizer has none; set apply_chat_template = false "
            "for this model or point its tokenizer at one with a chat template"
        )
    import jinja2.exceptions

    messages = [{"role": role, "content": content} for role, content in chat]
    try:
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    except jinja2.exceptions.TemplateError:
        without_system = [m for m in messages if m["role"] != "system"]
        return str(tokenizer.apply_chat_template(without_system, tokenize=False, add_generation_prompt=True))


def encode_text(tokenizer: Any, text: str, marker: str | None, add_bos_token: bool | None) -> list[int]:
    """lm-eval 0.4's special-token rule: no special tokens when the text already starts with ``marker``
    (the BOS text, e.g. written by a chat template); else the tokenizer's default (a BOS for Llama-2,
    Mistral, Gemma; none for GPT-2, Qwen, SmolLM2) unless ``add_bos_token`` says to add one or not."""
    if marker and text.startswith(marker):
        return list(tokenizer.encode(text, add_special_tokens=False))
    if add_bos_token is None:
        return list(tokenizer.encode(text))
    tokens = list(tokenizer.encode(text, add_special_tokens=False))
    bos = tokenizer.bos_token_id
    return [bos, *tokens] if add_bos_token and bos is not None else tokens


def encode_pair(
    encode: Callable[[str], list[int]], prefix_token_id: int, context: str, continuation: str
) -> tuple[list[int], list[int]]:
    """lm-eval's _encode_pair, for any tokenizer's ``encode``: (context tokens, continuation tokens).

    The context's trailing whitespace moves to the continuation; the pair is encoded whole and the continuation
    is what follows the context's tokens; an empty context is the prefix token (BOS, else EOS) alone.
    """
    if context == "":
        return [prefix_token_id], encode(continuation)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode(context + continuation)
    context_tokens = encode(context)
    return context_tokens, whole[len(context_tokens) :]


def encode_context(tokenizer: Any, text: str, max_tokens: int, add_bos_token: bool | None = None) -> list[int]:
    """lm-eval's tok_batch_encode for a causal model (:func:`encode_text`; the marker is the tokenizer's
    BOS token), then the last ``max_tokens`` tokens."""
    return encode_text(tokenizer, text, getattr(tokenizer, "bos_token", None), add_bos_token)[-max_tokens:]


def eos_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """The tokens that end a generation: the generation config's EOS ids (what ``generate`` stops on)
    and the tokenizer's EOS (whose text lm-eval adds to the stop strings)."""
    ids: set[int] = set()
    config = getattr(model, "generation_config", None)
    configured = getattr(config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured is not None:
        ids.update(int(i) for i in configured)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


def _reserved_layer() -> type:
    """transformers' ``DynamicLayer`` with room reserved for the tokens still to come.

    ``DynamicLayer.update`` concatenates: every decoding step copies the whole cache, which costs as much memory
    traffic as the step's attention reads. Here the keys and values are views of buffers with room for the rest of
    the generation, and a step writes its token in place (falling back to concatenation when the room is used up).
    Only plain layers are converted (``Decoder`` leaves sliding-window and other layer types as they are)."""
    global _RESERVED_LAYER
    if _RESERVED_LAYER is None:
        from transformers.cache_utils import DynamicLayer

        class ReservedLayer(DynamicLayer):
            room: tuple[Any, Any] | None = None

            def place(self, keys: Any, values: Any, length: int) -> None:
                """Take ``(keys, values)`` buffers whose first ``length`` positions hold the cache."""
                self.room = (keys, values)
                self.keys, self.values = keys[:, :, :length], values[:, :, :length]

            def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
                length, new = _positions(self.keys), key_states.shape[-2]
                if self.room is None or length + new > self.room[0].shape[-2]:
                    self.room = None
                    return super().update(key_states, value_states, *args, **kwargs)
                keys, values = self.room
                keys[:, :, length : length + new] = key_states
                values[:, :, length : length + new] = value_states
                self.keys, self.values = keys[:, :, : length + new], values[:, :, : length + new]
                return self.keys, self.values

            def batch_select_indices(self, indices: Any) -> None:
                if self.room is None:
                    super().batch_select_indices(indices)
                else:
                    self.place(self.room[0][indices], self.room[1][indices], _positions(self.keys))

        _RESERVED_LAYER = ReservedLayer
    return _RESERVED_LAYER


_RESERVED_LAYER: type | None = None
# A running batch drops columns no row reads once there are this many (fewer are not worth the copy).
MIN_TRIMMED_COLUMNS = 16
# A prefill pass against a prefix held apart materializes its attention scores (tokens x heads x (prefix + own
# columns), float32) one layer at a time: passes are cut to keep them within this.
PREFIX_SCORES_BYTES = 256 << 20


def _plain_layers(cache: Any) -> bool:
    """Whether every layer of ``cache`` is a plain ``DynamicLayer`` (not a sliding-window or other kind): only those
    take joining rows, in-place steps and a prefix held apart."""
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in cache.layers)


def _positions(keys: Any) -> int:
    """How many positions a layer's keys hold."""
    return int(keys.shape[-2])


class _Batch:
    """The decoding state of the running batch: its key/value cache, attention mask (columns: the shared prefix,
    then each row's left padding, prompt and generated tokens) and each row's last position.

    ``room``: how many more tokens each plain cache layer keeps space for (the call's largest ``max_new_tokens``),
    so that decoding steps write in place (``_reserved_layer``)."""

    def __init__(
        self, cache: Any, mask: Any, last: Any, room: int, shared: int, prefix: SharedPrefix | None = None
    ) -> None:
        self.cache = cache
        self.mask = mask
        self.last = last
        self.room = room
        self.shared = shared
        # The shared prefix held apart (``prefix_attention``): the cache and mask then have no prefix columns.
        self.prefix = prefix
        # Rows join and steps write in place only on plain layers: a sliding-window layer drops old positions,
        # and other kinds keep state of their own, so their batches run as transformers' cache runs them.
        self.joinable = _plain_layers(cache)
        if self.joinable:
            self._widen(None, 0)

    def select(self, keep: list[int], device: str) -> None:
        """Keep only the batch rows ``keep``."""
        import torch

        index = torch.tensor(keep, device=device)
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        self.last = self.last[index]
        if self.joinable:
            self._trim()

    def _trim(self) -> None:
        """Drop the columns after the shared prefix that no row of the batch reads any more (padding left by rows
        that finished): rows keep joining a running batch, so without this every row would attend over columns
        as wide as the batch's whole life. Positions are each row's own, so nothing a row reads changes."""
        import torch

        shared = self.shared
        used = self.mask[:, shared:].any(dim=0)
        lead = int(used.int().argmax()) if bool(used.any()) else 0
        if lead < MIN_TRIMMED_COLUMNS:
            return
        self.mask = torch.cat([self.mask[:, :shared], self.mask[:, shared + lead :]], dim=1)
        for layer in self.cache.layers:
            # The reserved buffers (room and all), or the layer's own tensors once its room was used up.
            keys, values = layer.room or (layer.keys, layer.values)
            length = _positions(layer.keys)
            layer.place(
                torch.cat([keys[:, :, :shared], keys[:, :, shared + lead :]], dim=2),
                torch.cat([values[:, :, :shared], values[:, :, shared + lead :]], dim=2),
                length - lead,
            )

    def step(self, decoder: Decoder, tokens: Any) -> Any:
        """Forward one new token per row; the logits of the next."""
        import torch

        self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=1)
        self.last = self.last + 1
        padded = not bool(self.mask.all())
        logits, self.cache = decoder._forward(tokens, self.mask if padded else None, self.last, self.cache, self.prefix)
        return logits

    def merged(self, other: _Batch) -> _Batch:
        """This batch with ``other``'s rows after its own: the narrower side's padding widened (after the shared
        prefix columns) so that both have the same number of columns."""
        import torch

        shared = self.shared
        width = max(self.mask.shape[1], other.mask.shape[1])
        self.room = max(self.room, other.room)
        self._widen(other, shared)
        masks = []
        for mask in (self.mask, other.mask):
            missing = width - mask.shape[1]
            masks.append(torch.cat([mask[:, :shared], mask.new_zeros((mask.shape[0], missing)), mask[:, shared:]], 1))
        self.mask = torch.cat(masks)
        self.last = torch.cat([self.last, other.last])
        return self

    def _widen(self, other: _Batch | None, shared: int) -> None:
        """Each layer's keys and values copied once into buffers with ``room`` more positions: this batch's rows,
        then ``other``'s (if any), each row's own columns right-aligned after the ``shared`` prefix columns and
        zeros in the padding between (zeros, not empty memory: masked garbage could be NaN, which a mask does not
        remove). Layer by layer, so that at most one layer is held twice."""
        reserved = _reserved_layer()
        theirs = other.cache.layers if other is not None else [None] * len(self.cache.layers)
        for mine, their in zip(self.cache.layers, theirs, strict=True):
            parts = [mine] if their is None else [mine, their]
            width = max(_positions(p.keys) for p in parts)
            rows = sum(p.keys.shape[0] for p in parts)
            keys, values = (
                t.new_zeros((rows, t.shape[1], width + self.room, t.shape[3])) for t in (mine.keys, mine.values)
            )
            begin = 0
            for part in parts:
                n, own = part.keys.shape[0], _positions(part.keys) - shared
                for source, target in ((part.keys, keys), (part.values, values)):
                    target[begin : begin + n, :, :shared] = source[:, :, :shared]
                    target[begin : begin + n, :, width - own : width] = source[:, :, shared:]
                begin += n
            if their is not None:
                their.keys = their.values = None
            mine.__class__ = reserved
            mine.place(keys, values, width)


class Decoder:
    """Batched greedy or sampled decoding of token rows on one causal LM with a key/value cache."""

    def __init__(
        self,
        model: Any,
        *,
        device: str,
        pad_id: int,
        eos_ids: frozenset[int],
        decode: Callable[[list[int]], str],
        prefill_tokens: int | None = None,
    ) -> None:
        import torch

        self._torch = torch
        self.model = model
        self.device = device
        self.pad_id = pad_id
        self.eos_ids = eos_ids
        self.decode = decode
        self.prefill_tokens = prefill_tokens
        self._cache_arg = cache_argument(model.forward)
        self._last_logits_only = "logits_to_keep" in inspect.signature(model.forward).parameters

    def _forward(
        self, ids: Any, mask: Any, positions: Any, cache: Any, prefix: SharedPrefix | None = None
    ) -> tuple[Any, Any]:
        kwargs: dict[str, Any] = {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": positions,
            "use_cache": True,
            self._cache_arg: cache,
        }
        if prefix is not None:
            kwargs["shared_prefix"] = prefix  # to ``prefix_attention.attention`` through the layers' keywords
        if self._last_logits_only:
            kwargs["logits_to_keep"] = 1
        out = self.model(**kwargs)
        return out.logits[:, -1, :].float(), returned_cache(out, self._cache_arg)

    def _prefix(self, tokens: Sequence[int]) -> tuple[list[tuple[Any, Any]], bool]:
        """Keys and values of ``tokens`` (the prompts' shared prefix), computed once for every row, and whether
        every cache layer is a plain one (``_plain_layers``: the prefix may then be held apart while decoding)."""
        torch = self._torch
        ids = torch.tensor([list(tokens)], dtype=torch.long, device=self.device)
        _, cache = self._forward(ids, None, torch.arange(len(tokens), device=self.device)[None], None)
        return [(layer.keys, layer.values) for layer in cache.layers], _plain_layers(cache)

    def _expanded(self, prefix: list[tuple[Any, Any]] | None, rows: int) -> Any:
        """A cache holding ``prefix`` for ``rows`` rows (None without a prefix)."""
        if prefix is None:
            return None
        return layered_cache(
            self.model.config, [(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in prefix]
        )

    def _prefill(
        self,
        ids: Any,
        mask: Any,
        positions: Any,
        prefix: list[tuple[Any, Any]] | None = None,
        held: SharedPrefix | None = None,
    ) -> tuple[Any, Any]:
        """Last-position logits and the cache of every row, computed in passes of consecutive rows that keep
        each pass within ``prefill_tokens``; the passes' caches are joined into one for decoding. ``prefix``: the
        cache of a prefix every row starts with (``mask`` then covers it too). ``held``: instead, that prefix held
        apart (``prefix_attention``): the passes attend to it through ``shared_prefix``, ``mask`` and the cache
        have only the rows' own columns, and a pass's two-part attention scores stay within
        :data:`PREFIX_SCORES_BYTES`.

        Rows are left-padded to the batch's widest prompt, but a pass computes only as many columns as its own
        widest row needs (rows come longest first, so a pass of one long prompt has no padding at all and runs
        under plain causal attention, with no mask): padding is never forwarded beyond what batching the rows
        of one pass needs. Positions are each row's own, so the values are those of the padded batch."""
        torch = self._torch
        rows, width = ids.shape
        shared = mask.shape[1] - width
        lengths = [int(n) for n in mask[:, shared:].sum(-1).tolist()]
        limit = self.prefill_tokens
        if held is not None:
            heads = int(getattr(self.model.config, "num_attention_heads", 32))
            cap = max(1, PREFIX_SCORES_BYTES // (4 * heads * (held.length + width)))
            limit = cap if limit is None else min(limit, cap)
        passes: list[tuple[int, int, int]] = []  # (first row, end row, columns)
        begin = 0
        while begin < rows:
            end, columns = begin + 1, lengths[begin]
            while end < rows and (limit is None or (end + 1 - begin) * max(columns, lengths[end]) <= limit):
                columns = max(columns, lengths[end])
                end += 1
            passes.append((begin, end, columns))
            begin = end

        def past(count: int) -> Any:
            return None if held is not None else self._expanded(prefix, count)

        if len(passes) == 1 and passes[0][2] == width:
            return self._forward(ids, None if bool(mask.all()) else mask, positions, past(rows), held)
        logits = []
        joined: list[tuple[Any, Any]] = []
        for begin, end, columns in passes:
            part = slice(begin, end)
            own = slice(width - columns, width)
            part_mask = torch.cat([mask[part, :shared], mask[part, shared:][:, own]], dim=1)
            part_logits, part_cache = self._forward(
                ids[part, own],
                None if bool(part_mask.all()) else part_mask,
                positions[part, own],
                past(end - begin),
                held,
            )
            logits.append(part_logits)
            for layer, state in enumerate(part_cache.layers):
                if begin == 0:
                    # Zeros, not empty memory: the padding columns no pass wrote are masked, and masked
                    # garbage could still be NaN, which a mask does not remove.
                    joined.append(
                        (
                            state.keys.new_zeros((rows, state.keys.shape[1], shared + width, state.keys.shape[3])),
                            state.values.new_zeros(
                                (rows, state.values.shape[1], shared + width, state.values.shape[3])
                            ),
                        )
                    )
                keys, values = joined[layer]
                keys[part, :, :shared] = state.keys[:, :, :shared]
                values[part, :, :shared] = state.values[:, :, :shared]
                keys[part, :, shared + width - columns :] = state.keys[:, :, shared:]
                values[part, :, shared + width - columns :] = state.values[:, :, shared:]
            del part_cache
        # The cache copies each layer it takes: hand the layers over one by one, so that at most one is held twice.
        handed_over = (joined.pop(0) for _ in range(len(joined)))
        return torch.cat(logits), layered_cache(self.model.config, handed_over)

    def run(
        self,
        rows: Sequence[DecodeRow],
        on_step: Callable[[list[int]], None] | None = None,
        fits: Callable[[int, int], bool] | None = None,
    ) -> list[list[int]]:
        """The new tokens of each row (EOS excluded), decoded in one running batch.

        ``fits(rows, widest)``: whether that many rows, the widest needing ``widest`` tokens (prompt and new
        tokens), may decode together; None: all rows at once. With it, rows join the batch in order as soon as
        finished rows make room (continuous batching): a short answer does not leave its place idle until the
        longest row of its batch ends, so a shard needs about as many decoding steps as its rows' new tokens
        divided by the batch, not the sum of each batch's longest row. A joining row is prefilled on its own
        and its cache is merged into the batch's (left padding widened as needed); it reads exactly the
        positions and tokens it would read alone.

        ``on_step(finished)``, when given, is called once per decoding step as soon as the step's tokens are
        picked (the first call follows the first prefill: the first token), with the indices in ``rows`` of the
        rows that step finished; the serving probe reads its clock there.
        """
        if not rows:
            return []
        for row in rows:
            if not row.prompt:
                raise ValueError("cannot generate from an empty context")
        # A prefix every prompt starts with (a fixed-shot task's examples) runs once; each row keeps at least one
        # token of its own, whose last position gives the first generated token. Decoding then holds it once for
        # all rows (``prefix_attention``) where the model's attention and cache allow.
        shared = shared_prefix([row.prompt for row in rows])
        prefix, plain = self._prefix(rows[0].prompt[:shared]) if shared else (None, False)
        with prefix_attention(self.model) if plain else nullcontext(False) as apart:
            held = SharedPrefix(prefix) if apart and prefix is not None else None
            return self._decode(rows, on_step, fits, shared, prefix, held)

    def _decode(
        self,
        rows: Sequence[DecodeRow],
        on_step: Callable[[list[int]], None] | None,
        fits: Callable[[int, int], bool] | None,
        shared: int,
        prefix: list[tuple[Any, Any]] | None,
        held: SharedPrefix | None,
    ) -> list[list[int]]:
        """``run``'s loop: rows join, decode and leave the running batch."""
        torch = self._torch
        generators = [torch.Generator().manual_seed(row.seed) if row.temperature > 0 else None for row in rows]
        generated: list[list[int]] = [[] for _ in rows]
        pending = list(range(len(rows)))
        active: list[int] = []  # original row index of each batch row
        batch: _Batch | None = None
        logits: Any = None  # of the active rows: each row's next token is picked from its row
        while True:
            joining = (
                self._joining(rows, batch, pending, fits, held.length if held is not None else 0)
                if batch is None or batch.joinable
                else []
            )
            if joining:
                pending = pending[len(joining) :]
                new_logits, joined = self._start(rows, joining, shared, prefix, held)
                batch = joined if batch is None else batch.merged(joined)
                logits = new_logits if logits is None else torch.cat([logits, new_logits])
                active += joining
            picked = self._pick(logits, [rows[i] for i in active], [generators[i] for i in active])
            keep = []
            for b, i in enumerate(active):
                token = picked[b]
                if token in self.eos_ids:
                    continue
                generated[i].append(token)
                if len(generated[i]) >= rows[i].max_new_tokens or self._stopped(generated[i], rows[i].stops):
                    continue
                keep.append(b)
            if on_step is not None:
                kept = set(keep)
                on_step([i for b, i in enumerate(active) if b not in kept])
            if not keep:
                if not pending:
                    return generated
                active, batch, logits = [], None, None  # the batch is done; the next rows start a new one
                continue
            assert batch is not None
            if len(keep) < len(active):
                batch.select(keep, self.device)
                active = [active[b] for b in keep]
            step = torch.tensor([[generated[i][-1]] for i in active], dtype=torch.long, device=self.device)
            logits = batch.step(self, step)

    @staticmethod
    def _joining(
        rows: Sequence[DecodeRow],
        batch: _Batch | None,
        pending: list[int],
        fits: Callable[[int, int], bool] | None,
        apart: int = 0,
    ) -> list[int]:
        """The pending rows that join the batch now: all of them without ``fits``, else as many (in order) as fit
        beside the batch's rows, at least one when there is no batch. A row's width is its prompt and new tokens,
        less the ``apart`` prefix tokens held apart (once for all rows); the batch's is what its cache holds room
        for (its columns, which grow with every step, and its room), so the tokens ``fits`` allows bound the
        cache's memory."""
        if not pending:
            return []
        if fits is None:
            return list(pending)
        count = 0 if batch is None else int(batch.mask.shape[0])
        width = 0 if batch is None else int(batch.mask.shape[1]) + batch.room
        joining: list[int] = []
        for i in pending:
            widest = max(width, len(rows[i].prompt) - apart + rows[i].max_new_tokens)
            if not fits(count + len(joining) + 1, widest) and (count or joining):
                break
            joining.append(i)
            width = widest
        return joining

    def _start(
        self,
        rows: Sequence[DecodeRow],
        indices: list[int],
        shared: int,
        prefix: list[tuple[Any, Any]] | None,
        held: SharedPrefix | None = None,
    ) -> tuple[Any, _Batch]:
        """Prefill ``rows[indices]`` (their own tokens after the ``shared`` prefix, left-padded to the widest):
        the first logits of each and their decoding state. With ``held`` (the prefix held apart) the state keeps
        only the rows' own columns."""
        torch = self._torch
        width = max(len(rows[i].prompt) for i in indices) - shared
        ids = torch.full((len(indices), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(indices), shared + width), dtype=torch.long)
        mask[:, :shared] = 1
        for r, i in enumerate(indices):
            own = rows[i].prompt[shared:]
            ids[r, width - len(own) :] = torch.tensor(own, dtype=torch.long)
            mask[r, shared + width - len(own) :] = 1
        positions = ((mask.cumsum(-1) - 1).masked_fill(mask == 0, 0))[:, shared:]
        ids, mask, positions = ids.to(self.device), mask.to(self.device), positions.to(self.device)
        room = max(rows[i].max_new_tokens for i in indices)
        if held is not None:  # the prefix held apart: no column of it in the mask or the cache
            logits, cache = self._prefill(ids, mask[:, shared:], positions, held=held)
            return logits, _Batch(cache, mask[:, shared:], positions[:, -1:], room, 0, held)
        logits, cache = self._prefill(ids, mask, positions, prefix)
        return logits, _Batch(cache, mask, positions[:, -1:], room, shared)

    def _stopped(self, tokens: list[int], stops: Sequence[str]) -> bool:
        if not any(stops):
            return False
        text = self.decode(tokens)
        return any(stop and stop in text for stop in stops)

    def _pick(self, logits: Any, rows: Sequence[DecodeRow], generators: Sequence[Any]) -> list[int]:
        """The next token of each batch row: the argmax, or a draw from the warped distribution."""
        torch = self._torch
        picked = [int(t) for t in logits.argmax(dim=-1).tolist()]
        for b, (row, generator) in enumerate(zip(rows, generators, strict=True)):
            if generator is None:
                continue
            probs = warped_probabilities(logits[b].cpu(), row.temperature, row.top_p, HF_DEFAULT_TOP_K)
            picked[b] = int(torch.multinomial(probs, 1, generator=generator).item())
        return picked


def warped_probabilities(logits: Any, temperature: float, top_p: float, top_k: int) -> Any:
    """Sampling probabilities of one row, warped as transformers does: temperature, top-k, top-p."""
    import torch

    scores = logits.float() / temperature
    if 0 < top_k < scores.shape[-1]:
        threshold = torch.topk(scores, top_k).values[-1]
        scores = scores.masked_fill(scores < threshold, float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(scores, descending=False)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - top_p)
        remove[-1] = False  # keep at least the most likely token
        scores = scores.masked_fill(remove.scatter(0, order, remove), float("-inf"))
    return scores.softmax(dim=-1)


def generate_completions(
    model: Any,
    tokenizer: Any,
    contexts: Sequence[str],
    requests: Sequence[Any],
    *,
    device: str,
    max_length: int,
    sizer: BatchSizer,
    add_bos_token: bool | None = None,
) -> list[list[str]]:
    """Completions of each request (``samples`` of them when sampling, one when greedy).

    ``contexts[i]`` is the text ``requests[i]`` is generated from (its chat template applied by the
    caller). Rows run longest context first, as lm-eval orders them, in batches the ``sizer`` allows
    (halved on out-of-memory).
    """
    import torch

    if len(contexts) != len(requests):
        raise ValueError(f"{len(contexts)} contexts for {len(requests)} requests")
    eos_ids = eos_token_ids(model, tokenizer)
    config = getattr(model, "generation_config", None)
    ignored = {
        name: getattr(config, name)
        for name, neutral in _UNSUPPORTED_SETTINGS.items()
        if getattr(config, name, neutral) not in (neutral, None)
    }
    if ignored:
        log.warning(
            "the model's generation_config sets %s, which lm-eval's generate would apply; "
            "pytest-llmgate decodes without them, so completions may differ from lm-eval's",
            ignored,
        )
    eos_text = (
        tokenizer.decode(tokenizer.eos_token_id, skip_special_tokens=False)
        if tokenizer.eos_token_id is not None
        else None
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids, default=0)

    def decode(tokens: list[int]) -> str:
        return str(tokenizer.decode(tokens, skip_special_tokens=True))

    rows: list[DecodeRow] = []
    owner: list[tuple[int, str]] = []  # (request index, context text) of each row
    for index, (context, request) in enumerate(zip(contexts, requests, strict=True)):
        if request.max_gen_toks < 1:
            raise ValueError(f"max_gen_toks must be at least 1, got {request.max_gen_toks}")
        room = max_length - request.max_gen_toks
        if room <= 0:
            raise ValueError(
                f"max_gen_toks {request.max_gen_toks} leaves no room for the context in the "
                f"model's {max_length} tokens; lower max_gen_toks or raise the model's max_length"
            )
        prompt = tuple(encode_context(tokenizer, context, room, add_bos_token))
        stops = stop_strings(request.until, eos_text)
        sampled = request.temperature > 0
        for k in range(request.samples if sampled else 1):
            rows.append(
                DecodeRow(
                    prompt,
                    request.max_gen_toks,
                    stops,
                    request.temperature if sampled else 0.0,
                    request.top_p,
                    sample_seed(request.seed, k) if sampled else 0,
                )
            )
            owner.append((index, context))
    order = sorted(range(len(rows)), key=lambda r: (-len(rows[r].prompt), owner[r][1], r))
    decoder = Decoder(
        model, device=device, pad_id=pad_id, eos_ids=eos_ids, decode=decode, prefill_tokens=sizer.pass_tokens
    )
    texts: list[str] = [""] * len(rows)

    def fits(count: int, widest: int) -> bool:
        return sizer.take([widest] * count) >= count

    with torch.inference_mode():
        while True:
            try:
                # One running batch: rows join as others finish, within the sizer's rows and tokens.
                outputs = decoder.run([rows[r] for r in order], fits=fits)
                break
            except Exception as error:
                if not is_out_of_memory(error):
                    raise
                # Start again with half the batch (a CPU rarely gets here: the sizer's token budget holds the
                # batch's cache; on a GPU the first attempt usually fits).
                sizer.shrink(sizer.rows, max(len(rows[r].prompt) + rows[r].max_new_tokens for r in order), error)
    for r, tokens in zip(order, outputs, strict=True):
        texts[r] = cut_at_stops(decode(tokens), rows[r].stops)
    completions: list[list[str]] = [[] for _ in requests]
    for r, (index, _) in enumerate(owner):
        completions[index].append(texts[r])
    return completions

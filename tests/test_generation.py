"""Generation: batched KV-cache decoding equals transformers' generate, lm-eval's stop rules, engine dispatch.

The decoding tests use a tiny random Llama (weights scaled up so that its next-token choices are
clear, not near-ties) with SmolLM2's real tokenizer; the real model (SmolLM2-135M-Instruct, float32,
CPU) then generates on real GSM8K prompts.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from pytest_llmgate.config import ModelSpec  # noqa: E402
from pytest_llmgate.engine import Engine, ShardError  # noqa: E402
from pytest_llmgate.models import load_backend, model_fingerprint  # noqa: E402
from pytest_llmgate.models.batching import BatchSizer  # noqa: E402
from pytest_llmgate.models.generation import (  # noqa: E402
    HF_DEFAULT_TOP_K,
    Decoder,
    DecodeRow,
    cut_at_stops,
    encode_context,
    generate_completions,
    render_chat,
    stop_strings,
    warped_probabilities,
)
from pytest_llmgate.models.transformers_backend import _tokenizer  # noqa: E402
from pytest_llmgate.tasks import TASKS  # noqa: E402
from pytest_llmgate.tasks.base import GenerationRequest, LoglikelihoodRequest, TaskItem, TaskOptions  # noqa: E402

N_NEW = 40


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from pytest_llmgate.models import builtin_smollm2

    return _tokenizer(*builtin_smollm2())


@pytest.fixture(scope="module")
def tiny(tokenizer) -> Any:
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        initializer_range=0.2, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(3, 49152, (n,), generator=generator).tolist() for n in (5, 17, 9, 30, 1, 12)]


def hf_generate(model: Any, prompts: list[list[int]], eos: int, max_new: int = N_NEW) -> list[list[int]]:
    """transformers' own greedy generate on the left-padded batch; the new tokens of each row up to EOS."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                             eos_token_id=eos, pad_token_id=0)
    rows = []
    for row in out[:, width:].tolist():
        rows.append(row[:row.index(eos)] if eos in row else row)
    return rows


def decoder(model: Any, eos: int, decode: Any = lambda tokens: "", prefill_tokens: int | None = None) -> Decoder:
    return Decoder(model, device="cpu", pad_id=0, eos_ids=frozenset([eos]), decode=decode,
                   prefill_tokens=prefill_tokens)


def decode_recording_passes(
    run: Decoder, prompts: list[list[int]], fits: Any = None
) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """The decoder's new tokens for ``prompts``, and the (rows, tokens) shape of each forward pass it made."""
    model = run.model
    forward = model.forward
    shapes: list[tuple[int, int]] = []

    def spy(*args: Any, **kwargs: Any) -> Any:
        shapes.append(tuple(kwargs["input_ids"].shape))
        return forward(*args, **kwargs)

    model.forward = spy
    try:
        with torch.inference_mode():
            rows = run.run([DecodeRow(tuple(p), N_NEW, ()) for p in prompts], fits=fits)
    finally:
        del model.forward
    return rows, shapes


@pytest.fixture(scope="module")
def frequent_eos(tiny, prompts) -> int:
    """A token the tiny model emits often mid-sequence: as EOS it ends rows at different steps."""
    free = hf_generate(tiny, prompts, eos=-1)
    return Counter(t for row in free for t in row[3:]).most_common(1)[0][0]


def test_greedy_batch_equals_generate_row_by_row_and_alone(tiny, prompts, frequent_eos):
    reference = hf_generate(tiny, prompts, frequent_eos)
    lengths = [len(r) for r in reference]
    assert min(lengths) < N_NEW and max(lengths) == N_NEW  # some rows end early, at different steps
    run = decoder(tiny, frequent_eos)
    with torch.inference_mode():
        together = run.run([DecodeRow(tuple(p), N_NEW, ()) for p in prompts])
        alone = [run.run([DecodeRow(tuple(p), N_NEW, ())])[0] for p in prompts]
        alone_hf = [hf_generate(tiny, [p], frequent_eos)[0] for p in prompts]
    assert together == reference
    assert alone == alone_hf == reference


def test_finished_rows_leave_the_batch(tiny, prompts, frequent_eos):
    rows, shapes = decode_recording_passes(decoder(tiny, frequent_eos), prompts)
    batch_sizes = [rows_in_pass for rows_in_pass, _ in shapes]
    # A row takes part in the prefill and every step until it emits EOS or its last allowed token.
    passes = [min(len(r) + 1, N_NEW) for r in rows]
    assert len(batch_sizes) == max(passes) and batch_sizes[0] == len(prompts)
    assert batch_sizes == sorted(batch_sizes, reverse=True) and batch_sizes[-1] < len(prompts)
    assert sum(batch_sizes) == sum(passes)


def test_prefill_in_groups_of_rows_decodes_as_one_prefill(tiny, prompts, frequent_eos):
    reference = hf_generate(tiny, prompts, frequent_eos)
    width = max(len(p) for p in prompts)
    # Two rows per prefill pass: groups padded and unpadded.
    rows, shapes = decode_recording_passes(decoder(tiny, frequent_eos, prefill_tokens=2 * width), prompts)
    assert rows == reference
    # Prefill passes of consecutive rows within 2 * width tokens, each only as wide as its own widest prompt (no
    # padding column is forwarded that no row of the pass needs), then one step for all six.
    prefill = shapes[: shapes.index((len(prompts), 1))]
    assert sum(n for n, _ in prefill) == len(prompts) and len(prefill) >= 3
    begin = 0
    for n, columns in prefill:
        assert n * columns <= 2 * width
        assert columns == max(len(p) for p in prompts[begin : begin + n])
        begin += n
    assert any(columns < width for _, columns in prefill)


@pytest.mark.parametrize("room", [1, 2, 3])
def test_rows_join_the_running_batch_as_others_finish(tiny, prompts, frequent_eos, room, monkeypatch):
    """Continuous batching: at most ``room`` rows decode together; a row joins as soon as one finishes, is
    prefilled alone and merged into the batch's cache (padding widened either side), and every row's tokens are
    still transformers' generate's."""
    from pytest_llmgate.models import generation

    reference = hf_generate(tiny, prompts, frequent_eos)
    events: list[tuple[str, int]] = []
    start, step = generation.Decoder._start, generation._Batch.step

    def spy_start(self: Any, rows: Any, indices: list[int], *args: Any) -> Any:
        events.append(("join", len(indices)))
        return start(self, rows, indices, *args)

    def spy_step(self: Any, decoder: Any, tokens: Any) -> Any:
        events.append(("step", int(tokens.shape[0])))
        return step(self, decoder, tokens)

    monkeypatch.setattr(generation.Decoder, "_start", spy_start)
    monkeypatch.setattr(generation._Batch, "step", spy_step)
    with torch.inference_mode():
        rows = decoder(tiny, frequent_eos).run(
            [DecodeRow(tuple(p), N_NEW, ()) for p in prompts], fits=lambda count, widest: count <= room
        )
    assert rows == reference
    # The same schedule, simulated: each row needs one pick per new token (plus the EOS pick when it ends early).
    picks = [min(len(r) + 1, N_NEW) for r in rows]
    expected: list[tuple[str, int]] = []
    left, active, pending = {}, [], list(range(len(prompts)))
    while True:
        joining = pending[: max(0, room - len(active))]
        if joining:
            expected.append(("join", len(joining)))
            pending = pending[len(joining) :]
            active += joining
            left.update({i: picks[i] for i in joining})
        for i in active:
            left[i] -= 1
        active = [i for i in active if left[i] > 0]
        if not active and not pending:
            break
        if active:
            expected.append(("step", len(active)))
    assert events == expected
    assert max(n for _, n in events) <= room
    # Rows joined while others were decoding (the speed this buys is measured in benchmarks/perf, not here).
    if room < len(prompts):
        first_step = next(i for i, (kind, _) in enumerate(events) if kind == "step")
        assert any(kind == "join" for kind, _ in events[first_step:])


def test_columns_no_row_reads_are_dropped_from_the_running_batch(tiny, frequent_eos, monkeypatch):
    """A long prompt that finishes first leaves padding in front of the short rows that joined beside it; the
    running batch drops those columns and the short rows still generate what they generate alone."""
    from pytest_llmgate.models import generation

    generator = torch.Generator().manual_seed(3)
    long, *short = [torch.randint(3, 49152, (n,), generator=generator).tolist() for n in (70, 6, 9, 5)]
    rows = [DecodeRow(tuple(long), 2, ()), *(DecodeRow(tuple(p), N_NEW, ()) for p in short)]
    widths: list[tuple[int, int]] = []
    trim = generation._Batch._trim

    def spy(self: Any) -> None:
        before = self.mask.shape[1]
        trim(self)
        widths.append((before, self.mask.shape[1]))

    monkeypatch.setattr(generation._Batch, "_trim", spy)
    with torch.inference_mode():
        got = decoder(tiny, frequent_eos).run(rows, fits=lambda count, widest: count <= 2)
    alone = [hf_generate(tiny, [list(row.prompt)], frequent_eos, max_new=row.max_new_tokens)[0] for row in rows]
    assert got == alone
    # Once the long row left, the batch lost the ~60 columns of padding in front of the short rows.
    assert any(before - after >= 60 for before, after in widths), widths


def test_a_sliding_window_model_decodes_in_fixed_batches(tokenizer, prompts, monkeypatch):
    """A sliding-window cache drops old positions, so rows do not join a running batch there: each batch of
    ``room`` rows runs to its end as transformers' generate runs the same rows."""
    from pytest_llmgate.models import generation

    config = transformers.MistralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        initializer_range=0.2, sliding_window=8, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(config).eval()
    free = hf_generate(model, prompts, eos=-1)
    eos = Counter(t for row in free for t in row[3:]).most_common(1)[0][0]
    events: list[str] = []
    start = generation.Decoder._start

    def spy_start(self: Any, rows: Any, indices: list[int], *args: Any) -> Any:
        events.append(f"join {len(indices)}")
        return start(self, rows, indices, *args)

    monkeypatch.setattr(generation.Decoder, "_start", spy_start)
    with torch.inference_mode():
        rows = decoder(model, eos).run(
            [DecodeRow(tuple(p), N_NEW, ()) for p in prompts], fits=lambda count, widest: count <= 2
        )
    assert events == ["join 2"] * 3
    assert rows == [r for i in range(0, len(prompts), 2) for r in hf_generate(model, prompts[i : i + 2], eos)]


@pytest.mark.parametrize("prefill_rows", [None, 2])
def test_shared_prefix_runs_once_and_decodes_as_generate(tiny, prompts, frequent_eos, prefill_rows):
    # Fixed few-shot examples: every prompt starts with the same 20 tokens; one prompt is the prefix plus one token.
    shared = torch.randint(3, 49152, (20,), generator=torch.Generator().manual_seed(7)).tolist()
    with_prefix = [shared + p for p in prompts]
    reference = hf_generate(tiny, with_prefix, frequent_eos)
    own = max(len(p) for p in prompts)
    run = decoder(tiny, frequent_eos, prefill_tokens=None if prefill_rows is None else prefill_rows * own)
    rows, shapes = decode_recording_passes(run, with_prefix)
    assert rows == reference
    # The prefix alone first (one row), then only each row's own tokens.
    assert shapes[0] == (1, 20)
    first_step = next(i for i, shape in enumerate(shapes) if shape[1] == 1)
    passes = shapes[1:first_step]
    assert sum(r for r, _ in passes) == len(prompts)
    if prefill_rows is None:
        assert passes == [(len(prompts), own)]
    begin = 0
    for n, width in passes:  # each pass as wide as its own widest row
        assert width == max(len(p) for p in prompts[begin : begin + n])
        begin += n


@pytest.mark.parametrize("queries", [1, 5])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
def test_prefix_attention_equals_sdpa_over_the_concatenated_keys(queries, mask_kind):
    """Two-part attention (the prefix's one copy, then each row's own keys, one softmax) against SDPA over the
    prefix expanded into every row and concatenated with the row's keys, the mask covering the prefix as visible."""
    from types import SimpleNamespace

    from pytest_llmgate.models.prefix_attention import SharedPrefix, attention

    generator = torch.Generator().manual_seed(11)
    rows, heads, kv_heads, size, length, own = 3, 6, 2, 8, 13, 9

    def rand(*shape: int) -> Any:
        return torch.randn(*shape, generator=generator)

    query = rand(rows, heads, queries, size)
    key, value = rand(rows, kv_heads, own, size), rand(rows, kv_heads, own, size)
    prefix_keys, prefix_values = rand(1, kv_heads, length, size), rand(1, kv_heads, length, size)
    # Each row's own columns left-padded (row r has r padding columns), causal to the end of the own keys.
    causal = torch.ones((queries, own), dtype=torch.bool).tril(own - queries)
    padding = torch.arange(own)[None, :] >= torch.arange(rows)[:, None]
    allowed = causal[None, None] & padding[:, None, None, :] if mask_kind != "none" else causal[None, None]
    mask = {"none": None, "bool": allowed,
            "additive": torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)}[mask_kind]
    module = SimpleNamespace(layer_idx=1, num_key_value_groups=heads // kv_heads)
    prefix = SharedPrefix([(prefix_keys * 0, prefix_values * 0), (prefix_keys, prefix_values)])
    got, _ = attention(module, query, key, value, mask, scaling=0.3, shared_prefix=prefix)

    full_keys = torch.cat([prefix_keys.expand(rows, -1, -1, -1), key], dim=2).repeat_interleave(heads // kv_heads, 1)
    full_values = torch.cat([prefix_values.expand(rows, -1, -1, -1), value], 2).repeat_interleave(heads // kv_heads, 1)
    full_mask = torch.cat([torch.ones((rows, 1, queries, length), dtype=torch.bool),
                           allowed.expand(rows, 1, queries, own)], dim=-1)
    expected = torch.nn.functional.scaled_dot_product_attention(query, full_keys, full_values, attn_mask=full_mask,
                                                                scale=0.3).transpose(1, 2)
    assert got.shape == (rows, queries, heads, size)
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=2e-6)


def test_decoding_holds_a_shared_prefix_once_and_restores_the_attention(tiny, prompts, frequent_eos):
    """With a shared prefix on SDPA attention, no decoding pass (prefill or step) sees the prefix's columns in its
    keys: the cache holds each row's own tokens only, the prefix reaches attention once per layer; the model's
    attention setting is back to SDPA afterwards, and the completions are generate's."""
    from pytest_llmgate.models import prefix_attention

    shared = torch.randint(3, 49152, (24,), generator=torch.Generator().manual_seed(5)).tolist()
    with_prefix = [shared + p for p in prompts]
    seen: list[tuple[int, int]] = []  # (keys the pass's attention got, prefix length it was handed)
    attend = prefix_attention.attention

    def spy(module: Any, query: Any, key: Any, value: Any, mask: Any, *args: Any, **kwargs: Any) -> Any:
        prefix = kwargs.get("shared_prefix")
        if module.layer_idx == 0:
            seen.append((key.shape[2], prefix.length if prefix is not None else 0))
        return attend(module, query, key, value, mask, *args, **kwargs)

    prefix_attention.attention = spy
    try:
        rows, shapes = decode_recording_passes(decoder(tiny, frequent_eos), with_prefix)
    finally:
        prefix_attention.attention = attend
    assert rows == hf_generate(tiny, with_prefix, frequent_eos)
    assert tiny.config._attn_implementation == "sdpa"
    # Every pass after the prefix's own: handed the 24-token prefix, keys no wider than the own columns so far.
    assert len(seen) == len(shapes) - 1 and all(length == 24 for _, length in seen)
    widest_own = max(len(p) for p in prompts)
    assert all(keys <= widest_own + N_NEW for keys, _ in seen)


def test_a_model_on_eager_attention_decodes_a_shared_prefix_per_row(tokenizer, prompts):
    """Only SDPA attention is replaced: an eager-attention model decodes with the prefix in every row's cache, as
    before, and equals generate."""
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        initializer_range=0.2, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    assert model.config._attn_implementation == "eager"
    shared = torch.randint(3, 49152, (20,), generator=torch.Generator().manual_seed(7)).tolist()
    with_prefix = [shared + p for p in prompts]
    free = hf_generate(model, with_prefix, eos=-1)
    eos = Counter(t for row in free for t in row[3:]).most_common(1)[0][0]
    rows, _ = decode_recording_passes(decoder(model, eos), with_prefix)
    assert rows == hf_generate(model, with_prefix, eos)
    assert model.config._attn_implementation == "eager"


def test_rows_budget_their_own_tokens_when_the_prefix_is_held_apart():
    """The decoding budget (``fits``) counts what the cache holds: a row's own tokens, not the prefix held once."""
    rows = [DecodeRow(tuple(range(100 + i)), 20, ()) for i in range(6)]  # 100-token shared prefix, 0-5 own tokens

    def fits(count: int, widest: int) -> bool:
        return count * widest <= 200

    assert Decoder._joining(rows, None, list(range(6)), fits) == [0]  # 120+ tokens a row: one fits
    assert Decoder._joining(rows, None, list(range(6)), fits, apart=100) == [0, 1, 2, 3, 4, 5]  # 20-25 a row


def test_stop_strings_end_a_row_and_the_text_is_cut_as_lm_eval_cuts_it(tiny, tokenizer, prompts):
    contexts = [tokenizer.decode(p) for p in prompts[:4]]
    free = generate_completions(tiny, tokenizer, contexts, [GenerationRequest(c, ()) for c in contexts],
                                device="cpu", max_length=512, sizer=BatchSizer(4, "cpu"))
    texts = [f[0] for f in free]
    # A stop string taken from the middle of each row's free-running text (three whole characters).
    starts = [next(i for i in range(len(t) // 2, len(t)) if "\ufffd" not in t[i:i + 3]) for t in texts]
    stops = [t[i:i + 3] for t, i in zip(texts, starts, strict=True)]
    requests = [GenerationRequest(c, (s, "never-appears")) for c, s in zip(contexts, stops, strict=True)]
    cut = generate_completions(tiny, tokenizer, contexts, requests, device="cpu", max_length=512,
                               sizer=BatchSizer(4, "cpu"))
    for text, stop, got in zip(texts, stops, cut, strict=True):
        assert got == [cut_at_stops(text, (stop, "never-appears", "<|im_end|>"))]
        assert stop not in got[0] and len(got[0]) < len(text)


def test_max_gen_toks_and_left_truncation(tiny, tokenizer):
    context = "Question: " + "one two three four five six seven eight nine ten " * 20 + "\nAnswer:"
    tokens = tokenizer(context)["input_ids"]
    run = decoder(tiny, tokenizer.eos_token_id)
    with torch.inference_mode():
        [five] = run.run([DecodeRow(tuple(tokens), 5, ())])
    assert len(five) == 5
    short = GenerationRequest(context, (), max_gen_toks=5)
    assert generate_completions(tiny, tokenizer, [context], [short], device="cpu", max_length=512,
                                sizer=BatchSizer(1, "cpu")) == [[tokenizer.decode(five, skip_special_tokens=True)]]
    # max_length - max_gen_toks leaves 60 context tokens: the same as generating from the last 60 alone.
    assert len(tokens) > 60
    truncated = generate_completions(tiny, tokenizer, [context], [GenerationRequest(context, (), max_gen_toks=20)],
                                     device="cpu", max_length=80, sizer=BatchSizer(1, "cpu"))
    with torch.inference_mode():
        rows = run.run([DecodeRow(tuple(tokens[-60:]), 20, ())])
    assert truncated == [[tokenizer.decode(rows[0], skip_special_tokens=True)]]
    with pytest.raises(ValueError, match="leaves no room"):
        generate_completions(tiny, tokenizer, [context], [GenerationRequest(context, (), max_gen_toks=80)],
                             device="cpu", max_length=80, sizer=BatchSizer(1, "cpu"))


def test_results_do_not_depend_on_batch_size_or_order(tiny, tokenizer, prompts):
    contexts = [tokenizer.decode(p) for p in prompts]
    requests = [GenerationRequest(c, ("\n\n",), max_gen_toks=24) for c in contexts]
    reference = generate_completions(tiny, tokenizer, contexts, requests, device="cpu", max_length=512,
                                     sizer=BatchSizer(1, "cpu"))
    for batch_size in (2, 6):
        order = list(reversed(range(len(requests))))
        shuffled = generate_completions(tiny, tokenizer, [contexts[i] for i in order], [requests[i] for i in order],
                                        device="cpu", max_length=512, sizer=BatchSizer(batch_size, "cpu"))
        assert [shuffled[order.index(i)] for i in range(len(requests))] == reference


def test_sampling_is_seeded_per_request_and_sample(tiny, tokenizer, prompts):
    context = tokenizer.decode(prompts[3])
    sampled = GenerationRequest(context, (), max_gen_toks=12, temperature=1.0, top_p=0.95, samples=4, seed=7)

    def run(requests: list[GenerationRequest], batch_size: int = 4) -> list[list[str]]:
        return generate_completions(tiny, tokenizer, [r.context for r in requests], requests, device="cpu",
                                    max_length=512, sizer=BatchSizer(batch_size, "cpu"))

    [first] = run([sampled])
    assert len(first) == 4 and len(set(first)) > 1
    # Same seed, same samples: alone, next to another request, or in batches of one.
    other = GenerationRequest(tokenizer.decode(prompts[0]), (), max_gen_toks=12)
    assert run([other, sampled])[1] == first == run([sampled], batch_size=1)[0]
    [reseeded] = run([GenerationRequest(context, (), 12, 1.0, 0.95, 4, seed=8)])
    assert reseeded != first
    # top_p so small that only the most likely token survives: sampling is greedy decoding.
    [greedy] = run([GenerationRequest(context, (), 12)])
    assert run([GenerationRequest(context, (), 12, 1.0, 1e-9, 2, seed=3)])[0] == greedy * 2


def test_generation_config_settings_lm_eval_would_apply_are_reported(tiny, tokenizer, caplog):
    request = GenerationRequest("Question: hi\nAnswer:", (), max_gen_toks=2)
    before = tiny.generation_config.repetition_penalty
    tiny.generation_config.repetition_penalty = 1.3
    try:
        generate_completions(tiny, tokenizer, [request.context], [request], device="cpu", max_length=512,
                             sizer=BatchSizer(1, "cpu"))
    finally:
        tiny.generation_config.repetition_penalty = before
    assert "repetition_penalty" in caplog.text and "may differ from lm-eval" in caplog.text


def test_warped_probabilities_match_transformers_warpers():
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.randn(1, 500, generator=torch.Generator().manual_seed(0)) * 3
    for temperature, top_p in ((0.2, 0.95), (0.8, 0.5), (1.0, 1.0), (1.5, 0.9)):
        scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
        scores = TopKLogitsWarper(HF_DEFAULT_TOP_K)(None, scores)
        if top_p < 1.0:
            scores = TopPLogitsWarper(top_p)(None, scores)
        expected = scores.softmax(dim=-1)[0]
        got = warped_probabilities(logits[0], temperature, top_p, HF_DEFAULT_TOP_K)
        assert torch.equal(got > 0, expected > 0)
        assert torch.allclose(got, expected, atol=1e-6)


def test_stop_string_helpers_follow_lm_eval():
    assert stop_strings(("Question:",), "<|im_end|>") == ("Question:", "<|im_end|>")
    assert stop_strings(("<|im_end|>",), "<|im_end|>") == ("<|im_end|>",)
    assert stop_strings((), None) == ()
    # Each term in turn: the earliest occurrence of any wins; empty terms are skipped.
    assert cut_at_stops("a Q: b Question: c", ("Question:", "Q:")) == "a "
    assert cut_at_stops("no stop here", ("", "zzz")) == "no stop here"


def test_context_encoding_follows_hflm(tokenizer):
    # SmolLM2's tokenizer adds no BOS by itself; a text that starts with the BOS text gets none added.
    assert encode_context(tokenizer, "Question: hi", 100) == tokenizer("Question: hi",
                                                                       add_special_tokens=False)["input_ids"]
    assert encode_context(tokenizer, "Question: hi there", 2) == tokenizer("Question: hi there")["input_ids"][-2:]

    class AddsBos:
        bos_token, bos_token_id = "<s>", 1

        def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
            return ([1] if add_special_tokens else []) + [ord(c) for c in text]

    assert encode_context(AddsBos(), "ab", 10) == [1, 97, 98]
    assert encode_context(AddsBos(), "<s>ab", 10) == [ord(c) for c in "<s>ab"]
    assert encode_context(AddsBos(), "ab", 10, add_bos_token=False) == [97, 98]


def test_chat_template_retries_without_system_messages(tokenizer):
    text = render_chat(tokenizer, (("system", "Be brief."), ("user", "2+2?")))
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"

    class NoSystem:
        chat_template = "x"

        def apply_chat_template(self, messages: list[dict[str, str]], **kwargs: Any) -> str:
            import jinja2.exceptions

            assert kwargs == {"tokenize": False, "add_generation_prompt": True}
            if any(m["role"] == "system" for m in messages):
                raise jinja2.exceptions.TemplateError("System role not supported")
            return "|".join(m["content"] for m in messages) + "|>"

    assert render_chat(NoSystem(), (("system", "S"), ("user", "U"))) == "U|>"

    class NoTemplate:
        chat_template = None

    with pytest.raises(ValueError, match="has none"):
        render_chat(NoTemplate(), (("user", "U"),))


# --- the real model -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory, dequantized_dir):
    spec = ModelSpec(name="smollm2", batch_size=3)
    backend = load_backend(spec, device="cpu", work_dir=tmp_path_factory.mktemp("work"),
                           fingerprint=model_fingerprint(spec), dequantized_dir=dequantized_dir)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def smollm2_transformers(tmp_path_factory, dequantized_dir):
    """The default model in transformers' own class (``native = false``): its ``generate`` is the reference."""
    spec = ModelSpec(name="smollm2", native=False)
    backend = load_backend(spec, device="cpu", work_dir=tmp_path_factory.mktemp("work"),
                           fingerprint=model_fingerprint(spec), dequantized_dir=dequantized_dir)
    assert type(backend.model) is transformers.LlamaForCausalLM
    yield backend
    backend.close()


def test_smollm2_batched_greedy_equals_generate_on_real_gsm8k_prompts(smollm2, smollm2_transformers, shared_datasets):
    task = TASKS["gsm8k"].configured(TaskOptions(num_fewshot=1))  # real prompts, short enough for a unit test
    items, _ = task.load(shared_datasets, limit=2)
    requests = [replace(item.requests[0], max_gen_toks=32) for item in items]
    assert len({len(r.context) for r in requests}) == 2
    ours = smollm2.generate(requests)  # one left-padded batch of two
    tokenizer = smollm2_transformers.tokenizer  # transformers' own (ours may be the light one, native = true)
    for request, completions in zip(requests, ours, strict=True):
        ids = torch.tensor([tokenizer(request.context)["input_ids"]])
        with torch.inference_mode():
            out = smollm2_transformers.model.generate(input_ids=ids, max_new_tokens=32, do_sample=False,
                                         pad_token_id=tokenizer.pad_token_id)
        text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        assert completions == [cut_at_stops(text, (*request.until, "<|im_end|>"))]


# lm-eval 0.4.13 (hf, float32, CPU, --batch_size 1) on gsm8k doc 0, 5-shot: the logged resps.
LM_EVAL_DOC0 = (" The total number of eggs Janet lays is 16 x 3 = <<16*3=54>>54 ducks.\n"
                + "She lays 16 x 3 = <<16*3=54>>54 ducks.\n" * 3 + "#### 54\n\n")


def test_smollm2_completion_equals_lm_evals_on_gsm8k_doc_0(smollm2, shared_datasets):
    items, _ = TASKS["gsm8k"].load(shared_datasets, limit=1)
    [[completion]] = smollm2.generate([items[0].requests[0]])
    assert completion == LM_EVAL_DOC0


def test_smollm2_chat_requests_go_through_the_template(smollm2):
    chat = (("user", "Question: What is 2 + 3?\nAnswer:"),)
    rendered = smollm2._context_text(GenerationRequest("plain", (), chat=chat))
    assert rendered.startswith("<|im_start|>system\n") and rendered.endswith("<|im_start|>assistant\n")
    assert smollm2._context_text(LoglikelihoodRequest("plain", " 5")) == "plain"
    [[with_chat]] = smollm2.generate([GenerationRequest("ignored", ("\n",), max_gen_toks=8, chat=chat)])
    [[as_text]] = smollm2.generate([GenerationRequest(rendered, ("\n",), max_gen_toks=8)])
    assert with_chat == as_text
    assert smollm2.loglikelihood([LoglikelihoodRequest("x", "5", chat)]) == smollm2.loglikelihood(
        [LoglikelihoodRequest(rendered, "5")])


# --- the engine ---------------------------------------------------------------------------------


class LoglikelihoodOnly:
    """A backend of the user's own that predates generation."""

    def __init__(self, spec: ModelSpec, device: str) -> None:
        pass

    @classmethod
    def fingerprint(cls, spec: ModelSpec) -> str:
        return "ll-only"

    def loglikelihood(self, requests: Any) -> list[tuple[float, bool]]:
        return [(-1.0, True) for _ in requests]

    def close(self) -> None:
        pass


def make_engine(tmp_path: Path, backend: str, path: str = "unused") -> Engine:
    from pytest_llmgate.cache import ResultCache

    return Engine({"base": ModelSpec(name="base", backend=backend, path=path)}, ResultCache(tmp_path / "cache.db"),
                  tmp_path)


def mixed_items() -> list[TaskItem]:
    question = "Question: Tom has RIGHT=12 apples. How many?\nAnswer:"
    generation = [TaskItem("gsm8k", i, "test", (GenerationRequest(question.replace("12", str(12 + i)),
                                                                   ("Question:",)),), -1, (),
                           extra={"reference": f"#### {12 + i}"})
                  for i in range(3)]
    scoring = [TaskItem("arc_challenge", i, "test", (LoglikelihoodRequest("Q?", " a RIGHT"),
                                                     LoglikelihoodRequest("Q?", " b")), 0, ("a RIGHT", "b"))
               for i in range(2)]
    return [generation[0], scoring[0], generation[1], scoring[1], generation[2]]


def test_engine_sends_each_kind_to_its_call_and_caches_both(tmp_path, monkeypatch):
    weights = tmp_path / "w.json"
    weights.write_text(json.dumps({"skill": 1.0, "seed": 1}))
    engine = make_engine(tmp_path, "doubles:SkillBackend", str(weights))
    items = mixed_items()
    for item in items:
        engine.register("shard", item, "v1")
    results = {item.qualified_id: engine.result("base", "shard", item) for item in items}
    assert results["gsm8k/test-1"].results == [[" The total is 13.\n#### 13\n\n"]]
    right, wrong = results["arc_challenge/test-0"].results
    assert right == [-0.5, True] and wrong[1] is False and isinstance(wrong[0], float)
    assert not any(r.cached for r in results.values())
    engine.close()

    again = make_engine(tmp_path, "doubles:SkillBackend", str(weights))
    for item in items:
        again.register("shard", item, "v1")
    for item in items:
        side = again.result("base", "shard", item)
        assert side.cached and side.results == results[item.qualified_id].results
    assert again.loads == Counter()  # everything came from the cache: no model loaded
    score = TASKS["gsm8k"].score(items[0], again.result("base", "shard", items[0]).results)
    assert score["extracted_strict"] == "12" and score["scores"]["exact_match_strict"] == 1.0
    again.close()


def test_backend_without_generate_fails_generation_items_only(tmp_path):
    engine = make_engine(tmp_path, f"{__name__}:LoglikelihoodOnly")
    items = mixed_items()
    for item in items:
        engine.register("shard", item, "v1")
    assert engine.result("base", "shard", items[1]).results == [[-1.0, True], [-1.0, True]]
    with pytest.raises(ShardError, match=r"has no generate\(\).*implement generate\(requests\)"):
        engine.result("base", "shard", items[0])
    assert engine.result("base", "shard", items[3]).results == [[-1.0, True], [-1.0, True]]
    engine.close()

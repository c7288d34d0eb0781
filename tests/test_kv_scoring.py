"""The key/value-reusing and packed scorers give the plain path's log-likelihoods: tiny model, SmolLM2 on real rows."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from pytest_llmgate.config import ModelSpec  # noqa: E402
from pytest_llmgate.models import kv_scoring, load_backend, model_fingerprint, packed_scoring  # noqa: E402
from pytest_llmgate.models.batching import BatchSizer  # noqa: E402
from pytest_llmgate.tasks import TASKS, TaskOptions  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model() -> Any:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return transformers.LlamaForCausalLM(config).eval()


def reference(model: Any, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """One full forward pass per pair, as lm-eval computes it."""
    out = []
    with torch.inference_mode():
        for context, continuation in pairs:
            ids = torch.tensor([(context + continuation)[:-1]])
            logprobs = torch.log_softmax(model(ids).logits[0, len(context) - 1:], dim=-1)
            target = torch.tensor(continuation)
            out.append((float(logprobs.gather(1, target[:, None]).sum()), bool((logprobs.argmax(-1) == target).all())))
    return out


def shard_like_pairs(seed: int) -> list[tuple[list[int], list[int]]]:
    """Items sharing a few-shot prefix, each with choices of one and of several tokens."""
    rnd = random.Random(seed)
    prefix = [rnd.randrange(97) for _ in range(40)]
    pairs = []
    for _ in range(7):
        context = prefix + [rnd.randrange(97) for _ in range(rnd.randrange(1, 30))]
        for length in (1, 1, 3, rnd.randrange(1, 9)):
            pairs.append((context, [rnd.randrange(97) for _ in range(length)]))
    return pairs


SCORERS = {"kv": kv_scoring.KVScorer, "packed": packed_scoring.PackedScorer}


def winogrande_like_pairs(seed: int) -> list[tuple[list[int], list[int]]]:
    """Items whose two contexts share the words before the blank and differ after it, one shared continuation."""
    rnd = random.Random(seed)
    pairs = []
    for _ in range(6):
        before = [rnd.randrange(97) for _ in range(rnd.randrange(0, 15))]
        after = [rnd.randrange(97) for _ in range(rnd.randrange(1, 8))]
        for _ in range(2):
            pairs.append((before + [rnd.randrange(97) for _ in range(rnd.randrange(1, 4))], after))
    return pairs


@pytest.mark.parametrize("scorer", ["kv", "packed"])
@pytest.mark.parametrize("batch_size", ["auto", 2, 1])
def test_tiny_model_matches_full_forward(tiny_model: Any, batch_size: int | str, scorer: str) -> None:
    # Small batches split contexts (packed: rows) and long choices into several passes.
    pairs = shard_like_pairs(0)
    with torch.inference_mode():
        got = SCORERS[scorer](tiny_model, "cpu", BatchSizer(batch_size, "cpu")).score(pairs)
    expected = reference(tiny_model, pairs)
    assert [g for _, g in got] == [g for _, g in expected]
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in expected], abs=2e-5)


@pytest.mark.parametrize("scorer", ["kv", "packed"])
@pytest.mark.parametrize("batch_size", ["auto", 1])
def test_tiny_model_winogrande_like(tiny_model: Any, batch_size: int | str, scorer: str) -> None:
    pairs = winogrande_like_pairs(2)
    with torch.inference_mode():
        got = SCORERS[scorer](tiny_model, "cpu", BatchSizer(batch_size, "cpu")).score(pairs)
    expected = reference(tiny_model, pairs)
    assert [g for _, g in got] == [g for _, g in expected]
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in expected], abs=2e-5)


@pytest.mark.parametrize("scorer", ["kv", "packed"])
def test_no_shared_prefix_and_single_context(tiny_model: Any, scorer: str) -> None:
    rnd = random.Random(1)
    pairs = [([rnd.randrange(97) for _ in range(n)], [rnd.randrange(97) for _ in range(m)])
             for n, m in ((5, 1), (12, 4), (1, 2), (3, 3))]
    with torch.inference_mode():
        scorer = SCORERS[scorer](tiny_model, "cpu")
        together = scorer.score(pairs)
        alone = [scorer.score([pair])[0] for pair in pairs]
    expected = reference(tiny_model, pairs)
    for values in (together, alone):
        assert [ll for ll, _ in values] == pytest.approx([ll for ll, _ in expected], abs=2e-5)


def test_packed_rows_hold_each_needed_token_once() -> None:
    # A multiple-choice item: one context, choices of 1 and 3 tokens; a WinoGrande pair: 5 words before the
    # blank, one option token each, the same 3-token continuation; an unrelated short item.
    mc = [([1, 2, 3, 4], [5]), ([1, 2, 3, 4], [6, 7, 8])]
    wino = [([20, 21, 22, 23, 24, 30], [40, 41, 42]), ([20, 21, 22, 23, 24, 31], [40, 41, 42])]
    other = [([50, 51], [52, 53])]
    rows = packed_scoring.build_rows(mc + wino + other, shared=0)
    tokens = sorted(t for row in rows for t in row.tokens)
    # mc: 4 context + 2 (the 3-token choice's first two); wino: 5 shared + 2 options + 2 x 2; other: 2 + 1
    assert tokens == sorted([1, 2, 3, 4, 6, 7, 20, 21, 22, 23, 24, 30, 31, 40, 41, 40, 41, 50, 51, 52])
    assert len(rows) == 1  # 20 tokens: all trees packed into one row
    row = rows[0]
    for i, (context, continuation) in enumerate(mc + wino + other):
        scored = row.scored[i]
        assert len(scored) == len(continuation)
        # The first scored position holds the context's last token; each later one the previous continuation token.
        assert [row.tokens[p] for p in scored] == [context[-1], *continuation[:-1]]
        # Positions are depths in the request's own sequence; ancestors are exactly the sequence before it.
        last = scored[-1]
        assert row.depths[last] == len(context) + len(continuation) - 2
        chain = []
        node = last
        while node >= 0:
            chain.append(row.tokens[node])
            node = row.parents[node]
        assert chain[::-1] == (context + continuation)[:-1]


def test_group_contexts_merges_only_shared_prefixes() -> None:
    contexts = [(1, 2, 3, 4, 5, 9), (7, 8), (1, 2, 3, 4, 5, 6), (1, 2, 9)]
    assert packed_scoring.group_contexts(contexts, min_merged=4) == [[2, 0], [3], [1]]


def test_common_prefix() -> None:
    assert kv_scoring.common_prefix([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert kv_scoring.common_prefix([[5], [6]]) == 0
    assert kv_scoring.common_prefix([]) == 0


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory, dequantized_dir: Path) -> Any:
    spec = ModelSpec(name="smollm2")
    backend = load_backend(spec, device="cpu", work_dir=tmp_path_factory.mktemp("work"),
                           fingerprint=model_fingerprint(spec), dequantized_dir=dequantized_dir)
    assert backend.scoring == "auto"  # the default
    yield backend
    backend.close()


PLAIN: dict[tuple[str, int, int], list[tuple[float, bool]]] = {}


@pytest.mark.parametrize("scoring", ["packed", "kv"])
@pytest.mark.parametrize(("task", "shots", "limit"), [("mmlu", 5, 3), ("winogrande", 0, 6), ("arc_challenge", 3, 3),
                                                      ("arc_challenge", 0, 6), ("hellaswag", 0, 4)])
def test_smollm2_real_rows_same_as_plain_path(smollm2: Any, shared_datasets: Any, task: str, shots: int,
                                              limit: int, scoring: str) -> None:
    configured = TASKS[task].configured(TaskOptions(num_fewshot=shots))
    items, _ = configured.load(shared_datasets, limit)
    requests = [r for item in items for r in item.requests]
    smollm2.kv_reuse = True
    smollm2.scoring = scoring
    fast = smollm2.loglikelihood(requests)
    key = (task, shots, limit)
    if key not in PLAIN:  # the plain path's numbers, computed once for both scorers
        smollm2.kv_reuse = False
        try:
            PLAIN[key] = smollm2.loglikelihood(requests)
        finally:
            smollm2.kv_reuse = True
    plain = PLAIN[key]
    assert [ll for ll, _ in fast] == pytest.approx([ll for ll, _ in plain], abs=1e-4)
    offset = 0
    for item in items:
        n = len(item.requests)
        a, b = configured.score(item, fast[offset:offset + n]), configured.score(item, plain[offset:offset + n])
        assert (a["prediction"], a.get("prediction_norm")) == (b["prediction"], b.get("prediction_norm"))
        offset += n


@pytest.mark.parametrize(("task", "shots", "expected"), [("arc_challenge", 0, "packed"), ("winogrande", 0, "packed"),
                                                         ("truthfulqa_mc2", 0, "packed"), ("arc_challenge", 25, "kv"),
                                                         ("mmlu", 5, "kv")])
def test_auto_scoring_picks_packed_for_short_contexts_and_kv_for_long_ones(
    smollm2: Any, shared_datasets: Any, task: str, shots: int, expected: str
) -> None:
    """The default ``scoring = "auto"`` decides per call on the real rows' own context lengths (after the prefix the
    call's contexts share: TruthfulQA's long fixed preamble does not count), and the chosen scorer's numbers are
    the ones returned."""
    from pytest_llmgate.models.transformers_backend import PACKED_MAX_CONTEXT, scoring_for

    items, _ = TASKS[task].configured(TaskOptions(num_fewshot=shots)).load(shared_datasets, 4)
    requests = [r for item in items for r in item.requests]
    encoded = [smollm2.encode_pair(smollm2._context_text(r), r.continuation) for r in requests]
    assert scoring_for(encoded) == expected
    smollm2.scoring = "auto"  # the default (the tests above set it to one scorer)
    smollm2._scorers.clear()
    auto = smollm2.loglikelihood(requests)
    assert list(smollm2._scorers) == [expected]
    smollm2.scoring = expected
    try:
        assert smollm2.loglikelihood(requests) == auto
    finally:
        smollm2.scoring = "auto"
    contexts = {tuple(c) for c, _ in encoded}
    if expected == "kv":
        assert min(len(c) for c in contexts) > PACKED_MAX_CONTEXT


def test_scoring_for_counts_only_what_the_contexts_do_not_share() -> None:
    from pytest_llmgate.models.transformers_backend import PACKED_MAX_CONTEXT, scoring_for

    preamble = list(range(1000, 1000 + 3 * PACKED_MAX_CONTEXT))
    short = [([*preamble, i, i + 1], [7]) for i in range(4)]
    assert scoring_for(short) == "packed"
    long = [([i] * (PACKED_MAX_CONTEXT + 1), [7]) for i in range(4)]
    assert scoring_for(long) == "kv"
    assert scoring_for(long[:1]) == "kv" and scoring_for(short[:1]) == "kv"  # one context shares nothing


@pytest.mark.parametrize("count", [0, 1, 63, 64, 100, 128, 129, 300, 1000])
def test_head_passes_cover_every_position_in_even_passes(count: int) -> None:
    passes = kv_scoring.head_passes(count, vocabulary=49152)  # 128 positions of float32 logits fit 24 MiB
    assert [p.start for p in passes] == [0, *[p.stop for p in passes[:-1]]] and passes[-1].stop == count
    sizes = [p.stop - p.start for p in passes]
    assert max(sizes) <= max(128, count // len(passes) + 1) and max(sizes) - min(sizes) <= 1
    if count >= kv_scoring.MIN_HEAD_ROWS:
        assert min(sizes) >= kv_scoring.MIN_HEAD_ROWS
    assert kv_scoring.head_passes(100, vocabulary=10**6) == [slice(0, 100)]  # never under 64 a pass


@pytest.mark.parametrize("pass_bytes", [97 * 4 * 64, 24 << 20])
def test_token_scores_in_passes_equal_one_log_softmax(tiny_model: Any, monkeypatch: pytest.MonkeyPatch,
                                                       pass_bytes: int) -> None:
    """Rows repeated (choices reading their first token at one position) and several head passes: the same
    log-probabilities and greedy flags as one log_softmax over every position."""
    monkeypatch.setattr(kv_scoring, "HEAD_PASS_BYTES", pass_bytes)
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(300, 64, generator=generator)
    rows = torch.cat([torch.arange(300), torch.randint(0, 300, (200,), generator=generator)])
    targets = torch.randint(0, 97, (500,), generator=generator)
    head = tiny_model.get_output_embeddings()
    with torch.inference_mode():
        picked, greedy = kv_scoring.token_scores(head, hidden, rows, targets)
        whole = torch.log_softmax(head(hidden), dim=-1)
    assert torch.allclose(picked, whole[rows, targets], rtol=0, atol=1e-6)
    assert torch.equal(greedy, whole.argmax(-1)[rows] == targets)
    assert len(kv_scoring.head_passes(300, 97)) == (4 if pass_bytes < 1 << 20 else 1)  # 75 positions a pass

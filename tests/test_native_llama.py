"""The native Llama (``models/native_llama.py``) computes what transformers' LlamaForCausalLM computes.

On a tiny random Llama saved by transformers, and on the real default model (SmolLM2-135M-Instruct read from its
dequantized GGUF copy, float32, CPU) with real benchmark rows: hidden states and logits for every mask form the
scorers and the decoder pass, every scorer's log-likelihoods and greedy flags, greedy generation with and without a
held shared prefix. A backend on the default model imports none of transformers' heavy model modules, and a model
the native code does not implement falls back to transformers' class.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from pytest_llmgate.config import ModelSpec  # noqa: E402
from pytest_llmgate.models import ModelPool, builtin_smollm2, load_backend, native_llama  # noqa: E402
from pytest_llmgate.models.generation import Decoder, DecodeRow  # noqa: E402
from pytest_llmgate.models.transformers_backend import _tokenizer  # noqa: E402
from pytest_llmgate.tasks import TASKS  # noqa: E402
from pytest_llmgate.tasks.base import TaskOptions  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch._dynamo", "torch.distributed.tensor", "scipy.optimize", "transformers.modeling_utils",
         "transformers.masking_utils", "transformers.core_model_loading", "transformers.loss",
         "transformers.models.llama.modeling_llama", "sympy")


def save_tiny(folder: Path, tokenizer: Any = None, dtype: Any = None, **overrides: Any) -> Path:
    """A random 2-layer Llama with grouped-query attention, saved by transformers (safetensors; in ``dtype`` when
    given), with ``tokenizer`` beside it when given (a backend needs one)."""
    options = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2, rope_theta=5000.0)
    options.update(overrides)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**options))
    (model if dtype is None else model.to(dtype)).save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def both(folder: Path, dtype: str = "float32") -> tuple[Any, Any]:
    """(transformers' model, the native model) of ``folder``."""
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch_dtype).eval()
    native = native_llama.load(folder, dtype)
    assert native is not None
    return reference, native.eval()


def max_difference(first: Any, second: Any) -> float:
    assert first.shape == second.shape and first.dtype == second.dtype
    finite = torch.isfinite(first)
    assert torch.equal(finite, torch.isfinite(second))  # NaN or inf in the same places, if anywhere
    return float((first[finite].float() - second[finite].float()).abs().max()) if bool(finite.any()) else 0.0


def forwards(model: Any, ids: Any, mask: Any, form: str) -> list[Any]:
    """The tensors one mask form gives: hidden states, logits, caches (as the scorers and the decoder call)."""
    decoder = model.get_decoder()
    rows, width = ids.shape
    if form == "plain":
        return [decoder(input_ids=ids).last_hidden_state, model(input_ids=ids).logits]
    if form == "padded":  # the plain scorer (right padding) and the decoder's prefill (left padding)
        right = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
        left_mask = mask.flip(1)
        positions = (left_mask.cumsum(-1) - 1).masked_fill(left_mask == 0, 0)
        out = model(input_ids=ids.flip(1), attention_mask=left_mask, position_ids=positions, use_cache=True,
                    logits_to_keep=1)
        return [right, out.logits, *[t for layer in out.cache.layers for t in (layer.keys, layer.values)]]
    if form == "cached":  # the key/value scorer: a prefix, then rows on its expanded cache with a padding mask
        prefix = decoder(input_ids=ids[:1, :6], attention_mask=torch.ones_like(ids[:1, :6]),
                         position_ids=torch.arange(6)[None], use_cache=True, cache=None)
        from pytest_llmgate.models.kv_scoring import layered_cache

        past = [(layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1))
                for layer in prefix.cache.layers]
        full = torch.cat([torch.ones((rows, 6), dtype=mask.dtype), mask[:, 6:]], dim=1)
        positions = (6 + torch.arange(width - 6))[None].expand(rows, -1)
        out = decoder(input_ids=ids[:, 6:], attention_mask=full, position_ids=positions, use_cache=True,
                      cache=layered_cache(model.config, past))
        step = model(input_ids=ids[:, -1:], attention_mask=torch.cat([full, full[:, -1:] * 0 + 1], dim=1),
                     position_ids=positions[:, -1:] + 1, use_cache=True, cache=out.cache, logits_to_keep=1)
        step_unpadded = model(input_ids=ids[:, -1:], use_cache=True, cache=step.cache)  # no mask: SDPA unmasked
        return [prefix.last_hidden_state, out.last_hidden_state, step.logits, step_unpadded.logits]
    allowed = torch.ones((rows, 1, width, width), dtype=torch.bool).tril()
    allowed[:, :, width // 2 :, 1 : width // 3] = False  # a tree: later tokens do not see some earlier ones
    if form == "4d-bool":
        return [decoder(input_ids=ids, attention_mask=allowed, use_cache=False).last_hidden_state]
    additive = torch.zeros(allowed.shape, dtype=model.dtype).masked_fill(~allowed, torch.finfo(model.dtype).min)
    if form == "4d-float":  # the packed scorer's mask, with and without its prefix cache
        return [decoder(input_ids=ids, attention_mask=additive, position_ids=torch.arange(width)[None],
                        use_cache=False).last_hidden_state]
    if form == "packed-sequences":  # positions restart without a mask or cache: transformers' packed-sequence mask
        positions = torch.cat([torch.arange(width // 2), torch.arange(width - width // 2)])[None].expand(rows, -1)
        return [decoder(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state]
    raise AssertionError(form)


FORMS = ["plain", "padded", "cached", "4d-bool", "4d-float", "packed-sequences"]


def token_rows(vocab: int, rows: int = 3, width: int = 14) -> tuple[Any, Any]:
    """Random tokens and a padding mask: a full row, a right-padded one, and one that is all padding."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (rows, width), generator=generator)
    mask = torch.ones((rows, width), dtype=torch.long)
    mask[1, width - 5 :] = 0
    mask[2] = 0
    return ids, mask


@pytest.fixture(scope="module")
def smol_tokenizer() -> Any:
    return _tokenizer(*builtin_smollm2())


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    return both(save_tiny(tmp_path_factory.mktemp("tiny")))


def test_same_modules_parameters_and_config(tiny_pair: tuple[Any, Any]) -> None:
    reference, native = tiny_pair
    assert set(native.state_dict()) == set(reference.state_dict())
    for name, tensor in reference.state_dict().items():
        assert torch.equal(native.state_dict()[name], tensor), name
    assert native.lm_head.weight is not native.model.embed_tokens.weight  # tie_word_embeddings is False here
    assert native.config._attn_implementation == "sdpa" == reference.config._attn_implementation
    for key in ("max_position_embeddings", "num_hidden_layers", "num_key_value_heads", "head_dim", "eos_token_id"):
        assert getattr(native.config, key) == getattr(reference.config, key), key
    assert native.generation_config.to_dict() == reference.generation_config.to_dict()
    assert torch.equal(native.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq)
    assert type(transformers.DynamicCache(config=native.config).layers[0]) is transformers.cache_utils.DynamicLayer
    assert native.dtype == torch.float32 and next(native.parameters()).dtype == torch.float32


@pytest.mark.parametrize("form", FORMS)
def test_tiny_forward_equals_transformers(tiny_pair: tuple[Any, Any], form: str) -> None:
    reference, native = tiny_pair
    ids, mask = token_rows(97)
    with torch.inference_mode():
        expected, got = forwards(reference, ids, mask, form), forwards(native, ids, mask, form)
    for first, second in zip(expected, got, strict=True):
        assert max_difference(first, second) <= 1e-5
    if form == "padded":  # the all-padding row is finite in both, and its neighbours equal their own rows alone
        assert bool(torch.isfinite(got[0]).all())
        with torch.inference_mode():
            alone = native.get_decoder()(input_ids=ids[1:2, :9]).last_hidden_state
        assert max_difference(got[0][1:2, :9], alone) <= 1e-5


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "auto"])
def test_other_dtypes_and_tied_embeddings(tmp_path: Path, dtype: str) -> None:
    folder = save_tiny(tmp_path, dtype=torch.bfloat16, tie_word_embeddings=True, num_key_value_heads=4)
    reference, native = both(folder, dtype)
    assert native.lm_head.weight is native.model.embed_tokens.weight
    assert native.dtype == reference.dtype == (torch.float16 if dtype == "float16" else torch.bfloat16)
    ids, mask = token_rows(97)
    for form in FORMS:
        with torch.inference_mode():
            for first, second in zip(forwards(reference, ids, mask, form), forwards(native, ids, mask, form),
                                     strict=True):
                assert max_difference(first, second) == 0.0, form  # the same operations, so the same rounding


@pytest.mark.parametrize(("overrides", "reason"), [
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 64}}, "rotary embeddings"),
    ({"attention_bias": True}, "biases"),
    ({"mlp_bias": True}, "biases"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_unsupported_configs_are_left_to_transformers(tmp_path: Path, overrides: dict, reason: str,
                                                      smol_tokenizer: Any, caplog: pytest.LogCaptureFixture) -> None:
    folder = save_tiny(tmp_path / "m", smol_tokenizer, **overrides)
    caplog.set_level("INFO", logger="pytest_llmgate")
    assert native_llama.load(folder, "float32") is None
    assert reason in caplog.text
    spec = ModelSpec(name="m", path=str(folder))
    backend = load_backend(spec, device="cpu", work_dir=tmp_path, fingerprint="f")
    assert type(backend.model) is transformers.LlamaForCausalLM


def test_other_architectures_and_settings_are_left_to_transformers(tmp_path: Path, smol_tokenizer: Any) -> None:
    raw = json.loads((save_tiny(tmp_path / "m", smol_tokenizer) / "config.json").read_text())
    assert native_llama.unsupported(raw) is None
    assert "model_type" in str(native_llama.unsupported({**raw, "model_type": "mistral"}))
    classifier = {**raw, "architectures": ["LlamaForSequenceClassification"]}
    assert "architectures" in str(native_llama.unsupported(classifier))
    assert "sliding_window" in str(native_llama.unsupported({**raw, "sliding_window": 16}))
    assert "quantized" in str(native_llama.unsupported({**raw, "quantization_config": {"quant_method": "gptq"}}))
    assert "yarn" in str(native_llama.unsupported({**raw, "rope_parameters": {"rope_type": "yarn", "factor": 2.0,
                                                                             "rope_theta": 1e4}}))
    folder = tmp_path / "m"
    pool = ModelPool()

    def model(**options: Any) -> Any:
        spec = ModelSpec(name="m", path=str(folder), **options)
        return load_backend(spec, device="cpu", work_dir=tmp_path, fingerprint="f", pool=pool).model

    assert type(model()) is native_llama.NativeLlamaForCausalLM
    assert type(model(native=False)) is transformers.LlamaForCausalLM  # the way to force the reference
    assert type(model(transform={"method": "rtn", "bits": 4, "group_size": 16})) is transformers.LlamaForCausalLM


def test_native_is_a_validated_model_key() -> None:
    from pytest_llmgate.config import parse_config

    def parse(raw: dict) -> Any:
        return parse_config(raw, source=None, known_tasks=TASKS, rootpath=Path("/tmp"))

    assert parse({"models": {"m": {}}}).models["m"].native is True
    assert parse({"models": {"m": {"native": False}}}).models["m"].native is False
    with pytest.raises(pytest.UsageError, match=r"models.m\].native: expected true or false, got 'no'"):
        parse({"models": {"m": {"native": "no"}}})


# The real default model: a transformers backend and a native one on the same dequantized copy.


@pytest.fixture(scope="module")
def smollm2_pair(tmp_path_factory: pytest.TempPathFactory, dequantized_dir: Path) -> Any:
    """(transformers backend, native backend, dequantized folder root) on the default model, float32, CPU."""
    root = dequantized_dir  # the session's (conftest.py)
    work = tmp_path_factory.mktemp("work")
    # The first load reads the GGUF file (transformers) and writes the copy unless an earlier test did; the reference
    # then reads the copy too.
    load_backend(ModelSpec(name="smollm2", native=False), device="cpu", work_dir=work, fingerprint="f",
                 dequantized_dir=root).close()
    reference = load_backend(ModelSpec(name="smollm2", native=False), device="cpu", work_dir=work, fingerprint="f",
                             dequantized_dir=root)
    native = load_backend(ModelSpec(name="smollm2"), device="cpu", work_dir=work, fingerprint="f",
                          dequantized_dir=root)
    assert type(reference.model) is transformers.LlamaForCausalLM
    assert type(native.model) is native_llama.NativeLlamaForCausalLM
    yield reference, native, root
    reference.close()
    native.close()


def real_token_rows(backend: Any, shared_datasets: Path, rows: int = 4) -> tuple[Any, Any]:
    """Token rows of real ARC-Challenge questions, right-padded, with their padding mask."""
    items, _ = TASKS["arc_challenge"].load(shared_datasets, rows)
    encoded = [backend.encode_pair(item.requests[0].context, item.requests[0].continuation) for item in items]
    tokens = [c + t for c, t in encoded]
    width = max(len(t) for t in tokens)
    ids = torch.zeros((rows, width), dtype=torch.long)
    mask = torch.zeros((rows, width), dtype=torch.long)
    for r, row in enumerate(tokens):
        ids[r, : len(row)] = torch.tensor(row)
        mask[r, : len(row)] = 1
    return ids, mask


@pytest.mark.parametrize("form", FORMS)
def test_smollm2_forward_equals_transformers(smollm2_pair: Any, shared_datasets: Path, form: str) -> None:
    reference, native, _ = smollm2_pair
    ids, mask = real_token_rows(reference, shared_datasets)
    with torch.inference_mode():
        expected, got = forwards(reference.model, ids, mask, form), forwards(native.model, ids, mask, form)
    for first, second in zip(expected, got, strict=True):
        assert max_difference(first, second) <= 1e-5


@pytest.mark.parametrize("scoring", ["packed", "kv", "plain"])
@pytest.mark.parametrize(("task", "shots", "limit"), [("arc_challenge", 0, 5), ("hellaswag", 0, 3),
                                                      ("winogrande", 0, 5), ("arc_challenge", 2, 3)])
def test_smollm2_scorers_equal_transformers_on_real_rows(smollm2_pair: Any, shared_datasets: Path, task: str,
                                                         shots: int, limit: int, scoring: str) -> None:
    reference, native, _ = smollm2_pair
    items, _ = TASKS[task].configured(TaskOptions(num_fewshot=shots)).load(shared_datasets, limit)
    requests = [r for item in items for r in item.requests]
    results = []
    for backend in (reference, native):
        backend.kv_reuse, backend.scoring = scoring != "plain", "packed" if scoring == "plain" else scoring
        try:
            results.append(backend.loglikelihood(requests))
        finally:
            backend.kv_reuse, backend.scoring = True, "auto"
    for (expected, expected_greedy), (got, got_greedy) in zip(*results, strict=True):
        assert abs(expected - got) <= 1e-4
        assert expected_greedy == got_greedy


def test_smollm2_greedy_generation_equals_transformers(smollm2_pair: Any, shared_datasets: Path) -> None:
    reference, native, _ = smollm2_pair
    task = TASKS["gsm8k"].configured(TaskOptions(num_fewshot=2))
    items, _ = task.load(shared_datasets, limit=3)
    requests = [replace(item.requests[0], max_gen_toks=24) for item in items]
    # generate_completions: the fixed shots are a shared prefix, held apart (prefix_attention) on both models.
    assert native.generate(requests) == reference.generate(requests)
    tokenizer = reference.tokenizer
    prompts = [tuple(tokenizer.encode(r.context)) for r in requests]
    eos = frozenset({int(tokenizer.eos_token_id)})
    outputs: dict[str, list[list[int]]] = {}
    for name, backend in (("reference", reference), ("native", native)):
        for shared in (True, False):
            # Without a shared prefix: each prompt's own tokens only (the last 60), left-padded in one batch.
            rows = [DecodeRow(p if shared else p[-60 + 7 * i :], 20, ()) for i, p in enumerate(prompts)]
            decoder = Decoder(backend.model, device="cpu", pad_id=int(tokenizer.pad_token_id), eos_ids=eos,
                              decode=lambda t: str(tokenizer.decode(t)), prefill_tokens=256)
            with torch.inference_mode():
                outputs[f"{name}-{shared}"] = decoder.run(rows)
    assert outputs["native-True"] == outputs["reference-True"]
    assert outputs["native-False"] == outputs["reference-False"]
    assert all(len(tokens) > 0 for tokens in outputs["native-True"])


def test_a_default_model_backend_imports_no_heavy_transformers_module(smollm2_pair: Any, tmp_path: Path) -> None:
    """In a fresh process: the backend on the dequantized copy, one request scored, one generated; then sys.modules."""
    _, _, root = smollm2_pair
    script = textwrap.dedent(f"""
        import json, sys
        from pathlib import Path
        from pytest_llmgate.config import ModelSpec
        from pytest_llmgate.models import load_backend
        from pytest_llmgate.tasks.base import GenerationRequest, LoglikelihoodRequest
        backend = load_backend(ModelSpec(name="smollm2"), device="cpu", work_dir=Path({str(tmp_path)!r}),
                               fingerprint="f", dequantized_dir=Path({str(root)!r}))
        [(score, _)] = backend.loglikelihood([LoglikelihoodRequest("The capital of France is", " Paris")])
        prefix = "Question: what is two plus two? Answer: four.\\n\\n"
        backend.generate([GenerationRequest(prefix + "Question: one plus one?", ("\\n",), 4),
                          GenerationRequest(prefix + "Question: two plus one?", ("\\n",), 4)])
        print(json.dumps({{"model": type(backend.model).__name__, "score": score,
                          "heavy": [name for name in {list(HEAVY)!r} if name in sys.modules]}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["model"] == "NativeLlamaForCausalLM"
    assert result["heavy"] == []
    assert -20 < result["score"] < 0

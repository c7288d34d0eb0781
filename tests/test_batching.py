"""Batch sizes: automatic limits, back-off on out-of-memory without changing results; lm-eval's BOS rule."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from pytest_llmgate.config import ModelSpec, parse_config  # noqa: E402
from pytest_llmgate.models import ModelPool, builtin_smollm2, load_backend, model_fingerprint  # noqa: E402
from pytest_llmgate.models.batching import CPU_ROWS, CPU_TOKENS, BatchSizer, OutOfMemory  # noqa: E402
from pytest_llmgate.models.transformers_backend import _tokenizer  # noqa: E402
from pytest_llmgate.tasks import TASKS  # noqa: E402
from pytest_llmgate.tasks.base import GenerationRequest, LoglikelihoodRequest  # noqa: E402


def simulated_oom(rows: int) -> Exception:
    return torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {rows} rows (simulated)")


# --- the sizer alone ------------------------------------------------------------------------------

def test_auto_limits_by_device() -> None:
    cpu = BatchSizer("auto", "cpu")
    assert (cpu.rows, cpu.tokens) == (CPU_ROWS, CPU_TOKENS)
    gpu = BatchSizer("auto", "cuda:0")
    assert gpu.rows > cpu.rows and gpu.tokens > cpu.tokens
    # Generation's prefill is split into CPU-sized passes on the CPU only.
    assert (cpu.pass_tokens, gpu.pass_tokens) == (CPU_TOKENS, None)
    fixed = BatchSizer(8, "cuda:0")
    assert (fixed.rows, fixed.tokens) == (8, None)
    # The token limit binds for long rows, the row limit for short ones; never fewer than one row.
    assert cpu.take([CPU_TOKENS // 4] * 100) == 4
    assert cpu.take([10] * 100) == CPU_ROWS
    assert cpu.take([CPU_TOKENS * 3]) == 1


def test_backs_off_keeps_order_and_the_size_that_fitted() -> None:
    sizer = BatchSizer(16, "cpu")
    calls = []

    def step(batch):
        calls.append(len(batch))
        if len(batch) > 3:
            raise simulated_oom(len(batch))
        return [x * 10 for x in batch]

    assert sizer.run(list(range(20)), lambda x: 5, step) == [x * 10 for x in range(20)]
    # 16 fails, 8 fails, 4 fails, then batches of 2 all the way: the shrunken size is kept.
    assert calls[:4] == [16, 8, 4, 2] and set(calls[4:]) == {2}
    assert sizer.rows == 2 and sizer.backoffs == 3


def test_cpu_allocator_message_counts_as_out_of_memory() -> None:
    sizer = BatchSizer(4, "cpu")
    seen = []

    def step(batch):
        seen.append(len(batch))
        if len(batch) == 4:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
        return list(batch)

    assert sizer.run([1, 2, 3, 4], lambda x: 1, step) == [1, 2, 3, 4]
    assert seen == [4, 2, 2]


def test_one_row_that_does_not_fit_names_the_fix() -> None:
    sizer = BatchSizer("auto", "cuda:0")

    def step(batch):
        raise simulated_oom(len(batch))

    with pytest.raises(OutOfMemory, match=r"single sequence of 900 tokens.*max_length.*bfloat16"):
        sizer.run(["x"] * 3, lambda x: 900, step)


def test_other_errors_are_not_retried() -> None:
    sizer = BatchSizer(4, "cpu")
    with pytest.raises(ValueError, match="bad row"):
        sizer.run([1, 2], lambda x: 1, lambda batch: (_ for _ in ()).throw(ValueError("bad row")))
    assert sizer.rows == 4 and sizer.backoffs == 0


# --- a real (tiny, random) model through the backend ------------------------------------------------

@pytest.fixture(scope="module")
def smol_tokenizer() -> Any:
    return _tokenizer(*builtin_smollm2())


def save_tiny(folder: Path, tokenizer: Any) -> Path:
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        initializer_range=0.2, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory, smol_tokenizer: Any) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny"), smol_tokenizer)


def backend_for(folder: Path, tmp_path: Path, pool: ModelPool | None = None, **options: Any) -> Any:
    spec = ModelSpec(name="tiny", path=str(folder), **options)
    return load_backend(spec, device="cpu", work_dir=tmp_path, fingerprint=model_fingerprint(spec), pool=pool)


def fail_above(monkeypatch: pytest.MonkeyPatch, backend: Any, max_rows: int) -> list[int]:
    """Make the decoder raise an out-of-memory error for passes of more than ``max_rows`` rows."""
    decoder = backend.model.get_decoder()
    original = decoder.forward
    passes: list[int] = []

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> Any:
        rows = kwargs["input_ids"].shape[0]
        passes.append(rows)
        if rows > max_rows:
            raise simulated_oom(rows)
        return original(*args, **kwargs)

    monkeypatch.setattr(decoder, "forward", forward)
    return passes


SHARED = "The following are questions about tiny models.\n\n" * 3
LL_REQUESTS = [
    LoglikelihoodRequest(SHARED + f"Question {q}: what comes next after {q * 7}?\nAnswer:", choice)
    for q in range(9) for choice in (" A", " B", " the number that follows", " none of these, probably")
]


@pytest.mark.parametrize("scoring", ["packed", "kv", "plain"])
def test_loglikelihoods_survive_out_of_memory(tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              scoring: str) -> None:
    reference = backend_for(tiny_folder, tmp_path)
    reference.kv_reuse, reference.scoring = scoring != "plain", scoring if scoring != "plain" else "packed"
    expected = reference.loglikelihood(LL_REQUESTS)

    starved = backend_for(tiny_folder, tmp_path)
    starved.kv_reuse, starved.scoring = reference.kv_reuse, reference.scoring
    # The packed path packs these 9 items' trees into two rows: only a one-row limit makes it back off.
    max_rows = 1 if scoring == "packed" else 2
    passes = fail_above(monkeypatch, starved, max_rows=max_rows)
    got = starved.loglikelihood(LL_REQUESTS)

    assert max(passes) > max_rows and starved.sizer.backoffs >= 1 and starved.sizer.rows <= max_rows
    assert [g for _, g in got] == [g for _, g in expected]
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in expected], abs=2e-5)


def test_choice_passes_back_off_below_one_context(tiny_folder: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """An out-of-memory error in the pass over a context's longer choices (a few new tokens on a long
    cache) splits the choices, even when the context batch is already a single row (one item: one context)."""
    one_item = LL_REQUESTS[:4]
    expected = backend_for(tiny_folder, tmp_path).loglikelihood(one_item)
    starved = backend_for(tiny_folder, tmp_path)
    starved.scoring = "kv"  # the path with a separate pass over the choices
    decoder = starved.model.get_decoder()
    original = decoder.forward
    choice_passes: list[int] = []

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> Any:
        rows, width = kwargs["input_ids"].shape
        if width <= 6:  # the choice passes: contexts here are longer than six tokens after the shared prefix
            choice_passes.append(rows)
            if rows > 1:
                raise simulated_oom(rows)
        return original(*args, **kwargs)

    monkeypatch.setattr(decoder, "forward", forward)
    got = starved.loglikelihood(one_item)
    assert choice_passes[0] > 1 and choice_passes[-1] == 1 and starved.sizer.backoffs >= 1
    assert [g for _, g in got] == [g for _, g in expected]
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in expected], abs=2e-5)


def test_generation_survives_out_of_memory(tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    requests = [GenerationRequest(f"Count with me: {n}, {n + 1},", ("\n",), max_gen_toks=12) for n in range(7)]
    expected = backend_for(tiny_folder, tmp_path).generate(requests)
    starved = backend_for(tiny_folder, tmp_path, batch_size=8)
    passes = fail_above(monkeypatch, starved, max_rows=3)
    assert starved.generate(requests) == expected
    assert passes[0] == 7 and starved.generation_sizer.rows <= 3


# --- configuration ----------------------------------------------------------------------------------

def model_config(**keys: Any) -> ModelSpec:
    config = parse_config({"models": {"m": keys}}, source=None, known_tasks=TASKS, rootpath=Path("/tmp"))
    return config.models["m"]


def test_config_batch_size_and_add_bos_token() -> None:
    assert model_config().batch_size == "auto" and model_config().add_bos_token is None
    spec = model_config(batch_size=4, add_bos_token=True)
    assert spec.batch_size == 4 and spec.add_bos_token is True
    with pytest.raises(pytest.UsageError, match=r"batch_size.*'auto' or a positive integer.*'big'"):
        model_config(batch_size="big")
    with pytest.raises(pytest.UsageError, match=r"add_bos_token.*true or false.*'yes'"):
        model_config(add_bos_token="yes")


# --- lm-eval 0.4's special-token rule ------------------------------------------------------------------

@pytest.fixture(scope="module")
def bos_folder(tmp_path_factory: pytest.TempPathFactory, smol_tokenizer: Any) -> Path:
    """A tokenizer that adds a BOS by default, as Llama-2's, Mistral's and Gemma's do."""
    from tokenizers.processors import TemplateProcessing

    tokenizer = copy.deepcopy(smol_tokenizer)
    bos = tokenizer.bos_token
    tokenizer._tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tokenizer.bos_token_id)])
    return save_tiny(tmp_path_factory.mktemp("bos"), tokenizer)


def test_bos_follows_the_tokenizer_default(bos_folder: Path, tiny_folder: Path, tmp_path: Path) -> None:
    with_bos = backend_for(bos_folder, tmp_path)
    bos = with_bos.tokenizer.bos_token_id
    words = with_bos.tokenizer.encode("Question: 2 + 2 =", add_special_tokens=False)
    context, continuation = with_bos.encode_pair("Question: 2 + 2 =", " 4")
    assert context == [bos, *words] and continuation == with_bos.tokenizer.encode(" 4", add_special_tokens=False)
    # A text that already starts with the BOS (a chat template that writes it) gets no second one.
    context, _ = with_bos.encode_pair(with_bos.tokenizer.bos_token + "Question: 2 + 2 =", " 4")
    assert context.count(bos) == 1 and context[0] == bos
    # add_bos_token = false turns the tokenizer's default off; SmolLM2's tokenizer adds nothing.
    context, _ = backend_for(bos_folder, tmp_path, add_bos_token=False).encode_pair("Question: 2 + 2 =", " 4")
    assert context == words
    context, _ = backend_for(tiny_folder, tmp_path).encode_pair("Question: 2 + 2 =", " 4")
    assert context == words
    context, _ = backend_for(tiny_folder, tmp_path, add_bos_token=True).encode_pair("Question: 2 + 2 =", " 4")
    assert context == [bos, *words]
    # Generation prompts follow the same rule.
    from pytest_llmgate.models.generation import encode_context

    assert encode_context(with_bos.tokenizer, "Question:", 100)[0] == bos
    assert encode_context(with_bos.tokenizer, "Question:", 100, add_bos_token=False)[0] != bos


def test_add_bos_token_changes_the_fingerprint(tiny_folder: Path) -> None:
    plain = model_fingerprint(ModelSpec(name="m", path=str(tiny_folder)))
    assert model_fingerprint(ModelSpec(name="m", path=str(tiny_folder), add_bos_token=True)) != plain
    assert model_fingerprint(ModelSpec(name="m", path=str(tiny_folder), batch_size=3)) == plain


def test_cpu_backends_share_untransformed_weights_and_copy_for_transforms(tiny_folder: Path, tmp_path: Path) -> None:
    pool = ModelPool()  # one run's: its engine owns it
    plain = backend_for(tiny_folder, tmp_path, pool)
    again = backend_for(tiny_folder, tmp_path, pool)
    assert again.model is plain.model  # one copy of the weights in memory, not one per backend
    assert backend_for(tiny_folder, tmp_path, ModelPool()).model is not plain.model  # another run shares nothing
    before = {k: v.clone() for k, v in plain.model.state_dict().items()}
    quantized = backend_for(tiny_folder, tmp_path, pool, transform={"method": "rtn", "bits": 2, "group_size": 16})
    assert quantized.model is not plain.model
    changed = [k for k, v in quantized.model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed  # the transform did change weights, on its own copy only
    assert all(torch.equal(v, before[k]) for k, v in plain.model.state_dict().items())

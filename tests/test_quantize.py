"""Tests for pytest_llmgate.models.quantize on a tiny random Llama (no download, CPU only)."""

from __future__ import annotations

import copy
import importlib.util
import json
import pathlib
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from pytest_llmgate.models import quantize  # noqa: E402

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def tiny_config() -> Any:
    return transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )


@pytest.fixture(scope="module")
def tiny_model_once(tiny_config: Any) -> Any:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(tiny_config).eval()


@pytest.fixture
def tiny_model(tiny_model_once: Any) -> Any:
    """A fresh copy of the tiny model, free to be modified by the test."""
    return copy.deepcopy(tiny_model_once)


@pytest.fixture(scope="module")
def vptq_checkpoint(tiny_model_once: Any, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("vptq") / "tiny-2bit"
    return quantize.build_vptq_checkpoint(tiny_model_once, out, seed=0)


@pytest.fixture(scope="module")
def vptq() -> Any:
    """The vptq package, imported quietly by the module under test; skip the test without it."""
    try:
        quantize.require_vptq()
    except RuntimeError as error:
        pytest.skip(f"vptq unavailable: {error}")
    return pytest.importorskip("vptq")


def _decoder_weights(model: Any) -> dict[str, Any]:
    return {name: linear.weight.detach().clone() for name, linear in quantize.decoder_linears(model)}


def _relative_error(new: Any, old: Any) -> float:
    return float((new - old).norm() / old.norm())


def _max_distinct_per_group(weight: Any, group_size: int | None) -> int:
    cols = weight.shape[1]
    size = cols if group_size is None else group_size
    most = 0
    for start in range(0, cols, size):
        block = weight[:, start : start + size]
        ordered = block.sort(dim=1).values
        distinct = (ordered[:, 1:] != ordered[:, :-1]).sum(dim=1) + 1
        most = max(most, int(distinct.max()))
    return most


def _logits(model: Any, tokens: Any) -> Any:
    with torch.no_grad():
        return model(tokens).logits


def _dense_copy_with(config: Any, state: dict[str, Any]) -> Any:
    model = transformers.LlamaForCausalLM(config).eval()
    model.load_state_dict(state, strict=True)
    return model


# ---------------------------------------------------------------------------- round-to-nearest


def test_rtn_8bit_changes_weights_slightly_and_2bit_much_more(tiny_model_once: Any) -> None:
    original = _decoder_weights(tiny_model_once)
    errors = {}
    for bits in (8, 2):
        model = copy.deepcopy(tiny_model_once)
        assert quantize.rtn_quantize_(model, bits=bits, group_size=32) == 2 * 7
        quantized = _decoder_weights(model)
        errors[bits] = max(_relative_error(quantized[k], original[k]) for k in original)
    assert 0 < errors[8] < 0.01
    assert errors[2] > 0.2
    assert errors[2] > 20 * errors[8]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [None, 16, 48])
def test_rtn_uses_at_most_2_to_the_bits_values_per_group(tiny_model: Any, bits: int, group_size: int | None) -> None:
    # 48 does not divide the 64 or 128 input columns: the short last group is checked too.
    quantize.rtn_quantize_(tiny_model, bits=bits, group_size=group_size)
    for name, weight in _decoder_weights(tiny_model).items():
        assert _max_distinct_per_group(weight, group_size) <= 2**bits, name


def test_rtn_leaves_embeddings_head_and_norms_untouched(tiny_model: Any) -> None:
    decoder = {f"{name}.weight" for name, _ in quantize.decoder_linears(tiny_model)}
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    quantize.rtn_quantize_(tiny_model, bits=2, group_size=None)
    after = tiny_model.state_dict()
    untouched = [k for k in before if k not in decoder]
    assert "model.embed_tokens.weight" in untouched
    assert "lm_head.weight" in untouched
    for key in untouched:
        assert torch.equal(after[key], before[key]), key
    assert all(not torch.equal(after[k], before[k]) for k in decoder)


def test_decoder_linears_are_the_seven_llama_projections(tiny_model: Any) -> None:
    names = [name for name, _ in quantize.decoder_linears(tiny_model)]
    assert len(names) == 14
    assert {name.rsplit(".", 1)[-1] for name in names} == set(LINEAR_NAMES)
    assert all(name.startswith(("model.layers.0.", "model.layers.1.")) for name in names)


@pytest.mark.parametrize("bits", [0, 1, 17, 4.0, True])
def test_rtn_rejects_bad_bits(tiny_model: Any, bits: Any) -> None:
    with pytest.raises(ValueError, match="bits"):
        quantize.rtn_quantize_(tiny_model, bits=bits)


def test_rtn_rejects_bad_group_size(tiny_model: Any) -> None:
    with pytest.raises(ValueError, match="group_size"):
        quantize.rtn_quantize_(tiny_model, bits=4, group_size=0)


def test_non_llama_model_is_refused_with_a_clear_error() -> None:
    with pytest.raises(ValueError, match="not a Llama-like"):
        quantize.rtn_quantize_(torch.nn.Sequential(torch.nn.Linear(4, 4)), bits=4)
    with pytest.raises(ValueError, match="not a Llama-like"):
        quantize.build_vptq_checkpoint(torch.nn.Linear(4, 4), "unused")


# ----------------------------------------------------------------- vector quantization (no vptq)


@pytest.mark.parametrize("index_bits", [1, 3, 8, 12, 16])
def test_index_packing_round_trips(index_bits: int) -> None:
    generator = torch.Generator().manual_seed(index_bits)
    indices = torch.randint(0, 2**index_bits, (3, 5, 37), generator=generator)
    packed = quantize._pack_indices(indices, index_bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (3, 5, -(-37 * index_bits // 32))
    assert torch.equal(quantize._unpack_indices(packed, index_bits, 37), indices)


def test_checkpoint_layout(vptq_checkpoint: pathlib.Path, tiny_model_once: Any) -> None:
    config = json.loads((vptq_checkpoint / "config.json").read_text())
    quantization = config["quantization_config"]
    assert quantization["quant_method"] == "vptq"
    assert quantization["shared_layer_config"] == {}
    layers = quantization["config_for_layers"]
    assert sorted(layers) == sorted(name for name, _ in quantize.decoder_linears(tiny_model_once))
    down = layers["model.layers.0.mlp.down_proj"]
    assert down["in_features"] == down["group_size"] == 128
    assert down["out_features"] == 64
    assert down["num_centroids"] == [-1, 256]
    assert down["vector_lens"] == [-1, 4]
    assert down["is_indice_packed"] is True
    stored = safetensors_torch.load_file(str(vptq_checkpoint / quantize.VPTQ_WEIGHTS_FILE))
    assert stored["model.layers.0.mlp.down_proj.indices"].dtype == torch.int32
    # 64 output rows / 4 = 16 vectors per column, 128 columns x 8 bits = 32 int32 words.
    assert stored["model.layers.0.mlp.down_proj.indices"].shape == (1, 16, 32)
    assert stored["model.layers.0.mlp.down_proj.centroids.weight"].shape == (1, 256 * 4)
    assert "model.layers.0.mlp.down_proj.weight" not in stored
    # Tied embeddings: the head is stored as its own tensor, equal to the embeddings.
    assert torch.equal(stored["lm_head.weight"], stored["model.embed_tokens.weight"])
    leftovers = [p.name for p in vptq_checkpoint.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_dense_reconstruction_keeps_the_rest_and_approximates_the_weights(
    vptq_checkpoint: pathlib.Path, tiny_model_once: Any
) -> None:
    dense = quantize.dequantize_vptq_checkpoint(vptq_checkpoint)
    original = tiny_model_once.state_dict()
    assert sorted(dense) == sorted(original)
    decoder = {f"{name}.weight" for name, _ in quantize.decoder_linears(tiny_model_once)}
    for key, value in original.items():
        if key in decoder:
            error = _relative_error(dense[key], value)
            assert 0 < error < 0.9, key  # 2 bits per weight: lossy, but far better than zero
        else:
            assert torch.equal(dense[key], value), key


def test_weights_drawn_from_a_small_codebook_are_recovered_exactly(tiny_model: Any, tmp_path: pathlib.Path) -> None:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _name, linear in quantize.decoder_linears(tiny_model):
            codebook = torch.randn(16, 4, generator=generator)
            rows, cols = linear.weight.shape
            pick = torch.randint(0, 16, (rows // 4, cols), generator=generator)
            linear.weight.copy_(codebook[pick].permute(0, 2, 1).reshape(rows, cols))
    checkpoint = quantize.build_vptq_checkpoint(tiny_model, tmp_path / "exact", num_centroids=16)
    dense = quantize.dequantize_vptq_checkpoint(checkpoint)
    for name, linear in quantize.decoder_linears(tiny_model):
        # Exact up to the rounding of a centroid computed as the mean of identical vectors.
        torch.testing.assert_close(dense[f"{name}.weight"], linear.weight, atol=1e-5, rtol=1e-5)


def test_same_seed_same_bytes_other_seed_other_codebook(
    tiny_model_once: Any, vptq_checkpoint: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    again = quantize.build_vptq_checkpoint(tiny_model_once, tmp_path / "again", seed=0)
    other = quantize.build_vptq_checkpoint(tiny_model_once, tmp_path / "other", seed=1)
    weights = quantize.VPTQ_WEIGHTS_FILE
    first = safetensors_torch.load_file(str(vptq_checkpoint / weights))
    second = safetensors_torch.load_file(str(again / weights))
    third = safetensors_torch.load_file(str(other / weights))
    quantized_keys = [k for k in first if k.endswith((".indices", ".centroids.weight"))]
    assert len(quantized_keys) == 2 * 14
    for key in quantized_keys:
        assert first[key].numpy().tobytes() == second[key].numpy().tobytes(), key
    assert (vptq_checkpoint / weights).read_bytes() == (again / weights).read_bytes()
    assert any(not torch.equal(first[k], third[k]) for k in quantized_keys)


def test_layers_on_several_threads_write_the_same_bytes(
    tiny_model_once: Any, vptq_checkpoint: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    # The fixture's checkpoint was built with the default (one thread per CPU); one thread and more
    # threads than layers must write byte-identical weights and the same layer configs.
    weights = quantize.VPTQ_WEIGHTS_FILE
    for workers in (1, 32):
        built = quantize.build_vptq_checkpoint(tiny_model_once, tmp_path / f"w{workers}", seed=0, workers=workers)
        assert (built / weights).read_bytes() == (vptq_checkpoint / weights).read_bytes(), workers
        assert json.loads((built / "config.json").read_text()) == json.loads(
            (vptq_checkpoint / "config.json").read_text()
        )


def test_a_failing_layer_stops_the_build_and_writes_nothing(
    tiny_model_once: Any, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = quantize._quantize_linear

    def failing(name: str, linear: Any, **options: Any) -> Any:
        if name.endswith("layers.0.mlp.up_proj"):
            raise RuntimeError("out of memory in up_proj")
        return real(name, linear, **options)

    monkeypatch.setattr(quantize, "_quantize_linear", failing)
    with pytest.raises(RuntimeError, match="up_proj"):
        quantize.build_vptq_checkpoint(tiny_model_once, tmp_path / "ckpt", workers=2)
    assert list(tmp_path.iterdir()) == []


def test_the_torch_thread_count_is_restored(tiny_model: Any, tmp_path: pathlib.Path) -> None:
    before = torch.get_num_threads()
    quantize.build_vptq_checkpoint(tiny_model, tmp_path / "ckpt", kmeans_iters=1)
    assert torch.get_num_threads() == before
    quantize.rtn_quantize_(tiny_model, bits=4)
    assert torch.get_num_threads() == before


def test_existing_folder_is_replaced_only_on_request(tiny_model_once: Any, tmp_path: pathlib.Path) -> None:
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        quantize.build_vptq_checkpoint(tiny_model_once, out, kmeans_iters=1)
    assert (out / "keep.txt").read_text() == "precious"
    quantize.build_vptq_checkpoint(tiny_model_once, out, kmeans_iters=1, overwrite=True)
    assert not (out / "keep.txt").exists()
    assert (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


class _Tokenizer:
    def __init__(self, fail: bool) -> None:
        self.fail = fail

    def save_pretrained(self, folder: str) -> None:
        (pathlib.Path(folder) / "tokenizer.json").write_text("{}")
        if self.fail:
            raise OSError("disk full")


def test_tokenizer_is_saved_and_a_crash_leaves_no_half_checkpoint(tiny_model_once: Any, tmp_path: pathlib.Path) -> None:
    saved = quantize.build_vptq_checkpoint(
        tiny_model_once, tmp_path / "ok", kmeans_iters=1, tokenizer=_Tokenizer(fail=False)
    )
    assert (saved / "tokenizer.json").is_file()
    with pytest.raises(OSError, match="disk full"):
        quantize.build_vptq_checkpoint(
            tiny_model_once, tmp_path / "crashed", kmeans_iters=1, tokenizer=_Tokenizer(fail=True)
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("vector_len", 0),
        ("num_centroids", 100),
        ("num_centroids", 2**17),
        ("kmeans_iters", -1),
        ("workers", 0),
    ],
)
def test_bad_vptq_options_are_refused(tiny_model_once: Any, tmp_path: pathlib.Path, option: str, value: int) -> None:
    with pytest.raises(ValueError, match=option):
        quantize.build_vptq_checkpoint(tiny_model_once, tmp_path / "x", **{option: value})
    assert list(tmp_path.iterdir()) == []


def test_missing_vptq_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "vptq" else real_find_spec(name, *args),
    )
    with pytest.raises(RuntimeError, match="pip install --no-deps vptq"):
        quantize.require_vptq()


def test_loading_refuses_a_folder_that_is_not_vptq(tmp_path: pathlib.Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="not a VPTQ checkpoint"):
        quantize.load_vptq_model(tmp_path)
    with pytest.raises(FileNotFoundError):
        quantize.load_vptq_model(tmp_path / "missing")
    with pytest.raises(ValueError, match="dtype"):
        quantize.load_vptq_model(tmp_path, dtype="int8")


# ------------------------------------------------------------------------ through vptq itself


def test_packing_matches_vptq(vptq: Any) -> None:
    from vptq.utils.pack import pack_index

    generator = torch.Generator().manual_seed(0)
    for index_bits in (2, 8, 12):
        indices = torch.randint(0, 2**index_bits, (1, 6, 40), generator=generator)
        theirs = pack_index(indices.to(torch.uint16), index_bits)
        ours = quantize._pack_indices(indices, index_bits)
        assert theirs.dtype == ours.dtype == torch.int32
        assert torch.equal(theirs, ours), index_bits


@pytest.mark.parametrize(("normalize", "with_biases"), [(False, False), (True, False), (False, True)])
def test_vptq_loads_the_checkpoint_with_our_reconstruction(
    vptq: Any,
    tiny_config: Any,
    tiny_model_once: Any,
    tmp_path: pathlib.Path,
    normalize: bool,
    with_biases: bool,
) -> None:
    config, original = tiny_config, tiny_model_once
    if with_biases:
        config = copy.deepcopy(tiny_config)
        config.attention_bias = config.mlp_bias = True
        torch.manual_seed(1)
        original = transformers.LlamaForCausalLM(config).eval()
        with torch.no_grad():
            for _name, linear in quantize.decoder_linears(original):
                linear.bias.normal_()
    checkpoint = quantize.build_vptq_checkpoint(original, tmp_path / "ckpt", normalize=normalize, kmeans_iters=5)
    loaded = quantize.load_vptq_model(checkpoint)
    assert not loaded.training
    assert isinstance(loaded.model.layers[1].mlp.down_proj, vptq.VQuantLinear)
    reference = _dense_copy_with(config, quantize.dequantize_vptq_checkpoint(checkpoint))
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    expected = _logits(reference, tokens)
    torch.testing.assert_close(_logits(loaded, tokens), expected, atol=1e-4, rtol=0)
    # The quantization is lossy: the original model's logits are measurably different.
    assert (expected - _logits(original, tokens)).abs().max() > 1e-3

"""Model sizes as deployed, read from the files a run evaluates (models.size), on the real default model."""

from __future__ import annotations

import json

import pytest

from pytest_llmgate.config import ModelSpec
from pytest_llmgate.models import builtin_smollm2
from pytest_llmgate.models.size import model_size, with_ratios

PARAMS = 134_515_008  # SmolLM2-135M: the tensors of the shipped GGUF file (tied embeddings)


def test_dense_float_copy_and_round_to_nearest_are_nominal(tmp_path):
    dense = model_size(ModelSpec(name="m"), tmp_path, "x")
    assert dense["size_kind"] == "nominal" and dense["params"] == PARAMS
    assert dense["size_bytes"] == PARAMS * 4 and dense["bits_per_weight"] == 32.0
    assert model_size(ModelSpec(name="m", dtype="bfloat16"), tmp_path, "x")["bits_per_weight"] == 16.0
    rtn4 = model_size(ModelSpec(name="m", transform={"method": "rtn", "bits": 4, "group_size": 128}), tmp_path, "x")
    rtn8 = model_size(ModelSpec(name="m", transform={"method": "rtn", "bits": 8}), tmp_path, "x")
    # Decoder linears at 4 bits + a float16 scale per 128 columns; embeddings and norms (~21% here) in float16.
    assert rtn4["size_kind"] == "nominal" and 6.0 < rtn4["bits_per_weight"] < 7.5
    assert rtn4["bits_per_weight"] < rtn8["bits_per_weight"] < 16
    assert "round-to-nearest packed" in rtn4["size_of"]


def test_gguf_files_are_measured_and_unbuilt_ones_are_unknown(tmp_path):
    folder, name = builtin_smollm2()
    shipped = model_size(ModelSpec(name="m", backend="llama_cpp"), tmp_path, "x")
    assert shipped["size_kind"] == "measured" and shipped["size_bytes"] == (folder / name).stat().st_size
    assert shipped["params"] == PARAMS and 5.5 < shipped["bits_per_weight"] < 6.0
    # The header's tensor shapes are kept by the file's identity: a second run does not parse the tokenizer again.
    memo = json.loads((tmp_path / "gguf" / "tensors.json").read_text())
    assert [key.split("|")[0] for key in memo] == [str((folder / name).resolve())]
    assert model_size(ModelSpec(name="m", backend="llama_cpp"), tmp_path, "x") == shipped
    # The same type as the source: the source file itself.
    same = model_size(
        ModelSpec(name="m", backend="llama_cpp", transform={"method": "gguf", "type": "Q4_1"}), tmp_path, "x"
    )
    assert same["size_bytes"] == shipped["size_bytes"]
    unbuilt = model_size(
        ModelSpec(name="m", backend="llama_cpp", transform={"method": "gguf", "type": "Q8_0"}), tmp_path, "x"
    )
    assert unbuilt["size_bytes"] is None and "not built on this machine" in unbuilt["size_of"]


def test_served_and_custom_models_have_no_size_and_ratios_skip_them(tmp_path):
    served = model_size(ModelSpec(name="s", backend="openai", base_url="http://127.0.0.1:1/v1"), tmp_path, "x")
    assert served["size_bytes"] is None and "not visible" in served["size_of"]
    ratios = with_ratios({"baseline": {"size_bytes": 400}, "a": {"size_bytes": 100}, "s": served}, "baseline")
    assert ratios["a"]["compression_ratio"] == 4.0 and ratios["baseline"]["compression_ratio"] == 1.0
    assert ratios["s"]["compression_ratio"] is None


@pytest.mark.parametrize("kind", ["Q8_0"])
def test_ladder_file_size_matches_the_quantizer_summary(tmp_path, kind, gguf_ladder):
    from pytest_llmgate.models.gguf_files import quantized_gguf

    folder, name = builtin_smollm2()
    gguf_ladder(tmp_path, kind)  # the session's file, built once by quantized_gguf (conftest.py)
    made = quantized_gguf(folder / name, kind, tmp_path, threads=2)
    size = model_size(
        ModelSpec(name="m", backend="llama_cpp", transform={"method": "gguf", "type": kind}), tmp_path, "x"
    )
    assert size["size_bytes"] == made.summary["file_bytes"] and size["params"] == made.summary["parameters"]


def test_a_gguf_header_is_read_once_per_file_version(tmp_path, monkeypatch):
    import gguf
    import numpy as np

    from pytest_llmgate.models import gguf_files

    def write(rows: int) -> None:
        writer = gguf.GGUFWriter(str(path), "llama")
        writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
        writer.add_tensor("w", np.ones((rows, 8), dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    reads = []
    real_reader = gguf.GGUFReader
    monkeypatch.setattr(gguf, "GGUFReader", lambda p, *a: reads.append(p) or real_reader(p, *a))
    path = tmp_path / "tiny.gguf"
    write(2)
    first = gguf_files.gguf_header(path)
    assert first.file_type == "F32" and [(t.name, t.shape, t.type) for t in first.tensors] == [("w", (8, 2), "F32")]
    assert gguf_files.gguf_header(path) is first and len(reads) == 1
    write(3)  # a changed file is read again
    assert gguf_files.gguf_header(path).tensors[0].n_elements == 24 and len(reads) == 2

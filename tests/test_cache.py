"""The result cache: content-addressed keys, concurrent writers, and misses when weights change."""

from __future__ import annotations

import json
import multiprocessing
import sqlite3
from pathlib import Path

import pytest

from conftest import SHARED_DATASETS
from pytest_llmgate import cache as cache_module
from pytest_llmgate.cache import ResultCache, digest_without_cache, result_key
from pytest_llmgate.config import ModelSpec
from pytest_llmgate.models import model_fingerprint

KEY = {"fingerprint": "f", "task_version": "arc/v1/abc", "prompt_hash": "p", "params": {"type": "ll"},
       "item_id": "arc/test-1"}


def test_every_part_of_the_key_matters_and_a_fingerprint_is_required():
    base = result_key(**KEY)
    for field, other in [("fingerprint", "g"), ("task_version", "arc/v1/abd"), ("prompt_hash", "q"),
                         ("params", {"type": "gen"}), ("item_id", "arc/test-2")]:
        assert result_key(**{**KEY, field: other}) != base
    with pytest.raises(ValueError, match="needs the model fingerprint"):
        result_key(**{**KEY, "fingerprint": ""})


def test_round_trip_and_file_digest_memo(tmp_path):
    cache = ResultCache(tmp_path / "c.sqlite")
    cache.put_many([("k1", "fp", "v", [[-1.5, True]]), ("k2", "fp", "v", [[-2.0, False]])])
    assert cache.get_many(["k1", "k2", "k3"]) == {"k1": [[-1.5, True]], "k2": [[-2.0, False]]}
    assert cache.count("fp") == 2 and cache.count() == 2
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"a" * 100)
    first = cache.file_digest(weights)
    assert cache.file_digest(weights) == first
    weights.write_bytes(b"a" * 99 + b"b")
    assert cache.file_digest(weights) != first


def test_without_the_cache_file_digests_are_memoised_in_a_file(tmp_path, monkeypatch):
    hashed = []
    real = cache_module.file_sha256
    monkeypatch.setattr(cache_module, "file_sha256", lambda path: hashed.append(path) or real(path))
    monkeypatch.setattr(cache_module, "RACY_NS", 0)  # the files here were written just now
    memo = tmp_path / "work" / "file-digests.json"
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"a" * 100)
    first = digest_without_cache(weights, memo)
    assert first == real(weights) and digest_without_cache(weights, memo) == first
    assert hashed == [weights]  # the second call read the memo
    assert list(json.loads(memo.read_text())) == [str(weights.resolve())]
    weights.write_bytes(b"a" * 99 + b"b")  # same size: the stamp (mtime, ctime) still tells
    assert digest_without_cache(weights, memo) == real(weights) != first
    memo.write_text("{not json")  # an unreadable memo is ignored and rewritten
    assert digest_without_cache(weights, memo) == real(weights)
    assert json.loads(memo.read_text())[str(weights.resolve())]["sha256"] == real(weights)
    blocked = tmp_path / "a-file" / "file-digests.json"  # a memo that cannot be written only costs the hashing
    blocked.parent.write_text("")
    assert digest_without_cache(weights, blocked) == real(weights)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "w.bin", "work"]


def test_a_file_changed_just_now_is_hashed_but_not_memoised(tmp_path):
    memo = tmp_path / "file-digests.json"
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"fresh")
    assert digest_without_cache(weights, memo) == cache_module.file_sha256(weights)
    assert not memo.exists()


def _writer(path: str, worker: int) -> None:
    cache = ResultCache(Path(path))
    for batch in range(40):
        cache.put_many([(f"{worker}-{batch}-{i}", f"fp{worker}", "v", [[float(i), False]]) for i in range(25)])
        cache.get_many([f"{worker}-{batch}-0"])
    cache.close()


def test_concurrent_writers_do_not_corrupt_the_store(tmp_path):
    path = tmp_path / "shared.sqlite"
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_writer, args=(str(path), n)) for n in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
        assert process.exitcode == 0
    cache = ResultCache(path)
    assert cache.count() == 4 * 40 * 25
    assert all(cache.count(f"fp{n}") == 1000 for n in range(4))
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def _tiny_llama(folder: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def _nudge_one_weight(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.mlp.down_proj.weight"][0, 0] += 0.01
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_one_changed_weight_changes_the_fingerprint(tmp_path):
    folder = _tiny_llama(tmp_path / "tiny")
    spec = ModelSpec(name="tiny", path=str(folder))
    before = model_fingerprint(spec)
    assert model_fingerprint(spec) == before
    _nudge_one_weight(folder)
    assert model_fingerprint(spec) != before


def test_one_changed_weight_misses_the_cache_end_to_end(pytester, tmp_path):
    """A real transformers model (tiny, random) with SmolLM2's tokenizer, through the whole plugin."""
    folder = _tiny_llama(tmp_path / "tiny")
    pytester.makefile(".toml", pyproject=f"""
[tool.llmgate]
baseline = "tiny"
tasks = ["arc_challenge"]
data_dir = "{SHARED_DATASETS}"
limit = 4

[tool.llmgate.models.tiny]
path = "{folder}"
tokenizer = "builtin:smollm2-135m-instruct"
""")
    pytester.makepyfile(test_bench='''
import pytest

@pytest.mark.llmgate("arc_challenge")
def test_arc(llmgate_outcome):
    """One ARC item."""
''')

    def evaluated() -> int:
        result = pytester.runpytest_subprocess("--stage=baseline", "--llmgate-report=r.json")
        assert result.ret == 0, result.stdout.str()
        import json

        return json.loads((pytester.path / "r.json").read_text())["models"]["baseline"]["evaluated"]

    assert evaluated() == 4
    assert evaluated() == 0
    _nudge_one_weight(folder)
    assert evaluated() == 4

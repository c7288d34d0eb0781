"""The dequantized copy of a GGUF model: keyed by content, safe to write from two processes, same results."""

from __future__ import annotations

import importlib
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pytest_llmgate.models import dequantized, file_sha256


def make_gguf_folder(folder: Path, weights: bytes = b"GGUF weights", sidecar: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.gguf").write_bytes(weights)
    if sidecar is not None:
        (folder / "tokenizer_config.json").write_text(sidecar)
    return folder


def test_key_follows_the_files_contents(tmp_path: Path) -> None:
    folder = make_gguf_folder(tmp_path / "m")
    first = dequantized.dequantized_key(folder, "model.gguf", file_sha256)
    assert dequantized.dequantized_key(folder, "model.gguf", file_sha256) == first
    # Same name, same size, other bytes: another key.
    make_gguf_folder(folder, b"GGUF weighty")
    changed = dequantized.dequantized_key(folder, "model.gguf", file_sha256)
    assert changed != first
    # A tokenizer file beside it (transformers may read it) is part of the key too.
    make_gguf_folder(folder, b"GGUF weighty", sidecar="{}")
    assert dequantized.dequantized_key(folder, "model.gguf", file_sha256) not in (first, changed)
    # The same bytes elsewhere: the same key (content, not path).
    other = make_gguf_folder(tmp_path / "elsewhere", b"GGUF weighty", sidecar="{}")
    assert dequantized.dequantized_key(other, "model.gguf", file_sha256) == dequantized.dequantized_key(
        folder, "model.gguf", file_sha256
    )


def test_two_writers_at_once_leave_one_complete_folder(tmp_path: Path) -> None:
    root = tmp_path / "dequantized"
    both_writing = threading.Barrier(2)
    errors: list[BaseException] = []

    def save(folder: Path) -> None:
        (folder / "model.safetensors").write_bytes(threading.current_thread().name.encode())
        both_writing.wait(timeout=10)  # both temporary folders exist before either is renamed
        time.sleep(0.05)

    def writer() -> None:
        try:
            dequantized.save_folder(root, "k", "model-float32", save)
        except BaseException as error:  # pragma: no cover - the assertion below reports it
            errors.append(error)

    threads = [threading.Thread(target=writer, name=f"writer-{i}") for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    found = dequantized.cached_folder(root, "k", "model-float32")
    assert found is not None and found.name == "k-model-float32"
    assert (found / "model.safetensors").read_bytes() in (b"writer-0", b"writer-1")
    assert sorted(p.name for p in root.iterdir()) == ["k-model-float32"]  # no temporary folder left


def test_a_failed_write_leaves_nothing_and_is_not_an_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "dequantized"

    def save(folder: Path) -> None:
        (folder / "half").write_text("x")
        raise OSError(28, "No space left on device")

    dequantized.save_folder(root, "k", "tokenizer", save)
    assert dequantized.cached_folder(root, "k", "tokenizer") is None
    assert list(root.iterdir()) == []
    assert "could not save the dequantized GGUF tokenizer" in caplog.text
    # A folder without its completion marker (a crash mid-write of an older version) is not used.
    (root / "k-tokenizer").mkdir()
    assert dequantized.cached_folder(root, "k", "tokenizer") is None


@pytest.fixture(scope="module")
def smollm2_twice(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Path]:
    """The default model loaded from its GGUF file (writing the copy), then from the copy."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from pytest_llmgate.config import ModelSpec
    from pytest_llmgate.models import load_backend

    root = tmp_path_factory.mktemp("cache") / "dequantized"
    spec = ModelSpec(name="smollm2")
    work = tmp_path_factory.mktemp("work")
    first = load_backend(spec, device="cpu", work_dir=work, fingerprint="f", dequantized_dir=root)
    # The second load must not read the GGUF file at all (transformers imports this function inside the functions
    # that read GGUF config, tokenizer and weights, so replacing it on its module catches every read).
    gguf_utils = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    original = gguf_utils.load_gguf_checkpoint

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the GGUF file was read although its dequantized copy exists")

    gguf_utils.load_gguf_checkpoint = refuse
    try:
        second = load_backend(spec, device="cpu", work_dir=work, fingerprint="f", dequantized_dir=root)
    finally:
        gguf_utils.load_gguf_checkpoint = original
    yield first, second, root
    first.close()
    second.close()


def test_default_model_copy_is_written_beside_the_cache(smollm2_twice: tuple[Any, Any, Path]) -> None:
    _, _, root = smollm2_twice
    names = sorted(p.name for p in root.iterdir())
    assert len(names) == 2 and names[0].endswith("-model-float32") and names[1].endswith("-tokenizer")
    assert (root / names[0] / "model.safetensors").stat().st_size > 500e6  # float32, 134.5M parameters


def test_default_model_copy_gives_the_same_tokens_and_scores(smollm2_twice: tuple[Any, Any, Path],
                                                             shared_datasets: Path) -> None:
    from pytest_llmgate.tasks import TASKS, TaskOptions

    first, second, _ = smollm2_twice
    requests = []
    for task, shots, limit in (("arc_challenge", 0, 4), ("winogrande", 0, 3), ("mmlu", 5, 2)):
        items, _ = TASKS[task].configured(TaskOptions(num_fewshot=shots)).load(shared_datasets, limit)
        requests += [r for item in items for r in item.requests]
    for request in requests:
        assert second.encode_pair(request.context, request.continuation) == first.encode_pair(
            request.context, request.continuation
        )
    chat = (("system", "Be brief."), ("user", "What is 2 + 2?"))
    from pytest_llmgate.models.generation import render_chat

    assert render_chat(second.tokenizer, chat) == render_chat(first.tokenizer, chat)
    assert (second.tokenizer.bos_token_id, second.tokenizer.eos_token_id, second.tokenizer.pad_token_id) == (
        first.tokenizer.bos_token_id, first.tokenizer.eos_token_id, first.tokenizer.pad_token_id)
    # The same float32 weights through the same kernels: the same numbers, bit for bit.
    assert second.loglikelihood(requests) == first.loglikelihood(requests)


def test_the_folder_is_the_environments_else_beside_the_cache_else_the_work_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(dequantized.ENVIRONMENT, raising=False)
    cache = tmp_path / "c" / "cache.sqlite"
    assert dequantized.dequantized_root(cache, tmp_path / "w") == tmp_path / "c" / "dequantized"
    assert dequantized.dequantized_root(None, tmp_path / "w") == tmp_path / "w" / "dequantized"
    monkeypatch.setenv(dequantized.ENVIRONMENT, str(tmp_path / "shared"))
    assert dequantized.dequantized_root(cache, tmp_path / "w") == tmp_path / "shared"
    monkeypatch.setenv(dequantized.ENVIRONMENT, "  ")  # blank: as if unset
    assert dequantized.dequantized_root(None, tmp_path / "w") == tmp_path / "w" / "dequantized"

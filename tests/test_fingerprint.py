"""Model fingerprints: every file and package version that changes results changes the fingerprint.

Real files in temporary folders, a real ``ResultCache`` memo; no model is loaded (fingerprints never load one),
so a few bytes stand in for the weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pytest_llmgate import cache as cache_module
from pytest_llmgate import models
from pytest_llmgate.cache import ResultCache
from pytest_llmgate.config import ModelSpec
from pytest_llmgate.models import file_sha256, model_fingerprint

RACY_S = 2.1  # past ResultCache.file_digest's window: files this old are memoised


def write_model(folder: Path) -> Path:
    """A small model folder with the files transformers reads: weights, configs, tokenizer, chat templates."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 16}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 4)
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1}}}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": "</s>"}))
    (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    (folder / "additional_chat_templates").mkdir(exist_ok=True)
    (folder / "additional_chat_templates" / "tool_use.jinja").write_text("{{ messages[0]['content'] }}")
    return folder


def fingerprint_of(folder: Path, digest: Callable[[Path], str] | None = None, **options: object) -> str:
    spec = ModelSpec(name="m", path=str(folder), **options)  # type: ignore[arg-type]
    return model_fingerprint(spec) if digest is None else model_fingerprint(spec, digest)


def rewrite_in_place(path: Path, data: bytes) -> None:
    """Change a file's bytes through the same inode, then restore its mtime (as ``cp -p`` or ``rsync -t`` do)."""
    before = path.stat()
    with path.open("r+b") as handle:
        handle.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)


@pytest.fixture(scope="module")
def settled_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Model folders whose files are old enough to be memoised (one wait for the whole module)."""
    root = tmp_path_factory.mktemp("settled")
    folders = {name: write_model(root / name) for name in ("in_place", "replaced", "unchanged")}
    time.sleep(RACY_S)
    return folders


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The files ``ResultCache.file_digest`` actually reads and hashes, in order."""
    calls: list[Path] = []

    def counting(path: Path) -> str:
        calls.append(path)
        return file_sha256(path)

    monkeypatch.setattr(cache_module, "file_sha256", counting)
    return calls


def memo_rows(cache: ResultCache) -> dict[str, tuple[int, ...]]:
    rows = cache.connection.execute("SELECT path, device, inode, size, mtime_ns, ctime_ns FROM file_digests_v2")
    return {Path(path).name: tuple(rest) for path, *rest in rows}


def test_weights_changed_in_place_with_size_and_mtime_restored_change_the_fingerprint(
    settled_models: dict[str, Path], tmp_path: Path, hashed: list[Path]
) -> None:
    folder = settled_models["in_place"]
    weights = folder / "model.safetensors"
    cache = ResultCache(tmp_path / "c.sqlite")
    before = fingerprint_of(folder, cache.file_digest)
    assert "model.safetensors" in memo_rows(cache)  # memoised: the next look trusts the memo if the key matches
    rewrite_in_place(weights, b"\xff" * 8)
    hashed.clear()
    assert fingerprint_of(folder, cache.file_digest) != before
    assert hashed == [weights]  # only the changed file was read again


def test_weights_replaced_by_another_file_with_the_same_size_and_mtime_change_the_fingerprint(
    settled_models: dict[str, Path], tmp_path: Path
) -> None:
    folder = settled_models["replaced"]
    weights = folder / "model.safetensors"
    cache = ResultCache(tmp_path / "c.sqlite")
    before = fingerprint_of(folder, cache.file_digest)
    assert "model.safetensors" in memo_rows(cache)
    old = weights.stat()
    replacement = folder / "model.safetensors.partial"
    replacement.write_bytes(b"\x00" * old.st_size)
    os.utime(replacement, ns=(old.st_atime_ns, old.st_mtime_ns))
    os.replace(replacement, weights)
    new = weights.stat()
    assert new.st_ino != old.st_ino and (new.st_size, new.st_mtime_ns) == (old.st_size, old.st_mtime_ns)
    assert fingerprint_of(folder, cache.file_digest) != before


def test_unchanged_files_keep_the_fingerprint_without_hashing_again(
    settled_models: dict[str, Path], tmp_path: Path, hashed: list[Path]
) -> None:
    folder = settled_models["unchanged"]
    cache = ResultCache(tmp_path / "c.sqlite")
    first = fingerprint_of(folder, cache.file_digest)
    assert len(hashed) == len(memo_rows(cache)) == 8  # every file read for the model, memoised
    hashed.clear()
    assert fingerprint_of(folder, cache.file_digest) == first
    assert hashed == []
    # Another process (a new connection to the same file) trusts the memo too.
    assert fingerprint_of(folder, ResultCache(tmp_path / "c.sqlite").file_digest) == first
    assert hashed == []
    assert first == fingerprint_of(folder)  # the memo never changes the value


def test_a_file_changed_moments_ago_is_hashed_but_not_memoised(tmp_path: Path, hashed: list[Path]) -> None:
    # Within one timestamp tick a second change would keep the ctime: such a file is hashed every time.
    folder = write_model(tmp_path / "fresh")
    cache = ResultCache(tmp_path / "c.sqlite")
    first = fingerprint_of(folder, cache.file_digest)
    rewrite_in_place(folder / "model.safetensors", b"\xee" * 8)
    assert fingerprint_of(folder, cache.file_digest) != first
    assert memo_rows(cache) == {} and len(hashed) == 16


def test_an_edited_chat_template_changes_the_fingerprint(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "m")
    before = fingerprint_of(folder)
    (folder / "chat_template.jinja").write_text("{% for m in messages %}<|{{ m['role'] }}|>{% endfor %}")
    edited = fingerprint_of(folder)
    assert edited != before
    (folder / "additional_chat_templates" / "tool_use.jinja").write_text("{{ tools }}")
    assert fingerprint_of(folder) != edited
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    assert fingerprint_of(folder) not in (before, edited)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"])
def test_an_edited_tokenizer_file_changes_the_fingerprint(tmp_path: Path, name: str) -> None:
    folder = write_model(tmp_path / "m")
    before = fingerprint_of(folder)
    path = folder / name
    path.write_text(path.read_text().replace("}", ', "added": 1}', 1))
    assert fingerprint_of(folder) != before


@pytest.mark.parametrize("name", ["vocab.json", "merges.txt", "tokenizer.model", "tokenizer.model.v3", "qwen.tiktoken"])
def test_other_tokenizer_vocabularies_are_covered(tmp_path: Path, name: str) -> None:
    folder = write_model(tmp_path / "m")
    (folder / name).write_bytes(b"a 0\n")
    before = fingerprint_of(folder)
    (folder / name).write_bytes(b"a 1\n")
    assert fingerprint_of(folder) != before


def test_an_edited_generation_config_changes_the_fingerprint(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "m")
    before = fingerprint_of(folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert fingerprint_of(folder) != before


def test_an_edited_separate_tokenizer_folder_changes_the_fingerprint(tmp_path: Path) -> None:
    model = write_model(tmp_path / "candidate")
    tokenizer = write_model(tmp_path / "base")  # e.g. the baseline's folder, tokenizer = "<its path>"
    before = fingerprint_of(model, tokenizer=str(tokenizer))
    assert before != fingerprint_of(model)
    (tokenizer / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "add_bos_token": True}))
    edited = fingerprint_of(model, tokenizer=str(tokenizer))
    assert edited != before
    (tokenizer / "chat_template.jinja").write_text("{{ messages[-1]['content'] }}")
    assert fingerprint_of(model, tokenizer=str(tokenizer)) != edited
    # The tokenizer's location is read for its tokenizer files only, not its weights.
    edited = fingerprint_of(model, tokenizer=str(tokenizer))
    (tokenizer / "model.safetensors").write_bytes(b"other weights")
    assert fingerprint_of(model, tokenizer=str(tokenizer)) == edited


def test_a_hub_tokenizer_is_fingerprinted_by_its_name_without_the_network(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "m")
    one = fingerprint_of(folder, tokenizer="HuggingFaceTB/SmolLM2-135M-Instruct")
    assert one != fingerprint_of(folder, tokenizer="HuggingFaceTB/SmolLM2-360M-Instruct")
    assert one != fingerprint_of(folder)


def test_a_runtime_version_change_changes_the_fingerprint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = write_model(tmp_path / "m")
    installed = {"torch": "2.5.1+cpu", "transformers": "4.57.0", "tokenizers": "0.22.1", "vptq": "0.0.5"}
    monkeypatch.setattr(models, "package_version", lambda name: installed.get(name, "absent"))
    vptq_transform = {"method": "vptq", "bits": 2}
    plain = fingerprint_of(folder)
    for package in ("torch", "transformers", "tokenizers"):
        installed[package] += ".post1"
        assert fingerprint_of(folder) != plain, package
        plain = fingerprint_of(folder)
    transformed, vptq_backend = fingerprint_of(folder, transform=vptq_transform), fingerprint_of(folder, backend="vptq")
    installed["vptq"] = "0.0.6"
    assert fingerprint_of(folder, transform=vptq_transform) != transformed
    assert fingerprint_of(folder, backend="vptq") != vptq_backend
    assert fingerprint_of(folder) == plain  # vptq's version matters only where vptq computes


def test_a_custom_backend_keeps_its_own_fingerprint(monkeypatch: pytest.MonkeyPatch) -> None:
    class Custom:
        @classmethod
        def fingerprint(cls, spec: ModelSpec) -> str:
            return f"served:{spec.path}"

    monkeypatch.setattr(models, "import_backend", lambda reference: Custom)
    monkeypatch.setattr(models, "package_version", lambda name: pytest.fail(f"{name} looked up for a custom backend"))
    spec = ModelSpec(name="m", backend="mine.server:Custom", path="http://127.0.0.1:1/v1")
    assert model_fingerprint(spec) == model_fingerprint(spec)
    assert model_fingerprint(spec) != model_fingerprint(ModelSpec(name="m", backend="mine.server:Custom", path="x"))


def test_the_gguf_bytes_and_their_sidecars_make_a_gguf_fingerprint(tmp_path: Path) -> None:
    folder = tmp_path / "ggufs"
    folder.mkdir()
    (folder / "model.Q4_1.gguf").write_bytes(b"GGUF" + bytes(64))
    (folder / "model.Q8_0.gguf").write_bytes(b"GGUF" + bytes(128))
    by_name = fingerprint_of(folder, gguf_file="model.Q4_1.gguf")
    assert fingerprint_of(folder / "model.Q4_1.gguf") == by_name  # path = the .gguf file itself
    assert fingerprint_of(folder, gguf_file="model.Q8_0.gguf") != by_name
    rewrite_in_place(folder / "model.Q4_1.gguf", b"GGUF\x01")
    changed = fingerprint_of(folder, gguf_file="model.Q4_1.gguf")
    assert changed != by_name
    (folder / "model.Q8_0.gguf").write_bytes(b"GGUF" + bytes(256))  # another quantization beside it: not read
    assert fingerprint_of(folder, gguf_file="model.Q4_1.gguf") == changed
    # transformers reads the generation config and tokenizer config beside a GGUF file.
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    with_config = fingerprint_of(folder, gguf_file="model.Q4_1.gguf")
    assert with_config != changed
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    assert fingerprint_of(folder, gguf_file="model.Q4_1.gguf") != with_config


def test_a_gguf_fingerprint_holds_the_gguf_reader_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "model.gguf").write_bytes(b"GGUF" + bytes(16))
    installed = {"gguf": "0.17.0"}
    monkeypatch.setattr(models, "package_version", lambda name: installed.get(name, "1.0"))
    before = fingerprint_of(tmp_path / "model.gguf")
    folder_before = fingerprint_of(write_model(tmp_path / "dense"))
    installed["gguf"] = "0.18.0"
    assert fingerprint_of(tmp_path / "model.gguf") != before
    assert fingerprint_of(tmp_path / "dense") == folder_before  # no GGUF read: its reader does not matter


def test_files_the_backend_never_reads_leave_the_fingerprint_alone(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "m")
    before = fingerprint_of(folder)
    (folder / ".git").mkdir()
    (folder / ".git" / "index.json").write_text("{}")
    (folder / ".cache" / "huggingface").mkdir(parents=True)
    (folder / ".cache" / "huggingface" / "model.safetensors.metadata").write_text("x")
    (folder / ".cache" / "huggingface" / "download.json").write_text("{}")
    (folder / "README.md").write_text("# m")
    # Never run: the backends do not pass trust_remote_code.
    (folder / "modeling_custom.py").write_text("raise SystemExit")
    assert fingerprint_of(folder) == before


def test_fingerprinting_imports_no_torch(tmp_path: Path) -> None:
    # A run whose results are all cached must not pay for torch: fingerprints come from files and metadata.
    folder = write_model(tmp_path / "m")
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from pytest_llmgate.cache import ResultCache\n"
        "from pytest_llmgate.config import ModelSpec\n"
        "from pytest_llmgate.models import model_fingerprint\n"
        f"spec = ModelSpec(name='m', path={str(folder)!r}, transform={{'method': 'vptq', 'bits': 2}})\n"
        f"model_fingerprint(spec, ResultCache(Path({str(tmp_path / 'c.sqlite')!r})).file_digest)\n"
        "loaded = sorted(m for m in ('torch', 'transformers', 'vptq', 'tokenizers', 'gguf') if m in sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr

"""Shared fixtures for the project's own tests: real data, and throwaway gate projects."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

# selenium (the HTML report's browser test) needs trio, which registers a Hypothesis plugin that Hypothesis warns
# about when it loads: pytest runs that the tests start in subprocesses (xdist workers too) would count that warning.
os.environ.setdefault("HYPOTHESIS_NO_PLUGINS", "1")

# pytester's inline runs drop modules first imported during a run from sys.modules; importing
# torch's (or numpy's) C extension a second time then fails or crashes the interpreter. Importing
# them here, before any inline run, keeps them loaded.
import numpy  # noqa: F401
import pytest
import scipy.stats  # noqa: F401
import torch  # noqa: F401

with contextlib.suppress(ImportError):  # llama.cpp's shared libraries, loaded once (CI installs it)
    import llama_cpp  # noqa: F401

ROOT = Path(__file__).resolve().parent
SHARED_DATASETS = ROOT.parent / "shared" / "datasets"
DEQUANTIZED = "LLMGATE_DEQUANTIZED_DIR"
_OWN_DEQUANTIZED = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    """One dequantized copy of the default GGUF model for the whole session: the backends the tests load and the
    gate runs they start (inline, in subprocesses, xdist workers) read it from ``$LLMGATE_DEQUANTIZED_DIR``
    instead of parsing the GGUF file again (10-20 s each on a 2-core machine). Tests about where the copy goes
    unset it. A folder someone set already is used and kept."""
    if not os.environ.get(DEQUANTIZED):
        folder = tempfile.mkdtemp(prefix="llmgate-tests-dequantized-")
        os.environ[DEQUANTIZED] = folder
        config.stash[_OWN_DEQUANTIZED] = folder


def pytest_unconfigure(config: pytest.Config) -> None:
    folder = config.stash.get(_OWN_DEQUANTIZED, None)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
        os.environ.pop(DEQUANTIZED, None)


@pytest.fixture(scope="session")
def gguf_ladder(tmp_path_factory: pytest.TempPathFactory):
    """``into(work_dir, *kinds)``: the default model's GGUF files of those types (``F16``, ``Q8_0``, ...) where
    ``quantized_gguf`` (and so a gate run whose work folder is ``work_dir``, a project's ``.llmgate``) finds them
    (``gguf/<source hash>/``), built once per session by ``quantized_gguf`` itself (the F16 file with the gguf
    package, the others with llama.cpp's quantizer) and hard-linked there (copied across file systems), instead of
    every test building them again (F16 17 s, each quantized file 7-8 s on a 2-core machine)."""
    built = tmp_path_factory.mktemp("gguf-ladder")

    def into(work_dir: Path, *kinds: str) -> None:
        from pytest_llmgate.models import builtin_smollm2
        from pytest_llmgate.models.gguf_files import quantized_gguf

        folder, name = builtin_smollm2()
        for kind in kinds:
            made = quantized_gguf(folder / name, kind, built, threads=2)
            target = work_dir / "gguf" / made.path.parent.name
            target.mkdir(parents=True, exist_ok=True)
            for source in (made.path, made.path.with_suffix(".json")):
                if not (target / source.name).exists():
                    try:
                        os.link(source, target / source.name)
                    except OSError:
                        shutil.copy2(source, target / source.name)

    return into


@pytest.fixture(scope="session")
def dequantized_dir() -> Path:
    """The session's folder of dequantized GGUF copies (``load_backend(..., dequantized_dir=...)``)."""
    return Path(os.environ[DEQUANTIZED])


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """The real benchmark data beside the checkout (../shared/datasets), read in place."""
    if not (SHARED_DATASETS / "arc_challenge" / "test.jsonl").is_file():
        pytest.fail(f"real data expected at {SHARED_DATASETS}; the tests read it from there (see README)")
    return SHARED_DATASETS


def synthetic_arc_rows(count: int) -> list[dict]:
    """ARC-schema rows whose right answer contains the word RIGHT (for the SkillBackend double)."""
    rows = []
    for index in range(count):
        labels = ["A", "B", "C", "D"]
        right = index % 4
        texts = [f"answer {index}-{k} RIGHT" if k == right else f"answer {index}-{k} wrong" for k in range(4)]
        rows.append(
            {
                "id": f"q{index}",
                "question": f"Synthetic question {index}?",
                "choices": {"text": texts, "label": labels},
                "answerKey": labels[right],
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Write rows as JSON Lines, creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    """Rows of a JSON Lines file (the first ``limit``)."""
    with path.open(encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return rows if limit is None else rows[:limit]

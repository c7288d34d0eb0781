"""Shared fixtures for the project's own tests: real data, and throwaway gate projects."""

from __future__ import annotations

import contextlib
import json
import os
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

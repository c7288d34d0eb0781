"""The project's own demo configuration, end to end, on the real default model and real data.

Runs the repository's benchmarks/ with its pyproject.toml (the README's demo ladder), limited to
a few items and the 8-bit stage so that it fits in CI; the full ladder is the README's first command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def run_benchmarks(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    report = tmp_path / "report.json"
    command = [
        sys.executable,
        "-m",
        "pytest",
        "benchmarks",
        "-p",
        "no:cacheprovider",
        "-q",
        f"--llmgate-cache={tmp_path / 'cache.sqlite'}",
        f"--llmgate-report={report}",
        "--llmgate-limit=3",
        *args,
    ]
    # Not an xdist worker's environment (pytest-benchmark would take the child for one and time nothing).
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_XDIST_")}
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert report.is_file(), result.stdout + result.stderr
    return result, json.loads(report.read_text())


def test_demo_config_baseline_then_int8_on_smollm2(tmp_path, gguf_ladder):
    # The int8 stage's Q8_0 file and its F16 speed reference, as the demo's first run builds them into the
    # repository's .llmgate/ (here: the session's files, built once by the same quantized_gguf, conftest.py).
    gguf_ladder(ROOT / ".llmgate", "F16", "Q8_0")
    baseline, report = run_benchmarks(tmp_path, "--stage=baseline")
    assert baseline.returncode == 0, baseline.stdout
    assert report["verdict"] == "baseline-recorded" and report["models"]["baseline"]["evaluated"] == 6
    assert "baseline recorded: 6 items in the cache" in baseline.stdout
    # The dequantized copy went to $LLMGATE_DEQUANTIZED_DIR (the suite's shared folder, conftest.py), not beside
    # the cache file.
    shared = Path(os.environ["LLMGATE_DEQUANTIZED_DIR"])
    assert sorted(p.parent.name.rsplit("-", 1)[-1] for p in shared.glob("*/complete.json")) == ["float32", "tokenizer"]
    assert not (tmp_path / "dequantized").exists()

    stage, report = run_benchmarks(tmp_path, "--stage=int8")
    assert stage.returncode == report["exit_code"] == {"pass": 0, "breach": 10, "critical": 11}[report["verdict"]]
    # The stage run evaluated no baseline request: every baseline result came from the cache.
    assert report["models"]["baseline"] == {**report["models"]["baseline"], "evaluated": 0, "cached": 6}
    assert report["models"]["int8"]["evaluated"] == 6
    first = report["items"][0]
    assert first["task"] == "arc_challenge" and first["id"] == "test-0"
    # lm-eval 0.4.13's value for this choice (see test_scoring_real.py); the Q8_0 file in llama.cpp moves it a little.
    assert abs(first["baseline"]["loglikelihoods"][0] - -29.65350341796875) < 1e-4
    assert first["candidate"]["loglikelihoods"] != first["baseline"]["loglikelihoods"]
    assert "stage int8:" in stage.stdout and "llmgate: stage 'int8'" in stage.stdout


def test_without_the_result_cache_the_dequantized_copy_is_kept_in_the_work_folder(
    pytester, shared_datasets, monkeypatch
):
    """``cache = false`` keeps no results, but the default GGUF model's dequantized copy (a file derived from the
    model, like a ladder's GGUF files) is written to .llmgate/dequantized/ and read by the next run."""
    monkeypatch.delenv("LLMGATE_DEQUANTIZED_DIR")  # the test suite's shared folder (conftest.py)
    pytester.makepyprojecttoml(
        f"[tool.llmgate]\ntasks = ['arc_challenge']\nlimit = 1\ndata_dir = {str(shared_datasets)!r}\ncache = false\n"
        "baseline = 'ref'\n[tool.llmgate.models.ref]\npath = 'builtin:smollm2-135m-instruct'\n"
    )
    pytester.makepyfile(
        "import pytest\n\n\n@pytest.mark.llmgate('arc_challenge')\ndef test_arc(llmgate_outcome):\n    pass\n"
    )
    args = ["--stage=baseline", "-p", "no:cacheprovider", "-o", "log_cli=true", "--log-cli-level=INFO"]
    first = pytester.runpytest_subprocess(*args, "--llmgate-report=first.json")
    assert first.ret == 0, first.stdout.str()
    root = pytester.path / ".llmgate" / "dequantized"
    complete = sorted(p.parent.name.rsplit("-", 1)[-1] for p in root.glob("*/complete.json"))
    assert complete == ["float32", "tokenizer"], sorted(root.iterdir())
    assert "reading the dequantized GGUF" not in first.stdout.str()
    assert not (pytester.path / ".llmgate" / "cache.sqlite").exists()
    # The model file's sha256 (its fingerprint, the copy's key) is memoised in the work folder: hashed once.
    memo = json.loads((pytester.path / ".llmgate" / "file-digests.json").read_text())
    assert [Path(p).name for p in memo] == ["SmolLM2-135M-Instruct.Q4_1.gguf"]

    second = pytester.runpytest_subprocess(*args, "--llmgate-report=second.json")
    assert second.ret == 0, second.stdout.str()
    text = second.stdout.str()
    assert "reading the dequantized GGUF model-float32 from" in text
    assert "reading the dequantized GGUF tokenizer from" in text
    # The copy runs on the native Llama (the first run read the GGUF file with transformers): the same scores.
    assert "on the native Llama forward pass (float32)" in text
    assert "native Llama" not in first.stdout.str()
    reports = [json.loads((pytester.path / name).read_text()) for name in ("first.json", "second.json")]
    scores = [r["items"][0]["baseline"]["loglikelihoods"] for r in reports]
    assert scores[0] == scores[1]
    assert reports[0]["models"]["baseline"]["fingerprint"] == reports[1]["models"]["baseline"]["fingerprint"]

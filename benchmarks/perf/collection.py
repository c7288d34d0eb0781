"""Collection time of every built-in benchmark at full size, and pytest-llmgate's per-item overhead.

Three runs, each a fresh ``pytest`` process on a generated project (the data read in place from
--data-dir), wall time measured around the process:

1. ``empty``: ``pytest --collect-only`` of a project with no benchmark: Python, pytest and plugin start-up;
2. ``collect``: ``pytest --collect-only --stage=baseline`` of the seven core tasks plus the
   variants, all items (about 31,000): start-up + reading and hashing the data, building every
   prompt (MMLU and GSM8K few-shot) and one pytest item per benchmark item;
3. ``run``: the same items evaluated by a backend that answers instantly (no model), so the time
   above ``collect`` is what the plugin and pytest spend per item: sharding, the result cache,
   scoring, reporting, the JSON report. HumanEval and MBPP are left out of this run (their cost is
   the sandbox executing programs, not the harness).

    .venv/bin/python benchmarks/perf/collection.py --data-dir ../shared/datasets --work /tmp/llmgate-collect

Prints one line per run and the derived figures.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

LOGLIKELIHOOD = ["arc_challenge", "hellaswag", "winogrande", "truthfulqa_mc1", "truthfulqa_mc2", "mmlu"]
GENERATION = ["gsm8k"]
CODE = ["humaneval", "mbpp"]

INSTANT_BACKEND = '''
"""A backend that answers at once: every measured second is the harness's."""


class InstantBackend:
    def __init__(self, spec, device):
        self.spec = spec

    @classmethod
    def fingerprint(cls, spec):
        return "instant-v1"

    def loglikelihood(self, requests):
        # Distinct values, so predictions are real argmaxes.
        return [(-1.0 - (len(r.continuation) % 7) / 10, False) for r in requests]

    def generate(self, requests):
        return [["The answer is 42."] for _ in requests]

    def close(self):
        pass
'''


def project(folder: Path, data_dir: Path, tasks: list[str], backend: str | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model = f'[tool.llmgate.models.ref]\nbackend = "{backend}"\n' if backend else "[tool.llmgate.models.ref]\n"
    (folder / "pyproject.toml").write_text(
        f"[tool.llmgate]\ntasks = {tasks!r}\ndata_dir = {str(data_dir)!r}\ncache = false\nbaseline = 'ref'\n"
        + model)
    tests = ["import pytest\n"]
    for task in tasks:
        tests.append(f"\n\n@pytest.mark.llmgate({task!r})\ndef test_{task}(llmgate_outcome):\n    pass\n")
    (folder / "test_all.py").write_text("".join(tests) if tasks else "def test_nothing():\n    pass\n")
    (folder / "instant_backend.py").write_text(INSTANT_BACKEND)
    (folder / "conftest.py").write_text("")  # rootdir conftest: the folder joins sys.path (instant_backend)
    return folder


# Plugins of the development environment that have nothing to do with a benchmark run: hypothesis (the test
# suite's) imports itself for its terminal summary, about 1 s of every pytest process here. --with-all-plugins
# keeps them.
UNRELATED_PLUGINS = ["-p", "no:hypothesispytest", "-p", "no:anyio"]
PLUGINS: list[str] = []


def timed(arguments: list[str], cwd: Path) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *PLUGINS, *arguments], cwd=cwd,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode not in (0, 5):
        raise SystemExit(f"pytest {arguments} in {cwd} exited {done.returncode}:\n{done.stdout[-3000:]}")
    return seconds, done.stdout


def count(output: str, word: str) -> int:
    found = re.findall(rf"(\d+) (?:tests? )?{word}", output)
    return int(found[-1]) if found else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/llmgate-collect"))
    parser.add_argument("--repeat", type=int, default=3, help="runs of each collection; the fastest counts")
    parser.add_argument("--with-all-plugins", action="store_true",
                        help="keep the environment's unrelated pytest plugins (hypothesis, anyio) loaded")
    args = parser.parse_args()
    PLUGINS[:] = [] if args.with_all_plugins else UNRELATED_PLUGINS
    data_dir = args.data_dir.resolve()
    everything = LOGLIKELIHOOD + GENERATION + CODE

    empty = project(args.work / "empty", data_dir, [], None)
    full = project(args.work / "full", data_dir, everything, "instant_backend:InstantBackend")
    scored = project(args.work / "scored", data_dir, LOGLIKELIHOOD + GENERATION, "instant_backend:InstantBackend")

    startup = min(timed(["--collect-only", "-q"], empty)[0] for _ in range(args.repeat))
    collect_runs = [timed(["--collect-only", "-q", "--stage=baseline"], full) for _ in range(args.repeat)]
    collect, output = min(collect_runs)
    items = count(output, "collected")
    print(f"start-up (empty project, --collect-only): {startup:.2f} s")
    print(f"collection of {items} items ({', '.join(everything)}): {collect:.2f} s "
          f"({collect - startup:.2f} s above start-up; runs: {', '.join(f'{s:.2f}' for s, _ in collect_runs)})")

    scored_collect = min(timed(["--collect-only", "-q", "--stage=baseline"], scored)[0] for _ in range(args.repeat))
    run, output = timed(["-q", "--stage=baseline", "--llmgate-report=report.json"], scored)
    passed = count(output, "passed")
    per_item = (run - scored_collect) / passed * 1000 if passed else float("nan")
    print(f"run of {passed} items with an instant backend ({', '.join(LOGLIKELIHOOD + GENERATION)}): {run:.2f} s; "
          f"collection alone {scored_collect:.2f} s; per-item overhead {per_item:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())

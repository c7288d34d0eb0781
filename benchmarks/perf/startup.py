"""Start-up cost of pytest-llmgate in a project that does not use it.

A plain project of 100 trivial tests, run end to end (``python -m pytest -q``) with the plugin loaded
(it is installed, so pytest loads it through its entry point) and with it disabled (``-p no:llmgate``,
which is what "not installed" costs). The two are interleaved round by round so machine noise hits both
alike; the script prints each side's median and the ratio, and the spread of the plain runs as the noise.

    .venv/bin/python benchmarks/perf/startup.py --rounds 30
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_project(folder: Path, tests: int) -> None:
    """A project with ``tests`` trivial tests and a pyproject.toml without llmgate configuration."""
    (folder / "pyproject.toml").write_text('[project]\nname = "plain"\nversion = "0"\n')
    body = "".join(f"def test_{i}():\n    assert {i} == {i}\n\n\n" for i in range(tests))
    (folder / "test_plain.py").write_text(body)


def run(folder: Path, *extra: str) -> float:
    """Seconds for one pytest run in ``folder``."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *extra], cwd=folder,
                   check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--tests", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        make_project(folder, args.tests)
        run(folder), run(folder, "-p", "no:llmgate")  # warm the file cache and the bytecode
        with_plugin, without = [], []
        for _ in range(args.rounds):
            with_plugin.append(run(folder))
            without.append(run(folder, "-p", "no:llmgate"))
    median_with, median_without = statistics.median(with_plugin), statistics.median(without)
    noise = statistics.quantiles(without, n=4)
    print(f"{args.tests} plain tests, {args.rounds} interleaved rounds")
    print(f"with pytest-llmgate loaded:   median {median_with * 1000:.0f} ms")
    print(f"with -p no:llmgate:           median {median_without * 1000:.0f} ms "
          f"(interquartile range {noise[0] * 1000:.0f}-{noise[2] * 1000:.0f} ms)")
    print(f"ratio: {median_with / median_without:.3f}")


if __name__ == "__main__":
    main()

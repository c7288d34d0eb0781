"""How repeatable is a speed ratio, and how often does a ratio gate 10% away from it flip?

Runs the demo's speed probe (benchmarks/test_speed.py with the benchmark items, results from the cache) N times
for one stage, each a separate pytest process as CI runs it, and reads from each JSON report the stage's p95
latency ratio against its speed reference (with its interval) and the decode rates. Then, for gates set at
0.9x and 1.1x the mean measured ratio, counts in how many runs each policy's verdict differs from the verdict on
the mean (a flip).

    .venv/bin/python benchmarks/perf/speed_repeatability.py --stage int4 --runs 5

Run it on a quiet machine: the figures are this machine's, and anything else running moves them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def one_run(stage: str, report: Path, extra: list[str]) -> dict:
    command = [
        sys.executable, "-m", "pytest", "benchmarks/test_speed.py", "benchmarks/test_core.py", f"--stage={stage}",
        "-p", "no:xdist", "-p", "no:cacheprovider", "-q", "-W", "ignore", f"--llmgate-report={report}", *extra,
    ]  # fmt: skip
    subprocess.run(command, cwd=ROOT, check=False, capture_output=True, text=True)
    data = json.loads(report.read_text())
    model = data["models"][stage]
    speed = model["speed"]
    reference = data["models"][speed["vs_reference"]["reference"]]["speed"]
    return {
        "latency_ratio": speed["vs_reference"]["latency_ratio"],
        "p95_ms": speed["latency_ms"]["p95"],
        "reference_p95_ms": reference["latency_ms"]["p95"],
        "decode": speed["decode_tokens_per_s"],
        "reference_decode": reference["decode_tokens_per_s"],
    }


def verdict(ratio: dict, limit: float, policy: str) -> bool:
    """``latency ratio <= limit`` as the gate decides it (gate._interval_rule, upper bound)."""
    return {"point": ratio["point"], "strict": ratio["hi"], "lenient": ratio["lo"]}[policy] <= limit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", default="int4")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as folder:
        for n in range(args.runs):
            runs.append(one_run(args.stage, Path(folder) / f"r{n}.json", args.pytest_args))
            r = runs[-1]
            lr = r["latency_ratio"]
            print(
                f"run {n + 1}: p95 latency ratio {lr['point']:.3f} [{lr['lo']:.3f}, {lr['hi']:.3f}]  "
                f"p95 {r['p95_ms']:.0f} ms vs {r['reference_p95_ms']:.0f} ms  "
                f"decode {r['decode']:.0f} vs {r['reference_decode']:.0f} tok/s",
                flush=True,
            )
    points = [r["latency_ratio"]["point"] for r in runs]
    mean = statistics.mean(points)
    spread = statistics.stdev(points) if len(points) > 1 else 0.0
    print(f"\nratio: mean {mean:.3f}, sd {spread:.3f} ({spread / mean:.1%}), range {min(points):.3f}-{max(points):.3f}")
    print("gate limit   policy   passes on the mean   runs that flip")
    for factor in (0.9, 1.1):
        limit = mean * factor
        for policy in ("point", "strict", "lenient"):
            expected = mean <= limit
            flips = sum(verdict(r["latency_ratio"], limit, policy) != expected for r in runs)
            print(f"{limit:.3f} ({factor:.1f}x)  {policy:7}  {expected!s:18}   {flips}/{len(runs)}")


if __name__ == "__main__":
    main()

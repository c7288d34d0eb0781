"""Speed of log-likelihood scoring: the key/value-reusing and packed paths (and "auto", the default, which picks
one of them per call) against the plain (lm-eval-shaped) path.

Both paths run in this one process on the same model and the same requests, one after the other, so the
ratio is free of machine-to-machine noise. The plain path does exactly the forward passes lm-evaluation-
harness 0.4 does (``(context + continuation)[:-1]`` per choice); the comparison against lm-eval itself,
which adds its own overhead on top, is a separate measurement. Also printed: the largest log-likelihood
difference and whether every prediction agrees, and the peak resident memory.

    .venv/bin/python benchmarks/perf/scoring_speed.py --data-dir ../shared/datasets \\
        --workload mmlu:5:abstract_algebra,high_school_biology,marketing:60 --workload arc_challenge:25::40

A workload is ``task:shots:groups:items`` (groups: comma-separated subjects, empty for all; items per
group for MMLU, in total otherwise).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
import warnings
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--workload", action="append", required=True)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-size", type=lambda v: v if v == "auto" else int(v), default="auto")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")

    from pytest_llmgate.config import ModelSpec
    from pytest_llmgate.models import load_backend
    from pytest_llmgate.tasks import TASKS, TaskOptions

    spec = ModelSpec(name="smollm2", dtype=args.dtype, batch_size=args.batch_size)
    backend = load_backend(spec, device="cpu", work_dir=Path("/tmp/llmgate-perf"), fingerprint="perf")
    print("| workload | items | requests | plain s | kv s | packed s | auto s | kv speed-up | packed speed-up | "
          "max |dLL| kv / packed | same predictions kv / packed |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for workload in args.workload:
        name, shots, groups, count = workload.split(":")
        task = TASKS[name].configured(TaskOptions(num_fewshot=int(shots)))
        items, _ = task.load(args.data_dir)
        wanted = [g for g in groups.split(",") if g]
        items = [i for i in items if i.group in wanted and i.doc_id < int(count)] if wanted else items[:int(count)]
        requests = [r for item in items for r in item.requests]
        # Shards of one group, as the engine sends them.
        by_group: dict[str, list] = {}
        for item in items:
            by_group.setdefault(item.group, []).extend(item.requests)
        timings = {}
        results = {}
        for mode in ("plain", "kv", "packed", "auto"):
            backend.kv_reuse = mode != "plain"
            backend.scoring = mode if mode != "plain" else "packed"
            start = time.perf_counter()
            out = []
            for chunk in by_group.values():
                out += backend.loglikelihood(chunk)
            timings[mode] = time.perf_counter() - start
            results[mode] = out
        order = [r for group in by_group.values() for r in group]
        assert len(order) == len(requests)
        diffs, sames = [], []
        for mode in ("kv", "packed"):
            diffs.append(max(abs(a[0] - b[0]) for a, b in zip(results["plain"], results[mode], strict=True)))
            same = 0
            offset = 0
            for item in [i for g in by_group for i in items if i.group == g]:
                n = len(item.requests)
                a = task.score(item, results["plain"][offset:offset + n])
                b = task.score(item, results[mode][offset:offset + n])
                same += (a["prediction"], a.get("prediction_norm")) == (b["prediction"], b.get("prediction_norm"))
                offset += n
            sames.append(same)
        print(f"| {name} {shots}-shot | {len(items)} | {len(requests)} | {timings['plain']:.1f} | "
              f"{timings['kv']:.1f} | {timings['packed']:.1f} | {timings['auto']:.1f} | "
              f"{timings['plain'] / timings['kv']:.2f}x | "
              f"{timings['plain'] / timings['packed']:.2f}x | {diffs[0]:.1e} / {diffs[1]:.1e} | "
              f"{sames[0]}/{len(items)} / {sames[1]}/{len(items)} |", flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory: {peak:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

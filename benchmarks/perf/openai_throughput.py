"""Throughput of backend = "openai" against llama-cpp-python's OpenAI-compatible server, and a gate with -n 2.

Starts the server on 127.0.0.1 serving the default model's GGUF file, then:

1. runs the first N GSM8K items (5-shot, greedy, the task's own requests) through the openai backend at
   1, 4 and 16 requests in flight, each from a fresh backend (no cache), and prints items/s and the speed-up
   against 1 in flight, measured in the same run;
2. checks the completions against llama.cpp in-process (backend = "llama_cpp" on the same file): how many are
   identical (the generation half of the agreement table);
3. runs the same items as a gate (``pytest --stage=baseline``) in a throwaway project whose baseline is the
   served model, once in one process and once with ``-n 2`` (two workers sharing the one server), and
   prints both wall times.

    .venv/bin/python benchmarks/perf/openai_throughput.py --items 16

llama-cpp-python's server evaluates one request at a time (a lock around its one llama.cpp context), so more
requests in flight only hide the HTTP round trips; a server that batches (vLLM, SGLang, llama.cpp's own
server with --parallel) is where they pay.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
DATA = ROOT.parent / "shared" / "datasets"

from servers import free_port, llama_cpp_server_command, running  # noqa: E402

from pytest_llmgate.config import ModelSpec  # noqa: E402
from pytest_llmgate.models import load_backend  # noqa: E402
from pytest_llmgate.tasks import TASKS  # noqa: E402

GATE_CONFIG = """
[tool.llmgate]
baseline = "served"
tasks = ["gsm8k"]
limit = {items}
data_dir = "{data}"
shard_size = 4
cache = false

[tool.llmgate.models.served]
backend = "openai"
base_url = "{base_url}"
max_in_flight = 4
revision = "smollm2-135m-instruct-q4_1"
"""

GATE_TEST = """
import pytest

@pytest.mark.llmgate("gsm8k")
def test_gsm8k(llmgate_outcome):
    pass
"""


def _generate(spec: ModelSpec, requests, work_dir: Path) -> tuple[float, list[list[str]], dict]:
    backend = load_backend(spec, device="cpu", work_dir=work_dir, fingerprint="bench", threads=2)
    try:
        start = time.perf_counter()
        completions = backend.generate(requests)
        return time.perf_counter() - start, completions, dict(getattr(backend, "usage", {}) or {})
    finally:
        backend.close()


def _gate(project: Path, *args: str) -> float:
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--stage=baseline", *args],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"gate run failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=16, help="GSM8K items (default 16)")
    parser.add_argument("--in-flight", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--out", type=Path, help="write the figures as JSON")
    parser.add_argument(
        "--extra-body",
        type=json.loads,
        default=None,
        help="server fields for each request, e.g. '{\"repeat_penalty\": 1.0}'",
    )
    parser.add_argument("--no-gate", action="store_true", help="skip the two gate runs")
    args = parser.parse_args()

    items, _ = TASKS["gsm8k"].load(DATA, limit=args.items)
    requests = [request for item in items for request in item.requests]
    results: dict = {"items": len(items), "in_flight": {}, "machine_cores": os.cpu_count()}
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        port = free_port()
        with running(llama_cpp_server_command(port), port, work / "server.log") as server:
            served = None
            for in_flight in args.in_flight:
                spec = ModelSpec(
                    name="served",
                    backend="openai",
                    base_url=server.base_url,
                    max_in_flight=in_flight,
                    extra_body=args.extra_body,
                )
                seconds, completions, usage = _generate(spec, requests, work)
                served = served or completions
                results["in_flight"][in_flight] = {
                    "seconds": round(seconds, 2),
                    "items_per_s": round(len(items) / seconds, 3),
                    "completion_tokens_per_s": round(usage.get("completion_tokens", 0) / seconds, 1),
                    "same_completions_as_1": sum(a == b for a, b in zip(completions, served, strict=True)),
                }
            direct_seconds, direct, _ = _generate(ModelSpec(name="direct", backend="llama_cpp"), requests, work)
            results["llama_cpp_in_process"] = {
                "seconds": round(direct_seconds, 2),
                "items_per_s": round(len(items) / direct_seconds, 3),
                "identical_completions_to_server": sum(a == b for a, b in zip(direct, served or [], strict=True)),
            }
            if args.no_gate:
                results["gate_one_process_s"] = results["gate_n2_s"] = None
                return _print(results, args, items)
            project = work / "project"
            project.mkdir()
            (project / "pyproject.toml").write_text(
                GATE_CONFIG.format(items=args.items, data=DATA, base_url=server.base_url)
            )
            (project / "test_bench.py").write_text(GATE_TEST)
            results["gate_one_process_s"] = round(_gate(project, "-p", "no:xdist"), 1)
            results["gate_n2_s"] = round(_gate(project, "-n", "2"), 1)
    _print(results, args, items)


def _print(results: dict, args: argparse.Namespace, items: list) -> None:
    base = results["in_flight"][args.in_flight[0]]["seconds"]
    print(f"GSM8K 5-shot greedy, {len(items)} items, llama-cpp-python server on 127.0.0.1 (2 threads)")
    print(f"extra_body: {args.extra_body}\n")
    print("| requests in flight | seconds | items/s | completion tokens/s | speed-up vs 1 | same completions |")
    print("|---|---|---|---|---|---|")
    for in_flight, row in results["in_flight"].items():
        print(
            f"| {in_flight} | {row['seconds']} | {row['items_per_s']} | {row['completion_tokens_per_s']} | "
            f"{base / row['seconds']:.2f}x | {row['same_completions_as_1']}/{len(items)} |"
        )
    direct = results["llama_cpp_in_process"]
    print(
        f"\nllama.cpp in process (backend llama_cpp): {direct['seconds']} s, {direct['items_per_s']} items/s; "
        f"identical completions to the server's: {direct['identical_completions_to_server']}/{len(items)}"
    )
    print(
        f"gate --stage=baseline on the served model: one process {results['gate_one_process_s']} s, "
        f"-n 2 sharing the server {results['gate_n2_s']} s"
    )
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

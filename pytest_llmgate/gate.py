"""Stage rules, critical-failure rules, the ladder decision and the exit code. Never prints."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from . import EXIT_BREACH, EXIT_CRITICAL
from .config import (
    ALL_STAGES,
    BASELINE_RECORDED,
    BASELINE_STAGE,
    BREACH,
    CRITICAL,
    PASS,
    POLICIES,
    CriticalRule,
    GateConfig,
    StageSpec,
    Thresholds,
)
from .stats import TaskStats, mean, mean_confidence_sequence, noninferiority_rejects, retention_p_values

# ---------------------------------------------------------------------------------------------
# Decisions on the statistics: gate policies and the early-stopping rule.
# ---------------------------------------------------------------------------------------------

Policy = Literal["point", "strict", "lenient"]
SequentialVerdict = Literal["pass", "fail", "continue"]


@dataclass(frozen=True)
class Decision:
    """A gate policy's verdict on one retention interval."""

    passed: bool
    resolved: bool  # the interval lies entirely on one side of the threshold


def policy_verdict(policy: Policy, *, point_passes: bool, strict_passes: bool, lenient_passes: bool) -> Decision:
    """A gate policy's verdict from the three answers it chooses among (``resolved``: strict and lenient agree)."""
    if policy == "point":
        passed = point_passes
    elif policy == "strict":
        passed = strict_passes
    elif policy == "lenient":
        passed = lenient_passes
    else:
        raise ValueError(f"unknown gate policy {policy!r}; choose one of {', '.join(POLICIES)}")
    return Decision(passed=bool(passed), resolved=bool(strict_passes or not lenient_passes))


def retention_decision(
    base: Sequence[float],
    cand: Sequence[float],
    threshold: float,
    policy: Policy = "strict",
    *,
    confidence: float = 0.95,
    clusters: Sequence[Hashable] | None = None,
) -> Decision:
    """Pass/fail of ``retention >= threshold`` under a gate policy, decided by the tests ``retention_interval`` inverts.

    strict: passes exactly when ``noninferiority_test(base, cand, threshold, clusters)`` rejects
    H0: retention <= threshold at (1 - confidence) / 2, i.e. when the interval's lower bound is >=
    threshold: its false-pass rate at a true retention equal to the threshold is at most
    (1 - confidence) / 2 (up to the test's normal approximation). lenient: fails exactly when the
    mirror test rejects H0: retention >= threshold at (1 - confidence) / 2, i.e. when the upper
    bound is below the threshold. point: the estimate. The decision is taken from the test at the
    threshold itself, so it stands even where the interval's bounds are None. A baseline scoring 0
    has no retention: nothing passes and nothing is resolved.
    """
    b, c = [float(x) for x in base], [float(x) for x in cand]
    if len(b) != len(c):
        raise ValueError(f"baseline and candidate must score the same items, got {len(b)} and {len(c)}")
    if not threshold > 0:
        raise ValueError(f"threshold must be positive, got {threshold!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if not b:
        raise ValueError("retention_decision needs at least one item")
    if policy not in POLICIES:
        raise ValueError(f"unknown gate policy {policy!r}; choose one of {', '.join(POLICIES)}")
    base_sum = math.fsum(b)
    if base_sum <= 0:
        return Decision(passed=False, resolved=False)
    p_below, p_above = retention_p_values(b, c, threshold, clusters)
    return policy_verdict(
        policy,
        point_passes=math.fsum(c) / base_sum >= threshold,
        strict_passes=noninferiority_rejects(p_below, confidence),
        lenient_passes=not noninferiority_rejects(p_above, confidence),
    )


def policy_decision(point: float, lo: float, hi: float, threshold: float, policy: Policy) -> Decision:
    """Pass/fail of ``retention >= threshold`` under a gate policy, read off an interval.

    point: the estimate decides. strict: pass only when the whole interval is at or above the
    threshold (lo >= threshold). lenient: fail only when the whole interval is below it
    (hi < threshold). ``resolved`` (any policy) says the interval does not straddle the threshold,
    i.e. strict and lenient agree. For ``retention_interval``'s interval this is the same decision
    as ``retention_decision``, which the gate uses because it also decides where a bound is None.
    """
    if not lo <= point <= hi:
        raise ValueError(f"need lo <= point <= hi, got lo={lo}, point={point}, hi={hi}")
    return policy_verdict(
        policy, point_passes=point >= threshold, strict_passes=lo >= threshold, lenient_passes=hi >= threshold
    )


def sequential_decision(
    base: Sequence[float], cand: Sequence[float], threshold: float, *, alpha: float = 0.05
) -> SequentialVerdict:
    """Early-stopping verdict on ``retention >= threshold`` from the paired items seen so far.

    Uses the anytime-valid confidence sequence of ``mean_confidence_sequence`` on
    d_i = cand_i - threshold * base_i in [-threshold, 1], whose mean is >= 0 exactly when
    retention >= threshold. "pass" when the lower bound is > 0, "fail" when the upper bound is < 0,
    else "continue". May be called after every shard: P(ever "pass" | retention <= threshold) <=
    alpha and P(ever "fail" | retention >= threshold) <= alpha, under the assumption stated there
    (independent items in random order). If all items run out with "continue", a fixed-n test on
    the same data spends error again: give the two rules alpha/2 each to keep the total at alpha.
    """
    import numpy as np

    b, c = [float(x) for x in base], [float(x) for x in cand]
    if len(b) != len(c):
        raise ValueError(f"baseline and candidate must score the same items, got {len(b)} and {len(c)}")
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    d = np.clip(np.array(c) - threshold * np.array(b), -threshold, 1.0)  # clip: rounding only
    lo, hi = mean_confidence_sequence(d.tolist(), lower=-threshold, upper=1.0, alpha=alpha)
    if lo > 0:
        return "pass"
    if hi < 0:
        return "fail"
    return "continue"


@dataclass(frozen=True)
class RuleResult:
    """One rule checked for one stage: what it asked, whether it held, and why."""

    rule: str
    passed: bool
    detail: str
    critical: bool = False
    task: str | None = None
    skipped: bool = False


@dataclass(frozen=True)
class TaskVerdict:
    """A task's figures at one stage against its thresholds."""

    task: str
    score: float
    baseline: float
    retention: float | None
    step_retention: float | None
    threshold: float | None
    informative: bool
    passed: bool
    wlt: tuple[int, int, int]
    evidence: RetentionEvidence | None = None


@dataclass(frozen=True)
class RetentionEvidence:
    """The paired statistics behind a retention decision (baseline and candidate answer the same items)."""

    lo: float | None  # retention_interval: the score interval dual to the non-inferiority test (None: see note)
    hi: float | None
    confidence: float
    policy: str
    resolved: bool | None  # the interval lies on one side of the threshold (None: no threshold)
    regressed: int
    improved: int
    mcnemar_p: float
    noninferiority_p: float | None  # one-sided H0: retention <= threshold
    noninferiority_p_holm: float | None = None  # Holm-adjusted across the stage's tasks
    note: str | None = None  # why a bound of the interval is None, in words


def retention_evidence(config: GateConfig, st: TaskStats, role: str, threshold: float | None) -> RetentionEvidence:
    """Interval, McNemar and non-inferiority for ``role`` against the baseline on one task.

    The interval is ``retention_interval`` (the non-inferiority test inverted) and ``resolved`` comes
    from ``retention_decision`` on the same test, so ``_retention_passes`` can decide every policy from
    ``noninferiority_p`` and ``resolved`` alone, also where a bound is None.
    """
    from .stats import mcnemar_exact, noninferiority_test, retention_interval

    base, cand = st.items[BASELINE_STAGE], st.items[role]
    clusters = st.clusters if len(set(st.clusters)) > 1 else None
    ci = retention_interval(base, cand, confidence=config.confidence, clusters=clusters)
    mc = mcnemar_exact(base, cand)
    ni = noninferiority_test(base, cand, threshold, clusters) if threshold is not None else None
    resolved = None
    if threshold is not None and ci.point is not None:
        resolved = retention_decision(base, cand, threshold, confidence=config.confidence, clusters=clusters).resolved
    return RetentionEvidence(
        lo=ci.lo,
        hi=ci.hi,
        confidence=config.confidence,
        policy=config.policy,
        resolved=resolved,
        regressed=mc.regressed,
        improved=mc.improved,
        mcnemar_p=mc.p_value,
        noninferiority_p=None if ni is None else ni.p_value,
        note=ci.note,
    )


def _retention_passes(
    config: GateConfig, retention: float, evidence: RetentionEvidence | None, threshold: float
) -> bool:
    """The gate policy's answer: the point estimate, or the paired tests behind the interval's bounds.

    strict passes exactly when the non-inferiority test rejects retention <= threshold at
    (1 - confidence) / 2, which is when the interval's lower bound is >= threshold; lenient fails
    exactly when the mirror test rejects retention >= threshold, i.e. when the evidence is resolved
    and strict does not pass (``retention_evidence`` takes ``resolved`` from ``retention_decision``).
    """

    if evidence is None or evidence.noninferiority_p is None or evidence.resolved is None:
        return retention >= threshold
    strict = noninferiority_rejects(evidence.noninferiority_p, evidence.confidence)
    return policy_verdict(
        config.policy,  # type: ignore[arg-type]
        point_passes=retention >= threshold,
        strict_passes=strict,
        lenient_passes=strict or not evidence.resolved,
    ).passed


@dataclass(frozen=True)
class StageVerdict:
    """The decision for one stage."""

    stage: str
    verdict: str  # PASS | BREACH | CRITICAL
    tasks: Mapping[str, TaskVerdict]
    rules: Sequence[RuleResult]
    recommendations: Sequence[str] = field(default_factory=tuple)

    @property
    def exit_code(self) -> int:
        """0 pass, 10 threshold breached, 11 critical rule fired."""
        return {PASS: 0, BREACH: EXIT_BREACH, CRITICAL: EXIT_CRITICAL}[self.verdict]

    @property
    def mean_retention(self) -> float | None:
        """Mean retention over the informative tasks."""
        values = [t.retention for t in self.tasks.values() if t.informative and t.retention is not None]
        return mean(values) if values else None


def is_informative(stats: TaskStats, margin: float) -> bool:
    """False unless the baseline beats chance by more than ``margin``: below that, retention measures noise."""
    base = stats.scores.get(BASELINE_STAGE)
    return base is not None and base > stats.chance + margin


def interval_text(lo: float | None, hi: float | None) -> str:
    """An interval as the table and the rules print it: an end the data cannot bound (None) as inf or n/a."""
    low = "n/a" if lo is None else f"{lo:.3f}"
    high = "inf" if hi is None else f"{hi:.3f}"
    return f"[{low}, {high}]"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def evaluate_stage(
    config: GateConfig,
    stage: StageSpec,
    stats: Mapping[str, TaskStats],
    adaptive: Mapping[str, Mapping[str, Any]] | None = None,
    sizes: Mapping[str, Mapping[str, Any]] | None = None,
    run: RunFigures | None = None,
) -> StageVerdict:
    """Check every threshold and critical rule of ``stage`` on the per-task statistics.

    ``adaptive`` holds the tasks an anytime-valid sequence resolved early (--llmgate-adaptive): their
    retention floor is decided by that sequence, not by the fixed-n rule on the items that ran.
    ``sizes``: each role's figures as the report has them (size and ``compression_ratio``, ``speed`` with
    its ratios against the speed reference, ``memory``), for the stage's size, speed and memory rules; ``run``:
    what the run as a whole measured (success rate, why speed was not measured).
    """
    index = [s.name for s in config.stages].index(stage.name)
    previous = config.stages[index - 1].name if index > 0 else BASELINE_STAGE
    rules: list[RuleResult] = []
    tasks: dict[str, TaskVerdict] = {}
    for task, st in sorted(stats.items()):
        if stage.name not in st.scores or BASELINE_STAGE not in st.scores:
            continue
        thresholds = stage.thresholds_for(task, config.groups_of(task))
        score, base = st.scores[stage.name], st.scores[BASELINE_STAGE]
        retention = st.retention(stage.name)
        informative = is_informative(st, config.chance_margin) and retention is not None
        task_rules: list[RuleResult] = []
        why_not = (
            f"uninformative: baseline {base:.3f} is not above chance ({st.chance:.3f}) by more than "
            f"{config.chance_margin:.2f}; retention there measures noise, not compression"
        )
        evidence = None
        if st.items.get(BASELINE_STAGE) and st.items.get(stage.name):
            evidence = retention_evidence(config, st, stage.name, thresholds.min_retention)
        if thresholds.min_retention is not None:
            early = (adaptive or {}).get(task)
            if early is not None:
                task_rules.append(
                    RuleResult(
                        f"{task}: retention >= {thresholds.min_retention:.2f}",
                        early["decision"] == "pass",
                        f"adaptive: anytime-valid {config.confidence:.0%} confidence sequence resolved "
                        f"'{early['decision']}' after {early['items']} items (retention {_fmt(retention)} on them)",
                        task=task,
                    )
                )
            elif informative and retention is not None:
                ok = _retention_passes(config, retention, evidence, thresholds.min_retention)
                detail = f"retention {retention:.3f} = {score:.3f} / {base:.3f}"
                if evidence is not None:
                    detail += (
                        f", {evidence.confidence:.0%} CI {interval_text(evidence.lo, evidence.hi)}, "
                        f"policy {evidence.policy}, "
                        + ("resolved" if evidence.resolved else "UNRESOLVED: more items needed")
                    )
                    if evidence.note:
                        detail += f" ({evidence.note})"
                task_rules.append(
                    RuleResult(f"{task}: retention >= {thresholds.min_retention:.2f}", ok, detail, task=task)
                )
            else:
                task_rules.append(
                    RuleResult(
                        f"{task}: retention >= {thresholds.min_retention:.2f}", True, why_not, task=task, skipped=True
                    )
                )
        step = None
        if thresholds.min_step_retention is not None:
            step = st.retention(stage.name, previous)
            rule = f"{task}: step retention vs {previous} >= {thresholds.min_step_retention:.2f}"
            if previous not in st.scores:
                task_rules.append(RuleResult(rule, True, f"{previous} was not evaluated", task=task, skipped=True))
            elif not informative:
                task_rules.append(RuleResult(rule, True, why_not, task=task, skipped=True))
            else:
                task_rules.append(
                    RuleResult(
                        rule,
                        step is not None and step >= thresholds.min_step_retention,
                        f"step retention {_fmt(step)} = {score:.3f} / {st.scores[previous]:.3f}",
                        task=task,
                    )
                )
        if thresholds.min_score is not None:
            task_rules.append(
                RuleResult(
                    f"{task}: score >= {thresholds.min_score:.2f}",
                    score >= thresholds.min_score,
                    f"score {score:.3f}",
                    task=task,
                )
            )
        if thresholds.score_band is not None:
            lo, hi = thresholds.score_band
            task_rules.append(
                RuleResult(
                    f"{task}: score within [{lo:.2f}, {hi:.2f}]", lo <= score <= hi, f"score {score:.3f}", task=task
                )
            )
        task_rules += _repeat_rules(config, stage.name, task, thresholds, run or RunFigures(), informative, why_not)
        rules.extend(task_rules)
        tasks[task] = TaskVerdict(
            task=task,
            score=score,
            baseline=base,
            retention=retention,
            step_retention=step,
            threshold=thresholds.min_retention,
            informative=informative,
            passed=all(r.passed for r in task_rules),
            wlt=st.wlt.get(stage.name, (0, 0, 0)),
            evidence=evidence,
        )
    tasks = _holm_across_tasks(tasks)
    rules.extend(_size_rules(stage, (sizes or {}).get(stage.name)))
    rules.extend(efficiency_rules(config, stage, (sizes or {}).get(stage.name), run or RunFigures()))
    rules.extend(_critical_rules(config, tasks))
    if any(r.critical and not r.passed for r in rules):
        verdict = CRITICAL
    elif any(not r.passed for r in rules):
        verdict = BREACH
    else:
        verdict = PASS
    result = StageVerdict(stage.name, verdict, tasks, tuple(rules))
    bits = ((sizes or {}).get(stage.name) or {}).get("bits_per_weight")
    return StageVerdict(stage.name, verdict, tasks, tuple(rules), tuple(recommend(config, stage, result, bits)))


def _repeat_rules(
    config: GateConfig, stage: str, task: str, thresholds: Thresholds, run: RunFigures, informative: bool, why_not: str
) -> list[RuleResult]:
    """``min_consistency_retention`` and ``min_self_consistency`` on a task with repeats, and ``min_non_loss_rate`` on
    a task with a judge, under the run's policy.

    Consistency retention is a retention like the quality one (the same paired interval and tests, on each item's
    share of repeats that agree with its majority answer); it is decided whether or not the task beats chance: a
    model can be consistently wrong, and losing that consistency is still instability.
    """
    rules: list[RuleResult] = []
    floor = thresholds.min_consistency_retention
    if floor is not None:
        label = f"{task}: consistency retention >= {floor:.2f}"
        st = run.consistency.get(task)
        if st is None or stage not in st.scores or BASELINE_STAGE not in st.scores:
            rules.append(RuleResult(label, True, "the task has no repeats (set repeats = N on it)", task=task,
                                    skipped=True))  # fmt: skip
        else:
            ratio = st.retention(stage)
            base, cand = st.scores[BASELINE_STAGE], st.scores[stage]
            if ratio is None:
                rules.append(RuleResult(label, True, f"baseline consistency {base:.3f}: no ratio", task=task,
                                        skipped=True))  # fmt: skip
            else:
                evidence = retention_evidence(config, st, stage, floor)
                ok = _retention_passes(config, ratio, evidence, floor)
                detail = (
                    f"consistency retention {ratio:.3f} = {cand:.3f} / {base:.3f}, {evidence.confidence:.0%} CI "
                    f"{interval_text(evidence.lo, evidence.hi)}, policy {evidence.policy}, "
                    + ("resolved" if evidence.resolved else "UNRESOLVED: more items needed")
                )
                rules.append(RuleResult(label, ok, detail, task=task))
    floor = thresholds.min_non_loss_rate
    if floor is not None:
        label = f"{task}: judged non-loss rate >= {floor:.2f}"
        judged = (run.judge.get(task) or {}).get(stage)
        if judged is not None and not judged["n"]:
            errors = "; ".join(judged.get("errors", ()))
            rules.append(RuleResult(label, False, f"no item was judged: {errors}", task=task))
        elif judged is None or judged["non_loss_rate"]["rate"] is None:
            rules.append(RuleResult(label, True, "the task has no judge (set judge = '<model>' on it)", task=task,
                                    skipped=True))  # fmt: skip
        else:
            rate = judged["non_loss_rate"]
            figure = {"point": rate["rate"], "lo": rate["ci"][0], "hi": rate["ci"][1]}
            rule = _interval_rule(label, figure, floor, upper=False, policy=config.policy,  # type: ignore[arg-type]
                                  unit="", what="non-loss rate")  # fmt: skip
            detail = (f"{rule.detail}; W/L/T {judged['wins']}/{judged['losses']}/{judged['ties']}, "
                      f"{judged['inconsistent_share']:.0%} order-inconsistent")  # fmt: skip
            rules.append(dataclasses.replace(rule, detail=detail, task=task))
    floor = thresholds.min_self_consistency
    if floor is not None:
        label = f"{task}: self-consistency >= {floor:.2f}"
        st = run.self_consistency.get(task)
        if st is None or stage not in st.intervals:
            rules.append(RuleResult(label, True, "the task has no repeats (set repeats = N on it)", task=task,
                                    skipped=True))  # fmt: skip
        else:
            lo, hi = st.intervals[stage]
            figure = {"point": st.scores[stage], "lo": lo, "hi": hi}
            rule = _interval_rule(label, figure, floor, upper=False, policy=config.policy,  # type: ignore[arg-type]
                                  unit="", what="majority-vote score")  # fmt: skip
            rules.append(dataclasses.replace(rule, task=task))
    return rules


def _size_rules(stage: StageSpec, size: Mapping[str, Any] | None) -> list[RuleResult]:
    """``max_size_mb`` and ``min_compression_ratio`` on the stage model's size as deployed.

    A size is not noisy: the figure decides. A size that could not be read fails its rule, saying why: a rule
    nobody could check must not pass.
    """
    results = []
    size_bytes = (size or {}).get("size_bytes")
    unknown = f"size unknown: {(size or {}).get('size_of') or 'the stage model was not evaluated'}"
    if stage.max_size_mb is not None:
        label = f"size <= {stage.max_size_mb:g} MB"
        if size_bytes is None:
            results.append(RuleResult(label, False, unknown))
        else:
            detail = f"{size_bytes / 1e6:.1f} MB ({size.get('size_kind')}: {size.get('size_of')})"  # type: ignore[union-attr]
            results.append(RuleResult(label, size_bytes / 1e6 <= stage.max_size_mb, detail))
    if stage.min_compression_ratio is not None:
        label = f"compression >= {stage.min_compression_ratio:g}x"
        ratio = (size or {}).get("compression_ratio")
        if ratio is None:
            results.append(RuleResult(label, False, unknown if size_bytes is None else "baseline size unknown"))
        else:
            results.append(
                RuleResult(label, ratio >= stage.min_compression_ratio, f"{ratio:.2f}x smaller than the baseline")
            )
    return results


@dataclass(frozen=True)
class RunFigures:
    """What the speed and success-rate rules need from the run as a whole."""

    success_rate: float | None = None  # items that produced an outcome / items that ran
    items: int = 0
    speed_missing: str | None = None  # why no timings exist (None: the probe measured; "--llmgate-no-speed")
    # Tasks with repeats: statistics of each item's consistency, and of its majority-vote score (self-consistency).
    consistency: Mapping[str, TaskStats] = field(default_factory=dict)
    self_consistency: Mapping[str, TaskStats] = field(default_factory=dict)
    # Tasks with a judge (judge.py): per task, per stage, the judged wins, losses, ties and rates.
    judge: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


def _interval_rule(
    label: str, figure: Mapping[str, float], limit: float, *, upper: bool, policy: Policy, unit: str, what: str
) -> RuleResult:
    """A noisy figure against a limit, under the run's policy; "UNRESOLVED" when its interval straddles the limit."""
    point, lo, hi = figure["point"], figure["lo"], figure["hi"]
    if upper:  # figure <= limit
        decision = policy_verdict(
            policy, point_passes=point <= limit, strict_passes=hi <= limit, lenient_passes=lo <= limit
        )
    else:
        decision = policy_verdict(
            policy, point_passes=point >= limit, strict_passes=lo >= limit, lenient_passes=hi >= limit
        )
    detail = f"{what} {point:.3g}{unit}, interval [{lo:.3g}, {hi:.3g}]{unit}, policy {policy}, " + (
        "resolved" if decision.resolved else "UNRESOLVED: the interval straddles the limit; more rounds needed"
    )
    return RuleResult(label, decision.passed, detail)


def efficiency_rules(
    config: GateConfig, stage: StageSpec, figures: Mapping[str, Any] | None, run: RunFigures
) -> list[RuleResult]:
    """The stage's speed, memory and success-rate rules (``max_latency_ratio`` ... ``min_success_rate``).

    Timings are noisy, so ratio and latency rules decide on an interval under the run's policy, as retention
    does. A rule whose figure was not measured is skipped and named: the controller then reports the run as not
    checked (exit 12), unless ``--llmgate-no-speed`` said not to measure.
    """
    policy: Policy = config.policy  # type: ignore[assignment]
    figures = figures or {}
    speed = figures.get("speed") or {}
    vs = speed.get("vs_reference") or {}
    results = []

    def missing(label: str, why: str) -> RuleResult:
        return RuleResult(label, True, f"not checked: {why}", skipped=True)

    no_speed = run.speed_missing or "the stage model was not probed"
    reference = config.speed_reference(stage).name
    ratio_rules = (  # (limit, figure in vs_reference, upper bound?, label, what the detail calls it)
        (stage.max_latency_ratio, "latency_ratio", True, "p95 latency <=", "p95 latency ratio"),
        (stage.min_throughput_ratio, "throughput_ratio", False, "throughput >=", "tokens/s ratio"),
    )
    for limit, key, upper, asks, what in ratio_rules:
        if limit is None:
            continue
        label = f"{asks} {limit:g}x {reference}"
        if key not in vs:
            results.append(missing(label, no_speed))
        elif not vs.get("same_runtime"):
            results.append(RuleResult(label, False, "the reference ran in another runtime: not a compression ratio"))
        else:
            results.append(_interval_rule(label, vs[key], limit, upper=upper, policy=policy, unit="x", what=what))
    if stage.max_latency_ms is not None:
        label = f"p95 latency <= {stage.max_latency_ms:g} ms"
        latency = speed.get("latency_ms")
        bounds = speed.get("latency_p95_interval_ms")
        if not latency or not bounds:
            results.append(missing(label, no_speed))
        else:
            figure = {"point": latency["p95"], "lo": bounds[0], "hi": bounds[1]}
            results.append(
                _interval_rule(
                    label, figure, stage.max_latency_ms, upper=True, policy=policy, unit=" ms", what="p95 latency"
                )
            )
    if stage.max_memory_mb is not None:
        label = f"peak memory <= {stage.max_memory_mb:g} MB"
        memory = figures.get("memory") or {}
        if memory.get("peak_memory_mb") is None:
            why = (
                "the model runs in a server, which reports no memory here"
                if figures.get("backend") == "openai"
                else "the model was never loaded in this run (every result came from the cache and no speed test "
                "ran); run the speed test, or --llmgate-no-cache"
            )
            results.append(missing(label, why))
        else:
            peak = memory["peak_memory_mb"]
            results.append(
                RuleResult(label, peak <= stage.max_memory_mb, f"{peak:.1f} MB ({memory.get('memory_kind')})")
            )
    if stage.min_success_rate is not None:
        label = f"success rate >= {stage.min_success_rate:.0%}"
        if run.success_rate is None:
            results.append(missing(label, "no benchmark item ran"))
        else:
            results.append(
                RuleResult(
                    label,
                    run.success_rate >= stage.min_success_rate,
                    f"{run.success_rate:.1%} of {run.items} item(s) produced an outcome",
                )
            )
    return results


def _holm_across_tasks(tasks: dict[str, TaskVerdict]) -> dict[str, TaskVerdict]:
    """Holm-adjust the non-inferiority p-values of a stage's tasks (one family per stage)."""
    from dataclasses import replace

    from .stats import holm_adjusted

    raw = {
        name: t.evidence.noninferiority_p
        for name, t in tasks.items()
        if t.evidence is not None and t.evidence.noninferiority_p is not None
    }
    if not raw:
        return tasks
    adjusted = holm_adjusted(raw)
    return {
        name: replace(t, evidence=replace(t.evidence, noninferiority_p_holm=adjusted[name]))
        if name in adjusted and t.evidence is not None
        else t
        for name, t in tasks.items()
    }


def _critical_rules(config: GateConfig, tasks: Mapping[str, TaskVerdict]) -> list[RuleResult]:
    results = []
    for rule in config.critical:
        if rule.kind == "retention_floor":
            floor = rule.floor or 0.0
            scope = [t for name, t in tasks.items() if not rule.tasks or name in rule.tasks]
            below = [t for t in scope if t.informative and t.retention is not None and t.retention < floor]
            checked = [t for t in scope if t.informative]
            if not checked:
                results.append(
                    RuleResult(rule.label, True, "no informative task to check", critical=True, skipped=True)
                )
                continue
            detail = (
                "; ".join(f"{t.task} retention {t.retention:.3f}" for t in below)
                if below
                else f"lowest retention {min(t.retention or 0.0 for t in checked):.3f} over {len(checked)} task(s)"
            )
            results.append(RuleResult(rule.label, not below, detail, critical=True))
        elif rule.kind == "score_floor":
            results.append(_score_floor(rule, tasks))
        else:
            present = [tasks[t] for t in rule.tasks if t in tasks and tasks[t].informative]
            missing = [t for t in rule.tasks if t not in tasks or not tasks[t].informative]
            if not present:
                results.append(
                    RuleResult(
                        rule.label,
                        True,
                        f"skipped: {', '.join(rule.tasks)} not evaluated (or at chance) in this run",
                        critical=True,
                        skipped=True,
                    )
                )
                continue
            base = sum(t.baseline for t in present)
            drop = 1.0 - sum(t.score for t in present) / base
            detail = f"combined drop {drop:.1%} over {', '.join(t.task for t in present)}"
            if missing:
                detail += f" ({', '.join(missing)} not in this run or at chance)"
            results.append(RuleResult(rule.label, drop <= (rule.max_drop or 0.0), detail, critical=True))
    return results


def _score_floor(rule: CriticalRule, tasks: Mapping[str, TaskVerdict]) -> RuleResult:
    """Every task in scope (the listed ones, or all) scores at least ``min_score`` on the candidate.

    An absolute floor does not depend on the baseline, so it applies to tasks at chance too; it is decided on
    the point estimate, as a stage's ``min_score`` is.
    """
    floor = rule.min_score or 0.0
    scope = [t for name, t in tasks.items() if not rule.tasks or name in rule.tasks]
    if not scope:
        return RuleResult(rule.label, True, "no task in scope evaluated in this run", critical=True, skipped=True)
    below = [t for t in scope if t.score < floor]
    detail = (
        "; ".join(f"{t.task} score {t.score:.3f}" for t in below)
        if below
        else f"lowest score {min(t.score for t in scope):.3f} over {len(scope)} task(s)"
    )
    return RuleResult(rule.label, not below, detail, critical=True)


def recommend(
    config: GateConfig, stage: StageSpec, verdict: StageVerdict, measured_bits: float | None = None
) -> list[str]:
    """Advice whose conditions hold for a failed stage (``max_bits`` compares the measured bits per weight when
    the model's size was read, else the stage's ``bits``)."""
    if verdict.verdict == PASS:
        return []
    advice = []
    for rec in config.recommendations:
        if rec.on != "failure" and rec.on != verdict.verdict:
            continue
        if rec.stages and stage.name not in rec.stages:
            continue
        bits = measured_bits if measured_bits is not None else stage.bits
        if rec.max_bits is not None and (bits is None or bits > rec.max_bits):
            continue
        if rec.below_mean_retention is not None:
            mean_retention = verdict.mean_retention
            if mean_retention is None or mean_retention >= rec.below_mean_retention:
                continue
        advice.append(rec.message)
    return advice


@dataclass(frozen=True)
class LadderDecision:
    """``--stage=all``: the most compressed passing stage, or why none can serve."""

    selected: str | None
    verdicts: Sequence[StageVerdict]
    reference: StageVerdict  # the selected stage's verdict, or the least aggressive one's

    @property
    def exit_code(self) -> int:
        """0 when a stage was selected, else the least aggressive stage's code (10 or 11)."""
        return 0 if self.selected else self.reference.exit_code


def ladder_order(verdicts: Sequence[StageVerdict], sizes: Mapping[str, Mapping[str, Any]] | None) -> list[str]:
    """The stages from least to most compressed: by measured compression ratio, ties to the faster stage (lower
    p95 latency), when every stage's ratio was measured; else in configuration order."""
    names = [v.stage for v in verdicts]
    figures = {name: (sizes or {}).get(name) or {} for name in names}
    ratios = {name: figures[name].get("compression_ratio") for name in names}
    if any(r is None for r in ratios.values()):
        return names

    def latency(name: str) -> float:
        p95 = ((figures[name].get("speed") or {}).get("latency_ms") or {}).get("p95")
        return float(p95) if p95 is not None else math.inf

    # Least compressed first; among equal ratios the slower first, so the walk back from the end meets the faster.
    return sorted(names, key=lambda n: (round(float(ratios[n] or 0.0), 2), -latency(n), -names.index(n)))


def decide_ladder(
    verdicts: Sequence[StageVerdict], sizes: Mapping[str, Mapping[str, Any]] | None = None
) -> LadderDecision:
    """Walk the ladder from the most compressed stage back and take the first that passes."""
    by_name = {v.stage: v for v in verdicts}
    order = [by_name[name] for name in ladder_order(verdicts, sizes)]
    for verdict in reversed(order):
        if verdict.verdict == PASS:
            return LadderDecision(verdict.stage, verdicts, verdict)
    return LadderDecision(None, verdicts, order[0])


@dataclass(frozen=True)
class RunDecision:
    """What a whole run decided: the verdict, the exit code and the verdict of every stage evaluated."""

    stage: str
    verdict: str  # PASS | BREACH | CRITICAL | BASELINE_RECORDED
    exit_code: int
    stages: Sequence[StageVerdict]
    selected: str | None = None

    @property
    def main(self) -> StageVerdict | None:
        """The verdict whose tasks and rules headline the report."""
        if not self.stages:
            return None
        if self.selected is not None:
            return next(v for v in self.stages if v.stage == self.selected)
        return self.stages[0] if self.stage == ALL_STAGES else next(v for v in self.stages if v.stage == self.stage)


def decide_run(
    config: GateConfig,
    stage: str,
    stats: Mapping[str, TaskStats],
    adaptive: Mapping[str, Mapping[str, Any]] | None = None,
    sizes: Mapping[str, Mapping[str, Any]] | None = None,
    run: RunFigures | None = None,
) -> RunDecision:
    """The decision for ``--stage=stage`` on the collected statistics (and the models' figures, by role)."""
    if stage == BASELINE_STAGE:
        return RunDecision(stage, BASELINE_RECORDED, 0, ())
    if stage == ALL_STAGES:
        ladder = decide_ladder([evaluate_stage(config, s, stats, sizes=sizes, run=run) for s in config.stages], sizes)
        verdict = PASS if ladder.selected else ladder.reference.verdict
        return RunDecision(stage, verdict, ladder.exit_code, tuple(ladder.verdicts), ladder.selected)
    result = evaluate_stage(config, config.stage(stage), stats, adaptive, sizes, run)
    return RunDecision(stage, result.verdict, result.exit_code, (result,))

"""Gate rules, critical rules, the ladder decision and exit codes, on hand-made statistics."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_llmgate.config import parse_config
from pytest_llmgate.gate import decide_run, evaluate_stage
from pytest_llmgate.stats import TaskStats
from pytest_llmgate.tasks import TASKS


def config(**raw):
    base = {"models": {"ref": {}, "a": {}, "b": {}}, "baseline": "ref"}
    return parse_config({**base, **raw}, source=None, known_tasks=TASKS, rootpath=Path("/tmp"))


def stats(task, base, **roles):
    scores = {"baseline": base, **roles}
    return TaskStats(task=task, metric="acc_norm", n=100, scores=scores, chance=0.25,
                     wlt={r: (1, 2, 97) for r in roles})


def test_retention_floor_passes_and_breaches():
    cfg = config(stages=[{"name": "s", "model": "a", "min_retention": 0.95}])
    ok = evaluate_stage(cfg, cfg.stages[0], {"hellaswag": stats("hellaswag", 0.50, s=0.48)})
    assert ok.verdict == "pass" and ok.exit_code == 0
    assert ok.tasks["hellaswag"].retention == 0.48 / 0.50
    bad = evaluate_stage(cfg, cfg.stages[0], {"hellaswag": stats("hellaswag", 0.50, s=0.47)})
    assert bad.verdict == "breach" and bad.exit_code == 10
    [rule] = [r for r in bad.rules if not r.passed]
    assert rule.rule == "hellaswag: retention >= 0.95" and "0.940" in rule.detail


def test_critical_floor_beats_breach():
    cfg = config(stages=[{"name": "s", "model": "a", "min_retention": 0.95}],
                 critical=[{"rule": "retention_floor", "floor": 0.8}])
    result = evaluate_stage(cfg, cfg.stages[0], {"hellaswag": stats("hellaswag", 0.50, s=0.39)})
    assert result.verdict == "critical" and result.exit_code == 11
    assert any(r.critical and not r.passed and "hellaswag retention 0.780" in r.detail for r in result.rules)
    assert result.recommendations  # a failed stage gets advice


def test_combined_drop_over_a_set_of_tasks():
    cfg = config(stages=[{"name": "s", "model": "a"}],
                 critical=[{"rule": "combined_drop", "tasks": ["hellaswag", "arc_challenge"], "max_drop": 0.2}])
    within = {"hellaswag": stats("hellaswag", 0.5, s=0.45), "arc_challenge": stats("arc_challenge", 0.5, s=0.40)}
    assert evaluate_stage(cfg, cfg.stages[0], within).verdict == "pass"  # drop (1.0 - 0.85) / 1.0 = 15%
    beyond = {"hellaswag": stats("hellaswag", 0.5, s=0.40), "arc_challenge": stats("arc_challenge", 0.5, s=0.38)}
    result = evaluate_stage(cfg, cfg.stages[0], beyond)
    assert result.verdict == "critical"
    assert any("combined drop 22.0%" in r.detail for r in result.rules)


def test_combined_drop_is_skipped_not_passed_silently_when_its_tasks_are_absent():
    cfg = config(stages=[{"name": "s", "model": "a"}],
                 critical=[{"rule": "combined_drop", "tasks": ["arc_challenge"], "max_drop": 0.2}])
    result = evaluate_stage(cfg, cfg.stages[0], {"hellaswag": stats("hellaswag", 0.5, s=0.1)})
    [rule] = result.rules
    assert rule.skipped and "not evaluated" in rule.detail


def test_score_floor_is_critical_for_any_listed_task_below_an_absolute_score():
    cfg = config(stages=[{"name": "s", "model": "a"}],
                 critical=[{"rule": "score_floor", "tasks": ["truthfulqa_mc2"], "min_score": 0.5}])
    ok = {"truthfulqa_mc2": stats("truthfulqa_mc2", 0.55, s=0.52), "hellaswag": stats("hellaswag", 0.5, s=0.1)}
    result = evaluate_stage(cfg, cfg.stages[0], ok)
    assert result.verdict == "pass"  # hellaswag is not in the rule's scope (and the stage has no floor on it)
    [rule] = result.rules
    assert rule.rule == "critical: truthfulqa_mc2 scoring below 0.50" and "lowest score 0.520" in rule.detail
    low = evaluate_stage(cfg, cfg.stages[0], {"truthfulqa_mc2": stats("truthfulqa_mc2", 0.55, s=0.49)})
    assert low.verdict == "critical" and low.exit_code == 11
    assert "truthfulqa_mc2 score 0.490" in low.rules[0].detail
    # Without tasks: every task; an absolute floor applies at chance too (it does not divide by the baseline).
    every = config(stages=[{"name": "s", "model": "a"}], critical=[{"rule": "score_floor", "min_score": 0.3}])
    at_chance = {"arc_challenge": stats("arc_challenge", 0.26, s=0.24)}
    assert evaluate_stage(every, every.stages[0], at_chance).verdict == "critical"
    with pytest.raises(pytest.UsageError, match=r"rule 'score_floor' needs min_score = 0\.50"):
        config(critical=[{"rule": "score_floor", "tasks": ["hellaswag"]}])


def test_size_gates_on_the_stage_models_deployed_size():
    cfg = config(stages=[{"name": "s", "model": "a", "max_size_mb": 100, "min_compression_ratio": 4}])
    st = {"hellaswag": stats("hellaswag", 0.5, s=0.5)}
    small = {"s": {"size_bytes": 91_726_912, "size_kind": "measured", "size_of": "GGUF file Q4_0.gguf",
                   "compression_ratio": 5.866}}
    ok = evaluate_stage(cfg, cfg.stages[0], st, sizes=small)
    assert ok.verdict == "pass"
    assert [(r.rule, r.detail) for r in ok.rules] == [
        ("size <= 100 MB", "91.7 MB (measured: GGUF file Q4_0.gguf)"),
        ("compression >= 4x", "5.87x smaller than the baseline")]
    large = {"s": {**small["s"], "size_bytes": 144_811_072, "compression_ratio": 3.716}}
    assert [r.rule for r in evaluate_stage(cfg, cfg.stages[0], st, sizes=large).rules if not r.passed] == [
        "size <= 100 MB", "compression >= 4x"]
    # A size nobody could read fails its rule, saying why: a rule that was not checked never passes.
    served = {"s": {"size_bytes": None, "size_of": "a served model: its size is not visible through the API"}}
    unknown = evaluate_stage(cfg, cfg.stages[0], st, sizes=served)
    assert unknown.verdict == "breach" and "size unknown: a served model" in unknown.rules[0].detail
    assert decide_run(cfg, "s", st, sizes=small).exit_code == 0
    with pytest.raises(pytest.UsageError, match=r"stage 's'.max_size_mb: expected a positive number"):
        config(stages=[{"name": "s", "model": "a", "max_size_mb": 0}])


def test_absolute_floor_and_band():
    cfg = config(stages=[{"name": "s", "model": "a", "min_score": 0.4, "score_band": [0.40, 0.48]}])
    assert evaluate_stage(cfg, cfg.stages[0], {"hellaswag": stats("hellaswag", 0.5, s=0.45)}).verdict == "pass"
    low = evaluate_stage(cfg, cfg.stages[0], {"hellaswag": stats("hellaswag", 0.5, s=0.39)})
    assert [r.rule for r in low.rules if not r.passed] == [
        "hellaswag: score >= 0.40", "hellaswag: score within [0.40, 0.48]"]
    high = evaluate_stage(cfg, cfg.stages[0], {"hellaswag": stats("hellaswag", 0.5, s=0.49)})
    assert [r.rule for r in high.rules if not r.passed] == ["hellaswag: score within [0.40, 0.48]"]


def test_step_retention_compares_with_the_previous_stage():
    cfg = config(stages=[{"name": "one", "model": "a", "min_retention": 0.5},
                         {"name": "two", "model": "b", "min_retention": 0.5, "min_step_retention": 0.9}])
    st = {"hellaswag": stats("hellaswag", 0.50, one=0.45, two=0.40)}
    result = evaluate_stage(cfg, cfg.stages[1], st)
    assert result.verdict == "breach" and result.tasks["hellaswag"].step_retention == 0.40 / 0.45
    assert any(r.rule == "hellaswag: step retention vs one >= 0.90" and not r.passed for r in result.rules)


def test_a_baseline_at_chance_makes_retention_uninformative():
    cfg = config(stages=[{"name": "s", "model": "a", "min_retention": 0.95}],
                 critical=[{"rule": "retention_floor", "floor": 0.8}])
    result = evaluate_stage(cfg, cfg.stages[0], {"arc_challenge": stats("arc_challenge", 0.26, s=0.20)})
    assert result.verdict == "pass" and not result.tasks["arc_challenge"].informative
    assert all(r.skipped for r in result.rules) and "chance" in result.rules[0].detail


def test_ladder_picks_the_most_compressed_passing_stage():
    cfg = config(stages=[{"name": "one", "model": "a", "min_retention": 0.9},
                         {"name": "two", "model": "b", "min_retention": 0.9}],
                 critical=[{"rule": "retention_floor", "floor": 0.8}])
    both = decide_run(cfg, "all", {"hellaswag": stats("hellaswag", 0.5, one=0.49, two=0.46)})
    assert (both.selected, both.exit_code, both.verdict) == ("two", 0, "pass")
    fallback = decide_run(cfg, "all", {"hellaswag": stats("hellaswag", 0.5, one=0.49, two=0.3)})
    assert (fallback.selected, fallback.exit_code) == ("one", 0)
    none = decide_run(cfg, "all", {"hellaswag": stats("hellaswag", 0.5, one=0.44, two=0.3)})
    assert (none.selected, none.exit_code, none.verdict) == (None, 10, "breach")
    worst = decide_run(cfg, "all", {"hellaswag": stats("hellaswag", 0.5, one=0.3, two=0.3)})
    assert (worst.exit_code, worst.verdict) == (11, "critical")
    assert decide_run(cfg, "baseline", {}).verdict == "baseline-recorded"


def test_recommendation_rules_match_bits_and_mean_retention():
    cfg = config(stages=[{"name": "q2", "model": "a", "bits": 2, "min_retention": 0.95}],
                 recommendations=[{"message": "try 3 bits", "max_bits": 2, "below_mean_retention": 0.9},
                                  {"message": "only on critical", "on": "critical"}])
    result = evaluate_stage(cfg, cfg.stages[0], {"hellaswag": stats("hellaswag", 0.5, q2=0.44)})
    assert result.verdict == "breach" and list(result.recommendations) == ["try 3 bits"]
    mild = evaluate_stage(cfg, cfg.stages[0], {"hellaswag": stats("hellaswag", 0.5, q2=0.46)})
    assert mild.verdict == "breach" and list(mild.recommendations) == []


def paired(task, base_items, **roles):
    """TaskStats from per-item 0/1 scores, as the tally builds them."""
    from pytest_llmgate.outcome import Tally

    tally = Tally()
    for i, base in enumerate(base_items):
        sides = {"baseline": {"scores": {"acc_norm": base}}}
        sides.update({role: {"scores": {"acc_norm": values[i]}} for role, values in roles.items()})
        tally.add({"task": task, "doc_id": i, "id": f"validation-{i}", "metric": "acc_norm", "chance": 0.25,
                   "sides": sides})
    return tally.task_stats()


def test_policies_decide_on_the_interval_and_report_resolution():
    # 60 items: the baseline gets 50 right; the candidate loses 2 of them (retention 0.96, threshold 0.95).
    base = [1.0] * 50 + [0.0] * 10
    cand = [1.0] * 48 + [0.0] * 12
    stats = paired("hellaswag", base, s=cand)
    outcomes = {}
    for policy in ("point", "strict", "lenient"):
        cfg = config(stages=[{"name": "s", "model": "a", "min_retention": 0.95}], policy=policy)
        result = evaluate_stage(cfg, cfg.stages[0], stats)
        evidence = result.tasks["hellaswag"].evidence
        assert evidence is not None and evidence.lo < 0.95 <= 0.96 <= evidence.hi
        assert evidence.resolved is False and (evidence.regressed, evidence.improved) == (2, 0)
        assert evidence.mcnemar_p == 0.5  # two discordant pairs, both one way: 2 * 0.5**2
        assert "UNRESOLVED" in result.rules[0].detail
        outcomes[policy] = result.verdict
    assert outcomes == {"point": "pass", "strict": "breach", "lenient": "pass"}


def test_a_clear_drop_is_resolved_and_fails_under_every_policy():
    base = [1.0] * 80 + [0.0] * 20
    cand = [1.0] * 50 + [0.0] * 50
    stats = paired("hellaswag", base, s=cand)
    for policy in ("point", "strict", "lenient"):
        cfg = config(stages=[{"name": "s", "model": "a", "min_retention": 0.95}], policy=policy)
        result = evaluate_stage(cfg, cfg.stages[0], stats)
        assert result.verdict == "breach" and result.tasks["hellaswag"].evidence.resolved is True
        assert result.tasks["hellaswag"].evidence.noninferiority_p > 0.5


def test_holm_adjusts_noninferiority_across_the_stage_tasks():
    base = [1.0] * 80 + [0.0] * 20
    good = [1.0] * 80 + [0.0] * 20
    stats = {**paired("hellaswag", base, s=good), **paired("arc_challenge", base, s=good)}
    cfg = config(stages=[{"name": "s", "model": "a", "min_retention": 0.9}])
    result = evaluate_stage(cfg, cfg.stages[0], stats)
    raw = {t: v.evidence.noninferiority_p for t, v in result.tasks.items()}
    holm = {t: v.evidence.noninferiority_p_holm for t, v in result.tasks.items()}
    # Two tasks with the same p: Holm multiplies the smaller by 2 and the next by 1, then keeps it monotone.
    assert raw["hellaswag"] == raw["arc_challenge"] < 0.05
    assert holm == {t: pytest.approx(min(1.0, 2 * p)) for t, p in raw.items()}

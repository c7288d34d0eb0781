"""Intervals, paired tests, multiplicity, gate policies, planning and sequential stopping (pytest_llmgate.stats).

Known values are checked against closed forms worked by hand; Hypothesis checks the properties a
gate relies on: order of items never matters, swapping the models mirrors every figure, seeded
bootstraps repeat exactly.
"""

from __future__ import annotations

import itertools
import math
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_llmgate.config import POLICIES
from pytest_llmgate.gate import Decision, policy_decision, policy_verdict, retention_decision, sequential_decision
from pytest_llmgate.stats import (
    McNemar,
    RetentionCI,
    holm,
    holm_adjusted,
    items_needed,
    mcnemar_exact,
    mean_confidence_sequence,
    mean_interval,
    minimum_detectable_drop,
    noninferiority_rejects,
    noninferiority_test,
    paired_bootstrap_retention,
    retention_interval,
    wilson_interval,
)

Z975 = 1.959963984540054  # the standard normal's 97.5% quantile
FAST = settings(max_examples=40, deadline=None)

binary = st.sampled_from([0.0, 1.0])
binary_pairs = st.lists(st.tuples(binary, binary), min_size=1, max_size=60)
unit_floats = st.floats(0.0, 1.0, allow_subnormal=False)
continuous_pairs = st.lists(st.tuples(unit_floats, unit_floats), min_size=2, max_size=40)


def split(pairs: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
    return [b for b, _ in pairs], [c for _, c in pairs]


def from_cells(both: int, regressed: int, improved: int, neither: int) -> tuple[list[float], list[float]]:
    """Paired 0/1 scores with the given 2x2 table (baseline first)."""
    base = [1.0] * both + [1.0] * regressed + [0.0] * improved + [0.0] * neither
    cand = [1.0] * both + [0.0] * regressed + [1.0] * improved + [0.0] * neither
    return base, cand


# ---- import cost -----------------------------------------------------------------------------

def test_importing_stats_loads_neither_numpy_nor_scipy():
    code = "import sys, pytest_llmgate.stats; sys.exit(('numpy' in sys.modules) + 2 * ('scipy' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# ---- Wilson and mean intervals ---------------------------------------------------------------

def test_wilson_known_values():
    edge = Z975**2 / (10 + Z975**2)  # p = 0: upper bound z^2 / (n + z^2)
    assert wilson_interval(0, 10) == (0.0, pytest.approx(edge))
    assert wilson_interval(10, 10) == (pytest.approx(1 - edge), 1.0)
    half = Z975 / (1 + Z975**2 / 10) * math.sqrt(0.25 / 10 + Z975**2 / 400)
    assert wilson_interval(5, 10) == pytest.approx((0.5 - half, 0.5 + half))
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)  # the tabulated value
    assert wilson_interval(0, 0) == (0.0, 1.0)


@FAST
@given(st.integers(1, 500).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_wilson_contains_the_proportion_and_mirrors(case):
    k, n = case
    lo, hi = wilson_interval(k, n)
    assert 0.0 <= lo <= k / n <= hi <= 1.0
    mirror = wilson_interval(n - k, n)
    assert (lo, hi) == pytest.approx((1 - mirror[1], 1 - mirror[0]))
    assert type(lo) is float and type(hi) is float


def test_wilson_rejects_impossible_counts():
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(11, 10)
    with pytest.raises(ValueError, match="confidence"):
        wilson_interval(1, 10, confidence=1.0)


def test_mean_interval_binary_without_clusters_is_wilson():
    assert mean_interval([1.0] * 7 + [0.0] * 3) == wilson_interval(7, 10)


def test_mean_interval_continuous_is_a_t_interval():
    # Mean 0.4375, sample sd (ddof 1) 0.375 over 4 values; t(3, 0.9) = 1.6377443572159062.
    values = [0.25, 0.25, 0.25, 1.0]
    m, sd = 0.4375, math.sqrt((3 * 0.1875**2 + 0.5625**2) / 3)
    assert sd == pytest.approx(0.375)
    half = 1.6377443572159062 * sd / 2
    assert mean_interval(values, confidence=0.8) == pytest.approx((m - half, m + half))
    assert mean_interval(values, confidence=0.95) == (pytest.approx(0.0), 1.0)  # clipped to the score range


def test_clustered_interval_by_hand():
    # Miller's SE: residual sums per cluster are +1, 0, -1 around the mean 0.5, so
    # SE = sqrt(2 * 3/2) / 6; t with 2 df at 75% is 1/sqrt(1.5) (df = 2 has a closed form).
    values = [1.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    clusters = ["a", "a", "b", "b", "c", "c"]
    half = (1 / math.sqrt(1.5)) * math.sqrt(3.0) / 6
    assert mean_interval(values, confidence=0.5, clusters=clusters) == pytest.approx((0.5 - half, 0.5 + half))


def test_correlated_clusters_widen_the_interval():
    values = [1.0] * 50 + [0.0] * 50
    by_item = mean_interval(values, clusters=list(range(100)))
    by_block = mean_interval(values, clusters=[i // 10 for i in range(100)])  # each block all 0 or all 1
    assert by_block[1] - by_block[0] > 2 * (by_item[1] - by_item[0])


@FAST
@given(st.lists(unit_floats, min_size=2, max_size=40))
def test_singleton_clusters_reproduce_the_t_interval(values):
    if not set(values) <= {0.0, 1.0}:  # non-binary, so the plain path is a t interval too
        assert mean_interval(values, clusters=list(range(len(values)))) == pytest.approx(mean_interval(values))


def test_one_cluster_says_nothing():
    assert mean_interval([0.2, 0.4, 0.9], clusters=["x", "x", "x"]) == (0.0, 1.0)


# ---- paired bootstrap of retention -----------------------------------------------------------

def test_bootstrap_perfect_agreement_is_exactly_one():
    base, cand = from_cells(30, 0, 0, 20)
    assert paired_bootstrap_retention(base, cand, threshold=0.95) == RetentionCI(1.0, 1.0, 1.0, 0.0)


def test_bootstrap_zero_baseline_is_undefined():
    assert paired_bootstrap_retention([0.0, 0.0], [1.0, 0.0]) == RetentionCI(None, None, None, None)


def test_bootstrap_values_are_builtin_and_close_to_the_delta_method():
    base, cand = from_cells(600, 60, 30, 310)
    ci = paired_bootstrap_retention(base, cand, threshold=0.95)
    assert all(type(v) is float for v in (ci.point, ci.lo, ci.hi, ci.share_below))
    ratio = 630 / 660
    assert ci.point == pytest.approx(ratio)
    # Delta method: SE(ratio) = sd(cand - ratio * base) / (sqrt(n) * mean(base)).
    residuals = [c - ratio * b for b, c in zip(base, cand, strict=True)]
    mean_residual = sum(residuals) / len(residuals)
    sd = math.sqrt(sum((r - mean_residual) ** 2 for r in residuals) / len(residuals))
    se = sd / (math.sqrt(1000) * 0.66)
    assert (ci.lo, ci.hi) == pytest.approx((ratio - Z975 * se, ratio + Z975 * se), abs=0.005)
    assert 0.0 < ci.share_below < 1.0


@FAST
@given(binary_pairs, st.integers(0, 3))
def test_bootstrap_contains_point_and_repeats_with_its_seed(pairs, seed):
    base, cand = split(pairs)
    first = paired_bootstrap_retention(base, cand, seed=seed, resamples=200)
    assert first == paired_bootstrap_retention(base, cand, seed=seed, resamples=200)
    if first.point is not None:
        assert first.lo <= first.point <= first.hi


@FAST
@given(continuous_pairs, st.randoms(use_true_random=False))
def test_bootstrap_ignores_item_order(pairs, rng):
    shuffled = pairs[:]
    rng.shuffle(shuffled)
    assert paired_bootstrap_retention(*split(pairs), resamples=200) == paired_bootstrap_retention(
        *split(shuffled), resamples=200)


clustered_rows = st.lists(st.tuples(binary, binary, st.integers(0, 6)), min_size=2, max_size=60)


@FAST
@given(clustered_rows, st.randoms(use_true_random=False))
def test_cluster_bootstrap_ignores_item_order_and_cluster_names(rows, rng):
    names = [f"subject-{i}" for i in range(7)]
    rng.shuffle(names)
    shuffled = rows[:]
    rng.shuffle(shuffled)
    original = paired_bootstrap_retention(
        [b for b, _, _ in rows], [c for _, c, _ in rows], clusters=[k for _, _, k in rows], resamples=200)
    renamed = paired_bootstrap_retention(
        [b for b, _, _ in shuffled], [c for _, c, _ in shuffled], clusters=[names[k] for _, _, k in shuffled],
        resamples=200)
    assert original == renamed


@FAST
@given(binary_pairs)
def test_singleton_clusters_are_the_item_bootstrap(pairs):
    base, cand = split(pairs)
    assert paired_bootstrap_retention(base, cand, clusters=list(range(len(pairs))), resamples=200) == (
        paired_bootstrap_retention(base, cand, resamples=200))


@FAST
@given(st.integers(40, 200), st.integers(0, 30), st.integers(0, 30), st.integers(0, 100))
def test_swapping_models_inverts_retention(both, regressed, improved, neither):
    base, cand = from_cells(both, regressed, improved, neither)
    forward = paired_bootstrap_retention(base, cand)
    backward = paired_bootstrap_retention(cand, base)
    assert forward.point * backward.point == pytest.approx(1.0)
    # Different resamples, so only approximately: log-scale bounds mirror within Monte Carlo error.
    assert math.log(forward.lo) == pytest.approx(-math.log(backward.hi), abs=0.06)
    assert math.log(forward.hi) == pytest.approx(-math.log(backward.lo), abs=0.06)


# ---- McNemar ---------------------------------------------------------------------------------

def test_mcnemar_known_tables():
    # 10 regressed vs 2 improved: p = 2 * P(Bin(12, 1/2) <= 2) = 2 * (1 + 12 + 66) / 4096.
    assert mcnemar_exact(*from_cells(50, 10, 2, 38)) == McNemar(10, 2, pytest.approx(158 / 4096))
    assert mcnemar_exact(*from_cells(5, 0, 5, 5)) == McNemar(0, 5, pytest.approx(2 / 32))
    assert mcnemar_exact(*from_cells(3, 1, 1, 3)).p_value == 1.0  # balanced discordance


def test_mcnemar_on_continuous_scores_is_the_sign_test():
    result = mcnemar_exact([0.9, 0.8, 0.5, 0.5], [0.7, 0.85, 0.2, 0.5])
    assert (result.regressed, result.improved) == (2, 1)
    assert result.p_value == 1.0  # 2 vs 1 of 3: 2 * P(Bin(3, 1/2) <= 1) = 1


@FAST
@given(binary_pairs, st.randoms(use_true_random=False))
def test_mcnemar_ignores_order_and_mirrors_under_swap(pairs, rng):
    base, cand = split(pairs)
    result = mcnemar_exact(base, cand)
    shuffled = pairs[:]
    rng.shuffle(shuffled)
    assert mcnemar_exact(*split(shuffled)) == result
    swapped = mcnemar_exact(cand, base)
    assert (swapped.regressed, swapped.improved) == (result.improved, result.regressed)
    assert swapped.p_value == pytest.approx(result.p_value)
    assert 0.0 < result.p_value <= 1.0 and type(result.p_value) is float


@FAST
@given(st.lists(binary, min_size=1, max_size=60))
def test_perfect_agreement_gives_p_one(scores):
    assert mcnemar_exact(scores, scores) == McNemar(0, 0, 1.0)
    assert noninferiority_test(scores, scores, 1.0).p_value == 1.0  # d is identically 0


# ---- non-inferiority -------------------------------------------------------------------------

def test_wald_noninferiority_by_hand():
    # d = cand - 0.5 * base = (.5, .5, .5, -.5): mean .25, sd .5, SE .25, t = 1 with 3 df;
    # the t(3) tail has a closed form: P(T > 1) = 1/2 - (1/pi) * (r / (1 + r^2) + atan(r)), r = 1/sqrt(3).
    r = 1 / math.sqrt(3)
    result = noninferiority_test([1.0] * 4, [1.0, 1.0, 1.0, 0.0], 0.5, method="wald")
    assert result.statistic == pytest.approx(1.0)
    assert result.p_value == pytest.approx(0.5 - (r / (1 + r * r) + math.atan(r)) / math.pi)
    assert (result.mean_difference, result.method, result.df) == (pytest.approx(0.25), "wald", 3)


def test_score_noninferiority_by_hand():
    # Three items both models get right, threshold 0.95: d = 0.05 each. Under H0 the closest table
    # moves mass w to the regression cell (d = -0.95): 0.05 (1 - w) = 0.95 w, so w = 0.05 and
    # V0 = 0.95 * 0.05^2 + 0.05 * 0.95^2 = 0.0475; z = 0.05 / sqrt(0.0475 / 3). The Wald test
    # would call this certain (zero sample variance).
    z = 0.05 / math.sqrt(0.0475 / 3)
    result = noninferiority_test([1.0] * 3, [1.0] * 3, 0.95)
    assert (result.statistic, result.method) == (pytest.approx(z), "score")
    assert result.p_value == pytest.approx(0.5 * math.erfc(z / math.sqrt(2)))
    assert noninferiority_test([1.0] * 3, [1.0] * 3, 0.95, method="wald").p_value == 0.0


@pytest.mark.parametrize("table", [(60, 10, 3, 27), (60, 0, 3, 37), (45, 7, 0, 48), (5, 3, 2, 1), (600, 42, 8, 350)])
@pytest.mark.parametrize("threshold", [0.9, 0.95])
def test_score_statistic_matches_the_restricted_mle_of_the_table(table, threshold):
    """Against a direct constrained maximum-likelihood fit of the 2x2 table (Tang, Tang & Chan 2003)."""
    import numpy as np
    from scipy.optimize import minimize

    counts = np.array(table, dtype=float)
    d_cells = np.array([1 - threshold, -threshold, 1.0, 0.0])  # both right, regressed, improved, both wrong
    fit = minimize(
        lambda p: -float(np.sum(counts[counts > 0] * np.log(p[counts > 0]))),
        x0=np.full(4, 0.25), method="SLSQP", bounds=[(1e-12, 1.0)] * 4,
        constraints=[{"type": "eq", "fun": lambda p: p.sum() - 1}, {"type": "eq", "fun": lambda p: p @ d_cells}],
        options={"ftol": 1e-14, "maxiter": 500})
    n = counts.sum()
    z = float(counts @ d_cells / n / math.sqrt(fit.x @ d_cells**2 / n))
    result = noninferiority_test(*from_cells(*table), threshold)
    assert result.statistic == pytest.approx(z, rel=1e-4)


@FAST
@given(continuous_pairs, st.floats(0.5, 1.0))
def test_wald_matches_a_one_sample_t_test_on_d(pairs, threshold):
    from scipy.stats import ttest_1samp

    base, cand = split(pairs)
    d = [c - threshold * b for b, c in pairs]
    result = noninferiority_test(base, cand, threshold, method="wald")
    if result.statistic is not None and max(d) - min(d) > 1e-6:
        expected = ttest_1samp(d, 0.0, alternative="greater")
        assert result.statistic == pytest.approx(float(expected.statistic), rel=1e-6)
        assert result.p_value == pytest.approx(float(expected.pvalue), rel=1e-6, abs=1e-12)


@FAST
@given(continuous_pairs, st.floats(0.5, 1.0))
def test_score_and_wald_agree_on_the_direction(pairs, threshold):
    base, cand = split(pairs)
    score = noninferiority_test(base, cand, threshold)
    wald = noninferiority_test(base, cand, threshold, method="wald")
    assert 0.0 <= score.p_value <= 1.0 and score.mean_difference == pytest.approx(wald.mean_difference)
    if score.statistic is not None:
        assert (score.statistic > 0) == (score.mean_difference > 0) == (score.p_value < 0.5)


@FAST
@given(clustered_rows, st.randoms(use_true_random=False))
def test_noninferiority_ignores_item_order(rows, rng):
    shuffled = rows[:]
    rng.shuffle(shuffled)
    for clustered, method in ((False, "score"), (False, "wald"), (True, "wald")):
        def run(rs, clustered=clustered, method=method):
            return noninferiority_test([b for b, _, _ in rs], [c for _, c, _ in rs], 0.95,
                                       clusters=[k for _, _, k in rs] if clustered else None, method=method)
        assert run(rows) == run(shuffled)


def test_noninferiority_sides_and_choices():
    base, cand = from_cells(600, 10, 10, 380)  # retention 1: far above 0.9
    assert noninferiority_test(base, cand, 0.9).p_value < 1e-6
    base, cand = from_cells(500, 110, 10, 380)  # retention 510 / 610 = 0.84: below 0.9
    assert noninferiority_test(base, cand, 0.9).p_value > 0.5
    assert noninferiority_test(base, cand, 0.9, clusters=[i % 10 for i in range(1000)]).method == "wald"
    with pytest.raises(ValueError, match="clustered"):
        noninferiority_test(base, cand, 0.9, clusters=[0] * 1000, method="score")


# ---- Holm ------------------------------------------------------------------------------------

def test_holm_by_hand():
    p = {"arc": 0.01, "mmlu": 0.04, "hellaswag": 0.03}
    assert holm_adjusted(p) == {"arc": pytest.approx(0.03), "mmlu": pytest.approx(0.06), "hellaswag": 0.06}
    assert holm(p) == {"arc": True, "mmlu": False, "hellaswag": False}
    assert list(holm(p)) == list(p)
    assert holm({}) == {}


@FAST
@given(st.dictionaries(st.text(min_size=1, max_size=5), st.floats(0.0, 1.0), max_size=12), st.floats(0.001, 0.2))
def test_holm_lies_between_bonferroni_and_no_correction(p, alpha):
    adjusted, rejected = holm_adjusted(p), holm(p, alpha)
    m = len(p)
    for key, raw in p.items():
        assert raw <= adjusted[key] <= 1.0
        assert rejected[key] == (adjusted[key] <= alpha)
        if raw * m <= alpha * (1 - 1e-9):
            assert rejected[key]  # Bonferroni rejects, so Holm does
        if rejected[key]:
            assert raw <= alpha
    ranked = sorted(p, key=p.__getitem__)
    assert all(adjusted[a] <= adjusted[b] for a, b in itertools.pairwise(ranked))


# ---- gate policies ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("interval", "policy", "expected"),
    [
        ((0.97, 0.96, 0.98), "point", Decision(True, True)),
        ((0.97, 0.96, 0.98), "strict", Decision(True, True)),
        ((0.97, 0.96, 0.98), "lenient", Decision(True, True)),
        ((0.96, 0.93, 0.99), "point", Decision(True, False)),
        ((0.96, 0.93, 0.99), "strict", Decision(False, False)),
        ((0.96, 0.93, 0.99), "lenient", Decision(True, False)),
        ((0.94, 0.91, 0.97), "point", Decision(False, False)),
        ((0.94, 0.91, 0.97), "strict", Decision(False, False)),
        ((0.94, 0.91, 0.97), "lenient", Decision(True, False)),
        ((0.90, 0.88, 0.93), "point", Decision(False, True)),
        ((0.90, 0.88, 0.93), "strict", Decision(False, True)),
        ((0.90, 0.88, 0.93), "lenient", Decision(False, True)),
        ((0.95, 0.95, 0.97), "strict", Decision(True, True)),  # a bound exactly at the threshold passes
    ],
)
def test_policy_table(interval, policy, expected):
    assert policy_decision(*interval, 0.95, policy) == expected


def test_policy_rejects_unknown_names_and_disordered_intervals():
    with pytest.raises(ValueError, match="strict"):
        policy_decision(0.9, 0.8, 1.0, 0.95, "optimistic")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lo <= point <= hi"):
        policy_decision(0.9, 0.95, 1.0, 0.95, "point")


@FAST
@given(st.lists(st.floats(0.5, 1.5), min_size=3, max_size=3), st.floats(0.5, 1.5))
def test_strict_passes_imply_point_passes_imply_lenient_passes(bounds, threshold):
    lo, point, hi = sorted(bounds)
    strict, point_, lenient = (policy_decision(point, lo, hi, threshold, p) for p in ("strict", "point", "lenient"))
    assert strict.passed <= point_.passed <= lenient.passed
    assert strict.resolved == point_.resolved == lenient.resolved == (strict.passed == lenient.passed)


# ---- sample-size planning --------------------------------------------------------------------

def test_items_needed_by_hand():
    # Connor (1987): psi = 0.1, Delta = 0.7 * 0.05 = 0.035.
    delta, psi, z_power = 0.035, 0.1, 0.8416212335729143
    n = (Z975 * math.sqrt(psi) + z_power * math.sqrt(psi - delta**2)) ** 2 / delta**2
    assert items_needed(0.7, 0.1, 0.05) == math.ceil(n) == 639


def test_detectable_drop_at_half_power_is_the_critical_value():
    # With power 0.5 the z_power term vanishes: Delta = z * sqrt(psi / n).
    assert minimum_detectable_drop(0.5, 0.2, 400, power=0.5) == pytest.approx(Z975 * math.sqrt(0.2 / 400) / 0.5)


@FAST
@given(st.floats(0.2, 0.8), st.floats(0.02, 0.3), st.floats(0.02, 0.3), st.floats(0.7, 0.95))
def test_planning_round_trip(accuracy, discordance, drop, power):
    delta = accuracy * drop
    if not (delta <= discordance <= 2 * min(accuracy, 1 - accuracy) and (discordance + delta) / 2 <= accuracy):
        return
    n = items_needed(accuracy, discordance, drop, power=power)
    assert minimum_detectable_drop(accuracy, discordance, n, power=power) <= drop * (1 + 1e-9)
    if n > 1:
        smaller = minimum_detectable_drop(accuracy, discordance, n - 1, power=power)
        assert smaller is None or smaller > drop * (1 - 1e-9)


def test_planning_limits():
    assert minimum_detectable_drop(0.7, 0.1, 10) is None  # too few items for any drop
    with pytest.raises(ValueError, match="discordance"):
        items_needed(0.7, 0.02, 0.1)  # a 10% drop needs at least 7% of items to change


# ---- sequential stopping ---------------------------------------------------------------------

def test_sequential_clear_cases():
    base, cand = from_cells(700, 0, 0, 300)
    assert sequential_decision(base, cand, 0.9) == "pass"
    assert sequential_decision(base, [0.0] * 1000, 0.9) == "fail"
    assert sequential_decision(base[:5], cand[:5], 0.9) == "continue"  # five items prove nothing
    assert sequential_decision([], [], 0.9) == "continue"


@FAST
@given(st.lists(st.floats(-1.0, 1.0), min_size=1, max_size=80))
def test_confidence_sequence_is_nested_and_in_range(values):
    previous = (-1.0, 1.0)
    for k in range(1, len(values) + 1):
        lo, hi = mean_confidence_sequence(values[:k], lower=-1.0, upper=1.0)
        assert -1.0 <= lo <= hi <= 1.0
        assert lo >= previous[0] - 1e-12 and hi <= previous[1] + 1e-12  # running intersection
        previous = (lo, hi)
    assert all(type(v) is float for v in previous)


def test_confidence_sequence_covers_a_known_mean():
    import numpy as np

    rng = np.random.default_rng(7)
    misses = 0
    for _ in range(50):
        draws = (rng.random(400) < 0.3).astype(float).tolist()
        lo, hi = mean_confidence_sequence(draws)
        misses += not lo <= 0.3 <= hi
        assert hi - lo < 0.25
    assert misses <= 3  # each side errs with probability <= 0.05 at any time; in practice far less


# ---- the score interval and the gate decision (retention_interval, retention_decision) ---------

LEVELS = st.sampled_from([0.8, 0.9, 0.95, 0.99])
tables = st.tuples(st.integers(0, 60), st.integers(0, 12), st.integers(0, 12), st.integers(0, 60)).filter(
    lambda t: t[0] + t[1] > 0
)  # the baseline gets something right: retention is defined


def finite_or_none(ci: RetentionCI) -> bool:
    return all(v is None or (type(v) is float and math.isfinite(v)) for v in (ci.point, ci.lo, ci.hi))


def check_duality(base, cand, threshold, confidence, clusters=None):
    """lo >= threshold iff the one-sided test rejects at (1 - confidence) / 2 iff strict passes; the mirror for hi."""
    ci = retention_interval(base, cand, confidence=confidence, clusters=clusters)
    p = noninferiority_test(base, cand, threshold, clusters).p_value
    half = (1 - confidence) / 2
    strict = retention_decision(base, cand, threshold, "strict", confidence=confidence, clusters=clusters)
    lenient = retention_decision(base, cand, threshold, "lenient", confidence=confidence, clusters=clusters)
    assert strict.passed == (p <= half) == noninferiority_rejects(p, confidence)
    assert strict.resolved == lenient.resolved == (strict.passed or not lenient.passed)
    assert not (strict.passed and not lenient.passed)
    if ci.note is None:  # a single range: both bounds are the tests' turning points
        assert (ci.lo >= threshold) == strict.passed
        assert (ci.hi >= threshold) == lenient.passed
    return ci


@settings(max_examples=300, deadline=None)
@given(tables, st.floats(0.05, 2.0), LEVELS)
def test_interval_bounds_are_exactly_where_the_test_turns(table, threshold, confidence):
    base, cand = from_cells(*table)
    ci = check_duality(base, cand, threshold, confidence)
    assert ci.method == "score" and ci.note is None and finite_or_none(ci)
    assert 0.0 <= ci.lo <= ci.point <= ci.hi


@settings(max_examples=100, deadline=None)
@given(tables, LEVELS)
def test_interval_bounds_themselves_are_decided_consistently(table, confidence):
    """At a threshold equal to a bound, strict passes at lo and lenient at hi; one float further they do not."""
    base, cand = from_cells(*table)
    ci = retention_interval(base, cand, confidence=confidence)
    if ci.lo > 0:
        assert retention_decision(base, cand, ci.lo, confidence=confidence).passed
        assert not retention_decision(base, cand, math.nextafter(ci.lo, math.inf), confidence=confidence).passed
    assert retention_decision(base, cand, ci.hi, "lenient", confidence=confidence).passed
    assert not retention_decision(base, cand, math.nextafter(ci.hi, math.inf), "lenient", confidence=confidence).passed


@pytest.mark.parametrize("table", [(60, 10, 3, 27), (45, 7, 0, 48), (5, 3, 2, 1), (600, 42, 8, 350), (97, 0, 0, 3)])
def test_score_interval_ends_solve_the_restricted_mle_statistic(table):
    """Against a direct constrained maximum-likelihood fit (Tang, Tang & Chan 2003): z(lo) = +1.96, z(hi) = -1.96."""
    import numpy as np
    from scipy.optimize import minimize

    counts = np.array(table, dtype=float)
    n = counts.sum()

    def z(theta):
        d_cells = np.array([1 - theta, -theta, 1.0, 0.0])
        fit = minimize(
            lambda p: -float(np.sum(counts[counts > 0] * np.log(p[counts > 0]))),
            x0=np.full(4, 0.25),
            method="SLSQP",
            bounds=[(1e-12, 1.0)] * 4,
            constraints=[{"type": "eq", "fun": lambda p: p.sum() - 1}, {"type": "eq", "fun": lambda p: p @ d_cells}],
            options={"ftol": 1e-14, "maxiter": 500},
        )
        return float(counts @ d_cells / n / math.sqrt(fit.x @ d_cells**2 / n))

    ci = retention_interval(*from_cells(*table))
    assert z(ci.lo) == pytest.approx(Z975, rel=1e-3)
    assert z(ci.hi) == pytest.approx(-Z975, rel=1e-3)


def test_score_interval_known_values():
    # Perfect agreement on 30 of 50 items: d = 1 - theta on 30 items (share 0.6), 0 on the other 20. Below 1 the
    # null fit moves mass 0.6 (1 - theta) to the unobserved regression cell (d = -theta) and keeps 0.6 theta on
    # the both-right cell, so V0 = 0.6 theta (1 - theta) and z = sqrt(30 (1 - theta) / theta): lo = 1 / (1 + z^2 / 30).
    # Above 1 the mass goes to the improvement cell (d = 1): V0 = 0.6 (theta - 1), z = -sqrt(30 (theta - 1)).
    ci = retention_interval(*from_cells(30, 0, 0, 20))
    assert ci.point == 1.0 and ci.lo == pytest.approx(1 / (1 + Z975**2 / 30), rel=1e-12)
    assert ci.hi == pytest.approx(1 + Z975**2 / 30, rel=1e-12)
    # The bootstrap's interval is the single point 1 here (every resample agrees perfectly).
    assert paired_bootstrap_retention(*from_cells(30, 0, 0, 20)).lo == 1.0


@FAST
@given(tables, LEVELS)
def test_swapping_models_inverts_the_score_interval_exactly(table, confidence):
    both, regressed, improved, neither = table
    if both + improved == 0:
        return  # the swapped baseline scores 0
    forward = retention_interval(*from_cells(*table), confidence=confidence)
    backward = retention_interval(*from_cells(both, improved, regressed, neither), confidence=confidence)
    assert forward.point * backward.point == pytest.approx(1.0)
    assert forward.lo * backward.hi == pytest.approx(1.0, rel=1e-9)
    if forward.lo > 0:
        assert forward.hi * backward.lo == pytest.approx(1.0, rel=1e-9)


@FAST
@given(binary_pairs, st.randoms(use_true_random=False))
def test_interval_and_decision_ignore_item_order(pairs, rng):
    shuffled = pairs[:]
    rng.shuffle(shuffled)
    assert retention_interval(*split(pairs)) == retention_interval(*split(shuffled))
    assert retention_decision(*split(pairs), 0.9) == retention_decision(*split(shuffled), 0.9)


@settings(max_examples=60, deadline=None)
@given(continuous_pairs, st.floats(0.3, 1.5), LEVELS, st.randoms(use_true_random=False))
def test_continuous_scores_interval_agrees_with_the_test(pairs, threshold, confidence, rng):
    base, cand = split(pairs)
    if math.fsum(base) <= 0:
        return
    ci = check_duality(base, cand, threshold, confidence)
    assert ci.method == "score" and finite_or_none(ci)
    assert ci.lo <= ci.point and (ci.hi is None or ci.point <= ci.hi)
    shuffled = pairs[:]
    rng.shuffle(shuffled)
    assert retention_interval(*split(shuffled), confidence=confidence) == ci


def test_continuous_scores_are_fast_enough_for_a_task():
    import time

    import numpy as np

    rng = np.random.default_rng(3)
    base = rng.random(1000)
    cand = np.clip(base + rng.normal(-0.02, 0.1, 1000), 0.0, 1.0)
    start = time.perf_counter()
    ci = retention_interval(base.tolist(), cand.tolist())
    assert time.perf_counter() - start < 1.0  # about 0.03 s; the bound leaves room for a busy machine
    assert ci.lo < ci.point < ci.hi and ci.hi - ci.lo < 0.05


def test_binary_interval_is_fast_at_mmlu_size():
    import time

    import numpy as np

    rng = np.random.default_rng(4)
    base = (rng.random(15000) < 0.6).astype(float)
    cand = np.where(rng.random(15000) < 0.9, base, (rng.random(15000) < 0.5).astype(float))
    start = time.perf_counter()
    retention_interval(base.tolist(), cand.tolist())
    retention_interval(base.tolist(), cand.tolist(), clusters=[i % 57 for i in range(15000)])
    assert time.perf_counter() - start < 1.0  # about 0.02 s for both


@settings(max_examples=150, deadline=None)
@given(clustered_rows, st.floats(0.3, 1.5), LEVELS, st.randoms(use_true_random=False))
def test_clustered_interval_agrees_with_the_clustered_test(rows, threshold, confidence, rng):
    base, cand, clusters = [b for b, _, _ in rows], [c for _, c, _ in rows], [k for _, _, k in rows]
    if math.fsum(base) <= 0:
        return
    ci = retention_interval(base, cand, confidence=confidence, clusters=clusters)
    assert ci.method == "wald" and finite_or_none(ci)
    if len(set(clusters)) < 2:
        assert (ci.lo, ci.hi) == (None, None) and "one cluster" in ci.note
        return
    check_duality(base, cand, threshold, confidence, clusters)
    assert ci.lo <= ci.point and (ci.hi is None or ci.point <= ci.hi)
    assert (ci.hi is None) == ("unbounded above" in (ci.note or ""))
    names = [f"subject-{i}" for i in range(7)]
    rng.shuffle(names)
    shuffled = rows[:]
    rng.shuffle(shuffled)
    renamed = retention_interval(
        [b for b, _, _ in shuffled],
        [c for _, c, _ in shuffled],
        confidence=confidence,
        clusters=[names[k] for _, _, k in shuffled],
    )
    assert renamed == ci


def test_clustered_interval_is_fieller_and_widens_with_correlated_clusters():
    # 20 subjects of 10 items; the baseline gets 7 right in each; the candidate loses one item in half of them.
    base = [1.0] * 7 + [0.0] * 3
    rows = [
        (b, c, s)
        for s in range(20)
        for b, c in zip(base, [1.0] * (6 if s % 2 else 7) + [0.0] * (4 if s % 2 else 3), strict=True)
    ]
    b, c, k = ([r[i] for r in rows] for i in range(3))
    clustered = retention_interval(b, c, clusters=k)
    assert clustered.point == pytest.approx(130 / 140) and clustered.note is None
    # Fieller by hand: cluster residual sums u (candidate) = +-0.5, v (baseline) = 0, so
    # t(theta) = (6.5 - 7 theta) / 10 / (sqrt(20 * 0.25 * 20 / 19) / 200) with 19 df.
    from scipy.stats import t as student_t

    half = float(student_t.ppf(0.975, 19)) * math.sqrt(5 * 20 / 19) / 200 * 10
    assert (clustered.lo, clustered.hi) == pytest.approx(((6.5 - half) / 7, (6.5 + half) / 7), rel=1e-12)
    # The same number of regressions piled into two subjects reads as far less certain.
    piled = [1.0] * 2 + [0.0] * 8 + [1.0] * 2 + [0.0] * 8 + ([1.0] * 7 + [0.0] * 3) * 18
    concentrated = retention_interval(b, piled, clusters=k)
    assert concentrated.point == clustered.point
    assert concentrated.hi - concentrated.lo > 2 * (clustered.hi - clustered.lo)
    # Clusters that do not vary at all leave no width (the clustered test's SE is 0), and say so.
    flat = retention_interval(b, c, clusters=[i // 100 for i in range(200)])
    assert flat.lo == pytest.approx(flat.point) == flat.hi and flat.note.startswith("no width")


def test_unbounded_and_undefined_cases_say_why_and_never_give_inf_or_nan():
    undefined = retention_interval([0.0, 0.0, 0.0], [1.0, 0.0, 1.0])
    assert (undefined.point, undefined.lo, undefined.hi) == (None, None, None) and "baseline scores 0" in undefined.note
    assert retention_decision([0.0, 0.0], [1.0, 1.0], 0.9) == Decision(False, False)
    one_cluster = retention_interval([1.0, 1.0, 0.0], [1.0, 0.0, 0.0], clusters=["a", "a", "a"])
    assert one_cluster.point == 0.5 and one_cluster.lo is None and "one cluster" in one_cluster.note
    # Two clusters, the baseline right once in one of them: nothing bounds the retention from above.
    base = [1.0] + [0.0] * 9 + [0.0] * 10
    cand = [1.0] * 5 + [0.0] * 5 + [1.0] * 5 + [0.0] * 5
    clusters = [0] * 10 + [1] * 10
    wide = retention_interval(base, cand, clusters=clusters)
    assert wide.hi is None and wide.note.startswith("unbounded above") and finite_or_none(wide)
    assert retention_decision(base, cand, 50.0, "lenient", clusters=clusters).passed
    # One baseline-correct item in a thousand: the score interval is wide but finite.
    sparse = retention_interval(*from_cells(0, 1, 30, 969))
    assert sparse.point == 30.0 and 1.0 < sparse.lo < 30.0 < sparse.hi < 1e3 and sparse.note is None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(unit_floats, unit_floats, st.integers(0, 3)), min_size=1, max_size=30), LEVELS)
def test_interval_never_holds_inf_or_nan(rows, confidence):
    base, cand, clusters = [b for b, _, _ in rows], [c for _, c, _ in rows], [k for _, _, k in rows]
    for ci in (
        retention_interval(base, cand, confidence=confidence),
        retention_interval(base, cand, confidence=confidence, clusters=clusters),
    ):
        assert finite_or_none(ci)
        assert ci.point is not None or math.fsum(base) <= 0 or math.fsum(cand) / math.fsum(base) == math.inf
        if ci.lo is None or ci.hi is None:
            assert ci.note


def test_gate_strict_and_lenient_follow_the_test():
    """The gate decides through retention_evidence / _retention_passes exactly as retention_decision does."""
    from pathlib import Path

    from pytest_llmgate.config import parse_config
    from pytest_llmgate.gate import evaluate_stage
    from pytest_llmgate.outcome import Tally
    from pytest_llmgate.tasks import TASKS

    def stage_stats(table):
        tally = Tally()
        for i, (b, c) in enumerate(zip(*from_cells(*table), strict=True)):
            tally.add(
                {
                    "task": "hellaswag",
                    "doc_id": i,
                    "id": f"validation-{i}",
                    "metric": "acc_norm",
                    "chance": 0.25,
                    "sides": {"baseline": {"scores": {"acc_norm": b}}, "s": {"scores": {"acc_norm": c}}},
                }
            )
        return tally.task_stats()

    for table in [(300, 4, 0, 100), (300, 10, 2, 88), (300, 30, 2, 68), (300, 0, 0, 100)]:
        stats = stage_stats(table)
        for policy in POLICIES:
            cfg = parse_config(
                {
                    "models": {"ref": {}, "a": {}},
                    "baseline": "ref",
                    "policy": policy,
                    "stages": [{"name": "s", "model": "a", "min_retention": 0.95}],
                },
                source=None,
                known_tasks=TASKS,
                rootpath=Path("/tmp"),
            )
            verdict = evaluate_stage(cfg, cfg.stages[0], stats).tasks["hellaswag"]
            expected = retention_decision(*from_cells(*table), 0.95, policy)
            ci = retention_interval(*from_cells(*table))
            assert verdict.passed == expected.passed and verdict.evidence.resolved == expected.resolved
            assert (verdict.evidence.lo, verdict.evidence.hi) == (ci.lo, ci.hi)
            if policy == "strict":
                assert verdict.passed == (ci.lo >= 0.95)
            elif policy == "lenient":
                assert verdict.passed == (ci.hi >= 0.95)


def test_policy_verdict_is_the_one_mapping():
    assert policy_verdict("strict", point_passes=True, strict_passes=False, lenient_passes=True) == Decision(
        False, False
    )
    assert policy_verdict("lenient", point_passes=False, strict_passes=False, lenient_passes=False) == Decision(
        False, True
    )
    with pytest.raises(ValueError, match="strict"):
        policy_verdict("optimistic", point_passes=True, strict_passes=True, lenient_passes=True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="strict"):
        retention_decision([1.0], [1.0], 0.9, "optimistic")  # type: ignore[arg-type]

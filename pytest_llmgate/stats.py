"""Pure statistics over paired item scores: intervals, paired tests, power, confidence sequences. No I/O.

The gate's decisions built on them (policies, early stopping) are in ``gate.py``; the tally of outcomes
that produces ``TaskStats`` is in ``outcome.py``.

numpy and scipy are imported inside the functions that need them, so importing the plugin stays fast.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar


@dataclass(frozen=True)
class TaskStats:
    """Per-task figures for every model role of a run, all recomputable from the items."""

    task: str
    metric: str
    n: int
    scores: Mapping[str, float]
    chance: float
    # role -> (wins, losses, ties) against the baseline; wins = candidate right where baseline was wrong.
    wlt: Mapping[str, tuple[int, int, int]]
    # role -> per-item scores in item order (paired across roles), the items' clusters (their id's
    # group: the subject for MMLU), and role -> confidence interval of the score.
    items: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    clusters: tuple[str, ...] = ()
    intervals: Mapping[str, tuple[float, float]] = field(default_factory=dict)

    def retention(self, role: str, reference: str = "baseline") -> float | None:
        """score(role) / score(reference), or None when the reference scores 0."""
        base = self.scores.get(reference)
        if base is None or role not in self.scores or base <= 0:
            return None
        return self.scores[role] / base


def mean(values: Iterable[float]) -> float:
    """Arithmetic mean; 0.0 for no values."""
    values = list(values)
    return sum(values) / len(values) if values else 0.0


# ---------------------------------------------------------------------------------------------
# Inference: intervals, paired tests, multiplicity, gate policies, planning, sequential stopping.
#
# Every function below is pure and returns builtin types (float, int, bool, str, None), so its
# results can ride on reports. Scores are per-item values in [0, 1]: 0/1 accuracy, or continuous
# (e.g. TruthfulQA MC2). "base" and "cand" are paired: position i of both is the same item.
# Results never depend on item order: inputs are put in a canonical order (or summed with
# math.fsum, which is exact) before anything order-sensitive happens.
# ---------------------------------------------------------------------------------------------

_Unit = TypeVar("_Unit", float, tuple[float, float])


@dataclass(frozen=True)
class RetentionCI:
    """Retention mean(cand) / mean(base) with a confidence interval.

    ``method`` says which interval: "score" or "wald" (``retention_interval``, what the gate uses) or
    "bootstrap" (``paired_bootstrap_retention``). ``point`` is None when the baseline scores 0
    (retention undefined; for "score" and "wald" also when it scores so little that the ratio
    overflows). A bound is None when the data cannot fix it (see ``note``, which then
    says why in words); bounds are never infinite or NaN for "score" and "wald". For "bootstrap",
    ``lo`` and ``hi`` are also None when no resample has a retention (possible only with a handful of
    resamples), and ``hi`` is ``math.inf`` when enough resamples have a zero baseline mean and a
    positive candidate mean; ``share_below`` is the share of bootstrap retentions below the
    threshold (None without one, and always None for the other methods): a descriptive figure, not a
    p-value.
    """

    point: float | None
    lo: float | None
    hi: float | None
    share_below: float | None = None
    method: str = "bootstrap"
    note: str | None = None


@dataclass(frozen=True)
class McNemar:
    """Discordant pairs and the exact two-sided p-value of McNemar's test (sign test for continuous scores)."""

    regressed: int  # baseline better than candidate on the item (0/1: baseline right, candidate wrong)
    improved: int  # candidate better than baseline on the item
    p_value: float


@dataclass(frozen=True)
class NonInferiority:
    """One-sided paired test of H0: mean(cand) <= threshold * mean(base); small p supports retention >= threshold."""

    statistic: float | None  # z (score) or t (wald); None when there is nothing to test (see noninferiority_test)
    p_value: float
    mean_difference: float  # mean of d_i = cand_i - threshold * base_i
    method: str  # "score" (normal reference) or "wald" (t reference with df degrees of freedom)
    df: int | None = None


def _z(confidence: float) -> float:
    """Two-sided standard-normal critical value for a confidence level."""
    from scipy.special import ndtri  # the normal quantile; scipy.special imports in a third of scipy.stats' time

    _check_level("confidence", confidence)
    return float(ndtri(0.5 + confidence / 2))


def _check_level(name: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be strictly between 0 and 1, got {value!r}")


def _scores(values: Iterable[float], name: str = "scores") -> list[float]:
    """Scores as Python floats, checked to lie in [0, 1]."""
    result = list(map(float, values))
    # min/max/fsum are C loops (this runs on every look of a sequential test); fsum exposes NaN.
    if result and not (min(result) >= 0.0 and max(result) <= 1.0 and not math.isnan(math.fsum(result))):
        bad = next(v for v in result if not 0.0 <= v <= 1.0)
        raise ValueError(f"{name} must lie in [0, 1], got {bad!r}")
    return result


def _paired(base: Iterable[float], cand: Iterable[float]) -> tuple[list[float], list[float]]:
    """Paired baseline and candidate scores, checked for equal length and range."""
    b, c = _scores(base, "baseline scores"), _scores(cand, "candidate scores")
    if len(b) != len(c):
        raise ValueError(f"paired scores need equal lengths, got {len(b)} baseline and {len(c)} candidate")
    return b, c


def _is_binary(values: Sequence[float]) -> bool:
    return all(v in (0.0, 1.0) for v in values)


def _group(values: Sequence[_Unit], clusters: Sequence[Hashable]) -> list[list[_Unit]]:
    """Values grouped by cluster label, each group sorted (labels themselves never matter)."""
    if len(clusters) != len(values):
        raise ValueError(f"clusters must label every item: {len(clusters)} labels for {len(values)} items")
    groups: dict[Hashable, list[_Unit]] = {}
    for label, value in zip(clusters, values, strict=True):
        groups.setdefault(label, []).append(value)
    return sorted(sorted(g) for g in groups.values())


def _clustered_se(values: Sequence[float], clusters: Sequence[Hashable] | None) -> tuple[float, float, int]:
    """Mean, standard error of the mean and number of independent units (clusters, or items).

    The clustered SE is that of Miller (2024, "Adding Error Bars to Evals"),
    sqrt(sum over clusters of (sum of residuals in the cluster)^2) / n, times the usual small-sample
    factor sqrt(G / (G - 1)) for G clusters; with one item per cluster this is exactly the ordinary
    SE s / sqrt(n) with the n - 1 sample variance. Sums use math.fsum, so the result is independent
    of item order. The SE is NaN with fewer than two units.
    """
    n = len(values)
    m = math.fsum(values) / n
    if clusters is None:
        units = n
        sum_sq = math.fsum((v - m) ** 2 for v in values)
    else:
        groups = _group(values, clusters)
        units = len(groups)
        sum_sq = math.fsum(math.fsum(v - m for v in g) ** 2 for g in groups)
    if units < 2:
        return m, math.nan, units
    return m, math.sqrt(sum_sq * units / (units - 1)) / n, units


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (0.0, 1.0) when n is 0."""
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    z = _z(confidence)
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # The bounds are exactly 0 and 1 at the edges; clamping only removes rounding residue.
    return (0.0 if successes == 0 else max(0.0, center - half)), (1.0 if successes == n else min(1.0, center + half))


def mean_interval(
    values: Sequence[float], confidence: float = 0.95, clusters: Sequence[Hashable] | None = None
) -> tuple[float, float]:
    """Confidence interval for the mean score of a task, clipped to [0, 1].

    - 0/1 scores, no clusters: Wilson score interval.
    - clusters given (any scores): mean +- t(G-1) * clustered SE (Miller 2024 with the G/(G-1)
      factor, see ``_clustered_se``); t with G - 1 degrees of freedom rather than Miller's normal
      is the usual guard for few clusters and is the same thing for many.
    - continuous scores, no clusters: t interval with n - 1 degrees of freedom.

    With fewer than two independent units (items or clusters) the variance cannot be estimated and
    the interval is (0.0, 1.0).
    """
    from scipy.special import stdtrit  # Student t quantile: stdtrit(df, p) == scipy.stats.t.ppf(p, df)

    x = _scores(values)
    if not x:
        raise ValueError("mean_interval needs at least one value")
    _check_level("confidence", confidence)
    if clusters is None and _is_binary(x):
        return wilson_interval(int(sum(x)), len(x), confidence)
    m, se, units = _clustered_se(x, clusters)
    if units < 2:
        return 0.0, 1.0
    half = float(stdtrit(units - 1, 0.5 + confidence / 2)) * se
    return max(0.0, m - half), min(1.0, m + half)


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of sorted values that may end in +inf."""
    h = (len(sorted_values) - 1) * q
    i = math.floor(h)
    j = min(i + 1, len(sorted_values) - 1)
    a, b, frac = float(sorted_values[i]), float(sorted_values[j]), h - i
    if frac == 0 or a == b:
        return a
    return math.inf if math.isinf(b) else a + (b - a) * frac


def paired_bootstrap_retention(
    base: Sequence[float],
    cand: Sequence[float],
    *,
    threshold: float | None = None,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
    clusters: Sequence[Hashable] | None = None,
) -> RetentionCI:
    """Paired percentile-bootstrap interval for retention = mean(cand) / mean(base).

    Kept for comparison and for callers that want it; the gate no longer uses it. When the two
    models agree on most items (few discordant pairs) it covers too rarely: 89.8-92.7% instead of
    95% at 100 items in the report that retired it, and a "strict" gate on its lower bound passed
    up to 8.7% of candidates whose true retention equals the threshold, where a 95% interval
    promises 2.5% (benchmarks/stats/README.md has a current comparison). The gate uses
    ``retention_interval``, the interval dual to ``noninferiority_test``, and ``retention_decision``.

    Each resample draws items (or whole clusters, when ``clusters`` labels the items) with
    replacement, keeping each item's baseline and candidate scores together, so the correlation
    between the two models is respected. Resamples whose baseline and candidate means are both 0
    have no retention and are left out; a zero baseline mean with a positive candidate mean counts
    as +inf. Units are put in a canonical order first, so for a given seed the result does not
    depend on item order or on cluster labels. The percentile interval need not contain the point
    estimate for tiny or very skewed samples; it is widened to do so.
    """
    import numpy as np

    b, c = _paired(base, cand)
    _check_level("confidence", confidence)
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    base_sum = math.fsum(b)
    if base_sum <= 0:
        return RetentionCI(None, None, None, None)
    point = math.fsum(c) / base_sum  # ratio of means = ratio of sums over the same items
    if clusters is None:
        unit_base, unit_cand = np.array(b), np.array(c)
    else:
        groups = _group(list(zip(b, c, strict=True)), clusters)
        unit_base = np.array([math.fsum(p[0] for p in g) for g in groups])
        unit_cand = np.array([math.fsum(p[1] for p in g) for g in groups])
    order = np.lexsort((unit_cand, unit_base))  # canonical order: by baseline, then candidate
    unit_base, unit_cand = unit_base[order], unit_cand[order]
    count = len(unit_base)
    rng = np.random.default_rng(seed)
    num = np.empty(resamples)
    den = np.empty(resamples)
    chunk = max(1, 2_000_000 // count)  # bounds the index matrix to ~16 MB
    for start in range(0, resamples, chunk):
        stop = min(start + chunk, resamples)
        idx = rng.integers(0, count, size=(stop - start, count))
        num[start:stop] = unit_cand[idx].sum(axis=1)
        den[start:stop] = unit_base[idx].sum(axis=1)
    defined = (den > 0) | (num > 0)
    num, den = num[defined], den[defined]
    ratios = np.full(num.shape, math.inf)
    with np.errstate(over="ignore"):  # a tiny positive denominator overflows to +inf, which is right
        np.divide(num, den, out=ratios, where=den > 0)
    if ratios.size == 0:  # every resample missed every baseline-positive unit (only with very few resamples)
        return RetentionCI(float(point), None, None, None)
    ratios.sort()
    alpha = 1 - confidence
    ordered = ratios.tolist()
    lo = min(_quantile(ordered, alpha / 2), point)
    hi = max(_quantile(ordered, 1 - alpha / 2), point)
    share = None if threshold is None else float(np.count_nonzero(ratios < threshold)) / len(ratios)
    return RetentionCI(float(point), float(lo), float(hi), share)


def mcnemar_exact(base: Sequence[float], cand: Sequence[float]) -> McNemar:
    """Exact two-sided McNemar test: binomial test of regressed vs improved items with p = 0.5.

    For 0/1 scores the discordant items are baseline right / candidate wrong (regressed) and the
    reverse (improved). For continuous scores the same counts of cand < base and cand > base make
    it the exact sign test. No discordant items gives p = 1.
    """
    from scipy.stats import binomtest

    b, c = _paired(base, cand)
    regressed = sum(1 for x, y in zip(b, c, strict=True) if y < x)
    improved = sum(1 for x, y in zip(b, c, strict=True) if y > x)
    discordant = regressed + improved
    p = 1.0 if discordant == 0 else float(binomtest(regressed, discordant, 0.5).pvalue)
    return McNemar(regressed=regressed, improved=improved, p_value=min(1.0, p))


def _null_variance(d: Sequence[float], lower: float, upper: float) -> float:
    """Variance of d under H0 (mean 0): the maximum-likelihood distribution with mean 0 on [lower, upper].

    The distribution reweights the observed values, w_k = q_k / (1 + nu * a_k) for distinct values
    a_k with shares q_k and nu solving sum(w_k a_k) = 0 (the empirical-likelihood weights), and puts
    whatever mass remains on the bound ``lower`` (or ``upper``) when reweighting alone cannot reach
    mean 0. For 0/1 scores, whose d takes the four values of the 2x2 table with the bounds among
    them, this is the restricted maximum-likelihood estimate of the table under H0 used by the
    paired-ratio score test (Nam & Blackwelder 2002; Tang, Tang & Chan 2003); ``_binary_null_variance``
    is the same in closed form. The sums run over the sorted distinct values, so the result does
    not depend on item order.
    """
    import numpy as np
    from scipy.optimize import brentq

    support, counts = np.unique(np.asarray(d, dtype=float), return_counts=True)
    if len(support) == 1 and support[0] == 0.0:
        return 0.0
    shares = counts / len(d)
    weighted = shares * support

    def excess(nu: float) -> float:  # mean of the reweighted values; decreasing in nu
        return float(np.sum(weighted / (1 + nu * support)))

    nu_low, nu_high = -1 / upper, -1 / lower  # keep 1 + nu * a >= 0 on [lower, upper]
    step = 1e-12 * (nu_high - nu_low)  # an observed bound is a pole: stay just inside it
    # A value a rounding error inside a bound (cand - theta * base with base = 1 - 1e-16) is a pole too.
    near = 1e-12 * (upper - lower)
    left = nu_low + step if support[-1] >= upper - near else nu_low
    right = nu_high - step if support[0] <= lower + near else nu_high
    if excess(right) >= 0:
        nu = right
    elif excess(left) <= 0:
        nu = left
    else:
        nu = brentq(excess, left, right, xtol=1e-15)
    weights = shares / (1 + nu * support)
    rest = max(0.0, 1.0 - float(np.sum(weights)))
    bound = lower if nu > 0 else upper
    return float(np.sum(weights * support * support)) + rest * bound * bound


def _binary_null_variance(both: float, regressed: float, improved: float, theta: float) -> float:
    """``_null_variance`` of d = cand - theta * base for 0/1 scores, in closed form from the 2x2 table.

    Arguments are the shares of items both models get right, regressed (baseline right, candidate
    wrong) and improved; d is 1 - theta, -theta, 1 on them and 0 where both are wrong, the bounds
    -theta and 1 among the cells. Multiplying out the three denominators of sum(w_k a_k) = 0 leaves a
    quadratic in nu, whose root in the range where every weight stays positive is taken, or that
    range's end when the table has no regression (improvement) to reweight. The cell on the side
    opposite to the mean of d then gets whatever mass makes the mean 0, which is more accurate near
    the pole than dividing by 1 + nu * a (and is the "rest" of ``_null_variance`` at the range's end).
    """
    a1, a2 = 1.0 - theta, -theta
    m = both * a1 + regressed * a2 + improved
    if m == 0:
        return both * a1 * a1 + regressed * a2 * a2 + improved
    # nu keeps 1 + nu * a >= 0 on all four cells: nu in [-1, 1 / theta], with the sign of m. At the
    # end of that range the cell on the other side of the mean (the pole) gets weight 1 / 0.
    end = 1.0 / theta if m > 0 else -1.0
    low, high = sorted((0.0, end))
    if (regressed if m > 0 else improved) == 0:
        # The pole cell is unobserved: it drops out and what is left is linear in nu. If even nu at
        # the end leaves the reweighted mean on the side of m, the pole cell takes the rest there.
        if m > 0:
            at_end = both * a1 * theta + improved * theta / (1 + theta)
            root = -m / (a1 * (both + improved)) if at_end < 0 else end
        else:
            at_end = both * a1 / theta + regressed * a2 / (1 + theta)
            root = -m / (a1 * a2 * (both + regressed)) if at_end > 0 else end
        nu = min(max(root, low), high)
    else:
        # Exactly one root of the quadratic lies in (low, high), where the pole makes the mean run
        # to -m * infinity; rounding may put it a hair outside.
        quad = a1 * a2 * (both + regressed + improved)
        lin = both * a1 * (a2 + 1) + regressed * a2 * (a1 + 1) + improved * (a1 + a2)
        if quad == 0:
            roots = [-m / lin]
        else:
            half = -0.5 * (lin + math.copysign(math.sqrt(max(0.0, lin * lin - 4 * quad * m)), lin))
            roots = [half / quad, m / half] if half != 0 else [-lin / (2 * quad)]
        nu = min(max(min(roots, key=lambda r: max(low - r, r - high, 0.0)), low), high)
    if m > 0:
        w_both, w_improved = both / (1 + nu * a1), improved / (1 + nu)
        w_regressed = (w_both * a1 + w_improved) / theta  # mean 0
    else:
        w_both, w_regressed = both / (1 + nu * a1), regressed / (1 + nu * a2)
        w_improved = -(w_both * a1 + w_regressed * a2)  # mean 0
    return w_both * a1 * a1 + w_regressed * a2 * a2 + w_improved


class _RetentionTests:
    """The paired test of H0: retention = theta, ready for any theta from statistics computed once.

    ``noninferiority_test``, ``retention_interval`` and ``retention_decision`` all evaluate this,
    so a decision and an interval bound can never disagree about what the test says.
    """

    def __init__(self, b: list[float], c: list[float], clusters: Sequence[Hashable] | None, method: str) -> None:
        import numpy as np
        from scipy.special import ndtr, stdtr

        self.method, self.n = method, len(b)
        self.df: int | None = None  # the Wald test's degrees of freedom (G - 1)
        self.flat = False  # the Wald test's SE is 0 at every theta
        self.turning_point: float | None = None
        self.turning_is_minimum = False
        self._ndtr, self._stdtr = ndtr, stdtr
        self._table: tuple[float, float, float] | None = None
        if method == "score":
            if _is_binary(b) and _is_binary(c):
                both = sum(1 for x, y in zip(b, c, strict=True) if x and y)
                regressed = sum(1 for x, y in zip(b, c, strict=True) if x and not y)
                improved = sum(1 for x, y in zip(b, c, strict=True) if y and not x)
                self._table = (both / self.n, regressed / self.n, improved / self.n)
            else:
                self._base, self._cand = np.array(b), np.array(c)
            return
        units = (
            _group(list(zip(b, c, strict=True)), clusters)
            if clusters is not None
            else [[pair] for pair in sorted(zip(b, c, strict=True))]
        )
        self._unit_base = [math.fsum(x for x, _ in u) for u in units]
        self._unit_cand = [math.fsum(y for _, y in u) for u in units]
        self._unit_size = [len(u) for u in units]
        self.df = len(units) - 1
        # t(theta) = mean(d) / SE(d) has at most one turning point (Fieller): mean(d) is linear in
        # theta and SE(d)^2 = (Suu - 2 theta Suv + theta^2 Svv) * G / (G - 1) / n^2, with u and v
        # the clusters' residual sums of candidate and baseline scores. Its derivative has the sign
        # of (C Suv - B Suu) + theta (B Suv - C Svv) for total scores B, C.
        total_base, total_cand = math.fsum(self._unit_base), math.fsum(self._unit_cand)
        u = [y - k * total_cand / self.n for y, k in zip(self._unit_cand, self._unit_size, strict=True)]
        v = [x - k * total_base / self.n for x, k in zip(self._unit_base, self._unit_size, strict=True)]
        suu, suv, svv = (math.fsum(p * q for p, q in zip(s, t, strict=True)) for s, t in ((u, u), (u, v), (v, v)))
        slope = total_base * suv - total_cand * svv
        self.turning_point = None if slope == 0 else (total_base * suu - total_cand * suv) / slope
        self.turning_is_minimum = slope > 0
        self.flat = suu == suv == svv == 0  # every cluster has the overall means

    def evaluate(self, theta: float) -> tuple[float | None, float, float, float]:
        """(statistic, p-value of H0: retention <= theta, p-value of H0: retention >= theta, mean of d)."""
        if self.method == "score":
            if self._table is not None:
                both, regressed, improved = self._table
                m = both * (1.0 - theta) - regressed * theta + improved
                variance = _binary_null_variance(both, regressed, improved, theta)
            else:
                d = [min(1.0, max(-theta, y)) for y in (self._cand - theta * self._base).tolist()]
                m = math.fsum(d) / self.n
                variance = _null_variance(d, -theta, 1.0)
            if variance <= 0:  # every d_i is 0
                return None, 1.0, 1.0, float(m)
            statistic = m / math.sqrt(variance / self.n)
            return float(statistic), float(self._ndtr(-statistic)), float(self._ndtr(statistic)), float(m)
        sums = [y - theta * x for x, y in zip(self._unit_base, self._unit_cand, strict=True)]
        m = math.fsum(sums) / self.n
        units = len(sums)
        if units < 2:
            return None, 1.0, 1.0, float(m)
        sum_sq = math.fsum((s - k * m) ** 2 for s, k in zip(sums, self._unit_size, strict=True))
        se = math.sqrt(sum_sq * units / (units - 1)) / self.n
        if se == 0:
            return None, 0.0 if m > 0 else 1.0, 0.0 if m < 0 else 1.0, float(m)
        statistic = m / se
        df = units - 1
        return float(statistic), float(self._stdtr(df, -statistic)), float(self._stdtr(df, statistic)), float(m)


def noninferiority_test(
    base: Sequence[float],
    cand: Sequence[float],
    threshold: float,
    clusters: Sequence[Hashable] | None = None,
    *,
    method: Literal["score", "wald"] | None = None,
) -> NonInferiority:
    """Paired one-sided test of H0: mean(cand) <= threshold * mean(base) against H1: >.

    Works on d_i = cand_i - threshold * base_i in [-threshold, 1], whose mean is >= 0 exactly when
    retention >= the threshold (for a positive baseline mean); the statistic is mean(d) / SE.

    - method "score" (the default without clusters): SE = sqrt(V0 / n) with V0 the variance of d
      under H0 (``_null_variance``), referred to the standard normal; for 0/1 scores this is the
      score test for a ratio of paired proportions (Tang, Tang & Chan 2003), computed in closed
      form from the 2x2 table. Estimating the
      variance under H0 matters when the models mostly agree: a sample that happens to hold few
      regressions has both a high mean of d and a small sample variance, which makes the Wald test
      reject H0 far too often (benchmarks/stats/simulate.py: 7.6-9.6% instead of 5% at 100 items
      with 95% agreement).
    - method "wald" (the default, and the only choice, with clusters): SE = the sample SE of d
      (``_clustered_se``: ordinary, or Miller's clustered SE), referred to a t distribution with
      n - 1 degrees of freedom (G - 1 for G clusters).

    ``retention_interval`` is this test inverted, and ``retention_decision`` decides a gate policy
    from it, so p <= (1 - confidence) / 2 exactly when the interval's lower bound is >= threshold.

    Assumptions: items (or clusters) are independent draws from the population the gate is about,
    and there are enough of them for the mean of d to be near normal; with 0/1 scores what counts
    is the discordant items (roughly 10 or more; d takes only four values and regressions are rare
    when models agree). The Wald test additionally needs the sample variance to be a good
    estimate, hence many clusters when clustered. Statistic None: the Wald SE is 0 (p-value 0 if
    mean(d) > 0, else 1, which overstates certainty for tiny samples), or fewer than two units for
    Wald or every d_i = 0 for the score test (p = 1).
    """
    b, c = _paired(base, cand)
    if not threshold > 0:
        raise ValueError(f"threshold must be positive, got {threshold!r}")
    if method is None:
        method = "score" if clusters is None else "wald"
    if method not in ("score", "wald"):
        raise ValueError(f"unknown method {method!r}; choose 'score' or 'wald'")
    if method == "score" and clusters is not None:
        raise ValueError("the score test has no clustered form; use method='wald' with clusters")
    if not b:
        raise ValueError("noninferiority_test needs at least one item")
    tests = _RetentionTests(b, c, clusters, method)
    statistic, p_value, _, m = tests.evaluate(threshold)
    return NonInferiority(statistic, p_value, m, method, tests.df)


# Retentions searched for an interval's ends: a bound beyond these is reported as 0 (below) or None (above).
_RETENTION_RANGE = (1e-9, 1e9)


def _float_bits(x: float) -> int:
    return int(struct.unpack("<q", struct.pack("<d", x))[0])


def _bits_float(i: int) -> float:
    return float(struct.unpack("<d", struct.pack("<q", i))[0])


def _last_true(holds: Callable[[float], bool], low: float, high: float) -> float:
    """The largest float x in [low, high] with holds(x), given holds(low), not holds(high), holds monotone.

    Bisects the bit patterns, which order positive floats like their values, so the answer is
    exact to the last bit: holds(x) and not holds(the next float up).
    """
    a, b = _float_bits(low), _float_bits(high)
    while b - a > 1:
        mid = (a + b) // 2
        if holds(_bits_float(mid)):
            a = mid
        else:
            b = mid
    return _bits_float(a)


def retention_p_values(
    base: Sequence[float], cand: Sequence[float], threshold: float, clusters: Sequence[Hashable] | None = None
) -> tuple[float, float]:
    """One-sided p-values at ``threshold`` of H0: retention <= threshold and of H0: retention >= threshold.

    The tests ``retention_interval`` inverts (score without clusters, clustered Wald with them), so a
    decision taken from these p-values and the interval's bounds can never disagree.
    """
    b, c = _paired(base, cand)
    if not b:
        raise ValueError("retention_p_values needs at least one item")
    _, p_below, p_above, _ = _RetentionTests(b, c, clusters, "score" if clusters is None else "wald").evaluate(
        threshold
    )
    return p_below, p_above


def noninferiority_rejects(p_value: float, confidence: float = 0.95) -> bool:
    """Whether a one-sided p-value rejects at one side's share of a two-sided interval: p <= (1 - confidence) / 2."""
    _check_level("confidence", confidence)
    return p_value <= (1 - confidence) / 2


def retention_interval(
    base: Sequence[float],
    cand: Sequence[float],
    *,
    confidence: float = 0.95,
    clusters: Sequence[Hashable] | None = None,
) -> RetentionCI:
    """Confidence interval for retention = mean(cand) / mean(base): ``noninferiority_test`` inverted.

    ``lo`` is the largest retention theta the one-sided test of H0: retention <= theta still
    rejects at (1 - confidence) / 2 (its statistic at +z), ``hi`` the largest theta the mirror test
    of H0: retention >= theta does not reject (statistic at -z); both are exact to the last bit, so
    ``lo >= threshold`` exactly when ``noninferiority_test(base, cand, threshold, clusters)`` has
    p <= (1 - confidence) / 2 (``noninferiority_rejects``), which is what ``retention_decision``
    decides a strict gate on.

    - No clusters: the score test (method "score"), whose variance is estimated under H0. For 0/1
      scores this is the Tang, Tang & Chan (2003) interval for a ratio of paired proportions,
      computed from the 2x2 table in closed form (about 0.5 ms); it keeps its coverage when the
      models agree on most items, where the paired bootstrap covers too rarely. Continuous scores
      (e.g. TruthfulQA MC2) use the same test on their own values (tens of ms for 1,000 items).
    - Clusters: the clustered Wald test on d with t(G - 1) (method "wald"), whose inversion is
      Fieller's interval. It is unbounded above when the baseline's mean is not clearly above 0
      across clusters; with few clusters the test can also fail to be monotone in theta, and the
      interval is then the hull of the retentions neither side rejects (see ``note``); the gate
      decides from the test at its threshold regardless.

    Bounds are never inf or NaN: a bound the data cannot fix is None and ``note`` says why. ``lo``
    is 0.0 when not even a retention of 1e-9 is excluded. ``point`` (and the bounds) are None when
    the baseline scores 0, or so little that the ratio overflows. The result does not depend on item
    order or cluster labels.
    """
    b, c = _paired(base, cand)
    _check_level("confidence", confidence)
    if not b:
        raise ValueError("retention_interval needs at least one item")
    method = "score" if clusters is None else "wald"
    base_sum = math.fsum(b)
    if base_sum <= 0:
        note = "no retention: the baseline scores 0 on every item, so there is nothing to retain"
        return RetentionCI(None, None, None, method=method, note=note)
    point = float(math.fsum(c) / base_sum)
    if not math.isfinite(point):
        note = f"no retention: the baseline's total score ({base_sum:.3g}) is too small to divide by"
        return RetentionCI(None, None, None, method=method, note=note)
    tests = _RetentionTests(b, c, clusters, method)
    if tests.df == 0:
        note = "no interval: all items are in one cluster, which leaves no way to estimate the variance"
        return RetentionCI(point, None, None, method=method, note=note)

    def rejects_below(theta: float) -> bool:  # a strict gate at this threshold passes
        return noninferiority_rejects(tests.evaluate(theta)[1], confidence)

    def keeps_above(theta: float) -> bool:  # a lenient gate at this threshold passes
        return not noninferiority_rejects(tests.evaluate(theta)[2], confidence)

    low, high = _RETENTION_RANGE
    notes = []
    if tests.flat:
        notes.append(
            "no width: every cluster has the same baseline score and the same candidate score, so the "
            "clustered test sees no variation at all and overstates certainty"
        )
    # The piece of theta on which the test statistic falls through the point estimate: all of it for
    # the score test (it is monotone); for the clustered Wald test, up to Fieller's turning point
    # when that is a minimum (always above the point) or from it when a maximum (always below). A
    # turning point that rounding put on the wrong side sits within rounding of the point: ignored.
    start, stop = low, high
    turn = None if method == "score" else tests.turning_point
    if turn is not None and low < turn < high:
        if tests.turning_is_minimum and turn > point:
            stop = turn
        elif not tests.turning_is_minimum and turn < point:
            start = turn
    if not rejects_below(start):
        lo = 0.0  # no threshold is passed by a strict gate (from the turning point up, nor below it)
    elif rejects_below(stop):
        lo = stop  # even the top of the range is excluded: a baseline scoring next to nothing
    else:
        lo = _last_true(rejects_below, start, stop)
        if start > low and not rejects_below(low):
            notes.append(
                f"the clustered test also fails to exclude retentions near 0 (it is not monotone below "
                f"{start:.3g}: too few clusters, or a candidate near 0 in many of them), so lo is 0"
            )
            lo = 0.0
    hi: float | None
    if keeps_above(stop):
        hi = None
        notes.append(
            "unbounded above: the baseline's mean is not clearly above 0 across the clusters, so no "
            "retention is too high"
            if method == "wald"
            else "unbounded above: too few baseline-correct items (too low a baseline score) to bound the "
            f"retention from above (retentions up to {high:.0e} are not excluded)"
        )
    elif not keeps_above(start):
        hi = start  # even the bottom of the range is excluded: a candidate scoring next to nothing
    else:
        hi = _last_true(keeps_above, start, stop)
        if stop < high and keeps_above(high):
            notes.append(
                f"unbounded above: the clustered test also fails to exclude retentions above {stop:.3g} "
                "(the baseline's mean is not clearly above 0 across the clusters)"
            )
            hi = None
    return RetentionCI(point, lo, hi, method=method, note="; ".join(notes) or None)


def holm_adjusted(p_values: Mapping[str, float]) -> dict[str, float]:
    """Holm step-down adjusted p-values (same keys, same order as given)."""
    for key, p in p_values.items():
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p-value of {key!r} must lie in [0, 1], got {p!r}")
    ordered = sorted(p_values, key=lambda k: (p_values[k], k))
    m = len(ordered)
    adjusted: dict[str, float] = {}
    running = 0.0
    for rank, key in enumerate(ordered):
        running = max(running, min(1.0, (m - rank) * float(p_values[key])))
        adjusted[key] = running
    return {key: adjusted[key] for key in p_values}


def holm(p_values: Mapping[str, float], alpha: float = 0.05) -> dict[str, bool]:
    """Holm's step-down procedure: which hypotheses to reject with family-wise error rate <= alpha."""
    _check_level("alpha", alpha)
    return {key: p <= alpha for key, p in holm_adjusted(p_values).items()}


def _z_pair(alpha: float, power: float) -> tuple[float, float]:
    from scipy.special import ndtri

    _check_level("alpha", alpha)
    if not 0.5 <= power < 1.0:
        raise ValueError(f"power must be in [0.5, 1), got {power!r}")
    return float(ndtri(1 - alpha / 2)), float(ndtri(power))


def _check_design(base_accuracy: float, discordance: float) -> None:
    _check_level("base_accuracy", base_accuracy)
    if not 0.0 < discordance <= 2 * min(base_accuracy, 1 - base_accuracy):
        raise ValueError(
            f"discordance (share of items where the models disagree) must be in (0, 2 * min(p, 1 - p)] "
            f"for baseline accuracy p={base_accuracy}, got {discordance!r}"
        )


def minimum_detectable_drop(
    base_accuracy: float, discordance: float, n: int, alpha: float = 0.05, power: float = 0.8
) -> float | None:
    """Smallest relative retention drop the paired (McNemar) test detects at ``n`` items.

    Connor (1987) normal approximation for paired proportions: with discordance psi = P(models
    disagree on an item) and Delta = p10 - p01 = base_accuracy * drop (p10: baseline right,
    candidate wrong), the two-sided level-alpha test has power
    Phi((sqrt(n) Delta - z_{1-alpha/2} sqrt(psi)) / sqrt(psi - Delta^2)).
    Setting that to ``power`` and solving the quadratic for Delta gives
    Delta = (a sqrt(n) + z_b sqrt(psi (n + z_b^2) - a^2)) / (n + z_b^2), a = z_{1-alpha/2} sqrt(psi),
    z_b = z_power, and drop = Delta / base_accuracy (retention 1 - drop). For a one-sided test pass
    2 * alpha. psi is held fixed as the drop varies. Returns None when no drop compatible with
    the accuracy and discordance reaches the power (n * psi <= z_{1-alpha/2}^2, or p10 would exceed
    the accuracy).
    """
    _check_design(base_accuracy, discordance)
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    z_a, z_b = _z_pair(alpha, power)
    if n * discordance <= z_a * z_a:  # even Delta = psi (every disagreement a regression) stays below power
        return None
    a = z_a * math.sqrt(discordance)
    delta = (a * math.sqrt(n) + z_b * math.sqrt(discordance * (n + z_b * z_b) - a * a)) / (n + z_b * z_b)
    if delta >= discordance or (discordance + delta) / 2 > base_accuracy:
        return None
    return float(delta / base_accuracy)


def items_needed(base_accuracy: float, discordance: float, drop: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Items the paired (McNemar) test needs to detect a relative retention drop ``drop``.

    Connor (1987): n = (z_{1-alpha/2} sqrt(psi) + z_power sqrt(psi - Delta^2))^2 / Delta^2 with
    Delta = base_accuracy * drop and psi the discordance (see ``minimum_detectable_drop``).
    Raises ValueError when the drop cannot happen at this discordance (Delta > psi, or more
    regressions than baseline-correct items).
    """
    _check_design(base_accuracy, discordance)
    delta = base_accuracy * drop
    if not 0 < delta <= discordance or (discordance + delta) / 2 > base_accuracy:
        raise ValueError(
            f"a retention drop of {drop} at baseline accuracy {base_accuracy} needs discordance "
            f">= {delta:.4g} (and at most {2 * base_accuracy - delta:.4g}), got {discordance}"
        )
    z_a, z_b = _z_pair(alpha, power)
    n = (z_a * math.sqrt(discordance) + z_b * math.sqrt(discordance - delta * delta)) ** 2 / (delta * delta)
    return max(1, math.ceil(n - 1e-9))  # the tolerance keeps an exact integer from rounding up


def mean_confidence_sequence(
    values: Sequence[float], *, lower: float = 0.0, upper: float = 1.0, alpha: float = 0.05
) -> tuple[float, float]:
    """Anytime-valid bounds (lo, hi) on the mean of bounded values, as of the latest value.

    Predictable-plug-in empirical-Bernstein confidence sequence (Waudby-Smith & Ramdas 2024,
    "Estimating means of bounded random variables by betting", JRSS-B, Thm. 2), built one-sided:
    with x_i = (v_i - lower) / (upper - lower) in [0, 1],
    L_t = sum(lam_i x_i) / sum(lam_i) - (log(1/a) + sum(w_i psi(lam_i))) / sum(lam_i), where
    psi(lam) = -log(1 - lam) - lam, w_i = (x_i - mu_{i-1})^2,
    lam_i = min(1/2, sqrt(2 log(1/a) / (sigma2_{i-1} i log(1 + i)))), and mu_i, sigma2_i running
    mean and variance with one prior observation (1/2, 1/4). The upper bound is the same on 1 - x.

    Guarantee: if the values are independent with a common mean mu (or, more generally, have
    conditional mean mu given the past), then P(mu < lo at any time) <= alpha and
    P(mu > hi at any time) <= alpha, however often one looks and whenever one stops. The bounds are
    the running intersection over all times (also valid). For a fixed benchmark this means the
    items must arrive in random order; sorted items (e.g. by subject) void the guarantee.
    """
    import numpy as np

    _check_level("alpha", alpha)
    if not upper > lower:
        raise ValueError(f"need upper > lower, got [{lower}, {upper}]")
    if len(values) == 0:
        return float(lower), float(upper)
    v = np.asarray(values, dtype=float)
    if np.any(v < lower) or np.any(v > upper) or np.any(np.isnan(v)):
        raise ValueError(f"values must lie in [{lower}, {upper}]")
    x = (v - lower) / (upper - lower)
    lo = float(np.max(_predmix_eb_lower(x, alpha)))
    hi = 1 - float(np.max(_predmix_eb_lower(1 - x, alpha)))
    lo, hi = max(0.0, lo), min(1.0, hi)
    span = upper - lower
    # The two one-sided sequences can cross (probability <= 2 * alpha); report an empty interval as a point.
    return float(lower + span * lo), float(lower + span * max(lo, hi))


def _predmix_eb_lower(x: Any, alpha: float) -> Any:
    """Lower confidence sequence L_1..L_t for the mean of [0, 1] values (see mean_confidence_sequence)."""
    import numpy as np

    t = np.arange(1, len(x) + 1)
    mu = (0.5 + np.cumsum(x)) / (t + 1)
    mu_prev = np.concatenate(([0.5], mu[:-1]))
    sigma2 = (0.25 + np.cumsum((x - mu) ** 2)) / (t + 1)
    sigma2_prev = np.concatenate(([0.25], sigma2[:-1]))
    log_inv_alpha = math.log(1 / alpha)
    lam = np.minimum(0.5, np.sqrt(2 * log_inv_alpha / (sigma2_prev * t * np.log1p(t))))
    psi = -np.log1p(-lam) - lam
    lam_sum = np.cumsum(lam)
    return (np.cumsum(lam * x) - log_inv_alpha - np.cumsum((x - mu_prev) ** 2 * psi)) / lam_sum


def quantile(values: Iterable[float], q: float) -> float:
    """The ``q`` quantile of ``values`` with linear interpolation (numpy's default; p95 is ``q = 0.95``)."""
    ordered = sorted(float(v) for v in values)
    if not ordered:
        raise ValueError("quantile of no values")
    if not 0 <= q <= 1:
        raise ValueError(f"q must be in [0, 1], got {q}")
    return _quantile(ordered, q)


def timing_interval(
    values: Sequence[float], q: float, *, confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """(point, low, high): the ``q`` quantile of timings with a percentile-bootstrap interval over the rounds.

    With few rounds a high quantile is close to the largest timing and its interval is wide: that is the
    honest answer, and a gate on it says "unresolved" rather than guessing.
    """
    import numpy as np

    x = np.asarray([float(v) for v in values])
    if x.size == 0:
        raise ValueError("no timings")
    _check_level("confidence", confidence)
    point = float(np.quantile(x, q))
    if x.size == 1:
        return point, point, point
    rng = np.random.default_rng(seed)
    stats = np.quantile(x[rng.integers(0, x.size, size=(resamples, x.size))], q, axis=1)
    alpha = 1 - confidence
    lo, hi = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return point, min(float(lo), point), max(float(hi), point)


def ratio_interval(
    reference: Sequence[float],
    candidate: Sequence[float],
    statistic: Callable[[Any], Any],
    *,
    paired: bool,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(point, low, high) of ``statistic(candidate) / statistic(reference)`` with a percentile-bootstrap interval.

    ``paired``: the two samples are rounds taken in pairs (the same prompt, interleaved in time), resampled
    together, so drift of the machine during the run cancels in each pair; else each is resampled on its own.
    ``statistic`` maps an array of resampled rows (shape (resamples, n)) to one value per row.
    """
    import numpy as np

    a = np.asarray([float(v) for v in reference])
    b = np.asarray([float(v) for v in candidate])
    if a.size == 0 or b.size == 0:
        raise ValueError("a ratio needs timings of both models")
    if paired and a.size != b.size:
        n = min(a.size, b.size)
        a, b = a[:n], b[:n]
    _check_level("confidence", confidence)
    point = float(statistic(b[None, :])[0] / statistic(a[None, :])[0])
    rng = np.random.default_rng(seed)
    if paired:
        index = rng.integers(0, a.size, size=(resamples, a.size))
        ratios = statistic(b[index]) / statistic(a[index])
    else:
        ratios = statistic(b[rng.integers(0, b.size, size=(resamples, b.size))]) / statistic(
            a[rng.integers(0, a.size, size=(resamples, a.size))]
        )
    alpha = 1 - confidence
    lo, hi = np.quantile(ratios, [alpha / 2, 1 - alpha / 2])
    return point, min(float(lo), point), max(float(hi), point)

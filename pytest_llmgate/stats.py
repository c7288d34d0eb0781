"""Pure statistics over item outcomes: scores, retention, wins/losses/ties, intervals and paired tests. No I/O.

numpy and scipy are imported inside the functions that need them, so importing the plugin stays fast.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
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


def item_score(side: Mapping[str, Any], metric: str) -> float:
    """The gating metric's score of one side of one item."""
    return float(side["scores"][metric])


def mean(values: Iterable[float]) -> float:
    """Arithmetic mean; 0.0 for no values."""
    values = list(values)
    return sum(values) / len(values) if values else 0.0


@dataclass
class Tally:
    """Outcomes collected on the controller, in whatever order xdist delivers them."""

    outcomes: dict[str, dict[str, Any]] = field(default_factory=dict)

    def add(self, outcome: Mapping[str, Any]) -> None:
        """Record one item's outcome (a later report of the same item replaces the earlier one)."""
        self.outcomes[f"{outcome['task']}/{outcome['id']}"] = dict(outcome)

    def ordered(self) -> list[dict[str, Any]]:
        """Outcomes sorted by task then row, so statistics do not depend on arrival order."""
        return sorted(self.outcomes.values(), key=lambda o: (o["task"], o["doc_id"], o["id"]))

    def task_stats(self, confidence: float = 0.95) -> dict[str, TaskStats]:
        """Per-task statistics over every role present on all of the task's items."""
        by_task: dict[str, list[dict[str, Any]]] = {}
        for outcome in self.ordered():
            by_task.setdefault(outcome["task"], []).append(outcome)
        result = {}
        for task, outcomes in by_task.items():
            metric = outcomes[0]["metric"]
            roles = set.intersection(*(set(o["sides"]) for o in outcomes))
            items = {role: tuple(item_score(o["sides"][role], metric) for o in outcomes) for role in sorted(roles)}
            scores = {role: mean(values) for role, values in items.items()}
            wlt = {}
            if "baseline" in roles:
                for role in sorted(roles - {"baseline"}):
                    pairs = list(zip(items["baseline"], items[role], strict=True))
                    wins = sum(cand > base for base, cand in pairs)
                    losses = sum(cand < base for base, cand in pairs)
                    wlt[role] = (wins, losses, len(outcomes) - wins - losses)
            clusters = tuple(o["id"].rpartition("-")[0] for o in outcomes)
            clustered = clusters if len(set(clusters)) > 1 else None
            result[task] = TaskStats(
                task=task, metric=metric, n=len(outcomes), scores=scores,
                chance=mean(o["chance"] for o in outcomes), wlt=wlt, items=items, clusters=clusters,
                intervals={role: mean_interval(values, confidence, clustered) for role, values in items.items()})
        return result


# ---------------------------------------------------------------------------------------------
# Inference: intervals, paired tests, multiplicity, gate policies, planning, sequential stopping.
#
# Every function below is pure and returns builtin types (float, int, bool, str, None), so its
# results can ride on reports. Scores are per-item values in [0, 1]: 0/1 accuracy, or continuous
# (e.g. TruthfulQA MC2). "base" and "cand" are paired: position i of both is the same item.
# Results never depend on item order: inputs are put in a canonical order (or summed with
# math.fsum, which is exact) before anything order-sensitive happens.
# ---------------------------------------------------------------------------------------------

Policy = Literal["point", "strict", "lenient"]
POLICIES: tuple[Policy, ...] = ("point", "strict", "lenient")
SequentialVerdict = Literal["pass", "fail", "continue"]
_Unit = TypeVar("_Unit", float, tuple[float, float])


@dataclass(frozen=True)
class RetentionCI:
    """Retention mean(cand) / mean(base) with a paired-bootstrap percentile interval.

    ``point``, ``lo`` and ``hi`` are None when the baseline scores 0 (retention undefined), ``lo``
    and ``hi`` also when no resample has a retention (possible only with a handful of resamples);
    ``hi`` is ``math.inf`` when enough resamples have a zero baseline mean and a positive candidate
    mean.
    ``share_below`` is the share of bootstrap retentions below the threshold (None without one): a
    descriptive figure, not a p-value.
    """

    point: float | None
    lo: float | None
    hi: float | None
    share_below: float | None = None


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


@dataclass(frozen=True)
class Decision:
    """A gate policy's verdict on one retention interval."""

    passed: bool
    resolved: bool  # the interval lies entirely on one side of the threshold


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
    lo = min(_quantile(ratios, alpha / 2), point)
    hi = max(_quantile(ratios, 1 - alpha / 2), point)
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
    paired-ratio score test (Nam & Blackwelder 2002; Tang, Tang & Chan 2003).
    """
    from scipy.optimize import brentq

    counts: dict[float, int] = {}
    for v in d:
        counts[v] = counts.get(v, 0) + 1
    support = sorted(counts)
    shares = [counts[a] / len(d) for a in support]
    if support == [0.0]:
        return 0.0

    def excess(nu: float) -> float:  # mean of the reweighted values; decreasing in nu
        return math.fsum(q * a / (1 + nu * a) for q, a in zip(shares, support, strict=True))

    nu_low, nu_high = -1 / upper, -1 / lower  # keep 1 + nu * a >= 0 on [lower, upper]
    step = 1e-12 * (nu_high - nu_low)  # an observed bound is a pole: stay just inside it
    left = nu_low + step if support[-1] >= upper else nu_low
    right = nu_high - step if support[0] <= lower else nu_high
    if excess(right) >= 0:
        nu = right
    elif excess(left) <= 0:
        nu = left
    else:
        nu = brentq(excess, left, right, xtol=1e-15)
    weights = [q / (1 + nu * a) for q, a in zip(shares, support, strict=True)]
    rest = max(0.0, 1.0 - math.fsum(weights))
    bound = lower if nu > 0 else upper
    return math.fsum(w * a * a for w, a in zip(weights, support, strict=True)) + rest * bound * bound


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
      score test for a ratio of paired proportions (Tang, Tang & Chan 2003). Estimating the
      variance under H0 matters when the models mostly agree: a sample that happens to hold few
      regressions has both a high mean of d and a small sample variance, which makes the Wald test
      reject H0 far too often (benchmarks/stats/simulate.py: 7.6-9.6% instead of 5% at 100 items
      with 95% agreement).
    - method "wald" (the default, and the only choice, with clusters): SE = the sample SE of d
      (``_clustered_se``: ordinary, or Miller's clustered SE), referred to a t distribution with
      n - 1 degrees of freedom (G - 1 for G clusters).

    Assumptions: items (or clusters) are independent draws from the population the gate is about,
    and there are enough of them for the mean of d to be near normal; with 0/1 scores what counts
    is the discordant items (roughly 10 or more; d takes only four values and regressions are rare
    when models agree). The Wald test additionally needs the sample variance to be a good
    estimate, hence many clusters when clustered. Statistic None: the Wald SE is 0 (p-value 0 if
    mean(d) > 0, else 1, which overstates certainty for tiny samples), or fewer than two units for
    Wald or every d_i = 0 for the score test (p = 1).
    """
    from scipy.stats import norm
    from scipy.stats import t as student_t

    b, c = _paired(base, cand)
    if not threshold > 0:
        raise ValueError(f"threshold must be positive, got {threshold!r}")
    if method is None:
        method = "score" if clusters is None else "wald"
    if method not in ("score", "wald"):
        raise ValueError(f"unknown method {method!r}; choose 'score' or 'wald'")
    if method == "score" and clusters is not None:
        raise ValueError("the score test has no clustered form; use method='wald' with clusters")
    # Clipping only removes rounding residue: d lies in [-threshold, 1] exactly.
    d = [min(1.0, max(-threshold, y - threshold * x)) for x, y in zip(b, c, strict=True)]
    if not d:
        raise ValueError("noninferiority_test needs at least one item")
    if method == "score":
        m = math.fsum(d) / len(d)
        variance = _null_variance(d, -threshold, 1.0)
        if variance <= 0:
            return NonInferiority(None, 1.0, float(m), "score")
        statistic = m / math.sqrt(variance / len(d))
        return NonInferiority(float(statistic), float(norm.sf(statistic)), float(m), "score")
    m, se, units = _clustered_se(d, clusters)
    df = units - 1
    if units < 2:
        return NonInferiority(None, 1.0, float(m), "wald", df)
    if se == 0:
        return NonInferiority(None, 0.0 if m > 0 else 1.0, float(m), "wald", df)
    statistic = m / se
    return NonInferiority(float(statistic), float(student_t.sf(statistic, df)), float(m), "wald", df)


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


def policy_decision(point: float, lo: float, hi: float, threshold: float, policy: Policy) -> Decision:
    """Pass/fail of ``retention >= threshold`` under a gate policy.

    point: the estimate decides. strict: pass only when the whole interval is at or above the
    threshold (lo >= threshold). lenient: fail only when the whole interval is below it
    (hi < threshold). ``resolved`` (any policy) says the interval does not straddle the threshold,
    i.e. strict and lenient agree.
    """
    if not lo <= point <= hi:
        raise ValueError(f"need lo <= point <= hi, got lo={lo}, point={point}, hi={hi}")
    resolved = lo >= threshold or hi < threshold
    if policy == "point":
        passed = point >= threshold
    elif policy == "strict":
        passed = lo >= threshold
    elif policy == "lenient":
        passed = hi >= threshold
    else:
        raise ValueError(f"unknown gate policy {policy!r}; choose one of {', '.join(POLICIES)}")
    return Decision(passed=bool(passed), resolved=bool(resolved))


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
            f"for baseline accuracy p={base_accuracy}, got {discordance!r}")


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


def items_needed(
    base_accuracy: float, discordance: float, drop: float, alpha: float = 0.05, power: float = 0.8
) -> int:
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
            f">= {delta:.4g} (and at most {2 * base_accuracy - delta:.4g}), got {discordance}")
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

    b, c = _paired(base, cand)
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    d = np.clip(np.array(c) - threshold * np.array(b), -threshold, 1.0)  # clip: rounding only
    lo, hi = mean_confidence_sequence(d.tolist(), lower=-threshold, upper=1.0, alpha=alpha)
    if lo > 0:
        return "pass"
    if hi < 0:
        return "fail"
    return "continue"

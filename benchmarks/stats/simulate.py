"""Monte Carlo check of the gate statistics in ``pytest_llmgate.stats`` on simulated paired 0/1 items.

Each replication draws n items independently; an item's (baseline, candidate) outcome is one of
the four cells of a 2x2 table whose probabilities follow from the baseline accuracy p, the
agreement rate a (share of items both models score alike) and the true retention r:

    p10 (baseline right, candidate wrong) = ((1 - a) + p (1 - r)) / 2
    p01 (baseline wrong, candidate right) = ((1 - a) - p (1 - r)) / 2
    p11 = p - p10,  p00 = 1 - p11 - p10 - p01

so the candidate accuracy is exactly r * p. Combinations with p01 < 0 cannot happen (the models
cannot disagree less than the drop requires) and are skipped.

Per scenario it reports, against the gate threshold (0.95 by default):
- coverage: share of replications whose 95% retention interval (``retention_interval``, the score
  interval the gate uses) contains r (target 93-97%);
- strict pass: share where the "strict" policy passes (``retention_decision``, which is exactly
  ``lo >= threshold``; the run checks that the two agree on every replication). At r = threshold
  this is the false-pass rate, which a 95% two-sided interval promises to keep at 2.5%; at
  r < threshold it is also an error, at r > threshold it is the power;
- optionally (``--resamples N`` > 0) the same two figures for the paired bootstrap
  (``paired_bootstrap_retention``, no longer used by the gate), for comparison; it is slow;
- NI reject: share where ``noninferiority_test`` rejects H0 retention <= threshold at ``--alpha``
  (one-sided) with its default score test, and (NI Wald) with ``method="wald"`` for comparison
  (at r = threshold the type-I error, target <= alpha; at r < threshold also an error; at r = 1
  the power);
- sequential: ``sequential_decision`` called after every shard of ``--shard`` items until it says
  pass or fail or the items run out: the pass and fail rates (pass at r <= threshold is a type-I
  error, target <= alpha) and the mean number of items used (n when it never stops).

The default grid is n in {50, 100, 200, 500, 1000}, accuracy in {0.45, 0.7}, agreement in
{0.85, 0.95, 0.98} and r in {1.0, 0.95, 0.93, 0.85}: 120 combinations, of which 80 can happen.

Usage (one core: the default grid takes about 3.5 minutes with 1000 replications and about 30 with
the 10,000 of benchmarks/stats/README.md; most of it is the sequential looks at large n, while the
score interval and the strict decision take under a millisecond per replication at n = 1000)::

    python benchmarks/stats/simulate.py --reps 1000 --jobs 1
    python benchmarks/stats/simulate.py --reps 300 --n 100 --agreement 0.95 --resamples 500  # + bootstrap
"""

from __future__ import annotations

import argparse
import itertools
import math
import multiprocessing
import time
from dataclasses import dataclass

import numpy as np

from pytest_llmgate.gate import retention_decision, sequential_decision
from pytest_llmgate.stats import noninferiority_test, paired_bootstrap_retention, retention_interval


@dataclass(frozen=True)
class Scenario:
    """One cell of the simulation grid."""

    n: int
    accuracy: float
    agreement: float
    retention: float

    def cells(self) -> tuple[float, float, float, float] | None:
        """Probabilities of (both right, regressed, improved, both wrong), or None if impossible."""
        discordance = 1 - self.agreement
        drop = self.accuracy * (1 - self.retention)
        regressed, improved = (discordance + drop) / 2, (discordance - drop) / 2
        both = self.accuracy - regressed
        if improved < -1e-12 or both < 0:
            return None
        improved = max(improved, 0.0)
        return both, regressed, improved, 1 - both - regressed - improved


@dataclass(frozen=True)
class Result:
    """Monte Carlo rates of one scenario."""

    scenario: Scenario
    coverage: float
    strict_pass: float
    boot_coverage: float | None
    boot_strict_pass: float | None
    ni_reject: float
    ni_wald_reject: float
    seq_pass: float
    seq_fail: float
    seq_items: float
    seconds: float


def simulate(job: tuple[Scenario, int, argparse.Namespace]) -> Result:
    """Run one scenario's replications with its own seeded generator."""
    scenario, index, args = job
    start = time.perf_counter()
    rng = np.random.default_rng([args.seed, index])
    cells = scenario.cells()
    assert cells is not None
    base_of, cand_of = np.array([1.0, 1.0, 0.0, 0.0]), np.array([1.0, 0.0, 1.0, 0.0])
    covered = strict = boot_covered = boot_strict = ni = ni_wald = seq_pass = seq_fail = 0
    items_used = 0
    for rep in range(args.reps):
        kinds = rng.choice(4, size=scenario.n, p=cells)
        base, cand = base_of[kinds].tolist(), cand_of[kinds].tolist()
        ci = retention_interval(base, cand, confidence=args.confidence)
        passed = retention_decision(base, cand, args.threshold, "strict", confidence=args.confidence).passed
        if ci.lo is not None and ci.hi is not None:
            covered += ci.lo <= scenario.retention <= ci.hi
        # By construction the strict decision is lo >= threshold; a disagreement is a bug.
        if ci.lo is not None and passed != (ci.lo >= args.threshold):
            raise AssertionError(f"strict decision {passed} disagrees with lo={ci.lo} in {scenario}, rep {rep}")
        strict += passed
        if args.resamples:
            boot = paired_bootstrap_retention(
                base, cand, confidence=args.confidence, resamples=args.resamples, seed=rep
            )
            if boot.lo is not None and boot.hi is not None:
                boot_covered += boot.lo <= scenario.retention <= boot.hi
                boot_strict += boot.lo >= args.threshold
        ni += noninferiority_test(base, cand, args.threshold).p_value < args.alpha
        ni_wald += noninferiority_test(base, cand, args.threshold, method="wald").p_value < args.alpha
        used, verdict = scenario.n, "continue"
        for stop in range(args.shard, scenario.n + args.shard, args.shard):
            stop = min(stop, scenario.n)
            verdict = sequential_decision(base[:stop], cand[:stop], args.threshold, alpha=args.alpha)
            if verdict != "continue":
                used = stop
                break
        seq_pass += verdict == "pass"
        seq_fail += verdict == "fail"
        items_used += used
    reps = args.reps
    return Result(
        scenario,
        covered / reps,
        strict / reps,
        boot_covered / reps if args.resamples else None,
        boot_strict / reps if args.resamples else None,
        ni / reps,
        ni_wald / reps,
        seq_pass / reps,
        seq_fail / reps,
        items_used / reps,
        time.perf_counter() - start,
    )


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=1000, help="replications per scenario (default 1000)")
    parser.add_argument("--confidence", type=float, default=0.95, help="two-sided interval level (default 0.95)")
    parser.add_argument(
        "--resamples",
        type=int,
        default=0,
        help="bootstrap resamples per interval for the comparison columns (default 0: no bootstrap)",
    )
    parser.add_argument("--threshold", type=float, default=0.95, help="gate threshold on retention (default 0.95)")
    parser.add_argument("--alpha", type=float, default=0.05, help="level of the one-sided tests (default 0.05)")
    parser.add_argument("--shard", type=int, default=32, help="items between sequential looks (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="master seed (default 0)")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--n", type=int, nargs="+", default=[50, 100, 200, 500, 1000], help="items per benchmark")
    parser.add_argument("--accuracy", type=float, nargs="+", default=[0.45, 0.7], help="baseline accuracies")
    parser.add_argument("--agreement", type=float, nargs="+", default=[0.85, 0.95, 0.98], help="agreement rates")
    parser.add_argument(
        "--retention",
        type=float,
        nargs="+",
        default=[1.0, 0.95, 0.93, 0.85],
        help="true retentions (default: well above, at, just below, well below 0.95)",
    )
    args = parser.parse_args()

    grid = [Scenario(*combo) for combo in itertools.product(args.n, args.accuracy, args.agreement, args.retention)]
    skipped = [s for s in grid if s.cells() is None]
    jobs = [(s, i, args) for i, s in enumerate(grid) if s.cells() is not None]
    start = time.perf_counter()
    if args.jobs > 1:
        with multiprocessing.Pool(args.jobs) as pool:
            results = pool.map(simulate, jobs, chunksize=1)
    else:
        results = [simulate(job) for job in jobs]
    elapsed = time.perf_counter() - start

    half = (1 - args.confidence) / 2
    mc_se = math.sqrt(args.confidence * (1 - args.confidence) / args.reps)
    mc_se_half = math.sqrt(half * (1 - half) / args.reps)
    print(
        f"Paired 0/1 items, threshold {args.threshold}, {args.confidence:.0%} two-sided score interval "
        f"(strict passes when its lower bound >= threshold: {100 * half:.1f}% one-sided), alpha {args.alpha} "
        f"for the NI and sequential columns, {args.reps} replications per row"
        + (f", {args.resamples} bootstrap resamples per interval" if args.resamples else "")
        + f", sequential looks every {args.shard} items, seed {args.seed}. Monte Carlo SE: "
        f"{100 * mc_se:.2f} points for a {args.confidence:.0%} coverage, {100 * mc_se_half:.2f} for a "
        f"{100 * half:.1f}% pass rate.\n"
    )
    boot = "| boot coverage | boot strict pass " if args.resamples else ""
    print(
        "| n | base acc | agreement | true retention | coverage | strict pass "
        + boot
        + "| NI reject (score) | NI reject (Wald) | seq pass | seq fail | seq mean items |"
    )
    print("|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if args.resamples else "") + "---:|---:|---:|---:|---:|")
    for r in results:
        s = r.scenario
        where = (
            "at"
            if math.isclose(s.retention, args.threshold)
            else ("above" if s.retention > args.threshold else "below")
        )
        boot = f"| {percent(r.boot_coverage)} | {percent(r.boot_strict_pass)} " if args.resamples else ""
        print(
            f"| {s.n} | {s.accuracy:.2f} | {s.agreement:.2f} | {s.retention:.2f} ({where}) | {percent(r.coverage)} "
            f"| {percent(r.strict_pass)} {boot}| {percent(r.ni_reject)} | {percent(r.ni_wald_reject)} "
            f"| {percent(r.seq_pass)} | {percent(r.seq_fail)} | {r.seq_items:.0f} |"
        )
    if skipped:
        print(
            "\nSkipped (the agreement rate leaves too few disagreements for that drop): "
            + "; ".join(f"n={s.n} acc={s.accuracy} agree={s.agreement} r={s.retention}" for s in skipped)
        )
    at = [r for r in results if math.isclose(r.scenario.retention, args.threshold)]
    low_cov = [r for r in results if not 0.93 <= r.coverage <= 0.97]
    print(
        f"\nCoverage range {percent(min(r.coverage for r in results))}-{percent(max(r.coverage for r in results))}"
        f" ({len(low_cov)} of {len(results)} rows outside 93-97%)"
        + (f"; strict pass at the threshold at most {100 * max(r.strict_pass for r in at):.2f}%" if at else "")
        + f". {len(results)} scenarios in {elapsed:.0f} s."
    )


if __name__ == "__main__":
    main()

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
- coverage: share of replications whose paired-bootstrap 95% retention interval contains r
  (``paired_bootstrap_retention`` with ``--resamples`` resamples; target 93-97%);
- strict pass: share whose interval lies at or above the threshold (the "strict" policy's pass
  rate; at r <= threshold an error, about 2.5% expected from a 95% two-sided interval);
- NI reject: share where ``noninferiority_test`` rejects H0 retention <= threshold at alpha with
  its default score test, and (NI Wald) with ``method="wald"`` for comparison (at r = threshold
  the type-I error, target <= alpha; at r < threshold also an error; at r = 1 the power);
- sequential: ``sequential_decision`` called after every shard of ``--shard`` items until it says
  pass or fail or the items run out: the pass and fail rates (pass at r <= threshold is a type-I
  error, target <= alpha) and the mean number of items used (n when it never stops).

The bootstrap uses 500 resamples here (the library default is 2000) to keep the run short; that
adds a little Monte Carlo noise to each interval's ends, not a bias.

Usage (about 5 minutes on 2 idle CPU cores, 6.5 on a busy shared pair; ``--reps 1000`` halves it)::

    python benchmarks/stats/simulate.py --reps 2000 --resamples 500 --jobs 2
"""

from __future__ import annotations

import argparse
import itertools
import math
import multiprocessing
import time
from dataclasses import dataclass

import numpy as np

from pytest_llmgate.stats import noninferiority_test, paired_bootstrap_retention, sequential_decision


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
    ni_reject: float
    ni_wald_reject: float
    seq_pass: float
    seq_fail: float
    seq_items: float


def simulate(job: tuple[Scenario, int, argparse.Namespace]) -> Result:
    """Run one scenario's replications with its own seeded generator."""
    scenario, index, args = job
    rng = np.random.default_rng([args.seed, index])
    cells = scenario.cells()
    assert cells is not None
    base_of, cand_of = np.array([1.0, 1.0, 0.0, 0.0]), np.array([1.0, 0.0, 1.0, 0.0])
    covered = strict = ni = ni_wald = seq_pass = seq_fail = 0
    items_used = 0
    for rep in range(args.reps):
        kinds = rng.choice(4, size=scenario.n, p=cells)
        base, cand = base_of[kinds].tolist(), cand_of[kinds].tolist()
        ci = paired_bootstrap_retention(base, cand, resamples=args.resamples, seed=rep)
        if ci.lo is not None and ci.hi is not None:
            covered += ci.lo <= scenario.retention <= ci.hi
            strict += ci.lo >= args.threshold
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
    return Result(scenario, covered / reps, strict / reps, ni / reps, ni_wald / reps, seq_pass / reps,
                  seq_fail / reps, items_used / reps)


def percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=2000, help="replications per scenario (default 2000)")
    parser.add_argument("--resamples", type=int, default=500, help="bootstrap resamples per interval (default 500)")
    parser.add_argument("--threshold", type=float, default=0.95, help="gate threshold on retention (default 0.95)")
    parser.add_argument("--alpha", type=float, default=0.05, help="level of the one-sided tests (default 0.05)")
    parser.add_argument("--shard", type=int, default=32, help="items between sequential looks (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="master seed (default 0)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--n", type=int, nargs="+", default=[100, 1000], help="items per benchmark")
    parser.add_argument("--accuracy", type=float, nargs="+", default=[0.45, 0.7], help="baseline accuracies")
    parser.add_argument("--agreement", type=float, nargs="+", default=[0.85, 0.95], help="agreement rates")
    parser.add_argument("--retention", type=float, nargs="+", default=[1.0, 0.95, 0.93, 0.85],
                        help="true retentions (default: well above, at, just below, well below 0.95)")
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

    mc_se = math.sqrt(0.95 * 0.05 / args.reps)
    print(f"Paired 0/1 items, threshold {args.threshold}, alpha {args.alpha} (one-sided tests), "
          f"{args.reps} replications per row, {args.resamples} bootstrap resamples per interval, "
          f"sequential looks every {args.shard} items, seed {args.seed}. "
          f"Monte Carlo SE of a 5% or 95% rate: {100 * mc_se:.2f} points.\n")
    print("| n | base acc | agreement | true retention | coverage (95% CI) | strict pass | NI reject (score) "
          "| NI reject (Wald) | seq pass | seq fail | seq mean items |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        s = r.scenario
        where = "at" if math.isclose(s.retention, args.threshold) else ("above" if s.retention > args.threshold
                                                                        else "below")
        print(f"| {s.n} | {s.accuracy:.2f} | {s.agreement:.2f} | {s.retention:.2f} ({where}) | {percent(r.coverage)} "
              f"| {percent(r.strict_pass)} | {percent(r.ni_reject)} | {percent(r.ni_wald_reject)} "
              f"| {percent(r.seq_pass)} | {percent(r.seq_fail)} "
              f"| {r.seq_items:.0f} |")
    if skipped:
        print("\nSkipped (the agreement rate leaves too few disagreements for that drop): "
              + "; ".join(f"n={s.n} acc={s.accuracy} agree={s.agreement} r={s.retention}" for s in skipped))
    print(f"\n{len(results)} scenarios in {elapsed:.0f} s.")


if __name__ == "__main__":
    main()

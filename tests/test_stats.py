"""Properties of the controller's tally: arrival order (as xdist delivers) never changes a figure."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_llmgate.outcome import Tally


def outcome(doc_id: int, base: float, cand: float) -> dict:
    side = lambda score: {"scores": {"acc": score, "acc_norm": score}}  # noqa: E731
    return {"task": "hellaswag", "doc_id": doc_id, "id": f"validation-{doc_id}", "metric": "acc_norm",
            "chance": 0.25, "sides": {"baseline": side(base), "s": side(cand)}}


outcomes = st.lists(st.tuples(st.sampled_from([0.0, 1.0]), st.sampled_from([0.0, 1.0])), min_size=1, max_size=60)


# No deadline: the first example pays for importing scipy (the intervals), which is lazy on purpose.
@settings(deadline=None)
@given(outcomes, st.randoms(use_true_random=False))
def test_any_arrival_order_gives_identical_statistics(pairs, rng):
    items = [outcome(i, b, c) for i, (b, c) in enumerate(pairs)]
    shuffled = items[:]
    rng.shuffle(shuffled)
    ordered, scrambled = Tally(), Tally()
    for item in items:
        ordered.add(item)
    for item in shuffled:
        scrambled.add(item)
    assert ordered.task_stats() == scrambled.task_stats()
    assert ordered.ordered() == scrambled.ordered()


@settings(deadline=None)
@given(outcomes)
def test_wins_losses_ties_partition_the_items_and_swapping_models_swaps_them(pairs):
    forward, backward = Tally(), Tally()
    for i, (b, c) in enumerate(pairs):
        forward.add(outcome(i, b, c))
        backward.add(outcome(i, c, b))
    f, r = forward.task_stats()["hellaswag"], backward.task_stats()["hellaswag"]
    wins, losses, ties = f.wlt["s"]
    assert wins + losses + ties == f.n == len(pairs)
    assert r.wlt["s"] == (losses, wins, ties)
    assert f.scores["s"] - f.scores["baseline"] == pytest.approx((wins - losses) / f.n)
    if f.scores["baseline"] > 0 and f.scores["s"] > 0:
        assert f.retention("s") * r.retention("s") == pytest.approx(1.0)


def test_perfect_agreement_is_retention_one_with_no_wins_or_losses():
    tally = Tally()
    for i in range(10):
        tally.add(outcome(i, float(i % 2), float(i % 2)))
    stats = tally.task_stats()["hellaswag"]
    assert stats.retention("s") == 1.0 and stats.wlt["s"] == (0, 0, 10)


def test_a_repeated_report_replaces_the_earlier_one():
    tally = Tally()
    tally.add(outcome(0, 1.0, 0.0))
    tally.add(outcome(0, 1.0, 1.0))  # e.g. an item re-run after a worker crash
    assert tally.task_stats()["hellaswag"].n == 1 and tally.task_stats()["hellaswag"].scores["s"] == 1.0

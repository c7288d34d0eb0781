"""The real default model on real rows: lm-eval 0.4.13's numbers, and independence from batching.

Pinned values were produced by lm-evaluation-harness 0.4.13 (hf model, float32, CPU, batch 16) on
SmolLM2-135M-Instruct saved from the same GGUF file; see benchmarks/fidelity/compare_lm_eval.py,
which reproduces them and compares every item (100/100 identical predictions on both tasks).
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from pytest_llmgate.config import ModelSpec
from pytest_llmgate.models import load_backend, model_fingerprint
from pytest_llmgate.tasks import TASKS

LM_EVAL = {
    ("arc_challenge", 0): (2, [-29.65350341796875, -38.70452117919922, -36.15866470336914, -31.501977920532227]),
    ("arc_challenge", 1): (1, [-29.248193740844727, -32.01721954345703, -32.66950225830078, -29.56386947631836]),
    ("hellaswag", 0): (3, [-39.92959213256836, -31.42554473876953, -22.90747833251953, -31.269718170166016]),
    ("hellaswag", 1): (3, [-28.67681312561035, -14.960887908935547, -20.07707405090332, -25.69258689880371]),
}
ACC_NORM = {("arc_challenge", 0): 0.0, ("arc_challenge", 1): 0.0, ("hellaswag", 0): 1.0, ("hellaswag", 1): 0.0}


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory, dequantized_dir):
    spec = ModelSpec(name="smollm2")
    backend = load_backend(spec, device="cpu", work_dir=tmp_path_factory.mktemp("work"),
                           fingerprint=model_fingerprint(spec), dequantized_dir=dequantized_dir)
    yield backend
    backend.close()


def test_tokenization_matches_lm_eval(smollm2):
    context, continuation = smollm2.encode_pair(
        "Question: An astronomer observes that a planet rotates faster after a meteorite impact. "
        "Which is the most likely effect of this increase in rotation?\nAnswer:",
        " Planetary density will decrease.")
    assert len(context) == 30 and context[:5] == [17872, 42, 1117, 25498, 28975]
    assert context[-5:] == [10792, 47, 198, 21350, 42]
    assert continuation == [34666, 6759, 523, 6302, 30]
    # A trailing space on the context moves to the continuation, as in lm-eval's _encode_pair.
    assert smollm2.encode_pair("Answer: ", "yes") == smollm2.encode_pair("Answer:", " yes")


@pytest.mark.parametrize("task", ["arc_challenge", "hellaswag"])
def test_loglikelihoods_match_lm_eval_item_by_item(smollm2, shared_datasets, task):
    items, _ = TASKS[task].load(shared_datasets, limit=2)
    for item in items:
        gold, expected = LM_EVAL[(task, item.doc_id)]
        side = TASKS[task].score(item, smollm2.loglikelihood(item.requests))
        assert item.gold == gold
        assert side["loglikelihoods"] == pytest.approx(expected, abs=1e-4)
        assert side["scores"]["acc"] == 0.0 and side["scores"]["acc_norm"] == ACC_NORM[(task, item.doc_id)]


def test_results_do_not_depend_on_batch_size_or_order(smollm2, shared_datasets):
    items, _ = TASKS["hellaswag"].load(shared_datasets, limit=6)
    requests = [r for item in items for r in item.requests]
    reference = smollm2.loglikelihood(requests)
    original = smollm2.spec
    try:
        for batch_size in (1, 5):
            smollm2.spec = replace(original, batch_size=batch_size)
            order = list(range(len(requests)))
            random.Random(batch_size).shuffle(order)
            shuffled = smollm2.loglikelihood([requests[i] for i in order])
            again = [None] * len(requests)
            for position, index in enumerate(order):
                again[index] = shuffled[position]
            assert [g for _, g in again] == [g for _, g in reference]
            assert [ll for ll, _ in again] == pytest.approx([ll for ll, _ in reference], abs=1e-4)
    finally:
        smollm2.spec = original
    for item, start in zip(items, range(0, len(requests), 4), strict=True):
        alone = TASKS["hellaswag"].score(item, smollm2.loglikelihood(item.requests))
        together = TASKS["hellaswag"].score(item, reference[start:start + 4])
        assert alone["prediction"] == together["prediction"]
        assert alone["prediction_norm"] == together["prediction_norm"]


def test_builtin_fingerprint_is_stable_and_names_the_file():
    spec = ModelSpec(name="smollm2")
    assert model_fingerprint(spec) == model_fingerprint(spec)
    assert model_fingerprint(spec) != model_fingerprint(replace(spec, dtype="bfloat16"))
    rtn = replace(spec, transform={"method": "rtn", "bits": 4})
    assert model_fingerprint(rtn) != model_fingerprint(replace(rtn, transform={"method": "rtn", "bits": 8}))

"""Task loading and prompt building on real rows of ../shared/datasets, and lm-eval's scoring rules."""

from __future__ import annotations

import math

import pytest

from conftest import read_jsonl, write_jsonl
from pytest_llmgate.tasks import TASKS, DatasetError, TaskItem
from pytest_llmgate.tasks.data import DatasetRef, content_hash, load_split
from pytest_llmgate.tasks.hellaswag import preprocess


def test_arc_prompt_is_lm_evals_exact_string(shared_datasets):
    items, version = TASKS["arc_challenge"].load(shared_datasets, limit=2)
    first = items[0]
    assert first.requests[0].context == (
        "Question: An astronomer observes that a planet rotates faster after a meteorite impact. "
        "Which is the most likely effect of this increase in rotation?\nAnswer:")
    assert first.requests[0].continuation == " Planetary density will decrease."
    assert (first.gold, items[1].gold) == (2, 1)
    assert first.item_id == "test-0" and version.startswith("arc_challenge/v1/")


def test_arc_numeric_labels_map_to_the_right_index(shared_datasets):
    rows = read_jsonl(shared_datasets / "arc_challenge" / "test.jsonl")
    doc_id, row = next((i, r) for i, r in enumerate(rows) if r["choices"]["label"][0] == "1")
    item = TASKS["arc_challenge"].item(doc_id, row)
    assert item.error is None and item.gold == int(row["answerKey"]) - 1


def test_hellaswag_query_and_endings_are_preprocessed_like_lm_eval(shared_datasets):
    items, _ = TASKS["hellaswag"].load(shared_datasets, limit=2)
    assert items[0].requests[0].context == "Roof shingle removal: A man is sitting on a roof. He"
    assert [r.continuation for r in items[0].requests] == [
        " is using wrap to wrap a pair of skis.", " is ripping level tiles off.",
        " is holding a rubik's cube.", " starts pulling up roofing on a roof."]
    # str.capitalize lower-cases the rest of ctx_b, exactly as lm-eval's process_docs does.
    assert items[1].requests[0].context == (
        "Clean and jerk: A lady walks to a barbell. She bends down and grabs the pole. The lady")
    assert (items[0].gold, items[1].gold) == (3, 3)


def test_hellaswag_preprocess_strips_wikihow_artifacts():
    assert preprocess(" How to x [title] Step one [step] done  now ") == "How to x. Step one done now"


def test_scoring_argmax_acc_norm_by_characters_and_ties_to_the_first():
    item = TaskItem("arc_challenge", 0, "test", (), gold=1, choices=("ab", "abcdefgh", "x"))
    scored = TASKS["arc_challenge"].score(item, [[-4.0, False], [-6.0, False], [-4.0, True]])
    assert scored["prediction"] == 0  # tie between choices 0 and 2: numpy's argmax takes the first
    assert scored["prediction_norm"] == 1  # -6/8 beats -4/2 and -4/1
    assert scored["scores"] == {"acc": 0.0, "acc_norm": 1.0}
    with pytest.raises(ValueError, match="returned 2 log-likelihoods for 3 choices"):
        TASKS["arc_challenge"].score(item, [[-1.0, False], [-2.0, False]])


def test_a_bad_row_becomes_an_item_carrying_the_error():
    item = TASKS["hellaswag"].item(7, {"ctx_a": "x", "ctx_b": "y", "activity_label": "a",
                                       "endings": ["e1", "e2"], "label": "3"})
    assert item.error is not None and "bad data row 7" in item.error and "gold index 3" in item.error
    missing = TASKS["arc_challenge"].item(3, {"question": "q"})
    assert missing.error is not None and "KeyError" in missing.error


def test_limit_takes_the_first_rows_and_content_hash_tracks_the_data(tmp_path, shared_datasets):
    items, _ = TASKS["hellaswag"].load(shared_datasets, limit=5)
    assert [i.doc_id for i in items] == [0, 1, 2, 3, 4]
    rows = read_jsonl(shared_datasets / "arc_challenge" / "test.jsonl", 10)
    write_jsonl(tmp_path / "a" / "arc_challenge" / "test.jsonl", rows)
    rows[3]["question"] += "?"
    write_jsonl(tmp_path / "b" / "arc_challenge" / "test.jsonl", rows)
    _, version_a = TASKS["arc_challenge"].load(tmp_path / "a")
    _, version_b = TASKS["arc_challenge"].load(tmp_path / "b")
    assert version_a != version_b  # changed data misses the cache


def test_parquet_folders_load_like_jsonl(tmp_path, shared_datasets):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = read_jsonl(shared_datasets / "arc_challenge" / "test.jsonl", 6)
    (tmp_path / "arc_challenge").mkdir()
    pq.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "arc_challenge" / "test-00000-of-00001.parquet")
    loaded = load_split(DatasetRef("allenai/ai2_arc", "ARC-Challenge", "test", "arc_challenge"), tmp_path)
    assert list(loaded.rows) == rows and loaded.content_hash == content_hash(rows)


def test_hub_loading_code_runs_through_datasets_on_local_files(tmp_path, shared_datasets, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.delenv("LLMGATE_DATA_DIR", raising=False)
    rows = read_jsonl(shared_datasets / "arc_challenge" / "test.jsonl", 8)
    write_jsonl(tmp_path / "repo" / "test.jsonl", rows)
    # The hub path (datasets.load_dataset) on a local repository folder instead of a hub id.
    loaded = load_split(DatasetRef(str(tmp_path / "repo"), None, "test", "arc_challenge"), None)
    assert list(loaded.rows) == rows and loaded.origin.startswith("hub:")
    assert loaded.content_hash == content_hash(rows)  # same data, same version, whatever the source


def test_missing_and_broken_data_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("LLMGATE_DATA_DIR", raising=False)
    ref = DatasetRef("allenai/ai2_arc", "ARC-Challenge", "test", "arc_challenge")
    with pytest.raises(DatasetError, match=r"data dir .*nowhere does not exist"):
        load_split(ref, tmp_path / "nowhere")
    with pytest.raises(DatasetError, match=r"expected .*arc_challenge/test.jsonl \(or .parquet\)"):
        load_split(ref, tmp_path)
    (tmp_path / "arc_challenge").mkdir()
    (tmp_path / "arc_challenge" / "test.jsonl").write_text('{"question": "q"}\n{broken\n')
    with pytest.raises(DatasetError, match=r"test.jsonl:2: not valid JSON"):
        load_split(ref, tmp_path)
    hub = DatasetRef(str(tmp_path / "no-such-repo"), None, "test", "x")
    with pytest.raises(DatasetError, match="Offline\\? Pass --llmgate-data-dir"):
        load_split(hub, None)


def test_winogrande_fills_the_blank_and_scores_the_shared_suffix(shared_datasets):
    items, _ = TASKS["winogrande"].load(shared_datasets, limit=1)
    [item] = items
    # Row 0: "Sarah was a much better surgeon than Maria so _ always got the easier cases."
    assert [(r.context, r.continuation) for r in item.requests] == [
        ("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
        ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases."),
    ]
    assert item.gold == 1 and TASKS["winogrande"].chance(item) == 0.5
    assert TASKS["winogrande"].score(item, [[-3.0, False], [-2.0, False]])["scores"] == {"acc": 1.0}


def test_truthfulqa_prompts_carry_lm_evals_six_question_primer(shared_datasets):
    mc1, _ = TASKS["truthfulqa_mc1"].load(shared_datasets, limit=1)
    context = mc1[0].requests[0].context
    assert context.startswith("Q: What is human life expectancy in the United States?\n"
                              "A: Human life expectancy in the United States is 78 years.\n\nQ: Who was")
    assert context.endswith("A: The 1992 Olympics were held in Barcelona, Spain.\n\nQ: What is the smallest "
                            "country in the world that is at least one square mile in area?\nA:")
    assert mc1[0].gold == 0 and mc1[0].requests[0].continuation.startswith(" Nauru is the smallest country")


def test_truthfulqa_mc2_is_the_normalized_probability_mass_on_true_answers():
    item = TASKS["truthfulqa_mc2"].item(0, {
        "question": "q?", "mc1_targets": {"choices": ["a"], "labels": [1]},
        "mc2_targets": {"choices": ["t1", "t2", "f1", "f2"], "labels": [1, 1, 0, 0]}})
    scored = TASKS["truthfulqa_mc2"].score(item, [[-1.0, False], [-2.0, False], [-1.5, False], [-900.0, False]])
    expected = (math.exp(-1) + math.exp(-2)) / (math.exp(-1) + math.exp(-2) + math.exp(-1.5) + math.exp(-900))
    assert scored["scores"]["acc"] == pytest.approx(expected, rel=1e-12)
    assert TASKS["truthfulqa_mc2"].chance(item) == 0.5
    # Very negative log-likelihoods do not underflow to 0/0 (lm-eval's plain exp would give NaN).
    tiny = TASKS["truthfulqa_mc2"].score(item, [[-2000.0, False], [-2001.0, False], [-2002.0, False], [-2003.0, False]])
    assert 0.0 < tiny["scores"]["acc"] < 1.0

"""Custom suites declared in the config, and tasks written in Python (the pytest_llmgate_tasks hook)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from gateproject import make_project
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import write_jsonl
from pytest_llmgate.config import parse_config
from pytest_llmgate.tasks import (
    TASKS,
    DatasetError,
    DatasetRef,
    GenerationRequest,
    GenerationTask,
    MultipleChoiceTask,
    SuiteError,
    TaskItem,
    TaskOptions,
    available_tasks,
    merge_tasks,
)
from pytest_llmgate.tasks.fewshot import replay_default
from pytest_llmgate.tasks.suites import extract_number, parse_scorer


def mc_rows(count: int) -> list[dict]:
    """Made-up multiple-choice rows; the right choice holds the word RIGHT (for the SkillBackend double)."""
    return [{"question": f"What does snippet {i} print?",
             "choices": [f"output {i}-{k} RIGHT" if k == i % 3 else f"output {i}-{k} wrong" for k in range(3)],
             "answer": i % 3, "area": "coder" if i % 2 else "tester"} for i in range(count)]


def gen_rows(count: int) -> list[dict]:
    """Made-up arithmetic rows; RIGHT=<n> tells the double's generate() the right number."""
    return [{"question": f"How many tests does module {i} need? RIGHT={2 * i}", "answer": 2 * i}
            for i in range(count)]


def suites(tmp_path: Path, rows: list[dict] | None = None, **table) -> dict:
    """The registry of a config with one suite 's' over ``rows`` (written to s.jsonl)."""
    write_jsonl(tmp_path / "s.jsonl", mc_rows(10) if rows is None else rows)
    return available_tasks({"suites": {"s": {"path": "s.jsonl", "type": "multiple_choice", **table}}}, tmp_path)


def load(task, limit=None, **options):
    return task.configured(TaskOptions(**options)).load(None, limit)


# --- declaring suites -------------------------------------------------------------------------

def test_multiple_choice_suite_builds_prompts_and_takes_the_answer_as_index_text_or_letter(tmp_path):
    rows = [{"q": "2 + 2?", "opts": ["3", "4"], "gold": 1},
            {"q": "Capital of France?", "opts": ["Paris", "Rome"], "gold": "Paris"},
            {"q": "Pick B", "opts": ["x", "y", "z"], "gold": "B"}]
    registry = suites(tmp_path, rows, template="Q: {q}\nA:", choices_field="opts", answer_field="gold",
                      target_delimiter="  ")
    assert set(TASKS) < set(registry)
    task = registry["s"]
    assert task.metrics == ("acc", "acc_norm") and task.default_metric == "acc"
    items, version = load(task)
    assert [i.gold for i in items] == [1, 0, 1] and [i.item_id for i in items] == ["eval-0", "eval-1", "eval-2"]
    assert items[0].requests[1].context == "Q: 2 + 2?\nA:" and items[0].requests[1].continuation == "  4"
    assert version.startswith("s/v1/")
    scored = task.score(items[0], [[-3.0, False], [-1.0, True]])
    assert scored["prediction"] == 1 and scored["scores"] == {"acc": 1.0, "acc_norm": 1.0}
    assert task.chance(items[2]) == pytest.approx(1 / 3)


def test_fixed_choices_and_question_field(tmp_path):
    rows = [{"prompt": "Does this test leak a file handle?", "label": "yes"}]
    task = suites(tmp_path, rows, question_field="prompt", answer_field="label", choices=["no", "yes"])["s"]
    (item,), _ = load(task)
    assert item.choices == ("no", "yes") and item.gold == 1
    assert item.requests[0].context == "Does this test leak a file handle?"


def test_generation_suite_items_carry_stop_strings_token_budget_and_reference(tmp_path):
    write_jsonl(tmp_path / "g.jsonl", gen_rows(3))
    task = available_tasks({"suites": {"g": {
        "path": "g.jsonl", "type": "generation", "until": ["\n\n", "Question:"], "max_gen_toks": 32,
        "scorer": "numeric", "description": "Answer with a number.\n\n"}}}, tmp_path)["g"]
    assert task.metrics == ("exact_match",) and task.chance(TaskItem("g", 0, "eval", (), -1, ())) == 0.0
    items, _ = load(task)
    (request,) = items[1].requests
    assert isinstance(request, GenerationRequest) and items[1].generative
    assert request.until == ("\n\n", "Question:") and request.max_gen_toks == 32 and request.temperature == 0
    assert request.context == "Answer with a number.\n\nHow many tests does module 1 need? RIGHT=2"
    assert items[1].extra["reference"] == 2
    scored = task.score(items[1], [[" It needs 2 tests.\n#### 2"]])
    assert scored == {"completion": " It needs 2 tests.\n#### 2", "extracted": 2.0, "scores": {"exact_match": 1.0}}
    assert task.score(items[1], [["3"]])["scores"]["exact_match"] == 0.0


def _error(tmp_path, table, suite_name="s", rows=None) -> str:
    write_jsonl(tmp_path / "s.jsonl", mc_rows(5) if rows is None else rows)
    with pytest.raises(SuiteError) as info:
        available_tasks({"suites": {suite_name: table}}, tmp_path)
    return str(info.value)


MC = {"path": "s.jsonl", "type": "multiple_choice"}
GEN = {"path": "s.jsonl", "type": "generation"}


@pytest.mark.parametrize(("table", "expected"), [
    ({"type": "multiple_choice"}, "[tool.llmgate.suites.s].path: every suite needs path = *"),
    ({**MC, "path": "nope.jsonl"}, "[tool.llmgate.suites.s].path: */nope.jsonl does not exist; point path at*"),
    ({**MC, "anwser_field": "a"}, "[tool.llmgate.suites.s].anwser_field: unknown key; did you mean 'answer_field'?"),
    ({"path": "s.jsonl", "type": "mc"}, "[tool.llmgate.suites.s].type: 'mc': use 'multiple_choice'*or 'generation'*"),
    ({**MC, "scorer": "exact_match"}, "*.scorer: applies to type = 'generation' suites only*"),
    ({**GEN, "choices": ["a", "b"]}, "*.choices: applies to type = 'multiple_choice' suites only*"),
    ({**GEN, "scorer": "exact_mach"}, "*.scorer.type: unknown scorer 'exact_mach'; did you mean 'exact_match'?*"),
    ({**GEN, "scorer": {"type": "regex"}}, "*.scorer.pattern: a regex scorer needs pattern = *"),
    ({**GEN, "scorer": {"type": "regex", "pattern": "(a"}}, "*.scorer.pattern: not a valid regular expression*"),
    ({**GEN, "scorer": {"type": "regex", "pattern": "(a)", "group": 2}}, "*.scorer.group: the pattern has 1 group*"),
    ({**GEN, "scorer": {"type": "regex", "pattern": "a", "match": "all"}}, "*.scorer.match: 'all': use 'first'*"),
    ({**GEN, "scorer": {"type": "numeric", "tolerence": 1}}, "*.scorer.tolerence: unknown key; did you mean 'toler*"),
    ({**GEN, "scorer": "python:no_such_module_xyz:score"},
     "*.scorer.function: cannot import 'no_such_module_xyz': No module named 'no_such_module_xyz'*"),
    ({**GEN, "scorer": "python:json:no_such_function"}, "*.scorer.function: module 'json' has no attribute*"),
    ({**GEN, "scorer": "python:json"}, "*.scorer.function: 'json': name the function as 'python:module.path:func*"),
    ({**MC, "split": {"eval": 1.5}}, "*.split.eval: expected the held-out fraction strictly between 0 and 1*"),
    ({**MC, "split": {"eval": 0}}, "*.split.eval: expected the held-out fraction*got 0"),
    ({**MC, "split": {"evl": 0.2}}, "*.split.evl: unknown key; did you mean 'eval'?"),
    ({**MC, "split": {"field": "part"}}, "*.split: a split by field needs field = * and eval = *"),
    ({**MC, "num_fewshot": 2}, "*.num_fewshot: few-shot examples come from the suite's train part: declare split*"),
    ({**MC, "num_fewshot": -1}, "*.num_fewshot: expected a whole number >= 0, got -1"),
    ({**MC, "choices": ["a"]}, "*.choices: expected a list of at least two strings*"),
    ({**MC, "choices": ["a", "b"], "choices_field": "c"}, "*: set choices * or choices_field, not both"),
    ({**MC, "template": "Q: {question"}, "*.template: *; write row fields as {field}*"),
    ({**MC, "template": "Q: {}"}, "*.template: a placeholder must name a row field, e.g. {question}*"),
    ({**GEN, "until": [""]}, "*.until: expected a list of stop strings*"),
    ("not a table", "[tool.llmgate.suites.s]: expected a table, got 'not a table'"),
])
def test_every_mistake_names_the_key_and_the_fix(tmp_path, table, expected):
    from fnmatch import fnmatch

    message = _error(tmp_path, table)
    assert fnmatch(message, expected.replace("[", "[[]")), message


def test_names_must_be_markers_and_not_clash_with_built_in_tasks(tmp_path):
    assert "'mmlu' is a built-in task; give the suite another name" in _error(tmp_path, MC, "mmlu")
    assert "cannot name a task (it is also a pytest marker)" in _error(tmp_path, MC, "my-suite")
    with pytest.raises(SuiteError, match=r"\[tool.llmgate.suites\]: expected tables"):
        available_tasks({"suites": ["s"]}, tmp_path)


def test_bad_json_line_is_a_dataset_error_naming_the_line(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", mc_rows(3))
    path.write_text(path.read_text() + "\n{not json}\n")
    task = available_tasks({"suites": {"s": MC}}, tmp_path)["s"]  # the file is read when the task loads
    with pytest.raises(DatasetError, match=r"s.jsonl:5: not valid JSON .*; fix or remove the line"):
        load(task)
    path.write_text('["a list"]\n')
    with pytest.raises(DatasetError, match=r"s.jsonl:1: expected a JSON object per line, got list"):
        load(task)
    path.write_text("\n")
    with pytest.raises(DatasetError, match="no rows; write one JSON object per line"):
        load(task)


def test_a_row_missing_a_field_errors_that_item_and_the_rest_build(tmp_path):
    rows = mc_rows(4)
    rows[1]["anwser"] = rows[1].pop("answer")
    rows[2]["answer"] = 7
    rows[3]["answer"] = "nonsense"
    items, _ = load(suites(tmp_path, rows, group_field="area")["s"])
    assert items[0].error is None
    assert items[1].error.startswith("bad data row 0 of suite s: s.jsonl:2: no field 'answer'")
    assert "did you mean 'anwser'? fix the row or set answer_field in [tool.llmgate.suites.s]" in items[1].error
    assert "s.jsonl:3: answer index 7 is outside the 3 choices" in items[2].error
    assert "answer 'nonsense' is neither an index" in items[3].error
    rows = mc_rows(2)
    del rows[0]["area"]
    items, _ = load(suites(tmp_path, rows, group_field="area")["s"])
    assert "s.jsonl:1: no field 'area'" in items[0].error and "set group_field" in items[0].error
    assert items[1].error is None
    rows = mc_rows(2)
    rows[1]["topic"] = "only in one row"
    items, _ = load(suites(tmp_path, rows, template="{question} ({topic})")["s"])
    assert "s.jsonl:1: no field 'topic'" in items[0].error and "set template" in items[0].error
    assert items[1].requests[0].context == "What does snippet 1 print? (only in one row)"


@pytest.mark.parametrize(("table", "message"), [
    ({"question_field": "questoin"}, "[tool.llmgate.suites.s].question_field: no row of s.jsonl has a field "
                                     "'questoin' (the rows have question, choices, answer, area); did you mean "
                                     "'question'? fix question_field"),
    ({"template": "{question} {lang}"}, "[tool.llmgate.suites.s].template: no row of s.jsonl has a field 'lang'"),
    ({"choices_field": "options"}, "[tool.llmgate.suites.s].choices_field: no row of s.jsonl has a field 'options'"),
    ({"group_field": "category"}, "[tool.llmgate.suites.s].group_field: no row of s.jsonl has a field 'category'"),
])
def test_a_field_no_row_has_is_one_error_naming_the_key(tmp_path, table, message):
    with pytest.raises(DatasetError, match=re.escape(message)):
        load(suites(tmp_path, **table)["s"])


# --- scorers ----------------------------------------------------------------------------------

def score(spec, completion, reference, row=None, base=Path(".")):
    return parse_scorer(spec, base, "scorer")(completion, reference, row or {})


def test_exact_match_scorer_normalizations_and_lists_of_answers():
    assert score("exact_match", "  Paris\n", "Paris") == (1.0, "  Paris\n")
    assert score("exact_match", "paris", "Paris")[0] == 0.0
    assert score({"type": "exact_match", "ignore_case": True}, "paris", "Paris")[0] == 1.0
    assert score({"type": "exact_match", "strip": False}, " Paris", "Paris")[0] == 0.0
    assert score({"type": "exact_match", "ignore_punctuation": True}, "Paris!", "Paris")[0] == 1.0
    assert score("exact_match", "Lyon", ["Paris", "Lyon"])[0] == 1.0
    assert score("exact_match", "42", 42)[0] == 1.0


def test_regex_scorer_extracts_the_first_or_last_match_and_compares_it():
    spec = {"type": "regex", "pattern": r"#### (-?\d+)"}
    assert score(spec, "so 3 + 4 = 7\n#### 7", "7") == (1.0, "7")
    assert score(spec, "no answer marker", "7") == (0.0, None)
    both = "#### 1 then #### 2"
    assert score(spec, both, "2")[0] == 0.0
    assert score({**spec, "match": "last"}, both, "2") == (1.0, "2")
    assert score({"type": "regex", "pattern": "answer: (yes|no)", "ignore_case": True}, "ANSWER: Yes", "yes")[0] == 1
    assert score({"type": "regex", "pattern": r"\d+"}, "it is 12 or so", "12") == (1.0, "12")  # group 0


def test_numeric_scorer_takes_the_last_number_with_commas_dollars_and_tolerance():
    assert score("numeric", "That costs $1,234.50 in total.", 1234.5) == (1.0, 1234.5)
    assert score("numeric", "first 3, then -17", "-17")[0] == 1.0
    assert score("numeric", "The answer is 72.", "Natalia sold 48 + 24 = 72 clips.\n#### 72")[0] == 1.0
    assert score("numeric", "about 3.1416", 3.14159)[0] == 0.0
    assert score({"type": "numeric", "tolerance": 0.001}, "about 3.1416", 3.14159)[0] == 1.0
    assert score({"type": "numeric", "rel_tolerance": 0.01}, "1005", 1000)[0] == 1.0
    assert score("numeric", "no number here", 3) == (0.0, None)
    assert score("numeric", "7", ["6", "7"])[0] == 1.0


@pytest.mark.parametrize(("text", "number"), [
    ("1,234,567", 1234567.0), ("-$5.25", -5.25), ("$.5", 0.5), ("3 apples and 4 pears.", 4.0),
    ("1e3", 1000.0), ("x2y", 2.0), ("none", None), ("1,23", 23.0),
])
def test_extract_number(text, number):
    assert extract_number(text) == number


def test_python_scorer_gets_the_completion_and_the_row(tmp_path, monkeypatch):
    (tmp_path / "my_scorers_for_suites.py").write_text(
        "def contains(completion, row):\n    return row['keyword'] in completion\n"
        "def half(completion, row):\n    return 0.5\n"
        "def broken(completion, row):\n    return 'yes'\n")
    monkeypatch.setattr(sys, "path", list(sys.path))  # the config's folder is added for the import only
    for name in ("my_scorers_for_suites", "raising_scorer_module"):
        monkeypatch.setitem(sys.modules, name, None)
        monkeypatch.delitem(sys.modules, name)  # absent now, and again after the test
    assert score("python:my_scorers_for_suites:contains", "a flaky test", None, {"keyword": "flaky"},
                 tmp_path) == (1.0, None)
    assert str(tmp_path) not in sys.path  # the session leaves sys.path as it found it
    assert score("python:my_scorers_for_suites:half", "x", None, {}, tmp_path)[0] == 0.5
    spec = parse_scorer({"type": "python", "function": "my_scorers_for_suites:contains", "metric": "mentions"},
                        tmp_path, "s")
    assert spec.metric == "mentions"
    with pytest.raises(ValueError, match=r"returned 'yes'; return a bool or a number in \[0, 1\]"):
        score("python:my_scorers_for_suites:broken", "x", None, {}, tmp_path)
    (tmp_path / "raising_scorer_module.py").write_text("raise RuntimeError('boom at import')\n")
    with pytest.raises(SuiteError, match="importing 'raising_scorer_module' failed: RuntimeError: boom at import"):
        parse_scorer("python:raising_scorer_module:f", tmp_path, "s")


# --- split and few-shot -----------------------------------------------------------------------

def _split(tmp_path, rows, **split):
    write_jsonl(tmp_path / "s.jsonl", rows)
    task = available_tasks({"suites": {"s": {**MC, "split": split}}}, tmp_path)["s"]
    data = task.data()
    return data.eval_rows, data.train_rows


def test_fraction_split_is_exact_deterministic_and_independent_of_row_order(tmp_path):
    rows = mc_rows(100)
    held, train = _split(tmp_path, rows, eval=0.2, seed=1234)
    assert (len(held), len(train)) == (20, 80)
    assert sorted(r["question"] for r in held + train) == sorted(r["question"] for r in rows)
    again, _ = _split(tmp_path, rows, eval=0.2, seed=1234)
    assert again == held
    other, _ = _split(tmp_path, rows, eval=0.2, seed=99)
    assert other != held and len(other) == 20
    shuffled, _ = _split(tmp_path, rows[::-1], eval=0.2, seed=1234)
    assert sorted(r["question"] for r in shuffled) == sorted(r["question"] for r in held)
    # Both parts keep the file's order.
    assert [rows.index(r) for r in held] == sorted(rows.index(r) for r in held)
    # Appending a row moves at most one row into or out of the held-out part.
    grown, _ = _split(tmp_path, [*rows, *mc_rows(101)[100:]], eval=0.2, seed=1234)
    assert len(grown) == 20 and len({r["question"] for r in grown} ^ {r["question"] for r in held}) <= 2


@settings(max_examples=30, deadline=None)
@given(count=st.integers(1, 60), fraction=st.floats(0.01, 0.99))
def test_fraction_split_sizes(tmp_path_factory, count, fraction):
    held, train = _split(tmp_path_factory.mktemp("split"), mc_rows(count), eval=fraction)
    assert len(held) == max(1, int(count * fraction + 0.5)) and len(held) + len(train) == count


def test_split_by_a_row_field(tmp_path):
    rows = [{**row, "part": ["train", "test", "dev"][i % 3]} for i, row in enumerate(mc_rows(9))]
    held, train = _split(tmp_path, rows, field="part", eval="test", train="train")
    assert [r["part"] for r in held] == ["test"] * 3 and [r["part"] for r in train] == ["train"] * 3
    held, train = _split(tmp_path, rows, field="part", eval="test")
    assert len(train) == 6  # without train = ..., every row that is not evaluated
    write_jsonl(tmp_path / "s.jsonl", rows)
    task = available_tasks({"suites": {"s": {**MC, "split": {"field": "part", "eval": "tst"}}}}, tmp_path)["s"]
    expected = "no row has part = 'tst' (split.eval); values found: dev, test, train"
    with pytest.raises(DatasetError, match=re.escape(expected)):
        load(task)
    (items, _) = load(available_tasks({"suites": {"s": {**MC, "split": {"field": "part", "eval": "test"}}}},
                                      tmp_path)["s"])
    assert [i.item_id for i in items] == ["test-0", "test-1", "test-2"]


def test_fewshot_examples_come_only_from_the_train_part_with_the_seeded_sampler(tmp_path):
    write_jsonl(tmp_path / "s.jsonl", mc_rows(30))
    task = available_tasks({"suites": {"s": {**MC, "split": {"eval": 0.2, "seed": 3}, "num_fewshot": 3,
                                             "template": "Q: {question}\nA:"}}}, tmp_path)["s"]
    data = task.data()
    held = {r["question"] for r in data.eval_rows}
    train = [r["question"] for r in data.train_rows]
    items, version = load(task)
    assert len(items) == 6 and "/3shot-" in version
    drawn = replay_default(data.train_rows, data.eval_rows, 3, seed=1234, exclude_eval_doc=False)
    for item, picks in zip(items, drawn, strict=True):
        context = item.requests[0].context
        shots = [part.split("\nA:")[0].removeprefix("Q: ") for part in context.split("\n\n")[:-1]]
        assert len(shots) == 3 and all(s in train and s not in held for s in shots)
        assert shots == [train[j] for j in picks]
    # The seed of [tool.llmgate.task.<suite>] fewshot_seed changes the draw; the suite's num_fewshot is a default.
    reseeded, other_version = load(task, fewshot_seed=7)
    assert [i.requests[0].context for i in reseeded] != [i.requests[0].context for i in items]
    assert other_version != version
    zero, _ = load(task, num_fewshot=0)
    assert zero[0].requests[0].context.count("Q: ") == 1
    write_jsonl(tmp_path / "s.jsonl", mc_rows(4))
    tiny = available_tasks({"suites": {"s": {**MC, "split": {"eval": 0.5}, "num_fewshot": 5}}}, tmp_path)["s"]
    with pytest.raises(ValueError, match="5 few-shot examples requested but the few-shot split holds only 2"):
        load(tiny)


def test_configuring_reads_no_file_and_fewshot_needs_a_split(tmp_path):
    task = suites(tmp_path)["s"]
    with pytest.raises(ValueError, match="suite s has no train part to draw few-shot examples from; declare split"):
        task.configured(TaskOptions(num_fewshot=2))
    split = suites(tmp_path, split={"eval": 0.5}, num_fewshot=1)["s"]
    (tmp_path / "s.jsonl").unlink()
    configured = split.configured(TaskOptions(num_fewshot=2, fewshot_seed=5))
    assert configured.num_fewshot == 2 and configured.options.fewshot_seed == 5
    with pytest.raises(DatasetError, match=r"suite s: .*s.jsonl does not exist any more; fix path in"):
        configured.load(None)


def test_the_file_content_and_the_split_enter_the_task_version(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", mc_rows(10))
    task = available_tasks({"suites": {"s": MC}}, tmp_path)["s"]
    _, first = load(task)
    _, same = load(task)
    rows = mc_rows(10)
    rows[9]["question"] = "changed"
    write_jsonl(path, rows)
    _, edited = load(task)
    assert first == same and edited != first
    split = available_tasks({"suites": {"s": {**MC, "split": {"eval": 0.5}}}}, tmp_path)["s"]
    _, with_split = load(split)
    assert with_split.split("/")[2] != edited.split("/")[2]


def test_group_field_gives_ids_per_group_and_a_stratified_limit(tmp_path):
    rows = [{**row, "area": "coder" if i < 6 else "tester"} for i, row in enumerate(mc_rows(9))]
    task = suites(tmp_path, rows, group_field="area")["s"]
    items, _ = load(task)
    assert [i.item_id for i in items] == [f"coder-{k}" for k in range(6)] + [f"tester-{k}" for k in range(3)]
    limited, _ = load(task, limit=3)
    assert [i.item_id for i in limited] == ["coder-0", "coder-1", "tester-0"]


def test_config_groups_stage_thresholds_and_metrics_accept_suites(tmp_path):
    write_jsonl(tmp_path / "s.jsonl", mc_rows(4))
    write_jsonl(tmp_path / "g.jsonl", gen_rows(4))
    raw = {
        "models": {"ref": {}, "q": {}}, "baseline": "ref", "tasks": ["code_quiz", "test_count", "hellaswag"],
        "suites": {"code_quiz": {"path": "s.jsonl", "type": "multiple_choice"},
                   "test_count": {"path": "g.jsonl", "type": "generation", "scorer": "numeric"}},
        "groups": {"coder": ["code_quiz"], "tester": ["test_count"]},
        "task": {"code_quiz": {"metric": "acc_norm", "limit": 2}},
        "stages": [{"name": "int4", "model": "q", "min_retention": 0.9, "groups": {"coder": {"min_retention": 0.8}},
                    "tasks": {"test_count": {"min_score": 0.5}}}],
        "critical": [{"rule": "combined_drop", "tasks": ["code_quiz", "test_count"], "max_drop": 0.2}],
    }
    config = parse_config(raw, source=None, known_tasks=available_tasks(raw, tmp_path), rootpath=tmp_path)
    assert config.groups_of("code_quiz") == ("coder",) and config.metric_of("code_quiz", "acc") == "acc_norm"
    stage = config.stages[0]
    assert stage.thresholds_for("code_quiz", config.groups_of("code_quiz")).min_retention == 0.8
    assert stage.thresholds_for("test_count", config.groups_of("test_count")).min_score == 0.5
    bad = {**raw, "task": {"test_count": {"metric": "acc"}}}
    with pytest.raises(pytest.UsageError, match="'acc': task test_count reports exact_match"):
        parse_config(bad, source=None, known_tasks=available_tasks(bad, tmp_path), rootpath=tmp_path)
    typo = {**raw, "groups": {"coder": ["code_quizz"]}}
    with pytest.raises(pytest.UsageError, match=re.escape("unknown task 'code_quizz'; did you mean 'code_quiz'?")):
        parse_config(typo, source=None, known_tasks=available_tasks(typo, tmp_path), rootpath=tmp_path)


# --- tasks written in Python ------------------------------------------------------------------

class Capitals(MultipleChoiceTask):
    """A Python task as the docs show it."""

    name = "capitals"
    dataset = DatasetRef("example/capitals", None, "test", "capitals")
    metrics = ("acc",)
    default_metric = "acc"

    def build(self, doc):
        return f"The capital of {doc['country']} is", doc["options"], doc["options"].index(doc["capital"])


class Unscored(GenerationTask):
    name = "unscored"
    dataset = DatasetRef("x", None, "test", "x")
    metrics = ("exact_match",)
    default_metric = "exact_match"

    def build(self, doc):
        return doc["q"], doc["a"]


def test_merge_tasks_adds_python_tasks_and_refuses_what_cannot_work():
    merged = merge_tasks(TASKS, [[Capitals()], None])
    assert merged["capitals"].name == "capitals" and set(TASKS) < set(merged)
    assert "capitals" in merge_tasks(TASKS, [Capitals()])  # a single task is fine too
    cases = [
        ([Capitals], "returned the class Capitals; return an instance: Capitals()"),
        (["capitals"], "a hook returned 'capitals'; return Task instances"),
        ("capitals", "a hook returned 'capitals'; return Task instances"),
        ([Capitals(), Capitals()], "task 'capitals': a task of that name exists already"),
        ([Unscored()], "task 'unscored': Unscored must implement score(item, results)"),
    ]
    for contributed, message in cases:
        with pytest.raises(SuiteError, match=re.escape(message)):
            merge_tasks(TASKS, [contributed])

    class Nameless(Capitals):
        name = "has-dash"

    class NoData(Capitals):
        name = "no_data"
        dataset = None

    class BadMetric(Capitals):
        name = "bad_metric"
        default_metric = "acc_norm"

    class NoBuild(MultipleChoiceTask):
        name = "no_build"
        dataset = Capitals.dataset

    for task, message in [(Nameless(), "name = 'has-dash': set name to an identifier"),
                          (NoData(), "set dataset = DatasetRef"),
                          (BadMetric(), "default_metric = 'acc_norm' is not one of its metrics"),
                          (NoBuild(), "NoBuild must implement build")]:
        with pytest.raises(SuiteError, match=re.escape(message)):
            merge_tasks(TASKS, [task])


# --- end to end -------------------------------------------------------------------------------

SUITE_CONFIG = r"""
[tool.pytest.ini_options]
addopts = "-p no:randomly"

[tool.llmgate]
baseline = "base"
shard_size = 4

[tool.llmgate.models.base]
backend = "doubles:SkillBackend"
path = "weights/base.json"

[tool.llmgate.models.good]
backend = "doubles:SkillBackend"
path = "weights/good.json"

[tool.llmgate.models.bad]
backend = "doubles:SkillBackend"
path = "weights/bad.json"

[tool.llmgate.suites.code_quiz]
path = "suites/code_quiz.jsonl"
type = "multiple_choice"
template = "Code question: {question}\nAnswer:"
split = { eval = 0.5, seed = 7 }
num_fewshot = 2
group_field = "area"

[tool.llmgate.suites.test_count]
path = "suites/test_count.jsonl"
type = "generation"
until = ["\n\n"]
scorer = { type = "regex", pattern = "#### (-?\\d+)" }

[tool.llmgate.groups]
coder = ["code_quiz"]
tester = ["test_count"]

[[tool.llmgate.stages]]
name = "mild"
model = "good"
min_retention = 0.90
[tool.llmgate.stages.groups.coder]
min_retention = 0.85

[[tool.llmgate.stages]]
name = "harsh"
model = "bad"
min_retention = 0.90
"""

SUITE_BENCH = '''
import pytest

@pytest.mark.llmgate("code_quiz")
def test_code_quiz(llmgate_outcome):
    """Every held-out row of the code quiz suite."""

@pytest.mark.llmgate("test_count")
def test_test_count(llmgate_outcome):
    """Every row of the generation suite."""
'''


@pytest.fixture
def suite_project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch):
    project = make_project(pytester, monkeypatch, bad_skill=0.3)
    project.weights("good", skill=1.0, seed=2)  # always right, and a fingerprint of its own
    project.config(SUITE_CONFIG)
    write_jsonl(project.path / "suites" / "code_quiz.jsonl", mc_rows(40))
    write_jsonl(project.path / "suites" / "test_count.jsonl", gen_rows(8))
    pytester.makepyfile(test_bench=SUITE_BENCH)
    return project


def test_suites_run_end_to_end_and_gate(suite_project):
    collected = suite_project.run("--collect-only", "-q", "--stage=mild")
    collected.stdout.fnmatch_lines(["test_bench.py::test_code_quiz[[]tester-0[]]",
                                    "test_bench.py::test_test_count[[]eval-0[]]", "*28 tests collected*"])
    baseline = suite_project.run("--stage=baseline")
    assert baseline.ret == 0
    result = suite_project.run("--stage=mild", "--llmgate-report=report.json")
    report = suite_project.report()
    assert result.ret == 0 and report["verdict"] == "pass" and report["exit_code"] == 0
    quiz, count = report["tasks"]["code_quiz"], report["tasks"]["test_count"]
    assert (quiz["n"], quiz["metric"], quiz["threshold"]) == (20, "acc", 0.85)
    assert (count["n"], count["metric"], count["threshold"]) == (8, "exact_match", 0.90)
    assert report["models"]["baseline"]["cached"] == 28 and report["models"]["mild"]["evaluated"] == 28
    generated = [i for i in report["items"] if i["task"] == "test_count"]
    assert generated[3]["candidate"]["completion"] == " The total is 6.\n#### 6"
    assert generated[3]["candidate"]["extracted"] == "6" and generated[3]["candidate"]["scores"] == {
        "exact_match": 1.0}
    assert {i["id"].split("-")[0] for i in report["items"] if i["task"] == "code_quiz"} == {"coder", "tester"}
    by_group = suite_project.run("--stage=mild", "-m", "tester", "--collect-only", "-q")
    by_group.stdout.fnmatch_lines(["*8 tests collected*"])
    harsh = suite_project.run("--stage=harsh", "--llmgate-report=report.json")
    assert harsh.ret == 10 and suite_project.report()["verdict"] == "breach"
    harsh.stdout.fnmatch_lines(["*FAILED code_quiz: retention >= 0.90*"])


def test_an_edited_suite_file_misses_the_cache(suite_project):
    assert suite_project.run("--stage=baseline").ret == 0
    path = suite_project.path / "suites" / "test_count.jsonl"
    rows = gen_rows(8)
    rows[0]["note"] = "an edit anywhere in the file"
    write_jsonl(path, rows)
    suite_project.run("--stage=baseline", "--llmgate-report=report.json")
    assert suite_project.report()["models"]["baseline"] == {**suite_project.report()["models"]["baseline"],
                                                            "evaluated": 8, "cached": 20}


def test_suite_mistakes_exit_4_and_bad_rows_error_only_their_item(suite_project):
    text = (suite_project.path / "pyproject.toml").read_text()
    suite_project.config(text.replace('num_fewshot = 2', 'num_fewshot = 2\nanswer_feild = "x"'))
    result = suite_project.run("--stage=mild")
    assert result.ret == 4
    result.stderr.fnmatch_lines(["*llmgate config: [[]tool.llmgate.suites.code_quiz[]].answer_feild: unknown key; "
                                 "did you mean 'answer_field'?*"])
    suite_project.config(text)
    rows = gen_rows(8)
    del rows[2]["answer"]
    write_jsonl(suite_project.path / "suites" / "test_count.jsonl", rows)
    result = suite_project.run("--stage=mild", "--llmgate-report=report.json")
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*bad data row 2 of suite test_count: suites/test_count.jsonl:3: no field 'answer'*",
                                 "*1 error*"])
    assert suite_project.report()["tasks"]["test_count"]["n"] == 7
    (suite_project.path / "suites" / "test_count.jsonl").write_text('{"question": "q"}\n{oops\n')
    broken = suite_project.run("--stage=mild")
    assert broken.ret == 2
    broken.stdout.fnmatch_lines(["*llmgate: task test_count: *test_count.jsonl:2: not valid JSON*"])


PYTHON_TASK_CONFTEST = '''
from pathlib import Path

from pytest_llmgate.tasks import DatasetRef, MultipleChoiceTask, jsonl_split

HERE = Path(__file__).parent


class CodeSmells(MultipleChoiceTask):
    """Which snippet has the smell? A task written in Python, rows from a file beside this conftest."""

    name = "code_smells"
    dataset = DatasetRef("local/code_smells", None, "test", "code_smells")
    metrics = ("acc",)
    default_metric = "acc"

    def rows(self, data_dir):
        return jsonl_split(HERE / "smells.jsonl")

    def build(self, doc):
        return f"Which one smells of {doc['smell']}?\\nAnswer:", doc["choices"], doc["answer"]


def pytest_llmgate_tasks(config):
    return [CodeSmells()]
'''

PYTHON_TASK_BENCH = '''
import pytest

@pytest.mark.llmgate("code_smells")
def test_code_smells(llmgate_outcome):
    """Every row of the Python task."""
'''


@pytest.fixture
def python_task_project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch):
    project = make_project(pytester, monkeypatch, good_skill=0.8)
    text = (project.path / "pyproject.toml").read_text()
    project.config(text.replace('tasks = ["arc_challenge"]', 'tasks = ["code_smells"]') +
                   "\n[tool.llmgate.groups]\ncoder = [\"code_smells\"]\n")
    rows = [{**row, "smell": f"smell {i}"} for i, row in enumerate(mc_rows(24))]
    write_jsonl(project.path / "smells.jsonl", rows)
    pytester.makeconftest(PYTHON_TASK_CONFTEST)
    pytester.makepyfile(test_bench=PYTHON_TASK_BENCH)
    return project


def test_python_task_runs_end_to_end_with_and_without_xdist(python_task_project):
    project = python_task_project
    plain = project.run("--stage=mild", "-p", "no:xdist", "--llmgate-no-cache", "--llmgate-report=plain.json")
    assert plain.ret in (0, 10), plain.stdout.str()
    dist = project.run("--stage=mild", "-n", "2", "--llmgate-no-cache", "--llmgate-report=dist.json",
                       subprocess=True)
    assert dist.ret == plain.ret, dist.stdout.str()
    plain_report, dist_report = project.report("plain.json"), project.report("dist.json")
    assert plain_report["tasks"]["code_smells"]["n"] == 24 and plain_report["exit_code"] == plain.ret
    assert plain_report["tasks"] == dist_report["tasks"]
    assert set(dist_report["workers"]) == {"gw0", "gw1"}

    def sides(report):
        candidates = {i["id"]: i["candidate"] for i in report["items"]}
        return {n: {k: v for k, v in c.items() if k not in ("cached", "spend")} for n, c in candidates.items()}

    assert sides(plain_report) == sides(dist_report) and len(sides(plain_report)) == 24
    assert project.run("--stage=mild", "-m", "coder", "--collect-only", "-q").ret == 0


def test_python_task_mistakes_are_usage_errors(python_task_project, pytester):
    pytester.makeconftest(PYTHON_TASK_CONFTEST.replace('name = "code_smells"', 'name = "mmlu"'))
    result = python_task_project.run("--stage=mild")
    assert result.ret == 4
    result.stderr.fnmatch_lines(["*llmgate config: pytest_llmgate_tasks (*conftest.py) task 'mmlu': a task of "
                                 "that name exists already*"])


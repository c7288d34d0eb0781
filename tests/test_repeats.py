"""Repeats of a generation task: seeded sampled answers per item beside the greedy one, consistency,
self-consistency and pass@n per item and per task, the gate rules on them; with and without xdist, and on the
real SmolLM2 in llama.cpp (reproducible draws, one cache entry per repeat)."""

from __future__ import annotations

import json

import pytest
from gateproject import BASE_CONFIG, make_project

from conftest import write_jsonl
from pytest_llmgate.tasks.repeats import majority

SUITE_TABLE = """
[tool.llmgate.suites.sums]
path = "data/sums.jsonl"
type = "generation"
template = "{question}"
until = ["Question:"]
max_gen_toks = 32
scorer = { type = "regex", pattern = "#### (-?\\\\d+)" }
"""
SUITE = SUITE_TABLE + """
[tool.llmgate.task.sums]
repeats = 5
temperature = 0.7
"""
CONFIG = BASE_CONFIG.replace('tasks = ["arc_challenge"]', 'tasks = ["sums"]')

BENCH = '''
import pytest

@pytest.mark.llmgate("sums")
def test_sums(llmgate_outcome):
    """One sum, answered greedily and five times sampled."""
'''


def project_with_repeats(pytester, monkeypatch, extra: str = ""):
    project = make_project(pytester, monkeypatch)
    rows = [{"question": f"What is {i} + {i}? RIGHT={2 * i}", "answer": 2 * i} for i in range(12)]
    write_jsonl(project.path / "data" / "sums.jsonl", rows)
    project.config(CONFIG + SUITE + extra)
    pytester.makepyfile(test_bench=BENCH)
    project.weights("base", skill=0.9, seed=1, seeded=True)
    project.weights("good", skill=0.85, seed=2, seeded=True)
    project.weights("bad", skill=0.4, seed=3, seeded=True)
    return project


def test_majority_takes_the_most_frequent_answer_and_the_first_of_a_tie():
    assert majority(["4", "5", "4"]) == ("4", pytest.approx(2 / 3))
    assert majority(["7", "5", "5", "7"]) == ("7", 0.5)
    with pytest.raises(ValueError):
        majority([])


@pytest.mark.parametrize("workers", [None, "2"])
def test_repeats_give_consistency_and_self_consistency_per_item_and_task(pytester, monkeypatch, workers):
    project = project_with_repeats(pytester, monkeypatch)
    args = ["--stage=all", "--llmgate-report=r.json", "--llmgate-no-speed", *(["-n", workers] if workers else [])]
    result = project.run(*args, subprocess=bool(workers))
    assert result.ret in (0, 10, 11), result.stdout.str()
    report = project.report("r.json")
    items = report["items"]
    assert len(items) == 12
    for item in items:
        side = item["baseline"]
        assert len(side["repeats"]) == 5
        answers = [r["answer"] for r in side["repeats"]]
        winner, share = majority(answers)
        assert side["majority"] == winner and side["consistency"] == pytest.approx(share)
        assert side["answers"] == {a: answers.count(a) for a in set(answers)}
        scores = side["scores"]
        repeat_scores = [r["scores"]["exact_match"] for r in side["repeats"]]
        assert scores["exact_match@mean"] == pytest.approx(sum(repeat_scores) / 5)
        assert scores["exact_match@pass5"] == max(repeat_scores)
        assert scores["exact_match@majority"] == repeat_scores[answers.index(winner)]
        assert scores["exact_match"] in (0.0, 1.0)  # the greedy answer, the task's own metric
    # The five repeats of an item are five draws: they do not all agree everywhere.
    assert any(item["baseline"]["consistency"] < 1.0 for item in items)
    figures = report["tasks"]["sums"]["repeats"]
    assert figures["repeats"] == 5 and figures["metric"] == "exact_match"
    base = figures["roles"]["baseline"]
    assert base["consistency"]["score"] == pytest.approx(sum(i["baseline"]["consistency"] for i in items) / 12)
    lo, hi = base["consistency"]["ci"]
    assert lo <= base["consistency"]["score"] <= hi
    harsh = figures["roles"]["harsh"]
    assert harsh["consistency"]["score"] < base["consistency"]["score"]
    assert harsh["self_consistency"]["score"] < base["self_consistency"]["score"]
    out = result.stdout.str()
    assert "sums: 5 sampled repeats per item (exact_match; intervals clustered by item)" in out
    assert "majority vote" in out and "pass@5" in out


def test_consistency_and_self_consistency_gate(pytester, monkeypatch):
    extra = ""
    project = project_with_repeats(pytester, monkeypatch, extra)
    config = (project.path / "pyproject.toml").read_text()
    config = config.replace("min_retention = 0.90\n", "min_retention = 0.05\nmin_consistency_retention = 0.8\n"
                            "min_self_consistency = 0.9\n")  # fmt: skip
    project.config(config)
    result = project.run("--stage=all", "--llmgate-report=r.json", "--llmgate-no-speed")
    report = project.report("r.json")
    rules = {s: {r["rule"]: r for r in v["rules"]} for s, v in report["stages"].items()}
    assert rules["mild"]["sums: consistency retention >= 0.80"]["passed"] is True
    harsh = rules["harsh"]["sums: consistency retention >= 0.80"]
    assert harsh["passed"] is False and "consistency retention" in harsh["detail"]
    assert rules["harsh"]["sums: self-consistency >= 0.90"]["passed"] is False
    assert rules["mild"]["sums: self-consistency >= 0.90"]["passed"] is True
    assert report["selected_stage"] == "mild" and result.ret == 0, result.stdout.str()
    result.stdout.fnmatch_lines(["*FAILED sums: consistency retention >= 0.80: consistency retention *"])


def test_repeats_are_cached_one_entry_per_repeat(pytester, monkeypatch):
    project = project_with_repeats(pytester, monkeypatch)
    first = project.run("--stage=mild", "--llmgate-report=a.json", "--llmgate-no-speed")
    assert first.ret in (0, 10), first.stdout.str()
    # Two more repeats: the first five are read from the cache, so they are the same draws.
    config = (project.path / "pyproject.toml").read_text().replace("repeats = 5", "repeats = 7")
    project.config(config)
    second = project.run("--stage=mild", "--llmgate-report=b.json", "--llmgate-no-speed")
    assert second.ret in (0, 10), second.stdout.str()
    a, b = project.report("a.json")["items"], project.report("b.json")["items"]
    for before, after in zip(a, b, strict=True):
        assert [r["completion"] for r in after["baseline"]["repeats"][:5]] == [
            r["completion"] for r in before["baseline"]["repeats"]
        ]
        assert len(after["baseline"]["repeats"]) == 7


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ("[tool.llmgate.task.arc_challenge]\nrepeats = 3\n", "task arc_challenge is not a generation task"),
        ("[tool.llmgate.task.sums]\nrepeats = 1\n", "repeats: expected a whole number >= 2"),
        ("[tool.llmgate.task.sums]\nrepeats = 3\ntemperature = 0\n", "0 would repeat the greedy answer"),
        ("[tool.llmgate.task.sums]\ntemperature = 0.5\n", "set repeats = N (2 or more) too"),
        ("[tool.llmgate.task.sums]\nmetric = 'exact_match@majority'\n", "task sums reports exact_match"),
    ],
)
def test_bad_repeat_settings_are_usage_errors(pytester, monkeypatch, settings, message):
    project = project_with_repeats(pytester, monkeypatch)
    project.config(CONFIG + SUITE_TABLE + settings)
    result = project.run("--stage=mild")
    assert result.ret == 4, result.stdout.str()
    assert message in result.stderr.str()


def test_a_repeat_metric_can_gate(pytester, monkeypatch):
    project = project_with_repeats(pytester, monkeypatch, 'metric = "exact_match@majority"\n')
    result = project.run("--stage=mild", "--llmgate-report=r.json", "--llmgate-no-speed")
    assert result.ret in (0, 10), result.stdout.str()
    report = project.report("r.json")
    assert report["tasks"]["sums"]["metric"] == "exact_match@majority"
    mean = sum(i["baseline"]["scores"]["exact_match@majority"] for i in report["items"]) / 12
    assert report["tasks"]["sums"]["baseline"]["score"] == pytest.approx(mean)


REAL = """
[tool.pytest.ini_options]
addopts = "-p no:randomly"

[tool.llmgate]
baseline = "q4"
tasks = ["sums"]

[tool.llmgate.models.q4]
backend = "llama_cpp"

[tool.llmgate.models.again]  # the same file under a second name: no quantization to wait for
backend = "llama_cpp"

[[tool.llmgate.stages]]
name = "again"
model = "again"
min_retention = 0.5

[tool.llmgate.suites.sums]
path = "sums.jsonl"
type = "generation"
template = "Question: What is {a} plus {b}?\\nAnswer:"
until = ["\\n", "Question:"]
max_gen_toks = 8
scorer = "numeric"

[tool.llmgate.task.sums]
repeats = 4
temperature = 1.0
"""


def test_smollm2_repeats_are_seeded_draws_reproducible_across_runs(pytester):
    """The real SmolLM2 in llama.cpp: at temperature 1 the four draws of an item differ, and a second run
    without the cache draws the same four answers again (each repeat is seeded ``repeat_seed + r``)."""
    rows = [{"a": a, "b": b, "answer": a + b} for a, b in ((2, 3), (10, 7), (4, 4), (21, 5), (6, 9), (13, 12))]
    write_jsonl(pytester.path / "sums.jsonl", rows)
    (pytester.path / "pyproject.toml").write_text(REAL)
    pytester.makepyfile(test_bench=BENCH)
    first = pytester.runpytest("--stage=again", "--llmgate-report=a.json", "--llmgate-no-speed", "--llmgate-no-cache")
    assert first.ret in (0, 10, 11), first.stdout.str()
    second = pytester.runpytest("--stage=again", "--llmgate-report=b.json", "--llmgate-no-speed", "--llmgate-no-cache")
    a = json.loads((pytester.path / "a.json").read_text())["items"]
    b = json.loads((pytester.path / "b.json").read_text())["items"]
    for role in ("baseline", "candidate"):
        draws = [[r["completion"] for r in item[role]["repeats"]] for item in a]
        assert draws == [[r["completion"] for r in item[role]["repeats"]] for item in b]
        assert any(len(set(d)) > 1 for d in draws), draws  # sampled, not four greedy copies
    # The greedy answer (the task's own metric) rides beside the repeats, the same in both runs.
    assert [item["baseline"]["completion"] for item in a] == [item["baseline"]["completion"] for item in b]
    assert second.ret == first.ret

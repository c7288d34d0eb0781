"""Pairwise judging: both orders, strict parsing, W/L/T and its rates, the agreement with exact match, the
non-loss rule, the cache, xdist; the real SmolLM2 in llama.cpp as a (weak) judge of an open-ended suite."""

from __future__ import annotations

import json

import pytest
from gateproject import BASE_CONFIG, make_project

from conftest import write_jsonl
from pytest_llmgate.judge import combine, parse_verdict

SUITE = """
[tool.llmgate.suites.sums]
path = "data/sums.jsonl"
type = "generation"
template = "{question}"
until = ["Question:"]
max_gen_toks = 32
scorer = { type = "regex", pattern = "#### (-?\\\\d+)" }

[tool.llmgate.models.referee]
backend = "doubles:JudgeBackend"
path = "weights/referee.json"

[tool.llmgate.task.sums]
judge = "referee"
"""
CONFIG = BASE_CONFIG.replace('tasks = ["arc_challenge"]', 'tasks = ["sums"]')
BENCH = '''
import pytest

@pytest.mark.llmgate("sums")
def test_sums(llmgate_outcome):
    """One sum, judged against the baseline's answer."""
'''


@pytest.fixture
def project(pytester, monkeypatch):
    project = make_project(pytester, monkeypatch)
    rows = [{"question": f"What is {i} + {i}? RIGHT={2 * i}", "answer": 2 * i} for i in range(16)]
    write_jsonl(project.path / "data" / "sums.jsonl", rows)
    project.config(CONFIG + SUITE)
    pytester.makepyfile(test_bench=BENCH)
    project.weights("base", skill=0.9, seed=1)
    project.weights("good", skill=0.9, seed=2)
    project.weights("bad", skill=0.3, seed=3)
    project.weights("referee")
    return project


def test_verdicts_are_parsed_strictly():
    assert [parse_verdict(t) for t in (" A", "B.", "Tie", " TIE because", "A\nmore")] == ["A", "B", "tie", "tie", "A"]
    assert [parse_verdict(t) for t in ("", " a", "Answer A", "AB", "both", " maybe B")] == [None] * 6


def test_both_orders_must_agree_for_a_win_or_a_loss():
    assert combine("B", "A")["outcome"] == "win"  # the stage's answer was B, then A: preferred both times
    assert combine("A", "B")["outcome"] == "loss"
    assert combine("A", "A") == {"outcome": "tie", "inconsistent": True, "unparseable": 0}  # always "A": bias
    assert combine("tie", "tie") == {"outcome": "tie", "inconsistent": False, "unparseable": 0}
    assert combine(None, "A") == {"outcome": "tie", "inconsistent": False, "unparseable": 1}


@pytest.mark.parametrize("workers", [None, "2"])
def test_a_fair_judge_counts_wins_losses_and_ties_and_agrees_with_exact_match(project, workers):
    args = ["--stage=all", "--llmgate-report=r.json", "--llmgate-no-speed", *(["-n", workers] if workers else [])]
    result = project.run(*args, subprocess=bool(workers))
    assert result.ret in (0, 10, 11), result.stdout.str()
    report = project.report("r.json")
    for stage in ("mild", "harsh"):
        expected = {"win": 0, "loss": 0, "tie": 0}
        for item in report["items"]:
            base = item["baseline"]["scores"]["exact_match"]
            cand = item["stages"][stage]["scores"]["exact_match"]
            judged = item["stages"][stage]["judge"]
            assert [o["baseline_as"] for o in judged["orders"]] == ["A", "B"]
            exact = "win" if cand > base else "loss" if cand < base else "tie"
            assert judged["outcome"] == exact
            expected[exact] += 1
        figures = report["tasks"]["sums"]["judge"][stage]
        assert (figures["wins"], figures["losses"], figures["ties"]) == (
            expected["win"], expected["loss"], expected["tie"]
        )  # fmt: skip
        assert figures["agreement"]["rate"] == 1.0 and figures["inconsistent_share"] == 0.0
        assert figures["non_loss_rate"]["rate"] == pytest.approx((16 - expected["loss"]) / 16)
    assert report["tasks"]["sums"]["judge"]["harsh"]["losses"] > 3
    result.stdout.fnmatch_lines(
        ["sums judged, harsh vs baseline: W/L/T */*/*; win rate *agrees with exact match on 100% of items"]
    )


def test_the_non_loss_rule_gates_and_judge_replies_are_cached(project, monkeypatch):
    loads = project.path / "loads.txt"
    monkeypatch.setenv("LLMGATE_TEST_LOADS", str(loads))
    config = (project.path / "pyproject.toml").read_text()
    project.config(config.replace("min_retention = 0.90\n", "min_retention = 0.05\nmin_non_loss_rate = 0.8\n"))
    first = project.run("--stage=all", "--llmgate-report=r.json", "--llmgate-no-speed")
    report = project.report("r.json")
    rules = {s: {r["rule"]: r for r in v["rules"]} for s, v in report["stages"].items()}
    assert rules["mild"]["sums: judged non-loss rate >= 0.80"]["passed"] is True
    assert rules["harsh"]["sums: judged non-loss rate >= 0.80"]["passed"] is False
    assert "W/L/T" in rules["harsh"]["sums: judged non-loss rate >= 0.80"]["detail"]
    assert report["selected_stage"] == "mild" and first.ret == 0, first.stdout.str()
    assert "referee" in loads.read_text()
    loads.write_text("")
    second = project.run("--stage=all", "--llmgate-report=again.json", "--llmgate-no-speed")
    assert second.ret == 0
    assert loads.read_text() == "", "every judge reply came from the cache: the judge was not even loaded"
    assert project.report("again.json")["tasks"]["sums"]["judge"] == report["tasks"]["sums"]["judge"]


@pytest.mark.parametrize(
    ("weights", "inconsistent", "unparseable"),
    [({"bias": "A"}, 1.0, 0), ({"reply": " I think the first one"}, 0.0, 32)],
)
def test_a_biased_or_unparseable_judge_gives_ties_and_says_so(project, weights, inconsistent, unparseable):
    project.weights("referee", **weights)
    result = project.run("--stage=mild", "--llmgate-report=r.json", "--llmgate-no-speed")
    assert result.ret in (0, 10, 11), result.stdout.str()
    figures = project.report("r.json")["tasks"]["sums"]["judge"]["mild"]
    assert (figures["wins"], figures["losses"], figures["ties"]) == (0, 0, 16)
    assert figures["inconsistent_share"] == inconsistent and figures["unparseable_verdicts"] == unparseable
    assert figures["win_rate"]["rate"] is None  # no decided item: no win rate, not 0


def test_a_failing_judge_leaves_the_answers_and_fails_the_judged_rule(project):
    project.weights("referee", fail=True)
    config = (project.path / "pyproject.toml").read_text()
    project.config(config.replace("min_retention = 0.90\n", "min_retention = 0.05\nmin_non_loss_rate = 0.5\n"))
    result = project.run("--stage=mild", "--llmgate-report=r.json", "--llmgate-no-speed")
    assert result.ret == 10, result.stdout.str()
    report = project.report("r.json")
    assert len(report["items"]) == 16 and all(i["candidate"]["completion"] for i in report["items"])
    figures = report["tasks"]["sums"]["judge"]["mild"]
    assert figures["n"] == 0 and figures["unjudged"] == 16
    assert "RuntimeError: the judge server answered 503" in figures["errors"][0]
    result.stdout.fnmatch_lines(["*FAILED sums: judged non-loss rate >= 0.50: no item was judged: the judge*503*"])


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ('judge = "nobody"', "[tool.llmgate.task.sums].judge: 'nobody' is not a model of [tool.llmgate.models]"),
        ('judge = "referee"\njudge_template = "{question} {answer_a}"', "judge_template: needs {answer_b}"),
        ('judge_template = "x"', "name the judge model with judge = '<model>'"),
    ],
)
def test_bad_judge_settings_are_usage_errors(project, settings, message):
    config = CONFIG + SUITE.replace('judge = "referee"\n', settings + "\n")
    project.config(config)
    result = project.run("--stage=mild")
    assert result.ret == 4, result.stdout.str()
    assert message in result.stderr.str()


def test_a_judge_on_a_multiple_choice_task_is_a_usage_error(project):
    judged_arc = '[tool.llmgate.task.arc_challenge]\njudge = "referee"\n'
    project.config(BASE_CONFIG + SUITE.split("[tool.llmgate.task.sums]")[0] + judged_arc)
    result = project.run("--stage=mild")
    assert result.ret == 4
    assert "task arc_challenge has no single generated answer per item to judge" in result.stderr.str()


OPEN = """
[tool.pytest.ini_options]
addopts = "-p no:randomly"

[tool.llmgate]
baseline = "q4"
tasks = ["advice"]

[tool.llmgate.models.q4]
backend = "llama_cpp"

[tool.llmgate.models.again]
backend = "llama_cpp"
n_ctx = 1024

[[tool.llmgate.stages]]
name = "again"
model = "again"
min_retention = 0.5

[tool.llmgate.suites.advice]
path = "advice.jsonl"
type = "generation"
template = "{question}"
until = ["\\n\\n"]
max_gen_toks = 24
scorer = "open"

[tool.llmgate.task.advice]
judge = "q4"
apply_chat_template = true
"""


def test_smollm2_judges_an_open_ended_suite_through_llama_cpp(pytester):
    """The real default model as judge (weak, as docs/judging.md says): every item gets two replies, each parsed or
    counted unparseable, and the counts add up."""
    rows = [{"question": q} for q in ("How do I boil an egg?", "Name a fruit that is red.", "Why is the sky blue?")]
    write_jsonl(pytester.path / "advice.jsonl", rows)
    (pytester.path / "pyproject.toml").write_text(OPEN)
    pytester.makepyfile(test_bench=BENCH.replace("sums", "advice"))
    result = pytester.runpytest("--stage=again", "--llmgate-report=r.json", "--llmgate-no-speed")
    assert result.ret in (0, 10, 11), result.stdout.str()
    report = json.loads((pytester.path / "r.json").read_text())
    figures = report["tasks"]["advice"]["judge"]["again"]
    assert figures["wins"] + figures["losses"] + figures["ties"] == figures["n"] == 3
    replies = [o for item in report["items"] for o in item["candidate"]["judge"]["orders"]]
    assert len(replies) == 6 and all(isinstance(o["reply"], str) for o in replies)
    assert figures["unparseable_verdicts"] == sum(o["verdict"] is None for o in replies)
    assert figures["unparseable_verdicts"] < 6, replies  # the instruct model does answer with a letter
    # Both stages are the same file, so the answers are the same: a fair judge would say tie in both orders.
    # SmolLM2-135M says "A" whatever it reads (measured): order-inconsistent, hence a tie, never a win or a loss.
    assert figures["wins"] == figures["losses"] == 0
    assert figures["agreement"] is None  # no gold answers: nothing to check the judge against
    assert report["tasks"]["advice"]["metric"] == "answered"

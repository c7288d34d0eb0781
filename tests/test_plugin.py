"""End-to-end runs of the plugin in throwaway projects (pytester), with the deterministic double."""

from __future__ import annotations

import json

import pytest
from gateproject import make_project


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch):
    return make_project(pytester, monkeypatch)


def test_items_are_tests_with_stable_readable_ids(project):
    result = project.run("--collect-only", "-q", "--stage=mild")
    result.stdout.fnmatch_lines(["test_bench.py::test_arc[[]test-0[]]", "test_bench.py::test_arc[[]test-19[]]"])
    assert result.ret == 0
    first = [line for line in result.outlines if "::" in line]
    again = [line for line in project.run("--collect-only", "-q", "--stage=mild").outlines if "::" in line]
    assert first == again and len(first) == 20


def test_without_stage_items_are_skipped_with_the_reason(project):
    result = project.run("-rs")
    result.assert_outcomes(skipped=20)
    result.stdout.fnmatch_lines(["*benchmarks run with --stage=baseline*"])


def test_baseline_without_cache_says_nothing_was_stored(project):
    result = project.run("--stage=baseline", "--llmgate-no-cache")
    assert result.ret == 0
    result.stdout.fnmatch_lines(["*baseline evaluated: 20 items; the cache is off, so nothing was stored*"])
    result.stdout.no_fnmatch_line("*in the cache*")


def test_baseline_then_stage_evaluates_only_the_candidate(project):
    first = project.run("--stage=baseline", "--llmgate-report=report.json")
    assert first.ret == 0
    first.stdout.fnmatch_lines(["*baseline recorded: 20 items*"])
    report = project.report()
    assert report["verdict"] == "baseline-recorded" and report["exit_code"] == 0
    assert report["models"]["baseline"]["evaluated"] == 20

    second = project.run("--stage=mild", "--llmgate-report=report.json")
    report = project.report()
    assert report["models"]["baseline"] == {**report["models"]["baseline"], "evaluated": 0, "cached": 20}
    assert report["models"]["mild"]["evaluated"] == 20
    assert second.ret == 0 and report["verdict"] == "pass"


def test_breach_exits_10_and_critical_exits_11(project):
    project.config(project.path.joinpath("pyproject.toml").read_text().replace("floor = 0.80", "floor = 0.40"))
    project.weights("bad", skill=0.55, seed=1)
    breach = project.run("--stage=harsh", "--llmgate-report=report.json")
    report = project.report()
    assert breach.ret == 10 and report["verdict"] == "breach" and report["exit_code"] == 10
    breach.stdout.fnmatch_lines(["*FAILED arc_challenge: retention >= 0.90*", "*stage 'harsh' BREACH (exit 10)*"])

    project.weights("bad", skill=0.3, seed=1)
    project.config(project.path.joinpath("pyproject.toml").read_text().replace("floor = 0.40", "floor = 0.80"))
    critical = project.run("--stage=harsh", "--llmgate-report=report.json")
    assert critical.ret == 11 and project.report()["verdict"] == "critical"
    critical.stdout.fnmatch_lines(["*FAILED critical: any task below 80% of baseline*", "*recommendation:*"])


def test_regressions_have_their_own_letter_and_count_but_do_not_fail(project):
    project.weights("good", skill=0.9, seed=1)
    result = project.run("--stage=mild", "--llmgate-report=report.json")
    items = project.report()["items"]
    regressed = sum(1 for i in items if i["status"] == "regressed")
    assert regressed > 0
    outcomes = result.parseoutcomes()
    assert outcomes["regressed"] == regressed
    assert outcomes.get("passed", 0) + regressed == 20 and "failed" not in outcomes
    result.stdout.fnmatch_lines(["*R*"])


def test_json_contract_and_every_figure_recomputes_from_items(project):
    project.weights("good", skill=0.8, seed=7)
    result = project.run("--stage=mild", "--llmgate-report=report.json")
    report = project.report()
    assert report["schema"] == "llmgate-report/1"
    assert report["stage"] == "mild" and report["verdict"] in ("pass", "breach", "critical")
    assert report["exit_code"] == result.ret
    task = report["tasks"]["arc_challenge"]
    for key in ("metric", "n", "baseline", "candidate", "retention", "threshold", "passed"):
        assert key in task
    assert {"rule", "passed", "detail"} <= set(report["rules"][0])
    items = report["items"]
    assert {"task", "doc_id", "id", "baseline", "candidate"} <= set(items[0])
    assert [i["doc_id"] for i in items] == list(range(20))
    for side in ("baseline", "candidate"):
        assert len(items[0][side]["loglikelihoods"]) == 4
        assert {"prediction", "scores"} <= set(items[0][side])
    metric = task["metric"]
    base = sum(i["baseline"]["scores"][metric] for i in items) / len(items)
    cand = sum(i["candidate"]["scores"][metric] for i in items) / len(items)
    assert task["n"] == len(items)
    assert task["baseline"]["score"] == pytest.approx(base)
    assert task["candidate"]["score"] == pytest.approx(cand)
    assert task["retention"] == pytest.approx(cand / base)
    # Predictions recompute from the raw log-likelihoods, as lm-eval's argmax does.
    for item in items:
        lls = item["candidate"]["loglikelihoods"]
        assert item["candidate"]["prediction"] == lls.index(max(lls))
    losses = sum(1 for i in items if i["candidate"]["scores"][metric] < i["baseline"]["scores"][metric])
    assert task["losses"] == losses


def test_stage_all_picks_the_most_compressed_passing_stage(project):
    result = project.run("--stage=all", "--llmgate-report=report.json")
    report = project.report()
    assert result.ret == 0 and report["selected_stage"] == "mild"
    assert report["stages"]["harsh"]["verdict"] == "critical"
    result.stdout.fnmatch_lines(["*ladder selects stage 'mild'*(exit 0)*"])


def test_stage_all_with_no_passing_stage_names_why(project):
    project.weights("good", skill=0.3, seed=2)
    result = project.run("--stage=all", "--llmgate-report=report.json")
    assert result.ret == 11 and project.report()["selected_stage"] is None
    result.stdout.fnmatch_lines(["*no stage of the ladder passes*(exit 11)*"])


def test_k_m_x_lf_and_junitxml_behave_as_usual(project):
    k = project.run("--stage=mild", "-k", "test-3 or test-4", "--llmgate-report=report.json")
    assert k.ret == 0 and project.report()["tasks"]["arc_challenge"]["n"] == 2
    m = project.run("--stage=mild", "-m", "arc_challenge", "--collect-only", "-q")
    m.stdout.fnmatch_lines(["*20 tests collected*"])
    none = project.run("--stage=mild", "-m", "not arc_challenge")
    assert none.ret == 5
    junit = project.run("--stage=mild", "--junitxml=junit.xml")
    assert junit.ret == 0 and 'tests="20"' in (project.path / "junit.xml").read_text()
    project.weights("good", skill=0.9, seed=1, fail_on="question 5?")
    failing = project.run("--stage=mild", "-x")
    assert failing.ret == 1
    # The model fails on item 5 only: the rest of its shard still passes, -x stops at the error.
    outcomes = failing.parseoutcomes()
    assert outcomes["errors"] == 1 and outcomes.get("passed", 0) + outcomes.get("regressed", 0) == 5
    failing.stdout.fnmatch_lines(
        ["*llmgate harness error: model *good* failed on arc_challenge test-5*simulated model failure*"])
    lf = project.run("--stage=mild", "--lf", "--collect-only", "-q")
    lf.stdout.fnmatch_lines(["test_bench.py::test_arc[[]test-5[]]", "*1 test collected*"])


def test_bad_data_row_is_a_test_error_and_loses_nothing_else(project):
    path = project.path / "data" / "arc_challenge" / "test.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = lines[2].replace('"answerKey": "C"', '"answerKey": "Z"')
    path.write_text("\n".join(lines) + "\n")
    result = project.run("--stage=mild", "--llmgate-report=report.json")
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*ERROR*test-2*", "*bad data row 2*", "*1 error*"])
    report = project.report()
    assert report["complete"] is False and report["harness_errors"] == 1
    assert report["tasks"]["arc_challenge"]["n"] == 19 and report["exit_code"] == 1


def test_missing_dataset_is_a_clear_error(project):
    (project.path / "data" / "arc_challenge" / "test.jsonl").unlink()
    result = project.run("--stage=mild")
    assert result.ret == 2
    result.stdout.fnmatch_lines(["*no data for split 'test' of allenai/ai2_arc*test.jsonl*"])


def test_changed_weights_miss_the_cache(project):
    assert project.run("--stage=baseline").ret == 0
    project.run("--stage=baseline", "--llmgate-report=report.json")
    assert project.report()["models"]["baseline"]["evaluated"] == 0
    project.weights("base", skill=1.0, seed=1, note="one changed value")
    project.run("--stage=baseline", "--llmgate-report=report.json")
    assert project.report()["models"]["baseline"]["evaluated"] == 20


def test_broken_config_exits_4_naming_the_key(project):
    text = project.path.joinpath("pyproject.toml").read_text()
    typo = text.replace("min_retention = 0.90\n\n[[tool.llmgate.stages]]",
                        "min_retension = 0.90\n\n[[tool.llmgate.stages]]")
    assert typo != text
    project.config(typo)
    result = project.run("--stage=mild")
    assert result.ret == 4
    result.stderr.fnmatch_lines(["*stage 'mild'.min_retension: unknown key; did you mean 'min_retention'?*"])


def test_unknown_stage_is_a_usage_error(project):
    result = project.run("--stage=vptq")
    assert result.ret == 4
    result.stderr.fnmatch_lines(["*no stage named 'vptq'; choose one of baseline, mild, harsh, all*"])


def test_report_and_table_carry_intervals_pvalues_policy_and_resolution(project):
    project.weights("good", skill=0.9, seed=1)
    result = project.run("--stage=mild", "--llmgate-policy=strict", "--llmgate-report=report.json")
    task = project.report()["tasks"]["arc_challenge"]
    assert project.report()["policy"] == task["policy"] == "strict"
    lo, hi = task["retention_ci"]
    assert lo <= task["retention"] <= hi and task["confidence"] == 0.95
    assert task["resolved"] == (lo >= 0.9 or hi < 0.9)
    assert task["mcnemar"]["regressed"] == task["losses"] and task["mcnemar"]["improved"] == task["wins"]
    assert 0.0 <= task["noninferiority"]["p_value"] <= task["noninferiority"]["p_holm"] <= 1.0
    assert task["baseline"]["ci"][0] <= task["baseline"]["score"] <= task["baseline"]["ci"][1]
    # 20 items cannot resolve a 0.90 floor: under the strict policy the stage does not pass.
    assert task["resolved"] is False and result.ret == 10 and not task["passed"]
    result.stdout.fnmatch_lines(["*retention*CI*p(McNemar)*", "*FAIL (unresolved)*", "*UNRESOLVED*"])
    lenient = project.run("--stage=mild", "--llmgate-policy=lenient")
    assert lenient.ret == 0


def test_plan_reads_the_cache_and_evaluates_nothing(project):
    project.weights("base", skill=0.7, seed=1)
    before = project.run("--stage=mild", "--llmgate-plan")
    assert before.ret == 0
    before.stdout.fnmatch_lines(["*llmgate plan:*", "*arc_challenge*not cached*run --stage=baseline first*"])
    project.weights("good", skill=0.8, seed=3)
    assert project.run("--stage=mild", "--llmgate-report=report.json").ret in (0, 10, 11)
    report = project.report()
    result = project.run("--stage=mild", "--llmgate-plan", "--llmgate-plan-drop=0.2")
    assert result.ret == 0
    result.stdout.fnmatch_lines(["*20 deselected*"])
    items = report["items"]
    discordance = sum(i["baseline"]["scores"]["acc_norm"] != i["candidate"]["scores"]["acc_norm"]
                      for i in items) / len(items)
    from pytest_llmgate.stats import items_needed

    needed = items_needed(report["tasks"]["arc_challenge"]["baseline"]["score"], discordance, 0.2, 0.05, 0.8)
    assert 0 < discordance < 1
    base_score = report["tasks"]["arc_challenge"]["baseline"]["score"]
    result.stdout.fnmatch_lines([f"arc_challenge*20*{base_score:.3f} (20)*{discordance:.3f}*  {needed}*"])
    with_n = project.run("--stage=mild", "--llmgate-plan", "-n", "2")
    assert with_n.ret == 4


def test_report_has_one_line_per_item_and_collection_leaves_the_garbage_collector_as_it_was(project, monkeypatch):
    import gc

    calls = []
    for name in ("freeze", "unfreeze"):
        real = getattr(gc, name)
        monkeypatch.setattr(gc, name, lambda real=real, name=name: (calls.append(name), real())[1])
    gc.unfreeze()  # what this suite's own session froze: a session freezes only when nothing is frozen
    calls.clear()
    result = project.run("--stage=mild", "--llmgate-report=report.json")
    assert result.ret in (0, 10, 11)
    # Collection froze its objects; the session's cleanup unfroze them and the collector is back on.
    assert calls == ["freeze", "unfreeze"]
    assert gc.isenabled() and gc.get_freeze_count() == 0
    text = (project.path / "report.json").read_text()
    report = project.report()
    item_lines = [line for line in text.splitlines() if line.startswith('  {"task": ')]
    assert len(item_lines) == len(report["items"]) == 20
    assert [json.loads(line.rstrip(",")) for line in item_lines] == report["items"]
    assert '\n "verdict": ' in text  # the rest stays indented


def test_junitxml_carries_each_items_task_and_status_and_the_verdict(project):
    import xml.etree.ElementTree as ET

    result = project.run("--stage=harsh", "--junitxml=junit.xml", "--llmgate-report=r.json")
    assert result.ret == 11
    suite = ET.parse(project.path / "junit.xml").getroot().find("testsuite")
    suite_properties = {p.get("name"): p.get("value") for p in suite.find("properties")}
    assert suite_properties == {"llmgate_stage": "harsh", "llmgate_verdict": "critical", "llmgate_exit_code": "11"}
    report = project.report("r.json")
    status = {(i["task"], str(i["doc_id"])): i["status"] for i in report["items"]}
    cases = suite.findall("testcase")
    assert len(cases) == len(status)
    for case in cases:
        properties = {p.get("name"): p.get("value") for p in case.find("properties")}
        assert properties["llmgate_status"] == status[(properties["llmgate_task"], properties["llmgate_doc_id"])]

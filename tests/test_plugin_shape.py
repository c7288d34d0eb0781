"""The plugin's shape: one plugin object per feature, nothing for projects that do not use it, no state
shared between sessions, and the gated stage's own letters."""

from __future__ import annotations

import json

import pytest
from gateproject import make_project


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch):
    return make_project(pytester, monkeypatch)


PLAIN_CONFTEST = """
import json, sys

def pytest_sessionfinish(session):
    loaded = sorted(name for name in sys.modules if name.startswith("pytest_llmgate"))
    plugins = sorted(str(name) for name, _ in session.config.pluginmanager.list_name_plugin()
                     if str(name).startswith("llmgate"))
    markers = [line for line in session.config.getini("markers") if "llmgate" in line or "items of the" in line]
    with open("seen.json", "w") as handle:
        json.dump({"modules": loaded, "plugins": plugins, "markers": markers}, handle)
"""


def test_a_project_without_llmgate_pays_for_nothing(pytester: pytest.Pytester):
    pytester.makepyfile(test_plain="def test_one():\n    assert True\n")
    pytester.makeconftest(PLAIN_CONFTEST)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == 0
    seen = json.loads((pytester.path / "seen.json").read_text())
    # Only the entry point and what it imports at module level: no tasks, engine, models or feature plugins.
    assert not {"pytest_llmgate.tasks", "pytest_llmgate.engine", "pytest_llmgate.models", "pytest_llmgate.collection",
                "pytest_llmgate.worker", "pytest_llmgate.controller"} & set(seen["modules"]), seen["modules"]
    assert seen["plugins"] == ["llmgate"]
    assert len(seen["markers"]) == 1 and seen["markers"][0].startswith("llmgate(task)")


def test_a_marked_test_without_llmgate_config_is_skipped_with_the_reason(pytester: pytest.Pytester):
    pytester.makepyfile(test_bench="""
import pytest

@pytest.mark.llmgate("arc_challenge")
def test_arc(llmgate_outcome):
    pass
""")
    result = pytester.runpytest("-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*benchmarks run with --stage=baseline*"])


def test_each_feature_is_one_plugin_registered_only_when_on(project):
    project.pytester.makeconftest(PLAIN_CONFTEST)
    project.run("--stage=mild", "--llmgate-no-cache")
    assert json.loads((project.path / "seen.json").read_text())["plugins"] == [
        "llmgate", "llmgate-collection", "llmgate-controller", "llmgate-progress", "llmgate-speed", "llmgate-worker"]
    project.run("--stage=mild", "--llmgate-no-cache", "--llmgate-no-speed")
    assert json.loads((project.path / "seen.json").read_text())["plugins"] == [
        "llmgate", "llmgate-collection", "llmgate-controller", "llmgate-progress", "llmgate-worker"]
    # The progress line: not under -q, nor with its switch.
    for quiet in ("-q", "--llmgate-no-progress"):
        project.run("--stage=mild", "--llmgate-no-cache", "--llmgate-no-speed", quiet)
        assert json.loads((project.path / "seen.json").read_text())["plugins"] == [
            "llmgate", "llmgate-collection", "llmgate-controller", "llmgate-worker"]
    # The reports' plugin: a report asked for, or the run history (kept beside the result cache).
    for reports in (("--llmgate-no-cache", "--llmgate-csv=r.csv"), ()):
        project.run("--stage=mild", "--llmgate-no-speed", *reports)
        assert json.loads((project.path / "seen.json").read_text())["plugins"] == [
            "llmgate", "llmgate-collection", "llmgate-controller", "llmgate-progress", "llmgate-reports",
            "llmgate-worker"]
    project.run("--stage=mild", "--llmgate-no-cache", "--llmgate-adaptive")
    assert json.loads((project.path / "seen.json").read_text())["plugins"] == [
        "llmgate", "llmgate-adaptive", "llmgate-adaptive-controller", "llmgate-collection", "llmgate-controller",
        "llmgate-progress", "llmgate-speed", "llmgate-worker"]
    project.run("--stage=mild", "--llmgate-plan")
    assert json.loads((project.path / "seen.json").read_text())["plugins"] == [
        "llmgate", "llmgate-collection", "llmgate-plan"]
    project.run()
    assert json.loads((project.path / "seen.json").read_text())["plugins"] == ["llmgate", "llmgate-collection"]


def test_two_sessions_in_one_process_share_nothing(project):
    first = project.run("--stage=baseline")
    assert first.ret == 0
    cache = project.path / ".llmgate" / "cache.sqlite"
    stored = cache.read_bytes()
    # The second session, in the same process, has the cache off: it must neither read nor write the first's.
    second = project.run("--stage=baseline", "--llmgate-no-cache", "--llmgate-report=report.json")
    assert second.ret == 0
    assert project.report()["models"]["baseline"] == {**project.report()["models"]["baseline"],
                                                       "evaluated": 20, "cached": 0, "stored": 0}
    assert cache.read_bytes() == stored
    second.stdout.fnmatch_lines(["*the cache is off, so nothing was stored*"])


def test_ini_keys_stand_in_for_the_options(project):
    project.config(project.path.joinpath("pyproject.toml").read_text().replace(
        'addopts = "-p no:randomly"', 'addopts = "-p no:randomly"\nllmgate_limit = "5"\nllmgate_no_cache = true'))
    result = project.run("--stage=mild", "--llmgate-report=report.json")
    assert result.ret == 0
    report = project.report()
    assert report["tasks"]["arc_challenge"]["n"] == 5 and report["models"]["mild"]["stored"] == 0
    assert not (project.path / ".llmgate" / "cache.sqlite").exists()
    # The command line wins over the ini key.
    project.run("--stage=mild", "--llmgate-limit=7", "--llmgate-report=report.json")
    assert project.report()["tasks"]["arc_challenge"]["n"] == 7


def test_the_command_line_limit_caps_a_task_limit_too(project):
    text = project.path.joinpath("pyproject.toml").read_text()
    project.config(text + "\n[tool.llmgate.task.arc_challenge]\nlimit = 12\n")
    project.run("--stage=mild", "--llmgate-report=report.json")
    assert project.report()["tasks"]["arc_challenge"]["n"] == 12
    project.run("--stage=mild", "--llmgate-limit=3", "--llmgate-report=report.json")
    assert project.report()["tasks"]["arc_challenge"]["n"] == 3


STEP_RULE = """
[[tool.llmgate.stages]]
name = "stepped"
model = "base"
bits = 1
min_retention = 0.5
min_step_retention = 0.5
"""


def test_a_step_rule_does_not_lend_the_previous_rung_its_regressions(project):
    # 'stepped' is the baseline model itself (no regression); the rung before it, 'harsh', regresses a lot.
    project.config(project.path.joinpath("pyproject.toml").read_text().replace(
        "[[tool.llmgate.critical]]", STEP_RULE + "\n[[tool.llmgate.critical]]"))
    result = project.run("--stage=stepped", "--llmgate-report=report.json")
    report = project.report()
    assert set(report["models"]) == {"baseline", "harsh", "stepped"}  # the previous rung was evaluated
    assert any(i["stages"]["harsh"]["scores"]["acc_norm"] < i["baseline"]["scores"]["acc_norm"]
               for i in report["items"])
    # ... but the letters, the counts and each item's status are about 'stepped' alone.
    assert {i["status"] for i in report["items"]} == {"same"}
    assert "regressed" not in result.parseoutcomes()
    assert result.ret == 0, result.stdout.str()


def test_the_plan_of_a_stepped_stage_is_about_that_stage(project):
    project.config(project.path.joinpath("pyproject.toml").read_text().replace(
        "[[tool.llmgate.critical]]", STEP_RULE + "\n[[tool.llmgate.critical]]"))
    assert project.run("--stage=stepped").ret == 0  # caches baseline, harsh and stepped
    plan = project.run("--stage=stepped", "--llmgate-plan")
    # 'stepped' agrees with the baseline on every item: a measured discordance of 0 (harsh's is far above).
    plan.stdout.fnmatch_lines(["*arc_challenge*20*1.000 (20)*0.000*"])


def test_data_edited_between_two_sessions_in_one_process_is_read_again(project):
    assert project.run("--stage=baseline").ret == 0
    data = project.path / "data" / "arc_challenge" / "test.jsonl"
    data.write_text(data.read_text().replace("Synthetic question 3?", "Synthetic question 3 (reworded)?"))
    project.run("--stage=baseline", "--llmgate-report=report.json")
    # New rows, a new data hash: the task's results are evaluated again, not read from memory or the cache.
    assert project.report()["models"]["baseline"]["evaluated"] == 20


MODEL_FIXTURE_TESTS = '''
import pytest
from pytest_llmgate.tasks.base import LoglikelihoodRequest

def test_golden_prompt(llmgate_model):
    baseline, candidate = llmgate_model("baseline"), llmgate_model("mild")
    assert candidate is llmgate_model("good")  # the stage's model, by its name too
    request = [LoglikelihoodRequest("Synthetic question 0?", " answer RIGHT")]
    assert len(baseline.loglikelihood(request)) == len(candidate.loglikelihood(request)) == 1

def test_unknown_role(llmgate_model):
    with pytest.raises(LookupError, match=r"llmgate_model\\('nope'\\): not a model of this run \\(--stage=mild"):
        llmgate_model("nope")
'''


def test_llmgate_model_gives_the_runs_loaded_backends_once_per_process(pytester, monkeypatch, tmp_path):
    from doubles import LOADS_ENV

    project = make_project(pytester, monkeypatch, items=8)
    pytester.makepyfile(test_models=MODEL_FIXTURE_TESTS)
    loads = tmp_path / "loads.txt"
    monkeypatch.setenv(LOADS_ENV, str(loads))
    result = project.run("--stage=mild", "-p", "no:xdist", "--llmgate-no-cache")
    result.assert_outcomes(passed=10)
    # The benchmark items and the user's tests share one load of each model.
    assert sorted(line.split()[1] for line in loads.read_text().splitlines()) == ["base", "good"]
    # Without --stage the fixture skips, as llmgate_outcome does.
    project.run("-p", "no:xdist", "test_models.py").assert_outcomes(skipped=2)

"""--llmgate-adaptive: shards in a seeded random order, a task stops once its floor is resolved."""

from __future__ import annotations

import pytest
from gateproject import make_project


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch):
    # 400 items; "good" answers exactly like the baseline, "bad" knows 30% of them.
    return make_project(pytester, monkeypatch, items=400, base_skill=0.8, good_skill=0.8, bad_skill=0.3)


def test_a_clearly_retained_task_passes_early_and_skips_the_rest(project):
    result = project.run("--stage=mild", "--llmgate-adaptive", "--llmgate-report=report.json", "-rs")
    report = project.report()
    decided = report["adaptive"]["tasks"]["arc_challenge"]
    assert decided["decision"] == "pass" and decided["items"] < 400
    assert report["adaptive"]["items_skipped"] == 400 - report["tasks"]["arc_challenge"]["n"] > 0
    assert result.ret == 0 and report["verdict"] == "pass"
    assert result.parseoutcomes()["skipped"] == report["adaptive"]["items_skipped"]
    result.stdout.fnmatch_lines(["*llmgate adaptive: arc_challenge pass after * items; * items skipped*",
                                 "*SKIPPED*llmgate adaptive: arc_challenge resolved (pass) after*"])
    # Shards ran in a seeded random order, not row order, and whole shards stayed together.
    doc_ids = [item["doc_id"] for item in report["items"]]
    assert sorted(doc_ids) != list(range(len(doc_ids)))


def test_a_clear_loss_fails_early(project):
    result = project.run("--stage=harsh", "--llmgate-adaptive", "--llmgate-report=report.json")
    report = project.report()
    assert report["adaptive"]["tasks"]["arc_challenge"]["decision"] == "fail"
    assert report["adaptive"]["items_skipped"] > 0 and result.ret in (10, 11)
    assert any(r["rule"] == "arc_challenge: retention >= 0.90" and not r["passed"] and "adaptive" in r["detail"]
               for r in report["rules"])


def test_adaptive_works_across_xdist_workers(project):
    result = project.run("--stage=mild", "--llmgate-adaptive", "-n", "2", "--llmgate-report=report.json",
                         subprocess=True)
    report = project.report()
    assert result.ret == 0, result.stdout.str()
    assert report["adaptive"]["tasks"]["arc_challenge"]["decision"] == "pass"
    assert report["adaptive"]["items_skipped"] > 0


def test_adaptive_needs_a_single_stage(project):
    assert project.run("--stage=all", "--llmgate-adaptive").ret == 4

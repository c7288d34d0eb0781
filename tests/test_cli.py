"""The ``llmgate`` command line, run as a subprocess on real reports, histories and caches (pytester runs)."""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import sqlite3
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from gateproject import make_project

from pytest_llmgate.cli import main
from pytest_llmgate.history import History

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch):
    return make_project(pytester, monkeypatch)


def llmgate(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m pytest_llmgate.cli ARGS`` in ``cwd``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "pytest_llmgate.cli", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def lines_of(text: str) -> list[str]:
    """Lines with runs of spaces squeezed, so assertions do not depend on column widths."""
    return [" ".join(line.split()) for line in text.splitlines()]


def run_stage(project: Any, stage: str, report: str, *more: str) -> dict[str, Any]:
    project.run(f"--stage={stage}", f"--llmgate-report={report}", *more)
    return project.report(report)


def test_show_summarises_a_report(project):
    run_stage(project, "all", "all.json", "--llmgate-no-cache")
    done = llmgate("show", "all.json", cwd=project.path)
    assert done.returncode == 0, done.stderr
    out = lines_of(done.stdout)
    assert out[0] == "llmgate report all.json: stage all, verdict PASS (exit 0), selected stage mild"
    assert "stage task metric n baseline score retention threshold result" in out
    assert "harsh arc_challenge acc_norm 20 1.000 0.650 0.650 0.90 FAIL" in out
    assert "mild arc_challenge acc_norm 20 1.000 1.000 1.000 0.90 pass" in out
    assert any(line.startswith("mild pass 1.000 - - - - -") for line in out)  # the double has no size or speed
    assert any(line.startswith("CRITICAL [harsh] critical: any task below 80% of baseline") for line in out)
    assert out[-1] == "items: 20 (7 regressed, 0 improved)"
    assert done.stderr == ""


def test_show_md_and_html_use_the_renderers_or_say_they_are_missing(project, monkeypatch, capsys):
    run_stage(project, "mild", "r.json", "--llmgate-no-cache")
    report = project.path / "r.json"
    markdown = types.ModuleType("pytest_llmgate.report.markdown")
    markdown.render_markdown = lambda r: f"# llmgate: {r['verdict']}"  # type: ignore[attr-defined]
    html = types.ModuleType("pytest_llmgate.report.html")
    html.render_html = lambda r: f"<html>{r['stage']}</html>"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pytest_llmgate.report.markdown", markdown)
    monkeypatch.setitem(sys.modules, "pytest_llmgate.report.html", html)
    out_html = project.path / "out" / "r.html"
    capsys.readouterr()  # what the pytester run printed
    assert main(["show", str(report), "--md", "--html", str(out_html)]) == 0
    assert capsys.readouterr().out.splitlines() == ["# llmgate: pass", f"llmgate: HTML report written to {out_html}"]
    assert out_html.read_text() == "<html>mild</html>"

    monkeypatch.setitem(sys.modules, "pytest_llmgate.report.markdown", None)  # not installed
    monkeypatch.setitem(sys.modules, "pytest_llmgate.report.html", None)
    assert main(["show", str(report), "--md"]) == 2
    err = capsys.readouterr().err
    assert (
        err == "llmgate: error: --md needs pytest_llmgate.report.markdown, which this installation does not have yet\n"
    )
    assert main(["show", str(report), "--html", str(out_html)]) == 2
    assert "--html needs pytest_llmgate.report.html" in capsys.readouterr().err


def test_compare_two_runs_scores_retention_and_changed_items(project):
    first = run_stage(project, "mild", "a.json", "--llmgate-no-cache")
    project.weights("good", skill=0.6, seed=1)
    second = run_stage(project, "mild", "b.json", "--llmgate-no-cache")
    score_a = first["stages"]["mild"]["tasks"]["arc_challenge"]["candidate"]["score"]
    score_b = second["stages"]["mild"]["tasks"]["arc_challenge"]["candidate"]["score"]
    assert score_b < score_a
    changed = [
        a["id"]
        for a, b in zip(first["items"], second["items"], strict=True)
        if a["status"] != b["status"]
        or a["stages"]["mild"]["prediction_norm"] != b["stages"]["mild"]["prediction_norm"]
    ]
    assert len(changed) > 3

    done = llmgate("compare", "a.json", "b.json", "--limit", "3", cwd=project.path)
    assert done.returncode == 0, done.stderr
    out = lines_of(done.stdout)
    assert out[0] == "llmgate compare: A = a.json (stage mild, pass, exit 0)"
    assert out[1].startswith("B = b.json (stage mild, ")
    assert "stage task n A n B base A base B score A score B delta ret A ret B delta" in out
    delta = f"{score_b - score_a:+.3f}"
    assert (
        f"mild arc_challenge 20 20 1.000 1.000 {score_a:.3f} {score_b:.3f} {delta} {score_a:.3f} {score_b:.3f} {delta}"
        in out
    )
    assert f"items: 20 in both, {len(changed)} differ in status or prediction" in out
    listed = [line for line in out if line.startswith("arc_challenge test-")]
    assert len(listed) == 3 and all("mild prediction 0 -> " in line or "status same -> " in line for line in listed)
    assert out[-1] == f"... and {len(changed) - 3} more (--limit to list more)"

    same = llmgate("compare", "a.json", "a.json", cwd=project.path)
    assert same.returncode == 0 and "items: 20 in both, 0 differ in status or prediction" in lines_of(same.stdout)


def test_history_lists_runs_and_flags_drift(project, tmp_path):
    report = run_stage(project, "mild", "r.json", "--llmgate-no-cache")
    db = tmp_path / "history.sqlite"
    history = History(db)
    history.record(report, config_hash="0123456789abcdef", root=tmp_path)
    drifted = copy.deepcopy(report)
    drifted["stages"]["mild"]["tasks"]["arc_challenge"]["retention"] = 0.9
    history.record(drifted, config_hash="0123456789abcdef", root=tmp_path)

    done = llmgate("history", "--db", db, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = lines_of(done.stdout)
    assert out[0] == f"llmgate history {db}: 2 run(s)"
    assert out[1] == "run time (UTC) commit branch config stage verdict exit stages"
    assert out[2].startswith("1 ") and out[2].endswith(" - - 0123456789 mild pass 0 mild")
    assert "llmgate trend: stage 'mild', retention over the last 2 run(s), oldest first" in out
    assert (
        "arc_challenge retention 1.000 ↓ 0.900 score 1.000 → 1.000 DRIFT -0.100 since the previous run "
        "(the gate still passes)" in out
    )

    last = lines_of(llmgate("history", "--db", db, "--stage", "mild", "--last", "1", cwd=tmp_path).stdout)
    assert last[0] == f"llmgate history {db}: 1 run(s)" and "arc_challenge retention 0.900 score 1.000" in last
    other = llmgate("history", "--db", db, "--stage", "harsh", cwd=tmp_path)
    assert other.returncode == 0 and other.stdout.strip() == f"llmgate history {db}: no recorded runs of stage 'harsh'"


def test_cache_stats_and_prune_delete_for_real(project):
    run_stage(project, "mild", "r.json", "--llmgate-cache=c.sqlite")
    report = project.report("r.json")
    good = report["models"]["mild"]["fingerprint"]
    cache = project.path / "c.sqlite"

    stats = llmgate("cache", "stats", "--cache", cache, cwd=project.path)
    assert stats.returncode == 0, stats.stderr
    out = lines_of(stats.stdout)
    assert out[0].startswith(f"llmgate cache {cache}: ") and ", 40 results, oldest " in out[0]
    assert any(line.startswith(f"{good} 20 1 ") for line in out)

    pruned = llmgate("cache", "prune", "--cache", cache, "--model", good[:8], cwd=project.path)
    assert pruned.returncode == 0, pruned.stderr
    assert pruned.stdout.strip() == f"llmgate cache {cache}: pruned 20 results of model {good}; 20 results left"
    with sqlite3.connect(cache) as connection:
        assert connection.execute("SELECT COUNT(*) FROM results WHERE model = ?", (good,)).fetchone() == (0,)

    kept = llmgate("cache", "prune", "--cache", cache, "--older-than", "1", cwd=project.path)
    assert kept.stdout.strip().startswith(f"llmgate cache {cache}: pruned 0 results older than 1 days")
    gone = llmgate("cache", "prune", "--cache", cache, "--older-than", "0", cwd=project.path)
    assert gone.stdout.strip() == (
        f"llmgate cache {cache}: pruned 20 results older than 0 days and 0 sandbox verdicts; 0 results left"
    )
    # the next run evaluates again: the results are gone, not hidden
    project.run("--stage=mild", "--llmgate-report=again.json", "--llmgate-cache=c.sqlite")
    assert project.report("again.json")["models"]["mild"]["evaluated"] == 20


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["show", "missing.json"], "llmgate: error: missing.json: no such file"),
        (["show", "text.json"], "llmgate: error: text.json: not JSON (Expecting value: line 1 column 1 (char 0))"),
        (["show", "other.json"], "llmgate: error: other.json: schema 'other/2' is not 'llmgate-report/1'; *"),
        (["show", "list.json"], "llmgate: error: list.json: not an llmgate report (no 'schema' key; *"),
        (["show", "shape.json"], "llmgate: error: shape.json: malformed report: 'stages' is not a JSON object"),
        (["show", "."], "llmgate: error: .: is a folder, not a JSON report"),
        (["compare", "ok.json", "missing.json"], "llmgate: error: missing.json: no such file"),
        (["history", "--db", "none.sqlite"], "llmgate: error: none.sqlite: no run history *"),
        (["history", "--db", "text.json"], "llmgate: error: llmgate history text.json: it is not a SQLite database*"),
        (["cache", "stats", "--cache", "none.sqlite"], "llmgate: error: none.sqlite: no result cache there*"),
        (["cache", "stats", "--cache", "text.json"], "llmgate: error: llmgate cache text.json: it is not a SQLite*"),
        (["cache", "prune", "--cache", "text.json"], "llmgate: error: cache prune needs --older-than DAYS or --model*"),
        (["history", "--last", "0"], "*argument --last: 0 is below 1"),
        (["frobnicate"], "*invalid choice: 'frobnicate'*"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    (tmp_path / "text.json").write_text("not json at all" * 50)
    (tmp_path / "other.json").write_text(json.dumps({"schema": "other/2"}))
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "shape.json").write_text(json.dumps({"schema": "llmgate-report/1", "stages": [1]}))
    (tmp_path / "ok.json").write_text(json.dumps({"schema": "llmgate-report/1"}))
    done = llmgate(*args, cwd=tmp_path)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and done.stdout == ""
    last = done.stderr.strip().splitlines()[-1]
    assert fnmatch.fnmatchcase(last, message), last
    if args[0] != "frobnicate" and "--last" not in args:
        assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "none.sqlite").exists()  # reading creates nothing

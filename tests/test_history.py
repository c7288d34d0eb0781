"""The run history: runs recorded from real JSON reports (pytester, the double backend), trends, drift, git."""

from __future__ import annotations

import copy
import os
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import pytest
from gateproject import make_project

from pytest_llmgate.history import History, HistoryError, arrow, git_metadata


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch):
    return make_project(pytester, monkeypatch)


def gated_report(project: Any, stage: str = "mild") -> dict[str, Any]:
    """A real report of one run; the cache off, so the plugin records no history of its own."""
    result = project.run(f"--stage={stage}", "--llmgate-report=report.json", "--llmgate-no-cache")
    assert result.ret in (0, 10, 11)
    return project.report()


def with_retention(report: dict[str, Any], stage: str, value: float) -> dict[str, Any]:
    """A copy of ``report`` whose task of ``stage`` has retention ``value`` (the gate's verdict unchanged)."""
    edited = copy.deepcopy(report)
    edited["stages"][stage]["tasks"]["arc_challenge"]["retention"] = value
    return edited


def git(root: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def test_two_runs_then_a_drift_while_the_gate_passes(project, tmp_path):
    report = gated_report(project)
    assert report["verdict"] == "pass"
    history = History(tmp_path / "history.sqlite")
    first = history.record(report, config_hash="cfg1", root=tmp_path)
    second = history.record(with_retention(report, "mild", 0.95), config_hash="cfg1", root=tmp_path)
    assert second > first

    (row,) = history.trend("mild", last=5)
    assert row.task == "arc_challenge" and row.run_ids == (first, second)
    assert row.retentions == (1.0, 0.95) and row.scores == (1.0, 1.0)
    assert row.arrows == ("↓",) and row.drift and row.passed
    assert row.change == pytest.approx(-0.05)
    lines = history.trend_lines("mild", last=5)
    assert lines[0] == "llmgate trend: stage 'mild', retention over the last 2 run(s), oldest first"
    assert "retention 1.000 ↓ 0.950" in lines[1]
    assert "DRIFT -0.050 since the previous run (the gate still passes)" in lines[1]
    assert "fell by more than 0.020" in lines[-1]


def test_a_small_drop_is_an_arrow_but_no_drift(project, tmp_path):
    report = gated_report(project)
    history = History(tmp_path / "history.sqlite")
    for value in (0.96, 0.97, 0.969, 0.955):
        history.record(with_retention(report, "mild", value), config_hash="c", root=tmp_path)
    (row,) = history.trend("mild", last=3)
    assert row.retentions == (0.97, 0.969, 0.955)  # the last three, oldest first
    assert row.arrows == ("→", "↓") and not row.drift
    assert history.trend("mild", last=3, drift_tolerance=0.01)[0].drift
    assert not any("DRIFT" in line for line in history.trend_lines("mild", last=3))
    assert [arrow(0.9, 0.95), arrow(0.95, 0.9), arrow(0.9, 0.902), arrow(None, 0.9)] == ["↑", "↓", "→", "?"]


def test_runs_keep_verdict_git_config_and_stage_figures(project, tmp_path):
    report = gated_report(project, "all")
    assert report["selected_stage"] == "mild"
    # Sizes and speed come from real backends; the double has none, so give the report some to record.
    report["models"]["mild"].update(size_bytes=50_000_000, compression_ratio=2.0, peak_memory_mb=123.0)
    report["models"]["mild"]["speed"] = {
        "latency_ms": {"p50": 9.0, "p95": 12.5, "p99": 13.0},
        "decode_tokens_per_s": 88.0,
        "vs_reference": {"latency_ratio": {"point": 0.8, "lo": 0.7, "hi": 0.9}},
    }
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "release")
    (repo / "f.txt").write_text("x")
    git(repo, "add", "f.txt")
    git(repo, "commit", "-q", "-m", "one")
    head = git(repo, "rev-parse", "HEAD")

    history = History(tmp_path / "h.sqlite")
    run_id = history.record(report, config_hash="abc123", root=repo)
    (run,) = history.runs()
    assert run.id == run_id and run.commit == head and run.branch == "release"
    assert (run.stage, run.verdict, run.exit_code, run.selected_stage) == ("all", "pass", 0, "mild")
    assert run.config_hash == "abc123" and run.stages == ("harsh", "mild") and run.complete
    assert run.time.endswith("+00:00")
    ((record, figures),) = history.stage_history("mild")
    assert record.id == run_id
    assert figures == {
        "verdict": "pass",
        "mean_retention": 1.0,
        "size_mb": 50.0,
        "compression_ratio": 2.0,
        "p95_latency_ms": 12.5,
        "latency_ratio": 0.8,
        "decode_tokens_per_s": 88.0,
        "peak_memory_mb": 123.0,
    }
    with sqlite3.connect(tmp_path / "h.sqlite") as connection:
        rows = connection.execute(
            "SELECT stage, task, score, baseline_score, retention, n, passed FROM task_results ORDER BY stage"
        ).fetchall()
    assert rows == [("harsh", "arc_challenge", 0.65, 1.0, 0.65, 20, 0), ("mild", "arc_challenge", 1.0, 1.0, 1.0, 20, 1)]

    # the ladder's trend is each stage's; a filter by stage finds the ladder run, and --last bounds the runs
    lines = history.trend_lines("all")
    assert any("stage 'harsh'" in line for line in lines) and any("stage 'mild'" in line for line in lines)
    history.record(gated_report(project, "harsh"), config_hash="abc123", root=repo)
    assert [r.stage for r in history.runs(stage="mild")] == ["all"]
    assert [r.stage for r in history.runs(stage="harsh")] == ["all", "harsh"]
    assert [r.stage for r in history.runs(last=1)] == ["harsh"]


def test_git_metadata_without_a_repository_or_without_git(tmp_path, monkeypatch):
    assert git_metadata(tmp_path) == (None, None)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no git program at all
    assert git_metadata(tmp_path) == (None, None)
    history = History(tmp_path / "h.sqlite")
    history.record(
        {"schema": "llmgate-report/1", "stage": "mild", "stages": {}, "tasks": {}}, config_hash="c", root=tmp_path
    )
    assert history.runs()[0].commit is None


def test_a_baseline_run_is_recorded_under_the_baseline(project, tmp_path):
    report = gated_report(project, "baseline")
    assert report["stages"] == {}
    history = History(tmp_path / "h.sqlite")
    history.record(report, config_hash="c", root=tmp_path)
    (row,) = history.trend("baseline")
    assert row.scores == (1.0,) and row.retentions == (None,) and not row.drift


def test_reading_never_creates_the_file(tmp_path):
    history = History(tmp_path / "none" / "h.sqlite")
    assert history.runs() == [] and history.trend("mild") == []
    assert history.trend_lines("mild") == ["llmgate trend: no recorded runs of stage 'mild' yet"]
    assert not (tmp_path / "none").exists()


def test_a_damaged_file_or_a_folder_is_a_clear_error(tmp_path):
    damaged = tmp_path / "h.sqlite"
    damaged.write_bytes(b"this is not a database" * 100)
    report = {"schema": "llmgate-report/1", "stage": "mild", "stages": {}, "tasks": {}}
    with pytest.raises(HistoryError, match=r"h.sqlite: it is not a SQLite database.*this run was not recorded"):
        History(damaged).record(report, config_hash="c", root=tmp_path)
    with pytest.raises(HistoryError, match="not a SQLite database"):
        History(damaged).runs()
    with pytest.raises(HistoryError, match="is a folder"):
        History(tmp_path).record(report, config_hash="c", root=tmp_path)


def test_a_history_that_cannot_be_written_is_read_and_says_so(project, tmp_path, monkeypatch):
    path = tmp_path / "h.sqlite"
    report = gated_report(project)
    History(path).record(report, config_hash="c", root=tmp_path)
    real_connect = sqlite3.connect

    def read_only(database: Any, *args: Any, **kwargs: Any) -> sqlite3.Connection:
        # what a read-only file gives even to root: every write fails with "attempt to write a readonly database"
        if not kwargs.get("uri"):
            database, kwargs = f"{Path(database).resolve().as_uri()}?mode=ro", {**kwargs, "uri": True}
        return real_connect(database, *args, **kwargs)

    monkeypatch.setattr("pytest_llmgate.history.sqlite3.connect", read_only)
    with pytest.raises(HistoryError, match=r"h\.sqlite: it is read-only, so this run was not recorded"):
        History(path).record(report, config_hash="c", root=tmp_path)
    assert len(History(path).runs()) == 1


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes read-only files")
def test_a_read_only_history_is_read_but_not_written(project, tmp_path):
    path = tmp_path / "h.sqlite"
    report = gated_report(project)
    History(path).record(report, config_hash="c", root=tmp_path)
    path.chmod(0o444)
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(HistoryError, match="read-only, so this run was not recorded"):
            History(path).record(report, config_hash="c", root=tmp_path)
        assert len(History(path).runs()) == 1
    finally:
        tmp_path.chmod(0o755)
        path.chmod(0o644)

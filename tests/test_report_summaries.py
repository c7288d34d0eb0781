"""The Markdown summary and the CSV, rendered from a real run's report."""

from __future__ import annotations

import csv

import pytest
from gateproject import make_project

from pytest_llmgate.report.csv_report import COLUMNS, csv_rows, write_csv
from pytest_llmgate.report.markdown import DASH, render_markdown


@pytest.fixture
def report(pytester, monkeypatch):
    project = make_project(pytester, monkeypatch)
    result = project.run("--stage=all", "--llmgate-report=r.json", "--llmgate-no-speed")
    assert result.ret == 0
    return project.report("r.json")


def test_markdown_has_the_verdict_the_comparison_table_and_the_failed_rules(report):
    text = render_markdown(report)
    assert text.startswith("## llmgate: the ladder selects **mild** (exit 0)")
    task = report["tasks"]["arc_challenge"]
    mild = report["stages"]["mild"]["tasks"]["arc_challenge"]
    harsh = report["stages"]["harsh"]["tasks"]["arc_challenge"]
    row = next(line for line in text.splitlines() if line.startswith("| arc_challenge"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:4] == ["arc_challenge", task["metric"], str(task["n"]), f"{task['baseline']['score']:.3f}"]
    assert cells[4:6] == [f"{mild['candidate']['score']:.3f}", f"{harsh['candidate']['score']:.3f}"]
    assert cells[6].startswith(f"{mild['retention']:.3f} [") and cells[6].endswith("✅")
    assert "**Failed at `harsh`**" in text and "- critical: any task below 80% of baseline" in text
    assert "Failed at `mild`" not in text
    assert "Size, speed and memory" not in text  # nothing was measured by the double backend
    assert "<details><summary>Regressed items" in text  # harsh regressed items
    assert len(text.splitlines()) < 60


def test_markdown_shows_measured_size_and_speed_and_dashes_for_the_rest(report):
    report["models"]["mild"].update(
        size_bytes=91_726_912, compression_ratio=5.87, bits_per_weight=5.46, peak_memory_mb=252.0,
        speed={"latency_ms": {"p50": 98.0, "p95": 118.0, "p99": 120.0}, "decode_tokens_per_s": 212.0,
               "vs_reference": {"latency_ratio": {"point": 0.72, "lo": 0.68, "hi": 0.75}, "same_runtime": True}},
    )  # fmt: skip
    text = render_markdown(report)
    assert "| mild | 91.7 | 5.87x | 5.46 | 118 | 0.72x [0.68, 0.75] | 212 | 252 |" in text
    harsh = report["models"]["harsh"]["peak_memory_mb"]
    assert f"| harsh | {DASH} | {DASH} | {DASH} | {DASH} | {DASH} | {DASH} | {harsh:.0f} |" in text
    assert "None" not in text


def test_incomplete_runs_say_so_first():
    text = render_markdown({"verdict": "incomplete", "exit_code": 12, "stage": "mild",
                            "problems": ["hellaswag not checked: no item ran"], "stages": {}})  # fmt: skip
    assert text.startswith("## llmgate: INCOMPLETE (exit 12): hellaswag not checked")


def test_csv_has_one_row_per_task_and_stage_with_the_reports_figures(report, tmp_path):
    path = tmp_path / "r.csv"
    write_csv(report, path)
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(report["tasks"]) * len(report["stages"]) == len(csv_rows(report))
    assert list(rows[0]) == list(COLUMNS)
    for row in rows:
        figures = report["stages"][row["stage"]]["tasks"][row["task"]]
        assert float(row["retention"]) == pytest.approx(figures["retention"])
        assert float(row["retention_ci_low"]) == pytest.approx(figures["retention_ci"][0])
        assert int(row["losses"]) == figures["losses"]
        assert row["stage_verdict"] == report["stages"][row["stage"]]["verdict"]
        assert row["size_bytes"] == ""  # not measured: an empty cell

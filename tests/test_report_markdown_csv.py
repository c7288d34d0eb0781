"""The Markdown summary and the CSV, rendered from the JSON reports of real runs (two tasks, two stages)."""

from __future__ import annotations

import csv
import json
from typing import Any

import pytest
from gateproject import GateProject, make_project

from conftest import write_jsonl
from pytest_llmgate.report.csv_report import COLUMNS, csv_rows, write_csv
from pytest_llmgate.report.markdown import DASH, REGRESSED_SHOWN, render_markdown

BENCHMARK = '''
import pytest

@pytest.mark.llmgate("arc_challenge")
def test_arc(llmgate_outcome):
    """One synthetic ARC item."""

@pytest.mark.llmgate("gsm8k")
def test_gsm8k(llmgate_outcome):
    """One synthetic GSM8K item."""
'''

TASKS = ("arc_challenge", "gsm8k")
STAGES = ("mild", "harsh")


def _gsm8k_rows(count: int, offset: int = 0) -> list[dict[str, str]]:
    return [{"question": f"Tom has RIGHT={offset + i} apples. How many apples does Tom have?",
             "answer": f"He has {offset + i} apples.\n#### {offset + i}"} for i in range(count)]  # fmt: skip


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> GateProject:
    """The gate project of the plugin's tests with a second task (GSM8K): 2 tasks x 2 stages, 'harsh' fails."""
    project = make_project(pytester, monkeypatch)
    text = (project.path / "pyproject.toml").read_text()
    project.config(text.replace('tasks = ["arc_challenge"]', 'tasks = ["arc_challenge", "gsm8k"]'))
    write_jsonl(project.path / "data" / "gsm8k" / "test.jsonl", _gsm8k_rows(12))
    write_jsonl(project.path / "data" / "gsm8k" / "train.jsonl", _gsm8k_rows(10, offset=100))
    (project.path / "test_bench.py").write_text(BENCHMARK)
    return project


def _report(project: GateProject, *args: str, ret: int) -> dict[str, Any]:
    result = project.run(*args, "--llmgate-report=r.json", "--llmgate-no-speed")
    assert result.ret == ret, result.stdout.str()
    return project.report("r.json")


@pytest.fixture
def ladder(project: GateProject) -> dict[str, Any]:
    """The report of ``--stage=all``: 'mild' is selected, 'harsh' fails its critical floor."""
    return _report(project, "--stage=all", ret=0)


def _rows(text: str) -> dict[str, list[str]]:
    """The comparison table's rows by task, as stripped cells."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in TASKS and cells[0] not in rows:
            rows[cells[0]] = cells
    return rows


def _retention(task: dict[str, Any]) -> str:
    lo, hi = task["retention_ci"]
    return f"{task['retention']:.3f} [{lo:.3f}, {hi:.3f}]"


def test_the_ladder_summary_has_the_verdict_the_comparison_table_and_the_failed_rules(ladder):
    assert list(ladder["stages"]) == list(STAGES) and ladder["selected_stage"] == "mild"
    text = render_markdown(ladder)
    assert text.startswith("## llmgate: the ladder selects **mild** (exit 0)\n")
    rows = _rows(text)
    assert set(rows) == set(TASKS)
    for task, cells in rows.items():
        figures = ladder["tasks"][task]
        stages = [ladder["stages"][s]["tasks"][task] for s in STAGES]
        assert cells[:4] == [task, figures["metric"], str(figures["n"]), f"{figures['baseline']['score']:.3f}"]
        assert cells[4:6] == [f"{s['candidate']['score']:.3f}" for s in stages]
        mild = stages[0]
        assert mild["passed"] and mild["retention"] == figures["retention"]  # the selected stage's retention
        assert cells[6] == _retention(mild) + " ✅"
    assert "| task | metric | n | baseline | mild | harsh | retention (mild) |" in text
    assert "Stages: mild **pass**, harsh **critical**." in text
    # The failed rules of every stage, grouped under it: only 'harsh' has any.
    failed = [r for r in ladder["stages"]["harsh"]["rules"] if not r["passed"]]
    assert failed and "**Failed at `harsh`**" in text and "Failed at `mild`" not in text
    for rule in failed:
        assert f"- {rule['rule']}: {rule['detail']}".replace("<", "&lt;") in text
    assert "Size, speed and memory" not in text  # the double backend measures no size or speed
    assert "None" not in text
    assert len(text.splitlines()) < 60


def test_regressed_items_are_folded_away_at_most_ten(ladder):
    regressed = [i for i in ladder["items"] if i["status"] == "regressed"]
    assert len(regressed) > REGRESSED_SHOWN  # harsh loses about half of each task
    text = render_markdown(ladder)
    folded = text.split("<details>", 1)[1]
    assert folded.startswith(f"<summary>Regressed items (first {REGRESSED_SHOWN} of {len(regressed)})</summary>")
    assert folded.rstrip().endswith("</details>")
    table = [line for line in folded.splitlines() if line.startswith("| ")]
    assert table[0] == "| item | prompt | gold | baseline | mild | harsh |"
    assert len(table) == 2 + REGRESSED_SHOWN
    first = regressed[0]
    assert table[2].startswith(f"| {first['task']} {first['id']} | ")
    assert "\n" not in "".join(table) and "None" not in folded


def test_a_gated_stage_that_fails_says_so_with_a_cross(project):
    report = _report(project, "--stage=harsh", ret=11)
    text = render_markdown(report)
    assert text.startswith("## llmgate: stage `harsh` **CRITICAL** (exit 11)\n")
    rows = _rows(text)
    for task in TASKS:
        figures = report["stages"]["harsh"]["tasks"][task]
        assert rows[task][4] == f"{figures['candidate']['score']:.3f}"
        assert rows[task][5] == _retention(figures) + (" ✅" if figures["passed"] else " ❌")
    assert any(cells[5].endswith("❌") for cells in rows.values())
    assert "**Failed at `harsh`**" in text


def test_an_incomplete_run_says_so_with_its_first_problem(project):
    text = (project.path / "pyproject.toml").read_text()
    project.config(text.replace('"arc_challenge", "gsm8k"]', '"arc_challenge", "gsm8k", "hellaswag"]'))
    report = _report(project, "--stage=mild", ret=12)
    assert report["verdict"] == "incomplete" and report["problems"]
    markdown = render_markdown(report)
    assert markdown.startswith(f"## llmgate: INCOMPLETE (exit 12): {report['problems'][0]}\n")
    assert "hellaswag not checked" in markdown.splitlines()[0]


def test_a_task_at_chance_is_marked_and_does_not_pass_or_fail(project):
    # A margin above chance that a perfect baseline on 4 choices does not clear, but one on GSM8K (chance 0) does.
    report = _report(project, "--stage=mild", "--llmgate-set", "chance_margin=0.9", ret=0)
    arc = report["stages"]["mild"]["tasks"]["arc_challenge"]
    assert arc["informative"] is False and report["stages"]["mild"]["tasks"]["gsm8k"]["informative"] is True
    cells = _rows(render_markdown(report))["arc_challenge"]
    assert cells[-1].endswith("(at chance)") and "✅" not in cells[-1] and "❌" not in cells[-1]


def test_measured_size_speed_and_memory_get_a_table_with_dashes_for_the_rest(ladder):
    models = ladder["models"]
    models["baseline"].update(size_bytes=538_060_032, compression_ratio=1.0, bits_per_weight=32.0, peak_memory_mb=None)
    models["mild"].update(
        size_bytes=91_726_912, compression_ratio=5.87, bits_per_weight=5.46, peak_memory_mb=252.0,
        speed={"latency_ms": {"p50": 98.0, "p95": 118.4, "p99": 120.0}, "decode_tokens_per_s": 212.3,
               "vs_reference": {"latency_ratio": {"point": 0.72, "lo": 0.68, "hi": 0.75}, "same_runtime": True,
                                "reference_model": "smollm2-f16"}},
    )  # fmt: skip
    ratio = {"point": 7.24, "lo": None, "hi": None}  # e.g. against a reference in another runtime
    models["harsh"] = {
        "peak_memory_mb": None,
        "speed": {"vs_reference": {"latency_ratio": ratio, "same_runtime": False}},
    }
    text = render_markdown(ladder)
    assert "**Size, speed and memory**" in text
    assert "| stage | size MB | smaller | bits/w | p95 ms | p95 vs reference | decode tok/s | peak MB |" in text
    assert f"| baseline | 538.1 | 1.00x | 32.00 | {DASH} | {DASH} | {DASH} | {DASH} |" in text
    assert "| mild | 91.7 | 5.87x | 5.46 | 118 | 0.72x [0.68, 0.75] vs smollm2-f16 | 212 | 252 |" in text
    assert f"| harsh | {DASH} | {DASH} | {DASH} | {DASH} | 7.24x (another runtime) | {DASH} | {DASH} |" in text
    assert "None" not in text
    assert len(text.splitlines()) < 60


def test_absent_figures_are_dashes_never_none(ladder):
    harsh = ladder["stages"]["harsh"]["tasks"]["gsm8k"]
    harsh["candidate"]["score"] = None
    ladder["tasks"]["gsm8k"].update(n=None, metric=None)
    ladder["stages"]["mild"]["tasks"]["gsm8k"].update(retention=None, retention_ci=None)
    text = render_markdown(ladder)
    cells = _rows(text)["gsm8k"]
    assert cells[1:3] == [DASH, DASH] and cells[5] == DASH and cells[6] == DASH
    assert "None" not in text


def test_cells_cannot_break_the_table_or_the_page(ladder):
    regressed = next(i for i in ladder["items"] if i["status"] == "regressed")
    regressed["prompt"] = "Which | is </details> here?\nAnswer:"
    text = render_markdown(ladder)
    assert "Which \\| is &lt;/details&gt; here? Answer:" in text
    assert text.count("</details>") == 1


def test_a_report_without_stages_renders(project):
    report = _report(project, "--stage=baseline", ret=0)
    text = render_markdown(report)
    assert text.startswith("## llmgate: stage `baseline` **BASELINE-RECORDED** (exit 0)")
    assert "None" not in text


def test_the_csv_has_one_row_per_task_and_stage_that_reads_back_to_the_reports_figures(ladder, tmp_path):
    ladder["models"]["mild"].update(size_bytes=91_726_912, compression_ratio=5.87, peak_memory_mb=252.5,
                                    speed={"latency_ms": {"p95": 118.4}, "decode_tokens_per_s": 212.3,
                                           "vs_reference": {"latency_ratio": {"point": 0.72, "lo": 0.68,
                                                                              "hi": 0.75}}})  # fmt: skip
    path = tmp_path / "r.csv"
    write_csv(ladder, path)
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(TASKS) * len(STAGES) == len(ladder["tasks"]) * len(ladder["stages"])
    assert len(csv_rows(ladder)) == len(rows)
    assert list(rows[0]) == list(COLUMNS)
    assert [(r["stage"], r["task"]) for r in rows] == [(s, t) for s in STAGES for t in TASKS]
    for row in rows:
        stage = ladder["stages"][row["stage"]]
        figures = stage["tasks"][row["task"]]
        assert row["metric"] == figures["metric"] and int(row["n"]) == figures["n"]
        assert float(row["chance"]) == figures["chance"]
        assert row["informative"] == str(figures["informative"]) and row["passed"] == str(figures["passed"])
        assert row["stage_verdict"] == stage["verdict"]
        assert float(row["baseline_score"]) == figures["baseline"]["score"]
        assert float(row["stage_score"]) == figures["candidate"]["score"]
        assert float(row["retention"]) == figures["retention"]
        assert [float(row["retention_ci_low"]), float(row["retention_ci_high"])] == figures["retention_ci"]
        assert float(row["threshold"]) == figures["threshold"]
        assert [int(row[k]) for k in ("wins", "losses", "ties")] == [figures[k] for k in ("wins", "losses", "ties")]
        assert float(row["mcnemar_p"]) == figures["mcnemar"]["p_value"]
        assert float(row["noninferiority_p"]) == figures["noninferiority"]["p_value"]
    mild, harsh = rows[0], rows[-1]
    assert int(mild["size_bytes"]) == 91_726_912 and float(mild["compression_ratio"]) == 5.87
    assert float(mild["latency_p95_ms"]) == 118.4 and float(mild["latency_ratio"]) == 0.72
    assert [float(mild["latency_ratio_low"]), float(mild["latency_ratio_high"])] == [0.68, 0.75]
    assert float(mild["decode_tokens_per_s"]) == 212.3 and float(mild["peak_memory_mb"]) == 252.5
    assert mild["bits_per_weight"] == "" and harsh["size_bytes"] == "" and harsh["latency_ratio"] == ""
    # The JSON's own numbers survive a dump: the CSV agrees with the file, not only with the dict.
    assert json.loads(json.dumps(ladder))["stages"] == ladder["stages"]

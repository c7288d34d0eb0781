"""The reports people read, wired into a run: one report dict feeds the Markdown (and the GitHub step summary),
the HTML, the CSV, the run history and the trend lines; a path that cannot be written is a usage error first."""

from __future__ import annotations

import csv

import pytest
from gateproject import make_project


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch):
    return make_project(pytester, monkeypatch)


def test_one_run_writes_every_report_and_the_history(project, monkeypatch):
    summary = project.path / "step-summary.md"
    summary.write_text("an earlier step's summary\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    args = ("--stage=all", "--llmgate-md=out/r.md", "--llmgate-html=out/r.html", "--llmgate-csv=out/r.csv",
            "--llmgate-report=r.json", "--llmgate-trend")  # fmt: skip
    first = project.run(*args)
    assert first.ret == 0, first.stdout.str()
    report = project.report("r.json")
    markdown = (project.path / "out" / "r.md").read_text()
    assert "mild" in markdown and "harsh" in markdown
    # The step summary keeps what was there and gets the same Markdown.
    assert summary.read_text() == "an earlier step's summary\n" + markdown + "\n"
    page = (project.path / "out" / "r.html").read_text()
    assert page.lstrip().lower().startswith("<!doctype html") and "<svg" in page
    with (project.path / "out" / "r.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(report["tasks"]) * len(report["stages"])
    for kind in ("Markdown summary", "HTML report", "CSV"):
        first.stdout.fnmatch_lines([f"llmgate {kind}: *out*"])
    assert (project.path / ".llmgate" / "history.sqlite").is_file()

    second = project.run(*args)
    assert second.ret == 0
    out = second.stdout.str()
    assert "arc_challenge" in out.split("llmgate CSV")[-1], out  # the trend lines follow the reports' lines


def test_a_report_path_that_cannot_be_written_is_a_usage_error(project):
    (project.path / "taken").mkdir()
    result = project.run("--stage=mild", "--llmgate-html=taken")
    assert result.ret == 4
    result.stderr.fnmatch_lines(["*--llmgate-html*taken is a folder; give a file path such as *llmgate.html*"])

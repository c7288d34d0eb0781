"""The HTML report: escaping, and the page itself in a real headless Chromium (Debian's chromium, Selenium)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gateproject import make_project

from pytest_llmgate.report.html import render_html

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
INSTALL_HINT = "run scripts/install.sh as root (it installs Debian's chromium and chromium-driver)"


def minimal_report(prompt: str = "Question?", choices: tuple[str, ...] = ("yes", "no")) -> dict[str, Any]:
    """A hand-made report with one stage, one task and one regressed item."""
    side = {"prediction": 0, "scores": {"acc": 1.0}}
    return {
        "schema": "llmgate-report/1",
        "stage": "int4",
        "verdict": "breach",
        "exit_code": 10,
        "models": {"baseline": {"compression_ratio": 1.0}, "int4": {"compression_ratio": 4.0}},
        "tasks": {},
        "stages": {
            "int4": {
                "verdict": "breach",
                "mean_retention": 0.5,
                "tasks": {
                    "arc_challenge": {
                        "retention": 0.5,
                        "retention_ci": [0.2, 0.9],
                        "threshold": 0.95,
                        "wins": 0,
                        "losses": 1,
                        "ties": 0,
                    }
                },
                "rules": [{"rule": "arc_challenge: retention >= 0.95", "passed": False, "detail": "0.5 <b>x</b>"}],
            }
        },
        "items": [
            {
                "task": "arc_challenge",
                "doc_id": 0,
                "id": "test-0",
                "metric": "acc",
                "gold": 0,
                "prompt": prompt,
                "choices": list(choices),
                "status": "regressed",
                "baseline": side,
                "stages": {"int4": {"prediction": 1, "scores": {"acc": 0.0}}},
            }
        ],
    }


def test_prompts_choices_and_details_stay_text() -> None:
    page = render_html(minimal_report(prompt='<script>alert("x")</script> & "q"', choices=("<b>a</b>", "it's")))
    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &quot;q&quot;" in page
    assert "&lt;b&gt;a&lt;/b&gt;" in page and "it&#x27;s" in page
    assert "0.5 &lt;b&gt;x&lt;/b&gt;" in page  # a rule's detail too
    assert page.count("<script>") == 1  # only the page's own filter script


def test_the_page_needs_no_network() -> None:
    page = render_html(minimal_report())
    for reference in ('src="', "src='", 'href="http', "url(http", "@import", "<link", "<iframe"):
        assert reference not in page
    assert page.count("<svg") == 4


def test_long_prompt_keeps_its_end_and_says_what_was_left_out() -> None:
    prompt = "context " * 1000 + "\n\nThe real question?"
    page = render_html(minimal_report(prompt=prompt))
    assert "The real question?</summary>" in page
    assert "earlier characters left out" in page


def test_without_compression_ratios_stages_go_in_ladder_order() -> None:
    report = minimal_report()
    report["models"] = {}
    page = render_html(report)
    assert "compression ratio not measured" in page


def test_mmlu_items_are_grouped_by_subject() -> None:
    report = minimal_report()
    report["items"][0].update(task="mmlu", id="high_school_physics-3")
    page = render_html(report)
    assert 'data-subject="high_school_physics"' in page and "MMLU by subject" in page


# --- the page in a browser ------------------------------------------------------------------------------------------


@pytest.fixture
def browser() -> Iterator[Any]:
    """Headless Debian Chromium through its chromedriver; a missing one fails (CI installs it)."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(f"{' and '.join(missing)} not installed: {INSTALL_HINT}", pytrace=False)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: pip install -e '.[test]'", pytrace=False)
    driver = open_browser(webdriver, Service)
    try:
        yield driver
    finally:
        driver.quit()


def open_browser(webdriver: Any, service: Any) -> Any:
    """A headless Chromium session with browser console logging on."""
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(
        service=service(executable_path=str(CHROMEDRIVER), log_output=subprocess.DEVNULL), options=options
    )


def screenshots(driver: Any, directory: Path, stem: str, *, page_height: int = 1600) -> list[Path]:
    """The whole page in one image, then in pages of ``page_height`` pixels if it is taller."""
    directory.mkdir(parents=True, exist_ok=True)
    height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    driver.set_window_size(1400, min(height, 16000))
    paths = [directory / f"{stem}-full.png"]
    driver.save_screenshot(str(paths[0]))
    if height > page_height:
        driver.set_window_size(1400, page_height)
        for index, top in enumerate(range(0, height, page_height)):
            driver.execute_script("window.scrollTo(0, arguments[0])", top)
            paths.append(directory / f"{stem}-{index + 1}.png")
            driver.save_screenshot(str(paths[-1]))
        driver.execute_script("window.scrollTo(0, 0)")
    return paths


def visible_rows(driver: Any) -> list[Any]:
    """The item rows the filters leave shown."""
    return [row for row in driver.find_elements("css selector", "tr.item") if row.is_displayed()]


def test_html_report_of_a_real_ladder_run_works_in_a_browser(
    browser: Any, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    from selenium.webdriver.support.ui import Select

    project = make_project(pytester, monkeypatch)
    result = project.run("--stage=all", "--llmgate-report=r.json")
    assert result.ret == 0, result.stdout.str()
    report = project.report("r.json")
    regressed = sorted(i["id"] for i in report["items"] if i["status"] == "regressed")
    assert regressed, "the double's bad stage should regress some items"
    page = project.path / "report.html"
    page.write_text(render_html(report), encoding="utf-8")

    browser.get(page.as_uri())
    assert "llmgate" in browser.title
    charts = browser.find_elements("css selector", "figure.chart svg")
    assert len(charts) == 4
    for chart in charts:
        assert chart.find_elements("css selector", "path, rect"), chart.get_attribute("outerHTML")[:200]
    assert len(visible_rows(browser)) == len(report["items"])

    Select(browser.find_element("id", "status-filter")).select_by_value("regressed")
    shown = visible_rows(browser)
    assert sorted(row.find_elements("css selector", "td")[1].text for row in shown) == regressed
    assert browser.find_element("id", "shown").text == f"{len(regressed)} of {len(report['items'])} items shown"

    Select(browser.find_element("id", "status-filter")).select_by_value("all")
    target = report["items"][3]
    browser.find_element("id", "search").send_keys(target["id"])
    assert [row.find_elements("css selector", "td")[1].text for row in visible_rows(browser)] == [target["id"]]
    browser.find_element("id", "search").clear()
    browser.find_element("id", "search").send_keys("no such text anywhere")
    assert visible_rows(browser) == []

    severe = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert severe == [], json.dumps(severe, indent=1)
    directory = os.environ.get("LLMGATE_SCREENSHOT_DIR")
    if directory:
        browser.find_element("id", "search").clear()
        browser.execute_script("document.getElementById('search').dispatchEvent(new Event('input'))")
        screenshots(browser, Path(directory), "gate-project")

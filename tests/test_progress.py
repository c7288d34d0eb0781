"""The progress line: plain periodic lines in a log, one line rewritten in place on a real terminal (a pty), none
under -q; counts per task, items per second and an ETA; with and without xdist."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys

import pytest
from gateproject import make_project

from pytest_llmgate.progress import _duration

LINE = re.compile(r"llmgate: arc_challenge (\d+)/20 · (\d+)/20 items")


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch):
    return make_project(pytester, monkeypatch)


def test_in_a_log_every_report_gives_a_line_at_interval_zero(project):
    result = project.run("--stage=mild", "--llmgate-no-speed", "-o", "llmgate_progress_interval=0")
    assert result.ret == 0, result.stdout.str()
    out = result.stdout.str()
    assert "llmgate: loading the models (baseline=base, mild=good) and evaluate the first shard" in out
    counts = [(int(a), int(b)) for a, b in LINE.findall(out)]
    assert counts == [(n, n) for n in range(1, 21)]
    assert re.search(r"llmgate: arc_challenge 19/20 · 19/20 items · .*items/s · ETA \d+ s", out)
    assert "\r" not in out and "\x1b[K" not in out


def test_in_a_log_the_default_interval_writes_the_start_and_the_finished_task(project):
    result = project.run("--stage=mild", "--llmgate-no-speed")
    assert result.ret == 0
    counts = [(int(a), int(b)) for a, b in LINE.findall(result.stdout.str())]
    assert counts[-1] == (20, 20) and len(counts) <= 2, counts  # the first report, then the task's end


def test_under_xdist_the_controller_counts_the_workers_reports(project):
    result = project.run("--stage=mild", "--llmgate-no-speed", "-n", "2", "-o", "llmgate_progress_interval=0",
                         subprocess=True)  # fmt: skip
    assert result.ret == 0, result.stdout.str()
    out = result.stdout.str()
    assert "llmgate: the workers load the models (baseline=base, mild=good)" in out
    # The controller collects nothing under xdist: the total comes from the workers' collection.
    done = [int(n) for n in re.findall(r"llmgate: arc_challenge \d+ · (\d+)/20 items", out)]
    assert done == list(range(1, 21))


@pytest.mark.parametrize("flag", ["-q", "--llmgate-no-progress"])
def test_quiet_and_the_switch_write_no_progress(project, flag):
    result = project.run("--stage=mild", "--llmgate-no-speed", flag, "-o", "llmgate_progress_interval=0")
    assert result.ret == 0
    assert "items/s" not in result.stdout.str() and "evaluate the first shard" not in result.stdout.str()


def test_a_bad_interval_is_a_usage_error(project):
    result = project.run("--stage=mild", "-o", "llmgate_progress_interval=soon")
    assert result.ret == 4
    assert "ini key llmgate_progress_interval: expected a number of seconds >= 0, got 'soon'" in result.stderr.str()


def test_on_a_terminal_one_line_is_rewritten_in_place(project):
    """A real pseudo-terminal: pytest sees a TTY, and the benchmark items' dots give way to the progress line."""
    parent, child = pty.openpty()
    env = {**os.environ, "COLUMNS": "160", "TERM": "xterm"}
    process = subprocess.Popen(
        [sys.executable, "-m", "pytest", "--stage=mild", "--llmgate-no-speed", "-p", "no:cacheprovider"],
        cwd=project.path, stdin=subprocess.DEVNULL, stdout=child, stderr=child, env=env,
    )  # fmt: skip
    os.close(child)
    chunks = []
    while True:
        try:
            data = os.read(parent, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    assert process.wait(timeout=120) == 0
    os.close(parent)
    out = b"".join(chunks).decode("utf-8", "replace")
    rewrites = re.findall(r"\rllmgate: arc_challenge (\d+)/20 · \d+/20 items[^\r\n]*\x1b\[K", out)
    assert rewrites and rewrites[-1] == "20", out  # drawn over itself, ending at 20/20
    # The 20 items' letters (dots and R) are not printed: the file's line holds no run of letters.
    module_line = next(line for line in out.splitlines() if line.startswith("test_bench.py"))
    assert not re.search(r"test_bench\.py [.RI]{3,}", module_line), module_line
    assert re.search(r"\d+ passed", out)


def test_durations_read_as_people_write_them():
    assert [_duration(s) for s in (0.4, 59, 61, 3599, 3661)] == ["0 s", "59 s", "1m01s", "59m59s", "1h01m"]

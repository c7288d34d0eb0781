"""Progress of a long gate run, on the controller: models loading, items done per task, items per second, an ETA.

On a terminal (default verbosity) it is one line rewritten in place, and the benchmark items' own letters
(hundreds of dots) give way to it; failures and errors keep their letters. Not on a terminal (a CI log), and
with ``-v``, it is a plain line every ``llmgate_progress_interval`` seconds (default 30) and when a task finishes.
``-q`` and ``--llmgate-no-progress`` switch it off. Under xdist the workers load the models and the controller
counts their reports.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pytest

from .state import RunState

DEFAULT_INTERVAL_S = 30.0
TTY_REFRESH_S = 0.2  # a terminal line is redrawn at most this often
PERCENT_ROOM = 9  # columns left free on the line for pytest's " [100%]": a full line makes pytest break it


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class ProgressPlugin:
    """Counts the items as their reports arrive and writes the progress line."""

    def __init__(self, config: pytest.Config, state: RunState, *, interval_s: float, clock: Any = time.monotonic):
        self.config = config
        self.state = state
        self.interval_s = interval_s
        self.clock = clock
        self.reporter: Any = None
        self.tty = False
        self.total = 0  # items collected (all of them under xdist: the controller sees node ids only)
        self.task_totals: Counter[str] = Counter()
        self.done = 0
        self.task_done: Counter[str] = Counter()
        self.statuses: Counter[str] = Counter()
        self.started: float | None = None
        self.last_written = float("-inf")
        self.drawn = 0  # items done when the line was last written
        self.line_width: int | None = None  # width of the terminal line when our line was last drawn

    # --- counting -----------------------------------------------------------------------------------------------

    @pytest.hookimpl(trylast=True)
    def pytest_collection_finish(self, session: pytest.Session) -> None:
        for item in session.items:
            callspec = getattr(item, "callspec", None)
            benchmark = callspec.params.get("llmgate_item") if callspec is not None else None
            if benchmark is not None:
                self.task_totals[benchmark.task] += 1
        self.total = sum(self.task_totals.values())

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node: Any, ids: list[str]) -> None:
        self.total = max(self.total, len(ids))

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        self.reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        self.tty = bool(self.reporter is not None and self.reporter.isatty and self.reporter.verbosity == 0)

    @pytest.hookimpl(trylast=True)  # after pytest has written the file's name
    def pytest_runtest_logstart(self, nodeid: str) -> None:
        if self.started is None:
            self.started = self.clock()
            where = "the workers load" if getattr(self.config.option, "dist", "no") != "no" else "loading"
            models = ", ".join(f"{role}={spec.name}" for role, spec in self.state.roles.items())
            self._show(f"llmgate: {where} the models ({models}) and evaluate the first shard", force=True)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if not getattr(report, "llmgate_item", False) and getattr(report, "llmgate", None) is None:
            return
        if not (report.when == "call" or (report.when == "setup" and not report.passed)):
            return  # one count per item: its call, or the setup that failed or skipped it
        self.done += 1
        outcome = getattr(report, "llmgate", None) or {}
        task = outcome.get("task")
        if task is not None:
            self.task_done[task] += 1
            self.statuses[outcome.get("status", "same")] += 1
        finished = task is not None and self.task_done[task] == self.task_totals.get(task, -1)
        self._show(self._line(), force=finished)

    @pytest.hookimpl(tryfirst=True)
    def pytest_report_teststatus(self, report: pytest.TestReport) -> Any:
        """On a terminal the progress line stands for the benchmark items' letters (failures keep theirs)."""
        if self.tty and report.when == "call" and report.passed and getattr(report, "llmgate", None) is not None:
            status = report.llmgate["status"]
            return status if status in ("regressed", "improved") else "passed", "", status.upper()
        return None

    # --- writing ------------------------------------------------------------------------------------------------

    def _line(self) -> str:
        elapsed = self.clock() - (self.started or self.clock())
        parts = []
        tasks = sorted({*self.task_totals, *self.task_done})
        for task in tasks:
            total = self.task_totals.get(task)
            parts.append(f"{task} {self.task_done[task]}/{total}" if total else f"{task} {self.task_done[task]}")
        out_of = f"/{self.total}" if self.total else ""
        parts.append(f"{self.done}{out_of} items")
        if elapsed > 0 and self.done:
            rate = self.done / elapsed
            parts.append(f"{rate:.1f} items/s")
            if self.total > self.done:
                parts.append(f"ETA {_duration((self.total - self.done) / rate)}")
        if self.statuses["regressed"] or self.statuses["improved"]:
            parts.append(f"{self.statuses['regressed']} regressed, {self.statuses['improved']} improved")
        return "llmgate: " + " · ".join(parts)

    def _show(self, line: str, *, force: bool = False) -> None:
        reporter = self.reporter
        if reporter is None:
            return
        now = self.clock()
        if not force and now - self.last_written < (TTY_REFRESH_S if self.tty else self.interval_s):
            return
        self.last_written = now
        self.drawn = self.done
        # Through the terminal writer, not reporter.write_line: that forgets the current file, and pytest would
        # write the file's name again after every progress line.
        writer = reporter._tw
        if not self.tty:
            if writer.width_of_current_line:
                writer.line()
            writer.line(line)
            return
        text = line[: writer.fullwidth - PERCENT_ROOM]
        if self.line_width is not None and writer.width_of_current_line == self.line_width:  # still ours: redraw
            writer.write("\r" + text + "\x1b[K", flush=True)
            if hasattr(writer, "_current_line"):  # the writer measures the line from all it wrote since "\n"
                writer._current_line = text
        else:
            if writer.width_of_current_line:
                writer.line()
            writer.write(text, flush=True)
        self.line_width = writer.width_of_current_line

    def pytest_sessionfinish(self) -> None:
        """The last count, when the throttle kept it from the terminal."""
        if self.tty and self.drawn != self.done:
            self._show(self._line(), force=True)

"""The reports people read, written from the run's report dict (``pytest_llmgate_report``), on the controller.

``--llmgate-md`` (also appended to ``$GITHUB_STEP_SUMMARY`` when set), ``--llmgate-html``, ``--llmgate-csv``, the
run history beside the result cache (``history.sqlite``) with ``--llmgate-trend``'s per-task lines, and the
experiment trackers (W&B, MLflow: ``trackers.py``). A file
that cannot be written is named in the summary; the verdict and the exit code stand.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ..state import RunState

TREND_RUNS = 5


def config_hash(state: RunState) -> str:
    """What identifies the gate's configuration in the history (its validated form, without where it was read)."""
    from dataclasses import replace

    return hashlib.sha256(repr(replace(state.gate, source=None)).encode()).hexdigest()[:16]


class ReportsPlugin:
    """Writes the Markdown, HTML and CSV reports and records the run in the history."""

    def __init__(self, config: pytest.Config, state: RunState, *, md: str | None, html: str | None,
                 csv: str | None, trend: bool) -> None:  # fmt: skip
        self.config = config
        self.state = state
        self.paths = {kind: Path(path).resolve() for kind, path in (("md", md), ("html", html), ("csv", csv)) if path}
        self.trend = trend
        cache = state.gate.cache_path
        self.history_path = cache.parent / "history.sqlite" if cache is not None else None
        self.trackers = state.gate.trackers()
        self.lines: list[tuple[str, dict[str, bool]]] = []

    @property
    def on(self) -> bool:
        """Whether there is anything to write: a report asked for, a step summary, a tracker, or a history to keep."""
        return bool(
            self.paths or self.trend or os.environ.get("GITHUB_STEP_SUMMARY") or self.history_path or self.trackers
        )

    def _write(self, what: str, path: Path, write: Callable[[Path], object]) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write(path)
            self.lines.append((f"llmgate {what}: {path}", {}))
        except Exception as error:  # a report that fails must not take the verdict with it
            self.lines.append(
                (f"llmgate: could not write the {what} to {path}: {type(error).__name__}: {error}", {"red": True})
            )

    def pytest_llmgate_report(self, report: dict[str, Any]) -> None:
        if "md" in self.paths:
            from .markdown import render_markdown

            text = render_markdown(report)
            self._write("Markdown summary", self.paths["md"], lambda p: p.write_text(text, encoding="utf-8"))
        summary = os.environ.get("GITHUB_STEP_SUMMARY")
        if summary:
            from .markdown import render_markdown

            text = render_markdown(report)

            def append(path: Path) -> None:
                with path.open("a", encoding="utf-8") as handle:
                    handle.write(text + "\n")

            self._write("GitHub step summary", Path(summary), append)
        if "html" in self.paths:
            from .html import render_html

            page = render_html(report)
            self._write("HTML report", self.paths["html"], lambda p: p.write_text(page, encoding="utf-8"))
        if "csv" in self.paths:
            from .csv_report import write_csv

            self._write("CSV", self.paths["csv"], lambda p: write_csv(report, p))
        self._history(report)
        if self.trackers:
            self._track(report)

    def _track(self, report: dict[str, Any]) -> None:
        from ..history import git_metadata
        from . import trackers

        commit, branch = git_metadata(self.config.rootpath)
        identity = trackers.run_identity(report, commit=commit, branch=branch, config_hash=config_hash(self.state))
        log: dict[str, Callable[..., str]] = {"wandb": trackers.log_wandb, "mlflow": trackers.log_mlflow}
        for name, settings in self.trackers.items():
            try:
                with warnings.catch_warnings():  # the trackers' own deprecations (e.g. MLflow on SQLAlchemy 2.1)
                    warnings.simplefilter("ignore", DeprecationWarning)
                    where = log[name](report, settings, identity)
                self.lines.append((f"llmgate {name}: {where}", {}))
            except Exception as error:  # a tracker that fails must not take the verdict with it
                self.lines.append((f"llmgate: could not log to {name}: {type(error).__name__}: {error}", {"red": True}))

    def _history(self, report: dict[str, Any]) -> None:
        if self.history_path is None:
            if self.trend:
                self.lines.append(("llmgate trend: no history without the result cache (--llmgate-no-cache)", {}))
            return
        try:
            from ..history import History

            history = History(self.history_path)
            history.record(report, config_hash=config_hash(self.state), root=self.config.rootpath)
            if self.trend:
                self.lines.append(("", {}))
                self.lines += [(line, {}) for line in history.trend_lines(report["stage"], last=TREND_RUNS)]
        except Exception as error:
            self.lines.append(
                (f"llmgate: the run history at {self.history_path} was not updated: {type(error).__name__}: {error}",
                 {"yellow": True})
            )  # fmt: skip

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        for line, markup in self.lines:
            terminalreporter.write_line(line, **markup)

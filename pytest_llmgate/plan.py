"""``--llmgate-plan``: evaluate nothing; from the cache, say what the configured items can detect.

Registered instead of the evaluating plugins when the option is on: every item is deselected, the
plan is the output, and the exit status is 0.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest

from .config import ALL_STAGES, BASELINE_STAGE, ConfigError
from .engine import Engine
from .state import RunState, task_item_of
from .tasks import TaskItem


def check_options(config: pytest.Config, stage: str | None) -> None:
    """The plan needs a candidate stage and one process (it reads the cache only)."""
    if not stage:
        raise ConfigError("llmgate: --llmgate-plan needs --stage=<stage> (the candidate whose cached run to use)")
    if getattr(config.option, "numprocesses", None):
        raise ConfigError("llmgate: --llmgate-plan reads the cache only; run it without -n")


class PlanPlugin:
    """Computes the plan from the cache after collection and prints it."""

    def __init__(self, config: pytest.Config, state: RunState, engine: Engine) -> None:
        self.config = config
        self.state = state
        self.engine = engine
        self.rows: list[dict[str, Any]] = []

    @pytest.hookimpl(wrapper=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> Generator[None, None, None]:
        """After the shards are assigned: plan, then deselect every item (planning evaluates nothing)."""
        yield
        self.rows = self._plan(items)
        self.config.hook.pytest_deselected(items=list(items))
        items[:] = []

    def _cached_scores(self, role: str, members: list[tuple[TaskItem, str]], metric: str) -> dict[str, float]:
        """Item name -> ``metric`` score of ``role``'s cached results (items not in the cache are absent)."""
        by_name = {item.qualified_id: item for item, _ in members}
        tasks = self.state.tasks
        return {
            name: tasks[by_name[name].task].score(by_name[name], value)["scores"][metric]
            for name, value in self.engine.cached_results(role, members).items()
        }

    def _plan(self, items: list[pytest.Item]) -> list[dict[str, Any]]:
        """Per task: cached baseline accuracy, discordance with the candidate, detectable drop, items needed."""
        from .stats import items_needed, minimum_detectable_drop

        state = self.state
        by_task: dict[str, list[tuple[TaskItem, str]]] = {}
        for item in items:
            task_item = task_item_of(item)
            if task_item is not None:
                by_task.setdefault(task_item.task, []).append((task_item, state.versions[task_item.task]))
        # The gated stage itself, not the previous rung a step rule also evaluates.
        candidate = (
            state.stage
            if state.stage not in (BASELINE_STAGE, ALL_STAGES)
            else next((role for role in state.roles if role != BASELINE_STAGE), None)
        )
        drop, power = self.config.getoption("llmgate_plan_drop"), self.config.getoption("llmgate_plan_power")
        rows = []
        for task_name, members in sorted(by_task.items()):
            metric = state.gate.metric_of(task_name, state.tasks[task_name].default_metric)
            base = self._cached_scores(BASELINE_STAGE, members, metric)
            cand = self._cached_scores(candidate, members, metric) if candidate else {}
            row: dict[str, Any] = {
                "task": task_name,
                "n": len(members),
                "baseline_cached": len(base),
                "candidate_cached": len(cand),
                "drop": drop,
                "power": power,
            }
            if base:
                accuracy = sum(base.values()) / len(base)
                paired = [name for name in base if name in cand]
                measured = bool(paired)
                discordance = (sum(base[n] != cand[n] for n in paired) / len(paired)) if measured else 0.10
                row.update(baseline_accuracy=accuracy, discordance=discordance, discordance_measured=measured)
                try:
                    row["detectable_drop"] = minimum_detectable_drop(accuracy, discordance, len(members), 0.05, power)
                    row["items_needed"] = items_needed(accuracy, discordance, drop, 0.05, power)
                except ValueError as error:
                    row["note"] = str(error)
            rows.append(row)
        return rows

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        """Every item was deselected on purpose: that is a success."""
        session.exitstatus = 0

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        """The plan table."""
        from .report.terminal import plan_lines

        terminalreporter.section("llmgate", sep="=")
        for line, markup in plan_lines(self.rows):
            terminalreporter.write_line(line, **markup)

    def pytest_unconfigure(self) -> None:
        """Close the cache."""
        self.engine.close()

"""Hooks that pytest-llmgate adds to pytest, for conftest.py files and plugins to implement."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .tasks import Task


@pytest.hookspec
def pytest_llmgate_tasks(config: pytest.Config) -> Task | Iterable[Task] | None:
    """Return tasks written in Python (instances of ``MultipleChoiceTask`` or ``GenerationTask`` subclasses).

    They join the built-in tasks and the config's suites before the configuration is validated, so
    groups, stage thresholds and ``@pytest.mark.llmgate("<name>")`` can name them. The hook runs while
    pytest configures, so implement it in a conftest.py that pytest loads at start (the one beside
    the config file or in a directory named on the command line) or in an installed plugin.
    A name clashing with another task, or a task missing what the plugin needs, is a usage error.

    :param config: the pytest config (e.g. ``config.rootpath`` to find data files).
    """


@pytest.hookspec
def pytest_llmgate_outcome(config: pytest.Config, outcome: Any) -> None:
    """Called on the controller for every benchmark item's outcome (an ``ItemOutcome``) as it arrives.

    Arrival order is xdist's delivery order. ``--llmgate-adaptive`` uses it to stop resolved tasks; a
    plugin of your own can watch a run's progress with it.
    """


@pytest.hookspec
def pytest_llmgate_report(config: pytest.Config, report: dict[str, Any]) -> None:
    """Called once on the controller with the run's report (the JSON report's dict, schema llmgate-report/1),
    after the verdict and before the terminal summary; whether or not ``--llmgate-report`` writes it to a file.

    The Markdown, HTML and CSV reports and the run history are written from it; a plugin of your own can send
    it elsewhere. Do not change the dict: every implementation sees the same one.
    """

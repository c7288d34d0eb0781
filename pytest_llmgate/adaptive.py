"""``--llmgate-adaptive``: stop a task once an anytime-valid confidence sequence resolves its retention floor.

Two plugin objects, registered only with the option: ``AdaptiveOrder`` in every process (shards in a
seeded random order, and the skip of a resolved task's remaining items) and ``AdaptiveController`` on
the controller (the sequential check after every outcome, published to xdist workers through a file).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

from .config import BASELINE_STAGE
from .outcome import ItemOutcome
from .state import SHARD, RunState, task_item_of


def start(config: pytest.Config, state: RunState) -> None:
    """Register the adaptive plugins of this process."""
    workerinput = getattr(config, "workerinput", None)
    state.adaptive = {}
    if workerinput is not None:
        state.adaptive_file = Path(workerinput["llmgate_adaptive_file"])
    else:
        import uuid

        state.adaptive_file = state.work_dir / "adaptive" / f"{uuid.uuid4().hex}.json"
        config.pluginmanager.register(AdaptiveController(state), "llmgate-adaptive-controller")
    config.pluginmanager.register(AdaptiveOrder(state), "llmgate-adaptive")


class AdaptiveOrder:
    """Shards in a seeded random order; items of a resolved task are skipped with the reason."""

    def __init__(self, state: RunState) -> None:
        self.state = state

    @pytest.hookimpl(wrapper=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> Generator[None, None, None]:
        """Reorder whole shards in a seeded random order (items keep their order inside a shard).

        Anytime-valid stopping assumes the items arrive in random order; every xdist worker computes
        the same order from the seed, so collections stay identical.
        """
        yield
        shards: dict[str, list[pytest.Item]] = {}
        others = []
        for item in items:
            if SHARD in item.stash:
                shards.setdefault(item.stash[SHARD], []).append(item)
            else:
                others.append(item)
        order = sorted(shards)
        random.Random(self.state.gate.seed).shuffle(order)
        items[:] = others + [item for key in order for item in shards[key]]

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        """Skip an item whose task the sequence already resolved."""
        task_item = task_item_of(item)
        if task_item is None or self.state.stage is None:
            return
        resolved = self._resolved().get(task_item.task)
        if resolved is not None:
            pytest.skip(
                f"llmgate adaptive: {task_item.task} resolved ({resolved['decision']}) after {resolved['items']} items"
            )

    def _resolved(self) -> dict[str, dict[str, Any]]:
        """Tasks already resolved: in this process (no xdist), or as the controller published them."""
        state = self.state
        assert state.adaptive is not None
        if not state.is_controller and state.adaptive_file is not None and state.adaptive_file.is_file():
            # Mid-replace on a filesystem without atomic rename: read it again at the next item.
            with contextlib.suppress(OSError, ValueError):
                state.adaptive.update(json.loads(state.adaptive_file.read_text()))
        return state.adaptive


class AdaptiveController:
    """Checks the confidence sequence after every outcome and publishes the tasks it resolves."""

    def __init__(self, state: RunState) -> None:
        self.state = state
        # task -> item id -> outcome, in arrival order (a re-run item keeps its first place, as in the tally)
        self.arrivals: dict[str, dict[str, ItemOutcome]] = {}

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node: Any) -> None:
        """Tell each xdist worker where the controller publishes resolved tasks."""
        node.workerinput["llmgate_adaptive_file"] = str(self.state.adaptive_file)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Count the items skipped because their task was resolved."""
        if report.skipped and report.when == "setup" and "llmgate adaptive:" in str(report.longrepr):
            self.state.adaptive_skipped += 1

    def pytest_llmgate_outcome(self, outcome: ItemOutcome) -> None:
        """Stop the outcome's task once the confidence sequence on its items so far resolves the floor."""
        from .gate import sequential_decision

        state = self.state
        assert state.adaptive is not None and state.stage is not None
        task = outcome.task
        if task in state.adaptive:
            return
        self.arrivals.setdefault(task, {})[outcome.item_id] = outcome
        stage = state.gate.stage(state.stage)
        threshold = stage.thresholds_for(task, state.gate.groups_of(task)).min_retention
        if not threshold:
            return
        # Arrival order (the shuffled shard order), not row order: the sequence's validity rests on it.
        seen = list(self.arrivals[task].values())
        base = [o.score(BASELINE_STAGE) for o in seen]
        cand = [o.score(state.stage) for o in seen]
        decision = sequential_decision(base, cand, threshold, alpha=1 - state.gate.confidence)
        if decision == "continue":
            return
        state.adaptive[task] = {"decision": decision, "items": len(seen)}
        if state.adaptive_file is not None:
            state.adaptive_file.parent.mkdir(parents=True, exist_ok=True)
            temporary = state.adaptive_file.with_suffix(".tmp")
            temporary.write_text(json.dumps(state.adaptive))
            os.replace(temporary, state.adaptive_file)

    def pytest_sessionfinish(self) -> None:
        """The published file has served its run."""
        if self.state.adaptive_file is not None:
            self.state.adaptive_file.unlink(missing_ok=True)

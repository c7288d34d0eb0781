"""Shard scheduling for pytest-xdist: every shard goes, whole, to one worker.

``--dist loadgroup`` silently stops grouping on pytest 9.2 (pytest-xdist issue 1386), so the plugin
answers the sanctioned ``pytest_xdist_make_scheduler`` hook instead. This module is registered only
when xdist is active.
"""

from __future__ import annotations

from typing import Any

import pytest
from xdist.scheduler import LoadScopeScheduling

from .engine import shard_of, split_nodeid


class ShardScheduling(LoadScopeScheduling):
    """LoadScope scheduling whose scope is the llmgate shard; other tests are their own scope."""

    def __init__(self, config: pytest.Config, log: Any, shard_size: int) -> None:
        super().__init__(config, log)
        self.shard_size = shard_size
        self._positions: dict[Any, dict[str, int]] = {}

    def _split_scope(self, nodeid: str) -> str:
        parts = split_nodeid(nodeid)
        if parts is None:
            return nodeid
        return shard_of(parts[0], parts[1], self.shard_size)

    def _assign_work_unit(self, node: Any) -> None:
        # A replacement for a crashed worker can be rescheduled before its collection arrives;
        # it gets work when the collection does (schedule() reschedules every node then).
        if node not in self.registered_collections:
            return
        # xdist looks each node id up with list.index: quadratic on tens of thousands of items.
        scope, work_unit = self.workqueue.popitem(last=False)
        self.assigned_work.setdefault(node, {})[scope] = work_unit
        positions = self._positions.get(node)
        if positions is None:
            positions = {nodeid: i for i, nodeid in enumerate(self.registered_collections[node])}
            self._positions[node] = positions
        node.send_runtest_some([positions[nodeid] for nodeid, done in work_unit.items() if not done])


class XdistShardPlugin:
    """Answers pytest_xdist_make_scheduler for the default (load) distribution modes."""

    def __init__(self, shard_size: int, adaptive_file: Any = None) -> None:
        self.shard_size = shard_size
        self.adaptive_file = adaptive_file

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node: Any) -> None:
        """Tell each worker where the controller publishes tasks resolved by --llmgate-adaptive."""
        if self.adaptive_file is not None:
            node.workerinput["llmgate_adaptive_file"] = str(self.adaptive_file)

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_make_scheduler(self, config: pytest.Config, log: Any) -> ShardScheduling | None:
        """Shard scheduling unless the user asked for another distribution mode explicitly."""
        if config.getoption("dist") in ("load", "loadscope", "loadgroup"):
            return ShardScheduling(config, log, self.shard_size)
        return None

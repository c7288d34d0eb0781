"""Shards and their scheduling for pytest-xdist: every shard goes, whole, to one worker.

``--dist loadgroup`` silently stops grouping on pytest 9.2 (pytest-xdist issue 1386), so the plugin
answers the sanctioned ``pytest_xdist_make_scheduler`` hook instead. ``XdistShardPlugin`` is
registered only when xdist is active; the shard helpers serve collection too (without xdist).
"""

from __future__ import annotations

import functools
from typing import Any

import pytest


def shard_of(nodeid_base: str, item_id: str, shard_size: int) -> str:
    """The shard key: the test function, the item's group and its block of ``shard_size`` rows.

    Computed from the node id alone, so the xdist controller (which has no items) finds the same
    shards as the workers.
    """
    group, _, index = item_id.rpartition("-")
    return f"{nodeid_base}[{group}]#{int(index) // shard_size}"


def split_nodeid(nodeid: str) -> tuple[str, str] | None:
    """(function part, parameter id) of a parametrized node id, or None."""
    if not nodeid.endswith("]") or "[" not in nodeid:
        return None
    base, _, param = nodeid[:-1].partition("[")
    _, sep, index = param.rpartition("-")
    if not sep or not index.isdigit():
        return None
    return base, param


@functools.cache
def _scheduler_class() -> type:
    """``ShardScheduling``, built on first use so that importing this module does not import xdist."""
    from xdist.scheduler import LoadScopeScheduling

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

    return ShardScheduling


class XdistShardPlugin:
    """Answers pytest_xdist_make_scheduler for the default (load) distribution modes."""

    def __init__(self, shard_size: int) -> None:
        self.shard_size = shard_size

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_make_scheduler(self, config: pytest.Config, log: Any) -> Any:
        """Shard scheduling unless the user asked for another distribution mode explicitly."""
        if config.getoption("dist") in ("load", "loadscope", "loadgroup"):
            return _scheduler_class()(config, log, self.shard_size)
        return None

"""Collection: one pytest item per benchmark item, shards for the engine, and a collection without GC passes."""

from __future__ import annotations

import gc
from collections.abc import Generator

import pytest

from .state import MARKER, SHARD, RunState, task_item_of
from .tasks import DatasetError
from .xdist_support import shard_of


class CollectionPlugin:
    """Parametrizes ``@pytest.mark.llmgate(task)`` functions and assigns the selected items to shards."""

    def __init__(self, state: RunState) -> None:
        self.state = state

    @pytest.hookimpl(wrapper=True)
    def pytest_collection(self, session: pytest.Session) -> Generator[None, object, object]:
        """Collect without the cyclic garbage collector, then freeze what collection built.

        A full benchmark is tens of thousands of items, each with its prompts: millions of live objects,
        which every full garbage-collector pass walks again (measured: 13 passes, 1.75 s of a 5.2 s
        collection of 30,000 items). They live until the session ends, so they are collected neither
        during collection nor after it: ``gc.freeze`` keeps later passes (the run's, pytest's at exit)
        from walking them; the session's cleanup unfreezes them.
        """
        enabled = gc.isenabled()
        gc.disable()
        try:
            return (yield)
        finally:
            if enabled:
                gc.enable()
            if gc.get_freeze_count() == 0:  # not already frozen by an outer session (pytester in-process)
                gc.freeze()
                self.state.frozen = True

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        """One test per benchmark item of the task named by ``@pytest.mark.llmgate(task)``."""
        marker = metafunc.definition.get_closest_marker(MARKER)
        if marker is None:
            return
        state = self.state
        if not marker.args or marker.args[0] not in state.tasks:
            raise pytest.Collector.CollectError(
                "@pytest.mark.llmgate needs a task name as its first argument; "
                f"known tasks: {', '.join(sorted(state.tasks))}"
            )
        task_name = marker.args[0]
        gate = state.gate
        if gate.tasks and task_name not in gate.tasks:
            reason = f"task {task_name} is not in the configured tasks ({', '.join(gate.tasks)})"
            metafunc.parametrize(
                "llmgate_item",
                [pytest.param(None, id=f"{task_name}-not-selected", marks=pytest.mark.skip(reason=reason))],
            )
            return
        settings = gate.task_settings.get(task_name)
        limit = (settings.limit if settings else None) or gate.limit
        try:
            items, version = state.tasks[task_name].load(gate.data_dir, limit)
        except (DatasetError, ValueError) as error:
            raise pytest.Collector.CollectError(f"llmgate: task {task_name}: {error}") from None
        state.versions[task_name] = version
        marks = [getattr(pytest.mark, task_name)] + [getattr(pytest.mark, g) for g in gate.groups_of(task_name)]
        metafunc.parametrize("llmgate_item", [pytest.param(item, id=item.item_id, marks=marks) for item in items])

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        """Assign the selected items to shards (after -k, -m and --lf have deselected theirs)."""
        state = self.state
        if state.engine is None:
            return
        for item in items:
            task_item = task_item_of(item)
            if task_item is None:
                continue
            shard = shard_of(item.nodeid.partition("[")[0], task_item.item_id, state.gate.shard_size)
            item.stash[SHARD] = shard
            state.engine.register(shard, task_item, state.versions[task_item.task])

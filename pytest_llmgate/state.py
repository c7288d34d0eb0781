"""What one pytest process knows about the llmgate run, and the stash keys the feature plugins share.

The entry point (``plugin.py``) builds one ``RunState`` per pytest config and puts it in
``config.stash[STATE]``; the feature plugins read it from there. Nothing here is module-level state:
a second pytest session in the same process builds its own.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .config import GateConfig, ModelSpec
    from .engine import Engine
    from .tasks import Task

MARKER = "llmgate"


@dataclass
class RunState:
    """The run as this process sees it: configuration, stage, models, tasks, and what collection found."""

    gate: GateConfig
    stage: str | None
    roles: dict[str, ModelSpec]
    work_dir: Path
    report_path: Path | None
    worker: str  # "main" without xdist or on its controller, else the xdist worker id
    tasks: dict[str, Task] = field(default_factory=dict)  # every task this run can use, configured
    engine: Engine | None = None
    versions: dict[str, str] = field(default_factory=dict)  # task -> version of the data collection loaded
    # --llmgate-adaptive: task -> {"decision", "items"} once resolved; shared with xdist workers via a file.
    adaptive: dict[str, dict[str, Any]] | None = None
    adaptive_file: Path | None = None
    adaptive_skipped: int = 0
    frozen: bool = False  # gc.freeze() after collection; undone by the last cleanup

    @property
    def is_controller(self) -> bool:
        """The process that decides: the only process without xdist, or xdist's controller."""
        return self.worker == "main"

    def unfreeze(self) -> None:
        """Undo the collection's ``gc.freeze``."""
        if self.frozen:
            gc.unfreeze()
            self.frozen = False


STATE = pytest.StashKey[RunState]()
SHARD = pytest.StashKey[str]()  # on each benchmark item: its shard
OUTCOME = pytest.StashKey[dict[str, Any]]()  # on each benchmark item: its outcome, for the call report


def task_item_of(item: pytest.Item) -> Any:
    """The ``TaskItem`` a pytest item was parametrized with, or None for other tests."""
    from .tasks import TaskItem

    callspec = getattr(item, "callspec", None)
    value = callspec.params.get("llmgate_item") if callspec is not None else None
    return value if isinstance(value, TaskItem) else None

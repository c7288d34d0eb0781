"""A throwaway gate project for pytester runs: config, synthetic data, double-backend weights."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import synthetic_arc_rows, write_jsonl

TESTS_DIR = Path(__file__).resolve().parent

BENCHMARK = '''
import pytest

@pytest.mark.llmgate("arc_challenge")
def test_arc(llmgate_outcome):
    """One synthetic ARC item."""
'''

BASE_CONFIG = """
[tool.pytest.ini_options]
addopts = "-p no:randomly"

[tool.llmgate]
baseline = "base"
tasks = ["arc_challenge"]
data_dir = "data"
shard_size = 4

[tool.llmgate.models.base]
backend = "doubles:SkillBackend"
path = "weights/base.json"

[tool.llmgate.models.good]
backend = "doubles:SkillBackend"
path = "weights/good.json"

[tool.llmgate.models.bad]
backend = "doubles:SkillBackend"
path = "weights/bad.json"

[[tool.llmgate.stages]]
name = "mild"
model = "good"
bits = 8
min_retention = 0.90

[[tool.llmgate.stages]]
name = "harsh"
model = "bad"
bits = 2
min_retention = 0.90

[[tool.llmgate.critical]]
rule = "retention_floor"
floor = 0.80
"""


@dataclass
class GateProject:
    """Helpers around a pytester folder holding a gate project."""

    pytester: pytest.Pytester

    @property
    def path(self) -> Path:
        """The project folder."""
        return self.pytester.path

    def weights(self, name: str, **values: Any) -> Path:
        """Write (or change) the double backend's weights file for model ``name``."""
        path = self.path / "weights" / f"{name}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(values, sort_keys=True))
        return path

    def config(self, text: str) -> None:
        """Replace pyproject.toml."""
        (self.path / "pyproject.toml").write_text(text)

    def run(self, *args: str, subprocess: bool = False) -> pytest.RunResult:
        """Run pytest in the project, inline unless ``subprocess``."""
        if subprocess:
            return self.pytester.runpytest_subprocess(*args)
        return self.pytester.runpytest(*args)

    def report(self, name: str = "report.json") -> dict[str, Any]:
        """The parsed JSON report."""
        return json.loads((self.path / name).read_text())


def make_project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, *, items: int = 20,
                 base_skill: float = 1.0, good_skill: float = 0.97, bad_skill: float = 0.5) -> GateProject:
    """A project with ``items`` synthetic ARC rows, a baseline and two candidates of given skill."""
    monkeypatch.setenv("PYTHONPATH", str(TESTS_DIR))
    monkeypatch.delenv("LLMGATE_DATA_DIR", raising=False)
    pytester.syspathinsert(TESTS_DIR)
    project = GateProject(pytester)
    project.config(BASE_CONFIG)
    write_jsonl(project.path / "data" / "arc_challenge" / "test.jsonl", synthetic_arc_rows(items))
    pytester.makepyfile(test_bench=BENCHMARK)
    project.weights("base", skill=base_skill, seed=1)
    project.weights("good", skill=good_skill, seed=1)
    project.weights("bad", skill=bad_skill, seed=1)
    return project

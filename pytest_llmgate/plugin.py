"""pytest hooks of pytest-llmgate: options, configuration, item generation, fixtures, verdict.

Roles: every process evaluates the shards it runs (``Engine``); only the controller (the process
without ``workerinput``) tallies outcomes from reports, decides the verdict and sets the exit code.
Heavy imports (torch, transformers) happen inside the engine, never at import time.
"""

from __future__ import annotations

import argparse
import gc
import os
from collections.abc import Generator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from . import EXIT_UNCHECKED
from .cache import CacheError
from .config import (
    ALL_STAGES,
    BASELINE_STAGE,
    ConfigError,
    GateConfig,
    ModelSpec,
    apply_overrides,
    find_config_file,
    parse_config,
)
from .engine import Engine, ShardError, shard_of
from .models import ModelLoadError
from .outcome import ItemOutcome
from .stats import Tally
from .tasks import DatasetError, SuiteError, Task, TaskItem, TaskOptions, available_tasks, merge_tasks
from .tasks.coding import SandboxError

MARKER = "llmgate"
HARNESS_ERRORS = (ShardError, DatasetError, ModelLoadError, SandboxError)


@dataclass
class RunState:
    """What one pytest process knows about the llmgate run."""

    gate: GateConfig
    stage: str | None
    roles: dict[str, ModelSpec]
    work_dir: Path
    report_path: Path | None
    worker: str
    tasks: dict[str, Task] = field(default_factory=dict)  # every task this run can use, configured
    engine: Engine | None = None
    versions: dict[str, str] = field(default_factory=dict)
    # --llmgate-adaptive: task -> {"decision", "items"} once resolved; shared with xdist workers via a file.
    adaptive: dict[str, dict[str, Any]] | None = None
    adaptive_file: Path | None = None
    frozen: bool = False  # gc.freeze() after collection; undone by the last cleanup

    def unfreeze(self) -> None:
        if self.frozen:
            gc.unfreeze()
            self.frozen = False


STATE = pytest.StashKey[RunState]()
SHARD = pytest.StashKey[str]()
OUTCOME = pytest.StashKey[dict[str, Any]]()


def _positive_int(text: str) -> int:
    """argparse type: a positive integer (argparse names the option in its error)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer (e.g. 50), got {text!r}")
    return value


def _open_fraction(text: str) -> float:
    """argparse type: a number strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number strictly between 0 and 1 (e.g. 0.05), got {text!r}")
    return value


def _stage_name(text: str) -> str:
    """argparse type: a non-empty stage name."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected 'baseline', a stage name from the config, or 'all'; got nothing")
    return text.strip()


def pytest_addoption(parser: pytest.Parser) -> None:
    """Options of the llmgate group; the run-wide ones also as ini keys."""
    group = parser.getgroup("llmgate", "LLM benchmark gates (pytest-llmgate)")
    group.addoption("--stage", dest="llmgate_stage", type=_stage_name, default=None, metavar="NAME",
                    help="evaluate benchmarks: 'baseline' records the reference model, a stage name gates "
                         "that stage's model, 'all' runs the ladder and picks the most compressed passing stage")
    group.addoption("--llmgate-report", dest="llmgate_report", default=None, metavar="PATH",
                    help="write the JSON report (schema llmgate-report/1) to PATH")
    group.addoption("--llmgate-config", dest="llmgate_config", default=None, metavar="PATH",
                    help="read the configuration from PATH instead of pyproject.toml / llmgate.toml")
    group.addoption("--llmgate-data-dir", dest="llmgate_data_dir", default=None, metavar="DIR",
                    help="load task data from DIR/<task>/<split>.jsonl|parquet instead of the hub "
                         "(also $LLMGATE_DATA_DIR)")
    group.addoption("--llmgate-limit", dest="llmgate_limit", type=_positive_int, default=None, metavar="N",
                    help="evaluate the first N items of each task")
    group.addoption("--llmgate-tasks", dest="llmgate_tasks", default=None, metavar="A,B",
                    help="comma-separated tasks to run (overrides tasks in the config)")
    group.addoption("--llmgate-cache", dest="llmgate_cache", default=None, metavar="PATH",
                    help="result cache file (default .llmgate/cache.sqlite beside the config)")
    group.addoption("--llmgate-no-cache", dest="llmgate_no_cache", action="store_true",
                    help="neither read nor write the result cache")
    group.addoption("--llmgate-policy", dest="llmgate_policy", default=None, choices=("point", "strict", "lenient"),
                    help="gate policy: point (estimate vs threshold), strict (lower bound must clear it: deployments), "
                         "lenient (fail only when the upper bound misses it: pull requests)")
    group.addoption("--llmgate-plan", dest="llmgate_plan", action="store_true",
                    help="evaluate nothing: from the cached baseline (and candidate, when cached) print per task the "
                         "smallest retention drop the paired test detects at this many items, and the items needed "
                         "for --llmgate-plan-drop")
    group.addoption("--llmgate-plan-drop", dest="llmgate_plan_drop", type=_open_fraction, default=0.05, metavar="D",
                    help="relative retention drop to plan for (default 0.05)")
    group.addoption("--llmgate-plan-power", dest="llmgate_plan_power", type=_open_fraction, default=0.8, metavar="P",
                    help="power to plan for (default 0.8)")
    group.addoption("--llmgate-adaptive", dest="llmgate_adaptive", action="store_true",
                    help="evaluate shards in a seeded random order and stop a task once an anytime-valid "
                         "confidence sequence resolves its retention floor; its remaining items are skipped")
    group.addoption("--llmgate-set", dest="llmgate_set", action="append", default=[], metavar="KEY=VALUE",
                    help="override any config key, e.g. --llmgate-set models.int4.dtype=bfloat16 (repeatable)")
    parser.addini("llmgate_report", "default path of the JSON report", default=None)
    parser.addini("llmgate_data_dir", "default local data folder", default=None)
    parser.addini("llmgate_config", "default configuration file", default=None)


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    """Declare the hooks conftest.py files implement: ``pytest_llmgate_tasks`` (tasks written in Python)."""
    from . import hookspecs

    pluginmanager.add_hookspecs(hookspecs)


def _option(config: pytest.Config, name: str) -> Any:
    value = config.getoption(name)
    return value if value is not None else config.getini(name) or None


def _load_gate_config(config: pytest.Config) -> tuple[GateConfig, dict[str, Task]]:
    """The validated config and every task it can use (built-in and custom suites), configured."""
    source, raw = find_config_file(config.rootpath, _option(config, "llmgate_config"))
    raw = apply_overrides(raw, config.getoption("llmgate_set"))
    try:
        registry = available_tasks(raw, source.parent if source is not None else config.rootpath)
        # Tasks written in Python (conftest.py's pytest_llmgate_tasks) join before validation names them.
        registry = merge_tasks(registry, config.hook.pytest_llmgate_tasks(config=config))
    except SuiteError as error:
        raise ConfigError(f"llmgate config: {error}") from None
    gate = parse_config(raw, source=source, known_tasks=registry, rootpath=config.rootpath)
    changes: dict[str, Any] = {}
    if config.getoption("llmgate_limit"):
        changes["limit"] = config.getoption("llmgate_limit")
    data_dir = _option(config, "llmgate_data_dir")
    if data_dir:
        changes["data_dir"] = Path(data_dir).resolve()
    tasks = config.getoption("llmgate_tasks")
    if tasks:
        names = tuple(t.strip() for t in tasks.split(",") if t.strip())
        for name in names:
            if name not in registry:
                raise ConfigError(f"llmgate config: --llmgate-tasks: unknown task {name!r}; "
                                  f"known tasks: {', '.join(sorted(registry))}")
        changes["tasks"] = names
    if config.getoption("llmgate_policy"):
        changes["policy"] = config.getoption("llmgate_policy")
    if config.getoption("llmgate_no_cache"):
        changes["cache_path"] = None
    elif config.getoption("llmgate_cache"):
        changes["cache_path"] = Path(config.getoption("llmgate_cache")).resolve()
    gate = replace(gate, **changes)
    if gate.data_dir is not None and not gate.data_dir.is_dir():
        where = "--llmgate-data-dir" if data_dir else "[tool.llmgate].data_dir"
        raise ConfigError(f"llmgate config: {where}: {gate.data_dir} is not a folder; point it at the benchmark data "
                          "(one folder per task, in the hub's schema), or leave it out to load from the hub")
    tasks = {}
    for name, task in registry.items():
        try:
            options = gate.prompt_options(name, pinned_shots=getattr(task, "pins_num_fewshot", False))
            tasks[name] = task.configured(TaskOptions(**options))
        except ValueError as error:
            raise ConfigError(f"llmgate config: [tool.llmgate.task.{name}]: {error}") from None
    return gate, tasks


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Validate the configuration once and set up this process's role."""
    config.addinivalue_line(
        "markers", f"{MARKER}(task): parametrize this test with every item of the benchmark task")
    gate, tasks = _load_gate_config(config)
    for task in tasks:
        config.addinivalue_line("markers", f"{task}: items of the {task} benchmark")
    for group in gate.groups:
        config.addinivalue_line("markers", f"{group}: items of the tasks in llmgate group '{group}'")
    stage = config.getoption("llmgate_stage")
    if config.getoption("llmgate_plan"):
        if not stage:
            raise ConfigError("llmgate: --llmgate-plan needs --stage=<stage> (the candidate whose cached run to use)")
        if getattr(config.option, "numprocesses", None):
            raise ConfigError("llmgate: --llmgate-plan reads the cache only; run it without -n")
        if not 0 < config.getoption("llmgate_plan_drop") < 1 or not 0 < config.getoption("llmgate_plan_power") < 1:
            raise ConfigError("llmgate: --llmgate-plan-drop and --llmgate-plan-power must lie strictly between 0 and 1")
    if config.getoption("llmgate_adaptive") and (not stage or stage in (BASELINE_STAGE, ALL_STAGES)):
        raise ConfigError("llmgate: --llmgate-adaptive gates one stage: use it with --stage=<stage name>")
    roles = gate.stage_models(stage) if stage else {}
    workerinput = getattr(config, "workerinput", None)
    base = gate.source.parent if gate.source is not None else config.rootpath
    report = _option(config, "llmgate_report")
    report_path = Path(report).resolve() if report else None
    if report_path is not None and workerinput is None:
        _check_report_path(report_path)
    state = RunState(
        gate=gate, stage=stage, roles=roles, work_dir=base / ".llmgate", report_path=report_path,
        worker=workerinput["workerid"] if workerinput else "main", tasks=tasks,
    )
    if config.getoption("llmgate_adaptive"):
        state.adaptive = {}
        if workerinput is not None:
            state.adaptive_file = Path(workerinput["llmgate_adaptive_file"])
        else:
            import uuid

            state.adaptive_file = state.work_dir / "adaptive" / f"{uuid.uuid4().hex}.json"
    if stage:
        from .cache import ResultCache

        worker_index = int(state.worker[2:]) if state.worker.startswith("gw") else None
        cache = ResultCache(gate.cache_path) if gate.cache_path is not None else None
        if cache is not None:
            try:
                cache.check()  # an unusable cache stops the run here, before anything is computed
            except CacheError as error:
                raise ConfigError(str(error)) from None
            from .tasks.coding import use_verdict_store

            # Code tasks keep sandbox verdicts next to the results: a warm run executes nothing.
            use_verdict_store(cache)
        threads = max(1, (os.cpu_count() or 1) // int(workerinput["workercount"])) if workerinput else None
        state.engine = Engine(roles=roles, cache=cache, work_dir=state.work_dir, worker_index=worker_index,
                              cpu_threads=threads)
        if workerinput is None:
            config.pluginmanager.register(GateController(config, state), "llmgate-controller")
        if config.pluginmanager.hasplugin("xdist") and workerinput is None:
            from .xdist_support import XdistShardPlugin

            config.pluginmanager.register(
                XdistShardPlugin(gate.shard_size, state.adaptive_file), "llmgate-xdist")
    config.stash[STATE] = state
    # Registered before the other plugins' cleanups (this configure runs first), so it runs after them:
    # pytest's own garbage-collector passes at exit still skip what collection froze.
    config.add_cleanup(state.unfreeze)


def _check_report_path(path: Path) -> None:
    """A report that cannot be written is a usage error before anything is evaluated, not a lost verdict after."""
    if path.is_dir():
        raise ConfigError(f"llmgate: --llmgate-report {path} is a folder; give a file path such as "
                          f"{path / 'llmgate.json'}")
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise ConfigError(f"llmgate: --llmgate-report {path}: {folder} is a file, so the report cannot be written "
                          "there; choose another path")
    if not os.access(folder, os.W_OK):
        raise ConfigError(f"llmgate: --llmgate-report {path}: {folder} is not writable; choose another path")


@pytest.hookimpl(wrapper=True)
def pytest_collection(session: pytest.Session) -> Generator[None, object, object]:
    """Collect without the cyclic garbage collector, then freeze what collection built.

    A full benchmark is tens of thousands of items, each with its prompts: millions of live objects,
    which every full garbage-collector pass walks again (measured: 13 passes, 1.75 s of a 5.2 s
    collection of 30,000 items). They live until the session ends, so they are collected neither
    during collection nor after it: ``gc.freeze`` keeps later passes (the run's, pytest's at exit)
    from walking them; the session's cleanup unfreezes them. Only in projects that use llmgate.
    """
    state = session.config.stash.get(STATE, None)
    if state is None or (state.gate.source is None and state.stage is None):
        return (yield)
    enabled = gc.isenabled()
    gc.disable()
    try:
        return (yield)
    finally:
        if enabled:
            gc.enable()
        if gc.get_freeze_count() == 0:  # not already frozen by an outer session (pytester in-process)
            gc.freeze()
            state.frozen = True


def pytest_unconfigure(config: pytest.Config) -> None:
    """Free the models this process loaded."""
    state = config.stash.get(STATE, None)
    if state is not None and state.engine is not None:
        state.engine.close()


def pytest_report_header(config: pytest.Config) -> list[str] | None:
    """One line saying what is evaluated."""
    state = config.stash.get(STATE, None)
    if state is None or not state.stage:
        return None
    models = ", ".join(f"{role}={spec.name}" for role, spec in state.roles.items())
    source = state.gate.source or "built-in defaults"
    return [f"llmgate: stage={state.stage} models: {models} (config: {source})"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """One test per benchmark item of the task named by ``@pytest.mark.llmgate(task)``."""
    marker = metafunc.definition.get_closest_marker(MARKER)
    if marker is None:
        return
    state = metafunc.config.stash[STATE]
    if not marker.args or marker.args[0] not in state.tasks:
        raise pytest.Collector.CollectError(
            "@pytest.mark.llmgate needs a task name as its first argument; "
            f"known tasks: {', '.join(sorted(state.tasks))}")
    task_name = marker.args[0]
    gate = state.gate
    if gate.tasks and task_name not in gate.tasks:
        reason = f"task {task_name} is not in the configured tasks ({', '.join(gate.tasks)})"
        metafunc.parametrize("llmgate_item", [
            pytest.param(None, id=f"{task_name}-not-selected", marks=pytest.mark.skip(reason=reason))])
        return
    settings = gate.task_settings.get(task_name)
    limit = metafunc.config.getoption("llmgate_limit") or (settings.limit if settings else None) or gate.limit
    try:
        items, version = state.tasks[task_name].load(gate.data_dir, limit)
    except (DatasetError, ValueError) as error:
        raise pytest.Collector.CollectError(f"llmgate: task {task_name}: {error}") from None
    state.versions[task_name] = version
    marks = [getattr(pytest.mark, task_name)] + [getattr(pytest.mark, g) for g in gate.groups_of(task_name)]
    metafunc.parametrize(
        "llmgate_item", [pytest.param(item, id=item.item_id, marks=marks) for item in items])


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Assign the selected items to shards (after -k, -m and --lf have deselected theirs)."""
    state = config.stash[STATE]
    if state.engine is None:
        return
    for item in items:
        callspec = getattr(item, "callspec", None)
        task_item = callspec.params.get("llmgate_item") if callspec is not None else None
        if not isinstance(task_item, TaskItem):
            continue
        base = item.nodeid.partition("[")[0]
        shard = shard_of(base, task_item.item_id, state.gate.shard_size)
        item.stash[SHARD] = shard
        state.engine.register(shard, task_item, state.versions[task_item.task])
    if state.adaptive is not None:
        _shuffle_shards(items, state.gate.seed)
    if config.getoption("llmgate_plan"):
        controller = config.pluginmanager.get_plugin("llmgate-controller")
        controller.plan = _plan(config, state, items)
        # Planning evaluates nothing: every item is deselected, and the plan is the output.
        config.hook.pytest_deselected(items=list(items))
        items[:] = []


def _shuffle_shards(items: list[pytest.Item], seed: int) -> None:
    """Reorder whole shards in a seeded random order (items keep their order inside a shard).

    Anytime-valid stopping assumes the items arrive in random order; every xdist worker computes
    the same order from the seed, so collections stay identical.
    """
    import random

    shards: dict[str, list[pytest.Item]] = {}
    others = []
    for item in items:
        if SHARD in item.stash:
            shards.setdefault(item.stash[SHARD], []).append(item)
        else:
            others.append(item)
    order = sorted(shards)
    random.Random(seed).shuffle(order)
    items[:] = others + [item for key in order for item in shards[key]]


def _cached_scores(state: RunState, role: str, members: list[tuple[TaskItem, str]], metric: str) -> dict[str, float]:
    """Item name -> ``metric`` score of ``role``'s cached results (items not in the cache are absent)."""
    assert state.engine is not None
    by_name = {item.qualified_id: item for item, _ in members}
    return {name: state.tasks[by_name[name].task].score(by_name[name], value)["scores"][metric]
            for name, value in state.engine.cached_results(role, members).items()}


def _plan(config: pytest.Config, state: RunState, items: list[pytest.Item]) -> list[dict[str, Any]]:
    """Per task: cached baseline accuracy, discordance with the candidate, detectable drop, items needed."""
    from .stats import items_needed, minimum_detectable_drop

    assert state.engine is not None and state.stage is not None
    by_task: dict[str, list[tuple[TaskItem, str]]] = {}
    for item in items:
        task_item = item.callspec.params.get("llmgate_item") if hasattr(item, "callspec") else None
        if isinstance(task_item, TaskItem):
            by_task.setdefault(task_item.task, []).append((task_item, state.versions[task_item.task]))
    candidate = next((role for role in state.roles if role != BASELINE_STAGE), None)
    drop, power = config.getoption("llmgate_plan_drop"), config.getoption("llmgate_plan_power")
    rows = []
    for task_name, members in sorted(by_task.items()):
        metric = state.gate.metric_of(task_name, state.tasks[task_name].default_metric)
        base = _cached_scores(state, BASELINE_STAGE, members, metric)
        cand = _cached_scores(state, candidate, members, metric) if candidate else {}
        row: dict[str, Any] = {"task": task_name, "n": len(members), "baseline_cached": len(base),
                               "candidate_cached": len(cand), "drop": drop, "power": power}
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


@pytest.fixture
def llmgate_item() -> TaskItem:
    """The benchmark item under test; parametrized by ``@pytest.mark.llmgate(task)``."""
    raise pytest.UsageError("llmgate_item is only available in tests marked @pytest.mark.llmgate('<task>')")


@pytest.fixture
def llmgate_outcome(request: pytest.FixtureRequest, llmgate_item: TaskItem | None) -> ItemOutcome:
    """Evaluate the item on every model of the stage; a harness failure here is a test error."""
    state = request.config.stash[STATE]
    if state.stage is None:
        pytest.skip("benchmarks run with --stage=baseline, --stage=<stage> or --stage=all")
    assert llmgate_item is not None and state.engine is not None
    if state.adaptive is not None:
        resolved = _adaptive_resolved(state).get(llmgate_item.task)
        if resolved is not None:
            pytest.skip(f"llmgate adaptive: {llmgate_item.task} resolved ({resolved['decision']}) "
                        f"after {resolved['items']} items")
    if llmgate_item.error is not None:
        raise DatasetError(llmgate_item.error)
    task = state.tasks[llmgate_item.task]
    metric = state.gate.metric_of(task.name, task.default_metric)
    shard = request.node.stash[SHARD]
    sides = {}
    for role in state.roles:
        result = state.engine.result(role, shard, llmgate_item)
        side = task.score(llmgate_item, result.results)
        side.update(cached=result.cached, stored=result.stored, model=state.roles[role].name,
                    fingerprint=state.engine.fingerprint(role))
        sides[role] = side
    outcome = ItemOutcome(
        task=task.name, doc_id=llmgate_item.doc_id, item_id=llmgate_item.item_id, metric=metric,
        gold=llmgate_item.gold, chance=task.chance(llmgate_item), sides=sides, worker=state.worker,
        loads=dict(state.engine.loads), notes=tuple(state.engine.notes))
    request.node.stash[OUTCOME] = outcome.as_dict()
    return outcome


def _adaptive_resolved(state: RunState) -> dict[str, dict[str, Any]]:
    """Tasks already resolved: in this process (no xdist), or as the controller published them."""
    assert state.adaptive is not None
    if state.worker != "main" and state.adaptive_file is not None and state.adaptive_file.is_file():
        import contextlib
        import json

        # Mid-replace on a filesystem without atomic rename: read it again at the next item.
        with contextlib.suppress(OSError, ValueError):
            state.adaptive.update(json.loads(state.adaptive_file.read_text()))
    return state.adaptive


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Attach the outcome to the call report: it travels to the controller, even across xdist."""
    report = yield
    if SHARD in item.stash and call.excinfo is not None and call.excinfo.errisinstance(HARNESS_ERRORS):
        # A harness error names its cause in one line; the engine's traceback would only hide it.
        report.longrepr = f"llmgate harness error: {call.excinfo.value}"
    if call.when == "call" and OUTCOME in item.stash:
        report.llmgate = item.stash[OUTCOME]
    if SHARD in item.stash:
        report.llmgate_item = True
    return report


def pytest_report_teststatus(report: pytest.TestReport, config: pytest.Config) -> Any:
    """Regressions and improvements get their own letters and counts; they are not failures."""
    outcome = getattr(report, "llmgate", None)
    if report.when != "call" or not report.passed or not outcome:
        return None
    if outcome["status"] == "regressed":
        return "regressed", "R", ("REGRESSED", {"yellow": True})
    if outcome["status"] == "improved":
        return "improved", "I", ("IMPROVED", {"green": True})
    return None


class GateController:
    """Controller-only: tallies outcomes, decides, reports, sets the exit code."""

    def __init__(self, config: pytest.Config, state: RunState) -> None:
        self.config = config
        self.state = state
        self.tally = Tally()
        self.harness_errors = 0
        self.rendered: list[tuple[str, dict[str, bool]]] = []
        self.plan: list[dict[str, Any]] | None = None
        self.adaptive_skipped = 0
        # task -> item id -> outcome, in arrival order (a re-run item keeps its first place, as in the tally)
        self.arrivals: dict[str, dict[str, dict[str, Any]]] = {}
        self.interrupted = False
        self.collection_errors = 0
        self.crashed: list[str] = []  # node ids of items whose xdist worker died while running them
        self.report_error: str | None = None

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Collect outcomes and count harness errors of llmgate items."""
        if report.skipped and report.when == "setup" and "llmgate adaptive:" in str(report.longrepr):
            self.adaptive_skipped += 1
        outcome = getattr(report, "llmgate", None)
        if outcome is not None and report.when == "call":
            self.tally.add(outcome)
            if self.state.adaptive is not None and outcome["task"] not in self.state.adaptive:
                self.arrivals.setdefault(outcome["task"], {})[outcome["id"]] = outcome
                self._check_adaptive(outcome["task"])
        elif getattr(report, "llmgate_item", False) and report.failed and report.when == "setup":
            self.harness_errors += 1

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        """A module that failed to collect (a dataset that does not load): its items never run."""
        if report.failed:
            self.collection_errors += 1

    def pytest_keyboard_interrupt(self) -> None:
        """Ctrl-C (or a KeyboardInterrupt from a backend): the run is not complete, whatever ran."""
        self.interrupted = True

    @pytest.hookimpl(optionalhook=True)
    def pytest_handlecrashitem(self, crashitem: str) -> None:
        """pytest-xdist: a worker died while running ``crashitem``; xdist reports that item as failed."""
        self.crashed.append(crashitem)

    def _check_adaptive(self, task: str) -> None:
        """Stop ``task`` once the confidence sequence on its items so far resolves the retention floor."""
        from .stats import sequential_decision

        state = self.state
        assert state.adaptive is not None and state.stage is not None
        stage = state.gate.stage(state.stage)
        threshold = stage.thresholds_for(task, state.gate.groups_of(task)).min_retention
        if not threshold:
            return
        # Arrival order (the shuffled shard order), not row order: the sequence's validity rests on it.
        seen = list(self.arrivals[task].values())
        metric = seen[0]["metric"]
        base = [o["sides"][BASELINE_STAGE]["scores"][metric] for o in seen]
        cand = [o["sides"][state.stage]["scores"][metric] for o in seen]
        decision = sequential_decision(base, cand, threshold, alpha=1 - state.gate.confidence)
        if decision == "continue":
            return
        state.adaptive[task] = {"decision": decision, "items": len(seen)}
        if state.adaptive_file is not None:
            import json

            state.adaptive_file.parent.mkdir(parents=True, exist_ok=True)
            temporary = state.adaptive_file.with_suffix(".tmp")
            temporary.write_text(json.dumps(state.adaptive))
            os.replace(temporary, state.adaptive_file)

    def _unchecked(self, stats: Mapping[str, Any], stages: list[str]) -> list[str]:
        """What the gate could not check: configured rules whose tasks had no evaluated item."""
        state = self.state
        if stats:
            nothing = []
        elif self.harness_errors or self.collection_errors:
            nothing = ["no benchmark item produced an outcome: see the errors above"]
        else:
            nothing = ["no benchmark item ran: no test marked @pytest.mark.llmgate was collected under the given "
                       "paths, or -k / -m / --llmgate-tasks deselected them all (gate a subset of tasks with "
                       "--llmgate-tasks=A,B)"]
        if state.stage == BASELINE_STAGE:
            return nothing
        gate = state.gate
        needed: dict[str, str] = {}
        for task in gate.tasks:
            needed.setdefault(task, "--llmgate-tasks" if self.config.getoption("llmgate_tasks")
                              else "[tool.llmgate].tasks")
        for name in stages:
            for task in gate.stage(name).tasks:
                needed.setdefault(task, f"stage '{name}' thresholds for {task}")
        for rule in gate.critical:
            for task in rule.tasks:
                needed.setdefault(task, f"the rule '{rule.label}'")
        missing = []
        for task, why in needed.items():
            st = stats.get(task)
            absent = [role for role in (BASELINE_STAGE, *stages) if st is None or role not in st.scores]
            if st is None:
                missing.append(f"{task} not checked: no item ran, but {why} needs it (no collected benchmark "
                               "module declares it, -k / -m deselected its items, or they all errored)")
            elif absent:
                missing.append(f"{task} not checked: no item has results of {', '.join(absent)}, but {why} "
                               "needs them")
        return nothing + missing

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        """Decide the verdict, write the report, escalate the exit status (never lower it)."""
        from .gate import decide_run
        from .report.json_report import build_report, write_report
        from .report.terminal import render

        state = self.state
        assert state.stage is not None
        if self.plan is not None:
            from .report.terminal import plan_lines

            self.rendered = plan_lines(self.plan)
            session.exitstatus = 0  # every item was deselected on purpose
            return
        if self.config.option.collectonly:
            return
        stats = self.tally.task_stats(state.gate.confidence)
        decision = decide_run(state.gate, state.stage, stats, adaptive=state.adaptive)
        if state.adaptive_file is not None:
            state.adaptive_file.unlink(missing_ok=True)
        unchecked = self._unchecked(stats, [v.stage for v in decision.stages])
        problems = []  # the cause first: the headline names problems[0]
        if self.collection_errors:
            problems.append(f"{self.collection_errors} module(s) failed to collect: see the errors above; "
                            "none of their items ran")
        if self.harness_errors:
            problems.append(f"{self.harness_errors} item(s) hit harness errors: see the errors above")
        for nodeid in self.crashed:
            rerun = any(o["id"] == nodeid.rpartition("[")[2].rstrip("]") for o in self.tally.outcomes.values())
            problems.append(
                f"an xdist worker died while running {nodeid}: pytest counts that item as failed (exit 1)"
                + (", and again when the replacement worker re-ran it; the figures count its re-run once" if rerun
                   else "; the figures above do not include it")
                + ". Run again for a verdict: every finished shard is read from the cache")
        stopped = self.interrupted and not self.collection_errors  # pytest stops on collection errors itself
        if stopped or session.shouldstop or session.shouldfail:
            problems.append("the run was stopped before every selected item ran (interrupted, -x or --maxfail)")
        problems += unchecked
        exit_code = int(session.exitstatus)
        if exit_code == 0:
            exit_code = EXIT_UNCHECKED if unchecked else decision.exit_code
            session.exitstatus = exit_code
        items = self.tally.ordered()
        models: dict[str, dict[str, Any]] = {}
        workers: dict[str, dict[str, int]] = {}
        notes: list[str] = []
        for outcome in items:
            for role, side in outcome["sides"].items():
                info = models.setdefault(role, {"name": side["model"], "fingerprint": side["fingerprint"],
                                                "evaluated": 0, "cached": 0, "stored": 0})
                info["cached" if side["cached"] else "evaluated"] += 1
                info["stored"] += bool(side.get("stored", side["cached"]))
            loads = workers.setdefault(outcome["worker"], {})
            for name, count in outcome["loads"].items():
                loads[name] = max(loads.get(name, 0), count)
            notes.extend(note for note in outcome.get("notes", ()) if note not in notes)
        self.rendered = render(decision, stats, exit_code=exit_code, problems=problems, notes=notes,
                               models=models, cache=state.gate.cache_path is not None)
        if state.adaptive is not None:
            resolved = ", ".join(
                f"{task} {v['decision']} after {v['items']} items" for task, v in state.adaptive.items())
            self.rendered.insert(0, (f"llmgate adaptive: {resolved or 'no task resolved early'}; "
                                     f"{self.adaptive_skipped} items skipped", {"bold": True}))
        if state.report_path is not None:
            try:
                write_report(state.report_path, build_report(
                    decision=decision, exit_code=exit_code, stats=stats, items=items, models=models,
                    workers=workers, harness_errors=self.harness_errors, chance_margin=state.gate.chance_margin,
                    policy=state.gate.policy, adaptive=state.adaptive, skipped=self.adaptive_skipped,
                    problems=problems, unchecked=unchecked, notes=notes))
            except OSError as error:
                # The verdict and the exit code stand; only the file is missing, and the summary says so.
                self.report_error = (f"llmgate: could not write the JSON report to {state.report_path}: "
                                     f"{error.strerror or error}; the verdict above stands (exit {exit_code})")

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        """The table and the verdict."""
        if not self.rendered:
            return
        terminalreporter.section("llmgate", sep="=")
        for line, markup in self.rendered:
            terminalreporter.write_line(line, **markup)
        if self.report_error is not None:
            terminalreporter.write_line(self.report_error, red=True, bold=True)
        elif self.state.report_path is not None:
            terminalreporter.write_line(f"llmgate report: {self.state.report_path}")

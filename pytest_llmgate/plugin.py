"""pytest-llmgate's entry point: options and ini keys, hook specs, the configuration, the feature plugins.

It reads the configuration once into ``config.stash`` and registers the plugin objects of the features
that are on (pytest core's way: ``stepwise.py``, ``cacheprovider.py``); pytest-xdist's roles are split
the same way. The modules, one per role or feature:

- ``collection``: parametrize, shards, the collection without GC passes (whenever llmgate is in use);
- ``worker``: the engine of each process, the outcome of each item, its transport and status letters;
- ``controller``: tally, verdict, exit status, reports (the controller only);
- ``adaptive`` (``--llmgate-adaptive``), ``plan`` (``--llmgate-plan``), ``xdist_support`` (with ``-n``).

A project without llmgate configuration and without ``--stage`` pays for nothing but the ``llmgate``
marker: no configuration parsing, no task registry, no plugin objects. Heavy imports (torch,
transformers) happen inside the engine, never at import time.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import pytest

from .config import POLICIES
from .state import MARKER

SKIP_REASON = "benchmarks run with --stage=baseline, --stage=<stage> or --stage=all"


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
    group.addoption(
        "--stage",
        dest="llmgate_stage",
        type=_stage_name,
        default=None,
        metavar="NAME",
        help="evaluate benchmarks: 'baseline' records the reference model, a stage name gates "
        "that stage's model, 'all' runs the ladder and picks the most compressed passing stage",
    )
    group.addoption(
        "--llmgate-report",
        dest="llmgate_report",
        default=None,
        metavar="PATH",
        help="write the JSON report (schema llmgate-report/1) to PATH",
    )
    for name, what in (
        ("md", "a Markdown summary (verdict, comparison table, failed rules, size and speed) for a pull request"),
        ("html", "a self-contained HTML report with charts and an item browser"),
        ("csv", "one CSV row per task x stage with every figure of the table"),
    ):
        group.addoption(f"--llmgate-{name}", dest=f"llmgate_{name}", default=None, metavar="PATH", help=f"write {what}")
    group.addoption(
        "--llmgate-trend",
        dest="llmgate_trend",
        action="store_true",
        help="print each task's retention over the last runs of this stage from the run history, flagging drift",
    )
    for name, tracker in (("wandb", "Weights & Biases"), ("mlflow", "MLflow")):
        group.addoption(
            f"--llmgate-{name}",
            dest=f"llmgate_{name}",
            action="store_true",
            help=f"log the run's figures, comparison table and chart to {tracker} ([tool.llmgate.{name}] "
            f"holds its settings; needs pytest-llmgate[{name}])",
        )
    group.addoption(
        "--llmgate-no-progress",
        dest="llmgate_no_progress",
        action="store_true",
        help="no progress line (items done per task, items/s, ETA); -q has none either",
    )
    group.addoption(
        "--llmgate-config",
        dest="llmgate_config",
        default=None,
        metavar="PATH",
        help="read the configuration from PATH instead of pyproject.toml / llmgate.toml",
    )
    group.addoption(
        "--llmgate-data-dir",
        dest="llmgate_data_dir",
        default=None,
        metavar="DIR",
        help="load task data from DIR/<task>/<split>.jsonl|parquet instead of the hub (also $LLMGATE_DATA_DIR)",
    )
    group.addoption(
        "--llmgate-limit",
        dest="llmgate_limit",
        type=_positive_int,
        default=None,
        metavar="N",
        help="evaluate the first N items of each task",
    )
    group.addoption(
        "--llmgate-tasks",
        dest="llmgate_tasks",
        default=None,
        metavar="A,B",
        help="comma-separated tasks to run (overrides tasks in the config)",
    )
    group.addoption(
        "--llmgate-cache",
        dest="llmgate_cache",
        default=None,
        metavar="PATH",
        help="result cache file (default .llmgate/cache.sqlite beside the config)",
    )
    group.addoption(
        "--llmgate-no-cache",
        dest="llmgate_no_cache",
        action="store_true",
        help="neither read nor write the result cache",
    )
    group.addoption(
        "--llmgate-no-speed",
        dest="llmgate_no_speed",
        action="store_true",
        help="skip the speed tests (llmgate_probe); stage speed rules are reported as skipped",
    )
    group.addoption(
        "--llmgate-policy",
        dest="llmgate_policy",
        default=None,
        choices=POLICIES,
        help="gate policy: point (estimate vs threshold), strict (lower bound must clear it: deployments), "
        "lenient (fail only when the upper bound misses it: pull requests)",
    )
    group.addoption(
        "--llmgate-plan",
        dest="llmgate_plan",
        action="store_true",
        help="evaluate nothing: from the cached baseline (and candidate, when cached) print per task the "
        "smallest retention drop the paired test detects at this many items, and the items needed "
        "for --llmgate-plan-drop",
    )
    group.addoption(
        "--llmgate-plan-drop",
        dest="llmgate_plan_drop",
        type=_open_fraction,
        default=0.05,
        metavar="D",
        help="relative retention drop to plan for (default 0.05)",
    )
    group.addoption(
        "--llmgate-plan-power",
        dest="llmgate_plan_power",
        type=_open_fraction,
        default=0.8,
        metavar="P",
        help="power to plan for (default 0.8)",
    )
    group.addoption(
        "--llmgate-adaptive",
        dest="llmgate_adaptive",
        action="store_true",
        help="evaluate shards in a seeded random order and stop a task once an anytime-valid "
        "confidence sequence resolves its retention floor; its remaining items are skipped",
    )
    group.addoption(
        "--llmgate-set",
        dest="llmgate_set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --llmgate-set models.int4.dtype=bfloat16 (repeatable)",
    )
    # Every run-wide option is also an ini key ([tool.pytest.ini_options]); the command line wins.
    parser.addini("llmgate_report", "default path of the JSON report", default=None)
    parser.addini("llmgate_data_dir", "default local data folder", default=None)
    parser.addini("llmgate_config", "default configuration file", default=None)
    parser.addini("llmgate_limit", "default --llmgate-limit: the first N items of each task", default=None)
    parser.addini("llmgate_tasks", "default --llmgate-tasks: comma-separated tasks to run", default=None)
    parser.addini("llmgate_cache", "default --llmgate-cache: the result cache file", default=None)
    parser.addini("llmgate_no_cache", "default --llmgate-no-cache", type="bool", default=False)
    parser.addini("llmgate_md", "default --llmgate-md: the Markdown summary's path", default=None)
    parser.addini("llmgate_html", "default --llmgate-html: the HTML report's path", default=None)
    parser.addini("llmgate_csv", "default --llmgate-csv: the CSV's path", default=None)
    parser.addini("llmgate_trend", "default --llmgate-trend", type="bool", default=False)
    parser.addini("llmgate_no_progress", "default --llmgate-no-progress", type="bool", default=False)
    parser.addini(
        "llmgate_progress_interval",
        "seconds between progress lines when the output is not a terminal (a CI log); default 30",
        default=None,
    )
    parser.addini("llmgate_wandb", "default --llmgate-wandb", type="bool", default=False)
    parser.addini("llmgate_mlflow", "default --llmgate-mlflow", type="bool", default=False)
    parser.addini("llmgate_no_speed", "default --llmgate-no-speed", type="bool", default=False)
    parser.addini("llmgate_policy", "default --llmgate-policy: point, strict or lenient", default=None)
    parser.addini("llmgate_adaptive", "default --llmgate-adaptive", type="bool", default=False)


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    """Declare the hooks llmgate adds: ``pytest_llmgate_tasks`` (Python tasks) and ``pytest_llmgate_outcome``."""
    from . import hookspecs

    pluginmanager.add_hookspecs(hookspecs)


def _option(config: pytest.Config, name: str) -> Any:
    """The command line's value, else the ini key's."""
    value = config.getoption(name)
    return value if value not in (None, False) else config.getini(name) or None


def _uses_llmgate(config: pytest.Config) -> bool:
    """Whether this project uses llmgate: ``--stage``, ``--llmgate-config``, an llmgate.toml, or a
    ``[tool.llmgate]`` table in pyproject.toml (looked for as text: parsing waits until it is needed)."""
    if config.getoption("llmgate_stage") or _option(config, "llmgate_config"):
        return True
    if (config.rootpath / "llmgate.toml").is_file():
        return True
    pyproject = config.rootpath / "pyproject.toml"
    try:
        return "tool.llmgate" in pyproject.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Read the configuration once and register the feature plugins that are on."""
    config.addinivalue_line("markers", f"{MARKER}(task): parametrize this test with every item of the benchmark task")
    if not _uses_llmgate(config):
        return
    from .state import STATE

    state = _run_state(config)
    config.stash[STATE] = state
    # Registered before the other plugins' cleanups (this configure runs first), so it runs after them:
    # pytest's own garbage-collector passes at exit still skip what collection froze.
    config.add_cleanup(state.unfreeze)
    _register_features(config, state)


def _run_state(config: pytest.Config) -> Any:
    """The validated configuration, the configured tasks and this process's role, as one ``RunState``."""
    from .config import ALL_STAGES, BASELINE_STAGE, ConfigError, load_gate_config
    from .state import RunState

    stage = config.getoption("llmgate_stage")
    limit = _option(config, "llmgate_limit")
    if limit is not None and not isinstance(limit, int):
        limit = _ini_positive_int(limit)
    gate, tasks = load_gate_config(
        rootpath=config.rootpath,
        explicit=_option(config, "llmgate_config"),
        assignments=[
            *(f"{name}.enabled=true" for name in ("wandb", "mlflow") if _option(config, f"llmgate_{name}")),
            *config.getoption("llmgate_set"),
        ],
        python_tasks=lambda: config.hook.pytest_llmgate_tasks(config=config),
        limit=limit,
        data_dir=_option(config, "llmgate_data_dir"),
        tasks=_option(config, "llmgate_tasks"),
        policy=_option(config, "llmgate_policy"),
        cache=_option(config, "llmgate_cache"),
        no_cache=bool(_option(config, "llmgate_no_cache")),
    )
    for task in tasks:
        config.addinivalue_line("markers", f"{task}: items of the {task} benchmark")
    for group in gate.groups:
        config.addinivalue_line("markers", f"{group}: items of the tasks in llmgate group '{group}'")
    if _option(config, "llmgate_adaptive") and (not stage or stage in (BASELINE_STAGE, ALL_STAGES)):
        raise ConfigError("llmgate: --llmgate-adaptive gates one stage: use it with --stage=<stage name>")
    workerinput = getattr(config, "workerinput", None)
    report = _option(config, "llmgate_report")
    report_path = Path(report).resolve() if report else None
    if workerinput is None:
        from .report.trackers import check_installed

        check_installed(gate)
        for option in ("report", "md", "html", "csv"):
            value = report_path if option == "report" else _option(config, f"llmgate_{option}")
            if value is not None:
                _check_report_path(Path(value).resolve(), f"--llmgate-{option}")
    base = gate.source.parent if gate.source is not None else config.rootpath
    return RunState(
        gate=gate,
        stage=stage,
        roles=gate.stage_models(stage) if stage else {},
        work_dir=base / ".llmgate",
        report_path=report_path,
        worker=workerinput["workerid"] if workerinput else "main",
        tasks=tasks,
    )


def _register_features(config: pytest.Config, state: Any) -> None:
    """One plugin object per feature that is on; nothing else holds feature logic."""
    from .collection import CollectionPlugin

    plugins = config.pluginmanager
    plugins.register(CollectionPlugin(state), "llmgate-collection")
    if not state.stage:
        return  # items are collected (ids, -k, --collect-only) and skipped by the fixture
    from .worker import make_engine

    engine = make_engine(config, state)
    state.engine = engine
    if config.getoption("llmgate_plan"):
        from .plan import PlanPlugin, check_options

        check_options(config, state.stage)
        plugins.register(PlanPlugin(config, state, engine), "llmgate-plan")
        return
    from .tasks.coding import CodeTask, Verdicts
    from .worker import WorkerPlugin

    # Code tasks keep sandbox verdicts next to the results (a warm run executes nothing), per run.
    verdicts = Verdicts(engine.cache)
    state.tasks = {
        name: task.with_verdicts(verdicts) if isinstance(task, CodeTask) else task for name, task in state.tasks.items()
    }
    plugins.register(WorkerPlugin(state, engine), "llmgate-worker")
    if not _option(config, "llmgate_no_speed"):
        from .speed import SpeedPlugin

        plugins.register(SpeedPlugin(config, state), "llmgate-speed")
    if state.is_controller:
        from .controller import GateController
        from .report.outputs import ReportsPlugin

        reports = ReportsPlugin(
            config,
            state,
            md=_option(config, "llmgate_md"),
            html=_option(config, "llmgate_html"),
            csv=_option(config, "llmgate_csv"),
            trend=bool(_option(config, "llmgate_trend")),
        )
        if reports.on:  # registered before the controller, so that its lines follow the controller's summary
            plugins.register(reports, "llmgate-reports")

        plugins.register(GateController(config, state), "llmgate-controller")
        if config.get_verbosity() >= 0 and not _option(config, "llmgate_no_progress"):
            from .progress import ProgressPlugin

            interval = _ini_seconds(config, "llmgate_progress_interval")
            plugins.register(ProgressPlugin(config, state, interval_s=interval), "llmgate-progress")
        if plugins.hasplugin("xdist") and getattr(config.option, "dist", "no") != "no":  # -n / --dist in use
            from .xdist_support import XdistShardPlugin

            plugins.register(XdistShardPlugin(state.gate.shard_size), "llmgate-xdist")
    if _option(config, "llmgate_adaptive"):
        from . import adaptive

        adaptive.start(config, state)


def _ini_seconds(config: pytest.Config, name: str) -> float:
    from .config import ConfigError
    from .progress import DEFAULT_INTERVAL_S

    text = config.getini(name)
    if text in (None, ""):
        return DEFAULT_INTERVAL_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise ConfigError(f"llmgate: ini key {name}: expected a number of seconds >= 0, got {text!r}")
    return seconds


def _ini_positive_int(text: str) -> int:
    from .config import ConfigError

    try:
        return _positive_int(str(text))
    except argparse.ArgumentTypeError as error:
        raise ConfigError(f"llmgate: ini key llmgate_limit: {error}") from None


SUGGESTED_NAMES = {
    "--llmgate-report": "llmgate.json",
    "--llmgate-md": "llmgate.md",
    "--llmgate-html": "llmgate.html",
    "--llmgate-csv": "llmgate.csv",
}


def _check_report_path(path: Path, option: str = "--llmgate-report") -> None:
    """A report that cannot be written is a usage error before anything is evaluated, not a lost verdict after."""
    from .config import ConfigError

    if path.is_dir():
        raise ConfigError(
            f"llmgate: {option} {path} is a folder; give a file path such as {path / SUGGESTED_NAMES[option]}"
        )
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise ConfigError(
            f"llmgate: {option} {path}: {folder} is a file, so the report cannot be written there; choose another path"
        )
    if not os.access(folder, os.W_OK):
        raise ConfigError(f"llmgate: {option} {path}: {folder} is not writable; choose another path")


@pytest.fixture
def llmgate_item(request: pytest.FixtureRequest) -> Any:
    """The benchmark item under test; parametrized by ``@pytest.mark.llmgate(task)``."""
    from .state import STATE

    if STATE not in request.config.stash:
        return None  # llmgate is not in use here: llmgate_outcome skips
    raise pytest.UsageError("llmgate_item is only available in tests marked @pytest.mark.llmgate('<task>')")


@pytest.fixture
def llmgate_outcome(request: pytest.FixtureRequest, llmgate_item: Any) -> Any:
    """Evaluate the item on every model of the stage (an ``ItemOutcome``); skipped without ``--stage``."""
    from .state import STATE

    state = request.config.stash.get(STATE, None)
    if state is None or state.stage is None:
        pytest.skip(SKIP_REASON)
    worker = request.config.pluginmanager.get_plugin("llmgate-worker")
    assert worker is not None, "llmgate: a stage run registers its worker plugin in pytest_configure"
    return worker.evaluate(request, llmgate_item)


@pytest.fixture(scope="session")
def llmgate_model(request: pytest.FixtureRequest) -> Any:
    """``llmgate_model(role)``: the loaded backend of a model of this run, for tests of your own (golden prompts,
    latency, a custom metric). Roles are ``"baseline"`` and the stages the run evaluates (``--stage=X``: X, and
    the previous rung when a step rule needs it); a model's name works too. The engine that evaluates the
    benchmark items loads it, once per process (per xdist worker), and results of such tests are not cached.
    Skipped without ``--stage``, like ``llmgate_outcome``.
    """
    from .state import STATE

    state = request.config.stash.get(STATE, None)
    if state is None or state.stage is None or state.engine is None:
        pytest.skip(SKIP_REASON)
    engine = state.engine

    def model(role: str) -> Any:
        by_name = {spec.name: r for r, spec in engine.roles.items()}
        chosen = role if role in engine.roles else by_name.get(role)
        if chosen is None:
            known = ", ".join(sorted({*engine.roles, *by_name}))
            raise LookupError(f"llmgate_model({role!r}): not a model of this run (--stage={state.stage}); use {known}")
        return engine.backend(chosen)

    return model


@pytest.fixture
def llmgate_probe(request: pytest.FixtureRequest) -> Any:
    """The serving probe of one model of this run; ``llmgate_probe.run(benchmark)`` times it with pytest-benchmark.

    A test taking it is parametrized with one case per model and measurement (batch-1 latency blocks interleaved
    across the models, then throughput); the gate reads the timings (docs/efficiency.md). Skipped without
    ``--stage`` and with ``--llmgate-no-speed``.
    """
    from .state import STATE

    state = request.config.stash.get(STATE, None)
    if state is None or state.stage is None:
        pytest.skip(SKIP_REASON)
    speed = request.config.pluginmanager.get_plugin("llmgate-speed")
    if speed is None:
        pytest.skip("llmgate speed: --llmgate-no-speed")
    return speed.probe(request.param)

"""The evaluating side, in every process: the engine, the outcome of each item, its transport and letters.

Without xdist this runs in the one pytest process; with xdist in each worker (and, for the status
letters only, in the controller, whose terminal shows them).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Generator
from typing import Any

import pytest

from .cache import CacheError, ResultCache
from .config import ALL_STAGES, BASELINE_STAGE, ConfigError
from .engine import BudgetExceeded, Engine, ShardError
from .models import ModelLoadError
from .models.dequantized import dequantized_root
from .outcome import ItemOutcome
from .state import OUTCOME, SHARD, RunState
from .tasks import DatasetError, TaskItem
from .tasks.coding import SandboxError

HARNESS_ERRORS = (ShardError, DatasetError, ModelLoadError, SandboxError)


def make_engine(config: pytest.Config, state: RunState) -> Engine:
    """This process's engine: its cache (checked now: an unusable one stops the run before anything is
    computed), its share of the CPU cores under xdist, its GPU."""
    workerinput = getattr(config, "workerinput", None)
    gate = state.gate
    cache = ResultCache(gate.cache_path) if gate.cache_path is not None else None
    if cache is not None:
        try:
            cache.check()
        except CacheError as error:
            raise ConfigError(str(error)) from None
    worker_index = int(state.worker[2:]) if state.worker.startswith("gw") else None
    threads = max(1, (os.cpu_count() or 1) // int(workerinput["workercount"])) if workerinput else None
    # One id for the whole run, in every process: results of a model nothing identifies stay within it.
    run_id = str(workerinput.get("testrunuid", "")) if workerinput else uuid.uuid4().hex
    from .judge import judge_roles
    from .speed import probe_roles

    return Engine(
        # the run's models, the speed references the probe also measures, and the judges of judged tasks
        roles={**probe_roles(state), **judge_roles(gate.judges(), gate.models)},
        cache=cache,
        work_dir=state.work_dir,
        worker_index=worker_index,
        cpu_threads=threads,
        run_id=run_id or uuid.uuid4().hex,
        # $LLMGATE_DEQUANTIZED_DIR, else beside the result cache, else in the work folder (``dequantized_root``).
        dequantized_dir=dequantized_root(gate.cache_path, state.work_dir),
        # Each xdist worker spends at most its share of the run's budget.
        budget=gate.max_cost / int(workerinput["workercount"]) if gate.max_cost and workerinput else gate.max_cost,
    )


class WorkerPlugin:
    """Evaluates items through the engine and puts each outcome on its call report."""

    def __init__(self, state: RunState, engine: Engine) -> None:
        self.state = state
        self.engine = engine
        # The stage whose regressions the status letters count: the gated one, not the previous rung a
        # step rule also evaluates (None: baseline and --stage=all, where any candidate counts).
        self.target = state.stage if state.stage not in (None, BASELINE_STAGE, ALL_STAGES) else None

    def evaluate(self, request: pytest.FixtureRequest, item: TaskItem) -> ItemOutcome:
        """Evaluate ``item`` on every model of the stage; a harness failure here is a test error."""
        state, engine = self.state, self.engine
        if item.error is not None:
            raise DatasetError(item.error)
        task = state.tasks[item.task]
        metric = state.gate.metric_of(task.name, task.default_metric)
        shard = request.node.stash[SHARD]
        sides = {}
        for role in state.roles:
            result = engine.result(role, shard, item)
            side = task.score(item, result.results)
            side.update(
                cached=result.cached,
                stored=result.stored,
                model=state.roles[role].name,
                fingerprint=engine.fingerprint(role),
            )
            model_notes = engine.model_notes(role)
            if model_notes:
                side["model_notes"] = model_notes
            memory = engine.memory(role)
            if memory is not None:
                side["memory"] = memory
            spend = engine.item_spend(role, item) if not result.cached else None
            if spend is not None:
                side["spend"] = spend
            sides[role] = side
        settings = state.gate.task_settings.get(task.name)
        if settings is not None and settings.judge is not None:
            self._judge(settings.judge, item, sides)
        outcome = ItemOutcome(
            task=task.name,
            doc_id=item.doc_id,
            item_id=item.item_id,
            metric=metric,
            gold=item.gold,
            chance=task.chance(item),
            sides=sides,
            worker=state.worker,
            loads=dict(engine.loads),
            notes=tuple(engine.notes),
            stage=self.target,
            prompt=item.requests[0].context if item.requests else "",
            choices=tuple(item.choices),
        )
        request.node.stash[OUTCOME] = outcome.as_dict()
        # --junitxml writes these as the test case's properties (CI systems show them).
        request.node.user_properties.extend(
            [("llmgate_task", task.name), ("llmgate_doc_id", item.doc_id), ("llmgate_status", outcome.status)]
        )
        return outcome

    def _judge(self, settings: Any, item: TaskItem, sides: dict[str, dict[str, Any]]) -> None:
        """Each stage's answer against the baseline's, judged in both orders (``judge.py``); on the stage's side."""
        from .judge import UNTIL, judge_item, judge_role

        role = judge_role(settings.model)

        def ask(prompts: list[str]) -> list[str]:
            return self.engine.ask(role, prompts, until=UNTIL, max_gen_toks=settings.max_gen_toks)

        question = item.requests[0].context if item.requests else ""
        try:
            verdicts = judge_item(settings, question, sides, ask)
        except Exception as error:  # the answers stand (and are cached); the item is reported unjudged
            message = f"the judge '{settings.model}' failed: {type(error).__name__}: {error}"
            verdicts = {stage: {"error": message} for stage in sides if stage != BASELINE_STAGE}
        for stage, judged in verdicts.items():
            sides[stage]["judge"] = {**judged, "model": settings.model}

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
        """Attach the outcome to the call report: it travels to the controller, even across xdist."""
        report = yield
        if SHARD in item.stash and call.excinfo is not None and call.excinfo.errisinstance(HARNESS_ERRORS):
            # A harness error names its cause in one line; the engine's traceback would only hide it.
            report.longrepr = f"llmgate harness error: {call.excinfo.value}"
            if call.excinfo.errisinstance(BudgetExceeded):
                item.session.shouldstop = f"llmgate: {call.excinfo.value}"
        if call.when == "call" and OUTCOME in item.stash:
            report.llmgate = item.stash[OUTCOME]
        if SHARD in item.stash:
            report.llmgate_item = True
        return report

    def pytest_report_teststatus(self, report: pytest.TestReport) -> Any:
        """Regressions and improvements get their own letters and counts; they are not failures."""
        outcome = getattr(report, "llmgate", None)
        if report.when != "call" or not report.passed or not outcome:
            return None
        if outcome["status"] == "regressed":
            return "regressed", "R", ("REGRESSED", {"yellow": True})
        if outcome["status"] == "improved":
            return "improved", "I", ("IMPROVED", {"green": True})
        return None

    def pytest_report_header(self) -> list[str]:
        """One line saying what is evaluated."""
        state = self.state
        models = ", ".join(f"{role}={spec.name}" for role, spec in state.roles.items())
        source = state.gate.source or "built-in defaults"
        return [f"llmgate: stage={state.stage} models: {models} (config: {source})"]

    def pytest_unconfigure(self) -> None:
        """Free the models this process loaded and close the cache."""
        self.engine.close()

"""The deciding side, in the controller only: tally the outcomes on the reports, decide, report, exit.

The controller is the one pytest process without xdist, or xdist's controller (which has no items:
everything the verdict needs travels on the reports).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from . import EXIT_UNCHECKED
from .config import BASELINE_STAGE
from .models.memory import merge_memory
from .outcome import ItemOutcome, Tally
from .state import RunState


class GateController:
    """Tallies outcomes, decides the verdict, writes the reports, escalates the exit status."""

    def __init__(self, config: pytest.Config, state: RunState) -> None:
        self.config = config
        self.state = state
        self.tally = Tally()
        self.harness_errors = 0
        self.collection_errors = 0
        self.interrupted = False
        self.crashed: list[str] = []  # node ids of items whose xdist worker died while running them
        self.rendered: list[tuple[str, dict[str, bool]]] = []
        self.report_error: str | None = None

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Collect outcomes and count harness errors of llmgate items."""
        outcome = getattr(report, "llmgate", None)
        if outcome is not None and report.when == "call":
            typed = self.tally.add(outcome)
            self.config.hook.pytest_llmgate_outcome(config=self.config, outcome=typed)
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

    def _unchecked(self, stats: Mapping[str, Any], stages: list[str]) -> list[str]:
        """What the gate could not check: configured rules whose tasks had no evaluated item."""
        state = self.state
        if stats:
            nothing = []
        elif self.harness_errors or self.collection_errors:
            nothing = ["no benchmark item produced an outcome: see the errors above"]
        else:
            nothing = [
                "no benchmark item ran: no test marked @pytest.mark.llmgate was collected under the given "
                "paths, or -k / -m / --llmgate-tasks deselected them all (gate a subset of tasks with "
                "--llmgate-tasks=A,B)"
            ]
        if state.stage == BASELINE_STAGE:
            return nothing
        gate = state.gate
        needed: dict[str, str] = {}
        for task in gate.tasks:
            needed.setdefault(
                task, "--llmgate-tasks" if self.config.getoption("llmgate_tasks") else "[tool.llmgate].tasks"
            )
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
                missing.append(
                    f"{task} not checked: no item ran, but {why} needs it (no collected benchmark "
                    "module declares it, -k / -m deselected its items, or they all errored)"
                )
            elif absent:
                missing.append(f"{task} not checked: no item has results of {', '.join(absent)}, but {why} needs them")
        return nothing + missing

    def _run_figures(self, items: list[ItemOutcome], speed: Any) -> Any:
        """The success rate of the run's items, and why speed was not measured (when it was not)."""
        from .gate import RunFigures
        from .judge import judge_figures
        from .tasks.repeats import base_metric

        ran = len(items) + self.harness_errors + len(self.crashed)
        missing = None
        if speed is None:
            missing = "--llmgate-no-speed"
        elif not speed.records:
            missing = speed.not_measured()
        confidence = self.state.gate.confidence
        return RunFigures(
            success_rate=len(items) / ran if ran else None,
            items=ran,
            speed_missing=missing,
            consistency=self.tally.task_stats(confidence, metric=lambda _, m: "consistency"),
            self_consistency=self.tally.task_stats(confidence, metric=lambda _, m: f"{base_metric(m)}@majority"),
            judge=judge_figures(items, confidence),
        )

    def _problems(self, session: pytest.Session, unchecked: list[str]) -> list[str]:
        """Why the run is not complete, the cause first (the headline names the first)."""
        problems = []
        if self.collection_errors:
            problems.append(
                f"{self.collection_errors} module(s) failed to collect: see the errors above; none of their items ran"
            )
        if self.harness_errors:
            problems.append(f"{self.harness_errors} item(s) hit harness errors: see the errors above")
        for nodeid in self.crashed:
            rerun = any(o.item_id == nodeid.rpartition("[")[2].rstrip("]") for o in self.tally.outcomes.values())
            problems.append(
                f"an xdist worker died while running {nodeid}: pytest counts that item as failed (exit 1)"
                + (
                    ", and again when the replacement worker re-ran it; the figures count its re-run once"
                    if rerun
                    else "; the figures above do not include it"
                )
                + ". Run again for a verdict: every finished shard is read from the cache"
            )
        stopped = self.interrupted and not self.collection_errors  # pytest stops on collection errors itself
        if stopped or session.shouldstop or session.shouldfail:
            problems.append("the run was stopped before every selected item ran (interrupted, -x or --maxfail)")
        return problems + unchecked

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        """Decide the verdict, write the report, escalate the exit status (never lower it)."""
        from .gate import decide_run
        from .outcome import repeat_figures
        from .report.json_report import build_report, write_report
        from .report.terminal import render

        state = self.state
        assert state.stage is not None
        if self.config.option.collectonly:
            return
        stats = self.tally.task_stats(state.gate.confidence)
        items = self.tally.ordered()
        models, workers, notes = _summaries(items)
        speed = self.config.pluginmanager.get_plugin("llmgate-speed")
        run = self._run_figures(items, speed)
        if speed is not None:
            _add_speed(models, speed)
        _add_sizes(models, state)
        for role, info in models.items():
            info["peak_memory_mb"] = (info.get("memory") or {}).get("peak_memory_mb")
            _add_cost(info, role, stats)
        decision = decide_run(state.gate, state.stage, stats, adaptive=state.adaptive, sizes=models, run=run)
        unchecked = self._unchecked(stats, [v.stage for v in decision.stages]) + _unchecked_rules(decision)
        problems = self._problems(session, unchecked)
        exit_code = int(session.exitstatus)
        if exit_code == 0:
            exit_code = EXIT_UNCHECKED if unchecked else decision.exit_code
            session.exitstatus = exit_code
        repeats = repeat_figures(self.tally, state.gate.confidence)
        self.rendered = render(
            decision,
            stats,
            repeats=repeats,
            judged=run.judge,
            exit_code=exit_code,
            problems=problems,
            notes=notes,
            models=models,
            cache=state.gate.cache_path is not None,
        )
        if state.adaptive is not None:
            resolved = ", ".join(
                f"{task} {v['decision']} after {v['items']} items" for task, v in state.adaptive.items()
            )
            self.rendered.insert(
                0,
                (
                    f"llmgate adaptive: {resolved or 'no task resolved early'}; {state.adaptive_skipped} items skipped",
                    {"bold": True},
                ),
            )
        _junit_properties(self.config, decision, exit_code, complete=not problems)
        report = build_report(
            decision=decision,
            exit_code=exit_code,
            stats=stats,
            items=items,
            models=models,
            workers=workers,
            harness_errors=self.harness_errors,
            chance_margin=state.gate.chance_margin,
            policy=state.gate.policy,
            adaptive=state.adaptive,
            skipped=state.adaptive_skipped,
            problems=problems,
            unchecked=unchecked,
            notes=notes,
            repeats=repeats,
            judged=run.judge,
        )
        # Markdown, HTML, CSV, history (report/outputs.py) and plugins of the user's own read the same dict.
        self.config.hook.pytest_llmgate_report(config=self.config, report=report)
        if state.report_path is not None:
            try:
                write_report(state.report_path, report)
            except OSError as error:
                # The verdict and the exit code stand; only the file is missing, and the summary says so.
                self.report_error = (
                    f"llmgate: could not write the JSON report to {state.report_path}: "
                    f"{error.strerror or error}; the verdict above stands (exit {exit_code})"
                )

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


def _summaries(items: list[ItemOutcome]) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, int]], list[str]]:
    """Per model role: name, fingerprint, evaluated/cached/stored counts; per worker: model loads; cache notes."""
    models: dict[str, dict[str, Any]] = {}
    workers: dict[str, dict[str, int]] = {}
    notes: list[str] = []
    for outcome in items:
        for role, side in outcome.sides.items():
            info = models.setdefault(
                role,
                {"name": side["model"], "fingerprint": side["fingerprint"], "evaluated": 0, "cached": 0, "stored": 0},
            )
            info["cached" if side["cached"] else "evaluated"] += 1
            info["stored"] += bool(side.get("stored", side["cached"]))
            for note in side.get("model_notes", ()):
                if note not in info.setdefault("notes", []):
                    info["notes"].append(note)
            if side.get("memory"):
                info["memory"] = merge_memory(info.get("memory"), side["memory"])
            if side.get("spend"):
                spent = info.setdefault("spend", {"seconds": 0.0, "prompt_tokens": 0.0, "completion_tokens": 0.0})
                for key in ("seconds", "prompt_tokens", "completion_tokens"):
                    spent[key] += side["spend"][key]
                if side["spend"].get("cost") is not None:
                    spent["cost"] = spent.get("cost", 0.0) + side["spend"]["cost"]
        loads = workers.setdefault(outcome.worker, {})
        for name, count in outcome.loads.items():
            loads[name] = max(loads.get(name, 0), count)
        notes.extend(note for note in outcome.notes if note not in notes)
    return models, workers, notes


def _junit_properties(config: pytest.Config, decision: Any, exit_code: int, *, complete: bool) -> None:
    """With --junitxml: the verdict as test-suite properties. pytest wrote the file before this (trylast) hook,
    so it is written again, by pytest's own writer, with the properties in."""
    from _pytest.junitxml import xml_key

    xml = config.stash.get(xml_key, None)
    if xml is None:
        return
    xml.add_global_property("llmgate_stage", decision.stage)
    xml.add_global_property("llmgate_verdict", decision.verdict if complete else "incomplete")
    xml.add_global_property("llmgate_exit_code", exit_code)
    if decision.selected is not None:
        xml.add_global_property("llmgate_selected_stage", decision.selected)
    xml.pytest_sessionfinish()


def _add_speed(models: dict[str, dict[str, Any]], speed: Any) -> None:
    """Each probed model's speed, memory and machine (``speed.summarize``); speed references join the models."""
    for role, memory in speed.memory.items():
        if role in models:
            models[role]["memory"] = merge_memory(models[role].get("memory"), memory)
    for role, figures in speed.summary().items():
        info = models.setdefault(role, {"name": speed.roles[role].name, "evaluated": 0, "cached": 0, "stored": 0})
        info["speed"] = figures["speed"]
        info["machine"] = figures["machine"]
        if figures.get("memory"):
            info["memory"] = merge_memory(info.get("memory"), figures["memory"])


def _add_cost(info: dict[str, Any], role: str, stats: Mapping[str, Any]) -> None:
    """``cost``: what this run's evaluation of the model took (items read from the cache cost nothing), at the
    model's prices when it has them: per item evaluated, and per item per percentage point of its mean score."""
    spent = info.pop("spend", None)
    if not spent:
        return
    evaluated = info.get("evaluated", 0)
    cost: dict[str, Any] = {
        "items": evaluated,
        "seconds": round(spent["seconds"], 3),
        "prompt_tokens": round(spent["prompt_tokens"]),
        "completion_tokens": round(spent["completion_tokens"]),
        "cost": None,
        "cost_per_item": None,
        "cost_per_accuracy_point": None,
    }
    if "cost" in spent and evaluated:
        cost["cost"] = spent["cost"]
        cost["cost_per_item"] = spent["cost"] / evaluated
        scores = [st.scores[role] for st in stats.values() if role in st.scores]
        mean_score = sum(scores) / len(scores) if scores else 0.0
        if mean_score > 0:
            cost["cost_per_accuracy_point"] = cost["cost_per_item"] / (100 * mean_score)
    info["cost"] = cost


def _unchecked_rules(decision: Any) -> list[str]:
    """Speed and memory rules nobody could check (not measured, and not skipped on purpose)."""
    return [
        f"{rule.rule} (stage '{verdict.stage}') {rule.detail}"
        for verdict in decision.stages
        for rule in verdict.rules
        if rule.skipped and rule.detail.startswith("not checked:") and "--llmgate-no-speed" not in rule.detail
    ]


def _add_sizes(models: dict[str, dict[str, Any]], state: RunState) -> None:
    """Each evaluated model's size as deployed (``models.size``), and its compression ratio against the baseline.

    Read from the model files; a size that cannot be read is reported as unknown with the reason, never fatal.
    """
    from .models import file_sha256
    from .models.size import model_size, with_ratios

    cache = state.engine.cache if state.engine is not None else None
    digest = cache.file_digest if cache is not None else file_sha256
    sizes = {}
    roles = state.engine.roles if state.engine is not None else state.roles
    for role, info in models.items():
        spec = roles.get(role)
        if spec is None:
            continue
        info["backend"] = spec.backend
        try:
            fingerprint = info.get("fingerprint") or (state.engine.fingerprint(role) if state.engine else "")
            sizes[role] = model_size(spec, state.work_dir, fingerprint, digest)
        except Exception as error:
            sizes[role] = {"size_bytes": None, "size_of": f"could not be read: {type(error).__name__}: {error}"}
    for role, figures in with_ratios(sizes, BASELINE_STAGE).items():
        models[role].update(figures)

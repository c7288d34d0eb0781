"""Experiment trackers: a run's figures logged to Weights & Biases and MLflow, from the report dict.

Switched on by ``[tool.llmgate.wandb]`` / ``[tool.llmgate.mlflow]`` (or ``--llmgate-wandb`` / ``--llmgate-mlflow``);
the packages are imported only then (``pip install 'pytest-llmgate[wandb]'`` / ``'pytest-llmgate[mlflow]'``).
Each tracker gets one run per pytest run, on the controller, with:

- metrics under the compression spec's key layout (``tracker_metrics``): ``{stage}/{task}`` (the stage's score),
  ``{stage}/retention/{task}``, ``{stage}/model_size_mb``, ``{stage}/compression_ratio``,
  ``{stage}/overall_passed`` (1 or 0), and beside them every other figure of the CSV's row
  (``{stage}/retention_ci_low/{task}``, ``{stage}/wins/{task}``, ``{stage}/latency_p95_ms``, ...); ``baseline/{task}``
  and ``baseline/model_size_mb`` for the reference;
- the run's identity as W&B config / MLflow params (stage, verdict, exit code, selected stage, git commit and
  branch, config hash);
- the comparison table (task x baseline x each stage x final retention) and the quality-vs-compression chart.

A tracker that fails (no login, a store that cannot be written) is named in the summary; the verdict and the
exit code stand.
"""

from __future__ import annotations

import importlib.util
import math
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..config import ConfigError, GateConfig, MlflowSettings, WandbSettings
from . import dig
from .csv_report import csv_rows
from .markdown import final_stage

EXTRAS = {"wandb": "wandb", "mlflow": "mlflow"}  # tracker -> the module it imports
TABLE_KEY = "llmgate/comparison"
CHART_KEY = "llmgate/quality_vs_compression"
MB = 1e6  # as the terminal's size line: decimal megabytes

# Per task x stage figures of the CSV logged as {stage}/{name}/{task} (score and retention have the spec's names).
TASK_FIGURES = (
    "retention_ci_low", "retention_ci_high", "threshold", "passed", "wins", "losses", "ties", "mcnemar_p",
    "noninferiority_p",
)  # fmt: skip
# Per stage figures of the CSV logged as {stage}/{name}.
STAGE_FIGURES = (
    "compression_ratio", "bits_per_weight", "latency_p95_ms", "latency_ratio", "decode_tokens_per_s", "peak_memory_mb",
)  # fmt: skip
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. /]")  # MLflow's metric-name alphabet (W&B takes it too)


def check_installed(gate: GateConfig) -> None:
    """A tracker switched on without its package is a usage error before anything is evaluated."""
    for name in gate.trackers():
        if importlib.util.find_spec(EXTRAS[name]) is None:
            raise ConfigError(
                f"llmgate: [tool.llmgate.{name}] is on but the {EXTRAS[name]} package is not installed; "
                f"pip install 'pytest-llmgate[{name}]', or set enabled = false in that table"
            )


def _key(*parts: str) -> str:
    return "/".join(_UNSAFE.sub("_", part) for part in parts)


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def _megabytes(info: Mapping[str, Any]) -> float | None:
    size = _number(info.get("size_bytes"))
    return None if size is None else size / MB


def tracker_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """Every figure of the run, flat, under the spec's keys; absent and non-finite figures are left out."""
    metrics: dict[str, Any] = {}
    models: Mapping[str, Any] = report.get("models") or {}
    for task, figures in (report.get("tasks") or {}).items():
        metrics[_key("baseline", task)] = dig(figures, "baseline", "score")
    metrics[_key("baseline", "model_size_mb")] = _megabytes(models.get("baseline") or {})
    first_row: dict[str, Mapping[str, Any]] = {}
    for row in csv_rows(report):
        stage, task = row["stage"], row["task"]
        first_row.setdefault(stage, row)
        metrics[_key(stage, task)] = row["stage_score"]
        metrics[_key(stage, "retention", task)] = row["retention"]
        for name in TASK_FIGURES:
            metrics[_key(stage, name, task)] = row[name]
    for stage, verdict in (report.get("stages") or {}).items():
        info = models.get(stage) or {}
        metrics[_key(stage, "model_size_mb")] = _megabytes(info)
        metrics[_key(stage, "overall_passed")] = verdict.get("verdict") == "pass"
        metrics[_key(stage, "mean_retention")] = verdict.get("mean_retention")
        for name in STAGE_FIGURES:  # the CSV's row carries them; a stage without tasks has only the model's own
            metrics[_key(stage, name)] = first_row[stage][name] if stage in first_row else info.get(name)
    return {key: number for key, value in metrics.items() if (number := _number(value)) is not None}


def comparison_table(report: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """The Markdown summary's comparison as data: task, metric, n, baseline, each stage's score, the final stage's
    retention and its interval (None where absent)."""
    stages: Mapping[str, Any] = report.get("stages") or {}
    final = final_stage(report)
    columns = ["task", "metric", "n", "baseline", *stages]
    if final is not None:
        columns += [f"retention ({final})", "retention_ci_low", "retention_ci_high", "passed"]
    rows = []
    for task, figures in (report.get("tasks") or {}).items():
        row = [task, figures.get("metric"), figures.get("n"), _number(dig(figures, "baseline", "score"))]
        row += [_number(dig(stages[s], "tasks", task, "candidate", "score")) for s in stages]
        if final is not None:
            entry = dig(stages[final], "tasks", task) or {}
            ci = entry.get("retention_ci") or [None, None]
            row += [_number(entry.get("retention")), _number(ci[0]), _number(ci[1]), entry.get("passed")]
        rows.append(row)
    return columns, rows


def run_identity(
    report: Mapping[str, Any], *, commit: str | None, branch: str | None, config_hash: str
) -> dict[str, str]:
    """What the tracker shows as the run's config / params (all strings)."""
    values = {
        "stage": report.get("stage"),
        "verdict": report.get("verdict"),
        "exit_code": report.get("exit_code"),
        "selected_stage": report.get("selected_stage"),
        "policy": report.get("policy"),
        "complete": report.get("complete"),
        "git_commit": commit,
        "git_branch": branch,
        "config_hash": config_hash,
        "schema": report.get("schema"),
    }
    for role, info in (report.get("models") or {}).items():
        values[f"model/{role}"] = info.get("name")
    return {_key(k): str(v) for k, v in values.items() if v is not None}


def default_run_name(report: Mapping[str, Any]) -> str:
    return f"llmgate-{report.get('stage')}-{time.strftime('%Y%m%d-%H%M%S')}"


def log_wandb(report: Mapping[str, Any], settings: WandbSettings, identity: Mapping[str, str]) -> str:
    """One W&B run with the metrics, the comparison table and the chart; returns where it went."""
    import wandb

    from .html import quality_vs_compression_chart

    run = wandb.init(
        project=settings.project,
        entity=settings.entity,
        mode=settings.mode,
        dir=str(settings.dir) if settings.dir else None,
        name=settings.name or default_run_name(report),
        group=settings.group,
        tags=list(settings.tags) or None,
        job_type="llmgate",
        config=dict(identity),
        reinit="create_new",
        settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
    )
    try:
        logged: dict[str, Any] = dict(tracker_metrics(report))
        columns, rows = comparison_table(report)
        if rows:
            logged[TABLE_KEY] = wandb.Table(columns=list[Any](columns), data=rows)
        image, _ = quality_vs_compression_chart(report, wandb.Image)
        if image:
            logged[CHART_KEY] = image
        run.log(logged)
        where = run.url or f"offline run in {Path(run.dir).parent} (wandb sync uploads it)"
    finally:
        run.finish()
    return str(where)


def log_mlflow(report: Mapping[str, Any], settings: MlflowSettings, identity: Mapping[str, str]) -> str:
    """One MLflow run (through ``MlflowClient``: the process's active run is left alone); returns its id and store."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    from .html import quality_vs_compression_chart
    from .markdown import render_markdown

    client = MlflowClient(tracking_uri=settings.tracking_uri)
    experiment = client.get_experiment_by_name(settings.experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(settings.experiment)
    run = client.create_run(experiment_id, run_name=settings.run_name or default_run_name(report),
                            tags={"llmgate.verdict": str(report.get("verdict")), **settings.tags})  # fmt: skip
    run_id = run.info.run_id
    status = "FAILED"
    try:
        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, 0) for key, value in tracker_metrics(report).items()]
        params = [Param(key, value[:6000]) for key, value in identity.items()]
        for start in range(0, max(len(metrics), 1), 1000):  # MLflow takes at most 1000 metrics per batch
            client.log_batch(run_id, metrics=metrics[start : start + 1000],
                             params=params if start == 0 else [], tags=[RunTag("llmgate.schema", "1")])  # fmt: skip
        columns, rows = comparison_table(report)
        client.log_dict(run_id, {"columns": columns, "data": rows}, f"{TABLE_KEY}.json")
        client.log_text(run_id, render_markdown(report), "llmgate/summary.md")
        quality_vs_compression_chart(report, lambda fig: client.log_figure(run_id, fig, f"{CHART_KEY}.png"))
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status=status)
    return f"run {run_id} in experiment '{settings.experiment}' at {client.tracking_uri}"

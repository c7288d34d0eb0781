"""The CSV (``--llmgate-csv``): one row per task x stage with every figure of the table, from the report's dict.

Columns, in this order (``COLUMNS``; new columns are only ever appended):

task, metric, n, chance, informative, stage, stage_verdict, baseline_score, stage_score, retention,
retention_ci_low, retention_ci_high, threshold, passed, wins, losses, ties, mcnemar_p, noninferiority_p,
then the stage model's size_bytes, compression_ratio, bits_per_weight, latency_p95_ms, latency_ratio,
decode_tokens_per_s, peak_memory_mb, and the latency ratio's interval latency_ratio_low, latency_ratio_high.

Stages come in the report's order (the ladder's), tasks sorted within each stage. An absent figure is an empty
cell; booleans are ``True``/``False``; numbers are written as Python prints them, so they read back exactly.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import dig

COLUMNS = (
    "task", "metric", "n", "chance", "informative", "stage", "stage_verdict", "baseline_score", "stage_score",
    "retention", "retention_ci_low", "retention_ci_high", "threshold", "passed", "wins", "losses", "ties",
    "mcnemar_p", "noninferiority_p", "size_bytes", "compression_ratio", "bits_per_weight", "latency_p95_ms",
    "latency_ratio", "decode_tokens_per_s", "peak_memory_mb", "latency_ratio_low", "latency_ratio_high",
)  # fmt: skip


def csv_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The rows, as dicts keyed by ``COLUMNS`` (None where the report has no figure)."""
    rows = []
    models: Mapping[str, Any] = report.get("models") or {}
    for stage, verdict in (report.get("stages") or {}).items():
        info = models.get(stage) or {}
        speed = info.get("speed") or {}
        ratio = dig(speed, "vs_reference", "latency_ratio") or {}
        for task, t in sorted((verdict.get("tasks") or {}).items()):
            ci = t.get("retention_ci") or [None, None]
            rows.append(
                {
                    "task": task,
                    "metric": t.get("metric"),
                    "n": t.get("n"),
                    "chance": t.get("chance"),
                    "informative": t.get("informative"),
                    "stage": stage,
                    "stage_verdict": verdict.get("verdict"),
                    "baseline_score": dig(t, "baseline", "score"),
                    "stage_score": dig(t, "candidate", "score"),
                    "retention": t.get("retention"),
                    "retention_ci_low": ci[0],
                    "retention_ci_high": ci[1],
                    "threshold": t.get("threshold"),
                    "passed": t.get("passed"),
                    "wins": t.get("wins"),
                    "losses": t.get("losses"),
                    "ties": t.get("ties"),
                    "mcnemar_p": dig(t, "mcnemar", "p_value"),
                    "noninferiority_p": dig(t, "noninferiority", "p_value"),
                    "size_bytes": info.get("size_bytes"),
                    "compression_ratio": info.get("compression_ratio"),
                    "bits_per_weight": info.get("bits_per_weight"),
                    "latency_p95_ms": dig(speed, "latency_ms", "p95"),
                    "latency_ratio": ratio.get("point"),
                    "decode_tokens_per_s": speed.get("decode_tokens_per_s"),
                    "peak_memory_mb": info.get("peak_memory_mb"),
                    "latency_ratio_low": ratio.get("lo"),
                    "latency_ratio_high": ratio.get("hi"),
                }
            )
    return rows


def write_csv(report: Mapping[str, Any], path: str | Path) -> None:
    """Write ``csv_rows(report)`` with a header row; None becomes an empty cell."""
    with Path(path).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for row in csv_rows(report):
            writer.writerow({k: "" if v is None else v for k, v in row.items()})

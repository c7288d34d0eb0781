"""The CSV (``--llmgate-csv``): one row per task x stage with every figure of the table, from the report's dict.

Columns, in this order: task, metric, n, chance, informative, stage, stage_verdict, baseline_score, stage_score,
retention, retention_ci_low, retention_ci_high, threshold, passed, wins, losses, ties, mcnemar_p,
noninferiority_p, and the stage model's size_bytes, compression_ratio, bits_per_weight, latency_p95_ms,
latency_ratio, decode_tokens_per_s, peak_memory_mb. An absent figure is an empty cell.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path
from typing import Any

COLUMNS = (
    "task", "metric", "n", "chance", "informative", "stage", "stage_verdict", "baseline_score", "stage_score",
    "retention", "retention_ci_low", "retention_ci_high", "threshold", "passed", "wins", "losses", "ties",
    "mcnemar_p", "noninferiority_p", "size_bytes", "compression_ratio", "bits_per_weight", "latency_p95_ms",
    "latency_ratio", "decode_tokens_per_s", "peak_memory_mb",
)  # fmt: skip


def csv_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The rows, as dicts keyed by ``COLUMNS``."""
    rows = []
    models: Mapping[str, Any] = report.get("models") or {}
    for stage, verdict in (report.get("stages") or {}).items():
        info = models.get(stage) or {}
        speed = info.get("speed") or {}
        ratio = (speed.get("vs_reference") or {}).get("latency_ratio") or {}
        for task, t in (verdict.get("tasks") or {}).items():
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
                    "baseline_score": (t.get("baseline") or {}).get("score"),
                    "stage_score": (t.get("candidate") or {}).get("score"),
                    "retention": t.get("retention"),
                    "retention_ci_low": ci[0],
                    "retention_ci_high": ci[1],
                    "threshold": t.get("threshold"),
                    "passed": t.get("passed"),
                    "wins": t.get("wins"),
                    "losses": t.get("losses"),
                    "ties": t.get("ties"),
                    "mcnemar_p": (t.get("mcnemar") or {}).get("p_value"),
                    "noninferiority_p": (t.get("noninferiority") or {}).get("p_value"),
                    "size_bytes": info.get("size_bytes"),
                    "compression_ratio": info.get("compression_ratio"),
                    "bits_per_weight": info.get("bits_per_weight"),
                    "latency_p95_ms": (speed.get("latency_ms") or {}).get("p95"),
                    "latency_ratio": ratio.get("point"),
                    "decode_tokens_per_s": speed.get("decode_tokens_per_s"),
                    "peak_memory_mb": info.get("peak_memory_mb"),
                }
            )
    return rows


def write_csv(report: Mapping[str, Any], path: Path) -> None:
    """Write ``csv_rows(report)`` with a header row."""
    with Path(path).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for row in csv_rows(report):
            writer.writerow({k: "" if v is None else v for k, v in row.items()})

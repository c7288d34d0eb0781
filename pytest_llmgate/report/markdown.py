"""The Markdown summary (``--llmgate-md``, ``$GITHUB_STEP_SUMMARY``), rendered from the JSON report's dict.

Short enough for a pull-request comment: the verdict, the comparison table (task x baseline x each stage x the
final stage's retention), the failed rules, the recommendations, size and speed when measured, and the most
telling regressed items folded away.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

DASH = "\u2013"  # an en dash: a figure that was not measured
REGRESSED_SHOWN = 10


def _num(value: Any, spec: str = ".3f", suffix: str = "") -> str:
    return DASH if value is None else f"{value:{spec}}{suffix}"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [_row(header), _row(["---"] * len(header)), *(_row(r) for r in rows)]


def final_stage(report: Mapping[str, Any]) -> str | None:
    """The stage whose retention the table ends with: the selected one, else the gated one, else the first."""
    stages = list(report.get("stages") or {})
    if report.get("selected_stage"):
        return str(report["selected_stage"])
    if report.get("stage") in stages:
        return str(report["stage"])
    return stages[0] if stages else None


def _headline(report: Mapping[str, Any]) -> str:
    verdict = str(report.get("verdict", "")).upper()
    stage = report.get("stage")
    exit_code = report.get("exit_code")
    if report.get("verdict") == "incomplete":
        first = (report.get("problems") or ["see the run's output"])[0]
        return f"## llmgate: INCOMPLETE (exit {exit_code}): {first}"
    if stage == "all":
        selected = report.get("selected_stage")
        what = f"the ladder selects **{selected}**" if selected else "no stage of the ladder passes"
        return f"## llmgate: {what} (exit {exit_code})"
    return f"## llmgate: stage `{stage}` **{verdict}** (exit {exit_code})"


def render_markdown(report: Mapping[str, Any]) -> str:
    """The summary as GitHub-flavoured Markdown."""
    lines = [_headline(report), ""]
    stages: Mapping[str, Any] = report.get("stages") or {}
    final = final_stage(report)
    if stages:
        names = list(stages)
        header = ["task", "metric", "n", "baseline", *names]
        if final is not None:
            header.append(f"retention ({final})")
        rows = []
        for task, figures in (report.get("tasks") or {}).items():
            scores = [_num(((stages[s].get("tasks") or {}).get(task) or {}).get("candidate", {}).get("score"))
                      for s in names]  # fmt: skip
            row = [task, figures.get("metric", ""), str(figures.get("n", "")),
                   _num((figures.get("baseline") or {}).get("score")), *scores]  # fmt: skip
            if final is not None:
                row.append(_retention_cell(((stages[final].get("tasks") or {}).get(task)) or {}))
            rows.append(row)
        lines += _table(header, rows)
        verdicts = ", ".join(f"{name} **{stage.get('verdict')}**" for name, stage in stages.items())
        lines += ["", f"Stages: {verdicts}."]
    lines += _failed_rules(stages)
    advice = [a for stage in stages.values() for a in stage.get("recommendations", ())]
    if advice:
        lines += ["", "**Recommendations**", *(f"- {a}" for a in dict.fromkeys(advice))]
    lines += _efficiency(report, list(stages))
    lines += _regressed(report, list(stages))
    return "\n".join(lines).rstrip() + "\n"


def _retention_cell(task: Mapping[str, Any]) -> str:
    if not task:
        return DASH
    value = _num(task.get("retention"))
    ci = task.get("retention_ci")
    if ci and ci[0] is not None:
        value += f" [{_num(ci[0])}, {_num(ci[1]) if ci[1] is not None else 'inf'}]"
    if not task.get("informative", True):
        return value + " (at chance)"
    return value + (" ✅" if task.get("passed") else " ❌")


def _failed_rules(stages: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
    for name, stage in stages.items():
        failed = [r for r in stage.get("rules", ()) if not r.get("passed")]
        if failed:
            lines += ["", f"**Failed at `{name}`**"]
            lines += [f"- {_critical(r)}{r['rule']}: {r.get('detail', '')}" for r in failed]
    return lines


def _efficiency(report: Mapping[str, Any], stages: Sequence[str]) -> list[str]:
    models: Mapping[str, Any] = report.get("models") or {}
    figures = [models.get(s) or {} for s in stages]
    if not any(f.get("size_bytes") or f.get("speed") or f.get("peak_memory_mb") for f in figures):
        return []
    rows = []
    for name, info in zip(stages, figures, strict=True):
        speed = info.get("speed") or {}
        vs = speed.get("vs_reference") or {}
        ratio = vs.get("latency_ratio")
        latency = DASH if not ratio else f"{ratio['point']:.2f}x [{ratio['lo']:.2f}, {ratio['hi']:.2f}]"
        if ratio and not vs.get("same_runtime"):
            latency += " (another runtime)"
        rows.append(
            [
                name,
                _num(info["size_bytes"] / 1e6 if info.get("size_bytes") else None, ".1f"),
                _num(info.get("compression_ratio"), ".2f", "x"),
                _num(info.get("bits_per_weight"), ".2f"),
                _num((speed.get("latency_ms") or {}).get("p95"), ".0f"),
                latency,
                _num(speed.get("decode_tokens_per_s"), ".0f"),
                _num(info.get("peak_memory_mb"), ".0f"),
            ]
        )
    header = ["stage", "size MB", "smaller", "bits/w", "p95 ms", "p95 vs reference", "decode tok/s", "peak MB"]
    return ["", "**Size, speed and memory**", "", *_table(header, rows)]


def _regressed(report: Mapping[str, Any], stages: Sequence[str]) -> list[str]:
    """The first regressed items: the gold answer, and the baseline's and each stage's answers."""
    items = [i for i in report.get("items") or () if i.get("status") == "regressed"]
    if not items or not stages:
        return []
    shown = items[:REGRESSED_SHOWN]
    rows = []
    for item in shown:
        choices = item.get("choices") or []
        gold = choices[item["gold"]][:60] if choices and 0 <= int(item.get("gold", -1)) < len(choices) else DASH
        answers = [_answer((item.get("stages") or {}).get(s) or {}, choices) for s in stages]
        rows.append([f"{item['task']} {item['id']}", gold, _answer(item.get("baseline") or {}, choices), *answers])
    more = f" (first {len(shown)} of {len(items)})" if len(items) > len(shown) else ""
    return [
        "",
        f"<details><summary>Regressed items{more}</summary>",
        "",
        *_table(["item", "gold", "baseline", *stages], rows),
        "",
        "</details>",
    ]


def _answer(side: Mapping[str, Any], choices: Sequence[str]) -> str:
    """A model's choice, or its first completion, shortened."""
    if "prediction" in side and choices and 0 <= int(side["prediction"]) < len(choices):
        return choices[int(side["prediction"])][:60]
    completions = side.get("completions")
    return str(completions[0])[:60] if completions else DASH


def _critical(rule: Mapping[str, Any]) -> str:
    """A marker for a critical rule whose label does not already say so."""
    return "CRITICAL " if rule.get("critical") and not str(rule["rule"]).lower().startswith("critical") else ""

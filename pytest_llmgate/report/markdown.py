"""The Markdown summary (``--llmgate-md``, ``$GITHUB_STEP_SUMMARY``), rendered from the JSON report's dict.

Short enough for a pull-request comment: the verdict, the comparison table (task x baseline x each stage x the
final stage's retention), the failed rules, the recommendations, size and speed when measured, and the most
telling regressed items folded away. It renders what the report says and recomputes nothing; a figure the report
does not have is an en dash, never "None".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from . import dig

DASH = "\u2013"  # an en dash: a figure that was not measured
REGRESSED_SHOWN = 10
ANSWER_CHARS = 60
PROMPT_CHARS = 70


def _num(value: Any, spec: str = ".3f", suffix: str = "") -> str:
    """``value`` formatted, or a dash when it is absent or not a finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return DASH
    return f"{value:{spec}}{suffix}"


def _text(value: Any) -> str:
    return DASH if value is None or value == "" else str(value)


def _cell(value: Any) -> str:
    """A table cell: one line, and no pipe or tag of its text can break the table or the page."""
    text = " ".join(str(value).split())
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")


def _line(text: str) -> str:
    """A list line whose text cannot open a tag (a rule's detail may say "< 0.90")."""
    return " ".join(text.split()).replace("<", "&lt;")


def _row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
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
    verdict = str(report.get("verdict") or DASH).upper()
    stage = report.get("stage")
    exit_code = _text(report.get("exit_code"))
    if report.get("verdict") == "incomplete":
        first = (report.get("problems") or ["see the run's output"])[0]
        return f"## llmgate: INCOMPLETE (exit {exit_code}): {first}"
    if stage == "all":
        selected = report.get("selected_stage")
        what = f"the ladder selects **{selected}**" if selected else "no stage of the ladder passes"
        return f"## llmgate: {what} (exit {exit_code})"
    return f"## llmgate: stage `{_text(stage)}` **{verdict}** (exit {exit_code})"


def render_markdown(report: Mapping[str, Any]) -> str:
    """The summary as GitHub-flavoured Markdown."""
    lines = [_headline(report), ""]
    stages: Mapping[str, Any] = report.get("stages") or {}
    names = list(stages)
    lines += _comparison(report, stages)
    if stages:
        verdicts = ", ".join(f"{name} **{_text(stage.get('verdict'))}**" for name, stage in stages.items())
        lines += ["", f"Stages: {verdicts}."]
    lines += _failed_rules(stages)
    advice = [a for stage in stages.values() for a in stage.get("recommendations") or ()]
    advice += list(report.get("recommendations") or ())
    if advice:
        lines += ["", "**Recommendations**", *(_line(f"- {a}") for a in dict.fromkeys(advice))]
    lines += _efficiency(report, names)
    lines += _regressed(report, names)
    return "\n".join(lines).rstrip() + "\n"


def _comparison(report: Mapping[str, Any], stages: Mapping[str, Any]) -> list[str]:
    """Task x baseline x each stage's score, then the final stage's retention with its interval and mark."""
    tasks: Mapping[str, Any] = report.get("tasks") or {}
    if not tasks:
        return []
    names = list(stages)
    final = final_stage(report)
    header = ["task", "metric", "n", "baseline", *names]
    if final is not None:
        header.append(f"retention ({final})")
    rows = []
    for task, figures in tasks.items():
        scores = [_num(dig(stages[s], "tasks", task, "candidate", "score")) for s in names]
        row = [task, _text(figures.get("metric")), _text(figures.get("n")), _num(dig(figures, "baseline", "score"))]
        row += scores
        if final is not None:
            row.append(_retention_cell(dig(stages, final, "tasks", task) or {}))
        rows.append(row)
    return _table(header, rows)


def _retention_cell(task: Mapping[str, Any]) -> str:
    if not task or task.get("retention") is None:
        return DASH
    value = _num(task.get("retention"))
    ci = task.get("retention_ci") or [None, None]
    if ci[0] is not None or ci[1] is not None:
        value += f" [{_num(ci[0])}, {_num(ci[1]) if ci[1] is not None else 'inf'}]"
    if not task.get("informative", True):
        return value + " (at chance)"
    return value + (" ✅" if task.get("passed") else " ❌")


def _failed_rules(stages: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
    for name, stage in stages.items():
        failed = [r for r in stage.get("rules") or () if not r.get("passed")]
        if failed:
            lines += ["", f"**Failed at `{name}`**"]
            lines += [_line(f"- {_critical(r)}{r.get('rule')}: {_text(r.get('detail'))}") for r in failed]
    return lines


def _latency_ratio(speed: Mapping[str, Any]) -> str:
    vs = speed.get("vs_reference") or {}
    ratio = vs.get("latency_ratio") or {}
    if ratio.get("point") is None:
        return DASH
    text = _num(ratio["point"], ".2f", "x")
    if ratio.get("lo") is not None or ratio.get("hi") is not None:
        text += f" [{_num(ratio.get('lo'), '.2f')}, {_num(ratio.get('hi'), '.2f')}]"
    if vs.get("reference_model"):
        text += f" vs {vs['reference_model']}"
    if vs.get("same_runtime") is False:
        text += " (another runtime)"
    return text


def _efficiency(report: Mapping[str, Any], stages: Sequence[str]) -> list[str]:
    """Size, speed and memory per stage (the baseline first, for scale), when any was measured."""
    models: Mapping[str, Any] = report.get("models") or {}
    measured = ("size_bytes", "speed", "peak_memory_mb")
    if not any((models.get(s) or {}).get(key) for s in stages for key in measured):
        return []
    roles = ["baseline", *stages] if any((models.get("baseline") or {}).get(k) for k in measured) else list(stages)
    rows = []
    for name in roles:
        info = models.get(name) or {}
        speed = info.get("speed") or {}
        size = info.get("size_bytes")
        rows.append(
            [
                name,
                _num(size / 1e6 if isinstance(size, (int, float)) else None, ".1f"),
                _num(info.get("compression_ratio"), ".2f", "x"),
                _num(info.get("bits_per_weight"), ".2f"),
                _num(dig(speed, "latency_ms", "p95"), ".0f"),
                _latency_ratio(speed),
                _num(speed.get("decode_tokens_per_s"), ".0f"),
                _num(info.get("peak_memory_mb"), ".0f"),
            ]
        )
    header = ["stage", "size MB", "smaller", "bits/w", "p95 ms", "p95 vs reference", "decode tok/s", "peak MB"]
    return ["", "**Size, speed and memory**", "", *_table(header, rows)]


def _regressed(report: Mapping[str, Any], stages: Sequence[str]) -> list[str]:
    """The first regressed items: the end of the prompt, the gold answer, the baseline's and each stage's answers."""
    items = [i for i in report.get("items") or () if isinstance(i, Mapping) and i.get("status") == "regressed"]
    if not items or not stages:
        return []
    shown = items[:REGRESSED_SHOWN]
    rows = []
    for item in shown:
        choices = [str(c) for c in item.get("choices") or ()]
        metric = str(item.get("metric") or "")
        sides = [item.get("baseline") or {}, *((dig(item, "stages", s) or {}) for s in stages)]
        answers = [_answer(side, choices, metric) for side in sides]
        prompt = _tail(str(item.get("prompt") or ""), PROMPT_CHARS)
        rows.append([f"{item.get('task')} {item.get('id')}", prompt or DASH, _gold(item, choices), *answers])
    more = f" (first {len(shown)} of {len(items)})" if len(items) > len(shown) else f" ({len(items)})"
    return [
        "",
        f"<details><summary>Regressed items{more}</summary>",
        "",
        *_table(["item", "prompt", "gold", "baseline", *stages], rows),
        "",
        "</details>",
    ]


def _tail(text: str, limit: int) -> str:
    """The end of a prompt (the question is last, after any few-shot examples), on one line."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    tail = text[-limit:]
    return "…" + (tail.split(" ", 1)[1] if " " in tail[:-1] else tail)  # from a word's start


def _choice(choices: Sequence[str], index: Any) -> str | None:
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(choices):
        return None
    return choices[index][:ANSWER_CHARS]


def _gold(item: Mapping[str, Any], choices: Sequence[str]) -> str:
    """The right choice, or a generation task's reference answer."""
    gold = _choice(choices, item.get("gold"))
    if gold is not None:
        return gold
    reference = dig(item, "baseline", "reference")
    return DASH if reference is None else str(reference)[:ANSWER_CHARS]


def _answer(side: Mapping[str, Any], choices: Sequence[str], metric: str) -> str:
    """A model's choice (the normalized one for acc_norm), or what it extracted from its completion, shortened."""
    if not side:
        return DASH
    key = "prediction_norm" if metric == "acc_norm" and "prediction_norm" in side else "prediction"
    chosen = _choice(choices, side.get(key))
    if chosen is not None:
        return chosen
    for extracted in ("extracted", "extracted_strict", "extracted_flexible"):
        if side.get(extracted) not in (None, ""):
            return str(side[extracted])[:ANSWER_CHARS]
    completions = side.get("completions")
    completion = side.get("completion", completions[0] if isinstance(completions, list) and completions else None)
    return DASH if completion is None else _tail(str(completion), ANSWER_CHARS)


def _critical(rule: Mapping[str, Any]) -> str:
    """A marker for a critical rule whose label does not already say so."""
    return "CRITICAL " if rule.get("critical") and not str(rule.get("rule")).lower().startswith("critical") else ""

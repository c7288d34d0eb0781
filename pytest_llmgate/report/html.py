"""The HTML report: one self-contained page (inline SVG charts, inline script, no network) from the report dict.

It renders what the JSON report (schema ``llmgate-report/1``) holds and recomputes nothing but means of item
scores for a group the report does not break down. Every string from the run (prompts, choices, completions,
model names) is escaped. The charts are drawn with matplotlib (``pip install 'pytest-llmgate[html]'``).
"""

from __future__ import annotations

import html
import io
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from . import dig

BASELINE = "baseline"
PREVIEW_CHARS = 160
PROMPT_CHARS = 4000  # the tail of a long few-shot prompt: the question is at its end
ANSWER_CHARS = 400
STATUSES = ("regressed", "improved", "same")
VERDICT_COLOURS = {"pass": "#1a7f37", "breach": "#bf8700", "critical": "#cf222e", "incomplete": "#6e7781"}
STAGE_COLOURS = ("#0969da", "#bf3989", "#1a7f37", "#bc4c00", "#8250df", "#6e7781", "#0a3069", "#953800")


class MissingDependency(RuntimeError):
    """matplotlib, which draws the charts, is not installed."""


def render_html(report: Mapping[str, Any]) -> str:
    """The report as one self-contained HTML page: verdict, charts (inline SVG) and an item browser."""
    plt = _pyplot()
    stages = _stage_names(report)
    colours = _colours(stages)
    title = f"llmgate: {report.get('verdict', '?')} (stage {report.get('stage', '?')})"
    charts = [
        ("Quality against compression", _quality_vs_compression(plt, report, stages, colours)),
        ("Retention per task, with its interval and threshold", _retention_intervals(plt, report, stages, colours)),
        ("Items won, lost and tied against the baseline", _wins_losses_ties(plt, report, stages)),
        ("Quality, size, speed and memory", _radar(plt, report, stages, colours)),
    ]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title>",
        f"<style>{CSS}</style></head><body>",
        _header(report),
        _stage_table(report, stages),
        '<section id="charts"><h2>Charts</h2>',
    ]
    for index, (heading, (svg, note)) in enumerate(charts):
        parts.append(f'<figure class="chart" id="chart-{index}"><figcaption>{_e(heading)}</figcaption>')
        parts.append(svg if svg else '<p class="note">nothing to draw</p>')
        if note:
            parts.append(f'<p class="note">{_e(note)}</p>')
        parts.append("</figure>")
    parts.append("</section>")
    parts.append(_subjects(report, stages))
    parts.append(_item_browser(report, stages))
    parts.append(f"<script>{SCRIPT}</script></body></html>")
    return "\n".join(parts) + "\n"


def quality_vs_compression_chart(report: Mapping[str, Any], render: Callable[[Any], Any]) -> tuple[Any, str]:
    """The quality-against-compression chart as ``render(figure)`` returns it (the page inlines SVG; the trackers
    log an image), and its note; ``("", "")`` when there is nothing to draw."""
    stages = _stage_names(report)
    return _quality_vs_compression(_pyplot(), report, stages, _colours(stages), render)


def _colours(stages: Sequence[str]) -> dict[str, str]:
    return {name: STAGE_COLOURS[i % len(STAGE_COLOURS)] for i, name in enumerate(stages)}


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise MissingDependency(
            "the HTML report draws its charts with matplotlib, which is not installed: "
            "pip install 'pytest-llmgate[html]'"
        ) from None
    matplotlib.use("Agg", force=False)  # no display; a backend the caller already chose stays
    import matplotlib.pyplot as plt

    return plt


# --- reading the report -------------------------------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _stage_names(report: Mapping[str, Any]) -> list[str]:
    stages = report.get("stages")
    return list(stages) if isinstance(stages, Mapping) else []


def _task_names(report: Mapping[str, Any], stages: Sequence[str]) -> list[str]:
    names: set[str] = set()
    for stage in stages:
        tasks = dig(report, "stages", stage, "tasks")
        if isinstance(tasks, Mapping):
            names.update(tasks)
    if isinstance(report.get("tasks"), Mapping):
        names.update(report["tasks"])
    return sorted(names)


def _fmt(value: Any, spec: str = ".3f", suffix: str = "") -> str:
    number = _num(value)
    return "-" if number is None else f"{number:{spec}}{suffix}"


def _compression(report: Mapping[str, Any], role: str) -> float | None:
    return _num(dig(report, "models", role, "compression_ratio"))


# --- page sections ------------------------------------------------------------------------------------------------


def _header(report: Mapping[str, Any]) -> str:
    verdict = str(report.get("verdict", "?"))
    colour = VERDICT_COLOURS.get(verdict, "#6e7781")
    selected = report.get("selected_stage")
    lines = [
        '<header id="verdict">',
        f'<h1><span class="badge" style="background:{colour}">{_e(verdict.upper())}</span> '
        f"llmgate report: stage {_e(report.get('stage'))}</h1>",
    ]
    summary = [f"exit code <b>{_e(report.get('exit_code'))}</b>"]
    if report.get("stage") == "all":
        summary.append(
            f"; the ladder selects <b>{_e(selected)}</b>" if selected else "; <b>no stage of the ladder passes</b>"
        )
    if report.get("gate_verdict") not in (None, verdict):
        summary.append(f"; the rules on the items that ran say {_e(report.get('gate_verdict'))}")
    summary.append(f"; policy {_e(report.get('policy'))}; {len(report.get('items') or [])} items")
    if report.get("harness_errors"):
        summary.append(f"; <b>{_e(report['harness_errors'])} harness errors</b>")
    lines.append("<p>" + "".join(summary) + "</p>")
    for key, label in (("problems", "Incomplete"), ("unchecked", "Not checked"), ("recommendations", "Next")):
        values = report.get(key) or []
        if values:
            lines.append(f'<div class="{_e(key)}"><b>{label}</b><ul>')
            lines.extend(f"<li>{_e(v)}</li>" for v in values)
            lines.append("</ul></div>")
    lines.append("</header>")
    return "\n".join(lines)


def _stage_table(report: Mapping[str, Any], stages: Sequence[str]) -> str:
    if not stages:
        return '<p class="note">no stage was gated</p>'
    rows = [
        '<section id="stages"><h2>Stages</h2><table class="grid"><thead><tr><th>stage</th><th>verdict</th>'
        "<th>mean retention</th><th>size (MB)</th><th>compression</th><th>p95 latency (ms)</th>"
        "<th>latency vs reference</th><th>decode tok/s</th><th>peak memory (MB)</th><th>failed rules</th>"
        "</tr></thead><tbody>"
    ]
    for role in [BASELINE, *stages]:
        stage = dig(report, "stages", role) or {}
        model = dig(report, "models", role) or {}
        size = _num(model.get("size_bytes"))
        failed = [r for r in stage.get("rules") or [] if not r.get("passed") and not r.get("skipped")]
        verdict = str(stage.get("verdict", "reference" if role == BASELINE else "-"))
        mark = " &#9733;" if role == report.get("selected_stage") else ""
        rows.append(
            "<tr>"
            f"<td>{_e(role)}{mark}</td>"
            f'<td><span class="v-{_e(verdict)}">{_e(verdict)}</span></td>'
            f"<td>{_fmt(stage.get('mean_retention'))}</td>"
            f"<td>{_fmt(None if size is None else size / 1e6, '.1f')}</td>"
            f"<td>{_fmt(model.get('compression_ratio'), '.2f', 'x')}</td>"
            f"<td>{_fmt(dig(model, 'speed', 'latency_ms', 'p95'), '.1f')}</td>"
            f"<td>{_fmt(dig(model, 'speed', 'vs_reference', 'latency_ratio', 'point'), '.2f', 'x')}</td>"
            f"<td>{_fmt(dig(model, 'speed', 'decode_tokens_per_s'), '.1f')}</td>"
            f"<td>{_fmt(model.get('peak_memory_mb'), '.0f')}</td>"
            f"<td>{'<br>'.join(_e(r.get('rule')) + ': ' + _e(r.get('detail')) for r in failed) or '-'}</td>"
            "</tr>"
        )
    rows.append("</tbody></table></section>")
    return "\n".join(rows)


# --- charts -------------------------------------------------------------------------------------------------------


@contextmanager
def _figure(plt: Any, width: float, height: float, **kwargs: Any) -> Iterator[tuple[Any, Any]]:
    import matplotlib

    # Text stays text (the browser's fonts; smaller files); a fixed salt and no date: the same report, the same page.
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "llmgate", "font.size": 9}):
        fig, axes = plt.subplots(figsize=(width, height), **kwargs)
        try:
            yield fig, axes
        finally:
            plt.close(fig)


def _svg(fig: Any) -> str:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    text = buffer.getvalue()
    text = re.sub(r"\s*<metadata>.*?</metadata>", "", text, count=1, flags=re.S)
    return text[text.index("<svg") :]  # inline: no XML declaration, doctype or RDF metadata


def _quality_vs_compression(
    plt: Any,
    report: Mapping[str, Any],
    stages: Sequence[str],
    colours: Mapping[str, str],
    render: Callable[[Any], Any] | None = None,
) -> tuple[Any, str]:
    tasks = _task_names(report, stages)
    if not stages or not tasks:
        return "", ""
    ratios = {stage: _compression(report, stage) for stage in stages}
    measured = all(r is not None for r in ratios.values())
    x_of = {s: ratios[s] if measured else float(i + 1) for i, s in enumerate(stages)}
    base_x = (_compression(report, BASELINE) or 1.0) if measured else 0.0
    columns = min(3, len(tasks))
    rows = math.ceil(len(tasks) / columns)
    notes = []
    with _figure(plt, 3.6 * columns, 2.8 * rows, nrows=rows, ncols=columns, squeeze=False) as (fig, axes):
        for index, task in enumerate(tasks):
            ax = axes[index // columns][index % columns]
            ax.scatter([base_x], [1.0], color="black", zorder=3)
            ax.annotate(BASELINE, (base_x, 1.0), fontsize=7, xytext=(3, 3), textcoords="offset points")
            thresholds = []
            for stage in stages:
                entry = dig(report, "stages", stage, "tasks", task) or {}
                retention = _num(entry.get("retention"))
                threshold = _num(entry.get("threshold"))
                if threshold is not None:
                    thresholds.append((x_of[stage], threshold))
                if retention is None:
                    notes.append(f"{task}/{stage}: no retention")
                    continue
                hollow = entry.get("informative") is False
                ax.scatter(
                    [x_of[stage]],
                    [retention],
                    color=colours[stage],
                    zorder=3,
                    facecolors="white" if hollow else colours[stage],
                    edgecolors=colours[stage],
                )
                ax.annotate(stage, (x_of[stage], retention), fontsize=7, xytext=(3, 3), textcoords="offset points")
            if thresholds:
                values = {t for _, t in thresholds}
                if len(values) == 1:
                    ax.axhline(values.pop(), color="#cf222e", linestyle="--", linewidth=1, label="threshold")
                else:  # each stage its own: a red dash at the stage
                    xs, ys = zip(*thresholds, strict=True)
                    ax.scatter(xs, ys, color="#cf222e", marker="_", s=300, linewidths=2, label="threshold")
            ax.set_title(task, fontsize=9)
            ax.set_ylabel("retention")
            if measured:
                ax.set_xlabel("compression ratio (x smaller than the baseline)")
            else:
                ax.set_xticks([0.0, *x_of.values()], [BASELINE, *stages], rotation=30, fontsize=7)
                ax.set_xlabel("stage, in ladder order (compression ratio not measured)")
            ax.grid(alpha=0.3)
        for index in range(len(tasks), rows * columns):
            axes[index // columns][index % columns].axis("off")
        fig.tight_layout()
        svg = (render or _svg)(fig)
    note = "hollow points: the baseline is too close to chance for retention to gate"
    if not measured:
        note += "; compression ratios were not measured, so stages are placed in ladder order"
    if notes:
        note += "; " + ", ".join(notes)
    return svg, note


def _retention_intervals(
    plt: Any, report: Mapping[str, Any], stages: Sequence[str], colours: Mapping[str, str]
) -> tuple[str, str]:
    tasks = _task_names(report, stages)
    if not stages or not tasks:
        return "", ""
    width = 0.8 / len(stages)
    unbounded = []
    drawn = False
    with _figure(plt, max(6.0, 1.2 * len(tasks) * max(1, len(stages)) ** 0.5 + 3), 3.4) as (fig, ax):
        for offset, stage in enumerate(stages):
            for position, task in enumerate(tasks):
                entry = dig(report, "stages", stage, "tasks", task) or {}
                x = position - 0.4 + width * (offset + 0.5)
                retention = _num(entry.get("retention"))
                threshold = _num(entry.get("threshold"))
                if threshold is not None:
                    ax.hlines(threshold, x - width / 2, x + width / 2, color="#cf222e", linestyle="--", linewidth=1.2)
                if retention is None:
                    continue
                drawn = True
                ci = entry.get("retention_ci") or [None, None]
                lo, hi = _num(ci[0]), _num(ci[1])
                if hi is None and lo is not None:
                    unbounded.append(f"{task}/{stage}")
                yerr = [[retention - lo if lo is not None else 0.0], [hi - retention if hi is not None else 0.0]]
                ax.errorbar(
                    [x],
                    [retention],
                    yerr=yerr,
                    fmt="o",
                    color=colours[stage],
                    capsize=3,
                    label=stage if position == 0 else None,
                )
        ax.axhline(1.0, color="#6e7781", linewidth=0.8)
        ax.set_xticks(range(len(tasks)), tasks, rotation=20 if len(tasks) > 4 else 0)
        ax.set_ylabel("retention (candidate / baseline)")
        ax.grid(axis="y", alpha=0.3)
        if drawn:
            ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        svg = _svg(fig)
    note = "bars: the retention interval at the report's confidence; red dashes: each stage's threshold"
    if unbounded:
        note += "; unbounded above (see retention_ci_note): " + ", ".join(unbounded)
    return svg, note


def _wins_losses_ties(plt: Any, report: Mapping[str, Any], stages: Sequence[str]) -> tuple[str, str]:
    tasks = _task_names(report, stages)
    labels, counts = [], []
    for stage in stages:
        for task in tasks:
            entry = dig(report, "stages", stage, "tasks", task)
            if isinstance(entry, Mapping):
                labels.append(f"{stage} / {task}")
                counts.append([int(_num(entry.get(k)) or 0) for k in ("wins", "losses", "ties")])
    if not labels:
        return "", ""
    with _figure(plt, 7.5, 0.8 + 0.32 * len(labels)) as (fig, ax):
        left = [0] * len(labels)
        for index, (name, colour) in enumerate((("won", "#1a7f37"), ("lost", "#cf222e"), ("tied", "#d0d7de"))):
            values = [c[index] for c in counts]
            ax.barh(labels, values, left=left, color=colour, label=name)
            left = [a + b for a, b in zip(left, values, strict=True)]
        ax.invert_yaxis()
        ax.set_xlabel("items")
        ax.legend(fontsize=7, ncols=3, loc="lower right")
        fig.tight_layout()
        svg = _svg(fig)
    return svg, "won: the candidate is right where the baseline is wrong (by the task's metric); lost: the reverse"


def _radar(plt: Any, report: Mapping[str, Any], stages: Sequence[str], colours: Mapping[str, str]) -> tuple[str, str]:
    if not stages:
        return "", ""
    baseline_memory = _num(dig(report, "models", BASELINE, "peak_memory_mb"))
    figures: dict[str, dict[str, float | None]] = {}
    for stage in stages:
        memory = _num(dig(report, "models", stage, "peak_memory_mb"))
        latency = _num(dig(report, "models", stage, "speed", "vs_reference", "latency_ratio", "point"))
        figures[stage] = {
            "quality\n(mean retention)": _num(dig(report, "stages", stage, "mean_retention")),
            "size\n(compression)": _compression(report, stage),
            "speed\n(1 / latency ratio)": 1.0 / latency if latency else None,
            "memory\n(baseline / peak)": baseline_memory / memory if memory and baseline_memory else None,
        }
    axes_names = [name for name in next(iter(figures.values())) if any(f[name] is not None for f in figures.values())]
    skipped = [name.split("\n")[0] for name in next(iter(figures.values())) if name not in axes_names]
    if not axes_names:
        return "", "no stage has quality, size, speed or memory figures"
    scale = {name: max((f[name] or 0.0) for f in figures.values()) or 1.0 for name in axes_names}
    note = "each axis is scaled to its largest value (the outer ring); the baseline is 1 on every axis"
    if skipped:
        note += "; no data, so left out: " + ", ".join(skipped)
    if len(axes_names) < 3:
        note += "; fewer than three axes, so bars instead of a radar"
        with _figure(plt, 6.0, 3.0) as (fig, ax):
            width = 0.8 / len(stages)
            for offset, stage in enumerate(stages):
                xs = [i - 0.4 + width * (offset + 0.5) for i in range(len(axes_names))]
                ys = [figures[stage][name] or 0.0 for name in axes_names]
                ax.bar(xs, ys, width=width, color=colours[stage], label=stage)
            ax.axhline(1.0, color="#6e7781", linewidth=0.8)
            ax.set_xticks(range(len(axes_names)), [n.replace("\n", " ") for n in axes_names])
            ax.legend(fontsize=7)
            fig.tight_layout()
            return _svg(fig), note
    angles = [2 * math.pi * i / len(axes_names) for i in range(len(axes_names))]
    with _figure(plt, 5.0, 4.4, subplot_kw={"projection": "polar"}) as (fig, ax):
        for stage in stages:
            values = [(figures[stage][name] or 0.0) / scale[name] for name in axes_names]
            ax.plot([*angles, angles[0]], [*values, values[0]], color=colours[stage], label=stage)
            ax.fill([*angles, angles[0]], [*values, values[0]], color=colours[stage], alpha=0.12)
        base = [1.0 / scale[name] for name in axes_names]
        ax.plot([*angles, angles[0]], [*base, base[0]], color="black", linestyle=":", label=BASELINE)
        ax.set_xticks(angles, axes_names, fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.set_yticklabels([])
        ax.legend(fontsize=7, loc="upper right", bbox_to_anchor=(1.3, 1.1))
        fig.tight_layout()
        return _svg(fig), note


# --- items --------------------------------------------------------------------------------------------------------


def _is_mmlu(task: str) -> bool:
    return task == "mmlu" or task.startswith("mmlu_")


def _subject(item: Mapping[str, Any]) -> str:
    """MMLU's subject: the item id is ``<subject>-<index>`` (tasks/mmlu.py)."""
    return str(item.get("id", "")).rsplit("-", 1)[0] if _is_mmlu(str(item.get("task", ""))) else ""


def _answer(item: Mapping[str, Any], side: Any) -> tuple[str, float | None]:
    """What a side answered (its choice, or its first completion) and its score by the item's metric."""
    if not isinstance(side, Mapping):
        return "", None
    metric = item.get("metric")
    score = _num(dig(side, "scores", metric)) if metric else None
    choices = item.get("choices") or []
    key = "prediction_norm" if metric == "acc_norm" and "prediction_norm" in side else "prediction"
    prediction = side.get(key)
    if isinstance(prediction, int) and 0 <= prediction < len(choices):
        return str(choices[prediction]), score
    if "completion" in side:
        return str(side["completion"]), score
    completions = side.get("completions")
    if isinstance(completions, list) and completions:
        extra = f" (+{len(completions) - 1} more)" if len(completions) > 1 else ""
        return str(completions[0]) + extra, score
    return ("" if prediction is None else str(prediction)), score


def _side(item: Mapping[str, Any], role: str) -> Any:
    """One model's record of the item: the baseline's, or a stage's."""
    return item.get("baseline") if role == BASELINE else dig(item, "stages", role)


def _gold(item: Mapping[str, Any]) -> str:
    choices = item.get("choices") or []
    gold = item.get("gold")
    if isinstance(gold, int) and 0 <= gold < len(choices):
        return str(choices[gold])
    reference = dig(item, "baseline", "reference")
    return str(reference) if reference is not None else ("" if gold in (None, -1) else str(gold))


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _prompt_cell(prompt: str) -> str:
    if not prompt:
        return '<td class="prompt"><span class="note">(not in the report)</span></td>'
    # The last paragraph is the question itself; the few-shot context comes before it.
    preview = _clip(prompt.rstrip().rsplit("\n\n", 1)[-1].strip(), PREVIEW_CHARS)
    full = prompt if len(prompt) <= PROMPT_CHARS else prompt[-PROMPT_CHARS:]
    omitted = len(prompt) - len(full)
    head = f'<span class="note">[{omitted} earlier characters left out]</span>\n' if omitted else ""
    return f'<td class="prompt"><details><summary>{_e(preview)}</summary><pre>{head}{_e(full)}</pre></details></td>'


def _item_browser(report: Mapping[str, Any], stages: Sequence[str]) -> str:
    items = [i for i in report.get("items") or [] if isinstance(i, Mapping)]
    tasks = sorted({str(i.get("task")) for i in items})
    subjects = sorted({s for s in (_subject(i) for i in items) if s})
    counts = {status: sum(1 for i in items if i.get("status") == status) for status in STATUSES}
    ordered = sorted(items, key=lambda i: (str(i.get("task")), _subject(i), _num(i.get("doc_id")) or 0))
    parts = [
        '<section id="items"><h2>Items</h2>',
        '<div class="filters">',
        '<label>status <select id="status-filter">',
        f'<option value="all">all ({len(items)})</option>',
        *(f'<option value="{s}">{s} ({counts[s]})</option>' for s in STATUSES),
        "</select></label>",
        '<label>task <select id="task-filter"><option value="">all tasks</option>',
        *(f'<option value="{_e(t)}">{_e(t)}</option>' for t in tasks),
        "</select></label>",
    ]
    if subjects:
        parts += [
            '<label>subject <select id="subject-filter"><option value="">all subjects</option>',
            *(f'<option value="{_e(s)}">{_e(s.replace("_", " "))}</option>' for s in subjects),
            "</select></label>",
        ]
    parts += [
        '<label>search <input id="search" type="search" placeholder="prompt, answer, id"></label>',
        '<span id="shown" class="note"></span></div>',
        '<table class="grid items"><thead><tr><th>task</th><th>id</th><th>status</th><th>prompt</th><th>gold</th>',
        f"<th>{_e(BASELINE)}</th>",
        *(f"<th>{_e(stage)}</th>" for stage in stages),
        "</tr></thead><tbody>",
    ]
    for item in ordered:
        status = str(item.get("status", ""))
        cells = []
        for side in (_side(item, role) for role in (BASELINE, *stages)):
            answer, score = _answer(item, side)
            if not answer and score is None:
                cells.append("<td></td>")
                continue
            css = "" if score is None else ' class="right"' if score >= 1 else ' class="wrong"' if score <= 0 else ""
            cells.append(
                f'<td{css}>{_e(_clip(answer, ANSWER_CHARS))} <span class="score">{_fmt(score, "g")}</span></td>'
            )
        parts.append(
            f'<tr class="item" data-status="{_e(status)}" data-task="{_e(item.get("task"))}" '
            f'data-subject="{_e(_subject(item))}">'
            f"<td>{_e(item.get('task'))}</td><td>{_e(item.get('id'))}</td>"
            f'<td><span class="s-{_e(status)}">{_e(status)}</span></td>'
            f"{_prompt_cell(str(item.get('prompt') or ''))}<td>{_e(_clip(_gold(item), ANSWER_CHARS))}</td>"
            + "".join(cells)
            + "</tr>"
        )
    parts.append("</tbody></table>")
    if not items:
        parts.append('<p class="note">the report has no items</p>')
    parts.append("</section>")
    return "\n".join(parts)


def _subjects(report: Mapping[str, Any], stages: Sequence[str]) -> str:
    """Per MMLU subject: items, each model's mean score, regressions and improvements."""
    items = [i for i in report.get("items") or [] if isinstance(i, Mapping) and _subject(i)]
    if not items:
        return ""
    by_subject: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for item in items:
        by_subject.setdefault((str(item.get("task")), _subject(item)), []).append(item)
    roles = [BASELINE, *stages]
    parts = [
        '<section id="subjects"><h2>MMLU by subject</h2><table class="grid subjects"><thead><tr>'
        "<th>task</th><th>subject</th><th>items</th>",
        *(f"<th>{_e(role)}</th>" for role in roles),
        "<th>regressed</th><th>improved</th></tr></thead><tbody>",
    ]
    for (task, subject), members in sorted(by_subject.items()):
        groups = dig(report, "tasks", task, "groups", subject, "scores")
        cells = []
        for role in roles:
            mean = _num(dig(groups, role)) if isinstance(groups, Mapping) else None
            if mean is None:  # the report breaks down only what it has; the mean of the items' scores otherwise
                values = [_num(dig(_side(i, role), "scores", str(i.get("metric")))) for i in members]
                known = [v for v in values if v is not None]
                mean = sum(known) / len(known) if known else None
            cells.append(f"<td>{_fmt(mean)}</td>")
        regressed = sum(1 for i in members if i.get("status") == "regressed")
        improved = sum(1 for i in members if i.get("status") == "improved")
        parts.append(
            f'<tr><td>{_e(task)}</td><td><a href="#items" class="subject-link" data-subject="{_e(subject)}">'
            f"{_e(subject.replace('_', ' '))}</a></td><td>{len(members)}</td>{''.join(cells)}"
            f"<td>{regressed}</td><td>{improved}</td></tr>"
        )
    parts.append("</tbody></table></section>")
    return "\n".join(parts)


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px auto;max-width:1400px;padding:0 16px;
color:#1f2328}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #d0d7de;padding-bottom:4px;margin-top:28px}
.badge{color:#fff;border-radius:6px;padding:2px 10px;font-size:16px}
.note{color:#57606a;font-size:12px}
table.grid{border-collapse:collapse;width:100%;font-size:13px}
.grid th,.grid td{border:1px solid #d0d7de;padding:4px 6px;vertical-align:top;text-align:left}
.grid th{background:#f6f8fa}
.v-pass{color:#1a7f37;font-weight:600}.v-breach{color:#bf8700;font-weight:600}
.v-critical{color:#cf222e;font-weight:600}
.s-regressed{color:#cf222e;font-weight:600}.s-improved{color:#1a7f37;font-weight:600}.s-same{color:#57606a}
td.right{background:#dafbe1}td.wrong{background:#ffebe9}.score{color:#57606a;font-size:11px}
figure.chart{margin:16px 0;overflow-x:auto}figure.chart svg{max-width:100%;height:auto}
figcaption{font-weight:600;margin-bottom:4px}
.filters{display:flex;gap:16px;flex-wrap:wrap;align-items:center;margin:8px 0;position:sticky;top:0;
background:#fff;padding:6px 0;z-index:1}
td.prompt{min-width:360px;max-width:560px}
td.prompt pre{white-space:pre-wrap;word-break:break-word;max-height:320px;overflow:auto;
background:#f6f8fa;padding:6px}
summary{cursor:pointer}
.problems{color:#cf222e}
"""

SCRIPT = """
(function () {
  var status = document.getElementById('status-filter');
  var task = document.getElementById('task-filter');
  var subject = document.getElementById('subject-filter');
  var search = document.getElementById('search');
  var shown = document.getElementById('shown');
  var rows = Array.prototype.slice.call(document.querySelectorAll('tr.item'));
  var text = rows.map(function (row) { return row.textContent.toLowerCase(); });
  function apply() {
    var s = status ? status.value : 'all';
    var t = task ? task.value : '';
    var j = subject ? subject.value : '';
    var q = search ? search.value.trim().toLowerCase() : '';
    var count = 0;
    rows.forEach(function (row, i) {
      var visible = (s === 'all' || row.dataset.status === s) && (!t || row.dataset.task === t) &&
        (!j || row.dataset.subject === j) && (!q || text[i].indexOf(q) !== -1);
      row.hidden = !visible;
      if (visible) { count += 1; }
    });
    if (shown) { shown.textContent = count + ' of ' + rows.length + ' items shown'; }
  }
  [status, task, subject].forEach(function (el) { if (el) { el.addEventListener('change', apply); } });
  if (search) { search.addEventListener('input', apply); }
  Array.prototype.forEach.call(document.querySelectorAll('a.subject-link'), function (link) {
    link.addEventListener('click', function () {
      if (subject) { subject.value = link.dataset.subject; apply(); }
    });
  });
  apply();
})();
"""

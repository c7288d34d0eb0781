"""The terminal summary: a table per evaluated stage and the verdict, in green or red."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..config import ALL_STAGES, BASELINE_STAGE, PASS
from ..gate import RunDecision, StageVerdict, interval_text
from ..stats import TaskStats

HEADER = (
    "task",
    "metric",
    "n",
    "baseline",
    "candidate",
    "retention",
    "CI",
    "threshold",
    "W/L/T",
    "p(McNemar)",
    "status",
)


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def stage_table(stats: Mapping[str, TaskStats], verdict: StageVerdict | None) -> list[str]:
    """Rows of the summary table for one stage (or baseline scores alone)."""
    rows: list[tuple[str, ...]] = [HEADER]
    for name, st in sorted(stats.items()):
        base = st.scores.get(BASELINE_STAGE)
        if verdict is None or name not in verdict.tasks:
            interval = st.intervals.get(BASELINE_STAGE)
            shown = f"{_num(base)} [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else _num(base)
            rows.append((name, st.metric, str(st.n), shown, "-", "-", "-", "-", "-", "-", "recorded"))
            continue
        tv = verdict.tasks[name]
        status = "PASS" if tv.passed else "FAIL"
        evidence = tv.evidence
        if not tv.informative:
            status += " (at chance)"
        elif evidence is not None and evidence.resolved is False:
            status += " (unresolved)"
        ci = (
            "-"
            if evidence is None or (evidence.lo is None and evidence.hi is None)
            else interval_text(evidence.lo, evidence.hi)
        )
        p_value = "-" if evidence is None else f"{evidence.mcnemar_p:.3g}"
        rows.append(
            (
                name,
                st.metric,
                str(st.n),
                _num(base),
                _num(tv.score),
                _num(tv.retention),
                ci,
                _num(tv.threshold, 2),
                "/".join(map(str, tv.wlt)),
                p_value,
                status,
            )
        )
    return _table(rows)


def render(
    decision: RunDecision,
    stats: Mapping[str, TaskStats],
    *,
    exit_code: int,
    problems: Sequence[str] = (),
    notes: Sequence[str] = (),
    models: Mapping[str, Any],
    cache: bool = True,
    repeats: Mapping[str, Any] | None = None,
    judged: Mapping[str, Any] | None = None,
) -> list[tuple[str, dict[str, bool]]]:
    """(line, markup) pairs for the terminal reporter.

    ``problems``: why the run is incomplete (nothing or not everything checked, harness errors, crashes,
    interruptions); any problem replaces the verdict's headline. ``notes``: what went wrong with the cache.
    """
    out: list[tuple[str, dict[str, bool]]] = []
    for role, info in models.items():
        if "fingerprint" in info:
            head = (
                f"{role}: {info['name']} ({info['fingerprint'][:12]}) - evaluated {info['evaluated']}, "
                f"from cache {info['cached']}"
            )
        else:
            head = f"{role}: {info['name']} - speed reference only (no benchmark item is evaluated on it)"
        out.append((head, {}))
        out += [(f"  {line}", {}) for line in size_lines(info)]
        out += [(f"  {line}", {}) for line in efficiency_lines(info)]
        out += [(f"  {note}", {"yellow": True}) for note in info.get("notes", ())]
    for note in notes:
        out.append((note, {"yellow": True}))
    if decision.stage == BASELINE_STAGE and stats:
        out += [(line, {}) for line in stage_table(stats, None)]
        n = sum(s.n for s in stats.values())
        stored = models.get(BASELINE_STAGE, {}).get("stored", 0)
        stored_all = cache and stored == n and not notes
        if not cache:
            line = f"baseline evaluated: {n} items; the cache is off, so nothing was stored for a later --stage run"
        elif not stored_all:
            line = (
                f"baseline evaluated: {n} items, but the cache had trouble (see above): {stored} were written "
                "to it and a later --stage run evaluates what is not there again"
            )
        else:
            line = f"baseline recorded: {n} items in the cache; run --stage=<stage> to gate a compressed model"
        out.append((line, {"green": stored_all, "yellow": not stored_all, "bold": True}))
    for verdict in decision.stages if stats else ():
        out.append(("", {}))
        out.append((f"stage {verdict.stage}: {verdict.verdict.upper()}", {"bold": True}))
        out += [(line, {}) for line in stage_table(stats, verdict)]
        for rule in verdict.rules:
            if not rule.passed:
                out.append((f"  FAILED {rule.rule}: {rule.detail}", {"red": True}))
            elif rule.skipped:
                out.append((f"  skipped {rule.rule}: {rule.detail}", {"yellow": True}))
        for advice in verdict.recommendations:
            out.append((f"  recommendation: {advice}", {"yellow": True}))
    if repeats:
        out.append(("", {}))
        out += [(line, {}) for line in repeat_lines(repeats)]
    if judged:
        out.append(("", {}))
        out += [(line, {}) for line in judge_lines(judged)]
    if decision.stages and stats:
        out.append(("", {}))
        out += [(line, {}) for line in tradeoff_table(decision, models)]
    if problems:
        out.append(("", {}))
        out += [(f"  - {problem}", {"red": True}) for problem in problems]
        what = "nothing was checked" if not stats else "the figures above cover only the items that ran"
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        out.append(
            (
                f"llmgate: INCOMPLETE - {problems[0].split(': ')[0]}{more}; {what} and the gate is not "
                f"applied (exit {exit_code})",
                {"red": True, "bold": True},
            )
        )
        return out
    if decision.stage != BASELINE_STAGE:
        out.append(("", {}))
        if decision.stage == ALL_STAGES:
            headline = (
                f"llmgate: ladder selects stage '{decision.selected}' (the most compressed that passes)"
                if decision.selected
                else "llmgate: no stage of the ladder passes; ship none of them"
            )
        else:
            headline = f"llmgate: stage '{decision.stage}' {decision.verdict.upper()}"
        good = decision.verdict == PASS
        out.append((f"{headline} (exit {exit_code})", {"green": good, "red": not good, "bold": True}))
    return out


def plan_lines(rows: list[dict[str, Any]]) -> list[tuple[str, dict[str, bool]]]:
    """The --llmgate-plan table: what the configured items can detect, and what a target drop needs."""
    table: list[tuple[str, ...]] = [
        ("task", "n", "baseline (cached)", "discordance", "detectable drop", "items for drop", "note")
    ]
    for row in rows:
        if "baseline_accuracy" not in row:
            table.append((row["task"], str(row["n"]), "not cached", "-", "-", "-", "run --stage=baseline first"))
            continue
        discordance = f"{row['discordance']:.3f}" + ("" if row["discordance_measured"] else " (assumed)")
        detectable = row.get("detectable_drop")
        table.append(
            (
                row["task"],
                str(row["n"]),
                f"{row['baseline_accuracy']:.3f} ({row['baseline_cached']})",
                discordance,
                "none at this n" if detectable is None else f"{detectable:.1%}",
                str(row.get("items_needed", "-")),
                row.get("note", ""),
            )
        )
    first = rows[0] if rows else {"drop": 0.05, "power": 0.8}
    out = [
        (
            f"llmgate plan: paired McNemar test, two-sided alpha 0.05, power {first['power']:.0%}, "
            f"target drop {first['drop']:.0%} of the baseline score",
            {"bold": True},
        )
    ]
    out += [(line, {}) for line in _table(table)]
    out.append(
        (
            "discordance = share of items on which baseline and candidate disagree (measured from a cached "
            "candidate run, else assumed 0.10)",
            {},
        )
    )
    return out


def size_lines(info: Mapping[str, Any]) -> list[str]:
    """The model's size as deployed, when known: bytes, what was measured, bits per weight, compression ratio."""
    size = info.get("size_bytes")
    if not size:
        return []
    parts = [f"size {size / 1e6:.1f} MB ({info.get('size_kind')}: {info.get('size_of')})"]
    if info.get("bits_per_weight"):
        parts.append(f"{info['bits_per_weight']:.2f} bits/weight")
    ratio = info.get("compression_ratio")
    if ratio and ratio != 1.0:
        parts.append(
            f"{ratio:.2f}x smaller than the baseline" if ratio > 1 else f"{1 / ratio:.2f}x larger than the baseline"
        )
    return [", ".join(parts)]


def efficiency_lines(info: Mapping[str, Any]) -> list[str]:
    """The model's measured speed and memory, and its ratios against its speed reference."""
    lines = []
    speed = info.get("speed") or {}
    latency = speed.get("latency_ms")
    if latency:
        parts = [f"speed ({speed.get('runtime')}): p50 {latency['p50']:.0f} ms, p95 {latency['p95']:.0f} ms"]
        parts[0] += f" for {speed.get('max_tokens')} tokens at batch 1"
        if speed.get("ttft_ms") is not None:
            parts.append(f"first token {speed['ttft_ms']:.0f} ms")
        if speed.get("decode_tokens_per_s") is not None:
            parts.append(f"decode {speed['decode_tokens_per_s']:.0f} tok/s")
        throughput = speed.get("throughput") or {}
        if throughput.get("tokens_per_s"):
            parts.append(f"{throughput['tokens_per_s']:.0f} tok/s with {throughput['concurrency']} concurrent")
        lines.append(", ".join(parts))
    vs = speed.get("vs_reference") or {}
    ratios = []
    for key, what in (("latency_ratio", "p95 latency"), ("throughput_ratio", "throughput")):
        if key in vs:
            r = vs[key]
            ratios.append(f"{what} {r['point']:.2f}x [{r['lo']:.2f}, {r['hi']:.2f}]")
    if ratios:
        same = "" if vs.get("same_runtime") else " (ANOTHER RUNTIME: not a compression speed-up)"
        lines.append(f"vs {vs['reference_model']}{same}: " + ", ".join(ratios))
    memory = info.get("memory") or {}
    if memory.get("peak_memory_mb") is not None:
        lines.append(f"memory: peak {memory['peak_memory_mb']:.0f} MB ({memory.get('memory_kind')})")
    cost = info.get("cost") or {}
    if cost:
        text = f"evaluation: {cost['seconds']:.1f} s for {cost['items']} item(s)"
        if cost["prompt_tokens"] or cost["completion_tokens"]:
            text += f", {cost['prompt_tokens']} prompt + {cost['completion_tokens']} completion tokens"
        if cost.get("cost") is not None:
            text += f"; cost {cost['cost']:.4g} ({cost['cost_per_item']:.3g} per item"
            if cost.get("cost_per_accuracy_point") is not None:
                text += f", {cost['cost_per_accuracy_point']:.3g} per item per accuracy point"
            text += ")"
        lines.append(text)
    return lines


def tradeoff_table(decision: RunDecision, models: Mapping[str, Any]) -> list[str]:
    """One row per stage: what compression cost (retention) next to what it bought (size, speed, memory)."""

    def fmt(value: Any, spec: str, suffix: str = "") -> str:
        return "-" if value is None else f"{value:{spec}}{suffix}"

    rows: list[tuple[str, ...]] = [
        ("stage", "verdict", "retention", "size MB", "smaller", "bits/w", "p95 ms", "latency", "tok/s", "peak MB")
    ]
    for verdict in decision.stages:
        info = models.get(verdict.stage, {})
        speed = info.get("speed") or {}
        vs = speed.get("vs_reference") or {}
        latency_ratio = (vs.get("latency_ratio") or {}).get("point")
        rows.append(
            (
                verdict.stage,
                verdict.verdict,
                fmt(verdict.mean_retention, ".3f"),
                fmt(info["size_bytes"] / 1e6 if info.get("size_bytes") else None, ".1f"),
                fmt(info.get("compression_ratio"), ".2f", "x"),
                fmt(info.get("bits_per_weight"), ".2f"),
                fmt((speed.get("latency_ms") or {}).get("p95"), ".0f"),
                fmt(latency_ratio, ".2f", "x" if vs.get("same_runtime") else "x*"),
                fmt(speed.get("decode_tokens_per_s"), ".0f"),
                fmt((info.get("memory") or {}).get("peak_memory_mb"), ".0f"),
            )
        )
    lines = ["trade-off (retention: mean over tasks; latency: p95 against the stage's speed reference)"]
    lines += _table(rows)
    if any(r[7].endswith("x*") for r in rows[1:]):
        lines.append("* the speed reference ran in another runtime: that ratio is not a compression speed-up")
    return lines


REPEAT_LABELS = {
    "greedy": "greedy",
    "mean": "sampled (mean)",
    "self_consistency": "majority vote",
    "pass": "pass@{n}",
    "consistency": "consistency",
}


def repeat_lines(repeats: Mapping[str, Any]) -> list[str]:
    """Per task with repeats: a table of each role's greedy score, sampled mean, majority vote, pass@n and
    consistency, each with its interval."""
    lines = []
    for task, info in sorted(repeats.items()):
        n = info.get("repeats")
        lines.append(f"{task}: {n} sampled repeats per item ({info.get('metric')}; intervals clustered by item)")
        header = ("model", *(label.format(n=n) for label in REPEAT_LABELS.values()))
        rows = [header]
        for role, figures in (info.get("roles") or {}).items():
            cells = [role]
            for key in REPEAT_LABELS:
                figure = figures.get(key)
                if figure is None:
                    cells.append("-")
                    continue
                lo, hi = figure["ci"]
                cells.append(f"{_num(figure['score'])} [{_num(lo)}, {_num(hi)}]")
            rows.append(tuple(cells))
        lines += _table(rows)
    return lines


def judge_lines(judged: Mapping[str, Any]) -> list[str]:
    """Per task with a judge, per stage: W/L/T, the win rate without ties and the non-loss rate with intervals, the
    shares of ties and order-inconsistent verdicts, unparseable verdicts, and agreement with exact match."""
    lines = []
    for task, stages in sorted(judged.items()):
        for stage, f in stages.items():
            if f.get("unjudged"):
                lines.append(f"{task} judged, {stage}: {f['unjudged']} item(s) not judged: {f['errors'][0]}")
            if not f["n"]:
                continue
            win, non_loss = f["win_rate"], f["non_loss_rate"]
            text = (
                f"{task} judged, {stage} vs baseline: W/L/T {f['wins']}/{f['losses']}/{f['ties']}; win rate "
                f"{_num(win['rate'])} [{_num(win['ci'][0])}, {_num(win['ci'][1])}] without ties; non-loss "
                f"{_num(non_loss['rate'])} [{_num(non_loss['ci'][0])}, {_num(non_loss['ci'][1])}]; ties "
                f"{f['tie_share']:.0%}, order-inconsistent {f['inconsistent_share']:.0%}, unparseable verdicts "
                f"{f['unparseable_verdicts']}"
            )
            agreement = f.get("agreement")
            if agreement and agreement.get("rate") is not None:
                text += f"; agrees with exact match on {agreement['rate']:.0%} of items"
            lines.append(text)
    return lines

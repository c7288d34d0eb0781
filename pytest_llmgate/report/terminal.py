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
) -> list[tuple[str, dict[str, bool]]]:
    """(line, markup) pairs for the terminal reporter.

    ``problems``: why the run is incomplete (nothing or not everything checked, harness errors, crashes,
    interruptions); any problem replaces the verdict's headline. ``notes``: what went wrong with the cache.
    """
    out: list[tuple[str, dict[str, bool]]] = []
    for role, info in models.items():
        out.append(
            (
                f"{role}: {info['name']} ({info['fingerprint'][:12]}) - evaluated {info['evaluated']}, "
                f"from cache {info['cached']}",
                {},
            )
        )
        out += [(f"  {line}", {}) for line in size_lines(info)]
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

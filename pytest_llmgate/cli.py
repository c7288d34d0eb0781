"""``llmgate``: read JSON reports, compare two runs, show the run history, and look after the result cache.

Every command works from files a run left behind (the JSON report, ``history.sqlite``, ``cache.sqlite``); none
evaluates a model. Bad input (a missing file, not JSON, another schema, a damaged database) is one line on
stderr and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

SCHEMA = "llmgate-report/1"
DEFAULT_HISTORY = Path(".llmgate/history.sqlite")
DEFAULT_CACHE = Path(".llmgate/cache.sqlite")
BAD_INPUT = 2


class CliError(Exception):
    """Bad input: printed as one line, exit 2."""


# -- reading reports ---------------------------------------------------------------------------------------------


def load_report(path: Path) -> dict[str, Any]:
    """The report at ``path`` (CliError when it is missing, not JSON or not an llmgate-report/1)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CliError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CliError(f"{path}: is a folder, not a JSON report") from None
    except UnicodeDecodeError:
        raise CliError(f"{path}: not a JSON report (not UTF-8 text)") from None
    except OSError as error:
        raise CliError(f"{path}: cannot be read: {error.strerror or error}") from None
    try:
        report = json.loads(text)
    except ValueError as error:
        raise CliError(f"{path}: not JSON ({error})") from None
    if not isinstance(report, dict) or "schema" not in report:
        raise CliError(f"{path}: not an llmgate report (no 'schema' key; write one with --llmgate-report)")
    if report["schema"] != SCHEMA:
        raise CliError(f"{path}: schema {report['schema']!r} is not {SCHEMA!r}; this llmgate reads {SCHEMA} reports")
    for key, kind in (("tasks", dict), ("stages", dict), ("models", dict), ("items", list)):
        if not isinstance(report.get(key, kind()), kind):
            raise CliError(f"{path}: malformed report: '{key}' is not a JSON {'object' if kind is dict else 'array'}")
    return report


def _fmt(value: Any, spec: str = ".3f", suffix: str = "") -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-"
    return f"{value:{spec}}{suffix}"


def _delta(a: Any, b: Any) -> str:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return f"{b - a:+.3f}"
    return "-"


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    ]


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def stage_tasks(report: Mapping[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """(stage, task) -> that task's entry; a run without stages gives its tasks under "baseline"."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for stage, figures in _dict(report.get("stages")).items():
        for task, entry in _dict(_dict(figures).get("tasks")).items():
            out[(stage, task)] = _dict(entry)
    if not out:
        for task, entry in _dict(report.get("tasks")).items():
            entry = _dict(entry)
            out[("baseline", task)] = {**entry, "candidate": entry.get("baseline")}
    return out


# -- show --------------------------------------------------------------------------------------------------------


def summary_lines(report: Mapping[str, Any], name: str) -> list[str]:
    """A terminal summary of one report: verdict, per task x stage figures, the trade-offs, failed rules."""
    verdict = str(report.get("verdict", "?"))
    head = f"llmgate report {name}: stage {report.get('stage')}, verdict {verdict.upper()}"
    head += f" (exit {report.get('exit_code')})"
    if report.get("selected_stage"):
        head += f", selected stage {report['selected_stage']}"
    lines = [head, f"  policy {report.get('policy', '-')}, harness errors {report.get('harness_errors', 0)}"]
    lines += [f"  problem: {problem}" for problem in report.get("problems") or []]
    lines += [f"  not checked: {what}" for what in report.get("unchecked") or []]
    rows = [("stage", "task", "metric", "n", "baseline", "score", "retention", "threshold", "result")]
    for (stage, task), entry in sorted(stage_tasks(report).items()):
        result = "pass" if entry.get("passed") else "FAIL"
        if entry.get("informative") is False:
            result += " (uninformative)"
        rows.append(
            (
                stage,
                task,
                str(entry.get("metric", "-")),
                str(entry.get("n", "-")),
                _fmt(_dict(entry.get("baseline")).get("score")),
                _fmt(_dict(entry.get("candidate")).get("score")),
                _fmt(entry.get("retention")),
                _fmt(entry.get("threshold"), ".2f"),
                result if stage != "baseline" else "-",
            )
        )
    lines += _table(rows) if len(rows) > 1 else ["  no task figures"]
    stages = _dict(report.get("stages"))
    if stages:
        from .history import stage_figures

        trade = [("stage", "verdict", "retention", "size MB", "smaller", "p95 ms", "latency", "tok/s", "peak MB")]
        for stage, figures in stages.items():
            measured = stage_figures(report, stage)
            trade.append(
                (
                    stage,
                    str(_dict(figures).get("verdict", "-")),
                    _fmt(_dict(figures).get("mean_retention")),
                    _fmt(measured["size_mb"], ".1f"),
                    _fmt(measured["compression_ratio"], ".2f", "x"),
                    _fmt(measured["p95_latency_ms"], ".0f"),
                    _fmt(measured["latency_ratio"], ".2f", "x"),
                    _fmt(measured["decode_tokens_per_s"], ".0f"),
                    _fmt(measured["peak_memory_mb"], ".0f"),
                )
            )
        lines.append("trade-off")
        lines += _table(trade)
    for stage, figures in stages.items():
        for rule in _dict(figures).get("rules") or []:
            rule = _dict(rule)
            if not rule.get("passed", True) and not rule.get("skipped"):
                kind = "CRITICAL" if rule.get("critical") else "FAILED"
                lines.append(f"{kind} [{stage}] {rule.get('rule')}: {rule.get('detail')}")
        for advice in _dict(figures).get("recommendations") or []:
            lines.append(f"  advice [{stage}]: {advice}")
    items = [_dict(item) for item in report.get("items") or []]
    if items:
        counts = {
            status: sum(1 for item in items if item.get("status") == status) for status in ("regressed", "improved")
        }
        lines.append(f"items: {len(items)} ({counts['regressed']} regressed, {counts['improved']} improved)")
    return lines


def _renderer(module: str, function: str, option: str) -> Any:
    """The report renderer ``module.function``, imported only when asked for (CliError when it is not installed)."""
    import importlib

    try:
        return getattr(importlib.import_module(f"pytest_llmgate.report.{module}"), function)
    except ModuleNotFoundError as error:
        if error.name and error.name.startswith("pytest_llmgate"):
            raise CliError(
                f"{option} needs pytest_llmgate.report.{module}, which this installation does not have yet"
            ) from None
        raise
    except AttributeError:
        raise CliError(f"{option} needs pytest_llmgate.report.{module}.{function}, which is not there") from None


def cmd_show(args: argparse.Namespace) -> int:
    report = load_report(args.report)
    if args.md:
        print(_renderer("markdown", "render_markdown", "--md")(report))
    if args.html:
        page = _renderer("html", "render_html", "--html")(report)
        try:
            args.html.parent.mkdir(parents=True, exist_ok=True)
            args.html.write_text(page, encoding="utf-8")
        except OSError as error:
            raise CliError(f"{args.html}: cannot write the HTML report: {error.strerror or error}") from None
        print(f"llmgate: HTML report written to {args.html}")
    if not args.md and not args.html:
        print("\n".join(summary_lines(report, str(args.report))))
    return 0


# -- compare -----------------------------------------------------------------------------------------------------


def _prediction(item: Mapping[str, Any], side: Any) -> Any:
    """What the model answered on one side of an item: the chosen option (normalised for acc_norm) or its text."""
    side = _dict(side)
    if not side:
        return None
    if "norm" in str(item.get("metric", "")) and "prediction_norm" in side:
        return side["prediction_norm"]
    for key in ("prediction", "extracted", "completion"):
        if key in side:
            return side[key]
    return None


def _sides(item: Mapping[str, Any]) -> dict[str, Any]:
    sides = {"baseline": item.get("baseline")} if item.get("baseline") is not None else {}
    sides.update(_dict(item.get("stages")))
    return sides


def item_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> tuple[list[str], int, int, int]:
    """Lines for items whose status or a prediction differs; (lines, shared, only in A, only in B)."""
    first = {(str(i.get("task")), str(i.get("id"))): i for i in map(_dict, a.get("items") or [])}
    second = {(str(i.get("task")), str(i.get("id"))): i for i in map(_dict, b.get("items") or [])}
    lines = []
    for key in sorted(first.keys() & second.keys()):
        old, new = first[key], second[key]
        changes = []
        if old.get("status") != new.get("status"):
            changes.append(f"status {old.get('status')} -> {new.get('status')}")
        old_sides, new_sides = _sides(old), _sides(new)
        for role in sorted(old_sides.keys() & new_sides.keys()):
            before, after = _prediction(old, old_sides[role]), _prediction(new, new_sides[role])
            if before != after:
                changes.append(f"{role} prediction {_short(before)} -> {_short(after)}")
        if changes:
            lines.append(f"{key[0]} {key[1]}: " + "; ".join(changes))
    return (
        lines,
        len(first.keys() & second.keys()),
        len(first.keys() - second.keys()),
        len(second.keys() - first.keys()),
    )


def _short(value: Any, width: int = 40) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def compare_lines(a: Mapping[str, Any], b: Mapping[str, Any], names: tuple[str, str], limit: int = 20) -> list[str]:
    """Two runs side by side: per task x stage scores and retention with deltas, then the items that changed."""
    lines = [
        f"llmgate compare: A = {names[0]} (stage {a.get('stage')}, {a.get('verdict')}, exit {a.get('exit_code')})",
        f"                 B = {names[1]} (stage {b.get('stage')}, {b.get('verdict')}, exit {b.get('exit_code')})",
    ]
    first, second = stage_tasks(a), stage_tasks(b)
    rows = [
        ("stage", "task", "n A", "n B", "base A", "base B", "score A", "score B", "delta", "ret A", "ret B", "delta")
    ]
    for key in sorted(first.keys() | second.keys()):
        old, new = first.get(key, {}), second.get(key, {})
        scores = (_dict(old.get("candidate")).get("score"), _dict(new.get("candidate")).get("score"))
        bases = (_dict(old.get("baseline")).get("score"), _dict(new.get("baseline")).get("score"))
        rows.append(
            (
                key[0],
                key[1],
                str(old.get("n", "-")),
                str(new.get("n", "-")),
                _fmt(bases[0]),
                _fmt(bases[1]),
                _fmt(scores[0]),
                _fmt(scores[1]),
                _delta(*scores),
                _fmt(old.get("retention")),
                _fmt(new.get("retention")),
                _delta(old.get("retention"), new.get("retention")),
            )
        )
    lines += _table(rows) if len(rows) > 1 else ["  no task figures in either report"]
    changed, shared, only_a, only_b = item_differences(a, b)
    head = f"items: {shared} in both, {len(changed)} differ in status or prediction"
    if only_a or only_b:
        head += f"; {only_a} only in A, {only_b} only in B"
    lines.append(head)
    lines += [f"  {line}" for line in changed[:limit]]
    if len(changed) > limit:
        lines.append(f"  ... and {len(changed) - limit} more (--limit to list more)")
    return lines


def cmd_compare(args: argparse.Namespace) -> int:
    a, b = load_report(args.a), load_report(args.b)
    print("\n".join(compare_lines(a, b, (str(args.a), str(args.b)), limit=args.limit)))
    return 0


# -- history -----------------------------------------------------------------------------------------------------


def cmd_history(args: argparse.Namespace) -> int:
    from .history import History, HistoryError

    if not args.db.exists():
        raise CliError(f"{args.db}: no run history (gated runs record it beside the result cache; --db PATH)")
    history = History(args.db)
    try:
        runs = history.runs(stage=args.stage, last=args.last)
        if not runs:
            print(f"llmgate history {args.db}: no recorded runs" + (f" of stage '{args.stage}'" if args.stage else ""))
            return 0
        rows = [("run", "time (UTC)", "commit", "branch", "config", "stage", "verdict", "exit", "stages")]
        for run in runs:
            rows.append(
                (
                    str(run.id),
                    run.time.replace("+00:00", "Z"),
                    (run.commit or "-")[:10],
                    run.branch or "-",
                    run.config_hash[:10],
                    str(run.stage) + (f" -> {run.selected_stage}" if run.selected_stage else ""),
                    str(run.verdict),
                    str(run.exit_code),
                    ",".join(run.stages) or "-",
                )
            )
        print(f"llmgate history {args.db}: {len(runs)} run(s)")
        print("\n".join(_table(rows)))
        stages = [args.stage] if args.stage else sorted({stage for run in runs for stage in run.stages})
        for stage in stages:
            print()
            print("\n".join(history.trend_lines(stage, last=args.last, drift_tolerance=args.drift)))
    except HistoryError as error:
        raise CliError(str(error)) from None
    return 0


# -- cache -------------------------------------------------------------------------------------------------------


def _cache_connection(path: Path) -> Any:
    from .cache import CacheError, ResultCache

    if not path.exists():
        raise CliError(f"{path}: no result cache there (--cache PATH)")
    cache = ResultCache(path)
    try:
        cache.check()
    except CacheError as error:
        raise CliError(str(error)) from None
    return cache


def cmd_cache(args: argparse.Namespace) -> int:
    cache = _cache_connection(args.cache)
    try:
        connection = cache.connection
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if args.action == "stats":
            return _cache_stats(args.cache, connection, tables)
        return _cache_prune(args, cache, connection)
    except sqlite3.Error as error:
        raise CliError(f"llmgate cache {args.cache}: {error}") from None
    finally:
        cache.close()


def _when(stamp: float | None) -> str:
    return "-" if stamp is None else datetime.fromtimestamp(stamp, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _cache_stats(path: Path, connection: sqlite3.Connection, tables: set[str]) -> int:
    size = sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())
    total, oldest, newest = connection.execute("SELECT COUNT(*), MIN(created), MAX(created) FROM results").fetchone()
    print(f"llmgate cache {path}: {size / 1e6:.2f} MB, {total} results, oldest {_when(oldest)}, newest {_when(newest)}")
    rows = [("model fingerprint", "results", "task versions", "oldest", "newest")]
    for model, count, versions, first, last in connection.execute(
        "SELECT model, COUNT(*), COUNT(DISTINCT task_version), MIN(created), MAX(created) FROM results "
        "GROUP BY model ORDER BY model"
    ):
        rows.append((model, str(count), str(versions), _when(first), _when(last)))
    if len(rows) > 1:
        print("\n".join(_table(rows)))
    for table, what in (("verdicts", "sandbox verdicts"), ("file_digests_v2", "file digests")):
        if table in tables:
            print(f"  {what}: {connection.execute(f'SELECT COUNT(*) FROM {table}').fetchone()[0]}")
    return 0


def _cache_prune(args: argparse.Namespace, cache: Any, connection: sqlite3.Connection) -> int:
    if cache.read_only:
        raise CliError(f"llmgate cache {args.cache}: is read-only, so nothing can be pruned")
    if args.model is not None:
        models = [row[0] for row in connection.execute("SELECT DISTINCT model FROM results")]
        matches = [m for m in models if m == args.model] or [m for m in models if m.startswith(args.model)]
        if len(matches) > 1:
            raise CliError(f"--model {args.model} matches {len(matches)} fingerprints; give more of it")
        if not matches:
            print(f"llmgate cache {args.cache}: pruned 0 results (no model {args.model})")
            return 0
        where, values, what = "model = ?", (matches[0],), f"of model {matches[0]}"
    else:
        cutoff = time.time() - args.older_than * 86400
        where, values, what = "created < ?", (cutoff,), f"older than {args.older_than:g} days"
    connection.execute("BEGIN IMMEDIATE")
    try:
        results = connection.execute(f"DELETE FROM results WHERE {where}", values).rowcount
        verdicts = 0
        if args.model is None:  # sandbox verdicts belong to no model: only age prunes them
            verdicts = connection.execute(f"DELETE FROM verdicts WHERE {where}", values).rowcount
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    text = f"llmgate cache {args.cache}: pruned {results} results {what}"
    if args.model is None:
        text += f" and {verdicts} sandbox verdicts"
    left = connection.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    print(f"{text}; {left} results left")
    return 0


# -- entry point -------------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is below 1")
    return value


def _days(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of days") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a number of days >= 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``llmgate`` command line."""
    parser = argparse.ArgumentParser(prog="llmgate", description=__doc__.splitlines()[0] if __doc__ else None)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    show = commands.add_parser("show", help="summarise a JSON report in the terminal, or as Markdown or HTML")
    show.add_argument("report", type=Path, metavar="REPORT.json")
    show.add_argument("--md", action="store_true", help="print the Markdown summary instead")
    show.add_argument("--html", type=Path, metavar="OUT", help="write the HTML report to OUT")
    show.set_defaults(run=cmd_show)

    compare = commands.add_parser("compare", help="two runs side by side, and the items that changed")
    compare.add_argument("a", type=Path, metavar="A.json")
    compare.add_argument("b", type=Path, metavar="B.json")
    compare.add_argument("--limit", type=_positive_int, default=20, help="items listed at most (default 20)")
    compare.set_defaults(run=cmd_compare)

    history = commands.add_parser("history", help="the recorded runs and each task's retention trend")
    history.add_argument("--stage", help="only runs that evaluated this stage")
    history.add_argument("--last", type=_positive_int, default=10, help="the last N runs (default 10)")
    history.add_argument(
        "--db", type=Path, default=DEFAULT_HISTORY, help=f"the history file (default {DEFAULT_HISTORY})"
    )
    history.add_argument(
        "--drift", type=float, default=0.02, help="flag a retention that fell by more than this (default 0.02)"
    )
    history.set_defaults(run=cmd_history)

    cache = commands.add_parser("cache", help="the result cache: stats, or prune")
    cache.add_argument("action", choices=["stats", "prune"])
    cache.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"the cache file (default {DEFAULT_CACHE})")
    which = cache.add_mutually_exclusive_group()
    which.add_argument("--older-than", type=_days, metavar="DAYS", help="prune: results stored more than DAYS ago")
    which.add_argument(
        "--model", metavar="FINGERPRINT", help="prune: the results of one model (a unique prefix will do)"
    )
    cache.set_defaults(run=cmd_cache)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``llmgate``; the exit status (2 for bad input, with one line on stderr)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:  # argparse has printed the usage and the error
        return int(exit.code or 0)
    if args.command == "cache":
        if args.action == "prune" and args.older_than is None and args.model is None:
            print("llmgate: error: cache prune needs --older-than DAYS or --model FINGERPRINT", file=sys.stderr)
            return BAD_INPUT
        if args.action == "stats" and (args.older_than is not None or args.model is not None):
            print("llmgate: error: --older-than and --model are for cache prune", file=sys.stderr)
            return BAD_INPUT
    try:
        return int(args.run(args))
    except CliError as error:
        print(f"llmgate: error: {error}", file=sys.stderr)
        return BAD_INPUT
    except (KeyError, TypeError, AttributeError, ValueError) as error:  # a report edited into another shape
        print(f"llmgate: error: malformed input: {type(error).__name__}: {error}", file=sys.stderr)
        return BAD_INPUT
    except BrokenPipeError:  # llmgate ... | head
        return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The run history: one row per gated run in SQLite (beside the result cache), and each task's trend.

Built from the JSON report's dict (schema ``llmgate-report/1``), so a run recorded by the plugin and a report
recorded later by hand give the same rows. Like the result cache it fails safe: a file that is not a database,
a folder or a read-only file is a ``HistoryError`` naming the file and the fix, which the caller prints; the
verdict and the exit code never depend on it. Reading never creates the file.
"""

from __future__ import annotations

import contextlib
import itertools
import sqlite3
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
FIX_HINT = "delete or move it, or record the history elsewhere"
GIT_TIMEOUT_S = 5.0
DRIFT_TOLERANCE = 0.02  # a retention that fell by more than this since the previous run of the stage drifted
ARROW_TOLERANCE = 0.005  # a change within this is shown as steady (→)
BASELINE_ROLE = "baseline"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL, git_commit TEXT, git_branch TEXT,
    config_hash TEXT NOT NULL, stage TEXT, verdict TEXT, exit_code INTEGER, complete INTEGER,
    selected_stage TEXT);
CREATE TABLE IF NOT EXISTS task_results (
    run_id INTEGER NOT NULL REFERENCES runs(id), stage TEXT NOT NULL, task TEXT NOT NULL,
    score REAL, baseline_score REAL, retention REAL, n INTEGER, passed INTEGER,
    PRIMARY KEY (run_id, stage, task));
CREATE TABLE IF NOT EXISTS stage_figures (
    run_id INTEGER NOT NULL REFERENCES runs(id), stage TEXT NOT NULL, verdict TEXT, mean_retention REAL,
    size_mb REAL, compression_ratio REAL, p95_latency_ms REAL, latency_ratio REAL, decode_tokens_per_s REAL,
    peak_memory_mb REAL, PRIMARY KEY (run_id, stage));
"""


class HistoryError(Exception):
    """The run history cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class RunRecord:
    """One recorded run."""

    id: int
    time: str  # ISO 8601, UTC
    commit: str | None
    branch: str | None
    config_hash: str
    stage: str | None  # the --stage of the run ("all" for the ladder)
    verdict: str | None
    exit_code: int | None
    complete: bool
    selected_stage: str | None
    stages: tuple[str, ...]  # the stages the run has figures of


@dataclass(frozen=True)
class TrendRow:
    """One task of one stage over the last runs that evaluated that stage, oldest first."""

    task: str
    stage: str
    run_ids: tuple[int, ...]
    retentions: tuple[float | None, ...]
    scores: tuple[float | None, ...]
    arrows: tuple[str, ...]  # between consecutive retentions: len(retentions) - 1
    drift: bool  # the latest retention fell against the previous run by more than the tolerance
    change: float | None  # latest minus previous retention
    passed: bool | None  # what the gate said of this task in the latest run

    @property
    def latest(self) -> float | None:
        """The latest run's retention."""
        return self.retentions[-1] if self.retentions else None


def arrow(previous: float | None, current: float | None, tolerance: float = ARROW_TOLERANCE) -> str:
    """↑, ↓ or → between two values (→ within ``tolerance``); ? when one is unknown."""
    if previous is None or current is None:
        return "?"
    if current - previous > tolerance:
        return "↑"
    if previous - current > tolerance:
        return "↓"
    return "→"


def git_metadata(root: Path) -> tuple[str | None, str | None]:
    """(commit, branch) of the git work tree at ``root``; None for what cannot be read (no git, no repo, detached)."""

    def ask(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(root), *args],
                capture_output=True,
                text=True,
                timeout=GIT_TIMEOUT_S,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        except (OSError, subprocess.SubprocessError):  # git missing, or hung on a network file system
            return None
        value = done.stdout.strip()
        return value if done.returncode == 0 and value else None

    commit = ask("rev-parse", "--verify", "-q", "HEAD")
    if commit is None:
        return None, None
    branch = ask("rev-parse", "--abbrev-ref", "HEAD")
    return commit, None if branch == "HEAD" else branch


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


TaskRow = tuple[str, str, float | None, float | None, float | None, int | None, bool | None]


def task_rows(report: Mapping[str, Any]) -> list[TaskRow]:
    """(stage, task, score, baseline score, retention, n, passed) of every task x stage in the report.

    A run without stages (``--stage=baseline``) gives the baseline's scores under the stage "baseline".
    """
    rows: list[TaskRow] = []
    stages = _mapping(report.get("stages"))
    for stage, figures in sorted(stages.items()):
        for task, entry in sorted(_mapping(_mapping(figures).get("tasks")).items()):
            entry = _mapping(entry)
            rows.append(
                (
                    stage,
                    task,
                    _float(_mapping(entry.get("candidate")).get("score")),
                    _float(_mapping(entry.get("baseline")).get("score")),
                    _float(entry.get("retention")),
                    entry.get("n") if isinstance(entry.get("n"), int) else None,
                    entry.get("passed") if isinstance(entry.get("passed"), bool) else None,
                )
            )
    if not stages:
        for task, entry in sorted(_mapping(report.get("tasks")).items()):
            entry = _mapping(entry)
            base = _float(_mapping(entry.get("baseline")).get("score"))
            n = entry.get("n") if isinstance(entry.get("n"), int) else None
            rows.append((BASELINE_ROLE, task, base, base, None, n, None))
    return rows


def stage_figures(report: Mapping[str, Any], stage: str) -> dict[str, float | None]:
    """Size, compression, speed and memory of one stage's model from the report's ``models``."""
    info = _mapping(_mapping(report.get("models")).get(stage))
    speed = _mapping(info.get("speed"))
    size = _float(info.get("size_bytes"))
    peak = _float(info.get("peak_memory_mb"))
    if peak is None:
        peak = _float(_mapping(info.get("memory")).get("peak_memory_mb"))
    return {
        "size_mb": None if size is None else size / 1e6,
        "compression_ratio": _float(info.get("compression_ratio")),
        "p95_latency_ms": _float(_mapping(speed.get("latency_ms")).get("p95")),
        "latency_ratio": _float(_mapping(_mapping(speed.get("vs_reference")).get("latency_ratio")).get("point")),
        "decode_tokens_per_s": _float(speed.get("decode_tokens_per_s")),
        "peak_memory_mb": peak,
    }


class History:
    """The run history at ``path`` (SQLite); opened per call, so nothing stays open between runs."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def _explain(self, error: BaseException, doing: str) -> HistoryError:
        reason = getattr(error, "strerror", None) or str(error)
        if isinstance(error, sqlite3.DatabaseError) and "not a database" in str(error):
            reason = "it is not a SQLite database (another program's file, or a damaged history)"
        elif "readonly" in str(error):
            reason = "it is read-only"
        return HistoryError(f"llmgate history {self.path}: {reason}, so {doing}; {FIX_HINT}")

    @contextlib.contextmanager
    def _connect(self, *, write: bool) -> Iterator[sqlite3.Connection | None]:
        """A connection for one operation; None when reading a history that does not exist yet."""
        if self.path.is_dir():
            raise HistoryError(f"llmgate history {self.path}: is a folder, not a file; {FIX_HINT}")
        doing = "this run was not recorded" if write else "it cannot be read"
        if not write and not self.path.exists():
            yield None
            return
        try:
            if write:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                connection = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            else:
                connection = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
        except (sqlite3.Error, OSError) as error:
            raise self._explain(error, doing) from None
        try:
            connection.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()  # a file that is not a database
            yield connection
        except (sqlite3.Error, OSError) as error:
            raise self._explain(error, doing) from None
        finally:
            connection.close()

    def record(self, report: Mapping[str, Any], *, config_hash: str, root: Path) -> int:
        """Append the run of ``report`` (with UTC time and ``root``'s git commit and branch); the new run's id."""
        commit, branch = git_metadata(root)
        now = datetime.now(UTC).isoformat(timespec="seconds")
        exit_code = report.get("exit_code")
        rows = task_rows(report)
        stages = _mapping(report.get("stages"))
        with self._connect(write=True) as connection:
            assert connection is not None
            connection.executescript(_SCHEMA)
            connection.execute("BEGIN IMMEDIATE")
            try:
                connection.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                cursor = connection.execute(
                    "INSERT INTO runs (time, git_commit, git_branch, config_hash, stage, verdict, exit_code, "
                    "complete, selected_stage) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        now,
                        commit,
                        branch,
                        config_hash,
                        report.get("stage"),
                        report.get("verdict"),
                        exit_code if isinstance(exit_code, int) else None,
                        int(bool(report.get("complete", True))),
                        report.get("selected_stage"),
                    ),
                )
                run_id = int(cursor.lastrowid or 0)
                connection.executemany(
                    "INSERT INTO task_results VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [(run_id, *row[:6], None if row[6] is None else int(row[6])) for row in rows],
                )
                for stage in sorted(stages) or sorted({row[0] for row in rows}):
                    figures = _mapping(stages.get(stage))
                    measured = stage_figures(report, stage)
                    connection.execute(
                        "INSERT INTO stage_figures VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            run_id,
                            stage,
                            figures.get("verdict"),
                            _float(figures.get("mean_retention")),
                            *measured.values(),
                        ),
                    )
                connection.execute("COMMIT")
            except BaseException:
                connection.execute("ROLLBACK")
                raise
        return run_id

    def runs(self, stage: str | None = None, last: int | None = None) -> list[RunRecord]:
        """The recorded runs, oldest first: the last ``last`` of them, only those that evaluated ``stage`` if given."""
        with self._connect(write=False) as connection:
            if connection is None or not self._has_tables(connection):
                return []
            where = ""
            args: list[Any] = []
            if stage is not None:
                where = "WHERE r.stage = ? OR r.id IN (SELECT run_id FROM stage_figures WHERE stage = ?)"
                args = [stage, stage]
            limit = "LIMIT ?" if last is not None else ""
            if last is not None:
                args.append(last)
            fetched = connection.execute(
                "SELECT r.id, r.time, r.git_commit, r.git_branch, r.config_hash, r.stage, r.verdict, r.exit_code, "
                "r.complete, r.selected_stage, (SELECT group_concat(stage, ',') FROM "
                "(SELECT stage FROM stage_figures s WHERE s.run_id = r.id ORDER BY stage)) "
                f"FROM runs r {where} ORDER BY r.id DESC {limit}",
                args,
            ).fetchall()
        return [
            RunRecord(
                id=row[0],
                time=row[1],
                commit=row[2],
                branch=row[3],
                config_hash=row[4],
                stage=row[5],
                verdict=row[6],
                exit_code=row[7],
                complete=bool(row[8]),
                selected_stage=row[9],
                stages=tuple(row[10].split(",")) if row[10] else (),
            )
            for row in reversed(fetched)
        ]

    @staticmethod
    def _has_tables(connection: sqlite3.Connection) -> bool:
        names = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        return {"runs", "task_results", "stage_figures"} <= names

    def stage_history(self, stage: str, last: int = 5) -> list[tuple[RunRecord, dict[str, float | None]]]:
        """The last runs of ``stage`` with that stage's size, speed and memory figures, oldest first."""
        records = self.runs(stage, last)
        with self._connect(write=False) as connection:
            if connection is None or not records:
                return []
            out = []
            for record in records:
                cursor = connection.execute(
                    "SELECT * FROM stage_figures WHERE run_id = ? AND stage = ?", (record.id, stage)
                )
                row = cursor.fetchone()
                names = [d[0] for d in cursor.description]
                out.append((record, dict(zip(names[2:], row[2:], strict=True)) if row else {}))
        return out

    def trend(
        self,
        stage: str,
        last: int = 5,
        *,
        drift_tolerance: float = DRIFT_TOLERANCE,
        arrow_tolerance: float = ARROW_TOLERANCE,
    ) -> list[TrendRow]:
        """Per task, the retention and score of ``stage`` over its last ``last`` runs, with arrows and drift."""
        if last < 1:
            raise ValueError("last must be at least 1")
        with self._connect(write=False) as connection:
            if connection is None or not self._has_tables(connection):
                return []
            run_ids = [
                row[0]
                for row in connection.execute(
                    "SELECT DISTINCT run_id FROM task_results WHERE stage = ? ORDER BY run_id DESC LIMIT ?",
                    (stage, last),
                )
            ][::-1]
            if not run_ids:
                return []
            marks = ",".join("?" * len(run_ids))
            values: dict[str, dict[int, tuple[float | None, float | None, bool | None]]] = {}
            for task, run_id, retention, score, passed in connection.execute(
                f"SELECT task, run_id, retention, score, passed FROM task_results WHERE stage = ? "
                f"AND run_id IN ({marks}) ORDER BY task, run_id",
                (stage, *run_ids),
            ):
                values.setdefault(task, {})[run_id] = (retention, score, None if passed is None else bool(passed))
        rows = []
        for task, by_run in sorted(values.items()):
            present = [run_id for run_id in run_ids if run_id in by_run]
            retentions = tuple(by_run[r][0] for r in present)
            scores = tuple(by_run[r][1] for r in present)
            arrows = tuple(arrow(a, b, arrow_tolerance) for a, b in itertools.pairwise(retentions))
            change = None
            if len(retentions) >= 2 and retentions[-1] is not None and retentions[-2] is not None:
                change = retentions[-1] - retentions[-2]
            rows.append(
                TrendRow(
                    task=task,
                    stage=stage,
                    run_ids=tuple(present),
                    retentions=retentions,
                    scores=scores,
                    arrows=arrows,
                    drift=change is not None and change < -drift_tolerance,
                    change=change,
                    passed=by_run[present[-1]][2],
                )
            )
        return rows

    def trend_lines(
        self,
        stage: str,
        last: int = 5,
        *,
        drift_tolerance: float = DRIFT_TOLERANCE,
        arrow_tolerance: float = ARROW_TOLERANCE,
    ) -> list[str]:
        """The trend of ``stage`` as terminal lines: one per task, a DRIFT line for each task that drifted.

        ``all`` (the ladder) gives the trend of each stage its latest run evaluated.
        """
        stages = [stage]
        if stage == "all":
            latest = self.runs("all", last=1)
            stages = list(latest[0].stages) if latest and latest[0].stages else stages
        lines = []
        for name in stages:
            rows = self.trend(name, last, drift_tolerance=drift_tolerance, arrow_tolerance=arrow_tolerance)
            lines += format_trend(name, rows, drift_tolerance=drift_tolerance)
        return lines


def _series(values: Sequence[float | None], arrows: Sequence[str]) -> str:
    text = "-" if not values else _fmt(values[0])
    for sign, value in zip(arrows, values[1:], strict=True):
        text += f" {sign} {_fmt(value)}"
    return text


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_trend(stage: str, rows: Sequence[TrendRow], *, drift_tolerance: float = DRIFT_TOLERANCE) -> list[str]:
    """Terminal lines of a stage's trend rows (see ``History.trend``)."""
    if not rows:
        return [f"llmgate trend: no recorded runs of stage '{stage}' yet"]
    runs = max(len(row.run_ids) for row in rows)
    lines = [f"llmgate trend: stage '{stage}', retention over the last {runs} run(s), oldest first"]
    width = max(len(row.task) for row in rows)
    for row in rows:
        score_arrows = tuple(arrow(a, b) for a, b in itertools.pairwise(row.scores))
        line = (
            f"  {row.task:<{width}}  retention {_series(row.retentions, row.arrows)}"
            f"   score {_series(row.scores, score_arrows)}"
        )
        if row.drift and row.change is not None:
            still = " (the gate still passes)" if row.passed else ""
            line += f"   DRIFT {row.change:+.3f} since the previous run{still}"
        lines.append(line)
    drifted = [row.task for row in rows if row.drift]
    if drifted:
        lines.append(
            f"llmgate trend: retention of {', '.join(drifted)} fell by more than {drift_tolerance:.3f} "
            "since the previous run of this stage"
        )
    return lines

"""Custom tasks: JSONL suites declared in ``[tool.llmgate.suites.<name>]``, and tasks written in Python.

A suite is a JSON Lines file plus a table saying how a row becomes a prompt and how an answer is
scored; it becomes a Task like the built-in ones (same few-shot sampler, same cache rules). The
schema is documented in docs/tasks.md. Tasks written in Python reach the registry through the
``pytest_llmgate_tasks`` hook (pytest_llmgate/hookspecs.py); ``merge_tasks`` checks them.

No pytest here: mistakes raise ``SuiteError`` (the plugin turns it into a usage error, exit 4),
unreadable data raises ``DatasetError`` when the task loads (a collection error, exit 2), and a
bad row becomes an item carrying its error (that test errors, the rest run).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import importlib
import inspect
import json
import math
import re
import string
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..validate import is_int, unknown_key
from .base import GenerationTask, MultipleChoiceTask, Task, TaskItem, TaskOptions
from .data import DatasetError, DatasetRef, LoadedSplit, content_hash, file_stamp
from .data import read_jsonl as read_rows
from .fewshot import DEFAULT_FEWSHOT_SEED, FewShotSource
from .mmlu import stratified

SUITE_TYPES = ("multiple_choice", "generation")
SCORER_TYPES = ("exact_match", "regex", "numeric", "python", "open")
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # a task name is also a pytest marker: an identifier
_COMMON_KEYS = (
    "path",
    "type",
    "question_field",
    "template",
    "answer_field",
    "target_delimiter",
    "fewshot_delimiter",
    "description",
    "num_fewshot",
    "split",
    "group_field",
)
_KEYS = {
    "multiple_choice": (*_COMMON_KEYS, "choices_field", "choices"),
    "generation": (*_COMMON_KEYS, "until", "max_gen_toks", "scorer"),
}
_SCORER_KEYS = {
    "exact_match": ("type", "metric", "ignore_case", "strip", "ignore_punctuation"),
    "regex": ("type", "metric", "pattern", "group", "match", "ignore_case"),
    "numeric": ("type", "metric", "tolerance", "rel_tolerance"),
    "python": ("type", "metric", "function"),
    "open": ("type", "metric"),  # no gold answer: judged pairwise (judge = "<model>"); scores that it answered
}
# A number as models write it: sign, optional dollar sign, thousands commas, decimals, exponent.
NUMBER = re.compile(r"[-+]?\$?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\$?\.\d+")


class SuiteError(Exception):
    """A custom suite or Python task is declared wrongly; the message names the key and the fix."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.where = where


# --- small validators -------------------------------------------------------------------------


def _check_keys(table: Mapping[str, Any], known: Sequence[str], where: str) -> None:
    found = unknown_key(table, known)
    if found is not None:
        raise SuiteError(f"{where}.{found[0]}", f"unknown key; {found[1]}")


def _string(table: Mapping[str, Any], key: str, where: str, default: str | None) -> str | None:
    value = table.get(key, default)
    if value is not None and not isinstance(value, str):
        raise SuiteError(f"{where}.{key}", f"expected a string, got {value!r}")
    return value


def _flag(table: Mapping[str, Any], key: str, where: str, default: bool) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise SuiteError(f"{where}.{key}", f"expected true or false, got {value!r}")
    return value


def _whole(table: Mapping[str, Any], key: str, where: str, default: int, minimum: int) -> int:
    value = table.get(key, default)
    if not is_int(value) or value < minimum:
        raise SuiteError(f"{where}.{key}", f"expected a whole number >= {minimum}, got {value!r}")
    return value


def _number(table: Mapping[str, Any], key: str, where: str, default: float) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or math.isnan(value):
        raise SuiteError(f"{where}.{key}", f"expected a number >= 0, got {value!r}")
    return float(value)


# --- scorers ----------------------------------------------------------------------------------


def extract_number(text: str, *, last: bool = True) -> float | None:
    """The last (or first) number written in ``text``; commas and dollar signs are dropped. None if none."""
    found = NUMBER.findall(text)
    if not found:
        return None
    return float(found[-1 if last else 0].replace(",", "").replace("$", ""))


def _references(reference: Any) -> list[Any]:
    """A reference answer, or a list of acceptable ones, as a list."""
    return list(reference) if isinstance(reference, (list, tuple)) else [reference]


_PUNCTUATION = str.maketrans("", "", string.punctuation)


@dataclass(frozen=True)
class Scorer:
    """How a generation suite scores a completion against the row's answer: 1.0 right, 0.0 wrong.

    ``exact_match`` compares the text (after the normalizations asked for); ``regex`` extracts a
    match of ``pattern`` (its first or last, the group ``group``) and compares it; ``numeric``
    extracts the last number and compares within the tolerances; ``python`` calls
    ``function(completion, row)``, which returns a bool or a number in [0, 1].
    """

    kind: str
    metric: str
    ignore_case: bool = False
    strip: bool = True
    ignore_punctuation: bool = False
    pattern: re.Pattern[str] | None = None
    group: int = 0
    last: bool = False
    tolerance: float = 1e-6
    rel_tolerance: float = 0.0
    function: Callable[[str, dict[str, Any]], Any] | None = None
    function_name: str = ""

    def _normal(self, text: Any) -> str:
        text = str(text)
        if self.strip:
            text = text.strip()
        if self.ignore_punctuation:
            text = text.translate(_PUNCTUATION)
        return text.lower() if self.ignore_case else text

    def __call__(self, completion: str, reference: Any, row: dict[str, Any]) -> tuple[float, Any]:
        """(score in [0, 1], what was extracted from the completion) for one completion."""
        if self.kind == "open":  # nothing to check against: whether the model answered at all
            answer = completion.strip()
            return (1.0 if answer else 0.0), answer
        if self.kind == "python":
            assert self.function is not None
            value = self.function(completion, row)
            if isinstance(value, bool):
                return float(value), None
            if isinstance(value, (int, float)) and 0.0 <= float(value) <= 1.0:
                return float(value), None
            raise ValueError(f"scorer {self.function_name} returned {value!r}; return a bool or a number in [0, 1]")
        if self.kind == "numeric":
            predicted = extract_number(completion)
            if predicted is None:
                return 0.0, None
            for ref in _references(reference):
                expected = (
                    ref if isinstance(ref, (int, float)) and not isinstance(ref, bool) else extract_number(str(ref))
                )
                if expected is not None and math.isclose(
                    predicted, float(expected), rel_tol=self.rel_tolerance, abs_tol=self.tolerance
                ):
                    return 1.0, predicted
            return 0.0, predicted
        extracted: str | None = completion
        if self.kind == "regex":
            assert self.pattern is not None
            matches = list(self.pattern.finditer(completion))
            if not matches:
                return 0.0, None
            extracted = matches[-1 if self.last else 0].group(self.group)
            if extracted is None:
                return 0.0, None
        text = self._normal(extracted)
        hit = any(text == self._normal(ref) for ref in _references(reference))
        return (1.0 if hit else 0.0), extracted


def _import_function(target: str, base: Path, where: str) -> Callable[..., Any]:
    """The function named by ``module.path:function``, importable from sys.path or the config's folder."""
    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute:
        raise SuiteError(where, f"{target!r}: name the function as 'python:module.path:function'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        top = module_name.split(".")[0]
        beside = (base / f"{top}.py").is_file() or (base / top).is_dir()
        if error.name != top or not beside or str(base) in sys.path:
            raise SuiteError(
                where,
                f"cannot import {module_name!r}: {error}; the module must be importable "
                f"(on sys.path, or beside the config file in {base})",
            ) from None
        # A scorers.py beside the config file is the usual place: look there too, for this import only
        # (the session leaves sys.path as it found it).
        sys.path.append(str(base))
        try:
            module = importlib.import_module(module_name)
        except Exception as again:
            raise SuiteError(where, f"importing {module_name!r} failed: {type(again).__name__}: {again}") from None
        finally:
            sys.path.remove(str(base))
    except Exception as error:
        raise SuiteError(where, f"importing {module_name!r} failed: {type(error).__name__}: {error}") from None
    function = getattr(module, attribute, None)
    if function is None:
        raise SuiteError(where, f"module {module_name!r} has no attribute {attribute!r}")
    if not callable(function):
        raise SuiteError(where, f"{target} is not callable; it must be a function (completion, row) -> float")
    return function


def parse_scorer(raw: Any, base: Path, where: str) -> Scorer:
    """A scorer from ``"exact_match"``, ``"python:module:function"`` or a table with ``type`` and options."""
    if isinstance(raw, str):
        raw = {"type": "python", "function": raw[len("python:") :]} if raw.startswith("python:") else {"type": raw}
    if not isinstance(raw, dict):
        raise SuiteError(where, f"expected a scorer name or a table, got {raw!r}")
    kind = raw.get("type")
    if kind not in SCORER_TYPES:
        close = difflib.get_close_matches(str(kind), SCORER_TYPES, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise SuiteError(
            f"{where}.type" if "type" in raw else where,
            f"unknown scorer {kind!r}; {hint}use one of exact_match, regex, numeric, open, or "
            "'python:module.path:function'",
        )
    _check_keys(raw, _SCORER_KEYS[kind], where)
    metric = _string(raw, "metric", where, {"python": "score", "open": "answered"}.get(kind, "exact_match"))
    if not metric or not NAME.fullmatch(metric):
        raise SuiteError(f"{where}.metric", f"{metric!r}: a metric name is a word such as 'exact_match'")
    if kind == "exact_match":
        return Scorer(
            kind,
            metric,
            ignore_case=_flag(raw, "ignore_case", where, False),
            strip=_flag(raw, "strip", where, True),
            ignore_punctuation=_flag(raw, "ignore_punctuation", where, False),
        )
    if kind == "regex":
        text = _string(raw, "pattern", where, None)
        if not text:
            raise SuiteError(f"{where}.pattern", "a regex scorer needs pattern = '...', e.g. 'answer is (\\w+)'")
        ignore_case = _flag(raw, "ignore_case", where, False)
        try:
            pattern = re.compile(text, re.IGNORECASE if ignore_case else 0)
        except re.error as error:
            raise SuiteError(f"{where}.pattern", f"not a valid regular expression: {error}") from None
        group = _whole(raw, "group", where, 1 if pattern.groups else 0, 0)
        if group > pattern.groups:
            raise SuiteError(f"{where}.group", f"the pattern has {pattern.groups} group(s); use 0 to {pattern.groups}")
        match = raw.get("match", "first")
        if match not in ("first", "last"):
            raise SuiteError(f"{where}.match", f"{match!r}: use 'first' or 'last' (which match in the completion)")
        return Scorer(kind, metric, ignore_case=ignore_case, pattern=pattern, group=group, last=match == "last")
    if kind == "open":
        return Scorer(kind, metric)
    if kind == "numeric":
        return Scorer(
            kind,
            metric,
            tolerance=_number(raw, "tolerance", where, 1e-6),
            rel_tolerance=_number(raw, "rel_tolerance", where, 0.0),
        )
    target = _string(raw, "function", where, None) or ""
    return Scorer(kind, metric, function=_import_function(target, base, f"{where}.function"), function_name=target)


# --- the suite's declaration ------------------------------------------------------------------


@dataclass(frozen=True)
class SplitSpec:
    """How a suite's rows divide into the evaluated part and the train part (few-shot examples).

    Either ``eval_fraction`` of the rows, picked by a seeded hash of each row's content (so the
    pick does not depend on the rows' order), or by the value of a row field.
    """

    eval_fraction: float | None = None
    seed: int = DEFAULT_FEWSHOT_SEED
    row_field: str | None = None
    eval_value: str | None = None
    train_value: str | None = None


def _split(raw: Any, where: str) -> SplitSpec | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise SuiteError(
            where,
            f"expected a table such as {{ eval = 0.2, seed = 1234 }} or "
            f'{{ field = "split", eval = "test", train = "train" }}, got {raw!r}',
        )
    if "field" in raw:
        _check_keys(raw, ("field", "eval", "train"), where)
        name = _string(raw, "field", where, None)
        value = raw.get("eval")
        if not name or not isinstance(value, str):
            raise SuiteError(
                where,
                "a split by field needs field = '<row field>' and eval = '<its value on the "
                "evaluated rows>' (train = '<value>' optional: default every other row)",
            )
        return SplitSpec(row_field=name, eval_value=value, train_value=_string(raw, "train", where, None))
    _check_keys(raw, ("eval", "seed"), where)
    fraction = raw.get("eval")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
        raise SuiteError(
            f"{where}.eval",
            f"expected the held-out fraction strictly between 0 and 1 "
            f"(0.2 evaluates 20% of the rows), got {fraction!r}",
        )
    seed = raw.get("seed", DEFAULT_FEWSHOT_SEED)
    if not is_int(seed):
        raise SuiteError(f"{where}.seed", f"expected an integer, got {seed!r}")
    return SplitSpec(eval_fraction=float(fraction), seed=seed)


@dataclass(frozen=True)
class SuiteSpec:
    """One ``[tool.llmgate.suites.<name>]`` table, validated."""

    name: str
    path: Path
    shown_path: str  # as written in the config, for messages
    kind: str
    question_field: str = "question"
    template: str | None = None
    answer_field: str = "answer"
    choices_field: str = "choices"
    choices: tuple[str, ...] | None = None
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    description: str = ""
    num_fewshot: int = 0
    split: SplitSpec | None = None
    group_field: str | None = None
    until: tuple[str, ...] = ("\n\n",)
    max_gen_toks: int = 256
    scorer: Scorer | None = None

    @property
    def where(self) -> str:
        """The table's name in messages."""
        return f"[tool.llmgate.suites.{self.name}]"


def parse_suite(name: str, raw: Any, base: Path) -> SuiteSpec:
    """Validate one suite table; relative paths are relative to ``base`` (the config file's folder)."""
    where = f"[tool.llmgate.suites.{name}]"
    if not NAME.fullmatch(name):
        raise SuiteError(
            where,
            f"{name!r} cannot name a task (it is also a pytest marker): use letters, "
            "digits and underscores, e.g. 'code_review'",
        )
    if not isinstance(raw, dict):
        raise SuiteError(where, f"expected a table, got {raw!r}")
    kind = raw.get("type")
    if kind not in SUITE_TYPES:
        raise SuiteError(
            f"{where}.type",
            f"{kind!r}: use 'multiple_choice' (log-likelihood of each choice) "
            "or 'generation' (the model writes the answer, a scorer checks it)",
        )
    other = next(t for t in SUITE_TYPES if t != kind)
    for key in raw:
        if key in _KEYS[other] and key not in _KEYS[kind]:
            raise SuiteError(
                f"{where}.{key}",
                f"applies to type = '{other}' suites only; this suite is "
                f"type = '{kind}': remove the key or change the type",
            )
    _check_keys(raw, _KEYS[kind], where)
    shown = _string(raw, "path", where, None)
    if not shown:
        raise SuiteError(f"{where}.path", "every suite needs path = '<file>.jsonl' (relative to the config file)")
    path = (base / shown).resolve()
    if not path.is_file():
        raise SuiteError(
            f"{where}.path",
            f"{path} does not exist; point path at a JSON Lines file "
            "(one object per line), relative to the config file",
        )
    template = _string(raw, "template", where, None)
    if template is not None:
        try:
            placeholders = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
        except ValueError as error:
            raise SuiteError(
                f"{where}.template", f"{error}; write row fields as {{field}} and literal braces as {{{{ and }}}}"
            ) from None
        if any(not name or name[0].isdigit() for name in placeholders):
            raise SuiteError(
                f"{where}.template",
                "a placeholder must name a row field, e.g. {question}; write literal braces as {{ and }}",
            )
    values: dict[str, Any] = {
        "question_field": _string(raw, "question_field", where, "question"),
        "template": template,
        "answer_field": _string(raw, "answer_field", where, "answer"),
        "target_delimiter": _string(raw, "target_delimiter", where, " "),
        "fewshot_delimiter": _string(raw, "fewshot_delimiter", where, "\n\n"),
        "description": _string(raw, "description", where, ""),
        "num_fewshot": _whole(raw, "num_fewshot", where, 0, 0),
        "split": _split(raw.get("split"), f"{where}.split"),
        "group_field": _string(raw, "group_field", where, None),
    }
    if values["num_fewshot"] and values["split"] is None:
        raise SuiteError(
            f"{where}.num_fewshot",
            "few-shot examples come from the suite's train part: declare "
            "split = { eval = 0.2 } (or split by a row field), or set 0",
        )
    if kind == "multiple_choice":
        if "choices" in raw and "choices_field" in raw:
            raise SuiteError(where, "set choices (the same choices for every row) or choices_field, not both")
        if "choices" in raw:
            fixed = raw["choices"]
            if not isinstance(fixed, list) or len(fixed) < 2 or not all(isinstance(c, str) for c in fixed):
                raise SuiteError(f"{where}.choices", f"expected a list of at least two strings, got {fixed!r}")
            values["choices"] = tuple(fixed)
        values["choices_field"] = _string(raw, "choices_field", where, "choices")
    else:
        until = raw.get("until", ["\n\n"])
        until = [until] if isinstance(until, str) else until
        if not isinstance(until, list) or not all(isinstance(u, str) and u for u in until):
            raise SuiteError(f"{where}.until", f"expected a list of stop strings, got {raw.get('until')!r}")
        values["until"] = tuple(until)
        values["max_gen_toks"] = _whole(raw, "max_gen_toks", where, 256, 1)
        values["scorer"] = parse_scorer(raw.get("scorer", "exact_match"), base, f"{where}.scorer")
    return SuiteSpec(name=name, path=path, shown_path=shown, kind=kind, **values)


# --- the suite's rows -------------------------------------------------------------------------


@dataclass(frozen=True)
class SuiteData:
    """A suite file's rows divided into the evaluated and the train part."""

    eval_rows: tuple[dict[str, Any], ...]
    train_rows: tuple[dict[str, Any], ...]
    content_hash: str
    lines: dict[int, int] = field(compare=False)  # id(row) -> its line in the file, for messages
    fields: tuple[str, ...] = ()  # every field some row has, in order of first appearance


def read_jsonl(path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    """Rows of a suite's JSON Lines file and the line number of each; an empty file is an error."""
    rows, numbers = read_rows(path)
    if not rows:
        raise DatasetError(f"{path}: no rows; write one JSON object per line")
    return rows, numbers


def jsonl_split(path: str | Path) -> LoadedSplit:
    """The rows of a JSON Lines file as a task's split, with their content hash (for ``Task.rows``)."""
    path = Path(path).resolve()
    rows, _ = read_jsonl(path)
    frozen = tuple(rows)
    return LoadedSplit(frozen, content_hash(frozen), str(path))


def _rank(seed: int, row: dict[str, Any]) -> str:
    text = json.dumps(row, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(f"{seed}\x00{text}".encode()).hexdigest()


@functools.lru_cache(maxsize=32)
def load_suite(path: Path, stamp: tuple[int, ...], split: SplitSpec | None) -> SuiteData:
    """Read and split a suite file; memoised by (path, its ``file_stamp``, split): a changed file is read again."""
    rows, numbers = read_jsonl(path)
    lines = {id(row): number for row, number in zip(rows, numbers, strict=True)}
    if split is None:
        evaluated, train = rows, []
    elif split.eval_fraction is not None:
        # Ranked by a seeded hash of the content: exact sizes, independent of the rows' order, and
        # appending a row moves at most a row or two across.
        count = max(1, math.floor(len(rows) * split.eval_fraction + 0.5))
        order = sorted(range(len(rows)), key=lambda i: (_rank(split.seed, rows[i]), i))
        chosen = set(order[:count])
        evaluated = [row for i, row in enumerate(rows) if i in chosen]
        train = [row for i, row in enumerate(rows) if i not in chosen]
    else:
        assert split.row_field is not None
        evaluated, train = [], []
        for row in rows:
            if split.row_field not in row:
                raise DatasetError(
                    f"{path}:{lines[id(row)]}: no field {split.row_field!r} (named by split.field); "
                    "every row needs it to be placed in the eval or the train part"
                )
            value = str(row[split.row_field])
            if value == split.eval_value:
                evaluated.append(row)
            elif split.train_value is None or value == split.train_value:
                train.append(row)
        if not evaluated:
            found = sorted({str(row[split.row_field]) for row in rows})
            raise DatasetError(
                f"{path}: no row has {split.row_field} = {split.eval_value!r} (split.eval); "
                f"values found: {', '.join(found)}"
            )
    spec = json.dumps(
        [split.eval_fraction, split.seed, split.row_field, split.eval_value, split.train_value] if split else None
    )
    digest = hashlib.sha256(f"{spec}\x00{content_hash(rows)}".encode()).hexdigest()[:16]
    fields = tuple(dict.fromkeys(key for row in rows for key in row))
    return SuiteData(tuple(evaluated), tuple(train), digest, lines, fields)


# --- the tasks --------------------------------------------------------------------------------


def _group_id(value: Any) -> str:
    """A row's group as it can stand in an item id."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(value)).strip("_") or "_"


class _Suite(Task):
    """What the two kinds of suites share: the file, the split, the groups, the prompt text."""

    def __init__(self, spec: SuiteSpec) -> None:
        self.spec = spec

    def data(self) -> SuiteData:
        """The file's rows, split; read again when the file changes."""
        try:
            stamp = file_stamp(self.spec.path)
        except OSError:
            raise DatasetError(
                f"suite {self.name}: {self.spec.path} does not exist any more; fix path in {self.spec.where}"
            ) from None
        return load_suite(self.spec.path, stamp, self.spec.split)

    def rows(self, data_dir: Path | None) -> LoadedSplit:
        """The evaluated part; its hash covers the whole file and the split, so any edit misses the cache.

        A field the table names that no row has is a typo in the table, reported once (one row
        lacking a field is that row's item error).
        """
        loaded = self.data()
        for option, name in self.named_fields():
            if name not in loaded.fields:
                close = difflib.get_close_matches(name, loaded.fields, n=1)
                hint = f"did you mean '{close[0]}'? " if close else ""
                raise DatasetError(
                    f"{self.spec.where}.{option}: no row of {self.spec.shown_path} has a field "
                    f"{name!r} (the rows have {', '.join(loaded.fields)}); {hint}fix {option}"
                )
        return LoadedSplit(loaded.eval_rows, loaded.content_hash, str(self.spec.path))

    def named_fields(self) -> list[tuple[str, str]]:
        """(option, field) for every row field the suite's table names."""
        spec = self.spec
        open_ended = spec.scorer is not None and spec.scorer.kind == "open"
        named = [] if open_ended else [("answer_field", spec.answer_field)]  # an open suite has no answers
        if spec.template is None:
            named.append(("question_field", spec.question_field))
        else:
            for _, placeholder, _, _ in string.Formatter().parse(spec.template):
                if placeholder:
                    named.append(("template", re.split(r"[.\[]", placeholder, maxsplit=1)[0]))
        if spec.kind == "multiple_choice" and spec.choices is None:
            named.append(("choices_field", spec.choices_field))
        if spec.group_field is not None:
            named.append(("group_field", spec.group_field))
        return named

    @property  # the train part, known once the file is read
    def fewshot(self) -> FewShotSource | None:  # type: ignore[override]  # a class attribute on other tasks
        """Examples come from the train part, drawn by lm-eval's seeded sampler like the built-in tasks'."""
        if self.spec.split is None:
            return None
        return FewShotSource(None, samples=self.data().train_rows)

    def configured(self, options: TaskOptions) -> Task:
        """A copy with other prompt options; does not read the file (``fewshot`` would)."""
        if options.num_fewshot and self.spec.split is None:
            raise ValueError(
                f"suite {self.name} has no train part to draw few-shot examples from; declare "
                f"split = {{ eval = 0.2 }} in {self.spec.where}, or set num_fewshot = 0"
            )
        # The base class would ask ``fewshot`` (reading the file) about a non-zero num_fewshot: hand it
        # None, then put the number back on the copy it made.
        task = super().configured(dataclasses.replace(options, num_fewshot=None))
        task.options = dataclasses.replace(task.options, num_fewshot=options.num_fewshot)
        return task

    def _line(self, doc: dict[str, Any]) -> str:
        number = self.data().lines.get(id(doc))
        return f"{self.spec.shown_path}:{number}" if number else self.spec.shown_path

    def field_of(self, doc: dict[str, Any], key: str, option: str) -> Any:
        """``doc[key]``, or an error naming the line, the fields the row has, and the option to set."""
        if key in doc:
            return doc[key]
        close = difflib.get_close_matches(key, list(doc), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ValueError(
            f"{self._line(doc)}: no field {key!r} (the row has {', '.join(doc) or 'no fields'}); "
            f"{hint}fix the row or set {option} in {self.spec.where}"
        )

    def group_of(self, doc: dict[str, Any]) -> str:
        """The row's ``group_field`` value (e.g. its category), else the split's name."""
        if self.spec.group_field is None:
            return self.dataset.split
        return _group_id(self.field_of(doc, self.spec.group_field, "group_field"))

    def _safe_group(self, doc: dict[str, Any]) -> str:
        try:
            return self.group_of(doc)
        except ValueError:
            return self.dataset.split

    def doc_ids(self, rows: Sequence[dict[str, Any]]) -> list[int]:
        """Index in the evaluated part, counted within the row's group when the suite has groups."""
        if self.spec.group_field is None:
            return list(range(len(rows)))
        seen: dict[str, int] = {}
        ids = []
        for row in rows:
            group = self._safe_group(row)
            ids.append(seen.get(group, 0))
            seen[group] = ids[-1] + 1
        return ids

    def select(self, rows: Sequence[dict[str, Any]], limit: int | None) -> list[int]:
        """The first ``limit`` rows; with groups, a share of each group in proportion to its size."""
        if limit is None or self.spec.group_field is None:
            return super().select(rows, limit)
        return stratified([self._safe_group(row) for row in rows], limit)

    def description(self, doc: dict[str, Any]) -> str:
        """The suite's description, before the examples."""
        return self.spec.description

    def question(self, doc: dict[str, Any]) -> str:
        """The prompt text of a row: its ``template`` filled from the row, or its question field."""
        if self.spec.template is None:
            value = self.field_of(doc, self.spec.question_field, "question_field")
            if not isinstance(value, str):
                raise ValueError(
                    f"{self._line(doc)}: field {self.spec.question_field!r} is {type(value).__name__}, expected text"
                )
            return value
        try:
            return self.spec.template.format_map(doc)
        except KeyError as error:
            name = error.args[0]
            self.field_of(doc, name, "template")
            raise
        except (IndexError, AttributeError, ValueError) as error:
            raise ValueError(f"{self._line(doc)}: the template does not fit the row: {error}") from None

    def item(self, doc_id: int, doc: dict[str, Any], shots: Sequence[dict[str, Any]] = ()) -> TaskItem:
        """The item, or an item carrying the row's error (naming its line and the option to set)."""
        group = self._safe_group(doc)
        try:
            self.group_of(doc)  # a row without its group field is a bad row, not one of another group
            return self.item_for(doc_id, group, doc, shots)
        except Exception as error:
            text = (
                str(error) if isinstance(error, ValueError) else f"{self._line(doc)}: {type(error).__name__}: {error}"
            )
            return TaskItem(
                self.name, doc_id, group, (), -1, (), error=f"bad data row {doc_id} of suite {self.name}: {text}"
            )


class MultipleChoiceSuite(_Suite, MultipleChoiceTask):
    """A suite scored by the log-likelihood of each choice (acc, acc_norm)."""

    def choices_of(self, doc: dict[str, Any]) -> list[str]:
        """The row's choices (or the suite's fixed ones) as text."""
        if self.spec.choices is not None:
            return list(self.spec.choices)
        value = self.field_of(doc, self.spec.choices_field, "choices_field")
        if not isinstance(value, list) or len(value) < 2 or not all(isinstance(c, (str, int, float)) for c in value):
            raise ValueError(
                f"{self._line(doc)}: field {self.spec.choices_field!r} must be a list of at least "
                f"two texts, got {value!r}"
            )
        return [str(c) for c in value]

    def build(self, doc: dict[str, Any]) -> tuple[str, list[str], int]:
        """(question, choices, gold): the answer is an index, a choice's text, or a letter (A = first)."""
        choices = self.choices_of(doc)
        answer = self.field_of(doc, self.spec.answer_field, "answer_field")
        if isinstance(answer, int) and not isinstance(answer, bool):
            if not 0 <= answer < len(choices):
                raise ValueError(
                    f"{self._line(doc)}: answer index {answer} is outside the {len(choices)} choices "
                    "(indices start at 0)"
                )
            return self.question(doc), choices, answer
        if isinstance(answer, str):
            if answer in choices:
                return self.question(doc), choices, choices.index(answer)
            letter = answer.strip()
            if len(letter) == 1 and "A" <= letter.upper() <= "Z" and ord(letter.upper()) - 65 < len(choices):
                return self.question(doc), choices, ord(letter.upper()) - 65
        raise ValueError(
            f"{self._line(doc)}: answer {answer!r} is neither an index (0 = first), nor the text of a "
            f"choice, nor a letter (A = first); choices: {choices}"
        )


class GenerationSuite(_Suite, GenerationTask):
    """A suite whose answers the model writes; the suite's scorer checks each completion."""

    def reference_of(self, doc: dict[str, Any]) -> Any:
        """The row's answer: a text, a number, or a list of acceptable ones (an open suite may have none)."""
        scorer = self.spec.scorer
        if scorer is not None and scorer.kind == "open" and doc.get(self.spec.answer_field) is None:
            return None
        value = self.field_of(doc, self.spec.answer_field, "answer_field")
        ok = (str, int, float)
        if isinstance(value, bool) or not (
            isinstance(value, ok) or (isinstance(value, list) and value and all(isinstance(v, ok) for v in value))
        ):
            raise ValueError(f"{self._line(doc)}: answer {value!r} must be a text, a number, or a list of them")
        return value

    def build(self, doc: dict[str, Any]) -> tuple[str, Any]:
        """(question, reference answer)."""
        return self.question(doc), self.reference_of(doc)

    def fewshot_pair(self, doc: dict[str, Any]) -> tuple[str, str]:
        """A worked example: the question and its (first) answer."""
        question, reference = self.build(doc)
        return question, str(_references(reference)[0])

    def item_for(self, doc_id: int, group: str, doc: dict[str, Any], shots: Sequence[dict[str, Any]]) -> TaskItem:
        """One generation request; the row rides along for a Python scorer."""
        built = super().item_for(doc_id, group, doc, shots)
        built.extra["row"] = doc
        return built

    def score(self, item: TaskItem, results: Sequence[Any]) -> dict[str, Any]:
        """The completion, what the scorer extracted from it, and the score (builtin types only)."""
        scorer = self.spec.scorer
        assert scorer is not None
        text = completion(results)
        value, extracted = scorer(text, item.extra["reference"], item.extra.get("row", {}))
        record = {"completion": text, "extracted": extracted, "scores": {scorer.metric: value}}
        if scorer.kind == "open":
            record["gold"] = False  # nothing was checked against an answer (judge.py's agreement skips it)
        return record


def completion(results: Sequence[Any]) -> str:
    """The first completion of a generation item's results (one request, a list of completions)."""
    first: Any = results[0] if results else None
    if isinstance(first, (list, tuple)):
        first = first[0] if first else None
    if not isinstance(first, str):
        raise ValueError(f"expected the completions of one generation request, got {list(results)!r}")
    return first


def suite_task(spec: SuiteSpec) -> Task:
    """The Task of a suite: a class of its own, as every task's name and metrics are class attributes."""
    base: type[_Suite] = MultipleChoiceSuite if spec.kind == "multiple_choice" else GenerationSuite
    group = spec.split.eval_value if spec.split is not None and spec.split.eval_value else "eval"
    attributes: dict[str, Any] = {
        "name": spec.name,
        "dataset": DatasetRef(spec.shown_path, None, _group_id(group), spec.name),
        "target_delimiter": spec.target_delimiter,
        "fewshot_delimiter": spec.fewshot_delimiter,
        "default_num_fewshot": spec.num_fewshot,
        "reference": f"custom suite {spec.shown_path}",
        "__doc__": f"Custom suite {spec.name!r} from {spec.shown_path}.",
    }
    if spec.kind == "multiple_choice":
        attributes.update(metrics=("acc", "acc_norm"), default_metric="acc")
    else:
        assert spec.scorer is not None
        attributes.update(
            metrics=(spec.scorer.metric,),
            default_metric=spec.scorer.metric,
            until=spec.until,
            max_gen_toks=spec.max_gen_toks,
        )
    cls = type(f"{base.__name__}_{spec.name}", (base,), attributes)
    return cls(spec)


def suite_tasks(raw: Mapping[str, Any], base: Path, builtin: Mapping[str, Task]) -> dict[str, Task]:
    """The tasks of every ``[tool.llmgate.suites.<name>]`` table in a raw config table."""
    suites = raw.get("suites", {})
    if not isinstance(suites, dict):
        raise SuiteError("[tool.llmgate.suites]", "expected tables [tool.llmgate.suites.<name>]")
    tasks: dict[str, Task] = {}
    for name, table in suites.items():
        if name in builtin:
            raise SuiteError(
                f"[tool.llmgate.suites.{name}]", f"{name!r} is a built-in task; give the suite another name"
            )
        tasks[name] = suite_task(parse_suite(name, table, base))
    return tasks


# --- tasks written in Python ------------------------------------------------------------------


def _overrides(task: Task, method: str, *bases: type) -> bool:
    return all(getattr(type(task), method) is not getattr(b, method) for b in bases)


def check_task(task: Any, origin: str) -> Task:
    """``task`` if it is a usable Task instance, else a SuiteError saying what to fix."""
    where = f"pytest_llmgate_tasks ({origin})"
    if isinstance(task, type) and issubclass(task, Task):
        raise SuiteError(where, f"returned the class {task.__name__}; return an instance: {task.__name__}()")
    if not isinstance(task, Task):
        raise SuiteError(
            "pytest_llmgate_tasks",
            f"a hook returned {task!r}; return Task instances (subclasses of "
            "MultipleChoiceTask or GenerationTask from pytest_llmgate.tasks)",
        )
    kind = type(task).__name__
    name = getattr(task, "name", None)
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise SuiteError(
            where, f"{kind}.name = {name!r}: set name to an identifier such as 'my_task' (it is also a pytest marker)"
        )
    where = f"{where} task {name!r}"
    if not isinstance(getattr(task, "dataset", None), DatasetRef):
        raise SuiteError(
            where,
            "set dataset = DatasetRef(hub_path, hub_name, split, folder): where the rows are "
            "(or override rows() and still name the split there; it is the items' group)",
        )
    metrics = getattr(task, "metrics", None)
    if not isinstance(metrics, tuple) or not metrics or not all(isinstance(m, str) for m in metrics):
        raise SuiteError(where, f"metrics = {metrics!r}: set a tuple of metric names such as ('acc',)")
    if getattr(task, "default_metric", None) not in metrics:
        raise SuiteError(
            where, f"default_metric = {getattr(task, 'default_metric', None)!r} is not one of its metrics {metrics}"
        )
    if isinstance(task, (MultipleChoiceTask, GenerationTask)) and not _overrides(
        task, "build", MultipleChoiceTask, GenerationTask
    ):
        raise SuiteError(where, f"{kind} must implement build(doc)")
    if not isinstance(task, (MultipleChoiceTask, GenerationTask)) and not _overrides(task, "item_for", Task):
        raise SuiteError(where, f"{kind} must implement item_for() (or subclass MultipleChoiceTask / GenerationTask)")
    if not _overrides(task, "score", Task):
        raise SuiteError(where, f"{kind} must implement score(item, results)")
    return task


def _origin(task: Any) -> str:
    """Where a task's class is defined: its file, else its module."""
    cls = task if isinstance(task, type) else type(task)
    try:
        return inspect.getfile(cls)
    except (TypeError, OSError):
        return cls.__module__


def merge_tasks(registry: Mapping[str, Task], contributed: Iterable[Any]) -> dict[str, Task]:
    """``registry`` plus the tasks of ``pytest_llmgate_tasks`` hook results (each a Task or a list of Tasks)."""
    merged = dict(registry)
    for result in contributed:
        if result is None:
            continue
        single = isinstance(result, (Task, type, str)) or not isinstance(result, Iterable)
        for task in [result] if single else list(result):
            checked = check_task(task, _origin(task))
            if checked.name in merged:
                raise SuiteError(
                    f"pytest_llmgate_tasks ({_origin(task)}) task {checked.name!r}",
                    "a task of that name exists already (built-in, a suite, or another plugin's); rename one",
                )
            merged[checked.name] = checked
    return merged

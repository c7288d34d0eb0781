"""What every task is made of: items, requests, prompts with few-shot examples, per-item scoring.

No pytest, no models. Prompts are assembled as lm-evaluation-harness 0.4 assembles them
(``fewshot_context`` and ``build_qa_turn`` in lm_eval/api/task.py): an optional system
instruction and description, then each example as question, target delimiter, answer and
few-shot delimiter, then the evaluated question.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .data import DatasetRef, LoadedSplit, load_split
from .fewshot import DEFAULT_FEWSHOT_SEED, FewShotSource, first_n, replay_default

Chat = tuple[tuple[str, str], ...]  # (role, content) messages, rendered by the model's chat template


@dataclass(frozen=True)
class LoglikelihoodRequest:
    """Score ``continuation`` given ``context``: the model's summed log-probability of it.

    With ``chat`` set, the backend renders those messages with its tokenizer's chat template
    and uses the result as the context (``context`` then holds the plain-text form, for reading).
    """

    context: str
    continuation: str
    chat: Chat | None = None

    def payload(self) -> list[Any]:
        """What identifies the request in the cache key."""
        return (
            [self.context, self.continuation]
            if self.chat is None
            else [self.context, self.continuation, [list(m) for m in self.chat]]
        )


@dataclass(frozen=True)
class GenerationRequest:
    """Generate from ``context`` until one of ``until`` appears or ``max_gen_toks`` tokens.

    ``temperature == 0`` is greedy decoding (one sample). Above 0, ``samples`` completions are
    drawn with that temperature and ``top_p``, from a generator seeded with ``seed``.
    The result of a request is the list of its completions, each cut at the first stop string.
    """

    context: str
    until: tuple[str, ...]
    max_gen_toks: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    samples: int = 1
    seed: int = DEFAULT_FEWSHOT_SEED
    chat: Chat | None = None

    def payload(self) -> list[Any]:
        """What identifies the request in the cache key."""
        return [
            "generate",
            self.context,
            list(self.until),
            self.max_gen_toks,
            self.temperature,
            self.top_p,
            self.samples,
            self.seed,
            None if self.chat is None else [list(m) for m in self.chat],
        ]


Request = LoglikelihoodRequest | GenerationRequest


@dataclass(frozen=True)
class TaskItem:
    """One benchmark item: what to ask every model and how to score the answers.

    ``gold`` is the index of the right choice (-1 for generation tasks, whose references
    are in ``extra``); ``choices`` is empty for generation tasks.
    """

    task: str
    doc_id: int
    group: str
    requests: tuple[Request, ...]
    gold: int
    choices: tuple[str, ...]
    error: str | None = None  # a bad data row: the item's test errors, the rest still run
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def item_id(self) -> str:
        """The readable id, also the pytest parameter id: ``<group>-<doc_id>``."""
        return f"{self.group}-{self.doc_id}"

    @property
    def qualified_id(self) -> str:
        """``<task>/<item_id>``: unique across tasks, the item's name in the cache and the engine."""
        return f"{self.task}/{self.item_id}"

    @property
    def generative(self) -> bool:
        """Whether the item asks the model to generate (rather than to score given text)."""
        return any(isinstance(r, GenerationRequest) for r in self.requests)

    def prompt_hash(self) -> str:
        """Hash of exactly what is sent to the model, part of every cache key."""
        payload = json.dumps([r.payload() for r in self.requests], ensure_ascii=False)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class TaskOptions:
    """How a task's prompts are built; lm-eval's command-line options of the same names.

    ``num_fewshot`` None means the task's own default (lm-eval's task YAML, or the issue's
    choice where lm-eval has none, e.g. MMLU 5-shot). ``fewshot_as_multiturn`` None means
    lm-eval's default: on whenever a chat template is applied (its CLI and simple_evaluate).
    """

    num_fewshot: int | None = None
    fewshot_seed: int = DEFAULT_FEWSHOT_SEED
    apply_chat_template: bool = False
    fewshot_as_multiturn: bool | None = None
    system_instruction: str | None = None

    def resolved(self) -> TaskOptions:
        """These options with ``fewshot_as_multiturn`` decided (so equal prompts have equal options)."""
        if self.fewshot_as_multiturn is not None:
            return self
        return dataclasses.replace(self, fewshot_as_multiturn=self.apply_chat_template)

    def tag(self) -> str:
        """A short stable text for the task version: changed options miss the cache."""
        options = self.resolved()
        return hashlib.sha256(
            json.dumps(
                [
                    options.fewshot_seed,
                    options.apply_chat_template,
                    options.fewshot_as_multiturn,
                    options.system_instruction,
                ]
            ).encode()
        ).hexdigest()[:8]


def maybe_delimit(prefix: str | None, suffix: str | None, delimiter: str = " ") -> str:
    """Join two texts, with ``delimiter`` only if neither has whitespace at the join (lm-eval's rule)."""
    if not prefix:
        return suffix or ""
    if not suffix:
        return prefix
    if prefix[-1].isspace() or suffix[0].isspace():
        return prefix + suffix
    return prefix + delimiter + suffix


@dataclass(frozen=True)
class Prompt:
    """A prompt's parts before rendering: system text, worked examples, the question."""

    system: str
    shots: tuple[tuple[str, str], ...]
    question: str
    target_delimiter: str
    fewshot_delimiter: str

    def text(self) -> str:
        """Plain text: system, then ``q + target delimiter + a + few-shot delimiter`` per example, then q."""
        return (
            self.system
            + "".join(q + self.target_delimiter + a + self.fewshot_delimiter for q, a in self.shots)
            + self.question
        )

    def chat(self, multiturn: bool) -> Chat:
        """Messages for a chat template: one user turn holding everything (lm-eval's default), or
        each example as its own user/assistant pair (``fewshot_as_multiturn``)."""
        messages: list[tuple[str, str]] = [("system", self.system)] if self.system else []
        if multiturn:
            for q, a in self.shots:
                messages += [("user", q), ("assistant", a)]
            messages.append(("user", self.question))
        else:
            body = "".join(q + self.target_delimiter + a + self.fewshot_delimiter for q, a in self.shots)
            messages.append(("user", body + self.question))
        return tuple(messages)


class Task:
    """A benchmark: where its rows are, how a row becomes an item, how an item is scored.

    Subclasses set the class attributes and implement ``item_for`` and ``score``; see
    ``MultipleChoiceTask`` and ``GenerationTask``. Instances are immutable once configured;
    ``configured(options)`` gives a copy with other prompt options.
    """

    name: ClassVar[str]
    dataset: ClassVar[DatasetRef]
    metrics: ClassVar[tuple[str, ...]]
    default_metric: ClassVar[str]
    target_delimiter: ClassVar[str] = " "
    fewshot_delimiter: ClassVar[str] = "\n\n"
    fewshot: ClassVar[FewShotSource | None] = None
    default_num_fewshot: ClassVar[int] = 0
    # lm-eval's YAML pins num_fewshot (its --num_fewshot is ignored): so is the top-level num_fewshot here.
    pins_num_fewshot: ClassVar[bool] = False
    # Bump when prompt building changes: it is part of the task version, so the cache misses.
    format_version: ClassVar[str] = "1"
    reference: ClassVar[str] = ""

    options: TaskOptions = TaskOptions()

    def configured(self, options: TaskOptions) -> Task:
        """A copy of this task that builds its prompts with ``options``."""
        if options.num_fewshot and self.fewshot is None:
            raise ValueError(f"task {self.name} has no few-shot examples to draw from; set num_fewshot = 0")
        task = copy.copy(self)
        task.options = options.resolved()
        return task

    @property
    def num_fewshot(self) -> int:
        """The number of worked examples in each prompt."""
        return self.default_num_fewshot if self.options.num_fewshot is None else self.options.num_fewshot

    # --- rows -------------------------------------------------------------------------------
    def group_of(self, doc: dict[str, Any]) -> str:
        """The id's group part: the split name unless a task has subjects."""
        return self.dataset.split

    def rows(self, data_dir: Path | None) -> LoadedSplit:
        """The evaluation split's rows: from ``data_dir`` in the hub's schema, else the hub."""
        return load_split(self.dataset, data_dir)

    def select(self, rows: Sequence[dict[str, Any]], limit: int | None) -> list[int]:
        """Indices of the rows to evaluate: the first ``limit`` (lm-eval's ``--limit``)."""
        return list(range(len(rows) if limit is None else min(limit, len(rows))))

    def doc_ids(self, rows: Sequence[dict[str, Any]]) -> list[int]:
        """Each row's doc id: its index in the split (tasks with subjects count within the subject)."""
        return list(range(len(rows)))

    def load(self, data_dir: Path | None, limit: int | None = None) -> tuple[list[TaskItem], str]:
        """Items of the evaluation split (``select``-ed by ``limit``) and the task version."""
        loaded = self.rows(data_dir)
        chosen = self.select(loaded.rows, limit)
        shots, shots_hash = self._shots(loaded.rows, chosen, data_dir)
        doc_ids = self.doc_ids(loaded.rows)
        version = f"{self.name}/v{self.format_version}/{loaded.content_hash}/{self.num_fewshot}shot"
        if self.num_fewshot:
            version += f"-{shots_hash}"
        if self.options.resolved() != TaskOptions(num_fewshot=self.options.num_fewshot).resolved():
            version += f"/{self.options.tag()}"
        return [self.item(doc_ids[i], loaded.rows[i], shots.get(i, ())) for i in chosen], version

    def _shots(
        self, rows: Sequence[dict[str, Any]], chosen: list[int], data_dir: Path | None
    ) -> tuple[dict[int, tuple[dict[str, Any], ...]], str]:
        """The worked examples of each chosen row, and a hash of the pool they come from."""
        n = self.num_fewshot
        if n == 0 or not chosen:
            return {}, ""
        source = self.fewshot
        assert source is not None  # configured() refuses few-shot for tasks without a source
        if source.split is None:
            pool: Sequence[dict[str, Any]] = source.samples
            pool_hash = hashlib.sha256(json.dumps(source.samples, sort_keys=True).encode()).hexdigest()[:8]
        else:
            loaded = load_split(source.split, data_dir)
            pool, pool_hash = loaded.rows, loaded.content_hash[:8]
        if source.sampler == "first_n":
            shots = {}
            for i in chosen:
                own = self.fewshot_pool(pool, rows[i])
                shots[i] = tuple(own[j] for j in first_n(own, n, rows[i] if source.exclude_eval_doc else None))
            return shots, pool_hash
        drawn = replay_default(
            pool, rows[: max(chosen) + 1], n, seed=self.options.fewshot_seed, exclude_eval_doc=source.exclude_eval_doc
        )
        return {i: tuple(pool[j] for j in drawn[i]) for i in chosen}, pool_hash

    def fewshot_pool(self, pool: Sequence[dict[str, Any]], doc: dict[str, Any]) -> Sequence[dict[str, Any]]:
        """The examples a row may draw from (MMLU narrows them to the row's subject)."""
        return pool

    # --- prompts ----------------------------------------------------------------------------
    def description(self, doc: dict[str, Any]) -> str:
        """Text before the examples (lm-eval's ``description``), e.g. MMLU's subject line."""
        return ""

    def fewshot_pair(self, doc: dict[str, Any]) -> tuple[str, str]:
        """(question, answer) of a row used as a worked example."""
        raise NotImplementedError

    def prompt(self, doc: dict[str, Any], shots: Sequence[dict[str, Any]], question: str) -> Prompt:
        """The prompt of ``doc``: system text, its examples, then ``question``."""
        system = maybe_delimit(self.options.system_instruction, self.description(doc), self.fewshot_delimiter)
        return Prompt(
            system, tuple(self.fewshot_pair(s) for s in shots), question, self.target_delimiter, self.fewshot_delimiter
        )

    def render(self, prompt: Prompt) -> tuple[str, Chat | None]:
        """(plain text, chat messages or None) as the options ask."""
        if not self.options.apply_chat_template:
            return prompt.text(), None
        return prompt.text(), prompt.chat(bool(self.options.resolved().fewshot_as_multiturn))

    # --- items and scores -------------------------------------------------------------------
    def item(self, doc_id: int, doc: dict[str, Any], shots: Sequence[dict[str, Any]] = ()) -> TaskItem:
        """One TaskItem; a row that cannot be built becomes an item carrying the error."""
        try:
            group = self.group_of(doc)
        except Exception:
            group = self.dataset.split
        try:
            return self.item_for(doc_id, group, doc, shots)
        except Exception as error:
            return TaskItem(
                self.name,
                doc_id,
                group,
                (),
                -1,
                (),
                error=f"bad data row {doc_id} of {self.dataset.hub_path}: {type(error).__name__}: {error}",
            )

    def item_for(self, doc_id: int, group: str, doc: dict[str, Any], shots: Sequence[dict[str, Any]]) -> TaskItem:
        """Build the item of a row; raise on a bad row (``item`` turns that into an item error)."""
        raise NotImplementedError

    def score(self, item: TaskItem, results: Sequence[Any]) -> dict[str, Any]:
        """Per-side record from the model's raw results: what it answered, and ``scores`` per metric."""
        raise NotImplementedError

    def chance(self, item: TaskItem) -> float:
        """Expected score of a uniform random guess on this item (0 for open answers)."""
        return 0.0


class MultipleChoiceTask(Task):
    """A log-likelihood multiple-choice task scored like lm-evaluation-harness 0.4.

    ``acc`` picks the choice with the highest summed log-likelihood; ``acc_norm`` divides each
    by the choice's length in characters (lm-eval's behaviour, not bytes or tokens).
    Ties go to the first choice, as numpy's argmax does in lm-eval.
    """

    metrics: ClassVar[tuple[str, ...]] = ("acc", "acc_norm")
    default_metric: ClassVar[str] = "acc_norm"

    def build(self, doc: dict[str, Any]) -> tuple[str, list[str], int]:
        """(question text, choice texts, gold index) for one row."""
        raise NotImplementedError

    def fewshot_pair(self, doc: dict[str, Any]) -> tuple[str, str]:
        """A worked example: the question, and the text of its gold choice."""
        question, choices, gold = self.build(doc)
        return question, choices[gold]

    def item_for(self, doc_id: int, group: str, doc: dict[str, Any], shots: Sequence[dict[str, Any]]) -> TaskItem:
        """One log-likelihood request per choice."""
        question, choices, gold = self.build(doc)
        if not choices or not 0 <= gold < len(choices):
            raise ValueError(f"gold index {gold} outside the {len(choices)} choices")
        requests = self.requests_for(doc, shots, question, choices)
        return TaskItem(self.name, doc_id, group, requests, gold, tuple(choices))

    def continuation_delimiter(self) -> str:
        """Between context and choice: the target delimiter, or nothing after a chat template's
        generation prompt (lm-eval's construct_requests does the same)."""
        return "" if self.options.apply_chat_template else self.target_delimiter

    def requests_for(
        self, doc: dict[str, Any], shots: Sequence[dict[str, Any]], question: str, choices: list[str]
    ) -> tuple[LoglikelihoodRequest, ...]:
        """One request per choice: the choice, after the target delimiter, continues the prompt."""
        context, chat = self.render(self.prompt(doc, shots, question))
        delimiter = self.continuation_delimiter()
        return tuple(LoglikelihoodRequest(context, delimiter + c, chat) for c in choices)

    def score(self, item: TaskItem, results: Sequence[Any]) -> dict[str, Any]:
        """Per-side record from per-choice (loglikelihood, is_greedy) pairs: raw values, predictions, scores."""
        lls = [float(r[0]) for r in results]
        if len(lls) != len(item.choices) or any(math.isnan(v) for v in lls):
            raise ValueError(
                f"{item.task} {item.item_id}: the model returned {len(lls)} log-likelihoods "
                f"for {len(item.choices)} choices (or NaN): {lls}"
            )
        normed = [ll / len(choice) if choice else ll for ll, choice in zip(lls, item.choices, strict=True)]
        prediction = max(range(len(lls)), key=lambda i: (lls[i], -i))
        prediction_norm = max(range(len(normed)), key=lambda i: (normed[i], -i))
        return {
            "loglikelihoods": lls,
            "is_greedy": [bool(r[1]) for r in results],
            "prediction": prediction,
            "prediction_norm": prediction_norm,
            "scores": {
                name: value
                for name, value in (
                    ("acc", 1.0 if prediction == item.gold else 0.0),
                    ("acc_norm", 1.0 if prediction_norm == item.gold else 0.0),
                )
                if name in self.metrics
            },
        }

    def chance(self, item: TaskItem) -> float:
        """Expected score of a uniform random guess on this item."""
        return 1.0 / len(item.choices) if item.choices else 0.0


class GenerationTask(Task):
    """A task whose items ask the model to generate text, scored from the completions.

    Subclasses implement ``build`` (question and reference answer) and ``score``; the result
    of the one request of an item is the list of its completions (one for greedy decoding).
    """

    until: ClassVar[tuple[str, ...]] = ()
    max_gen_toks: ClassVar[int] = 256  # lm-eval HFLM's default max_gen_toks
    temperature: ClassVar[float] = 0.0
    top_p: ClassVar[float] = 1.0
    samples: ClassVar[int] = 1
    supports_repeats: ClassVar[bool] = True  # ``repeats = N`` (tasks/repeats.py): one answer per item to repeat

    def answer(self, record: dict[str, Any], metric: str) -> str:
        """The answer ``metric`` compares in a scored record (repeats vote on it): what the scorer extracted,
        else the completion, stripped."""
        value = record.get("extracted", record.get("completion", ""))
        return str(value).strip()

    def build(self, doc: dict[str, Any]) -> tuple[str, Any]:
        """(question text, reference answer) for one row."""
        raise NotImplementedError

    def generation_request(self, context: str, chat: Chat | None) -> GenerationRequest:
        """The request for one prompt, with the task's stop strings and sampling settings."""
        return GenerationRequest(
            context,
            tuple(self.until),
            self.max_gen_toks,
            self.temperature,
            self.top_p,
            self.samples,
            DEFAULT_FEWSHOT_SEED,
            chat,
        )

    def item_for(self, doc_id: int, group: str, doc: dict[str, Any], shots: Sequence[dict[str, Any]]) -> TaskItem:
        """One generation request; the reference rides in ``extra['reference']``."""
        question, reference = self.build(doc)
        context, chat = self.render(self.prompt(doc, shots, question))
        return TaskItem(
            self.name, doc_id, group, (self.generation_request(context, chat),), -1, (), extra={"reference": reference}
        )

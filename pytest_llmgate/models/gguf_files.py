"""GGUF files of a compression ladder, written offline from one GGUF source: ``transform = { method = "gguf" }``.

A quantized source (the shipped SmolLM2 is Q4_1) is first dequantized into a float GGUF with the ``gguf``
package (its block formats' reference dequantizers); llama.cpp's own quantizer (``llama_model_quantize``,
exposed by llama-cpp-python) then writes the requested type from that float file, as ``llama-quantize``
would. Files are kept under ``<work dir>/gguf/<first 16 hex of the source's sha256>/<TYPE>.gguf``, so a
changed source gets new files and a second run reuses them. Beside each file, ``<TYPE>.json`` records
what the quantizer really wrote: the tensor types, the bits per weight, and the tensors that fell back to
another type (llama.cpp's K-quants need rows that are a multiple of 256 values; SmolLM2-135M's are 576
wide, so most of its tensors fall back to Q5_0/Q4_0/Q8_0 and a "Q4_K_M" file is larger than expected).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import ModelLoadError, file_sha256

log = logging.getLogger("pytest_llmgate")

FLOAT_TYPES = ("F32", "F16", "BF16")
K_QUANT_BLOCK = 256  # values per block of llama.cpp's K-quants (Q2_K ... Q6_K)


@dataclass(frozen=True)
class GgufFile:
    """A GGUF file written for a model, and what to tell the user about it."""

    path: Path
    summary: dict[str, Any] = field(default_factory=dict)  # tensor types, bits per weight, fallbacks
    notes: tuple[str, ...] = ()


def _file_type(kind: str) -> int:
    from gguf import LlamaFileType

    return int(LlamaFileType.ALL_F32 if kind == "F32" else LlamaFileType[f"MOSTLY_{kind}"])


def _source_type(reader: Any) -> str | None:
    """The source's file type name (e.g. 'Q4_1', 'F16'), or None when it does not declare one."""
    from gguf import LlamaFileType

    found = reader.fields.get("general.file_type")
    if found is None:
        return None
    value = int(found.contents())
    name = LlamaFileType(value).name if value in LlamaFileType._value2member_map_ else None
    return None if name is None else name.removeprefix("MOSTLY_").replace("ALL_F32", "F32")


@dataclass(frozen=True)
class GgufTensor:
    """One tensor's entry in a GGUF header."""

    name: str
    shape: tuple[int, ...]  # GGUF order: the row width first
    type: str  # e.g. 'Q8_0', 'F16'
    n_elements: int
    n_bytes: int


@dataclass(frozen=True)
class GgufHeader:
    """What a GGUF file declares: its file type (see :func:`_source_type`) and its tensors."""

    file_type: str | None
    tensors: tuple[GgufTensor, ...]


# Headers read in this process, by (path, size, modification time). The gguf package parses every metadata
# field to read one (a vocabulary of 49k tokens: about 2.6 s), and a cold ladder run needs each file's header
# several times (its source's type, the summaries, the size figures).
_HEADERS: dict[tuple[str, int, int], GgufHeader] = {}


def gguf_header(path: Path) -> GgufHeader:
    """``path``'s header, read once per process and file version (errors are the gguf package's)."""
    from gguf import GGUFReader

    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HEADERS:
        reader = GGUFReader(path)
        tensors = tuple(
            GgufTensor(t.name, tuple(int(n) for n in t.shape), t.tensor_type.name, int(t.n_elements), int(t.n_bytes))
            for t in reader.tensors
        )
        _HEADERS[key] = GgufHeader(_source_type(reader), tensors)
    return _HEADERS[key]


def _declared_type(source: Path) -> str | None:
    """``source``'s declared file type, or a load error naming the file when it is not a readable GGUF file."""
    try:
        return gguf_header(source).file_type
    except Exception as error:
        raise ModelLoadError(f"{source} is not a readable GGUF file: {type(error).__name__}: {error}") from None


def write_float_gguf(source: Path, destination: Path, kind: str = "F16") -> None:
    """Dequantize every tensor of ``source`` and write it as a float GGUF (2-D tensors in ``kind``, 1-D in F32),
    with every metadata field of the source but the file type."""
    import numpy as np
    from gguf import GGUFReader, GGUFValueType, GGUFWriter, quants

    reader = GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(str(destination), arch)  # writes general.architecture itself
    for key, value in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue  # GGUF.version / tensor_count / kv_count are the reader's pseudo-fields
        kind_of = value.types[0]
        writer.add_key_value(
            key, value.contents(), kind_of, sub_type=value.types[-1] if kind_of == GGUFValueType.ARRAY else None
        )
    writer.add_file_type(_file_type(kind))
    dtype = {"F16": np.float16, "F32": np.float32}[kind]
    for tensor in reader.tensors:
        data = quants.dequantize(tensor.data, tensor.tensor_type)  # float32, numpy order (GGUF's reversed)
        data = data.reshape(tuple(int(n) for n in reversed(tensor.shape)))
        writer.add_tensor(tensor.name, data.astype(dtype if data.ndim >= 2 else np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def summarize(path: Path, requested: str) -> dict[str, Any]:
    """What a GGUF file holds: tensor types and counts, parameters, bits per weight, and the tensors that did
    not get the requested K-quant because their rows are not a multiple of 256 values."""
    types: Counter[str] = Counter()
    params = 0
    tensor_bytes = 0
    fallback: Counter[str] = Counter()
    widths: set[int] = set()
    for tensor in gguf_header(path).tensors:
        name = tensor.type
        types[name] += 1
        params += tensor.n_elements
        tensor_bytes += tensor.n_bytes
        narrow = len(tensor.shape) >= 2 and tensor.shape[0] % K_QUANT_BLOCK != 0
        if "_K" in requested and narrow and name not in FLOAT_TYPES and "_K" not in name:
            fallback[name] += 1
            widths.add(tensor.shape[0])
    return {
        "type": requested,
        "tensor_types": dict(sorted(types.items())),
        "parameters": params,
        "file_bytes": path.stat().st_size,
        "bits_per_weight": round(8 * tensor_bytes / params, 3) if params else None,
        "fallback_tensors": dict(sorted(fallback.items())),
        "fallback_row_widths": sorted(widths),
    }


def _notes(summary: dict[str, Any]) -> tuple[str, ...]:
    fallback = summary["fallback_tensors"]
    if not fallback:
        return ()
    count = sum(fallback.values())
    total = sum(n for t, n in summary["tensor_types"].items() if t not in FLOAT_TYPES)
    return (
        f"GGUF {summary['type']}: {count} of {total} quantized tensors fell back to "
        f"{', '.join(f'{t} ({n})' for t, n in fallback.items())} because their rows "
        f"({', '.join(map(str, summary['fallback_row_widths']))} values) are not a multiple of {K_QUANT_BLOCK}; "
        f"the file has {summary['bits_per_weight']} bits per weight",
    )


def _quantize(source: Path, destination: Path, kind: str, threads: int) -> None:
    """llama.cpp's quantizer: ``source`` (a float GGUF) to ``destination`` of type ``kind``."""
    from .llama_cpp_backend import import_llama_cpp

    llama_cpp = import_llama_cpp()
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # its per-tensor log otherwise floods stderr
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = _file_type(kind)
    params.nthread = threads
    code = llama_cpp.llama_model_quantize(str(source).encode(), str(destination).encode(), ctypes.byref(params))
    if code != 0:
        destination.unlink(missing_ok=True)  # it leaves a partial file behind
        raise ModelLoadError(f"llama.cpp could not quantize {source} to {kind} (llama_model_quantize returned {code})")


def _atomic(destination: Path, write: Any) -> None:
    """Write through a temporary file beside ``destination``: two xdist workers may build the same file."""
    temporary = destination.with_name(f".{destination.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        os.replace(temporary, destination)
    finally:
        temporary.unlink(missing_ok=True)


def quantized_gguf(source: Path, kind: str, work_dir: Path, *, threads: int | None = None) -> GgufFile:
    """The GGUF file of type ``kind`` made from ``source`` (built once, then reused from ``work_dir``)."""
    kind = kind.upper()
    folder = work_dir / "gguf" / file_sha256(source)[:16]
    target = folder / f"{kind}.gguf"
    about = folder / f"{kind}.json"
    if target.is_file() and about.is_file():
        summary = json.loads(about.read_text())
        return GgufFile(target, summary, _notes(summary))
    folder.mkdir(parents=True, exist_ok=True)
    source_type = _declared_type(source)
    threads = threads or os.cpu_count() or 1
    if source_type == kind:  # nothing to do: the source is that file
        summary = summarize(source, kind)
        return GgufFile(source, summary, _notes(summary))
    if source_type in FLOAT_TYPES:
        float_source = source
    else:
        # A quantized source: dequantize once into F16 (or F32 when asked for), the quantizer's input.
        float_kind = "F32" if kind == "F32" else "F16"
        float_source = folder / f"{float_kind}.gguf"
        if not float_source.is_file():
            log.info("writing %s from %s (dequantized with the gguf package)", float_source, source)
            _atomic(float_source, lambda t: write_float_gguf(source, t, float_kind))
            _write_summary(folder, float_kind, summarize(float_source, float_kind), source, source_type)
            if target == float_source:
                return GgufFile(target, *_summary_and_notes(folder, kind))
    if not target.is_file():
        log.info("quantizing %s to %s with llama.cpp", float_source, kind)
        _atomic(target, lambda t: _quantize(float_source, t, kind, threads))
    _write_summary(folder, kind, summarize(target, kind), source, source_type)
    return GgufFile(target, *_summary_and_notes(folder, kind))


def _write_summary(folder: Path, kind: str, summary: dict[str, Any], source: Path, source_type: str | None) -> None:
    """``<kind>.json`` beside the file: its summary and the source it was made from."""
    summary["source"] = {"file": source.name, "type": source_type}
    _atomic(folder / f"{kind}.json", lambda t: t.write_text(json.dumps(summary, indent=1)))


def _summary_and_notes(folder: Path, kind: str) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The summary written beside the ``kind`` file, and the notes it gives the user."""
    summary = json.loads((folder / f"{kind}.json").read_text())
    return summary, _notes(summary)

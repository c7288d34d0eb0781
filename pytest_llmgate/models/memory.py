"""A model's peak memory: CUDA's peak allocation on a GPU, the growth of this process's peak RSS on a CPU.

On Linux the peak resident set (``VmHWM``) can be reset (``/proc/self/clear_refs``, value 5), so each model's
load and each probe is measured from its own start: peak minus what was resident before. Elsewhere the peak
cannot be reset, and the figure is the growth of the current RSS (labelled so). Weights that llama.cpp maps
from the file count once touched, as they do for the operating system.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import resource
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")

# glibc's mallopt parameters (malloc.h) and the values a CPU model runs with (``keep_freed_memory``).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's largest: blocks up to it come from the heap
TRIM_THRESHOLD_BYTES = 1 << 30  # freed heap kept up to this (memory meters release it before they measure)
# The environment's own say over glibc's allocator: with any of these set, it is left as the user set it.
_MALLOC_ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "LD_PRELOAD")
_kept: bool | None = None


@functools.cache
def _glibc() -> Any:
    """The C library when it is glibc (it has ``mallopt`` and ``malloc_trim``), else None; looked up once."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return None
        libc = ctypes.CDLL(None)  # the process's own symbols: the C library it runs on
        libc.mallopt.argtypes, libc.malloc_trim.argtypes = [ctypes.c_int, ctypes.c_int], [ctypes.c_size_t]
    except (OSError, AttributeError, ValueError):
        return None
    return libc


def keep_freed_memory() -> bool:
    """Let freed tensor memory be reused instead of returned to the system and faulted in again (glibc).

    glibc serves each block above its mmap threshold (128 KiB at first) with a fresh mapping and unmaps it on
    free, and returns the top of its heap above the trim threshold: a forward pass of a small model on the CPU
    allocates tensors of a few to tens of MB per layer, and every one of their pages is faulted in and zeroed
    again on every pass (SmolLM2-135M, 2,048 tokens a pass: about 380,000 page faults, 15-20% of the pass's
    time). With blocks up to 32 MiB on the heap and the heap kept, the same pass takes none (whole 0-shot runs:
    25-40% less wall time, a peak resident set 120-170 MiB higher, freed blocks being kept for reuse). Not done
    when the environment configures the allocator (``_MALLOC_ENVIRONMENT``, ``GLIBC_TUNABLES`` with a malloc
    tunable), nor where the C library is not glibc. Idempotent; whether it is in effect."""
    global _kept
    if _kept is None:
        tunables = os.environ.get("GLIBC_TUNABLES", "")
        libc = None if any(os.environ.get(v) for v in _MALLOC_ENVIRONMENT) or "malloc" in tunables else _glibc()
        _kept = bool(
            libc is not None
            and libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
            and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
        )
    return _kept


def release_freed_memory() -> None:
    """Return the freed memory ``keep_freed_memory`` keeps to the system, so that a measurement of resident
    memory starts from what is in use (a no-op when it is not in effect)."""
    if _kept:
        libc = _glibc()
        if libc is not None:
            libc.malloc_trim(0)


def _status_kb(field: str) -> int | None:
    try:
        text = _STATUS.read_text()
    except OSError:
        return None
    found = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(found.group(1)) if found else None


def rss_bytes() -> int:
    """This process's resident set now."""
    kb = _status_kb("VmRSS")
    if kb is not None:
        return kb * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # no /proc: the peak is the best there is
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak_rss() -> bool:
    """Reset the peak resident set to the current one (Linux); False where that cannot be done."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _status_kb("VmHWM") is not None


def peak_rss_bytes() -> int | None:
    """The peak resident set since the last reset (Linux), else None."""
    kb = _status_kb("VmHWM")
    return None if kb is None else kb * 1024


@dataclass
class MemoryMeter:
    """Measures the memory that one piece of work (loading a model, a probe) adds, on ``device``."""

    device: str
    _before: int = 0
    _peak_resettable: bool = False
    _torch: Any = None

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def start(self) -> MemoryMeter:
        if self.cuda:
            import torch

            self._torch = torch
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = int(torch.cuda.memory_allocated(self.device))
        else:
            release_freed_memory()
            self._peak_resettable = reset_peak_rss()
            self._before = rss_bytes()
        return self

    def stop(self) -> dict[str, Any]:
        """``peak_memory_mb`` (megabytes, 10**6 bytes) added above the start, and how it was measured."""
        if self.cuda:
            torch = self._torch
            torch.cuda.synchronize(self.device)
            peak = int(torch.cuda.max_memory_allocated(self.device))
            return {
                "peak_memory_mb": round((peak - self._before) / 1e6, 1),
                "resident_mb": round((int(torch.cuda.memory_allocated(self.device)) - self._before) / 1e6, 1),
                "memory_kind": "cuda max_memory_allocated",
            }
        now = rss_bytes()
        hwm = peak_rss_bytes() if self._peak_resettable else None
        highest = max(hwm or now, now)
        return {
            "peak_memory_mb": round((highest - self._before) / 1e6, 1),
            "resident_mb": round((now - self._before) / 1e6, 1),
            "memory_kind": "peak RSS growth" if hwm is not None else "RSS growth (peak not resettable here)",
        }


def merge_memory(*figures: dict[str, Any] | None) -> dict[str, Any] | None:
    """The largest peak of several measurements of one model (its load, its probe rounds, several workers)."""
    present = [f for f in figures if f and f.get("peak_memory_mb") is not None]
    if not present:
        return None
    return dict(max(present, key=lambda f: f["peak_memory_mb"]))


def cpu_name() -> str:
    """The processor's model name (Linux /proc/cpuinfo), else the platform's word for it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1

"""How many rows (and tokens) go through the model per forward pass, backing off on out-of-memory.

``batch_size = "auto"`` (the default) starts large on a GPU and halves the batch whenever a pass
runs out of memory, then keeps the size that fitted for the rest of the run; on the CPU it starts at
sizes that keep memory modest (:data:`CPU_ROWS`, :data:`CPU_TOKENS`). A fixed ``batch_size = N``
caps the rows per pass at N and backs off the same way rather than failing.

A failed pass is simply run again in smaller pieces: every row is computed from the same tokens,
so backing off changes results only by the rounding of a differently shaped matrix product.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

log = logging.getLogger("pytest_llmgate")

CPU_ROWS, CPU_TOKENS = 64, 2048
# Generation holds each row's cache for up to max_gen_toks steps: on the CPU, rows of a decoding batch
# share every step's weight reads, so it gets a larger budget than a log-likelihood pass. With rows joining the
# running batch (continuous batching) the budget bounds the cache's buffers (columns plus reserved room); measured
# on SmolLM2 float32, GSM8K 5-shot / CoT 8-shot, 30 items: 16384 tokens 70 / 34 s at 2.38 / 2.33 GB peak,
# 10240 tokens 75 / 42 s at 1.80 / 1.88 GB (the target: the model + 1.5 GB), 8192 tokens 80 / 47 s at 1.73 / 1.76 GB.
CPU_GENERATION_TOKENS = 10240
GPU_ROWS, GPU_TOKENS = 512, 1 << 18

T = TypeVar("T")
R = TypeVar("R")


class OutOfMemory(RuntimeError):
    """A single row does not fit on the device; the message says what to change."""


def is_out_of_memory(error: BaseException) -> bool:
    """True for torch's out-of-memory errors (CUDA, MPS, and the CPU allocator's)."""
    import torch

    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(error, oom_type):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


class BatchSizer:
    """The current rows-per-pass and tokens-per-pass limits of one backend."""

    def __init__(self, batch_size: int | str, device: str, *, cpu_tokens: int = CPU_TOKENS) -> None:
        self.device = device
        gpu = device.startswith("cuda")
        self.rows: int
        self.tokens: int | None  # tokens per batch; None: no limit
        if batch_size == "auto":
            self.rows, self.tokens = (GPU_ROWS, GPU_TOKENS) if gpu else (CPU_ROWS, cpu_tokens)
        else:
            self.rows, self.tokens = int(batch_size), None
        # Tokens per forward pass inside a batch that holds more (generation's prefill); None: no limit.
        self.pass_tokens: int | None = None if gpu else CPU_TOKENS
        self.backoffs = 0

    def take(self, widths: Sequence[int]) -> int:
        """How many of the next rows (their token widths, widest first) to put in one pass."""
        count = min(len(widths), self.rows)
        if self.tokens is not None:
            count = min(count, max(1, self.tokens // max(1, widths[0])))
        return max(1, count)

    def shrink(self, rows_tried: int, width: int, error: BaseException) -> None:
        """Halve the limits after ``rows_tried`` rows of ``width`` tokens ran out of memory."""
        if rows_tried <= 1:
            raise OutOfMemory(
                f"out of memory on {self.device} with a single sequence of {width} tokens; lower the model's "
                "max_length, use dtype = 'bfloat16', or a device with more memory"
            ) from error
        self.rows = max(1, rows_tried // 2)
        if self.tokens is not None:
            self.tokens = max(1, min(self.tokens, rows_tried * width) // 2)
        self.backoffs += 1
        log.warning(
            "out of memory with %d rows of %d tokens on %s; retrying with %d rows per pass",
            rows_tried,
            width,
            self.device,
            self.rows,
        )
        _free(self.device)

    def run(self, items: Sequence[T], width: Callable[[T], int], step: Callable[[Sequence[T]], Sequence[R]]) -> list[R]:
        """``step`` over consecutive batches of ``items`` (sorted widest first), results in item order.

        A batch that runs out of memory is retried in halves until it fits; sizes that fitted are kept.
        """
        results: list[R] = []
        start = 0
        while start < len(items):
            count = self.take([width(x) for x in items[start : start + self.rows]])
            batch = items[start : start + count]
            try:
                out = step(batch)
            except Exception as error:
                if not is_out_of_memory(error):
                    raise
                self.shrink(count, width(batch[0]), error)
                continue
            results.extend(out)
            start += count
        return results


def _free(device: str) -> None:
    import gc

    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()

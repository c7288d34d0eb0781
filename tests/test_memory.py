"""The CPU allocator setting (``memory.keep_freed_memory``): freed tensor memory is reused instead of being faulted in
again, the environment's own allocator settings win, and the memory meters still see what a piece of work adds.

Each check runs in a fresh process: the setting is process-wide, and this process's earlier tests have set it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT

pytest.importorskip("torch")

OPT_OUT = {"MALLOC_TOP_PAD_": "131072"}  # glibc's own default value: the allocator configured by the environment


def fresh(script: str, env: dict[str, str] | None = None) -> dict:
    """``script`` (its last printed line is JSON) in a fresh Python process; that JSON."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=600,
                          cwd=ROOT, env={**environment, "PYTHONPATH": str(ROOT), **(env or {})})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


BLOCKS = """
    import json, resource, torch
    from pytest_llmgate.models.memory import keep_freed_memory

    def faults():
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(5):
            blocks = [torch.ones(4 << 20) for _ in range(4)]  # 16 MiB each, every page written
            del blocks
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start

    faults()
    before = faults()
    kept = keep_freed_memory()
    faults()
    print(json.dumps({"before": before, "kept": kept, "after": faults()}))
"""


@pytest.mark.skipif(not hasattr(os, "confstr") or not os.confstr("CS_GNU_LIBC_VERSION"), reason="glibc only")
def test_freed_blocks_are_reused_instead_of_faulted_in_again() -> None:
    pages = 5 * 4 * (16 << 20) // os.sysconf("SC_PAGE_SIZE")
    result = fresh(BLOCKS)
    assert result["before"] >= pages * 0.9  # glibc's default: every block mapped afresh and every page faulted in
    assert result["kept"] is True
    assert result["after"] < pages * 0.01


def test_the_environment_s_allocator_settings_are_left_alone() -> None:
    result = fresh(BLOCKS, OPT_OUT)
    assert result["kept"] is False
    assert result["after"] >= result["before"] * 0.9


def test_the_memory_meter_sees_an_allocation_that_freed_memory_could_have_held() -> None:
    # 300 MB freed and kept on the heap, then 100 MB allocated under the meter: without releasing the kept memory
    # first, the new block would reuse it and the meter would see no growth at all.
    result = fresh("""
        import json, torch
        from pytest_llmgate.models.memory import MemoryMeter, keep_freed_memory
        assert keep_freed_memory()
        blocks = [torch.ones(6 << 20) for _ in range(12)]  # 24 MiB each
        del blocks
        meter = MemoryMeter("cpu").start()
        blocks = [torch.ones(6 << 20) for _ in range(4)]
        print(json.dumps(meter.stop()))
    """)
    assert result["peak_memory_mb"] >= 90 and result["memory_kind"] == "peak RSS growth"


SCORING = """
    import json, resource
    from pathlib import Path
    from pytest_llmgate.config import ModelSpec
    from pytest_llmgate.models import load_backend, memory
    from pytest_llmgate.tasks.base import LoglikelihoodRequest
    backend = load_backend(ModelSpec(name="smollm2"), device="cpu", work_dir=Path({work!r}), fingerprint="f",
                           dequantized_dir=Path({root!r}))
    words = "the quick brown fox jumps over the lazy dog while the cat sleeps by the warm fire ".split()
    requests = [LoglikelihoodRequest(" ".join(words[i % 7 :] * 6), " " + words[i % 11]) for i in range(48)]
    first = backend.loglikelihood(requests)
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    second = backend.loglikelihood(requests)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start
    print(json.dumps({{"kept": memory.keep_freed_memory(), "faults": faults, "same": first == second,
                      "scores": [s for s, _ in second]}}))
"""


@pytest.mark.skipif(not hasattr(os, "confstr") or not os.confstr("CS_GNU_LIBC_VERSION"), reason="glibc only")
def test_a_cpu_backend_scores_without_faulting_pages_in(dequantized_dir: Path, tmp_path: Path) -> None:
    """The default model on the CPU: a second scoring call faults (next to) no page in; with the allocator left to
    the environment, the same call faults in hundreds of MB; the scores are the same bits either way."""
    script = SCORING.format(work=str(tmp_path), root=str(dequantized_dir))
    kept, system = fresh(script), fresh(script, OPT_OUT)
    assert kept["kept"] is True and system["kept"] is False
    assert system["faults"] > 20_000
    assert kept["faults"] < system["faults"] / 20
    assert kept["same"] and system["same"]
    assert kept["scores"] == system["scores"]

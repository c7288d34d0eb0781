"""The serving probe: speed and memory of each model of a run, timed by pytest-benchmark, read by the gate.

A test that takes the ``llmgate_probe`` fixture and pytest-benchmark's ``benchmark`` and calls
``llmgate_probe.run(benchmark)`` is parametrized here with one case per model and measurement (see
docs/efficiency.md). pytest-benchmark runs the rounds and keeps their timings (calibration aside, its
``--benchmark-autosave``, ``--benchmark-compare``, ``--benchmark-json`` all apply); this plugin reads each case's
round timings from the fixture after the test, sends them to the controller on the call report (as outcomes
travel), and turns them into each model's ``speed`` figures and each stage's ratios against its speed reference.

- **latency** cases: batch-1 requests on a fixed, seeded set of prompts drawn from the run's own items, in
  ``blocks`` blocks interleaved across the models (baseline block 1, stage block 1, baseline block 2, ...), so a
  slow drift of the machine falls on every model alike; round ``i`` of every model serves the same prompt, so
  ratios are taken over pairs of rounds.
- **throughput** cases: ``concurrency`` requests served together, as the runtime serves them.

Timings belong to the machine: they are never cached, every run measures again, and each model's figures
carry the machine they were measured on. pytest-benchmark does not time under xdist (``-n``): there the cases
are skipped, saying so, and a stage's speed rules are reported as not checked.
"""

from __future__ import annotations

import contextlib
import platform
import random
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from .config import BASELINE_STAGE, GateConfig, ModelSpec, SpeedSettings
from .models.memory import MemoryMeter, cores, cpu_name, merge_memory
from .models.probe import ProbeTiming, run_probe
from .state import RunState

FIXTURE = "llmgate_probe"
SKIP_PREFIX = "llmgate speed: "
XDIST_REASON = (
    f"{SKIP_PREFIX}pytest-benchmark does not time under xdist (-n) or with --benchmark-disable; measure speed "
    "in one process (e.g. pytest benchmarks/test_speed.py --stage=<stage>)"
)
REFERENCE_PREFIX = "reference:"
FAKE_QUANTIZED = ("rtn",)  # quantized and dequantized in PyTorch: the weights run in float


def probe_roles(state: RunState) -> dict[str, ModelSpec]:
    """Every model the probe measures: the run's roles, then each stage's speed reference that is not one of them."""
    roles = dict(state.roles)
    names = {spec.name for spec in roles.values()}
    for role in list(state.roles):
        if role == BASELINE_STAGE:
            continue
        reference = state.gate.speed_reference(state.gate.stage(role))
        if reference.name not in names:
            roles[REFERENCE_PREFIX + reference.name] = reference
            names.add(reference.name)
    return roles


def reference_role(gate: GateConfig, roles: Mapping[str, ModelSpec], stage: str) -> str | None:
    """The role whose speed a stage is compared with."""
    reference = gate.speed_reference(gate.stage(stage))
    return next((role for role, spec in roles.items() if spec.name == reference.name), None)


def runtime_of(spec: ModelSpec, device: str | None) -> str:
    """What executes the model: the backend and the device, and whether the compression is real there."""
    if spec.backend == "openai":
        return f"openai server {spec.base_url}"
    text = f"{spec.backend} {device or spec.device}"
    method = (spec.transform or {}).get("method")
    if spec.backend == "transformers" and method in FAKE_QUANTIZED:
        text += " (fake-quantized: runs in float)"
    elif spec.backend == "vptq" or method == "vptq":
        text += " (vptq package layers)"
    elif spec.backend == "transformers" and method == "gguf":
        text += " (GGUF dequantized into PyTorch: runs in float)"
    return text


def machine(device: str | None) -> dict[str, Any]:
    """What the timings were measured on: never compare or reuse them across machines."""
    import importlib.metadata as metadata

    found: dict[str, Any] = {"cpu": cpu_name(), "cores": cores(), "platform": platform.platform()}
    for package in ("torch", "transformers", "llama_cpp_python"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[package] = metadata.version(package.replace("_", "-"))
    if device and device.startswith("cuda"):
        import torch

        found["gpu"] = torch.cuda.get_device_name(device)
    return found


@dataclass(frozen=True)
class ProbeCase:
    """One parametrized speed test: a model, what it measures, which block of rounds."""

    role: str
    kind: str  # "latency" | "throughput"
    block: int = 1
    rounds: int = 1
    warmup_rounds: int = 0
    first_round: int = 0  # latency: the index of this block's first round in the model's sequence

    @property
    def id(self) -> str:
        return f"{self.kind}-{self.role}" + (f"-{self.block}" if self.kind == "latency" else "")


def probe_cases(roles: Sequence[str], settings: SpeedSettings) -> list[ProbeCase]:
    """Latency blocks interleaved across the models, then one throughput case per model."""
    whole, extra = divmod(settings.rounds, settings.blocks)
    per_block = [whole + (b < extra) for b in range(settings.blocks)]
    cases = []
    first = 0
    for block, rounds in enumerate(per_block, start=1):
        for role in roles:
            warmup = settings.warmup_rounds if block == 1 else 0
            cases.append(ProbeCase(role, "latency", block, rounds, warmup, first))
        first += rounds
    # A first batch of a new shape may pay one-off costs (CUDA kernels, cuBLAS plans): warm up once here too.
    cases += [ProbeCase(role, "throughput", 1, settings.throughput_rounds, settings.warmup_rounds) for role in roles]
    return cases


@dataclass
class Probe:
    """What ``llmgate_probe`` gives a test: ``run(benchmark)`` measures its case with pytest-benchmark."""

    case: ProbeCase
    spec: ModelSpec
    backend: Any
    prompts: Sequence[str]
    settings: SpeedSettings
    device: str | None
    timings: list[list[ProbeTiming]] = field(default_factory=list)  # per round called, warm-ups first
    memory: dict[str, Any] | None = None
    measured: bool = False

    @property
    def role(self) -> str:
        return self.case.role

    def _latency_round(self, index: int) -> None:
        prompt = self.prompts[index % len(self.prompts)]
        self.timings.append(run_probe(self.backend, [prompt], self.settings.max_tokens))

    def _throughput_round(self) -> None:
        count = self.settings.concurrency
        chosen = [self.prompts[i % len(self.prompts)] for i in range(count)]
        self.timings.append(run_probe(self.backend, chosen, self.settings.max_tokens))

    def run(self, benchmark: Any) -> None:
        """Time this case's rounds with pytest-benchmark's ``benchmark`` fixture (``benchmark.pedantic``)."""
        if getattr(benchmark, "disabled", False):
            pytest.skip(XDIST_REASON)
        case = self.case
        benchmark.group = f"llmgate {case.kind}"
        benchmark.extra_info.update(role=case.role, model=self.spec.name, kind=case.kind, block=case.block)
        meter = MemoryMeter(self.device or "cpu").start()
        if case.kind == "latency":
            calls = iter(range(case.first_round - case.warmup_rounds, case.first_round + case.rounds))

            def setup() -> tuple[tuple[int], dict[str, Any]]:
                return (max(0, next(calls)),), {}

            benchmark.pedantic(
                self._latency_round, setup=setup, rounds=case.rounds, warmup_rounds=case.warmup_rounds, iterations=1
            )
        else:
            benchmark.pedantic(
                self._throughput_round, rounds=case.rounds, warmup_rounds=case.warmup_rounds, iterations=1
            )
        self.memory = meter.stop()
        self.measured = True
        measured = self.timings[-case.rounds :]
        tokens = [sum(t.tokens or 0 for t in round_) for round_ in measured]
        benchmark.extra_info.update(tokens_per_round=tokens, max_tokens=self.settings.max_tokens)
        ttft = [t.ttft_s for round_ in measured for t in round_ if t.ttft_s is not None]
        if ttft:
            benchmark.extra_info["ttft_ms_median"] = round(1000 * sorted(ttft)[len(ttft) // 2], 2)

    def record(self, benchmark: Any) -> dict[str, Any] | None:
        """This case's measurements for the controller: pytest-benchmark's round times and the probe's details."""
        stats = getattr(getattr(benchmark, "stats", None), "stats", None)
        if not self.measured or stats is None:
            return None
        measured = self.timings[-self.case.rounds :]
        return {
            "role": self.case.role,
            "model": self.spec.name,
            "kind": self.case.kind,
            "block": self.case.block,
            "first_round": self.case.first_round,
            "round_seconds": [float(x) for x in stats.data],
            "requests": [[t.as_dict() for t in round_] for round_ in measured],
            "max_tokens": self.settings.max_tokens,
            "concurrency": len(measured[0]) if measured else 0,
            "runtime": runtime_of(self.spec, self.device),
            "memory": self.memory,
            "machine": machine(self.device),
        }


class SpeedPlugin:
    """Parametrizes the speed tests, hands them their probe, and carries the timings to the controller."""

    def __init__(self, config: pytest.Config, state: RunState) -> None:
        self.config = config
        self.state = state
        self.roles = probe_roles(state)
        self.records: list[dict[str, Any]] = []  # controller: every case's measurements
        self.skipped: list[str] = []  # controller: why cases did not measure
        self.memory: dict[str, Any] = {}  # controller: role -> peak memory seen by the speed tests
        self.collected = 0
        self._prompts: list[str] | None = None

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        if FIXTURE not in metafunc.fixturenames:
            return
        cases = probe_cases(list(self.roles), self.state.gate.speed)
        metafunc.parametrize(FIXTURE, cases, ids=[c.id for c in cases], indirect=True)

    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        self.collected = sum(FIXTURE in getattr(item, "fixturenames", ()) for item in items)

    def prompts(self) -> list[str]:
        """The probe's prompts: ``speed.prompts`` item contexts drawn with ``speed.seed`` from the run's items."""
        if self._prompts is None:
            engine = self.state.engine
            assert engine is not None
            texts = sorted(
                {
                    (item.qualified_id, item.requests[0].context)
                    for members in engine.shards.values()
                    for item, _ in members
                    if item.error is None and item.requests and item.requests[0].context.strip()
                }
            )
            if not texts:
                raise pytest.UsageError(
                    "llmgate speed: the probe draws its prompts from the run's benchmark items, and none was "
                    "collected; collect the benchmark tests with the speed test (e.g. pytest benchmarks --stage=X)"
                )
            settings = self.state.gate.speed
            chosen = random.Random(settings.seed).sample(texts, min(settings.prompts, len(texts)))
            self._prompts = [text for _, text in chosen]
        return self._prompts

    def probe(self, case: ProbeCase) -> Probe:
        """The ``llmgate_probe`` value of one case (the model loaded by the run's engine)."""
        if getattr(self.config, "workerinput", None) is not None:
            pytest.skip(XDIST_REASON)  # before loading anything: pytest-benchmark would not time it
        engine = self.state.engine
        assert engine is not None
        backend = engine.backend(case.role)
        memory = engine.memory(case.role)
        return Probe(
            case,
            self.roles[case.role],
            backend,
            self.prompts(),
            self.state.gate.speed,
            memory.get("device") if memory else ("server" if self.roles[case.role].backend == "openai" else None),
        )

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
        report = yield
        if FIXTURE not in getattr(item, "fixturenames", ()):
            return report
        if report.skipped and isinstance(report.longrepr, tuple):
            report.llmgate_speed_skipped = str(report.longrepr[2]).removeprefix("Skipped: ").removeprefix(SKIP_PREFIX)
        probe = getattr(item, "funcargs", {}).get(FIXTURE)
        if call.when != "call" or not isinstance(probe, Probe):
            return report
        engine = self.state.engine
        memory = model_memory(engine.memory(probe.role) if engine is not None else None, probe.memory)
        if memory is not None:  # loaded for the probe: its memory is known even when timing is off
            report.llmgate_speed_memory = {"role": probe.role, "memory": memory}
        record = probe.record(item.funcargs.get("benchmark"))  # type: ignore[attr-defined]
        if record is not None:
            record["memory"] = memory
            report.llmgate_speed = record
        return report

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Controller: keep each case's measurements, and why a case measured nothing."""
        if not self.state.is_controller:
            return
        record = getattr(report, "llmgate_speed", None)
        if record is not None and report.when == "call":
            self.records.append(record)
        reason = getattr(report, "llmgate_speed_skipped", None)
        if reason is not None and reason not in self.skipped:
            self.skipped.append(reason)
        loaded = getattr(report, "llmgate_speed_memory", None)
        if loaded is not None:
            self.memory[loaded["role"]] = merge_memory(self.memory.get(loaded["role"]), loaded["memory"])

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per role: ``speed`` figures, and for stages the ratios against their reference."""
        return summarize(self.records, self.state.gate, self.roles)

    def not_measured(self) -> str:
        """Why there are no timings, in words."""
        if self.skipped:
            return "; ".join(self.skipped)
        if not self.collected:
            return (
                "no speed test was collected: add one that takes llmgate_probe and benchmark "
                "(see docs/efficiency.md), and collect it with the benchmark tests"
            )
        return "the speed tests did not finish (see their errors above)"


def model_memory(load: Mapping[str, Any] | None, probe: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A model's peak: its load, or what stayed resident after the load plus the probe's own peak."""
    during = None
    if probe is not None and probe.get("peak_memory_mb") is not None:
        resident = (load or {}).get("resident_mb", 0.0)
        during = {**probe, "peak_memory_mb": round(resident + probe["peak_memory_mb"], 1), "resident_mb": resident}
    return merge_memory(dict(load) if load else None, during)


def _percentiles(values: Sequence[float]) -> dict[str, float]:
    import numpy as np

    p50, p95, p99 = np.quantile(np.asarray(values), [0.5, 0.95, 0.99])
    return {"p50": round(1000 * float(p50), 2), "p95": round(1000 * float(p95), 2), "p99": round(1000 * float(p99), 2)}


def summarize(
    records: Sequence[Mapping[str, Any]], gate: GateConfig, roles: Mapping[str, ModelSpec]
) -> dict[str, dict[str, Any]]:
    """Each model's speed (``models.<role>.speed`` in the report) from its cases' records.

    Latency rounds are ordered by their index in the model's sequence (so round ``i`` of two models served the
    same prompt); ``latency_ms`` comes from pytest-benchmark's round times.
    """
    from .stats import ratio_interval, timing_interval

    out: dict[str, dict[str, Any]] = {}
    by_role: dict[str, dict[str, list[Mapping[str, Any]]]] = {}
    for record in records:
        by_role.setdefault(record["role"], {}).setdefault(record["kind"], []).append(record)
    confidence = gate.confidence
    latency_rounds: dict[str, list[float]] = {}
    throughput_rounds: dict[str, list[float]] = {}
    for role, kinds in by_role.items():
        speed: dict[str, Any] = {}
        latency = sorted(kinds.get("latency", []), key=lambda r: r["first_round"])
        if latency:
            rounds = [s for r in latency for s in r["round_seconds"]]
            latency_rounds[role] = rounds
            requests = [req for r in latency for round_ in r["requests"] for req in round_]
            ttft = [q["ttft_s"] for q in requests if q["ttft_s"] is not None]
            rates = [ProbeTiming(q["ttft_s"], q["tokens"], q["seconds"]).decode_tokens_per_s for q in requests]
            known_rates = [x for x in rates if x is not None]
            p95 = timing_interval(rounds, 0.95, confidence=confidence, seed=gate.seed)
            speed.update(
                rounds=len(rounds),
                max_tokens=latency[0]["max_tokens"],
                latency_ms=_percentiles(rounds),
                latency_p95_interval_ms=[round(1000 * p95[1], 2), round(1000 * p95[2], 2)],
                ttft_ms=round(1000 * sorted(ttft)[len(ttft) // 2], 2) if ttft else None,
                decode_tokens_per_s=round(sorted(known_rates)[len(known_rates) // 2], 1) if known_rates else None,
            )
        throughput = kinds.get("throughput", [])
        if throughput:
            record = throughput[0]
            seconds = record["round_seconds"]
            tokens = [sum(q["tokens"] or 0 for q in round_) for round_ in record["requests"]]
            per_round = [t / s for t, s in zip(tokens, seconds, strict=False) if s > 0 and t > 0]
            throughput_rounds[role] = per_round
            speed["throughput"] = {
                "concurrency": record["concurrency"],
                "requests_per_s": round(record["concurrency"] * len(seconds) / sum(seconds), 3),
                "tokens_per_s": round(sum(tokens) / sum(seconds), 1) if any(tokens) else None,
            }
        first = (latency or throughput)[0]
        speed["runtime"] = first["runtime"]
        out[role] = {
            "speed": speed,
            "machine": first["machine"],
            "memory": merge_memory(*(r.get("memory") for r in (*latency, *throughput))),
        }
    for role, figures in out.items():
        if role == BASELINE_STAGE or role.startswith(REFERENCE_PREFIX):
            continue
        reference = reference_role(gate, roles, role)
        if reference is None or reference not in out:
            continue
        vs: dict[str, Any] = {
            "reference": reference,
            "reference_model": roles[reference].name,
            "same_runtime": _runtime_family(out[reference]["speed"]["runtime"])
            == _runtime_family(figures["speed"]["runtime"]),
        }
        import numpy as np

        def p95_of_rows(rows: Any) -> Any:
            return np.quantile(rows, 0.95, axis=-1)

        def mean_of_rows(rows: Any) -> Any:
            return rows.mean(axis=-1)

        # p95 latency over rounds paired by prompt; throughput's rounds are not paired.
        for key, timed, statistic, paired in (
            ("latency_ratio", latency_rounds, p95_of_rows, True),
            ("throughput_ratio", throughput_rounds, mean_of_rows, False),
        ):
            if timed.get(role) and timed.get(reference):
                point, lo, hi = ratio_interval(
                    timed[reference], timed[role], statistic, paired=paired, confidence=confidence, seed=gate.seed
                )
                vs[key] = {"point": round(point, 4), "lo": round(lo, 4), "hi": round(hi, 4)}
        ref_memory, memory = out[reference].get("memory"), figures.get("memory")
        if ref_memory and memory and ref_memory.get("peak_memory_mb"):
            vs["memory_ratio"] = round(memory["peak_memory_mb"] / ref_memory["peak_memory_mb"], 4)
        figures["speed"]["vs_reference"] = vs
    return out


def _runtime_family(runtime: str) -> str:
    """The runtime without its notes: "llama_cpp cpu", "transformers cuda:0"."""
    return runtime.partition(" (")[0]

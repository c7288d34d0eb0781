"""Speed, memory and cost: the serving probe timed by pytest-benchmark on real llama.cpp models, the gate rules
that read it, the budget, and the ladder ordered by measured compression.

Timings are never asserted against a number (they belong to the machine): the tests check that the figures are
pytest-benchmark's own rounds, that rules decide on them as configured, and what happens when nothing is timed.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from pytest_llmgate.config import ConfigError, ModelSpec, SpeedSettings, StageSpec, parse_config
from pytest_llmgate.gate import RunFigures, StageVerdict, decide_ladder, efficiency_rules, ladder_order
from pytest_llmgate.speed import probe_cases, runtime_of
from pytest_llmgate.stats import ratio_interval, timing_interval
from pytest_llmgate.tasks import TASKS

LADDER = """
[tool.llmgate]
baseline = "f16"
tasks = ["hellaswag"]
limit = 8
data_dir = "{data}"
shard_size = 4
{extra}

[tool.llmgate.speed]
prompts = 4
max_tokens = 4
rounds = 4
blocks = 2
concurrency = 2
throughput_rounds = 2

[tool.llmgate.models.f16]
backend = "llama_cpp"
transform = {{ method = "gguf", type = "F16" }}
n_ctx = 512
{price}

[tool.llmgate.models.q8]
backend = "llama_cpp"
transform = {{ method = "gguf", type = "Q8_0" }}
n_ctx = 512
{price}

[tool.llmgate.models.q4]
backend = "llama_cpp"
transform = {{ method = "gguf", type = "Q4_0" }}
n_ctx = 512
{price}

[[tool.llmgate.stages]]
name = "q4"
model = "q4"
min_retention = 0.1
max_latency_ms = 0.001

[[tool.llmgate.stages]]
name = "q8"
model = "q8"
min_retention = 0.1
max_latency_ratio = 100
min_throughput_ratio = 0.01
max_memory_mb = 100000
min_success_rate = 1.0
"""

TESTS = """
import pytest

@pytest.mark.llmgate("hellaswag")
def test_hellaswag(llmgate_outcome):
    pass

def test_speed(llmgate_probe, benchmark):
    llmgate_probe.run(benchmark)
"""


@pytest.fixture
def ladder(pytester, shared_datasets, gguf_ladder):
    def write(extra: str = "", price: str = "") -> None:
        (pytester.path / "pyproject.toml").write_text(LADDER.format(data=shared_datasets, extra=extra, price=price))

    write()
    gguf_ladder(pytester.path / ".llmgate", "F16", "Q8_0", "Q4_0")  # built once per session (conftest.py)
    pytester.makepyfile(test_bench=TESTS)
    return write


def test_speed_figures_are_pytest_benchmarks_rounds_and_gate_the_ladder(pytester, ladder):
    run = pytester.runpytest(
        "--stage=all", "-p", "no:xdist", "--llmgate-report=r.json", "--benchmark-json=bench.json"
    )
    # The config lists q4 first; the ladder still walks from the most compressed stage (q4, 5.5 bits/weight)
    # back: q4 breaches its (impossible) absolute latency limit, so q8 is selected.
    assert run.ret == 0, run.stdout.str()
    report = json.loads((pytester.path / "r.json").read_text())
    assert report["selected_stage"] == "q8"
    bench = json.loads((pytester.path / "bench.json").read_text())
    cases = {b["param"]: b for b in bench["benchmarks"]}
    # Latency: 2 blocks interleaved across the three models, then one throughput case per model.
    assert [b["param"] for b in bench["benchmarks"]] == [
        "latency-baseline-1", "latency-q4-1", "latency-q8-1", "latency-baseline-2", "latency-q4-2", "latency-q8-2",
        "throughput-baseline", "throughput-q4", "throughput-q8",
    ]  # fmt: skip
    for role in ("baseline", "q4", "q8"):
        model = report["models"][role]
        speed = model["speed"]
        rounds = cases[f"latency-{role}-1"]["stats"]["data"] + cases[f"latency-{role}-2"]["stats"]["data"]
        assert speed["rounds"] == len(rounds) == 4
        # The percentiles are those of pytest-benchmark's own round times.
        p50, p95, p99 = (round(1000 * float(q), 2) for q in np.quantile(rounds, [0.5, 0.95, 0.99]))
        assert speed["latency_ms"] == {"p50": p50, "p95": p95, "p99": p99}
        assert 0 < speed["ttft_ms"] <= p99
        assert speed["decode_tokens_per_s"] > 0
        throughput = cases[f"throughput-{role}"]["stats"]
        assert speed["throughput"]["concurrency"] == 2
        assert speed["throughput"]["requests_per_s"] == pytest.approx(2 * 2 / sum(throughput["data"]), rel=1e-3)
        assert speed["runtime"] == "llama_cpp cpu"
        assert {"cpu", "cores", "llama_cpp_python"} <= set(model["machine"])
        assert model["peak_memory_mb"] > 10 and model["memory"]["memory_kind"] == "peak RSS growth"
        assert cases[f"latency-{role}-1"]["extra_info"]["model"] == model["name"]
    q8 = report["models"]["q8"]["speed"]["vs_reference"]
    assert q8["reference_model"] == "f16" and q8["same_runtime"] is True
    ratio = q8["latency_ratio"]
    assert ratio["lo"] <= ratio["point"] <= ratio["hi"]
    rules = {r["rule"]: r for r in report["stages"]["q8"]["rules"]}
    assert rules["p95 latency <= 100x f16"]["passed"] and "resolved" in rules["p95 latency <= 100x f16"]["detail"]
    assert rules["throughput >= 0.01x f16"]["passed"]
    assert rules["peak memory <= 100000 MB"]["passed"]
    assert rules["success rate >= 100%"]["passed"]
    q4 = {r["rule"]: r for r in report["stages"]["q4"]["rules"]}
    assert not q4["p95 latency <= 0.001 ms"]["passed"]
    out = run.stdout.str()
    assert "trade-off" in out and "speed (llama_cpp cpu): p50" in out
    assert "llmgate latency" in out  # pytest-benchmark's own table is there too

    # Without the probe the stage's speed rules are skipped on purpose, and the run can pass (the model must load
    # for its memory rule: a run whose results all come from the cache never loads it).
    skipped = pytester.runpytest(
        "--stage=q8", "-p", "no:xdist", "--llmgate-no-speed", "--llmgate-no-cache", "--llmgate-report=n.json"
    )
    assert skipped.ret == 0, skipped.stdout.str()
    rules = {r["rule"]: r for r in json.loads((pytester.path / "n.json").read_text())["stages"]["q8"]["rules"]}
    assert rules["p95 latency <= 100x f16"]["skipped"]
    assert "--llmgate-no-speed" in rules["p95 latency <= 100x f16"]["detail"]

    # Under xdist pytest-benchmark does not time: the speed rules were not checked, and the run says so (exit 12).
    dist = pytester.runpytest_subprocess("--stage=q8", "-n", "2", "--llmgate-report=d.json")
    assert dist.ret == 12, dist.stdout.str()
    dist.stdout.fnmatch_lines(["*p95 latency <= 100x f16 (stage 'q8') not checked: pytest-benchmark does not time*"])
    assert json.loads((pytester.path / "d.json").read_text())["complete"] is False


def test_run_budget_stops_before_it_is_exceeded_and_the_run_never_passes(pytester, ladder):
    ladder(extra="max_cost = 0.0001", price="price_per_hour = 1.0")
    run = pytester.runpytest("--stage=q8", "-p", "no:xdist", "--llmgate-no-speed", "--llmgate-report=r.json")
    assert run.ret != 0
    out = run.stdout.str()
    assert "run budget" in out and "max_cost" in out
    # The first shard ran on the baseline (nothing was spent yet), which used up the budget: the stage's first
    # shard was not started, and the run stopped there, incomplete.
    report = json.loads((pytester.path / "r.json").read_text())
    assert report["complete"] is False and report["verdict"] != "pass"
    assert "would cost about" in out and "Interrupted" in out

    ladder(price="price_per_hour = 1.0")  # no budget: everything runs, and the cost is reported
    full = pytester.runpytest(
        "--stage=q8", "-p", "no:xdist", "--llmgate-no-speed", "--llmgate-no-cache", "--llmgate-report=f.json"
    )
    assert full.ret == 0, full.stdout.str()
    for model in json.loads((pytester.path / "f.json").read_text())["models"].values():
        cost = model["cost"]
        # Two shards of 4 items on each model, at 1.0 per hour of evaluation time.
        assert cost["items"] == 8
        assert cost["cost"] == pytest.approx(cost["seconds"] / 3600, rel=1e-2)
        assert cost["cost_per_item"] == pytest.approx(cost["cost"] / 8)
    assert "per item" in full.stdout.str()


def _stage(**rules) -> StageSpec:
    return StageSpec("s", "m", **rules)


def test_ratio_rules_decide_on_the_interval_under_the_policy():
    config = parse_config(
        {"models": {"m": {}}, "baseline": "m", "stages": [{"name": "s", "model": "m"}]},
        source=None,
        known_tasks=TASKS,
        rootpath=__import__("pathlib").Path("."),
    )
    figures = {"speed": {"vs_reference": {"reference_model": "m", "same_runtime": True,
                                          "latency_ratio": {"point": 0.9, "lo": 0.8, "hi": 1.1}}}}  # fmt: skip
    stage = _stage(max_latency_ratio=1.0)

    def decide(policy: str) -> tuple[bool, str]:
        from dataclasses import replace

        (rule,) = efficiency_rules(replace(config, policy=policy), stage, figures, RunFigures())
        return rule.passed, rule.detail

    assert decide("point")[0] is True and "UNRESOLVED" in decide("point")[1]
    assert decide("lenient")[0] is True
    assert decide("strict")[0] is False
    figures["speed"]["vs_reference"]["same_runtime"] = False
    passed, detail = decide("point")
    assert not passed and "another runtime" in detail
    # Nothing measured: skipped and named, so the controller reports the run as not checked.
    (rule,) = efficiency_rules(config, stage, {}, RunFigures(speed_missing="no speed test was collected"))
    assert rule.skipped and rule.detail == "not checked: no speed test was collected"


def test_ladder_walks_from_the_most_compressed_stage_and_ties_go_to_the_faster():
    verdicts = [StageVerdict(name, "pass", {}, ()) for name in ("a", "b", "c")]
    sizes = {
        "a": {"compression_ratio": 4.0, "speed": {"latency_ms": {"p95": 10.0}}},
        "b": {"compression_ratio": 2.0},
        "c": {"compression_ratio": 4.0, "speed": {"latency_ms": {"p95": 5.0}}},
    }
    assert ladder_order(verdicts, sizes) == ["b", "a", "c"]
    assert decide_ladder(verdicts, sizes).selected == "c"
    # A ratio nobody measured: the configuration's order.
    assert ladder_order(verdicts, {"a": {}, "b": {}, "c": {}}) == ["a", "b", "c"]
    assert decide_ladder(verdicts).selected == "c"


def test_each_speed_reference_is_probed_once_under_its_own_role(tmp_path):
    from pytest_llmgate.speed import probe_roles
    from pytest_llmgate.state import RunState

    gguf = {"backend": "llama_cpp", "transform": {"method": "gguf", "type": "Q4_0"}}
    raw = {
        "models": {"hf": {}, "f16": {**gguf, "transform": {"method": "gguf", "type": "F16"}}, "q4": gguf, "q8": gguf},
        "baseline": "hf",
        "stages": [
            {"name": "int8", "model": "q8", "speed_reference": "f16"},
            {"name": "int4", "model": "q4", "speed_reference": "f16"},
            {"name": "rtn", "model": "hf"},
        ],
    }
    config = parse_config(raw, source=None, known_tasks=TASKS, rootpath=tmp_path)
    state = RunState(config, "all", config.stage_models("all"), tmp_path, None, "main")
    assert {role: spec.name for role, spec in probe_roles(state).items()} == {
        "baseline": "hf", "int8": "q8", "int4": "q4", "rtn": "hf", "reference:f16": "f16"
    }  # fmt: skip


def test_a_speed_ratio_across_runtimes_is_refused_before_anything_loads(tmp_path):
    raw = {
        "models": {"hf": {}, "q4": {"backend": "llama_cpp", "transform": {"method": "gguf", "type": "Q4_0"}}},
        "baseline": "hf",
        "stages": [{"name": "int4", "model": "q4", "max_latency_ratio": 1.0}],
    }
    with pytest.raises(ConfigError, match=r"across runtimes measures the runtime.*speed_reference"):
        parse_config(raw, source=None, known_tasks=TASKS, rootpath=tmp_path)
    raw["models"]["f16"] = {"backend": "llama_cpp", "transform": {"method": "gguf", "type": "F16"}}
    raw["stages"][0]["speed_reference"] = "f16"
    config = parse_config(raw, source=None, known_tasks=TASKS, rootpath=tmp_path)
    assert config.speed_reference(config.stage("int4")).name == "f16"
    raw["stages"][0]["speed_reference"] = "nope"
    with pytest.raises(ConfigError, match="'nope' is not defined"):
        parse_config(raw, source=None, known_tasks=TASKS, rootpath=tmp_path)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"speed": {"rounds": 0}}, r"speed\]\.rounds: expected an integer >= 1"),
        ({"speed": {"rounds": 2, "blocks": 3}}, "cannot fill 3 blocks"),
        ({"speed": {"warmup": 1}}, "unknown key"),
        ({"max_cost": 1.0}, "no model has a price"),
        ({"models": {"m": {"price_per_1k_prompt_tokens": 0.5}}, "baseline": "m"}, "need the token counts"),
        ({"models": {"m": {"price_per_hour": -1}}, "baseline": "m"}, "expected a price >= 0"),
        ({"stages": [{"name": "s", "model": "smollm2", "min_success_rate": 1.5}]}, "fraction in"),
    ],
)
def test_efficiency_configuration_errors_name_the_key(tmp_path, raw, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(raw, source=None, known_tasks=TASKS, rootpath=tmp_path)


def test_probe_cases_interleave_blocks_and_cover_every_round():
    cases = probe_cases(["baseline", "s"], SpeedSettings(rounds=7, blocks=3, warmup_rounds=1))
    latency = [c for c in cases if c.kind == "latency"]
    assert [c.id for c in latency] == [
        "latency-baseline-1", "latency-s-1", "latency-baseline-2", "latency-s-2", "latency-baseline-3", "latency-s-3"
    ]
    assert [(c.first_round, c.rounds, c.warmup_rounds) for c in latency if c.role == "s"] == [(0, 3, 1), (3, 2, 0),
                                                                                              (5, 2, 0)]  # fmt: skip
    assert [c.id for c in cases if c.kind == "throughput"] == ["throughput-baseline", "throughput-s"]


def test_a_fake_quantized_model_is_labelled_as_running_in_float():
    rtn = ModelSpec(name="m", transform={"method": "rtn", "bits": 4, "group_size": 128})
    assert "fake-quantized: runs in float" in runtime_of(rtn, "cpu")
    assert runtime_of(ModelSpec(name="g", backend="llama_cpp"), "cpu") == "llama_cpp cpu"
    vptq = ModelSpec(name="v", transform={"method": "vptq", "bits": 2, "vector_len": 4})
    assert runtime_of(vptq, "cpu") == "transformers cpu (vptq package layers)"


def test_memory_meter_sees_what_an_allocation_adds():
    # In a fresh process: in this one, memory that earlier tests freed may still be resident and be reused.
    code = (
        "import json; from pytest_llmgate.models.memory import MemoryMeter\n"
        "meter = MemoryMeter('cpu').start()\n"
        "block = bytearray(200 * 1024 * 1024)\n"
        "block[::4096] = b'x' * len(block[::4096])  # every page touched\n"
        "print(json.dumps(meter.stop()))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    figures = json.loads(done.stdout)
    assert figures["peak_memory_mb"] >= 190 and figures["memory_kind"] == "peak RSS growth"


def test_timing_intervals():
    rounds = [0.10, 0.11, 0.12, 0.10, 0.30]
    point, lo, hi = timing_interval(rounds, 0.95, seed=1)
    assert point == pytest.approx(np.quantile(rounds, 0.95)) and lo <= point <= hi <= 0.30
    # Paired rounds of a model against itself: a ratio of exactly 1, with no spread.
    assert ratio_interval(rounds, rounds, lambda r: np.quantile(r, 0.95, axis=-1), paired=True) == (1.0, 1.0, 1.0)
    faster = [x / 2 for x in rounds]
    point, lo, hi = ratio_interval(rounds, faster, lambda r: r.mean(axis=-1), paired=True)
    assert point == pytest.approx(0.5) and lo == pytest.approx(0.5) and hi == pytest.approx(0.5)

"""Configuration: presets, overrides, and a clear UsageError for every mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_llmgate.config import (
    BUILTIN_SMOLLM2,
    PRESETS,
    Thresholds,
    apply_overrides,
    find_config_file,
    parse_config,
)
from pytest_llmgate.tasks import TASKS


def parse(raw, tmp_path: Path = Path("/tmp")):
    return parse_config(raw, source=None, known_tasks=TASKS, rootpath=tmp_path)


MODELS = {"models": {"ref": {}, "q": {"transform": {"method": "rtn", "bits": 4}}}, "baseline": "ref"}


def test_defaults_use_the_builtin_smollm2():
    config = parse({})
    assert config.baseline == "smollm2" and config.models["smollm2"].path == BUILTIN_SMOLLM2
    assert config.stages == () and config.shard_size == 32 and config.cache_path is not None


def test_compression_ladder_preset_reproduces_the_issue_thresholds():
    config = parse({**MODELS, "preset": "compression-ladder",
                    "stages": [{"name": "vptq", "model": "q"}]})
    seedlm, vptq, hyper = config.stages
    assert [s.name for s in config.stages] == ["seedlm", "vptq", "hypercompression"]
    assert seedlm.thresholds_for("mmlu", ["expert"]).min_retention == 0.98
    assert vptq.model == "q"
    assert vptq.thresholds_for("hellaswag", config.groups_of("hellaswag")).min_retention == 0.95
    assert vptq.thresholds_for("mmlu", config.groups_of("mmlu")).min_retention == 0.93
    core = hyper.thresholds_for("hellaswag", config.groups_of("hellaswag"))
    expert = hyper.thresholds_for("gsm8k", config.groups_of("gsm8k"))
    assert (core.min_retention, core.min_step_retention) == (0.84, 0.90)
    assert (expert.min_retention, expert.min_step_retention) == (0.84, 0.88)
    floor, combined = config.critical
    assert floor.floor == 0.80 and combined.tasks == ("mmlu", "gsm8k") and combined.max_drop == 0.20
    assert PRESETS["compression-ladder"]["stages"][0]["name"] == "seedlm"


def test_task_override_beats_group_beats_stage():
    config = parse({**MODELS, "groups": {"core": ["hellaswag"]}, "stages": [{
        "name": "s", "model": "q", "min_retention": 0.9, "min_score": 0.1,
        "groups": {"core": {"min_retention": 0.8}},
        "tasks": {"hellaswag": {"score_band": [0.3, 0.5]}}}]})
    merged = config.stages[0].thresholds_for("hellaswag", config.groups_of("hellaswag"))
    assert merged == Thresholds(min_retention=0.8, min_score=0.1, score_band=(0.3, 0.5))
    assert config.stages[0].thresholds_for("arc_challenge", ()).min_retention == 0.9


def test_step_rule_pulls_in_the_previous_stage_model():
    config = parse({"models": {"ref": {}, "a": {}, "b": {}}, "baseline": "ref", "stages": [
        {"name": "one", "model": "a", "min_retention": 0.9},
        {"name": "two", "model": "b", "min_step_retention": 0.9}]})
    assert list(config.stage_models("two")) == ["baseline", "one", "two"]
    assert list(config.stage_models("one")) == ["baseline", "one"]
    assert list(config.stage_models("all")) == ["baseline", "one", "two"]
    assert list(config.stage_models("baseline")) == ["baseline"]


def test_overrides_parse_toml_values():
    raw = apply_overrides({"limit": 5}, ["limit=7", "models.q.dtype=bfloat16", "tasks=['hellaswag']"])
    assert raw == {"limit": 7, "models": {"q": {"dtype": "bfloat16"}}, "tasks": ["hellaswag"]}


@pytest.mark.parametrize(("raw", "message"), [
    ({"limits": 3}, r"\[tool.llmgate\].limits: unknown key; did you mean 'limit'\?"),
    ({**MODELS, "stages": [{"name": "s", "model": "nope"}]},
     r"stage 's'.model: model 'nope' is not defined in \[tool.llmgate.models\] \(defined: ref, q\)"),
    ({**MODELS, "stages": [{"name": "s", "model": "q", "min_retention": 1.5}]},
     r"stage 's'.min_retention: 1.5 is outside \[0, 1\]"),
    ({**MODELS, "stages": [{"name": "s", "model": "q", "min_retention": -0.1}]}, r"outside \[0, 1\]"),
    ({"tasks": ["hellaswagg"]}, r"unknown task 'hellaswagg'; did you mean 'hellaswag'\?"),
    ({**MODELS, "baseline": "missing"}, r"baseline: model 'missing' is not in"),
    ({"models": {"m": {"dtype": "fp8"}}}, r"models.m\].dtype: 'fp8' is not one of"),
    ({"models": {"m": {"transform": {"method": "gptq"}}}}, r"transform.method: 'gptq': use 'rtn'"),
    ({"critical": [{"rule": "combined_drop", "tasks": ["hellaswag"]}]}, r"needs tasks = \[...\] and max_drop"),
    ({"critical": [{"rule": "retention_floor", "floor": 0.8, "tasks": ["mmmlu"]}]}, r"unknown task 'mmmlu'"),
    ({**MODELS, "stages": [{"name": "baseline", "model": "q"}]}, r"'baseline' is reserved"),
    ({**MODELS, "stages": [{"name": "s", "model": "q", "groups": {"expert": {"min_retention": 0.9}}}]},
     r"group 'expert' is not defined"),
    ({"preset": "ladder"}, r"known presets are compression-ladder"),
    ({"policy": "loose"}, r"\[tool.llmgate\].policy: 'loose': use 'point'"),
    ({"confidence": 0.3}, r"confidence: 0.3: use a level such as 0.95"),
    ({**MODELS, "stages": [{"name": "s", "model": "q", "score_band": [0.8, 0.7]}]}, r"low 0.8 is above high 0.7"),
    # Runtimes: each backend's keys, on that backend only; transforms that fit the runtime.
    ({"models": {"m": {"n_ctx": 512}}}, r"models.m\].n_ctx: is a key of backend = 'llama_cpp'"),
    ({"models": {"m": {"backend": "llama_cpp", "base_url": "http://x/v1"}}},
     r"base_url: is a key of backend = 'openai'"),
    ({"models": {"m": {"backend": "llama_cpp", "transform": {"method": "rtn", "bits": 4}}}},
     r"llama.cpp runs GGUF files: use transform = \{ method = 'gguf'"),
    ({"models": {"m": {"backend": "llama_cpp", "transform": {"method": "gguf", "type": "Q4_X"}}}},
     r"transform.type: 'Q4_X' is not a GGUF type llmgate writes; use one of F32, F16"),
    ({"models": {"m": {"backend": "llama_cpp", "transform": {"method": "gguf", "bits": 4}}}},
     r"transform.bits: unknown key"),
    ({"models": {"m": {"backend": "vptq", "transform": {"method": "gguf", "type": "Q8_0"}}}},
     r"method 'gguf' writes a GGUF file for backend 'llama_cpp'"),
    ({"models": {"m": {"backend": "llama_cpp", "n_gpu_layers": -2}}}, r"n_gpu_layers: expected -1 \(all layers\)"),
    ({"models": {"m": {"backend": "llama_cpp", "n_ctx": 0}}}, r"n_ctx: expected a positive integer"),
    ({"models": {"m": {"backend": "openai"}}}, r"base_url: expected the server's URL"),
    ({"models": {"m": {"backend": "openai", "base_url": "localhost:8000"}}}, r"base_url: expected the server's URL"),
    ({"models": {"m": {"backend": "openai", "base_url": "http://h/v1", "api_key_env": "sk-abc.123"}}},
     r"api_key_env: 'sk-abc.123' is not an environment variable name"),
    ({"models": {"m": {"backend": "openai", "base_url": "http://h/v1", "transform": {"method": "rtn", "bits": 4}}}},
     r"a served model is judged as the server runs it"),
    ({"models": {"m": {"backend": "openai", "base_url": "http://h/v1", "max_in_flight": 0}}},
     r"max_in_flight: expected a positive integer"),
    ({"models": {"m": {"backend": "openai", "base_url": "http://h/v1", "timeout": -1}}}, r"timeout: expected seconds"),
    ({"models": {"m": {"backend": "openai", "base_url": "http://h/v1", "extra_body": {"temperature": 1}}}},
     r"extra_body.temperature: is set by llmgate from the task"),
    ({"cache": 3}, r"\[tool.llmgate\].cache: expected true, false or a file path, got 3"),
])
def test_every_mistake_is_a_usage_error_naming_key_and_fix(raw, message):
    with pytest.raises(pytest.UsageError, match=message):
        parse(raw)


def test_runtime_model_tables_parse():
    config = parse({"models": {
        "m": {},
        "gguf": {"backend": "llama_cpp", "n_ctx": 2048, "n_threads": 4, "n_gpu_layers": -1,
                 "transform": {"method": "gguf", "type": "q4_k_m"}},
        "served": {"backend": "openai", "base_url": "http://127.0.0.1:8000/v1/", "model": "m",
                   "api_key_env": "MY_KEY", "max_in_flight": 16, "timeout": 30, "max_retries": 2},
    }, "baseline": "m"})
    gguf, served = config.models["gguf"], config.models["served"]
    assert gguf.transform == {"method": "gguf", "type": "Q4_K_M"} and (gguf.n_ctx, gguf.n_gpu_layers) == (2048, -1)
    assert served.base_url == "http://127.0.0.1:8000/v1" and served.max_in_flight == 16 and served.timeout == 30.0
    assert served.reuse_cache is False and served.describe() == "m at http://127.0.0.1:8000/v1 [openai]"


def test_unknown_stage_and_missing_stage_model(tmp_path):
    config = parse({**MODELS, "preset": "compression-ladder"})
    with pytest.raises(pytest.UsageError, match="no stage named 'x'; choose one of baseline, seedlm"):
        config.stage_models("x")
    with pytest.raises(pytest.UsageError, match=r"stage 'seedlm'.model: no model set; add model ="):
        config.stage_models("seedlm")


def test_config_file_discovery(tmp_path):
    assert find_config_file(tmp_path, None) == (None, {})
    (tmp_path / "pyproject.toml").write_text("[tool.llmgate]\nlimit = 3\n")
    assert find_config_file(tmp_path, None) == (tmp_path / "pyproject.toml", {"limit": 3})
    (tmp_path / "llmgate.toml").write_text("limit = 4\n")
    with pytest.raises(pytest.UsageError, match="keep one"):
        find_config_file(tmp_path, None)
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    assert find_config_file(tmp_path, None) == (tmp_path / "llmgate.toml", {"limit": 4})
    (tmp_path / "llmgate.toml").write_text("limit = \n")
    with pytest.raises(pytest.UsageError, match="not valid TOML"):
        find_config_file(tmp_path, None)


def test_cache_true_is_the_default_file_and_false_is_no_cache(tmp_path):
    # ``cache = true`` once made a cache file named "True" beside the configuration.
    assert parse({"cache": True}, tmp_path).cache_path == parse({}, tmp_path).cache_path
    assert parse({}, tmp_path).cache_path == (tmp_path / ".llmgate" / "cache.sqlite").resolve()
    assert parse({"cache": False}, tmp_path).cache_path is None
    assert parse({"cache": "c/x.sqlite"}, tmp_path).cache_path == (tmp_path / "c" / "x.sqlite").resolve()


def test_relative_paths_are_relative_to_the_config(tmp_path):
    (tmp_path / "weights").mkdir()
    (tmp_path / "data").mkdir()  # a data_dir that does not exist is a usage error (test_faults.py)
    config = parse_config({"models": {"m": {"path": "./weights"}}, "data_dir": "data"},
                          source=tmp_path / "pyproject.toml", known_tasks=TASKS, rootpath=tmp_path)
    assert config.models["m"].path == str(tmp_path / "weights")
    assert config.data_dir == tmp_path / "data"


def test_top_level_num_fewshot_leaves_truthfulqa_zero_shot_as_lm_eval_does():
    # lm-eval's --num_fewshot is ignored by tasks whose YAML pins num_fewshot: 0 (TruthfulQA).
    config = parse({"num_fewshot": 5, "task": {"truthfulqa_mc1": {"num_fewshot": 2}}})
    assert TASKS["truthfulqa_mc2"].pins_num_fewshot and TASKS["truthfulqa_mc1"].pins_num_fewshot
    assert not TASKS["arc_challenge"].pins_num_fewshot
    assert config.prompt_options("arc_challenge") == {"num_fewshot": 5}
    assert config.prompt_options("truthfulqa_mc2", pinned_shots=True) == {}
    assert config.prompt_options("truthfulqa_mc1", pinned_shots=True) == {"num_fewshot": 2}

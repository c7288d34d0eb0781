"""backend = "llama_cpp" on the real default model's GGUF file, and the GGUF ladder written by llama.cpp's quantizer.

The reference values come from llama.cpp itself (the runtime's logits, read row by row) and from the
transformers backend on the same file; the agreement table in benchmarks/fidelity/README.md covers more rows.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pytest_llmgate.config import ModelSpec
from pytest_llmgate.models import load_backend, model_fingerprint
from pytest_llmgate.models.gguf_files import quantized_gguf
from pytest_llmgate.models.llama_cpp_backend import LlamaCppBackend
from pytest_llmgate.tasks import TASKS
from pytest_llmgate.tasks.base import GenerationRequest, LoglikelihoodRequest

SPEC = ModelSpec(name="smollm2", backend="llama_cpp")


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory, gguf_ladder) -> Path:
    """A work folder holding the session's F16, Q8_0 and Q4_K_M files (built once by ``quantized_gguf``,
    conftest.py): the tests below read them as a gate run reads its work folder's files."""
    work = tmp_path_factory.mktemp("llama-work")
    gguf_ladder(work, "F16", "Q8_0", "Q4_K_M")
    return work


@pytest.fixture(scope="module")
def llama(work_dir):
    backend = load_backend(SPEC, device="cpu", work_dir=work_dir, fingerprint=model_fingerprint(SPEC), threads=2)
    assert isinstance(backend, LlamaCppBackend)
    yield backend
    backend.close()


def test_loglikelihoods_are_llama_cpps_logits(llama):
    requests = [
        LoglikelihoodRequest("The capital of France is", " Paris"),
        LoglikelihoodRequest("The capital of France is", " London"),
        LoglikelihoodRequest("1, 2, 3, 4,", " 5"),
    ]
    (paris, paris_greedy), (london, london_greedy), (five, five_greedy) = llama.loglikelihood(requests)
    # Measured with llama-cpp-python 0.3.36 on the shipped Q4_1 file (row i of the logits predicts token i+1).
    assert paris == pytest.approx(-0.2644, abs=2e-3) and paris_greedy
    assert london == pytest.approx(-4.4007, abs=2e-3) and not london_greedy
    assert five == pytest.approx(-0.1638, abs=2e-3) and five_greedy


def test_requests_are_built_as_lm_eval_builds_them(llama):
    # A trailing space of the context moves to the continuation (lm-eval's _encode_pair).
    assert llama.encode_pair("Answer: ", "yes") == llama.encode_pair("Answer:", " yes")
    # SmolLM2 adds no BOS (its GGUF says add_bos_token = false): tokens as the transformers backend's.
    context, continuation = llama.encode_pair(
        "Question: An astronomer observes that a planet rotates faster after a meteorite impact. "
        "Which is the most likely effect of this increase in rotation?\nAnswer:",
        " Planetary density will decrease.",
    )
    assert len(context) == 30 and context[:5] == [17872, 42, 1117, 25498, 28975]
    assert continuation == [34666, 6759, 523, 6302, 30]
    # An empty context is the BOS token, as lm-eval's prefix_token_id.
    assert llama.encode_pair("", "Hello")[0] == [llama.llm.token_bos()]


def test_results_do_not_depend_on_order_or_grouping(llama, shared_datasets):
    items, _ = TASKS["hellaswag"].load(shared_datasets, limit=4)
    requests = [r for item in items for r in item.requests]
    together = llama.loglikelihood(requests)
    reversed_order = llama.loglikelihood(requests[::-1])[::-1]
    one_by_one = [llama.loglikelihood([r])[0] for r in requests]
    assert together == reversed_order == one_by_one  # bit for bit: a prefix's logits do not depend on history


def _hellaswag_agreement(first, second, shared_datasets, limit: int) -> float:
    """Same prediction on every item (asserted); the largest summed log-likelihood difference (returned)."""
    items, _ = TASKS["hellaswag"].load(shared_datasets, limit=limit)
    largest = 0.0
    for item in items:
        ours = TASKS["hellaswag"].score(item, first.loglikelihood(item.requests))
        theirs = TASKS["hellaswag"].score(item, second.loglikelihood(item.requests))
        assert ours["scores"] == theirs["scores"], item.item_id
        largest = max(
            largest, *(abs(a - b) for a, b in zip(ours["loglikelihoods"], theirs["loglikelihoods"], strict=True))
        )
    return largest


def test_same_predictions_as_transformers_on_the_same_weights(shared_datasets, work_dir):
    """The F16 file llama.cpp's ladder starts from, through llama.cpp and through PyTorch (float32)."""
    f16 = {"method": "gguf", "type": "F16"}
    specs = [ModelSpec(name="a", backend="llama_cpp", transform=f16), ModelSpec(name="b", transform=f16)]
    llama_f16, torch_f16 = (
        load_backend(s, device="cpu", work_dir=work_dir, fingerprint=model_fingerprint(s), threads=2) for s in specs
    )
    try:
        assert 0.0 < _hellaswag_agreement(llama_f16, torch_f16, shared_datasets, limit=6) < 0.1
    finally:
        llama_f16.close()
        torch_f16.close()


def test_generation_greedy_stops_and_seeded_samples(llama):
    greedy = GenerationRequest("Count: 1, 2, 3,", until=(", 8",), max_gen_toks=40)
    first = llama.generate([greedy])
    assert first == [[" 4, 5, 6, 7"]]  # cut at the stop string, as lm-eval cuts
    assert llama.generate([greedy]) == first
    sampled = GenerationRequest("Count: 1, 2, 3,", until=("\n",), max_gen_toks=12, temperature=1.0, samples=4, seed=7)
    draws = llama.generate([sampled])[0]
    assert len(draws) == 4 and len(set(draws)) > 1  # independent samples
    # Each sample comes from its own seed: the same with other requests around it, and again on another call.
    assert llama.generate([greedy, sampled])[1] == draws
    assert llama.generate([sampled])[0] == draws
    other_seed = llama.generate([GenerationRequest(sampled.context, sampled.until, 12, 1.0, 1.0, 4, seed=8)])[0]
    assert other_seed != draws


def test_chat_requests_use_the_gguf_chat_template(llama):
    chat = (("user", "What is 2+2?"),)
    text = llama._context_text(GenerationRequest("", until=(), chat=chat))
    # The same text as the transformers backend renders with the tokenizer read from the same file.
    import transformers

    from pytest_llmgate.models import builtin_smollm2
    from pytest_llmgate.models.generation import render_chat

    folder, name = builtin_smollm2()
    assert text == render_chat(transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=name), chat)
    assert text.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    (answer,) = llama.generate([GenerationRequest("", until=("\n",), max_gen_toks=12, chat=chat)])[0]
    assert "4" in answer


def test_gguf_ladder_files_are_built_once_and_report_k_quant_fallbacks(llama, work_dir):
    source = llama.path
    q8 = quantized_gguf(source, "Q8_0", work_dir, threads=2)
    assert q8.path.parent.parent == work_dir / "gguf" and q8.path.name == "Q8_0.gguf"
    assert q8.summary["tensor_types"].get("Q8_0", 0) > 200 and q8.notes == ()
    assert 8.0 < q8.summary["bits_per_weight"] < 9.0
    assert (q8.path.parent / "F16.gguf").is_file()  # the float file the quantizer read (from the shipped Q4_1)
    stamp = q8.path.stat().st_mtime_ns
    again = quantized_gguf(source, "q8_0", work_dir, threads=2)
    assert again.path == q8.path and again.path.stat().st_mtime_ns == stamp
    k_quant = quantized_gguf(source, "Q4_K_M", work_dir, threads=2)
    # SmolLM2's rows are 576 values wide, not a multiple of 256: most tensors fall back, and the note says so.
    assert sum(k_quant.summary["fallback_tensors"].values()) > 100
    assert "not a multiple of 256" in k_quant.notes[0] and "576" in k_quant.notes[0]
    assert json.loads((k_quant.path.parent / "Q4_K_M.json").read_text())["fallback_row_widths"] == [576]


def test_the_float_file_of_a_ladder_says_what_it_was_made_from(llama, work_dir):
    f16 = quantized_gguf(llama.path, "F16", work_dir, threads=2)
    assert f16.path.name == "F16.gguf" and f16.summary["tensor_types"].get("F16", 0) > 200
    assert f16.summary["source"] == {"file": llama.path.name, "type": "Q4_1"}
    assert json.loads((f16.path.parent / "F16.json").read_text())["source"]["type"] == "Q4_1"


def test_a_source_that_is_not_gguf_is_named_in_the_error(tmp_path):
    from pytest_llmgate.models import ModelLoadError

    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(ModelLoadError, match=r"model\.gguf is not a readable GGUF file"):
        quantized_gguf(fake, "Q8_0", tmp_path / "work", threads=1)
    assert not list((tmp_path / "work" / "gguf").rglob("*.gguf"))


def test_gguf_stage_is_the_quantized_file_in_llama_cpp(llama, work_dir):
    spec = ModelSpec(name="q8", backend="llama_cpp", transform={"method": "gguf", "type": "Q8_0"})
    assert model_fingerprint(spec) != model_fingerprint(SPEC)
    q8 = load_backend(spec, device="cpu", work_dir=work_dir, fingerprint=model_fingerprint(spec), threads=2)
    try:
        request = [LoglikelihoodRequest("The capital of France is", " Paris")]
        value = q8.loglikelihood(request)[0][0]
        assert value != llama.loglikelihood(request)[0][0] and value == pytest.approx(-0.2644, abs=0.1)
    finally:
        q8.close()


def test_fingerprint_is_the_gguf_bytes_and_the_runtime(tmp_path, llama):
    copy = tmp_path / "model.gguf"
    copy.write_bytes(llama.path.read_bytes())
    spec = ModelSpec(name="m", backend="llama_cpp", path=str(copy))
    before = model_fingerprint(spec)
    assert model_fingerprint(ModelSpec(name="m", backend="llama_cpp", path=str(copy), n_ctx=512)) != before
    assert model_fingerprint(ModelSpec(name="m", path=str(copy))) != before  # transformers: other kernels
    with copy.open("r+b") as handle:  # one byte of a tensor changes
        handle.seek(os.path.getsize(copy) - 10)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 1]))
    assert model_fingerprint(spec) != before


def test_a_folder_with_several_gguf_files_must_name_one(tmp_path):
    from pytest_llmgate.models import ModelLoadError

    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match=r"several .*a\.gguf, b\.gguf.*gguf_file"):
        LlamaCppBackend(ModelSpec(name="m", backend="llama_cpp", path=str(tmp_path)), device="cpu", work_dir=tmp_path)


GGUF_LADDER = """
[tool.llmgate]
baseline = "f16"
tasks = ["hellaswag"]
limit = 8
data_dir = "{data}"
shard_size = 4

[tool.llmgate.models.f16]
backend = "llama_cpp"
transform = {{ method = "gguf", type = "F16" }}
n_ctx = 1024

[tool.llmgate.models.q8]
backend = "llama_cpp"
transform = {{ method = "gguf", type = "Q8_0" }}
n_ctx = 1024

[tool.llmgate.models.q4km]
backend = "llama_cpp"
transform = {{ method = "gguf", type = "Q4_K_M" }}
n_ctx = 1024

[[tool.llmgate.stages]]
name = "q8"
model = "q8"
min_retention = 0.5
max_size_mb = 200
min_compression_ratio = 1.5

[[tool.llmgate.stages]]
name = "q4km"
model = "q4km"
min_retention = 0.5
"""

HELLASWAG_TEST = """
import pytest

@pytest.mark.llmgate("hellaswag")
def test_hellaswag(llmgate_outcome):
    pass
"""


def test_gguf_ladder_end_to_end_with_and_without_xdist(pytester, shared_datasets, monkeypatch, gguf_ladder):
    (pytester.path / "pyproject.toml").write_text(GGUF_LADDER.format(data=shared_datasets))
    gguf_ladder(pytester.path / ".llmgate", "F16", "Q8_0", "Q4_K_M")  # built once per session (conftest.py)
    pytester.makepyfile(test_bench=HELLASWAG_TEST)
    # Imported before the in-process run: pytester drops the modules a run imports when it ends.
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{pytester.path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    plain = pytester.runpytest("--stage=all", "-p", "no:xdist", "--llmgate-report=plain.json", "--llmgate-mlflow")
    assert plain.ret == 0, plain.stdout.str()
    report = json.loads((pytester.path / "plain.json").read_text())
    assert {role: m["evaluated"] for role, m in report["models"].items()} == {"baseline": 8, "q8": 8, "q4km": 8}
    # The K-quant stage says what llama.cpp's quantizer really wrote for SmolLM2's 576-wide rows.
    assert any("not a multiple of 256" in note for note in report["models"]["q4km"]["notes"])
    assert "fell back to" in plain.stdout.str()
    # Sizes as deployed, read from the files: F16 -> Q8_0 is 1.87x smaller; the fallback-ridden "Q4_K_M" 2.6x, not 3.5x.
    sizes = {role: (m["size_kind"], m["compression_ratio"]) for role, m in report["models"].items()}
    assert sizes["baseline"] == ("measured", 1.0)
    assert sizes["q8"][0] == "measured" and 1.8 < sizes["q8"][1] < 1.95
    assert 2.4 < sizes["q4km"][1] < 2.7
    assert "x smaller than the baseline" in plain.stdout.str()
    size_rules = {
        r["rule"]: r["passed"] for r in report["stages"]["q8"]["rules"] if r["rule"].startswith(("size", "compression"))
    }
    assert size_rules == {"size <= 200 MB": True, "compression >= 1.5x": True}
    # The spec's keys in the tracker: sizes as measured above, one run in the default experiment.
    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("llmgate").experiment_id])
    metrics = run.data.metrics
    for role in ("q8", "q4km"):
        assert metrics[f"{role}/model_size_mb"] == pytest.approx(report["models"][role]["size_bytes"] / 1e6)
        assert metrics[f"{role}/compression_ratio"] == pytest.approx(report["models"][role]["compression_ratio"])
        assert metrics[f"{role}/bits_per_weight"] == pytest.approx(report["models"][role]["bits_per_weight"])
    assert metrics["baseline/model_size_mb"] == pytest.approx(report["models"]["baseline"]["size_bytes"] / 1e6)
    assert (pytester.path / ".llmgate" / "gguf").is_dir()

    dist = pytester.runpytest_subprocess("--stage=all", "-n", "2", "--llmgate-no-cache", "--llmgate-report=dist.json")
    assert dist.ret == 0, dist.stdout.str()
    spread = json.loads((pytester.path / "dist.json").read_text())
    assert set(spread["workers"]) == {"gw0", "gw1"}

    def loglikelihoods(data):
        return {
            (i["id"], role): side["loglikelihoods"]
            for i in data["items"]
            for role, side in [("baseline", i["baseline"]), *i["stages"].items()]
        }

    # Same numbers whatever the process: each worker reads the same files (built once, reused) into llama.cpp.
    assert loglikelihoods(spread) == loglikelihoods(report)
    assert spread["verdict"] == report["verdict"] and spread["exit_code"] == report["exit_code"] == 0

    again = pytester.runpytest("--stage=q8", "-p", "no:xdist", "--llmgate-report=again.json")
    assert again.ret == 0
    cached = json.loads((pytester.path / "again.json").read_text())["models"]
    assert cached["q8"]["evaluated"] == 0 and cached["q8"]["cached"] == 8

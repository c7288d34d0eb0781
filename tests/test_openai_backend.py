"""The openai backend against real servers on 127.0.0.1.

- llama-cpp-python's OpenAI-compatible server serving the default model's GGUF: generation works; its echoed
  prompt log-probabilities are shifted by one token, and the self-check refuses it for log-likelihoods;
- a vLLM-shaped server (tests/servers/vllm_like.py) with correct prompt log-probabilities: the backend's
  log-likelihoods equal llama.cpp's own, computed here;
- faults: 429s then answers, a server that keeps failing, a 4xx, a server killed mid-run and restarted,
  and an API key that must appear nowhere.

llama_cpp is imported at module level: without it these tests fail (CI installs it), they do not skip.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import llama_cpp
import numpy as np
import pytest
from servers import (
    ServerProcess,
    free_port,
    llama_cpp_server_command,
    running,
    smollm2_gguf,
    vllm_like_command,
)
from servers.listing import listing

from pytest_llmgate.cache import ResultCache
from pytest_llmgate.config import ModelSpec
from pytest_llmgate.engine import Engine, ShardError
from pytest_llmgate.models import ModelLoadError, model_fingerprint
from pytest_llmgate.models.openai_backend import (
    EchoFormatError,
    LoglikelihoodUnsupported,
    OpenAIBackend,
    ServerRequestError,
    fingerprint_material,
    score_echo,
    scoring_prompt,
)
from pytest_llmgate.tasks.base import GenerationRequest, LoglikelihoodRequest, TaskItem

FAKE_KEY = "sk-llmgate-FAKE-7f3a9c2e41b8"  # recognisable: must never show up in a message or fingerprint
KEY_ENV = "LLMGATE_TEST_OPENAI_KEY"

PAIRS = [
    ("The capital of France is", " Paris"),
    ("The capital of France is", " London"),
    ("The capital of France is ", "Paris"),  # trailing space moves to the continuation, as lm-eval
    ("Question: What color is the sky on a clear day?\nAnswer:", " The sky is blue."),
    ("Café au lait est", " délicieux"),  # characters of two bytes: offsets count characters
    ("1, 2, 3, 4,", " 5"),
]


# --- fixtures -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_llm() -> Iterator[llama_cpp.Llama]:
    """The default model in llama.cpp in this process: the reference log-likelihoods."""
    llm = llama_cpp.Llama(
        model_path=str(smollm2_gguf()), n_ctx=2048, logits_all=True, verbose=False, n_threads=1, n_threads_batch=1
    )
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """llama-cpp-python's server (stopped with SIGINT, as uvicorn expects)."""
    port = free_port()
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    with running(llama_cpp_server_command(port), port, log, stop_signal=signal.SIGINT) as server:
        yield server


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The vLLM-shaped server, healthy."""
    port = free_port()
    with running(vllm_like_command(port), port, tmp_path_factory.mktemp("vllm") / "server.log") as server:
        yield server


def served(base_url: str, **options: Any) -> ModelSpec:
    """A served model at ``base_url`` (revision set, so no warning, unless the test says otherwise)."""
    options.setdefault("revision", "test-r1")
    return ModelSpec(name="served", backend="openai", base_url=base_url, **options)


@contextmanager
def opened(spec: ModelSpec, backoff: float = 0.01) -> Iterator[OpenAIBackend]:
    """A backend with short retry waits, always closed."""
    backend = OpenAIBackend(spec)
    backend.connection.backoff_base = backoff
    try:
        yield backend
    finally:
        backend.close()


def log_softmax(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float64)
    shifted = rows - rows.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def reference(llm: llama_cpp.Llama, context: str, continuation: str) -> tuple[float, bool]:
    """lm-eval's way, on llama.cpp: context and whole encoded apart, the continuation is what follows the
    context's tokens; row i of the scores predicts token i + 1."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = llm.tokenize((context + continuation).encode(), special=True)
    start = len(llm.tokenize(context.encode(), special=True))
    llm.reset()
    llm.eval(whole[:-1])
    rows = log_softmax(np.asarray(llm.scores[: llm.n_tokens]))
    total = sum(float(rows[i - 1][whole[i]]) for i in range(start, len(whole)))
    greedy = all(int(rows[i - 1].argmax()) == whole[i] for i in range(start, len(whole)))
    return total, greedy


def stats(server: ServerProcess) -> dict[str, int]:
    with httpx.Client(timeout=5) as client:
        return dict(client.get(f"http://127.0.0.1:{server.port}/stats").json())


# --- reading echo answers (no server) -----------------------------------------------------------------------


def echo_answer(tokens: list[str], values: list[float | None], tops: list[dict[str, float] | None], prompt_tokens: int):
    offsets, position = [], 0
    for token in tokens:
        offsets.append(position)
        position += len(token)
    text = "".join(tokens[1:]) if tokens[0] == "<s>" else "".join(tokens)
    logprobs = {"tokens": tokens, "text_offset": offsets, "token_logprobs": values, "top_logprobs": tops}
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(tokens) - prompt_tokens}
    return {"choices": [{"text": text, "logprobs": logprobs}], "usage": usage}


def test_score_echo_reads_the_continuation_back_from_the_prompt_end_past_a_bos_token():
    # vLLM echoes a BOS token the tokenizer adds ("<s>": three characters that are not in the text).
    tokens = ["<s>", "The", " sky", " is", " blue", "."]
    values = [None, -3.0, -2.0, -1.0, -0.5, -0.1]
    tops = [None, {"A": -1.0, "The": -3.0}, {" sky": -2.0}, {" is": -1.0}, {" red": -0.4, " blue": -0.5}, {".": -0.1}]
    answer = echo_answer(tokens, values, tops, prompt_tokens=5)
    prompt = "The sky is blue"
    blue = score_echo(answer, prompt, len(" blue"))
    assert (blue.loglikelihood, blue.greedy, blue.tokens) == (-0.5, False, 1)  # the generated "." is left out
    is_blue = score_echo(answer, prompt, len(" is blue"))
    assert (is_blue.loglikelihood, is_blue.greedy, is_blue.tokens) == (-1.5, False, 2)
    # A token that writes any character of the continuation counts for it: " blue" for the continuation "ue".
    straddle = score_echo(answer, prompt, len("ue"))
    assert straddle.tokens == 1 and straddle.loglikelihood == -0.5
    assert (blue.prompt_tokens, blue.reported_prompt_tokens, blue.unscored) == (5, 5, 0)
    tops[4] = {" blue": -0.5}
    greedy = score_echo(echo_answer(tokens, values, tops, prompt_tokens=5), prompt, len(" is blue"))
    assert (greedy.loglikelihood, greedy.greedy) == (-1.5, True)


def test_score_echo_refuses_answers_it_cannot_score():
    tokens, tops = ["Hello", " world"], [None, {" world": -1.0}]
    with pytest.raises(EchoFormatError, match=r"has no log-probability.*context is empty"):
        score_echo(echo_answer(tokens, [None, -1.0], tops, 2), "Hello world", len("Hello world"))
    not_echoed = echo_answer([" world"], [-1.0], [{" world": -1.0}], 0)
    with pytest.raises(EchoFormatError, match="did not echo"):
        score_echo(not_echoed, "Hello world", 6)
    with pytest.raises(EchoFormatError, match="no list 'text_offset'"):
        score_echo({"choices": [{"text": "Hello world", "logprobs": {"tokens": ["x"]}}]}, "Hello world", 6)
    with pytest.raises(ValueError, match="chat template cannot be scored"):
        scoring_prompt(LoglikelihoodRequest("Q", " A", chat=(("user", "Q"),)))
    with pytest.raises(ValueError, match="empty continuation"):
        scoring_prompt(LoglikelihoodRequest("Q", ""))


# --- llama-cpp-python's server: generation works, log-likelihoods are refused --------------------------------


def test_generation_on_llama_cpp_server(llama_server):
    six_stops = ("<zz1>", "<zz2>", "<zz3>", "<zz4>", "<zz5>", ".")  # the sixth is cut here, not by the server
    requests = [
        GenerationRequest("The capital of France is", ("\n",), max_gen_toks=12),
        GenerationRequest("The capital of France is", six_stops, max_gen_toks=12),
        GenerationRequest("The capital of France is", (".",), max_gen_toks=12),
        GenerationRequest("", ("\n\n",), max_gen_toks=16, chat=(("user", "Say hello in one word."),)),
    ]
    with opened(served(llama_server.base_url)) as first, opened(served(llama_server.base_url)) as second:
        arrived: list[tuple[int, list[str]]] = []
        once = first.generate(requests, on_result=lambda i, v: arrived.append((i, v)))
        again = second.generate(requests)
        usage = first.usage
    assert once == again  # greedy: the same completions from two backends
    assert sorted(arrived) == list(enumerate(once))
    plain, six, one = (c[0] for c in once[:3])
    assert plain.startswith(" Paris") and "." in plain  # the server went on past the sentence
    assert six == one == " Paris"  # cut at the stop string, whether the server knew it or not
    assert once[3][0].strip()  # the chat request, through /chat/completions
    assert usage["requests"] == 4 and usage["retries"] == 0
    assert usage["prompt_tokens"] > 15 and usage["completion_tokens"] > 4


def test_sampling_on_llama_cpp_server_is_seeded(llama_server):
    request = GenerationRequest("Once upon a time", (".",), max_gen_toks=10, temperature=1.0, samples=3, seed=7)
    with opened(served(llama_server.base_url, max_in_flight=3)) as backend:
        first, second = backend.generate([request]), backend.generate([request])
    assert first == second and len(first[0]) == 3
    assert len(set(first[0])) > 1  # three seeds, not one sample three times


def test_self_check_refuses_llama_cpp_server_and_generation_still_works(llama_server, caplog):
    with opened(served(llama_server.base_url)) as backend:
        with pytest.raises(LoglikelihoodUnsupported) as refused:
            backend.loglikelihood([LoglikelihoodRequest("The capital of France is", " Paris")])
        message = str(refused.value)
        # The first probe: " Paris" generated at -0.2644, echoed at llama.cpp's shifted -8.4526.
        assert "-0.2644 when the server generates it, but -8.45" in message
        for needed in ("wrong or missing", "hellaswag", "generation tasks (gsm8k", "vLLM", 'backend = "llama_cpp"'):
            assert needed in message
        requests_made = backend.usage["requests"]
        with pytest.raises(LoglikelihoodUnsupported):  # remembered: no new probe
            backend.loglikelihood([LoglikelihoodRequest("A", " b")])
        assert backend.usage["requests"] == requests_made
        completions = backend.generate([GenerationRequest("The capital of France is", (".",), max_gen_toks=8)])
    assert completions == [[" Paris"]]


# --- the vLLM-shaped server: log-likelihoods equal llama.cpp's ----------------------------------------------


def test_loglikelihoods_match_llama_cpp(vllm_server, reference_llm):
    requests = [LoglikelihoodRequest(context, continuation) for context, continuation in PAIRS]
    arrived: dict[int, tuple[float, bool]] = {}
    threads: set[int] = set()

    def record(position: int, value: tuple[float, bool]) -> None:
        threads.add(threading.get_ident())
        assert position not in arrived
        arrived[position] = value

    with opened(served(vllm_server.base_url, max_in_flight=3)) as backend:
        results = backend.loglikelihood(requests, on_result=record)
        assert backend.self_check_gap is not None and backend.self_check_gap < 1e-4
        usage = backend.usage
    expected = [reference(reference_llm, context, continuation) for context, continuation in PAIRS]
    for (value, greedy), (want, want_greedy), pair in zip(results, expected, PAIRS, strict=True):
        assert value == pytest.approx(want, abs=1e-4), pair
        assert greedy is want_greedy, pair
    assert results[0][0] == pytest.approx(-0.2644, abs=1e-4) and results[0][1] is True
    assert results[1][0] == pytest.approx(-4.40, abs=1e-2) and results[1][1] is False
    assert results[2] == pytest.approx(results[0])  # the same text, the space moved
    assert arrived == dict(enumerate(results)) and threads == {threading.get_ident()}
    assert usage["requests"] == 6 + len(PAIRS)  # three probes of two requests each, then one per pair
    # One generated token per request, unless it was the end of text (not counted): left out of the scores.
    assert 6 <= usage["completion_tokens"] <= 6 + len(PAIRS) and usage["prompt_tokens"] > 50


def test_loglikelihood_with_an_empty_context_is_refused_clearly(vllm_server):
    with opened(served(vllm_server.base_url)) as backend:
        with pytest.raises(ServerRequestError, match=r"has no log-probability.*the context is empty"):
            backend.loglikelihood([LoglikelihoodRequest("", "Paris is a city")])
        with pytest.raises(ValueError, match="chat template cannot be scored"):
            backend.loglikelihood([LoglikelihoodRequest("Q", " A", chat=(("user", "Q"),))])


# --- retries and failures -----------------------------------------------------------------------------------


def test_rate_limited_requests_are_retried(tmp_path, reference_llm):
    port = free_port()
    command = vllm_like_command(port, "--fail-first", "3", "--fail-status", "429", "--retry-after", "0")
    with (
        running(command, port, tmp_path / "server.log") as server,
        opened(served(server.base_url, max_in_flight=2, max_retries=5), backoff=5.0) as backend,
    ):
        started = time.monotonic()
        results = backend.loglikelihood([LoglikelihoodRequest(c, x) for c, x in PAIRS[:3]])
        elapsed = time.monotonic() - started
        usage = backend.usage
    assert usage["retries"] == 3  # one per 429; Retry-After: 0 honoured over the 5 s backoff
    assert elapsed < 10
    for (value, _), (context, continuation) in zip(results, PAIRS[:3], strict=True):
        assert value == pytest.approx(reference(reference_llm, context, continuation)[0], abs=1e-4)


def test_a_server_that_keeps_failing_gives_a_clear_error_in_bounded_time(tmp_path):
    port = free_port()
    with (
        running(vllm_like_command(port, "--always-fail", "503"), port, tmp_path / "server.log") as server,
        opened(served(server.base_url, max_retries=2, max_in_flight=2)) as backend,
    ):
        started = time.monotonic()
        with pytest.raises(ServerRequestError) as failed:
            backend.generate([GenerationRequest("Hi", ("\n",), max_gen_toks=4) for _ in range(3)])
        assert time.monotonic() - started < 5
        message = str(failed.value)
        assert "POST /v1/completions failed after 3 tries" in message
        assert "503: the server is failing on purpose" in message and server.base_url in message
        assert backend.usage["retries"] >= 2
        # Once a request has used up its retries, each request gets one try until one succeeds.
        before = stats(server)["completions"]
        with pytest.raises(ServerRequestError, match="failed after 1 try"):
            backend.generate([GenerationRequest("Hi", ("\n",), max_gen_toks=4)])
        assert stats(server)["completions"] == before + 1


def test_a_client_error_is_not_retried(tmp_path):
    port = free_port()
    with (
        running(vllm_like_command(port, "--always-fail", "400"), port, tmp_path / "server.log") as server,
        opened(served(server.base_url, max_retries=4)) as backend,
    ):
        with pytest.raises(ServerRequestError, match=r"POST /v1/completions answered 400: the server is failing"):
            backend.generate([GenerationRequest("Hi", ("\n",), max_gen_toks=4)])
        assert backend.usage["retries"] == 0 and stats(server)["completions"] == 1
        # The self-check turns a server that refuses echo into the self-check's refusal.
        with pytest.raises(LoglikelihoodUnsupported, match="refused a completion request with logprobs"):
            backend.loglikelihood([LoglikelihoodRequest("Q", " A")])


def test_a_server_killed_mid_run_keeps_what_was_answered(tmp_path, reference_llm):
    port = free_port()
    server = ServerProcess(vllm_like_command(port, "--delay", "0.05"), port, tmp_path / "server.log")
    requests = [LoglikelihoodRequest(f"Item {n}: the capital of France is", " Paris") for n in range(10)]
    delivered: dict[int, tuple[float, bool]] = {}

    def record_then_kill(position: int, value: tuple[float, bool]) -> None:
        delivered[position] = value
        if len(delivered) == 3:
            server.kill()

    try:
        server.start()
        with opened(served(server.base_url, max_in_flight=2, max_retries=1)) as backend:
            with pytest.raises(ServerRequestError, match=r"failed after \d tr"):
                backend.loglikelihood(requests, on_result=record_then_kill)
            assert 3 <= len(delivered) < len(requests)
            for position, (value, _) in delivered.items():
                want = reference(reference_llm, requests[position].context, requests[position].continuation)[0]
                assert value == pytest.approx(want, abs=1e-4)
            server.start()  # the same port again
            results = backend.loglikelihood(requests)
            assert 1 < stats(server)["max_in_flight"] <= 2
        assert all(results[p] == pytest.approx(v) for p, v in delivered.items())
    finally:
        server.stop()


def test_engine_caches_answered_items_when_the_server_dies(tmp_path, reference_llm):
    port = free_port()
    items = [
        TaskItem(
            "arc_challenge",
            n,
            "test",
            (LoglikelihoodRequest(f"Item {n}: the capital of France is", " Paris"),),
            0,
            ("Paris",),
        )
        for n in range(6)
    ]
    spec = served(f"http://127.0.0.1:{port}/v1", max_in_flight=1, max_retries=1)

    def engine() -> Engine:
        made = Engine({"m": spec}, ResultCache(tmp_path / "cache.db"), tmp_path, run_id="run-1")
        for item in items:
            made.register("shard", item, "v1")
        return made

    # The self-check's six requests, then three items: the process exits after answering the ninth request.
    dying = ServerProcess(vllm_like_command(port, "--exit-after", "9"), port, tmp_path / "dying.log")
    first = engine()
    try:
        dying.start()
        with pytest.raises(ShardError, match="ServerRequestError"):
            first.result("m", "shard", items[-1])
    finally:
        first.close()
        dying.stop()
    with running(vllm_like_command(port), port, tmp_path / "server.log"):
        second = engine()
        try:
            sides = [second.result("m", "shard", item) for item in items]
        finally:
            second.close()
    assert [side.cached for side in sides] == [True, True, True, False, False, False]
    want = reference(reference_llm, items[0].requests[0].context, " Paris")[0]
    assert sides[0].results[0][0] == pytest.approx(want, abs=1e-4)


# --- the API key ----------------------------------------------------------------------------------------------


def test_the_api_key_appears_in_no_message_fingerprint_or_log(tmp_path, monkeypatch, caplog):
    port = free_port()
    # The server wants the key, fails every completion, and quotes the Authorization header it got.
    command = vllm_like_command(port, "--always-fail", "500", "--api-key", FAKE_KEY, "--echo-auth")
    caplog.set_level(logging.DEBUG, logger="pytest_llmgate")
    spec = served(f"http://127.0.0.1:{port}/v1", api_key_env=KEY_ENV, max_retries=1, revision=None)
    with pytest.raises(ModelLoadError, match=f"environment variable {KEY_ENV}, which is not set"):
        OpenAIBackend(spec)
    monkeypatch.setenv(KEY_ENV, FAKE_KEY)
    with running(command, port, tmp_path / "server.log"):
        material = fingerprint_material(spec, "run-1")
        fingerprint = model_fingerprint(spec, run_id="run-1")
        with opened(spec) as backend, pytest.raises(ServerRequestError) as failed:
            backend.generate([GenerationRequest("Hi", ("\n",), max_gen_toks=4)])
        monkeypatch.setenv(KEY_ENV, FAKE_KEY + "-wrong")
        with pytest.raises(ModelLoadError) as refused:
            OpenAIBackend(spec)
    assert "500: the server is failing on purpose (request had Authorization: Bearer [api key])" in str(failed.value)
    assert "401: Unauthorized (request had Authorization: Bearer" in str(refused.value)
    assert "check the API key" in str(refused.value)
    texts = [json.dumps(material), fingerprint, str(failed.value), str(refused.value), caplog.text]
    assert not any("FAKE-7f3a" in text for text in texts)


# --- fingerprints -----------------------------------------------------------------------------------------------


def vllm_entry(**fields: Any) -> dict[str, Any]:
    entry = {
        "id": "org/model-awq",
        "object": "model",
        "created": 1,
        "owned_by": "vllm",
        "root": "/ckpt/awq",
        "parent": None,
        "max_model_len": 4096,
    }
    entry.update(fields)
    return entry


def test_fingerprint_follows_the_served_model_and_the_revision():
    with listing([vllm_entry()]) as server:
        spec = served(server.base_url, revision="abc123")
        base = model_fingerprint(spec, run_id="run-1")
        server.models = [vllm_entry(created=2)]  # vLLM changes it per request: no effect
        assert model_fingerprint(spec, run_id="run-2") == base
        server.models = [vllm_entry(id="org/model-gptq")]
        assert model_fingerprint(spec, run_id="run-1") != base
        server.models = [vllm_entry(root="/ckpt/other")]
        assert model_fingerprint(spec, run_id="run-1") != base
        server.models = [vllm_entry()]
        assert model_fingerprint(served(server.base_url, revision="def456"), run_id="run-1") != base
        material = fingerprint_material(spec, "run-1")
    assert material["served_model"] == "org/model-awq" and "created" not in material["reported"]
    assert material["reported"]["max_model_len"] == 4096 and "run" not in material


def test_fingerprint_without_revision_is_scoped_to_the_run_unless_reuse_cache(caplog):
    with listing([vllm_entry()]) as server:
        spec = served(server.base_url, revision=None)
        with caplog.at_level(logging.WARNING, logger="pytest_llmgate"):
            material = fingerprint_material(spec, "run-1")
        assert material["run"] == "run-1"
        assert "cannot tell two servings of the same name apart" in caplog.text
        assert model_fingerprint(spec, run_id="run-1") == model_fingerprint(spec, run_id="run-1")
        assert model_fingerprint(spec, run_id="run-1") != model_fingerprint(spec, run_id="run-2")
        reuse = served(server.base_url, revision=None, reuse_cache=True)
        assert "run" not in fingerprint_material(reuse, "run-1")
        assert model_fingerprint(reuse, run_id="run-1") == model_fingerprint(reuse, run_id="run-2")


def test_fingerprint_names_the_model_problem():
    with listing([vllm_entry(), vllm_entry(id="org/other")]) as server:
        with pytest.raises(ModelLoadError, match=r"serves several models .*'org/other'.*set model"):
            fingerprint_material(served(server.base_url), "run-1")
        with pytest.raises(ModelLoadError, match="does not serve 'org/nope'; it serves 'org/model-awq'"):
            fingerprint_material(served(server.base_url, model="org/nope"), "run-1")
        assert fingerprint_material(served(server.base_url, model="org/other"), "r")["served_model"] == "org/other"
    nobody = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(ModelLoadError, match=f"the server at {nobody} did not list its models.*start the server"):
        fingerprint_material(served(nobody, max_retries=0), "run-1")


# --- the plugin end to end against servers on loopback ------------------------------------------------------

SERVED_PROJECT = """
[tool.llmgate]
baseline = "served"
tasks = ["{task}"]
limit = {limit}
data_dir = "{data}"
shard_size = 2

[tool.llmgate.models.served]
backend = "openai"
base_url = "{base_url}"
revision = "smollm2-135m-instruct-q4_1"
max_in_flight = 2
"""

SERVED_TESTS = """
import pytest

@pytest.mark.llmgate("gsm8k")
def test_gsm8k(llmgate_outcome):
    pass

@pytest.mark.llmgate("arc_challenge")
def test_arc(llmgate_outcome):
    pass
"""


def _served_project(
    pytester: pytest.Pytester, base_url: str, data: Path, task: str, limit: int, extra: str = ""
) -> None:
    (pytester.path / "pyproject.toml").write_text(
        SERVED_PROJECT.format(task=task, limit=limit, data=data, base_url=base_url) + extra
    )
    pytester.makepyfile(test_bench=SERVED_TESTS)


def test_gate_on_a_served_model_with_and_without_xdist(pytester, llama_server, shared_datasets):
    # Two examples instead of five: less than half the prompt for the CPU server to read, the same answer format.
    two_shot = "\n[tool.llmgate.task.gsm8k]\nnum_fewshot = 2\n"
    _served_project(pytester, llama_server.base_url, shared_datasets, "gsm8k", 3, extra=two_shot)
    plain = pytester.runpytest("--stage=baseline", "-p", "no:xdist", "--llmgate-report=plain.json")
    assert plain.ret == 0, plain.stdout.str()
    report = json.loads((pytester.path / "plain.json").read_text())
    assert report["verdict"] == "baseline-recorded" and report["models"]["baseline"]["evaluated"] == 3
    # Two workers share the one server; greedy completions are the same whoever asked.
    dist = pytester.runpytest_subprocess(
        "--stage=baseline", "-n", "2", "--llmgate-no-cache", "--llmgate-report=n2.json"
    )
    assert dist.ret == 0, dist.stdout.str()
    spread = json.loads((pytester.path / "n2.json").read_text())
    assert set(spread["workers"]) == {"gw0", "gw1"}

    def completions(data: dict) -> dict:
        return {i["id"]: i["baseline"]["completion"] for i in data["items"]}

    assert completions(spread) == completions(report) and all(completions(report).values())
    # A second run reads every answer from the cache: the revision says which weights the server serves.
    again = pytester.runpytest("--stage=baseline", "-p", "no:xdist", "--llmgate-report=again.json")
    assert again.ret == 0
    assert json.loads((pytester.path / "again.json").read_text())["models"]["baseline"]["cached"] == 3


def test_gate_refuses_loglikelihood_tasks_against_a_server_that_fails_the_self_check(
    pytester, llama_server, shared_datasets
):
    _served_project(pytester, llama_server.base_url, shared_datasets, "arc_challenge", 2)
    result = pytester.runpytest("--stage=baseline", "-p", "no:xdist", "--llmgate-report=report.json")
    assert result.ret == 1  # harness errors: the items could not be evaluated
    out = result.stdout.str()
    assert "wrong or missing log-probabilities" in out and "generation tasks (gsm8k, humaneval, mbpp) do work" in out
    assert json.loads((pytester.path / "report.json").read_text())["verdict"] == "incomplete"


def test_gate_scores_loglikelihood_tasks_against_a_server_with_correct_echo(pytester, vllm_server, shared_datasets):
    _served_project(pytester, vllm_server.base_url, shared_datasets, "arc_challenge", 4)
    result = pytester.runpytest_subprocess("--stage=baseline", "-n", "2", "--llmgate-report=report.json")
    assert result.ret == 0, result.stdout.str()
    report = json.loads((pytester.path / "report.json").read_text())
    first = next(i for i in report["items"] if i["id"] == "test-0")
    # The same row through llama.cpp in process (tests/test_llama_cpp.py's reference): within float rounding.
    spec = ModelSpec(name="direct", backend="llama_cpp")
    from pytest_llmgate.models import load_backend
    from pytest_llmgate.tasks import TASKS

    items, _ = TASKS["arc_challenge"].load(shared_datasets, limit=1)
    direct = load_backend(spec, device="cpu", work_dir=pytester.path, fingerprint="x", threads=1)
    try:
        expected = [value for value, _ in direct.loglikelihood(items[0].requests)]
    finally:
        direct.close()
    assert first["baseline"]["loglikelihoods"] == pytest.approx(expected, abs=1e-3)


def test_greedy_text_matches_llama_cpp_in_process_once_the_servers_penalty_is_off(llama_server):
    """llama-cpp-python's server applies repeat_penalty 1.1 by default, even at temperature 0; with the server's own
    field set through extra_body its greedy text is the arg-max decode of backend = "llama_cpp" on the same file."""
    from pytest_llmgate.models import load_backend

    requests = [
        GenerationRequest("Question: What is 12 + 7?\nAnswer:", until=("\n\n", "Question:"), max_gen_toks=40),
        GenerationRequest("The three primary colours are", until=("\n",), max_gen_toks=40),
    ]
    backend = OpenAIBackend(served(llama_server.base_url, extra_body={"repeat_penalty": 1.0}))
    direct = load_backend(ModelSpec(name="direct", backend="llama_cpp"), device="cpu", work_dir=Path("."),
                          fingerprint="x", threads=1)
    try:
        assert backend.generate(requests) == direct.generate(requests)
    finally:
        backend.close()
        direct.close()

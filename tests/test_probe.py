"""The serving probe (``models.probe``) on the real default model: the transformers backend's batch, llama.cpp's
requests one after another, streamed requests to llama-cpp-python's server on 127.0.0.1, and ``run_probe``'s
fallback to ``generate`` for a backend without ``probe``.

Every probe row decodes exactly ``max_tokens`` tokens, also where greedy decoding would stop at end-of-sequence
(a chat prompt that SmolLM2 answers in two tokens). Stream faults (a malformed stream, an HTTP error quoting the
API key) come from a scripted in-process server.

llama_cpp is imported at module level: without it these tests fail (CI installs it), they do not skip.
"""

from __future__ import annotations

import itertools
import json
import re
import signal
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import llama_cpp  # noqa: F401  (fail, not skip, without it)
import pytest
from servers import ServerProcess, free_port, llama_cpp_server_command, running
from servers.listing import _ListingHandler, listing

from pytest_llmgate.config import ModelSpec
from pytest_llmgate.models import load_backend, model_fingerprint
from pytest_llmgate.models.generation import Decoder, DecodeRow
from pytest_llmgate.models.llama_cpp_backend import LlamaCppBackend
from pytest_llmgate.models.openai_backend import OpenAIBackend, ServerRequestError
from pytest_llmgate.models.probe import ProbeTiming, run_probe
from pytest_llmgate.models.transformers_backend import TransformersBackend
from pytest_llmgate.tasks.base import GenerationRequest

MAX_TOKENS = 8
PROMPTS = ["The capital of France is", "1, 2, 3,", "Once upon a time, in a small village by the sea, there"]
# SmolLM2-135M-Instruct answers this with "No." and its end-of-sequence token: two tokens, then EOS.
EARLY_EOS = "<|im_start|>user\nIs the sky blue? Answer yes or no.<|im_end|>\n<|im_start|>assistant\n"
FAKE_KEY = "sk-llmgate-FAKE-probe-5d1e0b7a"
KEY_ENV = "LLMGATE_TEST_PROBE_KEY"


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("probe-work")


@pytest.fixture(scope="module")
def transformers_backend(work_dir: Path, dequantized_dir: Path) -> Iterator[TransformersBackend]:
    """The built-in default model (SmolLM2-135M-Instruct) in transformers, on the CPU."""
    spec = ModelSpec(name="m")
    backend = load_backend(
        spec, device="cpu", work_dir=work_dir, fingerprint=model_fingerprint(spec), dequantized_dir=dequantized_dir
    )
    assert isinstance(backend, TransformersBackend)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def llama(work_dir: Path) -> Iterator[LlamaCppBackend]:
    """The default model's GGUF file in llama.cpp."""
    spec = ModelSpec(name="smollm2", backend="llama_cpp")
    backend = load_backend(spec, device="cpu", work_dir=work_dir, fingerprint=model_fingerprint(spec), threads=2)
    assert isinstance(backend, LlamaCppBackend)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """llama-cpp-python's server serving the default model's GGUF (stopped with SIGINT, as uvicorn expects).

    By default it ends a streaming request early whenever another one arrives (``interrupt_requests``): concurrent
    probe requests need that switched off, and then it serves them one after another.
    """
    port = free_port()
    log = tmp_path_factory.mktemp("probe-llama-server") / "server.log"
    command = [*llama_cpp_server_command(port), "--interrupt_requests", "False"]
    with running(command, port, log, stop_signal=signal.SIGINT) as server:
        yield server


def assert_full_rows(timings: Sequence[ProbeTiming], count: int) -> None:
    """``count`` rows, each with ``MAX_TOKENS`` tokens and a first token no later than its last."""
    assert len(timings) == count
    for timing in timings:
        assert timing.tokens == MAX_TOKENS
        assert timing.ttft_s is not None
        assert 0 < timing.ttft_s <= timing.seconds


# --- transformers -------------------------------------------------------------------------------------------


def test_transformers_batch_rows_share_the_prefill_and_decode_every_token(transformers_backend):
    timings = transformers_backend.probe([*PROMPTS, EARLY_EOS], MAX_TOKENS)
    assert_full_rows(timings, len(PROMPTS) + 1)
    # One batch: one prefill gives every row its first token at once, and the rows decode in lockstep.
    assert len({t.ttft_s for t in timings}) == 1
    assert len({t.seconds for t in timings}) == 1
    assert timings[0].ttft_s < timings[0].seconds  # seven decode steps after the first token
    assert all(t.decode_tokens_per_s is not None and t.decode_tokens_per_s > 0 for t in timings)
    # generate stops where the model emits EOS; the probe decodes on through it.
    completion = transformers_backend.generate([GenerationRequest(EARLY_EOS, (), max_gen_toks=MAX_TOKENS)])[0][0]
    assert 0 < len(transformers_backend.tokenizer.encode(completion)) < MAX_TOKENS


def test_transformers_batch_of_one(transformers_backend):
    assert_full_rows(transformers_backend.probe(PROMPTS[:1], MAX_TOKENS), 1)


def test_decoder_step_callback_reports_finished_rows_and_changes_nothing(transformers_backend):
    """``Decoder.run``'s ``on_step``: one call per step, each row reported at the step that ends it; the tokens are
    the ones decoded without it."""
    tokenizer = transformers_backend.tokenizer
    decoder = Decoder(
        transformers_backend.model,
        device="cpu",
        pad_id=tokenizer.pad_token_id,
        eos_ids=frozenset(),
        decode=lambda tokens: str(tokenizer.decode(tokens)),
    )
    rows = [
        DecodeRow(tuple(tokenizer.encode(PROMPTS[0])), 3, ()),
        DecodeRow(tuple(tokenizer.encode(PROMPTS[2])), 5, ()),
    ]
    steps: list[list[int]] = []
    with transformers_backend._torch.inference_mode():
        plain = decoder.run(rows)
        watched = decoder.run(rows, steps.append)
    assert watched == plain
    assert [len(tokens) for tokens in watched] == [3, 5]
    assert steps == [[], [], [0], [], [1]]


def test_run_probe_uses_the_backends_probe(transformers_backend):
    timings = run_probe(transformers_backend, PROMPTS[:2], MAX_TOKENS)
    assert_full_rows(timings, 2)


class GenerateOnly:
    """A custom backend without ``probe``: the transformers backend's generate, counted."""

    def __init__(self, backend: TransformersBackend) -> None:
        self._backend = backend
        self.completions: list[list[str]] = []

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[str]]:
        completions = self._backend.generate(requests)
        self.completions.extend(completions)
        return completions


def test_run_probe_without_probe_times_generate_end_to_end(transformers_backend):
    backend = GenerateOnly(transformers_backend)
    timings = run_probe(backend, PROMPTS[:2], MAX_TOKENS)
    assert len(backend.completions) == 2 and all(c[0] for c in backend.completions)
    assert len(timings) == 2
    for timing in timings:
        assert timing.ttft_s is None and timing.tokens is None and timing.decode_tokens_per_s is None
        assert timing.seconds > 0
    assert timings[0].seconds == timings[1].seconds  # one call, one end-to-end time


# --- llama.cpp ----------------------------------------------------------------------------------------------


def test_llama_cpp_requests_run_one_after_another(llama):
    timings = llama.probe([*PROMPTS[:2], EARLY_EOS], MAX_TOKENS)
    assert_full_rows(timings, 3)
    for before, after in itertools.pairwise(timings):
        assert before.seconds <= after.ttft_s  # the next request starts after the last one ended
        assert before.seconds < after.seconds


# --- openai (llama-cpp-python's server) ----------------------------------------------------------------------


def test_openai_streams_concurrent_requests_to_a_real_server(llama_server):
    backend = OpenAIBackend(ModelSpec(name="served", backend="openai", base_url=llama_server.base_url))
    try:
        timings = backend.probe([*PROMPTS[:2], EARLY_EOS], MAX_TOKENS)
    finally:
        backend.close()
    assert_full_rows(timings, 3)  # the EOS prompt too: min_tokens keeps the server decoding
    for timing in timings:
        assert timing.ttft_s is not None and timing.ttft_s < timing.seconds
    assert backend.usage["requests"] == 3


# --- openai: stream faults from a scripted server -----------------------------------------------------------


class _ScriptedStreamHandler(_ListingHandler):
    """The listing server's GET /v1/models, and POST answered with the server's ``answer`` (status, body), in
    which ``{auth}`` is the request's Authorization header (a server that quotes what it received)."""

    def do_POST(self) -> None:
        server: Any = self.server
        length = int(self.headers.get("Content-Length") or 0)
        server.payloads.append(json.loads(self.rfile.read(length)))
        status, body = server.answer
        data = body.replace("{auth}", self.headers.get("Authorization") or "").encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/event-stream" if status == 200 else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def sse(*events: Any) -> str:
    return "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events)


def chunk(text: str, finish_reason: str | None = None) -> dict[str, Any]:
    return {"object": "text_completion", "choices": [{"index": 0, "text": text, "finish_reason": finish_reason}]}


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, OpenAIBackend]]:
    """A scripted server and a backend on it that sends ``FAKE_KEY``."""
    monkeypatch.setenv(KEY_ENV, FAKE_KEY)
    with listing([{"id": "scripted", "object": "model"}]) as server:
        server.RequestHandlerClass = _ScriptedStreamHandler
        server.payloads = []  # type: ignore[attr-defined]
        spec = ModelSpec(name="scripted", backend="openai", base_url=server.base_url, api_key_env=KEY_ENV)
        backend = OpenAIBackend(spec)
        try:
            yield server, backend
        finally:
            backend.close()


def test_openai_counts_tokens_from_the_streams_usage(scripted):
    server, backend = scripted
    server.answer = (
        200,
        sse(chunk("a"), chunk("b"), chunk("", "length"), {"choices": [], "usage": {"completion_tokens": 5}}, "[DONE]"),
    )
    (timing,) = backend.probe(["hi"], 5)
    assert timing.tokens == 5  # usage wins over the two chunks with text
    assert timing.ttft_s is not None and 0 < timing.ttft_s <= timing.seconds
    assert backend.usage["completion_tokens"] == 5
    sent = server.payloads[-1]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert sent["max_tokens"] == 5 and sent["min_tokens"] == 5 and sent["ignore_eos"] is True
    assert sent["temperature"] == 0 and sent["prompt"] == "hi"


def test_openai_counts_chunks_with_text_without_usage(scripted):
    server, backend = scripted
    server.answer = (200, sse(chunk("a"), chunk(""), chunk("b"), chunk("c", "length"), "[DONE]"))
    assert [t.tokens for t in backend.probe(["hi", "ho"], 3)] == [3, 3]


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (sse(chunk("a"), "{not json"), "not JSON"),
        (sse(chunk("a"), chunk("b")), "without data: [DONE]"),
        (sse({"object": "text_completion"}, "[DONE]"), "no choices"),
        (sse({"error": {"message": "out of memory"}}, "[DONE]"), "out of memory"),
        (sse(chunk("a"), "[DONE]"), "--interrupt_requests False"),  # cut short: no finish_reason
    ],
)
def test_openai_malformed_streams_raise(scripted, body, says):
    server, backend = scripted
    server.answer = (200, body)
    with pytest.raises(ServerRequestError, match=re.escape(says)):
        backend.probe(["hi"], 2)


def test_openai_http_error_raises_without_the_api_key(scripted):
    server, backend = scripted
    server.answer = (401, json.dumps({"error": {"message": "bad credentials: {auth}"}}))
    with pytest.raises(ServerRequestError) as raised:
        backend.probe(["hi"], 2)
    assert raised.value.status == 401
    assert "401" in str(raised.value) and "[api key]" in str(raised.value)
    assert FAKE_KEY not in str(raised.value)

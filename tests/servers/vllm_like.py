"""A small OpenAI-compatible server that answers as vLLM does, for the openai backend's tests.

``GET /v1/models`` and ``POST /v1/completions`` in vLLM's documented response shape. With ``echo`` and
``logprobs`` the prompt comes back with its CORRECT log-probabilities (token i scored by the row that
predicts it, the first token without one), computed by llama.cpp on a GGUF file: what vLLM returns, and what
llama-cpp-python's own server gets wrong. Completions without echo come from llama.cpp's sampler.

Faults on request, to test the client: ``--fail-first K`` (the first K completion requests answered with
``--fail-status``, a Retry-After header with ``--retry-after``), ``--always-fail STATUS`` (every completion
request; no model is loaded), ``--exit-after N`` (the process exits right after answering N completion
requests, as a crash), ``--api-key`` (required as a bearer token) and ``--echo-auth`` (error messages quote the
Authorization header received, as a careless proxy might).

Run: ``python tests/servers/vllm_like.py --port 8000 [--gguf FILE] [--model-id NAME] ...``
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np


def log_softmax(rows: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64."""
    rows = rows.astype(np.float64)
    shifted = rows - rows.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


class LlamaModel:
    """A GGUF model in llama.cpp, one request at a time."""

    def __init__(self, gguf: str, threads: int) -> None:
        from llama_cpp import Llama

        # n_threads_batch too: its default (every core) spin-waits at each layer when another process holds a core.
        self.llm = Llama(
            model_path=gguf, n_ctx=2048, logits_all=True, verbose=False, n_threads=threads, n_threads_batch=threads
        )
        self.lock = threading.Lock()

    def tokenize(self, text: str) -> list[int]:
        """The prompt's tokens as llama-cpp-python's server makes them (BOS by the model's own rule)."""
        return list(self.llm.tokenize(text.encode("utf-8"), special=True))

    def pieces(self, tokens: list[int]) -> list[str]:
        """Each token's text, decoded incrementally as vLLM does (offsets add up to the decoded text)."""
        texts = [self.llm.detokenize(tokens[:i]).decode("utf-8", errors="ignore") for i in range(len(tokens) + 1)]
        return [texts[i + 1][len(texts[i]) :] for i in range(len(tokens))]

    def echo(self, prompt: str, max_tokens: int) -> tuple[dict[str, Any], str, int, int]:
        """(vLLM-shaped logprobs, generated text, prompt tokens, generated tokens) for an echo request, greedy."""
        with self.lock:
            tokens = self.tokenize(prompt)
            llm = self.llm
            llm.reset()
            llm.eval(tokens)
            generated: list[int] = []
            for _ in range(max_tokens):
                row = np.asarray(llm.scores[llm.n_tokens - 1])
                token = int(row.argmax())
                if token == llm.token_eos():
                    break
                generated.append(token)
                llm.eval([token])
            rows = log_softmax(np.asarray(llm.scores[: llm.n_tokens]))
        every = tokens + generated
        pieces = self.pieces(every)
        token_logprobs: list[float | None] = [None]
        top_logprobs: list[dict[str, float] | None] = [None]
        for i in range(1, len(every)):
            row = rows[i - 1]
            best = int(row.argmax())
            top = {self.llm.detokenize([best]).decode("utf-8", errors="ignore"): max(float(row[best]), -9999.0)}
            top[pieces[i]] = max(float(row[every[i]]), -9999.0)
            token_logprobs.append(max(float(row[every[i]]), -9999.0))
            top_logprobs.append(top)
        offsets, position = [], 0
        for piece in pieces:
            offsets.append(position)
            position += len(piece)
        logprobs = {
            "text_offset": offsets,
            "token_logprobs": token_logprobs,
            "tokens": pieces,
            "top_logprobs": top_logprobs,
        }
        return logprobs, "".join(pieces[len(tokens) :]), len(tokens), len(generated)

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """llama.cpp's completion (no echo), without llama-cpp-python's server defaults (repeat penalty 1.1)."""
        with self.lock:
            return self.llm.create_completion(  # type: ignore[return-value]
                body["prompt"],
                max_tokens=int(body.get("max_tokens", 16)),
                temperature=float(body.get("temperature", 1.0)),
                top_p=float(body.get("top_p", 1.0)),
                top_k=0,
                min_p=0.0,
                repeat_penalty=1.0,
                stop=body.get("stop") or [],
                seed=body.get("seed"),
                logprobs=body.get("logprobs"),
            )


class State:
    """The server's options and counters."""

    def __init__(self, options: argparse.Namespace) -> None:
        self.options = options
        self.model = None if options.always_fail else LlamaModel(options.gguf, options.threads)
        self.completions = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()

    def ticket(self) -> int:
        """This completion request's number (1 for the first)."""
        with self.lock:
            self.completions += 1
            return self.completions

    def enter(self) -> None:
        """A completion request starts being answered."""
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def leave(self) -> None:
        """A completion request has its answer."""
        with self.lock:
            self.in_flight -= 1


class Handler(BaseHTTPRequestHandler):
    """vLLM's /v1/models and /v1/completions."""

    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body, default=float).encode()  # llama.cpp's log-probabilities are numpy floats
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        options = self.server.state.options
        if options.echo_auth:
            message += f" (request had Authorization: {self.headers.get('Authorization')})"
        body = {"object": "error", "message": message, "type": "BadRequestError", "param": None, "code": status}
        self._send(status, body, headers)

    def _authorized(self) -> bool:
        key = self.server.state.options.api_key
        if key is None or self.headers.get("Authorization") == f"Bearer {key}":
            return True
        self._error(401, "Unauthorized")
        return False

    def do_GET(self) -> None:
        """GET /v1/models (and /stats: completion requests seen, most answered at once)."""
        state = self.server.state
        if self.path == "/stats":
            self._send(200, {"completions": state.completions, "max_in_flight": state.max_in_flight})
            return
        if not self._authorized():
            return
        if self.path != "/v1/models":
            self._error(404, f"no route {self.path}")
            return
        options = self.server.state.options
        entry = {
            "id": options.model_id,
            "object": "model",
            "created": int(time.time() * 1000),  # vLLM sets it per request: not part of a fingerprint
            "owned_by": "vllm",
            "root": options.root or options.gguf,
            "parent": None,
            "max_model_len": 2048,
            "permission": [{"id": f"modelperm-{uuid.uuid4().hex}", "object": "model_permission"}],
        }
        self._send(200, {"object": "list", "data": [entry]})

    def do_POST(self) -> None:
        """POST /v1/completions."""
        length = int(self.headers.get("Content-Length", "0"))
        raw = self.rfile.read(length)
        if not self._authorized():
            return
        if self.path != "/v1/completions":
            self._error(404, f"no route {self.path}")
            return
        state = self.server.state
        options = state.options
        number = state.ticket()
        if options.always_fail:
            self._error(options.always_fail, "the server is failing on purpose")
            return
        if number <= options.fail_first:
            headers = {"Retry-After": options.retry_after} if options.retry_after is not None else None
            self._error(options.fail_status, "rate limited on purpose", headers)
            return
        if options.exit_after and number > options.exit_after:
            os._exit(3)
        state.enter()
        try:
            if options.delay:
                time.sleep(options.delay)
            answer = self._complete(json.loads(raw))
        except ValueError as error:
            self._error(400, str(error))
            return
        finally:
            state.leave()
        self._send(200, answer)
        if options.exit_after and number == options.exit_after:
            os._exit(3)

    def _complete(self, body: dict[str, Any]) -> dict[str, Any]:
        state = self.server.state
        assert state.model is not None
        if body.get("model") != state.options.model_id:
            raise ValueError(f"The model `{body.get('model')}` does not exist.")
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise ValueError("this test server takes one string prompt")
        if body.get("echo"):
            if float(body.get("temperature", 1.0)) != 0.0:
                raise ValueError("this test server echoes greedy requests only")
            logprobs, text, prompt_tokens, completion_tokens = state.model.echo(prompt, int(body.get("max_tokens", 16)))
            choice = {
                "index": 0,
                "text": prompt + text,
                "logprobs": logprobs if body.get("logprobs") is not None else None,
                "finish_reason": "length",
                "stop_reason": None,
                "prompt_logprobs": None,
            }
        else:
            answer = state.model.complete(body)
            choice = dict(answer["choices"][0], stop_reason=None, prompt_logprobs=None)
            prompt_tokens = answer["usage"]["prompt_tokens"]
            completion_tokens = answer["usage"]["completion_tokens"]
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": state.options.model_id,
            "choices": [choice],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "completion_tokens": completion_tokens,
                "prompt_tokens_details": None,
            },
        }


class Server(ThreadingHTTPServer):
    """A threaded HTTP server holding the state."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, state: State) -> None:
        super().__init__(("127.0.0.1", port), Handler)
        self.state = state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--gguf", help="the GGUF file (default: the default model's)")
    parser.add_argument("--model-id", default="smollm2-q4")
    parser.add_argument("--root", help="the model's root in /v1/models (default: the GGUF path)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fail-first", type=int, default=0)
    parser.add_argument("--fail-status", type=int, default=429)
    parser.add_argument("--retry-after")
    parser.add_argument("--always-fail", type=int, default=0)
    parser.add_argument("--exit-after", type=int, default=0)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--api-key")
    parser.add_argument("--echo-auth", action="store_true")
    options = parser.parse_args()
    if options.gguf is None and not options.always_fail:
        from pytest_llmgate.models import builtin_smollm2

        folder, name = builtin_smollm2()
        options.gguf = str(folder / name)
    server = Server(options.port, State(options))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()

"""Served models: any OpenAI-compatible server (vLLM, SGLang, TGI, llama.cpp) through its HTTP API.

Log-likelihoods come from ``POST /completions`` with the prompt echoed back with its log-probabilities
(``echo``, ``logprobs = 1``, ``max_tokens = 1``: the one generated token is left out), as lm-eval's
``local-completions`` model asks for them; completions from ``/completions``, or ``/chat/completions`` for
chat requests. Some servers echo wrong prompt log-probabilities (llama-cpp-python's shifts them by one token)
or none (llama.cpp's own server), so a known-answer self-check runs before the first log-likelihood.

Requests run ``max_in_flight`` at a time, each answer handed to the engine as it arrives (``on_result``, in the
calling thread), so that an interrupted run keeps what was answered. Failures worth retrying (429, 5xx,
connection errors, timeouts) are retried with exponential backoff and full jitter. The API key is read from
the environment and sent only in the ``Authorization`` header: it is in no message, log line or fingerprint.
"""

from __future__ import annotations

import email.utils
import json
import logging
import math
import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..config import ModelSpec
from ..tasks.base import GenerationRequest, LoglikelihoodRequest
from . import ModelLoadError
from .generation import cut_at_stops, sample_seed
from .probe import ProbeTiming

if TYPE_CHECKING:
    import httpx

log = logging.getLogger("pytest_llmgate")

# Bump when what is sent to the server or how its answers are read changes: it is part of the fingerprint.
PROTOCOL_VERSION = "1"
# OpenAI's API (and servers that copy it) take at most 4 stop strings; the rest are cut here.
MAX_STOPS_SENT = 4
# The longest wait a Retry-After header may ask for (seconds).
RETRY_AFTER_CAP = 60.0
# How much of a server's error message goes into an exception.
MESSAGE_LIMIT = 300
# The fields of a model's /models entry that identify it (not ``created``: vLLM sets it per request).
REPORTED_FIELDS = ("id", "root", "parent", "max_model_len", "owned_by")
# Self-check prompts: each usually continues with one common token, generated greedily, then echoed back.
SELF_CHECK_PROBES = ("The capital of France is", "Monday, Tuesday, Wednesday,", "One, two, three, four,")
# A decode step and a prefill of the same position agree to about 1e-6 on a CPU and to a few hundredths in
# bfloat16 on a GPU (different kernels, batch shapes); a shifted or missing log-probability is off by nats.
SELF_CHECK_TOLERANCE = 0.05
# Log-likelihood tasks and generation tasks, named in the self-check's refusal.
LOGLIKELIHOOD_TASKS = "arc_challenge, hellaswag, mmlu, truthfulqa_mc1/mc2, winogrande"
GENERATION_TASKS = "gsm8k, humaneval, mbpp"
# A probe stream may hold this many server-sent-event lines per requested token (data, blank separator, pings,
# a server's own event: lines) plus a fixed allowance (the usage and finish chunks, [DONE]) before it is cut off.
STREAM_LINES_PER_TOKEN = 8
STREAM_EXTRA_LINES = 64


class ServerRequestError(Exception):
    """A request to the server failed (after its retries, when worth retrying); the message says why."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class LoglikelihoodUnsupported(Exception):
    """The server's echoed prompt log-probabilities are wrong or missing: log-likelihood tasks cannot run on it."""


class EchoFormatError(ValueError):
    """An answer to an echo request does not hold what scoring needs (tokens, offsets, log-probabilities)."""


class _Stopped(Exception):
    """A request given up because another request of the same call failed."""


def api_key(spec: ModelSpec) -> str | None:
    """The API key from the environment variable ``spec.api_key_env`` (None when no variable is configured)."""
    if spec.api_key_env is None:
        return None
    key = os.environ.get(spec.api_key_env)
    if not key:
        raise ModelLoadError(
            f"model '{spec.name}': api_key_env names the environment variable {spec.api_key_env}, which is "
            "not set (or empty) in this process; export it before running pytest"
        )
    return key


class ServerConnection:
    """One HTTP client to one server: the retry policy, the API key (in the header only) and the usage counts."""

    def __init__(self, spec: ModelSpec, key: str | None) -> None:
        import httpx

        self._httpx = httpx
        self.base_url = str(spec.base_url).rstrip("/")
        self._base_path = urlsplit(self.base_url).path.rstrip("/")
        self._key = key
        self.max_retries = spec.max_retries
        self.backoff_base = 0.5  # seconds before the first retry, at most (full jitter)
        self.backoff_cap = 20.0
        self.failing = False  # a request used up its retries: one try per request until one succeeds
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0, "requests": 0, "retries": 0}
        self._lock = threading.Lock()
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.Client(
            base_url=self.base_url + "/",
            headers=headers,
            timeout=httpx.Timeout(spec.timeout),
            limits=httpx.Limits(max_connections=spec.max_in_flight, max_keepalive_connections=spec.max_in_flight),
        )

    def redact(self, text: str) -> str:
        """``text`` without the API key (a server may quote the header it received)."""
        return text.replace(self._key, "[api key]") if self._key else text

    def _message(self, response: httpx.Response) -> str:
        """The server's error message (OpenAI, vLLM, FastAPI or plain text), truncated and redacted."""
        text = response.text
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict):
            error = body.get("error")
            found = (
                error.get("message")
                if isinstance(error, dict)
                else error or body.get("message") or body.get("detail") or body.get("error_description")
            )
            if found:
                text = found if isinstance(found, str) else json.dumps(found)
        text = " ".join(text.split())
        if len(text) > MESSAGE_LIMIT:
            text = text[:MESSAGE_LIMIT] + "..."
        return self.redact(text) or "(no message)"

    def _backoff(self, retry: int) -> float:
        """Exponential backoff with full jitter before retry number ``retry`` (0 for the first)."""
        return random.uniform(0.0, min(self.backoff_cap, self.backoff_base * 2**retry))

    @staticmethod
    def _retry_after(response: httpx.Response) -> float | None:
        """Seconds a 429 or 503 answer asks to wait (seconds or an HTTP date), capped; None when it does not say."""
        value = response.headers.get("retry-after")
        if value is None or response.status_code not in (429, 503):
            return None
        try:
            seconds = float(value)
        except ValueError:
            try:
                seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
            except (TypeError, ValueError):
                return None
        if math.isnan(seconds):
            return None
        return min(max(seconds, 0.0), RETRY_AFTER_CAP)

    def _count(self, body: Any, retries: int, *, answered: bool) -> None:
        """Add an answer's retries and, for a completion request (``answered``), its token counts."""
        usage = body.get("usage") if isinstance(body, dict) else None
        with self._lock:
            self.usage["requests"] += answered
            self.usage["retries"] += retries
            if isinstance(usage, dict):
                for field in ("prompt_tokens", "completion_tokens"):
                    value = usage.get(field)
                    if isinstance(value, int) and not isinstance(value, bool):
                        self.usage[field] += value

    def request(
        self, method: str, path: str, payload: Mapping[str, Any] | None = None, stop: threading.Event | None = None
    ) -> Any:
        """The JSON answer to ``method path``; 429, 5xx and transport failures retried, other 4xx raised at once.

        ``stop`` set (another request of the same call failed) ends the retries early.
        """
        httpx = self._httpx
        where = f"{method} {self._base_path}/{path}"
        tries = 1 if self.failing else self.max_retries + 1
        last = ""
        for attempt in range(tries):
            if stop is not None and stop.is_set():
                raise _Stopped
            try:
                response = self.client.request(method, path, json=payload)
            except httpx.TransportError as error:
                last = self.redact(f"{type(error).__name__}: {error}" if str(error) else type(error).__name__)
                delay = self._backoff(attempt)
            else:
                status = response.status_code
                if 200 <= status < 300:
                    try:
                        body = response.json()
                    except ValueError:
                        raise ServerRequestError(
                            f"{where} answered {status} with a body that is not JSON: {self._message(response)}",
                            status=status,
                        ) from None
                    self.failing = False
                    self._count(body, attempt, answered=method == "POST")
                    return body
                if status != 429 and status < 500:
                    with self._lock:
                        self.usage["retries"] += attempt
                    raise ServerRequestError(
                        f"{where} answered {status}: {self._message(response)}"
                        + (" (check the API key in api_key_env)" if status in (401, 403) else ""),
                        status=status,
                    )
                last = f"{status}: {self._message(response)}"
                waited = self._retry_after(response)
                delay = self._backoff(attempt) if waited is None else waited
            if attempt + 1 < tries:
                log.debug(
                    "llmgate openai: %s failed (%s); retry %d of %d in %.2fs",
                    where,
                    last,
                    attempt + 1,
                    tries - 1,
                    delay,
                )
                if stop is not None:
                    if stop.wait(delay):
                        raise _Stopped
                else:
                    time.sleep(delay)
        with self._lock:
            self.usage["retries"] += tries - 1
        self.failing = True
        raise ServerRequestError(
            f"{where} failed after {tries} {'try' if tries == 1 else 'tries'}, the last with {last}; "
            f"is the server at {self.base_url} running and able to take the load? (lower max_in_flight, or raise "
            "timeout or max_retries)"
        )

    def stream_events(
        self, path: str, payload: Mapping[str, Any], max_lines: int, stop: threading.Event | None = None
    ) -> Iterator[Any]:
        """The JSON payloads of the server-sent events answering ``POST path`` (``stream: true``), each yielded as
        it arrives, up to ``data: [DONE]``; one try (a retry would spoil the timing of a stream).

        An HTTP error, a transport failure, a data line that is not JSON, a stream that ends without ``[DONE]``
        or runs past ``max_lines`` lines raises ServerRequestError; ``stop`` set ends it early (``_Stopped``).
        """
        httpx = self._httpx
        where = f"POST {self._base_path}/{path}"
        try:
            with self.client.stream("POST", path, json=payload) as response:
                status = response.status_code
                if not 200 <= status < 300:
                    response.read()
                    raise ServerRequestError(
                        f"{where} (stream) answered {status}: {self._message(response)}"
                        + (" (check the API key in api_key_env)" if status in (401, 403) else ""),
                        status=status,
                    )
                lines = response.iter_lines()
                usage: Any = None  # the last event that carries usage (vLLM may send it with every chunk)
                for _ in range(max_lines):
                    if stop is not None and stop.is_set():
                        raise _Stopped
                    line = next(lines, None)
                    if line is None:
                        raise ServerRequestError(f"{where} (stream): the stream ended without data: [DONE]")
                    if not line.startswith("data:"):
                        continue  # blank separators, comments (pings), event: and id: lines
                    data = line[len("data:") :].strip()
                    if data == "[DONE]":
                        self._count(usage, 0, answered=True)
                        return
                    try:
                        event = json.loads(data)
                    except ValueError:
                        shown = data if len(data) <= MESSAGE_LIMIT else data[:MESSAGE_LIMIT] + "..."
                        raise ServerRequestError(
                            f"{where} (stream): an event's data is not JSON: {self.redact(shown)!r}"
                        ) from None
                    if isinstance(event, dict) and isinstance(event.get("usage"), dict):
                        usage = event
                    yield event
                raise ServerRequestError(
                    f"{where} (stream): no data: [DONE] within {max_lines} lines; is this an OpenAI-compatible stream?"
                )
        except httpx.HTTPError as error:
            text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
            raise ServerRequestError(
                f"{where} (stream) failed: {self.redact(text)}; is the server at {self.base_url} running?"
            ) from None

    def close(self) -> None:
        """Close the connections."""
        self.client.close()


def served_model(connection: ServerConnection, spec: ModelSpec) -> dict[str, Any]:
    """The server's ``/models`` entry of the model ``spec`` names (the only one listed when it names none)."""
    where = f"model '{spec.name}'"
    try:
        body = connection.request("GET", "models")
    except ServerRequestError as error:
        raise ModelLoadError(
            f"{where}: the server at {spec.base_url} did not list its models ({error}); start the server, or "
            "fix base_url (vLLM, SGLang, TGI and llama.cpp serve the API under /v1, e.g. http://127.0.0.1:8000/v1)"
        ) from None
    data = body.get("data") if isinstance(body, dict) else None
    entries = (
        [e for e in data if isinstance(e, dict) and isinstance(e.get("id"), str)] if isinstance(data, list) else []
    )
    if not entries:
        raise ModelLoadError(
            f"{where}: GET {spec.base_url}/models answered without a model list ('data' with an 'id' per model); "
            "is base_url an OpenAI-compatible server?"
        )
    names = ", ".join(repr(e["id"]) for e in entries)
    if spec.model is None:
        if len(entries) > 1:
            raise ModelLoadError(f"{where}: the server at {spec.base_url} serves several models ({names}); set model")
        return entries[0]
    for entry in entries:
        if entry["id"] == spec.model:
            return entry
    raise ModelLoadError(f"{where}: the server at {spec.base_url} does not serve {spec.model!r}; it serves {names}")


def fingerprint_material(spec: ModelSpec, run_id: str | None) -> dict[str, Any]:
    """What identifies a served model's outputs: its name and what the server reports about it, and the revision.

    Without a revision nothing tells two servings of the same name apart (other weights, another quantization):
    unless ``reuse_cache`` is set, ``run_id`` (the same in every process of one run) is added, so that results
    are reused within the run only. No run id: a fresh one, so nothing is reused.
    """
    connection = ServerConnection(spec, api_key(spec))
    try:
        entry = served_model(connection, spec)
    finally:
        connection.close()
    material: dict[str, Any] = {
        "served_model": entry["id"],
        "reported": {name: entry[name] for name in REPORTED_FIELDS if name in entry},
        "revision": spec.revision,
        "protocol": PROTOCOL_VERSION,
        "extra_body": dict(spec.extra_body or {}),
    }
    if spec.revision is None:
        log.warning(
            "llmgate: model '%s' (%s at %s) has no revision: the result cache cannot tell two servings of the "
            "same name apart; %s. Set revision to the served checkpoint's commit or hash.",
            spec.name,
            entry["id"],
            spec.base_url,
            "results cached by earlier runs are reused (reuse_cache = true)"
            if spec.reuse_cache
            else "results are reused within this run only",
        )
        if not spec.reuse_cache:
            material["run"] = run_id or uuid.uuid4().hex
    return material


@dataclass(frozen=True)
class EchoScore:
    """What an echo request says about a prompt's continuation."""

    loglikelihood: float
    greedy: bool
    tokens: int  # continuation tokens scored
    prompt_tokens: int  # prompt tokens echoed
    reported_prompt_tokens: int | None  # usage.prompt_tokens, when the server reports it
    unscored: int  # echoed prompt tokens after the first that carry no log-probability


def _list(logprobs: Mapping[str, Any], name: str) -> list[Any]:
    value = logprobs.get(name)
    if not isinstance(value, list):
        raise EchoFormatError(f"the answer's logprobs has no list {name!r}")
    return value


def score_echo(body: Any, prompt: str, continuation_chars: int) -> EchoScore:
    """Score the last ``continuation_chars`` characters of ``prompt`` from the server's echo of it.

    The prompt's tokens are the first ``usage.prompt_tokens`` echoed (those before ``len(prompt)`` when usage is
    missing); what follows them was generated and is left out. Positions are read from ``text_offset`` counted
    back from the prompt's end, so a BOS token the server adds (vLLM echoes it) does not shift them. A token
    counts for the continuation when it writes any of its characters. Greedy: each continuation token's
    log-probability is the highest of its position's ``top_logprobs``.
    """
    try:
        choice = body["choices"][0]
        logprobs = choice["logprobs"]
    except (KeyError, IndexError, TypeError):
        raise EchoFormatError("the answer has no choices[0].logprobs") from None
    if not isinstance(logprobs, dict):
        raise EchoFormatError("the answer's choices[0].logprobs is empty")
    tokens, offsets = _list(logprobs, "tokens"), _list(logprobs, "text_offset")
    values, tops = _list(logprobs, "token_logprobs"), _list(logprobs, "top_logprobs")
    if not tokens or not len(tokens) == len(offsets) == len(values) == len(tops):
        raise EchoFormatError(
            f"the answer's logprobs lists differ in length (tokens {len(tokens)}, text_offset {len(offsets)}, "
            f"token_logprobs {len(values)}, top_logprobs {len(tops)})"
        )
    text = choice.get("text")
    if not isinstance(text, str) or not text.startswith(prompt):
        raise EchoFormatError("the answer's text does not start with the prompt: the server did not echo it")
    usage = body.get("usage")
    reported = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    reported = reported if isinstance(reported, int) and not isinstance(reported, bool) else None
    if reported is not None and 0 < reported <= len(tokens):
        count = reported
    else:
        count = sum(1 for offset in offsets if isinstance(offset, int) and offset < len(prompt))
    if count == 0:
        raise EchoFormatError("the answer echoes no prompt token")
    if not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets[: count + 1]):
        raise EchoFormatError("the answer's text_offset holds something other than integers")
    last = tokens[count - 1]
    prompt_end = offsets[count] if count < len(offsets) else offsets[count - 1] + len(str(last))
    boundary = prompt_end - continuation_chars
    total = 0.0
    greedy = True
    scored = 0
    for index in range(count):
        end = offsets[index + 1] if index + 1 < count else prompt_end
        if end <= boundary:
            continue
        value = values[index]
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise EchoFormatError(
                f"the echoed continuation token {tokens[index]!r} has no log-probability"
                + (" (it is the prompt's first token: the context is empty)" if index == 0 else "")
            )
        top = tops[index]
        numbers = [v for v in top.values() if isinstance(v, (int, float))] if isinstance(top, dict) else []
        if not numbers:
            raise EchoFormatError(f"the echoed continuation token {tokens[index]!r} has no top_logprobs")
        total += float(value)
        greedy = greedy and float(value) >= max(numbers)
        scored += 1
    unscored = sum(1 for v in values[1:count] if not isinstance(v, (int, float)) or isinstance(v, bool))
    return EchoScore(total, greedy, scored, count, reported, unscored)


@dataclass(frozen=True)
class _ScoringPrompt:
    """The text sent for a log-likelihood request, and how many of its last characters are the continuation."""

    text: str
    continuation_chars: int


def scoring_prompt(request: LoglikelihoodRequest) -> _ScoringPrompt:
    """lm-eval's pair rule on text: the context's trailing whitespace belongs to the continuation."""
    if request.chat is not None:
        raise ValueError(
            "a log-likelihood request with a chat template cannot be scored through an OpenAI-compatible server: "
            "/chat/completions does not echo the prompt's log-probabilities and the template is the server's; "
            "set apply_chat_template = false for this model"
        )
    if not request.continuation:
        raise ValueError("cannot score an empty continuation")
    context = request.context
    moved = len(context) - len(context.rstrip())
    return _ScoringPrompt(context + request.continuation, len(request.continuation) + moved)


def _generated(body: Any) -> tuple[str, float]:
    """(text, log-probability) of the one token an answer generated."""
    try:
        choice = body["choices"][0]
        text = choice["text"]
        value = choice["logprobs"]["token_logprobs"][0]
    except (KeyError, IndexError, TypeError):
        raise EchoFormatError("the answer has no choices[0].logprobs.token_logprobs[0]") from None
    if not isinstance(text, str) or not isinstance(value, (int, float)) or isinstance(value, bool):
        raise EchoFormatError("the generated token has no log-probability")
    return text, float(value)


class OpenAIBackend:
    """A model served by an OpenAI-compatible server; each answer is handed over as it arrives."""

    streams_results = True

    def __init__(self, spec: ModelSpec) -> None:
        if not spec.base_url:
            raise ModelLoadError(f"model '{spec.name}': backend = 'openai' needs base_url")
        self.spec = spec
        self._connection = ServerConnection(spec, api_key(spec))
        try:
            self.model: str = served_model(self._connection, spec)["id"]
        except BaseException:
            self._connection.close()
            raise
        self._pool: ThreadPoolExecutor | None = None
        self._check_lock = threading.Lock()
        self._checked = False
        self._refusal: LoglikelihoodUnsupported | None = None
        self.self_check_gap: float | None = None  # largest |generated - echoed| the self-check measured

    @property
    def usage(self) -> dict[str, int]:
        """Summed over this backend's completion requests (the self-check's included): prompt_tokens and
        completion_tokens (from the server's usage fields), requests answered, retries made."""
        return dict(self._connection.usage)

    @property
    def connection(self) -> ServerConnection:
        """The HTTP connection (its retry timings can be changed, e.g. ``backoff_base``)."""
        return self._connection

    # --- log-likelihood -------------------------------------------------------------------------------------

    def loglikelihood(
        self,
        requests: Sequence[LoglikelihoodRequest],
        on_result: Callable[[int, tuple[float, bool]], None] | None = None,
    ) -> list[tuple[float, bool]]:
        """(summed continuation log-probability, greedy) per request, from the server's echo of the prompt.

        ``on_result(position, value)`` is called in this thread as each answer arrives.
        """
        prompts = [scoring_prompt(request) for request in requests]
        if not prompts:
            return []
        self.self_check()
        calls = [[partial(self._score, prompt)] for prompt in prompts]
        return self._run(calls, lambda parts: parts[0], on_result)

    def _echo(self, prompt: str, stop: threading.Event | None = None) -> Any:
        payload = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": 1,
            "echo": True,
        }
        return self._connection.request("POST", "completions", payload, stop)

    def _score(self, prompt: _ScoringPrompt, stop: threading.Event) -> tuple[float, bool]:
        body = self._echo(prompt.text, stop)
        try:
            score = score_echo(body, prompt.text, prompt.continuation_chars)
        except EchoFormatError as error:
            raise ServerRequestError(f"the server's answer to an echo request cannot be scored: {error}") from None
        return score.loglikelihood, score.greedy

    def self_check(self) -> None:
        """Refuse a server whose echoed prompt log-probabilities are wrong or missing (checked once, remembered).

        Each probe prompt gets one token generated greedily with its log-probability; then the prompt and that
        token are sent back with echo, and the echoed log-probability of the token must be the generated one
        (within ``SELF_CHECK_TOLERANCE``), with one log-probability per echoed prompt token.
        """
        with self._check_lock:
            if self._refusal is not None:
                raise self._refusal
            if self._checked:
                return
            try:
                self.self_check_gap = self._probe()
            except LoglikelihoodUnsupported as refusal:
                self._refusal = refusal
                raise
            self._checked = True
            log.info("llmgate: %s passed the echo self-check (gap %.2g)", self.spec.base_url, self.self_check_gap)

    def _refuse(self, what: str) -> LoglikelihoodUnsupported:
        return LoglikelihoodUnsupported(
            f"model '{self.spec.name}': the server at {self.spec.base_url} returns wrong or missing log-probabilities "
            f"for echoed prompt tokens: {what}. Log-likelihood tasks (multiple choice: {LOGLIKELIHOOD_TASKS}) cannot "
            f"be scored against it; generation tasks ({GENERATION_TASKS}) do work. llama-cpp-python's server shifts "
            "prompt log-probabilities by one token (abetlen/llama-cpp-python issues #1983, #1276) and llama.cpp's "
            "server returns none for the prompt: serve the model with vLLM (or SGLang) for log-likelihood tasks, "
            'or evaluate a GGUF file locally with backend = "llama_cpp"'
        )

    def _probe(self) -> float:
        gaps: list[float] = []
        for probe in SELF_CHECK_PROBES:
            generation = {"model": self.model, "prompt": probe, "max_tokens": 1, "temperature": 0, "logprobs": 1}
            try:
                token, generated = _generated(self._connection.request("POST", "completions", generation))
            except ServerRequestError as error:
                if error.status is None or error.status in (401, 403):
                    raise
                raise self._refuse(f"it refused a completion request with logprobs ({error})") from None
            except EchoFormatError as error:
                raise self._refuse(f"asked for logprobs, it answered without them ({error})") from None
            if not token:
                continue  # an end-of-text token: nothing to echo
            prompt = probe + token
            try:
                score = score_echo(self._echo(prompt), prompt, len(token))
            except ServerRequestError as error:
                if error.status is None or error.status in (401, 403):
                    raise
                raise self._refuse(f"it refused a completion request with echo and logprobs ({error})") from None
            except EchoFormatError as error:
                raise self._refuse(f"its answer to a request with echo and logprobs is unusable: {error}") from None
            if score.unscored or (
                score.reported_prompt_tokens is not None and score.reported_prompt_tokens != score.prompt_tokens
            ):
                raise self._refuse(
                    f"for {prompt!r} it echoed {score.prompt_tokens} prompt tokens, {score.unscored} of them (after "
                    f"the first) without a log-probability, where the prompt has {score.reported_prompt_tokens}"
                )
            if score.tokens != 1:
                continue  # the generated token was re-tokenized with its neighbour: this probe says nothing
            gap = abs(score.loglikelihood - generated)
            if not gap <= SELF_CHECK_TOLERANCE:
                raise self._refuse(
                    f"after {probe!r} the token {token!r} has the log-probability {generated:.4f} when the server "
                    f"generates it, but {score.loglikelihood:.4f} when it echoes it back as part of the prompt"
                )
            gaps.append(gap)
        if not gaps:
            raise self._refuse(
                "no self-check probe could be compared (each generated token was re-tokenized together with the "
                "prompt), so the echoed log-probabilities could not be verified"
            )
        return max(gaps)

    # --- generation -----------------------------------------------------------------------------------------

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        on_result: Callable[[int, list[str]], None] | None = None,
    ) -> list[list[str]]:
        """The completions of each request (one when greedy, ``samples`` when sampling), cut at its stop strings.

        Each sample is its own request (``n = 1``) seeded with ``sample_seed(seed, k)``, so that samples do not
        depend on how the server batches. ``on_result(position, completions)`` is called in this thread as
        each request's completions are all in.
        """
        calls: list[list[Callable[[threading.Event], str]]] = []
        for request in requests:
            if request.max_gen_toks < 1:
                raise ValueError(f"max_gen_toks must be at least 1, got {request.max_gen_toks}")
            if request.temperature > 0:
                seeds: list[int | None] = [sample_seed(request.seed, k) % 2**31 for k in range(request.samples)]
            else:
                seeds = [None]
            calls.append([partial(self._complete, request, seed) for seed in seeds])
        return self._run(calls, list, on_result)

    def _complete(self, request: GenerationRequest, seed: int | None, stop: threading.Event) -> str:
        payload: dict[str, Any] = {
            **(self.spec.extra_body or {}),  # the server's own fields (config extra_body); ours below win
            "model": self.model,
            "max_tokens": request.max_gen_toks,
            "temperature": request.temperature if seed is not None else 0.0,
            "n": 1,
        }
        if seed is not None:
            # 31 bits: some servers take the seed as a 32-bit integer.
            payload.update(top_p=request.top_p, seed=seed)
        stops = [s for s in request.until if s]
        if stops:
            payload["stop"] = stops[:MAX_STOPS_SENT]
        if request.chat is None:
            payload["prompt"] = request.context
            body = self._connection.request("POST", "completions", payload, stop)
        else:
            payload["messages"] = [{"role": role, "content": content} for role, content in request.chat]
            body = self._connection.request("POST", "chat/completions", payload, stop)
        try:
            choice = body["choices"][0]
            text = choice["text"] if request.chat is None else choice["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise ServerRequestError("the server's answer to a completion request has no choices[0] text") from None
        return cut_at_stops(text or "", request.until)

    # --- serving probe --------------------------------------------------------------------------------------

    def probe(self, prompts: Sequence[str], max_tokens: int) -> list[ProbeTiming]:
        """The serving probe (``models.probe``): one streamed greedy ``/completions`` request per prompt, all sent at
        once (``max_in_flight`` at a time), each timed from this call's start: ``ttft_s`` at the first chunk that
        carries text, ``seconds`` at the last.

        ``max_tokens`` tokens are asked for whatever the model emits: ``min_tokens`` (honoured by llama-cpp-python's
        server, which ignores ``ignore_eos``, and by vLLM) and ``ignore_eos`` (vLLM, SGLang, llama.cpp's server);
        most servers ignore fields they do not know; a strict one may refuse them (a 400, raised). The token
        count is the stream's ``usage.completion_tokens`` when the server sends usage (``stream_options``
        ``include_usage``: vLLM, SGLang), else the number of chunks that carry text (llama-cpp-python's server sends
        no usage when streaming; it sends one chunk per token, but holds back a token that ends inside a UTF-8
        character and sends it with the next, so that count can fall short). A stream that ends without a
        ``finish_reason`` was cut short and raises: llama-cpp-python's server cuts a streaming request whenever another
        arrives unless started with ``--interrupt_requests False``. Whatever key/value cache the server keeps between
        requests (prefix caching) is the server's, as deployed.
        """
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        start = time.perf_counter()
        calls = [[partial(self._timed_completion, prompt, max_tokens, start)] for prompt in prompts]
        return self._run(calls, lambda parts: parts[0], None)

    def _timed_completion(self, prompt: str, max_tokens: int, start: float, stop: threading.Event) -> ProbeTiming:
        payload: dict[str, Any] = {
            "ignore_eos": True,
            "min_tokens": max_tokens,
            **(self.spec.extra_body or {}),  # the server's own fields (config extra_body); the request's below win
            "model": self.model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "n": 1,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        where = f"the completion stream from {self.spec.base_url}"
        first: float | None = None
        last: float | None = None
        chunks = 0
        reported: int | None = None
        finished = False
        max_lines = STREAM_LINES_PER_TOKEN * max_tokens + STREAM_EXTRA_LINES
        for event in self._connection.stream_events("completions", payload, max_lines, stop):
            now = time.perf_counter() - start
            if not isinstance(event, dict):
                raise ServerRequestError(f"{where}: a chunk is not a JSON object but a {type(event).__name__}")
            error = event.get("error")
            if isinstance(error, (dict, str)):  # vLLM reports a failure after the stream began inside it
                message = error.get("message") if isinstance(error, dict) else error
                raise ServerRequestError(f"{where} reported an error: {self._connection.redact(str(message))}")
            usage = event.get("usage")
            if isinstance(usage, dict):
                value = usage.get("completion_tokens")
                if isinstance(value, int) and not isinstance(value, bool):
                    reported = value
            choices = event.get("choices")
            if not isinstance(choices, list):
                raise ServerRequestError(f"{where}: a chunk has no choices list")
            for choice in choices:
                text = choice.get("text") if isinstance(choice, dict) else None
                if not isinstance(text, str):
                    raise ServerRequestError(f"{where}: a chunk's choice has no text")
                finished = finished or bool(choice.get("finish_reason"))
                if text:
                    chunks += 1
                    last = now
                    if first is None:
                        first = now
        if not finished:
            raise ServerRequestError(
                f"{where} ended after {chunks} chunks with text and no finish_reason: the server cut the completion "
                "short (llama-cpp-python's server does so to a streaming request whenever another one arrives, "
                "unless started with --interrupt_requests False; or set max_in_flight = 1)"
            )
        end = time.perf_counter() - start
        return ProbeTiming(first, reported if reported is not None else chunks, last if last is not None else end)

    # --- requests in flight ---------------------------------------------------------------------------------

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.spec.max_in_flight, thread_name_prefix="llmgate-openai")
        return self._pool

    def _run(
        self,
        calls: Sequence[Sequence[Callable[[threading.Event], Any]]],
        combine: Callable[[list[Any]], Any],
        on_result: Callable[[int, Any], None] | None,
    ) -> list[Any]:
        """Run every call (one per HTTP request; ``calls[i]`` are request i's), ``max_in_flight`` at a time.

        Request i's value (``combine`` of its calls' answers) goes to ``on_result`` in this thread as soon as it
        is whole. After a failure the calls not yet sent are cancelled, those in flight end (their answers are
        still handed over), and the first error is raised.
        """
        stop = threading.Event()
        pending = [len(group) for group in calls]
        parts: list[list[Any]] = [[None] * len(group) for group in calls]
        results: list[Any] = [None] * len(calls)
        pool = self._executor()
        futures: dict[Future[Any], tuple[int, int]] = {}
        failure: BaseException | None = None
        try:
            for i, group in enumerate(calls):
                for k, call in enumerate(group):
                    futures[pool.submit(call, stop)] = (i, k)
            for future in as_completed(futures):
                if future.cancelled():
                    continue
                error = future.exception()
                if error is not None:
                    if failure is None and not isinstance(error, _Stopped):
                        failure = error
                        stop.set()
                        for other in futures:
                            other.cancel()
                    continue
                i, k = futures[future]
                parts[i][k] = future.result()
                pending[i] -= 1
                if pending[i] == 0:
                    results[i] = combine(parts[i])
                    if on_result is not None:
                        on_result(i, results[i])
        except BaseException:
            stop.set()
            for other in futures:
                other.cancel()
            raise
        if failure is not None:
            raise failure
        return results

    def close(self) -> None:
        """Stop the request threads and close the connections (idempotent)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._connection.close()

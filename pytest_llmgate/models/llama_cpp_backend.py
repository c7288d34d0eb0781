"""llama.cpp backend (llama-cpp-python): a GGUF file evaluated with the runtime's own kernels.

Log-likelihoods are read from llama.cpp's logits, with the requests built as the transformers backend
builds them (lm-eval's HFLM rules): the context's trailing spaces move to the continuation, the pair is
tokenized whole (the model's own BOS rule, special tokens parsed as the Hugging Face tokenizer parses
them) and the continuation is what follows the context's tokens; an empty context is the BOS (else EOS)
token; inputs longer than the window are cut on the left to ``n_ctx + 1`` tokens and the last dropped.

llama-cpp-python's high-level API runs one sequence at a time, so "batching" here is key/value reuse:
requests are sorted by their tokens and each one evaluates only what follows the prefix it shares with
the sequence already in the cache (each context of a multiple-choice item once, few-shot prefixes
once per run of equal prefixes). llama.cpp's logits for a prefix do not depend on what was evaluated
before it, so results do not depend on the order or grouping of requests (tested).

Generation is a decode loop over the same logits: greedy is the arg-max (as llama.cpp's greedy
sampler), sampling warps the logits in transformers' order (temperature, top-k 50, top-p) and draws
from a NumPy generator seeded per sample, so a request's samples are reproducible and independent of
the other requests. Each row stops at an end-of-generation token or once its text holds a stop string,
and is cut at the stop strings as lm-eval cuts.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ModelSpec
from ..tasks.base import GenerationRequest, LoglikelihoodRequest
from . import ModelLoadError, resolve_local
from .generation import ChatTemplateMissing, cut_at_stops, encode_pair, sample_seed, stop_strings
from .probe import ProbeTiming

log = logging.getLogger("pytest_llmgate")

DEFAULT_MAX_CTX = 4096  # the window when neither n_ctx nor max_length is set and the model allows more
HF_DEFAULT_TOP_K = 50  # what lm-eval's sampling gets from transformers' generate (see generation.py)
INSTALL_HINT = (
    "backend = 'llama_cpp' needs llama-cpp-python: pip install 'pytest-llmgate[llama-cpp]' "
    "(it compiles llama.cpp, about 4-5 minutes on 2 cores; scripts/install.sh keeps the built wheel)"
)


def import_llama_cpp() -> Any:
    """The llama_cpp module, or a ModelLoadError saying how to install it."""
    try:
        import llama_cpp
    except ImportError as error:
        raise ModelLoadError(f"{INSTALL_HINT} ({error})") from None
    return llama_cpp


def gguf_path(spec: ModelSpec) -> Path:
    """The GGUF file of ``spec``: a .gguf path, a folder's ``gguf_file``, or a folder's only .gguf file."""
    folder, gguf_file = resolve_local(spec)
    if gguf_file is not None:
        return folder / gguf_file
    found = sorted(p.name for p in folder.glob("*.gguf"))
    if len(found) == 1:
        return folder / found[0]
    raise ModelLoadError(
        f"model '{spec.name}': backend 'llama_cpp' runs a GGUF file, and {folder} holds "
        + (
            f"several ({', '.join(found)}): set gguf_file to one of them"
            if found
            else "none: point path at a .gguf file"
        )
    )


def _log_softmax_rows(rows: np.ndarray) -> np.ndarray:
    """Log-probabilities of each row of logits, in float64."""
    rows = rows.astype(np.float64)
    shifted = rows - rows.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


class LlamaCppBackend:
    """A GGUF model in llama.cpp, optionally quantized first by llama.cpp's quantizer (transform 'gguf')."""

    def __init__(self, spec: ModelSpec, *, device: str, work_dir: Path, threads: int | None = None) -> None:
        llama_cpp = import_llama_cpp()
        self._llama_cpp = llama_cpp
        self.spec = spec
        source = gguf_path(spec)
        self.notes: list[str] = []
        self.threads = spec.n_threads or threads or os.cpu_count() or 1
        if spec.transform:
            from .gguf_files import quantized_gguf

            made = quantized_gguf(source, spec.transform["type"], work_dir, threads=self.threads)
            self.path, self.notes = made.path, list(made.notes)
        else:
            self.path = source
        n_gpu_layers = spec.n_gpu_layers
        gpu = device.startswith("cuda")
        if n_gpu_layers is None:
            n_gpu_layers = -1 if gpu and llama_cpp.llama_supports_gpu_offload() else 0
        elif n_gpu_layers != 0 and not llama_cpp.llama_supports_gpu_offload():
            raise ModelLoadError(
                f"model '{spec.name}': n_gpu_layers = {n_gpu_layers}, but this llama-cpp-python was built without "
                "GPU support; rebuild it with CMAKE_ARGS='-DGGML_CUDA=on' or set n_gpu_layers = 0"
            )
        main_gpu = int(device.partition(":")[2] or 0) if gpu else 0
        n_ctx = spec.n_ctx or spec.max_length or DEFAULT_MAX_CTX
        self.llm = self._open(n_ctx, n_gpu_layers, main_gpu)
        trained = self.llm._model.n_ctx_train()
        if not (spec.n_ctx or spec.max_length) and 0 < trained < n_ctx:
            # The file's own window is smaller than the default: the window is the file's (reading it from the
            # GGUF header first would parse the whole tokenizer, about 2 s; reopening costs a fraction of that).
            self.llm.close()
            n_ctx = trained
            self.llm = self._open(n_ctx, n_gpu_layers, main_gpu)
        self.n_gpu_layers = n_gpu_layers
        self.max_length = n_ctx
        vocab = self.llm._model.vocab
        self._vocab = vocab
        bos, eos = self.llm.token_bos(), self.llm.token_eos()
        self.prefix_token_id = bos if bos >= 0 else eos
        self._prefix_text = self._piece(self.prefix_token_id) if self.prefix_token_id >= 0 else None
        self._bos_text = self._piece(bos) if bos >= 0 else None
        self._eos_text = self._piece(eos) if eos >= 0 else None
        metadata = self.llm.metadata
        self._chat_template = metadata.get("tokenizer.chat_template")

    def _open(self, n_ctx: int, n_gpu_layers: int, main_gpu: int) -> Any:
        """llama.cpp's model and context for ``self.path`` with a window of ``n_ctx`` tokens."""
        try:
            return self._llama_cpp.Llama(
                model_path=str(self.path),
                n_ctx=n_ctx,
                n_batch=min(512, n_ctx),
                logits_all=True,  # every position's logits: continuation log-likelihoods need them
                n_threads=self.threads,
                n_threads_batch=self.threads,
                n_gpu_layers=n_gpu_layers,
                main_gpu=main_gpu,
                verbose=False,
            )
        except Exception as error:
            raise ModelLoadError(
                f"model '{self.spec.name}': llama.cpp could not load {self.path}: {type(error).__name__}: {error}"
            ) from error

    # --- tokens -------------------------------------------------------------------------------------

    def _piece(self, token: int) -> str:
        return self.llm.detokenize([token], special=True).decode("utf-8", errors="replace")

    def _encode(self, text: str) -> list[int]:
        """The transformers backend's rule (``generation.encode_text``): no special tokens when the text
        already starts with the prefix token's text; else the model's own BOS rule unless ``add_bos_token``
        says otherwise. Special-token text in the input is parsed as tokens, as Hugging Face tokenizers do."""
        data = text.encode("utf-8")
        if self._prefix_text and text.startswith(self._prefix_text):
            return list(self.llm.tokenize(data, add_bos=False, special=True))
        if self.spec.add_bos_token is None:
            return list(self.llm.tokenize(data, add_bos=True, special=True))
        tokens = list(self.llm.tokenize(data, add_bos=False, special=True))
        bos = self.llm.token_bos()
        return [bos, *tokens] if self.spec.add_bos_token and bos >= 0 else tokens

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's _encode_pair: (context tokens, continuation tokens)."""
        return encode_pair(self._encode, self.prefix_token_id, context, continuation)

    def _context_text(self, request: LoglikelihoodRequest | GenerationRequest) -> str:
        """The request's text, or its chat messages through the GGUF file's chat template."""
        if request.chat is None:
            return request.context
        if not self._chat_template:
            raise ChatTemplateMissing(
                f"the request uses a chat template but {self.path.name} has none (tokenizer.chat_template); "
                "set apply_chat_template = false for this task"
            )
        import jinja2.exceptions
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        formatter = Jinja2ChatFormatter(self._chat_template, self._eos_text or "", self._bos_text or "")
        messages = [{"role": role, "content": content} for role, content in request.chat]
        try:
            return str(formatter(messages=messages).prompt)  # type: ignore[arg-type]
        except jinja2.exceptions.TemplateError:  # as render_chat: many templates refuse a system message
            rest = [m for m in messages if m["role"] != "system"]
            return str(formatter(messages=rest).prompt)  # type: ignore[arg-type]

    # --- evaluation ---------------------------------------------------------------------------------

    def _eval_from_prefix(self, tokens: list[int]) -> None:
        """Make the cache hold ``tokens``, evaluating only what follows the prefix it already holds."""
        llm = self.llm
        held = llm.n_tokens
        same = 0
        limit = min(held, len(tokens) - 1)  # at least one token is evaluated: its logits row is rewritten
        current = llm.input_ids
        while same < limit and current[same] == tokens[same]:
            same += 1
        llm.n_tokens = same  # eval drops the cache cells after it; rows before it stay valid
        llm.eval(tokens[same:])

    def loglikelihood(self, requests: Sequence[LoglikelihoodRequest]) -> list[tuple[float, bool]]:
        """Summed continuation log-probability and greedy flag per request."""
        encoded = [self.encode_pair(self._context_text(r), r.continuation) for r in requests]
        inputs = []
        for request, (context, continuation) in zip(requests, encoded, strict=True):
            if not continuation:
                raise ValueError(f"continuation {request.continuation!r} encodes to no tokens")
            inputs.append((context + continuation)[-(self.max_length + 1) :][:-1])
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for i in sorted(range(len(requests)), key=lambda i: inputs[i]):  # equal prefixes side by side
            tokens, continuation = inputs[i], encoded[i][1]
            self._eval_from_prefix(tokens)
            rows = self.llm.scores[len(tokens) - len(continuation) : len(tokens)]
            logprobs = _log_softmax_rows(rows)
            target = np.asarray(continuation)
            total = float(logprobs[np.arange(len(continuation)), target].sum())
            greedy = bool((rows.argmax(axis=-1) == target).all())
            results[i] = (total, greedy)
        return results

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[str]]:
        """Completions per request: one greedy, or ``samples`` drawn with the request's seed."""
        outputs = []
        for request in requests:
            prompt = self._encode(self._context_text(request)) or [self.prefix_token_id]
            prompt = prompt[-max(1, self.max_length - request.max_gen_toks) :]
            stops = stop_strings(request.until, self._eos_text)
            if request.temperature > 0:
                outputs.append(
                    [
                        self._decode(prompt, request, stops, np.random.default_rng(sample_seed(request.seed, k)))
                        for k in range(request.samples)
                    ]
                )
            else:
                outputs.append([self._decode(prompt, request, stops, None)])
        return outputs

    def _decode(self, prompt: list[int], request: GenerationRequest, stops: Sequence[str], rng: Any) -> str:
        llm = self.llm
        self._eval_from_prefix(prompt)
        new: list[int] = []
        budget = min(request.max_gen_toks, self.max_length - len(prompt))
        text = ""
        while len(new) < budget:
            token = self._next_token(llm.scores[llm.n_tokens - 1], request, rng)
            if self._llama_cpp.llama_vocab_is_eog(self._vocab, token):
                break
            new.append(token)
            text = llm.detokenize(new).decode("utf-8", errors="replace")
            if any(stop and stop in text for stop in stops) or len(new) == budget:
                break
            llm.eval([token])
        return cut_at_stops(text, stops)

    def probe(self, prompts: Sequence[str], max_tokens: int) -> list[ProbeTiming]:
        """The serving probe (``models.probe``): each prompt a new greedy request, one after another (this API
        runs one sequence at a time), ``max_tokens`` tokens each whatever the model emits."""
        llm = self.llm
        timings = []
        start = time.perf_counter()
        for prompt in prompts:
            tokens = (self._encode(prompt) or [self.prefix_token_id])[-max(1, self.max_length - max_tokens) :]
            llm.reset()  # a new request: nothing reused from the last one
            llm.eval(tokens)
            budget = min(max_tokens, self.max_length - len(tokens))
            first = None
            for produced in range(1, budget + 1):
                token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                if first is None:
                    first = time.perf_counter() - start
                if produced < budget:
                    llm.eval([token])
            timings.append(ProbeTiming(first, budget, time.perf_counter() - start))
        llm.reset()
        return timings

    @staticmethod
    def _next_token(logits: np.ndarray, request: GenerationRequest, rng: Any) -> int:
        """Arg-max, or a draw after transformers' warpers: temperature, top-k 50, then top-p."""
        if rng is None:
            return int(np.argmax(logits))
        scaled = logits.astype(np.float64) / request.temperature
        k = min(HF_DEFAULT_TOP_K, scaled.shape[-1])
        kth = np.partition(scaled, -k)[-k]
        scaled = np.where(scaled < kth, -np.inf, scaled)
        order = np.argsort(-scaled, kind="stable")
        probs = np.exp(scaled[order] - scaled[order[0]])
        probs /= probs.sum()
        if request.top_p < 1.0:
            # transformers keeps the smallest set whose mass reaches top_p (and always the top token).
            cumulative = np.cumsum(probs)
            keep = int(np.searchsorted(cumulative, request.top_p) + 1)
            probs = probs[:keep] / probs[:keep].sum()
            order = order[:keep]
        return int(order[rng.choice(len(probs), p=probs)])

    def close(self) -> None:
        """Free llama.cpp's model and context."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.close()
            del self.llm

"""Hugging Face transformers backend: log-likelihoods computed the way lm-evaluation-harness 0.4 does.

Tokenization follows lm-eval's HFLM: trailing spaces of the context move to the continuation, the
pair is encoded whole and the continuation is what follows the context's tokens; special tokens by
the tokenizer's own rule, as lm-eval 0.4 (``_encode``); inputs are truncated on the left to max_length + 1 and the
last token dropped. Only the continuation positions go through the output head, so memory does not
grow with the vocabulary times the sequence length.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import ModelSpec
from ..tasks.base import GenerationRequest, LoglikelihoodRequest
from . import DigestMemo, ModelLoadError, ModelPool, file_sha256, resolve_local
from .batching import CPU_GENERATION_TOKENS, BatchSizer
from .generation import Decoder, DecodeRow, encode_pair, encode_text, eos_token_ids, generate_completions, render_chat
from .kv_scoring import KVScorer, common_prefix, span_scores
from .memory import keep_freed_memory
from .packed_scoring import PackedScorer
from .probe import ProbeTiming

log = logging.getLogger("pytest_llmgate")

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def _torch_dtype(name: str) -> Any:
    import torch

    return "auto" if name == "auto" else getattr(torch, _DTYPES[name])


def _local_folder(folder: Path, gguf_file: str | None, kept: Path | None, revision: str | None = None) -> Path | None:
    """The folder on disk that pytest-llmgate's own readers (``native_llama``, ``light_tokenizer``) may read instead of
    transformers: the GGUF's dequantized copy when there is one, else ``folder`` itself when it is a local folder
    without a GGUF file or a hub revision; None otherwise."""
    if kept is not None:
        return kept
    return folder if gguf_file is None and revision is None and folder.is_dir() else None


def _tokenizer(
    folder: Path,
    gguf_file: str | None,
    pool: ModelPool | None = None,
    saved: tuple[Path, str] | None = None,
    light: bool = False,
) -> Any:
    """The tokenizer of ``folder`` (or of its GGUF file), read once per pool. ``saved``: (folder, key) of the
    GGUF's dequantized copy (``dequantized``), read instead of the GGUF file when there, written when not.
    ``light``: a local folder transformers would read as its tokenizer.json is read without transformers
    (``light_tokenizer``)."""
    from . import dequantized, light_tokenizer

    key = (str(folder), gguf_file, light)
    tokenizers = pool.tokenizers if pool is not None else {}
    if key not in tokenizers:
        kept = dequantized.cached_folder(*saved, "tokenizer") if saved and gguf_file else None
        local = _local_folder(folder, gguf_file, kept)
        found = light_tokenizer.load(local) if light and local is not None else None
        if found is not None:
            tokenizers[key] = found
            return found
        import transformers

        if kept is not None:
            tokenizers[key] = transformers.AutoTokenizer.from_pretrained(str(kept))
        else:
            kwargs = {"gguf_file": gguf_file} if gguf_file else {}
            tokenizers[key] = transformers.AutoTokenizer.from_pretrained(str(folder), **kwargs)
            if saved and gguf_file:
                dequantized.save_folder(*saved, "tokenizer", tokenizers[key].save_pretrained)
    return tokenizers[key]


def _pretrained(
    folder: Path,
    gguf_file: str | None,
    dtype: str,
    revision: str | None,
    *,
    private: bool,
    pool: ModelPool | None = None,
    saved: tuple[Path, str] | None = None,
    native: bool = False,
) -> Any:
    """The model read from ``folder``, once per pool. ``private``: a copy the caller may change (a transform,
    a move to a GPU); otherwise the pool's shared copy itself, which saves the memory of a second copy when
    the model is evaluated as it is on the CPU. ``native``: read a local safetensors folder (the GGUF's dequantized
    copy too) with ``native_llama`` when it computes that model as transformers does (transformers' class when not).
    """
    import copy

    from . import dequantized

    key = (str(folder), gguf_file, dtype, revision, native)
    pristine = pool.pristine if pool is not None else {}
    if key not in pristine:
        kept = dequantized.cached_folder(*saved, f"model-{dtype}") if saved and gguf_file else None
        local = _local_folder(folder, gguf_file, kept, revision)
        model: Any = None
        if native and local is not None:
            from . import native_llama

            model = native_llama.load(local, dtype)
        pristine[key] = (
            model if model is not None else _transformers_model(folder, gguf_file, dtype, revision, kept, saved)
        )
    return copy.deepcopy(pristine[key]) if private else pristine[key]


def _transformers_model(
    folder: Path,
    gguf_file: str | None,
    dtype: str,
    revision: str | None,
    kept: Path | None,
    saved: tuple[Path, str] | None,
) -> Any:
    """transformers' model class for ``folder`` (``kept``: the GGUF's dequantized copy, read instead when there;
    written to ``saved`` after a GGUF file is read)."""
    import transformers

    from . import dequantized

    if kept is not None:
        return transformers.AutoModelForCausalLM.from_pretrained(str(kept), dtype=_torch_dtype(dtype))
    kwargs: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    if revision:
        kwargs["revision"] = revision
    model: Any = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=_torch_dtype(dtype), **kwargs)
    if gguf_file:
        # GGUF weights are dequantized on load: the model is dense, not "quantized" any more,
        # and transforms (.float(), save_pretrained) must be allowed on it.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        if saved:
            dequantized.save_folder(*saved, f"model-{dtype}", dequantized.save_model(model))
    return model


# Contexts longer than this (median, after the prefix all of a call's contexts share) go through the key/value
# scorer: the packed scorer's tree mask makes attention run over the whole tree, unmasked kernels cannot skip
# anything, and past a few hundred tokens that costs more than the cache copies it saves. Measured on SmolLM2,
# float32, 2 CPU cores (benchmarks/perf/README.md): packed 2.1-2.2x faster on 0-shot ARC-Challenge and
# TruthfulQA (own contexts of 15-40 tokens), key/value 6% faster on MMLU 5-shot (300-400 tokens) and 15-25% on
# HellaSwag 10-shot (450) and ARC-Challenge 25-shot (1000).
PACKED_MAX_CONTEXT = 192


def scoring_for(encoded: Sequence[tuple[Sequence[int], Sequence[int]]]) -> str:
    """The scorer for one call's (context, continuation) pairs: "packed" for short contexts, "kv" for long ones."""
    from statistics import median

    contexts = list({tuple(c): None for c, _ in encoded})
    shared = common_prefix(contexts) if len(contexts) > 1 else 0
    return "packed" if median(len(c) - shared for c in contexts) <= PACKED_MAX_CONTEXT else "kv"


class TransformersBackend:
    """A causal LM from transformers (local folder, GGUF file or hub id), optionally transformed."""

    def __init__(
        self,
        spec: ModelSpec,
        *,
        device: str,
        work_dir: Path,
        fingerprint: str,
        pool: ModelPool | None = None,
        dequantized_dir: Path | None = None,
        file_digest: DigestMemo | None = None,
    ) -> None:
        import torch

        if device == "cpu":
            keep_freed_memory()  # the forward passes' tensors reuse freed memory instead of faulting pages in
        self._torch = torch
        self.spec = spec
        self.pool = pool
        self.device = device
        folder, gguf_file = resolve_local(spec)
        revision = spec.revision if spec.revision and not Path(spec.path).exists() else None
        tokenizer_source = (
            resolve_local(ModelSpec(name=spec.name, path=spec.tokenizer)) if spec.tokenizer else (folder, gguf_file)
        )
        self.notes: list[str] = []
        if spec.transform and spec.transform["method"] == "gguf":
            # The GGUF file llama.cpp's quantizer writes, read back (dequantized) by transformers: the deployed
            # file's weights on PyTorch's kernels. The tokenizer stays the source's.
            from .gguf_files import quantized_gguf
            from .llama_cpp_backend import gguf_path

            made = quantized_gguf(gguf_path(spec), spec.transform["type"], work_dir)
            folder, gguf_file, self.notes = made.path.parent, made.path.name, list(made.notes)
        # A GGUF file is read once and kept dequantized in ``dequantized_dir`` (beside the result cache).
        # ``file_digest``: the result cache's memo (a file is hashed once, not on every start), else hashed here.
        digests: dict[Path, str] = {}

        def digest(path: Path) -> str:
            if path not in digests:
                digests[path] = file_digest(path) if file_digest is not None else file_sha256(path)
            return digests[path]

        def saved(source: tuple[Path, str | None]) -> tuple[Path, str] | None:
            from .dequantized import dequantized_key

            gguf = source[1]
            if gguf is None or revision is not None or dequantized_dir is None:
                return None
            return dequantized_dir, dequantized_key(source[0], gguf, digest)

        try:
            # ``native``: the tokenizer without transformers too, where it reads as transformers reads it.
            self.tokenizer = _tokenizer(*tokenizer_source, pool=pool, saved=saved(tokenizer_source), light=spec.native)
            if spec.backend == "vptq":
                from .quantize import load_vptq_model

                model = load_vptq_model(folder, device="cpu" if device == "cpu" else device)
            else:
                # Evaluated as it is on the CPU, the model is never changed: no copy needed.
                changes = spec.transform is not None and spec.transform["method"] != "gguf"
                # The native Llama only where its equality with transformers is tested: the model as it is read,
                # on the CPU (no GPU path was proven); ``native = false`` keeps transformers' class always.
                native = spec.native and spec.backend == "transformers" and spec.transform is None and device == "cpu"
                model = _pretrained(
                    folder,
                    gguf_file,
                    spec.dtype,
                    revision,
                    private=changes or device != "cpu",
                    pool=pool,
                    saved=saved((folder, gguf_file)),
                    native=native,
                )
        except ModelLoadError:
            raise
        except Exception as error:
            raise ModelLoadError(
                f"model '{spec.name}': transformers could not load {spec.path}: {type(error).__name__}: {error}"
            ) from error
        model = self._apply_transform(model, work_dir / "models" / fingerprint)
        self.model = model.to(device).eval()
        # A native model's own settings: its transformers configuration is built only when a cache needs it.
        config = getattr(self.model, "settings", None) or self.model.config
        self.max_length = spec.max_length or next(
            (
                getattr(config, a)
                for a in ("n_positions", "max_position_embeddings", "n_ctx")
                if getattr(config, a, None)
            ),
            2048,
        )
        self.kv_reuse = True  # False: every request the plain way (the reference the tests compare with)
        # With kv_reuse: "packed" (each item's context and choices in one pass, a tree attention mask), "kv"
        # (context first, then the choices on a copy of its cache) or "auto" (per call, see ``_scoring_for``);
        # all equal the plain path to rounding.
        self.scoring = "auto"
        self._scorers: dict[str, Any] = {}
        self.sizer = BatchSizer(spec.batch_size, device)
        self.generation_sizer = BatchSizer(spec.batch_size, device, cpu_tokens=CPU_GENERATION_TOKENS)
        self.prefix_token_id = (
            self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id
        )
        self._prefix_text = self.tokenizer.decode(self.prefix_token_id) if self.prefix_token_id is not None else None

    def _apply_transform(self, model: Any, checkpoint_dir: Path) -> Any:
        transform = self.spec.transform
        if not transform or transform["method"] == "gguf":  # a gguf transform is a file, already loaded
            return model
        from . import quantize

        if transform["method"] == "rtn":
            quantize.rtn_quantize_(model, int(transform["bits"]), transform.get("group_size", 128))
            return model
        # VPTQ: build the checkpoint once (keyed by the fingerprint), then load it through vptq.
        if not (checkpoint_dir / "config.json").is_file():
            log.info("building VPTQ checkpoint for %s in %s", self.spec.name, checkpoint_dir)
            vector_len = int(transform.get("vector_len", 4))
            quantize.build_vptq_checkpoint(
                model if model.dtype == self._torch.float32 else model.float(),
                checkpoint_dir,
                vector_len=vector_len,
                num_centroids=2 ** (int(transform["bits"]) * vector_len),
                kmeans_iters=int(transform.get("kmeans_iters", 20)),
                seed=int(transform.get("seed", 0)),
            )
        del model
        return quantize.load_vptq_model(checkpoint_dir, device="cpu")

    def _encode(self, text: str) -> list[int]:
        """lm-eval's tok_encode: the tokenizer's own special-token rule (a BOS for Llama-2, Mistral, Gemma;
        none for GPT-2, Qwen, SmolLM2), ``add_bos_token`` when the config sets it, and none when the text
        already starts with the prefix token's text (a chat template that writes the BOS itself)."""
        return encode_text(self.tokenizer, text, self._prefix_text, self.spec.add_bos_token)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's _encode_pair: (context tokens, continuation tokens)."""
        return encode_pair(self._encode, self.prefix_token_id, context, continuation)

    def loglikelihood(self, requests: Sequence[LoglikelihoodRequest]) -> list[tuple[float, bool]]:
        """Summed continuation log-probability and greedy flag per request.

        Pairs that fit the context window go through the packed (or key/value-reusing) scorer (``kv_reuse``,
        ``scoring``); longer ones, which lm-eval truncates on the left, through the plain path.
        """
        encoded = [self.encode_pair(self._context_text(r), r.continuation) for r in requests]
        for request, (_, continuation) in zip(requests, encoded, strict=True):
            if not continuation:
                raise ValueError(f"continuation {request.continuation!r} encodes to no tokens")
        fits = [i for i, (c, t) in enumerate(encoded) if self.kv_reuse and len(c) + len(t) <= self.max_length + 1]
        results: list[tuple[float, bool]] = [(0.0, False)] * len(encoded)
        if fits:
            if self.scoring not in ("packed", "kv", "auto"):
                raise ValueError(f"scoring must be 'packed', 'kv' or 'auto', got {self.scoring!r}")
            scoring = self.scoring if self.scoring != "auto" else scoring_for([encoded[i] for i in fits])
            if scoring not in self._scorers:
                scorer_class = PackedScorer if scoring == "packed" else KVScorer
                self._scorers[scoring] = scorer_class(self.model, self.device, self.sizer)
            with self._torch.inference_mode():
                scored = self._scorers[scoring].score([encoded[i] for i in fits])
                for i, value in zip(fits, scored, strict=True):
                    results[i] = value
        chosen = set(fits)
        rest = [i for i in range(len(encoded)) if i not in chosen]
        for i, value in zip(rest, self._plain([encoded[i] for i in rest]), strict=True):
            results[i] = value
        return results

    def _plain(self, encoded: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """lm-eval's way: each (context + continuation)[:-1] in full, longest first in batches."""
        inputs = [(context + continuation)[-(self.max_length + 1) :][:-1] for context, continuation in encoded]
        order = sorted(range(len(encoded)), key=lambda i: -len(inputs[i]))
        with self._torch.inference_mode():
            values = self.sizer.run(
                order,
                lambda i: len(inputs[i]),
                lambda rows: self._plain_batch([inputs[i] for i in rows], [encoded[i][1] for i in rows]),
            )
        results: list[tuple[float, bool]] = [(0.0, False)] * len(encoded)
        for i, value in zip(order, values, strict=True):
            results[i] = value
        return results

    def _plain_batch(self, inputs: Sequence[list[int]], continuations: Sequence[list[int]]) -> list[tuple[float, bool]]:
        torch = self._torch
        width = max(len(x) for x in inputs)
        ids = torch.zeros((len(inputs), width), dtype=torch.long)
        mask = torch.zeros((len(inputs), width), dtype=torch.long)
        for r, tokens in enumerate(inputs):
            ids[r, : len(tokens)] = torch.tensor(tokens)
            mask[r, : len(tokens)] = 1
        decoder = self.model.get_decoder()
        hidden = decoder(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
        # Gather only the positions that predict continuation tokens.
        spans, targets = [], []
        for r, continuation in enumerate(continuations):
            length = len(inputs[r])
            spans.append(hidden[r, length - len(continuation) : length])
            targets.append(torch.tensor(continuation, device=self.device))
        return span_scores(self.model.get_output_embeddings(), spans, targets)

    def _context_text(self, request: LoglikelihoodRequest | GenerationRequest) -> str:
        """The context the model sees: the request's text, or its chat messages through the chat template."""
        if request.chat is None:
            return request.context
        return render_chat(self.tokenizer, request.chat)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[str]]:
        """Completions per request, as lm-eval's HFLM.generate_until (see ``generation``)."""
        return generate_completions(
            self.model,
            self.tokenizer,
            [self._context_text(r) for r in requests],
            requests,
            device=self.device,
            max_length=self.max_length,
            sizer=self.generation_sizer,
            add_bos_token=self.spec.add_bos_token,
        )

    def probe(self, prompts: Sequence[str], max_tokens: int) -> list[ProbeTiming]:
        """The serving probe (``models.probe``): the prompts as one left-padded batch, prefilled in one pass and
        decoded greedily on a fresh key/value cache, ``max_tokens`` tokens per row whatever the model emits."""
        torch = self._torch
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        if not prompts:
            return []
        cuda = self.device.startswith("cuda")
        tokenizer = self.tokenizer
        start = time.perf_counter()
        room = max(1, self.max_length - max_tokens)
        rows = []
        for prompt in prompts:
            tokens = (self._encode(prompt) or [self.prefix_token_id])[-room:]
            rows.append(DecodeRow(tuple(tokens), min(max_tokens, self.max_length - len(tokens)), ()))
        eos_ids = eos_token_ids(self.model, tokenizer)
        decoder = Decoder(
            self.model,
            device=self.device,
            pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids, default=0),
            eos_ids=frozenset(),  # no token ends a probe row: every row decodes its full budget
            decode=lambda tokens: str(tokenizer.decode(tokens, skip_special_tokens=True)),
        )
        first: list[float] = []
        finished: dict[int, float] = {}

        def on_step(done: list[int]) -> None:
            if first and not done:
                return
            if cuda:  # the clock must see the GPU's work, not only its launch
                torch.cuda.synchronize(self.device)
            now = time.perf_counter() - start
            if not first:
                first.append(now)
            for row in done:
                finished[row] = now

        with torch.inference_mode():
            generated = decoder.run(rows, on_step)
        return [ProbeTiming(first[0], len(tokens), finished[row]) for row, tokens in enumerate(generated)]

    def close(self) -> None:
        """Drop the model (and the pool's pristine copies) and free accelerator memory."""
        del self.model
        if self.pool is not None:
            self.pool.clear()
        if self.device.startswith("cuda"):
            self._torch.cuda.empty_cache()

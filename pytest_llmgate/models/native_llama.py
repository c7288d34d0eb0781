"""A Llama decoder in plain torch, read from a safetensors folder: the default model without transformers' model code.

Importing a transformers model class (``AutoModelForCausalLM`` resolving ``LlamaForCausalLM``) imports
``transformers.modeling_utils``, ``masking_utils`` (which imports ``torch._dynamo``), ``core_model_loading``
(``torch.distributed.tensor``, sympy) and ``loss`` (``scipy.optimize``): about a third of a run's start-up on a
2-core CPU for the 135M-parameter default model. This module computes the same forward pass with torch alone:

- modules and parameters named as transformers' ``LlamaForCausalLM`` (``model.embed_tokens``,
  ``model.layers[i].self_attn.q_proj`` ..., ``lm_head``, tied to the embeddings when the config says so), the
  weights read memory-mapped from the folder's safetensors files (``safe_open``);
- the arithmetic transformers 5 does, operation for operation: RMSNorm in float32 then cast back, rotary
  embeddings from a float32 ``inv_freq``, the attention mask transformers' SDPA mask function builds for each
  form (2-D padding mask with a cache offset, causal or skipped for SDPA's ``is_causal``, 4-D masks as they
  are, packed sequences), and its SDPA call (grouped-query heads repeated, packed or passed with ``enable_gqa``
  as ``integrations.sdpa_attention`` decides);
- the interface the scorers and the decoder use: ``get_decoder()``, ``get_output_embeddings()``, the decoder's
  ``cache`` argument (a transformers ``DynamicCache``, from the light ``cache_utils``), ``logits_to_keep`` and
  ``shared_prefix`` (attention through ``prefix_attention.attention``, what transformers does within
  ``prefix_attention``).

:func:`load` reads a folder only when every setting the forward pass depends on is one this module implements (a
plain Llama: default rotary embeddings, no biases, SiLU, causal) and returns None otherwise, so the caller keeps
transformers' model. The tests compare both on random and real weights; this module is imported only when a model is
loaded, so torch at module level costs nothing elsewhere.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional

from .prefix_attention import SharedPrefix
from .prefix_attention import attention as prefix_attention_forward

log = logging.getLogger("pytest_llmgate")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# transformers' LlamaConfig defaults, for keys a config.json leaves out.
_LLAMA_DEFAULTS: dict[str, Any] = {
    "num_key_value_heads": None,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "use_cache": True,
    "pad_token_id": None,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "head_dim": None,
    "attention_dropout": 0.0,
}
# Keys the forward pass depends on that have no default here: without them, transformers decides.
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def unsupported(raw: Mapping[str, Any]) -> str | None:
    """Why the model of config.json ``raw`` is not one this module computes exactly as transformers, or None."""
    if raw.get("model_type") != "llama":
        return f"model_type {raw.get('model_type')!r} is not 'llama'"
    if list(raw.get("architectures") or ["LlamaForCausalLM"]) != ["LlamaForCausalLM"]:
        return f"architectures {raw.get('architectures')!r} are not ['LlamaForCausalLM']"
    missing = [key for key in _REQUIRED if not isinstance(raw.get(key), int)]
    if missing:
        return f"config.json lacks {', '.join(missing)}"
    if "quantization_config" in raw:
        return "the weights are quantized"
    if raw.get("hidden_act", "silu") != "silu":
        return f"hidden_act {raw.get('hidden_act')!r}"
    if raw.get("attention_bias") or raw.get("mlp_bias"):
        return "attention or MLP biases"
    if raw.get("is_causal", True) is not True:
        return "non-causal attention"
    for key in ("layer_types", "sliding_window", "attention_chunk_size", "kv_sharing_modes", "rope_scaling"):
        if raw.get(key) is not None:
            return f"{key} is set"
    if raw.get("pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp is not 1"
    if _rope_theta(raw) is None:
        return f"rotary embeddings other than the default: {raw.get('rope_parameters')!r}"
    heads, kv_heads = raw["num_attention_heads"], raw.get("num_key_value_heads") or raw["num_attention_heads"]
    if heads % kv_heads:
        return "attention heads not a multiple of the key/value heads"
    if _accelerator_quirks():
        return "transformers' SDPA call differs on machines with XPU, MPS or NPU support"
    return None


def _rope_theta(raw: Mapping[str, Any]) -> float | None:
    """The default rotary embedding's base from ``rope_parameters`` (transformers 5) or ``rope_theta``, else None."""
    parameters = raw.get("rope_parameters")
    if parameters is None:
        theta = raw.get("rope_theta")
        return float(theta) if isinstance(theta, (int, float)) else None
    if not isinstance(parameters, Mapping) or set(parameters) - {"rope_theta", "rope_type"}:
        return None
    if parameters.get("rope_type", "default") != "default":
        return None
    theta = parameters.get("rope_theta")
    return float(theta) if isinstance(theta, (int, float)) else None


def _accelerator_quirks() -> bool:
    """Whether transformers' SDPA integration takes another branch here (it checks XPU, MPS and NPU support, not
    the tensors' device)."""
    import importlib.util

    xpu = getattr(torch, "xpu", None)
    return bool(
        (xpu is not None and xpu.is_available())
        or torch.backends.mps.is_available()
        or importlib.util.find_spec("torch_npu") is not None
    )


def _weight_files(folder: Path) -> list[Path] | None:
    """The folder's safetensors files (one, or the shards of an index), or None."""
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / name for name in names]
    return None


def load(folder: Path, dtype: str) -> NativeLlamaForCausalLM | None:
    """The model in ``folder`` (config.json and safetensors) in ``dtype`` (float32, bfloat16, float16 or auto: the
    config's), or None when it is not a model this module computes as transformers does (the log says why)."""
    config_file = folder / "config.json"
    files = _weight_files(folder)
    if not config_file.is_file() or files is None:
        return None
    raw = json.loads(config_file.read_text())
    reason = unsupported(raw)
    if reason is None and dtype == "auto":
        stored = raw.get("dtype", raw.get("torch_dtype"))
        dtype = stored if stored in _DTYPES else ""
        if not dtype:
            reason = f"dtype 'auto' and the config's dtype is {stored!r}"
    if reason is None and dtype not in _DTYPES:
        reason = f"dtype {dtype!r}"
    if reason is not None:
        log.info("transformers' model class for %s: %s", folder, reason)
        return None
    settings = Settings(raw)
    model = NativeLlamaForCausalLM(settings, folder)
    state = _read_weights(files)
    expected = set(model.state_dict())
    if settings.tie_word_embeddings:
        expected.discard("lm_head.weight")
        state.pop("lm_head.weight", None)  # transformers ties it, whatever the file holds
    if set(state) != expected:
        extra, lacking = sorted(set(state) - expected), sorted(expected - set(state))
        log.info("transformers' model class for %s: weights %s unexpected, %s missing", folder, extra[:3], lacking[:3])
        return None
    model.load_weights(state, _DTYPES[dtype])
    log.info("running %s on the native Llama forward pass (%s)", folder, dtype)
    return model


def _values(raw: Mapping[str, Any]) -> dict[str, Any]:
    """config.json's ``raw`` values with LlamaConfig's defaults and derived sizes filled in."""
    values = {**_LLAMA_DEFAULTS, **raw}
    if values["head_dim"] is None:
        values["head_dim"] = values["hidden_size"] // values["num_attention_heads"]
    if values["num_key_value_heads"] is None:
        values["num_key_value_heads"] = values["num_attention_heads"]
    return values


class Settings:
    """The model's settings as attributes (config.json with LlamaConfig's defaults): what the modules read, without
    importing transformers (its package import alone is about 0.6 s of start-up on a small CPU)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    pad_token_id: int | None
    tie_word_embeddings: bool
    use_cache: bool

    def __init__(self, raw: Mapping[str, Any]) -> None:
        self._values = _values(raw)
        self.__dict__.update(self._values)  # every key, the typed ones above among them

    def to_dict(self) -> dict[str, Any]:
        return dict(self._values)


def light_config(raw: Mapping[str, Any]) -> Any:
    """``raw`` as transformers' base ``PreTrainedConfig`` with LlamaConfig's defaults (importing LlamaConfig itself
    imports ``transformers.activations`` and with it ``torch.distributed``): what ``DynamicCache(config=...)`` and
    the key/value scorer and decoder read, with SDPA attention. Built when first asked for (``model.config``)."""
    from transformers.configuration_utils import PreTrainedConfig

    values = _values(raw)
    config = PreTrainedConfig.from_dict(values)
    for key, value in values.items():  # the base class keeps some keys (tie_word_embeddings...) its own way
        if getattr(config, key, None) != value:
            setattr(config, key, value)
    config._attn_implementation = "sdpa"
    return config


def _generation_config(folder: Path | None, config: Any) -> Any:
    """What ``from_pretrained`` sets as ``generation_config``: the folder's generation_config.json, else the
    config's."""
    from transformers.generation.configuration_utils import GenerationConfig

    if folder is not None and (folder / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(str(folder))
    return GenerationConfig.from_model_config(config)


def _read_weights(files: list[Path]) -> dict[str, Any]:
    """Every tensor of the safetensors ``files``, memory-mapped (pages are read as the forward pass touches them)."""
    from safetensors import safe_open

    state: dict[str, Any] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                state[name] = handle.get_tensor(name)
    return state


@dataclass
class DecoderOutput:
    """The decoder's output, named as transformers' ``BaseModelOutputWithPast`` (transformers 5)."""

    last_hidden_state: Any
    cache: Any = None


@dataclass
class CausalLMOutput:
    """The model's output, named as transformers' ``CausalLMOutputWithPast`` (transformers 5)."""

    logits: Any
    cache: Any = None


class _Linear(nn.Linear):
    """``nn.Linear`` whose construction draws no random weights: they come from the file (and drawing them on the
    meta device imports ``torch._dynamo``, through torch's reference implementations)."""

    def reset_parameters(self) -> None:
        pass


class _Embedding(nn.Embedding):
    """``nn.Embedding`` whose construction draws no random weights (see ``_Linear``)."""

    def reset_parameters(self) -> None:
        pass


class RMSNorm(nn.Module):
    """transformers' LlamaRMSNorm: the variance in float32, the normalized states cast back, then the weight."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class RotaryEmbedding(nn.Module):
    """transformers' default rotary embedding: float32 inverse frequencies, cos and sin cast to the states' dtype."""

    inv_freq: torch.Tensor

    def __init__(self, theta: float, dim: int) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.attention_scaling = 1.0

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    """(rows, key/value heads, length, size) -> (rows, heads, length, size), as transformers' ``repeat_kv``."""
    rows, kv_heads, length, size = states.shape
    if groups == 1:
        return states
    states = states[:, :, None, :, :].expand(rows, kv_heads, groups, length, size)
    return states.reshape(rows, kv_heads * groups, length, size)


def _pack_gqa(states: torch.Tensor | None, groups: int) -> torch.Tensor | None:
    """One query per row: its heads as the queries of their key/value head (transformers' ``pack_gqa``)."""
    if states is None or states.shape[1] == 1:
        return states
    rows, heads, _, size = states.shape
    return states.reshape(rows, heads // groups, groups, size)


def sdpa_attention(
    module: Attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """transformers' ``sdpa_attention_forward`` on a CPU without XPU, MPS or NPU support (``unsupported`` checks)."""
    kwargs: dict[str, Any] = {}
    queries = query.shape[2]
    groups = module.num_key_value_groups
    if groups > 1:
        force = os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA", "0") == "1"
        if force or (mask is None and key.shape[-1] == value.shape[-1] <= 256):
            kwargs["enable_gqa"] = True
        elif queries == 1:
            query = _pack_gqa(query, groups)  # type: ignore[assignment]
            mask = _pack_gqa(mask, groups)
        else:
            key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    causal = queries > 1 and mask is None
    if causal and key.shape[2] > queries:  # transformers' crop for an empty static cache; kept for equality
        key, value = key[:, :, :queries, :], value[:, :, :queries, :]
    out = functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=0.0, scale=module.scaling, is_causal=causal, **kwargs
    )
    out = out.reshape(out.shape[0], -1, queries, value.shape[-1])
    return out.transpose(1, 2).contiguous()


class Attention(nn.Module):
    """transformers' LlamaAttention with SDPA (or ``prefix_attention.attention`` with a shared prefix)."""

    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        hidden, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        self.q_proj = _Linear(hidden, heads * self.head_dim, bias=False)
        self.k_proj = _Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.v_proj = _Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.o_proj = _Linear(heads * self.head_dim, hidden, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Any,
        shared_prefix: SharedPrefix | None,
    ) -> torch.Tensor:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = (t.unsqueeze(1) for t in position_embeddings)
        query, key = (query * cos) + (_rotate_half(query) * sin), (key * cos) + (_rotate_half(key) * sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        if shared_prefix is not None:
            out, _ = prefix_attention_forward(
                self, query, key, value, attention_mask, scaling=self.scaling, shared_prefix=shared_prefix
            )
        else:
            out = sdpa_attention(self, query, key, value, attention_mask)
        return self.o_proj(out.reshape(*input_shape, -1).contiguous())


class MLP(nn.Module):
    """transformers' LlamaMLP with SiLU."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.gate_proj = _Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = _Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = _Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(functional.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """transformers' LlamaDecoderLayer."""

    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Any,
        shared_prefix: SharedPrefix | None,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask, cache, shared_prefix
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        return residual + self.mlp(self.post_attention_layernorm(hidden_states))


def _packed_sequences(position_ids: torch.Tensor) -> torch.Tensor | None:
    """transformers' ``find_packed_sequence_indices``: a sequence index per position where positions restart, or
    None when each row is one sequence."""
    first = position_ids[:, :1] - 1
    packed = (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)
    return None if bool((packed[:, -1] == 0).all()) else packed


def _skip_causal_mask(
    padding: torch.Tensor | None, queries: int, kv_length: int, q_offset: int, kv_offset: int
) -> bool:
    """transformers' ``_ignore_causal_mask_sdpa``: whether SDPA's ``is_causal`` (or no mask) does what the mask
    would."""
    if padding is not None and padding.shape[-1] > kv_length:
        padding = padding[:, torch.arange(kv_length, device=padding.device) + kv_offset]
    if (queries == 1 or kv_length == queries) and (padding is None or bool(padding.all())):
        return True
    return q_offset == 0 and (
        padding is None or (bool(padding[:, :queries].all()) and bool((~padding[:, queries:]).all()))
    )


def causal_mask(
    attention_mask: torch.Tensor | None, embeds: torch.Tensor, cache: Any, position_ids: torch.Tensor | None
) -> torch.Tensor | None:
    """transformers' ``create_causal_mask`` with its SDPA mask function, for a cache of full-attention layers: a 4-D
    mask as it is, else a boolean (rows, 1, queries, keys) mask, or None where SDPA's own causal rule (or none)
    computes the same."""
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask
    if attention_mask is not None and attention_mask.dim() == 2:
        attention_mask = attention_mask.to(device=embeds.device, dtype=torch.bool)
    rows, queries, device = embeds.shape[0], embeds.shape[1], embeds.device
    if cache is not None:
        q_offset = cache.get_query_offset(0)
        kv_length, kv_offset = cache.get_mask_sizes(queries, 0)
    else:
        q_offset, kv_offset = 0, 0
        kv_length = queries if attention_mask is None else attention_mask.shape[-1]
    packed = None
    if position_ids is not None and attention_mask is None and cache is None:
        position_ids = position_ids.expand(rows, -1)
        packed = _packed_sequences(position_ids)
    allow_skip = packed is None and not (getattr(cache, "is_compileable", False) and queries == 1)
    padding = attention_mask
    if padding is not None and (missing := kv_length + kv_offset - padding.shape[-1]) > 0:
        padding = functional.pad(padding, (0, missing))
    if allow_skip and _skip_causal_mask(padding, queries, kv_length, q_offset, kv_offset):
        return None
    batch_index = torch.arange(rows, device=device)[:, None, None, None]
    q_index = (torch.arange(queries, device=device) + q_offset)[None, None, :, None]
    kv_index = (torch.arange(kv_length, device=device) + kv_offset)[None, None, None, :]
    mask = q_index.new_ones((), dtype=torch.bool)
    if packed is None:
        mask = mask & (kv_index <= q_index)
    else:
        assert position_ids is not None
        mask = mask & (position_ids[batch_index, kv_index] <= position_ids[batch_index, q_index])
        mask = mask & (packed[batch_index, q_index] == packed[batch_index, kv_index])
    if padding is not None:
        mask = mask & padding[batch_index, kv_index]
    return mask.expand(rows, -1, queries, kv_length)


class NativeLlamaModel(nn.Module):
    """The decoder: transformers' LlamaModel (``forward`` takes its arguments, ``cache`` as transformers 5 names it)."""

    rotary_emb: RotaryEmbedding  # set by NativeLlamaForCausalLM, outside the meta device

    def __init__(self, config: Settings) -> None:
        super().__init__()
        self.settings = config
        self.embed_tokens = _Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(config, index) for index in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    @cached_property
    def config(self) -> Any:
        """transformers' configuration (``light_config``) of these settings, built on first use."""
        return light_config(self.settings.to_dict())

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        shared_prefix: SharedPrefix | None = None,
    ) -> DecoderOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        assert inputs_embeds is not None
        if use_cache is None:
            use_cache = bool(self.settings.use_cache)
        if use_cache and cache is None:
            from transformers.cache_utils import DynamicCache

            cache = DynamicCache(config=self.config)
        if position_ids is None:
            seen = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + seen).unsqueeze(0)
        mask = causal_mask(attention_mask, inputs_embeds, cache, position_ids)
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_embeddings, mask, cache, shared_prefix)
        return DecoderOutput(last_hidden_state=self.norm(hidden_states), cache=cache)


class NativeLlamaForCausalLM(nn.Module):
    """transformers' LlamaForCausalLM, for inference: the decoder (``model``) and the output head (``lm_head``)."""

    # ``prefix_attention.prefix_attention``: the attention layers call its ``attention`` for ``shared_prefix``.
    attends_shared_prefix = True

    def __init__(self, config: Settings, folder: Path | None = None) -> None:
        super().__init__()
        self.settings = config
        self.folder = folder
        # Parameters without storage (the weights are the file's); the rotary buffer is computed, as transformers'.
        with torch.device("meta"):
            self.model = NativeLlamaModel(config)
            self.lm_head = _Linear(config.hidden_size, config.vocab_size, bias=False)
        theta = _rope_theta(config.to_dict())
        assert theta is not None
        self.model.rotary_emb = RotaryEmbedding(theta, config.head_dim)

    def load_weights(self, state: dict[str, Any], dtype: torch.dtype) -> None:
        """Take ``state``'s tensors as the parameters (no copy when they are already in ``dtype``)."""
        converted = {name: tensor if tensor.dtype == dtype else tensor.to(dtype) for name, tensor in state.items()}
        self.load_state_dict(converted, strict=False, assign=True)
        if self.settings.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.requires_grad_(False)

    @property
    def config(self) -> Any:
        """transformers' configuration of the model (``light_config``), built on first use: the key/value scorer
        and the decoder hand it to ``DynamicCache``; a 0-shot run never asks for it."""
        return self.model.config

    @cached_property
    def generation_config(self) -> Any:
        """What ``from_pretrained`` sets: the folder's generation_config.json, else the config's (built on first
        use, as transformers' ``GenerationConfig``)."""
        return _generation_config(self.folder, self.config)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def get_decoder(self) -> NativeLlamaModel:
        return self.model

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        shared_prefix: SharedPrefix | None = None,
    ) -> CausalLMOutput:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            shared_prefix=shared_prefix,
        )
        hidden_states = out.last_hidden_state
        if isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.ndim == 2:
            if logits_to_keep.dtype == torch.bool:
                hidden_states = hidden_states[logits_to_keep]
            else:
                hidden_states = torch.take_along_dim(hidden_states, logits_to_keep[..., None], dim=1)
        else:
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            hidden_states = hidden_states[:, keep, :]
        return CausalLMOutput(logits=self.lm_head(hidden_states), cache=out.cache)

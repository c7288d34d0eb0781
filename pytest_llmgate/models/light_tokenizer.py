"""A tokenizer folder transformers 5 saved, read with the ``tokenizers`` library alone: start-up without transformers.

Importing transformers costs about 0.6 s of a run's start-up on a 2-core machine (its hub client among it), and a
0-shot run of the default model needs nothing from it but the tokenizer once the model runs on ``native_llama``.
For a folder whose ``tokenizer_config.json`` names transformers' generic backend (``TokenizersBackend``, or
``PreTrainedTokenizerFast`` as transformers 4 wrote it) and sets nothing that makes transformers change the
``tokenizer.json`` it reads, transformers' tokenizer *is* that file's tokenizer: ``encode`` is the file's
``encode``, ``decode`` its ``decode`` (no clean-up of spaces), the special tokens are the config's, already added
tokens of the file. :func:`load` reads such a folder; for any other it returns None (the log says why) and the
caller loads transformers' tokenizer as before. The default model's dequantized tokenizer copy is such a folder.

Rendering a chat template is handed to transformers' own tokenizer, loaded on first use: the template's
semantics stay transformers'. Tests compare both on real dataset text, with and without special tokens.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("pytest_llmgate")

# transformers' generic tokenizer classes: they read tokenizer.json as it is (other classes rebuild it).
GENERIC_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")
# Config keys with which transformers changes the file's tokenizer or its output (a post-processor adding BOS or
# EOS, a prefix space, special tokens split as text, spaces cleaned up after decoding, tokens added at load).
_CHANGING_KEYS = (
    "add_bos_token",
    "add_eos_token",
    "add_prefix_space",
    "split_special_tokens",
    "clean_up_tokenization_spaces",
    "fix_mistral_regex",
    "added_tokens_decoder",
    "additional_special_tokens",
    "extra_special_tokens",
    "tokenizer_file",
    "auto_map",
)
# Above this vocabulary size transformers checks (and may patch) the pre-tokenizer's regex (Mistral's).
_PATCHED_VOCAB = 100_000


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken's dict (its ``content``)."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _reason(folder: Path, config: Mapping[str, Any]) -> str | None:
    """Why transformers' tokenizer for ``folder`` may differ from its tokenizer.json read as it is, or None."""
    if config.get("tokenizer_class") not in GENERIC_CLASSES:
        return f"tokenizer_class {config.get('tokenizer_class')!r}"
    if config.get("backend", "tokenizers") != "tokenizers":
        return f"backend {config.get('backend')!r}"
    changing = [key for key in _CHANGING_KEYS if config.get(key)]
    if changing:
        return f"tokenizer_config.json sets {', '.join(changing)}"
    if (folder / "special_tokens_map.json").is_file():
        return "special_tokens_map.json"
    if not isinstance(config.get("chat_template", ""), str):
        return "several chat templates"
    for key in SPECIAL_TOKENS:
        if key in config and config[key] is not None and _token_text(config[key]) is None:
            return f"{key} {config[key]!r}"
    return None


def load(folder: Path) -> LightTokenizer | None:
    """``folder``'s tokenizer read from its tokenizer.json alone, or None when transformers' could differ."""
    config_file, tokenizer_file = folder / "tokenizer_config.json", folder / "tokenizer.json"
    if not (config_file.is_file() and tokenizer_file.is_file()):
        return None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # transformers reports it, in its own words
    reason = _reason(folder, config) if isinstance(config, dict) else "tokenizer_config.json is not an object"
    backend = None
    if reason is None:
        from tokenizers import Tokenizer

        backend = Tokenizer.from_file(str(tokenizer_file))
        reason = _backend_reason(backend, config)
    if reason is not None:
        log.info("transformers' tokenizer for %s: %s", folder, reason)
        return None
    assert backend is not None
    template_file = folder / "chat_template.jinja"
    template = template_file.read_text(encoding="utf-8") if template_file.is_file() else config.get("chat_template")
    return LightTokenizer(folder, backend, config, template)


def _backend_reason(backend: Any, config: Mapping[str, Any]) -> str | None:
    """Why transformers would change the tokenizer ``backend`` it reads with ``config``, or None."""
    if backend.truncation is not None or backend.padding is not None:
        return "tokenizer.json truncates or pads"
    if backend.post_processor is None:
        return "tokenizer.json has no post-processor"  # transformers writes one
    if backend.get_vocab_size() > _PATCHED_VOCAB:
        return f"a vocabulary of {backend.get_vocab_size()} tokens (transformers checks its regex)"
    added = {token.content: token for token in backend.get_added_tokens_decoder().values()}
    for key in SPECIAL_TOKENS:
        text = _token_text(config.get(key))
        if text is not None and (text not in added or not added[text].special):
            return f"{key} {text!r} is not a special token of tokenizer.json (transformers would add it)"
    return None


class LightTokenizer:
    """transformers' tokenizer for a folder :func:`load` accepted, on the ``tokenizers`` library: the attributes and
    methods the backends use (``encode``, ``decode``, the special tokens and their ids, the chat template)."""

    def __init__(self, folder: Path, backend: Any, config: Mapping[str, Any], chat_template: str | None) -> None:
        self.folder = folder
        self.backend = backend
        self.chat_template = chat_template
        self._full: Any = None
        for key in SPECIAL_TOKENS:
            text = _token_text(config.get(key))
            setattr(self, key, text)
            setattr(self, f"{key}_id", backend.token_to_id(text) if text is not None else None)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The token ids of ``text``; with ``add_special_tokens`` those tokenizer.json's post-processor adds."""
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, token_ids: int | list[int], skip_special_tokens: bool = False) -> str:
        """The text of ``token_ids`` (one id or a list), without special tokens when ``skip_special_tokens``."""
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        return str(self.backend.decode(ids, skip_special_tokens=skip_special_tokens))

    def apply_chat_template(self, messages: list[dict[str, str]], **kwargs: Any) -> Any:
        """transformers' ``apply_chat_template``, by transformers' tokenizer for the folder (loaded on first use)."""
        if self._full is None:
            import transformers

            self._full = transformers.AutoTokenizer.from_pretrained(str(self.folder))
        return self._full.apply_chat_template(messages, **kwargs)

"""The light tokenizer (``models/light_tokenizer.py``) is transformers' tokenizer, without importing transformers.

On the default model's real tokenizer (the dequantized GGUF copy transformers saved) and real benchmark text from
every task: the same ids with and without special tokens, the same text back, the same special tokens and chat
template. A tokenizer.json whose post-processor adds a BOS is read the same way too; every folder whose
tokenizer_config.json makes transformers change the file is left to transformers (and, for one of them, the
difference it would make is shown). A backend on the default model scores without importing transformers at all.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from pytest_llmgate.config import ModelSpec  # noqa: E402
from pytest_llmgate.models import ModelPool, light_tokenizer, load_backend  # noqa: E402
from pytest_llmgate.tasks import TASKS  # noqa: E402
from pytest_llmgate.tasks.base import TaskOptions  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# Text a tokenizer can get wrong: special tokens written as text, whitespace runs, non-Latin scripts, emoji.
TRICKY = [
    "",
    " ",
    "  leading and trailing  ",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "tabs\tand\r\nnewlines\n\n\n",
    "naïve café — “quotes” \u2019apostrophes\u2019 …",
    "数学の問題: 2 + 2 = 4. Ünïcödé ΑΒΓ and emoji 🙂👍🏽",
    "<|endoftext|> in the middle <|endoftext|>",
    "def f(x):\n    return x ** 2  # code\n",
]


@pytest.fixture(scope="module")
def reference_folder(tmp_path_factory: pytest.TempPathFactory, dequantized_dir: Path) -> Path:
    """The default model's tokenizer folder as transformers saved it (its dequantized GGUF copy)."""
    work = tmp_path_factory.mktemp("work")
    # The first load reads the GGUF file and writes the copy (unless an earlier test did); the second reads the copy.
    for _ in range(2):
        backend = load_backend(ModelSpec(name="smollm2", native=False), device="cpu", work_dir=work, fingerprint="f",
                               dequantized_dir=dequantized_dir)
        folder = Path(backend.tokenizer.name_or_path)
        backend.close()
    assert (folder / "tokenizer.json").is_file(), folder
    return folder


@pytest.fixture(scope="module")
def real_texts(shared_datasets: Path) -> list[str]:
    """Contexts, continuations and whole requests of real rows of every log-likelihood and generation task."""
    texts = list(TRICKY)
    for name, options in (("arc_challenge", TaskOptions()), ("hellaswag", TaskOptions()),
                          ("winogrande", TaskOptions()), ("truthfulqa_mc2", TaskOptions()),
                          ("mmlu", TaskOptions(num_fewshot=1)), ("gsm8k", TaskOptions(num_fewshot=1))):
        items, _ = TASKS[name].configured(options).load(shared_datasets, limit=40)
        for item in items:
            for request in item.requests:
                context = request.context
                texts.append(context)
                continuation = getattr(request, "continuation", None)
                if continuation is not None:
                    texts += [continuation, context + continuation]
    return texts


def test_real_tokenizer_is_accepted_and_equals_transformers(reference_folder: Path, real_texts: list[str]) -> None:
    light = light_tokenizer.load(reference_folder)
    assert light is not None
    reference = transformers.AutoTokenizer.from_pretrained(str(reference_folder))
    assert len(real_texts) > 1000
    for text in real_texts:
        for special in (True, False):
            ids = light.encode(text, add_special_tokens=special)
            assert ids == reference.encode(text, add_special_tokens=special), (text[:80], special)
            for skip in (True, False):
                assert light.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)
        assert light.encode(text) == reference.encode(text)
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(light, key) == getattr(reference, key), key
        assert getattr(light, f"{key}_id") == getattr(reference, f"{key}_id"), key
    assert light.bos_token_id is not None and light.decode(light.bos_token_id) == reference.decode(light.bos_token_id)
    assert light.chat_template == reference.chat_template and light.chat_template
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]
    rendered = light.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert rendered == reference.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert "What is 2 + 2?" in rendered


def with_config(source: Path, target: Path, **changes: Any) -> Path:
    """A copy of the tokenizer folder ``source`` with tokenizer_config.json keys changed (None deletes a key)."""
    shutil.copytree(source, target)
    config_file = target / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    config_file.write_text(json.dumps(config))
    return target


def test_a_post_processor_that_adds_a_bos_is_read_as_transformers_reads_it(reference_folder: Path,
                                                                           tmp_path: Path) -> None:
    folder = with_config(reference_folder, tmp_path / "bos")
    data = json.loads((folder / "tokenizer.json").read_text())
    bos = json.loads((folder / "tokenizer_config.json").read_text())["bos_token"]
    bos_id = next(t["id"] for t in data["added_tokens"] if t["content"] == bos)
    data["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
    }
    (folder / "tokenizer.json").write_text(json.dumps(data))
    light = light_tokenizer.load(folder)
    assert light is not None
    reference = transformers.AutoTokenizer.from_pretrained(str(folder))
    for text in ("Question: what is two plus two?", "", "<|im_start|>user\nhi"):
        assert light.encode(text) == reference.encode(text)
        assert light.encode(text, add_special_tokens=False) == reference.encode(text, add_special_tokens=False)
    assert light.encode("Hello")[0] == bos_id != light.encode("Hello", add_special_tokens=False)[0]


@pytest.mark.parametrize(
    ("changes", "files", "reason"),
    [
        ({"tokenizer_class": "GPT2Tokenizer"}, {}, "tokenizer_class 'GPT2Tokenizer'"),
        ({"add_bos_token": True}, {}, "sets add_bos_token"),
        ({"clean_up_tokenization_spaces": True}, {}, "sets clean_up_tokenization_spaces"),
        ({"extra_special_tokens": ["<x>"]}, {}, "sets extra_special_tokens"),
        ({"chat_template": [{"name": "default", "template": "{{ x }}"}]}, {}, "several chat templates"),
        ({"bos_token": "Hello"}, {}, "bos_token 'Hello' is not a special token"),
        ({}, {"special_tokens_map.json": "{}"}, "special_tokens_map.json"),
        ({}, {"tokenizer.json": None}, None),
        ({}, {"tokenizer_config.json": "not json"}, None),
    ],
)
def test_folders_transformers_would_change_are_left_to_transformers(
    reference_folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, changes: dict, files: dict,
    reason: str | None
) -> None:
    folder = with_config(reference_folder, tmp_path / "t", **changes)
    for name, content in files.items():
        if content is None:
            (folder / name).unlink()
        else:
            (folder / name).write_text(content)
    with caplog.at_level("INFO", logger="pytest_llmgate"):
        assert light_tokenizer.load(folder) is None
    if reason is not None:
        assert reason in caplog.text


def test_a_truncating_tokenizer_json_is_left_to_transformers(reference_folder: Path, tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    folder = with_config(reference_folder, tmp_path / "t")
    data = json.loads((folder / "tokenizer.json").read_text())
    data["truncation"] = {"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0}
    (folder / "tokenizer.json").write_text(json.dumps(data))
    with caplog.at_level("INFO", logger="pytest_llmgate"):
        assert light_tokenizer.load(folder) is None
    assert "truncates or pads" in caplog.text


@pytest.mark.parametrize("changes", [{"split_special_tokens": True}, {"bos_token": "Hello"}])
def test_refused_settings_make_a_real_difference(reference_folder: Path, tmp_path: Path, changes: dict) -> None:
    """Why the rules exist: with these settings transformers' tokenizer is not the file's (special tokens encoded as
    text; a named special token the file has as plain text, dropped by transformers when decoding)."""
    folder = with_config(reference_folder, tmp_path / "t", **changes)
    assert light_tokenizer.load(folder) is None
    reference = transformers.AutoTokenizer.from_pretrained(str(folder))
    file_only = light_tokenizer.LightTokenizer(folder, tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")),
                                               {}, None)
    text = "Hello there <|im_end|> friend"
    ids = reference.encode(text)
    differs = ids != file_only.encode(text)
    differs |= reference.decode(ids, skip_special_tokens=True) != file_only.decode(ids, skip_special_tokens=True)
    assert differs


def test_backends_pick_it_with_native_and_score_the_same(tmp_path: Path, dequantized_dir: Path,
                                                         shared_datasets: Path) -> None:
    pool = ModelPool()
    backends = {native: load_backend(ModelSpec(name="smollm2", native=native), device="cpu", work_dir=tmp_path,
                                     fingerprint="f", pool=pool, dequantized_dir=dequantized_dir)
                for native in (True, False)}
    assert type(backends[True].tokenizer) is light_tokenizer.LightTokenizer
    assert type(backends[False].tokenizer) is not light_tokenizer.LightTokenizer
    items, _ = TASKS["winogrande"].load(shared_datasets, limit=10)
    requests = [request for item in items for request in item.requests]
    pairs = {native: [b.encode_pair(r.context, r.continuation) for r in requests] for native, b in backends.items()}
    assert pairs[True] == pairs[False]
    assert backends[True].prefix_token_id == backends[False].prefix_token_id
    scores = {native: b.loglikelihood(requests) for native, b in backends.items()}
    for (first, greedy_first), (second, greedy_second) in zip(scores[True], scores[False], strict=True):
        assert abs(first - second) <= 1e-4 and greedy_first == greedy_second
    for backend in backends.values():
        backend.close()


def test_scoring_on_the_default_model_does_not_import_transformers(dequantized_dir: Path, tmp_path: Path,
                                                                   reference_folder: Path) -> None:
    """In a fresh process: the backend on the dequantized copy (``reference_folder`` made sure it is there) scores
    a 0-shot item; transformers is never imported (until a chat template or a key/value cache needs it)."""
    script = textwrap.dedent(f"""
        import json, sys
        from pathlib import Path
        from pytest_llmgate.config import ModelSpec
        from pytest_llmgate.models import load_backend
        from pytest_llmgate.tasks.base import LoglikelihoodRequest
        backend = load_backend(ModelSpec(name="smollm2"), device="cpu", work_dir=Path({str(tmp_path)!r}),
                               fingerprint="f", dequantized_dir=Path({str(dequantized_dir)!r}))
        scores = backend.loglikelihood([LoglikelihoodRequest("The capital of France is", " Paris"),
                                        LoglikelihoodRequest("The capital of France is", " Rome")])
        loaded = "transformers" in sys.modules
        print(json.dumps({{"tokenizer": type(backend.tokenizer).__name__, "scores": scores, "transformers": loaded}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["tokenizer"] == "LightTokenizer"
    assert result["transformers"] is False
    (paris, _), (rome, _) = result["scores"]
    assert -20 < rome < paris < 0

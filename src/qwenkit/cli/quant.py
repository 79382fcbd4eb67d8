"""`qwenkit quantize`: weight-only int8/int4 (round-to-nearest) and GPTQ, written in the GPTQ format."""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

from qwenkit.cli.common import add_model_arguments, add_verb, check_destination, load_model
from qwenkit.errors import QwenkitError

METHOD_CHOICES = ("int8", "int4", "gptq-int4", "gptq-int8")


def group_size_value(text: str) -> int:
    try:
        size = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid group size {text!r}; use a positive integer or -1"
        ) from None
    if size != -1 and size < 1:
        raise argparse.ArgumentTypeError(f"invalid group size {text!r}; use a positive integer or -1")
    return size


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}; use a positive integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}; use a positive integer")
    return value


def damp_value(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid damp {text!r}; use a number in (0, 1)") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"invalid damp {text!r}; use a number in (0, 1)")
    return value


def add_parsers(verbs) -> None:
    p = add_verb(
        verbs,
        "quantize",
        "quantize a checkpoint's linear layers to int8/int4 (round-to-nearest or GPTQ), in the GPTQ format",
        "  qwenkit quantize --model ./Qwen2.5-0.5B-Instruct --out ./q-int8 --method int8\n"
        "  qwenkit quantize --model ./ckpt --out ./ckpt-gptq-int4 --method gptq-int4 --calibration sft.jsonl\n"
        "  qwenkit quantize --model ./ckpt --out ./ckpt-gptq --method gptq-int4 --act-order --samples 256\n"
        "the result loads in qwenkit, transformers (GPTQ integration: optimum + gptqmodel) and vLLM;\n"
        "int8 is per channel, the other methods use groups of 128 input columns unless --group-size says",
    )
    add_model_arguments(p)
    p.add_argument(
        "--out", metavar="DIR", required=True, help="directory to write (must not exist, or be empty)"
    )
    p.add_argument(
        "--method", choices=METHOD_CHOICES, required=True, help="int8 | int4 (round-to-nearest), gptq-*"
    )
    p.add_argument(
        "--group-size",
        type=group_size_value,
        help="input columns per scale: -1 = per channel (default: -1 for int8, 128 otherwise)",
    )
    p.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns by decreasing activation")
    p.add_argument(
        "--sym",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="symmetric grid (default, as Qwen's published GPTQ checkpoints); --no-sym: asymmetric",
    )
    p.add_argument("--damp", type=damp_value, default=0.01, help="GPTQ damping, fraction of mean diag(H)")
    p.add_argument(
        "--calibration",
        metavar="FILE",
        help="GPTQ calibration: ChatML samples (SFT JSONL/JSON) or plain text (.txt, .jsonl 'text', .parquet); "
        "default: a small built-in synthetic mix",
    )
    p.add_argument(
        "--samples", type=positive_int, default=128, help="GPTQ calibration sequences (default 128)"
    )
    p.add_argument(
        "--seq-len", type=positive_int, default=512, help="tokens per calibration sequence (default 512)"
    )
    p.add_argument("--quantize-head", action="store_true", help="quantize the output head too (see docs)")
    p.add_argument("--force", action="store_true", help="replace --out when it already holds a checkpoint")
    p.set_defaults(run=run_quantize)


def run_quantize(args: argparse.Namespace) -> int:
    from qwenkit.quant.quantize import calibration_batches, check_method, quantize_model, save_quantized

    check_method(args.method, args.group_size, args.act_order)
    uses_gptq = args.method.startswith("gptq")
    if not uses_gptq and args.calibration is not None:
        raise QwenkitError(
            f"--calibration is for the GPTQ methods; {args.method} rounds to nearest without data"
        )
    if args.seq_len < 2:
        raise QwenkitError("--seq-len must be at least 2")
    import qwenkit
    from qwenkit.checkpoint import read_config_json
    from qwenkit.quant.formats import read_quant_config

    out = Path(args.out)
    source = Path(args.model) if args.model is not None else qwenkit.default_model_path()
    check_destination(source, out, args.force)
    if read_quant_config(source, read_config_json(source)) is not None:
        raise QwenkitError(f"{source} is already quantized; quantize a floating-point checkpoint")
    model, tokenizer, path = load_model(args)
    calibration = None
    if uses_gptq:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            calibration = calibration_batches(tokenizer, args.calibration, args.samples, args.seq_len)
        for w in caught:
            print(f"qwenkit: warning: {w.message}")
        tokens = sum(len(c) for c in calibration)
        print(f"calibration: {len(calibration)} sequences, {tokens} tokens")
    start = time.perf_counter()
    result = quantize_model(
        model,
        args.method,
        args.group_size,
        calibration=calibration,
        quantize_head=args.quantize_head,
        act_order=args.act_order,
        sym=args.sym,
        damp=args.damp,
        replace=False,
    )
    try:
        save_quantized(model, tokenizer, out, result)
    except OSError as e:
        raise QwenkitError(f"cannot write {out}: {e.strerror or e}") from None
    size = sum(f.stat().st_size for f in out.iterdir() if f.name.endswith(".safetensors"))
    group = "per channel" if result.group_size == -1 else f"group size {result.group_size}"
    print(
        f"quantized {path} -> {out}: {args.method} ({group}, {'sym' if args.sym else 'asym'}"
        f"{', act-order' if args.act_order else ''}), {len(result.weights)} layers in "
        f"{time.perf_counter() - start:.0f} s, weights {size / 2**20:.1f} MiB"
    )
    if args.quantize_head:
        print(
            "note: the quantized head (lm_head.qweight, quantization_config lm_head: true) loads in qwenkit; "
            "transformers' GPTQ integration does not read it (it leaves lm_head randomly initialized)"
        )
    return 0

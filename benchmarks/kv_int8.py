"""The int8 KV cache against the float cache on a Qwen2.5-0.5B-shaped random model: cache bytes,
logit error and decode speed at long contexts. Writes the `kv-int8` section of docs/benchmarks.md.

    python benchmarks/kv_int8.py --lengths 1024 4096 8192 --layers 24 --runs 3

Each measurement runs in a fresh process; the float and int8 decode runs alternate and the
figures are medians. Logit error: the logits of the last 64 positions after a prefill of the rest
(one forward pass each with a float and an int8 cache), max |difference| over max |logit|.
Decode: 32 greedy tokens through `Qwen.forward` with the cache after the prefill.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from qwenkit import QwenConfig
from qwenkit.model import KVCache, Qwen

TAIL, NEW_TOKENS = 64, 32


def build(layers: int, kv_cache: str) -> Qwen:
    config = QwenConfig.from_preset("qwen2.5-0.5b", num_hidden_layers=layers)
    config.use_cache_quantization = kv_cache == "int8"
    model = Qwen(config)
    model.init_weights(seed=0)
    return model.eval()


def prompt(length: int) -> torch.Tensor:
    return torch.randint(0, 151643, (1, length), generator=torch.Generator().manual_seed(length))


@torch.inference_mode()
def logit_error(length: int, layers: int) -> dict:
    model, ids = build(layers, "float"), prompt(length)
    logits = {}
    for kind in ("float", "int8"):
        model.config.use_cache_quantization = kind == "int8"
        cache = KVCache(model.config, 1, length, "cpu", model.dtype)
        model(ids[:, :-TAIL], cache=cache, last_only=True)
        logits[kind] = model(ids[:, -TAIL:], cache=cache)[0]
    error = (logits["int8"] - logits["float"]).abs().max().item()
    largest = logits["float"].abs().max().item()
    agree = (logits["int8"].argmax(-1) == logits["float"].argmax(-1)).float().mean().item()
    return {"max_error": error, "max_logit": largest, "argmax_agreement": agree}


@torch.inference_mode()
def decode_speed(length: int, layers: int, kind: str) -> dict:
    model, ids = build(layers, kind), prompt(length)
    cache = KVCache(model.config, 1, length + NEW_TOKENS, "cpu", model.dtype)
    token = model(ids, cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
    start = time.perf_counter()
    for _ in range(NEW_TOKENS):
        token = model(token, cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
    return {"tokens_per_s": NEW_TOKENS / (time.perf_counter() - start)}


def in_fresh_process(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument(
        "--layers", type=int, default=24, help="blocks of the model run (24 = the full shape)"
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        what, length, layers, *rest = args.child
        result = (
            logit_error(int(length), int(layers))
            if what == "error"
            else decode_speed(int(length), int(layers), *rest)
        )
        print(json.dumps(result))
        return

    full = QwenConfig.from_preset("qwen2.5-0.5b")
    rows = []
    for length in args.lengths:
        size = {}
        for kind, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("int8", torch.float32)):
            full.use_cache_quantization = kind == "int8"
            size[kind] = KVCache.size_in_bytes(full, 1, length, dtype)
        error = in_fresh_process("error", str(length), str(args.layers))
        speeds = {"float": [], "int8": []}
        for _ in range(args.runs):
            for kind in speeds:
                speeds[kind].append(
                    in_fresh_process("decode", str(length), str(args.layers), kind)["tokens_per_s"]
                )
        median = {kind: statistics.median(v) for kind, v in speeds.items()}
        rows.append((length, size, error, median))
        print(length, size, error, median, flush=True)

    lines = [
        f"Qwen2.5-0.5B shape (24 layers, 2 KV heads, head_dim 64) for the cache bytes; random weights, "
        f"{args.layers} of the 24 blocks run for the error and speed, fp32 weights, {args.threads} CPU threads, "
        f"median of {args.runs} runs alternating float and int8 in fresh processes. The machine was shared "
        "with other work while measured: speeds are noisy, the ratio is the figure to read.",
        "",
        "| context | fp32 cache | bf16 cache | int8 cache | int8 / bf16 | max logit error (of max logit) "
        "| argmax agreement | decode tok/s fp32 cache | int8 cache | ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for length, size, error, median in rows:
        mib = {k: v / 2**20 for k, v in size.items()}
        lines.append(
            f"| {length:,} | {mib['fp32']:.1f} MiB | {mib['bf16']:.1f} MiB | {mib['int8']:.1f} MiB "
            f"| {size['int8'] / size['bf16']:.3f} | {error['max_error']:.4f} ({error['max_error'] / error['max_logit']:.2%}) "
            f"| {error['argmax_agreement']:.0%} | {median['float']:.1f} | {median['int8']:.1f} "
            f"| {median['int8'] / median['float']:.2f} |"
        )
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from report import write_section

    write_section("kv-int8", "\n".join(lines), heading="KV cache int8 (`benchmarks/kv_int8.py`)")


if __name__ == "__main__":
    main()

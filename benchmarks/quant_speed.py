"""Decode and prefill speed and peak memory per precision: qwenkit (fp32, 16-bit, int8, int4) against
llama.cpp (f32, f16, Q8_0, Q4_0) on the same random Qwen2.5-0.5B-shaped weights, with each row also given as
a fraction of the memory-bandwidth roofline.

Every run of an engine is its own subprocess (so peak memory is its own) and the engines take turns,
so a noisy machine slows all alike; figures are medians over the runs. Batch 1, greedy, stop tokens
off. The roofline: decoding reads every weight once per token, so tokens/s can be at most
bandwidth / (bytes of weights read per token); the bandwidth is a STREAM-like read (sum of a 1 GiB
fp32 array) with the same number of threads, best of 10. Results go to docs/benchmarks.md.

    .venv/bin/python benchmarks/quant_speed.py [--prompt 256] [--new 64] [--threads 2] [--runs 3]

llama.cpp comes from llama-cpp-python (pip install llama-cpp-python compiles it, about 15 minutes on
two cores; a prebuilt copy is found through PYTHONPATH / LD_LIBRARY_PATH as usual). Its f32, f16 and Q8_0
GGUF files are written by `qwenkit export gguf`; Q4_0 (which the export does not write) is made from the f16
file by llama.cpp's own quantizer (`llama_model_quantize`, as its llama-quantize tool does).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import write_section

QWENKIT = {
    "qwenkit fp32": None,
    "qwenkit fp16 weights": "fp16",
    "qwenkit int8": "int8",
    "qwenkit int4": "int4",
}
LLAMA = {"llama.cpp f32": "f32", "llama.cpp f16": "f16", "llama.cpp Q8_0": "q8_0", "llama.cpp Q4_0": "q4_0"}
PYTHON_BLOCKS = " (Python blocks)"  # --python-blocks: decode_step without the one C++ call


def peak_memory_mb() -> float:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def read_bandwidth(threads: int) -> float:
    """Bytes/s of a 2-thread (or `threads`) streaming read: torch.sum over 1 GiB of fp32, best of 10."""
    import torch

    torch.set_num_threads(threads)
    data = torch.ones(1 << 28)
    data.sum()
    best = float("inf")
    for _ in range(10):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.nbytes / best


def weight_bytes_per_token(model) -> int:
    """Bytes of the linear layers' weights (the matrices every token reads), embeddings excluded."""
    total = 0
    for name, module in model.named_modules():
        if name.endswith("embed_tokens") or list(module.children()):
            continue
        total += sum(t.nbytes for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)))
    norms = sum(p.nbytes for n, p in model.named_parameters() if "norm" in n)
    return total - norms


def run_qwenkit(kind: str | None, checkpoint: str, ids, args) -> tuple:
    import qwenkit
    from qwenkit.model import KVCache
    from qwenkit.quant.linear import native_kernels
    from qwenkit.quant.quantize import quantize_model

    native_kernels()  # build or load the kernels before timing
    model, _ = qwenkit.load(checkpoint, dtype="float32", weights="fp16" if kind == "fp16" else None)
    model.native_decode = (
        not args.python_blocks
    )  # decode_step's blocks in Python (the path before NativeDecode)
    if kind not in (None, "fp16"):
        quantize_model(model, kind, quantize_head=True, progress=False)
    prompt_len = ids.shape[1]

    def prefill():
        cache = KVCache(model.config, 1, prompt_len, model.device, model.dtype)
        model(ids, cache=cache, last_only=True)

    def generate(n):
        """The n greedy tokens and the seconds spent after the first one (decoding alone)."""
        from qwenkit.generation import generate_tokens

        out, first = [], None
        for tokens, _ in generate_tokens(model, ids, max_new_tokens=n, do_sample=False, stop=[]):
            out.append(int(tokens[0]))
            if first is None:
                first = time.perf_counter()
        return out, time.perf_counter() - first

    return prefill, generate, weight_bytes_per_token(model)


def llama_q4_0(f16_file: Path, threads: int) -> str:
    """A Q4_0 GGUF made from an f16 one by llama.cpp's quantizer (its default mixture: Q4_0 matrices, the
    token embeddings / output at the type llama-quantize picks)."""
    import ctypes

    import llama_cpp

    out = f16_file.with_name("q4_0.gguf")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, threads
    if llama_cpp.llama_model_quantize(str(f16_file).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        raise SystemExit("llama.cpp could not quantize to Q4_0")
    return str(out)


def run_llama(gguf_file: str, ids, args) -> tuple:
    import llama_cpp
    import numpy as np
    from gguf import GGUFReader

    llm = llama_cpp.Llama(
        gguf_file, n_ctx=ids.shape[1] + args.new + 8, n_batch=512, n_threads=args.threads,
        n_threads_batch=args.threads, verbose=False,
    )  # fmt: skip
    prompt = ids[0].tolist()
    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(gguf_file).tensors}
    # every weight matrix once per token; the embedding table only when it doubles as the head
    read = sum(n for name, n in tensors.items() if name != "token_embd.weight" and "norm" not in name)
    if "output.weight" not in tensors:
        read += tensors["token_embd.weight"]

    def prefill():
        llm.reset()
        llm.eval(prompt)

    def generate(n):
        llm.reset()
        llm.eval(prompt)
        out = []
        first = time.perf_counter()
        for _ in range(n):
            out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            if len(out) == 1:
                first = time.perf_counter()
            if len(out) < n:
                llm.eval([out[-1]])
        return out, time.perf_counter() - first

    return prefill, generate, read


def run_engine(engine: str, target: str, args) -> dict:
    """Inside the subprocess: load, warm up, then time prefill and greedy decoding."""
    import torch

    torch.set_num_threads(args.threads)
    ids = torch.randint(0, 150000, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    if engine in QWENKIT:
        prefill, generate, read = run_qwenkit(QWENKIT[engine], target, ids, args)
    else:
        prefill, generate, read = run_llama(target, ids, args)
    with torch.inference_mode():
        generate(4)  # warm-up
        prefill_times, decode_times = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            prefill()
            prefill_times.append(time.perf_counter() - start)
            tokens, seconds = generate(args.new)  # timed from the first new token on, in the same run
            decode_times.append(seconds)
    prefill_s, decode_s = min(prefill_times), min(decode_times)
    return {
        "prefill_tokens_per_s": args.prompt / prefill_s,
        "decode_tokens_per_s": (args.new - 1) / decode_s if args.new > 1 else float("nan"),
        "peak_memory_mb": peak_memory_mb(),
        "weight_bytes_per_token": read,
        "tokens": tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="qwen2.5-0.5b")
    parser.add_argument("--prompt", type=int, default=256, help="prompt length in tokens")
    parser.add_argument("--new", type=int, default=64, help="new tokens to decode")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats inside each run (best kept)")
    parser.add_argument("--runs", type=int, default=3, help="fresh processes per engine, taking turns")
    parser.add_argument("--engines", nargs="+", default=[*QWENKIT, *LLAMA], help="which rows to run")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    parser.add_argument(
        "--python-blocks",
        action="store_true",
        help="also run each qwenkit row with the blocks in Python (no C++ decode step), taking turns",
    )
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:  # subprocess mode
        print(json.dumps(run_engine(args.engine, args.target, args)))
        return

    import torch

    import qwenkit
    from qwenkit.gguf_export import export_gguf
    from qwenkit.tokenizer import Tokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from conftest import official_vocab_path

    engines = [e for e in args.engines if e in QWENKIT or e in LLAMA]
    if any(e in LLAMA for e in engines):
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print("llama-cpp-python is not importable: llama.cpp rows skipped", file=sys.stderr)
            engines = [e for e in engines if e in QWENKIT]
    bandwidth = read_bandwidth(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "ckpt"
        model = qwenkit.Qwen(qwenkit.QwenConfig.from_preset(args.preset))
        model.init_weights(seed=0)
        qwenkit.save(model, Tokenizer.from_file(official_vocab_path()), checkpoint)
        del model
        if args.python_blocks:
            engines = [v for e in engines for v in ((e, e + PYTHON_BLOCKS) if e in QWENKIT else (e,))]
        targets = {e: str(checkpoint) for e in engines if e.removesuffix(PYTHON_BLOCKS) in QWENKIT}
        for e in engines:
            if e in LLAMA and LLAMA[e] != "q4_0":
                targets[e] = str(export_gguf(checkpoint, Path(tmp) / f"{LLAMA[e]}.gguf", LLAMA[e]))
            elif e in LLAMA:
                targets[e] = llama_q4_0(
                    export_gguf(checkpoint, Path(tmp) / "for_q4_0.gguf", "f16"), args.threads
                )
        runs: dict[str, list[dict]] = {e: [] for e in engines}
        for _ in range(args.runs):
            for engine in engines:
                command = [sys.executable, __file__, "--engine", engine.removesuffix(PYTHON_BLOCKS),
                           "--target", targets[engine], "--prompt", str(args.prompt), "--new", str(args.new),
                           "--threads", str(args.threads), "--repeats", str(args.repeats)]  # fmt: skip
                if engine.endswith(PYTHON_BLOCKS):
                    command.append("--python-blocks")
                env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
                out = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
                runs[engine].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(engine, {k: v for k, v in runs[engine][-1].items() if k != "tokens"}, file=sys.stderr)
    load = os.getloadavg()[0]  # others running on the machine slow every engine's OpenMP regions
    results = {e: summarize(r) for e, r in runs.items()}
    fp32 = results.get("qwenkit fp32")
    lines = [
        f"Shape `{args.preset}` (random weights), batch 1, {args.threads} CPU threads, prompt {args.prompt} "
        f"tokens, {args.new} new tokens greedy; torch {torch.__version__}. Read bandwidth "
        f"({args.threads} threads, STREAM-like sum): {bandwidth / 1e9:.1f} GB/s. Roofline = weight bytes "
        "read per token x decode tokens/s / bandwidth. qwenkit int8/int4 quantize the head too (RTN; int8 "
        'per channel, int4 groups of 128); fp16 weights (`qwenkit.load(weights="fp16")`, `--weights fp16`) keep fp32 '
        "activations. The last column counts "
        "greedy tokens equal to qwenkit fp32's: random weights give near-tied logits, so it is no measure "
        "of quality (tests and benchmarks/verify_gguf.py check each engine's logits). "
        f"Load average at the end: {load:.1f}.",
        "",
        "| engine | prefill tok/s | decode tok/s | x qwenkit fp32 | weights read / token, MB | "
        "of roofline | peak memory, MB | greedy = fp32's |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for engine, r in results.items():
        roofline = r["weight_bytes_per_token"] * r["decode_tokens_per_s"] / bandwidth
        ratio = f"{r['decode_tokens_per_s'] / fp32['decode_tokens_per_s']:.2f}x" if fp32 else "-"
        same = (
            "-"
            if not fp32
            else f"{sum(a == b for a, b in zip(r['tokens'], fp32['tokens'], strict=True))}/{len(r['tokens'])}"
        )
        lines.append(
            f"| {engine} | {r['prefill_tokens_per_s']:.1f} | {r['decode_tokens_per_s']:.2f} | {ratio} | "
            f"{r['weight_bytes_per_token'] / 1e6:.0f} | {roofline:.0%} | {r['peak_memory_mb']:.0f} | {same} |"
        )
    lines += ["", f"Command: `.venv/bin/python benchmarks/quant_speed.py --prompt {args.prompt} --new {args.new} "
              f"--threads {args.threads} --runs {args.runs}`"]  # fmt: skip
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        write_section(
            f"quant-speed-{args.preset}", table, f"Speed per precision, {args.preset}, vs llama.cpp"
        )


def summarize(runs: list[dict]) -> dict:
    summary = {key: statistics.median(run[key] for run in runs) for key in runs[0] if key.endswith("_per_s")}
    summary["peak_memory_mb"] = max(run["peak_memory_mb"] for run in runs)
    summary["weight_bytes_per_token"] = runs[0]["weight_bytes_per_token"]
    summary["tokens"] = runs[0]["tokens"]
    return summary


if __name__ == "__main__":
    main()

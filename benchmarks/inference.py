"""Prefill and decode speed and peak memory: qwenkit vs transformers on the same random weights.

Each run of an engine is its own subprocess (so peak memory is its own); the engines take turns.
Default: the Qwen2.5-0.5B shape in fp32, batch 1, 2 CPU threads. Results go to docs/benchmarks.md.

    .venv/bin/python benchmarks/inference.py [--preset qwen2.5-0.5b] [--prompt 512] [--new 64] [--threads 2]
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


def peak_memory_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024


def run_engine(engine: str, checkpoint: str, args: argparse.Namespace) -> dict:
    """Runs inside the subprocess: load, warm up, then time prefill and greedy decode."""
    import torch

    torch.set_num_threads(args.threads)
    prompt_len, new_tokens, device, dtype = args.prompt, args.new, args.device, args.dtype
    ids = torch.randint(0, 150000, (1, prompt_len), generator=torch.Generator().manual_seed(0)).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    if engine == "qwenkit":
        import qwenkit
        from qwenkit.model import KVCache

        model, _ = qwenkit.load(checkpoint, device=device, dtype=dtype)

        def prefill():
            cache = KVCache(model.config, 1, prompt_len, model.device, model.dtype)
            model(ids, cache=cache, last_only=True)

        def decode(n):
            return model.generate(ids, max_new_tokens=n, do_sample=False, stop=[])
    else:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=getattr(torch, dtype))
        model = model.to(device).eval()

        def prefill():
            model(ids, use_cache=True, logits_to_keep=1)

        def decode(n):
            return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    with torch.inference_mode():
        decode(4)  # warm-up
        prefill_times, decode_times = [], []
        for _ in range(args.repeats):
            sync()
            start = time.perf_counter()
            prefill()
            sync()
            prefill_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            out = decode(new_tokens)
            sync()
            decode_times.append(time.perf_counter() - start)
        assert out.shape[1] == prompt_len + new_tokens
    prefill_s, total_s = min(prefill_times), min(decode_times)
    return {
        "engine": engine,
        "prefill_tokens_per_s": prompt_len / prefill_s,
        # decode rate: the generate() call minus its prefill, per new token after the first
        "decode_tokens_per_s": (new_tokens - 1) / max(total_s - prefill_s, 1e-9),
        "generate_s": total_s,
        "peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_memory_mb(),
        "tokens": out[0, prompt_len:].tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="qwen2.5-0.5b")
    parser.add_argument("--prompt", type=int, default=512, help="prompt length in tokens")
    parser.add_argument("--new", type=int, default=64, help="new tokens to decode")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats inside each run (best kept)")
    parser.add_argument("--runs", type=int, default=3, help="fresh processes per engine, taking turns")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--vocab", help="qwen.tiktoken to use (default: the one in the dashscope package)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.engine:  # subprocess mode
        result = run_engine(args.engine, args.checkpoint, args)
        print(json.dumps(result))
        return

    import torch

    import qwenkit
    from qwenkit.tokenizer import Tokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from conftest import official_vocab_path

    vocab = args.vocab or official_vocab_path()
    with tempfile.TemporaryDirectory() as tmp:
        model = qwenkit.Qwen(qwenkit.QwenConfig.from_preset(args.preset))
        model.init_weights(seed=0)
        qwenkit.save(model, Tokenizer.from_file(vocab), Path(tmp) / "ckpt")
        del model
        # Engines take turns, one fresh process per run, so a noisy machine slows both alike;
        # each figure is the median over the runs (peak memory: the largest).
        runs: dict[str, list[dict]] = {"transformers": [], "qwenkit": []}
        for _ in range(args.runs):
            for engine, engine_runs in runs.items():
                command = [sys.executable, __file__, "--engine", engine, "--checkpoint", str(Path(tmp) / "ckpt"),
                           "--prompt", str(args.prompt), "--new", str(args.new), "--threads", str(args.threads),
                           "--repeats", str(args.repeats), "--device", args.device, "--dtype", args.dtype]  # fmt: skip
                env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
                out = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
                engine_runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(engine, {k: v for k, v in engine_runs[-1].items() if k != "tokens"}, file=sys.stderr)
    results = {engine: summarize(engine_runs) for engine, engine_runs in runs.items()}
    ours, theirs = results["qwenkit"], results["transformers"]
    same = ours["tokens"] == theirs["tokens"]
    rows = [
        ("prefill tokens/s", "prefill_tokens_per_s", "{:.1f}"),
        ("decode tokens/s", "decode_tokens_per_s", "{:.2f}"),
        ("generate() wall time, s", "generate_s", "{:.2f}"),
        ("peak memory, MB", "peak_memory_mb", "{:.0f}"),
    ]
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{args.threads} CPU threads"
    lines = [
        f"Shape `{args.preset}` (random weights), {args.dtype} on {where}, batch 1, prompt {args.prompt} "
        f"tokens, {args.new} new tokens greedy; torch {torch.__version__}, transformers "
        f"{__import__('transformers').__version__}. Same greedy tokens: {'yes' if same else 'NO'}.",
        "",
        "| | qwenkit | transformers | ratio |",
        "|---|---|---|---|",
    ]
    for label, key, fmt in rows:
        ratio = ours[key] / theirs[key]
        lines.append(f"| {label} | {fmt.format(ours[key])} | {fmt.format(theirs[key])} | {ratio:.2f}x |")
    lines.append("")
    lines.append(f"Command: `.venv/bin/python benchmarks/inference.py --preset {args.preset} --prompt {args.prompt} "
                 f"--new {args.new} --threads {args.threads} --device {args.device} --dtype {args.dtype} --runs {args.runs}`")  # fmt: skip
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        device = "cpu" if args.device == "cpu" else "gpu"
        write_section(f"inference-{device}-{args.preset}", table,
                      f"Inference on {device.upper()}, {args.preset}: prefill and decode")  # fmt: skip


def summarize(runs: list[dict]) -> dict:
    summary = {
        key: statistics.median(run[key] for run in runs) for key in runs[0] if key.endswith(("_s", "_per_s"))
    }
    summary["peak_memory_mb"] = max(run["peak_memory_mb"] for run in runs)
    summary["tokens"] = runs[0]["tokens"]
    return summary


if __name__ == "__main__":
    main()

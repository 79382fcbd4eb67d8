"""SFT throughput with and without packing (several conversations per sequence, block-diagonal
attention) on the same data and micro-batches; results go to docs/benchmarks.md.

    .venv/bin/python benchmarks/sft_packing.py [--steps 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch
from report import write_section

import qwenkit
from qwenkit.data.synthetic import chat_samples
from qwenkit.train.settings import load_recipe
from qwenkit.train.sft import SFTRecipe, run


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        qwenkit.Tokenizer({bytes([b]): b for b in range(256)}).save(tmp / "qwen.tiktoken")
        tokenizer = qwenkit.Tokenizer.from_file(tmp / "qwen.tiktoken")
        shape = dict(
            vocab_size=512, hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4
        )
        model = qwenkit.Qwen(qwenkit.QwenConfig.from_preset("tiny", **shape))
        model.init_weights(seed=0)
        qwenkit.save(model, tokenizer, tmp / "base")
        rng = random.Random(0)
        with open(tmp / "chat.jsonl", "w") as f:  # short and long conversations mixed, as real SFT data
            for sample in chat_samples(2000):
                turns = rng.choice([1, 1, 1, 2, 4, 8])
                sample["messages"] = sample["messages"] * turns
                f.write(json.dumps(sample, ensure_ascii=False) + "\n")
        results = {}
        for packing in (False, True):
            overrides = ["--model.path", str(tmp / "base"), "--data.path", str(tmp / "chat.jsonl"),
                         "--data.max_len", str(args.max_len), "--data.packing", str(packing).lower(),
                         "--train.max_steps", str(args.steps), "--train.micro_batch_size", str(args.batch),
                         "--train.device", "cpu", "--log.progress", "false", "--checkpoint.every", "0"]  # fmt: skip
            recipe = load_recipe(SFTRecipe, None, overrides)
            start = time.perf_counter()
            run(recipe, tmp / f"run-{packing}")
            elapsed = time.perf_counter() - start
            results[packing] = args.steps * args.batch / elapsed
    gain = results[True] / results[False]
    table = "\n".join([
        f"{args.steps} steps of {args.batch} conversations (1 to 8 turns, up to {args.max_len} tokens), fp32 on "
        f"{args.threads} CPU threads, the 4-layer 256-wide shape; wall time of the whole run.",
        "",
        "| | padding | packing | ratio |",
        "|---|---|---|---|",
        f"| conversations/s | {results[False]:.1f} | {results[True]:.1f} | {gain:.2f}x |",
        "",
        f"Command: `.venv/bin/python benchmarks/sft_packing.py --steps {args.steps} --batch {args.batch}`",
    ])  # fmt: skip
    print(table)
    if not args.no_write:
        write_section("sft-packing", table, "SFT packing (`benchmarks/sft_packing.py`)")


if __name__ == "__main__":
    main()

"""Trainer throughput: qwenkit's pretraining loop vs transformers' Trainer on the same model shape,
data and batch; on a GPU also MFU (bf16). Results go to docs/benchmarks.md.

    .venv/bin/python benchmarks/pretrain.py                       # CPU, small shape, 2 threads
    python benchmarks/pretrain.py --device cuda --shape 350m       # one GPU, ~350M parameters, bf16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import write_section

SHAPES = {  # QwenConfig overrides; vocabulary of the byte-level tokenizer the data is packed with
    "small": dict(vocab_size=512, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                  num_attention_heads=4, max_position_embeddings=1024),
    "350m": dict(vocab_size=32768, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                 num_attention_heads=16, max_position_embeddings=2048),
}  # fmt: skip


def pack(directory: Path, seq_len: int, documents: int) -> None:
    from qwenkit.data.pack import Source, pack_documents
    from qwenkit.data.synthetic import write_corpus
    from qwenkit.tokenizer import Tokenizer

    vocab = directory / "qwen.tiktoken"
    Tokenizer({bytes([b]): b for b in range(256)}).save(vocab)
    corpus = write_corpus(directory / "corpus.jsonl", documents)
    pack_documents([Source([corpus], 1.0)], Tokenizer.from_file(vocab), seq_len, directory, progress=False)


def run_qwenkit(args, data: Path, out: Path) -> dict:
    from qwenkit.train.pretrain import PretrainRecipe, run
    from qwenkit.train.settings import load_recipe

    overrides = ["--model.overrides", json.dumps(SHAPES[args.shape]), "--data.path", str(data),
                 "--train.max_steps", str(args.steps), "--train.micro_batch_size", str(args.batch),
                 "--train.warmup_steps", "2", "--train.device", args.device, "--train.compile", str(args.compile),
                 "--log.every", "1", "--log.progress", "false", "--checkpoint.every", "0"]  # fmt: skip
    recipe = load_recipe(PretrainRecipe, None, overrides)
    run(recipe, out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steady = records[args.warmup :]  # skip compilation and allocator warm-up
    rate = sum(r["tokens_per_sec"] for r in steady) / len(steady)
    result = {"tokens_per_sec": rate, "final_loss": records[-1]["loss"]}
    if "mfu" in steady[0]:
        result["mfu"] = sum(r["mfu"] for r in steady) / len(steady)
    return result


def run_transformers(args, data: Path, out: Path) -> dict:
    import torch
    import transformers

    from qwenkit.data.packed import PackedDataset

    shape = SHAPES[args.shape]
    config = transformers.Qwen2Config(
        **shape, num_key_value_heads=shape["num_attention_heads"], tie_word_embeddings=False
    )
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config)
    windows = PackedDataset(data)

    class Windows(torch.utils.data.Dataset):
        def __len__(self):
            return len(windows)

        def __getitem__(self, i):
            w = windows[i]
            return {"input_ids": w[:-1], "labels": w[1:]}  # shifted here; see the loss below

    class Timer(transformers.TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_end(self, *_, **__):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())

    def loss_fn(outputs, labels, num_items_in_batch=None):  # labels are pre-shifted: no second shift
        logits = outputs.logits.float()
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())

    cuda = args.device == "cuda"
    training = transformers.TrainingArguments(
        output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.batch, learning_rate=2e-3,
        lr_scheduler_type="cosine", warmup_steps=2, weight_decay=0.1, adam_beta2=0.95, max_grad_norm=1.0,
        logging_steps=10**9, save_strategy="no", report_to=[], bf16=cuda, use_cpu=not cuda,
        dataloader_num_workers=0, disable_tqdm=True, torch_compile=args.compile,
    )  # fmt: skip
    timer = Timer()
    trainer = transformers.Trainer(model=model, args=training, train_dataset=Windows(), callbacks=[timer],
                                   compute_loss_func=loss_fn)  # fmt: skip
    trainer.train()
    tokens_per_step = args.batch * windows.seq_len
    steady = timer.times[args.warmup - 1 :]
    rate = tokens_per_step * (len(steady) - 1) / (steady[-1] - steady[0])
    return {"tokens_per_sec": rate}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=SHAPES, default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the averages")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="torch.compile both (GPU)")
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    if args.engine:  # subprocess mode: one engine, its own process
        import torch

        torch.set_num_threads(args.threads)
        with tempfile.TemporaryDirectory() as tmp:
            runner = run_qwenkit if args.engine == "qwenkit" else run_transformers
            print(json.dumps(runner(args, Path(args.data), Path(tmp) / "out")))
        return

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        pack(data, args.seq_len, documents=20000 if args.shape == "350m" else 3000)
        results = {}
        for engine in ("transformers", "qwenkit"):
            command = [sys.executable, __file__, "--engine", engine, "--data", str(data)] + [
                a for a in sys.argv[1:] if a != "--no-write"
            ]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            out = subprocess.run(command, capture_output=True, text=True, env=env)
            if out.returncode:
                sys.exit(f"{engine} failed:\n{out.stderr[-3000:]}")
            results[engine] = json.loads(out.stdout.strip().splitlines()[-1])
            print(engine, results[engine], file=sys.stderr)
    ours, theirs = results["qwenkit"], results["transformers"]
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{args.threads} CPU threads"
    lines = [
        f"Shape `{args.shape}` ({json.dumps(SHAPES[args.shape])}), {'bf16 autocast' if args.device == 'cuda' else 'fp32'} "
        f"on {where}, batch {args.batch} x {args.seq_len} tokens, {args.steps} steps (first {args.warmup} not "
        f"averaged){', torch.compile' if args.compile else ''}; torch {torch.__version__}, transformers "
        f"{__import__('transformers').__version__}.",
        "",
        "| | qwenkit | transformers Trainer | ratio |",
        "|---|---|---|---|",
        f"| tokens/s | {ours['tokens_per_sec']:.0f} | {theirs['tokens_per_sec']:.0f} | "
        f"{ours['tokens_per_sec'] / theirs['tokens_per_sec']:.2f}x |",
    ]
    if "mfu" in ours:
        lines.append(f"| MFU (bf16 dense peak) | {ours['mfu']:.1%} | | |")
    lines += [
        "",
        f"Command: `python benchmarks/pretrain.py {' '.join(a for a in sys.argv[1:] if a != '--no-write')}`",
    ]
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        write_section(f"pretrain-{args.device}-{args.shape}", table,
                      f"Pretraining throughput, {args.device.upper()}, {args.shape}")  # fmt: skip


if __name__ == "__main__":
    main()

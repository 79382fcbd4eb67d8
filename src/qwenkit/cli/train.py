"""Training verbs: `qwenkit pretrain` and `qwenkit sft` (recipes in qwenkit.train).

Both take a YAML recipe and any recipe setting as `--section.key VALUE` (the overrides `main` collects).
"""

from __future__ import annotations

import argparse

from qwenkit.cli.common import add_verb


def add_parsers(verbs) -> None:
    p = add_verb(
        verbs,
        "pretrain",
        "pretrain a Qwen model from scratch or continue pretraining a checkpoint",
        "  qwenkit pretrain --config configs/pretrain/tiny.yaml --out runs/tiny\n"
        "  qwenkit pretrain --config configs/pretrain/tiny.yaml --out runs/tiny --train.max_steps 20 --train.lr 1e-3\n"
        "  torchrun --nproc_per_node 8 -m qwenkit pretrain --config configs/pretrain/qwen-7b.yaml --out runs/7b\n"
        "any recipe setting can be overridden as --section.key VALUE; re-running the same command resumes",
    )
    p.add_argument(
        "--config", metavar="FILE", help="YAML recipe (sections model, data, train, eval, checkpoint, log)"
    )
    p.add_argument(
        "--out", required=True, metavar="DIR", help="run directory: checkpoints, metrics.jsonl, loss.png"
    )
    p.set_defaults(run=run_pretrain, dotted_overrides=True)

    p = add_verb(
        verbs,
        "sft",
        "fine-tune a model on ChatML conversations (full or LoRA), loss on assistant turns only",
        "  qwenkit sft --config configs/sft/qwen-chat.yaml --model ./Qwen-7B --data chat.jsonl --out runs/sft\n"
        "  qwenkit sft --config configs/sft/qwen-chat.yaml --model ./Qwen-7B --data chat.json --out runs/lora "
        "--method lora --train.lr 3e-4\n"
        "data: the official JSON (conversations of from/value) or OpenAI-style JSONL (messages, tools)",
    )
    p.add_argument(
        "--config", metavar="FILE", help="YAML recipe (sections model, data, train, eval, checkpoint, log)"
    )
    p.add_argument("--model", metavar="DIR", help="checkpoint to fine-tune (model.path)")
    p.add_argument("--data", metavar="FILE", help="training conversations (data.path)")
    p.add_argument("--method", choices=["full", "lora", "qlora"],
                   help="full fine-tuning, LoRA, or Q-LoRA (LoRA over a 4-bit NF4 base) (model.method)")  # fmt: skip
    p.add_argument(
        "--out", required=True, metavar="DIR", help="run directory: checkpoints, metrics.jsonl, loss.png"
    )
    p.set_defaults(run=run_sft, dotted_overrides=True)


def run_pretrain(args: argparse.Namespace) -> int:
    from qwenkit.train.pretrain import main as pretrain

    return pretrain(args.config, args.out, args.overrides)


def run_sft(args: argparse.Namespace) -> int:
    from qwenkit.train.sft import main as sft

    given = {"--model.path": args.model, "--data.path": args.data, "--model.method": args.method}
    overrides = [item for key, value in given.items() if value is not None for item in (key, value)]
    return sft(args.config, args.out, overrides + args.overrides)

"""Training verbs: `qwenkit pretrain`, `sft`, `reward` (and `reward score`), `ppo`, `dpo` (recipes in
qwenkit.train).

The training verbs take a YAML recipe and any recipe setting as `--section.key VALUE` (the overrides
`main` collects).
"""

from __future__ import annotations

import argparse

from qwenkit.cli.common import add_verb, device_name


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

    p = add_verb(
        verbs,
        "reward",
        "train a reward model on preference pairs (pairwise loss), or score one (`reward score`)",
        "  qwenkit reward --config configs/reward/pmp.yaml --model ./Qwen-7B --data pmp.jsonl --out runs/pmp\n"
        "  qwenkit reward --config configs/reward/rm.yaml --model runs/pmp --data hq.jsonl --eval-data held.jsonl "
        "--out runs/rm\n"
        "  qwenkit reward score --model runs/rm --data held.jsonl --out scores.jsonl  "
        "(see `qwenkit reward score -h`)\n"
        'data: JSONL in TRL\'s formats: {"prompt", "chosen", "rejected"} as strings or message lists, or '
        '{"chosen", "rejected"} message lists sharing their prompt',
    )
    p.add_argument(
        "--config", metavar="FILE", help="YAML recipe (sections model, data, train, eval, checkpoint, log)"
    )
    p.add_argument(
        "--model", metavar="DIR", help="causal LM or reward model to start from, or a run (model.path)"
    )
    p.add_argument("--data", metavar="FILE", help="training preference pairs (data.path)")
    p.add_argument("--eval-data", metavar="FILE", help="held-out preference pairs (data.eval_path)")
    p.add_argument("--out", metavar="DIR", help="run directory: checkpoints, metrics.jsonl, loss.png")
    p.set_defaults(run=run_reward, dotted_overrides=True)

    p = add_verb(
        verbs,
        "ppo",
        "align a chat model with PPO against a reward model (policy, value, reference, reward)",
        "  qwenkit ppo --config configs/ppo/qwen-chat.yaml --policy ./Qwen-7B-Chat --reward runs/rm "
        "--data prompts.jsonl --out runs/ppo\n"
        "  qwenkit ppo --config configs/ppo/demo.yaml --reward runs/rlhf-demo/reward --data prompts.jsonl "
        "--out runs/ppo --method lora\n"
        'prompts: JSONL of {"prompt": str}, {"prompt": [messages]} or {"messages": [...]} ending with '
        "a user turn; without --policy, the embedded demo model",
    )
    p.add_argument("--config", metavar="FILE",
                   help="YAML recipe (sections model, data, rollout, ppo, ptx, train, checkpoint, log)")  # fmt: skip
    p.add_argument(
        "--policy", metavar="DIR", help="chat model to align, or an SFT run directory (model.policy)"
    )
    p.add_argument(
        "--reward", metavar="DIR", help="reward model, or a `qwenkit reward` run directory (model.reward)"
    )
    p.add_argument("--data", metavar="FILE", help="prompts, JSONL (data.path)")
    p.add_argument("--method", choices=["full", "lora"],
                   help="train the whole policy, or LoRA with the adapter off as the reference (model.method)")  # fmt: skip
    p.add_argument(
        "--out", required=True, metavar="DIR", help="run directory: checkpoints, metrics.jsonl, reward_kl.png"
    )
    p.set_defaults(run=run_ppo, dotted_overrides=True)

    p = add_verb(
        verbs,
        "dpo",
        "align a chat model on preference pairs with direct preference optimization (no reward model)",
        "  qwenkit dpo --config configs/dpo/qwen-chat.yaml --model runs/sft/checkpoints/latest --data pairs.jsonl "
        "--out runs/dpo\n"
        "  qwenkit dpo --config configs/dpo/demo.yaml --model runs/sft --data pairs.jsonl --eval-data held.jsonl "
        "--out runs/dpo-lora --method lora --dpo.beta 0.2\n"
        "data: preference pairs in TRL's formats, as `qwenkit reward` reads them; the reference is the model "
        "as loaded (frozen), or with --method lora the same weights with the adapter off",
    )
    p.add_argument("--config", metavar="FILE",
                   help="YAML recipe (sections model, data, dpo, train, eval, checkpoint, log)")  # fmt: skip
    p.add_argument("--model", metavar="DIR", help="chat model to align, also the reference (model.path)")
    p.add_argument("--data", metavar="FILE", help="training preference pairs (data.path)")
    p.add_argument("--eval-data", metavar="FILE", help="held-out preference pairs (data.eval_path)")
    p.add_argument("--method", choices=["full", "lora"],
                   help="train the whole model (frozen reference) or LoRA (adapter off = reference) (model.method)")  # fmt: skip
    p.add_argument(
        "--out", required=True, metavar="DIR", help="run directory: checkpoints, metrics.jsonl, loss.png"
    )
    p.set_defaults(run=run_dpo, dotted_overrides=True)


def run_pretrain(args: argparse.Namespace) -> int:
    from qwenkit.train.pretrain import main as pretrain

    return pretrain(args.config, args.out, args.overrides)


def run_sft(args: argparse.Namespace) -> int:
    from qwenkit.train.sft import main as sft

    given = {"--model.path": args.model, "--data.path": args.data, "--model.method": args.method}
    overrides = [item for key, value in given.items() if value is not None for item in (key, value)]
    return sft(args.config, args.out, overrides + args.overrides)


def run_reward(args: argparse.Namespace) -> int:
    from qwenkit.errors import QwenkitError
    from qwenkit.train.reward import main as reward

    if args.out is None:
        raise QwenkitError("qwenkit reward needs --out DIR (or use `qwenkit reward score`)")
    given = {"--model.path": args.model, "--data.path": args.data, "--data.eval_path": args.eval_data}
    overrides = [item for key, value in given.items() if value is not None for item in (key, value)]
    return reward(args.config, args.out, overrides + args.overrides)


def reward_score_parser() -> argparse.ArgumentParser:
    """`qwenkit reward score`: a sub-verb of `reward` with its own options (cli.main routes to it)."""
    p = argparse.ArgumentParser(
        prog="qwenkit reward score",
        description="Score preference pairs with a reward model: one JSON line per pair, and the accuracy "
        "(chosen scored above rejected).",
        epilog="example:\n  qwenkit reward score --model runs/rm --data held.jsonl --out scores.jsonl",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model", required=True, metavar="DIR", help="reward model (a `qwenkit reward` run or its save)"
    )
    p.add_argument("--data", required=True, metavar="FILE", help="preference pairs, JSONL in TRL's formats")
    p.add_argument("--out", metavar="FILE", help="scores JSONL (default: beside the data, NAME.scores.jsonl)")
    p.add_argument("--max-len", type=int, default=2048, metavar="N", help="longest prompt + answer in tokens")
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="pairs scored at once")
    p.add_argument("--device", type=device_name, help="cpu, cuda, cuda:1, mps (default: the best available)")
    p.set_defaults(run=run_reward_score)
    return p


def run_reward_score(args: argparse.Namespace) -> int:
    from qwenkit.train.reward import score_main

    return score_main(args.model, args.data, args.out, args.max_len, args.batch_size, args.device)


def run_ppo(args: argparse.Namespace) -> int:
    from qwenkit.train.ppo import main as ppo

    given = {"--model.policy": args.policy, "--model.reward": args.reward, "--data.path": args.data,
             "--model.method": args.method}  # fmt: skip
    overrides = [item for key, value in given.items() if value is not None for item in (key, value)]
    return ppo(args.config, args.out, overrides + args.overrides)


def run_dpo(args: argparse.Namespace) -> int:
    from qwenkit.train.dpo import main as dpo

    given = {"--model.path": args.model, "--data.path": args.data, "--data.eval_path": args.eval_data,
             "--model.method": args.method}  # fmt: skip
    overrides = [item for key, value in given.items() if value is not None for item in (key, value)]
    return dpo(args.config, args.out, overrides + args.overrides)

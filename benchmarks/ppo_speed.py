"""PPO throughput: `qwenkit ppo`'s rollout + update against TRL's PPOTrainer, tokens per second.

Both train the same models with the same settings: a policy of the demo model's shape (or
`--preset`) with random weights (seed 0; a random model almost never says <|im_end|>, so both sample
every response to the full `--new-tokens` and process the same number of tokens), a reward model
and value model from the same shape (a Qwen2ForSequenceClassification checkpoint written by
qwenkit), a frozen reference; `--queries` prompts x 2 responses per step, sampled at temperature 1
(top-p 1.0: TRL's PPOTrainer does not take a top-p), one PPO epoch in one minibatch of micro-batches
of `--micro` rollouts, KL coefficient 0.04, value clip 0.15. Tokens per second = the rollouts' prompt
+ response tokens / the seconds of `--steps` PPO steps (rollout, scoring, update), models loaded
beforehand. Each run is a fresh process, alternating qwenkit, TRL, qwenkit, ...; the table gives
medians.

TRL removed PPOTrainer in 1.0; this needs TRL 0.29's, installed apart from the project's TRL:

    pip install --no-deps --target /tmp/trl029 trl==0.29.1
    .venv/bin/python benchmarks/ppo_speed.py --trl-path /tmp/trl029
    .venv/bin/python benchmarks/ppo_speed.py --trl-path /tmp/trl029 --preset qwen2.5-0.5b --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
TOPICS = ["the sea", "a red bicycle", "winter mornings", "prime numbers", "a lost key", "the moon",
          "bread", "a small town", "rain", "an old map", "music", "the desert", "a library", "trains",
          "a garden", "clocks"]  # fmt: skip


def build(directory: Path, preset: str | None, queries: int) -> None:
    """The policy, the reward model and `queries` prompts (every step samples all of them), written
    once for every run."""
    import torch

    import qwenkit
    from qwenkit import Qwen, QwenConfig
    from qwenkit.train.reward import RewardModel, save_reward_model

    demo, tokenizer = qwenkit.load()
    config = demo.config if preset is None else QwenConfig.from_preset(preset)
    policy = Qwen(config)
    policy.init_weights(seed=0)
    policy.generation_config = demo.generation_config
    qwenkit.save(policy, tokenizer, directory / "policy")
    backbone = Qwen(config)
    backbone.init_weights(seed=1)
    reward = RewardModel(backbone)
    with torch.no_grad():
        reward.score.weight.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(2))
    save_reward_model(reward, tokenizer, directory / "reward")
    with open(directory / "prompts.jsonl", "w") as f:
        for k in range(queries):
            topic = f"{TOPICS[k % len(TOPICS)]}, part {k // len(TOPICS) + 1}"
            f.write(json.dumps({"prompt": f"Write two sentences about {topic}."}) + "\n")


def run_qwenkit(directory: Path, args) -> dict:
    from qwenkit.train import loop
    from qwenkit.train.ppo import PPORecipe, PPOTrainer
    from qwenkit.train.settings import load_recipe

    settings = {
        "--model.policy": directory / "policy", "--model.reward": directory / "reward",
        "--data.path": directory / "prompts.jsonl", "--rollout.queries_per_step": args.queries,
        "--rollout.responses_per_query": 2, "--rollout.max_new_tokens": args.new_tokens,
        "--rollout.top_p": 1.0, "--ppo.value_warmup_steps": 0, "--ppo.epochs": 1, "--ppo.kl_coef": 0.04,
        "--ppo.value_clip": 0.15, "--ppo.value_lr": 1e-5, "--train.lr": 1e-5, "--train.warmup_steps": 0,
        "--train.decay": "constant", "--train.micro_batch_size": args.micro,
        "--train.grad_accum": 2 * args.queries // args.micro, "--train.device": args.device,
        "--train.max_steps": args.steps, "--log.progress": False,
    }  # fmt: skip
    recipe = load_recipe(PPORecipe, None, [str(x) for item in settings.items() for x in item])
    out = Path(tempfile.mkdtemp())
    env = loop.start(recipe, out)
    trainer = PPOTrainer(recipe, out, env)
    tokens, unfinished = 0, []
    started = time.perf_counter()
    for step in range(args.steps):
        rollouts = trainer.rollout(step)
        trainer.shape_rewards(rollouts)
        trainer.update(step, rollouts)
        tokens += int(rollouts.lengths.sum())
        unfinished.append(float((~rollouts.finished).float().mean()))
    seconds = time.perf_counter() - started
    return {"tokens": tokens, "seconds": seconds, "unfinished": statistics.mean(unfinished)}


def run_trl(directory: Path, args) -> dict:
    sys.path.insert(0, args.trl_path)
    import torch
    import transformers
    from datasets import Dataset
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from qwenkit.chatml import render_messages
    from qwenkit.tokenizer import Tokenizer

    torch.manual_seed(0)
    dtype = torch.float32
    policy = transformers.AutoModelForCausalLM.from_pretrained(directory / "policy", dtype=dtype)
    reference = transformers.AutoModelForCausalLM.from_pretrained(directory / "policy", dtype=dtype)
    reward = transformers.AutoModelForSequenceClassification.from_pretrained(
        directory / "reward", dtype=dtype
    )
    value = transformers.AutoModelForSequenceClassification.from_pretrained(directory / "reward", dtype=dtype)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(directory / "policy", padding_side="left")
    tokenizer = Tokenizer.from_file(directory / "policy")
    hf_tokenizer.eos_token = "<|im_end|>"  # the turn end, as qwenkit stops at it
    if hf_tokenizer.pad_token is None:
        hf_tokenizer.pad_token = "<|endoftext|>"
    prompts = [json.loads(line)["prompt"] for line in (directory / "prompts.jsonl").read_text().splitlines()]
    ids = [
        render_messages(tokenizer, [{"role": "user", "content": p}], prompt=True).input_ids for p in prompts
    ]
    queries = [q for q in ids for _ in range(2)]
    config = PPOConfig(
        output_dir=str(Path(tempfile.mkdtemp())), per_device_train_batch_size=args.micro,
        gradient_accumulation_steps=2 * args.queries // args.micro, num_mini_batches=1, num_ppo_epochs=1,
        local_rollout_forward_batch_size=args.micro, response_length=args.new_tokens, temperature=1.0,
        kl_coef=0.04, cliprange_value=0.15, learning_rate=1e-5, total_episodes=2 * args.queries * args.steps,
        missing_eos_penalty=1.0, stop_token="eos", report_to=[], save_strategy="no", num_sample_generations=0,
        logging_steps=1, use_cpu=args.device == "cpu", bf16=False, seed=0, disable_tqdm=True,
        lr_scheduler_type="constant",
    )  # fmt: skip
    dataset = Dataset.from_dict({"input_ids": queries})
    trainer = PPOTrainer(args=config, processing_class=hf_tokenizer, model=policy, ref_model=reference,
                         reward_model=reward, train_dataset=dataset, value_model=value)  # fmt: skip
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    tokens = sum(len(q) + args.new_tokens for q in queries) * args.steps
    return {"tokens": tokens, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--trl-path", required=True, help="a directory holding TRL 0.29 (pip install --target)"
    )
    parser.add_argument("--preset", default=None, help="model shape (default: the demo model's)")
    parser.add_argument("--queries", type=int, default=8, help="prompts per step (2 responses each)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--micro", type=int, default=8, help="rollouts per forward pass")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each, alternating")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="print, do not update docs/benchmarks.md")
    parser.add_argument("--engine", choices=["qwenkit", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:  # one measured run, in its own process
        import torch

        torch.set_num_threads(args.threads)
        run = run_qwenkit if args.engine == "qwenkit" else run_trl
        print(json.dumps(run(Path(args.dir), args)))
        return
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        build(directory, args.preset, args.queries)
        results: dict[str, list[dict]] = {"qwenkit": [], "trl": []}
        for _ in range(args.repeats):
            for engine in results:
                command = [
                    sys.executable,
                    __file__,
                    *sys.argv[1:],
                    "--engine",
                    engine,
                    "--dir",
                    str(directory),
                ]
                env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
                done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
                if done.returncode != 0:
                    sys.exit(f"{engine} run failed:\n{done.stderr[-3000:]}")
                result = json.loads(done.stdout.strip().splitlines()[-1])
                results[engine].append(result)
                print(f"{engine}: {result['tokens'] / result['seconds']:.0f} tokens/s ({result})", flush=True)
    rates = {e: [r["tokens"] / r["seconds"] for r in runs] for e, runs in results.items()}
    median = {e: statistics.median(values) for e, values in rates.items()}
    ratio = median["qwenkit"] / median["trl"]
    print(f"\nmedian of {args.repeats}: qwenkit {median['qwenkit']:.0f} tokens/s, TRL {median['trl']:.0f} tokens/s, "
          f"ratio {ratio:.2f}x")  # fmt: skip
    if args.no_write:
        return
    import torch
    import transformers

    shape = args.preset or "the demo model's shape (4 layers, hidden 256, vocabulary 3,264)"
    body = "\n".join([
        f"Model: {shape}, random weights, {args.device}, {args.threads} threads; {args.queries} prompts x 2 responses of "
        f"{args.new_tokens} tokens per step, micro-batches of {args.micro}, one PPO epoch, {args.steps} steps per run; "
        f"fresh processes alternating qwenkit / TRL, {args.repeats} each (torch {torch.__version__}, transformers "
        f"{transformers.__version__}, TRL 0.29.1's `trl.experimental.ppo.PPOTrainer`). Load average "
        f"{load_before:.1f} before and {os.getloadavg()[0]:.1f} after the runs.",
        "",
        "| | runs (tokens/s) | median tokens/s |",
        "|---|---|---|",
        *(f"| {'qwenkit' if e == 'qwenkit' else 'TRL'} | {', '.join(f'{v:.0f}' for v in rates[e])} | "
          f"{median[e]:.0f} |" for e in rates),
        "",
        f"qwenkit / TRL: **{ratio:.2f}x** (median over median).",
    ])  # fmt: skip
    from report import write_section

    write_section(f"ppo-speed-{args.device}", body, "PPO throughput against TRL (`benchmarks/ppo_speed.py`)")


if __name__ == "__main__":
    main()

"""`make rlhf-demo`: the embedded demo model aligned with a reward model + PPO and with DPO, into OUT
(default runs/rlhf-demo/): pairs.jsonl / held_pairs.jsonl (built by sampling the demo model and ranking
by qwenkit.demo.rlhf.preferred), prompts.jsonl (PPO's), heldout_prompts.jsonl (neither stage trained on
them), reward/, ppo/, dpo/ (each with checkpoints/latest), report.json and the numbers as a Markdown table.

    .venv/bin/python scripts/rlhf_demo.py --out runs/rlhf-demo
    .venv/bin/python scripts/rlhf_demo.py --out runs/rlhf-small --prompts 200 --ppo.train.max_steps 20

Stage settings come from configs/{reward,ppo,dpo}/demo.yaml; `--reward.x.y V`, `--ppo.x.y V` and
`--dpo.x.y V` override them. Re-running resumes each stage from its checkpoints.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("reward", "ppo", "dpo")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def stage_overrides(extra: list[str]) -> dict[str, list[str]]:
    stages: dict[str, list[str]] = {name: [] for name in STAGES}
    for flag, value in zip(extra[::2], extra[1::2], strict=True):
        stage, _, rest = flag.removeprefix("--").partition(".")
        if stage not in stages or not rest:
            sys.exit(f"unknown option {flag!r}; stage overrides look like --ppo.train.max_steps 20")
        stages[stage] += [f"--{rest}", value]
    return stages


def plot_curves(out: Path, png: Path) -> None:
    """One figure of the three runs: the reward model's held-out accuracy, PPO's reward and KL, DPO's loss
    and held-out reward margin, against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(run: str, key: str) -> list[tuple[int, float]]:
        lines = (out / run / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r[key]) for r in map(json.loads, lines) if key in r]

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = [("reward model", [("reward", "accuracy"), ("reward", "val_accuracy")]),
              ("PPO", [("ppo", "reward"), ("ppo", "kl")]),
              ("DPO", [("dpo", "loss"), ("dpo", "margin"), ("dpo", "val_margin")])]  # fmt: skip
    for ax, (title, keys) in zip(axes, panels, strict=True):
        for run, key in keys:
            points = series(run, key)
            if points:
                ax.plot(*zip(*points, strict=True), "o-" if key.startswith("val_") else "-", label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="runs/rlhf-demo", type=Path)
    parser.add_argument("--prompts", type=int, default=600, help="training knowledge questions")
    parser.add_argument("--held-out", type=int, default=100, help="held-out knowledge questions")
    parser.add_argument("--samples", type=int, default=4, help="sampled replies per question for the pairs")
    parser.add_argument("--seed", type=int, default=0)
    args, extra = parser.parse_known_args()
    if len(extra) % 2:
        sys.exit(f"override {extra[-1]!r} has no value")
    overrides = stage_overrides(extra)

    import qwenkit
    from qwenkit.demo import DEMO_MODEL_DIR
    from qwenkit.demo.data import prompt_key, prompt_messages
    from qwenkit.demo.evaluate import training_prompts
    from qwenkit.demo.rlhf import (
        PREFERENCE,
        build_pairs,
        knowledge_examples,
        measure,
        sample_replies,
        write_jsonl,
    )
    from qwenkit.train import dpo, ppo, reward
    from qwenkit.train.settings import load_recipe

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    model, tokenizer = qwenkit.load(DEMO_MODEL_DIR)

    t0 = time.perf_counter()
    train = knowledge_examples(args.prompts, args.seed + 1)  # the SFT build's training phrasings
    held_pairs_examples = knowledge_examples(max(args.held_out, 50), args.seed + 2000, held_out=True,
                                             exclude=training_prompts(1) | {prompt_key(e) for e in train})  # fmt: skip
    held = knowledge_examples(args.held_out, args.seed + 3000, held_out=True,
                              exclude=training_prompts(1) | {prompt_key(e) for e in train + held_pairs_examples})  # fmt: skip
    stats_file = out / "pairs_stats.json"  # the pairs of an earlier run with the same settings are reused
    settings = {
        "prompts": args.prompts,
        "held_out": args.held_out,
        "samples": args.samples,
        "seed": args.seed,
    }
    cached = json.loads(stats_file.read_text()) if stats_file.is_file() else {}
    if cached.get("settings") == settings:
        rows, held_rows = read_jsonl(out / "pairs.jsonl"), read_jsonl(out / "held_pairs.jsonl")
        sampled_rate = cached["sampled_preferred"]
    else:
        print(f"rlhf-demo: {PREFERENCE}; sampling {args.samples} replies to {len(train)} + "
              f"{len(held_pairs_examples)} questions", flush=True)  # fmt: skip
        samples = sample_replies(model, tokenizer, train, args.samples, args.seed)
        rows, sampled_rate = build_pairs(train, samples, args.seed)
        held_samples = sample_replies(model, tokenizer, held_pairs_examples, args.samples, args.seed + 1)
        held_rows, _ = build_pairs(held_pairs_examples, held_samples, args.seed + 1)
        write_jsonl(out / "pairs.jsonl", rows)
        write_jsonl(out / "held_pairs.jsonl", held_rows)
        stats_file.write_text(json.dumps({"settings": settings, "sampled_preferred": sampled_rate}))
    write_jsonl(out / "prompts.jsonl", [{"messages": prompt_messages(e)} for e in train])
    write_jsonl(out / "heldout_prompts.jsonl", [{"messages": prompt_messages(e)} for e in held])
    timings["pairs"] = time.perf_counter() - t0
    print(f"rlhf-demo: {len(rows)} pairs ({sampled_rate:.0%} of samples already preferred), "
          f"{len(held_rows)} held-out pairs", flush=True)  # fmt: skip

    t0 = time.perf_counter()
    given = ["--model.path", str(DEMO_MODEL_DIR), "--data.path", str(out / "pairs.jsonl"),
             "--data.eval_path", str(out / "held_pairs.jsonl")]  # fmt: skip
    recipe = load_recipe(reward.RewardRecipe, ROOT / "configs/reward/demo.yaml", given + overrides["reward"])
    reward_checkpoint = reward.run(recipe, out / "reward")
    timings["reward"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    given = ["--model.policy", str(DEMO_MODEL_DIR), "--model.reward", str(reward_checkpoint),
             "--data.path", str(out / "prompts.jsonl")]  # fmt: skip
    recipe = load_recipe(ppo.PPORecipe, ROOT / "configs/ppo/demo.yaml", given + overrides["ppo"])
    ppo_checkpoint = ppo.run(recipe, out / "ppo")
    timings["ppo"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    given = ["--model.path", str(DEMO_MODEL_DIR), "--data.path", str(out / "pairs.jsonl"),
             "--data.eval_path", str(out / "held_pairs.jsonl")]  # fmt: skip
    recipe = load_recipe(dpo.DPORecipe, ROOT / "configs/dpo/demo.yaml", given + overrides["dpo"])
    dpo_checkpoint = dpo.run(recipe, out / "dpo")
    timings["dpo"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    reward_model, _ = reward.load_reward_model(reward_checkpoint)
    results = {}
    for name, path in (("shipped", DEMO_MODEL_DIR), ("ppo", ppo_checkpoint), ("dpo", dpo_checkpoint)):
        policy = qwenkit.load(path)[0]
        results[name] = measure(policy, model, reward_model, tokenizer, held, args.seed + 7)
    timings["measure"] = time.perf_counter() - t0
    last = [json.loads(x) for x in (out / "reward" / "metrics.jsonl").read_text().splitlines()][-1]
    report = {
        "preference": PREFERENCE,
        "pairs": len(rows),
        "held_out_pairs": len(held_rows),
        "held_out_prompts": len(held),
        "sampled_preferred_before": sampled_rate,
        "reward_model": {
            "val_accuracy": last.get("val_accuracy"),
            "val_loss": last.get("val_loss"),
            "steps": last["step"],
        },  # fmt: skip
        "results": results,
        "timings_s": {k: round(v) for k, v in timings.items()},
        "minutes": round((time.perf_counter() - started) / 60, 1),
        "args": {k: str(v) for k, v in vars(args).items()},
        "overrides": extra,
    }
    (out / "report.json").write_text(json.dumps(report, ensure_ascii=False, indent=1))
    plot_curves(out, out / "curves.png")
    print(f"reward model held-out accuracy: {last.get('val_accuracy')}")
    print("| model | right (greedy) | right (sampled) | mean reward | KL to shipped |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['greedy_right']:.1%} | {r['sampled_right']:.1%} | {r['reward']:.3f} | {r['kl']:.3f} |"
        )
    print(f"rlhf-demo done in {report['minutes']} minutes: {out / 'report.json'}")
    return 0


if __name__ == "__main__":
    from qwenkit.errors import QwenkitError

    try:
        sys.exit(main())
    except QwenkitError as e:
        sys.exit(f"rlhf-demo: {e}")

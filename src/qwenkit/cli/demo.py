"""`qwenkit demo build|eval`: the embedded demo chat model's build and held-out measurement (qwenkit.demo)."""

from __future__ import annotations

import argparse
from pathlib import Path

from qwenkit.cli.common import add_verb, check_destination, seed_value
from qwenkit.errors import QwenkitError


def add_parsers(verbs) -> None:
    demo = add_verb(
        verbs,
        "demo",
        "build or measure the embedded demo chat model",
        "  qwenkit demo build                      # the whole pipeline, as `make demo-model`\n"
        "  qwenkit demo build --sft.train.max_steps 200 --out /tmp/demo --no-card\n"
        "  qwenkit demo eval --count 200",
    )
    demo_verbs = demo.add_subparsers(dest="demo_verb", metavar="ACTION", required=True)
    p = demo_verbs.add_parser("build", help="own vocabulary -> pretraining -> SFT -> held-out measurement")
    p.add_argument(
        "--work", default="runs/demo", metavar="DIR", help="data and training runs (default: %(default)s)"
    )
    p.add_argument(
        "--out", default=None, metavar="DIR", help="the model directory (default: the package's demo_model)"
    )
    p.add_argument("--seed", type=seed_value, default=0, help="seed of the data, vocabulary and training")
    p.add_argument(
        "--data",
        choices=["composed", "tables"],
        default="composed",
        help="the generated data: composed (issue 17) or tables (the shipped model's) (default: %(default)s)",
    )
    p.add_argument("--no-card", dest="card", action="store_false", help="leave docs/demo-model.md as it is")
    p.set_defaults(run=run_build, dotted_overrides=True)
    p = demo_verbs.add_parser("eval", help="measure a model on held-out demo prompts")
    p.add_argument("--model", metavar="DIR", help="default: the embedded demo model")
    p.add_argument("--count", type=int, default=200, help="held-out conversations (default: %(default)s)")
    p.add_argument("--seed", type=seed_value, default=0, help="the build's seed (default: %(default)s)")
    p.add_argument(
        "--data", choices=["composed", "tables"], help="the build's data (default: the shipped model's)"
    )
    p.set_defaults(run=run_eval)


def run_build(args: argparse.Namespace) -> int:
    from qwenkit.demo import DEMO_MODEL_DIR, BuildSettings, build, record_build, score_table

    work, out = Path(args.work), Path(args.out or DEMO_MODEL_DIR)
    if work.exists() and not work.is_dir():
        raise QwenkitError(f"--work {work} exists and is not a directory")
    check_destination(work, out, force=True)  # checked now, not after an hour of training
    report = build(work, out, BuildSettings(seed=args.seed, data=args.data), args.overrides)
    record_build(report, work, out, card=args.card)
    print(score_table(report["scores"]))
    print(f"demo model written to {out} in {report['minutes']} minutes")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    if args.count < 1:
        raise QwenkitError(f"--count must be >= 1, got {args.count}")
    from qwenkit.checkpoint import load
    from qwenkit.demo import DEMO_MODEL_DIR, evaluate_held_out, score_table

    model, tokenizer = load(args.model or DEMO_MODEL_DIR, dtype="float32")
    print(score_table(evaluate_held_out(model, tokenizer, args.count, args.seed, args.data)["scores"]))
    return 0

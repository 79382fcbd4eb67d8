"""`qwenkit arena`: human pairwise evaluation (qwenkit.arena) -- the rating page, its report, and the
export of the ratings as preference pairs for `qwenkit reward`."""

from __future__ import annotations

import argparse
import sys

from qwenkit.cli.common import DTYPE_CHOICES, add_verb, device_name, seed_value
from qwenkit.errors import QwenkitError


def add_parsers(verbs) -> None:
    p = add_verb(
        verbs,
        "arena",
        "rate two models' answers side by side in a web page; report win rates and ratings; export pairs",
        "  qwenkit arena --models chat=./Qwen-7B-Chat sft=runs/sft/final --prompts eval.jsonl --db arena.db\n"
        "  qwenkit arena --models A=./ckpt-a B=./ckpt-b --prompts prompts.txt --db arena.db --port 8080 "
        "--temperature 0.7 --top-p 0.9\n"
        "  qwenkit arena --db arena.db --models A=./ckpt-a B=./ckpt-b     (restart: stored answers reused)\n"
        "  qwenkit arena report --db arena.db --out arena-report\n"
        "  qwenkit arena export --db arena.db --out pairs.jsonl   (then: qwenkit reward --data pairs.jsonl ...)\n"
        'prompts: JSON lines {"prompt": text or [messages], "category": optional} or a .txt file, one per line',
    )
    p.add_argument("--models", nargs="+", metavar="NAME=DIR",
                   help="two or more checkpoints to compare, each under a name raters never see")  # fmt: skip
    p.add_argument("--prompts", metavar="FILE",
                   help="instructions to answer (new ones are added to the database; optional on a restart)")  # fmt: skip
    p.add_argument("--db", metavar="FILE", help="the SQLite database of prompts, answers and ratings")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8100, help="port to listen on (default: %(default)s)")
    p.add_argument("--title", default="qwenkit arena", help="the page's title (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N",
                   help="answer length limit in tokens (default: %(default)s)")  # fmt: skip
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy answers, else sampled (default: %(default)s)")  # fmt: skip
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default: %(default)s)")
    p.add_argument("--seed", type=seed_value, default=0, help="sampling seed (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N",
                   help="prompts answered together (default: %(default)s)")  # fmt: skip
    p.add_argument("--device", type=device_name, default="auto", help="cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--dtype", choices=("auto", *DTYPE_CHOICES), default="auto", help="weight dtype")
    p.add_argument("--generate-only", action="store_true",
                   help="generate and store the answers, then exit without serving the page")  # fmt: skip
    p.set_defaults(run=run_arena)

    steps = p.add_subparsers(dest="arena_verb", metavar="STEP")
    q = add_verb(
        steps,
        "report",
        "win/tie/loss per model pair, Bradley-Terry ratings with bootstrap intervals, per category, a chart",
        "  qwenkit arena report --db arena.db\n  qwenkit arena report --db arena.db --out report/ --rounds 2000",
    )
    q.add_argument("--db", required=True, metavar="FILE", help="the arena database")
    q.add_argument("--out", metavar="DIR", help="write report.json, report.md and ratings.png there")
    q.add_argument("--rounds", type=int, default=1000, metavar="N",
                   help="bootstrap resamples for the intervals (default: %(default)s)")  # fmt: skip
    q.add_argument("--seed", type=seed_value, default=0, help="bootstrap seed (default: %(default)s)")
    q.set_defaults(run=run_report)

    q = add_verb(
        steps,
        "export",
        "write the decisive ratings as TRL conversational preference pairs (JSONL) for `qwenkit reward`",
        "  qwenkit arena export --db arena.db --out pairs.jsonl",
    )
    q.add_argument("--db", required=True, metavar="FILE", help="the arena database")
    q.add_argument("--out", required=True, metavar="FILE", help="the JSONL file to write")
    q.set_defaults(run=run_export)


def open_store(path: str | None, must_exist: bool):
    from pathlib import Path

    from qwenkit.arena.store import ArenaStore

    if not path:
        raise QwenkitError("give the arena database with --db FILE")
    if must_exist and not Path(path).is_file():
        raise QwenkitError(f"arena database {path} does not exist")
    return ArenaStore(path)


def run_arena(args: argparse.Namespace) -> int:
    """Add the prompts, generate the answers still missing, and serve the rating page."""
    from qwenkit.arena.answers import AnswerSettings, fill_answers, parse_model_specs, read_prompts_file

    if not args.models:
        raise QwenkitError("give the models to compare: --models A=DIR B=DIR (or a step: report, export)")
    if not 1 <= args.port <= 65535:
        raise QwenkitError(f"--port must be between 1 and 65535, got {args.port}")
    specs = parse_model_specs(args.models)
    settings = AnswerSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_p=args.top_p, seed=args.seed, batch_size=args.batch_size)  # fmt: skip
    prompts = read_prompts_file(args.prompts) if args.prompts else None
    store = open_store(args.db, must_exist=False)
    if prompts is not None:
        store.add_prompts(prompts)
    elif not store.prompts():
        raise QwenkitError(f"{args.db} holds no prompts yet; give them with --prompts FILE")
    for spec in specs:
        made = fill_answers(store, spec, settings, device=args.device, dtype=args.dtype)
        print(f"qwenkit arena: {spec.name}: {made} answers generated, "
              f"{len(store.prompts()) - made} reused from {args.db}", file=sys.stderr)  # fmt: skip
    if args.generate_only:
        return 0
    import uvicorn

    from qwenkit.arena.app import create_arena_app

    app = create_arena_app(store, [s.name for s in specs], title=args.title)
    print(f"qwenkit arena: rate at http://{args.host}:{args.port} (ratings in {args.db})")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def run_report(args: argparse.Namespace) -> int:
    from qwenkit.arena.ratings import build_report, write_report

    store = open_store(args.db, must_exist=True)
    report = build_report(store.ratings(), rounds=args.rounds, seed=args.seed)
    print(report.markdown())
    if args.out:
        files = write_report(report, args.out)
        print(f"qwenkit arena report: wrote {', '.join(str(f) for f in files.values())}", file=sys.stderr)
    return 0


def run_export(args: argparse.Namespace) -> int:
    from qwenkit.arena.ratings import export_pairs

    store = open_store(args.db, must_exist=True)
    written, skipped = export_pairs(store, args.out)
    print(f"qwenkit arena export: {written} preference pairs to {args.out} "
          f"({skipped} ties, both-bad ratings and choices between identical answers left out)")  # fmt: skip
    return 0

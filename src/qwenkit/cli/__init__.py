"""The `qwenkit` command, a layer on top of the library: one module per verb family.

Each module's `add_parsers(verbs)` adds its verbs, each with `set_defaults(run=...)`; a run function
turns the parsed arguments into typed calls of the library (which never sees an argparse namespace
and never imports this package). Run functions import torch and the model themselves, so
`qwenkit --help` does not load them. User mistakes raise QwenkitError; `main` prints its message
on one line and exits 1.

  chat.py        chat (the REPL), generate
  checkpoint.py  convert, info, merge-lora, export gguf
  serve.py       serve
  data.py        tokenizer train|stats, data pack
  train.py       pretrain, sft, reward (and reward score), ppo, dpo
  demo.py        demo build|eval
  agent.py       agent
  eval.py        eval (benchmarks, qwenkit.eval)
  quant.py       quantize (int8/int4 round-to-nearest and GPTQ, qwenkit.quant)
  arena.py       arena, arena report|export (human pairwise evaluation, qwenkit.arena)
  common.py      what several verbs share: model options, argument types, check_destination
"""

from __future__ import annotations

import argparse
import io
import os
import sys

from qwenkit.cli import agent, arena, chat, checkpoint, data, demo, quant, serve, train
from qwenkit.cli import eval as eval_verb
from qwenkit.errors import QwenkitError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwenkit",
        description="qwenkit: run, convert and inspect Qwen models.",
        epilog="Run 'qwenkit VERB --help' for the options and examples of one verb.",
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for family in (chat, checkpoint, serve, data, train, demo, agent, eval_verb, quant, arena):
        family.add_parsers(verbs)
    return parser


def tolerate_unencodable_output() -> None:
    """Model text can hold characters the terminal's encoding lacks; show them as '?' instead of failing."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="replace")
    if isinstance(sys.stdin, io.TextIOWrapper):
        sys.stdin.reconfigure(errors="replace")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `qwenkit` command; returns the exit status."""
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:2] == ["reward", "score"]:  # a sub-verb with its own options and help
        from qwenkit.cli.train import reward_score_parser

        parser, argv = reward_score_parser(), words[2:]
    else:
        parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra and not getattr(args, "dotted_overrides", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = extra
        args.argv = words  # the command line, for records
    except SystemExit as e:  # --help, or a usage error argparse already printed
        return e.code if isinstance(e.code, int) else 2
    tolerate_unencodable_output()
    try:
        return args.run(args)
    except QwenkitError as e:
        print(f"qwenkit: error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `qwenkit generate ... | head`: the reader left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1

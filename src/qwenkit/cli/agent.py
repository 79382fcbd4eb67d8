"""`qwenkit agent`: answer one question with tools (ReAct, qwenkit.agent), printing every step."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from qwenkit.cli.common import add_model_arguments, add_verb, load_model, seed_value, write
from qwenkit.errors import QwenkitError


def add_parsers(verbs) -> None:
    p = add_verb(
        verbs,
        "agent",
        "answer a question with tools (ReAct): a calculator and a sandboxed Python interpreter",
        "  qwenkit agent --model ./Qwen-7B-Chat --tools calculator 'What is 3.7 * (12 + 5.5)?'\n"
        "  qwenkit agent --model ./Qwen-7B-Chat --tools python,calculator --max-steps 6 'Plot sin(x) on [0, 2pi]'\n"
        "  qwenkit agent --model ./ckpt --tools python --save-images figures/ --greedy 'Histogram of 1000 normals'\n"
        "prints each Thought / Action / Action Input / Observation, then the answer; see docs/agents.md",
    )
    add_model_arguments(p)
    p.add_argument("question", metavar="QUESTION", help="the question to answer")
    p.add_argument("--tools", default="calculator,python", metavar="NAMES",
                   help="comma-separated built-in tools: calculator, python (default: %(default)s)")  # fmt: skip
    p.add_argument("--max-steps", type=int, default=8, metavar="N", help="tool calls at most (default: 8)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="S",
                   help="seconds a python cell may run before its kernel is restarted (default: 30)")  # fmt: skip
    p.add_argument("--save-images", metavar="DIR", help="write the figures the python tool makes to DIR")
    p.add_argument("--max-new-tokens", type=int, metavar="N", help="tokens per model turn at most")
    p.add_argument("--temperature", type=float, metavar="T", help="sampling temperature (> 0)")
    p.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling mass, in (0, 1]")
    p.add_argument("--greedy", action="store_true", help="pick the most likely token (no sampling)")
    p.add_argument("--seed", type=seed_value, metavar="N", help="sampling seed, for reproducible runs")
    p.add_argument("--tool-format", choices=["auto", "react", "hermes"], default="auto",
                   help="hermes = the checkpoint's chat template and <tool_call> replies (Qwen2.5), react = the "
                        "original Qwen's ReAct prompt; auto = hermes when the template reads tools (default: auto)")  # fmt: skip
    p.set_defaults(run=run_agent)


def run_agent(args: argparse.Namespace) -> int:
    import warnings

    from qwenkit.agent import loop
    from qwenkit.agent.hermes import resolve_tool_format
    from qwenkit.agent.interpreter import bwrap_path
    from qwenkit.agent.loop import Final, TextDelta, ToolCalled, ToolResult

    names = [name.strip() for name in args.tools.split(",") if name.strip()]
    if not names:
        raise QwenkitError("--tools needs at least one tool name (calculator, python)")
    if args.max_steps < 1:
        raise QwenkitError(f"--max-steps must be >= 1, got {args.max_steps}")
    if not 0 < args.timeout < math.inf:
        raise QwenkitError(f"--timeout must be a number of seconds > 0, got {args.timeout}")
    images = Path(args.save_images) if args.save_images else None
    if images is not None and images.exists() and not images.is_dir():
        raise QwenkitError(f"--save-images: {images} exists and is not a directory")
    if "python" in names and bwrap_path() is None:
        print("qwenkit: warning: bubblewrap is missing; python code runs with resource limits only, "
              "not sandboxed (see docs/agents.md)", file=sys.stderr)  # fmt: skip
    settings = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
                "do_sample": False if args.greedy else None}  # fmt: skip
    settings = {key: value for key, value in settings.items() if value is not None}
    with loop.ToolRegistry.from_names(names, timeout=args.timeout) as tools, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the missing-bwrap warning was printed above
        model, tokenizer, _ = load_model(args)
        tool_format = resolve_tool_format(tokenizer, args.tool_format)
        hermes = tool_format == "hermes"
        complete = loop.local_complete(model, tokenizer, seed=args.seed, hermes=hermes, **settings)
        saved = 0
        events = loop.run_agent(
            args.question, complete, tools, max_steps=args.max_steps, tool_format=tool_format
        )
        for event in events:
            if isinstance(event, TextDelta):
                write(event.text)
            elif isinstance(event, ToolCalled) and hermes:  # ReAct shows its calls in the text
                write(f"\nAction: {event.name}\nAction Input: {event.arguments}\n")
            elif isinstance(event, ToolResult):
                write(f"Observation: {event.text}\n")
                for png in event.images:
                    saved += 1
                    if images is None:
                        write(f"[image {saved}: not saved; pass --save-images DIR]\n")
                        continue
                    images.mkdir(parents=True, exist_ok=True)
                    (images / f"image-{saved}.png").write_bytes(png)
                    write(f"[image {saved}: {images / f'image-{saved}.png'}]\n")
                write("" if hermes else "Thought:")
            elif isinstance(event, Final) and event.answer is None:
                write("\n")
                raise QwenkitError(f"no final answer within {args.max_steps} tool calls (see --max-steps)")
            elif isinstance(event, Final):
                print(f"\n\nAnswer: {event.answer}")
    return 0

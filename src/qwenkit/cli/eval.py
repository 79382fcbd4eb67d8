"""`qwenkit eval`: run evaluation tasks (qwenkit.eval) on a local model or a running server and write
results.json, predictions.jsonl and report.md (+ chart) to --out."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from qwenkit.cli.common import add_model_arguments, add_verb, seed_value

USAGE_ERROR = 2  # unknown task, missing data: the exit status of a usage error, as argparse's


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}; use an integer >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}; use an integer >= 1")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}; use an integer >= 0") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}; use an integer >= 0")
    return value


def lengths_value(text: str) -> tuple[int, ...]:
    try:
        lengths = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid lengths {text!r}; use numbers like 1024,2048") from None
    if any(n < 2 for n in lengths):
        raise argparse.ArgumentTypeError(f"invalid lengths {text!r}; every length must be >= 2")
    return lengths


def add_parsers(verbs) -> None:
    p = add_verb(
        verbs,
        "eval",
        "evaluate a model on benchmarks, scored as the official Qwen scripts score them",
        "  qwenkit eval --list\n"
        "  qwenkit eval mmlu --model ./Qwen-7B --data data/mmlu --out runs/eval-mmlu\n"
        "  qwenkit eval gsm8k mmlu --model ./Qwen-7B-Chat --chat --data data --out runs/eval-chat\n"
        "  qwenkit eval mmlu --api http://127.0.0.1:8000 --model ./Qwen-7B --data data/mmlu --out runs/api\n"
        "  qwenkit eval humaneval --samples samples.jsonl --out runs/he\n"
        "  qwenkit eval long-ppl --model ./Qwen-7B --data arxiv/ --lengths 1024,2048,4096 --out runs/ppl\n"
        "  qwenkit eval demo --out runs/demo   # the demo model's own measures",
    )
    p.add_argument("tasks", nargs="*", metavar="TASK", help="tasks to run (see --list)")
    p.add_argument("--list", action="store_true", help="list the tasks and exit")
    add_model_arguments(p)
    p.add_argument(
        "--api",
        metavar="URL",
        help="a running `qwenkit serve` (its tokenizer: --model DIR, default the demo model's)",
    )
    p.add_argument("--api-key", metavar="KEY", help="the server's --api-key")
    p.add_argument("--data", metavar="PATH", help="the benchmark's files in their published layout")
    p.add_argument("--out", metavar="DIR", help="where results.json, predictions.jsonl and report.md go")
    p.add_argument(
        "--samples", metavar="FILE", help="score these completions (JSONL: task_id, completion), no model"
    )
    p.add_argument(
        "--shots", type=non_negative_int, help="few-shot examples per prompt (default: the task's)"
    )
    p.add_argument("--limit", type=positive_int, help="at most N items (per subject for subject tasks)")
    p.add_argument(
        "--batch-size", type=positive_int, default=16, help="prompts per batch (default: %(default)s)"
    )
    p.add_argument("--chat", action="store_true", help="the chat variant (zero-shot ChatML prompts)")
    p.add_argument("--n-samples", type=positive_int, default=1, help="completions per problem (pass@k)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--max-new-tokens", type=positive_int, help="generation budget (default: the task's)")
    p.add_argument("--lengths", type=lengths_value, help="long-ppl: window lengths, e.g. 1024,2048,4096")
    p.add_argument("--seed", type=seed_value, default=0, help="sampling seed (default: %(default)s)")
    p.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        help="humaneval/mbpp: seconds per program (default: %(default)s)",
    )
    p.add_argument(
        "--workers",
        type=positive_int,
        default=2,
        help="humaneval/mbpp: programs run at once (default: %(default)s)",
    )
    p.add_argument(
        "--unsafe",
        action="store_true",
        help="humaneval/mbpp: without bubblewrap, run the programs unsandboxed",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(run=run_eval)


def usage_error(message: str) -> int:
    print(f"qwenkit: error: {message}", file=sys.stderr)
    return USAGE_ERROR


def list_tasks(tasks) -> str:
    width = max(len(name) for name in tasks)
    return "\n".join(f"{name:<{width}}  {tasks[name].description}" for name in sorted(tasks))


def run_eval(args: argparse.Namespace) -> int:
    from qwenkit.eval import TASKS, EvalSettings

    if args.list:
        print(list_tasks(TASKS))
        return 0
    if not args.tasks:
        return usage_error("name at least one task (qwenkit eval --list shows them)")
    unknown = [name for name in args.tasks if name not in TASKS]
    if unknown:
        return usage_error(f"unknown task {', '.join(map(repr, unknown))}; known: {', '.join(sorted(TASKS))}")
    if len(set(args.tasks)) != len(args.tasks):
        return usage_error("a task is named twice")
    if args.out is None:
        return usage_error("--out DIR is required")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        return usage_error(f"--out {out} exists and is a file")
    for option, value in (("--data", args.data), ("--samples", args.samples)):
        if value is not None and not Path(value).exists():
            return usage_error(f"{option} {value} does not exist")
    if args.samples is not None and args.api is not None:
        return usage_error("--samples scores given completions; it takes no --api")
    if args.adapter is not None and args.api is not None:
        return usage_error("--adapter applies to a local model; a server serves its own")
    if not args.timeout > 0:
        return usage_error(f"--timeout must be positive, got {args.timeout}")
    if not 0.0 <= args.temperature <= 2.0:
        return usage_error(f"--temperature must be in [0, 2], got {args.temperature}")

    settings = EvalSettings(
        data=Path(args.data) if args.data is not None else None,
        shots=args.shots,
        limit=args.limit,
        batch_size=args.batch_size,
        chat=args.chat,
        max_new_tokens=args.max_new_tokens,
        n_samples=args.n_samples,
        completions=Path(args.samples) if args.samples is not None else None,
        temperature=args.temperature,
        seed=args.seed,
        progress=args.progress,
        lengths=args.lengths,
        timeout=args.timeout,
        workers=args.workers,
        unsafe=args.unsafe,
    )
    tasks = [TASKS[name] for name in args.tasks]
    needs_model = settings.completions is None and any(t.needs_model for t in tasks)
    backend, model_info = open_backend(args) if needs_model else (None, {})

    from qwenkit.eval.report import write_outputs

    results = []
    try:
        for t in tasks:
            start = time.perf_counter()
            result = t.run(backend, settings)
            result.seconds = result.seconds or time.perf_counter() - start
            results.append(result)
            metric = next(iter(result.metrics.items()), None)
            shown = f"{metric[0]} {metric[1]:.4f}" if metric else "no metric"
            print(f"{t.name}: {shown} ({len(result.predictions)} items, {result.seconds:.1f} s)", flush=True)
    finally:
        if hasattr(backend, "close"):
            backend.close()
    argv = getattr(args, "argv", None)
    info = {"model": model_info, "command": shlex.join(["qwenkit", *argv]) if argv is not None else None}
    paths = write_outputs(out, results, info)
    print(f"results written to {paths['results']}, {paths['predictions']} and {paths['report']}")
    return 0


def open_backend(args: argparse.Namespace):
    """(backend, model description for results.json) for --model/--api and the device options."""
    import qwenkit
    from qwenkit.eval import LocalBackend

    path = Path(args.model) if args.model is not None else qwenkit.default_model_path()
    if args.api is not None:
        from qwenkit.eval.remote import ApiBackend
        from qwenkit.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_file(path)
        backend = ApiBackend(args.api, tokenizer, api_key=args.api_key, batch_size=args.batch_size)
        return backend, {"name": backend.name, "api": backend.url, "tokenizer": str(path)}
    model, tokenizer = qwenkit.load(
        path, device=args.device, dtype=args.dtype, adapter=args.adapter, kv_cache=args.kv_cache
    )
    backend = LocalBackend(model, tokenizer, name=path.name, batch_size=args.batch_size)
    info = {"name": path.name, "path": str(path), "adapter": args.adapter, "dtype": str(model.dtype).removeprefix("torch."),
            "device": str(model.device)}  # fmt: skip
    return backend, info

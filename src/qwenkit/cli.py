"""The `qwenkit` command: one verb per task.

Adding a verb is one `cmd_<verb>(args) -> int` function plus one parser block in `build_parser()`.
Verb functions import torch and the model themselves, so `qwenkit --help` does not load them.
User mistakes raise QwenkitError; `main` prints its message on one line and exits 1.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import math
import os
import re
import sys
from pathlib import Path

from qwenkit.errors import QwenkitError

DTYPE_CHOICES = ("float32", "bfloat16", "float16")


# ---------------------------------------------------------------------------------------------
# Shared pieces


def device_name(text: str) -> str:
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"invalid device {text!r}; use cpu, cuda or cuda:N")
    return text


def seed_value(text: str) -> int:
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seed {text!r}; use an integer >= 0") from None
    if not 0 <= seed < 2**63:
        raise argparse.ArgumentTypeError(f"invalid seed {text!r}; use an integer in [0, 2**63)")
    return seed


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", metavar="DIR", help="checkpoint directory (default: the built-in default model)"
    )
    parser.add_argument("--adapter", metavar="DIR", help="LoRA adapter (peft format) to merge into the model")
    parser.add_argument(
        "--device", type=device_name, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)"
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        help="weight dtype (default: float32 on CPU, the checkpoint's own dtype on GPU)",
    )


def load_model(args: argparse.Namespace):
    """(model, tokenizer, path) for the --model/--device/--dtype arguments."""
    import torch

    import qwenkit

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise QwenkitError(f"device {device} was asked for but only {torch.cuda.device_count()} GPUs exist")
    path = Path(args.model) if args.model is not None else qwenkit.default_model_path()
    model, tokenizer = qwenkit.load(path, device=device, dtype=args.dtype, adapter=args.adapter)
    return model, tokenizer, path


def format_count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------------
# chat


# The settings `:conf` shows and changes, with the Python type each value must have.
CHAT_SETTINGS: dict[str, type] = {
    "max_new_tokens": int,
    "do_sample": bool,
    "temperature": float,
    "top_k": int,
    "top_p": float,
    "repetition_penalty": float,
    "max_window_size": int,
}

CHAT_COMMANDS = (
    (("help", "h"), "", "show this help"),
    (("exit", "quit", "q"), "", "leave (Ctrl-D too)"),
    (("clear", "cl"), "", "clear the screen"),
    (("clear-history", "clh"), "", "forget the conversation so far"),
    (("history", "his"), "", "show the conversation so far"),
    (("seed",), "[N|none]", "show the sampling seed, or set it: every reply then samples reproducibly"),
    (("conf",), "[key=value ...]", "show the generation settings, or change them"),
    (("reset-conf",), "", "restore the model's own generation settings"),
)


def parse_setting(item: str) -> tuple[str, object]:
    """`key=value` -> (key, value); the value is a Python literal (ast.literal_eval, never eval)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise QwenkitError(f"expected key=value, got {item!r}")
    if key not in CHAT_SETTINGS:
        raise QwenkitError(f"unknown setting {key!r}; settings: {', '.join(CHAT_SETTINGS)}")
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise QwenkitError(
            f"{key}: {text.strip()!r:.40} is not a literal value (e.g. 0.5, 64, True)"
        ) from None
    kind = CHAT_SETTINGS[key]
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < 1e300
        value = float(value) if ok else value
    if not ok:
        raise QwenkitError(f"{key} takes a value of type {kind.__name__}, got {value!r:.40}")
    if key == "max_window_size" and value <= 0:
        raise QwenkitError("max_window_size must be > 0")
    return key, value


class ChatSession:
    """One terminal conversation: history, generation settings and seed. `handle` takes one line."""

    def __init__(self, model, tokenizer, system: str, seed: int | None) -> None:
        from qwenkit.generation import GenerationConfig

        self.model = model
        self.tokenizer = tokenizer
        self.system = system
        self.seed = seed
        self.history: list[tuple[str, str]] = []
        self.defaults = model.generation_config or GenerationConfig()
        self.settings = self.defaults
        self.commands = {
            "help": self.show_help,
            "clear": self.clear_screen,
            "clear-history": self.clear_history,
            "history": self.show_history,
            "seed": self.set_seed,
            "conf": self.configure,
            "reset-conf": self.reset_settings,
        }
        self.aliases = {alias: names[0] for names, _, _ in CHAT_COMMANDS for alias in names}

    def handle(self, line: str) -> bool:
        """Run one input line (a command or a question); False when the user asked to leave."""
        line = line.strip()
        if not line:
            return True
        if not line.startswith(":"):
            self.reply(line)
            return True
        name, _, argument = line[1:].partition(" ")
        command = self.aliases.get(name)
        if command is None:
            print(f"unknown command :{name}; type :help for the list")
            return True
        if command == "exit":
            return False
        try:
            self.commands[command](argument.strip())
        except QwenkitError as e:
            print(e)
        return True

    def reply(self, query: str) -> None:
        """Stream the answer to `query`, printing only what is new in each cumulative response."""
        settings = {key: getattr(self.settings, key) for key in CHAT_SETTINGS}
        response = ""
        write("Assistant> ")
        try:
            for response_so_far in self.model.chat_stream(
                self.tokenizer, query, self.history, self.system, seed=self.seed, **settings
            ):
                write(response_so_far[len(response) :])
                response = response_so_far
        except QwenkitError as e:
            write("\n")
            print(f"error: {e}", file=sys.stderr)
            return
        except KeyboardInterrupt:
            write("\n(reply interrupted; it is not kept in the history)\n")
            return
        write("\n")
        self.history.append((query, response.strip()))

    def show_help(self, _: str) -> None:
        print("Type a message to chat, or a command:")
        for names, argument, description in CHAT_COMMANDS:
            usage = " | ".join(f":{n}" for n in names) + (f" {argument}" if argument else "")
            print(f"  {usage:<34} {description}")
        print(f"Settings for :conf: {', '.join(CHAT_SETTINGS)}")

    def clear_screen(self, _: str) -> None:
        if sys.stdout.isatty():
            write("\033[2J\033[H")

    def clear_history(self, _: str) -> None:
        self.history = []
        print("history cleared")

    def show_history(self, _: str) -> None:
        if not self.history:
            print("(no history)")
        for i, (query, response) in enumerate(self.history, start=1):
            print(f"[{i}] User> {query}\n    Assistant> {response}")

    def set_seed(self, argument: str) -> None:
        if argument:
            if argument.lower() == "none":
                self.seed = None
            else:
                try:
                    self.seed = seed_value(argument)
                except argparse.ArgumentTypeError as e:
                    raise QwenkitError(str(e)) from None
        print(f"seed: {self.seed}" if self.seed is not None else "seed: none (replies are not reproducible)")

    def configure(self, argument: str) -> None:
        changes = dict(parse_setting(item) for item in argument.split())
        self.settings = self.settings.updated(**changes)
        for key in changes or CHAT_SETTINGS:
            print(f"  {key} = {getattr(self.settings, key)!r}")

    def reset_settings(self, _: str) -> None:
        self.settings = self.defaults
        self.configure("")


def cmd_chat(args: argparse.Namespace) -> int:
    model, tokenizer, path = load_model(args)
    if sys.stdin.isatty():
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401 - gives input() line editing and history
    session = ChatSession(model, tokenizer, args.system, args.seed)
    params = format_count(sum(p.numel() for p in model.parameters()))
    dtype = str(model.dtype).removeprefix("torch.")
    print(f"qwenkit chat: {path} ({params} parameters, {model.device}, {dtype})")
    if args.model is None:
        print(
            "This is the embedded demo model (docs/demo-model.md): a few million parameters that know only "
            "their generated training data. Pass --model DIR to chat with a real checkpoint."
        )
    print("Type :help for commands, :exit or Ctrl-D to leave.")
    while True:
        try:
            line = input("User> ")
        except EOFError:
            write("\n")
            return 0
        if not session.handle(line):
            return 0


# ---------------------------------------------------------------------------------------------
# generate


def cmd_generate(args: argparse.Namespace) -> int:
    model, tokenizer, _ = load_model(args)
    ids = tokenizer.encode(args.prompt)
    settings = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "repetition_penalty": args.repetition_penalty,
        "do_sample": False if args.greedy else None,
    }
    settings = {key: value for key, value in settings.items() if value is not None}
    for delta in model.stream_generate(tokenizer, ids, seed=args.seed, **settings):
        write(delta)
    write("\n")
    return 0


# ---------------------------------------------------------------------------------------------
# convert


def check_destination(src: Path, dst: Path, force: bool) -> None:
    """Refuse to replace anything but an empty directory, or a checkpoint when --force is given."""
    if not dst.exists():
        return
    if src.exists() and dst.resolve() == src.resolve():
        raise QwenkitError(f"the output {dst} must be a different directory from the input")
    if not dst.is_dir():
        raise QwenkitError(f"{dst} exists and is a file")
    if not any(dst.iterdir()):
        return
    if not (dst / "config.json").is_file():
        raise QwenkitError(f"{dst} exists and is not a checkpoint directory; choose another output directory")
    if not force:
        raise QwenkitError(f"{dst} already holds a checkpoint; pass --force to replace it")


def cmd_convert(args: argparse.Namespace) -> int:
    import qwenkit
    from qwenkit.checkpoint import describe

    src, dst = Path(args.src), Path(args.dst)
    source = describe(src)
    check_destination(src, dst, args.force)
    stored = source["stored_dtypes"]
    dtype = args.dtype or (stored[0] if len(stored) == 1 and stored[0] in DTYPE_CHOICES else "float32")
    model, tokenizer = qwenkit.load(src, device="cpu", dtype=dtype)
    try:
        qwenkit.save(model, tokenizer, dst, dtype=dtype)
    except OSError as e:
        raise QwenkitError(f"cannot write {dst}: {e.strerror or e}") from None
    params = format_count(source["parameters"])
    print(f"converted {src} -> {dst}: {source['layout']} -> Qwen2 layout, {dtype}, {params} parameters")
    return 0


# ---------------------------------------------------------------------------------------------
# info


def format_memory(gib: float) -> str:
    return f"{gib:.1f} GiB" if gib >= 1 else f"{gib * 1024:.0f} MiB"


def info_table(info: dict) -> str:
    c = info["config"]
    on = {True: "on", False: "off"}
    rows = [
        ("checkpoint", info["path"]),
        ("layout", info["layout"]),
        ("parameters", f"{format_count(info['parameters'])} ({info['parameters']:,})"),
        (
            "stored",
            f"{info['stored_tensors']} tensors, {info['stored_parameters']:,} values, "
            f"{', '.join(info['stored_dtypes'])}",
        ),
        ("layers", str(c["num_hidden_layers"])),
        ("hidden size", str(c["hidden_size"])),
        (
            "attention heads",
            f"{c['num_attention_heads']} query, {c['num_key_value_heads']} key/value, head dim {c['head_dim']}",
        ),
        ("FFN width", str(c["intermediate_size"])),
        ("vocabulary", f"{c['vocab_size']:,}" + (" (tied embeddings)" if c["tie_word_embeddings"] else "")),
        ("context", f"{c['max_position_embeddings']:,} tokens, rope theta {c['rope_theta']:g}"),
        (
            "long context",
            f"dynamic NTK {on[c['use_dynamic_ntk']]}, LogN {on[c['use_logn_attn']]}, "
            f"window attention {on[c['use_window_attn']]}",
        ),
        ("memory", ", ".join(f"{name} {format_memory(g)}" for name, g in info["memory_gib"].items())),
        ("tokenizer", "qwen.tiktoken present" if info["tokenizer"] else "no qwen.tiktoken (missing)"),
    ]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def cmd_info(args: argparse.Namespace) -> int:
    from qwenkit.checkpoint import describe

    info = describe(args.dir)
    print(json.dumps(info, indent=2) if args.json else info_table(info))
    return 0


# ---------------------------------------------------------------------------------------------
# The parser and the one error path


def add_verb(subparsers, name: str, help: str, examples: str) -> argparse.ArgumentParser:
    return subparsers.add_parser(
        name,
        help=help,
        description=help[0].upper() + help[1:] + ".",
        epilog="examples:\n" + examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwenkit",
        description="qwenkit: run, convert and inspect Qwen models.",
        epilog="Run 'qwenkit VERB --help' for the options and examples of one verb.",
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    p = add_verb(
        verbs,
        "chat",
        "chat with a model in the terminal (ChatML, streamed)",
        "  qwenkit chat\n"
        "  qwenkit chat --model ./Qwen-7B-Chat --device cuda --dtype bfloat16\n"
        "  qwenkit chat --model ./ckpt --system 'You are a terse assistant.' --seed 42\n"
        "in the chat, type :help for commands (:conf top_p=0.5, :seed 7, :history, :exit, ...)",
    )
    add_model_arguments(p)
    p.add_argument(
        "--system",
        metavar="TEXT",
        default="You are a helpful assistant.",
        help="system prompt (default: %(default)s)",
    )
    p.add_argument(
        "--seed", type=seed_value, metavar="N", help="sampling seed for every reply (default: none)"
    )
    p.set_defaults(run=cmd_chat)

    p = add_verb(
        verbs,
        "generate",
        "continue a prompt with a base model (raw text, streamed)",
        "  qwenkit generate --model ./Qwen-7B --prompt 'The capital of France is'\n"
        "  qwenkit generate --model ./ckpt --prompt 'def fib(n):' --greedy --max-new-tokens 64\n"
        "  qwenkit generate --model ./ckpt --prompt 'Once upon a time' --top-p 0.9 --seed 1",
    )
    add_model_arguments(p)
    p.add_argument(
        "--prompt",
        required=True,
        metavar="TEXT",
        help="text to continue (special-token text stays plain text)",
    )
    p.add_argument("--max-new-tokens", type=int, metavar="N", help="tokens to generate at most")
    p.add_argument("--temperature", type=float, metavar="T", help="sampling temperature (> 0)")
    p.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling mass, in (0, 1]")
    p.add_argument("--top-k", type=int, metavar="K", help="sample from the K most likely tokens (0 = off)")
    p.add_argument("--repetition-penalty", type=float, metavar="R", help="penalty for seen tokens (1 = off)")
    p.add_argument("--greedy", action="store_true", help="pick the most likely token (no sampling)")
    p.add_argument("--seed", type=seed_value, metavar="N", help="sampling seed, for reproducible output")
    p.set_defaults(run=cmd_generate)

    p = add_verb(
        verbs,
        "convert",
        "convert a checkpoint (original Qwen or Qwen2 layout) to the Qwen2 layout",
        "  qwenkit convert ./Qwen-7B-Chat ./qwen-7b-chat-qwen2\n"
        "  qwenkit convert ./Qwen-1_8B ./qwen-1.8b-bf16 --dtype bfloat16\n"
        "the result loads in transformers (Qwen2ForCausalLM) and vLLM as well as in qwenkit",
    )
    p.add_argument("src", metavar="SRC", help="checkpoint directory to read")
    p.add_argument("dst", metavar="DST", help="directory to write (must not exist, or be empty)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, help="dtype to store (default: the source's dtype)")
    p.add_argument("--force", action="store_true", help="replace DST when it already holds a checkpoint")
    p.set_defaults(run=cmd_convert)

    p = add_verb(
        verbs,
        "info",
        "describe a checkpoint: layout, shapes, parameters, dtypes, memory (reads no weights)",
        "  qwenkit info ./Qwen-7B-Chat\n  qwenkit info ./ckpt --json | jq .parameters",
    )
    p.add_argument("dir", metavar="DIR", help="checkpoint directory")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=cmd_info)

    p = add_verb(
        verbs,
        "serve",
        "serve a model over an OpenAI-compatible HTTP API (continuous batching, streaming, tools)",
        "  qwenkit serve\n"
        "  qwenkit serve --model ./Qwen-7B-Chat --device cuda --dtype bfloat16 --port 8000 --max-batch 32\n"
        "  qwenkit serve --model ./ckpt --host 0.0.0.0 --api-key secret --max-seq-len 4096\n"
        "then: curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' "
        '-d \'{"model": "qwen", "messages": [{"role": "user", "content": "Hello"}]}\'',
    )
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    p.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--max-batch", type=int, default=16, metavar="N",
                   help="requests decoded together (KV-cache rows) (default: %(default)s)")  # fmt: skip
    p.add_argument("--max-seq-len", type=int, metavar="N",
                   help="prompt + reply tokens per request (default: the model's context window)")  # fmt: skip
    p.add_argument(
        "--model-name", metavar="NAME", help="model id the API reports (default: the directory name)"
    )
    p.set_defaults(run=cmd_serve)

    p = add_verb(
        verbs,
        "merge-lora",
        "merge a LoRA adapter into its base model and write the result as a checkpoint",
        "  qwenkit merge-lora ./Qwen-7B ./runs/sft-lora/adapter ./qwen-7b-sft\n"
        "  qwenkit merge-lora ./base ./adapter ./merged --dtype bfloat16",
    )
    p.add_argument("base", metavar="BASE", help="base checkpoint directory")
    p.add_argument("adapter", metavar="ADAPTER", help="LoRA adapter directory (peft format)")
    p.add_argument("out", metavar="OUT", help="directory to write (must not exist, or be empty)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, help="dtype to store (default: float32)")
    p.add_argument("--force", action="store_true", help="replace OUT when it already holds a checkpoint")
    p.set_defaults(run=cmd_merge_lora)

    p = add_verb(
        verbs,
        "tokenizer",
        "train or extend a BPE vocabulary, and compare tokenizers' compression",
        "  qwenkit tokenizer train --input en.txt zh.jsonl --vocab-size 32000 --out my-tok\n"
        "  qwenkit tokenizer train --input zh.jsonl --base qwen.tiktoken --vocab-size 159643 --out qwen-zh\n"
        "  qwenkit tokenizer stats --tokenizer official=qwen.tiktoken --tokenizer my-tok --input en.txt zh.txt",
    )
    steps = p.add_subparsers(dest="tokenizer_verb", metavar="STEP", required=True)
    from qwenkit.tokenizer_train import add_stats_arguments, add_train_arguments

    q = add_verb(
        steps,
        "train",
        "train a byte-level BPE vocabulary (or extend one with --base) and write qwen.tiktoken",
        "  qwenkit tokenizer train --input corpus.jsonl --vocab-size 32000 --out my-tok\n"
        "  qwenkit tokenizer train --input zh.jsonl --base qwen.tiktoken --vocab-size 159643 --out qwen-zh",
    )
    add_train_arguments(q)
    q.set_defaults(run=cmd_tokenizer_train)
    q = add_verb(
        steps,
        "stats",
        "compression (bytes per token, tokens per character) per input and tokenizer, with a bar chart",
        "  qwenkit tokenizer stats --tokenizer official=qwen.tiktoken --tokenizer my-tok --input en.txt zh.txt --out stats/",
    )
    add_stats_arguments(q)
    q.set_defaults(run=cmd_tokenizer_stats)

    p = add_verb(
        verbs,
        "data",
        "prepare pretraining data",
        "  qwenkit data pack --input web.jsonl:0.5 code/:2 --tokenizer qwen.tiktoken --seq-len 2048 --out data/packed",
    )
    steps = p.add_subparsers(dest="data_verb", metavar="STEP", required=True)
    from qwenkit.data.pack import add_pack_arguments

    q = add_verb(
        steps,
        "pack",
        "tokenize documents, shuffle, concatenate and cut into seq_len + 1 windows",
        "  qwenkit data pack --input corpus.jsonl --tokenizer qwen.tiktoken --seq-len 2048 --out data/packed\n"
        "  qwenkit data pack --input web.jsonl:0.5 books.parquet code/:2 --tokenizer ckpt/ --seq-len 4096 "
        "--out data/mix --val-fraction 0.01",
    )
    add_pack_arguments(q)
    q.set_defaults(run=cmd_data_pack)

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
    p.set_defaults(run=cmd_pretrain, dotted_overrides=True)

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
    p.set_defaults(run=cmd_sft, dotted_overrides=True)

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
    p.add_argument("--no-card", dest="card", action="store_false", help="leave docs/demo-model.md as it is")
    p.set_defaults(run=cmd_demo_build, dotted_overrides=True)
    p = demo_verbs.add_parser("eval", help="measure a model on held-out demo prompts")
    p.add_argument("--model", metavar="DIR", help="default: the embedded demo model")
    p.add_argument("--count", type=int, default=200, help="held-out conversations (default: %(default)s)")
    p.add_argument("--seed", type=seed_value, default=0, help="the build's seed (default: %(default)s)")
    p.set_defaults(run=cmd_demo_eval)

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
    p.set_defaults(run=cmd_agent)

    return parser


def cmd_serve(args: argparse.Namespace) -> int:
    if args.max_seq_len is not None and args.max_seq_len < 1:
        raise QwenkitError(
            f"--max-seq-len must be >= 1 (or left out for the model's context), got {args.max_seq_len}"
        )
    if not 1 <= args.port <= 65535:
        raise QwenkitError(f"--port must be between 1 and 65535, got {args.port}")
    from qwenkit.serve.api import serve

    return serve(args)


def cmd_merge_lora(args: argparse.Namespace) -> int:
    import qwenkit

    base, out = Path(args.base), Path(args.out)
    check_destination(base, out, args.force)
    model, tokenizer = qwenkit.load(base, device="cpu", dtype="float32", adapter=args.adapter)
    qwenkit.save(model, tokenizer, out, dtype=args.dtype or "float32")
    print(f"merged {args.adapter} into {base} -> {out}")
    return 0


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from qwenkit.tokenizer_train import run_train

    return run_train(args)


def cmd_tokenizer_stats(args: argparse.Namespace) -> int:
    from qwenkit.tokenizer_train import run_stats

    return run_stats(args)


def cmd_data_pack(args: argparse.Namespace) -> int:
    from qwenkit.data.pack import run_pack

    return run_pack(args)


def cmd_sft(args: argparse.Namespace) -> int:
    from qwenkit.train.sft import main as sft

    given = {"--model.path": args.model, "--data.path": args.data, "--model.method": args.method}
    overrides = [item for key, value in given.items() if value is not None for item in (key, value)]
    return sft(args.config, args.out, overrides + args.overrides)


def cmd_demo_build(args: argparse.Namespace) -> int:
    from qwenkit.demo import DEMO_MODEL_DIR, run_build

    args.out = args.out or str(DEMO_MODEL_DIR)
    work = Path(args.work)
    if work.exists() and not work.is_dir():
        raise QwenkitError(f"--work {work} exists and is not a directory")
    check_destination(work, Path(args.out), force=True)  # checked now, not after an hour of training
    return run_build(args)


def cmd_demo_eval(args: argparse.Namespace) -> int:
    from qwenkit.demo import run_eval

    if args.count < 1:
        raise QwenkitError(f"--count must be >= 1, got {args.count}")
    return run_eval(args)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from qwenkit.train.pretrain import main as pretrain

    return pretrain(args.config, args.out, args.overrides)


def cmd_agent(args: argparse.Namespace) -> int:
    import warnings

    from qwenkit.agent.interpreter import bwrap_path
    from qwenkit.agent.loop import Final, TextDelta, ToolRegistry, ToolResult, local_complete, run_agent

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
    with ToolRegistry.from_names(names, timeout=args.timeout) as tools, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the missing-bwrap warning was printed above
        model, tokenizer, _ = load_model(args)
        complete = local_complete(model, tokenizer, seed=args.seed, **settings)
        saved = 0
        for event in run_agent(args.question, complete, tools, max_steps=args.max_steps):
            if isinstance(event, TextDelta):
                write(event.text)
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
                write("Thought:")
            elif isinstance(event, Final) and event.answer is None:
                write("\n")
                raise QwenkitError(f"no final answer within {args.max_steps} tool calls (see --max-steps)")
            elif isinstance(event, Final):
                print(f"\n\nAnswer: {event.answer}")
    return 0


def tolerate_unencodable_output() -> None:
    """Model text can hold characters the terminal's encoding lacks; show them as '?' instead of failing."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="replace")
    if isinstance(sys.stdin, io.TextIOWrapper):
        sys.stdin.reconfigure(errors="replace")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `qwenkit` command; returns the exit status."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra and not getattr(args, "dotted_overrides", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = extra
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

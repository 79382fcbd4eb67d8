"""`qwenkit chat` (the terminal chat REPL) and `qwenkit generate` (raw text continuation)."""

from __future__ import annotations

import argparse
import ast
import contextlib
import sys

from qwenkit.chatml import DEFAULT_SYSTEM
from qwenkit.cli.common import add_model_arguments, add_verb, format_count, load_model, seed_value, write
from qwenkit.errors import QwenkitError


def add_parsers(verbs) -> None:
    p = add_verb(
        verbs,
        "chat",
        "chat with a model in the terminal (ChatML, streamed)",
        "  qwenkit chat\n"
        "  qwenkit chat --model ./Qwen-7B-Chat --device cuda --dtype bfloat16\n"
        "  qwenkit chat --model ./ckpt --system 'You are a terse assistant.' --seed 42\n"
        "  qwenkit chat --model ./Qwen2.5-0.5B-Instruct --chat-format chatml\n"
        "in the chat, type :help for commands (:conf top_p=0.5, :seed 7, :history, :exit, ...)",
    )
    add_model_arguments(p, head=True)
    p.add_argument(
        "--system",
        metavar="TEXT",
        help=f"system prompt (default: the chat template's own, in ChatML {DEFAULT_SYSTEM!r})",
    )
    p.add_argument(
        "--chat-format",
        choices=("auto", "chatml", "template"),
        default="auto",
        help="prompt layout: the checkpoint's chat template, qwenkit's ChatML, or auto (the template "
        "when the tokenizer has one; default)",
    )
    p.add_argument(
        "--seed", type=seed_value, metavar="N", help="sampling seed for every reply (default: none)"
    )
    p.set_defaults(run=run_chat)

    p = add_verb(
        verbs,
        "generate",
        "continue a prompt with a base model (raw text, streamed)",
        "  qwenkit generate --model ./Qwen-7B --prompt 'The capital of France is'\n"
        "  qwenkit generate --model ./ckpt --prompt 'def fib(n):' --greedy --max-new-tokens 64\n"
        "  qwenkit generate --model ./ckpt --prompt 'Once upon a time' --top-p 0.9 --seed 1",
    )
    add_model_arguments(p, head=True)
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
    p.set_defaults(run=run_generate)


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

    def __init__(
        self, model, tokenizer, system: str | None, seed: int | None, chat_format: str = "auto"
    ) -> None:
        from qwenkit.chat import resolve_chat_format
        from qwenkit.generation import GenerationConfig

        self.model = model
        self.tokenizer = tokenizer
        self.system = system
        self.defaults = model.generation_config or GenerationConfig()
        if chat_format == "auto" and self.defaults.chat_format == "raw":  # a base model's raw prompts
            chat_format = "raw"
        self.chat_format = resolve_chat_format(tokenizer, chat_format)
        self.seed = seed
        self.history: list[tuple[str, str]] = []
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
                self.tokenizer,
                query,
                self.history,
                self.system,
                seed=self.seed,
                chat_format=self.chat_format,
                **settings,
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


def run_chat(args: argparse.Namespace) -> int:
    model, tokenizer, path = load_model(args)
    if sys.stdin.isatty():
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401 - gives input() line editing and history
    session = ChatSession(model, tokenizer, args.system, args.seed, args.chat_format)
    # from the config: packed and 16-bit layers hold their matrices as buffers, not parameters
    params = format_count(model.config.num_parameters)
    dtype = str(model.dtype).removeprefix("torch.") + (f", {args.weights} matrices" if args.weights else "")
    layout = "its chat template" if session.chat_format == "template" else "ChatML"
    print(f"qwenkit chat: {path} ({params} parameters, {model.device}, {dtype}; prompts in {layout})")
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


def run_generate(args: argparse.Namespace) -> int:
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

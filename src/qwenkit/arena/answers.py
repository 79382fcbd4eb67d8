"""What the arena compares: the prompts file, the `NAME=DIR` model specs, and the models' answers,
generated once in batches by the decoding core (qwenkit.generation.generate_text) and stored."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qwenkit.arena.store import ArenaStore, Prompt
from qwenkit.errors import QwenkitError

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,39}$")
MAX_CATEGORY = 64


@dataclass(frozen=True)
class ModelSpec:
    """A model to compare: the name reports use (raters never see it) and its checkpoint directory."""

    name: str
    path: Path


@dataclass(frozen=True)
class AnswerSettings:
    """How answers are generated: greedy when temperature is 0, else sampled with top_p and seed."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise QwenkitError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.temperature <= 2:
            raise QwenkitError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise QwenkitError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.batch_size < 1:
            raise QwenkitError(f"batch_size must be >= 1, got {self.batch_size}")


def parse_model_specs(specs: Sequence[str]) -> list[ModelSpec]:
    """`NAME=DIR` strings -> ModelSpecs; at least two, distinct names, each DIR a checkpoint."""
    models: list[ModelSpec] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not path:
            raise QwenkitError(f"--models takes NAME=DIR, got {spec!r}")
        if not MODEL_NAME.match(name):
            raise QwenkitError(f"model name {name!r}: use up to 40 letters, digits, '.', '_' or '-'")
        if any(m.name == name for m in models):
            raise QwenkitError(f"model name {name!r} is given twice")
        directory = Path(path).expanduser()
        if not (directory / "config.json").is_file():
            raise QwenkitError(f"unknown model {name}={path}: no checkpoint (config.json) in that directory")
        models.append(ModelSpec(name, directory.resolve()))
    if len(models) < 2:
        raise QwenkitError("the arena compares at least two models: --models A=DIR B=DIR")
    return models


def read_prompts_file(path: str | Path) -> list[Prompt]:
    """The instructions to rate: JSON lines, each {"prompt": "text"} or {"prompt": [messages]} or
    {"messages": [messages]} (OpenAI-style, ending with the user's turn), with an optional
    "category"; or a .txt file, one instruction per line. Blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise QwenkitError(f"prompts file {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise QwenkitError(f"prompts file {path} is not UTF-8 text") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        if path.suffix == ".txt":
            prompts.append(Prompt([{"role": "user", "content": line.strip()}]))
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise QwenkitError(f"{where}: not JSON ({e.msg})") from None
        prompts.append(prompt_of_row(row, where))
    if not prompts:
        raise QwenkitError(f"prompts file {path} holds no prompts")
    return prompts


def prompt_of_row(row: Any, where: str) -> Prompt:
    if not isinstance(row, dict):
        raise QwenkitError(f"{where}: expected an object with 'prompt' or 'messages'")
    messages = row.get("messages", row.get("prompt"))
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not isinstance(messages, list) or not messages:
        raise QwenkitError(f"{where}: 'prompt' must be text or a list of messages ('messages' a list)")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str) and set(m) <= {"role", "content"}):  # fmt: skip
            raise QwenkitError(
                f"{where}: message {i} must be {{'role': system|user|assistant, 'content': text}}"
            )
        if m["role"] == "system" and i:
            raise QwenkitError(f"{where}: only the first message may be the system's")
    if messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
        raise QwenkitError(f"{where}: the last message must be the user's instruction, not empty")
    category = row.get("category")
    if category is not None and (not isinstance(category, str) or not 0 < len(category) <= MAX_CATEGORY):
        raise QwenkitError(f"{where}: 'category' must be text of 1 to {MAX_CATEGORY} characters")
    return Prompt([{"role": m["role"], "content": m["content"]} for m in messages], category)


def prompt_ids(tokenizer, messages: Sequence[dict[str, str]]) -> list[int]:
    """The prompt the model answers: the checkpoint's chat template if it has one, else ChatML (user
    text always as plain text, never control tokens)."""
    if getattr(tokenizer, "chat_template", None):
        from qwenkit.chat_template import encode_chat

        return encode_chat(tokenizer, messages, add_generation_prompt=True)
    from qwenkit.chatml import render_messages

    return render_messages(tokenizer, messages, prompt=True).input_ids


def generate_answers(
    model, tokenizer, prompts: Sequence[Prompt], settings: AnswerSettings, progress: bool = True,
    on_batch: Callable[[list[tuple[int, str, str]]], None] | None = None,
) -> list[tuple[int, str, str]]:  # fmt: skip
    """(prompt id, text, finish reason) of `model`'s answer to each prompt, `settings.batch_size`
    prompts decoded together (sorted by length, so batches pad little); `on_batch` gets each batch's
    answers as soon as they exist (the store keeps them if the run stops)."""
    from tqdm.auto import tqdm

    from qwenkit.chat import stop_words_ids
    from qwenkit.generation import context_length, generate_text

    window = context_length(model)
    encoded = []
    for p in prompts:
        ids = prompt_ids(tokenizer, p.messages)
        if len(ids) >= window:
            raise QwenkitError(
                f"prompt {p.id} ({p.instruction[:40]!r}...) has {len(ids)} tokens; the model's window is {window}"
            )
        encoded.append(ids)
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    stops = stop_words_ids(tokenizer, "auto")
    sampling = {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p}
    out: list[tuple[int, str, str]] = []
    with tqdm(total=len(prompts), desc="answers", unit="prompt", disable=not progress) as bar:
        for start in range(0, len(order), settings.batch_size):
            batch = order[start : start + settings.batch_size]
            rows = [encoded[i] for i in batch]
            budget = min(settings.max_new_tokens, window - max(len(r) for r in rows))
            replies = generate_text(
                model, tokenizer, rows, stop=stops, seed=settings.seed, max_new_tokens=budget,
                **(sampling if settings.temperature > 0 else {"do_sample": False}),
            )  # fmt: skip
            done = [
                (prompts[i].id, r.text.strip(), r.finish_reason) for i, r in zip(batch, replies, strict=True)
            ]
            if on_batch is not None:
                on_batch(done)
            out += done
            bar.update(len(batch))
    return out


def fill_answers(
    store: ArenaStore, spec: ModelSpec, settings: AnswerSettings, device: str = "cpu", dtype: str = "auto",
    progress: bool = True,
) -> int:  # fmt: skip
    """Register `spec` and answer the stored prompts it has not answered yet (the model is loaded only
    then, so a restart with every answer stored loads nothing); returns how many were generated."""
    store.register_model(spec.name, str(spec.path), asdict(settings))
    missing = store.missing_answers(spec.name)
    if not missing:
        return 0
    import qwenkit

    model, tokenizer = qwenkit.load(spec.path, device=device, dtype=dtype)
    generate_answers(model, tokenizer, missing, settings, progress,
                     on_batch=lambda done: store.add_answers(spec.name, done))  # fmt: skip
    return len(missing)

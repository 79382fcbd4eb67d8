"""What every evaluation task shares: settings, results, the task registry, and the backends that run
a model for a task (a local model through the decoding core, or a running `qwenkit serve`).

A task is a function `(backend, settings) -> TaskResult`, registered under its name with `@task`.
It builds prompts as token ids and asks the backend for one of three things, each batched:

- `next_token_logprobs(prompts, candidates)`: the log-probability of each candidate token right after
  each prompt (multiple-choice tasks: the official scripts take the argmax of the logits of " A".." D"
  at the answer position; the argmax of log-probabilities at one position is the same token);
- `generate(prompts, max_new_tokens, stop)`: continuations (greedy by default), cut before a stop
  string and at the model's end-of-text tokens;
- `score(prompts)`: each token's log-probability given the tokens before it (perplexity).
"""

from __future__ import annotations

import gzip
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from qwenkit.errors import QwenkitError
from qwenkit.tokenizer import IM_END, IM_START, Tokenizer


@dataclass
class EvalSettings:
    """Settings of one evaluation run; None means the task's official default."""

    data: Path | None = None  # the benchmark's files in their published layout
    shots: int | None = None  # few-shot examples per prompt
    limit: int | None = None  # at most this many items (per subject for subject tasks)
    batch_size: int = 16  # prompts per forward pass / decoding batch
    chat: bool = False  # the chat variant of the task (zero-shot ChatML prompts)
    max_new_tokens: int | None = None
    n_samples: int = 1  # completions per problem (pass@k needs k <= n_samples)
    completions: Path | None = None  # given completions to score instead of a model (humaneval --samples)
    temperature: float = 0.0  # 0: greedy
    seed: int = 0
    progress: bool = True  # show progress bars
    lengths: tuple[int, ...] | None = None  # long-ppl: the window lengths to measure at
    timeout: float = 10.0  # seconds each generated program may run (humaneval, mbpp)
    workers: int = 2  # generated programs run at the same time, each in its own sandbox
    unsafe: bool = False  # run generated code without bubblewrap when it is missing (never on a shared host)


@dataclass
class Prediction:
    """One scored item. `id` is stable across runs (MMLU: "{subject}/{row index}")."""

    id: str
    prediction: Any
    reference: Any
    correct: bool | None
    subject: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        row = asdict(self)
        extra = row.pop("extra")
        if row["subject"] is None:
            del row["subject"]
        return {**row, **extra}


@dataclass
class TaskResult:
    """A task's scores: `metrics` (e.g. {"accuracy": 0.61}), optional `groups` of named scores
    (e.g. {"subject": {"anatomy": 0.5, ...}, "category": {"STEM": 0.4, ...}}), every prediction, and
    the settings it ran with."""

    task: str
    metrics: dict[str, float]
    predictions: list[Prediction] = field(default_factory=list)
    groups: dict[str, dict[str, float]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


TaskFunction = Callable[["Backend | None", EvalSettings], TaskResult]


@dataclass
class Task:
    name: str
    run: TaskFunction
    needs_model: bool = True  # False: scores given files alone (e.g. humaneval --samples)
    description: str = ""


TASKS: dict[str, Task] = {}


def task(
    name: str, needs_model: bool = True, description: str = ""
) -> Callable[[TaskFunction], TaskFunction]:
    """Register a task function under `name` (`qwenkit eval NAME`)."""

    def register(run: TaskFunction) -> TaskFunction:
        if name in TASKS:
            raise QwenkitError(f"evaluation task {name!r} is registered twice")
        TASKS[name] = Task(name, run, needs_model, description or (run.__doc__ or "").strip().split("\n")[0])
        return run

    return register


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise QwenkitError(f"unknown evaluation task {name!r}; known: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-blank line of a JSONL file (gzipped when it ends in .gz)."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as file:
            lines = file.read().splitlines()
    except FileNotFoundError:
        raise QwenkitError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise QwenkitError(f"{path}: cannot read it: {e}") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise QwenkitError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise QwenkitError(f"{path}:{number}: expected a JSON object")
        rows.append((number, row))
    return rows


def accuracy(predictions: Sequence[Prediction]) -> float:
    """Share of correct predictions (NaN when there are none)."""
    scored = [p.correct for p in predictions if p.correct is not None]
    return sum(scored) / len(scored) if scored else math.nan


def progress(total: int, desc: str, enabled: bool = True) -> tqdm:
    """A progress bar counting items, with rate and ETA."""
    return tqdm(total=total, desc=desc, unit="item", disable=not enabled, dynamic_ncols=True, leave=False)


def stop_token_ids(tokenizer: Tokenizer) -> list[int]:
    """Ids that end a generated answer: end of text, and the ChatML turn markers."""
    special = tokenizer.special_tokens
    names = ["<|endoftext|>", IM_END, IM_START, getattr(tokenizer, "eos_token", None)]
    return sorted({special[n] for n in names if n in special})


def chat_prompt(tokenizer: Tokenizer, query: str, window: int) -> list[int]:
    """The ids of `model.chat(tokenizer, query, history=None)`'s prompt: ChatML with the default
    system prompt (or the checkpoint's own chat template), ending where the assistant answers."""
    from qwenkit.chat import make_context
    from qwenkit.chatml import DEFAULT_SYSTEM

    return make_context(tokenizer, query, None, DEFAULT_SYSTEM, window, chat_format="auto")[1]


def generate_all(
    backend: Backend,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop: Sequence[str],
    settings: EvalSettings,
    desc: str,
) -> list[str]:
    """Every prompt's continuation, `settings.batch_size` prompts per call (sorted by length so
    batches pad little), with a progress bar."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts = [""] * len(prompts)
    size = max(1, settings.batch_size)
    with progress(len(prompts), desc, settings.progress) as bar:
        for start in range(0, len(order), size):
            batch = order[start : start + size]
            replies = backend.generate(
                [prompts[i] for i in batch], max_new_tokens, stop, settings.temperature, settings.seed
            )
            for i, reply in zip(batch, replies, strict=True):
                texts[i] = reply
            bar.update(len(batch))
    return texts


class Backend(ABC):
    """Runs a model for evaluation tasks; every method takes a batch of prompts as token ids."""

    tokenizer: Tokenizer
    name: str
    context_length: int

    @abstractmethod
    def next_token_logprobs(
        self, prompts: Sequence[Sequence[int]], candidates: Sequence[int]
    ) -> list[list[float]]:
        """For each prompt, the log-probability of each candidate token as the next token."""

    @abstractmethod
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        stop: Sequence[str] = (),
        temperature: float = 0.0,
        seed: int = 0,
    ) -> list[str]:
        """One continuation per prompt, cut before the first stop string or end-of-text token."""

    @abstractmethod
    def score(self, prompts: Sequence[Sequence[int]]) -> list[list[float | None]]:
        """Each prompt token's log-probability given the tokens before it (None for the first)."""


class LocalBackend(Backend):
    """A model in this process, through qwenkit's decoding core, `batch_size` prompts at a time
    (sorted by length so padding stays small)."""

    def __init__(self, model, tokenizer: Tokenizer, name: str = "model", batch_size: int = 16) -> None:
        from qwenkit.generation import context_length

        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.batch_size = max(1, batch_size)
        self.context_length = context_length(model)

    def _batches(self, prompts: Sequence[Sequence[int]]):
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        for start in range(0, len(order), self.batch_size):
            yield order[start : start + self.batch_size]

    def next_token_logprobs(self, prompts, candidates):
        import torch

        from qwenkit.generation import prompt_pass

        results: list[list[float]] = [[] for _ in prompts]
        index = torch.tensor(list(candidates))
        with torch.inference_mode():
            for batch in self._batches(prompts):
                _, _, last = prompt_pass(self.model, [list(prompts[i]) for i in batch], top=0)
                logprobs = torch.log_softmax(last.float(), dim=-1)[:, index.to(last.device)].tolist()
                for i, row in zip(batch, logprobs, strict=True):
                    results[i] = row
        return results

    def generate(self, prompts, max_new_tokens, stop=(), temperature=0.0, seed=0):
        from qwenkit.generation import generate_text

        results = [""] * len(prompts)
        sample = temperature > 0
        settings = {"do_sample": sample, "max_new_tokens": max_new_tokens}
        if sample:
            settings["temperature"] = temperature
        stops = [[i] for i in stop_token_ids(self.tokenizer)]
        for k, batch in enumerate(self._batches(prompts)):
            rows = [list(prompts[i]) for i in batch]
            replies = generate_text(
                self.model, self.tokenizer, rows, list(stop), stops, seed=seed + k if sample else None,
                **settings,
            )  # fmt: skip
            for i, reply in zip(batch, replies, strict=True):
                results[i] = reply.text
        return results

    def score(self, prompts):
        from qwenkit.generation import score_prompts

        scored = score_prompts(self.model, prompts)
        return [[None if e is None else e.logprob for e in row] for row in scored]

"""Token generation: sampling settings, logits processing, stop conditions, batching and streaming.

One preallocated KV cache per call; each step runs the model on one new token per row, so the
Python work per token is a handful of tensor operations.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qwenkit.config import QwenConfig
from qwenkit.errors import QwenkitError
from qwenkit.model import KVCache, Qwen
from qwenkit.tokenizer import StreamDecoder, Tokenizer

EOD_ID = 151643  # <|endoftext|> of the official vocabulary
GREEDY_BELOW = 1e-5  # temperatures below this pick the most likely token (vLLM's _SAMPLING_EPS)
REPETITION_PENALTY_RANGE = (0.01, 100.0)  # beyond it, penalized fp32 logits can overflow to inf


@dataclass
class GenerationConfig:
    """Sampling defaults; Qwen's own (top_p 0.8, top_k off, 512 new tokens) unless a checkpoint says otherwise."""

    max_new_tokens: int = 512
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.8
    repetition_penalty: float = 1.0
    eos_token_id: int | list[int] = EOD_ID
    pad_token_id: int = EOD_ID
    stop_words_ids: list[list[int]] = field(default_factory=list)
    chat_format: str = "chatml"
    max_window_size: int = 6144
    vocab_size: int | None = None  # ids from here on (embedding padding rows) are never generated

    @classmethod
    def from_checkpoint(cls, directory: str | Path) -> GenerationConfig:
        file = Path(directory) / "generation_config.json"
        if not file.is_file():
            return cls()
        try:
            values = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise QwenkitError(f"{file} is not valid JSON: {e}") from None
        known = {f.name for f in dataclasses.fields(cls)}
        config = cls(**{k: v for k, v in values.items() if k in known and v is not None})
        config.validate()
        return config

    def to_hf(self) -> dict:
        return dataclasses.asdict(self)

    def updated(self, **settings) -> GenerationConfig:
        """A copy with the given settings (None values keep the default), validated."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise QwenkitError(f"unknown generation settings: {', '.join(unknown)}")
        config = dataclasses.replace(self, **{k: v for k, v in settings.items() if v is not None})
        config.validate()
        return config

    @property
    def greedy(self) -> bool:
        """Whether tokens are picked by argmax: no sampling, or a temperature too small to sample at
        (dividing by it would overflow the logits)."""
        return not self.do_sample or self.temperature < GREEDY_BELOW

    def validate(self) -> None:
        low, high = REPETITION_PENALTY_RANGE
        checks = [
            (
                isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 0,
                "max_new_tokens must be >= 0",
            ),
            (
                _is_number(self.temperature) and 0 < self.temperature < math.inf,
                "temperature must be a finite number > 0 (do_sample=False for greedy)",
            ),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be an integer >= 0 (0 = off)"),
            (_is_number(self.top_p) and 0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (
                _is_number(self.repetition_penalty) and low <= self.repetition_penalty <= high,
                f"repetition_penalty must be between {low} and {high:g} (1 = off)",
            ),
            (self.chat_format in ("chatml", "raw"), "chat_format must be 'chatml' or 'raw'"),
        ]
        for ok, message in checks:
            if not ok:
                raise QwenkitError(f"invalid generation setting: {message}")

    def stop_sequences(self, extra: Sequence[int | Sequence[int]] | None = None) -> list[list[int]]:
        eos = self.eos_token_id if isinstance(self.eos_token_id, list) else [self.eos_token_id]
        stops = [[int(i)] for i in eos] + [list(map(int, s)) for s in self.stop_words_ids]
        for s in extra or []:
            stops.append([int(s)] if isinstance(s, int) else [int(i) for i in s])
        if any(not s for s in stops):
            raise QwenkitError("a stop sequence is empty")
        return [list(s) for s in dict.fromkeys(tuple(s) for s in stops)]


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def context_length(model: Qwen | QwenConfig) -> int:
    """Longest sequence a model is run on: its training length, 4x that with dynamic NTK (Qwen: 8K -> 32K)."""
    config = model if isinstance(model, QwenConfig) else model.config
    return config.max_position_embeddings * (4 if config.use_dynamic_ntk else 1)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch prompts of different lengths: (input_ids, attention_mask), padding on the left."""
    if not rows or any(len(r) == 0 for r in rows):
        raise QwenkitError("every prompt needs at least one token")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(list(r), dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids, mask


def warp_logits(logits: torch.Tensor, seen: torch.Tensor | None, config: GenerationConfig) -> torch.Tensor:
    """Repetition penalty, then (when sampling) temperature -> top-k -> top-p on fp32 logits [B, V],
    in the order transformers applies them; filtered tokens get -inf."""
    if config.vocab_size is not None and config.vocab_size < logits.shape[-1]:
        logits = logits.clone()
        logits[:, config.vocab_size :] = float("-inf")
    if config.repetition_penalty != 1.0 and seen is not None:
        p = config.repetition_penalty
        logits = torch.where(seen, torch.where(logits < 0, logits * p, logits / p), logits)
    if config.greedy:
        return logits
    if config.temperature != 1.0:
        logits = logits / config.temperature
    if config.top_k > 0:
        kth = torch.topk(logits, min(config.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of all more likely tokens
        drop = mass_before >= config.top_p
        drop[:, 0] = False
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def pick_tokens(
    logits: torch.Tensor,
    seen: torch.Tensor | None,
    config: GenerationConfig,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Next token per row: greedy or sampled from the warped distribution. Logits that are not
    finite (a broken model) raise QwenkitError rather than reach torch.multinomial, which fails on
    them (on CUDA with a device-side assert that ends the process's use of the GPU)."""
    logits = warp_logits(logits.float(), seen, config)
    if config.greedy:
        return logits.argmax(dim=-1)
    probs = logits.softmax(dim=-1)
    if not bool(torch.isfinite(probs).all()):
        raise QwenkitError("sampling failed: the model's logits are not finite (NaN or inf)")
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _prepare(model: Qwen, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor | None]:
    """input_ids as a LongTensor [B, T] on the model's device; a list of prompts is left-padded."""
    config = model.generation_config or GenerationConfig()
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2 or input_ids.shape[1] == 0 or input_ids.dtype != torch.long:
            raise QwenkitError("input_ids must be a non-empty LongTensor [B, T]")
    else:
        if not input_ids:
            raise QwenkitError("the prompt is empty")
        rows = [list(input_ids)] if isinstance(input_ids[0], int) else [list(r) for r in input_ids]
        input_ids, pad_mask = left_pad(rows, config.pad_token_id)
        attention_mask = pad_mask if len(rows) > 1 else None
    if int(input_ids.max()) >= model.config.vocab_size or int(input_ids.min()) < 0:
        raise QwenkitError(f"token ids must lie in [0, {model.config.vocab_size})")
    return input_ids.to(model.device), attention_mask


@torch.inference_mode()
def generate_tokens(
    model: Qwen,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    stop: Sequence[int | Sequence[int]] | None = None,
    seed: int | None = None,
    cuda_graph: bool = True,
    **settings,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (next_tokens [B], finished [B]) per step; finished rows get the pad id from then on.
    On CUDA each decoding step replays a captured CUDA graph unless `cuda_graph=False`."""
    config = (model.generation_config or GenerationConfig()).updated(**settings)
    input_ids, attention_mask = _prepare(model, input_ids, attention_mask)
    b, t = input_ids.shape
    limit = context_length(model)
    if t > limit:
        raise QwenkitError(f"the prompt has {t} tokens; the model's context window is {limit}")
    max_new = min(config.max_new_tokens, limit - t)
    if max_new == 0:
        return
    stops = config.stop_sequences(stop)
    single_stops = torch.tensor([s[0] for s in stops if len(s) == 1], dtype=torch.long, device=model.device)
    multi_stops = [s for s in stops if len(s) > 1]
    generator = torch.Generator(device=model.device).manual_seed(seed) if seed is not None else None

    cache = KVCache(model.config, b, t + max_new, model.device, model.dtype)
    mask = attention_mask.to(model.device) if attention_mask is not None else None
    seen = None
    if config.repetition_penalty != 1.0:
        seen = torch.zeros((b, model.config.vocab_size), dtype=torch.bool, device=model.device)
        # padding slots repeat the row's last (real) token, so they add nothing to its seen set
        real = input_ids if mask is None else torch.where(mask == 0, input_ids[:, -1:], input_ids)
        seen.scatter_(1, real, True)
    history = input_ids.tolist() if multi_stops else None
    finished = torch.zeros(b, dtype=torch.bool, device=model.device)
    logits = model(input_ids, attention_mask=mask, cache=cache, last_only=True)[:, -1].float()
    if cuda_graph and model.device.type == "cuda" and max_new > 1:
        decode = CUDAGraphDecoder(model, cache)
    else:
        decode = lambda tokens: model(tokens[:, None], cache=cache, last_only=True)[:, -1]  # noqa: E731
    for step in range(max_new):
        tokens = pick_tokens(logits, seen, config, generator)
        tokens = tokens.masked_fill(finished, config.pad_token_id)
        done_now = torch.isin(tokens, single_stops)
        if multi_stops:
            for row, token in enumerate(tokens.tolist()):
                history[row].append(token)
                if any(history[row][-len(s) :] == s for s in multi_stops):
                    done_now[row] = True
        finished = finished | done_now
        yield tokens, finished
        if bool(finished.all()) or step == max_new - 1:
            return
        if seen is not None:
            seen.scatter_(1, tokens[:, None], True)
        logits = decode(tokens).float()


class CUDAGraphDecoder:
    """One decoding step captured as a CUDA graph and replayed per token: the whole forward pass
    becomes a single launch instead of hundreds of small kernels started from Python."""

    def __init__(self, model: Qwen, cache: KVCache):
        cache.make_static()
        self.tokens = torch.zeros((cache.positions.shape[0], 1), dtype=torch.long, device=model.device)
        saved = cache.slot.clone(), cache.next_position.clone(), cache.positions.clone()
        side = torch.cuda.Stream()  # warm-up off the main stream, as graph capture requires
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                model.decode_step(self.tokens, cache)
        torch.cuda.current_stream().wait_stream(side)
        for tensor, value in zip((cache.slot, cache.next_position, cache.positions), saved, strict=True):
            tensor.copy_(value)  # undo the warm-up; the values it wrote stay masked until overwritten
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model.decode_step(self.tokens, cache)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens[:, None])
        self.graph.replay()
        return self.logits


def generate(
    model: Qwen,
    input_ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
    attention_mask: torch.Tensor | None = None,
    **settings,
) -> torch.Tensor:
    """Prompt + new ids [B, T + n]. Rows stop independently; after a stop a row is filled with the pad
    id. Settings: max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty,
    stop (token ids or id sequences, added to the end-of-text ids), seed."""
    input_ids, attention_mask = _prepare(model, input_ids, attention_mask)
    steps = [tokens for tokens, _ in generate_tokens(model, input_ids, attention_mask, **settings)]
    if not steps:
        return input_ids
    return torch.cat([input_ids, torch.stack(steps, dim=1)], dim=1)


def stream_generate(
    model: Qwen,
    tokenizer: Tokenizer,
    input_ids: torch.Tensor | Sequence[int],
    stop_strings: Sequence[str] = (),
    **settings,
) -> Iterator[str]:
    """Text deltas of one prompt's continuation. Multi-byte characters are never split; stop tokens
    are not shown; text is held back while it could still become one of `stop_strings`."""
    if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and input_ids.shape[0] != 1:
        raise QwenkitError("stream_generate takes a single prompt")
    stops = (model.generation_config or GenerationConfig()).stop_sequences(settings.get("stop"))
    stop_tokens = {s[-1] for s in stops}
    decoder = StreamDecoder(tokenizer, skip_special_tokens=True)
    pending = ""
    for tokens, finished in generate_tokens(model, input_ids, **settings):
        token = int(tokens[0])
        if not (bool(finished[0]) and token in stop_tokens):
            pending += decoder.push(token)
        if bool(finished[0]):
            break
        cut = find_stop(pending, stop_strings)
        if cut is not None:
            if pending[:cut]:
                yield pending[:cut]
            return
        keep = held_back_length(pending, stop_strings)
        if len(pending) > keep:
            yield pending[: len(pending) - keep]
            pending = pending[len(pending) - keep :]
    pending += decoder.flush()
    cut = find_stop(pending, stop_strings)
    if cut is not None:
        pending = pending[:cut]
    if pending:
        yield pending


def find_stop(text: str, stop_strings: Sequence[str]) -> int | None:
    """Index of the earliest stop string in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stop_strings if s) if i >= 0]
    return min(hits) if hits else None


def held_back_length(text: str, stop_strings: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is the start of a stop string. Only the last
    len(stop) - 1 characters are read, and only where the stop's first character occurs, so the
    cost per call is about the stop strings' total length, whatever the length of `text`."""
    longest = 0
    for s in stop_strings:
        if not s:
            continue
        end = len(text) - longest  # a tail starting at or after `end` is no longer than `longest`
        start = text.find(s[0], max(len(text) - len(s) + 1, 0), end)
        while start >= 0:
            if s.startswith(text[start:]):
                longest = len(text) - start
                break
            start = text.find(s[0], start + 1, end)
    return longest

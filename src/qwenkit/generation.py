"""Token generation: the one decoding core, and the calls that drive it.

`BatchDecoder` holds rows of one model that decode together (gpt-fast's split into a prefill and
one-token decoding steps; rows that come and go, as in nanochat's Engine). It owns the KV cache of
its rows and, per row, the settings (`RowSettings`: sampling, token budget, stop sequences of one
or more tokens, stop strings, random stream), the tokens seen for the repetition penalty and the
streaming text. Every consumer drives it:

- `generate`, `generate_tokens`, `stream_generate` and `generate_text`: a fixed batch, prefilled
  at once and decoded until every row has ended (on CUDA, each step replays a captured graph);
- the serving engine (`qwenkit.serve.engine`): one request per row, rows joining and leaving
  between steps.

Each step runs the model on one new token per row, so the Python work per token is a handful of
tensor operations and a few list operations per row.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qwenkit.config import QwenConfig
from qwenkit.errors import QwenkitError
from qwenkit.model import KVCache, Qwen, ntk_alpha, rotary_inv_freq
from qwenkit.tokenizer import StreamDecoder, Tokenizer

EOD_ID = 151643  # <|endoftext|> of the official vocabulary
GREEDY_BELOW = 1e-5  # temperatures below this pick the most likely token (vLLM's _SAMPLING_EPS)
REPETITION_PENALTY_RANGE = (0.01, 100.0)  # beyond it, penalized fp32 logits can overflow to inf
KV_LENGTH_STEP = 256  # a budgeted KV cache grows its slots in these steps: few reshapes
HF_GENERATION_FILE, QWENKIT_GENERATION_FILE = "generation_config.json", "qwenkit_generation.json"
HF_GENERATION_KEYS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "eos_token_id",
                      "pad_token_id")  # fmt: skip
QWENKIT_GENERATION_KEYS = ("max_new_tokens", "stop_words_ids", "chat_format", "max_window_size")


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
        """Settings from `generation_config.json`, then qwenkit's own extras from
        `qwenkit_generation.json` (older checkpoints kept the extras in the first file: read there too)."""
        values: dict = {}
        for name in (HF_GENERATION_FILE, QWENKIT_GENERATION_FILE):
            file = Path(directory) / name
            if not file.is_file():
                continue
            try:
                values.update(json.loads(file.read_text()))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise QwenkitError(f"{file} is not valid JSON: {e}") from None
        known = {f.name for f in dataclasses.fields(cls)} - {"vocab_size"}
        config = cls(**{k: v for k, v in values.items() if k in known and v is not None})
        config.validate()
        return config

    def to_hf(self) -> dict:
        """`generation_config.json` contents: only keys transformers' GenerationConfig knows. No
        max_new_tokens: transformers would apply it over a caller's own length limit."""
        return {key: getattr(self, key) for key in HF_GENERATION_KEYS}

    def to_qwenkit(self) -> dict:
        """`qwenkit_generation.json` contents: qwenkit's own settings that transformers does not read."""
        return {key: getattr(self, key) for key in QWENKIT_GENERATION_KEYS}

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


def check_prompt(
    prompt: Sequence[int], vocab_size: int, window: int, reserve: int = 0, owner: str = "the model's"
) -> None:
    """QwenkitError for an empty prompt, an id outside [0, vocab_size), or a prompt that leaves
    fewer than `reserve` tokens of the `window` free (`owner` says whose window it is)."""
    if not prompt:
        raise QwenkitError("the prompt is empty")
    if min(prompt) < 0 or max(prompt) >= vocab_size:
        raise QwenkitError(f"token ids must lie in [0, {vocab_size})")
    if len(prompt) + reserve > window:
        raise QwenkitError(f"the prompt has {len(prompt)} tokens; {owner} context window is {window}")


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


# ---- log-probabilities ---------------------------------------------------------------------------


@dataclass
class TokenLogprob:
    """A token's log-probability under the model's own next-token distribution (log-softmax of the
    raw logits: before repetition penalty, temperature, top-k and top-p, as OpenAI and vLLM report
    it), and the `top` most likely tokens there as (id, logprob), most likely first."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, top: int = 0, vocab_size: int | None = None
) -> list[TokenLogprob]:
    """Log-probabilities of `tokens` [N] under `logits` [N, V], with the `top` most likely ids each.
    The softmax runs over every logit, as the model defines it; top candidates are taken among the
    first `vocab_size` ids only (beyond it are the embedding's padding rows, which have no text)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, tokens.to(logprobs.device)[:, None])[:, 0].tolist()
    tops: list[list[tuple[int, float]]] = [[] for _ in chosen]
    if top > 0:
        candidates = logprobs if vocab_size is None else logprobs[:, :vocab_size]
        values, ids = candidates.topk(min(top, candidates.shape[-1]), dim=-1)
        tops = [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
    return [TokenLogprob(t, lp, tp) for t, lp, tp in zip(tokens.tolist(), chosen, tops, strict=True)]


@torch.inference_mode()
def score_prompts(
    model: Qwen,
    prompts: Sequence[Sequence[int]],
    top: int = 0,
    vocab_size: int | None = None,
    logits_budget: int = 2**25,
) -> list[list[TokenLogprob | None]]:
    """Each prompt token's log-probability given the tokens before it (the first has none: None),
    with the `top` most likely tokens at each position, from left-padded forward passes over the
    batch (never token by token). Each pass runs in chunks of positions through a KV cache, so that
    about `logits_budget` logits exist at once (a 32K-token prompt over a 151K vocabulary would need
    20 GB of them in one piece); the first chunk holds all the padding, so prompts of very different
    lengths go in separate passes. Chunks see the dynamic-NTK factor of the whole prompt, so the
    numbers are those of one pass over each prompt alone."""
    rows = [list(p) for p in prompts]
    if not rows or any(not r for r in rows):
        raise QwenkitError("every prompt needs at least one token")
    vocab = model.config.vocab_size
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    results: list[list[TokenLogprob | None]] = [[] for _ in rows]
    group: list[int] = []
    for i in [*order, None]:  # None: the end, run the last group
        if i is not None:
            shortest = len(rows[group[0]]) if group else len(rows[i])
            if not group or (len(group) + 1) * (len(rows[i]) - shortest) * vocab <= logits_budget:
                group.append(i)
                continue
        _, scored, _ = prompt_pass(model, [rows[k] for k in group], top, vocab_size, logits_budget)
        for k, entries in zip(group, scored, strict=True):
            results[k] = entries
        group = [i]
    return results


def prompt_pass(
    model: Qwen,
    rows: Sequence[Sequence[int]],
    top: int,
    vocab_size: int | None = None,
    logits_budget: int = 2**25,
    pad_id: int = 0,
) -> tuple[KVCache, list[list[TokenLogprob | None]], torch.Tensor]:
    """One left-padded forward pass over prompts, in chunks of positions through a new KV cache so
    that about `logits_budget` logits exist at once: (the filled cache, each prompt token's
    TokenLogprob (None for the first), the logits [B, V] after each prompt's last token). The first
    chunk holds all the padding (later calls on a cache take none); the chunks see the dynamic-NTK
    factor of each whole prompt, so the numbers are those of one pass over each prompt alone."""
    ids, mask = left_pad(rows, pad_id)
    batch, width = ids.shape
    device, config = model.device, model.config
    ids = ids.to(device)
    cache = KVCache(config, batch, width, device, model.dtype)
    if config.use_dynamic_ntk:  # fixed from each row's full length, as one pass over it would
        alphas = [ntk_alpha(len(r), config.max_position_embeddings) for r in rows]
        cache.inv_freq = rotary_inv_freq(config.head_dim, config.rope_theta, alphas, device)
    starts = [width - len(r) for r in rows]  # column of each row's first real token
    results: list[list[TokenLogprob | None]] = [[None] for _ in rows]
    step = max(1, logits_budget // (batch * model.config.vocab_size))
    begin, last = 0, None
    while begin < width:
        end = min(max(begin + step, max(starts) + 1 if begin == 0 else 0), width)
        attention_mask = mask[:, :end].to(device) if begin == 0 and batch > 1 else None
        logits = model(ids[:, begin:end], attention_mask=attention_mask, cache=cache)
        # logits at column j predict the token at j + 1
        wanted = [(i, j) for i in range(batch) for j in range(max(begin, starts[i]), min(end, width - 1))]
        if wanted:
            row_index = torch.tensor([i for i, _ in wanted], device=device)
            col_index = torch.tensor([j for _, j in wanted], device=device)
            picked = token_logprobs(
                logits[row_index, col_index - begin], ids[row_index, col_index + 1], top, vocab_size
            )
            for (i, _), entry in zip(wanted, picked, strict=True):
                results[i].append(entry)
        begin, last = end, logits[:, -1]
    return cache, results, last


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


def stop_tokens_held_back(tokens: Sequence[int], stop_sequences: Sequence[Sequence[int]]) -> int:
    """Length of the longest tail of `tokens` that is the start (not the whole) of a stop sequence:
    the tokens whose text waits until they either complete it or cannot."""
    tail = list(tokens)
    return max((n for s in stop_sequences for n in range(1, len(s)) if tail[-n:] == list(s[:n])), default=0)


# ---- the decoding core ---------------------------------------------------------------------------


@dataclass
class RowSettings:
    """How one row decodes: `config` for sampling (its `max_new_tokens` is the row's budget), the
    token sequences that end it (`stops`, one or more ids each; not shown as text), the strings that
    end it (cut from the text) and its random stream (None: torch's global one). Rows that share one
    RowSettings object are sampled together, one draw from its generator, as `generate` samples a
    batch. With `logprobs` (a number of top alternatives, 0 or more) each RowStep carries its
    token's TokenLogprob; with `prompt_logprobs`, the row's first RowStep carries the prompt's,
    computed in the prefill's own forward pass."""

    config: GenerationConfig
    stops: list[list[int]]
    stop_strings: list[str] = field(default_factory=list)
    generator: torch.Generator | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        self.stop_ids = {s[0] for s in self.stops if len(s) == 1}
        self.stop_sequences = [s for s in self.stops if len(s) > 1]
        self.longest_stop = max((len(s) for s in self.stops), default=1)

    @classmethod
    def create(
        cls,
        config: GenerationConfig,
        device: torch.device | str,
        stop: Sequence[int | Sequence[int]] | None = None,
        stop_strings: Sequence[str] = (),
        seed: int | None = None,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
    ) -> RowSettings:
        """Settings from a validated config: its end-of-text ids and `stop_words_ids`, plus `stop`;
        a generator on `device` seeded with `seed`, if given."""
        generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        stops = config.stop_sequences(stop)
        return cls(config, stops, list(stop_strings), generator, logprobs, prompt_logprobs)

    @property
    def argmax_only(self) -> bool:
        """Greedy with no repetition penalty: the next token is the plain argmax of the logits."""
        return self.config.greedy and self.config.repetition_penalty == 1.0


@dataclass
class RowStep:
    """What one step gave a row. `text` is the text the token releases (with a tokenizer only):
    special tokens and stop sequences are never shown, and text is held back while it could still
    become a stop string. `finish_reason` is "stop" or "length" once the row has ended. `error` is
    set instead when picking or decoding this row's token failed; the row has ended too. `logprob`
    is the token's TokenLogprob when the row's settings ask for it, except for a token that
    completes a stop sequence (it is no part of the output)."""

    row: int
    token: int  # -1 when picking the token failed
    generated: int  # new tokens of the row so far, this one included
    text: str = ""
    finish_reason: str | None = None
    error: Exception | None = None
    logprob: TokenLogprob | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # first step only, when asked for


@dataclass
class _Row:
    """A running row's state."""

    settings: RowSettings
    tail: list[int]  # the last tokens, prompt included: enough to match the longest stop sequence
    text: StreamDecoder | None
    generated: int = 0
    last_token: int = 0
    held: list[int] = field(default_factory=list)  # new tokens not decoded yet: they may start a stop
    pending: str = ""  # decoded text held back while it could still become a stop string


class BatchDecoder:
    """Rows of one model decoding together, each with its own prompt and RowSettings.

        decoder = BatchDecoder(model, max_batch=8, max_length=1024, tokenizer=tokenizer)
        steps = decoder.prefill([0, 1], [ids_a, ids_b], [settings_a, settings_b])  # first tokens
        while decoder.running:
            steps = decoder.decode()  # a RowStep for every running row

    `prefill` runs new prompts through the model in one forward pass (left-padded) and moves their
    keys and values into free rows of the cache; `decode` advances every running row by one token,
    each at its own cache slot, so rows of any length decode together and new rows can join
    between steps. A row ends, and is free again, at a stop, at its budget, by `release`, or when
    its own sampling or text fails (its RowStep carries the error; the other rows go on). A failure
    of the shared forward pass raises; the caller then releases the rows. Prompts are checked by
    the caller (`check_prompt`). With `cuda_graph` on a CUDA device, each step decodes all
    rows of the cache by replaying one captured graph.

    Without `kv_budget` the cache holds `max_batch` rows x `max_length` slots from the start. With
    a budget (bytes) it starts empty and `prefill` reshapes it to what the running rows and the new
    ones can fill (prompt + max_new_tokens each; rows to a power of two, slots to a multiple of
    KV_LENGTH_STEP where the budget allows), never letting the cache, a reshape in progress or the
    prefill's own cache exceed the budget (`can_prefill` says whether rows fit now, `fits_alone`
    whether a request ever can); it frees the cache when no row is running. A new shape means new
    tensors, so a captured CUDA graph is dropped and captured again at the next step.
    """

    def __init__(
        self,
        model: Qwen,
        max_batch: int,
        max_length: int,
        tokenizer: Tokenizer | None = None,
        cuda_graph: bool = False,
        kv_budget: int | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_id = (model.generation_config or GenerationConfig()).pad_token_id
        self.kv_budget = kv_budget
        shape = (max_batch, max_length) if kv_budget is None else (0, 0)
        self.cache = KVCache(model.config, *shape, model.device, model.dtype)
        self.needs = [0] * max_batch  # slots each running row may fill: prompt + max_new_tokens
        self.rows: list[_Row | None] = [None] * max_batch
        self.lengths = [0] * max_batch  # tokens in each row's cache (its next write slot), on the host
        self.seen: torch.Tensor | None = None  # [max_batch, vocab]: tokens each row has seen
        self.cuda_graph = cuda_graph and model.device.type == "cuda"
        self.graph: CUDAGraphDecoder | None = None

    @property
    def running(self) -> list[int]:
        """The rows decoding now."""
        return [row for row, state in enumerate(self.rows) if state is not None]

    @property
    def free_rows(self) -> list[int]:
        """The rows a prefill can take."""
        return [row for row, state in enumerate(self.rows) if state is None]

    def release(self, row: int) -> None:
        """End a row now (e.g. a cancelled request); it is free for the next prefill."""
        self.rows[row] = None
        self._free_cache_if_idle()

    def kv_bytes(self, rows: int, length: int) -> int:
        """Bytes of a cache of `rows` x `length` slots for this model (KVCache.size_in_bytes)."""
        return KVCache.size_in_bytes(self.model.config, rows, length, self.model.dtype)

    def fits_alone(self, prompt_length: int, max_new_tokens: int) -> bool:
        """Whether one request of this size fits the KV budget when no other row runs."""
        return self._cache_shape((0, 0), {0: prompt_length + max_new_tokens}, [prompt_length]) is not None

    def can_prefill(self, rows: Sequence[int], prompts: Sequence[Sequence[int]], settings) -> bool:
        """Whether these free rows can start these prompts now, next to the running rows."""
        return self._planned_shape(rows, prompts, settings) is not None

    def _planned_shape(self, rows, prompts, settings) -> tuple[int, int] | None:
        needs = {row: self.needs[row] for row in self.running}
        for row, prompt, s in zip(rows, prompts, settings, strict=True):
            needs[row] = len(prompt) + s.config.max_new_tokens
        current = (self.cache.batch_size, self.cache.max_length)
        return self._cache_shape(current, needs, [len(p) for p in prompts])

    def _cache_shape(
        self, current: tuple[int, int], needs: dict[int, int], prompt_lengths: Sequence[int]
    ) -> tuple[int, int] | None:
        """The cache shape (rows, slots) for rows that each fill `needs[row]` slots at most: the
        current one when it holds them, else a new one; None when none fits the budget. While the
        cache is reshaped, one old layer's keys coexist with the new cache; while prompts are
        prefilled, their own left-padded cache does."""
        if self.kv_budget is None:
            return current
        rows, length = max(needs) + 1, max(needs.values())
        prefill = self.kv_bytes(len(prompt_lengths), max(prompt_lengths))
        old_layer = self.kv_bytes(*current) // (2 * self.model.config.num_hidden_layers)  # >= a layer's keys
        candidates = [
            (min(2 ** math.ceil(math.log2(rows)), len(self.rows)),
             min(-(-length // KV_LENGTH_STEP) * KV_LENGTH_STEP, self.max_length)),
            (rows, length),
        ]  # fmt: skip
        if current[0] >= rows and current[1] >= length:
            candidates.insert(0, current)
        for shape in candidates:
            reshaping = old_layer if shape != current else 0
            if self.kv_bytes(*shape) + max(prefill, reshaping) <= self.kv_budget:
                return shape
        return None

    def _free_cache_if_idle(self) -> None:
        if self.kv_budget is not None and self.cache.batch_size and not self.running:
            self.graph = None
            self.cache.resize(0, 0)

    @torch.inference_mode()
    def prefill(
        self, rows: Iterable[int], prompts: Sequence[Sequence[int]], settings: Sequence[RowSettings]
    ) -> list[RowStep]:
        """Start each prompt in its free row with its settings; the first token of each."""
        rows = list(rows)
        for row, prompt, s in zip(rows, prompts, settings, strict=True):
            if self.rows[row] is not None:
                raise ValueError(f"row {row} is in use")
            if len(prompt) + s.config.max_new_tokens > self.max_length:
                raise ValueError(f"a row holds {self.max_length} tokens: no room for {len(prompt)} + "
                                 f"{s.config.max_new_tokens}")  # fmt: skip
            if s.stop_strings and self.tokenizer is None:
                raise ValueError("stop strings need a BatchDecoder with a tokenizer")
        shape = self._planned_shape(rows, prompts, settings)
        if shape is None:
            raise ValueError(f"no room in the KV budget of {self.kv_budget} bytes for these rows now")
        if shape != (self.cache.batch_size, self.cache.max_length):
            self.graph = None  # captured on the old tensors (and its memory pool goes first)
            self.cache.resize(*shape)
        device = self.model.device
        top = max((s.prompt_logprobs for s in settings if s.prompt_logprobs is not None), default=None)
        scored = None
        if top is None:
            ids, mask = left_pad(prompts, self.pad_id)
            prefilled = KVCache(self.model.config, len(rows), ids.shape[1], device, self.model.dtype)
            attention_mask = mask.to(device) if len(rows) > 1 else None
            logits = self.model(
                ids.to(device), attention_mask=attention_mask, cache=prefilled, last_only=True
            )
            logits = logits[:, -1]
        else:  # the prompts' own log-probabilities come from the same pass (chunked: see prompt_pass)
            vocab = self.tokenizer.vocab_size if self.tokenizer is not None else None
            prefilled, scored, logits = prompt_pass(self.model, prompts, top, vocab, pad_id=self.pad_id)
        self.cache.insert(rows, prefilled)
        for row, prompt, s in zip(rows, prompts, settings, strict=True):
            text = StreamDecoder(self.tokenizer, skip_special_tokens=True) if self.tokenizer else None
            self.rows[row] = _Row(s, list(prompt[-s.longest_stop :]), text)
            self.lengths[row] = len(prompt)
            self.needs[row] = len(prompt) + s.config.max_new_tokens
            if s.config.repetition_penalty != 1.0:
                if self.seen is None:
                    shape = (len(self.rows), self.model.config.vocab_size)
                    self.seen = torch.zeros(shape, dtype=torch.bool, device=device)
                self.seen[row] = False
                self.seen[row, torch.tensor(list(prompt), device=device)] = True
        steps = self._advance(rows, logits.float())
        for k, (step, s) in enumerate(zip(steps, settings, strict=True)):
            if scored is not None and s.prompt_logprobs is not None:
                step.prompt_logprobs = [
                    e and dataclasses.replace(e, top=e.top[: s.prompt_logprobs]) for e in scored[k]
                ]
        return steps

    @torch.inference_mode()
    def decode(self) -> list[RowStep]:
        """One token for every running row."""
        running = self.running
        if not running:
            return []
        # A graph decodes every row at fixed shapes; eager decoding, the rows up to the last running
        # one, attending only the slots in use. Rows in between that are not running decode a
        # dummy token at slot 0.
        decoded = self.cache.batch_size if self.cuda_graph else running[-1] + 1
        holes = [row for row in range(decoded) if self.rows[row] is None]
        if holes:
            self.cache.park(holes)
        tokens = [state.last_token if state else self.pad_id for state in self.rows[:decoded]]
        tokens = torch.tensor(tokens, device=self.model.device)
        if self.cuda_graph:
            if self.graph is None:
                self.graph = CUDAGraphDecoder(self.model, self.cache)
            logits = self.graph(tokens)
        else:
            width = max(self.lengths[row] for row in running) + 1
            logits = self.model.decode_step(tokens[:, None], self.cache.first_rows(decoded), width=width)
        for row in running:
            self.lengths[row] += 1
        return self._advance(running, (logits[running] if holes else logits).float())

    def _advance(self, rows: list[int], logits: torch.Tensor) -> list[RowStep]:
        """Pick each row's next token from its row of `logits` [len(rows), V] and take it."""
        tokens, errors = self._pick(rows, logits)
        logprobs = self._logprobs(rows, logits, tokens, errors)
        penalized = [(row, token) for row, token in zip(rows, tokens, strict=True)
                     if row not in errors and self.rows[row].settings.config.repetition_penalty != 1.0]  # fmt: skip
        if penalized:
            self.seen[[row for row, _ in penalized], [token for _, token in penalized]] = True
        steps = []
        for row, token in zip(rows, tokens, strict=True):
            if row in errors:
                step = RowStep(row, -1, self.rows[row].generated, error=errors[row])
            else:
                try:
                    step = self._take(row, token, logprobs.get(row))
                except Exception as e:  # this row's text failed: it ends alone
                    step = RowStep(row, token, self.rows[row].generated, error=e)
            if step.finish_reason is not None or step.error is not None:
                self.rows[row] = None
            steps.append(step)
        self._free_cache_if_idle()
        return steps

    def _pick(self, rows: list[int], logits: torch.Tensor) -> tuple[list[int], dict[int, Exception]]:
        """Next tokens: one argmax for all plain greedy rows, one pick per RowSettings otherwise
        (so neighbours in the batch never change a row's random stream), and the rows whose pick
        failed, with the error."""
        groups: dict[object, list[int]] = {}
        for i, row in enumerate(rows):
            s = self.rows[row].settings
            groups.setdefault(("argmax", s.config.vocab_size) if s.argmax_only else id(s), []).append(i)
        tokens, errors = [0] * len(rows), {}
        for members in groups.values():
            s = self.rows[rows[members[0]]].settings
            part = logits if len(members) == len(rows) else logits[members]
            try:
                if s.argmax_only:
                    chosen = part[:, : s.config.vocab_size].argmax(dim=-1)
                else:
                    seen = (
                        self.seen[[rows[i] for i in members]] if s.config.repetition_penalty != 1.0 else None
                    )
                    chosen = pick_tokens(part, seen, s.config, s.generator)
                for i, token in zip(members, chosen.tolist(), strict=True):
                    tokens[i] = token
            except Exception as e:  # e.g. non-finite logits: these rows end, the others go on
                errors.update((rows[i], e) for i in members)
        return tokens, errors

    def _logprobs(
        self, rows: list[int], logits: torch.Tensor, tokens: list[int], errors: dict[int, Exception]
    ) -> dict[int, TokenLogprob]:
        """The TokenLogprob of each new token whose row asks for it, from the raw logits."""
        wanted = [i for i, row in enumerate(rows)
                  if row not in errors and self.rows[row].settings.logprobs is not None]  # fmt: skip
        if not wanted:
            return {}
        top = max(self.rows[rows[i]].settings.logprobs for i in wanted)
        vocab = self.tokenizer.vocab_size if self.tokenizer is not None else None
        chosen = torch.tensor([tokens[i] for i in wanted], device=logits.device)
        entries = token_logprobs(logits[wanted], chosen, top, vocab)
        for i, entry in zip(wanted, entries, strict=True):
            entry.top = entry.top[: self.rows[rows[i]].settings.logprobs]
        return {rows[i]: entry for i, entry in zip(wanted, entries, strict=True)}

    def _take(self, row: int, token: int, logprob: TokenLogprob | None = None) -> RowStep:
        """A row's new token: has it stopped, or spent its budget? What text does it release?"""
        state = self.rows[row]
        s = state.settings
        state.generated += 1
        state.last_token = token
        state.tail = (state.tail + [token])[-s.longest_stop :]
        matched = max((len(q) for q in s.stop_sequences if state.tail[-len(q) :] == q), default=0)
        if not matched and token in s.stop_ids:
            matched = 1
        finish = "stop" if matched else "length" if state.generated >= s.config.max_new_tokens else None
        text = ""
        if state.text is not None:
            text, finish = self._text(state, token, matched, finish)
        return RowStep(row, token, state.generated, text, finish, logprob=None if matched else logprob)

    def _text(self, state: _Row, token: int, matched: int, finish: str | None) -> tuple[str, str | None]:
        """The text a row's new token releases, and its finish reason (a stop string ends it too).
        `matched` is the length of the stop sequence the token completed (0: none)."""
        s = state.settings
        if matched:  # the stop sequence is not shown: drop the new token and the held ones it ends
            shown = state.held[: max(len(state.held) - (matched - 1), 0)]
            state.held = []
        else:
            state.held.append(token)
            keep = 0 if finish else min(stop_tokens_held_back(state.tail, s.stop_sequences), len(state.held))
            shown, state.held = state.held[: len(state.held) - keep], state.held[len(state.held) - keep :]
        for t in shown:
            state.pending += state.text.push(t)
        if finish is not None:
            state.pending += state.text.flush()
        text, state.pending = state.pending, ""
        cut = find_stop(text, s.stop_strings)
        if cut is not None:
            return text[:cut], "stop"
        if finish is None:
            keep = held_back_length(text, s.stop_strings)
            text, state.pending = text[: len(text) - keep], text[len(text) - keep :]
        return text, finish


class CUDAGraphDecoder:
    """One decoding step of every row of a cache captured as a CUDA graph and replayed per token:
    the whole forward pass becomes a single launch instead of hundreds of small kernels started
    from Python."""

    def __init__(self, model: Qwen, cache: KVCache):
        self.tokens = torch.zeros((cache.positions.shape[0], 1), dtype=torch.long, device=model.device)
        with cache.rollback():
            side = torch.cuda.Stream()  # warm-up off the main stream, as graph capture requires
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    model.decode_step(self.tokens, cache)
            torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model.decode_step(self.tokens, cache)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] for tokens [B] (the output buffer is reused by the next call)."""
        self.tokens.copy_(tokens[:, None])
        self.graph.replay()
        return self.logits


# ---- a fixed batch, decoded to the end -----------------------------------------------------------


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
    return input_ids.to(model.device), attention_mask


def _prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[list[int]]:
    """Each row's real tokens: those the attention mask keeps."""
    rows = input_ids.tolist()
    if attention_mask is None:
        return rows
    return [
        [t for t, keep in zip(r, m, strict=True) if keep]
        for r, m in zip(rows, attention_mask.tolist(), strict=True)
    ]


@torch.inference_mode()
def _decode_to_end(
    model: Qwen,
    prompts: list[list[int]],
    tokenizer: Tokenizer | None,
    stop: Sequence[int | Sequence[int]] | None,
    stop_strings: Sequence[str],
    seed: int | None,
    cuda_graph: bool,
    settings: dict,
) -> Iterator[list[RowStep]]:
    """The RowSteps of a fixed batch, step by step: one prefill, then one decoding step per token
    until every row has ended. The rows share one RowSettings (so a seed gives the batch one random
    stream) and one budget, cut where the longest prompt meets the context window; a failure of any
    row raises."""
    config = (model.generation_config or GenerationConfig()).updated(**settings)
    limit = context_length(model)
    for prompt in prompts:
        check_prompt(prompt, model.config.vocab_size, limit)
    longest = max(len(p) for p in prompts)
    budget = min(config.max_new_tokens, limit - longest)
    if budget == 0:
        return
    config = dataclasses.replace(config, max_new_tokens=budget)
    row_settings = RowSettings.create(config, model.device, stop, stop_strings, seed)
    decoder = BatchDecoder(
        model, len(prompts), longest + budget, tokenizer, cuda_graph=cuda_graph and budget > 1
    )
    steps = decoder.prefill(range(len(prompts)), prompts, [row_settings] * len(prompts))
    while True:
        for step in steps:
            if step.error is not None:
                raise step.error
        yield steps
        if not decoder.running:
            return
        steps = decoder.decode()


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
    input_ids, attention_mask = _prepare(model, input_ids, attention_mask)
    prompts = _prompts(input_ids, attention_mask)
    pad = settings.get("pad_token_id")
    pad = (model.generation_config or GenerationConfig()).pad_token_id if pad is None else pad
    finished = [False] * len(prompts)
    for steps in _decode_to_end(model, prompts, None, stop, (), seed, cuda_graph, settings):
        tokens = [pad] * len(prompts)
        for step in steps:
            tokens[step.row] = step.token
            finished[step.row] = step.finish_reason == "stop"
        yield torch.tensor(tokens, device=model.device), torch.tensor(finished, device=model.device)


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
    stop: Sequence[int | Sequence[int]] | None = None,
    seed: int | None = None,
    cuda_graph: bool = True,
    **settings,
) -> Iterator[str]:
    """Text deltas of one prompt's continuation. Multi-byte characters are never split; stop tokens
    and stop sequences are not shown; text is held back while it could still become one of
    `stop_strings`, and ends before the first one."""
    prompts = _prompts(*_prepare(model, input_ids, None))
    if len(prompts) != 1:
        raise QwenkitError("stream_generate takes a single prompt")
    for steps in _decode_to_end(model, prompts, tokenizer, stop, stop_strings, seed, cuda_graph, settings):
        if steps[0].text:
            yield steps[0].text


@dataclass
class Continuation:
    """A prompt's continuation: its new ids (stop tokens included), their text (special tokens and
    stop sequences not shown, cut before a stop string) and why it ended ("stop" or "length")."""

    ids: list[int]
    text: str
    finish_reason: str


def generate_text(
    model: Qwen,
    tokenizer: Tokenizer,
    prompts: Sequence[Sequence[int]],
    stop_strings: Sequence[str] = (),
    stop: Sequence[int | Sequence[int]] | None = None,
    seed: int | None = None,
    cuda_graph: bool = True,
    **settings,
) -> list[Continuation]:
    """The continuations of several prompts, decoded together as one batch; each row ends on its
    own (a stop, a stop string, or the budget). Settings as for `generate`."""
    rows = [list(p) for p in prompts]
    results = [Continuation([], "", "length") for _ in rows]
    if not rows:
        return results
    for steps in _decode_to_end(model, rows, tokenizer, stop, stop_strings, seed, cuda_graph, settings):
        for step in steps:
            result = results[step.row]
            result.ids.append(step.token)
            result.text += step.text
            result.finish_reason = step.finish_reason or result.finish_reason
    return results

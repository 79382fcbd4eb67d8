"""Continuous batching: one model, one device, many concurrent requests.

A background thread owns the model and a KV cache of `max_batch` rows (slots). Each loop:

1. new requests are prefilled together (left-padded, one forward pass) and their keys/values are
   copied into free rows, so they join the running batch at the next step;
2. one `Qwen.decode_step` advances every running row by a token; each row writes at its own
   cache slot and position, so rows of any length decode together;
3. each row picks its token with its own settings and its own `torch.Generator` (seeded requests
   give the same text alone or in a batch), its text is pushed to the request's output, and
   finished or cancelled requests leave at once, freeing their row.

Using it:

    engine = Engine(model, tokenizer, max_batch=16)          # starts the thread
    params = SamplingParams(max_tokens=64, temperature=0.7, seed=1, stop=["\\n\\n"])
    # from any thread (blocking):
    result = engine.generate(prompt_ids, params)             # -> Completion(text, finish_reason, ...)
    for chunk in engine.stream(prompt_ids, params): ...      # Chunk(text, finish_reason, counts)
    # from asyncio code (the server):
    result = await engine.agenerate(prompt_ids, params)
    async for chunk in engine.astream(prompt_ids, params): ...
    engine.close()

Leaving a stream early (break, generator close, task cancellation) cancels its request; the row
is freed before the next decoding step. Bad settings raise QwenkitError at submission. A failure
while picking or emitting one request's token ends that request alone (with GenerationFailed);
only a failure of the shared forward pass (e.g. out of memory) ends every running request.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from qwenkit.errors import QwenkitError
from qwenkit.generation import (
    GREEDY_BELOW,
    GenerationConfig,
    context_length,
    find_stop,
    held_back_length,
    left_pad,
    pick_tokens,
)
from qwenkit.model import KVCache, Qwen
from qwenkit.tokenizer import StreamDecoder, Tokenizer


@dataclass
class SamplingParams:
    """Per-request settings; None keeps the model's own generation setting.

    temperature 0 means greedy. `stop_token_ids` end generation (not shown) in addition to the
    model's end-of-text ids; `stop` strings end it too and are cut from the text."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()


@dataclass
class Chunk:
    """A piece of a request's output; the last one carries `finish_reason` ("stop" or "length")."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class _Request:
    """Engine-side state of one request; only the engine thread touches the mutable fields."""

    prompt: list[int]
    config: GenerationConfig
    max_tokens: int
    stop_ids: set[int]
    stop_strings: list[str]
    generator: torch.Generator | None
    deliver: Callable[[Chunk | BaseException], None]
    decoder: StreamDecoder
    cancelled: threading.Event = field(default_factory=threading.Event)
    row: int = -1
    generated: int = 0
    last_token: int = 0
    pending: str = ""  # decoded text held back while it could still become a stop string

    def cancel(self) -> None:
        self.cancelled.set()


class GenerationFailed(QwenkitError):
    """A request ended by a failure inside the engine rather than by a mistake in the request."""


_CLOSED = QwenkitError("the engine was shut down")


class Engine:
    """Continuous-batching generation for one model on one device (see the module docstring)."""

    def __init__(
        self,
        model: Qwen,
        tokenizer: Tokenizer,
        max_batch: int = 16,
        max_seq_len: int | None = None,
        prefill_tokens: int = 8192,
    ) -> None:
        if max_batch < 1:
            raise QwenkitError("max_batch must be >= 1")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_seq_len = min(max_seq_len or context_length(model), context_length(model))
        self.prefill_tokens = prefill_tokens  # padded prompt tokens prefilled in one forward pass
        self.defaults = model.generation_config or GenerationConfig()
        config, device = model.config, model.device
        self.cache = KVCache(config, max_batch, self.max_seq_len, device, model.dtype)
        self.cache.slot = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.cache.next_position = torch.zeros((max_batch, 1), dtype=torch.long, device=device)
        self.cache.inv_freq = torch.zeros((max_batch, config.head_dim // 2), device=device)
        self.seen = torch.zeros((max_batch, config.vocab_size), dtype=torch.bool, device=device)
        self.rows: list[_Request | None] = [None] * max_batch
        self.waiting: list[_Request] = []
        self.prefilling: list[_Request] = []
        self.inbox: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self.steps = 0  # decoding steps run (for tests and monitoring)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="qwenkit-engine", daemon=True)
        self._thread.start()

    # ---- public API ------------------------------------------------------------------------

    @property
    def active(self) -> int:
        """Requests holding a row now."""
        return sum(r is not None for r in self.rows)

    def validate(self, prompt: Sequence[int], params: SamplingParams) -> tuple[GenerationConfig, int]:
        """(generation config, max new tokens) for a request, or QwenkitError saying what is wrong."""
        if not prompt:
            raise QwenkitError("the prompt is empty")
        if len(prompt) >= self.max_seq_len:
            raise QwenkitError(
                f"the prompt has {len(prompt)} tokens; this server's context window is {self.max_seq_len}"
            )
        if min(prompt) < 0 or max(prompt) >= self.model.config.vocab_size:
            raise QwenkitError(f"token ids must lie in [0, {self.model.config.vocab_size})")
        greedy = params.temperature is not None and 0 <= params.temperature < GREEDY_BELOW
        settings = {
            "temperature": None if greedy else params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k,
            "repetition_penalty": params.repetition_penalty,
            "do_sample": False if greedy else None,
        }
        config = self.defaults.updated(**settings)
        if config.vocab_size is None:
            config.vocab_size = self.tokenizer.vocab_size  # never generate embedding padding rows
        room = self.max_seq_len - len(prompt)
        max_tokens = params.max_tokens if params.max_tokens is not None else min(config.max_new_tokens, room)
        if max_tokens < 1:
            raise QwenkitError("max_tokens must be >= 1")
        if max_tokens > room:
            raise QwenkitError(
                f"the prompt ({len(prompt)} tokens) plus max_tokens ({max_tokens}) exceeds "
                f"this server's context window of {self.max_seq_len} tokens"
            )
        if any(not s for s in params.stop):
            raise QwenkitError("stop strings must not be empty")
        return config, max_tokens

    def submit(self, prompt: Sequence[int], params: SamplingParams, deliver) -> _Request:
        """Queue a request; `deliver(item)` is called from the engine thread with each Chunk, or an
        exception. Returns a handle whose `cancel()` removes the request within one step."""
        if self._closed:
            raise _CLOSED
        config, max_tokens = self.validate(prompt, params)
        stops = config.stop_sequences([[int(i)] for i in params.stop_token_ids])
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.model.device).manual_seed(params.seed)
        request = _Request(
            prompt=[int(i) for i in prompt],
            config=config,
            max_tokens=max_tokens,
            stop_ids={s[0] for s in stops if len(s) == 1},
            stop_strings=list(params.stop),
            generator=generator,
            deliver=deliver,
            decoder=StreamDecoder(self.tokenizer, skip_special_tokens=True),
        )
        self.inbox.put(request)
        return request

    def stream(self, prompt: Sequence[int], params: SamplingParams) -> Iterator[Chunk]:
        """Chunks of one request, blocking; usable from any thread but the engine's."""
        outputs: queue.SimpleQueue = queue.SimpleQueue()
        request = self.submit(prompt, params, outputs.put)
        try:
            while True:
                item = outputs.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            request.cancel()  # no-op when finished; frees the row when the caller left early

    def generate(self, prompt: Sequence[int], params: SamplingParams) -> Completion:
        """The whole output of one request, blocking."""
        return _collect(self.stream(prompt, params))

    async def astream(self, prompt: Sequence[int], params: SamplingParams) -> AsyncIterator[Chunk]:
        """Chunks of one request for asyncio code; cancelling the consumer cancels the request."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()

        def deliver(item) -> None:
            with contextlib.suppress(RuntimeError):  # the event loop is gone: nobody is listening
                loop.call_soon_threadsafe(outputs.put_nowait, item)

        request = self.submit(prompt, params, deliver)
        try:
            while True:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            request.cancel()

    async def agenerate(self, prompt: Sequence[int], params: SamplingParams) -> Completion:
        chunks = [chunk async for chunk in self.astream(prompt, params)]
        return _collect(chunks)

    def close(self) -> None:
        """Stop the engine thread; unfinished requests get an error."""
        if not self._closed:
            self._closed = True
            self.inbox.put(None)
            self._thread.join(timeout=30)

    # ---- the engine thread -----------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                idle = not self.waiting and self.active == 0
                if not self._take_inbox(block=idle):
                    break
                self._drop_cancelled()
                try:
                    self._admit()
                    if self.active:
                        self._decode()
                except Exception as e:  # e.g. out of memory: fail the running requests, keep serving
                    failure = _failure(e)
                    for request in {
                        id(r): r for r in [*self.prefilling, *self.rows] if r is not None
                    }.values():
                        request.deliver(failure)
                    self.rows = [None] * self.max_batch
                    self.prefilling = []
        for request in [*self.waiting, *(r for r in self.rows if r is not None)]:
            request.deliver(_CLOSED)

    def _take_inbox(self, block: bool) -> bool:
        """Move submitted requests to `waiting`; False once close() was called."""
        try:
            item = self.inbox.get(block=block)
            while True:
                if item is None:
                    return False
                self.waiting.append(item)
                item = self.inbox.get_nowait()
        except queue.Empty:
            return True

    def _drop_cancelled(self) -> None:
        self.waiting = [r for r in self.waiting if not r.cancelled.is_set()]
        for row, request in enumerate(self.rows):
            if request is not None and request.cancelled.is_set():
                self.rows[row] = None

    def _admit(self) -> None:
        """Prefill waiting requests into free rows (lowest first, so running rows stay packed)."""
        free = [row for row, r in enumerate(self.rows) if r is None]
        batch: list[_Request] = []
        while self.waiting and len(batch) < len(free):
            longest = max([len(r.prompt) for r in batch] + [len(self.waiting[0].prompt)])
            if batch and longest * (len(batch) + 1) > self.prefill_tokens:
                break
            batch.append(self.waiting.pop(0))
        if not batch:
            return
        self.prefilling = batch
        ids, mask = left_pad([r.prompt for r in batch], self.defaults.pad_token_id)
        device = self.model.device
        scratch = KVCache(self.model.config, len(batch), ids.shape[1], device, self.model.dtype)
        attention_mask = mask.to(device) if len(batch) > 1 else None
        logits = self.model(ids.to(device), attention_mask=attention_mask, cache=scratch, last_only=True)
        width = ids.shape[1]
        for i, (request, row) in enumerate(zip(batch, free, strict=False)):
            n = len(request.prompt)
            for layer in range(self.model.config.num_hidden_layers):
                self.cache.keys[layer][row, :, :n] = scratch.keys[layer][i, :, width - n :]
                self.cache.values[layer][row, :, :n] = scratch.values[layer][i, :, width - n :]
            self.cache.positions[row] = -1
            self.cache.positions[row, :n] = torch.arange(n, device=device)
            self.cache.inv_freq[row] = scratch.inv_freq[i]
            self.cache.slot[row] = n
            self.cache.next_position[row, 0] = n
            self.seen[row] = False
            if request.config.repetition_penalty != 1.0:
                self.seen[row, torch.tensor(request.prompt, device=device)] = True
            request.row = row
            self.rows[row] = request
        self._advance(batch, logits[:, -1].float())
        self.prefilling = []

    def _decode(self) -> None:
        """One token for every running row."""
        used = max(row for row, r in enumerate(self.rows) if r is not None) + 1
        tokens = torch.full((used, 1), self.defaults.pad_token_id, dtype=torch.long)
        holes = []
        for row in range(used):
            request = self.rows[row]
            if request is not None:
                tokens[row, 0] = request.last_token
            else:
                holes.append(row)
        if holes:  # a free row between running ones decodes a dummy token at slot 0, never overflowing
            self.cache.slot[holes] = 0
            self.cache.next_position[holes] = 0
        cache = self.cache.first_rows(used)
        width = int(cache.slot.max()) + 1
        logits = self.model.decode_step(tokens.to(self.model.device), cache, width=width).float()
        self.steps += 1
        running = [row for row in range(used) if self.rows[row] is not None]
        self._advance([self.rows[row] for row in running], logits[running])

    def _advance(self, requests: list[_Request], logits: torch.Tensor) -> None:
        """Pick and emit each request's next token from its logits row: one argmax for all plain
        greedy rows, each other row with its own settings and generator (so batch neighbours never
        change it). A request whose own step fails ends with the error; the others go on."""
        vocab = self.tokenizer.vocab_size
        plain = [r.config.greedy and r.config.repetition_penalty == 1.0 and r.config.vocab_size == vocab
                 for r in requests]  # fmt: skip
        greedy = logits[:, :vocab].argmax(dim=-1).tolist() if any(plain) else []
        for i, request in enumerate(requests):
            try:
                token = greedy[i] if plain[i] else self._sample(request, logits[i : i + 1])
                self._emit(request, token)
            except Exception as e:
                self.rows[request.row] = None
                request.deliver(_failure(e))

    def _sample(self, request: _Request, logits: torch.Tensor) -> int:
        """The next token of a request that samples or penalizes repetition, from its logits [1, V]."""
        config = request.config
        seen = self.seen[request.row : request.row + 1] if config.repetition_penalty != 1.0 else None
        return int(pick_tokens(logits, seen, config, request.generator)[0])

    def _emit(self, request: _Request, token: int) -> None:
        """Take the request's next token: deliver its text, retire the request when done."""
        row = request.row
        request.last_token = token
        request.generated += 1
        if request.config.repetition_penalty != 1.0:
            self.seen[row, token] = True
        finish = None
        if token in request.stop_ids:
            finish = "stop"
        else:
            request.pending += request.decoder.push(token)
            if request.generated >= request.max_tokens:
                finish = "length"
        if finish is not None:
            request.pending += request.decoder.flush()
        text = request.pending
        cut = find_stop(text, request.stop_strings)
        if cut is not None:
            text, finish = text[:cut], "stop"
        elif finish is None:
            keep = held_back_length(text, request.stop_strings)
            text, request.pending = text[: len(text) - keep], text[len(text) - keep :]
        if finish is None and not text:
            return
        request.deliver(Chunk(text, finish, len(request.prompt), request.generated))
        if finish is not None:
            self.rows[row] = None


def _failure(error: Exception) -> GenerationFailed:
    reason = str(error) if isinstance(error, QwenkitError) else f"{type(error).__name__}: {error}"
    return GenerationFailed(f"generation failed: {reason}")


def _collect(chunks) -> Completion:
    text, last = "", None
    for chunk in chunks:
        text += chunk.text
        last = chunk
    return Completion(text, last.finish_reason, last.prompt_tokens, last.completion_tokens)

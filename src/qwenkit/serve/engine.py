"""Continuous batching: one model, one device, many concurrent requests.

A background thread drives the decoding core (`qwenkit.generation.BatchDecoder`, whose KV cache
holds `max_batch` rows), one request per row. Each loop:

1. new requests are prefilled together (left-padded, one forward pass) into free rows, so they
   join the running batch at the next step;
2. one decoding step advances every running row by a token, each row at its own cache slot, so
   rows of any length decode together;
3. each row picks its token with its own settings and its own `torch.Generator` (seeded requests
   give the same text alone or in a batch), its text goes to the request's output, and finished
   or cancelled requests leave at once, freeing their row.

The engine itself keeps only what serving needs: the thread, admission (how many prompt tokens
one prefill takes), cancellation, and fault isolation. Stops, sampling and text are the core's,
the same as `qwenkit.generation.generate`'s.

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
    BatchDecoder,
    GenerationConfig,
    RowSettings,
    RowStep,
    check_prompt,
    context_length,
)
from qwenkit.model import Qwen
from qwenkit.tokenizer import Tokenizer


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
    """Engine-side state of one request; only the engine thread sets `row`."""

    prompt: list[int]
    settings: RowSettings
    deliver: Callable[[Chunk | BaseException], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    row: int = -1

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
        self.decoder = BatchDecoder(model, max_batch, self.max_seq_len, tokenizer)
        self.rows: list[_Request | None] = [None] * max_batch  # the request decoding in each row
        self.waiting: list[_Request] = []
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

    def validate(self, prompt: Sequence[int], params: SamplingParams) -> RowSettings:
        """The decoding settings of a request, or QwenkitError saying what is wrong with it."""
        vocab_size = self.model.config.vocab_size
        check_prompt(prompt, vocab_size, self.max_seq_len, reserve=1, owner="this server's")
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
        config.max_new_tokens = max_tokens
        stop = [[int(i)] for i in params.stop_token_ids]
        return RowSettings.create(config, self.model.device, stop, params.stop, params.seed)

    def submit(self, prompt: Sequence[int], params: SamplingParams, deliver) -> _Request:
        """Queue a request; `deliver(item)` is called from the engine thread with each Chunk, or an
        exception. Returns a handle whose `cancel()` removes the request within one step."""
        if self._closed:
            raise _CLOSED
        request = _Request([int(i) for i in prompt], self.validate(prompt, params), deliver)
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
                        self._deliver(self.decoder.decode())
                        self.steps += 1
                except Exception as e:  # e.g. out of memory: fail the running requests, keep serving
                    failure = _failure(e)
                    for row, request in enumerate(self.rows):
                        if request is not None:
                            self._end(row)
                            request.deliver(failure)
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
                self._end(row)

    def _admit(self) -> None:
        """Prefill waiting requests into free rows (lowest first, so running rows stay packed), as
        many as fit in `prefill_tokens` padded prompt tokens."""
        free = self.decoder.free_rows
        batch: list[_Request] = []
        while self.waiting and len(batch) < len(free):
            longest = max([len(r.prompt) for r in batch] + [len(self.waiting[0].prompt)])
            if batch and longest * (len(batch) + 1) > self.prefill_tokens:
                break
            batch.append(self.waiting.pop(0))
        if not batch:
            return
        rows = free[: len(batch)]
        for request, row in zip(batch, rows, strict=True):
            request.row = row
            self.rows[row] = request
        self._deliver(self.decoder.prefill(rows, [r.prompt for r in batch], [r.settings for r in batch]))

    def _deliver(self, steps: list[RowStep]) -> None:
        """Send each row's new text to its request; a request whose own step failed ends with the
        error, and one that has finished leaves its row. The other requests go on."""
        for step in steps:
            request = self.rows[step.row]
            try:
                if step.error is not None:
                    raise step.error
                if step.finish_reason is not None:
                    self._end(step.row)
                if step.text or step.finish_reason is not None:
                    chunk = Chunk(step.text, step.finish_reason, len(request.prompt), step.generated)
                    request.deliver(chunk)
            except Exception as e:
                self._end(step.row)
                request.deliver(_failure(e))

    def _end(self, row: int) -> None:
        """Free a row (its request finished, failed or was cancelled)."""
        self.rows[row] = None
        self.decoder.release(row)


def _failure(error: Exception) -> GenerationFailed:
    reason = str(error) if isinstance(error, QwenkitError) else f"{type(error).__name__}: {error}"
    return GenerationFailed(f"generation failed: {reason}")


def _collect(chunks) -> Completion:
    text, last = "", None
    for chunk in chunks:
        text += chunk.text
        last = chunk
    return Completion(text, last.finish_reason, last.prompt_tokens, last.completion_tokens)

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

KV memory is budgeted (`kv_memory_bytes`; by default the smaller of what `max_batch` rows at the
full context need and 30% of the memory available at start): the decoder's cache grows with the
rows that run and is freed when none does. A request is admitted when the tokens it may fill
(prompt + max_tokens) fit next to the running rows; until then it waits in the queue, first come
first served. One that could not fit even alone is refused at submission.

The engine itself keeps only what serving needs: the thread, admission (how many prompt tokens
one prefill takes, and the KV budget), cancellation, and fault isolation. Stops, sampling and text are the core's,
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
    # log-probabilities: SamplingParams(logprobs=2) gives each chunk its tokens' TokenLogprobs;
    # prompts are scored (each token given those before it) in forward passes, between steps:
    scored = engine.score([prompt_ids], top=1)                # or: await engine.ascore(...)
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

import psutil
import torch
from pydantic import ByteSize, TypeAdapter, ValidationError

from qwenkit.errors import QwenkitError
from qwenkit.generation import (
    GREEDY_BELOW,
    BatchDecoder,
    GenerationConfig,
    RowSettings,
    RowStep,
    TokenLogprob,
    check_prompt,
    context_length,
    score_prompts,
)
from qwenkit.model import Qwen
from qwenkit.tokenizer import Tokenizer


@dataclass
class SamplingParams:
    """Per-request settings; None keeps the model's own generation setting.

    temperature 0 means greedy. `stop_token_ids` end generation (not shown) in addition to the
    model's end-of-text ids; `stop` strings end it too and are cut from the text. With `logprobs`
    (0 or more top alternatives) every chunk carries its tokens' TokenLogprobs; with
    `prompt_logprobs` the first chunk carries the prompt's (from the prefill's own forward pass)."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    logprobs: int | None = None
    prompt_logprobs: int | None = None


@dataclass
class Chunk:
    """A piece of a request's output; the last one carries `finish_reason` ("stop" or "length").
    `logprobs`: those of the tokens generated since the previous chunk (when asked for);
    `prompt_logprobs`: the prompt's, on the first chunk (when asked for; the first token's is None)."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class _Request:
    """Engine-side state of one request; only the engine thread sets `row`."""

    prompt: list[int]
    settings: RowSettings
    deliver: Callable[[Chunk | BaseException], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    row: int = -1
    logprobs: list[TokenLogprob] = field(default_factory=list)  # not delivered yet
    prompt_logprobs: list[TokenLogprob | None] | None = None  # not delivered yet

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class _Scoring:
    """A scoring request (Engine.score): prompts scored shortest first, a batch per engine loop."""

    prompts: list[list[int]]
    top: int
    deliver: Callable[[list[list[TokenLogprob | None]] | BaseException], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    results: dict[int, list[TokenLogprob | None]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.order = sorted(range(len(self.prompts)), key=lambda i: len(self.prompts[i]))

    def cancel(self) -> None:
        self.cancelled.set()


class GenerationFailed(QwenkitError):
    """A request ended by a failure inside the engine rather than by a mistake in the request."""


_CLOSED = QwenkitError("the engine was shut down")
DEFAULT_KV_FRACTION = 0.3  # of the memory available when the engine starts, unless the full need is less


def available_memory(device: torch.device) -> int:
    """Bytes free for new tensors now: the GPU's free memory, or the host's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


def parse_kv_memory(text: str) -> int | float:
    """A KV memory setting: a size with a unit ("2GiB", "512MB": pydantic's ByteSize reads it) in
    bytes, or a bare number in (0, 1], a fraction of the memory available."""
    try:
        fraction = float(text)
    except ValueError:
        fraction = None
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise QwenkitError(
                f"invalid KV memory {text!r}: a bare number is a fraction of the available memory in "
                "(0, 1]; give a size with a unit such as 2GiB or 512MB"
            )
        return fraction
    try:
        size = TypeAdapter(ByteSize).validate_python(text.strip())
    except ValidationError:
        raise QwenkitError(
            f"invalid KV memory {text!r}: use a size such as 2GiB or 512MB, or a fraction such as 0.3"
        ) from None
    if size < 1:
        raise QwenkitError(f"invalid KV memory {text!r}: the size must be at least 1 byte")
    return int(size)


def kv_memory_bytes(setting: str | int | float, device: torch.device) -> int:
    """Bytes of a KV memory setting (parse_kv_memory's forms; a float is a fraction of what the
    device has available now)."""
    value = parse_kv_memory(setting) if isinstance(setting, str) else setting
    if isinstance(value, float):
        if not 0 < value <= 1:
            raise QwenkitError(f"a KV memory fraction must lie in (0, 1], got {value}")
        return max(1, int(value * available_memory(device)))
    if value < 1:
        raise QwenkitError(f"the KV memory budget must be at least 1 byte, got {value}")
    return int(value)


class Engine:
    """Continuous-batching generation for one model on one device (see the module docstring)."""

    def __init__(
        self,
        model: Qwen,
        tokenizer: Tokenizer,
        max_batch: int = 16,
        max_seq_len: int | None = None,
        prefill_tokens: int = 8192,
        kv_memory_bytes: int | None = None,
    ) -> None:
        if max_batch < 1:
            raise QwenkitError("max_batch must be >= 1")
        if kv_memory_bytes is not None and kv_memory_bytes < 1:
            raise QwenkitError(f"the KV memory budget must be at least 1 byte, got {kv_memory_bytes}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_seq_len = min(max_seq_len or context_length(model), context_length(model))
        self.prefill_tokens = prefill_tokens  # padded prompt tokens prefilled in one forward pass
        self.defaults = model.generation_config or GenerationConfig()
        self.decoder = BatchDecoder(model, max_batch, self.max_seq_len, tokenizer, kv_budget=0)  # set below
        self.kv_full = self._kv_full_need()
        self.kv_choice = "as set"
        if kv_memory_bytes is None:
            available = available_memory(model.device)
            kv_memory_bytes = min(self.kv_full, int(DEFAULT_KV_FRACTION * available))
            self.kv_choice = (f"default: the full need or {DEFAULT_KV_FRACTION:.0%} of the "
                              f"{available / 2**30:.1f} GiB available, the smaller")  # fmt: skip
        self.kv_budget = self.decoder.kv_budget = kv_memory_bytes
        self.rows: list[_Request | None] = [None] * max_batch  # the request decoding in each row
        self.waiting: list[_Request] = []
        self.scoring: list[_Scoring] = []  # scoring requests, first come first scored
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
        if params.max_tokens is None and not self.decoder.fits_alone(len(prompt), max_tokens):
            max_tokens = self._max_tokens_alone(len(prompt), max_tokens) or max_tokens  # the default shrinks
        if max_tokens < 1:
            raise QwenkitError("max_tokens must be >= 1")
        if max_tokens > room:
            raise QwenkitError(
                f"the prompt ({len(prompt)} tokens) plus max_tokens ({max_tokens}) exceeds "
                f"this server's context window of {self.max_seq_len} tokens"
            )
        if not self.decoder.fits_alone(len(prompt), max_tokens):
            raise QwenkitError(self._too_big(len(prompt), max_tokens))
        if any(not s for s in params.stop):
            raise QwenkitError("stop strings must not be empty")
        if any(n is not None and n < 0 for n in (params.logprobs, params.prompt_logprobs)):
            raise QwenkitError("logprobs must be >= 0")
        config.max_new_tokens = max_tokens
        stop = [[int(i)] for i in params.stop_token_ids]
        return RowSettings.create(config, self.model.device, stop, params.stop, params.seed, params.logprobs,
                                  params.prompt_logprobs)  # fmt: skip

    def kv_report(self) -> dict:
        """The KV-cache budget and what it holds (for /health and the start-up line)."""
        per_token = self.decoder.kv_bytes(1, 1) - self.decoder.kv_bytes(1, 0)
        return {
            "budget_bytes": self.kv_budget,
            "bytes_per_token": per_token,
            "tokens": self.kv_budget // per_token,
            "full_need_bytes": self.kv_full,
            "allocated_bytes": self.decoder.cache.nbytes,
            "max_batch": self.max_batch,
            "rows_at_full_context": self._rows_at_full_context(),
        }

    def kv_summary(self) -> str:
        """One line saying how much KV memory the engine may use and what that holds."""
        r = self.kv_report()
        return (
            f"KV cache budget {r['budget_bytes'] / 2**30:.2f} GiB ({r['tokens']:,} tokens at "
            f"{r['bytes_per_token']:,} bytes per token; {self.kv_choice}; the full need of {self.max_batch} "
            f"rows at the {self.max_seq_len:,}-token context is {self.kv_full / 2**30:.2f} GiB): up to "
            f"{self.max_batch} rows, {r['rows_at_full_context']} of them at the full context"
        )

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

    def submit_scoring(self, prompts: Sequence[Sequence[int]], top: int, deliver) -> _Scoring:
        """Queue prompts to score (`score`); `deliver` gets the result or an exception, from the
        engine thread. The returned handle's `cancel()` drops what is not scored yet."""
        if self._closed:
            raise _CLOSED
        rows = [[int(i) for i in p] for p in prompts]
        if not rows:
            raise QwenkitError("there are no prompts to score")
        for prompt in rows:
            check_prompt(prompt, self.model.config.vocab_size, self.max_seq_len, owner="this server's")
            if self.kv_budget is not None and self.decoder.kv_bytes(1, len(prompt)) > self.kv_budget:
                raise QwenkitError(f"a prompt of {len(prompt)} tokens needs more KV cache than this "
                                   f"server's KV memory budget of {self.kv_budget / 2**20:.1f} MiB")  # fmt: skip
        if top < 0:
            raise QwenkitError("the number of top log-probabilities must be >= 0")
        job = _Scoring(rows, top, deliver)
        self.inbox.put(job)
        return job

    def score(self, prompts: Sequence[Sequence[int]], top: int = 0) -> list[list[TokenLogprob | None]]:
        """Each prompt token's log-probability given those before it (None for the first), with the
        `top` most likely tokens at each position (generation.score_prompts): forward passes over the
        prompts, in the engine thread between decoding steps, never token by token. Blocking."""
        outputs: queue.SimpleQueue = queue.SimpleQueue()
        job = self.submit_scoring(prompts, top, outputs.put)
        try:
            item = outputs.get()
        finally:
            job.cancel()
        if isinstance(item, BaseException):
            raise item
        return item

    async def ascore(self, prompts: Sequence[Sequence[int]], top: int = 0) -> list[list[TokenLogprob | None]]:
        """`score` for asyncio code; cancelling the caller drops the prompts not scored yet."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()

        def settle(item) -> None:
            if not future.done():
                if isinstance(item, BaseException):
                    future.set_exception(item)
                else:
                    future.set_result(item)

        def deliver(item) -> None:
            with contextlib.suppress(RuntimeError):  # the event loop is gone: nobody is listening
                loop.call_soon_threadsafe(settle, item)

        job = self.submit_scoring(prompts, top, deliver)
        try:
            return await future
        finally:
            job.cancel()

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
                idle = not self.waiting and self.active == 0 and not self.scoring
                if not self._take_inbox(block=idle):
                    break
                self._drop_cancelled()
                self._score()
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
        for request in [*self.waiting, *(r for r in self.rows if r is not None), *self.scoring]:
            request.deliver(_CLOSED)

    def _take_inbox(self, block: bool) -> bool:
        """Move submitted requests to `waiting`; False once close() was called."""
        try:
            item = self.inbox.get(block=block)
            while True:
                if item is None:
                    return False
                (self.scoring if isinstance(item, _Scoring) else self.waiting).append(item)
                item = self.inbox.get_nowait()
        except queue.Empty:
            return True

    def _score(self) -> None:
        """Score the next batch of the first scoring request: as many of its prompts (shortest
        first) as fit in `prefill_tokens` padded tokens, or one, and whose own KV cache fits in the
        budget beside the running rows' (else it waits for them). A failure ends that request alone."""
        self.scoring = [job for job in self.scoring if not job.cancelled.is_set()]
        if not self.scoring:
            return
        job = self.scoring[0]
        pending = job.order[len(job.results) :]
        cache = self.decoder.cache
        room = (
            None
            if self.kv_budget is None
            else self.kv_budget - self.decoder.kv_bytes(cache.batch_size, cache.max_length)
        )

        def fits(rows: int, longest: int) -> bool:
            return room is None or self.decoder.kv_bytes(rows, longest) <= room

        if not fits(1, len(job.prompts[pending[0]])):
            return
        batch = pending[:1]
        for i in pending[1:]:
            if len(job.prompts[i]) * (len(batch) + 1) > self.prefill_tokens or not fits(
                len(batch) + 1, len(job.prompts[i])
            ):
                break
            batch.append(i)
        try:
            prompts = [job.prompts[i] for i in batch]
            scored = score_prompts(self.model, prompts, job.top, self.tokenizer.vocab_size)
        except Exception as e:  # e.g. out of memory: this request fails, the engine goes on
            self.scoring.pop(0)
            job.deliver(_failure(e))
            return
        job.results.update(zip(batch, scored, strict=True))
        if len(job.results) == len(job.prompts):
            self.scoring.pop(0)
            job.deliver([job.results[i] for i in range(len(job.prompts))])

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
            joining = [*batch, self.waiting[0]]  # first come, first served: the rest wait behind it
            rows = free[: len(joining)]
            if not self.decoder.can_prefill(rows, [r.prompt for r in joining], [r.settings for r in joining]):
                break  # no room in the KV budget now: it waits until running rows end
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
                if step.logprob is not None:
                    request.logprobs.append(step.logprob)
                if step.prompt_logprobs is not None:
                    request.prompt_logprobs = step.prompt_logprobs
                if step.text or step.finish_reason is not None:
                    chunk = Chunk(step.text, step.finish_reason, len(request.prompt), step.generated,
                                  request.logprobs, request.prompt_logprobs)  # fmt: skip
                    request.logprobs, request.prompt_logprobs = [], None
                    request.deliver(chunk)
            except Exception as e:
                self._end(step.row)
                request.deliver(_failure(e))

    def _end(self, row: int) -> None:
        """Free a row (its request finished, failed or was cancelled)."""
        self.rows[row] = None
        self.decoder.release(row)

    def _kv_full_need(self) -> int:
        """KV bytes that never hold a request back: every row at the full context, plus the larger
        of a prefill's own cache (at most max(prefill_tokens, max_seq_len) padded tokens over at
        most max_batch rows) and one layer's keys while the cache is reshaped."""
        kv_bytes, layers = self.decoder.kv_bytes, self.model.config.num_hidden_layers
        full = kv_bytes(self.max_batch, self.max_seq_len)
        prefill = kv_bytes(1, max(self.prefill_tokens, self.max_seq_len)) + kv_bytes(self.max_batch, 0)
        return full + max(prefill, full // (2 * layers))

    def _rows_at_full_context(self) -> int:
        return min(self.max_batch, self.kv_budget // self.decoder.kv_bytes(1, self.max_seq_len))

    def _max_tokens_alone(self, prompt_length: int, limit: int) -> int:
        """The most new tokens (up to `limit`) a request with this prompt may ask for alone (0: none)."""
        low, high = 0, limit
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if self.decoder.fits_alone(prompt_length, mid) else (low, mid - 1)
        return low

    def _too_big(self, prompt_length: int, max_tokens: int) -> str:
        need = self.decoder.kv_bytes(1, prompt_length + max_tokens) + self.decoder.kv_bytes(1, prompt_length)
        most = self._max_tokens_alone(prompt_length, self.max_seq_len - prompt_length)
        advice = f"with this prompt, max_tokens can be at most {most}" if most else "shorten the prompt"
        return (
            f"the prompt ({prompt_length} tokens) plus max_tokens ({max_tokens}) needs {need / 2**20:.1f} MiB "
            f"of KV cache, more than this server's KV memory budget of {self.kv_budget / 2**20:.1f} MiB "
            f"(--kv-memory); {advice}"
        )


def _failure(error: Exception) -> GenerationFailed:
    reason = str(error) if isinstance(error, QwenkitError) else f"{type(error).__name__}: {error}"
    return GenerationFailed(f"generation failed: {reason}")


def _collect(chunks) -> Completion:
    text, last, logprobs, prompt_logprobs = "", None, [], None
    for chunk in chunks:
        text += chunk.text
        logprobs += chunk.logprobs
        prompt_logprobs = prompt_logprobs or chunk.prompt_logprobs
        last = chunk
    return Completion(text, last.finish_reason, last.prompt_tokens, last.completion_tokens, logprobs,
                      prompt_logprobs)  # fmt: skip

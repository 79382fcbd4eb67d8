"""ChatML conversations: the official context builder and the chat()/chat_stream() calls.

make_context reproduces the official Qwen code token for token: each message is tokenized as
`role` + "\\n" + `content` separately, and history is added newest first while it fits. Unlike
the original, content is never allowed to contain control tokens, whatever the tokenizer default.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from qwenkit.errors import QwenkitError
from qwenkit.generation import GenerationConfig, context_length, stream_generate
from qwenkit.tokenizer import Tokenizer

DEFAULT_SYSTEM = "You are a helpful assistant."
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
History = list[tuple[str, str]]


def make_context(
    tokenizer: Tokenizer,
    query: str,
    history: Sequence[tuple[str, str | None]] | None = None,
    system: str = "",
    max_window_size: int = 6144,
    chat_format: str = "chatml",
) -> tuple[str, list[int]]:
    """(raw_text, context_ids) of a ChatML prompt ending with `<|im_start|>assistant\\n`.

    History turns are added newest first while system + turns stay under `max_window_size` tokens
    (the current query is not counted), exactly as the official `make_context`.
    """
    if chat_format == "raw":
        return query, tokenizer.encode(query)
    if chat_format != "chatml":
        raise QwenkitError(f"unknown chat format {chat_format!r}; use 'chatml' or 'raw'")
    im_start, im_end = [tokenizer.im_start_id], [tokenizer.im_end_id]
    nl = tokenizer.encode("\n")

    def turn(role: str, content: str) -> tuple[str, list[int]]:
        ids = (
            tokenizer.encode(role, allowed_special=set())
            + nl
            + tokenizer.encode(content, allowed_special=set())
        )
        return f"{role}\n{content}", im_start + ids + im_end

    system_text, system_ids = turn("system", system)
    raw_text, context_ids = "", []
    for turn_query, turn_response in reversed(list(history or [])):
        query_text, query_ids = turn("user", turn_query)
        if turn_response is not None:
            response_text, response_ids = turn("assistant", turn_response)
            next_ids = nl + query_ids + nl + response_ids
            previous = f"\n{IM_START}{query_text}{IM_END}\n{IM_START}{response_text}{IM_END}"
        else:
            next_ids = nl + query_ids + nl
            previous = f"\n{IM_START}{query_text}{IM_END}\n"
        if len(system_ids) + len(next_ids) + len(context_ids) < max_window_size:
            context_ids = next_ids + context_ids
            raw_text = previous + raw_text
        else:
            break
    query_text, query_ids = turn("user", query)
    context_ids = (
        system_ids + context_ids + nl + query_ids + nl + im_start + tokenizer.encode("assistant") + nl
    )
    raw_text = (
        f"{IM_START}{system_text}{IM_END}"
        + raw_text
        + f"\n{IM_START}{query_text}{IM_END}\n{IM_START}assistant\n"
    )
    return raw_text, context_ids


def stop_words_ids(tokenizer: Tokenizer, chat_format: str) -> list[list[int]]:
    """Chat turns end at <|im_end|> (or a runaway <|im_start|>); raw text at <|endoftext|>."""
    if chat_format == "chatml":
        return [[tokenizer.im_end_id], [tokenizer.im_start_id]]
    return [[tokenizer.eod_id]]


def _check_history(history) -> History:
    if history is None:
        return []
    try:
        return [(str(q), str(r)) for q, r in history]
    except (TypeError, ValueError):
        raise QwenkitError("history must be a list of (query, response) pairs") from None


def chat_stream(
    model,
    tokenizer: Tokenizer,
    query: str,
    history: Sequence[tuple[str, str]] | None = None,
    system: str = DEFAULT_SYSTEM,
    **settings,
) -> Iterator[str]:
    """Yield the response so far after each new piece of text (the official chat_stream form)."""
    config: GenerationConfig = model.generation_config or GenerationConfig()
    window = settings.pop("max_window_size", None) or config.max_window_size
    window = min(window, context_length(model))  # drop old turns rather than overflow a short context
    _, context_ids = make_context(
        tokenizer, query, _check_history(history), system, window, config.chat_format
    )
    stop = list(settings.pop("stop", None) or []) + stop_words_ids(tokenizer, config.chat_format)
    response = ""
    for delta in stream_generate(model, tokenizer, context_ids, stop=stop, **settings):
        response += delta
        yield response


def chat(
    model,
    tokenizer: Tokenizer,
    query: str,
    history: Sequence[tuple[str, str]] | None = None,
    system: str = DEFAULT_SYSTEM,
    **settings,
) -> tuple[str, History]:
    """(response, history + [(query, response)]), as the official `model.chat` (response stripped)."""
    history = _check_history(history)
    response = ""
    for response in chat_stream(model, tokenizer, query, history, system, **settings):  # noqa: B007
        pass
    response = response.strip()
    return response, history + [(query, response)]

"""ChatML conversations: the official context builder and the chat()/chat_stream() calls.

make_context reproduces the official Qwen code token for token (rendered by qwenkit.chatml): each
message is tokenized as `role` + "\\n" + `content` separately, and history is added newest first
while it fits. Unlike the original, content is never allowed to contain control tokens, whatever
the tokenizer default.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from qwenkit.chatml import DEFAULT_SYSTEM, Rendered, render_turns
from qwenkit.errors import QwenkitError
from qwenkit.generation import GenerationConfig, context_length, stream_generate
from qwenkit.tokenizer import Tokenizer

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
    (the current query is not counted), exactly as the official `make_context`; a turn whose
    response is None leaves only its "\\n", as there.
    """
    if chat_format == "raw":
        return query, tokenizer.encode(query)
    if chat_format != "chatml":
        raise QwenkitError(f"unknown chat format {chat_format!r}; use 'chatml' or 'raw'")
    parts = [render_turns(tokenizer, [("system", [(system, False)])])]
    kept: list[Rendered] = []
    size = len(parts[0].input_ids)
    for turn_query, turn_response in reversed(list(history or [])):
        reply = None if turn_response is None else ("assistant", [(turn_response, True)])
        pair = render_turns(tokenizer, [("user", [(turn_query, False)]), reply], continued=True)
        size += len(pair.input_ids)
        if size >= max_window_size:
            break
        kept.append(pair)
    query_turn = [("user", [(query, False)]), ("assistant", [])]
    parts += [*reversed(kept), render_turns(tokenizer, query_turn, open=True, continued=True)]
    return "".join(p.text for p in parts), [i for p in parts for i in p.input_ids]


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

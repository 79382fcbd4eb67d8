"""ChatML conversations: the official context builder and the chat()/chat_stream() calls.

make_context reproduces the official Qwen code token for token (rendered by qwenkit.chatml): each
message is tokenized as `role` + "\\n" + `content` separately, and history is added newest first
while it fits. Unlike the original, content is never allowed to contain control tokens, whatever
the tokenizer default.

A checkpoint whose tokenizer has its own Jinja chat template (Qwen1.5/2/2.5) renders with it instead
(chat format "template", qwenkit.chat_template, the text and ids of transformers'
`apply_chat_template`); "auto" picks the template when there is one, else ChatML.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from qwenkit.chat_template import encode_chat
from qwenkit.chatml import DEFAULT_SYSTEM, Rendered, render_turns
from qwenkit.errors import QwenkitError
from qwenkit.generation import GenerationConfig, context_length, stream_generate
from qwenkit.tokenizer import Tokenizer

History = list[tuple[str, str]]
CHAT_FORMATS = ("auto", "chatml", "template", "raw")


def resolve_chat_format(tokenizer: Tokenizer, chat_format: str) -> str:
    """Chat format "auto" -> "template" when the tokenizer has a chat template, else "chatml"."""
    if chat_format not in CHAT_FORMATS:
        raise QwenkitError(f"unknown chat format {chat_format!r}; use one of {', '.join(CHAT_FORMATS)}")
    if chat_format == "auto":
        return "template" if getattr(tokenizer, "chat_template", None) else "chatml"
    if chat_format == "template" and not getattr(tokenizer, "chat_template", None):
        raise QwenkitError("chat format 'template': this checkpoint's tokenizer has no chat template")
    return chat_format


def _template_context(
    tokenizer: Tokenizer,
    query: str,
    history: Sequence[tuple[str, str | None]],
    system: str | None,
    window: int,
) -> tuple[str, list[int]]:
    """The chat template's prompt with the newest history turns for which it stays under `window`
    tokens (at least the query); no `system` (None or "") leaves the template's own default."""
    head = [{"role": "system", "content": system}] if system else []
    turns = [
        [{"role": "user", "content": q}] + ([{"role": "assistant", "content": r}] if r is not None else [])
        for q, r in history
    ]
    for first in range(len(turns) + 1):
        messages = [*head, *(m for turn in turns[first:] for m in turn), {"role": "user", "content": query}]
        ids = encode_chat(tokenizer, messages)
        if len(ids) < window or first == len(turns):
            return tokenizer.decode(ids), ids
    raise AssertionError("unreachable")


def make_context(
    tokenizer: Tokenizer,
    query: str,
    history: Sequence[tuple[str, str | None]] | None = None,
    system: str | None = "",
    max_window_size: int = 6144,
    chat_format: str = "chatml",
) -> tuple[str, list[int]]:
    """(raw_text, context_ids) of a ChatML prompt ending with `<|im_start|>assistant\\n`.

    History turns are added newest first while system + turns stay under `max_window_size` tokens
    (the current query is not counted), exactly as the official `make_context`; a turn whose
    response is None leaves only its "\\n", as there. With chat format "template" (or "auto" and
    a tokenizer with a chat template) the template renders the prompt, and the newest turns are
    kept while the whole prompt stays under `max_window_size`.
    """
    chat_format = resolve_chat_format(tokenizer, chat_format)
    if chat_format == "raw":
        return query, tokenizer.encode(query)
    if chat_format == "template":
        return _template_context(tokenizer, query, list(history or []), system, max_window_size)
    system = DEFAULT_SYSTEM if system is None else system
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
    """Chat turns end at <|im_end|> (or a runaway <|im_start|>), a template's turns also at the
    tokenizer's eos token and <|endoftext|>; raw text at <|endoftext|>."""
    chat_format = resolve_chat_format(tokenizer, chat_format)
    if chat_format == "chatml":
        return [[tokenizer.im_end_id], [tokenizer.im_start_id]]
    if chat_format == "template":
        names = (getattr(tokenizer, "eos_token", None), "<|im_end|>", "<|im_start|>", "<|endoftext|>")
        ids = {tokenizer.special_tokens.get(name) for name in names if name} - {None}
        return [[i] for i in sorted(ids)]
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
    system: str | None = DEFAULT_SYSTEM,
    **settings,
) -> Iterator[str]:
    """Yield the response so far after each new piece of text (the official chat_stream form).

    `chat_format` ("auto", "chatml", "template", "raw"; default: "auto" for a ChatML model, so its
    tokenizer's chat template wins when it has one) picks the prompt layout; `system` None is the
    layout's default system prompt (DEFAULT_SYSTEM in ChatML, the template's own otherwise).
    """
    config: GenerationConfig = model.generation_config or GenerationConfig()
    window = settings.pop("max_window_size", None) or config.max_window_size
    window = min(window, context_length(model))  # drop old turns rather than overflow a short context
    chat_format = settings.pop("chat_format", None)
    if chat_format is None:
        chat_format = "auto" if config.chat_format == "chatml" else config.chat_format
    chat_format = resolve_chat_format(tokenizer, chat_format)
    _, context_ids = make_context(tokenizer, query, _check_history(history), system, window, chat_format)
    stop = list(settings.pop("stop", None) or []) + stop_words_ids(tokenizer, chat_format)
    response = ""
    for delta in stream_generate(model, tokenizer, context_ids, stop=stop, **settings):
        response += delta
        yield response


def chat(
    model,
    tokenizer: Tokenizer,
    query: str,
    history: Sequence[tuple[str, str]] | None = None,
    system: str | None = DEFAULT_SYSTEM,
    **settings,
) -> tuple[str, History]:
    """(response, history + [(query, response)]), as the official `model.chat` (response stripped)."""
    history = _check_history(history)
    response = ""
    for response in chat_stream(model, tokenizer, query, history, system, **settings):  # noqa: B007
        pass
    response = response.strip()
    return response, history + [(query, response)]

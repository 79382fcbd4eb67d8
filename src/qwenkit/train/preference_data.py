"""Preference data for reward models, DPO and PPO: TRL's JSONL formats -> ChatML token ids.

Each line of a preference file is one comparison, in any of TRL's three layouts:

    standard        {"prompt": "question", "chosen": "good answer", "rejected": "bad answer"}
                    (an optional "system": "..." string)
    conversational  {"prompt": [messages], "chosen": [messages], "rejected": [messages]}
    implicit prompt {"chosen": [messages], "rejected": [messages]}: the messages both share from
                    the start are the prompt

Messages are OpenAI-style {"role", "content"}; a system message first is the sample's system
prompt, else DEFAULT_SYSTEM. Conversations are rendered by the one ChatML writer
(`qwenkit.chatml.render_messages`), content always as plain text, so a pair is

    prompt   = render(prompt messages, open assistant turn)      ... <|im_start|>assistant\\n
    chosen   = render(prompt + chosen messages)[len(prompt):]    answer ... <|im_end|>

and prompt + chosen is the whole conversation, ending with the last answer's <|im_end|> (no
trailing newline): the token a reward model reads its score at. A continuation may span several
turns (an implicit prompt whose conversations part before the last turn); its labels mark the
assistant tokens as SFT learns them and -100 elsewhere.

Too long pairs (prompt + the longer answer over `max_len`): the oldest exchanges of the prompt are
dropped, whole, keeping the system turn and the last user turn (`report.truncated`); a pair that
still does not fit is skipped and named in the report. Answers are never cut: a score read at a
cut answer's last token would judge a different answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwenkit.chatml import render_messages
from qwenkit.errors import QwenkitError
from qwenkit.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
MAX_REPORTED_ERRORS = 10


@dataclass
class PreferencePair:
    """One comparison as token ids: `prompt` ends with "<|im_start|>assistant\\n"; `chosen` and
    `rejected` continue it up to and including the final <|im_end|>; the labels hold each token's id
    where it is learned (assistant text and its <|im_end|>) and -100 elsewhere."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    chosen_labels: list[int]
    rejected_labels: list[int]
    line: int = 0  # the line of the file it was read from (1-based; 0: not from a file)


@dataclass
class PreferenceReport:
    """What `load_preference_pairs` kept, shortened and skipped; errors are "file:line: reason"."""

    ok: int = 0
    skipped: int = 0
    truncated: int = 0
    errors: list[str] = field(default_factory=list)


def check_messages(value: Any, key: str) -> list[dict[str, str]]:
    """A non-empty list of {"role", "content": str} messages, else ValueError naming `key`."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"'{key}' must be a non-empty list of messages")
    for message in value:
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ValueError(f"each message of '{key}' needs a role ({', '.join(ROLES)})")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"'{key}': message content must be a string")
    if any(m["role"] == "system" for m in value[1:]):
        raise ValueError(f"'{key}': a system message may only come first")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def split_record(record: Any) -> tuple[list[dict], list[dict], list[dict]]:
    """A JSON preference record in one of TRL's formats -> (prompt, chosen, rejected) messages."""
    if not isinstance(record, dict):
        raise ValueError("a preference row must be a JSON object")
    missing = [key for key in ("chosen", "rejected") if key not in record]
    if missing:
        raise ValueError(f"missing '{missing[0]}'")
    chosen, rejected, prompt = record["chosen"], record["rejected"], record.get("prompt")
    if isinstance(chosen, str) or isinstance(rejected, str):  # standard
        if not (isinstance(prompt, str) and isinstance(chosen, str) and isinstance(rejected, str)):
            raise ValueError("standard rows need 'prompt', 'chosen' and 'rejected' all strings")
        system = record.get("system")
        if system is not None and not isinstance(system, str):
            raise ValueError("'system' must be a string")
        head = [{"role": "system", "content": system}] if system is not None else []
        prompt_messages = [*head, {"role": "user", "content": prompt}]
        return (
            prompt_messages,
            [{"role": "assistant", "content": chosen}],
            [{"role": "assistant", "content": rejected}],
        )
    chosen, rejected = check_messages(chosen, "chosen"), check_messages(rejected, "rejected")
    if prompt is not None:  # conversational
        prompt = check_messages(prompt, "prompt")
        for key, answer in (("chosen", chosen), ("rejected", rejected)):
            if answer[0]["role"] != "assistant":
                raise ValueError(f"'{key}' must start with an assistant message")
        if prompt[-1]["role"] != "user":
            raise ValueError("'prompt' must end with a user message")
        return prompt, chosen, rejected
    # implicit prompt: the common prefix, backed up to where an assistant answer starts in both
    common = 0
    while common < min(len(chosen), len(rejected)) and chosen[common] == rejected[common]:
        common += 1
    if common == len(chosen) == len(rejected):
        raise ValueError("'chosen' and 'rejected' are the same conversation")
    start = common
    while start > 0 and not (
        start < len(chosen) and start < len(rejected)
        and chosen[start]["role"] == rejected[start]["role"] == "assistant"
    ):  # fmt: skip
        start -= 1
    if start == 0 or chosen[start - 1]["role"] != "user":
        raise ValueError("'chosen' and 'rejected' share no prompt that ends with a user message")
    return chosen[:start], chosen[start:], rejected[start:]


def tokenize_pair(
    tokenizer: Tokenizer, prompt: list[dict], chosen: list[dict], rejected: list[dict]
) -> PreferencePair:
    """Render prompt and both continuations (module docstring)."""
    for key, answer in (("chosen", chosen), ("rejected", rejected)):
        if answer[-1]["role"] != "assistant":
            raise QwenkitError(f"'{key}' must end with an assistant message")
    head = render_messages(tokenizer, prompt, prompt=True).input_ids
    parts = []
    for answer in (chosen, rejected):
        whole = render_messages(tokenizer, [*prompt, *answer])
        if whole.input_ids[: len(head)] != head:  # the renderer promises it; a broken promise is a bug
            raise AssertionError("a rendered conversation does not start with its rendered prompt")
        parts.append((whole.input_ids[len(head) :], whole.labels[len(head) :]))
    (chosen_ids, chosen_labels), (rejected_ids, rejected_labels) = parts
    if chosen_ids == rejected_ids:  # nothing to prefer: such a pair would only teach ties
        raise QwenkitError("'chosen' and 'rejected' are the same answer")
    return PreferencePair(head, chosen_ids, rejected_ids, chosen_labels, rejected_labels)


def pair_length(pair: PreferencePair) -> int:
    return len(pair.prompt) + max(len(pair.chosen), len(pair.rejected))


def fit_pair(
    tokenizer: Tokenizer, prompt: list[dict], chosen: list[dict], rejected: list[dict], max_len: int
) -> tuple[PreferencePair, bool]:
    """The pair within `max_len` tokens, dropping the prompt's oldest exchanges whole (the system
    turn and the last user turn stay) -> (pair, shortened); QwenkitError when it cannot fit.
    The pair only shortens as more exchanges go, so the fewest to drop are found by bisection (one
    render per dropped exchange took minutes on a prompt of a thousand exchanges)."""
    pair = tokenize_pair(tokenizer, prompt, chosen, rejected)
    if pair_length(pair) <= max_len:
        return pair, False
    system = prompt[:1] if prompt[0]["role"] == "system" else []
    turns = prompt[len(system) :]
    # where a shorter prompt may begin: each later user turn
    starts = [k for k, m in enumerate(turns) if m["role"] == "user" and k > 0]
    fitting, low, high = None, 0, len(starts) - 1
    while low <= high:
        middle = (low + high) // 2
        pair = tokenize_pair(tokenizer, [*system, *turns[starts[middle] :]], chosen, rejected)
        if pair_length(pair) <= max_len:
            fitting, high = pair, middle - 1
        else:
            low = middle + 1
    if fitting is None:  # `pair` is the shortest prompt tried: no history at all
        raise QwenkitError(f"{pair_length(pair)} tokens, over max_len={max_len} even without history")
    return fitting, True


def read_jsonl(path: str | Path) -> list[tuple[int, Any, str | None]]:
    """(line number, parsed JSON or None, error) for each non-blank line of a JSONL file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise QwenkitError(f"cannot read {path}: {e}") from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line), None))
        except json.JSONDecodeError as e:
            rows.append((number, None, f"bad JSON: {e.msg}"))
    return rows


def load_preference_pairs(
    path: str | Path, tokenizer: Tokenizer, max_len: int, strict: bool = False
) -> tuple[list[PreferencePair], PreferenceReport]:
    """Read and tokenize a preference JSONL file (module docstring). Malformed and unfittable rows
    are skipped and listed in the report as "file:line: reason", or raise QwenkitError with `strict`."""
    pairs: list[PreferencePair] = []
    report = PreferenceReport()
    for number, record, error in read_jsonl(path):
        if error is None:
            try:
                pair, shortened = fit_pair(tokenizer, *split_record(record), max_len)
            except (ValueError, QwenkitError) as e:
                error = str(e)
        if error is not None:
            message = f"{path}:{number}: {error}"
            if strict:
                raise QwenkitError(message)
            report.skipped += 1
            if len(report.errors) < MAX_REPORTED_ERRORS:
                report.errors.append(message)
            continue
        pair.line = number
        pairs.append(pair)
        report.ok += 1
        report.truncated += shortened
    return pairs, report


def read_prompts(path: str | Path, strict: bool = False, errors: list[str] | None = None) -> list[list[dict]]:
    """Prompts for PPO rollouts, one per JSONL line: {"prompt": str}, {"prompt": [messages]} or
    {"messages": [messages]}, each ending with a user turn -> message lists. Malformed lines are
    skipped (their "file:line: reason" appended to `errors` when given), or raise with `strict`."""
    prompts = []
    for number, record, error in read_jsonl(path):
        if error is None:
            try:
                prompts.append(prompt_messages(record))
                continue
            except ValueError as e:
                error = str(e)
        message = f"{path}:{number}: {error}"
        if strict:
            raise QwenkitError(message)
        if errors is not None:
            errors.append(message)
    return prompts


def prompt_messages(record: Any) -> list[dict]:
    """One prompt record (see `read_prompts`) -> its messages; ValueError when malformed."""
    if not isinstance(record, dict):
        raise ValueError("a prompt row must be a JSON object")
    if isinstance(record.get("prompt"), str):
        return [{"role": "user", "content": record["prompt"]}]
    if "prompt" in record:
        messages = check_messages(record["prompt"], "prompt")
    elif "messages" in record:
        messages = check_messages(record["messages"], "messages")
    else:
        raise ValueError("missing 'prompt' or 'messages'")
    if messages[-1]["role"] != "user":
        raise ValueError("a prompt must end with a user message")
    return messages

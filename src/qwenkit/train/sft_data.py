"""ChatML supervised fine-tuning data: conversations -> (input_ids, labels), and SFT file readers.

A sample is rendered by the one ChatML writer, `qwenkit.chatml.render_messages` (its docstring has
the layout and both masking modes, "qwenkit" and the original finetune.py's "official"): the
official chat format token for token, the same ids as `qwenkit.chat.make_context` and the
server's prompts, content always encoded as plain text. The default system prompt is used when
the first message is not a system message; a per-sample system message is honored (the official
script ignores it). Assistant `tool_calls` and `tool` results become one ReAct assistant turn
(`qwenkit.agent.react`), whose tool results are not learned, so agent data trains what the server
and the agent loop read.

Truncation to `max_len` never cuts inside an assistant turn: the sample ends after the last
complete assistant turn that fits (`truncated=True`); if none fits, labels are all -100.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from qwenkit.agent.react import (  # noqa: F401 - re-exported: SFT data's ReAct rendering lives there
    ReactStep,
    react_instruction,
    render_react_turn,
)
from qwenkit.chatml import IGNORE_INDEX, MASK_MODES, render_messages  # noqa: F401 - MASK_MODES re-exported
from qwenkit.errors import QwenkitError
from qwenkit.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "tool")
OFFICIAL_ROLES = ("system", "user", "assistant")
MAX_REPORTED_ERRORS = 10


@dataclass
class Conversation:
    """One tokenized training sample; labels[i] is the target for input_ids[i] (-100: no loss)."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


def tokenize_conversation(
    tokenizer: Tokenizer,
    messages: Sequence[dict[str, Any]],
    max_len: int | None = None,
    mask: str = "qwenkit",
    tools: Sequence[dict[str, Any]] | None = None,
) -> Conversation:
    """OpenAI-style `messages` -> a ChatML training sample (layout and masking: module docstring)."""
    sample = render_messages(tokenizer, messages, tools, mask)
    ids, labels = sample.input_ids, sample.labels
    if max_len is None or len(ids) <= max_len:
        return Conversation(ids, labels)
    keep = max((end for end in sample.ends if end <= max_len), default=0)
    if keep == 0:
        return Conversation(ids[:max_len], [IGNORE_INDEX] * min(len(ids), max_len), truncated=True)
    return Conversation(ids[:keep], labels[:keep], truncated=True)


# ---- readers -------------------------------------------------------------------------------


class SftRecord(NamedTuple):
    """One sample as read from a file: messages and tools, or the reason it is malformed."""

    index: int
    messages: list[dict[str, Any]] | None
    error: str | None
    tools: list[dict[str, Any]] | None = None


def _check_tool_calls(calls: Any) -> None:
    if not isinstance(calls, list):
        raise ValueError("'tool_calls' must be a list")
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ValueError("each tool call needs function.name (a string)")
        if not isinstance(function.get("arguments"), str):
            raise ValueError("tool call arguments must be a JSON string")


def _parse_record(record: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """A JSON sample (official `conversations` or OpenAI `messages`) -> (messages, tools)."""
    if not isinstance(record, dict):
        raise ValueError("sample is not a JSON object")
    if "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list):
            raise ValueError("'conversations' must be a list")
        messages = []
        for turn in turns:
            if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
                raise ValueError("each conversation turn needs 'from' and 'value'")
            if turn["from"] not in OFFICIAL_ROLES:
                raise ValueError(f"unknown role {turn['from']!r}")
            if not isinstance(turn["value"], str):
                raise ValueError("'value' must be a string")
            messages.append({"role": turn["from"], "content": turn["value"]})
        tools = None
    elif "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list):
            raise ValueError("'messages' must be a list")
        for message in messages:
            if not isinstance(message, dict) or "role" not in message:
                raise ValueError("each message needs a 'role'")
            if message["role"] not in ROLES:
                raise ValueError(f"unknown role {message['role']!r}")
            content = message.get("content")
            if message.get("tool_calls") is not None and message["role"] == "assistant":
                _check_tool_calls(message["tool_calls"])
                if content is not None and not isinstance(content, str):
                    raise ValueError("'content' must be a string")
            elif not isinstance(content, str):
                raise ValueError("'content' must be a string")
        tools = record.get("tools")
        if tools is not None and not (
            isinstance(tools, list) and all(isinstance(t, dict) and "function" in t for t in tools)
        ):
            raise ValueError("'tools' must be a list of {'type': 'function', 'function': {...}}")
    else:
        raise ValueError("missing 'conversations' or 'messages'")
    if not messages:
        raise ValueError("empty conversation")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant message")
    return messages, tools


def read_sft_file(path: str | Path) -> Iterator[SftRecord]:
    """Yield SftRecord(index, messages, error, tools) for each sample of an SFT file.

    A file whose first character is "[" is a JSON list (the official format, items with
    `conversations` of {"from", "value"}; OpenAI-style items are accepted too); anything else is
    JSONL with one {"messages": [...], "tools": [...]?} object per line (blank lines ignored).
    Malformed samples come with `error` set and `messages` None instead of raising.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise QwenkitError(f"cannot read SFT file {path}: {e}") from None
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise QwenkitError(f"{path} is not a valid JSON list: {e}") from None
        raws: Iterator[tuple[Any, str | None]] = ((r, None) for r in records)
    else:
        raws = (_json_line(line) for line in text.splitlines() if line.strip())
    for index, (record, error) in enumerate(raws):
        if error is not None:
            yield SftRecord(index, None, error)
            continue
        try:
            messages, tools = _parse_record(record)
        except ValueError as e:
            yield SftRecord(index, None, str(e))
        else:
            yield SftRecord(index, messages, None, tools)


def _json_line(line: str) -> tuple[Any, str | None]:
    try:
        return json.loads(line), None
    except json.JSONDecodeError as e:
        return None, f"bad JSON: {e}"


@dataclass
class SftReport:
    """What `load_sft_samples` kept and skipped."""

    ok: int = 0
    skipped: int = 0
    truncated: int = 0
    errors: list[str] = field(default_factory=list)


def load_sft_samples(
    path: str | Path,
    tokenizer: Tokenizer,
    max_len: int | None,
    mask: str = "qwenkit",
    strict: bool = False,
) -> tuple[list[Conversation], SftReport]:
    """Read and tokenize an SFT file; malformed samples and samples with nothing to learn are skipped
    (listed in the report), or raise QwenkitError naming the sample with `strict=True`."""
    samples: list[Conversation] = []
    report = SftReport()
    for record in read_sft_file(path):
        error = record.error
        if error is None:
            try:
                sample = tokenize_conversation(tokenizer, record.messages, max_len, mask, record.tools)
            except QwenkitError as e:
                error = str(e)
            else:
                if all(label == IGNORE_INDEX for label in sample.labels):
                    error = f"nothing to learn within max_len={max_len}"
        if error is not None:
            message = f"sample {record.index}: {error}"
            if strict:
                raise QwenkitError(f"{path}: {message}")
            report.skipped += 1
            if len(report.errors) < MAX_REPORTED_ERRORS:
                report.errors.append(message)
            continue
        samples.append(sample)
        report.ok += 1
        report.truncated += sample.truncated
    return samples, report

"""ChatML supervised fine-tuning data: conversations -> (input_ids, labels), and SFT file readers.

Layout (token for token the official chat format, as `qwenkit.chat.make_context`): each turn is
`<|im_start|>` + encode(role) + encode("\\n") + encode(content) + `<|im_end|>`, turns joined by
"\\n". Content is always encoded as plain text: "<|im_end|>" inside a message is never a control
token. The default system prompt is used when the first message is not a system message; a
per-sample system message is honored (the official script ignores it).

Masking (labels are -100 where no loss is taken), mode "qwenkit": only assistant content and
its `<|im_end|>` are learned; system and user turns, every `<|im_start|>assistant\\n` header and
the "\\n" joins are not.

Mode "official" reproduces the original finetune.py `preprocess`, where every turn (system
included) is followed by "\\n" and, with `role_ids` = tokenizer("<|im_start|>" + role):
- system/user turn: labels = [im_start] + [-100] * (len(turn) - 3) + [im_end, nl]
- assistant turn:   labels = [im_start] + [-100] * len(role_ids) + content + [im_end, nl]
so im_start of every turn, and im_end and the trailing "\\n" of system and user turns, are
learned too (the quirk). The official role string carries `<|im_start|>`, so
len(role_ids) = 2: the -100s cover the role token and the "\\n" after it, and input and labels
stay aligned. (Read with role = "user" and im_start prepended separately, the same formula
would be one token short per turn.) Official mode knows only system/user/assistant.

Tool calls (mode "qwenkit") use the official ReAct format, so agent data trains what the
server and agent read. Given `tools=[{"type": "function", "function": {"name", "description",
"parameters"}}]`, the user message before the last tool-using assistant turn becomes
`react_instruction(tools) + "\\n\\nQuestion: " + content`. With `tools` but no tool call, the last
user message still gets the instruction and the assistant's answer after it becomes the
zero-step turn `Thought: I now know the final answer\\nFinal Answer: {content}`, as the model
must answer when tools are offered but not needed. An assistant message with
`tool_calls`, the `tool` messages answering them (in order), any further tool-calling
assistant messages and the final assistant answer become ONE assistant turn
(`render_react_turn`):

    Thought: {content or "I need to call a tool."}\\nAction: {name}\\nAction Input: {arguments}\\nObservation:
     {tool result}\\nThought:                                     <- not learned (the caller writes it)
     {next thought}\\nAction: ...\\nObservation:                   <- further calls, same pattern
     {tool result}\\nThought:                                     <- not learned
     I now know the final answer\\nFinal Answer: {final content}<|im_end|>

Each piece is encoded separately, so a token never straddles learned and unlearned text.

Truncation to `max_len` never cuts inside an assistant turn: the sample ends after the last
complete assistant turn that fits (`truncated=True`); if none fits, labels are all -100.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from qwenkit.agent.react import REACT_INSTRUCTION, TOOL_DESC, react_instruction  # noqa: F401 - re-exported
from qwenkit.chat import DEFAULT_SYSTEM
from qwenkit.errors import QwenkitError
from qwenkit.tokenizer import Tokenizer

IGNORE_INDEX = -100
MASK_MODES = ("qwenkit", "official")
ROLES = ("system", "user", "assistant", "tool")
OFFICIAL_ROLES = ("system", "user", "assistant")
MAX_REPORTED_ERRORS = 10

DEFAULT_THOUGHT = "I need to call a tool."


@dataclass
class Conversation:
    """One tokenized training sample; labels[i] is the target for input_ids[i] (-100: no loss)."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


class ReactStep(NamedTuple):
    """One tool call inside a ReAct assistant turn."""

    thought: str
    name: str
    arguments: str
    observation: str


def render_react_turn(steps: Sequence[ReactStep], final_answer: str | None) -> list[tuple[str, bool]]:
    """The text of a ReAct assistant turn as (piece, learned) pairs; see the module docstring.

    An empty thought becomes "I need to call a tool.". The model writes the thoughts, actions and "Observation:"; the caller writes each
    " {result}\\nThought:". With `final_answer` None the turn ends after the last observation.
    """
    pieces: list[tuple[str, bool]] = []
    for i, step in enumerate(steps):
        prefix = " " if i else "Thought: "
        thought = step.thought or DEFAULT_THOUGHT
        action = f"{prefix}{thought}\nAction: {step.name}\nAction Input: {step.arguments}\nObservation:"
        pieces += [(action, True), (f" {step.observation}\nThought:", False)]
    if final_answer is not None:
        prefix = " " if steps else "Thought: "
        pieces.append((f"{prefix}I now know the final answer\nFinal Answer: {final_answer}", True))
    return pieces


def _content(message: dict[str, Any]) -> str:
    content = message.get("content")
    return "" if content is None else content


def _react_turns(
    messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None
) -> list[tuple[str, list[tuple[str, bool]]]]:
    """Messages (system already removed) -> [(role, [(text, learned), ...])], ReAct merged."""
    turns: list[tuple[str, list[tuple[str, bool]]]] = []
    last_tool_user = None  # index in `turns` of the user turn before the last tool-using turn
    i = 0
    while i < len(messages):
        message = messages[i]
        role = message["role"]
        if role == "user":
            turns.append(("user", [(_content(message), False)]))
            i += 1
        elif role == "assistant" and not message.get("tool_calls"):
            turns.append(("assistant", [(_content(message), True)]))
            i += 1
        elif role == "assistant":
            steps: list[ReactStep] = []
            final = None
            while i < len(messages) and messages[i]["role"] == "assistant":
                message = messages[i]
                calls = message.get("tool_calls") or []
                if not calls:
                    final = _content(message)
                    i += 1
                    break
                results = messages[i + 1 : i + 1 + len(calls)]
                if len(results) < len(calls) or any(m["role"] != "tool" for m in results):
                    raise QwenkitError(f"message {i}: each tool call needs a following 'tool' message")
                for k, (call, result) in enumerate(zip(calls, results, strict=True)):
                    thought = _content(message) if k == 0 else ""
                    function = call["function"]
                    steps.append(
                        ReactStep(thought, function["name"], function["arguments"], _content(result))
                    )
                i += 1 + len(calls)
            if final is None:
                raise QwenkitError("tool results must be followed by a final assistant message")
            if not tools:
                raise QwenkitError("a conversation with tool calls needs the `tools` list")
            if not turns or turns[-1][0] != "user":
                raise QwenkitError("a tool-using assistant turn must follow a user message")
            last_tool_user = len(turns) - 1
            turns.append(("assistant", render_react_turn(steps, final)))
        else:
            raise QwenkitError(f"message {i}: unexpected {role!r} message")
    if last_tool_user is None and tools:  # tools offered but not used: a direct ReAct "Final Answer:"
        last_tool_user = next(
            (
                k
                for k in range(len(turns) - 2, -1, -1)
                if turns[k][0] == "user" and turns[k + 1][0] == "assistant"
            ),
            None,
        )
        if last_tool_user is not None:
            answer = turns[last_tool_user + 1][1][0][0]
            turns[last_tool_user + 1] = ("assistant", render_react_turn([], answer))
    if last_tool_user is not None:
        question = turns[last_tool_user][1][0][0]
        turns[last_tool_user] = ("user", [(f"{react_instruction(tools)}\n\nQuestion: {question}", False)])
    return turns


def _qwenkit_layout(tokenizer: Tokenizer, system: str, turns) -> tuple[list[int], list[int], list[int]]:
    """(input_ids, labels, ends of assistant turns) in qwenkit masking."""
    nl = tokenizer.encode("\n")
    ids: list[int] = []
    labels: list[int] = []
    ends: list[int] = []
    for t, (role, pieces) in enumerate([("system", [(system, False)]), *turns]):
        header = ([] if t == 0 else nl) + [tokenizer.im_start_id] + tokenizer.encode(role) + nl
        ids += header
        labels += [IGNORE_INDEX] * len(header)
        for text, learned in pieces:
            piece = tokenizer.encode(text)
            ids += piece
            labels += piece if learned else [IGNORE_INDEX] * len(piece)
        ids.append(tokenizer.im_end_id)
        labels.append(tokenizer.im_end_id if role == "assistant" else IGNORE_INDEX)
        if role == "assistant":
            ends.append(len(ids))
    return ids, labels, ends


def _official_layout(
    tokenizer: Tokenizer, system: str, messages: Sequence[dict[str, Any]]
) -> tuple[list[int], list[int], list[int]]:
    """(input_ids, labels, ends of assistant turns) exactly as the official finetune.py."""
    im_start, im_end = tokenizer.im_start_id, tokenizer.im_end_id
    nl = tokenizer.encode("\n")
    system_ids = [im_start] + tokenizer.encode("system") + nl + tokenizer.encode(system) + [im_end] + nl
    ids = list(system_ids)
    labels = [im_start] + [IGNORE_INDEX] * (len(system_ids) - 3) + [im_end] + nl
    ends: list[int] = []
    for i, message in enumerate(messages):
        role = message["role"]
        if role not in OFFICIAL_ROLES or message.get("tool_calls"):
            raise QwenkitError(f"message {i}: mask='official' supports only user/assistant text turns")
        role_ids = [im_start] + tokenizer.encode(role)  # official: tokenizer("<|im_start|>" + role)
        turn = role_ids + nl + tokenizer.encode(_content(message)) + [im_end] + nl
        if role == "user":
            target = [im_start] + [IGNORE_INDEX] * (len(turn) - 3) + [im_end] + nl
        else:
            target = (
                [im_start] + [IGNORE_INDEX] * len(role_ids) + turn[len(role_ids) + 1 : -2] + [im_end] + nl
            )
        assert len(turn) == len(target), "official masking formula misaligned"
        ids += turn
        labels += target
        if role == "assistant":
            ends.append(len(ids))
    return ids, labels, ends


def tokenize_conversation(
    tokenizer: Tokenizer,
    messages: Sequence[dict[str, Any]],
    max_len: int | None = None,
    mask: str = "qwenkit",
    tools: Sequence[dict[str, Any]] | None = None,
) -> Conversation:
    """OpenAI-style `messages` -> a ChatML training sample (layout and masking: module docstring)."""
    if mask not in MASK_MODES:
        raise QwenkitError(f"unknown mask mode {mask!r}; use one of {', '.join(MASK_MODES)}")
    messages = list(messages)
    system = DEFAULT_SYSTEM
    if messages and messages[0].get("role") == "system":
        system, messages = _content(messages[0]), messages[1:]
    for i, message in enumerate(messages):
        if message.get("role") not in ROLES or message["role"] == "system":
            raise QwenkitError(f"message {i}: unexpected role {message.get('role')!r}")
    if mask == "official":
        ids, labels, ends = _official_layout(tokenizer, system, messages)
    else:
        ids, labels, ends = _qwenkit_layout(tokenizer, system, _react_turns(messages, tools))
    if max_len is None or len(ids) <= max_len:
        return Conversation(ids, labels)
    keep = max((end for end in ends if end <= max_len), default=0)
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

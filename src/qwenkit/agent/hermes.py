"""The Hermes tool-call format that Qwen2.5 checkpoints write (their chat template lists the tools
in the system turn and asks for replies like the one below), read here only:

    I will look it up.
    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A reply may hold several calls, text before, between and after them. `parse_tool_calls` reads a
whole reply; `HermesOutput` reads the same reply piece by piece as it streams (the interface of
qwenkit.serve.api.ReactOutput) and gives the same content and calls however the text is cut.

Decisions (docs/agents.md): whitespace before a call block, and at the end after one, separates
it and is not content (a reply without calls is its content, unchanged); a
block that is not a JSON object with a string "name" (and an object, or JSON-object string, as
"arguments") stays in the content as written, so nothing the model wrote is lost; a block the
model did not close before its turn ended is still read (vLLM's parser does the same); a call to
a tool that was not offered is returned like any other (as vLLM's parser and OpenAI's API return
what the model named): the caller decides, and the agent loop answers it with an error message.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Literal

from qwenkit.errors import QwenkitError

OPEN = "<tool_call>"
CLOSE = "</tool_call>"
ToolFormat = Literal["auto", "react", "hermes"]


def resolve_tool_format(tokenizer, tool_format: ToolFormat = "auto") -> Literal["react", "hermes"]:
    """How to talk tools with this checkpoint: "hermes" (its chat template, <tool_call> replies) when
    the template reads `tools`, else the original Qwen's "react"; "auto" picks, the others force."""
    from qwenkit.chat_template import supports_tools

    if tool_format not in ("auto", "react", "hermes"):
        raise QwenkitError(f"tool format must be auto, react or hermes, got {tool_format!r}")
    template_tools = supports_tools(getattr(tokenizer, "chat_template", None))
    if tool_format == "hermes" and not template_tools:
        raise QwenkitError("tool format hermes needs a checkpoint whose chat template reads tools")
    if tool_format == "auto":
        return "hermes" if template_tools else "react"
    return tool_format


@dataclass
class ToolCall:
    """One call the model wrote: an OpenAI-style id ("call_" + 24 hex digits), the function name,
    and its arguments as a JSON object string."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


def read_call(block: str) -> ToolCall | None:
    """The call in the text between <tool_call> and </tool_call>, or None when it is malformed."""
    try:
        value = json.loads(block)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    arguments = value.get("arguments", {})
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            parsed = json.loads(arguments)
        except ValueError:
            return None
        if not isinstance(parsed, dict):
            return None
        return ToolCall(value["name"], arguments)
    if not isinstance(arguments, dict):
        return None
    return ToolCall(value["name"], json.dumps(arguments, ensure_ascii=False))


def _prefix_tail(text: str, marker: str) -> int:
    """The length of the longest end of `text` that begins `marker` (text that may still become it)."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class HermesOutput:
    """Reads a Hermes reply piece by piece: `feed` returns the content to send now, `finish` the
    rest and every call. Calls complete as their </tool_call> arrives (`calls` grows then), so a
    stream can send each one as soon as it is known.

    Content is sent as it comes, except what may still turn out to be part of a call: a possible
    start of "<tool_call>" (only as long as it is a prefix of it) and whitespace that a call block
    may follow. `prefix` is reply text already written into the prompt (a forced call's opening).
    With `allow_calls` False nothing is parsed: the reply is all content (tool_choice "none")."""

    def __init__(self, prefix: str = "", allow_calls: bool = True):
        self.allow_calls = allow_calls
        self.calls: list[ToolCall] = []
        self.pending = ""  # text not decided yet: held whitespace, a possible "<tool_call>" start
        self.block: str | None = None  # inside a call: the text after <tool_call>
        self.held_space = ""  # whitespace sent only if no call block follows it
        self.after_call = False  # only whitespace since the last call: dropped at the end
        if prefix:
            self.feed(prefix)

    def feed(self, piece: str) -> str:
        if not self.allow_calls:
            return piece
        text, out = self.pending + piece, []
        self.pending = ""
        while text:
            if self.block is not None:
                end = text.find(CLOSE)
                if end < 0:
                    keep = _prefix_tail(text, CLOSE)
                    self.block += text[: len(text) - keep]
                    self.pending = text[len(text) - keep :]
                    break
                out.append(self._close(self.block + text[:end], closed=True))
                text = text[end + len(CLOSE) :]
                continue
            start = text.find(OPEN)
            if start >= 0:
                out.append(self._content(text[:start]))
                self.block, text = "", text[start + len(OPEN) :]
                continue
            keep = _prefix_tail(text, OPEN)
            out.append(self._content(text[: len(text) - keep]))
            self.pending = text[len(text) - keep :]
            break
        return "".join(out)

    def _content(self, text: str) -> str:
        """Content up to a call block or up to what is held back; trailing whitespace waits for
        what follows it (dropped before a call, sent before anything else)."""
        text = self.held_space + text
        body = text.rstrip()
        self.held_space = text[len(body) :]
        self.after_call = self.after_call and not body
        return body

    def _close(self, block: str, closed: bool) -> str:
        """A finished block: a call (its surrounding whitespace dropped) or, malformed, content."""
        call = read_call(block)
        self.block = None
        if call is None:
            raw = self.held_space + OPEN + block + (CLOSE if closed else "")
            self.held_space, self.after_call = "", False
            return raw
        self.calls.append(call)
        self.held_space, self.after_call = "", True
        return ""

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(content still to send, all the calls)."""
        if not self.allow_calls:
            return "", []
        if self.block is not None:
            rest = self._close(self.block + self.pending, closed=False)
        else:
            rest = self.held_space + self.pending
        if self.after_call and not rest.strip():
            rest = ""
        self.pending = self.held_space = ""
        return rest, self.calls


def parse_tool_calls(text: str, prefix: str = "") -> tuple[str, list[ToolCall]]:
    """(content, calls) of a whole reply: what HermesOutput gives when fed it at once."""
    reader = HermesOutput(prefix)
    content = reader.feed(text)
    rest, calls = reader.finish()
    return content + rest, calls

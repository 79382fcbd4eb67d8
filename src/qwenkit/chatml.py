"""ChatML, written once: the default system prompt, the renderer from turns or OpenAI-style messages
to token ids (with the labels SFT learns from), and the chat template other libraries read.

A conversation is a system turn and then user and assistant turns (QWEN_REFERENCE "Chat format"):

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{query}<|im_end|>\\n
    <|im_start|>assistant\\n{reply}<|im_end|>

Token for token as the official code writes it, each turn is `<|im_start|>` + encode(role) +
encode("\\n") + encode(each piece of content) + `<|im_end|>`, and turns are joined by encode("\\n").
Every text is encoded on its own (so a token never straddles role and content, or learned and
unlearned text) and as plain text: "<|im_end|>" inside a message is never a control token.
A prompt ends with an open assistant turn (no `<|im_end|>`), which the model continues.

Labels (-100 where no loss is taken), mask "qwenkit": only assistant content (less the tool results
the caller writes) and the assistant's `<|im_end|>` are learned; system and user turns, every
`<|im_start|>assistant\\n` header and the "\\n" joins are not. Mask "official" reproduces the
original finetune.py `preprocess`, where every turn, the last included, ends with "\\n" and, with
`role_ids` = tokenizer("<|im_start|>" + role):
- system/user turn: labels = [im_start] + [-100] * (len(turn) - 3) + [im_end, nl]
- assistant turn:   labels = [im_start] + [-100] * len(role_ids) + content + [im_end, nl]
so every `<|im_start|>`, `<|im_end|>` and trailing "\\n" is learned too (the quirk). The official
role string carries `<|im_start|>`, so len(role_ids) = 2: the -100s cover the role token and the
"\\n" after it, and input and labels stay aligned.

Tool calls are rendered in the official ReAct format by qwenkit.agent.react.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qwenkit.agent.react import Turn, react_question, react_turns, render_react_turn
from qwenkit.errors import QwenkitError
from qwenkit.tokenizer import IM_END, IM_START

if TYPE_CHECKING:
    from qwenkit.tokenizer import Tokenizer

DEFAULT_SYSTEM = "You are a helpful assistant."
IGNORE_INDEX = -100
MASK_MODES = ("qwenkit", "official")

# The same layout as a Jinja chat template (tokenizer_config.json), for transformers and vLLM; a
# conversation that does not open with a system message gets the default one.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '" + IM_START + "system\\n" + DEFAULT_SYSTEM + IM_END + "\\n' }}"
    "{%- endif %}"
    "{{- '" + IM_START + "' + message['role'] + '\\n' + message['content'] + '" + IM_END + "\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '" + IM_START + "assistant\\n' }}{%- endif %}"
)


@dataclass
class Rendered:
    """A rendered conversation: its text, token ids, labels, and where each assistant turn ends in
    the ids (a sample may be cut there without cutting a turn)."""

    text: str = ""
    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)

    def add(self, text: str, ids: list[int], learned: bool) -> None:
        self.text += text
        self.input_ids += ids
        self.labels += ids if learned else [IGNORE_INDEX] * len(ids)


def render_turns(
    tokenizer: Tokenizer,
    turns: Sequence[Turn | None],
    mask: str = "qwenkit",
    open: bool = False,
    continued: bool = False,
) -> Rendered:
    """ChatML of `turns`, each (role, [(text, learned), ...]) (module docstring).

    `open`: the last turn has no `<|im_end|>` (a prompt the model continues). `continued`: the turns
    follow others already rendered, so the first one is preceded by "\\n" too. A None turn is the
    official make_context's missing reply: only the "\\n" that would precede it.
    """
    official = mask == "official"
    nl = tokenizer.encode("\n")
    out = Rendered()
    for t, turn in enumerate(turns):
        if t or continued:
            out.add("\n", nl, official)
        if turn is None:
            continue
        role, pieces = turn
        out.add(IM_START, [tokenizer.im_start_id], official)
        out.add(f"{role}\n", tokenizer.encode(role) + nl, False)
        for text, learned in pieces:
            out.add(text, tokenizer.encode(text), learned)
        if open and t == len(turns) - 1:
            return out
        out.add(IM_END, [tokenizer.im_end_id], official or role == "assistant")
        if role == "assistant":  # in official mode the turn's "\n" belongs to it
            out.ends.append(len(out.input_ids) + (len(nl) if official else 0))
    if official:
        out.add("\n", nl, True)
    return out


def render_messages(
    tokenizer: Tokenizer,
    messages: Sequence[dict[str, Any]],
    tools: Sequence[dict[str, Any]] | None = None,
    mask: str = "qwenkit",
    prompt: bool = False,
) -> Rendered:
    """OpenAI-style `messages` (an optional system message first, else DEFAULT_SYSTEM; user;
    assistant, with or without `tool_calls`; tool) as SFT learns them.

    With `tools` (mask "qwenkit"), tool calls become ReAct turns (qwenkit.agent.react.react_turns),
    the user message before the last tool-using turn becomes react_question(tools, content), and
    when no tool is called, the last answered user message gets it and its answer becomes the
    zero-step turn "Thought: I now know the final answer\\nFinal Answer: {content}", as the model must
    answer when tools are offered but not needed. Mask "official" knows only user/assistant text.

    `prompt`: the messages stop where the model answers; the result ends with the open assistant
    turn, the very ids the conversation with any answer (not a tool call) starts with.
    """
    if mask not in MASK_MODES:
        raise QwenkitError(f"unknown mask mode {mask!r}; use one of {', '.join(MASK_MODES)}")
    messages = list(messages)
    system, first = DEFAULT_SYSTEM, 0
    if messages and messages[0].get("role") == "system":
        system, messages, first = messages[0].get("content") or "", messages[1:], 1
    if mask == "official":
        for i, message in enumerate(messages):
            if message.get("role") not in ("user", "assistant") or message.get("tool_calls"):
                raise QwenkitError(
                    f"messages[{i + first}]: mask='official' supports only user/assistant text turns"
                )
        tools = None
    chat = react_turns(messages, allow_open=prompt, first_index=first)
    turns = chat.turns
    if chat.calls and not tools:
        raise QwenkitError("a conversation with tool calls needs the `tools` list")
    if any(k == 0 or turns[k - 1][0] != "user" for k in chat.calls):
        raise QwenkitError("a tool-using assistant turn must follow a user message")
    if prompt and not chat.open:
        turns.append(("assistant", []))
    if tools:
        ask = chat.calls[-1] - 1 if chat.calls else None
        if ask is None:  # tools offered but not used: a direct ReAct "Final Answer:"
            answered = [
                k for k in range(len(turns) - 1) if turns[k][0] == "user" and turns[k + 1][0] == "assistant"
            ]
            ask = answered[-1] if answered else None
            if ask is not None and turns[ask + 1][1]:
                turns[ask + 1] = ("assistant", render_react_turn([], turns[ask + 1][1][0][0]))
        if ask is not None:
            turns[ask] = ("user", [(react_question(tools, turns[ask][1][0][0]), False)])
    return render_turns(tokenizer, [("system", [(system, False)]), *turns], mask, open=prompt)

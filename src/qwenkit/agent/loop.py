"""The ReAct agent loop over any text generator, and the tool registry it draws on.

`run_agent(question, complete, tools)` builds the official ReAct prompt (react_instruction(tools) +
"\\n\\nQuestion: " + question as the user turn), lets the model write until it reaches
"Observation:", runs the tool it named, appends " {result}\\nThought:" to the same assistant turn
and lets it continue, until a Final Answer or the step limit. It yields events as it goes, so a
terminal, a web page or an SSE stream can show every step.

The generator is injected: `complete(messages, stop) -> Iterator[str]` yields text deltas of the
assistant turn that the last message (role "assistant", possibly empty) has begun, and stops
before any of the `stop` strings. `chatml_complete` makes that callable from any generator of
prompt ids: `local_complete(model, tokenizer)` over a qwenkit model, the server over its engine.

Checkpoints with a chat template that reads tools (Qwen2.5) use the Hermes format instead
(`tool_format="hermes"`, qwenkit.agent.hermes): the tools go to the template, each reply is a new
assistant message whose <tool_call> blocks are run (several per reply), each result comes back as
a tool message, until a reply calls nothing. Its generator is `template_complete` (local_complete
with `hermes=True`): `complete(messages, stop, tools=specs)` renders with the checkpoint's template.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from qwenkit.agent.hermes import HermesOutput
from qwenkit.agent.interpreter import PythonTool, ToolOutput
from qwenkit.agent.react import (
    FinalAnswer,
    Tool,
    ToolCall,
    calculator,
    observation_text,
    parse_reply,
    react_question,
    tool,
)
from qwenkit.chatml import DEFAULT_SYSTEM
from qwenkit.errors import QwenkitError

Message = dict[str, str]
Complete = Callable[[list[Message], list[str]], Iterator[str]]
BUILTIN_TOOLS = ("calculator", "python")
OBSERVATION = "Observation:"
TOOL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]{0,63}")


# --- events ------------------------------------------------------------------------------------------


@dataclass
class TextDelta:
    """A piece of the model's text (Thought / Action / Action Input / Final Answer lines)."""

    text: str
    type: Literal["text"] = "text"


@dataclass
class ToolCalled:
    """The model asked for a tool: its name and the raw Action Input."""

    name: str
    arguments: str
    type: Literal["tool_call"] = "tool_call"


@dataclass
class ToolResult:
    """The tool's Observation text (what the model reads) and any PNG images it made."""

    name: str
    text: str
    images: list[bytes] = field(default_factory=list)
    type: Literal["tool_result"] = "tool_result"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: images as base64 PNG."""
        return {"type": self.type, "name": self.name, "text": self.text,
                "images": [base64.b64encode(png).decode() for png in self.images]}  # fmt: skip


@dataclass
class Final:
    """The end of a run. reason: "final_answer" (the model wrote one), "plain_reply" (it answered
    without the ReAct format; the reply is the answer) or "max_steps" (answer is None)."""

    answer: str | None
    reason: Literal["final_answer", "plain_reply", "max_steps"]
    transcript: str  # the whole assistant turn, observations included
    type: Literal["final"] = "final"

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "answer": self.answer,
            "reason": self.reason,
            "transcript": self.transcript,
        }


AgentEvent = TextDelta | ToolCalled | ToolResult | Final


def event_dict(event: AgentEvent) -> dict[str, Any]:
    """Any event as a JSON-ready dict with a "type" key."""
    if isinstance(event, ToolResult | Final):
        return event.to_dict()
    return dict(vars(event))


# --- tools -------------------------------------------------------------------------------------------


def tool_from_spec(spec: dict[str, Any], function: Callable[..., Any]) -> Tool:
    """A Tool from an OpenAI function spec ({"name", "description", "parameters"}, optionally wrapped
    in {"type": "function", "function": ...}) and the Python function that implements it."""
    if not isinstance(spec, dict):
        raise QwenkitError("a tool spec must be a JSON object")
    body = spec.get("function", spec)
    name = body.get("name") if isinstance(body, dict) else None
    if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
        raise QwenkitError(f"a tool spec needs a name of letters, digits, _ or - (got {name!r:.40})")
    parameters = body.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(parameters, dict) or not isinstance(parameters.get("properties", {}), dict):
        raise QwenkitError(f"tool {name}: parameters must be a JSON schema object with 'properties'")
    description = body.get("description", "")
    if not isinstance(description, str):
        raise QwenkitError(f"tool {name}: description must be a string")
    if not callable(function):
        raise QwenkitError(f"tool {name}: the implementation must be callable")
    return Tool(name, description, parameters, function)


class ToolRegistry:
    """Tools by name. Add Tools, typed Python functions (react.tool) or spec + function pairs; built-ins
    come by name. Closing the registry ends the code interpreter sessions it started."""

    def __init__(self, tools: Iterable[Tool | Callable[..., Any]] = ()) -> None:
        self.tools: dict[str, Tool] = {}
        for item in tools:
            self.add(item)

    @classmethod
    def from_names(cls, names: Iterable[str], **interpreter_options) -> ToolRegistry:
        """The built-in tools named (calculator, python); an unknown name is a QwenkitError."""
        registry = cls()
        for name in names:
            if name == "calculator":
                registry.add(calculator)
            elif name == "python":
                registry.add(PythonTool(**interpreter_options))
            else:
                raise QwenkitError(f"unknown tool {name!r}; built-in tools: {', '.join(BUILTIN_TOOLS)}")
        return registry

    def add(self, item: Tool | Callable[..., Any]) -> Tool:
        """Register a Tool, or a typed Python function (its name, docstring and hints make the spec)."""
        new = item if isinstance(item, Tool) else tool(item)
        if new.name in self.tools:
            raise QwenkitError(f"two tools are named {new.name!r}")
        self.tools[new.name] = new
        return new

    def add_spec(self, spec: dict[str, Any], function: Callable[..., Any]) -> Tool:
        """Register a tool described by an OpenAI function spec and implemented by `function`."""
        return self.add(tool_from_spec(spec, function))

    def specs(self) -> list[dict[str, Any]]:
        return [t.spec() for t in self.tools.values()]

    def run(self, name: str, arguments: str) -> ToolOutput:
        """Run a tool on the model's Action Input. An unknown name, and any failure of the tool itself,
        is reported to the model as text: a tool never ends the agent's loop."""
        found = self.tools.get(name)
        if found is None:
            return ToolOutput(f"Error: there is no tool named {name!r}; use one of {', '.join(self.tools)}")
        try:
            if isinstance(found, PythonTool):
                return found.run(arguments)
            return ToolOutput(found.call(arguments))
        except Exception as e:  # noqa: BLE001 - whatever a tool raises is an Observation for the model
            return ToolOutput(f"Error: the tool {name!r} failed: {type(e).__name__}: {e}")

    def __contains__(self, name: str) -> bool:
        return name in self.tools

    def __getitem__(self, name: str) -> Tool:
        return self.tools[name]

    def __iter__(self) -> Iterator[Tool]:
        return iter(self.tools.values())

    def __len__(self) -> int:
        return len(self.tools)

    def close(self) -> None:
        for t in self.tools.values():
            if isinstance(t, PythonTool):
                t.close()

    def __enter__(self) -> ToolRegistry:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- the loop ----------------------------------------------------------------------------------------


def react_messages(
    question: str, tools: Sequence[Tool], system: str = DEFAULT_SYSTEM, history: Sequence[Message] = ()
) -> list[Message]:
    """System, earlier turns, and the user turn of the official ReAct prompt (instruction + question)."""
    content = react_question([t.spec() for t in tools], question)
    return [{"role": "system", "content": system}, *history, {"role": "user", "content": content}]


def run_agent(
    question: str,
    complete: Complete,
    tools: ToolRegistry | Sequence[Tool],
    max_steps: int = 8,
    system: str | None = None,
    history: Sequence[Message] = (),
    tool_format: Literal["react", "hermes"] = "react",
) -> Iterator[AgentEvent]:
    """Answer `question` with ReAct (or the Hermes format, module docstring): yield text deltas,
    tool calls and results, and one Final event.

    At most `max_steps` tool calls run; if the model still wants more, the run ends with
    Final(reason="max_steps"). Tool errors go back to the model as Observations; errors of the
    generator (e.g. a prompt longer than the context) propagate. `system` None: DEFAULT_SYSTEM for
    ReAct, the template's own default for Hermes."""
    registry = tools if isinstance(tools, ToolRegistry) else ToolRegistry(tools)
    if not registry.tools:
        raise QwenkitError("the agent needs at least one tool")
    if max_steps < 1:
        raise QwenkitError("max_steps must be at least 1")
    if tool_format == "hermes":
        yield from _run_hermes(question, complete, registry, max_steps, system, history)
        return
    if tool_format != "react":
        raise QwenkitError(f"tool_format must be react or hermes, got {tool_format!r}")
    messages = react_messages(question, list(registry), DEFAULT_SYSTEM if system is None else system, history)
    transcript = ""
    for step in range(max_steps + 1):
        reply = ""
        for delta in complete([*messages, {"role": "assistant", "content": transcript}], [OBSERVATION]):
            reply += delta
            yield TextDelta(delta)
        parsed = parse_reply(reply)
        if isinstance(parsed, FinalAnswer):
            yield Final(parsed.answer, "final_answer", transcript + reply)
            return
        if not isinstance(parsed, ToolCall):  # no ReAct format: the reply itself answers
            yield Final(reply.strip(), "plain_reply", transcript + reply)
            return
        if step == max_steps:
            break
        yield ToolCalled(parsed.name, parsed.arguments)
        output = registry.run(parsed.name, parsed.arguments)
        yield ToolResult(parsed.name, output.text, output.images)
        transcript += parsed.text + observation_text(output.text)
    yield Final(None, "max_steps", transcript)


def _run_hermes(
    question: str, complete, registry: ToolRegistry, max_steps: int, system: str | None, history
) -> Iterator[AgentEvent]:
    """The Hermes loop: each reply is an assistant message; its calls run and answer as tool messages.
    The transcript is the replies as written, each result after its reply as a <tool_response>."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system is not None else []
    messages += [*history, {"role": "user", "content": question}]
    specs, transcript, used = registry.specs(), "", 0
    while True:
        reader, reply, content = HermesOutput(), "", ""
        for delta in complete(messages, [], tools=specs):
            reply += delta
            if text := reader.feed(delta):
                content += text
                yield TextDelta(text)
        rest, calls = reader.finish()
        if rest:
            content += rest
            yield TextDelta(rest)
        transcript += reply
        if not calls:
            yield Final(content.strip(), "final_answer", transcript)
            return
        if used + len(calls) > max_steps:
            yield Final(None, "max_steps", transcript)
            return
        used += len(calls)
        messages.append({"role": "assistant", "content": content or None, "tool_calls": [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls
        ]})  # fmt: skip
        for call in calls:
            yield ToolCalled(call.name, call.arguments)
            output = registry.run(call.name, call.arguments)
            yield ToolResult(call.name, output.text, output.images)
            messages.append(
                {"role": "tool", "tool_call_id": call.id, "name": call.name, "content": output.text}
            )
            transcript += f"\n<tool_response>\n{output.text}\n</tool_response>\n"


# --- the local model as a generator ------------------------------------------------------------------


def split_messages(messages: Sequence[Message]) -> tuple[str, list[tuple[str, str]], str, str]:
    """(system, (user, assistant) history pairs, query, assistant prefix) of an OpenAI-style message
    list that ends with a user message, optionally followed by a begun assistant message."""
    items = list(messages)
    system = DEFAULT_SYSTEM
    if items and items[0].get("role") == "system":
        system = items.pop(0).get("content", "")
    prefix = items.pop().get("content", "") if items and items[-1].get("role") == "assistant" else ""
    if not items or items[-1].get("role") != "user":
        raise QwenkitError("the messages must end with a user message (and optionally a begun assistant one)")
    query = items.pop().get("content", "")
    roles = [m.get("role") for m in items]
    if roles != ["user", "assistant"] * (len(items) // 2):
        raise QwenkitError("earlier messages must alternate user, assistant")
    pairs = [(items[i]["content"], items[i + 1]["content"]) for i in range(0, len(items), 2)]
    return system, pairs, query, prefix


TextStream = Callable[[list[int], list[str], list[int]], Iterator[str]]


def chatml_complete(tokenizer, window: int, stream: TextStream) -> Complete:
    """`complete` over a text generator of prompt ids, `stream(ids, stop_strings, stop_token_ids)`
    (the local model's or the server engine's): the ChatML prompt as make_context builds it, history
    kept within `window` tokens, with the begun assistant turn appended as plain text (so tool
    output can never close the turn); the turn ends at <|im_end|> or <|im_start|>."""
    from qwenkit.chat import make_context, stop_words_ids

    end_of_turn = [ids[0] for ids in stop_words_ids(tokenizer, "chatml")]

    def complete(messages: list[Message], stop: list[str]) -> Iterator[str]:
        system, pairs, query, prefix = split_messages(messages)
        _, ids = make_context(tokenizer, query, pairs, system, window)
        yield from stream(ids + tokenizer.encode(prefix), list(stop), end_of_turn)

    return complete


def template_complete(tokenizer, stream: TextStream):
    """`complete(messages, stop, tools=None)` over a text generator of prompt ids, for the Hermes
    loop: the checkpoint's chat template renders the messages and tools (qwenkit.chat_template,
    injection-safe ids), and the turn ends at <|im_end|>, <|endoftext|> or the tokenizer's eos."""
    from qwenkit.chat_template import encode_chat

    names = ("<|im_end|>", "<|im_start|>", "<|endoftext|>", getattr(tokenizer, "eos_token", None))
    end_of_turn = sorted({tokenizer.special_tokens[n] for n in names if n in tokenizer.special_tokens})

    def complete(messages: list[Message], stop: list[str], tools: list[dict] | None = None) -> Iterator[str]:
        yield from stream(encode_chat(tokenizer, messages, tools=tools or None), list(stop), end_of_turn)

    return complete


def local_complete(model, tokenizer, seed: int | None = None, hermes: bool = False, **settings) -> Complete:
    """`complete` for a qwenkit model, decoded in the caller's thread (`stream_generate`); with
    `hermes`, rendered by the checkpoint's chat template (template_complete)."""
    from qwenkit.generation import GenerationConfig, context_length, stream_generate

    config = model.generation_config or GenerationConfig()
    window = min(settings.pop("max_window_size", None) or config.max_window_size, context_length(model))

    def stream(ids: list[int], stop_strings: list[str], stop_token_ids: list[int]) -> Iterator[str]:
        return stream_generate(model, tokenizer, ids, stop_strings, stop_token_ids, seed=seed, **settings)

    return template_complete(tokenizer, stream) if hermes else chatml_complete(tokenizer, window, stream)

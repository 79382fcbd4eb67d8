"""The official Qwen ReAct format (QWEN_REFERENCE "Tools and agents"), written and read here only:
the instruction listing the tools, OpenAI-style tool calls and results rendered as ReAct text, the
parser for the model's reply, typed Python functions as tools, and a calculator without `eval`.

A tool-using assistant turn, as the model learns it (qwenkit.chatml renders it, SFT learns it)
and the agent loop and the server continue it:

    Thought: {thought or DEFAULT_THOUGHT}\nAction: {name}\nAction Input: {arguments}\nObservation:
     {tool result}\nThought:                         <- written by the caller, not learned
     {next thought}\nAction: ...\nObservation:       <- further calls, same pattern
     {tool result}\nThought:
     I now know the final answer\nFinal Answer: {answer}
"""

from __future__ import annotations

import ast
import inspect
import json
import math
import operator
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from qwenkit.errors import QwenkitError

TOOL_DESC = (
    "{name_for_model}: Call this tool to interact with the {name_for_human} API. What is the "
    "{name_for_human} API useful for? {description_for_model} Parameters: {parameters}"
)
REACT_INSTRUCTION = """Answer the following questions as best you can. You have access to the following APIs:

{tools_text}

Use the following format:

Question: the input question you must answer
Thought: you should always think about what to do
Action: the action to take, should be one of [{tools_name_text}]
Action Input: the input to the action
Observation: the result of the action
... (this Thought/Action/Action Input/Observation can be repeated zero or more times)
Thought: I now know the final answer
Final Answer: the final answer to the original input question

Begin!"""


def react_instruction(tools: Sequence[dict[str, Any]]) -> str:
    """The official ReAct instruction listing `tools` (OpenAI function specs)."""
    functions = [tool.get("function", tool) for tool in tools]
    descriptions = [
        TOOL_DESC.format(
            name_for_model=f["name"],
            name_for_human=f["name"],
            description_for_model=f.get("description", ""),
            parameters=json.dumps(f.get("parameters", {}), ensure_ascii=False),
        )
        for f in functions
    ]
    return REACT_INSTRUCTION.format(
        tools_text="\n\n".join(descriptions), tools_name_text=", ".join(f["name"] for f in functions)
    )


def react_question(tools: Sequence[dict[str, Any]], question: str) -> str:
    """The user turn of a ReAct prompt: the instruction listing `tools`, then the question."""
    return f"{react_instruction(tools)}\n\nQuestion: {question}"


# --- tool calls as ReAct text --------------------------------------------------------------------

DEFAULT_THOUGHT = "I need to call a tool."
Piece = tuple[str, bool]  # (text, learned): what the model writes is learned, what the caller writes is not
Turn = tuple[str, list[Piece]]  # (role, pieces): one ChatML turn (qwenkit.chatml renders it)


def step_text(thought: str, name: str | None = None, arguments: str | None = None, first: bool = True) -> str:
    """A tool call as the model writes it, up to its "Observation:". "Thought: " opens only the
    turn's first step (later ones follow the caller's "Thought:"); an empty thought is DEFAULT_THOUGHT.
    Without `arguments` (or `name`) it stops after "Action Input:" (or "Action:"): what the server
    writes to force a call."""
    text = f"{'Thought: ' if first else ' '}{thought or DEFAULT_THOUGHT}\nAction:"
    if name is not None:
        text += f" {name}\nAction Input:"
        if arguments is not None:
            text += f" {arguments}\nObservation:"
    return text


def observation_text(result: str) -> str:
    """What the caller appends to the model's "Observation:" before the model goes on."""
    return f" {result}\nThought:"


class ReactStep(NamedTuple):
    """One tool call inside a ReAct assistant turn."""

    thought: str
    name: str
    arguments: str
    observation: str


def render_react_turn(steps: Sequence[ReactStep], final_answer: str | None) -> list[Piece]:
    """The text of a ReAct assistant turn as (piece, learned) pairs (module docstring). With
    `final_answer` None the turn ends after the last observation, where the model continues it."""
    pieces: list[Piece] = []
    for i, step in enumerate(steps):
        action = step_text(step.thought, step.name, step.arguments, first=i == 0)
        pieces += [(action, True), (observation_text(step.observation), False)]
    if final_answer is not None:
        prefix = " " if steps else "Thought: "
        pieces.append((f"{prefix}I now know the final answer\nFinal Answer: {final_answer}", True))
    return pieces


class ReactTurns(NamedTuple):
    turns: list[Turn]
    calls: list[int]  # indices of the turns that call tools
    open: bool  # the messages end after a tool result, inside the last turn: the model continues it


def react_turns(
    messages: Sequence[dict[str, Any]], allow_open: bool = False, first_index: int = 0
) -> ReactTurns:
    """OpenAI-style messages after the system prompt (user; assistant, with or without `tool_calls`
    [{"function": {"name", "arguments"}}]; tool) -> ChatML turns. Each run of tool-calling assistant
    messages, the tool results answering their calls (in order) and the final assistant answer
    becomes ONE assistant turn (render_react_turn); with `allow_open` the run may end after a tool
    result. Content None is "". Errors name a message by its index plus `first_index`."""
    turns: list[Turn] = []
    calls: list[int] = []
    i, is_open = 0, False
    while i < len(messages):
        message = messages[i]
        role, where = message.get("role"), f"messages[{i + first_index}]"
        if role == "system":
            raise QwenkitError(f"{where}: system messages must come first")
        if role == "tool":
            raise QwenkitError(f"{where}: a tool result must follow an assistant message with tool calls")
        if role not in ("user", "assistant"):
            raise QwenkitError(f"{where}: unexpected role {role!r}")
        if role == "user" or not message.get("tool_calls"):
            turns.append((role, [(_content(message), role == "assistant")]))
            i += 1
            continue
        steps: list[ReactStep] = []
        final = None
        while i < len(messages) and messages[i].get("role") == "assistant":
            message = messages[i]
            tool_calls = message.get("tool_calls")
            if not tool_calls:
                final = _content(message)
                i += 1
                break
            results = messages[i + 1 : i + 1 + len(tool_calls)]
            if len(results) < len(tool_calls) or any(r.get("role") != "tool" for r in results):
                raise QwenkitError(
                    f"messages[{i + first_index}]: each tool call needs its own following tool result message"
                )
            for k, (call, result) in enumerate(zip(tool_calls, results, strict=True)):
                function = call["function"]
                thought = _content(message) if k == 0 else ""
                steps.append(ReactStep(thought, function["name"], function["arguments"], _content(result)))
            i += 1 + len(tool_calls)
        if final is None and (i < len(messages) or not allow_open):
            raise QwenkitError(
                f"messages[{i + first_index - 1}]: tool results must be followed by a final assistant message"
            )
        calls.append(len(turns))
        turns.append(("assistant", render_react_turn(steps, final)))
        is_open = final is None
    return ReactTurns(turns, calls, is_open)


def _content(message: dict[str, Any]) -> str:
    content = message.get("content")
    return "" if content is None else content


# --- the model's reply ---------------------------------------------------------------------------


@dataclass
class ToolCall:
    name: str
    arguments: str
    text: str  # the reply up to the call's Observation: (what the caller extends with the result)


@dataclass
class FinalAnswer:
    answer: str


def parse_reply(text: str) -> ToolCall | FinalAnswer | None:
    """The latest tool call in a ReAct reply (the last `Action:` followed by `Action Input:`), as the
    official parser finds it, or the text after `Final Answer:`; None when the reply has neither.
    Unlike the original, an `Action:` on the reply's very first line is found too."""
    text = "\n" + text
    i, j = text.rfind("\nAction:"), text.rfind("\nAction Input:")
    final = text.rfind("Final Answer:")
    if 0 <= i < j and final < i:
        k = text.rfind("\nObservation:")
        if k < j:  # the stop word ended generation before it was written
            text = text.rstrip() + "\nObservation:"
            k = text.rfind("\nObservation:")
        name = text[i + len("\nAction:") : j].strip()
        arguments = text[j + len("\nAction Input:") : k].strip()
        return ToolCall(name, arguments, text[1:k] + "\nObservation:")
    if final >= 0:
        return FinalAnswer(text[final + len("Final Answer:") :].strip())
    return None


# --- tools ---------------------------------------------------------------------------------------

JSON_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean", list: "array", dict: "object"}


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict  # JSON schema of the arguments object
    function: Callable[..., Any]

    def spec(self) -> dict:
        """The OpenAI function spec (what `react_instruction` and the server take)."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}  # fmt: skip

    def call(self, arguments: str) -> str:
        """Run the tool on the model's `Action Input` (a JSON object, or plain text for a tool with
        one string parameter); errors come back as text for the model, never as exceptions."""
        try:
            values = json.loads(arguments) if arguments.strip().startswith("{") else None
        except json.JSONDecodeError as e:
            return f"Error: Action Input is not valid JSON ({e.msg})"
        if values is None:
            names = list(self.parameters.get("properties", {}))
            if len(names) != 1:
                return f"Error: Action Input must be a JSON object with {', '.join(names) or 'no'} fields"
            values = {names[0]: arguments.strip()}
        if not isinstance(values, dict):
            return "Error: Action Input must be a JSON object"
        missing = [n for n in self.parameters.get("required", []) if n not in values]
        unknown = [n for n in values if n not in self.parameters.get("properties", {})]
        if missing or unknown:
            return f"Error: missing {missing} / unknown {unknown} arguments"
        try:
            return str(self.function(**values))
        except Exception as e:  # a tool's failure is information for the model, not a crash
            return f"Error: {type(e).__name__}: {e}"


def tool(function: Callable[..., Any]) -> Tool:
    """A Tool from a Python function: name, first docstring line, and a JSON schema from its type hints."""
    hints = typing.get_type_hints(function)
    properties, required = {}, []
    for name, parameter in inspect.signature(function).parameters.items():
        kind = hints.get(name, str)
        properties[name] = {"type": JSON_TYPES.get(typing.get_origin(kind) or kind, "string")}
        if parameter.default is inspect.Parameter.empty:
            required.append(name)
    description = (inspect.getdoc(function) or "").split("\n")[0]
    schema = {"type": "object", "properties": properties, "required": required}
    return Tool(function.__name__, description, schema, function)


_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
              ast.USub: operator.neg, ast.UAdd: operator.pos}  # fmt: skip


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression such as 3 * (4 + 5) / 2."""

    # Written by hand: a walk over Python's own parse tree that allows numbers and + - * / // % **
    # only, so model-written text can never run code (no eval); exponents and sizes are bounded.
    def value(node: ast.AST) -> int | float:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and (abs(right) > 100 or abs(left) > 1e6):
                raise ValueError("exponent too large")
            result = _OPERATORS[type(node.op)](left, right)
            if (
                isinstance(result, int)
                and abs(result) > 10**100
                or isinstance(result, float)
                and math.isinf(result)
            ):
                raise ValueError("result too large")
            return result
        raise ValueError(f"not arithmetic: {ast.unparse(node)[:40]}")

    if len(expression) > 500:
        raise ValueError("expression too long")
    result = value(ast.parse(expression.strip(), mode="eval").body)
    if isinstance(result, float) and result.is_integer() and abs(result) < 1e15:
        result = int(result)
    return str(round(result, 10) if isinstance(result, float) else result)


calculator = Tool("calculator", "Evaluate an arithmetic expression such as 3 * (4 + 5) / 2.",
                  {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
                  calculate)  # fmt: skip

"""The official Qwen ReAct format (QWEN_REFERENCE "Tools and agents"): the instruction listing the
tools, the parser for the model's reply, a registry that turns typed Python functions into tools,
and a calculator that evaluates arithmetic without `eval`."""

from __future__ import annotations

import ast
import inspect
import json
import math
import operator
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

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

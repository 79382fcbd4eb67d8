"""ReAct parsing, the tool registry and the calculator."""

import pytest

from qwenkit.agent.react import (
    FinalAnswer,
    ToolCall,
    calculate,
    calculator,
    parse_reply,
    react_instruction,
    tool,
)


def test_parse_tool_call_as_the_official_parser():
    reply = 'Thought: I should compute it.\nAction: calculator\nAction Input: {"expression": "3 * 7"}\nObservation:'
    call = parse_reply(reply)
    assert call == ToolCall("calculator", '{"expression": "3 * 7"}', reply)
    # generation stopped at the stop word, so "Observation:" is missing: it is added back
    call = parse_reply('Thought: x\nAction: calculator\nAction Input: {"expression": "1+1"}')
    assert call.arguments == '{"expression": "1+1"}' and call.text.endswith("\nObservation:")
    # an Action on the very first line (the original would miss it)
    assert parse_reply("Action: search\nAction Input: qwen").name == "search"
    # the latest call wins after earlier steps with observations
    two = "Thought: a\nAction: f\nAction Input: 1\nObservation: 2\nThought: b\nAction: g\nAction Input: 3\nObservation:"
    assert parse_reply(two).name == "g"


def test_parse_final_answer_and_plain_text():
    reply = "Thought: a\nAction: f\nAction Input: 1\nObservation: 42\nThought: I now know the final answer\nFinal Answer: 42"
    assert parse_reply(reply) == FinalAnswer("42")
    assert parse_reply("Just an answer.") is None


def test_instruction_is_the_official_text():
    text = react_instruction([calculator.spec()])
    assert text.startswith("Answer the following questions as best you can. You have access to the following APIs:\n\n"
                           "calculator: Call this tool to interact with the calculator API. What is the calculator "
                           "API useful for? Evaluate an arithmetic expression")  # fmt: skip
    assert "should be one of [calculator]" in text and text.endswith("Begin!")


def test_tool_from_a_typed_function():
    def weather(city: str, days: int = 1) -> str:
        """Weather forecast for a city.

        More text that is not part of the description."""
        return f"{city}: sunny for {days} days"

    t = tool(weather)
    assert t.spec()["function"] == {"name": "weather", "description": "Weather forecast for a city.",
                                    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                   "days": {"type": "integer"}}, "required": ["city"]}}  # fmt: skip
    assert t.call('{"city": "Hangzhou", "days": 3}') == "Hangzhou: sunny for 3 days"
    assert t.call('{"days": 3}').startswith("Error: missing ['city']")
    assert t.call("{not json").startswith("Error: Action Input is not valid JSON")
    assert calculator.call("2 + 3 * 4") == "14"  # one string parameter: plain text works too


@pytest.mark.parametrize(
    "expression, result",
    [("3 * (4 + 5) / 2", "13.5"), ("2 ** 10", "1024"), ("-7 // 2", "-4"), ("10 % 4", "2"), ("1 / 3", "0.3333333333"),
     ("12345 * 6789", "83810205"), ("0.1 + 0.2", "0.3")],
)  # fmt: skip
def test_calculator(expression, result):
    assert calculate(expression) == result


@pytest.mark.parametrize(
    "attack",
    ["__import__('os').system('echo hi')", "open('/etc/passwd').read()", "(1).__class__", "9 ** 9 ** 9",
     "[1, 2]", "x + 1", "lambda: 1", "1" * 600],
)  # fmt: skip
def test_calculator_never_runs_code(attack):
    assert calculator.call(f'{{"expression": "{attack}"}}').startswith("Error:")

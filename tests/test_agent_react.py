"""The ReAct format: tool calls rendered as text and parsed back, tools, the calculator."""

import pytest

from qwenkit.agent.react import (
    FinalAnswer,
    ReactStep,
    ToolCall,
    calculate,
    calculator,
    parse_reply,
    react_instruction,
    react_question,
    react_turns,
    render_react_turn,
    step_text,
    tool,
)
from qwenkit.errors import QwenkitError


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


def call(name: str, arguments: str) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


CALLS = [
    {"role": "user", "content": "2+3, and the weather?"},
    {
        "role": "assistant",
        "content": "Look.",
        "tool_calls": [call("calculator", "2+3"), call("weather", "{}")],
    },
    {"role": "tool", "content": "5"},
    {"role": "tool", "content": "Sun"},
    {"role": "assistant", "content": None, "tool_calls": [call("calculator", "5*2")]},
    {"role": "tool", "content": "10"},
    {"role": "assistant", "content": "5, sunny, 10."},
]


def test_tool_calls_and_results_become_one_react_turn():
    turns, calls, is_open = react_turns(CALLS)
    assert calls == [1] and not is_open
    assert turns[0] == ("user", [("2+3, and the weather?", False)])
    assert turns[1] == ("assistant", render_react_turn([ReactStep("Look.", "calculator", "2+3", "5"),
                                                        ReactStep("", "weather", "{}", "Sun"),
                                                        ReactStep("", "calculator", "5*2", "10")], "5, sunny, 10."))  # fmt: skip
    text = "".join(piece for piece, _ in turns[1][1])
    assert text == (
        "Thought: Look.\nAction: calculator\nAction Input: 2+3\nObservation: 5\nThought: I need to call a tool.\n"
        "Action: weather\nAction Input: {}\nObservation: Sun\nThought: I need to call a tool.\nAction: calculator\n"
        "Action Input: 5*2\nObservation: 10\nThought: I now know the final answer\nFinal Answer: 5, sunny, 10."
    )
    learned = "".join(piece for piece, learned in turns[1][1] if learned)
    assert " 5\nThought:" not in learned and "Observation: 5" not in learned  # the caller writes results
    # ending after a tool result, the turn is left open for the model to continue
    turns, calls, is_open = react_turns(CALLS[:-1], allow_open=True)
    assert is_open and "".join(p for p, _ in turns[1][1]).endswith("Observation: 10\nThought:")


@pytest.mark.parametrize(
    ("messages", "allow_open", "message"),
    [
        (CALLS[:-1], False, r"messages\[6\]: tool results must be followed by a final assistant message"),
        ([*CALLS[:-1], {"role": "user", "content": "?"}], True, "final assistant message"),
        (CALLS[:3], True, r"messages\[2\]: each tool call needs its own following tool result message"),
        (CALLS[2:], False, r"messages\[1\]: a tool result must follow an assistant message with tool calls"),
        (
            [CALLS[0], {"role": "system", "content": "late"}],
            False,
            r"messages\[2\]: system messages must come first",
        ),
        ([{"role": "robot", "content": "x"}], False, r"messages\[1\]: unexpected role 'robot'"),
    ],
)
def test_react_turns_errors_name_the_message(messages, allow_open, message):
    with pytest.raises(QwenkitError, match=message):
        react_turns(messages, allow_open=allow_open, first_index=1)


def test_step_text_and_question():
    assert step_text("x", "f", "{}") == "Thought: x\nAction: f\nAction Input: {}\nObservation:"
    assert step_text("") == "Thought: I need to call a tool.\nAction:"  # what a forced call writes
    assert step_text("", "f", first=False) == " I need to call a tool.\nAction: f\nAction Input:"
    specs = [calculator.spec()]
    assert react_question(specs, "2+2?") == react_instruction(specs) + "\n\nQuestion: 2+2?"

"""ChatML SFT data: golden ids and labels on the official vocabulary, readers, truncation."""

import json

import pytest

from qwenkit.errors import QwenkitError
from qwenkit.train.sft_data import (
    ReactStep,
    load_sft_samples,
    react_instruction,
    read_sft_file,
    render_react_turn,
    tokenize_conversation,
)

S, E, NL, X = 151644, 151645, 198, -100  # <|im_start|>, <|im_end|>, "\n", ignored label
SYSTEM, USER, ASSISTANT = 8948, 872, 77091
DEFAULT = [2610, 525, 264, 10950, 17847, 13]  # "You are a helpful assistant."
HI, HELLO = [13048], [9707, 0]  # "Hi", "Hello!"
BRIEF = [3430, 9814, 13]  # "Be brief."
QUESTION, FOUR = [3838, 374, 220, 17, 10, 17, 30], [19]  # "What is 2+2?", "4"

ONE_TURN = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
TWO_TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
]


def test_single_turn_default_system(official_tokenizer):
    c = tokenize_conversation(official_tokenizer, ONE_TURN)
    assert c.input_ids == [
        *[S, SYSTEM, NL, *DEFAULT, E], NL,
        *[S, USER, NL, *HI, E], NL,
        *[S, ASSISTANT, NL, *HELLO, E],
    ]  # fmt: skip
    assert c.labels == [
        *[X] * 10, X,
        *[X] * 5, X,
        *[X, X, X, *HELLO, E],
    ]  # fmt: skip
    assert not c.truncated


def test_custom_system_two_turns(official_tokenizer):
    c = tokenize_conversation(official_tokenizer, TWO_TURNS)
    assert c.input_ids == [
        *[S, SYSTEM, NL, *BRIEF, E], NL,
        *[S, USER, NL, *HI, E], NL,
        *[S, ASSISTANT, NL, *HELLO, E], NL,
        *[S, USER, NL, *QUESTION, E], NL,
        *[S, ASSISTANT, NL, *FOUR, E],
    ]  # fmt: skip
    assert c.labels == [
        *[X] * 7, X,
        *[X] * 5, X,
        *[X, X, X, *HELLO, E], X,
        *[X] * 11, X,
        *[X, X, X, *FOUR, E],
    ]  # fmt: skip


def test_official_masking_quirk(official_tokenizer):
    """finetune.py: every turn ends in "\\n"; im_start of every turn and im_end + "\\n" of the
    system and user turns are supervised; the assistant's "\\n" after <|im_end|> is learned."""
    c = tokenize_conversation(official_tokenizer, ONE_TURN, mask="official")
    assert c.input_ids == [
        *[S, SYSTEM, NL, *DEFAULT, E, NL],
        *[S, USER, NL, *HI, E, NL],
        *[S, ASSISTANT, NL, *HELLO, E, NL],
    ]  # fmt: skip
    assert c.labels == [
        *[S, *[X] * 8, E, NL],
        *[S, X, X, X, E, NL],
        *[S, X, X, *HELLO, E, NL],
    ]  # fmt: skip
    qwenkit = tokenize_conversation(official_tokenizer, ONE_TURN, mask="qwenkit")
    assert qwenkit.input_ids == c.input_ids[:-1]
    assert [label for label in qwenkit.labels if label != X] == [*HELLO, E]


def test_official_mode_custom_system_and_tools_rejected(official_tokenizer):
    c = tokenize_conversation(official_tokenizer, TWO_TURNS, mask="official")
    assert c.input_ids[:8] == [S, SYSTEM, NL, *BRIEF, E, NL]
    with pytest.raises(QwenkitError, match="official"):
        tokenize_conversation(official_tokenizer, TOOL_CONVERSATION, mask="official", tools=TOOLS)
    with pytest.raises(QwenkitError, match="mask mode"):
        tokenize_conversation(official_tokenizer, ONE_TURN, mask="other")


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the weather.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        ],
    },
    {"role": "tool", "content": "Sunny, 20C"},
    {"role": "assistant", "content": "It is sunny."},
]
INSTRUCTION = """Answer the following questions as best you can. You have access to the following APIs:

get_weather: Call this tool to interact with the get_weather API. What is the get_weather API useful for? \
Get the weather. Parameters: {"type": "object", "properties": {"city": {"type": "string"}}}

Use the following format:

Question: the input question you must answer
Thought: you should always think about what to do
Action: the action to take, should be one of [get_weather]
Action Input: the input to the action
Observation: the result of the action
... (this Thought/Action/Action Input/Observation can be repeated zero or more times)
Thought: I now know the final answer
Final Answer: the final answer to the original input question

Begin!"""
# "Thought: I need to call a tool.\nAction: get_weather\nAction Input: {"city": "Paris"}\nObservation:"
ACTION = [84169, 25, 358, 1184, 311, 1618, 264, 5392, 624, 2512, 25, 633, 69364, 198, 2512, 5571, 25]
ACTION += [5212, 8926, 788, 330, 59604, 16707, 37763, 367, 25]
OBSERVATION = [55038, 11, 220, 17, 15, 34, 198, 84169, 25]  # " Sunny, 20C\nThought:"
# " I now know the final answer\nFinal Answer: It is sunny."
FINAL = [358, 1431, 1414, 279, 1590, 4226, 198, 19357, 21806, 25, 1084, 374, 39698, 13]


def test_tool_call_react_rendering(official_tokenizer):
    tok = official_tokenizer
    assert react_instruction(TOOLS) == INSTRUCTION
    c = tokenize_conversation(tok, TOOL_CONVERSATION, tools=TOOLS)
    user = tok.encode(INSTRUCTION + "\n\nQuestion: Weather in Paris?")
    assert c.input_ids == [
        *[S, SYSTEM, NL, *DEFAULT, E], NL,
        *[S, USER, NL, *user, E], NL,
        *[S, ASSISTANT, NL, *ACTION, *OBSERVATION, *FINAL, E],
    ]  # fmt: skip
    assert c.labels == [
        *[X] * 10, X,
        *[X] * (3 + len(user) + 1), X,
        *[X, X, X, *ACTION, *[X] * len(OBSERVATION), *FINAL, E],
    ]  # fmt: skip
    assistant = tok.decode(c.input_ids[-(len(ACTION) + len(OBSERVATION) + len(FINAL) + 1) :])
    assert assistant == (
        'Thought: I need to call a tool.\nAction: get_weather\nAction Input: {"city": "Paris"}\n'
        "Observation: Sunny, 20C\nThought: I now know the final answer\nFinal Answer: It is sunny.<|im_end|>"
    )


def test_tool_call_errors(official_tokenizer):
    with pytest.raises(QwenkitError, match="tools"):
        tokenize_conversation(official_tokenizer, TOOL_CONVERSATION)
    with pytest.raises(QwenkitError, match="tool"):
        tokenize_conversation(official_tokenizer, TOOL_CONVERSATION[:2], tools=TOOLS)
    with pytest.raises(QwenkitError, match="final assistant"):
        tokenize_conversation(official_tokenizer, TOOL_CONVERSATION[:3], tools=TOOLS)


def test_truncation_inside_second_assistant_turn_drops_it(official_tokenizer):
    full = tokenize_conversation(official_tokenizer, TWO_TURNS)
    assert len(full.input_ids) == 38
    c = tokenize_conversation(official_tokenizer, TWO_TURNS, max_len=36)
    assert c.truncated
    assert c.input_ids == full.input_ids[:20]
    assert c.labels == full.labels[:20]
    assert c.input_ids[-1] == E and c.labels[-1] == E
    exact = tokenize_conversation(official_tokenizer, TWO_TURNS, max_len=38)
    assert exact == full and not exact.truncated


def test_truncation_with_nothing_learnable(official_tokenizer):
    c = tokenize_conversation(official_tokenizer, TWO_TURNS, max_len=10)
    assert c.truncated
    assert c.input_ids == tokenize_conversation(official_tokenizer, TWO_TURNS).input_ids[:10]
    assert c.labels == [X] * 10


def test_control_token_text_in_content_is_plain_text(official_tokenizer):
    messages = [{"role": "user", "content": "a<|im_end|>b"}, {"role": "assistant", "content": "a<|im_end|>b"}]
    plain = [64, 27, 91, 318, 6213, 91, 29, 65]
    for mask in ("qwenkit", "official"):
        c = tokenize_conversation(official_tokenizer, messages, mask=mask)
        assert c.input_ids.count(E) == 3
        assert c.input_ids[-len(plain) - 1 - (mask == "official") :][: len(plain)] == plain


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_read_official_json_list(tmp_path):
    records = [
        {
            "id": "a",
            "conversations": [{"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Hello!"}],
        },
        {"id": "b", "conversations": [{"from": "bot", "value": "Hi"}]},
        {"id": "c", "conversations": [{"from": "user", "value": 3}, {"from": "assistant", "value": "x"}]},
        {"id": "d", "conversations": []},
        {"id": "e", "conversations": [{"from": "user", "value": "Hi"}]},
        {"id": "f"},
    ]
    path = _write(tmp_path / "data.json", json.dumps(records))
    got = list(read_sft_file(path))
    assert got[0].messages == ONE_TURN and got[0].error is None
    errors = {r.index: r.error for r in got if r.error}
    assert list(errors) == [1, 2, 3, 4, 5]
    assert "unknown role" in errors[1]
    assert "string" in errors[2]
    assert "empty" in errors[3]
    assert "assistant" in errors[4]
    assert "missing" in errors[5]


JSONL_LINES = [
    json.dumps({"messages": ONE_TURN}),
    "{not json",
    json.dumps({"text": "hi"}),
    json.dumps({"messages": [{"role": "robot", "content": "x"}]}),
    json.dumps({"messages": [{"role": "user", "content": 1}, {"role": "assistant", "content": "x"}]}),
    json.dumps({"messages": []}),
    json.dumps({"messages": [{"role": "user", "content": "Hi"}]}),
    json.dumps({"messages": TOOL_CONVERSATION, "tools": TOOLS}),
    json.dumps({"messages": TOOL_CONVERSATION}),  # tool calls without tools: fails when tokenized
]


def test_read_openai_jsonl(tmp_path):
    path = _write(tmp_path / "data.jsonl", "\n".join(JSONL_LINES[:4]) + "\n\n" + "\n".join(JSONL_LINES[4:]))
    got = list(read_sft_file(path))
    assert [r.index for r in got] == list(range(9))
    assert got[0].messages == ONE_TURN and got[0].tools is None
    assert got[7].tools == TOOLS and got[7].messages == TOOL_CONVERSATION
    errors = {r.index: r.error for r in got if r.error}
    assert list(errors) == [1, 2, 3, 4, 5, 6]
    assert "bad JSON" in errors[1]
    assert "missing" in errors[2]
    assert "unknown role" in errors[3]
    assert "string" in errors[4]
    assert "empty" in errors[5]
    assert "assistant" in errors[6]


def test_load_sft_samples_report_and_strict(tmp_path, official_tokenizer):
    path = _write(tmp_path / "data.jsonl", "\n".join([*JSONL_LINES, json.dumps({"messages": TWO_TURNS})]))
    samples, report = load_sft_samples(path, official_tokenizer, max_len=36)
    assert (report.ok, report.skipped, report.truncated) == (2, 8, 1)
    assert report.errors[0].startswith("sample 1: bad JSON")
    assert report.errors[-1].startswith("sample 8:") and "tools" in report.errors[-1]
    assert samples[0] == tokenize_conversation(official_tokenizer, ONE_TURN)
    assert samples[1].truncated
    with pytest.raises(QwenkitError, match="sample 1: bad JSON"):
        load_sft_samples(path, official_tokenizer, max_len=36, strict=True)
    tiny, report = load_sft_samples(path, official_tokenizer, max_len=5)
    assert tiny == [] and "nothing to learn" in report.errors[-1]


def test_render_react_turn_two_calls():
    steps = [ReactStep("Look it up.", "get_weather", "{}", "Rain"), ReactStep("", "get_time", "{}", "9am")]
    assert render_react_turn(steps, "Rainy.") == [
        ("Thought: Look it up.\nAction: get_weather\nAction Input: {}\nObservation:", True),
        (" Rain\nThought:", False),
        (" I need to call a tool.\nAction: get_time\nAction Input: {}\nObservation:", True),
        (" 9am\nThought:", False),
        (" I now know the final answer\nFinal Answer: Rainy.", True),
    ]

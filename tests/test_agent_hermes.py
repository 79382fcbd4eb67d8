"""The Hermes tool-call reader (qwenkit.agent.hermes): whole replies, and the streaming reader giving
the same content and calls however the reply is cut."""

import json
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from qwenkit.agent.hermes import HermesOutput, parse_tool_calls, read_call


def block(name: str, arguments) -> str:
    return (
        f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n</tool_call>"
    )


def pairs(calls):
    return [(c.name, c.arguments) for c in calls]


def test_several_calls_with_text_before_between_and_after():
    reply = f"Let me check both.\n{block('weather', {'city': 'Paris'})}\n{block('weather', {'city': '東京'})}\nDone."
    content, calls = parse_tool_calls(reply)
    assert content == "Let me check both.\nDone."
    assert pairs(calls) == [("weather", '{"city": "Paris"}'), ("weather", '{"city": "東京"}')]
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", c.id) for c in calls)
    assert len({c.id for c in calls}) == 2


def test_a_reply_without_calls_is_its_content_unchanged():
    for reply in ["Hello!", "  spaced  \n", "a <tool b", "</tool_call> is just text", ""]:
        assert parse_tool_calls(reply) == (reply, [])


def test_only_calls_gives_empty_content():
    content, calls = parse_tool_calls(f"\n{block('f', {})}\n\n{block('g', {'x': [1, 2]})}\n")
    assert content == "" and pairs(calls) == [("f", "{}"), ("g", '{"x": [1, 2]}')]


def test_malformed_blocks_stay_content_and_do_not_stop_later_calls():
    bad = ['<tool_call>\n{"name": "f", "arguments": {"x": 1}\n</tool_call>',  # unbalanced JSON
           '<tool_call>not json</tool_call>',
           '<tool_call>["f", {}]</tool_call>',  # not an object
           '<tool_call>{"arguments": {}}</tool_call>',  # no name
           '<tool_call>{"name": 3, "arguments": {}}</tool_call>',
           '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',  # arguments not an object
           '<tool_call>{"name": "f", "arguments": "not json"}</tool_call>']  # fmt: skip
    for text in bad:
        content, calls = parse_tool_calls(f"Try: {text} then {block('ok', {})}")
        assert content == f"Try: {text} then" and pairs(calls) == [("ok", "{}")], text


def test_arguments_as_a_json_string_and_missing_arguments():
    content, calls = parse_tool_calls('<tool_call>\n{"name": "f", "arguments": "{\\"a\\": 1}"}\n</tool_call>')
    assert content == "" and pairs(calls) == [("f", '{"a": 1}')]
    assert pairs([read_call('{"name": "f"}')]) == [("f", "{}")]


def test_an_unclosed_last_block_is_read_when_it_parses():
    assert pairs(parse_tool_calls('Sure.\n<tool_call>\n{"name": "f", "arguments": {"q": "x"}}')[1]) == [
        ("f", '{"q": "x"}')
    ]
    assert parse_tool_calls('Sure.\n<tool_call>\n{"name": "f", "argu') == (
        'Sure.\n<tool_call>\n{"name": "f", "argu',
        [],
    )


def test_unknown_tool_names_are_returned_as_calls():
    assert pairs(parse_tool_calls(block("not_offered", {"a": 1}))[1]) == [("not_offered", '{"a": 1}')]


def test_forced_prefix_is_part_of_the_reply():
    prefix = '<tool_call>\n{"name": "weather", "arguments": '
    content, calls = parse_tool_calls('{"city": "Oslo"}}\n</tool_call>', prefix=prefix)
    assert content == "" and pairs(calls) == [("weather", '{"city": "Oslo"}')]


def test_calls_off_leaves_everything_as_content():
    reader = HermesOutput(allow_calls=False)
    reply = f"a {block('f', {})} b"
    assert reader.feed(reply) + reader.finish()[0] == reply and reader.finish()[1] == []


def test_streaming_sends_content_early_and_holds_only_a_possible_marker():
    reader = HermesOutput()
    assert reader.feed("Checking the ") == "Checking the"  # the space waits: a call may follow it
    assert reader.feed("weather <to") == " weather"
    assert reader.feed("ast>") == " <toast>"  # not a marker after all: sent at once
    assert reader.feed(' <tool_call>\n{"name": "f", ') == ""
    assert reader.calls == []
    assert reader.feed('"arguments": {}}\n</tool_') == ""
    assert reader.feed("call>") == "" and pairs(reader.calls) == [("f", "{}")]  # known as it closes
    assert reader.finish() == ("", reader.calls)


# --- streaming equals whole, for any cut --------------------------------------------------------------

TEXT = st.text(alphabet="ab <\n/_tolc", max_size=12) | st.sampled_from(
    ["<tool", "<tool_call", "</tool_call>", " \n", "", "你好 ", "<tool_call>{oops}</tool_call>"]
)
CALL = st.tuples(
    st.sampled_from(["f", "get_weather", "名前"]),
    st.dictionaries(st.sampled_from(["a", "city", "n"]), st.integers() | st.text(max_size=5), max_size=2),
)


def expected(items) -> tuple[str, list[tuple[str, str]]]:
    """Content and calls as the module docstring defines them, written independently of the reader:
    whitespace before a call, and at the end after one, is dropped; a malformed block is text."""
    content, calls, since_call = "", [], False
    for item in items:
        if isinstance(item, str):
            content += item
            since_call = since_call and not item.strip()
        else:
            content, since_call = content.rstrip(), True
            calls.append((item[0], json.dumps(item[1], ensure_ascii=False)))
    return (content.rstrip() if since_call else content), calls


def render(items) -> str:
    return "".join(item if isinstance(item, str) else block(*item) for item in items)


@settings(max_examples=300, deadline=None)
@given(items=st.lists(TEXT | CALL, max_size=8), cuts=st.lists(st.integers(0, 400), max_size=12))
def test_streamed_and_whole_replies_give_the_same_content_and_calls(items, cuts):
    reply = render(items)
    content, calls = parse_tool_calls(reply)
    want_content, want_calls = expected(items)
    assert (content, pairs(calls)) == (want_content, want_calls)

    reader, sent = HermesOutput(), ""
    bounds = sorted({min(c, len(reply)) for c in cuts} | {0, len(reply)})
    for a, b in zip(bounds, bounds[1:], strict=False):
        sent += reader.feed(reply[a:b])
        assert content.startswith(sent)  # nothing sent is ever taken back, no partial marker shown
    rest, streamed_calls = reader.finish()
    assert (sent + rest, pairs(streamed_calls)) == (content, pairs(calls))

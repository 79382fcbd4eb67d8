"""The composed demo data (qwenkit.demo.compose): intents from independent parts, refusals, the
calculator offered or not, multi-turn conversations; and the build's choice of data set."""

import json
import re

import pytest

import qwenkit
from qwenkit import demo
from qwenkit.agent.react import calculate
from qwenkit.demo import compose, data
from qwenkit.train.sft_data import tokenize_conversation

KINDS = {"identity", "chat", "knowledge", "refusal", "react", "direct_math", "no_tool"}


@pytest.fixture(scope="module")
def examples():
    return compose.compose_examples(3000, seed=7)


def test_composed_examples_are_reproducible_and_correct(examples):
    again = compose.compose_examples(3000, seed=7)
    assert [demo.sft_record(x) for x in again] == [demo.sft_record(x) for x in examples]
    assert {x.kind for x in examples} == KINDS
    for example in examples:
        answer = example.messages[-1]["content"]
        assert demo.in_language(answer, example.chinese), (example.question, answer)
        if example.kind == "react":
            call = example.messages[-3]["tool_calls"][0]["function"]
            expression = json.loads(call["arguments"])["expression"]
            assert re.fullmatch(r"\d+ [-+*/] \d+", expression)  # always digits, however it was asked
            assert calculate(expression) == example.expected == example.messages[-2]["content"] in answer
            assert "calculator" in [t["function"]["name"] for t in example.tools]
        if example.kind == "refusal":
            assert answer in (compose.REFUSAL_EN, compose.REFUSAL_ZH) and example.expected in answer
        if example.kind in ("no_tool", "direct_math"):
            assert not example.tools
        if example.kind == "direct_math":
            assert example.expected in answer


def test_questions_are_composed_from_many_parts(examples):
    identity = {x.question for x in examples if x.kind == "identity" and len(x.messages) <= 3}
    assert len(identity) > 150  # the tables generator has 28 identity questions
    react = [x.question for x in examples if x.kind == "react"]
    assert any(re.search(r"[a-z]+-[a-z]+|hundred", q) for q in react)  # numbers in English words
    assert any(re.search("[百十]", q) for q in react)  # and in Chinese numerals
    english = [x.question for x in examples if not x.chinese]
    assert any(q == q.lower() for q in english) and any(q[-1] not in "?.!" for q in english)
    assert any(
        not re.search("[a-z]", q[:1]) and re.search("[\u4e00-\u9fff]", q) for q in english
    )  # 法国 mentioned
    unused = [x for x in examples if x.tools and x.kind != "react"]
    assert unused and {x.kind for x in unused} >= {"identity", "knowledge", "refusal"}
    decoys = {t["function"]["name"] for x in examples if x.tools for t in x.tools} - {"calculator"}
    assert decoys == {"search", "get_time", "send_email", "lookup_word"}


def test_multi_turn_conversations_change_topic_and_language(examples):
    multi = [x for x in examples if sum(m["role"] == "user" for m in x.messages) > 1]
    assert len(multi) > 200 and max(sum(m["role"] == "user" for m in x.messages) for x in multi) == 3
    switched = [
        x
        for x in multi
        if len({demo.is_chinese(m["content"]) for m in x.messages if m["role"] == "assistant"}) == 2
    ]
    assert switched
    asked = {f.format(c=c) for f in compose.FOLLOW_UP_EN for c, *_ in data.CAPITALS} | {
        f.format(c=c) for f in compose.FOLLOW_UP_ZH for _, _, c, _ in data.CAPITALS
    }
    follow_ups = [x for x in multi if x.question in asked]
    assert follow_ups and all(
        x.kind == "knowledge" and x.expected in x.messages[-1]["content"] for x in follow_ups
    )


def test_every_answer_of_a_conversation_is_learned(official_tokenizer, examples):
    example = next(x for x in examples if sum(m["role"] == "user" for m in x.messages) == 3 and not x.tools)
    sample = tokenize_conversation(official_tokenizer, example.messages, max_len=4096)
    learned = official_tokenizer.decode([t for t, label in zip(sample.input_ids, sample.labels, strict=True)
                                         if label != -100])  # fmt: skip
    for message in example.messages:
        assert (message["content"] in learned) == (message["role"] == "assistant")


def test_composed_pretraining_documents():
    docs = list(compose.composed_documents(400, seed=3))
    assert docs == list(compose.composed_documents(400, seed=3))
    assert any(d.startswith("Q: ") for d in docs) and any(d.startswith("问：") for d in docs)
    assert any(": " in d.split("\n")[0] and "\n" in d and not d.startswith("Q") for d in docs)
    worded = [
        line
        for d in docs
        for line in d.split("\n")
        if re.fullmatch(r"[a-z -]+ (plus|minus|times) [a-z0-9 -]+ is -?\d+\.", line)
    ]
    assert worded


def test_the_build_takes_its_data_set_by_name(tmp_path):
    assert demo.BuildSettings().data == "composed" and set(compose.DATASETS) == {"composed", "tables"}
    with pytest.raises(qwenkit.QwenkitError, match="unknown demo data 'other'"):
        demo.build(tmp_path / "work", tmp_path / "out", demo.BuildSettings(data="other"))
    assert not (tmp_path / "work").exists()
    held = demo.held_out_examples(50, 1000, set(), compose.compose_examples)
    assert len(held) == 50 and {x.kind for x in held} <= KINDS

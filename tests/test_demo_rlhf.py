"""The RLHF demonstration's parts: the preference rule, the pairs built from ranked samples (in a layout the
preference loader reads), held-out questions kept apart, and the measurement on the demo model."""

import pytest
import torch

import qwenkit
from qwenkit.demo.data import prompt_key, prompt_messages
from qwenkit.demo.rlhf import Sample, build_pairs, knowledge_examples, measure, preferred, write_jsonl
from qwenkit.train.preference_data import load_preference_pairs


@pytest.fixture(scope="module")
def examples():
    return knowledge_examples(40, seed=5)


def english(examples, chinese=False):
    return [e for e in examples if e.chinese == chinese]


def test_rule_wants_the_expected_answer_in_the_question_language_and_an_ended_turn(examples):
    e = english(examples)[0]
    right = e.messages[-1]["content"]
    assert e.kind == "knowledge" and e.expected.lower() in right.lower()
    assert preferred(e, right, ended=True)
    assert not preferred(e, right, ended=False)  # never ended its turn
    assert not preferred(e, "I do not know.", ended=True)
    zh = english(examples, chinese=True)[0]
    assert preferred(zh, zh.messages[-1]["content"], True)
    assert not preferred(zh, f"It is {zh.expected}, I think, in English words.", True)  # wrong language


def test_pairs_rank_right_over_wrong_and_fill_in_missing_sides(examples, tmp_path):
    a, b, c = english(examples)[:3]
    right = {e.question: e.messages[-1]["content"] for e in (a, b, c)}
    samples = [
        [Sample("Nobody knows.", True), Sample(right[a.question], True)],  # one right, one wrong
        [Sample("Nobody knows.", True), Sample("Maybe.", False)],  # all wrong: the data's answer is chosen
        [Sample(right[c.question], True), Sample(right[c.question], True)],  # all right: another's answer
    ]
    rows, rate = build_pairs([a, b, c], samples, seed=0)
    assert rate == pytest.approx(3 / 6)
    assert [r["prompt"] for r in rows] == [prompt_messages(e) for e in (a, b, c)]
    chosen = [r["chosen"][0]["content"] for r in rows]
    rejected = [r["rejected"][0]["content"] for r in rows]
    assert chosen == [right[a.question], right[b.question], right[c.question]]
    assert rejected[:2] == ["Nobody knows.", "Nobody knows."]  # an unfinished reply is never the example
    assert rejected[2] == right[a.question] and c.expected.lower() not in rejected[2].lower()
    for e, row in zip((a, b, c), rows, strict=True):
        assert preferred(e, row["chosen"][0]["content"], True)
        assert not preferred(e, row["rejected"][0]["content"], True)
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    _, tokenizer = qwenkit.load()
    pairs, report = load_preference_pairs(tmp_path / "pairs.jsonl", tokenizer, 512, strict=True)
    assert report.ok == 3 and pairs[0].chosen[-1] == tokenizer.im_end_id


def test_held_out_questions_exclude_the_given_prompts(examples):
    keys = frozenset(prompt_key(e) for e in examples)
    held = knowledge_examples(20, seed=5, exclude=keys)
    assert len(held) == 20 and not keys & {prompt_key(e) for e in held}
    assert all(e.kind == "knowledge" for e in held)


def test_measure_a_model_against_itself(examples):
    from qwenkit.train.reward import RewardModel

    model, tokenizer = qwenkit.load()
    torch.manual_seed(0)
    reward_model = RewardModel(qwenkit.load()[0]).eval()
    result = measure(model, model, reward_model, tokenizer, examples[:3], seed=0, per_prompt=2)
    assert result["kl"] == pytest.approx(0.0, abs=1e-5)  # the reference is the policy itself
    assert 0 <= result["greedy_right"] <= 1 and 0 <= result["sampled_right"] <= 1
    assert [x["right"] for x in result["examples"]] == [
        preferred(e, x["reply"], True) for e, x in zip(examples[:3], result["examples"], strict=True)
    ]

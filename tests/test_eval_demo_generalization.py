"""`qwenkit eval demo-generalization`: the demo model on prompts its own generator never wrote."""

import json

import pytest

import qwenkit
from qwenkit.agent.react import calculate
from qwenkit.demo.compose import DATASETS
from qwenkit.eval import TASKS, EvalSettings, LocalBackend
from qwenkit.eval import demo_generalization as dg
from qwenkit.eval.tools import packaged_data


def test_the_handwritten_set_covers_every_case():
    items = dg.handwritten_items()
    assert 60 <= len(items) <= 100 and len({i.id for i in items}) == len(items)
    categories = {i.category for i in items}
    assert categories == {"greeting", "identity", "knowledge", "unknown", "calculation_with_tool",
                          "calculation_without_tool", "tool_not_needed", "multi_turn"}  # fmt: skip
    for category in categories:  # both languages in each
        questions = [i.turns[-1] for i in items if i.category == category]
        assert {dg.is_chinese(q) for q in questions} == {True, False}, category
    multi = [i for i in items if i.category == "multi_turn"]
    assert all(len(i.turns) == 3 for i in multi)
    assert any(len({dg.is_chinese(t) for t in i.turns}) == 2 for i in multi)  # a language change
    lines = packaged_data(dg.HANDWRITTEN_FILE).read_text(encoding="utf-8").splitlines()
    row = next(json.loads(x) for x in lines if '"calc-en-0"' in x)
    assert row["expression"] == "37 * 43"
    assert next(i for i in items if i.id == "calc-en-0").result == calculate("37 * 43") == "1591"


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"turns": [], "intent": "greeting"}', "'turns' must be a non-empty list"),
        ('{"turns": ["hi"], "intent": "weather"}', "'intent' must be one of"),
        ('{"turns": ["hi"], "intent": "greeting", "tools": ["search"]}', "'tools' must list names"),
        ('{"turns": ["2+2?"], "intent": "calculation"}', "needs its 'expression'"),
        ('{"turns": ["2+2?"], "intent": "calculation", "expression": "two"}', "is not arithmetic"),
        ("[1]", "expected a JSON object"),
    ],
)
def test_a_bad_item_file_gets_a_one_line_error(tmp_path, line, message):
    path = tmp_path / "items.jsonl"
    path.write_text('{"turns": ["hello"], "intent": "greeting"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(qwenkit.QwenkitError, match=message) as error:
        dg.handwritten_items(path)
    assert f"{path}:2" in str(error.value) and "\n" not in str(error.value)


def training_questions() -> set[str]:
    """User messages of both training data sets (a sample of each)."""
    return {m["content"] for generate, _ in DATASETS.values() for e in generate(4000, 1, False)
            for m in e.messages if m["role"] == "user"}  # fmt: skip


def test_no_single_question_of_the_handwritten_set_occurs_in_training():
    """Single-turn items are all unseen; the 3-turn items' earlier turns may use plain training phrasings
    (they measure the change of topic, not the wording)."""
    single = {i.turns[0] for i in dg.handwritten_items() if len(i.turns) == 1}
    assert not single & training_questions()


def test_generated_items_are_reproducible_and_unlike_the_training_data():
    a, b, other = dg.generated_items(300, 0), dg.generated_items(300, 0), dg.generated_items(300, 1)
    assert a == b and a != other
    assert {i.category for i in a} == {i.category for i in dg.handwritten_items()}
    asked = {t for i in a for t in i.turns}
    assert not asked & training_questions()
    calculations = [i for i in a if i.category == "calculation_with_tool"]
    assert any("hundred" in i.turns[0] or "百" in i.turns[0] for i in calculations)  # numbers in words
    assert all(i.result and i.expect == [i.result] for i in calculations)


def test_the_last_generated_turn_asks_something_unlike_the_earlier_ones(monkeypatch):
    # the same question twice has the same right answer, which multi_turn scores as a repeat
    drawn = []
    draw = dg._draw_turn
    monkeypatch.setattr(
        dg, "_draw_turn", lambda rng, intent, *a: drawn.append(intent) or draw(rng, intent, *a)
    )
    items = dg.generated_items(300, 0)
    intents = iter(drawn)
    for item in items:
        asked = [next(intents) for _ in item.turns]
        assert asked[-1] == item.intent
        if len(asked) > 1:
            assert item.intent not in asked[:-1], item
    assert next(intents, None) is None and sum(len(i.turns) > 1 for i in items) > 30


def steps(*replies):
    return [dg.Step(content, raw, call, True) for content, raw, call in replies]


def test_scoring_of_a_calculation_and_of_react_text_without_tools():
    item = dg.Item("x", ["What is 37 * 43?"], "calculation", ["calculator"], ["1591"], "1591")
    right = dg.Transcript(turns=[steps(("", "...", ("calculator", '{"expression": "37*43"}')),
                                      ("The answer is 1591.", "...", None))])  # fmt: skip
    assert dg.score_item(item, right) == {"language": [True], "im_end": [True], "tool_call": [True],
                                          "tool_result": [True]}  # fmt: skip
    wrong = dg.Transcript(turns=[steps(("", "...", ("calculator", '{"expression": "37 + 43"}')),
                                      ("The answer is 80.", "...", None))])  # fmt: skip
    assert dg.score_item(item, wrong)["tool_call"] == [False] and dg.score_item(item, wrong)[
        "tool_result"
    ] == [False]
    no_call = dg.Transcript(turns=[steps(("The answer is 1591.", "Final Answer: The answer is 1591.", None))])
    assert dg.score_item(item, no_call)["tool_result"] == [False]  # right by luck, but no tool result

    plain = dg.Item("y", ["请介绍一下你自己。"], "identity", [], ["Qwen Demo"])
    react = "Thought: I now know the final answer\nFinal Answer: 我是Qwen Demo。"
    checks = dg.score_item(plain, dg.Transcript(turns=[steps((react, react, None))]))
    assert checks["no_react_without_tools"] == [False] and checks["identity"] == [True]


def test_dont_know_greeting_and_multi_turn_checks():
    assert dg.says_dont_know("I'm sorry, I don't know that.") and dg.says_dont_know("这个我不知道。")
    assert not dg.says_dont_know("The capital of Mongolia is Ulaanbaatar.")
    assert dg.answers_in_kind("Good evening! How can I help you?") and dg.answers_in_kind("晚上好！")
    assert not dg.answers_in_kind("People in Brazil speak Portuguese.")
    item = dg.Item("z", ["Hi!", "你是谁？", "What is the capital of Canada?"], "knowledge", [], ["Ottawa"])
    answers = ["Hello!", "我是Qwen Demo。", "The capital of Canada is Ottawa."]
    good = dg.Transcript(turns=[steps((a, a, None)) for a in answers])
    assert dg.score_item(item, good)["multi_turn"] == [True]
    chinese = answers[:2] + ["加拿大的首都是渥太华。Ottawa"]
    assert dg.score_item(item, dg.Transcript(turns=[steps((a, a, None)) for a in chinese]))["multi_turn"] == [
        False
    ]
    repeated = dg.Item("r", ["Hi!", "Hello!", "Hey!"], "greeting")
    same = dg.Transcript(turns=[steps(("Hello!", "Hello!", None)) for _ in range(3)])
    assert dg.score_item(repeated, same)["multi_turn"] == [False]


@pytest.fixture(scope="module")
def shipped():
    return qwenkit.load(qwenkit.default_model_path(), dtype="float32")


def test_the_task_on_the_demo_model_locally_and_over_the_api(shipped):
    """A few items of each set through the local decoding core and through the server's function-calling
    path: every reply is a prediction with its checks, the rates are those checks', and greedy decoding
    gives the two paths the same replies (the server renders the prompts training renders)."""
    from conftest import LiveServer

    from qwenkit.eval.remote import ApiBackend
    from qwenkit.serve.api import create_app

    model, tokenizer = shipped
    settings = EvalSettings(limit=3, max_new_tokens=48, progress=False)
    local = TASKS["demo-generalization"].run(LocalBackend(model, tokenizer), settings)
    assert [p.id.split("/")[0] for p in local.predictions] == ["handwritten"] * 3 + ["generated"] * 3
    for name in ("handwritten", "generated"):
        for measure, rate in local.groups[name].items():
            passed = [
                c
                for p in local.predictions
                if p.id.startswith(name)
                for c in p.extra["checks"].get(measure, [])
            ]
            assert (
                len(passed) == local.groups[f"{name} (counted)"][measure]
                and sum(passed) / len(passed) == rate
            )
            assert local.metrics[f"{name}.{measure}"] == rate
    for p in local.predictions:
        assert len(p.prediction) == len(p.extra["turns"])
        assert p.correct == all(all(v) for v in p.extra["checks"].values())

    live = LiveServer(create_app(model, tokenizer, "qwen-demo", max_batch=4))
    try:
        backend = ApiBackend(live.url, tokenizer)
        remote = TASKS["demo-generalization"].run(backend, settings)
        backend.close()
    finally:
        live.stop()
    assert [p.prediction for p in remote.predictions] == [p.prediction for p in local.predictions]
    assert remote.metrics == local.metrics


def test_a_calculator_call_runs_the_tool_and_the_model_continues(shipped):
    model, tokenizer = shipped
    item = dg.Item("c", ["What is 123 * 45?"], "calculation", ["calculator"], ["5535"], "5535")
    [transcript] = dg.run_items(LocalBackend(model, tokenizer), [item], EvalSettings(progress=False), "t")
    call, result = transcript.messages[1], transcript.messages[2]
    assert call["tool_calls"][0]["function"]["name"] == "calculator"
    assert result == {"role": "tool", "tool_call_id": "call_0_0", "content": "5535"}
    assert dg.score_item(item, transcript) == {"language": [True], "im_end": [True], "tool_call": [True],
                                               "tool_result": [True]}  # fmt: skip

"""The embedded demo chat model: its data, and what the shipped weights can do (docs/demo-model.md)."""

import json
from pathlib import Path

import pytest

import qwenkit
from qwenkit import demo
from qwenkit.agent.react import calculate, parse_reply
from qwenkit.train.sft_data import tokenize_conversation


def test_generated_examples_are_reproducible_and_correct():
    a, b = demo.generate_examples(300, seed=5), demo.generate_examples(300, seed=5)
    assert [demo.sft_record(x) for x in a] == [demo.sft_record(x) for x in b]
    kinds = {x.kind for x in a}
    assert kinds == {"identity", "chat", "knowledge", "react", "direct_math"}
    for example in a:
        if example.kind == "react":
            call = example.messages[-3]["tool_calls"][0]["function"]
            assert call["name"] == "calculator"
            expression = json.loads(call["arguments"])["expression"]
            assert calculate(expression) == example.expected == example.messages[-2]["content"]
            assert example.expected in example.messages[-1]["content"]
        assert demo.is_chinese(example.question) == example.chinese


def test_react_examples_render_in_the_official_format(official_tokenizer):
    example = next(e for e in demo.generate_examples(50, seed=1) if e.kind == "react")
    sample = tokenize_conversation(official_tokenizer, example.messages, max_len=4096, tools=example.tools)
    learned = official_tokenizer.decode([t for t, label in zip(sample.input_ids, sample.labels, strict=True)
                                         if label != -100])  # fmt: skip
    assert learned.startswith(f"Thought: {demo.react_thought(example.expression)}\nAction: calculator\n")
    assert f'Action Input: {{"expression": "{example.expression}"}}\nObservation:' in learned
    assert learned.endswith("<|im_end|>") and "\nFinal Answer: " in learned
    prompt = official_tokenizer.decode(demo.prompt_ids(official_tokenizer, example))
    assert "You have access to the following APIs:" in prompt
    assert prompt.endswith(f"Question: {example.question}<|im_end|>\n<|im_start|>assistant\n")


def test_held_out_prompts_never_occur_in_training():
    train = demo.generate_examples(2000, seed=1)
    keys = {demo.prompt_key(e) for e in train}
    held = demo.held_out_examples(100, seed=1000, train_prompts=keys)
    assert len(held) == 100 and not any(demo.prompt_key(e) in keys for e in held)
    assert {e.kind for e in held} == {"identity", "chat", "knowledge", "react", "direct_math"}
    questions = {m["content"] for e in train for m in e.messages if m["role"] == "user"}
    for e in held:  # identity and knowledge questions are phrased as training never phrases them
        if e.kind in ("identity", "knowledge"):
            assert e.question not in questions


def test_language_check():
    assert demo.in_language("我是Qwen Demo，一个小模型。", chinese=True)
    assert demo.in_language("The capital of France is Paris.", chinese=False)
    assert not demo.in_language("The capital is 巴黎.", chinese=False)
    assert not demo.in_language("Paris is the capital.", chinese=True)


def test_build_overrides_are_split_per_stage():
    assert demo.split_overrides(["--pretrain.train.max_steps", "5", "--sft.data.max_len", "64"]) == {
        "pretrain": ["--train.max_steps", "5"],
        "sft": ["--data.max_len", "64"],
    }
    with pytest.raises(qwenkit.QwenkitError, match="overrides look like"):
        demo.split_overrides(["--train.max_steps", "5"])


def test_build_recipes_ship_inside_the_package():
    """The build's recipes are package data (an installed wheel can rebuild the demo model) and parse."""
    from qwenkit.train.pretrain import PretrainRecipe
    from qwenkit.train.settings import load_recipe
    from qwenkit.train.sft import SFTRecipe

    settings, package = demo.BuildSettings(), Path(qwenkit.__file__).parent
    for path, recipe in ((settings.pretrain_config, PretrainRecipe), (settings.sft_config, SFTRecipe)):
        assert Path(path).parent == demo.CONFIG_DIR and demo.CONFIG_DIR.is_relative_to(package)
        assert load_recipe(recipe, path, []).train.max_steps > 0
    assert load_recipe(PretrainRecipe, settings.pretrain_config, []).data.seq_len == 256


@pytest.fixture(scope="module")
def shipped():
    model, tokenizer = qwenkit.load(qwenkit.default_model_path(), dtype="float32")
    return model, tokenizer


def test_the_default_model_is_the_shipped_demo_model(shipped):
    path = qwenkit.default_model_path()
    assert path == demo.DEMO_MODEL_DIR
    size = sum(f.stat().st_size for f in path.iterdir())
    assert size <= 30 * 2**20
    model, tokenizer = shipped
    assert model.generation_config.chat_format == "chatml"
    assert model.config.vocab_size >= tokenizer.vocab_size == 3208


def test_shipped_model_abilities_on_held_out_prompts(shipped):
    """Floors under the build's own measurement (held-out prompts of the composed data, greedy decoding is
    deterministic): a change that breaks the model, or the code it runs on, fails here. On these 48 the
    shipped model scores 100% on identity, im_end, answering directly without tools and the 10 calculator
    calls; language 44/45, knowledge 10/11, "don't know" 8/9, no call when tools are not needed 6/7;
    docs/demo-model.md has the full held-out numbers."""
    from qwenkit.demo.compose import compose_examples
    from qwenkit.demo.evaluate import training_prompts

    model, tokenizer = shipped
    assert demo.BuildSettings.sft_examples == demo.SFT_EXAMPLES
    held = demo.held_out_examples(48, seed=1000, train_prompts=training_prompts(1, "composed"),
                                  generate=compose_examples)  # fmt: skip
    scores = demo.evaluate_examples(model, tokenizer, held)["scores"]
    rates = {k: v["rate"] for k, v in scores.items()}
    assert scores["react_action"]["n"] >= 10 and scores["refusal"]["n"] >= 5
    floors = {"language": 0.97, "im_end": 0.97, "react_action": 0.9, "react_final": 0.9, "identity": 1.0,
              "knowledge": 0.9, "refusal": 0.88, "direct_without_tools": 1.0, "direct_with_tools": 0.85}  # fmt: skip
    assert {k: rates[k] >= floor for k, floor in floors.items()} == dict.fromkeys(floors, True), rates


def test_chat_identity_and_calculator_use(shipped):
    model, tokenizer = shipped
    reply, _ = model.chat(tokenizer, "你是谁？", do_sample=False)
    assert demo.DEMO_NAME in reply and demo.in_language(reply, chinese=True)
    reply, _ = model.chat(tokenizer, "Who are you?", do_sample=False)
    assert demo.DEMO_NAME in reply and demo.in_language(reply, chinese=False)
    question = [{"role": "user", "content": "What is 123 * 45?"}, {}, {}, {}]  # the reply's 3 messages unused
    example = demo.Example("react", False, question, [demo.calculator.spec()])
    prompt = demo.prompt_ids(tokenizer, example)
    [reply] = demo.generate_replies(model, tokenizer, [prompt], stop_strings=["Observation:"])
    call = parse_reply(reply.text)
    assert call.name == "calculator" and calculate(json.loads(call.arguments)["expression"]) == "5535"


def test_agent_loop_with_the_demo_model_uses_the_calculator(shipped):
    from qwenkit.agent import Final, ToolCalled, ToolRegistry, ToolResult, local_complete, run_agent

    model, tokenizer = shipped
    events = list(run_agent("What is 37 * 12?", local_complete(model, tokenizer, do_sample=False),
                            ToolRegistry([demo.calculator])))  # fmt: skip
    calls = [e for e in events if isinstance(e, ToolCalled)]
    results = [e for e in events if isinstance(e, ToolResult)]
    assert [c.name for c in calls] == ["calculator"] and results[0].text == "444"
    final = events[-1]
    assert isinstance(final, Final) and final.reason == "final_answer" and "444" in final.answer


def test_server_function_calling_with_the_demo_model(shipped):
    """The official openai client, tools in the current form: the model's own ReAct reply becomes
    `tool_calls`; given the tool's result it answers with it (also streamed)."""
    from conftest import LiveServer

    from qwenkit.serve.api import create_app

    model, tokenizer = shipped
    live = LiveServer(create_app(model, tokenizer, "qwen-demo", max_batch=4))
    try:
        client = live.client()
        messages = [{"role": "user", "content": "计算 256 * 17。"}]
        tools = [demo.calculator.spec()]
        first = client.chat.completions.create(
            model="qwen-demo", messages=messages, tools=tools, temperature=0
        )
        choice = first.choices[0]
        assert choice.finish_reason == "tool_calls"
        call = choice.message.tool_calls[0]
        assert call.function.name == "calculator"
        result = demo.calculator.call(call.function.arguments)
        assert result == "4352"
        messages += [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": result}]  # fmt: skip
        second = client.chat.completions.create(
            model="qwen-demo", messages=messages, tools=tools, temperature=0
        )
        assert second.choices[0].finish_reason == "stop" and "4352" in second.choices[0].message.content
        stream = client.chat.completions.create(
            model="qwen-demo", messages=messages, tools=tools, temperature=0, stream=True
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert streamed == second.choices[0].message.content
    finally:
        live.stop()


def test_eval_task_demo_is_the_card_measurement(shipped):
    """`qwenkit eval demo`: the scores of evaluate_held_out (the build's function), one prediction per
    reply with the checks it counted in."""
    from qwenkit.eval import TASKS, EvalSettings, LocalBackend

    model, tokenizer = shipped
    result = TASKS["demo"].run(LocalBackend(model, tokenizer), EvalSettings(limit=4, progress=False))
    card = demo.evaluate_held_out(model, tokenizer, 4)
    assert result.metrics == {k: v["rate"] for k, v in card["scores"].items()}
    assert next(iter(result.metrics)) == "language"
    assert [p.prediction for p in result.predictions] == [s["reply"] for s in card["samples"]]
    for key, score in card["scores"].items():  # every counted check sits on one prediction
        passed = [p.extra["checks"][key] for p in result.predictions if key in p.extra["checks"]]
        assert len(passed) == score["n"] and sum(passed) / len(passed) == score["rate"]
    react = [p for p in result.predictions if p.subject == "react"]
    assert react and all(p.reference for p in react) and react[0].id.endswith("/react")
    assert all(p.correct == all(p.extra["checks"].values()) for p in result.predictions)


def test_the_model_card_gets_both_tables(tmp_path):
    """write_model_card fills the measured block and the generalization block (issue 17) of the card."""
    from qwenkit.demo.pipeline import CARD_BEGIN, CARD_END, GENERAL_BEGIN, GENERAL_END

    card = tmp_path / "card.md"
    card.write_text(
        f"# card\n{CARD_BEGIN}\nold\n{CARD_END}\ntext\n{GENERAL_BEGIN}\nold\n{GENERAL_END}\nend\n"
    )
    config = {"vocab_size": 3264, "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 768, "max_position_embeddings": 1024}  # fmt: skip
    loss = {"steps": 10, "first_loss": 8.0, "final_loss": 1.0, "val_loss": 1.1}
    report = {
        "config": config, "losses": {"pretrain": loss, "sft": loss}, "timings": {"sft": 60.0}, "minutes": 1.0,
        "settings": {"seed": 0, "held_out": 400, "data": "composed"}, "parameters": 4.8e6,
        "scores": {"language": {"rate": 0.5, "n": 4}},
        "generalization": {"handwritten": {"dont_know": {"rate": 0.25, "n": 16}},
                           "generated": {"dont_know": {"rate": 0.5, "n": 45}}},
    }  # fmt: skip
    demo.write_model_card(report, card)
    text = card.read_text()
    assert "old" not in text and text.startswith("# card\n") and text.endswith(f"{GENERAL_END}\nend\n")
    assert "| answers in the language of the question | 50.0% | 4 | >= 90% |" in text
    assert "| outside its knowledge: says it does not know | 25.0% (16) | 50.0% (45) | >= 80% |" in text
    assert "`composed` data" in text

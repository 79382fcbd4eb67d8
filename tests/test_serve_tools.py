"""Tool calls in the Hermes format over the OpenAI API (qwenkit.serve.api with a chat-template
checkpoint), driven live with the official `openai` client; and the same fitted model through the
agent's Hermes loop on the local decoder (one fit serves both: it is the slow part).

A random model does not write tool calls, so the module fits the tiny Qwen2.5-style checkpoint
(`qwen25_dir`) for a few dozen steps on two turns of one conversation: the reply to a weather
question is a `<tool_call>` block, and the reply after the tool's result is a sentence. What the
server then returns comes from the engine decoding that model, nothing is mocked; the prompts it
decodes are checked against transformers' `apply_chat_template` ids.
"""

import json
import re

import openai
import pytest
import torch
from conftest import LiveServer

import qwenkit
from qwenkit.agent.loop import Final, ToolCalled, ToolResult, local_complete, run_agent, tool_from_spec
from qwenkit.chat_template import encode_chat
from qwenkit.cli import main
from qwenkit.errors import QwenkitError
from qwenkit.serve.api import ChatRequest, create_app, plan_chat, resolve_tool_format

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]  # fmt: skip
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
RESULT = "sunny, 21 C"
ANSWER = "It is sunny in Paris, 21 degrees."
MARGIN = 2.0  # logits: each learned token over the next best, far beyond the repetition penalty


def with_result(call_message: dict, call_id: str | None) -> list[dict]:
    return [*QUESTION, call_message, {"role": "tool", "tool_call_id": call_id, "content": RESULT}]


def fit(model, tokenizer) -> None:
    """Teach the model both replies (loss on their tokens only) until greedy decoding gives them with
    a clear margin. One sequence holds both: the conversation after the tool result begins with the
    first prompt and the call, rendered as the model writes them."""
    call = {"role": "assistant", "tool_calls": [{"type": "function", "function": {
        "name": "get_weather", "arguments": {"city": "Paris"}}}]}  # fmt: skip
    first = encode_chat(tokenizer, QUESTION, tools=TOOLS)
    written = tokenizer.encode(CALL, allowed_special={"<tool_call>", "</tool_call>"}) + [tokenizer.im_end_id]
    second = encode_chat(tokenizer, with_result(call, None), tools=TOOLS)
    assert second[: len(first) + len(written)] == first + written
    ids = second + tokenizer.encode(ANSWER) + [tokenizer.im_end_id]
    learned = torch.zeros(len(ids) - 1, dtype=torch.bool)  # position i predicts token i + 1
    learned[len(first) - 1 : len(first) + len(written) - 1] = True
    learned[len(second) - 1 :] = True
    start = len(first) - 1  # the output head sees positions from here on: the prompt's logits cost most
    hook = model.lm_head.register_forward_pre_hook(lambda _, args: (args[0][:, start:],))
    inputs, target = torch.tensor([ids[:-1]]), torch.tensor(ids[1:])[learned]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    try:
        for _ in range(200):
            logits = model(inputs)[0][learned[start:]]
            right = logits.gather(1, target[:, None])[:, 0]
            others = logits.scatter(1, target[:, None], float("-inf")).max(dim=1).values
            if (right - others).min().item() > MARGIN:
                break
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(logits, target).backward()
            optimizer.step()
    finally:
        hook.remove()
    assert (right - others).min().item() > MARGIN, "the model did not learn the replies"


@pytest.fixture(scope="module")
def served(qwen25_dir):
    model, tokenizer = qwenkit.load(qwen25_dir, device="cpu", dtype="float32")
    model.train()
    fit(model, tokenizer)
    model.eval()
    server = LiveServer(create_app(model, tokenizer, "qwen25", max_batch=4))
    yield server, tokenizer
    server.stop()


def ask(client, messages=QUESTION, **kwargs):
    return client.chat.completions.create(model="qwen25", messages=messages, tools=TOOLS, temperature=0,
                                          max_tokens=40, **kwargs)  # fmt: skip


def streamed(client, messages=QUESTION, **kwargs) -> tuple[str, list[dict], str]:
    """(content, calls assembled from their deltas by index, finish_reason) of a streamed reply."""
    content, calls, reason = "", {}, None
    for chunk in ask(client, messages, stream=True, **kwargs):
        (choice,) = chunk.choices
        content += choice.delta.content or ""
        for delta in choice.delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            call["id"] += delta.id or ""
            call["name"] += delta.function.name or ""
            call["arguments"] += delta.function.arguments or ""
            assert delta.type in (None, "function")
        reason = choice.finish_reason or reason
    return content, [calls[k] for k in sorted(calls)], reason


def test_tool_call_replies_come_back_as_tool_calls_whole_and_streamed(served):
    server, _ = served
    client = server.client()
    assert server.app.state.tool_format == "hermes"  # auto: the template reads tools
    reply = ask(client)
    (choice,) = reply.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert re.fullmatch(r"call_[0-9a-f]{24}", call.id) and call.type == "function"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}

    content, calls, reason = streamed(client)
    assert content == "" and reason == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls] == [("get_weather", call.function.arguments)]
    assert re.fullmatch(r"call_[0-9a-f]{24}", calls[0]["id"])


def test_the_tool_result_round_trip_renders_as_transformers(served, qwen25_dir):
    transformers = pytest.importorskip("transformers")
    server, tokenizer = served
    client = server.client()
    choice = ask(client).choices[0]
    history = with_result(choice.message.model_dump(exclude_none=True), choice.message.tool_calls[0].id)
    after = ask(client, history)
    assert after.choices[0].message.content == ANSWER and after.choices[0].finish_reason == "stop"
    assert after.choices[0].message.tool_calls is None
    content, calls, reason = streamed(client, history)
    assert (content, calls, reason) == (ANSWER, [], "stop")

    reference = transformers.AutoTokenizer.from_pretrained(qwen25_dir)
    want = reference.apply_chat_template(history, tools=TOOLS, add_generation_prompt=True, tokenize=True,
                                         return_dict=False)  # fmt: skip
    plan = plan_chat(tokenizer, ChatRequest.model_validate(
        {"messages": history, "tools": TOOLS}, strict=False), "hermes")  # fmt: skip
    assert plan.prompt == list(want)
    assert after.usage.prompt_tokens == len(want)


def test_tool_choice_none_named_required_and_legacy(served):
    server, _ = served
    client = server.client()
    whole = ask(client, tool_choice="none")  # tools stay in the prompt (vLLM), no call is read
    assert whole.choices[0].finish_reason == "stop" and whole.choices[0].message.tool_calls is None
    assert whole.choices[0].message.content == CALL
    assert streamed(client, tool_choice="none") == (CALL, [], "stop")

    forced = [{"type": "function", "function": {"name": "get_weather"}}, "required"]
    for choice in forced:
        (call,) = ask(client, tool_choice=choice).choices[0].message.tool_calls
        assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
        _, calls, reason = streamed(client, tool_choice=choice)
        assert [(c["name"], c["arguments"]) for c in calls] == [("get_weather", call.function.arguments)]
        assert reason == "tool_calls"

    legacy = client.chat.completions.create(
        model="qwen25", messages=QUESTION, functions=[TOOLS[0]["function"]], temperature=0, max_tokens=40
    )
    assert legacy.choices[0].finish_reason == "function_call"
    assert legacy.choices[0].message.function_call.name == "get_weather"
    assert json.loads(legacy.choices[0].message.function_call.arguments) == {"city": "Paris"}


def test_forced_prompts_end_where_the_model_would_go_on(served):
    """A forced call's opening is a token prefix of the reply the model writes unforced."""
    _, tokenizer = served
    natural = tokenizer.encode(CALL, allowed_special={"<tool_call>", "</tool_call>"})
    question = encode_chat(tokenizer, QUESTION, tools=TOOLS)
    for choice in ({"type": "function", "function": {"name": "get_weather"}}, "required"):
        body = ChatRequest.model_validate(
            {"messages": QUESTION, "tools": TOOLS, "tool_choice": choice}, strict=False
        )
        plan = plan_chat(tokenizer, body, "hermes")
        assert plan.prompt[: len(question)] == question
        assert plan.prompt[len(question) :] == natural[: len(plan.prompt) - len(question)]


def test_tool_format_choice(served, official_tokenizer):
    _, tokenizer = served
    assert resolve_tool_format(tokenizer) == "hermes"
    assert resolve_tool_format(tokenizer, "react") == "react"
    assert resolve_tool_format(official_tokenizer) == "react"  # no chat template
    with pytest.raises(QwenkitError, match="chat template"):
        resolve_tool_format(official_tokenizer, "hermes")
    body = ChatRequest.model_validate({"messages": QUESTION, "tools": TOOLS}, strict=False)
    react = plan_chat(tokenizer, body, "react")  # the original format stays available
    assert "Question: What is the weather in Paris?" in tokenizer.decode(react.prompt) and react.react


def test_the_agent_loop_reads_the_same_model_locally(served):
    """The fitted model driven by qwenkit.agent's Hermes loop on the local decoder (not the server):
    it calls the tool, gets its result as a tool message, and answers."""
    server, tokenizer = served
    model = server.app.state.model

    def get_weather(city: str) -> str:
        """The weather in a city."""
        return RESULT if city == "Paris" else "unknown"

    tool = tool_from_spec(TOOLS[0], get_weather)
    complete = local_complete(model, tokenizer, hermes=True, do_sample=False, max_new_tokens=40)
    events = list(run_agent("What is the weather in Paris?", complete, [tool], tool_format="hermes"))
    assert [(e.name, json.loads(e.arguments)) for e in events if isinstance(e, ToolCalled)] == [
        ("get_weather", {"city": "Paris"})
    ]
    assert [e.text for e in events if isinstance(e, ToolResult)] == [RESULT]
    assert events[-1] == Final(
        ANSWER, "final_answer", f"{CALL}\n<tool_response>\n{RESULT}\n</tool_response>\n{ANSWER}"
    )


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([*QUESTION, {"role": "assistant", "content": "Hi"}], "last message must be from the user"),
        (
            [
                *QUESTION,
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "c",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": "{oops"},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "c", "content": "x"},
            ],
            "not valid JSON",
        ),  # fmt: skip
        ([{"role": "user", "content": "hi", "tool_calls": [{"function": {"name": "f"}}]}], "only assistant"),
    ],
)
def test_bad_conversations_are_400s(served, messages, message):
    server, _ = served
    with pytest.raises(openai.BadRequestError, match=message):
        ask(server.client(), messages)


def test_serve_tool_format_hermes_without_a_template_is_one_line(tiny_checkpoint, capsys):
    assert main(["serve", "--model", str(tiny_checkpoint), "--tool-format", "hermes", "--port", "1"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "chat template reads tools" in err

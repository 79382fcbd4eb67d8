"""Serving: per-row decoding in the model, the continuous-batching engine, and the OpenAI API driven
live (uvicorn on a free port) with the official `openai` client.

The model is a tiny random one with a sharpened head (greedy choices far from ties), so its text is
noise: tests compare outputs between paths (alone vs batched, streamed vs whole, engine vs
`generate`), never against fixed strings. It does not write ReAct by itself, so function calling is
tested in two parts: the reply reader on written replies, and end to end with a named tool_choice,
where the server writes `Action: NAME` and the model only fills in the arguments.
"""

import dataclasses
import json
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest
import torch
from conftest import LiveServer

from qwenkit.errors import QwenkitError
from qwenkit.model import KVCache
from qwenkit.serve.api import ChatRequest, ReactOutput, create_app, plan_chat
from qwenkit.serve.engine import Engine, SamplingParams
from qwenkit.train.sft_data import tokenize_conversation

README = Path(__file__).resolve().parent.parent / "README.md"
TOOLS = [{"type": "function", "function": {"name": "calculator", "description": "Evaluate arithmetic.",
          "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}}}}]  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer(official_tokenizer):
    return official_tokenizer


@pytest.fixture(scope="module")
def model(served_model):
    return served_model


def random_prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 151643, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy_text(model, tokenizer, prompt: list[int], max_tokens: int, stop=()) -> str:
    """The reference: qwenkit.generation.generate's greedy continuation, decoded."""
    out = model.generate(prompt, max_new_tokens=max_tokens, do_sample=False, stop=list(stop))
    return tokenizer.decode([t for t in out[0, len(prompt) :].tolist() if t < tokenizer.n_bpe])


@pytest.fixture(scope="module")
def engine(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=3)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def server(model, tokenizer):
    live = LiveServer(create_app(model, tokenizer, "tiny", max_batch=4))
    yield live
    live.stop()


def chat(client, content: str, **settings):
    return client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": content}], **settings
    )


# ---- model and engine -------------------------------------------------------------------------


def test_decode_step_with_per_row_slots_equals_forward(model):
    """Rows of different lengths decode together, each at its own slot, within a narrowed width."""
    prompts = [random_prompt(n, n) for n in (7, 19, 12)]
    cache = KVCache(model.config, 3, 40, model.device, model.dtype)
    expected = []
    with torch.no_grad():
        for row, prompt in enumerate(prompts):
            scratch = KVCache(model.config, 1, len(prompt), model.device, model.dtype)
            model(torch.tensor([prompt]), cache=scratch)
            cache.insert([row], scratch)
            expected.append(model(torch.tensor([prompt + [5, 6]]))[0, -2:])
        view = cache.first_rows(3)
        steps = [
            model.decode_step(torch.tensor([[t]] * 3), view, width=int(view.slot.max()) + 1) for t in (5, 6)
        ]
    got = torch.stack(steps, dim=1)
    torch.testing.assert_close(got, torch.stack(expected), atol=1e-4, rtol=0)
    assert cache.slot.tolist() == [9, 21, 14]


def test_engine_greedy_equals_generate_alone_and_batched(model, tokenizer, engine):
    prompts = [random_prompt(n, n) for n in (5, 31, 12, 3, 20)]  # more than the 3 rows: some wait
    expected = [greedy_text(model, tokenizer, p, 24) for p in prompts]
    params = SamplingParams(max_tokens=24, temperature=0)
    assert engine.generate(prompts[1], params).text == expected[1]
    results = [None] * len(prompts)

    def run(i):
        results[i] = engine.generate(prompts[i], params)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert [r.text for r in results] == expected
    assert all(r.finish_reason == "length" and r.completion_tokens == 24 for r in results)
    assert [r.prompt_tokens for r in results] == [5, 31, 12, 3, 20]
    assert engine.active == 0


def test_engine_seeded_sampling_same_alone_or_batched(engine):
    prompt = random_prompt(9, 1)
    params = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=7)
    alone = engine.generate(prompt, params).text
    others = [threading.Thread(target=engine.generate, args=(random_prompt(15, s), SamplingParams(max_tokens=30)))
              for s in range(2)]  # fmt: skip
    [t.start() for t in others]
    batched = engine.generate(prompt, params).text
    [t.join() for t in others]
    assert batched == alone
    assert (
        engine.generate(prompt, SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=8)).text
        != alone
    )


def test_engine_stop_strings_are_cut_and_held_back(model, tokenizer, engine):
    prompt = random_prompt(6, 3)
    full = greedy_text(model, tokenizer, prompt, 30)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    streamed = list(engine.stream(prompt, SamplingParams(max_tokens=30, temperature=0, stop=[stop])))
    text = "".join(c.text for c in streamed)
    assert text == full[: full.index(stop)]
    assert streamed[-1].finish_reason == "stop"
    assert all(stop not in c.text for c in streamed)


def test_engine_honours_multi_token_stop_sequences(model, tokenizer):
    """A stop sequence of several tokens (a checkpoint's `stop_words_ids`) ends a request where it
    ends `generate`; as with a stop id, its tokens are not shown, in the engine and in stream_generate."""
    prompt = random_prompt(6, 3)
    full = model.generate(prompt, max_new_tokens=20, do_sample=False, stop=[])[0, 6:].tolist()
    stop = full[5:7]
    first = next(i for i in range(len(full) - 1) if full[i : i + 2] == stop)
    defaults = model.generation_config
    model.generation_config = dataclasses.replace(defaults, stop_words_ids=[stop])
    engine = Engine(model, tokenizer, max_batch=2)
    try:
        result = engine.generate(prompt, SamplingParams(max_tokens=20, temperature=0))
        ids = model.generate(prompt, max_new_tokens=20, do_sample=False)[0, 6:].tolist()
        streamed = "".join(model.stream_generate(tokenizer, prompt, max_new_tokens=20, do_sample=False))
    finally:
        engine.close()
        model.generation_config = defaults
    assert ids == full[: first + 2]
    assert result.finish_reason == "stop" and result.completion_tokens == first + 2
    assert result.text == streamed == tokenizer.decode(full[:first])


def test_engine_cancel_frees_the_row_within_a_step(engine):
    chunks = engine.stream(random_prompt(4, 2), SamplingParams(max_tokens=500, temperature=0))
    next(chunks)
    assert engine.active == 1
    steps = engine.steps
    chunks.close()  # the caller leaves early
    deadline = time.time() + 5
    while engine.active and time.time() < deadline:
        time.sleep(0.005)
    assert engine.active == 0
    assert engine.steps - steps <= 2


def test_engine_rejects_bad_requests(engine):
    from qwenkit import QwenkitError

    for prompt, params, message in [
        ([], SamplingParams(), "empty"),
        ([1] * 1024, SamplingParams(), "context window"),
        ([1, 2], SamplingParams(max_tokens=0), "max_tokens"),
        ([1, 2], SamplingParams(max_tokens=1023), "exceeds"),
        ([1, 2], SamplingParams(top_p=0), "top_p"),
        ([10**7], SamplingParams(), "token ids"),
    ]:
        with pytest.raises(QwenkitError, match=message):
            engine.generate(prompt, params)


# ---- chat prompts and replies ------------------------------------------------------------------


def test_tool_conversation_prompt_is_the_training_layout(tokenizer):
    """The serving prompt of a conversation that ends in a tool result is, token for token, the
    SFT data's rendering of the same conversation up to where the model continues."""
    call = {"id": "call_1", "type": "function",
            "function": {"name": "calculator", "arguments": '{"expression": "2+3"}'}}  # fmt: skip
    messages = [
        {"role": "system", "content": "Be exact."},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "What is 2+3? <|im_end|>"},
        {"role": "assistant", "content": "Let me compute.", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "5"},
    ]
    plan = plan_chat(tokenizer, ChatRequest(messages=messages, tools=TOOLS))
    trained = tokenize_conversation(
        tokenizer, messages + [{"role": "assistant", "content": "It is 5."}], tools=TOOLS
    ).input_ids
    assert plan.prompt == trained[: len(plan.prompt)]
    assert tokenizer.decode(plan.prompt).endswith("Observation: 5\nThought:")
    rest = tokenizer.decode(trained[len(plan.prompt) :])
    assert rest == " I now know the final answer\nFinal Answer: It is 5.<|im_end|>"
    assert plan.prompt.count(tokenizer.im_end_id) == 4  # the user's "<|im_end|>" text stayed text
    legacy = [
        m if m["role"] != "tool" else {"role": "function", "name": "calculator", "content": "5"}
        for m in messages[:4]
    ] + [  # fmt: skip
        {"role": "assistant", "content": "Let me compute.", "function_call": call["function"]},
        {"role": "function", "name": "calculator", "content": "5"},
    ]
    functions = [t["function"] for t in TOOLS]
    assert plan_chat(tokenizer, ChatRequest(messages=legacy, functions=functions)).prompt == plan.prompt


@pytest.mark.parametrize(
    ("reply", "content", "call"),
    [
        ("Thought: easy\nFinal Answer: 42 is it. ", "42 is it.", None),
        (
            'Thought: use it\nAction: calculator\nAction Input: {"expression": "6*7"}',
            "use it",
            ("calculator", '{"expression": "6*7"}'),
        ),  # fmt: skip
        (" I now know the final answer\nFinal Answer: 5", "5", None),  # continuing after "Thought:"
        ("Just some text.\n", "Just some text.", None),
        ("Thought: hmm\nAction: calculator", "hmm", None),  # cut before Action Input: no call
    ],
)
def test_react_reader_streamed_equals_whole(reply, content, call):
    pieces = [reply[i : i + 3] for i in range(0, len(reply), 3)]
    for parts in ([reply], pieces):
        reader = ReactOutput()
        sent = "".join(reader.feed(p) for p in parts)
        rest, parsed = reader.finish()
        assert (sent + rest).startswith(content)
        if call is None:
            assert parsed is None
        else:
            assert sent + rest == content
            assert (parsed.name, parsed.arguments) == call
    if reply.startswith("Thought: hmm"):
        assert sent + rest == "hmm\nAction: calculator"  # nothing of the reply is lost
    elif call is None:
        assert sent + rest == content


# ---- the live API -----------------------------------------------------------------------------


def test_chat_plain_and_streamed_give_the_same_greedy_text_and_usage(server, model, tokenizer):
    client = server.client()
    reply = chat(client, "Hello there", max_tokens=20, temperature=0)
    plan = plan_chat(tokenizer, ChatRequest(messages=[{"role": "user", "content": "Hello there"}]))
    stops = [[tokenizer.im_end_id], [tokenizer.im_start_id]]
    assert reply.choices[0].message.content == greedy_text(model, tokenizer, plan.prompt, 20, stops)
    assert reply.usage.prompt_tokens == len(plan.prompt)
    assert reply.usage.completion_tokens == 20 and reply.usage.total_tokens == len(plan.prompt) + 20
    assert reply.choices[0].finish_reason == "length" and reply.model == "tiny"
    chunks = list(chat(client, "Hello there", max_tokens=20, temperature=0, stream=True,
                       stream_options={"include_usage": True}))  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == len(plan.prompt)


def test_completions_stop_strings_n_and_seeds(server, model, tokenizer):
    client = server.client()
    prompt = "The capital of France is"
    expected = greedy_text(model, tokenizer, tokenizer.encode(prompt), 12)
    reply = client.completions.create(model="any-name", prompt=prompt, max_tokens=12, temperature=0, n=2)
    assert [c.text for c in reply.choices] == [expected, expected]
    assert reply.usage.prompt_tokens == len(tokenizer.encode(prompt)) and reply.usage.completion_tokens == 24
    echoed = client.completions.create(model="x", prompt=prompt, max_tokens=12, temperature=0, echo=True)
    assert echoed.choices[0].text == prompt + expected
    stop = expected[4:7]
    cut = client.completions.create(
        model="x", prompt=prompt, max_tokens=12, temperature=0, stop=[stop, "zzz"]
    )
    assert cut.choices[0].text == expected[: expected.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="x", prompt=prompt, max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected

    sampled = [chat(client, "Pick", max_tokens=16, seed=11, n=3, temperature=1.0) for _ in range(2)]
    texts = [[c.message.content for c in r.choices] for r in sampled]
    assert texts[0] == texts[1]  # reproducible
    assert len(set(texts[0])) == 3  # choice i samples with seed + i


def test_concurrent_clients_each_get_their_greedy_text(server):
    client = server.client()
    questions = [f"Question number {i}: " + "word " * (3 * i) for i in range(6)]  # 6 clients, 4 rows
    alone = [chat(client, q, max_tokens=16, temperature=0).choices[0].message.content for q in questions]
    together = [None] * len(questions)

    def ask(i):
        stream = i % 2 == 1
        reply = chat(client, questions[i], max_tokens=16, temperature=0, stream=stream)
        together[i] = (
            "".join(c.choices[0].delta.content or "" for c in reply)
            if stream
            else reply.choices[0].message.content
        )

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(questions))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert together == alone


def test_tool_calls_current_and_legacy_forms_whole_and_streamed(server, tokenizer):
    client = server.client()
    messages = [{"role": "user", "content": "What is 6 * 7?"}]
    named = {"type": "function", "function": {"name": "calculator"}}
    reply = client.chat.completions.create(
        model="tiny", messages=messages, tools=TOOLS, tool_choice=named, max_tokens=8, temperature=0
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "calculator" and call.id.startswith("call_") and call.function.arguments
    assert choice.message.content == "I need to call a tool."

    chunks = list(client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS,
                                                 tool_choice=named, max_tokens=8, temperature=0, stream=True))  # fmt: skip
    deltas = [c.choices[0].delta for c in chunks]
    streamed_calls = [d.tool_calls[0] for d in deltas if d.tool_calls]
    assert [(c.function.name, c.function.arguments) for c in streamed_calls] == [
        ("calculator", call.function.arguments)
    ]
    assert "".join(d.content or "" for d in deltas) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    legacy = client.chat.completions.create(
        model="tiny", messages=messages, functions=[TOOLS[0]["function"]], function_call={"name": "calculator"},
        max_tokens=8, temperature=0,
    )  # fmt: skip
    assert legacy.choices[0].finish_reason == "function_call"
    assert legacy.choices[0].message.function_call.name == "calculator"
    assert legacy.choices[0].message.function_call.arguments == call.function.arguments

    # The call and its result go back; the model continues the same assistant turn (noise here,
    # so the reply is plain content: what this proves is that the round trip is accepted).
    history = messages + [choice.message.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": call.id, "content": "42"}]  # fmt: skip
    after = client.chat.completions.create(
        model="tiny", messages=history, tools=TOOLS, max_tokens=8, temperature=0
    )
    assert after.choices[0].finish_reason in ("stop", "length")
    auto = client.chat.completions.create(
        model="tiny", messages=messages, tools=TOOLS, max_tokens=8, temperature=0
    )
    plan = plan_chat(tokenizer, ChatRequest(messages=messages, tools=TOOLS))
    assert "Question: What is 6 * 7?" in tokenizer.decode(plan.prompt)  # the ReAct instruction
    assert auto.usage.prompt_tokens == len(plan.prompt)


def test_client_disconnect_during_streaming_frees_the_slot(server):
    engine = server.app.state.engine
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Go on"}], "max_tokens": 900,
            "temperature": 0, "stream": True}  # fmt: skip
    with (
        httpx.Client(timeout=10) as http,
        http.stream("POST", f"{server.url}/v1/chat/completions", json=body) as r,
    ):
        lines = r.iter_lines()
        while '"content": ""' in (line := next(lines)) or not line.startswith("data: {"):
            pass  # until the first generated text arrives
        assert engine.active == 1
    deadline = time.time() + 10
    while engine.active and time.time() < deadline:
        time.sleep(0.01)
    assert engine.active == 0 and not engine.waiting


def test_client_disconnect_before_a_full_reply_frees_the_slot(server):
    """A non-streamed request is cancelled when its client leaves, not generated to the end."""
    engine = server.app.state.engine
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "Go on"}], "max_tokens": 900,
                       "temperature": 0}).encode()  # fmt: skip
    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.time() + 30
        while not engine.active and time.time() < deadline:
            time.sleep(0.005)
        assert engine.active == 1
        started = engine.steps
    deadline = time.time() + 10
    while engine.active and time.time() < deadline:
        time.sleep(0.01)
    assert engine.active == 0 and engine.steps - started < 900


BAD_REQUESTS = [
    ("chat", b'{"model": "x", "messages": [', "not valid JSON"),
    ("chat", b"[1, 2]", "JSON object"),
    ("chat", {"model": "x"}, "messages"),
    ("chat", {"messages": "hello"}, "messages"),
    ("chat", {"messages": []}, "messages"),
    ("chat", {"messages": [{"role": "robot", "content": "hi"}]}, "role"),
    ("chat", {"messages": [{"role": "user", "content": 5}]}, "content"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, "max_tokens"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}, "max_tokens"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}, "context window"),
    ("chat", {"messages": [{"role": "user", "content": "word " * 1100}]}, "context window"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "n": 0}, "n must be"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "n": 17}, "n must be"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "temperature": 3}, "temperature"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "stop": [""]}, "stop"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "seed": -1}, "seed"),
    (
        "chat",
        {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21},
        "top_logprobs",
    ),
    ("chat", {"messages": [{"role": "tool", "content": "5"}]}, "tool result"),
    ("chat", {"messages": [{"role": "assistant", "content": "hi"}]}, "last message"),
    (
        "chat",
        {
            "messages": [{"role": "user", "content": "hi"}],
            "tools": TOOLS,
            "tool_choice": {"type": "function", "function": {"name": "nope"}},
        },
        "not among",
    ),  # fmt: skip
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools"),
    (
        "chat",
        {"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 0},
        "max_tokens",
    ),
    ("completions", {"prompt": ""}, "empty"),
    ("completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("completions", {"prompt": [10**7]}, "token ids"),
    ("completions", {}, "prompt"),
    (
        "chat",
        {"messages": [{"role": "user", "content": "hi"}], "repetition_penalty": 1e-40},
        "repetition_penalty",
    ),
    ("completions", {"prompt": "hi", "repetition_penalty": 1000}, "repetition_penalty"),
    ("completions", b'{"prompt": "hi", "repetition_penalty": Infinity}', "finite"),
    ("completions", b'{"prompt": "hi", "temperature": NaN}', "temperature"),
    ("completions", b'{"prompt": "hi", "top_p": NaN}', "finite"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "stop": list("abcde")}, "at most 4 stop"),
    ("completions", {"prompt": "hi", "stop": ["ab" * 1024] * 2000}, "at most 4 stop"),
    ("completions", {"prompt": "hi", "stop": "x" * 257}, "at most 256 characters"),
    (
        "chat",
        {"messages": [{"role": "user", "content": "hi"}], "stop": ["x" * 257]},
        "at most 256 characters",
    ),
]


@pytest.mark.parametrize(("route", "body", "message"), BAD_REQUESTS)
def test_bad_requests_get_a_4xx_with_openai_error_json(server, route, body, message):
    url = f"{server.url}/v1/{'chat/completions' if route == 'chat' else route}"
    if isinstance(body, bytes):
        response = httpx.post(url, content=body, headers={"Content-Type": "application/json"})
    else:
        response = httpx.post(url, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert message in error["message"]
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def sse_data(url: str, body: dict, first_text: threading.Event | None = None) -> list[str]:
    """The data fields of a streamed response, in order; `first_text` is set once text arrived."""
    data = []
    with httpx.stream("POST", url, json=body, timeout=60) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: "):
                data.append(line.removeprefix("data: "))
                if first_text is not None and '"text": "' in data[-1] and '"text": ""' not in data[-1]:
                    first_text.set()
    return data


def streamed_text(data: list[str]) -> str:
    chunks = [json.loads(d) for d in data if d != "[DONE]"]
    return "".join(c["choices"][0]["text"] for c in chunks if c["choices"])


def test_a_request_that_fails_inside_the_engine_ends_alone(server, monkeypatch):
    """Fault isolation: when picking one request's token raises (injected in the per-row sampling of
    seed 999, the model and everything else real), that request ends with an OpenAI error (a stream
    with an error event and [DONE], a whole reply with a 500) and the requests decoded beside it go
    on to the same text they give without it."""
    from qwenkit import generation

    engine, real_pick = server.app.state.engine, generation.pick_tokens
    calls, running_at_failure = {}, []

    def pick_or_fail(logits, seen, config, generator):
        if generator is not None and generator.initial_seed() == 999:
            calls[generator] = calls.get(generator, 0) + 1
            if calls[generator] == 3:
                running_at_failure.append(engine.active)
                raise RuntimeError("injected sampling fault")
        return real_pick(logits, seen, config, generator)

    monkeypatch.setattr(generation, "pick_tokens", pick_or_fail)
    url = f"{server.url}/v1/completions"
    others = [
        {"prompt": "The first neighbour", "max_tokens": 60, "temperature": 0, "stream": True},
        {"prompt": "A sampled neighbour", "max_tokens": 60, "temperature": 0.8, "top_p": 1.0, "seed": 5,
         "stream": True},
        {"prompt": "The third one", "max_tokens": 60, "temperature": 0, "repetition_penalty": 1.2, "stream": True},
    ]  # fmt: skip

    def run_others(during=None) -> list[list[str]]:
        results, started = [None] * len(others), [threading.Event() for _ in others]

        def run(i):
            results[i] = sse_data(url, others[i], started[i])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(others))]
        [t.start() for t in threads]
        if during is not None:
            assert all(event.wait(30) for event in started)
            during()
        [t.join() for t in threads]
        return results

    expected = [streamed_text(data) for data in run_others()]
    failing = {}

    def fail_one_streamed_and_one_whole():
        body = {"messages": [{"role": "user", "content": "Fail"}], "max_tokens": 50, "temperature": 1.0,
                "top_p": 1.0, "seed": 999, "stream": True}  # fmt: skip
        failing["stream"] = sse_data(f"{server.url}/v1/chat/completions", body)
        failing["whole"] = httpx.post(url, json={"prompt": "Fail", "max_tokens": 50, "top_p": 1.0, "seed": 999},
                                      timeout=60)  # fmt: skip

    results = run_others(during=fail_one_streamed_and_one_whole)
    assert running_at_failure == [4, 4]  # each failure came while the three others were decoding
    for data, text in zip(results, expected, strict=True):
        assert data[-1] == "[DONE]" and streamed_text(data) == text
        assert json.loads(data[-2])["choices"][0]["finish_reason"] == "length"
    *_, error_event, done = failing["stream"]
    error = json.loads(error_event)["error"]
    assert done == "[DONE]" and error["type"] == "server_error"
    assert "injected sampling fault" in error["message"]
    assert failing["whole"].status_code == 500
    assert "injected sampling fault" in failing["whole"].json()["error"]["message"]
    deadline = time.time() + 10
    while engine.active and time.time() < deadline:
        time.sleep(0.01)
    assert engine.active == 0


def test_tiny_temperature_is_greedy_beside_other_streams(server):
    """Temperature 1e-45 once made sampling fail inside the engine, ending every stream beside it."""
    client = server.client()
    prompts = [f"Tell me about number {i}" for i in range(4)]
    greedy = [
        client.completions.create(model="x", prompt=p, max_tokens=24, temperature=0).choices[0].text
        for p in prompts
    ]
    results = [None] * len(prompts)

    def run(i):
        temperature = 1e-45 if i == 0 else 0
        body = {"prompt": prompts[i], "max_tokens": 24, "temperature": temperature, "stream": True}
        results[i] = sse_data(f"{server.url}/v1/completions", body)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert all(data[-1] == "[DONE]" for data in results)
    assert [streamed_text(data) for data in results] == greedy


def test_oversized_bodies_get_413_whether_sized_or_chunked(server):
    from qwenkit.serve.api import MAX_BODY_BYTES

    url = f"{server.url}/v1/completions"
    body = b'{"prompt": "' + b"a" * MAX_BODY_BYTES + b'"}'

    def chunked():
        for start in range(0, len(body), 2**20):
            yield body[start : start + 2**20]

    for content in (body, chunked()):
        response = httpx.post(url, content=content, headers={"Content-Type": "application/json"}, timeout=60)
        assert response.status_code == 413
        error = response.json()["error"]
        assert error["code"] == "request_too_large" and str(MAX_BODY_BYTES) in error["message"]
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_prompts_are_tokenized_off_the_event_loop(server, tokenizer, monkeypatch):
    """While a long prompt is being tokenized (held there until /health has answered), the event loop
    serves other requests: tokenizing happens in worker threads, never on the loop's own thread."""
    threads, started, release = set(), threading.Event(), threading.Event()
    encode = tokenizer.encode

    def watched_encode(text, *args, **kwargs):
        threads.add(threading.get_ident())
        if len(text) > 10**6:
            started.set()
            release.wait(timeout=30)
        return encode(text, *args, **kwargs)

    monkeypatch.setattr(tokenizer, "encode", watched_encode)
    long_text = "word " * 300_000  # 1.5 MB: within the body limit, far beyond the context window
    for route, body in [
        ("chat/completions", {"messages": [{"role": "user", "content": long_text}]}),
        ("completions", {"prompt": long_text}),
    ]:
        started.clear()
        release.clear()
        replies = []
        sender = threading.Thread(
            target=lambda: replies.append(httpx.post(f"{server.url}/v1/{route}", json=body, timeout=60))  # noqa: B023
        )
        sender.start()
        try:
            assert started.wait(30)
            assert httpx.get(f"{server.url}/health", timeout=10).json()["status"] == "ok"
        finally:
            release.set()
            sender.join()
        assert replies[0].status_code == 400 and "context window" in replies[0].json()["error"]["message"]
    assert threads and server.thread.ident not in threads


def test_api_key_unknown_routes_and_models(model, tokenizer):
    live = LiveServer(create_app(model, tokenizer, "tiny", api_key="sekret", max_batch=2))
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            response = httpx.get(f"{live.url}/v1/models", headers=headers)
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            chat(live.client("wrong"), "hi", max_tokens=2)
        assert chat(live.client("sekret"), "hi", max_tokens=2).usage.completion_tokens == 2
        assert [m.id for m in live.client("sekret").models.list()] == ["tiny"]
        assert httpx.get(f"{live.url}/health").status_code == 200  # health needs no key
        missing = httpx.get(f"{live.url}/v1/nothing", headers={"Authorization": "Bearer sekret"})
        assert missing.status_code == 404 and "error" in missing.json()
    finally:
        live.stop()


def readme_serve_section() -> str:
    text = README.read_text()
    return text[text.index("### Serve (OpenAI-compatible API)") :].split("\n## ", 1)[0]


def test_readme_examples_run_as_written(server, capsys):
    section = readme_serve_section().replace("127.0.0.1:8000", f"127.0.0.1:{server.port}")
    blocks = re.findall(r"```(\w+)\n(.*?)```", section, flags=re.S)
    curls = [code for lang, code in blocks if lang == "bash" and code.startswith("curl")]
    pythons = [code for lang, code in blocks if lang == "python"]
    assert curls and len(pythons) == 2
    for command in curls:
        out = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60, check=True)
        assert json.loads(out.stdout)["object"] == "chat.completion"
    namespace: dict = {}
    for code in pythons:
        exec(code, namespace)  # the README's own client code, run against the live server
    assert "CompletionUsage" in capsys.readouterr().out


def test_serve_verb_rejects_a_bad_batch_size(capsys):
    from qwenkit.cli import main

    assert main(["serve", "--max-batch", "0"]) == 1
    assert "--max-batch" in capsys.readouterr().err


def test_serve_verb_takes_the_key_from_the_environment(monkeypatch, capsys):
    from qwenkit.cli import main

    monkeypatch.setenv("QWENKIT_API_KEY", "  ")
    assert main(["serve"]) == 1
    assert (
        capsys.readouterr().err
        == "qwenkit: error: --api-key (or QWENKIT_API_KEY) is empty; give a key or leave it unset\n"
    )
    monkeypatch.setenv("QWENKIT_API_KEY", "from-env")
    served = {}
    monkeypatch.setattr("uvicorn.run", lambda app, **options: served.update(app=app, **options))
    assert main(["serve", "--port", "8123"]) == 0
    capsys.readouterr()
    live = LiveServer(served["app"])
    try:
        assert httpx.get(f"{live.url}/v1/models").status_code == 401
        assert (
            httpx.get(f"{live.url}/v1/models", headers={"Authorization": "Bearer from-env"}).status_code
            == 200
        )
    finally:
        live.stop()


# ---- KV memory budget -------------------------------------------------------------------------


def test_kv_memory_settings_parse_or_fail_in_one_line(capsys):
    from qwenkit.cli import main
    from qwenkit.serve.engine import parse_kv_memory

    assert parse_kv_memory("2GiB") == 2 * 2**30 and parse_kv_memory("512MB") == 512 * 10**6
    assert parse_kv_memory("1.5 gib") == 3 * 2**29 and parse_kv_memory("0.3") == 0.3
    for bad in ("abc", "0", "1.5", "-1GB", "0GB", "2 parsecs", ""):
        with pytest.raises(QwenkitError, match="invalid KV memory"):
            parse_kv_memory(bad)
    assert main(["serve", "--kv-memory", "lots"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        "qwenkit serve: error: argument --kv-memory: invalid KV memory 'lots': use a size such as 2GiB "
        "or 512MB, or a fraction such as 0.3"
    )


def test_engine_kv_budget_queues_what_does_not_fit_and_never_exceeds_it(model, tokenizer, monkeypatch):
    """Requests that together need more KV memory than the budget all complete with their text alone
    (the ones that do not fit wait); the decoder's cache, with a prefill's own, never holds more than
    the budget; a request that could never fit is refused with what would fit."""
    size = lambda rows, slots: KVCache.size_in_bytes(model.config, rows, slots, model.dtype)  # noqa: E731
    budget = size(1, 256) + size(1, 64)  # about 3 requests of 76 tokens at once
    prompts = [random_prompt(n, 40 + n) for n in (60, 41, 52, 33, 57)]
    expected = [greedy_text(model, tokenizer, p, 16) for p in prompts]
    engine = Engine(model, tokenizer, max_batch=4, kv_memory_bytes=budget)
    peaks, running, forward, decode = [], [], model.forward, engine.decoder.decode

    def measured_forward(*args, cache=None, **kwargs):  # a prefill: its cache beside the decoder's
        peaks.append(engine.decoder.cache.nbytes + (cache.nbytes if cache is not None else 0))
        return forward(*args, cache=cache, **kwargs)

    def measured_decode():
        running.append(len(engine.decoder.running))
        peaks.append(engine.decoder.cache.nbytes)
        return decode()

    monkeypatch.setattr(model, "forward", measured_forward)
    monkeypatch.setattr(engine.decoder, "decode", measured_decode)
    try:
        results = [None] * len(prompts)
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(
            i, engine.generate(prompts[i], SamplingParams(max_tokens=16, temperature=0)))) for i in range(5)]  # fmt: skip
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert [r.text for r in results] == expected
        assert max(peaks) <= budget and 1 < max(running) < 5  # batched, yet some waited
        assert engine.decoder.cache.nbytes == 0  # freed when idle
        with pytest.raises(QwenkitError, match=r"KV memory budget .*max_tokens can be at most \d+$"):
            engine.generate(prompts[0], SamplingParams(max_tokens=600))
        with pytest.raises(QwenkitError, match="KV memory budget .* shorten the prompt"):
            engine.generate(random_prompt(300, 1), SamplingParams(max_tokens=1))
        settings = engine.validate(prompts[0], SamplingParams())  # no max_tokens: as many as fit
        most = settings.config.max_new_tokens
        assert most > 16 and engine.decoder.fits_alone(60, most)
        assert not engine.decoder.fits_alone(60, most + 1)
    finally:
        engine.close()


def test_api_reports_context_length_and_kv_budget_and_refuses_what_never_fits(model, tokenizer):
    from fastapi.testclient import TestClient

    budget = KVCache.size_in_bytes(model.config, 1, 256, model.dtype) * 2
    with TestClient(create_app(model, tokenizer, "tiny", max_batch=2, kv_memory=f"{budget}B")) as client:
        (card,) = client.get("/v1/models").json()["data"]
        assert card["id"] == "tiny" and card["max_model_len"] == 1024  # vLLM's name for the context
        kv = client.get("/health").json()["kv_cache"]
        assert kv["budget_bytes"] == budget and kv["tokens"] == budget // kv["bytes_per_token"]
        c = model.config  # keys and values of every layer in fp32, and the int64 position
        assert kv["bytes_per_token"] == 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 4 + 8
        refused = client.post("/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 900})
        assert refused.status_code == 400
        error = refused.json()["error"]
        assert "KV memory budget" in error["message"] and error["param"] == "max_tokens"
        fine = client.post("/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 3})
        assert fine.status_code == 200 and fine.json()["usage"]["completion_tokens"] == 3
    app = create_app(model, tokenizer, "tiny", max_batch=2, kv_memory=0.5)
    try:
        assert 0 < app.state.engine.kv_budget <= psutil.virtual_memory().total // 2
    finally:
        app.state.engine.close()


def test_serve_verb_reports_the_kv_budget_at_start(monkeypatch, capsys):
    from qwenkit.cli import main

    served = {}
    monkeypatch.setattr("uvicorn.run", lambda app, **options: served.update(app=app))
    assert main(["serve", "--kv-memory", "64MiB", "--max-batch", "4"]) == 0
    err = capsys.readouterr().err
    engine = served["app"].state.engine
    try:
        assert engine.kv_budget == 64 * 2**20
        report = engine.kv_report()
        tokens, per_token = report["tokens"], report["bytes_per_token"]
        assert f"KV cache budget 0.06 GiB ({tokens:,} tokens at {per_token:,} bytes per token" in err
        assert "up to 4 rows" in err
    finally:
        engine.close()

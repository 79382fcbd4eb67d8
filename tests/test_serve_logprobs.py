"""Log-probabilities through the OpenAI API (qwenkit.serve.api, engine.score): /v1/completions'
legacy `logprobs` with echo and scoring-only requests, chat's `logprobs`/`top_logprobs`, streamed
and whole, read with the official openai client and checked against log_softmax of the model's own
logits and of transformers' on the same weights."""

import httpx
import pytest
import torch
from conftest import LiveServer, to_transformers

from qwenkit.serve.api import create_app, token_piece


@pytest.fixture(scope="module")
def tokenizer(official_tokenizer):
    return official_tokenizer


@pytest.fixture(scope="module")
def model(served_model):
    return served_model


@pytest.fixture(scope="module")
def server(model, tokenizer):
    live = LiveServer(create_app(model, tokenizer, "tiny", max_batch=4))
    yield live
    live.stop()


def reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of qwenkit's logits for `ids` [T, V]: row t is the distribution of token t + 1."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)


def random_prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 151643, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_echo_logprobs_of_prompt_and_reply_equal_the_models_and_transformers(server, model, tokenizer):
    client = server.client()
    text = "The quick brown fox jumps over the lazy dog. Ünïcödé 你好 龘"
    prompt = tokenizer.encode(text)
    out = client.completions.create(
        model="tiny", prompt=text, echo=True, logprobs=2, max_tokens=4, temperature=0
    )
    choice = out.choices[0]
    lp = choice.logprobs
    ids = (
        prompt + model.generate(prompt, max_new_tokens=4, do_sample=False, stop=[])[0, len(prompt) :].tolist()
    )
    assert lp.tokens == [token_piece(tokenizer, t) for t in ids] and len(ids) == len(prompt) + 4
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ours = reference_logprobs(model, ids)
    expected = ours[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    torch.testing.assert_close(torch.tensor(lp.token_logprobs[1:]), expected, atol=1e-4, rtol=0)
    hf = to_transformers(model)
    with torch.no_grad():
        theirs = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)
    torch.testing.assert_close(
        torch.tensor(lp.token_logprobs[1:]),
        theirs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])],
        atol=1e-4,
        rtol=0,
    )
    for k, top in enumerate(lp.top_logprobs[1:]):  # the top two, plus the chosen token when it is not
        best = ours[k].topk(2)
        assert sorted(top.values(), reverse=True)[:2] == pytest.approx(best.values.tolist(), abs=1e-4)
        assert top[lp.tokens[k + 1]] == lp.token_logprobs[k + 1]
    for k in range(len(prompt), len(ids)):  # greedy reply tokens are the most likely ones
        assert lp.token_logprobs[k] == max(lp.top_logprobs[k].values())
    assert choice.text.startswith(text)
    # a character split across tokens counts from the token that completes it
    assert lp.text_offset[: len(prompt)] == [
        len(tokenizer.decode(prompt[:k], errors="ignore")) for k in range(len(prompt))
    ]
    assert lp.text_offset[len(prompt)] == len(text)
    split = [k for k, t in enumerate(prompt) if not tokenizer.decode([t], errors="ignore")]
    assert split and [lp.tokens[k] for k in split] == [
        "bytes:" + "".join(f"\\x{b:02x}" for b in tokenizer.token_bytes(prompt[k])) for k in split
    ]  # 龘's bytes are split across tokens


def test_scoring_only_many_prompts_queue_and_equal_the_models(server, model):
    """lm-eval's loglikelihood request: token-id prompts, echo, max_tokens 0, logprobs 1; 20 prompts
    (more than the 16 a request once took) of different lengths."""
    prompts = [random_prompt(3 + 7 * (i % 5), i) for i in range(20)]
    out = httpx.post(f"{server.url}/v1/completions", timeout=120, json={
        "model": "tiny", "prompt": prompts, "echo": True, "max_tokens": 0, "logprobs": 1, "temperature": 0,
    }).json()  # fmt: skip
    assert [c["index"] for c in out["choices"]] == list(range(20))
    assert out["usage"]["completion_tokens"] == 0 and out["usage"]["prompt_tokens"] == sum(map(len, prompts))
    for p, choice in zip(prompts, out["choices"], strict=True):
        assert choice["finish_reason"] == "length" and len(choice["logprobs"]["tokens"]) == len(p)
        expected = reference_logprobs(model, p)[torch.arange(len(p) - 1), torch.tensor(p[1:])]
        torch.testing.assert_close(
            torch.tensor(choice["logprobs"]["token_logprobs"][1:]), expected, atol=1e-4, rtol=0
        )
        assert all(len(top) in (1, 2) for top in choice["logprobs"]["top_logprobs"][1:])
    full = random_prompt(1024, 99)  # the whole context window: scored in chunks of positions
    out = httpx.post(f"{server.url}/v1/completions", timeout=120, json={
        "model": "tiny", "prompt": full, "echo": True, "max_tokens": 0, "logprobs": 0,
    }).json()  # fmt: skip
    with torch.no_grad():
        last = torch.log_softmax(model(torch.tensor([full[:-1]]), last_only=True)[0, -1].float(), dim=-1)
    assert out["choices"][0]["logprobs"]["token_logprobs"][-1] == pytest.approx(
        float(last[full[-1]]), abs=1e-4
    )


def test_streamed_logprobs_equal_whole_and_chat_logprobs(server, model, tokenizer):
    client = server.client()
    prompt = random_prompt(9, 7)
    for echo in (False, True):
        settings = dict(
            model="tiny", prompt=prompt, logprobs=3, max_tokens=6, temperature=0.8, seed=3, echo=echo
        )
        whole = client.completions.create(**settings).choices[0].logprobs
        streamed = {"tokens": [], "token_logprobs": [], "text_offset": []}
        for event in client.completions.create(stream=True, **settings):
            if event.choices and event.choices[0].logprobs:
                for key in streamed:
                    streamed[key] += getattr(event.choices[0].logprobs, key)
        assert streamed == {key: getattr(whole, key) for key in streamed}
        assert len(whole.tokens) == 6 + 9 * echo and whole.text_offset[0] == 0

    message = [{"role": "user", "content": "hello there"}]
    reply = client.chat.completions.create(model="tiny", messages=message, max_tokens=5, temperature=0,
                                           logprobs=True, top_logprobs=2)  # fmt: skip
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == 5
    for entry in content:
        assert [t.logprob for t in entry.top_logprobs] == sorted(
            [t.logprob for t in entry.top_logprobs], reverse=True
        )
        assert entry.logprob == entry.top_logprobs[0].logprob  # greedy
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token
    chunks = client.chat.completions.create(model="tiny", messages=message, max_tokens=5, temperature=0,
                                            logprobs=True, top_logprobs=2, stream=True)  # fmt: skip
    streamed_content = [
        e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
    ]
    assert [(e.token, e.logprob) for e in streamed_content] == [(e.token, e.logprob) for e in content]
    plain = client.chat.completions.create(model="tiny", messages=message, max_tokens=2)
    assert plain.choices[0].logprobs is None


@pytest.mark.parametrize(
    "body, message",
    [
        ({"prompt": "hi", "logprobs": 6}, "logprobs"),
        ({"prompt": "hi", "max_tokens": 0}, "needs echo"),
        ({"prompt": [[1, 2]] * 1025}, "at most 1024 prompts"),
        ({"prompt": [5] * 2000, "echo": True, "max_tokens": 0, "logprobs": 1}, "context window"),
    ],
)
def test_bad_logprob_requests_get_a_400(server, body, message):
    response = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", **body}, timeout=60)
    assert response.status_code == 400 and message in response.json()["error"]["message"]


def test_chat_top_logprobs_needs_logprobs(server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400 and "top_logprobs" in response.json()["error"]["message"]


def test_engine_scores_between_decoding_steps_of_running_requests(model, tokenizer):
    """Scoring runs in the engine thread while other requests decode: both give what they give alone."""
    from qwenkit.generation import score_prompts
    from qwenkit.serve.engine import Engine, SamplingParams

    engine = Engine(model, tokenizer, max_batch=2, prefill_tokens=64)  # several scoring batches
    try:
        params = SamplingParams(max_tokens=12, temperature=0, logprobs=1)
        alone = engine.generate(random_prompt(5, 1), params)
        prompts = [random_prompt(4 + 3 * i, 10 + i) for i in range(12)]
        stream = engine.stream(random_prompt(5, 1), params)
        first = next(stream)
        scored = engine.score(prompts, top=2)
        rest = list(stream)
        assert first.text + "".join(c.text for c in rest) == alone.text
        assert [e.logprob for c in [first, *rest] for e in c.logprobs] == [e.logprob for e in alone.logprobs]
        assert len(alone.logprobs) == alone.completion_tokens
        for got, expected in zip(scored, score_prompts(model, prompts, top=2), strict=True):
            assert got[0] is None and [(e.token, [t for t, _ in e.top]) for e in got[1:]] == [
                (e.token, [t for t, _ in e.top]) for e in expected[1:]
            ]  # the same tokens; the numbers up to float noise of another batch composition
            assert [e.logprob for e in got[1:]] == pytest.approx([e.logprob for e in expected[1:]], abs=1e-5)
        with pytest.raises(Exception, match="context window"):
            engine.score([[1] * 2000])
    finally:
        engine.close()


def test_engine_scores_within_its_kv_budget(model, tokenizer):
    """Scoring batches hold their own KV cache: they stay within the budget (one prompt at a time
    here), and a prompt whose cache could never fit is refused at once."""
    from qwenkit.generation import score_prompts
    from qwenkit.serve.engine import Engine

    probe = Engine(model, tokenizer, max_batch=1)
    per_prompt = probe.decoder.kv_bytes(1, 40)
    probe.close()
    engine = Engine(model, tokenizer, max_batch=2, kv_memory_bytes=per_prompt + per_prompt // 2)
    try:
        prompts = [random_prompt(30 + i, 20 + i) for i in range(4)]
        scored = engine.score(prompts)
        for got, expected in zip(scored, score_prompts(model, prompts), strict=True):
            assert [e.logprob for e in got[1:]] == pytest.approx([e.logprob for e in expected[1:]], abs=1e-5)
        with pytest.raises(Exception, match="KV memory budget"):
            engine.score([random_prompt(80, 1)])
    finally:
        engine.close()

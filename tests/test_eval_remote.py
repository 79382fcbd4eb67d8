"""qwenkit.eval.remote: ApiBackend against a live `qwenkit serve` app gives what LocalBackend gives on
the same model (log-probabilities within 1e-4, greedy text equal), and reports server errors in one line."""

import socket

import pytest
import torch
from conftest import LiveServer

from qwenkit.errors import QwenkitError
from qwenkit.eval.base import LocalBackend
from qwenkit.eval.remote import ApiBackend, api_root
from qwenkit.serve.api import create_app


@pytest.fixture(scope="module")
def tokenizer(official_tokenizer):
    return official_tokenizer


@pytest.fixture(scope="module")
def server(served_model, tokenizer):
    live = LiveServer(create_app(served_model, tokenizer, "tiny", api_key="sekret", max_batch=4))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def backends(served_model, tokenizer, server):
    remote = ApiBackend(server.url, tokenizer, api_key="sekret", batch_size=3)
    yield LocalBackend(served_model, tokenizer, batch_size=3), remote
    remote.close()


def prompts(tokenizer) -> list[list[int]]:
    texts = [
        "Question: 2 + 3 =\nAnswer:",
        "The capital of France is",
        "A",
        "one two three four five six seven",
    ]
    return [tokenizer.encode(t) for t in texts] + [
        torch.randint(0, 151643, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    ]


def test_api_root():
    assert api_root("http://h:1") == "http://h:1/v1"
    assert api_root("http://h:1/v1/") == "http://h:1/v1"
    assert api_root("http://h:1/v1/completions") == "http://h:1/v1"


def test_model_name_and_window(backends):
    local, remote = backends
    assert remote.name == "tiny"
    assert remote.context_length == local.context_length == 1024


def test_next_token_logprobs_equal_local(backends, tokenizer):
    local, remote = backends
    candidates = [tokenizer.encode(f" {c}")[0] for c in "ABCD"]
    got, want = (
        remote.next_token_logprobs(prompts(tokenizer), candidates),
        local.next_token_logprobs(prompts(tokenizer), candidates),
    )
    assert len(got) == 5 and all(len(row) == 4 for row in got)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-4, rtol=0)
    # and argmax decides the same choice for every prompt
    assert [max(range(4), key=r.__getitem__) for r in got] == [max(range(4), key=r.__getitem__) for r in want]


def test_score_equals_local(backends, tokenizer):
    local, remote = backends
    got, want = remote.score(prompts(tokenizer)), local.score(prompts(tokenizer))
    for g, w, p in zip(got, want, prompts(tokenizer), strict=True):
        assert len(g) == len(p) and g[0] is None and w[0] is None
        torch.testing.assert_close(torch.tensor(g[1:]), torch.tensor(w[1:]), atol=1e-4, rtol=0)


def test_generate_equals_local(backends, tokenizer):
    local, remote = backends
    got = remote.generate(prompts(tokenizer), max_new_tokens=12)
    assert got == local.generate(prompts(tokenizer), max_new_tokens=12)
    assert any(got)
    # a stop string cuts both the same way (the first two characters of a reply as the stop)
    stop = next(t for t in got if len(t) > 3)[1:3]
    cut = remote.generate(prompts(tokenizer), max_new_tokens=12, stop=[stop, "x", "y", "z", "w"])
    assert cut == local.generate(prompts(tokenizer), max_new_tokens=12, stop=[stop, "x", "y", "z", "w"])
    assert all(stop not in t for t in cut)


def test_errors_are_one_line(server, tokenizer):
    with pytest.raises(QwenkitError, match="answered 401"):
        ApiBackend(server.url, tokenizer, api_key="wrong")
    with pytest.raises(QwenkitError, match="no model 'other'.*tiny"):
        ApiBackend(server.url, tokenizer, api_key="sekret", model="other")
    remote = ApiBackend(server.url, tokenizer, api_key="sekret")
    with pytest.raises(QwenkitError, match="answered 400: .*context") as info:
        remote.score([[1] * 2000])
    assert "\n" not in str(info.value)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(QwenkitError, match="cannot reach the server"):
        ApiBackend(f"http://127.0.0.1:{port}", tokenizer)

"""qwenkit.eval.long_ppl: perplexity at several lengths under the four long-context settings, checked
against exp(mean NLL) from the model's own logits; the switches change the number past the training
length and not within it."""

import math

import pytest
import torch
from conftest import make_tiny_model, sharpen

from qwenkit.errors import QwenkitError
from qwenkit.eval.base import EvalSettings, LocalBackend
from qwenkit.eval.long_ppl import run_long_ppl

TRAINING_LENGTH = 64


@pytest.fixture(scope="module")
def backend(byte_tokenizer):
    """Sharpened (head x40) so that the switches' small changes to attention show in the perplexity."""
    model = make_tiny_model(vocab_size=512, num_hidden_layers=2, max_position_embeddings=TRAINING_LENGTH)
    sharpen(model)
    return LocalBackend(model, byte_tokenizer, batch_size=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("texts")
    words = [
        "the",
        "a",
        "model",
        "reads",
        "long",
        "text",
        "and",
        "counts",
        "every",
        "token",
        "of",
        "it",
        "once",
    ]
    generator = torch.Generator().manual_seed(0)
    for name, n in (("a.txt", 90), ("sub/b.txt", 50)):
        (root / name).parent.mkdir(exist_ok=True)
        picks = torch.randint(0, len(words), (n,), generator=generator).tolist()
        (root / name).write_text(" ".join(words[i] for i in picks))
    (root / "ignored.md").write_text("not a text file")
    return root


def direct_ppl(model, windows: list[list[int]]) -> float:
    """exp(mean NLL) of every window's tokens after the first, from one plain forward pass each."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in windows:
            logprobs = torch.log_softmax(model(torch.tensor([ids]))[0].double(), dim=-1)
            total -= logprobs[:-1].gather(1, torch.tensor(ids[1:])[:, None]).sum().item()
            count += len(ids) - 1
    return math.exp(total / count)


def test_perplexity_table(backend, data, byte_tokenizer):
    result = run_long_ppl(backend, EvalSettings(data=data, lengths=(32, 128, 100000), progress=False))
    docs = [byte_tokenizer.encode((data / n).read_text()) for n in ("a.txt", "sub/b.txt")]
    assert all(len(d) > 128 for d in docs[:1]) and len(docs[1]) < 1000
    ppl = result.groups["setting@length"]
    assert set(ppl) == {
        f"{s}@{n}" for s in ("plain", "ntk", "ntk+logn", "ntk+logn+window") for n in (32, 128)
    }
    assert result.settings["lengths"] == [32, 128]  # 100000: no text holds it

    windows32 = [d[k * 32 : (k + 1) * 32] for d in docs for k in range(len(d) // 32)]
    windows128 = [d[k * 128 : (k + 1) * 128] for d in docs for k in range(len(d) // 128)]
    assert result.settings["windows"] == {"32": len(windows32), "128": len(windows128)}
    model = backend.model
    assert ppl["plain@32"] == pytest.approx(direct_ppl(model, windows32), rel=1e-5)
    assert ppl["plain@128"] == pytest.approx(direct_ppl(model, windows128), rel=1e-5)
    # within the training length every switch is inert; past it each one changes the number
    for s in ("ntk", "ntk+logn", "ntk+logn+window"):
        assert ppl[f"{s}@32"] == pytest.approx(ppl["plain@32"], rel=1e-5)
    values128 = [ppl[f"{s}@128"] for s in ("plain", "ntk", "ntk+logn", "ntk+logn+window")]
    assert all(abs(a / b - 1) > 1e-4 for a, b in zip(values128, values128[1:], strict=False))
    assert not model.config.use_dynamic_ntk and not model.config.use_window_attn  # restored

    assert result.metrics["perplexity"] == ppl["ntk+logn+window@128"] and result.metrics["length"] == 128
    first = result.predictions[0]
    assert first.id == "plain@32/a.txt:0" and first.subject == "plain@32"
    assert first.extra["tokens"] == 31
    assert first.prediction == pytest.approx(direct_ppl(model, windows32[:1]), rel=1e-5)
    assert len(result.predictions) == 4 * (len(windows32) + len(windows128))


def test_limit_and_single_file(backend, data):
    result = run_long_ppl(backend, EvalSettings(data=data / "a.txt", lengths=(32,), limit=1, progress=False))
    assert result.settings["windows"] == {"32": 1} and len(result.predictions) == 4


def test_refusals(backend, data, tmp_path):
    with pytest.raises(QwenkitError, match="local model"):
        run_long_ppl(None, EvalSettings(data=data))
    with pytest.raises(QwenkitError, match="does not exist"):
        run_long_ppl(backend, EvalSettings(data=tmp_path / "missing"))
    with pytest.raises(QwenkitError, match="no .txt file"):
        run_long_ppl(backend, EvalSettings(data=tmp_path))
    with pytest.raises(QwenkitError, match="shorter than every length"):
        run_long_ppl(backend, EvalSettings(data=data, lengths=(5000,)))

"""Model-based quality scores (qwenkit.data.quality_model): perplexity under a qwenkit model, checked
against a direct cross-entropy computation and on the demo model; the fastText quality classifier
trained through `qwenkit data train-classifier` and applied as a datatrove filter."""

import json
import math
import pickle
import random
import string

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_model
from datatrove.data import Document
from datatrove.pipeline.writers import JsonlWriter

import qwenkit
from qwenkit.cli import main
from qwenkit.data.quality_model import (
    ClassifierFilter,
    PerplexityFilter,
    classifier_text,
    document_perplexities,
    train_classifier,
)
from qwenkit.data.synthetic import chinese_story, english_story
from qwenkit.errors import QwenkitError


def run_filter(step, docs, removed_dir):
    step.exclusion_writer = JsonlWriter(str(removed_dir), compression=None)
    return list(step.run(iter(docs)))


def removed_records(removed_dir):
    return [json.loads(line) for p in removed_dir.glob("*.jsonl") for line in p.read_text().splitlines()]


def test_perplexity_is_exp_of_the_mean_token_cross_entropy(byte_tokenizer):
    model = make_tiny_model(vocab_size=512, num_hidden_layers=1)
    texts = ["hello world, a longer document than the others", "hi", "x", "mid-sized text"]
    got = document_perplexities(model, byte_tokenizer, texts, max_tokens=20)
    assert got[2] is None  # one token: nothing is predicted
    for text, ppl in zip(texts, got, strict=True):
        ids = torch.tensor([byte_tokenizer.encode(text)[:20]])
        if ids.shape[1] < 2:
            continue
        with torch.no_grad():
            logits = model(ids)
        expected = math.exp(F.cross_entropy(logits[0, :-1], ids[0, 1:]).item())
        assert ppl == pytest.approx(expected, rel=1e-4)


def gibberish(rng: random.Random, chinese: bool) -> str:
    if chinese:
        return "".join(chr(rng.randint(0x4E00, 0x9FA5)) for _ in range(40))
    return "".join(rng.choice(string.ascii_letters + string.digits + " #$%&") for _ in range(120))


def test_demo_model_scores_gibberish_worse_than_its_own_kind_of_text(tmp_path):
    rng = random.Random(3)
    docs = {}
    for i in range(2):
        docs[f"good-en-{i}"] = (english_story(rng), "en")
        docs[f"good-zh-{i}"] = (chinese_story(rng), "zh")
        docs[f"bad-en-{i}"] = (gibberish(rng, False), "en")
        docs[f"bad-zh-{i}"] = (gibberish(rng, True), "zh")

    def documents():
        return [Document(text=t, id=k, metadata={"language": lang}) for k, (t, lang) in docs.items()]

    step = PerplexityFilter(str(qwenkit.default_model_path()), {}, batch_size=4)
    pickle.loads(pickle.dumps(step))  # travels to workers (without a loaded model)
    annotated = list(step.run(iter(documents())))  # no thresholds: every document kept, annotated
    ppl = {d.id: d.metadata["perplexity"] for d in annotated}
    assert sorted(ppl) == sorted(docs)
    thresholds = {}
    for lang in ("en", "zh"):
        good = max(v for k, v in ppl.items() if k.startswith(f"good-{lang}"))
        bad = min(v for k, v in ppl.items() if k.startswith(f"bad-{lang}"))
        assert good < bad, (lang, ppl)
        thresholds[lang] = math.sqrt(good * bad)
    thresholds["default"] = 1.0  # a language without its own threshold: everything above 1 goes
    step.thresholds = thresholds  # the same step: the model stays loaded
    batch = documents()
    batch.append(Document(text=english_story(rng), id="other-language", metadata={"language": "fr"}))
    batch.append(Document(text="a", id="too-short"))  # nothing to score: kept
    kept = run_filter(step, batch, tmp_path)
    assert sorted(d.id for d in kept) == sorted([k for k in docs if k.startswith("good")] + ["too-short"])
    assert all(d.metadata["perplexity"] == pytest.approx(ppl[d.id], rel=1e-4) for d in kept if d.id in ppl)
    removed = {r["id"]: r["metadata"] for r in removed_records(tmp_path)}
    assert sorted(removed) == sorted([k for k in docs if k.startswith("bad")] + ["other-language"])
    assert {m["filter_reason"] for m in removed.values()} == {"perplexity"}
    assert all(m["perplexity"] > thresholds.get(m["language"], 1.0) for m in removed.values())


def test_perplexity_settings_are_checked(small_checkpoint, tmp_path):
    with pytest.raises(QwenkitError, match="positive"):
        PerplexityFilter(str(small_checkpoint), {"en": -1})
    with pytest.raises(QwenkitError, match="max_tokens"):
        PerplexityFilter(str(small_checkpoint), {}, max_tokens=1)
    with pytest.raises(QwenkitError, match="checkpoint not found"):
        PerplexityFilter(str(tmp_path / "no-model"), {})


def word_salad(rng: random.Random, text: str) -> str:
    """The same words (characters for Chinese) in random order: only the word pairs tell it apart."""
    if " " in text:
        words = text.split()
        rng.shuffle(words)
        return " ".join(words)
    chars = list(text)
    rng.shuffle(chars)
    return "".join(chars)


def write_jsonl(path, texts):
    path.write_text(
        "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8"
    )
    return str(path)


def story(rng: random.Random, i: int) -> str:
    return english_story(rng) if i % 2 else chinese_story(rng)


def test_classifier_separates_stories_from_word_salad(tmp_path, capsys):
    rng = random.Random(0)
    positive = write_jsonl(tmp_path / "stories.jsonl", [story(rng, i) for i in range(300)])
    negative = write_jsonl(tmp_path / "salad.jsonl", [word_salad(rng, story(rng, i)) for i in range(300)])
    out = tmp_path / "clf"
    args = ["data", "train-classifier", "--positive", positive, "--negative", negative, "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    print(printed)
    info = json.loads((out / "classifier.json").read_text())
    assert (info["positive"], info["negative"], info["held_out"]) == (300, 300, 60)
    assert info["held_out_accuracy"] >= 0.95
    assert f"held-out accuracy {info['held_out_accuracy']:.3f} on 60 documents" in printed

    step = ClassifierFilter(str(out), threshold=0.5)
    pickle.loads(pickle.dumps(step))
    rng = random.Random(1)  # documents never seen in training
    docs = [Document(text=story(rng, i), id=f"good-{i}") for i in range(20)]
    docs += [Document(text=word_salad(rng, story(rng, i)), id=f"bad-{i}") for i in range(20)]
    kept = run_filter(step, docs, tmp_path / "removed")
    removed = removed_records(tmp_path / "removed")
    correct = sum(d.id.startswith("good") for d in kept) + sum(r["id"].startswith("bad") for r in removed)
    assert correct / len(docs) >= 0.9
    assert all(r["metadata"]["filter_reason"] == "quality_classifier" for r in removed)
    assert all(
        r["metadata"]["quality_score"] < 0.5 <= d.metadata["quality_score"] for r in removed for d in kept
    )


def test_classifier_text_splits_cjk_and_punctuation():
    assert classifier_text("Ｈｅｌｌｏ, 世界!\nBye.") == "hello , 世 界 ! bye ."


def test_classifier_input_errors(tmp_path, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", ["a fine document"])
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(QwenkitError, match="no negative documents"):
        train_classifier([good], [empty], str(tmp_path / "clf"))
    assert main(["data", "train-classifier", "--positive", good, "--negative", str(tmp_path / "nope.jsonl"),
                 "--out", str(tmp_path / "clf")]) == 1  # fmt: skip
    assert "not found" in capsys.readouterr().err
    with pytest.raises(QwenkitError, match="train one with"):
        ClassifierFilter(str(tmp_path / "no-classifier"))
    (tmp_path / "junk.bin").write_bytes(b"not a model")
    step = ClassifierFilter(str(tmp_path / "junk.bin"))
    with pytest.raises(QwenkitError, match="not a fastText model"):
        step.filter(Document(text="x", id="1"))


def test_a_large_held_out_fraction_still_trains_on_each_class(tmp_path):
    # round(1 * 0.9) held out the only document of each class: nothing left to train on
    good = write_jsonl(tmp_path / "good.jsonl", ["a fine document about the sea"])
    bad = write_jsonl(tmp_path / "bad.jsonl", ["zz qq xx"])
    path = train_classifier([good], [bad], str(tmp_path / "clf"), held_out_fraction=0.9)
    info = json.loads((path.parent / "classifier.json").read_text())
    assert (info["trained_on"], info["held_out"], info["held_out_accuracy"]) == (2, 0, None)


def test_a_diverging_learning_rate_is_halved_and_retried_then_a_clear_error(tmp_path, capsys):
    # fastText raises "Encountered NaN." when training diverges (once seen at the default rate on CI)
    rng = random.Random(0)
    good = write_jsonl(tmp_path / "good.jsonl", [story(rng, i) for i in range(40)])
    bad = write_jsonl(tmp_path / "bad.jsonl", [word_salad(rng, story(rng, i)) for i in range(40)])
    with pytest.warns(UserWarning, match="diverged"):
        path = train_classifier([good], [bad], str(tmp_path / "clf"), learning_rate=40.0)
    info = json.loads((path.parent / "classifier.json").read_text())
    assert 40.0 / 8 <= info["learning_rate"] < 40.0
    with pytest.warns(UserWarning, match="diverged"):
        code = main(["data", "train-classifier", "--positive", good, "--negative", bad,
                     "--out", str(tmp_path / "clf2"), "--lr", "1e12"])  # fmt: skip
    assert code != 0
    diverged = (
        "diverged (NaN) at learning rates 1e+12, 5e+11, 2.5e+11, 1.25e+11; use a lower learning rate (--lr)"
    )
    assert diverged in capsys.readouterr().err
    bad_rate = ["data", "train-classifier", "--positive", good, "--negative", bad, "--out", str(tmp_path / "c")]  # fmt: skip
    assert main([*bad_rate, "--lr", "0"]) == 2
    assert "argument --lr: invalid value '0'; use a positive number" in capsys.readouterr().err

"""`qwenkit data review` (qwenkit.data.review): random kept and removed documents of a `data process`
output directory (written here with datatrove's own JsonlWriter), in the terminal and as escaped HTML."""

import gzip
import json
import random
from html.parser import HTMLParser

import pytest
from datatrove.data import Document
from datatrove.pipeline.writers import JsonlWriter

from qwenkit.cli import main
from qwenkit.data.review import collect_review, format_review
from qwenkit.data.synthetic import english_story
from qwenkit.errors import QwenkitError

HOSTILE = '<script>alert("x")</script> & <b>bold</b>\nsecond line'


def write_docs(folder, docs, expand_metadata=False):
    with JsonlWriter(
        str(folder), expand_metadata=expand_metadata
    ) as writer:  # gzip, as `data process` writes
        for doc in docs:
            writer.write(doc)


@pytest.fixture
def out(tmp_path):
    kept = [Document(text=f"kept document {i}", id=f"k{i}", metadata={"language": "en", "perplexity": 12.5 + i})
            for i in range(40)]  # fmt: skip
    kept.append(Document(text=HOSTILE, id="hostile", metadata={"language": "en", "source": "<web>"}))
    write_docs(tmp_path / "output", kept)
    contaminated = [
        Document(text=f"leaked test {i}", id=f"c{i}",
                 metadata={"filter_reason": "contamination", "contamination": {"set": "humaneval", "ngram": "a b"}})
        for i in range(3)
    ]  # fmt: skip
    write_docs(tmp_path / "removed" / "decontaminate", contaminated)
    junk = [Document(text=f"buy buy buy {i}", id=f"j{i}", metadata={"filter_reason": "quality_classifier",
                                                                    "quality_score": 0.01}) for i in range(30)]  # fmt: skip
    write_docs(tmp_path / "removed" / "classifier", junk, expand_metadata=True)
    with gzip.open(tmp_path / "removed" / "classifier" / "broken.jsonl.gz", "wt") as f:
        f.write('{"text": "fine", "id": "j-extra"}\n{broken\n[1, 2]\n')
    return tmp_path


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")


class PageText(HTMLParser):
    """The tags and the text inside <pre> of a page (an HTML parser, independent of how it was written)."""

    def __init__(self):
        super().__init__()
        self.tags, self.pre, self._in_pre = [], [], False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self._in_pre = tag == "pre"
        if self._in_pre:
            self.pre.append("")

    def handle_endtag(self, tag):
        self._in_pre = False if tag == "pre" else self._in_pre

    def handle_data(self, data):
        if self._in_pre:
            self.pre[-1] += data


def test_review_draws_from_every_stage_with_scores_and_reasons(out, capsys):
    assert main(["data", "review", str(out), "--n", "50"]) == 0
    printed = capsys.readouterr().out
    assert "=== kept: 41 of 41 documents" in printed
    assert "=== classifier: 31 of 31 documents, 2 unreadable lines skipped" in printed
    assert "=== decontaminate: 3 of 3 documents" in printed
    assert "reason=contamination" in printed and '{"set": "humaneval", "ngram": "a b"}' in printed
    assert "reason=quality_classifier  quality_score=0.01" in printed
    assert "perplexity=13.5" in printed and "id=hostile" in printed
    assert "second line" in printed and "\nsecond line" not in printed  # one line per document

    page = out / "review.html"
    parser = PageText()
    parser.feed(page.read_text(encoding="utf-8"))
    assert "script" not in parser.tags and "b" not in parser.tags  # the text's markup stays text
    assert HOSTILE in parser.pre  # and reads back exactly
    assert "&lt;script&gt;" in page.read_text() and "&lt;web&gt;" in page.read_text()
    assert len(parser.pre) == 41 + 31 + 3


def test_samples_are_random_reproducible_and_limited(out):
    first = collect_review(out, n=5, seed=1)
    assert [(g.name, len(g.samples), g.total) for g in first] == [
        ("kept", 5, 41), ("classifier", 5, 31), ("decontaminate", 3, 3)
    ]  # fmt: skip
    ids = [[s.id for s in g.samples] for g in first]
    assert ids == [[s.id for s in g.samples] for g in collect_review(out, n=5, seed=1)]
    draws = {
        tuple(s.id for s in collect_review(out, stage="kept", n=5, seed=seed)[0].samples)
        for seed in range(20)
    }
    assert len(draws) > 15  # different seeds, different documents
    seen = {i for d in draws for i in d}
    assert len(seen) > 30  # not just the first files' documents
    assert all(s.reason == "quality_classifier" and s.metadata == {"quality_score": 0.01}
               for s in first[1].samples if s.id != "j-extra")  # fmt: skip


def test_one_stage_only(out, capsys):
    assert main(["data", "review", str(out), "--stage", "decontaminate", "--n", "2", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert "=== decontaminate: 2 of 3 documents" in printed and "=== kept" not in printed
    groups = collect_review(out, stage="kept", n=1)
    assert [g.name for g in groups] == ["kept"]
    assert "=== kept: 1 of 41 documents" in format_review(groups)


def test_bad_directories_and_stages(out, tmp_path_factory, capsys):
    assert main(["data", "review", str(out), "--stage", "nope"]) == 1
    assert "no stage 'nope' in" in capsys.readouterr().err
    with pytest.raises(QwenkitError, match="choose from kept, classifier, decontaminate"):
        collect_review(out, stage="nope")
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(QwenkitError, match="not a `qwenkit data process` output"):
        collect_review(empty)
    assert main(["data", "review", str(out), "--n", "0"]) == 2  # argparse refuses it
    (out / "output" / "damaged.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(QwenkitError, match="cannot read .*damaged.jsonl.gz"):
        collect_review(out)


def test_review_of_a_process_run_with_every_model_score(tmp_path, small_checkpoint, capsys):
    """`data process` with decontamination, perplexity and the classifier on, then `data review` of
    what it wrote: the removed documents carry their reasons and scores, the kept ones their scores."""
    rng = random.Random(0)
    spam = [
        "buy",
        "now",
        "cheap",
        "free",
        "click",
        "here",
        "login",
        "subscribe",
        "best",
        "price",
        "deal",
        "offer",
        "cart",
        "sale",
        "casino",
        "bonus",
    ]

    def junk():
        return " | ".join(" ".join(rng.choices(spam, k=3)) for _ in range(30))

    write_jsonl(tmp_path / "good.jsonl", [english_story(rng) + " " + english_story(rng) for _ in range(60)])
    write_jsonl(tmp_path / "junk.jsonl", [junk() for _ in range(60)])
    clf = tmp_path / "clf"
    assert main(["data", "train-classifier", "--positive", str(tmp_path / "good.jsonl"),
                 "--negative", str(tmp_path / "junk.jsonl"), "--out", str(clf)]) == 0  # fmt: skip
    secret = "the seven lantern keepers of the northern harbour counted forty ships before the winter storm arrived"
    (tmp_path / "eval.txt").write_text(secret + "\n", encoding="utf-8")
    docs = [{"id": f"story{i}", "text": english_story(rng) + " " + english_story(rng)} for i in range(4)]
    docs += [{"id": "leak", "text": "Did you know? " + secret + ", they said."}]
    docs += [{"id": f"junk{i}", "text": junk()} for i in range(2)]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    config = tmp_path / "data.yaml"
    config.write_text(
        "language: {enabled: false}\nexact_dedup: {enabled: false}\nminhash: {enabled: false}\n"
        "quality: {enabled: false}\ndecontaminate: {humaneval: false}\n"
        f"perplexity: {{enabled: true, model: '{small_checkpoint}', thresholds: {{}}}}\n"
        f"classifier: {{enabled: true, model: '{clf}'}}\nexecutor: {{workers: 1}}\n"
    )
    out = tmp_path / "out"
    assert main(["data", "process", "--input", str(tmp_path / "corpus.jsonl"), "--out", str(out),
                 "--config", str(config), "--decontaminate", str(tmp_path / "eval.txt")]) == 0  # fmt: skip
    capsys.readouterr()
    groups = {g.name: g for g in collect_review(out, n=10)}
    assert sorted(groups) == ["classifier", "decontaminate", "kept"]
    assert sorted(s.id for s in groups["kept"].samples) == [f"story{i}" for i in range(4)]
    assert all(
        s.metadata["quality_score"] >= 0.5 and s.metadata["perplexity"] > 1 for s in groups["kept"].samples
    )
    [leak] = groups["decontaminate"].samples
    assert (leak.id, leak.reason, leak.metadata["contamination"]["set"]) == ("leak", "contamination", "eval")
    assert sorted(s.id for s in groups["classifier"].samples) == ["junk0", "junk1"]
    assert all(s.reason == "quality_classifier" and s.metadata["quality_score"] < 0.5
               for s in groups["classifier"].samples)  # fmt: skip
    assert main(["data", "review", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "=== kept: 4 of 4 documents" in printed and "reason=contamination" in printed
    assert (out / "review.html").is_file()


def test_terminal_text_holds_no_control_characters(tmp_path):
    # a removed document's raw text (extraction removals are not normalized) may carry ANSI escapes
    from qwenkit.data.review import Group, Sample

    group = Group("extraction", 1, 0, [Sample("e\x1b]0;x\x07", "\x1b[2J\x1b[31mred\r\nnext", "extraction_empty",
                                              {"url": "u\x1b[8m\nv"}, "f")])  # fmt: skip
    printed = format_review([group])
    assert "\x1b" not in printed and "\x07" not in printed and "\r" not in printed
    assert "red" in printed and printed.count("\n") == 3  # header, id line, text (then a blank line)

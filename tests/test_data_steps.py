"""qwenkit.data.steps: CJK-aware text statistics, MinHash signatures against datatrove's own stage,
language ID, quality rules, normalization, extraction and the input reader."""

import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datatrove.data import Document
from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature

from qwenkit.data import steps
from qwenkit.errors import QwenkitError

EN = (
    "The printing press changed how ideas travelled. Before it, books were copied by hand and a single "
    "volume could take months to finish. With movable type a workshop could print hundreds of pages a day, "
    "and the price of a book fell to a fraction of what it had been. This changed who could read, what "
    "they read, and how quickly new ideas spread across the continent and beyond its borders."
)
ZH = (
    "印刷术的发明改变了知识传播的方式。在雕版印刷出现之前，书籍只能依靠手工抄写，一部书往往需要几个月才能完成。"
    "活字印刷术出现以后，一个作坊一天就可以印出成百上千页，书的价格也大大降低了。这不仅改变了谁能够读书，"
    "也改变了人们读什么书，以及新的思想在各地传播的速度。"
)


def test_words_count_each_cjk_character_and_latin_runs():
    assert steps.words("Hello, 世界 it's 2024年!") == ["Hello", "世", "界", "it's", "2024", "年"]
    assert steps.words("カタカナ 한국어") == ["カ", "タ", "カ", "ナ", "한국어"]  # Hangul is spaced: words
    assert len(steps.words(ZH)) > 100  # a Chinese paragraph is not "one word"
    assert steps.cjk_fraction(ZH) > 0.95 and steps.cjk_fraction(EN) == 0


def test_match_text_ignores_case_whitespace_and_punctuation():
    assert steps.match_text("Hello,   World!\n") == steps.match_text("hello world") == "hello world"
    assert steps.match_text("你好，世界。") == steps.match_text("你好 世界")
    assert steps.match_text("ＡＢＣ") == "abc"  # NFKC folds full-width letters


def test_shingles_are_character_5grams_for_chinese_and_word_5grams_otherwise():
    assert len(steps.shingles("今天天气很好", 5)) == 2  # 6 characters -> 2 five-grams
    assert len(steps.shingles("one two three four five six seven", 5)) == 3
    assert len(steps.shingles("two words", 5)) == 1  # shorter than n: one shingle
    assert len(steps.shingles("", 5)) == 0
    # the same n-grams whatever the punctuation and case
    assert set(steps.shingles("One, two; THREE four five.")) == set(steps.shingles("one two three four five"))


def test_minhash_signatures_are_identical_to_datatroves_stage_on_the_same_shingles(tmp_path):
    config = MinhashConfig(n_grams=5, num_buckets=20, hashes_per_bucket=8, seed=3)
    texts = [EN, ZH, EN.upper(), "", "a b", ZH[:40] + EN[:200]]
    ours = steps.minhash_signatures(texts, config, batch_shingles=50)  # several batches
    reference = MinhashDedupSignature(
        str(tmp_path), config, language=steps.CjkWordTokenizer("x")
    )  # datatrove's stage 1, its hash parameters
    for text, row in zip(texts, ours, strict=True):
        found = steps.shingles(text, 5)
        if found.size == 0:
            assert (row == np.iinfo(np.uint64).max).all()
            continue
        expected = np.concatenate(reference.get_signature(found.reshape(-1, 1))).astype(np.uint64)
        np.testing.assert_array_equal(row, expected)
    # the pipeline's stage computes the same rows
    stage = steps.CjkMinhashSignature(tmp_path / "sigs", config)
    np.testing.assert_array_equal(
        np.concatenate(stage.get_signature(stage.get_shingles(ZH))).astype(np.uint64), ours[1]
    )


def test_mod_mersenne_equals_the_remainder_on_edge_values():
    m = (1 << 61) - 1
    edges = [0, 1, m - 1, m, m + 1, 2 * m - 1, 2 * m, 1 << 61, (1 << 62) + 5, (1 << 64) - 1, (1 << 64) - 2]
    rng = random.Random(1)
    values = edges + [rng.getrandbits(64) for _ in range(1000)]
    got = steps.mod_mersenne(np.array(values, dtype=np.uint64))
    assert [int(v) for v in got] == [v % m for v in values]


def test_minhash_agreement_estimates_the_jaccard_similarity():
    rng = random.Random(0)
    base = EN.split()
    config = MinhashConfig(n_grams=5, num_buckets=32, hashes_per_bucket=8)
    for changed in (2, 6, 12):
        other = list(base)
        for i in rng.sample(range(len(other)), changed):
            other[i] = f"word{i}"
        a, b = set(steps.shingles(EN)), set(steps.shingles(" ".join(other)))
        jaccard = len(a & b) / len(a | b)
        sig = steps.minhash_signatures([EN, " ".join(other)], config)
        assert abs((sig[0] == sig[1]).mean() - jaccard) < 0.1


def test_lsh_probability_matches_datatroves_documented_numbers():
    # datatrove's minhash module: "probability of inclusion for s=0.8: 1-(1-0.8^8)^14=0.924"
    assert steps.lsh_probability(0.8, 14, 8) == pytest.approx(0.924, abs=1e-3)
    assert steps.lsh_probability(0.8, 20, 8) > 0.97 > 0.08 > steps.lsh_probability(0.5, 20, 8)


def test_lsh_duplicates_keeps_the_first_of_each_band_match_as_a_query_then_insert_lsh():
    rng = random.Random(2)
    base = EN.split()
    texts = []
    for _ in range(40):  # 40 distinct texts and near copies of some of them, in a shuffled order
        texts.append(" ".join(rng.choice(base) for _ in range(60)))
        if rng.random() < 0.5:
            copy = texts[-1].split()
            copy[rng.randrange(60)] = "changed"
            texts.append(" ".join(copy))
    texts += ["", "!!!"]  # no words: never duplicates, though their rows are equal
    rng.shuffle(texts)
    signatures = steps.minhash_signatures(texts, MinhashConfig(num_buckets=20, hashes_per_bucket=8))
    expected, kept_bands = [], [set() for _ in range(20)]
    for row in signatures:  # the policy written out: query every band, insert only if no match
        keys = [row[b * 8 : (b + 1) * 8].tobytes() for b in range(20)]
        words = not (row == np.iinfo(np.uint64).max).all()
        duplicate = words and any(k in kept_bands[b] for b, k in enumerate(keys))
        if not duplicate:
            for b, k in enumerate(keys):
                kept_bands[b].add(k)
        expected.append(duplicate)
    found = steps.lsh_duplicates(signatures, 20)
    assert found.tolist() == expected and 10 < found.sum() < 40
    # rows whose 64-bit mixes collide are still told apart: (0, MIX) and (1, 0) both mix to MIX
    mix = int(steps._SHINGLE_MIX)
    assert not steps.lsh_duplicates(np.array([[0, mix], [1, 0], [2, 2]], dtype=np.uint64), 1).any()
    again = np.array([[0, mix], [1, 0], [0, mix]], dtype=np.uint64)
    assert steps.lsh_duplicates(again, 1).tolist() == [False, False, True]
    with pytest.raises(QwenkitError, match="does not split into 3 bands"):
        steps.lsh_duplicates(signatures, 3)


def test_language_filter_tags_and_keeps_chosen_languages():
    lf = steps.LanguageFilter(["zh", "en"])
    docs = [
        Document(EN, "en"),
        Document(ZH, "zh"),
        Document("Der schnelle braune Fuchs springt über den Hund.", "de"),
    ]
    results = [lf.filter(d) for d in docs]
    assert results[:2] == [True, True]
    assert results[2] == (False, "language_not_kept")
    assert [d.metadata["language"] for d in docs] == ["en", "zh", "de"]
    assert all(0.5 < d.metadata["language_score"] <= 1 for d in docs)
    assert steps.LanguageFilter([]).filter(Document("Der schnelle braune Fuchs springt über den Hund.", "x"))


def test_quality_rules_keep_real_paragraphs_and_name_the_failed_rule():
    q = steps.QualityFilter()
    assert q.failed_rule(EN) is None
    assert q.failed_rule(ZH) is None  # ~130 characters count as ~130 words
    assert q.failed_rule("Too short to be a document.") == "too_few_words"
    assert q.failed_rule("太短了。") == "too_few_words"
    assert q.failed_rule("Lorem ipsum dolor sit amet, " + EN) == "bad_phrase"
    spam = "\n".join(["Buy cheap watches online today and save money on watches."] * 20)
    assert q.failed_rule(spam) in ("duplicate_lines", "top_2gram", "duplicate_line_chars")
    assert q.failed_rule(" ".join(f"tok{i} zzz" for i in range(60))) == "stop_words"
    menu = "\n".join(f"• Menu item number {i} for the site" for i in range(40))
    assert q.failed_rule(menu) == "bullet_lines"
    assert q.failed_rule("# " * 30 + EN) == "symbol_ratio"
    zh_spam = "\n".join(["欢迎光临本店，全场商品一律八折优惠。"] * 12)
    assert q.failed_rule(zh_spam) == "duplicate_lines"


def test_normalize_repairs_mojibake_and_keeps_full_width_punctuation():
    n = steps.NormalizeText()
    assert n.format("cafÃ© au lait\r\n\r\n\r\n\r\nnext\x07 line   \n") == "café au lait\n\nnext line"
    assert n.format("你好，世界！") == "你好，世界！"


def _html(body: str) -> str:
    return f"<html><head><title>t</title></head><body><nav><a href='/'>Home</a> | <a href='/a'>About</a></nav>{body}<footer>© 2024 Example Ltd</footer></body></html>"


def test_extraction_takes_the_main_text_and_records_removals(tmp_path):
    page = _html(f"<article><h1>Printing</h1><p>{EN}</p></article>")
    docs = [
        Document(page, "page", metadata={"format": "html"}),
        Document(
            "<html><body><script>var x = 1;</script></body></html>", "empty", metadata={"format": "html"}
        ),
        Document("plain text passes unchanged", "plain"),
    ]
    step = steps.ExtractText(exclusion_writer=steps.removed_writer(tmp_path, "extraction"))
    kept = list(step.run(iter(docs)))
    assert [d.id for d in kept] == ["page", "plain"]
    assert "movable type" in kept[0].text and "About" not in kept[0].text and "format" not in kept[0].metadata
    assert kept[1].text == "plain text passes unchanged"
    removed = list(steps.read_jsonl_folder(tmp_path / "extraction"))
    assert [(r["id"], r["metadata"]["filter_reason"]) for r in removed] == [("empty", "extraction_empty")]


def test_input_reader_reads_every_format_keeps_ids_and_tags_the_source(tmp_path):
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    (tmp_path / "a.jsonl").write_text(
        json.dumps({"id": 0, "text": "zero", "url": "u"}) + "\n" + json.dumps({"text": "no id"}) + "\n"
    )
    pq.write_table(pa.table({"id": ["p1"], "text": ["from parquet"]}), tmp_path / "b.parquet")
    (tmp_path / "c.txt").write_text("one whole\n\nfile")
    (tmp_path / "d.html").write_text(_html("<p>x</p>"))
    with open(tmp_path / "e.warc.gz", "wb") as f:
        writer = WARCWriter(f, gzip=True)
        headers = StatusAndHeaders("200 OK", [("Content-Type", "text/html")], protocol="HTTP/1.0")
        record = writer.create_warc_record(
            "http://example.com/", "response", payload=__import__("io").BytesIO(_html("<p>warc</p>").encode()),
            http_headers=headers,
        )  # fmt: skip
        writer.write_record(record)
    files = steps.input_files([tmp_path])
    reader = steps.InputReader(files, [f.name.split(".")[0] for f in files])
    docs = list(reader.run())
    by_source = {d.metadata["source"]: d for d in docs}
    from_a = [d for d in docs if d.metadata["source"] == "a"]
    assert [d.id for d in from_a] == [0, "a.jsonl/1"]  # the input's id kept as it was, even 0
    assert from_a[0].metadata["url"] == "u" and "file_path" not in from_a[0].metadata
    assert by_source["b"].id == "p1" and by_source["b"].text == "from parquet"
    assert by_source["c"].text == "one whole\n\nfile"
    assert by_source["d"].metadata["format"] == "html" and by_source["e"].metadata["format"] == "html"
    assert "warc" in by_source["e"].text
    # tasks split the files between them
    assert sum(len(list(reader.run(rank=r, world_size=2))) for r in range(2)) == len(docs)
    with pytest.raises(QwenkitError, match="unsupported format"):
        steps.input_files([tmp_path / "b.parquet", Path(__file__)])


def test_input_reader_source_is_the_inputs_not_a_records_own_source_key(tmp_path):
    # the output writer puts documents under output/<source>/: a record must not choose that path
    (tmp_path / "web.jsonl").write_text(
        json.dumps({"text": "a", "source": "../../escaped"})
        + "\n"
        + json.dumps({"text": "b", "metadata": {"source": "x"}})
        + "\n"
    )
    docs = list(steps.InputReader([tmp_path / "web.jsonl"], ["web"]).run())
    assert [d.metadata["source"] for d in docs] == ["web", "web"]
    assert [d.metadata["input_source"] for d in docs] == ["../../escaped", "x"]

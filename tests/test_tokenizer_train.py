"""Vocabulary training: rank consistency, tiktoken reproduces the learned merges, extension, stats."""

import json
import random
import unicodedata
from pathlib import Path

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from qwenkit.errors import QwenkitError
from qwenkit.hf_tokenizer import derive_merges
from qwenkit.tokenizer import PAT_STR, Tokenizer
from qwenkit.tokenizer_train import (
    CorpusCounts,
    byte_ranks,
    compression_stats,
    format_stats_table,
    learn_merges,
    ranks_with_merges,
    train_tokenizer,
    train_vocab,
    write_stats,
)

SYLLABLES = ["ka", "lo", "mi", "ne", "tru", "sha", "po", "din", "ver", "qua", "ex", "th"]
HANZI = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指几九区强放决西被干做必战先回则任取据处理"


def hanzi_word(rng: random.Random) -> str:
    return "".join(rng.choice(HANZI[:80]) for _ in range(rng.choice([1, 2, 2, 3])))


def write_corpus(directory: Path, seed: int = 0) -> tuple[Path, Path]:
    """English-like text (plain) and Chinese-like text (JSONL, one bad line), Zipf-ish word choice."""
    rng = random.Random(seed)
    english_words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(300)]
    chinese_words = [hanzi_word(rng) for _ in range(300)]
    weights = [1 / (i + 2) for i in range(300)]
    english_lines = []
    for _ in range(400):
        words = rng.choices(english_words, weights, k=rng.randint(4, 14))
        english_lines.append(
            " ".join(words).capitalize() + rng.choice([".", ",", "!"]) + f" {rng.randint(0, 999)}"
        )
    english = directory / "english.txt"
    english.write_text("\n".join(english_lines) + "\n", encoding="utf-8")
    chinese = directory / "chinese.jsonl"
    with open(chinese, "w", encoding="utf-8") as f:
        for i in range(300):
            clauses = ["".join(rng.choices(chinese_words, weights, k=rng.randint(2, 6))) for _ in range(3)]
            f.write(json.dumps({"text": "，".join(clauses) + "。"}, ensure_ascii=False) + "\n")
            if i == 5:
                f.write("{not json\n")
    return english, chinese


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def corpus_words(*files: Path) -> set[str]:
    """The distinct pre-tokens of the NFC text of `files` (JSONL: the `text` fields)."""
    words: set[str] = set()
    for path in files:
        for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
            if path.suffix == ".jsonl":
                try:
                    line = json.loads(line)["text"]
                except ValueError:
                    continue
            words.update(regex.findall(PAT_STR, unicodedata.normalize("NFC", line)))
    return words


def apply_merges(parts: list[bytes], merges: list[tuple[bytes, bytes]]) -> list[bytes]:
    """Reference BPE: each merge in learned order, left to right over the word."""
    for left, right in merges:
        if left not in parts:
            continue
        merged, i = [], 0
        while i < len(parts):
            if i + 1 < len(parts) and parts[i] == left and parts[i + 1] == right:
                merged.append(left + right)
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def pieces(tokenizer: Tokenizer, text: str) -> list[bytes]:
    return [tokenizer.token_bytes(i) for i in tokenizer.encode(text)]


@pytest.fixture(scope="module")
def scratch(corpus) -> tuple[dict[bytes, int], list[tuple[bytes, bytes]]]:
    base, merges = learn_merges(corpus, 600, progress=False)
    return ranks_with_merges(base, merges), merges


def test_from_scratch_ranks_are_bytes_then_merges_in_order(scratch):
    ranks, merges = scratch
    assert len(ranks) == 600 and sorted(ranks.values()) == list(range(600))
    assert all(ranks[bytes([b])] == b for b in range(256))
    for i, (left, right) in enumerate(merges):
        assert ranks[left + right] == 256 + i
        assert ranks[left] < 256 + i and ranks[right] < 256 + i
    assert derive_merges(ranks) == merges  # each token is the merge of two lower-ranked tokens


def test_tiktoken_reproduces_learned_merges(scratch, corpus):
    ranks, merges = scratch
    tokenizer = Tokenizer(ranks)
    words = corpus_words(*corpus)
    assert len(words) > 500
    for word in words:
        data = word.encode("utf-8")
        assert pieces(tokenizer, word) == apply_merges([data[i : i + 1] for i in range(len(data))], merges), (
            word
        )


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_round_trip_with_byte_fallback(scratch, text):
    tokenizer = Tokenizer(scratch[0])
    assert tokenizer.decode(tokenizer.encode(text)) == unicodedata.normalize("NFC", text)


def test_unseen_characters_fall_back_to_bytes(scratch):
    tokenizer = Tokenizer(scratch[0])
    assert tokenizer.encode("🦙") == list("🦙".encode())
    assert tokenizer.decode(tokenizer.encode("Ωmega 🦙 кот 12345")) == "Ωmega 🦙 кот 12345"


def test_train_tokenizer_writes_vocab_file(corpus, tmp_path):
    counts = CorpusCounts()
    tokenizer = train_tokenizer(corpus, 300, tmp_path / "tok", progress=False, counts=counts)
    assert tokenizer.path == tmp_path / "tok" / "qwen.tiktoken"
    assert tokenizer.n_bpe == 300 and tokenizer.eod_id == 300  # special tokens follow the ranks
    assert Tokenizer.from_file(tmp_path / "tok").encode("Kalo mi") == tokenizer.encode("Kalo mi")
    assert counts.skipped == {"invalid_json": 1} and counts.documents > 300


def test_extension_keeps_base_and_shortens_new_language(corpus, tmp_path):
    english, chinese = corpus
    base = train_tokenizer([english], 400, tmp_path / "base", progress=False)
    base_ranks, merges = learn_merges([chinese], 700, base=base.path, progress=False)
    assert base_ranks == {base.token_bytes(r): r for r in range(400)}
    extended = Tokenizer(ranks_with_merges(base_ranks, merges))
    assert extended.n_bpe == 700
    for rank in range(400):
        assert extended.token_bytes(rank) == base.token_bytes(rank)
    text = english.read_text(encoding="utf-8")
    assert extended.encode(text) == base.encode(text)  # English holds no new token
    sample = "的一是在不了，这是中文。"
    assert len(extended.encode(sample * 5)) < len(base.encode(sample * 5))
    # tiktoken over the extended vocabulary = base segmentation followed by the new merges in order
    for word in corpus_words(chinese):
        assert pieces(extended, word) == apply_merges(pieces(base, word), merges), word


def test_extend_official_vocabulary(official_tokenizer, corpus, tmp_path):
    official = official_tokenizer
    n = official.n_bpe
    extended = train_tokenizer([corpus[1]], n + 50, tmp_path / "ext", base=official.path, progress=False)
    assert extended.n_bpe == n + 50 and extended.eod_id == n + 50
    assert all(extended.token_bytes(r) == official.token_bytes(r) for r in range(n))
    assert extended.encode("12345") == [16, 17, 18, 19, 20]
    assert extended.encode("Hello world\n") == official.encode("Hello world\n")
    text = "\n".join(
        json.loads(line)["text"] for line in corpus[1].read_text().splitlines()[:50] if "text" in line
    )
    assert len(extended.encode(text)) < len(official.encode(text))
    assert extended.decode(extended.encode(text)) == text


def test_user_mistakes_raise_one_line_errors(corpus, tmp_path):
    with pytest.raises(QwenkitError, match="not found"):
        train_vocab([tmp_path / "missing.txt"], 300)
    with pytest.raises(QwenkitError, match="256 single bytes"):
        train_vocab(corpus, 200)
    base = train_tokenizer([corpus[0]], 300, tmp_path / "base", progress=False)
    with pytest.raises(QwenkitError, match="smaller than the base"):
        train_vocab(corpus, 280, base=base.path)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(QwenkitError, match="no text"):
        train_vocab([empty], 300, progress=False)
    with pytest.raises(QwenkitError, match="no text"):
        train_vocab([empty], 310, base=base.path, progress=False)


def test_compression_stats_by_hand(tmp_path):
    path = tmp_path / "greek.txt"
    path.write_text("héllo", encoding="utf-8")  # 6 bytes, 5 characters
    tokenizers = {
        "bytes": Tokenizer(byte_ranks()),
        "merged": Tokenizer(ranks_with_merges(byte_ranks(), [(b"l", b"l"), (b"ll", b"o")])),  # h é(2) llo
    }
    rows = compression_stats(tokenizers, [path])
    assert rows == [
        {
            "file": "greek",
            "tokenizer": "bytes",
            "bytes": 6,
            "characters": 5,
            "tokens": 6,
            "bytes_per_token": 1.0,
            "tokens_per_character": 1.2,
        },
        {
            "file": "greek",
            "tokenizer": "merged",
            "bytes": 6,
            "characters": 5,
            "tokens": 4,
            "bytes_per_token": 1.5,
            "tokens_per_character": 0.8,
        },
    ]
    table = format_stats_table(rows)
    assert "| greek | merged | 6 | 5 | 4 | 1.50 | 0.800 |" in table
    png = tmp_path / "plot" / "stats.png"
    write_stats(rows, png)
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and png.stat().st_size > 1000


def test_cli_train_and_stats(corpus, tmp_path, capsys):
    from qwenkit.cli import main

    argv = [
        "tokenizer",
        "train",
        "--input",
        *map(str, corpus),
        "--vocab-size",
        "320",
        "--out",
        str(tmp_path / "t"),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "trained 320 BPE ranks from scratch" in out and "skipped invalid_json 1" in out
    assert (tmp_path / "t" / "qwen.tiktoken").is_file()

    twice = ["tokenizer", "stats", "--tokenizer", str(tmp_path / "t"), "--tokenizer", str(tmp_path / "t")]
    assert main([*twice, "--input", str(corpus[0])]) == 1
    assert "two tokenizers" in capsys.readouterr().err
    argv = ["tokenizer", "stats", "--tokenizer", f"mine={tmp_path / 't'}", "--tokenizer",
            str(tmp_path / "t" / "qwen.tiktoken"), "--input", *map(str, corpus), "--out", str(tmp_path / "stats")]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| english | mine |" in out and "| chinese | t |" in out
    rows = json.loads((tmp_path / "stats" / "stats.json").read_text())
    assert {row["tokenizer"] for row in rows} == {"mine", "t"} and len(rows) == 4
    assert (tmp_path / "stats" / "stats.png").read_bytes()[:4] == b"\x89PNG"


def test_vocabulary_training_reads_every_format_packing_reads(corpus, tmp_path):
    """One document reader (qwenkit.data.readers): Parquet, NDJSON and directories train the same
    vocabulary as the JSONL they hold; before, a .parquet file was read as plain text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    chinese = corpus[1]
    texts = [json.loads(line)["text"] for line in chinese.read_text().splitlines() if line.startswith('{"')]
    pq.write_table(pa.table({"text": texts}), tmp_path / "zh.parquet")
    (tmp_path / "dir" / "nested").mkdir(parents=True)
    (tmp_path / "dir" / "nested" / "zh.ndjson").write_bytes(chinese.read_bytes())
    (tmp_path / "dir" / "notes.csv").write_text("not read: not a supported format")
    expected = train_vocab([chinese], 400, progress=False)
    for source in (tmp_path / "zh.parquet", tmp_path / "dir"):
        counts = CorpusCounts()
        assert train_vocab([source], 400, progress=False, counts=counts) == expected, source
        assert counts.documents == len(texts)
    rows = compression_stats({"bytes": Tokenizer(byte_ranks())}, [tmp_path / "dir"])
    assert [row["file"] for row in rows] == ["zh"]
    with pytest.raises(QwenkitError, match="unsupported format"):
        train_vocab([tmp_path / "dir" / "notes.csv"], 300, progress=False)

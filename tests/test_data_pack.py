"""Token packing: document order, boundaries, weights, dtypes, malformed input, splits, reader."""

import argparse
import json
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from qwenkit.cli.data import add_pack_arguments, input_source, run_pack
from qwenkit.data import PackedDataset, Source, pack_documents, plan_documents
from qwenkit.errors import QwenkitError
from qwenkit.tokenizer import Tokenizer

WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "数据",
    "模型",
    "训练",
    "the",
    "of",
    "and",
    "<|im_start|>",
    "<|endoftext|>",
    "🦜",
]


def make_docs(prefix: str, n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"{prefix}{i}: " + " ".join(rng.choice(WORDS, size=rng.integers(3, 30))) for i in range(n)]


def write_jsonl(path, texts):
    path.write_text(
        "".join(json.dumps({"text": t, "id": i}, ensure_ascii=False) + "\n" for i, t in enumerate(texts))
    )
    return path


def pack(sources, tokenizer, out_dir, seq_len=16, **kwargs):
    return pack_documents(sources, tokenizer, seq_len, out_dir, progress=False, workers=1, **kwargs)


def read_tokens(out_dir, split="train"):
    index = json.loads((out_dir / "index.json").read_text())
    return np.fromfile(out_dir / f"{split}.bin", dtype=np.dtype(index["dtype"]).newbyteorder("<"))


def expected_stream(tokenizer, docs, order):
    """Documents in `order`, each encoded and followed by one end-of-text: what packing concatenates."""
    return np.array(
        [t for d in order for t in [*tokenizer.encode(docs[d]), tokenizer.eod_id]], dtype=np.int64
    )


def split_documents(tokenizer, tokens):
    """Decode the complete documents of a packed stream (the trailing partial one left out)."""
    ends = np.flatnonzero(tokens == tokenizer.eod_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokenizer.decode(tokens[s:e]) for s, e in zip(starts, ends, strict=True)]


@pytest.fixture
def two_sources(tmp_path):
    web = make_docs("web", 12, seed=1)
    books = make_docs("book", 3, seed=2)
    write_jsonl(tmp_path / "web.jsonl", web)
    (tmp_path / "books").mkdir()
    for i, text in enumerate(books):  # a directory of .txt files: one document per file, sorted
        (tmp_path / "books" / f"{i:02d}.txt").write_text(text)
    sources = [Source(tmp_path / "web.jsonl"), Source(tmp_path / "books")]
    return sources, web + books


def test_stream_is_shuffled_documents_cut_into_windows(official_tokenizer, tmp_path, two_sources):
    tok = official_tokenizer
    sources, docs = two_sources
    seq_len = 16
    stats = pack(sources, tok, tmp_path / "out", seq_len=seq_len, seed=7)

    order = plan_documents([12, 3], [1.0, 1.0], seed=7).train
    assert sorted(order.tolist()) == list(range(15))
    assert order.tolist() != list(range(15))  # shuffled before concatenation
    stream = expected_stream(tok, docs, order)
    windows = len(stream) // (seq_len + 1)
    kept = windows * (seq_len + 1)

    tokens = read_tokens(tmp_path / "out")
    np.testing.assert_array_equal(tokens, stream[:kept])  # exact slices; the remainder dropped
    assert stats.splits["train"].windows == windows
    assert stats.splits["train"].tokens == kept
    assert stats.splits["train"].dropped_tokens == len(stream) - kept < seq_len + 1
    assert stats.documents_per_source == [12, 3]

    # Each document is followed by exactly one end-of-text, and special-token text stays text.
    assert split_documents(tok, tokens) == [docs[d] for d in order][: np.count_nonzero(tokens == tok.eod_id)]
    assert np.all((tokens < tok.n_bpe) | (tokens == tok.eod_id))

    ds = PackedDataset(tmp_path / "out")
    assert (len(ds), ds.seq_len) == (windows, seq_len)
    for i in (0, windows - 1, -1):
        j = i % windows
        item = ds[i]
        assert item.dtype == torch.long and item.shape == (seq_len + 1,)
        assert item.tolist() == stream[j * (seq_len + 1) : (j + 1) * (seq_len + 1)].tolist()

    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["seq_len"] == seq_len and index["dtype"] == "uint32" and index["eod_id"] == tok.eod_id
    assert index["vocab_size"] == tok.vocab_size and index["seed"] == 7
    assert index["tokenizer"] == str(tok.path)
    assert [s["documents"] for s in index["sources"]] == [12, 3]
    assert index["splits"]["train"]["windows"] == windows
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_weights_repeat_and_subsample_documents(official_tokenizer, tmp_path):
    tok = official_tokenizer
    up, down = make_docs("up", 10, seed=3), make_docs("down", 10, seed=4)
    sources = [
        Source(write_jsonl(tmp_path / "up.jsonl", up), 2.0),
        Source(write_jsonl(tmp_path / "down.jsonl", down), 0.5),
    ]
    pack(sources, tok, tmp_path / "a", seq_len=4)

    order = plan_documents([10, 10], [2.0, 0.5]).train
    counts = np.bincount(order, minlength=20)
    assert counts[:10].tolist() == [2] * 10  # 2.0: every document twice
    assert sorted(counts[10:].tolist()) == [0] * 5 + [1] * 5  # 0.5: exactly half, once each
    # The file holds the documents of that plan (all but a tail that did not fill a window).
    stream = expected_stream(tok, up + down, order)
    tokens = read_tokens(tmp_path / "a")
    np.testing.assert_array_equal(tokens, stream[: len(tokens)])
    index = json.loads((tmp_path / "a" / "index.json").read_text())
    assert [s["train_documents"] for s in index["sources"]] == [20, 5]
    assert [s["weight"] for s in index["sources"]] == [2.0, 0.5]

    # The half kept is fixed by the seed.
    assert np.array_equal(plan_documents([10, 10], [2.0, 0.5], seed=0).train, order)
    assert sorted(np.bincount(plan_documents([10], [1.5]).train).tolist()) == [1] * 5 + [2] * 5
    assert len(plan_documents([3], [0.5]).train) == 2  # round half up


def test_token_dtype_follows_vocabulary_size(official_tokenizer, tmp_path):
    ranks = {bytes([b]): b for b in range(256)}
    for token in (b"ab", b"abc", b"  "):
        ranks[token] = len(ranks)
    tiny = Tokenizer(ranks)
    assert tiny.vocab_size < 65536 < official_tokenizer.vocab_size
    docs = make_docs("doc", 8)
    source = [Source(write_jsonl(tmp_path / "d.jsonl", docs))]

    pack(source, tiny, tmp_path / "tiny", seq_len=32)
    index = json.loads((tmp_path / "tiny" / "index.json").read_text())
    assert index["dtype"] == "uint16"
    assert (tmp_path / "tiny" / "train.bin").stat().st_size == index["splits"]["train"]["tokens"] * 2
    assert index["tokenizer"] is None
    tokens = read_tokens(tmp_path / "tiny")
    order = plan_documents([8], [1.0]).train
    np.testing.assert_array_equal(tokens, expected_stream(tiny, docs, order)[: len(tokens)])
    assert PackedDataset(tmp_path / "tiny")[0].tolist() == tokens[:33].tolist()

    pack(source, official_tokenizer, tmp_path / "official", seq_len=32)
    index = json.loads((tmp_path / "official" / "index.json").read_text())
    assert index["dtype"] == "uint32"
    assert (tmp_path / "official" / "train.bin").stat().st_size == index["splits"]["train"]["tokens"] * 4


def test_malformed_documents_are_skipped_and_counted(official_tokenizer, tmp_path):
    tok = official_tokenizer
    good = ["first good document", "second good document", "third one"]
    lines = [
        json.dumps({"text": good[0]}).encode(),
        b'{"text": "unterminated',  # invalid_json
        b"not json at all",  # invalid_json
        b'{"title": "no text"}',  # missing_text
        b'{"text": null}',  # missing_text
        b"[1, 2, 3]",  # missing_text
        b'{"text": 5}',  # non_string_text
        b'{"text": ["a"]}',  # non_string_text
        b'{"text": "bad \xff\xfe bytes"}',  # invalid_utf8
        b'{"text": "lone \\ud800 surrogate"}',  # invalid_utf8
        b'{"text": ""}',  # empty
        b'{"text": " \\n\\t "}',  # empty
        b"",  # blank lines are not documents
        json.dumps({"text": good[1]}).encode(),
    ]
    (tmp_path / "mixed.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "bad.txt").write_bytes(b"\xc3\x28 invalid")  # invalid_utf8
    (tmp_path / "empty.txt").write_text("")  # empty
    (tmp_path / "good.txt").write_text(good[2])
    sources = [
        Source(tmp_path / "mixed.jsonl"),
        Source([tmp_path / "bad.txt", tmp_path / "empty.txt", tmp_path / "good.txt"]),
    ]

    stats = pack(sources, tok, tmp_path / "out", seq_len=2)
    expected = {"invalid_json": 2, "missing_text": 3, "non_string_text": 2, "invalid_utf8": 3, "empty": 3}
    assert stats.skipped == expected
    assert stats.documents_per_source == [2, 1]
    assert stats.skipped_per_source == [
        {"invalid_json": 2, "missing_text": 3, "non_string_text": 2, "invalid_utf8": 2, "empty": 2},
        {"invalid_utf8": 1, "empty": 1},
    ]
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["skipped"] == expected
    stream = expected_stream(tok, good, plan_documents([2, 1], [1.0, 1.0]).train)
    tokens = read_tokens(tmp_path / "out")
    np.testing.assert_array_equal(tokens, stream[: len(tokens)])


def test_parquet_input(official_tokenizer, tmp_path):
    tok = official_tokenizer
    docs = make_docs("pq", 20, seed=5)
    cells = docs[:10] + [None, "", "   "] + docs[10:]
    pq.write_table(
        pa.table({"text": cells, "n": list(range(len(cells)))}), tmp_path / "d.parquet", row_group_size=4
    )
    stats = pack([Source(tmp_path / "d.parquet")], tok, tmp_path / "out", seq_len=8, seed=3)
    assert stats.documents_per_source == [20]
    assert stats.skipped == {"missing_text": 1, "empty": 2}
    tokens = read_tokens(tmp_path / "out")
    np.testing.assert_array_equal(
        tokens, expected_stream(tok, docs, plan_documents([20], [1.0], 3).train)[: len(tokens)]
    )

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "no_text.parquet")
    with pytest.raises(QwenkitError, match="no 'text' column"):
        pack([Source(tmp_path / "no_text.parquet")], tok, tmp_path / "bad")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    with pytest.raises(QwenkitError, match="expected strings"):
        pack([Source(tmp_path / "ints.parquet")], tok, tmp_path / "bad")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(QwenkitError, match="cannot read as Parquet"):
        pack([Source(tmp_path / "junk.parquet")], tok, tmp_path / "bad")


def test_validation_split_is_disjoint_and_deterministic(official_tokenizer, tmp_path):
    tok = official_tokenizer
    docs = make_docs("d", 40, seed=6)
    source = [Source(write_jsonl(tmp_path / "d.jsonl", docs), 1.0)]
    stats = pack(source, tok, tmp_path / "a", seq_len=8, val_fraction=0.25, seed=11)
    assert stats.splits["val"].documents == 10 and stats.splits["train"].documents == 30

    plan = plan_documents([40], [1.0], seed=11, val_fraction=0.25)
    assert set(plan.train.tolist()).isdisjoint(plan.val.tolist())
    assert sorted([*plan.train.tolist(), *plan.val.tolist()]) == list(range(40))
    for split, order in (("train", plan.train), ("val", plan.val)):
        tokens = read_tokens(tmp_path / "a", split)
        np.testing.assert_array_equal(tokens, expected_stream(tok, docs, order)[: len(tokens)])
    train_docs = set(split_documents(tok, read_tokens(tmp_path / "a")))
    assert train_docs.isdisjoint(split_documents(tok, read_tokens(tmp_path / "a", "val")))
    assert len(PackedDataset(tmp_path / "a", split="val")) == stats.splits["val"].windows

    # Same seed: identical bytes (threads do not change anything); another seed: another order.
    pack_documents(source, tok, 8, tmp_path / "b", seed=11, val_fraction=0.25, workers=2, progress=False)
    pack(source, tok, tmp_path / "c", seq_len=8, val_fraction=0.25, seed=12)
    for name in ("train.bin", "val.bin", "index.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "train.bin").read_bytes() != (tmp_path / "c" / "train.bin").read_bytes()

    # Packing again without validation replaces the directory's contents.
    pack(source, tok, tmp_path / "a", seq_len=8, seed=11)
    assert not (tmp_path / "a" / "val.bin").exists()
    with pytest.raises(QwenkitError, match="no 'val' split"):
        PackedDataset(tmp_path / "a", split="val")


def test_packed_dataset_with_dataloader(official_tokenizer, tmp_path):
    docs = make_docs("d", 30, seed=8)
    pack([Source(write_jsonl(tmp_path / "d.jsonl", docs))], official_tokenizer, tmp_path / "out", seq_len=8)
    ds = PackedDataset(tmp_path / "out")
    tokens = read_tokens(tmp_path / "out").astype(np.int64).reshape(len(ds), 9)
    _ = ds[0]
    clone = pickle.loads(pickle.dumps(ds))  # picklable after the file was mapped
    assert clone[len(ds) - 1].tolist() == tokens[-1].tolist()
    with pytest.raises(IndexError):
        ds[len(ds)]

    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False, num_workers=0)
    batches = list(loader)
    assert batches[0].shape == (4, 9) and batches[0].dtype == torch.long
    np.testing.assert_array_equal(torch.cat(batches).numpy(), tokens)
    inputs, labels = batches[0][:, :-1], batches[0][:, 1:]
    assert torch.equal(inputs[:, 1:], labels[:, :-1])


def test_reader_errors(official_tokenizer, tmp_path):
    with pytest.raises(QwenkitError, match="not found"):
        PackedDataset(tmp_path / "nothing")
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "index.json").write_text("{not json")
    with pytest.raises(QwenkitError, match="unreadable index"):
        PackedDataset(tmp_path / "garbage")
    (tmp_path / "garbage" / "index.json").write_text('{"format": "other"}')
    with pytest.raises(QwenkitError, match="not a qwenkit packed-data index"):
        PackedDataset(tmp_path / "garbage")

    pack(
        [Source(write_jsonl(tmp_path / "d.jsonl", make_docs("d", 10)))],
        official_tokenizer,
        tmp_path / "out",
        seq_len=4,
    )
    with open(tmp_path / "out" / "train.bin", "r+b") as f:
        f.truncate(12)
    with pytest.raises(QwenkitError, match="do not match"):
        PackedDataset(tmp_path / "out")


def test_input_errors(official_tokenizer, tmp_path):
    tok = official_tokenizer
    with pytest.raises(QwenkitError, match="missing.jsonl not found"):
        pack([Source(tmp_path / "missing.jsonl")], tok, tmp_path / "out")
    (tmp_path / "data.csv").write_text("text\nhello\n")
    with pytest.raises(QwenkitError, match="unsupported format"):
        pack([Source(tmp_path / "data.csv")], tok, tmp_path / "out")
    with pytest.raises(QwenkitError, match="weight"):
        Source(tmp_path / "x.jsonl", 0.0)
    write_jsonl(tmp_path / "small.jsonl", ["tiny"])
    with pytest.raises(QwenkitError, match="fewer than one window"):
        pack([Source(tmp_path / "small.jsonl")], tok, tmp_path / "small", seq_len=64)
    assert not (tmp_path / "small" / "index.json").exists()
    assert not list((tmp_path / "small").iterdir())  # temporary files removed


def test_cli_glue(official_tokenizer, tmp_path, capsys):
    write_jsonl(tmp_path / "a.jsonl", make_docs("a", 10))
    (tmp_path / "b.txt").write_text("one plain text document")
    parser = argparse.ArgumentParser()
    add_pack_arguments(parser)
    args = parser.parse_args(
        [
            "--input",
            f"{tmp_path / 'a.jsonl'}:2",
            "--input",
            str(tmp_path / "b.txt"),
            "--tokenizer",
            str(official_tokenizer.path),
        ]
        + ["--seq-len", "8", "--out", str(tmp_path / "out"), "--val-fraction", "0.2", "--workers", "1"]
    )
    assert [(s.paths[0].name, s.weight) for s in args.inputs] == [("a.jsonl", 2.0), ("b.txt", 1.0)]
    assert run_pack(args) == 0
    out = capsys.readouterr().out
    assert "11 documents" in out and "train:" in out and "val:" in out and "skipped documents: none" in out
    assert len(PackedDataset(tmp_path / "out", "val")) > 0

    assert input_source("dir:with:colons").paths[0].name == "dir:with:colons"
    for bad in (["--seq-len", "0"], ["--val-fraction", "1"], ["--input", "a.jsonl:-1"]):
        argv = ["--input", "a.jsonl", "--tokenizer", "t", "--seq-len", "8", "--out", "o"] + bad
        with pytest.raises(SystemExit):
            parser.parse_args(argv)


def test_pack_through_the_cli(tmp_path, official_tokenizer):
    from qwenkit.cli import main

    corpus = tmp_path / "docs.jsonl"
    corpus.write_text('{"text": "hello world, this is a document"}\nnot json\n{"text": "你好，世界"}\n' * 20)
    out = tmp_path / "packed"
    argv = ["data", "pack", "--input", f"{corpus}:2", "--tokenizer", str(official_tokenizer.path), "--seq-len", "16",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["skipped"]["invalid_json"] == 20 and index["sources"][0]["documents"] == 40
    assert main(["data", "pack", "--input", str(tmp_path / "missing.jsonl"), "--tokenizer",
                 str(official_tokenizer.path), "--seq-len", "16", "--out", str(out)]) == 1  # fmt: skip

"""The one document reader: formats, directories, skipped documents, plain text in line blocks."""

import json
from collections import Counter

import pytest

from qwenkit.data.readers import read_documents
from qwenkit.errors import QwenkitError


def test_formats_directories_and_skips(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.txt").write_text("plain\ntext\n")
    (tmp_path / "b" / "1.ndjson").write_text(
        json.dumps({"text": "one"})
        + "\n\n{bad\n"
        + json.dumps({"text": 3})
        + "\n"
        + json.dumps({"x": 1})
        + "\n"
    )
    (tmp_path / "b" / "skip.md").write_text("a directory ignores other formats")
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": " "}) + "\n" + json.dumps({"text": "zero"}) + "\n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    skipped: Counter[str] = Counter()
    documents = list(read_documents([tmp_path / "a.jsonl", tmp_path / "b", tmp_path / "latin1.txt"], skipped))
    assert documents == ["zero", "one", "plain\ntext\n"]
    assert skipped == {
        "empty": 1,
        "invalid_json": 1,
        "non_string_text": 1,
        "missing_text": 1,
        "invalid_utf8": 1,
    }
    with pytest.raises(QwenkitError, match="unsupported format"):
        list(read_documents([tmp_path / "b" / "skip.md"]))
    with pytest.raises(QwenkitError, match="not found"):
        list(read_documents([tmp_path / "missing.txt"]))


def test_plain_text_in_blocks_of_whole_lines(tmp_path):
    lines = [f"line {i} " + "x" * (i % 7) + "\n" for i in range(200)]
    (tmp_path / "t.txt").write_text("".join(lines))
    blocks = list(read_documents([tmp_path / "t.txt"], text_block_bytes=100))
    assert "".join(blocks) == "".join(lines) and len(blocks) > 10
    assert all(block.endswith("\n") and 100 <= len(block.encode()) < 100 + 20 for block in blocks[:-1])
    assert list(read_documents([tmp_path / "t.txt"])) == ["".join(lines)]


def test_a_bad_line_in_a_text_block_is_skipped_alone(tmp_path):
    (tmp_path / "t.txt").write_bytes(b"first line\n\xff\xfe not utf-8\nthird line\n")
    skipped = Counter()
    blocks = list(read_documents([tmp_path / "t.txt"], skipped, text_block_bytes=2**20))
    assert blocks == ["first line\nthird line\n"] and skipped == {"invalid_utf8": 1}

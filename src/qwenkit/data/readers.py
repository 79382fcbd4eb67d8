"""Documents from files: the one reader behind packing, vocabulary training and compression statistics.

Input formats, chosen by file suffix:
- `.jsonl` / `.ndjson`: one JSON object per line, the document is its `text` string;
  blank lines are ignored.
- `.parquet`: the `text` column (string), read in record batches; null cells are skipped.
- `.txt`: the whole file is one document (use JSONL for many documents per file); callers that
  need no document boundaries (vocabulary training) can read it in blocks of whole lines instead,
  so a file of any size streams.

A directory stands for the supported files under it (recursively, sorted by path). Malformed input
never stops reading: a document is skipped and counted under one reason of SKIP_REASONS. Missing
files, unsupported suffixes and unreadable Parquet files are QwenkitError.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from qwenkit.errors import QwenkitError

JSONL_SUFFIXES = (".jsonl", ".ndjson")
SUFFIXES = (*JSONL_SUFFIXES, ".parquet", ".txt")
SKIP_REASONS = (
    "invalid_json",  # a JSONL line that does not parse
    "missing_text",  # no `text` field / null cell, or a JSON value that is not an object
    "non_string_text",  # `text` is a number, list, object, ...
    "invalid_utf8",  # bytes that are not UTF-8, or a lone surrogate escape such as "\ud800"
    "empty",  # empty or whitespace-only text
)
PARQUET_BATCH_ROWS = 1024


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Input paths with each directory replaced by its supported files (recursively, sorted)."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES))
            if not found:
                raise QwenkitError(f"input directory {path} holds no {', '.join(SUFFIXES)} files")
            files += found
        elif path.is_file():
            if not path.name.endswith(SUFFIXES):
                raise QwenkitError(f"input file {path}: unsupported format; use {', '.join(SUFFIXES)}")
            files.append(path)
        else:
            raise QwenkitError(f"input file {path} not found")
    return files


def read_documents(
    paths: Iterable[str | Path], skipped: Counter[str] | None = None, text_block_bytes: int | None = None
) -> Iterator[str]:
    """The documents of `paths` (files or directories), in order; skipped ones counted in `skipped`.

    With `text_block_bytes`, a `.txt` file comes in pieces of whole lines of about that many bytes
    instead of as one document. Paths are all checked before the first document is read."""
    skipped = skipped if skipped is not None else Counter()
    files = expand_paths(paths)
    for path in files:
        yield from iter_documents(path, skipped, text_block_bytes)


def iter_documents(path: Path, skipped: Counter[str], text_block_bytes: int | None = None) -> Iterator[str]:
    """The documents of one file, in order; skipped ones are counted in `skipped` by reason."""
    if path.name.endswith(JSONL_SUFFIXES):
        yield from _iter_jsonl(path, skipped)
    elif path.name.endswith(".parquet"):
        yield from _iter_parquet(path, skipped)
    elif text_block_bytes is None:
        yield from _checked([path.read_bytes()], skipped)
    else:
        yield from _line_blocks(path, text_block_bytes, skipped)


def _checked(pieces: Iterable[bytes], skipped: Counter[str]) -> Iterator[str]:
    for raw in pieces:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            skipped["invalid_utf8"] += 1
            continue
        if text.strip():
            yield text
        else:
            skipped["empty"] += 1


def _line_blocks(path: Path, block_bytes: int, skipped: Counter[str]) -> Iterator[str]:
    """Whole lines in blocks of about `block_bytes`; a line that is not UTF-8 is skipped alone."""
    block: list[str] = []
    size = 0
    with open(path, "rb") as f:
        for raw in f:
            try:
                block.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                skipped["invalid_utf8"] += 1
                continue
            size += len(raw)
            if size >= block_bytes:
                yield from _checked_text(block, skipped)
                block, size = [], 0
    yield from _checked_text(block, skipped)


def _checked_text(lines: list[str], skipped: Counter[str]) -> Iterator[str]:
    text = "".join(lines)
    if text.strip():
        yield text
    elif lines:
        skipped["empty"] += 1


def _iter_jsonl(path: Path, skipped: Counter[str]) -> Iterator[str]:
    with open(path, "rb") as f:
        for raw in f:
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                skipped["invalid_utf8"] += 1
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                skipped["invalid_json"] += 1
                continue
            text = record.get("text") if isinstance(record, dict) else None
            if text is None:
                skipped["missing_text"] += 1
            elif not isinstance(text, str):
                skipped["non_string_text"] += 1
            elif "\\u" in line and not _encodes_as_utf8(text):
                skipped["invalid_utf8"] += 1
            elif not text.strip():
                skipped["empty"] += 1
            else:
                yield text


def _encodes_as_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a JSON escape
        return False
    return True


def _iter_parquet(path: Path, skipped: Counter[str]) -> Iterator[str]:
    import pyarrow as pa  # imported here so `qwenkit --help` stays fast
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        column = parquet.schema_arrow.field("text") if "text" in parquet.schema_arrow.names else None
        if column is None:
            raise QwenkitError(f"{path}: no 'text' column (columns: {', '.join(parquet.schema_arrow.names)})")
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            raise QwenkitError(f"{path}: the 'text' column holds {column.type}, expected strings")
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=["text"]):
            for text in batch.column(0).to_pylist():
                if text is None:
                    skipped["missing_text"] += 1
                elif not text.strip():
                    skipped["empty"] += 1
                else:
                    yield text
    except (pa.ArrowException, OSError) as e:
        raise QwenkitError(f"{path}: cannot read as Parquet ({e})") from None

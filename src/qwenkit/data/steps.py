"""qwenkit's datatrove pipeline steps for pretraining data (report §2.1, "Data"), and the CJK-aware text
statistics they share.

Chinese and Japanese have no spaces, so every word count, n-gram and shingle here treats each Han / kana
character as one word and a run of other letters or digits as one word (`words`). Matching (exact dedup,
MinHash, decontamination) reads `match_text`: NFKC, case-folded, punctuation and symbols dropped,
whitespace collapsed, so "Hello,  World!" and "hello world" are the same document.

Steps (each a datatrove `PipelineStep`; filters are `BaseFilter`s that give a reason for every removal,
which datatrove stores in the removed document's metadata["filter_reason"]):
- `InputReader`: JSONL / Parquet / plain-text / HTML / WARC files, each document tagged with its source;
- `ExtractText`: trafilatura on HTML documents (through datatrove's extractor and its timeout sandbox);
- `NormalizeText`: ftfy + Unicode NFC, line endings and blank runs tidied;
- `LanguageFilter`: py3langid (its model ships in the package, so it works offline), keeps chosen languages;
- exact dedup and MinHash-LSH dedup: datatrove's stages, fed by `exact_dedup_key` and `CjkMinhashSignature`;
- `QualityFilter`: Gopher / C4 / FineWeb-style rules, CJK-aware;
- `StageCounter`: documents and bytes per language after a stage, for the report.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import gzip
import itertools
import json
import unicodedata
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import regex
import xxhash
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
from datatrove.pipeline.extractors.base import ExtractorSandbox
from datatrove.pipeline.extractors.trafilatura import Trafilatura
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.formatters.base import BaseFormatter
from datatrove.pipeline.readers.jsonl import JsonlReader
from datatrove.pipeline.writers.jsonl import JsonlWriter
from datatrove.utils.typeshelper import StatHints
from datatrove.utils.word_tokenizers import WordTokenizer

from qwenkit.data import minhash_kernel
from qwenkit.errors import QwenkitError

# ---------------------------------------------------------------------------------------------
# CJK-aware text statistics

# One Han ideograph or kana is one word; Hangul is written with spaces, so it forms words as Latin does.
_WORD = regex.compile(
    r"[\p{Han}\p{Hiragana}\p{Katakana}]|[[\p{L}\p{M}\p{N}_]--[\p{Han}\p{Hiragana}\p{Katakana}]]+"
    r"(?:['’][[\p{L}\p{M}\p{N}_]--[\p{Han}\p{Hiragana}\p{Katakana}]]+)*",
    regex.V1,
)
_CJK_CHAR = regex.compile(r"[\p{Han}\p{Hiragana}\p{Katakana}]")
_NOT_WORD = regex.compile(r"[\p{P}\p{S}\s]+")
FILTER_REASON_KEY = "filter_reason"  # where datatrove's BaseFilter writes the reason of a removal


def words(text: str) -> list[str]:
    """The words of `text`: each CJK character alone, runs of other letters/digits (with inner
    apostrophes) together. Not lowercased; see `match_text` for matching."""
    return _WORD.findall(text)


def cjk_fraction(text: str) -> float:
    """Share of the words of `text` that are CJK characters (0 for text with no words)."""
    found = words(text)
    return sum(1 for w in found if _CJK_CHAR.fullmatch(w)) / len(found) if found else 0.0


def match_text(text: str) -> str:
    """The form documents are compared in: NFKC, case-folded, punctuation and symbols removed,
    whitespace collapsed to single spaces."""
    return _NOT_WORD.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def match_words(text: str) -> list[str]:
    """`words(match_text(text))`: the tokens exact dedup, MinHash and decontamination compare."""
    return words(match_text(text))


# ---------------------------------------------------------------------------------------------
# MinHash: CJK-aware 5-gram shingles, signatures identical to datatrove's MinhashDedupSignature


# datatrove hashes word n-grams after a per-language word tokenizer (Chinese needs spaCy + jieba);
# a mixed zh/en stream needs one tokenization for both, so shingles are made here from `words`.
_MERSENNE = np.uint64((1 << 61) - 1)
_SHINGLE_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant (golden ratio) combining word hashes


def shingles(text: str, n: int = 5) -> np.ndarray:
    """Hashed word n-grams of `match_text(text)` as uint64 (CJK characters count as words); a text of
    fewer than `n` words is one shingle of all of them, so short documents still deduplicate."""
    found = match_words(text)
    if not found:
        return np.zeros(0, dtype=np.uint64)
    hashes = np.fromiter((xxhash.xxh3_64_intdigest(w) for w in found), dtype=np.uint64, count=len(found))
    span = min(n, len(hashes))
    count = len(hashes) - span + 1
    out = hashes[:count].copy()
    with np.errstate(over="ignore"):  # wrap-around multiplication is the hash
        for i in range(1, span):
            out = out * _SHINGLE_MIX + hashes[i : i + count]
    return np.unique(out)


def minhash_parameters(config: MinhashConfig) -> tuple[np.ndarray, np.ndarray]:
    """The permutations (a, b) of datatrove's MinhashDedupSignature for `config` (same seed, same draws)."""
    gen = np.random.RandomState(config.seed)
    size = (1, config.num_buckets * config.hashes_per_bucket)
    return (
        gen.randint(1, _MERSENNE, dtype=np.uint64, size=size),
        gen.randint(0, _MERSENNE, dtype=np.uint64, size=size),
    )


def mod_mersenne(values: np.ndarray) -> np.ndarray:
    """`values % (2^61 - 1)` for uint64 without a division (3x numpy's %, the same numbers): 2^61 = 1
    modulo 2^61 - 1, so hi * 2^61 + lo = hi + lo, which is below 2 * (2^61 - 1): one subtraction at most."""
    values = (values & _MERSENNE) + (values >> np.uint64(61))
    return values - _MERSENNE * (values >= _MERSENNE)


def minhash_signatures(
    texts: list[str],
    config: MinhashConfig,
    batch_shingles: int = 32_768,
    threads: int = 1,
    kernel: bool = True,
) -> np.ndarray:
    """MinHash signatures [len(texts), num_buckets * hashes_per_bucket] (uint64) of `shingles(text,
    config.n_grams)`, bit-identical to datatrove's MinhashDedupSignature on those shingles. A text with no
    words gets all-max values. With `kernel` (the default) qwenkit's compiled kernel computes them
    (`minhash_kernel`: the whole batch in one call, on `threads` threads); otherwise, or when it cannot be
    built, numpy does: all documents' shingles concatenated, permuted and reduced per document, in batches
    of about `batch_shingles`."""
    return _signatures(texts, config, batch_shingles, threads, kernel)[0]


def _signatures(
    texts: list[str],
    config: MinhashConfig,
    batch_shingles: int = 32_768,
    threads: int = 1,
    kernel: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(`minhash_signatures`, which texts had words)."""
    a, b = minhash_parameters(config)
    out = np.full((len(texts), a.shape[1]), np.iinfo(np.uint64).max, dtype=np.uint64)
    mask = int(config.hash_config.max) if config.hash_config.precision == 32 else (1 << 64) - 1
    native = minhash_kernel.load() if kernel else None
    if native is not None:
        return out, native.signatures(texts, a, b, config.n_grams, mask, out, threads)
    has_words = np.zeros(len(texts), dtype=bool)
    pending: list[tuple[int, np.ndarray]] = []
    size = 0

    def flush() -> None:
        rows = np.array([i for i, _ in pending])
        lengths = np.array([len(s) for _, s in pending])
        stacked = np.concatenate([s for _, s in pending]).reshape(-1, 1)
        with np.errstate(over="ignore"):
            values = mod_mersenne(stacked * a + b)  # the product wraps mod 2^64, as datatrove's does
        values &= np.uint64(mask)
        out[rows] = np.minimum.reduceat(values, np.concatenate(([0], np.cumsum(lengths)[:-1])), axis=0)
        has_words[rows] = True

    for i, text in enumerate(texts):
        found = shingles(text, config.n_grams)
        if found.size:
            pending.append((i, found))
            size += found.size
        if size >= batch_shingles:
            flush()
            pending, size = [], 0
    if pending:
        flush()
    return out, has_words


def lsh_probability(similarity: float, bands: int, rows: int) -> float:
    """Chance that two documents of Jaccard `similarity` share at least one of `bands` LSH bands of
    `rows` hashes: 1 - (1 - s^rows)^bands (the S-curve)."""
    return 1.0 - (1.0 - similarity**rows) ** bands


def _distinct_rows(part: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(number of each row's value among the distinct rows of `part`, how many rows have each value).
    Rows are told apart by a 64-bit mix of their hashes (a fast sort), checked exactly against the first
    row of each number; on a mix collision the rows are compared as bytes instead (a slow sort)."""
    mixed = part[:, 0].copy()
    with np.errstate(over="ignore"):
        for column in range(1, part.shape[1]):
            mixed = mixed * _SHINGLE_MIX + part[:, column]
    _, first, inverse, sizes = np.unique(mixed, return_index=True, return_inverse=True, return_counts=True)
    if not (part[first[inverse]] == part).all():
        values = part.view(np.dtype((np.void, part.dtype.itemsize * part.shape[1]))).ravel()
        _, inverse, sizes = np.unique(values, return_inverse=True, return_counts=True)
    return inverse.ravel(), sizes


def lsh_duplicates(signatures: np.ndarray, bands: int) -> np.ndarray:
    """In-memory MinHash-LSH near-duplicate removal that keeps the first: bool [documents], True where a
    document shares a band (`rows` = width / `bands` consecutive equal hashes) with an earlier document
    that is kept, taking documents in order as querying then inserting into datasketch's or rensa's LSH
    does. Rows of documents without words (all-max, see `minhash_signatures`) are never duplicates.
    datatrove's stages (buckets, clusters, filter) do the same on files for Slurm / Ray, keeping one per
    union-find cluster instead."""
    count, width = signatures.shape
    if bands < 1 or width % bands:
        raise QwenkitError(f"a signature of {width} hashes does not split into {bands} bands")
    rows = width // bands
    signed = np.flatnonzero(~(signatures == np.iinfo(np.uint64).max).all(axis=1))
    keys = np.empty((signed.size, bands), dtype=np.int64)  # a band's distinct values, numbered over all bands
    shared = np.zeros(signed.size, dtype=bool)
    offset = 0
    for band in range(bands):
        part = np.ascontiguousarray(signatures[signed, band * rows : (band + 1) * rows], dtype=np.uint64)
        inverse, sizes = _distinct_rows(part)
        keys[:, band] = inverse + offset
        shared |= sizes[inverse.ravel()] > 1
        offset += sizes.size
    duplicate = np.zeros(count, dtype=bool)
    claimed = np.zeros(offset, dtype=bool)  # bands of kept documents; one alone in all its bands needs none
    for i in np.flatnonzero(shared):
        if claimed[keys[i]].any():
            duplicate[signed[i]] = True
        else:
            claimed[keys[i]] = True
    return duplicate


class CjkWordTokenizer(WordTokenizer):
    """`words` as a datatrove word tokenizer (its English one needs spaCy, its Chinese one jieba too)."""

    def word_tokenize(self, text: str) -> list[str]:
        return words(text)

    def sent_tokenize(self, text: str) -> list[str]:
        return [text]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [(0, len(text))]


class _Signed:
    """A document's signature computed ahead, where datatrove's loop expects its shingles."""

    size = 1

    def __init__(self, row: np.ndarray):
        self.row = row


class CjkMinhashSignature(MinhashDedupSignature):
    """datatrove's MinHash stage 1 with CJK-aware shingles (`shingles`); its later stages (buckets,
    clusters, filter) are used as they are. In `run`, the signatures of `batch_size` documents at a time
    are computed in one `minhash_signatures` call (the compiled kernel) ahead of datatrove's per-document
    loop, which writes them into its bucket files as it would its own."""

    name = "🎯 MinHash stage 1 (CJK-aware)"
    batch_size = 1024

    def __init__(self, output_folder, config: MinhashConfig):
        folder = str(output_folder) if isinstance(output_folder, Path) else output_folder
        super().__init__(folder, config, language=CjkWordTokenizer("multilingual"))
        self._signed: collections.deque | None = None  # inside `run`: the signatures computed ahead

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1):
        self._signed = collections.deque()
        try:
            return super().run(self._sign_ahead(data), rank, world_size)
        finally:
            self._signed = None

    def _sign_ahead(self, data: DocumentsPipeline) -> DocumentsPipeline:
        data = iter(data)
        while batch := list(itertools.islice(data, self.batch_size)):
            rows, has_words = _signatures([doc.text for doc in batch], self.config)
            for doc, row, found in zip(batch, rows, has_words, strict=True):
                self._signed.append(_Signed(row) if found else np.zeros((0, 1), dtype=np.uint64))
                yield doc  # datatrove's loop now asks get_shingles(doc.text): it takes this entry

    def get_shingles(self, text: str) -> np.ndarray:
        if self._signed is not None:
            return self._signed.popleft()
        return shingles(text, self.config.n_grams).reshape(-1, 1)

    def get_signature(self, shingles: np.ndarray) -> list[list[int]]:
        if isinstance(shingles, _Signed):
            dtype = self.config.hash_config.np_dtype
            return shingles.row.astype(dtype).reshape(self.config.num_buckets, -1).tolist()
        return super().get_signature(shingles)


def exact_dedup_key(doc: Document) -> str:
    """What exact dedup hashes: the normalized text (case, whitespace and punctuation ignored)."""
    return match_text(doc.text)


# ---------------------------------------------------------------------------------------------
# reading, writing


HTML_SUFFIXES = (".html", ".htm")
WARC_SUFFIXES = (".warc", ".warc.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".jsonl.zst")
INPUT_SUFFIXES = (*JSONL_SUFFIXES, ".parquet", ".txt", *HTML_SUFFIXES, *WARC_SUFFIXES)


def input_files(paths: list[str | Path]) -> list[Path]:
    """Input paths with each directory replaced by its supported files (recursively, sorted)."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(INPUT_SUFFIXES))
            if not found:
                raise QwenkitError(f"input directory {path} holds no {', '.join(INPUT_SUFFIXES)} files")
            files += found
        elif path.is_file():
            if not path.name.endswith(INPUT_SUFFIXES):
                raise QwenkitError(f"input file {path}: unsupported format; use {', '.join(INPUT_SUFFIXES)}")
            files.append(path)
        else:
            raise QwenkitError(f"input file {path} not found")
    return files


def output_record(writer, document: Document) -> dict:
    """What the writers store: text, the input id unchanged (even 0 or ""), metadata."""
    return {"text": document.text, "id": document.id, "metadata": document.metadata}


class InputReader(PipelineStep):
    """Reads `files` (task `rank` of `world_size` takes files rank, rank + world_size, ...) with
    datatrove's readers by suffix: JSONL (`text`, optional `id`, other keys into metadata), Parquet
    (`text` column), WARC (the HTML responses); a `.txt` or HTML file is one document. Every document
    gets metadata["source"] = `sources[i]` of its file; HTML ones also metadata["format"] = "html"."""

    type = "📖 - READER"
    name = "qwenkit input"

    def __init__(self, files: list[str], sources: list[str]):
        super().__init__()
        self.files = [str(f) for f in files]
        self.sources = list(sources)

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data
        for path, source in list(zip(self.files, self.sources, strict=True))[rank::world_size]:
            for doc in self._read(Path(path), {"source": source}):
                self.stat_update(StatHints.total)
                self.update_doc_stats(doc)
                yield doc

    def _read(self, path: Path, metadata: dict) -> Iterator[Document]:
        name = path.name
        folder = str(path.parent)
        if name.endswith(HTML_SUFFIXES + (".txt",)):
            text = path.read_bytes().decode("utf-8", errors="replace")
            if text.strip():
                extra = {"format": "html"} if name.endswith(HTML_SUFFIXES) else {}
                yield Document(text=text, id=name, metadata={**metadata, **extra})
            return
        if name.endswith(JSONL_SUFFIXES):
            from datatrove.pipeline.readers.jsonl import JsonlReader as reader_cls
        elif name.endswith(".parquet"):
            from datatrove.pipeline.readers.parquet import ParquetReader as reader_cls
        else:
            from datatrove.pipeline.readers.warc import WarcReader as reader_cls

            metadata = {**metadata, "format": "html"}
        reader = reader_cls(folder, glob_pattern=name, default_metadata=metadata)
        for doc in reader.read_file(name):
            doc.metadata.pop("file_path", None)  # the source names the input; paths leak machine layout
            # datatrove lets a record's own "source" key override default_metadata; the writers put
            # documents under output/<source>/, so a record's source ("../..") must not choose the path
            own = doc.metadata.get("source")
            if own is not None and own != metadata["source"]:
                doc.metadata["input_source"] = own
            doc.metadata.update(metadata)
            yield doc


class RankJsonlReader(JsonlReader):
    """Task `rank` reads exactly the file `{rank:05d}.jsonl` that task `rank` of the previous run
    wrote (if it wrote one), so the document numbers of the dedup stages line up."""

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data
        name = f"{rank:05d}.jsonl"
        if self.data_folder.isfile(name):
            for doc in self.read_file(name):
                self.stat_update(StatHints.total)
                yield doc


class ReasonWriter(JsonlWriter):
    """A JSONL exclusion writer that records `reason` in metadata["filter_reason"] when the step that
    removed the document gave none (datatrove's dedup filters give none)."""

    def __init__(self, output_folder: str, reason: str):
        super().__init__(output_folder, "${rank}.jsonl", compression=None, adapter=output_record)
        self.reason = reason

    def write(self, document: Document, rank: int = 0, **kwargs):
        document.metadata.setdefault(FILTER_REASON_KEY, self.reason)
        super().write(document, rank, **kwargs)


def removed_writer(folder: str | Path, stage: str, reason: str | None = None) -> ReasonWriter:
    """The exclusion writer of `stage`: OUT/removed/<stage>/<rank>.jsonl."""
    return ReasonWriter(str(Path(folder) / stage), reason or stage)


def read_jsonl_folder(folder: str | Path) -> Iterator[dict]:
    """The records of every `*.jsonl` / `*.jsonl.gz` file under `folder` (sorted by path)."""
    for path in sorted(Path(folder).rglob("*.jsonl*")):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)


# ---------------------------------------------------------------------------------------------
# extraction, normalization, language


class ExtractText(Trafilatura):
    """Main text of HTML documents (metadata["format"] == "html") by trafilatura, in datatrove's
    sandbox with a per-document timeout; other documents pass unchanged. A document with no text
    left, a timeout or an extraction error is removed with that reason (datatrove drops them silently)."""

    name = "⛏ Trafilatura (qwenkit)"

    def __init__(self, timeout: float = 5.0, favour_precision: bool = True, exclusion_writer=None):
        super().__init__(favour_precision=favour_precision, timeout=timeout)
        self.exclusion_writer = exclusion_writer

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        writer_context = self.exclusion_writer if self.exclusion_writer else contextlib.nullcontext()
        with writer_context as writer, ExtractorSandbox(timeout=self.timeout, warmup_text="") as sandbox:
            for doc in data:
                self.stat_update(StatHints.total)
                if doc.metadata.get("format") != "html":
                    self.stat_update(StatHints.forwarded)
                    yield doc
                    continue
                reason = None
                with self.track_time():
                    try:
                        text = sandbox.process_document(doc.text, self.extract)
                        reason = None if text and text.strip() else "extraction_empty"
                    except TimeoutError:
                        reason = "extraction_timeout"
                    except Exception:  # trafilatura or lxml failing on one page must not stop the run
                        reason = "extraction_error"
                if reason is None:
                    doc.text = text
                    doc.metadata.pop("format")
                    self.stat_update(StatHints.forwarded)
                    yield doc
                else:
                    self.stat_update(StatHints.dropped, f"dropped_{reason}")
                    if writer:
                        doc.metadata[FILTER_REASON_KEY] = reason
                        writer.write(doc, rank)


_BLANK_RUNS = regex.compile(r"\n{3,}")
_TRAILING_SPACE = regex.compile(r"[ \t]+\n")
_CONTROL = regex.compile(r"[\p{Cc}--[\n\t]]", regex.V1)


class NormalizeText(BaseFormatter):
    """ftfy's mojibake and HTML-entity repair, Unicode NFC (NFKC would turn Chinese full-width
    punctuation into ASCII), control characters dropped, line endings unified, trailing spaces and runs
    of blank lines trimmed. The stronger matching form is `match_text`."""

    name = "🔤 Unicode normalization"

    def format(self, text: str) -> str:
        import ftfy

        text = text.replace("\r\n", "\n").replace("\r", "\n")
        # ftfy's width and quote fixes would turn Chinese full-width punctuation and curly quotes into ASCII
        text = ftfy.fix_text(text, normalization="NFC", fix_character_width=False, uncurl_quotes=False)
        text = _CONTROL.sub("", text)
        text = _TRAILING_SPACE.sub("\n", text)
        return _BLANK_RUNS.sub("\n\n", text).strip()


@functools.cache
def _language_identifier():
    """py3langid's model, loaded once per process (a few seconds; datatrove copies steps per task)."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


class LanguageFilter(BaseFilter):
    """Language ID with py3langid (offline: the model is in the package; datatrove's fastText filter
    downloads its model). Sets metadata["language"] and ["language_score"] (probability, 0..1) and keeps
    documents in `languages` with score >= `min_score`; an empty `languages` keeps all."""

    name = "🌍 Language ID (py3langid)"

    def __init__(
        self,
        languages: list[str] | None = ("zh", "en"),
        min_score: float = 0.5,
        max_chars: int = 4000,
        exclusion_writer=None,
    ):
        super().__init__(exclusion_writer)
        self.languages = set(languages or ())
        self.min_score = min_score
        self.max_chars = max_chars

    def identify(self, text: str) -> tuple[str, float]:
        language, score = _language_identifier().classify(text[: self.max_chars])
        return language, float(score)

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        language, score = self.identify(doc.text)
        doc.metadata["language"] = language
        doc.metadata["language_score"] = round(score, 4)
        if self.languages and language not in self.languages:
            return False, "language_not_kept"
        if score < self.min_score:
            return False, "language_low_score"
        return True


# ---------------------------------------------------------------------------------------------
# rule-based quality (Gopher, C4, FineWeb), CJK-aware

ENGLISH_STOP_WORDS = frozenset(("the", "be", "to", "of", "and", "that", "have", "with"))  # Gopher's list
CHINESE_STOP_WORDS = frozenset("的是了在和有我不这也就人都一")  # the commonest function characters
BULLETS = tuple(f"{b} " for b in "•●○■□▪▫*-–·◦")  # a bullet is followed by a space ("**bold**" is not one)
TERMINAL_PUNCTUATION = (
    ".",
    "!",
    "?",
    '"',
    "'",
    "”",
    "’",
    "。",
    "！",
    "？",
    "…",
    "；",
    ";",
    ":",
    "：",
    "」",
    "』",
)
BAD_PHRASES = ("lorem ipsum", "javascript must be enabled", "enable javascript", "cookie policy")


def _duplicate_fraction(items: list[str], by_chars: bool) -> float:
    """Share of `items` (or of their characters) taken by repeats of an earlier item (Gopher)."""
    seen: set[str] = set()
    repeated = total = 0
    for item in items:
        size = len(item) if by_chars else 1
        total += size
        if item in seen:
            repeated += size
        seen.add(item)
    return repeated / total if total else 0.0


def _top_ngram_fraction(tokens: list[str], n: int) -> float:
    """Characters in the most frequent n-gram's occurrences over all word characters (Gopher)."""
    grams = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    if not grams:
        return 0.0
    gram, count = grams.most_common(1)[0]
    return count * sum(map(len, gram)) / max(1, sum(map(len, tokens)))


def _duplicate_ngram_fraction(tokens: list[str], n: int) -> float:
    """Characters of words covered by n-grams that occur more than once, over all word characters."""
    if len(tokens) < n:
        return 0.0
    counts = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    covered = np.zeros(len(tokens), dtype=bool)
    for i in range(len(tokens) - n + 1):
        if counts[tuple(tokens[i : i + n])] > 1:
            covered[i : i + n] = True
    lengths = np.fromiter(map(len, tokens), dtype=np.int64, count=len(tokens))
    return float(lengths[covered].sum() / max(1, lengths.sum()))


class QualityFilter(BaseFilter):
    """Gopher quality and repetition rules, C4's and FineWeb's line rules, with CJK-aware words: each
    Han/kana character is a word, so a Chinese document's length, stop words and n-grams are counted
    in characters (the Gopher mean-word-length rule applies to the non-CJK words only). Each rule that
    fails gives its own reason."""

    name = "🧹 Quality rules (CJK-aware)"

    def __init__(
        self,
        min_words: int = 50,
        max_words: int = 100_000,
        min_mean_word_length: float = 3.0,
        max_mean_word_length: float = 10.0,
        max_symbol_ratio: float = 0.1,
        max_bullet_lines: float = 0.9,
        max_ellipsis_lines: float = 0.3,
        min_alpha_words: float = 0.8,
        min_stop_words: int = 2,
        max_duplicate_lines: float = 0.3,
        max_duplicate_paragraphs: float = 0.3,
        max_duplicate_line_chars: float = 0.2,
        max_top_ngram: dict[int, float] | None = None,
        max_duplicate_ngram: dict[int, float] | None = None,
        min_terminal_lines: float = 0.12,
        max_short_lines: float = 0.67,
        short_line_words: int = 8,
        bad_phrases: tuple[str, ...] = BAD_PHRASES,
        exclusion_writer=None,
    ):
        super().__init__(exclusion_writer)
        self.min_words, self.max_words = min_words, max_words
        self.min_mean_word_length, self.max_mean_word_length = min_mean_word_length, max_mean_word_length
        self.max_symbol_ratio = max_symbol_ratio
        self.max_bullet_lines, self.max_ellipsis_lines = max_bullet_lines, max_ellipsis_lines
        self.min_alpha_words, self.min_stop_words = min_alpha_words, min_stop_words
        self.max_duplicate_lines, self.max_duplicate_paragraphs = (
            max_duplicate_lines,
            max_duplicate_paragraphs,
        )
        self.max_duplicate_line_chars = max_duplicate_line_chars
        self.max_top_ngram = {2: 0.2, 3: 0.18, 4: 0.16} if max_top_ngram is None else max_top_ngram
        self.max_duplicate_ngram = (
            {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
            if max_duplicate_ngram is None
            else max_duplicate_ngram
        )
        self.min_terminal_lines, self.max_short_lines = min_terminal_lines, max_short_lines
        self.short_line_words = short_line_words
        self.bad_phrases = tuple(bad_phrases)

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        reason = self.failed_rule(doc.text)
        return True if reason is None else (False, reason)

    def failed_rule(self, text: str) -> str | None:
        """The name of the first rule `text` fails, or None."""
        tokens = words(text)
        n = len(tokens)
        if n < self.min_words:
            return "too_few_words"
        if n > self.max_words:
            return "too_many_words"
        latin = [w for w in tokens if not _CJK_CHAR.fullmatch(w)]
        if len(latin) > n / 2:
            mean = sum(map(len, latin)) / len(latin)
            if not self.min_mean_word_length <= mean <= self.max_mean_word_length:
                return "mean_word_length"
        symbols = text.count("#") + text.count("...") + text.count("…")
        if symbols / n > self.max_symbol_ratio:
            return "symbol_ratio"
        lines = [line.strip() for line in text.split("\n") if line.strip()]
        if len(lines) >= 3:  # line shares of a one- or two-line document say nothing about its layout
            if sum(line.startswith(BULLETS) for line in lines) / len(lines) > self.max_bullet_lines:
                return "bullet_lines"
            if sum(line.endswith(("...", "…")) for line in lines) / len(lines) > self.max_ellipsis_lines:
                return "ellipsis_lines"
        raw = regex.findall(r"\S+", text)
        alpha = sum(1 for w in raw if regex.search(r"\p{L}", w))
        cjk_words = n - len(latin)
        if (alpha + cjk_words) / (len(raw) + cjk_words) < self.min_alpha_words:
            return "alphabetic_words"
        lowered = [w.lower() for w in tokens]
        stops = ENGLISH_STOP_WORDS if len(latin) > n / 2 else CHINESE_STOP_WORDS
        if sum(1 for w in lowered if w in stops) < self.min_stop_words:
            return "stop_words"
        folded = text.casefold()
        if any(phrase in folded for phrase in self.bad_phrases):
            return "bad_phrase"
        if _duplicate_fraction(lines, by_chars=False) > self.max_duplicate_lines:
            return "duplicate_lines"
        if _duplicate_fraction(lines, by_chars=True) > self.max_duplicate_line_chars:
            return "duplicate_line_chars"
        paragraphs = [p.strip() for p in regex.split(r"\n\s*\n", text) if p.strip()]
        if _duplicate_fraction(paragraphs, by_chars=False) > self.max_duplicate_paragraphs:
            return "duplicate_paragraphs"
        for size, limit in self.max_top_ngram.items():
            if _top_ngram_fraction(lowered, size) > limit:
                return f"top_{size}gram"
        for size, limit in self.max_duplicate_ngram.items():
            if _duplicate_ngram_fraction(lowered, size) > limit:
                return f"duplicate_{size}grams"
        if len(lines) > 1:
            terminal = sum(line.endswith(TERMINAL_PUNCTUATION) for line in lines) / len(lines)
            if terminal < self.min_terminal_lines:
                return "terminal_punctuation"
            short = sum(len(words(line)) < self.short_line_words for line in lines) / len(lines)
            if short > self.max_short_lines:
                return "short_lines"
        return None


# ---------------------------------------------------------------------------------------------
# counting for the report


class StageCounter(PipelineStep):
    """Passes documents on and counts them (and their UTF-8 bytes) per language in its datatrove stats,
    labelled `docs/<language>` and `bytes/<language>` ("unknown" before language ID)."""

    type = "📊 - COUNT"

    def __init__(self, stage: str):
        self.stage = stage
        self.name = f"after {stage}"
        super().__init__()

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            language = doc.metadata.get("language", "unknown")
            self.stat_update(f"docs/{language}")
            self.stat_update(f"bytes/{language}", value=len(doc.text.encode("utf-8")))
            yield doc

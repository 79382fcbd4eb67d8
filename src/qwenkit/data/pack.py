"""Pack documents into fixed-length training windows (report §2.1): the sampling plan and the writer.

Documents are read from JSONL, Parquet or plain-text files (`qwenkit.data.readers`), tokenized,
each followed by one `<|endoftext|>`, shuffled, concatenated and cut into non-overlapping windows
of `seq_len + 1` tokens (input = w[:-1], labels = w[1:]); the last partial window is dropped.

Documents and their numbering: sources in the order given; within a source its files in order
(a directory stands for the supported files under it, sorted by path); within a file, reading
order. Skipped documents get no number. `plan_documents` maps these numbers to the output order.
Malformed input never stops packing: a document is skipped and counted under its reason.

Output directory (`qwenkit.data.packed` reads it): `train.bin` (and `val.bin`), flat little-endian
token arrays (uint16 when the vocabulary fits, else uint32) holding whole windows only, and
`index.json` describing them.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from tqdm import tqdm

from qwenkit.data.packed import FORMAT, FORMAT_VERSION, INDEX_FILENAME, SPLITS
from qwenkit.data.readers import SKIP_REASONS, expand_paths, iter_documents
from qwenkit.errors import QwenkitError

if TYPE_CHECKING:
    from qwenkit.tokenizer import Tokenizer


# Tokenize in batches of this many documents or characters, whichever comes first.
BATCH_DOCUMENTS = 1024
BATCH_CHARS = 4_000_000


@dataclass(frozen=True)
class Source:
    """Input files sampled with `weight`, per document.

    Weight w = k + f (integer k, fraction f): every document of the source is used k times, and
    a further round(f * n) of its n documents (rounded half up, chosen by the seed) once more.
    So 2.0 uses each document twice, 0.5 a fixed half, 1.5 every document once and half twice.
    """

    paths: tuple[Path, ...]
    weight: float = 1.0

    def __post_init__(self) -> None:
        paths = (self.paths,) if isinstance(self.paths, str | os.PathLike) else self.paths
        object.__setattr__(self, "paths", tuple(Path(p) for p in paths))
        if not self.paths:
            raise QwenkitError("a source needs at least one input path")
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise QwenkitError(
                f"source weight must be a finite number > 0, got {self.weight} for {self.paths[0]}"
            )


@dataclass
class SplitStats:
    documents: int  # document uses, repeats from weights included
    tokens: int  # tokens kept in whole windows
    windows: int
    dropped_tokens: int  # the last partial window


@dataclass
class PackStats:
    seq_len: int
    dtype: str
    documents_per_source: list[int]  # documents read (not skipped), before weighting
    skipped_per_source: list[dict[str, int]]
    splits: dict[str, SplitStats]
    tokenized_tokens: int  # tokens of all documents read, end-of-text tokens included
    tokenize_seconds: float
    seconds: float = field(default=0.0)

    @property
    def documents(self) -> int:
        return sum(self.documents_per_source)

    @property
    def skipped(self) -> dict[str, int]:
        """Skipped documents per reason, over all sources (reasons with a zero count left out)."""
        total: Counter[str] = Counter()
        for counts in self.skipped_per_source:
            total.update(counts)
        return {reason: total[reason] for reason in SKIP_REASONS if total[reason]}


class DocumentPlan(NamedTuple):
    """Document numbers in output order, per split (train includes repeats from weights)."""

    train: np.ndarray
    val: np.ndarray


def token_dtype(vocab_size: int) -> np.dtype:
    """Little-endian uint16 when every id fits, else uint32."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def plan_documents(
    documents_per_source: Sequence[int], weights: Sequence[float], seed: int = 0, val_fraction: float = 0.0
) -> DocumentPlan:
    """Which documents go to which split, how often, in which order; depends only on the arguments.

    Per source (documents numbered consecutively across sources): round(val_fraction * n) of its n
    documents, chosen by the seed, are held out for validation, once each, before weighting, so
    no document is in both splits. The rest are weighted as `Source` describes. Each split is then
    shuffled as a whole, so sources mix.
    """
    if len(documents_per_source) != len(weights):
        raise QwenkitError("plan_documents needs one weight per source")
    train_parts, val_parts = [], []
    first = 0
    for i, (n, weight) in enumerate(zip(documents_per_source, weights, strict=True)):
        chosen = first + np.random.default_rng([seed, 0, i]).permutation(n)
        n_val = _round_half_up(val_fraction * n)
        val_parts.append(chosen[:n_val])
        kept = chosen[n_val:]
        repeats, fraction = divmod(weight, 1.0)
        train_parts += [kept] * int(repeats) + [kept[: _round_half_up(fraction * len(kept))]]
        first += n
    empty = np.zeros(0, dtype=np.int64)
    train = np.concatenate([empty, *train_parts])
    val = np.concatenate([empty, *val_parts])
    return DocumentPlan(
        train=np.random.default_rng([seed, 1]).permutation(train),
        val=np.random.default_rng([seed, 2]).permutation(val),
    )


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def _batches(texts: Iterable[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if len(batch) >= BATCH_DOCUMENTS or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


# ---------------------------------------------------------------------------------------------
# Packing


def pack_documents(
    sources: Sequence[Source],
    tokenizer: Tokenizer,
    seq_len: int,
    out_dir: str | Path,
    seed: int = 0,
    val_fraction: float = 0.0,
    workers: int | None = None,
    progress: bool = True,
) -> PackStats:
    """Tokenize, shuffle and pack `sources` into `out_dir`; see the module docstring.

    `workers` threads encode (default: all cores). Tokens go to a temporary file first, so the
    corpus is never held in memory; the output files replace earlier ones only at the end.
    `progress` shows a progress bar on a terminal.
    """
    start = time.perf_counter()
    if seq_len < 1:
        raise QwenkitError(f"seq_len must be >= 1, got {seq_len}")
    if not 0.0 <= val_fraction < 1.0:
        raise QwenkitError(f"val_fraction must be in [0, 1), got {val_fraction}")
    workers = workers or os.cpu_count() or 1
    if not sources:
        raise QwenkitError("no input sources given")
    files_per_source = [expand_paths(source.paths) for source in sources]
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise QwenkitError(f"output {out_dir} exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    window = seq_len + 1
    splits = ("train", "val") if val_fraction > 0 else ("train",)

    token_file = out_dir / ".tokens.tmp"
    temporary = [token_file, out_dir / f"{INDEX_FILENAME}.tmp", *(out_dir / f"{s}.bin.tmp" for s in SPLITS)]
    try:
        tokenize_start = time.perf_counter()
        lengths, documents_per_source, skipped_per_source = _tokenize(
            files_per_source, tokenizer, token_file, dtype, workers, progress
        )
        tokenize_seconds = time.perf_counter() - tokenize_start

        plan = plan_documents(documents_per_source, [s.weight for s in sources], seed, val_fraction)
        orders = {"train": plan.train, "val": plan.val}
        split_stats = {}
        for split in splits:
            total = int(lengths[orders[split]].sum())
            windows = total // window
            if windows == 0:
                raise QwenkitError(
                    f"the {split} split holds {total} tokens, fewer than one window of seq_len + 1 = "
                    f"{window}; add data, lower --seq-len or raise --val-fraction"
                )
            split_stats[split] = SplitStats(
                len(orders[split]), windows * window, windows, total - windows * window
            )

        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else lengths
        tokens = np.memmap(token_file, dtype=dtype, mode="r")
        for split in splits:
            _write_split(
                tokens, starts, lengths, orders[split], split_stats[split], out_dir / f"{split}.bin.tmp"
            )
        del tokens

        stats = PackStats(
            seq_len=seq_len,
            dtype=dtype.name,
            documents_per_source=documents_per_source,
            skipped_per_source=skipped_per_source,
            splits=split_stats,
            tokenized_tokens=int(lengths.sum()),
            tokenize_seconds=tokenize_seconds,
        )
        index = _index(stats, sources, plan, documents_per_source, tokenizer, seed, val_fraction)
        (out_dir / f"{INDEX_FILENAME}.tmp").write_text(json.dumps(index, indent=2) + "\n")

        # Readers need index.json, so remove it first and write it last: an interrupted run
        # leaves no index that points at half-replaced files.
        (out_dir / INDEX_FILENAME).unlink(missing_ok=True)
        for split in SPLITS:
            (out_dir / f"{split}.bin").unlink(missing_ok=True)
        for split in splits:
            os.replace(out_dir / f"{split}.bin.tmp", out_dir / f"{split}.bin")
        os.replace(out_dir / f"{INDEX_FILENAME}.tmp", out_dir / INDEX_FILENAME)
    finally:
        for path in temporary:
            path.unlink(missing_ok=True)
    stats.seconds = time.perf_counter() - start
    return stats


def _tokenize(
    files_per_source: list[list[Path]],
    tokenizer: Tokenizer,
    token_file: Path,
    dtype: np.dtype,
    workers: int,
    progress: bool,
) -> tuple[np.ndarray, list[int], list[dict[str, int]]]:
    """Encode every document + end-of-text into `token_file`; (lengths, documents, skipped) per source."""
    skipped = [Counter() for _ in files_per_source]
    documents = [0] * len(files_per_source)
    lengths: list[np.ndarray] = []
    n_tokens = 0

    def tagged_batches() -> Iterator[tuple[int, list[str]]]:
        for i, files in enumerate(files_per_source):
            texts = itertools.chain.from_iterable(iter_documents(path, skipped[i]) for path in files)
            for batch in _batches(texts):
                yield i, batch

    # disable=None: show the bar only on a terminal.
    bar = tqdm(desc="tokenizing", unit="doc", unit_scale=True, disable=None if progress else True)
    with bar, open(token_file, "wb") as out:
        for i, batch in tagged_batches():
            sizes, tokens = _encode(batch, tokenizer, dtype, workers)
            tokens.tofile(out)
            lengths.append(sizes)
            documents[i] += len(sizes)
            n_tokens += len(tokens)
            bar.update(len(sizes))
            bar.set_postfix_str(f"{n_tokens / 1e6:.1f}M tokens", refresh=False)
    skipped_per_source = [{reason: c[reason] for reason in SKIP_REASONS if c[reason]} for c in skipped]
    return np.concatenate([np.zeros(0, dtype=np.int64), *lengths]), documents, skipped_per_source


def _encode(
    batch: list[str], tokenizer: Tokenizer, dtype: np.dtype, workers: int
) -> tuple[np.ndarray, np.ndarray]:
    """(sizes, tokens) of a batch of documents, each followed by end-of-text.

    tiktoken encodes on `workers` threads without the GIL. Measured on 2 cores, a process pool
    was slower (texts and tokens cross process boundaries), and encoding in the background while
    the next batch is read gained nothing.
    """
    encoded = tokenizer.encode_batch(batch, num_threads=workers)
    for ids in encoded:
        ids.append(tokenizer.eod_id)
    sizes = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    tokens = np.fromiter(itertools.chain.from_iterable(encoded), dtype=dtype, count=int(sizes.sum()))
    return sizes, tokens


def _write_split(
    tokens: np.ndarray,
    starts: np.ndarray,
    lengths: np.ndarray,
    order: np.ndarray,
    stats: SplitStats,
    path: Path,
) -> None:
    """Concatenate the documents of `order` into `path`, keeping whole windows only."""
    itemsize = tokens.dtype.itemsize
    with open(path, "wb", buffering=1 << 22) as f:
        for start, length in zip(starts[order].tolist(), lengths[order].tolist(), strict=True):
            f.write(tokens[start : start + length].data)
            if f.tell() >= stats.tokens * itemsize:
                break
        f.truncate(stats.tokens * itemsize)


def _index(
    stats: PackStats,
    sources: Sequence[Source],
    plan: DocumentPlan,
    documents_per_source: list[int],
    tokenizer: Tokenizer,
    seed: int,
    val_fraction: float,
) -> dict:
    source_of = np.repeat(np.arange(len(sources)), documents_per_source)
    uses = {
        split: np.bincount(source_of[order], minlength=len(sources)).tolist()
        for split, order in plan._asdict().items()
    }
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "seq_len": stats.seq_len,
        "dtype": stats.dtype,
        "byte_order": "little",
        "vocab_size": tokenizer.vocab_size,
        "eod_id": tokenizer.eod_id,
        "tokenizer": str(tokenizer.path) if tokenizer.path is not None else None,
        "seed": seed,
        "val_fraction": val_fraction,
        "splits": {
            split: {"file": f"{split}.bin", **vars(split_stats)}
            for split, split_stats in stats.splits.items()
        },
        "sources": [
            {
                "paths": [str(p) for p in source.paths],
                "weight": source.weight,
                "documents": documents_per_source[i],
                "train_documents": uses["train"][i],
                "val_documents": uses["val"][i],
                "skipped": stats.skipped_per_source[i],
            }
            for i, source in enumerate(sources)
        ],
        "skipped": stats.skipped,
    }

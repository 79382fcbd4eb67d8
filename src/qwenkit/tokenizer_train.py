"""Vocabulary training (report §2.1): byte-level BPE from scratch, or extending an existing vocabulary.

Qwen started from cl100k and added tokens for Chinese and other languages. `train_vocab(base=...)`
does the same: every base token keeps its rank, new text is first segmented by the base vocabulary,
and merges learned over base tokens take the ranks after it. Text is NFC-normalized and split by
Qwen's regex (`PAT_STR`, digits one at a time) exactly as `Tokenizer.encode` does, so tiktoken
reproduces the segmentation the trainer learned. `compression_stats` measures bytes per token per
language and tokenizer, like the report's Figure 3.
"""

from __future__ import annotations

import heapq
import json
import os
import unicodedata
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import regex
import tiktoken
from tokenizers import Regex, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer
from tqdm import tqdm

from qwenkit.data.readers import expand_paths, read_documents
from qwenkit.errors import QwenkitError
from qwenkit.hf_tokenizer import bytes_to_unicode
from qwenkit.tokenizer import PAT_STR, VOCAB_FILENAME, Tokenizer

BLOCK_BYTES = 1 << 20  # plain text is read in blocks of whole lines of about this size

_PRETOKENIZE = regex.compile(PAT_STR)
_NOT_A_TOKEN = 1 << 62


@dataclass
class CorpusCounts:
    """What reading the input found: text pieces, UTF-8 bytes of text, and skipped documents by reason
    (`qwenkit.data.readers.SKIP_REASONS`)."""

    documents: int = 0
    bytes: int = 0
    skipped: Counter[str] = field(default_factory=Counter)


def check_output_dir(path: str | Path) -> Path:
    """The output directory as a Path, or QwenkitError when something other than a directory is there."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise QwenkitError(f"output {path} exists and is not a directory")
    return path


def check_inputs(files: Sequence[str | Path]) -> list[Path]:
    """The input files (a directory stands for its supported files), or QwenkitError naming the first
    path that is missing or of an unsupported format."""
    if not files:
        raise QwenkitError("no input files given")
    return expand_paths(files)


def read_corpus(
    files: Sequence[str | Path], counts: CorpusCounts | None = None, progress: bool = True
) -> Iterator[str]:
    """Stream the NFC-normalized text of `files` through the one document reader (any format
    `qwenkit data pack` reads); plain text comes in blocks of whole lines of about 1 MB, since
    vocabulary training needs no document boundaries."""
    counts = counts if counts is not None else CorpusCounts()
    paths = check_inputs(files)
    with tqdm(unit="B", unit_scale=True, desc="reading", disable=not progress) as bar:
        for text in read_documents(paths, counts.skipped, text_block_bytes=BLOCK_BYTES):
            text = unicodedata.normalize("NFC", text)
            size = len(text.encode("utf-8"))
            counts.documents += 1
            counts.bytes += size
            bar.update(size)
            yield text


def byte_ranks() -> dict[bytes, int]:
    """The 256 single-byte tokens, rank = byte value: the start of a vocabulary trained from scratch."""
    return {bytes([b]): b for b in range(256)}


def ranks_with_merges(base: dict[bytes, int], merges: Sequence[tuple[bytes, bytes]]) -> dict[bytes, int]:
    """`base` plus the token of merge i at rank len(base) + i."""
    ranks = dict(base)
    for left, right in merges:
        token = left + right
        if token in ranks:
            raise QwenkitError(f"merge {left!r} + {right!r} makes {token!r}, which is already a token")
        ranks[token] = len(ranks)
    return ranks


def load_base_ranks(base: str | Path) -> dict[bytes, int]:
    """BPE ranks of a `qwen.tiktoken` file, or of the one in a checkpoint directory."""
    tokenizer = Tokenizer.from_file(base)
    return {tokenizer.token_bytes(rank): rank for rank in range(tokenizer.n_bpe)}


def learn_merges(
    files: Sequence[str | Path],
    vocab_size: int,
    base: str | Path | None = None,
    *,
    min_frequency: int = 2,
    progress: bool = True,
    counts: CorpusCounts | None = None,
) -> tuple[dict[bytes, int], list[tuple[bytes, bytes]]]:
    """The base ranks (the 256 bytes when `base` is None) and the merges learned on top, in order.

    Stops early, with fewer merges, when no adjacent pair occurs `min_frequency` times any more.
    """
    paths = check_inputs(files)
    base_ranks = byte_ranks() if base is None else load_base_ranks(base)
    if vocab_size < 256:
        raise QwenkitError(f"vocab size {vocab_size} is too small: the 256 single bytes alone take 256 ranks")
    if vocab_size < len(base_ranks):
        raise QwenkitError(
            f"vocab size {vocab_size} is smaller than the base vocabulary {base} ({len(base_ranks)} ranks); "
            "extension keeps every base token, so pass a larger --vocab-size"
        )
    counts = counts if counts is not None else CorpusCounts()
    documents = read_corpus(paths, counts, progress)
    if base is None:
        merges = _train_from_bytes(documents, vocab_size, min_frequency)
    else:
        word_counts = count_words(documents)
        merges = extend_merges(word_counts, base_ranks, vocab_size - len(base_ranks), min_frequency, progress)
    if counts.bytes == 0:
        raise QwenkitError(f"no text in the input files ({', '.join(str(p) for p in paths)})")
    return base_ranks, merges


def train_vocab(
    files: Sequence[str | Path],
    vocab_size: int,
    base: str | Path | None = None,
    *,
    min_frequency: int = 2,
    progress: bool = True,
    counts: CorpusCounts | None = None,
) -> dict[bytes, int]:
    """BPE ranks for `files`: `vocab_size` ranks in all (fewer if the text runs out of pairs).

    From scratch: ranks 0..255 are the single bytes, then the merged tokens in the order learned.
    With `base` (a `qwen.tiktoken` file or a checkpoint directory): the base ranks unchanged, then
    tokens learned over the base segmentation of the new text. Special tokens are not counted.
    """
    base_ranks, merges = learn_merges(
        files, vocab_size, base, min_frequency=min_frequency, progress=progress, counts=counts
    )
    return ranks_with_merges(base_ranks, merges)


def train_tokenizer(
    files: Sequence[str | Path],
    vocab_size: int,
    out_dir: str | Path,
    base: str | Path | None = None,
    *,
    min_frequency: int = 2,
    progress: bool = True,
    counts: CorpusCounts | None = None,
) -> Tokenizer:
    """Train (see `train_vocab`), write `out_dir/qwen.tiktoken` and return the tokenizer loaded from it."""
    out_dir = check_output_dir(out_dir)  # before training, which can take long
    ranks = train_vocab(
        files, vocab_size, base, min_frequency=min_frequency, progress=progress, counts=counts
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    Tokenizer(ranks).save(out_dir / VOCAB_FILENAME)
    return Tokenizer.from_file(out_dir / VOCAB_FILENAME)


def _train_from_bytes(
    documents: Iterator[str], vocab_size: int, min_frequency: int
) -> list[tuple[bytes, bytes]]:
    """From-scratch merges by the Hugging Face `tokenizers` BPE trainer (Rust, all cores).

    Its alphabet is the 256 byte characters of byte-level BPE, its words the pieces of `PAT_STR`.
    """
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(documents, trainer)
    to_byte = {char: byte for byte, char in bytes_to_unicode().items()}

    def as_bytes(token: str) -> bytes:
        return bytes(to_byte[char] for char in token)

    merges = [(as_bytes(left), as_bytes(right)) for left, right in json.loads(hf.to_str())["model"]["merges"]]
    return _first_merge_per_token(merges)


def _first_merge_per_token(merges: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Drop a merge that makes a token an earlier merge already made (tiktoken ranks are per token).

    The Hugging Face trainer can learn `a + bc` after `ab + c`; its vocabulary (and so `vocab_size`)
    counts the token once, and tiktoken merges either pair at that token's rank.
    """
    seen: set[bytes] = set()
    kept = []
    for left, right in merges:
        if left + right not in seen:
            seen.add(left + right)
            kept.append((left, right))
    return kept


def count_words(documents: Iterator[str]) -> Counter[str]:
    """How often each `PAT_STR` piece (pre-token) occurs in `documents`."""
    counts: Counter[str] = Counter()
    for text in documents:
        counts.update(_PRETOKENIZE.findall(text))
    return counts


def _bpe_fixpoint(parts: list[int], ranks: dict[bytes, int], token_bytes: list[bytes]) -> list[int]:
    """tiktoken's BPE loop: merge the adjacent pair whose concatenation has the lowest rank (leftmost
    on ties) until no adjacent pair concatenates to a token."""

    def rank_of(left: int, right: int) -> int:
        return ranks.get(token_bytes[left] + token_bytes[right], _NOT_A_TOKEN)

    tb = token_bytes
    pair_ranks = [ranks.get(tb[left] + tb[right], _NOT_A_TOKEN) for left, right in pairwise(parts)]
    while pair_ranks:
        best = min(pair_ranks)
        if best == _NOT_A_TOKEN:
            break
        i = pair_ranks.index(best)
        parts[i : i + 2] = [best]
        del pair_ranks[i]
        if i > 0:
            pair_ranks[i - 1] = rank_of(parts[i - 1], parts[i])
        if i < len(pair_ranks):
            pair_ranks[i] = rank_of(parts[i], parts[i + 1])
    return parts


def extend_merges(
    word_counts: dict[str, int],
    base_ranks: dict[bytes, int],
    n_merges: int,
    min_frequency: int = 2,
    progress: bool = True,
) -> list[tuple[bytes, bytes]]:
    """Up to `n_merges` merges learned over the base segmentation of `word_counts`' words.

    Each word is kept exactly as tiktoken segments it with the vocabulary learned so far: a new
    token merges every adjacent pair that concatenates to it (not only the pair counted), and the
    merged token may combine further with a neighbour into an existing token, so the counts the
    trainer optimizes are those of real encodings. Ties in pair counts go to the lower token ids.
    """
    # Written here because the Hugging Face trainer starts from characters and applies its own merge
    # rules; it cannot start from a base vocabulary's tiktoken segmentation and keep it exact.
    ranks = dict(base_ranks)
    token_bytes = [b""] * len(ranks)
    for token, rank in ranks.items():
        token_bytes[rank] = token
    encoder = tiktoken.Encoding("base", pat_str=PAT_STR, mergeable_ranks=base_ranks, special_tokens={})
    texts = list(word_counts)
    freqs = [word_counts[text] for text in texts]
    words = [encoder.encode_ordinary(text) for text in texts]  # faster than the batch call's thread pool
    del texts

    pair_counts: dict[tuple[int, int], int] = {}
    where: dict[tuple[int, int], list[int]] = {}  # pair -> words that had it (may list a word twice)
    for index, (word, freq) in enumerate(zip(words, freqs, strict=True)):
        for pair in pairwise(word):
            pair_counts[pair] = pair_counts.get(pair, 0) + freq
            where.setdefault(pair, []).append(index)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[bytes, bytes]] = []
    with tqdm(total=n_merges, desc="merges", disable=not progress) as bar:
        while len(merges) < n_merges and heap:
            negative_count, pair = heapq.heappop(heap)
            if pair_counts.get(pair, 0) != -negative_count:
                continue  # stale entry; the current count has its own entry
            if -negative_count < min_frequency:
                break
            left, right = token_bytes[pair[0]], token_bytes[pair[1]]
            token = left + right
            ranks[token] = len(token_bytes)
            token_bytes.append(token)
            merges.append((left, right))
            bar.update(1)
            # Every split of the new token into two tokens is now merged by tiktoken.
            affected: set[int] = set()
            for cut in range(1, len(token)):
                a, b = ranks.get(token[:cut]), ranks.get(token[cut:])
                if a is not None and b is not None:
                    affected.update(where.pop((a, b), ()))
            changed: set[tuple[int, int]] = set()
            for index in affected:
                old = words[index]
                new = _bpe_fixpoint(list(old), ranks, token_bytes)
                if len(new) == len(old):
                    continue
                words[index] = new
                # Only pairs touching the stretch between the common prefix and suffix changed.
                prefix = 0
                while old[prefix] == new[prefix]:
                    prefix += 1
                suffix = 0
                while suffix < len(new) - prefix and old[-1 - suffix] == new[-1 - suffix]:
                    suffix += 1
                start = max(prefix - 1, 0)
                old_part, new_part = old[start : len(old) - suffix + 1], new[start : len(new) - suffix + 1]
                freq = freqs[index]
                for old_pair in pairwise(old_part):
                    pair_counts[old_pair] -= freq
                    changed.add(old_pair)
                for new_pair in pairwise(new_part):
                    pair_counts[new_pair] = pair_counts.get(new_pair, 0) + freq
                    changed.add(new_pair)
                    where.setdefault(new_pair, []).append(index)
            for changed_pair in changed:
                count = pair_counts[changed_pair]
                if count > 0:
                    heapq.heappush(heap, (-count, changed_pair))
                else:
                    del pair_counts[changed_pair]
    return merges


# ----------------------------------------------------------------------------------------------
# Compression statistics (report Figure 3)


def compression_stats(tokenizers: dict[str, Tokenizer], files: Sequence[str | Path]) -> list[dict]:
    """Per input file (one language or source, named by its stem) and tokenizer: UTF-8 bytes,
    characters, tokens, bytes per token (higher = better compression) and tokens per character."""
    rows = []
    for path in check_inputs(files):
        n_bytes = n_chars = 0
        n_tokens = dict.fromkeys(tokenizers, 0)
        batch: list[str] = []
        for text in read_corpus([path], progress=False):
            n_bytes += len(text.encode("utf-8"))
            n_chars += len(text)
            batch.append(text)
            if len(batch) >= 256:
                _count_tokens(tokenizers, batch, n_tokens)
                batch = []
        _count_tokens(tokenizers, batch, n_tokens)
        if n_chars == 0:
            raise QwenkitError(f"no text in {path}")
        for name, tokens in n_tokens.items():
            rows.append(
                {
                    "file": path.stem,
                    "tokenizer": name,
                    "bytes": n_bytes,
                    "characters": n_chars,
                    "tokens": tokens,
                    "bytes_per_token": n_bytes / tokens,
                    "tokens_per_character": tokens / n_chars,
                }
            )
    return rows


def _count_tokens(tokenizers: dict[str, Tokenizer], texts: list[str], n_tokens: dict[str, int]) -> None:
    if texts:
        for name, tokenizer in tokenizers.items():
            n_tokens[name] += sum(map(len, tokenizer.encode_batch(texts, num_threads=os.cpu_count() or 1)))


def format_stats_table(rows: Sequence[dict]) -> str:
    """A Markdown table of `compression_stats` rows."""
    lines = [
        "| file | tokenizer | bytes | characters | tokens | bytes/token | tokens/char |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['file']} | {r['tokenizer']} | {r['bytes']:,} | {r['characters']:,} | {r['tokens']:,} "
            f"| {r['bytes_per_token']:.2f} | {r['tokens_per_character']:.3f} |"
        )
    return "\n".join(lines)


def write_stats(rows: Sequence[dict], out_png: str | Path) -> None:
    """Grouped bar chart of bytes per token, one group per file and one bar per tokenizer (PNG)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, no display needed

    files = list(dict.fromkeys(r["file"] for r in rows))
    names = list(dict.fromkeys(r["tokenizer"] for r in rows))
    value = {(r["file"], r["tokenizer"]): r["bytes_per_token"] for r in rows}
    width = 0.8 / max(len(names), 1)
    fig = Figure(figsize=(max(6.0, 1.2 * len(files) * max(len(names), 1) * 0.6 + 2), 4.0))
    ax = fig.subplots()
    for j, name in enumerate(names):
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(files))]
        ax.bar(xs, [value.get((f, name), 0.0) for f in files], width, label=name)
    ax.set_xticks(range(len(files)), files)
    ax.set_ylabel("bytes per token (higher = better)")
    ax.set_title("Compression rate")
    ax.legend()
    fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, format="png", dpi=120)

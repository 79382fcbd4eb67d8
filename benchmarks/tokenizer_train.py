"""Vocabulary training speed: 32K ranks from scratch, and the official vocabulary extended by 8K.

The corpus is generated here, nothing is downloaded: Zipf-distributed words from a generated
lexicon of English-like words (syllables, spaces, punctuation, digits) and of Chinese-like words
(1-3 CJK characters, clauses ended by full-width punctuation). Half the bytes are each kind. The
extension learns over the first `--extend-mb` MB of the Chinese-like half.
Results go to docs/benchmarks.md.

    .venv/bin/python benchmarks/tokenizer_train.py [--mb 100] [--vocab 32000] [--extend 8000] [--extend-mb 10]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from report import write_section

from qwenkit.tokenizer import Tokenizer
from qwenkit.tokenizer_train import CorpusCounts, compression_stats, format_stats_table, train_tokenizer

HEADING = """## Vocabulary training (`benchmarks/tokenizer_train.py`)

`qwenkit tokenizer train` from scratch runs the Hugging Face `tokenizers` BPE trainer (Rust, all
cores); extending a vocabulary runs qwenkit's own trainer (Python), which keeps every word exactly as
tiktoken segments it with the vocabulary learned so far. One run each. The corpus is synthetic, so
compression figures show the method working, not what real English or Chinese would give."""

CONSONANTS = [
    "b",
    "c",
    "d",
    "f",
    "g",
    "h",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "w",
    "st",
    "th",
    "ch",
    "br",
]
VOWELS = ["a", "e", "i", "o", "u", "ou", "ea", "ai"]


def official_vocab_path() -> Path:
    """The official qwen.tiktoken shipped in the dashscope package."""
    spec = importlib.util.find_spec("dashscope")
    path = Path(spec.submodule_search_locations[0]) / "resources" / "qwen.tiktoken" if spec else None
    if path is None or not path.is_file():
        sys.exit("the official qwen.tiktoken (from the dashscope package) is needed for the extension")
    return path


def zipf_indices(rng: np.random.Generator, n_words: int, size: int) -> np.ndarray:
    weights = 1.0 / (np.arange(n_words) + 2.7)  # Zipf-Mandelbrot, like word frequencies in real text
    return rng.choice(n_words, size=size, p=weights / weights.sum())


def english_lexicon(rng: np.random.Generator, n: int) -> list[str]:
    words: set[str] = set()
    while len(words) < n:
        syllables = rng.integers(1, 4)
        word = "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(syllables))
        if rng.random() < 0.3:
            word += rng.choice(["s", "n", "d", "r", "ng", "ck"])
        words.add(word)
    return sorted(words, key=lambda w: (len(w), w))


def chinese_lexicon(rng: np.random.Generator, n: int) -> list[str]:
    chars = [chr(c) for c in rng.choice(np.arange(0x4E00, 0x9FA6), size=3000, replace=False)]
    char_ids = zipf_indices(rng, len(chars), 4 * n)
    words: set[str] = set()
    position = 0
    while len(words) < n:
        length = int(rng.choice([1, 2, 2, 2, 3]))
        words.add("".join(chars[i] for i in char_ids[position : position + length]))
        position = (position + length) % (len(char_ids) - 3)
    return sorted(words, key=lambda w: (len(w), w))


def english_text(rng: np.random.Generator, lexicon: list[str], n_bytes: int) -> str:
    pieces: list[str] = []
    size = 0
    while size < n_bytes:
        words = [lexicon[i] for i in zipf_indices(rng, len(lexicon), 200_000)]
        lengths = rng.integers(5, 20, size=len(words) // 5)
        start = 0
        for length in lengths:
            sentence = words[start : start + length]
            start += length
            if len(sentence) < 2:
                break
            if rng.random() < 0.2:
                sentence.insert(int(rng.integers(len(sentence))), str(int(rng.integers(0, 3000))))
            text = (
                sentence[0].capitalize()
                + " "
                + " ".join(sentence[1:])
                + rng.choice([".", ".", ",", "?", "!"])
            )
            text += "\n" if rng.random() < 0.15 else " "
            pieces.append(text)
            size += len(text)
    return "".join(pieces)


def chinese_text(rng: np.random.Generator, lexicon: list[str], n_bytes: int) -> str:
    pieces: list[str] = []
    size = 0
    while size < n_bytes:
        words = [lexicon[i] for i in zipf_indices(rng, len(lexicon), 200_000)]
        lengths = rng.integers(3, 12, size=len(words) // 3)
        start = 0
        for length in lengths:
            clause = words[start : start + length]
            start += length
            if not clause:
                break
            text = "".join(clause) + rng.choice(["，", "，", "。", "、", "；"])
            if rng.random() < 0.1:
                text += "\n"
            pieces.append(text)
            size += len(text.encode("utf-8"))
    return "".join(pieces)


def make_corpus(
    directory: Path, megabytes: float, extend_megabytes: float, seed: int = 0
) -> tuple[Path, Path, Path]:
    """english.txt and chinese.txt (half the bytes each), and chinese-extend.txt: chinese.txt's start."""
    rng = np.random.default_rng(seed)
    half = int(megabytes * 1e6 / 2)
    english = directory / "english.txt"
    chinese = directory / "chinese.txt"
    chinese_start = directory / "chinese-extend.txt"
    english.write_text(english_text(rng, english_lexicon(rng, 30_000), half), encoding="utf-8")
    text = chinese_text(rng, chinese_lexicon(rng, 30_000), half)
    chinese.write_text(text, encoding="utf-8")
    end = text.find("\n", int(extend_megabytes * 1e6 / 3))  # about 3 bytes per character
    chinese_start.write_text(text[: end + 1] if end >= 0 else text, encoding="utf-8")
    return english, chinese, chinese_start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--mb", type=float, default=100.0, help="corpus size in MB (half English-, half Chinese-like)"
    )
    parser.add_argument("--vocab", type=int, default=32_000, help="from-scratch vocabulary size")
    parser.add_argument("--extend", type=int, default=8_000, help="ranks added to the official vocabulary")
    parser.add_argument(
        "--extend-mb", type=float, default=10.0, help="MB of the Chinese-like text to extend on"
    )
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        english, chinese, chinese_start = make_corpus(tmp, args.mb, args.extend_mb)
        print(f"generated {args.mb} MB in {time.perf_counter() - start:.1f} s", flush=True)

        counts = CorpusCounts()
        start = time.perf_counter()
        scratch = train_tokenizer([english, chinese], args.vocab, tmp / "scratch", counts=counts)
        scratch_s = time.perf_counter() - start
        print(
            f"from scratch: {scratch.n_bpe} ranks on {counts.bytes / 1e6:.1f} MB in {scratch_s:.1f} s",
            flush=True,
        )

        official = official_vocab_path()
        base = Tokenizer.from_file(official)
        ext_counts = CorpusCounts()
        start = time.perf_counter()
        extended = train_tokenizer(
            [chinese_start], base.n_bpe + args.extend, tmp / "extended", base=official, counts=ext_counts
        )
        extend_s = time.perf_counter() - start
        print(
            f"extension: {extended.n_bpe} ranks on {ext_counts.bytes / 1e6:.1f} MB in {extend_s:.1f} s",
            flush=True,
        )

        rows = compression_stats(
            {"official": base, "scratch": scratch, "extended": extended}, [english, chinese]
        )
        table = format_stats_table(rows)
        print(table)

    cores = len(os.sched_getaffinity(0))
    command = (
        f"`.venv/bin/python benchmarks/tokenizer_train.py --mb {args.mb:g} --vocab {args.vocab} "
        f"--extend {args.extend} --extend-mb {args.extend_mb:g}`"
    )
    section = (
        f"Generated corpus of {args.mb:g} MB (half English-like, half Chinese-like words, Zipf-distributed), "
        f"{cores} CPU cores ({platform.processor() or platform.machine()}).\n\n"
        "| run | text | ranks | wall time, s | MB/s |\n|---|---:|---:|---:|---:|\n"
        f"| from scratch (Hugging Face BpeTrainer) | {counts.bytes / 1e6:.1f} MB | {scratch.n_bpe:,} "
        f"| {scratch_s:.1f} | {counts.bytes / 1e6 / scratch_s:.2f} |\n"
        f"| extend official by {args.extend:,} (qwenkit's exact trainer) | {ext_counts.bytes / 1e6:.1f} MB "
        f"| {extended.n_bpe:,} | {extend_s:.1f} | {ext_counts.bytes / 1e6 / extend_s:.2f} |\n\n"
        f"Compression on the training text (bytes per token, higher is better):\n\n{table}\n\n"
        f"Command: {command}"
    )
    if not args.no_write:
        write_section("tokenizer-train", f"{HEADING}\n\n{section}")


if __name__ == "__main__":
    main()

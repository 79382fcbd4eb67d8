"""MinHash near-duplicate removal: qwenkit against datasketch and rensa on the same corpus, documents/s,
with recall and precision on planted near duplicates.

The corpus is real text found on the machine (the package descriptions and READMEs in the virtual
environment's site-packages, cut at paragraph ends into documents of 120-400 words). Documents that
already resemble one another (exact 5-gram Jaccard >= 0.3 with an earlier one; candidates found by a
datasketch LSH at threshold 0.2, then checked exactly) are dropped first, so the only near duplicates
are the planted ones: copies of 10% of the documents with 2% of their words replaced by other words
of the corpus (one or two copies each; their exact Jaccard with the original is printed).

All three use the same shingles (qwenkit's `steps.match_words`, 5 words, CJK characters as words), the
same LSH shape as `qwenkit data process` (20 bands x 8 rows = 160 permutations) and the same policy:
keep the first document of each group of LSH candidates, remove the others, no exact verification.

- qwenkit: `steps.minhash_signatures` (the compiled kernel, qwenkit.data.minhash_kernel: words, XXH3
  shingles and datatrove's permutations for all documents in one call, one thread) and
  `steps.lsh_duplicates` (in-memory LSH, keep the first: the policy of the two rows below); "2 threads" is
  the same with `threads=2` (an extra: datasketch and rensa run on one thread);
- qwenkit, datatrove's stages: the whole dedup as `qwenkit data process` runs it, datatrove's four
  MinHash stages (the kernel's signatures, buckets, clusters, filter) through datatrove's local
  executor, files and all (one cluster per union-find component instead of keep-first);
- datasketch: `MinHash.update_batch` per document, `MinHashLSH(params=(20, 8))` query-then-insert;
- rensa: `RMinHash.update` per document, `RMinHashLSH(num_bands=20)` query-then-insert.

Each timing is the median of --repeats runs, the engines alternating; making the shingles from the text
is inside every timing (datasketch and rensa get `steps.match_words` 5-grams as strings, made in Python:
the "shingling alone" line says how much of their time that is; qwenkit's kernel makes its own). The
kernel is built (or loaded from torch's cache) and its character table made before the timings, as the
other engines are imported. datasketch and rensa are not qwenkit dependencies: `pip install datasketch
rensa` first.

    .venv/bin/python benchmarks/minhash_dedup.py --write          # all distinct pieces (~2,900)
    .venv/bin/python benchmarks/minhash_dedup.py --docs 2000 --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from datasketch import MinHash, MinHashLSH
from datatrove.data import Document
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup.minhash import (
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
)
from loguru import logger
from rensa import RMinHash, RMinHashLSH

from qwenkit.data import minhash_kernel, steps

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_section  # noqa: E402

BANDS, ROWS, N_GRAMS, SEED = 20, 8, 5, 1
PERMUTATIONS = BANDS * ROWS


def corpus_texts(min_words: int = 120, max_words: int = 400) -> list[str]:
    """Paragraph-aligned pieces of the text files and package descriptions in site-packages."""
    site = Path(np.__file__).resolve().parent.parent
    files = sorted(site.glob("*.dist-info/METADATA"))
    files += sorted(
        p for ext in ("md", "rst", "txt") for p in site.rglob(f"*.{ext}") if p.stat().st_size > 2000
    )
    texts, seen = [], set()
    for path in files:
        paragraphs = [p.strip() for p in path.read_text(encoding="utf-8", errors="replace").split("\n\n")]
        piece: list[str] = []
        count = 0
        for paragraph in paragraphs:
            if not paragraph:
                continue
            piece.append(paragraph)
            count += len(paragraph.split())
            if count >= min_words:
                text = "\n\n".join(piece)
                if count <= max_words and text not in seen:
                    seen.add(text)
                    texts.append(text)
                piece, count = [], 0
    return texts


def shingle_set(text: str) -> set[str]:
    found = steps.match_words(text)
    return {" ".join(found[i : i + N_GRAMS]) for i in range(max(1, len(found) - N_GRAMS + 1))}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def distinct_documents(texts: list[str], limit: int) -> list[str]:
    """Texts with no earlier kept text of exact shingle Jaccard >= 0.3 (at most `limit`)."""
    lsh = MinHashLSH(threshold=0.2, num_perm=64)
    kept: list[str] = []
    kept_sets: list[set[str]] = []
    for text in texts:
        found = shingle_set(text)
        if len(found) < 20:
            continue
        m = MinHash(num_perm=64, seed=7)
        m.update_batch([s.encode() for s in found])
        if any(jaccard(found, kept_sets[i]) >= 0.3 for i in lsh.query(m)):
            continue
        lsh.insert(len(kept), m)
        kept.append(text)
        kept_sets.append(found)
        if len(kept) == limit:
            break
    return kept


def plant_near_duplicates(base: list[str], rng: random.Random, fraction: float = 0.1, change: float = 0.02):
    """The corpus with near copies inserted at random places -> (texts, {copy index: original index})."""
    vocabulary = sorted({w for t in base[:500] for w in t.split()})
    docs = list(base)
    copies: dict[int, int] = {}
    for original in rng.sample(range(len(base)), round(len(base) * fraction)):
        for _ in range(rng.choice((1, 2))):
            words = base[original].split()
            for i in rng.sample(range(len(words)), max(1, round(len(words) * change))):
                words[i] = rng.choice(vocabulary)
            docs.append(" ".join(words))
            copies[len(docs) - 1] = original
    order = list(range(len(docs)))
    rng.shuffle(order)
    position = {old: new for new, old in enumerate(order)}
    shuffled = [docs[i] for i in order]
    return shuffled, {position[c]: position[o] for c, o in copies.items()}


def groups_of(copies: dict[int, int]) -> list[set[int]]:
    groups: dict[int, set[int]] = {}
    for copy, original in copies.items():
        groups.setdefault(original, {original}).add(copy)
    return list(groups.values())


def score(removed: set[int], groups: list[set[int]]) -> tuple[float, float]:
    """(recall, precision) of removals: each planted group of k documents should lose k - 1 of them;
    a removal outside the planted groups, or of a group's last document, is a false one."""
    in_group = {i: g for g in groups for g_i in [g] for i in g_i}
    true = sum(min(len(removed & g), len(g) - 1) for g in groups)
    false = len(removed - set(in_group)) + sum(max(0, len(removed & g) - (len(g) - 1)) for g in groups)
    wanted = sum(len(g) - 1 for g in groups)
    return true / wanted, true / max(1, true + false)


def keep_first(signatures, lsh, insert, query) -> set[int]:
    removed = set()
    for i, sig in enumerate(signatures):
        if query(lsh, sig):
            removed.add(i)
        else:
            insert(lsh, i, sig)
    return removed


def run_datasketch(texts: list[str]) -> set[int]:
    hashes = []
    for text in texts:
        m = MinHash(num_perm=PERMUTATIONS, seed=SEED)
        m.update_batch([s.encode() for s in shingle_set(text)])
        hashes.append(m)
    lsh = MinHashLSH(num_perm=PERMUTATIONS, params=(BANDS, ROWS))
    return keep_first(hashes, lsh, lambda lsh, i, m: lsh.insert(i, m), lambda lsh, m: lsh.query(m))


def run_rensa(texts: list[str]) -> set[int]:
    hashes = []
    for text in texts:
        m = RMinHash(num_perm=PERMUTATIONS, seed=SEED)
        m.update(list(shingle_set(text)))
        hashes.append(m)
    lsh = RMinHashLSH(threshold=0.8, num_perm=PERMUTATIONS, num_bands=BANDS)
    return keep_first(hashes, lsh, lambda lsh, i, m: lsh.insert(i, m), lambda lsh, m: lsh.query(m))


def signatures_datasketch(texts: list[str]) -> None:
    for text in texts:
        MinHash(num_perm=PERMUTATIONS, seed=SEED).update_batch([s.encode() for s in shingle_set(text)])


def signatures_rensa(texts: list[str]) -> None:
    for text in texts:
        RMinHash(num_perm=PERMUTATIONS, seed=SEED).update(list(shingle_set(text)))


def config() -> MinhashConfig:
    return MinhashConfig(n_grams=N_GRAMS, num_buckets=BANDS, hashes_per_bucket=ROWS, seed=SEED)


def signatures_qwenkit(texts: list[str], threads: int = 1) -> None:
    steps.minhash_signatures(texts, config(), threads=threads)


def run_qwenkit(texts: list[str], threads: int = 1) -> set[int]:
    duplicates = steps.lsh_duplicates(steps.minhash_signatures(texts, config(), threads=threads), BANDS)
    return set(np.flatnonzero(duplicates).tolist())


def run_qwenkit_datatrove(texts: list[str]) -> set[int]:
    """datatrove's four MinHash stages as `qwenkit data process` chains them, one task each."""
    minhash = config()
    kept: list[int] = []

    def documents(data, rank: int = 0, world_size: int = 1):
        yield from (Document(text=t, id=str(i)) for i, t in enumerate(texts))

    def collect(data, rank: int = 0, world_size: int = 1):
        for doc in data:
            kept.append(int(doc.id))
            yield doc

    quiet = contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO())
    with tempfile.TemporaryDirectory() as tmp, quiet[0], quiet[1]:
        work = Path(tmp)
        runs = [
            [documents, steps.CjkMinhashSignature(str(work / "signatures"), minhash)],
            [MinhashDedupBuckets(str(work / "signatures"), str(work / "buckets"), config=minhash)],
            [MinhashDedupCluster(str(work / "buckets"), str(work / "remove"), config=minhash)],
            [documents, MinhashDedupFilter(str(work / "remove")), collect],
        ]
        for i, pipeline in enumerate(runs):
            tasks = BANDS if i == 1 else 1
            LocalPipelineExecutor(
                pipeline, tasks=tasks, workers=1, logging_dir=str(work / f"logs-{i}"), skip_completed=False
            ).run()
    return set(range(len(texts))) - set(kept)


def timed(function, texts, repeats: int) -> tuple[float, object]:
    seconds, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function(texts)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--docs", type=int, default=6000, help="at most this many distinct documents")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", action="store_true", help="write the table into docs/benchmarks.md")
    args = parser.parse_args()
    logger.remove()  # datatrove's progress logs
    rng = random.Random(args.seed)
    base = distinct_documents(corpus_texts(), args.docs)
    texts, copies = plant_near_duplicates(base, rng)
    groups = groups_of(copies)
    similarity = [jaccard(shingle_set(texts[c]), shingle_set(texts[o])) for c, o in copies.items()]
    words = sum(len(t.split()) for t in texts)
    corpus = (
        f"Corpus: {len(texts):,} documents ({len(base):,} distinct + {len(copies):,} planted near copies "
        f"in {len(groups):,} groups), {words / len(texts):.0f} words each on average; planted copies' "
        f"exact Jaccard with their original: mean {statistics.mean(similarity):.3f}, min {min(similarity):.3f}."
    )
    if minhash_kernel.load() is None:
        sys.exit("qwenkit's MinHash kernel cannot be built here: this benchmark measures it")
    engines = {
        "qwenkit": (signatures_qwenkit, run_qwenkit),
        "qwenkit, 2 threads": (
            lambda texts: signatures_qwenkit(texts, threads=2),
            lambda texts: run_qwenkit(texts, threads=2),
        ),
        "qwenkit, datatrove's 4 stages (`data process`)": (None, run_qwenkit_datatrove),
        "datasketch": (signatures_datasketch, run_datasketch),
        "rensa": (signatures_rensa, run_rensa),
    }
    load_before = os.getloadavg()[0]
    shingling, _ = timed(lambda texts: [shingle_set(t) for t in texts], texts, args.repeats)
    signature_seconds = {name: [] for name in engines}
    dedup_seconds = {name: [] for name in engines}
    removed = {}
    for _ in range(args.repeats):  # alternate the engines
        for name, (signatures, dedup) in engines.items():
            if signatures is not None:
                signature_seconds[name].append(timed(signatures, texts, 1)[0])
            seconds, removed[name] = timed(dedup, texts, 1)
            dedup_seconds[name].append(seconds)
    rows = [
        "| engine | signatures: documents/s | dedup (signatures + LSH + keep one): documents/s | "
        "vs datasketch (dedup) | removed | recall | precision |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    base_rate = len(texts) / statistics.median(dedup_seconds["datasketch"])
    for name in engines:
        sig_rate = (
            f"{len(texts) / statistics.median(signature_seconds[name]):,.0f}"
            if signature_seconds[name]
            else "-"
        )
        rate = len(texts) / statistics.median(dedup_seconds[name])
        recall, precision = score(removed[name], groups)
        rows.append(
            f"| {name} | {sig_rate} | {rate:,.0f} | {rate / base_rate:.2f}x | {len(removed[name]):,} | "
            f"{recall:.3f} | {precision:.3f} |"
        )
    lines = [
        corpus,
        f"Shingling alone (`steps.match_words` 5-grams as strings in Python, as datasketch and rensa are given "
        f"them, inside their time; qwenkit's kernel makes its own): {len(texts) / shingling:,.0f} documents/s.",
        "",
        *rows,
        "",
        f"Medians of {args.repeats} alternating runs on {os.cpu_count()} cores, load average "
        f"{load_before:.1f} before and {os.getloadavg()[0]:.1f} after. Command: `.venv/bin/python "
        f"benchmarks/minhash_dedup.py --docs {args.docs} --repeats {args.repeats}`",
    ]
    print("\n".join(lines))
    if args.write:
        write_section("minhash-dedup", "\n".join(lines), heading="MinHash dedup vs datasketch and rensa "
                      "(`benchmarks/minhash_dedup.py`)")  # fmt: skip


if __name__ == "__main__":
    main()

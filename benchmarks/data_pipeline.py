"""Documents/s per stage of `qwenkit data process` on 2 cores (issue 15), from the run's own report.

The corpus is real English text found on the machine (site-packages' descriptions and docs, as
benchmarks/minhash_dedup.py gathers it) plus the demo generator's Chinese stories, with 10% exact and
10% near duplicates (2% of words changed) planted, split over 4 JSONL files so 2 workers share them.
Each stage's rate is documents in / the stage's wall time as datatrove's executor records it.

    .venv/bin/python benchmarks/data_pipeline.py --docs 4000 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from minhash_dedup import corpus_texts, distinct_documents, plant_near_duplicates  # noqa: E402
from report import write_section  # noqa: E402

from qwenkit.data.pipeline import load_process_config, process  # noqa: E402
from qwenkit.data.synthetic import chinese_story  # noqa: E402


def build_corpus(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    english = distinct_documents(corpus_texts(), round(count * 0.6))
    chinese = [
        "".join(chinese_story(rng) for _ in range(rng.randint(6, 12))) for _ in range(round(count * 0.2))
    ]
    base = english + chinese
    texts, _ = plant_near_duplicates(base, rng, fraction=0.1, change=0.02)
    texts += rng.sample(base, round(len(base) * 0.1))  # exact duplicates
    rng.shuffle(texts)
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--docs", type=int, default=4000, help="distinct documents before planting")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true", help="print, do not write docs/benchmarks.md")
    args = parser.parse_args()

    texts = build_corpus(args.docs, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        inputs = []
        for part in range(4):
            path = Path(tmp) / f"part{part}.jsonl"
            rows = texts[part::4]
            path.write_text(
                "".join(json.dumps({"id": f"{part}-{i}", "text": t}) + "\n" for i, t in enumerate(rows))
            )
            inputs.append(path)
        config = load_process_config(None, ["--executor.workers", str(args.workers)])
        report = process(inputs, Path(tmp) / "out", config)
    assert report is not None
    lines = [
        f"{len(texts):,} documents ({report['bytes_in'] / 1e6:.1f} MB: English text from site-packages, "
        f"the demo generator's Chinese, 10% exact and ~10% near duplicates planted), default config "
        f"(decontamination against HumanEval on, the model scores off), {args.workers} workers, "
        f"load average {os.getloadavg()[0]:.1f} at the end. Rates are documents in per worker-second of the stage (its steps' time summed over tasks; dedup includes its signature and global runs). Quality removes most of this corpus (site-packages READMEs and changelogs: markdown, code, lists) and MinHash also removes the templated Chinese stories, which are near-duplicates of each other.",
        "",
        "| stage | docs in | docs out | docs/s |",
        "|---|---:|---:|---:|",
    ]
    for stage in report["stages"]:
        rate = stage["docs_per_second"]
        lines.append(f"| {stage['stage']} | {stage['docs_in']:,} | {stage['docs_out']:,} | {rate or '-'} |")
    lines.append(
        f"| **whole pipeline** | {report['documents_in']:,} | {report['documents_out']:,} | {report['docs_per_second']} |"
    )
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section(
            "data-pipeline", body, "Data pipeline: documents/s per stage (`benchmarks/data_pipeline.py`)"
        )


if __name__ == "__main__":
    main()

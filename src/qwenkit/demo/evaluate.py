"""What the demo model can do, measured on held-out conversations with greedy decoding (the model card's
numbers and the targets CI holds the shipped weights to)."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from qwenkit.agent.react import calculator, observation_text, parse_reply
from qwenkit.chatml import render_messages
from qwenkit.demo.data import (
    DEMO_NAME,
    SFT_EXAMPLES,
    Example,
    held_out_examples,
    prompt_key,
    prompt_messages,
)
from qwenkit.errors import QwenkitError


def in_language(reply: str, chinese: bool) -> bool:
    """Chinese: more CJK characters than Latin letters (names aside); English: no CJK at all."""
    cjk = len(re.findall(r"[\u4e00-\u9fff]", reply))
    latin = len(re.findall(r"[A-Za-z]", reply.replace(DEMO_NAME, "").replace("qwenkit", "")))
    return cjk > latin if chinese else cjk == 0 and bool(reply.strip())


@dataclass
class Reply:
    text: str
    ended: bool  # the turn ended with <|im_end|> (or a stop string)


def prompt_ids(tokenizer, example: Example) -> list[int]:
    """ChatML prompt ids ending with `<|im_start|>assistant\n`, rendered as training renders the
    conversation (with tools: the ReAct instruction before the question)."""
    return render_messages(tokenizer, prompt_messages(example), example.tools, prompt=True).input_ids


def generate_replies(model, tokenizer, prompts: Sequence[list[int]], stop_strings: Sequence[str] = (),
                     max_new_tokens: int = 96, batch_size: int = 16) -> list[Reply]:  # fmt: skip
    """Greedy replies for many prompts, batched (left-padded); the turn ends at <|im_end|>, or before
    a stop string if given."""
    from qwenkit.generation import generate_text

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: dict[int, Reply] = {}
    stops = [[tokenizer.im_end_id], [tokenizer.im_start_id]]
    for start in range(0, len(order), batch_size):
        rows = [prompts[i] for i in order[start : start + batch_size]]
        replies = generate_text(model, tokenizer, rows, stop_strings, stops, max_new_tokens=max_new_tokens,
                                do_sample=False)  # fmt: skip
        for i, reply in zip(order[start : start + batch_size], replies, strict=True):
            ended = reply.finish_reason == "stop" and reply.ids[-1] != tokenizer.im_start_id
            results[i] = Reply(reply.text, ended)
    return [results[i] for i in range(len(prompts))]


def evaluate_examples(model, tokenizer, examples: Sequence[Example], batch_size: int = 16) -> dict:
    """The model card's numbers for `examples` (greedy decoding)."""
    plain = [e for e in examples if e.kind != "react"]
    react = [e for e in examples if e.kind == "react"]
    replies = generate_replies(model, tokenizer, [prompt_ids(tokenizer, e) for e in plain],
                               batch_size=batch_size)  # fmt: skip
    results: dict[str, list[bool]] = {k: [] for k in ("language", "identity", "knowledge", "refusal", "im_end",
                                                       "direct_without_tools", "direct_with_tools",
                                                       "react_action", "react_final")}  # fmt: skip
    samples = []  # each reply with the checks it was counted in ({measure: passed})

    def check(checks: dict[str, bool], key: str, passed: bool) -> None:
        results[key].append(passed)
        checks[key] = passed

    for example, reply in zip(plain, replies, strict=True):
        text, checks = reply.text, {}
        check(checks, "im_end", reply.ended)
        if example.tools:
            answer = text.split("Final Answer:", 1)[1].strip() if "Final Answer:" in text else ""
            check(checks, "direct_with_tools", "\nAction:" not in "\n" + text and bool(answer))
            text = answer
        else:
            check(checks, "direct_without_tools", "Action:" not in text)
        if example.kind != "direct_math":
            check(checks, "language", in_language(text, example.chinese))
        if example.kind == "identity":
            check(checks, "identity", DEMO_NAME in text)
        if example.kind in ("knowledge", "refusal"):  # the fact, or "don't know" / "不知道"
            check(checks, example.kind, example.expected.lower() in text.lower())
        samples.append({"kind": example.kind, "question": example.question, "reply": reply.text,
                        "expected": example.expected, "checks": checks})  # fmt: skip
    # ReAct: the first reply must call the calculator with a correct expression; then, given the real
    # Observation, the continuation must give a Final Answer containing the tool's result.
    prompts = [prompt_ids(tokenizer, e) for e in react]
    first = generate_replies(model, tokenizer, prompts, stop_strings=["Observation:"], batch_size=batch_size)
    first_samples: dict[int, dict] = {}
    second_prompts, waiting = [], []
    for example, prompt, reply in zip(react, prompts, first, strict=True):
        call = parse_reply(reply.text)
        ok = False
        if call is not None and hasattr(call, "name") and call.name == "calculator":
            observation = calculator.call(call.arguments)
            ok = observation == example.expected
            ids = tokenizer.encode(reply.text.rstrip() + "\nObservation:")
            second_prompts.append(prompt + ids + tokenizer.encode(observation_text(observation)))
            waiting.append(example)
        results["react_action"].append(ok)
        samples.append({"kind": "react", "question": example.question, "reply": reply.text,
                        "expected": example.expected, "checks": {"react_action": ok}})  # fmt: skip
        first_samples[id(example)] = samples[-1]
    finals = generate_replies(model, tokenizer, second_prompts, batch_size=batch_size)
    final_by_id = {id(e): r for e, r in zip(waiting, finals, strict=True)}
    for example in react:
        reply = final_by_id.get(id(example))
        if reply is None:  # no calculator call, so no final answer: counted on the first reply
            check(first_samples[id(example)]["checks"], "react_final", False)
            continue
        checks = {}
        check(checks, "im_end", reply.ended)
        answer = reply.text.split("Final Answer:", 1)[1] if "Final Answer:" in reply.text else ""
        check(checks, "react_final", example.expected in answer)
        samples.append({"kind": "react_final", "question": example.question, "reply": reply.text,
                        "expected": example.expected, "checks": checks})  # fmt: skip
        check(checks, "language", in_language(answer, example.chinese))
    scores = {k: {"rate": sum(v) / len(v), "n": len(v)} for k, v in results.items() if v}
    return {"scores": scores, "samples": samples}


SCORE_NAMES = {
    "language": "answers in the language of the question",
    "identity": "says who it is (names itself Qwen Demo)",
    "knowledge": "simple knowledge questions answered correctly",
    "refusal": "questions outside its knowledge: says it does not know",
    "im_end": "turns ending with <|im_end|>",
    "react_action": "calculator offered: well-formed Action / Action Input with a correct expression",
    "react_final": "after the Observation: Final Answer containing the tool's result",
    "direct_without_tools": "no tools offered: answers directly (no Action)",
    "direct_with_tools": "tools offered, not needed: direct Final Answer (no Action)",
}
TARGETS = {"language": 0.9, "im_end": 0.99, "react_action": 0.9, "react_final": 0.9}


def score_table(scores: dict) -> str:
    rows = ["| ability | rate | held-out prompts | target |", "|---|---|---|---|"]
    for key, name in SCORE_NAMES.items():
        if key in scores:
            target = f">= {TARGETS[key]:.0%}" if key in TARGETS else ""
            rows.append(f"| {name} | {scores[key]['rate']:.1%} | {scores[key]['n']} | {target} |")
    return "\n".join(rows)


def shipped_data() -> str:
    """The data set the shipped model was built from (its eval.json; "tables" before issue 17)."""
    from qwenkit.demo.pipeline import DEMO_MODEL_DIR

    record = DEMO_MODEL_DIR / "eval.json"
    settings = json.loads(record.read_text()).get("settings", {}) if record.is_file() else {}
    return settings.get("data", "tables")


def evaluate_held_out(model, tokenizer, count: int, seed: int = 0, data: str | None = None) -> dict:
    """Measure a model on `count` held-out prompts of the build with `seed` and data set `data`
    (default: the shipped model's), none of them among its training prompts."""
    from qwenkit.demo.compose import DATASETS

    data = data or shipped_data()
    if data not in DATASETS:
        raise QwenkitError(f"unknown demo data {data!r}; use one of {', '.join(DATASETS)}")
    generate = DATASETS[data][0]
    held = held_out_examples(count, seed + 1000, training_prompts(seed + 1, data), generate)
    return evaluate_examples(model, tokenizer, held)


@lru_cache(maxsize=2)
def training_prompts(seed: int, data: str = "tables") -> frozenset:
    """The prompts of the build's SFT examples with `seed` (generating them takes a while: kept)."""
    from qwenkit.demo.compose import DATASETS

    return frozenset(prompt_key(e) for e in DATASETS[data][0](SFT_EXAMPLES, seed, False))

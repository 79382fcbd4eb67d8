"""The RLHF demonstration (`make rlhf-demo`): align the embedded demo model with a preference it does not
yet satisfy, by a reward model + PPO and by DPO, and measure both on held-out prompts.

The preference: on simple knowledge questions ("What is the capital of Egypt?", "世界上有几个大洲？"),
a reply is preferred when it is right -- it contains the expected answer, is in the language of the
question and ends its turn (`preferred`, the model card's "knowledge" check plus the language and
<|im_end|> checks). The shipped model answers about 72% of held-out knowledge questions right with greedy
decoding and, sampled, often names the wrong country's capital ("The capital of Spain is Madrid." to a
question about Egypt), so the right answer is within reach of sampling and a policy can learn to prefer it.

Pairs are built by sampling the demo model itself (on-policy, as the report's comparison data come from
the model being aligned) and ranking the samples by the rule: a right sample is chosen over a wrong one.
When all samples of a prompt are wrong, the chosen reply is the data's own answer; when all are right,
the rejected one is a right answer to another question (a wrong fact here) -- the errors the model makes.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from qwenkit.demo.data import Example, generate_examples, prompt_key, prompt_messages
from qwenkit.demo.evaluate import in_language, prompt_ids

PREFERENCE = ("knowledge questions answered right: the reply names the expected answer, in the question's "
              "language, and ends its turn")  # fmt: skip


def preferred(example: Example, text: str, ended: bool) -> bool:
    """The rule the pairs are ranked by (module docstring)."""
    return ended and example.expected.lower() in text.lower() and in_language(text, example.chinese)


def knowledge_examples(count: int, seed: int, exclude: frozenset[str] = frozenset(), held_out: bool = False) -> list[Example]:  # fmt: skip
    """`count` distinct knowledge questions from the demo data generator with `seed`, none of whose prompts
    is in `exclude`."""
    found: dict[str, Example] = {}
    draw = 4 * count
    while len(found) < count and draw < 200 * count:
        for e in generate_examples(draw, seed, held_out):
            key = prompt_key(e)
            if e.kind == "knowledge" and key not in exclude:
                found.setdefault(key, e)
        draw *= 2
    return list(found.values())[:count]


@dataclass
class Sample:
    text: str
    ended: bool


def sample_replies(model, tokenizer, examples: Sequence[Example], per_prompt: int, seed: int,
                   max_new_tokens: int = 32, temperature: float = 1.0, top_p: float = 1.0,
                   batch_size: int = 64) -> list[list[Sample]]:  # fmt: skip
    """`per_prompt` sampled replies to each example's prompt, with the decoding core."""
    from qwenkit.generation import generate_text

    prompts = [prompt_ids(tokenizer, e) for e in examples for _ in range(per_prompt)]
    replies: list[Sample] = []
    for start in range(0, len(prompts), batch_size):
        out = generate_text(model, tokenizer, prompts[start : start + batch_size], stop=[[tokenizer.im_end_id]],
                            max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                            top_p=top_p, seed=seed + start)  # fmt: skip
        replies += [Sample(c.text, c.finish_reason == "stop") for c in out]
    return [replies[i * per_prompt : (i + 1) * per_prompt] for i in range(len(examples))]


def build_pairs(examples: Sequence[Example], samples: Sequence[Sequence[Sample]], seed: int) -> tuple[list[dict], float]:  # fmt: skip
    """Preference rows in TRL's conversational layout (one per prompt), and the share of samples the rule
    prefers (how often the model already satisfies the preference when sampled)."""
    rng = random.Random(seed)
    right_by_language: dict[bool, list[tuple[Example, str]]] = {True: [], False: []}
    for example, replies in zip(examples, samples, strict=True):
        right_by_language[example.chinese] += [
            (example, s.text) for s in replies if preferred(example, s.text, s.ended)
        ]
    rows, right, total = [], 0, 0
    for example, replies in zip(examples, samples, strict=True):
        good = [s.text for s in replies if preferred(example, s.text, s.ended)]
        bad = [s.text for s in replies if not preferred(example, s.text, s.ended) and s.ended]
        right, total = right + len(good), total + len(replies)
        if not good:
            good = [example.messages[-1]["content"]]  # the data's own (right) answer
        if not bad:  # a right answer to another question is a wrong one here
            others = [
                t for e, t in right_by_language[example.chinese] if example.expected.lower() not in t.lower()
            ]
            if not others:
                continue
            bad = [rng.choice(others)]
        rows.append({"prompt": prompt_messages(example), "chosen": [{"role": "assistant", "content": good[0]}],
                     "rejected": [{"role": "assistant", "content": rng.choice(bad)}]})  # fmt: skip
    return rows, right / max(total, 1)


def write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


@torch.no_grad()
def conversation_rewards(reward_model, tokenizer, prompts: Sequence[list[int]], replies: Sequence[list[int]],
                         batch_size: int = 32) -> list[float]:  # fmt: skip
    """The reward model's score of each prompt + reply (the reply's ids ending with <|im_end|>)."""
    scores: list[float] = []
    device = next(reward_model.parameters()).device
    for start in range(0, len(prompts), batch_size):
        rows = [
            p + r
            for p, r in zip(
                prompts[start : start + batch_size], replies[start : start + batch_size], strict=True
            )
        ]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for k, row in enumerate(rows):
            ids[k, : len(row)], mask[k, : len(row)] = torch.tensor(row), 1
        scores += reward_model.rewards(ids.to(device), mask.to(device)).float().tolist()
    return scores


def response_logprob(model, prompts: Sequence[list[int]], replies: Sequence[list[int]]) -> list[float]:
    """log p(reply | prompt) under `model`, summed over the reply's tokens (the decoding core's scorer)."""
    from qwenkit.generation import score_prompts

    scored = score_prompts(model, [p + r for p, r in zip(prompts, replies, strict=True)])
    return [sum(t.logprob for t in entries[len(p) :]) for entries, p in zip(scored, prompts, strict=True)]


def measure(model, reference, reward_model, tokenizer, examples: Sequence[Example], seed: int,
            per_prompt: int = 2, max_new_tokens: int = 32) -> dict:  # fmt: skip
    """What the docs report for a policy on held-out knowledge prompts: the rule's rate on greedy replies
    (the model card's measure), and on replies sampled at temperature 1: the rule's rate, the mean reward
    model score and the mean KL(policy || reference) per reply (the sampled replies' summed log-ratio, an
    unbiased estimate). A sampled reply that never ends is scored with an <|im_end|> appended."""
    from qwenkit.demo.evaluate import generate_replies

    prompts = [prompt_ids(tokenizer, e) for e in examples]
    greedy = generate_replies(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    sampled = sample_replies(model, tokenizer, examples, per_prompt, seed, max_new_tokens)
    flat_prompts, flat_replies, right = [], [], 0
    for example, prompt, replies in zip(examples, prompts, sampled, strict=True):
        for s in replies:
            flat_prompts.append(prompt)
            flat_replies.append(tokenizer.encode(s.text) + [tokenizer.im_end_id])
            right += preferred(example, s.text, s.ended)
    rewards = conversation_rewards(reward_model, tokenizer, flat_prompts, flat_replies)
    policy = response_logprob(model, flat_prompts, flat_replies)
    base = response_logprob(reference, flat_prompts, flat_replies)
    greedy_right = [preferred(e, r.text, r.ended) for e, r in zip(examples, greedy, strict=True)]
    return {
        "greedy_right": sum(greedy_right) / len(examples),
        "sampled_right": right / len(flat_replies),
        "reward": sum(rewards) / len(rewards),
        "kl": sum(p - b for p, b in zip(policy, base, strict=True)) / len(policy),
        "examples": [
            {"question": e.question, "expected": e.expected, "reply": r.text, "right": ok}
            for e, r, ok in list(zip(examples, greedy, greedy_right, strict=True))[:8]
        ],  # fmt: skip
    }

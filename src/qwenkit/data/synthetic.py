"""A small generated corpus, so the tiny recipes run anywhere without downloads.

Documents are short stories and facts built from templates over a fixed lexicon, plus arithmetic
with correct results, in English and Chinese. The text is regular enough that a tiny model's loss
falls visibly within a couple of minutes on a CPU; it is not meant to teach anything else.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = ["Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Ivy", "Jack"]
ANIMALS = ["cat", "dog", "bird", "fox", "horse", "rabbit", "tiger", "panda", "whale", "owl"]
PLACES = ["park", "river", "forest", "market", "school", "garden", "beach", "library", "city", "farm"]
COLORS = ["red", "blue", "green", "yellow", "white", "black", "orange", "purple"]
VERBS = ["saw", "liked", "followed", "fed", "painted", "found", "watched", "helped"]
ZH_NAMES = ["小明", "小红", "小刚", "小丽", "老王", "小李"]
ZH_ANIMALS = ["猫", "狗", "鸟", "狐狸", "马", "兔子", "老虎", "熊猫"]
ZH_PLACES = ["公园", "河边", "森林", "市场", "学校", "花园", "海边", "图书馆"]
ZH_COLORS = ["红色", "蓝色", "绿色", "黄色", "白色", "黑色"]


def english_story(rng: random.Random) -> str:
    name, other = rng.sample(NAMES, 2)
    animal, place, color, verb = (
        rng.choice(ANIMALS),
        rng.choice(PLACES),
        rng.choice(COLORS),
        rng.choice(VERBS),
    )
    return (
        f"{name} went to the {place}. There {name} {verb} a {color} {animal}. "
        f"The {animal} was happy. Later {other} came to the {place} and {name} told {other} about the {animal}."
    )


def chinese_story(rng: random.Random) -> str:
    name, other = rng.sample(ZH_NAMES, 2)
    animal, place, color = rng.choice(ZH_ANIMALS), rng.choice(ZH_PLACES), rng.choice(ZH_COLORS)
    return f"{name}去了{place}。在{place}，{name}看见了一只{color}的{animal}。后来{other}也来了，{name}把{animal}的事告诉了{other}。"


def arithmetic(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(3, 6)):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op = rng.choice("+-")
        lines.append(f"{a} {op} {b} = {a + b if op == '+' else a - b}")
    return "\n".join(lines)


def generate_documents(count: int, seed: int = 0) -> list[str]:
    """`count` documents, the same for the same seed."""
    rng = random.Random(seed)
    makers = [english_story, english_story, chinese_story, arithmetic]
    return [" ".join(rng.choice(makers)(rng) for _ in range(rng.randint(1, 3))) for _ in range(count)]


def write_corpus(path: Path, count: int, seed: int = 0) -> Path:
    """The generated documents as JSONL (`{"text": ...}` per line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for text in generate_documents(count, seed):
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return path


def chat_samples(count: int, seed: int = 0) -> list[dict]:
    """`count` OpenAI-style conversations (arithmetic and short questions), for tiny SFT runs."""
    rng = random.Random(seed)
    samples = []
    for _ in range(count):
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        name, animal, place = rng.choice(NAMES), rng.choice(ANIMALS), rng.choice(PLACES)
        turns = rng.choice(
            [
                [("user", f"What is {a} + {b}?"), ("assistant", f"{a} + {b} = {a + b}.")],
                [("user", f"{a}加{b}等于多少？"), ("assistant", f"{a}加{b}等于{a + b}。")],
                [
                    ("user", f"Where did {name} see the {animal}?"),
                    ("assistant", f"{name} saw the {animal} at the {place}."),
                ],
            ]
        )
        samples.append({"messages": [{"role": r, "content": c} for r, c in turns]})
    return samples

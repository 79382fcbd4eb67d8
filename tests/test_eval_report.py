"""qwenkit.eval.report: results.json, predictions.jsonl, report.md and its PNG chart, written atomically."""

import json
import math

import pytest

from qwenkit import __version__
from qwenkit.eval import report
from qwenkit.eval.base import Prediction, TaskResult


def results() -> list[TaskResult]:
    mmlu = TaskResult(
        "mmlu",
        {"accuracy": 0.5},
        [
            Prediction("anatomy/0", "A", "A", True, "anatomy"),
            Prediction("anatomy/1", "B", "C", False, "anatomy", {"logprobs": [-1.0, -0.5, -2.0, -3.0]}),
        ],
        {"subject": {"anatomy": 0.5}, "category": {"STEM": 0.5, "Other": math.nan}},
        {"shots": 5, "limit": None},
        seconds=1.25,
    )
    table = {"setting@length": {"plain@1024": 9.5, "plain@2048": 30.0, "ntk@1024": 9.5, "ntk@2048": 12.5}}
    ppl = TaskResult(
        "long-ppl", {"perplexity": 12.5}, [Prediction("doc.txt/0", 12.5, None, None)], table, {}, 2.0
    )
    return [mmlu, ppl]


def test_files_and_contents(tmp_path):
    info = {
        "model": {"name": "tiny", "path": "/m", "dtype": "float32", "device": "cpu"},
        "command": "qwenkit eval mmlu",
    }
    paths = report.write_outputs(tmp_path / "out", results(), info)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "predictions.jsonl",
        "report.md",
        "report.png",
        "results.json",
    ]
    assert paths["chart"] == out / "report.png"

    document = json.loads((out / "results.json").read_text())
    assert document["qwenkit_version"] == __version__ and document["date"][:2] == "20"
    assert document["model"] == info["model"] and document["command"] == "qwenkit eval mmlu"
    mmlu = document["tasks"]["mmlu"]
    assert mmlu["metrics"] == {"accuracy": 0.5} and mmlu["items"] == 2 and mmlu["seconds"] == 1.25
    assert mmlu["groups"]["category"] == {"STEM": 0.5, "Other": None}  # NaN written as null (strict JSON)
    assert mmlu["settings"] == {"shots": 5, "limit": None}
    assert document["tasks"]["long-ppl"]["metrics"] == {"perplexity": 12.5}

    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert rows[0] == {"task": "mmlu", "id": "anatomy/0", "subject": "anatomy", "prediction": "A",
                       "reference": "A", "correct": True}  # fmt: skip
    assert rows[1]["logprobs"] == [-1.0, -0.5, -2.0, -3.0] and rows[1]["correct"] is False
    assert rows[2] == {
        "task": "long-ppl",
        "id": "doc.txt/0",
        "prediction": 12.5,
        "reference": None,
        "correct": None,
    }

    card = (out / "report.md").read_text()
    assert "| mmlu | accuracy | 0.5000 | 2 | 1.2 |" in card
    assert "| long-ppl | perplexity | 12.5000 | 1 | 2.0 |" in card
    assert "### per category" in card and "| Other | n/a |" in card and "| anatomy | 0.5000 |" in card
    pivot = (
        "| setting | 1024 | 2048 |\n|---|---|---|\n| plain | 9.5000 | 30.0000 |\n| ntk | 9.5000 | 12.5000 |"
    )
    assert pivot in card
    assert "![scores](report.png)" in card and "qwenkit eval mmlu" in card
    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_no_chart_without_numbers(tmp_path):
    empty = TaskResult("demo", {}, [])
    paths = report.write_outputs(tmp_path, [empty], {})
    assert "chart" not in paths and not (tmp_path / "report.png").exists()
    assert "![scores]" not in (tmp_path / "report.md").read_text()


def test_writes_are_atomic(tmp_path, monkeypatch):
    report.write_outputs(tmp_path, results(), {"command": "first"})
    before = (tmp_path / "results.json").read_text()

    def fail(fd):
        raise OSError("disk full")

    monkeypatch.setattr(report.os, "fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        report.write_outputs(tmp_path, results(), {"command": "second"})
    assert (tmp_path / "results.json").read_text() == before  # the old file whole, not half a new one
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "predictions.jsonl",
        "report.md",
        "report.png",
        "results.json",
    ]
